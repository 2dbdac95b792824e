"""argparse types the `kiln` commands share (their own options; `--section.key` overrides go through kiln.config)."""

from __future__ import annotations

import argparse


def int_at_least(low: int):
    """An argparse `type`: an integer >= low, and below 2**63 (what torch's int64 seeds and counts hold)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value < 2**63:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}" + (" below 2**63" if value > 0 else "")
                                             + f", got {value}")
        return value
    return parse
