"""The one base class of the errors a user can fix.

Every expected failure (a bad recipe key, a missing file or weight, a checkpoint that does not
fit, an argument out of range) raises a subclass of `RepaError` whose message is one readable
line naming the key, file or weight. The command line prints exactly these as one line; any
other exception is a bug and keeps its traceback. Subclasses also derive from the built-in
class they were before (mostly `ValueError`), so existing `except ValueError` code still works.
"""


class RepaError(Exception):
    """An error whose message tells the user what to fix."""


class ConfigError(RepaError, ValueError):
    """A setting or argument outside what it may be (a model size, a sampler option, ...)."""


class StorageError(RepaError, OSError):
    """A file or folder that cannot be written or read as needed (no permission, a full disk,
    a truncated file); the message names it."""
