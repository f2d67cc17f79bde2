"""Atomic writes (gptkit.fileio): a new file renamed over the old one, fsynced first."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gptkit import fileio
from gptkit.errors import GptkitError


def _write_bytes(path: Path) -> None:
    fileio.atomic_write_bytes(path, b"new \x00 bytes")


def _write_text(path: Path) -> None:
    fileio.atomic_write_text(path, "new text \u00e9")


def _write_json(path: Path) -> None:
    fileio.atomic_write_json(path, {"new": [1, 2]})


def _write_with(path: Path) -> None:
    fileio.atomic_write_with(path, lambda tmp: Path(tmp).write_bytes(b"new via a name"))


WRITERS = {
    "bytes": (_write_bytes, b"new \x00 bytes"),
    "text": (_write_text, "new text \u00e9".encode()),
    "json": (_write_json, (json.dumps({"new": [1, 2]}, indent=2) + "\n").encode()),
    "with": (_write_with, b"new via a name"),
}


def _old_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_bytes(b"old contents")
    return path


@pytest.mark.parametrize("kind", WRITERS)
def test_a_write_replaces_the_file_by_rename(tmp_path: Path, kind: str) -> None:
    """Guards writing into the existing file (truncate, then write: a reader or a crash
    in between sees a torn file): the path must name a new inode afterwards, holding
    exactly the new contents, with nothing else left in the directory."""
    write, contents = WRITERS[kind]
    path = _old_file(tmp_path)
    before = path.stat().st_ino
    with path.open("rb") as reader:  # a reader that opened the old file keeps it whole
        write(path)
        assert reader.read() == b"old contents"
    assert path.stat().st_ino != before
    assert path.read_bytes() == contents
    assert os.listdir(tmp_path) == ["config.json"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
@pytest.mark.parametrize("kind", WRITERS)
def test_the_new_file_is_fsynced_before_the_rename(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards a rename of unsynced data (after a power loss the new name can point at an
    empty or partial file): the file renamed over the target, a temporary one in the
    same directory (a rename is atomic only within one file system), was fsynced before
    the rename, and the directory after it (the rename itself made durable)."""
    write, _ = WRITERS[kind]
    path = _old_file(tmp_path)
    events: list[tuple[str, str]] = []

    def syncing(real):
        def sync(fd: int) -> None:
            events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real(fd)

        return sync

    def renaming(real):
        def rename(src, dst, *args, **kwargs) -> None:
            events.append(("rename", os.path.realpath(src)))
            assert os.path.realpath(dst) == os.path.realpath(path)
            real(src, dst, *args, **kwargs)

        return rename

    for name, wrap in [("fsync", syncing), ("fdatasync", syncing)]:
        monkeypatch.setattr(os, name, wrap(getattr(os, name)))
    for name in ("replace", "rename"):
        monkeypatch.setattr(os, name, renaming(getattr(os, name)))
    write(path)
    monkeypatch.undo()
    renames = [i for i, (what, _) in enumerate(events) if what == "rename"]
    assert len(renames) == 1, events
    tmp = events[renames[0]][1]
    assert Path(tmp).parent == Path(os.path.realpath(tmp_path)) and tmp != os.path.realpath(path)
    assert ("fsync", tmp) in events[: renames[0]], events
    assert ("fsync", os.path.realpath(tmp_path)) in events[renames[0] :], events


class Boom(Exception):
    """A writer's own failure (not an OSError, which fileio may turn into GptkitError)."""


def test_a_failing_writer_leaves_the_old_file_and_no_temporary_file(tmp_path: Path) -> None:
    """Guards a failed write destroying the old file or leaving its temporary file
    behind: the old contents (and inode) stay, the writer's error comes through, and the
    directory holds nothing else (temporary names start with a dot: listdir, not glob)."""
    path = _old_file(tmp_path)
    before = path.stat().st_ino

    def half_then_fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"half of the new")
        raise Boom

    with pytest.raises(Boom):
        fileio.atomic_write_with(path, half_then_fail)
    with pytest.raises(Boom), fileio.atomic_open(path) as f:
        f.write(b"half of the new")
        raise Boom
    assert path.read_bytes() == b"old contents" and path.stat().st_ino == before
    assert os.listdir(tmp_path) == ["config.json"]


def test_a_failed_rename_leaves_the_old_file_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards the temporary file being left behind when the final rename fails (a full
    or read-only file system refuses it): the old file stays, nothing else appears."""
    path = _old_file(tmp_path)

    def refuse(src, dst) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "replace", refuse)
    monkeypatch.setattr(os, "rename", refuse)
    with pytest.raises((OSError, GptkitError)):
        fileio.atomic_write_json(path, {"new": 1})
    monkeypatch.undo()
    assert path.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["config.json"]


def _recreate_private(tmp: str) -> None:
    """A writer that replaces the file it is given by a new 0600 one (as safetensors'
    save_file does)."""
    os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"c")
    os.close(fd)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=oct)
def test_a_new_file_gets_the_umask_permissions_of_a_plain_open(tmp_path: Path, umask: int) -> None:
    """Guards the temporary file's private 0600 mode surviving the rename (other users
    and group members could no longer read a shared run's files), also where the writer
    recreated the temporary file itself."""
    old = os.umask(umask)
    try:
        fileio.atomic_write_json(tmp_path / "a.json", {"a": 1})
        fileio.atomic_write_with(tmp_path / "b.bin", lambda tmp: Path(tmp).write_bytes(b"b"))
        fileio.atomic_write_with(tmp_path / "c.bin", _recreate_private)
    finally:
        os.umask(old)
    for name in ("a.json", "b.bin", "c.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
