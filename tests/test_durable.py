"""edge.durable: the one write for files that must survive a power cut."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from edge.durable import atomic_file, fsync_dir, sync_tree, write_atomic


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _fail_while_writing(path: Path, data: bytes, exc: Exception) -> None:
    with atomic_file(path) as fh:
        fh.write(data)
        raise exc


def test_write_atomic_replaces_the_whole_file(tmp_path: Path) -> None:
    """A shorter write replaces a longer file entirely: no tail of the old bytes remains."""
    path = tmp_path / "state.json"
    path.write_bytes(b"x" * 10_000)
    write_atomic(path, b'{"ok": true}')
    assert path.read_bytes() == b'{"ok": true}'
    assert os.listdir(tmp_path) == ["state.json"]


def test_write_atomic_creates_a_missing_file(tmp_path: Path) -> None:
    """A file that does not exist yet is created with the data."""
    path = tmp_path / "new.bin"
    write_atomic(path, b"\x00\x01\x02")
    assert path.read_bytes() == b"\x00\x01\x02"


def test_str_is_written_as_utf8(tmp_path: Path) -> None:
    """A str is stored as its UTF-8 bytes, whatever the locale."""
    path = tmp_path / "label.txt"
    write_atomic(path, "Größe 5 µm – ✓\n")
    assert path.read_bytes() == "Größe 5 µm – ✓\n".encode()


def test_atomic_file_streams_into_the_target(tmp_path: Path) -> None:
    """What a streaming writer writes in the block is the file's content once it ends."""
    path = tmp_path / "bank.bin"
    path.write_bytes(b"old")
    with atomic_file(path) as fh:
        for i in range(3):
            fh.write(bytes([i]) * 4)
    assert path.read_bytes() == b"\x00" * 4 + b"\x01" * 4 + b"\x02" * 4


def test_exception_in_block_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    """An exception inside atomic_file propagates, leaves the old file byte for byte and no
    temporary file behind."""
    path = tmp_path / "manifest.yaml"
    old = b"version: 1\n" * 100
    path.write_bytes(old)
    with pytest.raises(RuntimeError, match="writer died"):
        _fail_while_writing(path, b"version: 2\n", RuntimeError("writer died"))
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["manifest.yaml"]


def test_exception_when_nothing_existed_creates_nothing(tmp_path: Path) -> None:
    """A failed first write leaves no file under the name and no temporary file."""
    with pytest.raises(ValueError, match="bad data"):
        _fail_while_writing(tmp_path / "never.bin", b"half", ValueError("bad data"))
    assert os.listdir(tmp_path) == []


def test_mode_sets_the_permission_bits(tmp_path: Path) -> None:
    """`mode` gives the new file exactly those permission bits, also over an existing file."""
    path = tmp_path / "secret.key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    write_atomic(path, b"new", mode=0o600)
    assert _mode(path) == 0o600
    write_atomic(path, b"newer", mode=0o640)
    assert _mode(path) == 0o640


def test_default_mode_is_what_open_gives(tmp_path: Path) -> None:
    """Without `mode` the file gets the permissions a plain open() would give (umask applied),
    not the private 0o600 of a temporary file."""
    reference = tmp_path / "reference"
    reference.write_bytes(b"")
    path = tmp_path / "plain"
    write_atomic(path, b"data")
    assert _mode(path) == _mode(reference)


def test_fsync_dir_accepts_a_folder_and_refuses_a_file(tmp_path: Path) -> None:
    """fsync_dir works on a folder; a file is not a folder and raises."""
    fsync_dir(tmp_path)
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        fsync_dir(tmp_path / "f")


def test_sync_tree_makes_every_file_and_folder_durable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder written in place (sub-folders too) is fsynced whole: every file, every
    folder and the folder itself, each folder after what it holds."""
    folder = tmp_path / "candidate"
    (folder / "damage" / "deeper").mkdir(parents=True)
    files = [folder / "manifest.yaml", folder / "damage" / "damage.onnx",
             folder / "damage" / "deeper" / "card.md"]
    for f in files:
        f.write_bytes(b"x")
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    sync_tree(folder)
    folders = [folder / "damage" / "deeper", folder / "damage", folder]
    assert set(synced) == {str(p) for p in files + folders}
    assert synced[-1] == str(folder)
    assert synced.index(str(folder / "damage")) > synced.index(str(files[1]))


def test_concurrent_writers_never_leave_a_mix(tmp_path: Path) -> None:
    """Two threads writing one path at once: every read, and the final file, is exactly one
    of the writes, never a mix; no temporary file is left."""
    path = tmp_path / "bank.npz"
    writes = {b"A" * 300_000, b"B" * 200_000 + b"b" * 150_000}
    path.write_bytes(next(iter(writes)))
    start, done = threading.Barrier(3), threading.Event()
    errors: list[BaseException] = []
    seen_mixed: list[bytes] = []

    def writer(data: bytes) -> None:
        try:
            start.wait()
            for _ in range(40):
                write_atomic(path, data)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    def reader() -> None:
        start.wait()
        while not done.is_set():
            content = path.read_bytes()
            if content not in writes:
                seen_mixed.append(content[:32])

    threads = [threading.Thread(target=writer, args=(d,)) for d in writes]
    watcher = threading.Thread(target=reader)
    for t in (*threads, watcher):
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert errors == []
    assert seen_mixed == []
    assert path.read_bytes() in writes
    assert os.listdir(tmp_path) == ["bank.npz"]
