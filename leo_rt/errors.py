"""The errors leo_rt raises for things a user can fix, and the one map from an error to a CLI exit code.

Every error here says what was wrong (with the offending value) and what to do instead. The CLI prints such an
error on one line and exits 2; anything else that escapes the library is a bug and keeps its traceback.
"""

from __future__ import annotations


class LeoError(Exception):
    """Base of every error leo_rt raises for bad input, a bad file, a missing dependency or a refused action."""


class InputError(LeoError, ValueError):
    """An argument or input value leo_rt cannot use (wrong shape, out of range, not finite, unknown name)."""


class CheckpointError(LeoError, ValueError):
    """A checkpoint that cannot be read or does not fit the model asked for."""


class MediaError(LeoError, ValueError):
    """An image or video that cannot be read or written."""


class ManifestError(LeoError, ValueError):
    """An engines folder whose manifest or artifacts do not match what is asked for."""


class BackendUnavailable(LeoError, RuntimeError):
    """A backend that cannot run here; the message names the ones that would and what to install."""


class OutputError(LeoError, OSError):
    """An output that cannot be written (permissions, a folder or device in the way, a full disk)."""


EXIT_USAGE = 2  # a user error: bad input, bad file, missing dependency
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


def exit_code(exc: BaseException) -> int | None:
    """The CLI exit code for an exception, or None when it is a bug (the traceback is kept)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, LeoError):
        return EXIT_USAGE
    return None
