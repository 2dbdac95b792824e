"""Optimizers (AdamW, Adafactor with bf16 stochastic rounding, Muon, 8-bit AdamW) and LR schedules."""

from kiln.optim.adafactor import Adafactor
from kiln.optim.builder import build_optimizer, muon_param_groups, param_dtype, param_groups
from kiln.optim.muon import Muon, newton_schulz
from kiln.optim.rounding import stochastic_round_
from kiln.optim.schedules import describe_schedule, infinite_phases, length_free_steps, lr_factor, scaled_lr

__all__ = ["Adafactor", "Muon", "build_optimizer", "describe_schedule", "infinite_phases", "length_free_steps", "lr_factor",
           "muon_param_groups", "newton_schulz", "param_dtype", "param_groups", "scaled_lr", "stochastic_round_"]
