"""Closed choices of the config that other layers take as arguments, each named once. kiln.config imports them
(the rest of its aliases are defined there; this module keeps config.py within its size), so
`from kiln.config import X` works for every alias."""

from __future__ import annotations

from typing import Literal

Remainder = Literal["carry", "drop"]  # a document overflowing a row: continue it in the next, or drop the rest
OnExhausted = Literal["cycle", "drop", "stop"]  # a source runs dry: next epoch / leave the mix / stop
CompileMode = Literal["block", "model"]  # torch.compile each Block, or the whole trunk
ACMode = Literal["none", "full", "selective"]  # activation checkpointing
LossImpl = Literal["auto", "chunked", "liger", "plain"]  # the fused head + cross-entropy (kiln.model.loss)
# the names of kiln.parallel.pipeline.SCHEDULES (asserted there), whose table says what each one runs
PipelineSchedule = Literal["GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble",
                           "ZBVZeroBubble", "DualPipeV"]
