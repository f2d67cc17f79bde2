"""Atomic file writes: temporary file in the same directory, fsync, rename.

A reader (or a process killed at any instant) sees either the old file or the new one,
never a torn write. Every file gptkit writes for a user goes through here, and so does
every output directory: a location that cannot be written (a path below a regular file,
a read-only file system, a full disk) is a one-line GptkitError, not a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from gptkit.errors import GptkitError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _file_mode() -> int:
    return 0o666 & ~_umask()


def cannot_write(path: str | os.PathLike, e: OSError) -> GptkitError:
    """The one-line error for an output location the OS refused."""
    return GptkitError(f"cannot write {path}: {e.strerror or e}")


def make_dir(path: str | os.PathLike) -> Path:
    """`mkdir -p path`; a GptkitError when it cannot be (or is not) a directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():  # mkdir's "File exists" would not say why
        raise GptkitError(f"cannot write {path}: it exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # below a regular file, read-only, permission denied
        raise cannot_write(path, e) from None
    return path


def temp_file(path: Path) -> tuple[int, str]:
    """A temporary file beside `path`, with the permissions a plain open() would give."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise cannot_write(path, e) from None
    os.fchmod(fd, _file_mode())  # mkstemp makes 0600; users expect their umask
    return fd, tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary file name; when the block succeeds, that file (fsynced) replaces `path`.

    For writers that insist on a file name (safetensors, torch.save, savefig). An OSError
    in the block (a full disk) becomes the one-line GptkitError of an unwritable `path`.
    """
    path = Path(path)
    make_dir(path.parent)
    fd, tmp = temp_file(path)
    os.close(fd)
    try:
        yield tmp
        # Writers that recreate the file (safetensors' save_file) leave it 0600.
        os.chmod(tmp, _file_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise cannot_write(path, e) from None
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary binary file that replaces `path` only if the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_write_with(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(temporary_name)`, then move the result over `path` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories can't be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
