"""What every room shares: the error base class, the cache folder, atomic files, pytrees as
flat {path: array} dicts, batched host loops and progress bars. Imports nothing else of
repa_eqx."""

from .errors import ConfigError as ConfigError
from .errors import RepaError as RepaError
