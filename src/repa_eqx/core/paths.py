import os
from pathlib import Path


def cache_dir() -> Path:
    """repa-eqx's cache: $REPA_EQX_CACHE, else $XDG_CACHE_HOME/repa_eqx, else ~/.cache/repa_eqx."""
    if os.environ.get("REPA_EQX_CACHE"):
        return Path(os.environ["REPA_EQX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "repa_eqx"
