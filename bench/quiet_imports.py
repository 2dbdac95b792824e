"""Imported by quality_hf.py before transformers (so by every benchmark that scores through it):
transformers imports torchao when it is installed (kiln's dev extra), and torchao logs that its GPU-only
kernels cannot load on CPU and that it registers enums torch now handles itself. Neither concerns a
benchmark's output."""

import logging

for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
