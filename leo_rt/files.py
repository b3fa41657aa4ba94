"""Writing files so that a failure never leaves a half-written one behind, and every write failure is one clear
:class:`~leo_rt.errors.OutputError`.

What every writer of leo_rt guarantees (``atomic_path`` below):

- The data goes to a temporary file beside the target and is renamed onto it only when the whole write succeeded;
  a failure (an error, a full disk, Ctrl-C) deletes the temporary file and leaves the old target as it was.
- After the rename, the file in place is checked to be the one written (same inode and size), and a writer that
  wrote somewhere else (a library that appends a suffix to the name it is given, as ``np.savez`` does) is caught
  instead of renaming an empty file into place.
- New files get the permissions the umask allows (0644 under the usual 022), not 0600; a replaced file keeps its
  permission bits.
- A symlink is written through (its target is replaced, the link stays). A folder, a device, a FIFO or a socket
  in the way is refused, except by the writers that can stream (``write_text`` / ``write_bytes``: JSON to
  ``/dev/stdout`` or a pipe). An existing read-only file is refused, never replaced.
- Permission errors, a folder in the way, a read-only file system and a full disk are turned into an
  ``OutputError`` with the reason and the fix.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError, OutputError

# symlinks into these are "magic" (/dev/stdout → /proc/self/fd/1): they name an open file, which is streamed to
_MAGIC_PREFIXES = ("/proc/", "/dev/fd/")
_MAX_SYMLINKS = 40
_LOW_SPACE = 1 << 20  # a write that failed with less free space than this is reported as a full disk


@dataclass(frozen=True)
class OutputTarget:
    """Where an output ends up: `path` with symlinks followed; `stream` when it is not a regular file (a FIFO, a
    character device, an open file named through /dev/stdout) and is written directly, without a rename;
    `mode` the permission bits of the file being replaced (None for a new file: the umask decides)."""

    path: Path
    stream: bool = False
    mode: int | None = None


def _kind(st: os.stat_result) -> str:
    m = st.st_mode
    for test, name in (
        (stat.S_ISDIR, "folder"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(m):
            return name
    return "regular file" if stat.S_ISREG(m) else "special file"


def _follow(path: Path) -> tuple[Path, bool]:
    """Follow `path` through symlinks one link at a time: (final path, True if a link led into /proc or /dev/fd).
    A dangling link yields the path it points to (the file is created there)."""
    cur = Path(os.path.abspath(path))
    for _ in range(_MAX_SYMLINKS):
        if not cur.is_symlink():
            parent = Path(os.path.realpath(cur.parent)) if cur.parent.exists() else cur.parent
            return parent / cur.name, False
        link = os.readlink(cur)
        # relative to the link's real folder (a lexical "a/../b" would be wrong across a symlinked folder)
        nxt = Path(os.path.join(os.path.realpath(cur.parent), link))
        if str(nxt).startswith(_MAGIC_PREFIXES) or str(cur).startswith(_MAGIC_PREFIXES):
            return nxt, True
        cur = nxt
    raise OutputError(f"{path} is a symlink loop (more than {_MAX_SYMLINKS} links); point it at a file")


def _read_only(st: os.stat_result, path: Path) -> bool:
    # root passes os.access whatever the mode, so the mode bits decide too: a file nobody may write is read-only
    return not os.access(path, os.W_OK) or not st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


def resolve_output(
    path: str | os.PathLike, *, stream_ok: bool = False, what: str = "output", create_dirs: bool = True
) -> OutputTarget:
    """Check an output path and say where the data will go, creating missing parent folders (`create_dirs`).
    Raises OutputError for a folder in the way, a read-only file, a device or FIFO (unless `stream_ok`), a parent
    that is not a folder or cannot be created. Cheap: call it before any work whose result would be lost."""
    path = Path(path)
    target, magic = _follow(path)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise OutputError(f"cannot write {path}: a part of {target.parent} is a file, not a folder") from None
    except PermissionError:
        raise OutputError(
            f"cannot write {path}: permission denied on {target.parent}; choose a folder you can write to"
        ) from None
    if magic or (st is not None and not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode)):
        kind = "an open file (through /proc or /dev/fd)" if st is None or magic else f"a {_kind(st)}"
        if stream_ok and (st is None or not stat.S_ISDIR(st.st_mode)):
            return OutputTarget(target, stream=True)
        raise OutputError(
            f"{path} is {kind}, not a regular file; the {what} is written to a temporary file and renamed into "
            "place, which needs a regular file path: give a file name"
        )
    if st is not None and stat.S_ISDIR(st.st_mode):
        hint = f" (e.g. {path / ('out' + _suffix_hint(what))})"
        raise OutputError(f"{path} is a folder; the {what} needs a file name{hint}")
    mode = None
    if st is not None:
        if _read_only(st, target):
            raise OutputError(
                f"{path} exists and is read-only, so it is left as it is; make it writable (chmod u+w {path}) "
                "or choose another name"
            )
        mode = stat.S_IMODE(st.st_mode)
    if create_dirs:
        make_dirs(target.parent, what=what)
    return OutputTarget(target, stream=False, mode=mode)


def _suffix_hint(what: str) -> str:
    return {"video": ".mp4", "image": ".png", "codes file": ".npz", "JSON": ".json"}.get(what, "")


def make_dirs(folder: str | os.PathLike, *, what: str = "output", hint: str | None = None) -> Path:
    """mkdir -p, with the failures an OutputError."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(f"cannot create the folder {folder} for the {what}: a file is in the way") from None
    except OSError as e:
        raise output_error(e, folder, hint=hint) from None
    return folder


def check_output(path: str | os.PathLike, *, stream_ok: bool = False, what: str = "output") -> OutputTarget:
    """resolve_output, then prove the folder takes a new file (creates and deletes an empty temporary one; this
    works as root too, where permission bits alone say nothing). Call it before long work."""
    target = resolve_output(path, stream_ok=stream_ok, what=what)
    if not target.stream:
        tmp = _create_temp(target.path, what)
        Path(tmp).unlink(missing_ok=True)
    return target


def output_error(exc: BaseException, path: str | os.PathLike, *, hint: str | None = None) -> OutputError | None:
    """The OutputError for a failed write of `path`, or None when `exc` is not a file-system failure."""
    if isinstance(exc, OutputError):
        return exc
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    text = str(exc)
    fix = f"; {hint}" if hint else ""
    if code is None and re.search(r"No space left|os error 28|ENOSPC", text):
        code = errno.ENOSPC
    if code is None and not isinstance(exc, (OSError, RuntimeError)):
        return None
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and _free_bytes(folder) < _LOW_SPACE):
        free = _free_bytes(folder)
        where = f"{_fmt_bytes(free)} free" if free >= 0 else "no space left"
        return OutputError(
            f"no space left to write {path} (the disk holding {folder} is full: {where}); nothing was replaced. "
            f"Free some space or write elsewhere{fix}"
        )
    if code in (errno.EACCES, errno.EPERM):
        return OutputError(
            f"cannot write {path}: permission denied in {folder}; choose a folder you can write to or fix its "
            f"permissions{fix}"
        )
    if code == errno.EROFS:
        return OutputError(f"cannot write {path}: {folder} is on a read-only file system; write elsewhere{fix}")
    if code == errno.EISDIR:
        return OutputError(f"{path} is a folder; give a file name inside it{fix}")
    if code in (errno.ENOTDIR, errno.EEXIST):
        return OutputError(f"cannot write {path}: a file is in the way of the folder {folder}{fix}")
    if code == errno.ENAMETOOLONG:
        return OutputError(f"cannot write {path}: the name is too long; choose a shorter one")
    if code is not None:
        return OutputError(f"cannot write {path} ({os.strerror(code)}); check the disk and the path{fix}")
    return None


def _free_bytes(folder: Path) -> int:
    try:
        s = os.statvfs(folder)
    except OSError:
        return -1
    return s.f_bavail * s.f_frsize


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _create_temp(target: Path, what: str = "output") -> str:
    """An empty temporary file beside `target`, ending in the target's suffix (writers that look at it pick the
    format), created with mode 0666 minus the umask."""
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.partial{target.suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        except OSError as e:
            raise output_error(e, target) or e from None
        os.close(fd)
        return str(tmp)
    raise OutputError(f"could not create a temporary file beside {target}")


def _strays(tmp: str) -> list[Path]:
    """Files named like the temporary file plus more (what a library that appends a suffix writes)."""
    p = Path(tmp)
    return sorted(q for q in p.parent.glob(f"{_glob_escape(p.name)}?*") if q != p)


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


@contextmanager
def atomic_path(
    path: str | os.PathLike,
    *,
    stream_ok: bool = False,
    verify: Callable[[str], None] | None = None,
    what: str = "output",
    hint: str | None = None,
) -> Iterator[str]:
    """Yield a temporary path beside `path` for the caller to write; when the block succeeds, check it (exists,
    nothing written under another name, `verify(tmp)` if given) and rename it onto `path` (symlinks followed);
    when the block raises, delete it. File-system failures become OutputError (`hint` is added to the fix).

    With `stream_ok`, a FIFO, device or /dev/stdout target is yielded itself (no temporary file, no rename): the
    caller must then open it for appending ("ab"), never truncating. Callers that pass the path to a library
    should prefer handing it an open file object, so that no suffix can be added."""
    target = resolve_output(path, stream_ok=stream_ok, what=what)
    if target.stream:
        try:
            yield str(target.path)
        except BaseException as e:
            mapped = output_error(e, target.path, hint=hint) if isinstance(e, Exception) else None
            if mapped is not None and mapped is not e:
                raise mapped from e
            raise
        return
    tmp = _create_temp(target.path, what)
    try:
        yield tmp
        strays = _strays(tmp)
        if strays:
            raise RuntimeError(
                f"leo_rt bug: the writer of {path} wrote {strays[0].name} instead of the temporary file it was given "
                "(a library appended a suffix); nothing was replaced"
            )
        if not Path(tmp).is_file():
            raise RuntimeError(f"leo_rt bug: the writer of {path} removed its temporary file; nothing was replaced")
        if verify is not None:
            verify(tmp)
        if target.mode is not None:
            os.chmod(tmp, target.mode)
        before = os.stat(tmp)
        os.replace(tmp, target.path)
        after = os.stat(target.path)
        if (after.st_dev, after.st_ino, after.st_size) != (before.st_dev, before.st_ino, before.st_size):
            raise OutputError(f"{path} changed while it was being put in place (another writer?); write it again")
    except BaseException as e:
        mapped = output_error(e, target.path, hint=hint) if isinstance(e, Exception) else None
        for stray in [Path(tmp), *_strays(tmp)]:
            stray.unlink(missing_ok=True)
        if mapped is not None and mapped is not e:
            raise mapped from e
        raise


def write_bytes(path: str | os.PathLike, data: bytes, *, what: str = "output") -> Path:
    """Write `data` atomically; to a FIFO, a device or /dev/stdout it is streamed (appended)."""
    with atomic_path(path, stream_ok=True, what=what) as tmp:
        fd = _own_std_fd(tmp)
        if fd is not None:  # our own stdout/stderr: after what Python has buffered, at the stream's own offset
            import sys

            (sys.stdout if fd == 1 else sys.stderr).flush()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        else:
            with open(tmp, "ab") as f:
                f.write(data)
    return Path(path)


def _own_std_fd(path: str) -> int | None:
    """1 or 2 when `path` is this process's own stdout or stderr (e.g. /dev/stdout), else None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    for fd in (1, 2):
        try:
            if os.path.samestat(st, os.fstat(fd)):
                return fd
        except OSError:
            continue
    return None


def write_text(path: str | os.PathLike, text: str, *, what: str = "output") -> Path:
    """Write `text` (UTF-8) atomically; to a FIFO, a device or /dev/stdout it is streamed (`leo-rt bench --json
    /dev/stdout`)."""
    return write_bytes(path, text.encode(), what=what)


def write_json(path: str | os.PathLike, data, *, what: str = "JSON", **dumps) -> Path:
    return write_text(path, json.dumps(data, **({"indent": 2} | dumps)) + "\n", what=what)


def save_checkpoint_dir(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config: dict,
    metadata: dict[str, str],
    weights_file: str = "model.safetensors",
    config_file: str = "config.json",
) -> Path:
    """A checkpoint directory: `weights_file` (safetensors with `metadata`) and `config_file` (JSON), each
    written atomically (the weights first: a directory whose config is older than its weights is never seen)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} exists and is not a directory; leo_rt checkpoints are directories")
    make_dirs(path, what="checkpoint")
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def same_keys(tmp: str) -> None:
        from safetensors import safe_open

        with safe_open(tmp, framework="pt") as f:
            if set(f.keys()) != set(cpu):
                raise OutputError(f"{path / weights_file} did not read back as written; write it again")

    with atomic_path(path / weights_file, verify=same_keys, what="checkpoint") as tmp:
        save_file(cpu, tmp, metadata=metadata)
    with atomic_path(path / config_file, what="checkpoint") as tmp, open(tmp, "w") as f:
        f.write(json.dumps(config, indent=2) + "\n")
    return path
