"""Where otclip keeps what it can recompute (class-prompt embeddings, frozen-tower features)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$OTCLIP_CACHE_DIR, else ~/.cache/otclip."""
    root = os.environ.get("OTCLIP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "otclip")
    return Path(root)
