"""The installed version of repa-eqx, recorded in every evaluation card and export."""

import functools
from importlib import metadata


@functools.cache
def version() -> str:
    try:
        return metadata.version("repa-eqx")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"
