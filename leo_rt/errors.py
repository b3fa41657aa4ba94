"""The errors leo_rt raises for things a user can fix, and the one map from an error to a CLI exit code.

Every error here says what was wrong (with the offending value) and what to do instead. The CLI prints such an
error on one line and exits 2; anything else that escapes the library is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno


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
    """The CLI exit code for an exception, or None when it is a bug (the traceback is kept). Errors of the
    operating system (a missing or unwritable path, a full disk) are the user's to fix, like leo_rt's own."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, (LeoError, OSError)):
        return EXIT_USAGE
    return None


_OS_FIXES = {
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "the file system is read-only; choose another path",
    errno.ENOSPC: "the disk is full; free some space or choose another folder",
    errno.EDQUOT: "the disk quota is exceeded; free some space or choose another folder",
    errno.EISDIR: "it is a folder; give a file path",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.ENOENT: "check the path",
}


def describe(exc: BaseException) -> str:
    """The one-line CLI message for an error that exit_code maps (interrupts included)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (nothing half-written was left behind)"
    if isinstance(exc, OSError) and not isinstance(exc, LeoError) and exc.strerror:
        where = f" {exc.filename}" if exc.filename else ""
        fix = _OS_FIXES.get(exc.errno or 0)
        return f"error: cannot use{where}: {exc.strerror}" + (f"; {fix}" if fix else "")
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"error: {text}"
