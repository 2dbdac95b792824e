"""Downstream evaluators: record layouts, log-likelihood scoring against hand-computed values, GSM8K
answer extraction, and the lm-eval-harness path on an exported model (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kiln.eval.tasks import (
    GenItem,
    MCItem,
    continuation_tokens,
    gen_item,
    loglikelihoods,
    mc_item,
    plain_prompt,
    score_gsm8k,
    score_mc,
)


class Chars:
    """Characters as ids (ord), EOS 0; every character is one token."""

    eos_id, vocab_size = 0, 128

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


class Bigram(nn.Module):
    """logits[t] = W[token t]: p(next | prev) is a row of W, so log-likelihoods are closed-form."""

    def __init__(self, pairs: dict[tuple[str, str], float], vocab: int = 128) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.zeros(vocab, vocab))
        with torch.no_grad():
            for (a, b), logit in pairs.items():
                self.W[ord(a), ord(b)] = logit

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.W[tokens]  # (B, T, V)


# With a logit of log(V) on one successor and 0 elsewhere, that successor has p = V / (2V - 1)... use V = 128:
# p(favoured) = 128 / (128 + 127) and p(other) = 1 / 255; a row without favourites is uniform, p = 1 / 128.
FAV, OTHER, UNIFORM = 128 / 255, 1 / 255, 1 / 128
MODEL = Bigram({(" ", "a"): math.log(128), ("a", "b"): math.log(128)})


def test_loglikelihood_is_the_closed_form():
    tok = Chars()
    reqs = [continuation_tokens(tok, "x", " ab"), continuation_tokens(tok, "x", " c"),
            continuation_tokens(tok, "x ", "ab"), continuation_tokens(tok, "", "ab")]
    assert reqs[2] == reqs[0] == ([ord("x")], [ord(" "), ord("a"), ord("b")])  # the trailing space moves
    assert reqs[3] == ([0], [ord("a"), ord("b")])  # an empty context starts from EOS
    got = loglikelihoods(MODEL, reqs, max_len=64, batch_size=3)
    want = [math.log(UNIFORM) + 2 * math.log(FAV), math.log(UNIFORM) + math.log(OTHER),
            math.log(UNIFORM) + 2 * math.log(FAV), math.log(UNIFORM) + math.log(FAV)]
    for (ll, _), w in zip(got, want):
        assert ll == pytest.approx(w, rel=1e-6)
    assert [g for _, g in got] == [False, False, False, False]  # uniform first steps: argmax is id 0
    # a context longer than max_len is cut from the left; the continuation is scored the same
    long = loglikelihoods(MODEL, [([ord("z")] * 100 + [ord("x")], reqs[0][1])], max_len=8)[0][0]
    assert long == pytest.approx(want[0], rel=1e-6)


def test_accuracy_and_length_normalised_accuracy_by_hand():
    tok = Chars()
    items = [
        MCItem("x", [" ab", " c"], 0),  # U F F vs U O: " ab" wins both ways (right)
        MCItem("x", [" a", " ccccccc"], 1),  # U F vs U O U^6: " a" wins both ways (wrong)
        MCItem("x", [" c", " ab"], 0),  # U O vs U F F: " ab" wins both ways (wrong)
        MCItem("x", [" a", " ab"], 1),  # sum: " a" (wrong); per character: " ab" (right)
    ]
    res = score_mc(MODEL, tok, items, max_len=64)
    lu, lf, lo = math.log(UNIFORM), math.log(FAV), math.log(OTHER)
    assert res["loglikelihoods"][1] == pytest.approx([lu + lf, 7 * lu + lo], rel=1e-6)
    assert res["loglikelihoods"][3] == pytest.approx([lu + lf, lu + 2 * lf], rel=1e-6)
    assert lu + lf > lu + 2 * lf and (lu + lf) / 2 < (lu + 2 * lf) / 3  # acc and acc_norm disagree on item 3
    assert res["accuracy"] == pytest.approx(1 / 4) and res["acc_norm"] == pytest.approx(2 / 4)
    assert res["n"] == 4


def test_record_layouts():
    """The prompts of lm-eval's hellaswag (utils.process_docs), arc_easy and mmlu_<subject> configs."""
    # HellaSwag: ctx_a + " " + ctx_b.capitalize() (Rowan/hellaswag's "ctx" keeps ctx_b lower-case)
    rec = {"ctx_a": "A man is sitting. He [title] waves", "ctx_b": "then he", "activity_label": "Waving",
           "ctx": "A man is sitting. He [title] waves then he", "label": "1", "endings": ["runs.", "smiles  widely."]}
    hs = mc_item(rec, where="h")
    assert hs == MCItem("Waving: A man is sitting. He. waves Then he", ["runs.", "smiles widely."], 1, " ")
    assert hs.continuations() == [" runs.", " smiles widely."]
    only_ctx = mc_item({"ctx": "He waves", "activity_label": "Waving", "label": 0, "endings": ["a", "b"]}, where="h")
    assert only_ctx.context == "Waving: He waves"
    arc = mc_item({"question": "Which is red?", "choices": {"text": ["sky", "apple"], "label": ["1", "2"]},
                   "answerKey": "2"}, where="a")
    assert arc == MCItem("Question: Which is red?\nAnswer:", ["sky", "apple"], 1, " ")
    mmlu = mc_item({"question": "2+2? ", "choices": ["3", "4", "5"], "answer": 1, "subject": "high_school_math"},
                   where="m")
    assert mmlu == MCItem("The following are multiple choice questions (with answers) about high school math.\n\n"
                          "2+2?\nA. 3\nB. 4\nC. 5\nAnswer:", ["A", "B", "C"], 1, " ")
    assert mc_item({"question": "2+2?", "choices": ["3", "4"], "answer": 1}, where="m").context == \
        "2+2?\nA. 3\nB. 4\nAnswer:"  # no subject: no description line
    assert mc_item({"question": "2+2?", "choices": ["3", "4"], "answer": "B"}, where="m").answer == 1
    gen = mc_item({"context": "The sky is", "choices": [" blue", " green"], "answer": " blue"}, where="g")
    assert gen == MCItem("The sky is", [" blue", " green"], 0)
    from kiln.errors import DataError

    with pytest.raises(DataError, match="r:3: answer index 7 is outside"):
        mc_item({"context": "c", "choices": ["a", "b"], "answer": 7}, where="r:3")
    with pytest.raises(DataError, match="choices"):
        mc_item({"context": "c"}, where="r")
    # no answer: the layout's own key named (it was "answer None is not a choice index, letter or choice text")
    for rec, key in [({"ctx": "a", "endings": ["b", "c"]}, "label"),
                     ({"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}}, "answerKey"),
                     ({"question": "q", "choices": ["a", "b"]}, "answer")]:
        with pytest.raises(DataError, match=rf"^f:1: no '{key}' field \(the right answer"):
            mc_item(rec, where="f:1")


def test_acc_norm_divides_by_the_choice_without_its_delimiter():
    """lm-eval's acc_norm: log-likelihood of delimiter + choice over len(choice), the delimiter not counted."""
    tok = Chars()
    # " a" scores U F and " aab" U F O F: by sum " a" wins; per character of the choice (1 vs 3) "aab"
    # wins, per character of delimiter + choice (2 vs 4) " a" would
    item = MCItem("x", ["a", "aab"], 1, " ")
    res = score_mc(MODEL, tok, [item], max_len=64)
    lu, lf, lo = math.log(UNIFORM), math.log(FAV), math.log(OTHER)
    a, aab = lu + lf, lu + 2 * lf + lo
    assert res["loglikelihoods"][0] == pytest.approx([a, aab], rel=1e-6)
    assert a / 1 < aab / 3 and a / 2 > aab / 4  # the two divisions disagree
    assert res["accuracy"] == 0.0 and res["acc_norm"] == 1.0


def test_trailing_whitespace_of_any_kind_moves_into_the_continuation():
    """lm-eval's _encode_pair: context.rstrip() (newlines and tabs too, not only spaces)."""
    tok = Chars()
    assert continuation_tokens(tok, "Answer:\n", "A") == ([ord(c) for c in "Answer:"], [ord("\n"), ord("A")])
    assert continuation_tokens(tok, "x \t", "b") == ([ord("x")], [ord(" "), ord("\t"), ord("b")])


def test_gsm8k_scoring_by_hand():
    items = [GenItem("q", "3 + 2 = 5\n#### 5"), GenItem("q", "#### 1,200"), GenItem("q", "#### 7"),
             GenItem("q", "#### -2")]
    completions = ["3 + 2 = 5\n#### 5", "It is 1200 dollars.", "#### 8 then 7", "x = -2.0"]
    res = score_gsm8k(items, completions)
    # strict '#### N': only the first; last number: items 0, 1, 2 (7 is last), 3
    assert res == {"task": "gsm8k", "n": 4, "exact_match": 0.25, "accuracy": 1.0}
    assert plain_prompt(GenItem("Q2?", ""), [GenItem("Q1?", "A1 #### 1")]) == \
        "Question: Q1?\nAnswer: A1 #### 1\n\nQuestion: Q2?\nAnswer:"
    assert gen_item({"question": "a", "answer": 3}, where="w") == GenItem("a", "3")


def _lm_eval_tasks(tmp_path, n: int = 32) -> dict[str, tuple[list[dict], str]]:
    """Local tasks of four layouts as lm-eval task YAMLs: {task: (records, yaml)}. HellaSwag, ARC and MMLU
    use lm-eval's own prompts (its hellaswag utils.py, copied) and the default target delimiter " "."""
    import shutil

    import lm_eval

    g = torch.Generator().manual_seed(0)
    words = ["yes", "no", "good", "bad", "hello", "world", "digit", "plus", "it is", "say  it", "x", "a b",
             "good world it is"]  # lengths 1 to 16, so acc_norm often differs from acc

    def pick(k: int = 4) -> list[str]:
        return [words[j] for j in torch.randperm(len(words), generator=g)[:k].tolist()]

    generic = [{"context": f"What is {i % 7}?", "choices": [" " + w for w in pick()], "answer": i % 4}
               for i in range(n)]
    hellaswag = [{"activity_label": ["Baking", "Running [title]"][i % 2], "ctx_a": f"A man says {pick(1)[0]}.",
                  "ctx_b": ["then he", "", "the [step] dog"][i % 3], "endings": [e + "." for e in pick()],
                  "label": str(i % 4)} for i in range(n)]
    arc = [{"question": f"Which is {pick(1)[0]}?", "choices": {"text": pick(), "label": list("ABCD")},
            "answerKey": "ABCD"[i % 4]} for i in range(n)]
    mmlu = [{"question": f" What is {i} plus {i % 3}? ", "choices": pick(), "answer": i % 4,
             "subject": "high_school_math"} for i in range(n)]
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n" \
           "output_type: multiple_choice\n"
    metrics = "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    yamls = {
        "kiln_generic": "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
                        "target_delimiter: ''\n",
        "kiln_hellaswag": "process_docs: !function utils.process_docs\ndoc_to_text: '{{query}}'\n"
                          "doc_to_target: '{{label}}'\ndoc_to_choice: 'choices'\n",
        "kiln_arc": 'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
                    "doc_to_target: '{{choices.label.index(answerKey)}}'\ndoc_to_choice: '{{choices.text}}'\n",
        "kiln_mmlu": 'description: "The following are multiple choice questions (with answers) about high school '
                     'math.\\n\\n"\n'
                     'doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. '
                     '{{choices[2]}}\\nD. {{choices[3]}}\\nAnswer:"\n'
                     "doc_to_choice: ['A', 'B', 'C', 'D']\ndoc_to_target: answer\n",
    }
    folder = tmp_path / "tasks"
    folder.mkdir()
    shutil.copy(Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "utils.py", folder / "utils.py")
    out = {}
    for (name, body), rows in zip(yamls.items(), [generic, hellaswag, arc, mmlu]):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{name}.yaml").write_text(f"task: {name}\n" + head.format(data=data) + body + metrics)
        out[name] = rows
    return out


@pytest.mark.slow
def test_lm_eval_harness_on_the_exported_model_agrees_with_kiln(tmp_path):
    """The documented path: kiln export, then lm-eval's `hf` model on local multiple-choice tasks in the
    generic, HellaSwag, ARC and MMLU layouts: every choice's log-likelihood, acc and acc_norm agree."""
    pytest.importorskip("lm_eval")
    from kiln.data.tokenizer import load_tokenizer
    from kiln.export import export_checkpoint
    from kiln.train import checkpoint as ckpt_io
    from test_sft import base_checkpoint

    ckpt = base_checkpoint(tmp_path)
    with torch.no_grad():  # a model with opinions, so accuracies are not all ties
        model, cfg, _ = ckpt_io.load_for_inference(ckpt)
        for p in model.parameters():
            p.mul_(8)
        ckpt = ckpt_io.save_checkpoint(tmp_path / "sharp" / "checkpoints", 1, model=model, cfg=cfg, train_state={},
                                       meta={"tokens_seen": 0})
    hf_dir = export_checkpoint(ckpt, tmp_path / "hf")
    tasks = _lm_eval_tasks(tmp_path)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32", tasks=list(tasks),
                          task_manager=TaskManager(include_path=str(tmp_path / "tasks")), device="cpu",
                          batch_size=4, log_samples=True)
    model, cfg, _ = ckpt_io.load_for_inference(ckpt)
    tok = load_tokenizer(cfg.data.tokenizer)
    for name, rows in tasks.items():
        theirs = out["results"][name]
        items = [mc_item(r, where="t") for r in rows]
        ours = score_mc(model, tok, items, max_len=cfg.model.max_seq_len)
        print(f"{name}: lm-eval acc {theirs['acc,none']:.4f} acc_norm {theirs['acc_norm,none']:.4f}; "
              f"kiln acc {ours['accuracy']:.4f} acc_norm {ours['acc_norm']:.4f}")
        samples = sorted(out["samples"][name], key=lambda x: x["doc_id"])
        assert len(samples) == len(rows)
        for sample, item, lls in zip(samples, items, ours["loglikelihoods"]):  # the same requests and scores
            assert [tuple(a) for a in sample["arguments"]] == [(item.context, c) for c in item.continuations()]
            assert [float(r[0]) for r in sample["filtered_resps"]] == pytest.approx(lls, abs=1e-4)
        assert len({tuple(x) for x in ours["loglikelihoods"]}) > 1
        if name in ("kiln_hellaswag", "kiln_arc"):  # items where length normalisation changes the answer
            assert any(x["acc"] != x["acc_norm"] for x in samples)
        assert theirs["acc,none"] == pytest.approx(ours["accuracy"])
        assert theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"])


@pytest.mark.parametrize("task", ["mc", "gsm8k"])
def test_downstream_tasks_run_under_the_checkpoints_autocast(tmp_path, monkeypatch, task):
    """`kiln eval --task mc|gsm8k` uses train.dtype's autocast like `--task loss` (bf16 here, as on CUDA)."""
    import kiln.eval.run as run
    from kiln.model import build_model
    from test_sft import tiny_config

    cfg = tiny_config(tmp_path, **{"train.dtype": "bf16"})
    model = build_model(cfg.model, seed=0).eval()
    seen = []
    model.norm.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    monkeypatch.setattr(run, "load_for_inference", lambda checkpoint, device: (model, cfg, tmp_path / "ckpt"))
    data = tmp_path / "data.jsonl"
    rec = {"context": "What is 1?", "choices": [" yes", " no"], "answer": 0} if task == "mc" else \
        {"question": "What is 1+1?", "answer": "#### 2"}
    data.write_text(json.dumps(rec) + "\n")
    res = run.evaluate_task("ckpt", str(data), task=task, max_new_tokens=2)
    assert res["n"] == 1 and seen and all(seen)


def test_gsm8k_refuses_max_new_tokens_that_leave_no_room_for_the_prompt(tmp_path, monkeypatch):
    """A prompt cut to its last `room` tokens: room 0 used to keep the whole prompt (p[-0:]), negative room
    its head; now one line names the flag."""
    import kiln.eval.run as run
    from kiln.generate import GenerationError
    from kiln.model import build_model
    from test_sft import tiny_config

    cfg = tiny_config(tmp_path)
    model = build_model(cfg.model, seed=0).eval()
    monkeypatch.setattr(run, "load_for_inference", lambda checkpoint, device: (model, cfg, tmp_path / "ckpt"))
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "What is 1+1?", "answer": "#### 2"}) + "\n")
    for n in (cfg.model.max_seq_len, cfg.model.max_seq_len + 5):
        with pytest.raises(GenerationError, match=rf"--max-new-tokens {n} leaves no room for a prompt within "
                           rf"model.max_seq_len \({cfg.model.max_seq_len}\); ask for at most {cfg.model.max_seq_len - 1}$"):
            run.evaluate_task("ckpt", str(data), task="gsm8k", max_new_tokens=n)
    assert run.evaluate_task("ckpt", str(data), task="gsm8k", max_new_tokens=2)["n"] == 1


def test_kiln_eval_on_a_file_without_the_text_column_names_the_flags(tmp_path):
    """`kiln eval --data arc.jsonl` (a benchmark file, no "text" column) as a user types it: one line that
    names the command's flags, not the config key the data layer knows (`text_column` on a source)."""

    from conftest import run_kiln
    from test_sft import base_checkpoint

    ckpt = base_checkpoint(tmp_path)
    data = tmp_path / "arc.jsonl"
    data.write_text(json.dumps({"question": "1?", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                                "answerKey": "A"}) + "\n")
    res = run_kiln("eval", "--checkpoint", str(ckpt), "--data", str(data), capture_output=True,
                   text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        f"kiln: error: {data}: no column 'text' (columns: question, choices, answerKey); pass --text-column NAME "
        "(or --task mc / gsm8k for a benchmark file)")


def test_an_arc_answer_key_that_is_no_label_names_the_labels(tmp_path):
    """ARC's answerKey names one of choices.label: a key with no such label ("C" of A, B) is reported as
    such, at its file:line, not as an index (2) outside the choices that the user never wrote."""

    from conftest import run_kiln
    from test_sft import base_checkpoint

    ckpt = base_checkpoint(tmp_path)
    data = tmp_path / "arc.jsonl"
    rows = [{"question": "1?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": key}
            for key in ("A", "C")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run_kiln("eval", "--checkpoint", str(ckpt), "--data", str(data), "--task", "mc",
                   capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"kiln: error: {data}:2: answerKey 'C' is not one of the labels A, B"], res.stderr[-2000:]


def test_kiln_eval_mc_prints_acc_as_lm_eval_and_the_training_logs_name_it(tmp_path):
    """Training logs eval/<task>/acc and acc_norm (kiln.eval.suite), lm-eval prints acc and acc_norm: the
    command's JSON has the same names; "accuracy", its older name, stays for scripts that read it."""

    from conftest import run_kiln
    from test_sft import base_checkpoint

    ckpt = base_checkpoint(tmp_path)
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"context": f"{i} is", "choices": [" yes", " no"], "answer": i % 2}) + "\n"
                            for i in range(4)))
    res = run_kiln("eval", "--checkpoint", str(ckpt), "--data", str(data), "--task", "mc",
                   capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["n"] == 4 and out["acc"] == out["accuracy"] and 0 <= out["acc_norm"] <= 1
