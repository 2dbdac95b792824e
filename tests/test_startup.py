"""What a one-process command loads: torch's pipelining package (which loads torch._dynamo) only when a
layout uses it, so `kiln generate`, `eval` and `export` start without either (about a second on 2 cores;
`kiln train` still loads torch._dynamo with its torch.optim optimizer)."""

from __future__ import annotations

import subprocess
import sys

from kiln.parallel import pipeline, schedules


def test_a_one_process_command_does_not_load_pipelining_or_dynamo():
    code = ("import sys, torch\n"
            "from kiln.config import ModelConfig\n"
            "import kiln.train.trainer, kiln.generate, kiln.export, kiln.eval.run\n"
            "from kiln.model import build_model\n"
            "build_model(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32))\n"
            "print(sorted(m for m in ('torch.distributed.pipelining', 'torch._dynamo')"
            " if m in sys.modules))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_every_schedule_kiln_offers_has_a_torch_schedule():
    """One table names the schedules: the config's choices are its keys, each names a torch class."""
    from typing import get_args

    from torch.distributed import pipelining
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle

    from kiln.config import ParallelConfig, PipelineSchedule

    assert set(get_args(PipelineSchedule)) == set(pipeline.SCHEDULES)
    assert ParallelConfig.pp_schedule in pipeline.SCHEDULES
    for name, spec in pipeline.SCHEDULES.items():
        single = issubclass(getattr(pipelining, spec.torch_class), PipelineScheduleSingle)
        assert single == (spec.placement == "single"), name  # make_schedule hands a single-stage class one stage
        assert spec.placement in ("single", "looped", "v"), name


def test_stage_placement_follows_the_table():
    assert pipeline.stage_ids("1F1B", 4, 1) == [1]
    assert pipeline.stage_ids("Interleaved1F1B", 4, 1) == [1, 5]
    assert pipeline.stage_ids("DualPipeV", 4, 1) == [1, 6]
    assert [pipeline.stages_per_rank(s) for s in ("GPipe", "LoopedBFS", "ZBVZeroBubble")] == [1, 2, 2]
    assert callable(schedules.make_schedule)
