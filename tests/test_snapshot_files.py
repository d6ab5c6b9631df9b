"""vmipc.snapshots without a VMM: a file sealed from sections written in place verifies,
and a pending file is published atomically or discarded without touching what it did not
create."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmipc.formats import FormatError, section_entry, section_offset
from vmipc.formats.snapshot import encode_memory_section
from vmipc.snapshots import (
    PendingFile,
    append_dirty_log,
    entries_of,
    new_header,
    read_dirty_epoch,
    seal,
    verify_file,
)


def write_section(fd: int, name: str, data: bytes) -> dict[str, object]:
    """What a ``dump-* format=snapshot`` reply says about the section it appended."""
    offset = section_offset(os.fstat(fd).st_size)
    os.pwrite(fd, data, offset)
    return {"section": section_entry(name, 1, offset, data).to_dict()}


def test_a_sealed_file_verifies_and_an_unsealed_one_does_not(tmp_path: Path) -> None:
    pending = PendingFile(str(tmp_path / "snap"))
    fd = pending.create()
    header = new_header("test")
    os.pwrite(fd, header.encode(), 0)
    entries = []
    for name in ("config", "vcpus", "devices"):  # contents not judged here, only checksums
        entries += entries_of(write_section(fd, name, name.encode() * 1000))
    memory = encode_memory_section([(0, 2 * 4096, 0)], bytes(4096) + b"\x01" * 4096)
    entries += entries_of(write_section(fd, "memory", memory))
    entries.append(append_dirty_log(fd, "epoch-1"))
    with pytest.raises(FormatError):
        verify_file(fd, full=False)
    seal(fd, entries, header)
    verify_file(fd)
    assert pending.publish() == os.fstat(fd).st_size
    pending.discard()  # published: closes, removes nothing
    assert not os.path.exists(pending.temp)
    assert read_dirty_epoch(str(tmp_path / "snap")) == "epoch-1"
    assert os.listdir(tmp_path) == ["snap"]


def test_entries_of_takes_sections_then_section() -> None:
    state = {"sections": [section_entry("a", 1, 4096, b"1").to_dict()]}
    memory = {"section": section_entry("b", 1, 4104, b"2").to_dict()}
    assert [e.name for e in entries_of({**state, **memory})] == ["a", "b"]
    assert entries_of({"bytes": 3}) == []


def test_seal_refuses_misplaced_entries_and_writes_nothing(tmp_path: Path) -> None:
    pending = PendingFile(str(tmp_path / "snap"))
    fd = pending.create()
    entries = entries_of(write_section(fd, "one", b"x" * 100))
    before = os.pread(fd, 1 << 16, 0)
    with pytest.raises(ValueError):
        seal(fd, list(reversed(entries + entries)), new_header())
    assert os.pread(fd, 1 << 16, 0) == before
    pending.discard()
    assert os.listdir(tmp_path) == []


def test_discard_leaves_a_file_it_did_not_create(tmp_path: Path) -> None:
    taken = tmp_path / ".snap.taken.partial"
    taken.write_bytes(b"somebody else's")
    pending = PendingFile(str(tmp_path / "snap"), temp=str(taken))
    with pytest.raises(FileExistsError):
        pending.create()
    pending.discard()
    assert taken.read_bytes() == b"somebody else's"
    assert not (tmp_path / "snap").exists()
