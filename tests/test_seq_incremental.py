"""Incremental checkpoints on real KVM with the built-in guest: a full checkpoint with
dirty tracking, then increments holding only the pages written since their parent; the
chain restores (and merges into one full snapshot) so that the console goes on exactly as
an uninterrupted run; broken chains and untracked VMMs are refused with one line."""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.seq_support import VmmProcess, check_continuation, vmm_processes
from tests.seq_support import vmipc as vmipc_process
from tests.test_seq_snapshot import FailingClient, call_then_fail
from vmipc.cli import main
from vmipc.client import CommandError, open_client
from vmipc.formats import (
    Checksum,
    PageStreamEncoder,
    SectionEntry,
    SnapshotHeader,
    SnapshotReader,
    encode_table,
    new_snapshot_id,
    section_entry,
    section_offset,
)
from vmipc.formats.snapshot import FLAG_INCREMENTAL, SECTION_MEMORY
from vmipc.sequences import Incremental, SequenceError, checkpoint
from vmipc.snapshots import hash_range, increment_descriptor
from vmipc.vmm.devices import disk as _disk
from vmipc.vmm.persist import extents as _extents

pytestmark = pytest.mark.kvm

#: RAM the built-in guest never touches (its image and working sets are below 4 MiB)
FILLER_AT = 32 << 20
FILLER_SIZE = 16 << 20


class Cli:
    """``vmipc`` run in this process (a subprocess costs a second on a loaded machine)."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def __call__(self, *argv: str) -> subprocess.CompletedProcess[str]:
        self.capsys.readouterr()
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = self.capsys.readouterr()
        return subprocess.CompletedProcess(list(argv), code, out, err)

    def json(self, *argv: str) -> Any:
        done = self(*argv, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


def reader_of(fd: int) -> SnapshotReader:
    return SnapshotReader(functools.partial(os.pread, fd), os.fstat(fd).st_size)


def add_filler(path: Path) -> bytes:
    """Write data into RAM the guest never uses, in a full snapshot's memory image, and
    re-seal it (memory checksum, table, trailer): a VM with much memory that it does not
    rewrite, as most VMs have."""
    filler = random.Random(7).randbytes(FILLER_SIZE)
    fd = os.open(path, os.O_RDWR)
    try:
        reader = reader_of(fd)
        memory = reader.memory()
        os.pwrite(fd, filler, memory.file_offset(FILLER_AT, FILLER_SIZE))
        digest = Checksum()
        hash_range(fd, memory.entry.offset, memory.entry.length, digest)
        entries = [
            SectionEntry(e.name, e.version, e.offset, e.length, digest.digest())
            if e.name == "memory"
            else e
            for e in reader.entries
        ]
        table = encode_table(entries, reader.header.snapshot_id, reader.table_offset)
        os.pwrite(fd, table.data, table.offset)
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        SnapshotReader.from_file(f).verify()
    return filler


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def pause_and_text(vmm: VmmProcess) -> str:
    with vmm.client() as client:
        client.pause()
    return vmm.text()


def restore_and_check(
    vmipc: Cli, vmms: Any, before: str, reached: int, files: int, *restore_args: str
) -> VmmProcess:
    """``vmipc restore`` a chain into a fresh incoming VMM (``files`` files loaded); its
    guest continues exactly from ``before`` (the source's console at the snapshot)."""
    dst = vmms.incoming(memory=None)
    restored = vmipc("restore", "--socket", dst.socket, *restore_args)
    assert restored.returncode == 0, restored.stderr
    assert f"{files} file(s)" in restored.stdout
    dst.wait_for_passes(reached + 3)
    check_continuation(before, pause_and_text(dst))
    return dst


def test_a_chain_restores_and_merges_and_the_guest_continues_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vmipc = Cli(capsys)
    chain = tmp_path / "chain"
    chain.mkdir()
    seed, full, inc1, inc2 = (chain / n for n in ("seed.snap", "full.snap", "1.snap", "2.snap"))
    with vmm_processes() as vmms:
        # a guest whose RAM holds 16 MiB it never rewrites: suspend, add it, restore
        first = vmms.guest("first")
        first.wait_for_passes(1)
        assert vmipc("suspend", "--socket", first.socket, str(seed)).returncode == 0
        filler = add_filler(seed)
        src = vmms._start("src", ["--restore", str(seed)], [])
        src.wait_for_passes(max(first.passes().values()) + 1)
        seed.unlink()

        done = vmipc("checkpoint", "--socket", src.socket, "--track", str(full), "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["tracking"] is True
        for parent, child, extra in ((full, inc1, []), (inc1, inc2, ["--leave-paused"])):
            src.wait_for_passes(max(src.passes().values()) + 2)
            done = vmipc(
                "checkpoint", "--socket", src.socket, "--incremental", "--parent", str(parent),
                str(child), "--json", *extra,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            report = json.loads(done.stdout)
            assert (
                report["parent_id"]
                == json.loads(vmipc("snapshot", "inspect", str(parent), "--json").stdout)[
                    "snapshot_id"
                ]
            )
        assert src.state() == "paused"
        before = first.text() + src.text()
        reached = max(src.passes().values())
        src.stop()

        # increments hold only the pages written since their parent
        for increment in (inc1, inc2):
            info = json.loads(vmipc("snapshot", "inspect", str(increment), "--json").stdout)
            assert info["incremental"] and info["memory"]["encoding"] == "page-stream"
            assert increment.stat().st_size * 8 < allocated(full) - FILLER_SIZE // 2
            assert increment.stat().st_size < FILLER_SIZE // 8
            assert vmipc("snapshot", "verify", str(increment)).returncode == 0

        # restore the chain into an incoming VMM
        args = (str(inc2), "--chain-dir", str(chain))
        dst = restore_and_check(vmipc, vmms, before, reached, 3, *args)
        dst.stop()

        # merge the chain into one full snapshot; vmm --restore runs it
        merged = tmp_path / "merged.snap"
        done = vmipc("snapshot", "merge", str(inc2), "--chain-dir", str(chain), "-o", str(merged))
        assert done.returncode == 0, done.stderr
        assert vmipc("snapshot", "verify", str(merged)).returncode == 0
        info = json.loads(vmipc("snapshot", "inspect", str(merged), "--json").stdout)
        assert not info["incremental"] and info["parent_id"] is None
        with open(merged, "rb") as f:
            memory = SnapshotReader.from_file(f).memory()
            f.seek(memory.file_offset(FILLER_AT, FILLER_SIZE))
            assert f.read(FILLER_SIZE) == filler
        refused = vmipc_process("vmm", "--restore", str(inc2))
        assert refused.returncode != 0 and "merge its chain first" in refused.stderr
        again = vmms._start("merged", ["--restore", str(merged)], [])
        again.wait_for_passes(reached + 3)
        check_continuation(before, pause_and_text(again))


def compose_increment(parent: Path, out: Path, runs: list[tuple[int, bytes | int]]) -> None:
    """An increment of ``parent`` written by hand with the formats codecs: ``parent``'s
    other sections, and as memory a page stream of ``runs`` -- (gpa, pages) for data,
    (gpa, npages) for a zero run."""
    with open(parent, "rb") as f:
        reader = SnapshotReader.from_file(f)
        desc = reader.memory().descriptor
        others = [
            (e.name, e.version, reader.read_section(e.name))
            for e in reader.entries
            if e.name != SECTION_MEMORY
        ]
        header = SnapshotHeader(
            new_snapshot_id(),
            "tests",
            flags=FLAG_INCREMENTAL,
            parent_id=reader.header.snapshot_id,
            parent_checksum=reader.table_checksum,
        )
    encoder = PageStreamEncoder([(r.gpa, r.size) for r in desc.regions], page_size=desc.page_size)
    stream = [encoder.header()]
    for gpa, run in runs:
        if isinstance(run, int):
            stream.append(encoder.zero(gpa, run))
        else:
            stream.append(encoder.data(gpa, len(run) // desc.page_size))
            encoder.payload(run)
            stream.append(run)
    stream += [encoder.end_round(), encoder.end_stream()]
    memory = increment_descriptor(desc) + b"".join(stream)
    with open(out, "wb") as f:
        entries, end = [], 0
        for name, version, data in [*others, (SECTION_MEMORY, 1, memory)]:
            offset = section_offset(end)
            f.seek(offset)
            f.write(data)
            entries.append(section_entry(name, version, offset, data))
            end = offset + len(data)
        table = encode_table(entries, header.snapshot_id, end)
        f.seek(0)
        f.write(header.encode())
        f.seek(table.offset)
        f.write(table.data)


def image_of(path: Path) -> tuple[int, bytes]:
    """A full snapshot's memory: its checksum and its bytes (descriptor and image)."""
    with open(path, "rb") as f:
        entry = SnapshotReader.from_file(f).memory().entry
        f.seek(entry.offset)
        return entry.checksum, f.read(entry.length)


MIB = 1 << 20


def test_merging_turns_zeroed_pages_into_holes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages an increment zeroes (ZERO records) are punched holes in the merged file, not
    written zeros: the same bytes and checksums, less disk. A chain of a real suspended
    guest whose base holds 16 MiB of data it never uses, then two increments composed by
    hand: the first zeroes 12 MiB of it and writes 1 MiB of new data, the second writes
    1 MiB of data inside the zeroed range."""
    vmipc = Cli(capsys)
    chain = tmp_path / "chain"
    chain.mkdir()
    base, inc1, inc2 = (chain / n for n in ("base.snap", "1.snap", "2.snap"))
    with vmm_processes() as vmms:
        first = vmms.guest("first")
        first.wait_for_passes(1)
        assert vmipc("suspend", "--socket", first.socket, str(base)).returncode == 0
        before = first.text()
        reached = max(first.passes().values())
        filler = add_filler(base)
        fresh = random.Random(8).randbytes(2 * MIB)
        compose_increment(
            base,
            inc1,
            [(FILLER_AT + MIB, 12 * MIB // 4096), (FILLER_AT + 14 * MIB, fresh[:MIB])],
        )
        compose_increment(inc1, inc2, [(FILLER_AT + 5 * MIB, fresh[MIB:])])
        expected = (
            filler[:MIB] + bytes(4 * MIB) + fresh[MIB:] + bytes(7 * MIB)
            + filler[13 * MIB : 14 * MIB] + fresh[:MIB] + filler[15 * MIB :]
        )  # fmt: skip
        holes = [(1 * MIB, 5 * MIB), (6 * MIB, 13 * MIB)]
        hole_size = sum(end - start for start, end in holes)

        merged = tmp_path / "merged.snap"
        done = vmipc.json(
            "snapshot", "merge", str(inc2), "--chain-dir", str(chain), "-o", str(merged)
        )
        assert done["zero_pages"] == 12 * MIB // 4096 and done["data_pages"] == 2 * MIB // 4096
        assert vmipc("snapshot", "verify", str(merged)).returncode == 0
        fd = os.open(merged, os.O_RDONLY)
        try:
            memory = reader_of(fd).memory()
            at = memory.file_offset(FILLER_AT, FILLER_SIZE)
            assert os.pread(fd, FILLER_SIZE, at) == expected
            # SEEK_DATA/SEEK_HOLE: the zeroed pages are holes, the data around them is not
            assert list(_extents.data_extents(fd, at, FILLER_SIZE)) == [
                (at, 1 * MIB),
                (at + 5 * MIB, 1 * MIB),
                (at + 13 * MIB, 3 * MIB),
            ]
        finally:
            os.close(fd)
        # on disk, the merged file is the base less the holes (give or take a few blocks)
        saved = allocated(base) - allocated(merged)
        assert hole_size - 256 * 1024 <= saved <= hole_size + 256 * 1024, (saved, hole_size)
        assert allocated(merged) < merged.stat().st_size - hole_size

        # where the filesystem cannot punch holes, zeros are written: the same contents
        def cannot_punch(fd: int, mode: int, offset: int, length: int) -> int:
            ctypes.set_errno(errno.EOPNOTSUPP)
            return -1

        monkeypatch.setattr(_disk, "_libc", cannot_punch)
        written = tmp_path / "written.snap"
        done = vmipc.json(
            "snapshot", "merge", str(inc2), "--chain-dir", str(chain), "-o", str(written)
        )
        monkeypatch.undo()
        assert vmipc("snapshot", "verify", str(written)).returncode == 0
        assert image_of(written) == image_of(merged)
        more = allocated(written) - allocated(merged)
        assert hole_size - 256 * 1024 <= more <= hole_size + 256 * 1024, (more, hole_size)

        # the merged snapshot restores the guest exactly where it was suspended
        again = vmms._start("merged", ["--restore", str(merged)], [])
        again.wait_for_passes(reached + 2)
        check_continuation(before, pause_and_text(again))


def forge_same_id(other: Path, parent: Path, out: Path) -> None:
    """``other``'s contents under ``parent``'s snapshot id: the id matches, the table
    checksum does not."""
    shutil.copyfile(other, out)
    with open(parent, "rb") as f:
        snapshot_id = SnapshotReader.from_file(f).header.snapshot_id
    fd = os.open(out, os.O_RDWR)
    try:
        reader = reader_of(fd)
        header = reader.header
        forged = SnapshotHeader(snapshot_id, header.producer, created_ns=header.created_ns)
        os.pwrite(fd, forged.encode(), 0)
        table = encode_table(reader.entries, snapshot_id, reader.table_offset)
        os.pwrite(fd, table.data, table.offset)
    finally:
        os.close(fd)


def one_line_error(result: Any) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.strip().split("\n")
    assert len(lines) == 1, result.stderr
    return str(lines[0])


def test_untracked_vmms_and_broken_chains_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vmipc = Cli(capsys)
    plain, full, inc = (tmp_path / n for n in ("plain.snap", "full.snap", "inc.snap"))
    with vmm_processes() as vmms:
        src = vmms.guest()
        src.wait_for_passes(1)
        # dirty logging is off: an incremental checkpoint is refused before it pauses
        assert vmipc("checkpoint", "--socket", src.socket, str(plain)).returncode == 0
        refused = vmipc(
            "checkpoint", "--socket", src.socket, "--incremental", "--parent", str(plain),
            str(inc),
        )  # fmt: skip
        assert "dirty logging is off" in one_line_error(refused)
        assert "--track" in refused.stderr
        assert not inc.exists() and src.state() == "running"
        usage = vmipc("checkpoint", "--socket", src.socket, "--incremental", str(inc))
        assert usage.returncode == 2

        # a failed incremental checkpoint consumed the dirty pages: tracking stops, so the
        # next incremental one is refused instead of missing pages
        assert vmipc("checkpoint", "--socket", src.socket, "--track", str(full)).returncode == 0

        async def failing_increment() -> SequenceError:
            async with open_client(src.socket) as client:
                failing = FailingClient(client, "dump_dirty", call_then_fail)
                with pytest.raises(SequenceError) as info:
                    await checkpoint(failing, str(inc), mode=Incremental(str(full)))  # type: ignore[arg-type]
                return info.value

        error = trio.run(failing_increment)
        assert error.step == "dump-dirty" and "dirty logging was stopped" in error.outcome
        assert src.state() == "running" and not inc.exists()
        refused = vmipc(
            "checkpoint", "--socket", src.socket, "--incremental", "--parent", str(full), str(inc)
        )
        assert "dirty logging is off" in one_line_error(refused)

        # a good chain of two, then broken ways to find its parent
        assert vmipc("checkpoint", "--socket", src.socket, "--track", str(full)).returncode == 0
        src.wait_for_passes(max(src.passes().values()) + 1)
        done = vmipc(
            "checkpoint", "--socket", src.socket, "--incremental", "--parent", str(full), str(inc)
        )
        assert done.returncode == 0, done.stderr
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        forged = elsewhere / "forged.snap"
        forge_same_id(plain, full, forged)

        empty = tmp_path / "empty"
        empty.mkdir()
        dst = vmms.incoming(memory=None)
        cases = [
            (["--parent", str(plain)], "was not found"),  # another snapshot: another id
            (["--chain-dir", str(empty)], "was not found"),
            (["--parent", str(forged)], "table checksum"),  # the id, other contents
            (["--chain-dir", str(elsewhere)], "table checksum"),
            ([], "searched nowhere"),
        ]
        for extra, expected in cases:
            refused = vmipc("restore", "--socket", dst.socket, str(inc), *extra)
            assert expected in one_line_error(refused), refused.stderr
            assert dst.state() == "incoming"

        async def load_increment() -> None:  # load-memory takes full snapshots only
            async with open_client(dst.socket) as client:
                with open(inc, "rb") as f, pytest.raises(CommandError) as info:
                    await client.load_memory(format="snapshot", in_=f.fileno())
                assert info.value.code == "bad-snapshot" and "incremental" in info.value.message

        trio.run(load_increment)
        merged = tmp_path / "merged.snap"
        refused = vmipc("snapshot", "merge", str(inc), "--parent", str(forged), "-o", str(merged))
        assert "table checksum" in one_line_error(refused)
        assert not merged.exists()
        assert [n for n in os.listdir(tmp_path) if n.endswith(".partial")] == []
        # the right parent works
        restored = vmipc("restore", "--socket", dst.socket, str(inc), "--parent", str(full))
        assert restored.returncode == 0, restored.stderr
        assert dst.state() == "running"


def test_stale_parents_and_pages_taken_elsewhere_are_refused_and_the_chain_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The dirty log's epoch (protocol 1.5) makes what a chain relies on checked: an
    increment whose parent is not the newest snapshot of the VMM's dirty log would miss
    pages, so it is refused before anything happens, and the chain goes on from its real
    newest snapshot."""
    vmipc = Cli(capsys)
    chain = tmp_path / "chain"
    chain.mkdir()
    plain, full, inc1, inc2, inc3, full2, inc4, bad = (
        chain / f"{n}.snap" for n in ("plain", "full", "1", "2", "3", "full2", "4", "bad")
    )

    def increment(parent: Path, child: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return vmipc(
            "checkpoint", "--socket", src.socket, "--incremental", "--parent", str(parent),
            str(child), *extra,
        )  # fmt: skip

    def refused(parent: Path, expected: str) -> None:
        assert expected in one_line_error(increment(parent, bad))
        assert not bad.exists() and src.state() == "running"

    with vmm_processes() as vmms:
        src = vmms.guest()
        src.wait_for_passes(1)
        # taken while dirty logging was off: it records no epoch, so once logging runs an
        # increment from it is refused (the pages written in between are unknown)
        assert vmipc("checkpoint", "--socket", src.socket, str(plain)).returncode == 0
        with src.client() as client:
            started = client.dirty_log_start()["epoch"]
            assert client.query_dirty()["epoch"] == started
        refused(plain, "records no dirty-log epoch")

        assert vmipc("checkpoint", "--socket", src.socket, "--track", str(full)).returncode == 0
        assert increment(full, inc1).returncode == 0
        assert increment(inc1, inc2).returncode == 0
        # an older snapshot of the chain: refused, dirty logging untouched
        refused(full, "not the newest snapshot")
        refused(inc1, "not the newest snapshot")
        assert increment(inc2, inc3).returncode == 0

        # another client takes the dirty pages: the chain's next increment would miss them
        with src.client() as client, open(tmp_path / "elsewhere.stream", "wb") as sink:
            client.dump_dirty(out=sink.fileno())
        refused(inc3, "not the newest snapshot")

        # a full checkpoint without --track while logging runs records the epoch it was
        # taken in, so an increment may follow it; it restores exactly
        assert vmipc("checkpoint", "--socket", src.socket, str(full2)).returncode == 0
        src.wait_for_passes(max(src.passes().values()) + 2)
        done = increment(full2, inc4, "--leave-paused")
        assert done.returncode == 0, done.stderr
        before = src.text()
        reached = max(src.passes().values())
        src.stop()
        restore_and_check(vmipc, vmms, before, reached, 2, str(inc4), "--parent", str(full2))
