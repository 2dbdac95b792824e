"""Single-device model code: no torch.distributed, no environment variables, no globals."""

from kiln.model.transformer import KVCache, Transformer, build_model, count_params

__all__ = ["KVCache", "Transformer", "build_model", "count_params"]
