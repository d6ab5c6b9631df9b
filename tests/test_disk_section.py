"""The snapshot's optional ``disk`` section (protocol 1.9 ``dump-disk``, ``vmipc checkpoint
--with-disk``, ``vmipc vmm --restore FILE --disk-from-snapshot NEWIMG``): the codec refuses
every malformed section (a table of hostile cases); on real KVM a checkpoint of a guest
running its disk workload with requests in flight moves the VM and its disk as one file,
the workload continuing exactly on a new sparse image that checks from outside; a
checkpoint without the disk leaves an image that checks whole; a kill -9 mid-workload
leaves only whole blocks; hostile disk sections in a real snapshot are refused before any
guest runs."""

from __future__ import annotations

import json
import os
import random
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.disk_support import BLOCKS, DISK_SIZE, last_pass, make_image
from tests.seq_support import VmmProcess, Vmms, vmipc, vmm_processes, wait_for
from vmipc.formats import SectionEntry, SnapshotError, checksum
from vmipc.formats.disksection import (
    DISK_HEADER_SIZE,
    MAX_DISK_SIZE,
    SECTION_DISK,
    DiskSectionHeader,
    DiskSectionWriter,
    walk_disk_section,
)
from vmipc.formats.snapshot import SnapshotHeader, SnapshotReader, build_snapshot
from vmipc.guest import check_disk_image, disk_bad_lines, disk_pass_sums
from vmipc.memory_layout import MIB

_REC = struct.Struct("<QQ")
END = (1 << 64) - 1


# --- the codec: every malformed section refused ---------------------------------------------


def _section(
    records: list[tuple[int, int, bytes]] | None = None,
    *,
    size: int = DISK_SIZE,
    flags: int = 0,
    end: int | None = None,
    magic: bytes = b"VMIPCDSK",
    tail: bytes = b"",
) -> bytes:
    """A disk section by hand: (offset, length, data) records, then the end record."""
    head = struct.pack("<8sIIQ", magic, DISK_HEADER_SIZE, flags, size).ljust(64, b"\0")
    body = b""
    total = 0
    for offset, length, data in records or []:
        body += _REC.pack(offset, length) + data
        total += len(data)
    return head + body + _REC.pack(END, total if end is None else end) + tail


def _walk(data: bytes, version: int = 1, cut: int = 0) -> list[tuple[int, int]]:
    """Walk ``data`` placed at offset 4096 of a file (its entry claims ``len - cut``)."""
    blob = bytes(4096) + data

    def pread(size: int, offset: int) -> bytes:
        return blob[offset : offset + size]

    entry = SectionEntry(SECTION_DISK, version, 4096, len(data) - cut, checksum(data))
    return [(e.disk_offset, e.length) for e in walk_disk_section(pread, entry)]


BLOCK = b"\x5a" * 4096

HOSTILE: list[tuple[str, bytes, int, str]] = [
    ("truncated: no end record", _section([(0, 4096, BLOCK)])[:-16], 0, "past the section"),
    ("truncated inside the data", _section([(0, 4096, BLOCK)]), 100, "past the section's end"),
    ("shorter than a header", _section()[:40], 0, "too short"),
    ("bad magic", _section(magic=b"VMIPCSNP"), 0, "bad magic"),
    ("unknown flags", _section(flags=6), 0, "unknown flags"),
    ("absurd size", _section(size=MAX_DISK_SIZE + 512), 0, "disk size"),
    ("zero size", _section(size=0), 0, "disk size"),
    ("size not whole sectors", _section(size=DISK_SIZE + 1), 0, "disk size"),
    (
        "overlapping extents",
        _section([(8192, 4096, BLOCK), (4096, 8192, BLOCK * 2)]),
        0,
        "overlaps",
    ),
    (
        "out of order",
        _section([(8192, 4096, BLOCK), (0, 4096, BLOCK)]),
        0,
        "overlaps or precedes",
    ),
    ("out of range", _section([(DISK_SIZE, 4096, BLOCK)]), 0, "outside the disk"),
    ("ends past the disk", _section([(DISK_SIZE - 512, 4096, BLOCK)]), 0, "outside the disk"),
    ("wrapping offset", _section([(END - 4095, 4096, BLOCK)]), 0, "outside the disk"),
    ("empty extent", _section([(0, 0, b"")]), 0, "empty"),
    ("unaligned extent", _section([(100, 512, BLOCK[:512])]), 0, "whole 512-byte"),
    (
        "length beyond the section",
        _section([(0, 1 << 40, BLOCK)], size=1 << 41),
        0,
        "past the section",
    ),
    ("end total wrong", _section([(0, 4096, BLOCK)], end=8192), 0, "end record says"),
    ("bytes after the end", _section([(0, 4096, BLOCK)], tail=b"\0" * 16), 0, "follow the end"),
]


@pytest.mark.parametrize(
    ("data", "cut", "match"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE]
)
def test_hostile_disk_sections_are_refused_by_the_codec(data: bytes, cut: int, match: str) -> None:
    with pytest.raises(SnapshotError, match=match):
        _walk(data, cut=cut)


def test_an_unknown_section_version_is_refused() -> None:
    with pytest.raises(SnapshotError, match="version 2 is not supported"):
        _walk(_section(), version=2)


def test_the_writer_and_the_walk_agree() -> None:
    writer = DiskSectionWriter(4096, DISK_SIZE, readonly=True)
    out = bytearray(writer.header)
    for offset, data in ((0, BLOCK), (8192, BLOCK * 2), (DISK_SIZE - 512, BLOCK[:512])):
        record, at = writer.extent(offset, len(data))
        assert at == 4096 + len(out)
        out += record + data
        writer.data(data)
    record, at, entry = writer.finish()
    out += record
    assert at + 16 == 4096 + len(out) and entry.length == len(out)
    assert entry.checksum == checksum(bytes(out))
    assert _walk(bytes(out)) == [(0, 4096), (8192, 8192), (DISK_SIZE - 512, 512)]
    assert DiskSectionHeader.decode(bytes(out[:64])) == DiskSectionHeader(DISK_SIZE, True)
    with pytest.raises(ValueError):
        DiskSectionWriter(0, DISK_SIZE, False).extent(DISK_SIZE, 512)


# --- on real KVM ---------------------------------------------------------------------------------


def _disk_vmm(vmms: Vmms, name: str, image: Path, *, depth: int = 8, mode: int = 2) -> VmmProcess:
    args = ["--memory", "32M", "--disk", str(image)]
    for opt in (f"disk={mode}", f"depth={depth}", f"blocks={BLOCKS}", "passes=0"):
        args += ["--guest-opt", opt]
    return vmms._start(name, args, [])


def _model_lines(text: str, *, bad: bool = True) -> None:
    """The console is exactly the model's run so far: bad requests, then pass lines."""
    lines = [line for line in text.split("\n")[:-1] if "vmipc-guest" not in line]
    expected = disk_bad_lines() if bad else []
    sums = disk_pass_sums(BLOCKS)
    expected += [
        f"vcpu=0 disk pass={n} sum={next(sums):016x}"
        for n in range(1, len(lines) - len(expected) + 1)
    ]
    assert lines == expected


@pytest.mark.kvm
def test_checkpoint_with_disk_moves_the_vm_and_its_disk_as_one_file(tmp_path: Path) -> None:
    """disk=2 depth=8, checkpointed with requests in flight and --with-disk; the original
    VMM is killed and its image removed; a fresh VMM restores from the one file with the
    disk written out to a new image: the workload continues exactly, and the new image
    (sparse) checks from outside, both as written out and after more passes."""
    image = make_image(tmp_path / "disk.img")
    snap = tmp_path / "vm.snap"
    new = tmp_path / "new.img"
    with vmm_processes() as vmms:
        src = _disk_vmm(vmms, "src", image)
        wait_for(lambda: last_pass(src.text()) >= 2, 60, "pass 2")
        done = vmipc("suspend", "--socket", src.socket, "--with-disk", "--json", str(snap))
        assert done.returncode == 0, done.stderr
        assert src.wait_exit() == 0
        names = [s["name"] for s in json.loads(done.stdout)["sections"]]
        assert names[-1] == "disk", names
        before = src.text()
        reached = last_pass(before)
        image.unlink()  # the VM moves as one file
        verified = vmipc("snapshot", "verify", str(snap))
        assert verified.returncode == 0, verified.stderr
        dst = vmms._start(
            "dst", ["--restore", str(snap), "--disk-from-snapshot", str(new), "--paused"], []
        )
        # written out before anything ran: whole blocks of the pass printed or the next
        check = check_disk_image(new.read_bytes(), BLOCKS)
        assert check.consistent_with(reached) and check.passes, check
        assert new.stat().st_size == DISK_SIZE
        assert new.stat().st_blocks * 512 <= BLOCKS * 4096 + 64 * 1024  # holes stay holes
        with dst.client() as client:
            client.resume()
        wait_for(lambda: last_pass(dst.text()) >= reached + 3, 60, "three more passes")
        with dst.client() as client:
            client.pause()
        after = dst.text()
        check = check_disk_image(new.read_bytes(), BLOCKS)
        assert check.consistent_with(last_pass(before + after)), check
    _model_lines(before + after)


@pytest.mark.kvm
def test_restore_into_an_incoming_vmm_takes_the_disk_from_the_snapshot(tmp_path: Path) -> None:
    """`vmipc restore FILE --disk-from-snapshot NEWIMG` into a VMM started with `--incoming`
    and no disk: the client writes the section out to NEWIMG (never over an existing file)
    and passes it (attach-disk); the workload continues exactly. A failed restore removes
    the image it wrote, and leaves alone a file that was there before."""
    image = make_image(tmp_path / "disk.img")
    snap = tmp_path / "vm.snap"
    new = tmp_path / "new.img"
    with vmm_processes() as vmms:
        src = _disk_vmm(vmms, "src", image)
        wait_for(lambda: last_pass(src.text()) >= 2, 60, "pass 2")
        done = vmipc("suspend", "--socket", src.socket, "--with-disk", str(snap))
        assert done.returncode == 0, done.stderr
        before = src.text()
        reached = last_pass(before)
        image.unlink()
        # an existing file is never overwritten, and nothing is loaded
        new.write_bytes(b"keep")
        dst = vmms.incoming("dst", memory=None)
        refused = vmipc(
            "restore", "--socket", dst.socket, "--disk-from-snapshot", str(new), str(snap)
        )
        assert refused.returncode != 0 and "exists" in refused.stderr, refused.stderr
        assert new.read_bytes() == b"keep"
        with dst.client() as client:
            assert client.query_status()["state"] == "incoming"
        new.unlink()
        # a VMM with a disk of its own refuses the attach: the image written is removed
        other = make_image(tmp_path / "other.img")
        busy = vmms._start("busy", ["--incoming", "--disk", str(other)], [])
        failed = vmipc(
            "restore", "--socket", busy.socket, "--disk-from-snapshot", str(new), str(snap)
        )
        assert failed.returncode != 0 and "disk" in failed.stderr, failed.stderr
        assert not new.exists()
        restored = vmipc(
            "restore", "--socket", dst.socket, "--disk-from-snapshot", str(new), "--json", str(snap)
        )
        assert restored.returncode == 0, restored.stderr
        steps = [step["name"] for step in json.loads(restored.stdout)["timeline"]]
        assert "disk-from-snapshot" in steps and "attach-disk" in steps, steps
        wait_for(lambda: last_pass(dst.text()) >= reached + 3, 60, "three more passes")
        with dst.client() as client:
            client.pause()
        after = dst.text()
        check = check_disk_image(new.read_bytes(), BLOCKS)
        assert check.consistent_with(last_pass(before + after)), check
    _model_lines(before + after)


@pytest.mark.kvm
def test_a_read_only_disk_is_dumped_and_restored_read_only(tmp_path: Path) -> None:
    image = tmp_path / "ro.img"
    content = bytearray(DISK_SIZE + 512)  # a short last block: whole sectors only
    content[4096:8192] = BLOCK
    content[-512:] = b"\x01" * 512
    image.write_bytes(bytes(content))
    snap = tmp_path / "ro.snap"
    with vmm_processes() as vmms:
        src = vmms._start("src", ["--memory", "32M", "--disk", f"{image},readonly"], [])
        done = vmipc("checkpoint", "--socket", src.socket, "--with-disk", str(snap))
        assert done.returncode == 0, done.stderr
    out = tmp_path / "out.img"
    extracted = vmipc("snapshot", "extract-disk", str(snap), "-o", str(out), "--json")
    assert extracted.returncode == 0, extracted.stderr
    report = json.loads(extracted.stdout)
    assert report["readonly"] and report["data_bytes"] == 4096 + 512
    assert out.read_bytes() == bytes(content)
    again = vmipc("snapshot", "extract-disk", str(snap), "-o", str(out))
    assert again.returncode != 0 and "exists" in again.stderr.lower()
    with vmm_processes() as vmms:
        dst = vmms._start(
            "dst", ["--restore", str(snap), "--disk-from-snapshot", str(tmp_path / "ro2")], []
        )
        wait_for(lambda: dst.state() == "running", 30, "the restored VM")


@pytest.mark.kvm
def test_a_checkpoint_with_requests_in_flight_leaves_an_image_that_checks_whole(
    tmp_path: Path,
) -> None:
    """Without --with-disk: right after each checkpoint (left paused, so nothing writes
    meanwhile) the image read from outside has only whole blocks of the pass printed or
    the next; resumed, the workload continues exactly."""
    image = make_image(tmp_path / "disk.img")
    with vmm_processes() as vmms:
        src = _disk_vmm(vmms, "src", image, depth=8)
        wait_for(lambda: last_pass(src.text()) >= 1, 60, "pass 1")
        for n in range(4):
            time.sleep(0.01 + 0.013 * n)
            snap = tmp_path / f"s{n}"
            done = vmipc("checkpoint", "--socket", src.socket, "--leave-paused", str(snap))
            assert done.returncode == 0, done.stderr
            check = check_disk_image(image.read_bytes(), BLOCKS)
            assert check.consistent_with(last_pass(src.text())), check
            if n == 0:  # no disk section: nothing to write out, and no file is made
                out = tmp_path / "out.img"
                none = vmipc("snapshot", "extract-disk", str(snap), "-o", str(out))
                assert none.returncode == 1 and "missing" in none.stderr, none.stderr
                assert not out.exists()
            snap.unlink()
            with src.client() as client:
                client.resume()
        reached = last_pass(src.text())
        wait_for(lambda: last_pass(src.text()) >= reached + 2, 60, "two more passes")
        with src.client() as client:
            client.pause()
        _model_lines(src.text())


@pytest.mark.kvm
def test_kill_9_mid_workload_leaves_only_whole_blocks(tmp_path: Path) -> None:
    rng = random.Random(14)
    for n in range(3):
        image = make_image(tmp_path / f"disk{n}.img")
        with vmm_processes() as vmms:
            src = _disk_vmm(vmms, "src", image, depth=8, mode=1)
            wait_for(lambda: last_pass(src.text()) >= 1, 60, "pass 1")  # noqa: B023
            time.sleep(rng.uniform(0.0, 0.05))
            src.kill()
            printed = last_pass(src.text())
        check = check_disk_image(image.read_bytes(), BLOCKS)
        assert check.consistent_with(printed), check


@pytest.fixture(scope="module")
def with_disk_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real --with-disk snapshot of a guest mid-workload (taken once)."""
    tmp = tmp_path_factory.mktemp("disksnap")
    image = make_image(tmp / "disk.img")
    snap = tmp / "vm.snap"
    with vmm_processes() as vmms:
        src = _disk_vmm(vmms, "src", image, depth=8, mode=1)
        wait_for(lambda: last_pass(src.text()) >= 1, 60, "pass 1")
        done = vmipc("suspend", "--socket", src.socket, "--with-disk", str(snap))
        assert done.returncode == 0, done.stderr
    return snap


def _resealed(snap: Path, out: Path, change: Callable[[bytes], bytes]) -> Path:
    """``snap`` with its disk section replaced by ``change(section)``, sealed anew (every
    checksum right: only the section's contents are hostile)."""
    with open(snap, "rb") as handle:
        reader = SnapshotReader.from_file(handle)
        sections = [(e.name, e.version, reader.read_section(e.name)) for e in reader.entries]
    sections = [(n, v, change(d) if n == SECTION_DISK else d) for n, v, d in sections]
    header = SnapshotHeader(os.urandom(16), "test")
    out.write_bytes(build_snapshot(header, sections))
    return out


def _bad_size(data: bytes) -> bytes:
    return data[:16] + struct.pack("<Q", DISK_SIZE * 2) + data[24:]


def _overlap(data: bytes) -> bytes:
    first = _REC.unpack_from(data, 64)
    extra = _REC.pack(*first) + data[80 : 80 + first[1]]
    total = _REC.unpack_from(data, len(data) - 16)[1] + first[1]
    return data[:64] + extra + data[64:-16] + _REC.pack(END, total)


RESTORE_CASES: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("truncated", lambda d: d[:-16], "past the section"),
    ("overlapping", _overlap, "overlaps"),
    ("another disk size", _bad_size, "record has"),
    ("absurd size", lambda d: d[:16] + struct.pack("<Q", 1 << 62) + d[24:], "disk size"),
    ("out of range", lambda d: d[:64] + _REC.pack(DISK_SIZE, 512) + d[80:], "outside the disk"),
]


@pytest.mark.kvm
@pytest.mark.parametrize(
    ("change", "match"), [c[1:] for c in RESTORE_CASES], ids=[c[0] for c in RESTORE_CASES]
)
def test_hostile_disk_sections_are_refused_before_any_guest_runs(
    with_disk_snapshot: Path, tmp_path: Path, change: Callable[[bytes], bytes], match: str
) -> None:
    bad = _resealed(with_disk_snapshot, tmp_path / "bad.snap", change)
    new = tmp_path / "new.img"
    console = tmp_path / "console"
    refused = vmipc(
        "vmm", "--restore", str(bad), "--disk-from-snapshot", str(new),
        "--console", str(console), "--no-console-input",
    )  # fmt: skip
    assert refused.returncode == 1, refused.stderr
    assert match in refused.stderr and "section 'disk'" in refused.stderr, refused.stderr
    assert not new.exists()
    assert not console.exists() or console.read_bytes() == b""
    verified = vmipc("snapshot", "verify", str(bad))
    assert verified.returncode == 1 and match in verified.stderr, verified.stderr


@pytest.mark.kvm
def test_a_damaged_disk_section_leaves_no_image(with_disk_snapshot: Path, tmp_path: Path) -> None:
    """A flipped byte in the image data (the structure intact): the checksum refuses it as
    it is written out, and the new image is removed."""
    bad = tmp_path / "flipped.snap"
    data = bytearray(with_disk_snapshot.read_bytes())
    with open(with_disk_snapshot, "rb") as handle:
        entry = SnapshotReader.from_file(handle).entry(SECTION_DISK)
    data[entry.offset + 64 + 16 + 100] ^= 0xFF
    bad.write_bytes(bytes(data))
    new = tmp_path / "new.img"
    refused = vmipc("vmm", "--restore", str(bad), "--disk-from-snapshot", str(new))
    assert refused.returncode == 1 and "checksum mismatch" in refused.stderr, refused.stderr
    assert not new.exists()


@pytest.mark.kvm
def test_dump_disk_wants_a_paused_vm_with_a_disk(tmp_path: Path) -> None:
    """Running: invalid-state; no disk: no-disk, and checkpoint --with-disk fails with the
    VM running on and no file left."""
    image = make_image(tmp_path / "disk.img")
    out = tmp_path / "out"
    with vmm_processes() as vmms:
        with_disk = vmms._start("a", ["--memory", "32M", "--disk", str(image)], [])
        running = vmipc("call", "--socket", with_disk.socket, "dump-disk", f"--fd=out=+{out}")
        assert running.returncode != 0 and "invalid-state" in running.stderr, running.stderr
        without = vmms._start("b", ["--memory", "32M"], [])
        snap = tmp_path / "snap"
        done = vmipc("checkpoint", "--socket", without.socket, "--with-disk", str(snap))
        assert done.returncode == 1 and "no-disk" in done.stderr, done.stderr
        assert not snap.exists() and not list(tmp_path.glob(".snap.*"))
        assert without.state() == "running"


def test_the_dump_is_sparse_and_reports_progress(tmp_path: Path) -> None:
    """write_disk_section (the data plane of dump-disk): holes and all-zero blocks of the
    image are left out, what is stored reads back as the image, progress counts the disk
    gone through up to its size."""
    from vmipc.vmm.devices import DiskImage
    from vmipc.vmm.persist import Transfer, write_disk_section

    image = make_image(tmp_path / "disk.img", 4 * MIB)
    with open(image, "r+b") as handle:
        handle.seek(8192)
        handle.write(BLOCK + bytes(8192) + BLOCK)  # data, two written zero blocks, data
        handle.seek(3 * MIB)
        handle.write(b"\x07" * 1024)  # a quarter block
    seen: list[int] = []
    disk = DiskImage.open(str(image), readonly=False)
    out = os.open(tmp_path / "snap", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        entry, stats = write_disk_section(disk, out, Transfer(seen.append))
        data = os.pread(out, entry.length, entry.offset)
    finally:
        os.close(out)
        disk.close()
    assert entry.offset == 4096 and checksum(data) == entry.checksum
    assert stats.data_bytes == 3 * 4096 and stats.extents == 3
    assert _walk(data) == [(8192, 4096), (8192 + 3 * 4096, 4096), (3 * MIB, 4096)]
    assert seen[-1] == 4 * MIB and seen == sorted(seen)


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_any_damage_to_a_section_is_refused_or_yields_only_sane_extents(
    data: st.DataObject,
) -> None:
    good = bytearray(_section([(0, 4096, BLOCK), (8192, 512, BLOCK[:512])]))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(good) - 1))
        good[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, 40))
    try:
        extents = _walk(bytes(good), cut=cut)
    except SnapshotError:
        return
    previous = 0
    size = struct.unpack_from("<Q", good, 16)[0]
    for offset, length in extents:
        assert offset >= previous and length > 0 and offset + length <= size <= MAX_DISK_SIZE
        previous = offset + length


@pytest.mark.kvm
def test_live_and_incremental_checkpoints_take_the_disk_too(tmp_path: Path) -> None:
    """--with-disk in the other modes: the disk section follows the others (a live
    checkpoint's memory comes first; an increment's disk section is whole), every file
    verifies, and each disk written out checks whole."""
    image = make_image(tmp_path / "disk.img")
    with vmm_processes() as vmms:
        src = _disk_vmm(vmms, "src", image, depth=8, mode=1)
        wait_for(lambda: last_pass(src.text()) >= 1, 60, "pass 1")
        runs = {
            "live": ["--live", "--track"],
            "incr": ["--incremental", "--parent", str(tmp_path / "live")],
        }
        for name, options in runs.items():
            snap = tmp_path / name
            done = vmipc(
                "checkpoint", "--socket", src.socket, "--with-disk", "--json", *options, str(snap)
            )
            assert done.returncode == 0, done.stderr
            names = [s["name"] for s in json.loads(done.stdout)["sections"]]
            assert names[-1] == "disk" and names.count("disk") == 1, names
            assert vmipc("snapshot", "verify", str(snap)).returncode == 0
            out = tmp_path / f"{name}.img"
            assert vmipc("snapshot", "extract-disk", str(snap), "-o", str(out)).returncode == 0
            check = check_disk_image(out.read_bytes(), BLOCKS)
            assert not check.torn and check.passes, check
