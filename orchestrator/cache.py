"""The user cache directory: trained built-in models, sensitivity tables."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$PRUNESEARCH_CACHE`, else `$XDG_CACHE_HOME/prunesearch`, else `~/.cache/prunesearch`."""
    root = os.environ.get("PRUNESEARCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "prunesearch"
    )
    return Path(root)
