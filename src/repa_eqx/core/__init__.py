"""What every room shares: the error base class, the cache folder, atomic files, pytrees as
flat {path: array} dicts, batched host loops, progress bars and the XLA GPU flags
(`xla_flags`). Imports nothing else of repa_eqx."""

from .errors import ConfigError as ConfigError
from .errors import RepaError as RepaError
