"""The exceptions vlaug raises for problems a user can fix.

Every message names what was found, what was expected and how to fix it. The CLI
prints the message on one line and exits with the error's ``exit_code``; any other
exception is a bug and keeps its traceback.
"""


class VlaugError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""

    exit_code = 1


class UsageError(VlaugError):
    """Bad arguments or input detected before any work was done (exit code 2)."""

    exit_code = 2


class SourceError(UsageError):
    """The image source (folder or manifest) is missing, empty or malformed."""


class EncoderError(UsageError):
    """Unknown model name, pretrained tag or checkpoint file."""


class CacheError(VlaugError):
    """A feature cache is unreadable, incomplete or inconsistent."""


class CacheMismatchError(UsageError):
    """A cache was produced with other settings than the ones asked for now."""


class EmbedFailuresError(VlaugError):
    """Some inputs could not be embedded and ``--strict`` was given (exit code 1)."""


class CheckpointError(UsageError):
    """A head checkpoint is missing, malformed or does not fit its config."""


class CacheLockedError(UsageError):
    """Another live ``vlaug embed`` process is writing the same cache."""


class IncompleteCacheError(UsageError):
    """A cache whose embed run was interrupted, used without ``--allow-incomplete``."""
