"""Where kiln keeps its caches (converted tokenizers, datasets' Arrow files, the job registry)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Root of kiln's caches: `$KILN_CACHE`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`."""
    if os.environ.get("KILN_CACHE"):
        return Path(os.environ["KILN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kiln"
