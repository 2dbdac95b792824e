"""Optimizers and schedules."""

from kiln.optim.builder import build_optimizer, param_groups
from kiln.optim.schedules import lr_factor

__all__ = ["build_optimizer", "lr_factor", "param_groups"]
