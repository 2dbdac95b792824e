"""`kiln chat`'s sampling options as a user types them: a bad value is one line before the banner and the
first prompt (it was the default, or an error only after the first message)."""

from __future__ import annotations

import pytest

from conftest import run_kiln
from kiln.cli import main
from test_sft import base_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """One tiny checkpoint (model.max_seq_len 128) for the module."""
    return base_checkpoint(tmp_path_factory.mktemp("chat-options"))


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "-1", "--temperature must be a finite number >= 0 (0 means greedy), got -1.0"),
    ("--temperature", "inf", "--temperature must be a finite number >= 0 (0 means greedy), got inf"),
    ("--top-p", "0", "--top-p must be within (0, 1], got 0.0"),
    ("--top-p", "1.5", "--top-p must be within (0, 1], got 1.5"),
    ("--repetition-penalty", "0", "--repetition-penalty must be > 0 (1 disables it), got 0.0"),
])
@pytest.mark.parametrize("command", ["chat", "generate"])
def test_chat_refuses_a_bad_sampling_option_before_anyone_types(ckpt, flag, value, message, capsys, command):
    """generate's own checks, which chat ran only on the first message; no banner, no prompt. (In-process
    through kiln.cli.main: the refusal comes before anything is loaded.) generate said "top_p must be ...", not
    the flag, and only after loading the checkpoint."""
    extra = ["--prompt", "hi"] if command == "generate" else []
    assert main([command, "--checkpoint", str(ckpt), flag, value, *extra]) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [f"kiln: error: {message}"] and out == "", err[-2000:]


@pytest.mark.parametrize("flag", ["--temperature", "--repetition-penalty"])
def test_a_tiny_temperature_or_penalty_samples_instead_of_failing(ckpt, flag):
    """1e-300 overflowed the logits to inf: torch.multinomial's "probability tensor contains inf/nan" traceback.
    A temperature that small is greedy in effect; a penalty that small keeps the repeated token on top."""
    res = run_kiln("generate", "--checkpoint", str(ckpt), "--prompt", "the the the", flag, "1e-300",
                   "--max-new-tokens", "4", capture_output=True, text=True)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    if flag == "--temperature":
        greedy = run_kiln("generate", "--checkpoint", str(ckpt), "--prompt", "the the the", "--temperature", "0",
                          "--max-new-tokens", "4", capture_output=True, text=True)
        assert res.stdout == greedy.stdout


def test_chat_says_a_pretrained_model_has_not_seen_the_template_and_refuses_a_message_past_the_context(ckpt):
    """A pretrained checkpoint under kiln's template continued text with no word of why. A message longer than
    the context was cut from the left, [INST] and the system message with it: it is now refused, the chat goes
    on."""
    res = run_kiln("chat", "--checkpoint", str(ckpt), "--max-new-tokens", "8", "--temperature", "0",
                   input="word " * 300 + "\nhello\n", capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    err = " ".join(res.stderr.split())
    assert "note: this checkpoint was not post-trained (kiln sft)" in err
    assert "(note: that message is " in err and "does not fit the model's 128-token context: send a shorter one" in err
    assert "truncated" not in err and res.stdout.strip() and res.stdout.count("\n") == 1  # "hello" answered


def test_an_empty_checkpoint_path_is_said_as_empty(capsys):
    """--checkpoint '' was read as the current folder: ".: no complete checkpoint found"."""
    assert main(["generate", "--checkpoint", "", "--prompt", "x"]) == 2
    assert capsys.readouterr().err.strip() == ("kiln: error: the checkpoint path is empty; pass a checkpoint folder "
                                               "or a run folder")


def test_chat_refuses_a_system_message_it_has_no_template_for(ckpt, capsys):
    """--raw continues the text as typed: a --system beside it was dropped without a word."""
    assert main(["chat", "--checkpoint", str(ckpt), "--raw", "--system", "Be brief."]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines() == [
        "kiln: error: --system needs the chat template, which --raw turns off; leave out one of them (with --raw, "
        "begin your text with what the system message would say)"], err[-2000:]


@pytest.mark.parametrize("flag, value, message", [
    ("--max-new-tokens", "0", "expected an integer >= 1, got 0"),  # 0 and -1 were the default reply length
    ("--max-new-tokens", "-1", "expected an integer >= 1, got -1"),
    ("--top-k", "-1", "expected an integer >= 0, got -1"),
    ("--seed", str(10**20), f"expected an integer >= 0 below 2**63, got {10**20}"),
])
def test_chat_refuses_an_integer_out_of_range_as_generate_does(ckpt, flag, value, message, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse's exit, as `kiln chat` gives it
        main(["chat", "--checkpoint", str(ckpt), flag, value])
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and out == "", err[-2000:]
    assert err.strip().splitlines()[-1] == f"kiln chat: error: argument {flag}: {message}"


def test_chat_refuses_a_reply_length_past_the_context_and_says_so_in_its_help(ckpt):
    """As generate: max_new_tokens >= model.max_seq_len leaves no room for a prompt; --help says what happens."""
    res = run_kiln("chat", "--checkpoint", str(ckpt), "--max-new-tokens", "500", input="",
                   capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"kiln: error: --max-new-tokens 500 leaves no room for a prompt within model.max_seq_len (128) of {ckpt}; "
        "ask for fewer (e.g. 64)"], res.stderr[-2000:]
    helptext = " ".join(run_kiln("chat", "--help", capture_output=True, text=True).stdout.split())
    assert ("tokens per reply, at least 1 (default: min(256, half the model's context)); a value that leaves no room "
            "for a prompt within the context (>= model.max_seq_len) is refused") in helptext


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["chat", "generate"])
def test_a_missing_gpu_names_the_flag_the_user_typed(ckpt, command, capsys):
    """`--device cuda` without a GPU: chat said `run.device=cuda`, a key the user never typed; both commands now
    name --device, before the checkpoint loads."""
    extra = ["--prompt", "hi"] if command == "generate" else []
    assert main([command, "--checkpoint", str(ckpt), "--device", "cuda", *extra]) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == ["kiln: error: --device cuda: no CUDA device is visible; use --device auto or cpu"]


def test_generate_says_when_it_writes_past_the_length_the_run_trained_on(ckpt):
    """A run trained on 64-token rows with model.max_seq_len 128 (as `tiny`: 256 of 1024) generated past 64 tokens
    without a word; export said it, generate now does too, and only when the text goes past."""
    def note(n):
        res = run_kiln("generate", "--checkpoint", str(ckpt), "--prompt", "hi", "--max-new-tokens", str(n),
                       "--temperature", "0", capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
        return "note: this run trained on 64-token sequences; text past 64 tokens is at positions it never saw" \
            in res.stderr

    assert note(100) and not note(10)
