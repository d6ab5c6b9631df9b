"""Hostile state blobs and snapshot state sections against real VMM processes: what they
cost the VMM in memory is bounded (VmHWM/VmRSS from /proc, ru_maxrss of a child)."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import re
import struct
import subprocess
import sys
import termios
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.seq_support import VmmProcess, vmm_processes
from tests.state_support import restorable_state, vcpu_record_v1, vcpu_state, with_v1_vcpus
from vmipc.formats import (
    MsgpackLimits,
    MsgpackRefused,
    SnapshotHeader,
    checksum,
    new_snapshot_id,
    unpack_bounded,
)
from vmipc.formats._bounded import measure
from vmipc.formats.snapshot import build_snapshot
from vmipc.kvm import structs
from vmipc.memory_layout import MAX_MEMORY
from vmipc.protocol import CommandError
from vmipc.vmm.devices import DEFAULT_RX_BACKLOG, Uart16550, VirtioBlkState
from vmipc.vmm.devices.virtio_blk import QUEUE_SIZE_MAX
from vmipc.vmm.machine import MAX_VCPUS, BootSource, MachineConfig, MachineState
from vmipc.vmm.persist import (
    MAX_STATE_SIZE,
    STATE_LIMITS,
    STATE_MAGIC,
    BulkError,
    decode_state,
    encode_state_blob,
    read_state_sections,
    state_sections,
)
from vmipc.vmm.state import (
    CPUID_ENTRY,
    MAX_CPUID_ENTRIES,
    MAX_MSRS,
    MSR_ENTRY,
    StateRecordError,
    VcpuState,
    VmState,
)

kvm = pytest.mark.kvm

MIB = 1 << 20
#: the reviewer's blob: 4 MiB (or the whole limit, if that is smaller)
HOSTILE_SIZE = min(4 * MIB, MAX_STATE_SIZE)


def status_kib(pid: int, key: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/<pid>/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def blob(payload: bytes) -> bytes:
    """A state blob with a correct header and checksum around ``payload``."""
    return struct.pack("<8sIQ", STATE_MAGIC, len(payload), checksum(payload)) + payload


def wide(size: int) -> bytes:
    """One array of ``size - 5`` empty arrays: a byte each on the wire, ~64 in Python."""
    return b"\xdd" + struct.pack(">I", size - 5) + b"\x90" * (size - 5)


def deep(size: int) -> bytes:
    """Arrays nested ``size - 1`` deep."""
    return b"\x91" * (size - 1) + b"\xc0"


def _tree(leaf: bytes, size: int) -> bytes:
    """``leaf`` repeated in arrays of 256 in arrays of 256 in one array: ``size`` bytes at
    most, no array longer than 256, nested 3 deep (plus the leaf's own)."""
    block = b"\xdc\x01\x00" + (b"\xdc\x01\x00" + leaf * 256) * 256
    count = min(256, max(1, (size - 3) // len(block)))
    return b"\xdc" + struct.pack(">H", count) + block * count


def within_container_limits(size: int) -> bytes:
    """Within every per-container limit, yet a 28-byte int object for nearly every byte
    (-32 is no cached small int): msgpack's own limits alone do not bound it."""
    per_leaf = max(1, (size - 774) // (256 * 256) - 3)
    return _tree(b"\xdc" + struct.pack(">H", per_leaf) + b"\xe0" * per_leaf, size)


def empty_maps(size: int) -> bytes:
    """Empty maps: about 70 bytes decoded for each byte."""
    return _tree(b"\x80", size)


def wide_ints(size: int) -> bytes:
    """uint64s: about 5 times their size decoded, within the budget, so msgpack decodes
    them; the record's shape check refuses them after."""
    return _tree(b"\xcf" + b"\xff" * 8, size)


SHAPES = {
    "wide": wide,
    "deep": deep,
    "within-container-limits": within_container_limits,
    "empty-maps": empty_maps,
    "wide-ints": wide_ints,
}


# --- the limits hold every legitimate state, and the cost estimate holds ----------------


def maximal_state() -> MachineState:
    """The biggest state a machine can have: every list as long as KVM takes, every int as
    wide as its field, the longest command line and path, a full UART backlog."""

    def raw(kind: type[ctypes.Structure]) -> bytes:
        return b"\xff" * ctypes.sizeof(kind)

    vcpus = tuple(
        vcpu_state(
            index,
            fill=0xFF,
            mp_state=0xFFFFFFFF,
            msrs=tuple((0xFFFFFFFF - i, (1 << 64) - 1 - i) for i in range(MAX_MSRS)),
            cpuid=tuple((0xFFFFFFFF - i,) * 7 for i in range(MAX_CPUID_ENTRIES)),
        )
        for index in range(MAX_VCPUS)
    )
    vm = VmState(
        pic_master=raw(structs.KvmIrqchip),
        pic_slave=raw(structs.KvmIrqchip),
        ioapic=raw(structs.KvmIrqchip),
        pit=raw(structs.KvmPitState2),
        clock=(1 << 64) - 1,
    )
    uart = Uart16550(lambda data: None)
    uart.feed_input(b"\xe9" * (DEFAULT_RX_BACKLOG + 64))
    options = tuple(("working-set", "\u20ac" * 70) for _ in range(255))
    boot = BootSource("multiboot", "/" * 4095, "\u20ac" * 20479, options)
    config = MachineConfig(MAX_MEMORY, MAX_VCPUS, boot)
    widest = VirtioBlkState(
        disk_sectors=(1 << 64) // 512 - 1,
        readonly=True,
        status=0xCF,
        device_features_sel=0xFFFFFFFF,
        driver_features_sel=0xFFFFFFFF,
        driver_features=0x1_0000_0266,
        queue_sel=0xFFFFFFFF,
        queue_num=QUEUE_SIZE_MAX,
        queue_ready=True,
        queue_desc=(1 << 64) - 1,
        queue_avail=(1 << 64) - 1,
        queue_used=(1 << 64) - 1,
        last_avail=0xFFFF,
        used_idx=0xFFFF,
        interrupt_status=3,
        config_generation=0xFFFFFFFF,
        disk_fingerprint=(1 << 64) - 1,
    )
    return MachineState(config, vcpus, vm, {"uart": uart.save(), "virtio-blk": widest})


def test_the_largest_legitimate_state_is_within_every_limit(tmp_path: Path) -> None:
    state = maximal_state()
    payload = encode_state_blob(state)[20:]
    assert len(payload) <= MAX_STATE_SIZE * 3 // 4  # a margin for fields to come
    assert measure(payload, STATE_LIMITS, 1 << 62) <= STATE_LIMITS.budget(len(payload)) * 3 // 4
    tracemalloc.start()
    try:
        decoded = decode_state(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoded == state
    # the records' own objects too (a vCPU's packed tables unpack into tuples of ints)
    assert peak <= STATE_LIMITS.max_decoded * 3 // 4
    sections = state_sections(state)
    path = tmp_path / "snap.vmipc"
    header = SnapshotHeader(new_snapshot_id(), "vmipc-test")
    path.write_bytes(build_snapshot(header, [*sections, ("memory", 1, bytes(64))]))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_state_sections(fd) == state
    finally:
        os.close(fd)


def test_records_longer_than_kvm_takes_are_refused() -> None:
    state = maximal_state()
    record = with_v1_vcpus(state.to_dict(), state.vcpus)
    assert decode_state(msgpack.packb(record)) == state  # version 1 is still read
    record["vcpus"][0]["msrs"].append([0, 0])
    with pytest.raises(BulkError, match="msrs: 256 entries"):
        decode_state(msgpack.packb(record))
    record["vcpus"][0]["msrs"].pop()
    record["vcpus"][0]["cpuid"][0] = [0] * 6
    with pytest.raises(BulkError, match="cpuid entry: 6 fields"):
        decode_state(msgpack.packb(record))
    record["vcpus"][0]["cpuid"][0] = [0] * 7
    record["vcpus"][0]["msrs"][0][1] = -1
    with pytest.raises(BulkError, match="msr value"):
        decode_state(msgpack.packb(record))
    # version 2: one more entry than KVM takes; CPUID's is beyond the decoder's bin limit
    record = state.to_dict()
    record["vcpus"][0]["msrs"] += MSR_ENTRY.pack(0, 0)
    with pytest.raises(BulkError, match=r"msrs: 256 entries, 1 \.\. 255 expected"):
        decode_state(msgpack.packb(record))
    record = state.to_dict()
    record["vcpus"][0]["cpuid"] += CPUID_ENTRY.pack(*[0] * 7)
    with pytest.raises(BulkError, match="a bin of 7196 \\(at most 7168\\)"):
        decode_state(msgpack.packb(record))


def test_vcpu_records_beyond_the_configuration_are_not_unpacked() -> None:
    """A vCPU record's 10 KB of packed tables become ~120 KB of tuples: a 2 MiB state of
    vCPU records with full tables for a 1-vCPU machine is refused before any is unpacked.
    Before: all 126 were unpacked first, a peak of 15 MiB."""
    full = maximal_state().vcpus[0].to_dict()
    record = restorable_state().to_dict()
    record["vcpus"] = [full] * 126
    payload = msgpack.packb(record)
    assert len(payload) <= MAX_STATE_SIZE
    estimate = measure(payload, STATE_LIMITS, STATE_LIMITS.budget(len(payload)))
    tracemalloc.start()
    try:
        with pytest.raises(BulkError, match="vcpu records do not match the configuration"):
            decode_state(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= estimate + MIB, f"decoding peaked at {peak >> 20} MiB"


#: a version-2 vCPU record's packed tables, replaced by what a hostile peer might send:
#: (field, value, what the one-line refusal says)
HOSTILE_TABLES: dict[str, tuple[str, Any, str]] = {
    "cpuid-not-whole-entries": ("cpuid", bytes(29), "cpuid: 29 bytes, not a whole number of 28"),
    "cpuid-one-byte-short": ("cpuid", bytes(27), "not a whole number of 28-byte entries"),
    "msrs-not-whole-entries": ("msrs", bytes(13), "msrs: 13 bytes, not a whole number of 12"),
    "msrs-as-16-byte-entries": (
        "msrs",
        bytes(16 * 2),
        "msrs: 32 bytes, not a whole number of 12-byte",
    ),
    "cpuid-too-many": ("cpuid", bytes(28 * 257), "a bin of 7196 \\(at most 7168\\)"),
    "cpuid-far-too-many": ("cpuid", bytes(7168 * 2), "a bin of 14336"),
    "msrs-too-many": ("msrs", bytes(12 * 256), "msrs: 256 entries, 1 .. 255 expected"),
    "cpuid-empty": ("cpuid", b"", "cpuid: 0 entries, 1 .. 256 expected"),
    "msrs-empty": ("msrs", b"", "msrs: 0 entries, 1 .. 255 expected"),
    "cpuid-version-1-shape": ("cpuid", [[0] * 7], "cpuid: bytes expected, not list"),
    "msrs-version-1-shape": ("msrs", [[0x10, 0]], "msrs: bytes expected, not list"),
    "cpuid-an-int": ("cpuid", 1 << 30, "cpuid: bytes expected, not int"),
    "msrs-an-int": ("msrs", 4096, "msrs: bytes expected, not int"),
    "cpuid-a-str": ("cpuid", "\0" * 28, "cpuid: bytes expected, not str"),
    "msrs-nil": ("msrs", None, "msrs: bytes expected, not NoneType"),
    "cpuid-a-map": ("cpuid", {"version": 1}, "cpuid: bytes expected, not dict"),
    "cpuid-missing": ("cpuid", KeyError, "malformed: 'cpuid'"),
}


@pytest.mark.parametrize("case", HOSTILE_TABLES)
def test_hostile_packed_tables_are_refused_in_one_line(case: str) -> None:
    """Before (a version-1 reader): every one of them, "vcpu record version 2 is not
    supported"; now each is refused for what is wrong with it, before any KVM call (the
    decode comes first, without a machine: tests/test_restore.py loads through a VMM)."""
    field, value, problem = HOSTILE_TABLES[case]
    state = restorable_state()
    record = state.to_dict()
    if value is KeyError:
        del record["vcpus"][0][field]
    else:
        record["vcpus"][0][field] = value
    with pytest.raises(BulkError, match=problem) as info:
        decode_state(msgpack.packb(record, use_bin_type=True))
    assert info.value.code == "bad-state"
    assert len(str(info.value)) < 200
    if value is not KeyError and not (isinstance(value, bytes) and len(value) > 7168):
        with pytest.raises(StateRecordError):
            VcpuState.from_dict(record["vcpus"][0])


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(["cpuid", "msrs"]), table=st.binary(max_size=8000))
def test_any_packed_table_is_decoded_exactly_or_refused(field: str, table: bytes) -> None:
    """Whatever bytes a table holds: the entries they are, or a StateRecordError."""
    entry, limit = (CPUID_ENTRY, MAX_CPUID_ENTRIES) if field == "cpuid" else (MSR_ENTRY, MAX_MSRS)
    record = {**restorable_state().vcpus[0].to_dict(), field: table}
    whole = len(table) % entry.size == 0 and 0 < len(table) // entry.size <= limit
    try:
        vcpu = VcpuState.from_dict(record)
    except StateRecordError as exc:
        assert not whole, exc
        assert len(str(exc)) < 200
    else:
        assert whole
        assert getattr(vcpu, field) == tuple(entry.iter_unpack(table))
        assert VcpuState.from_dict(vcpu.to_dict()) == vcpu


@settings(max_examples=100, deadline=None)
@given(
    cpuid=st.lists(
        st.tuples(*[st.integers(0, (1 << 32) - 1)] * 7), min_size=1, max_size=MAX_CPUID_ENTRIES
    ),
    msrs=st.lists(
        st.tuples(st.integers(0, (1 << 32) - 1), st.integers(0, (1 << 64) - 1)),
        min_size=1,
        max_size=MAX_MSRS,
    ),
)
def test_packed_tables_round_trip_and_version_1_reads_the_same(
    cpuid: list[tuple[int, ...]], msrs: list[tuple[int, int]]
) -> None:
    vcpu = vcpu_state(0, cpuid=tuple(cpuid), msrs=tuple(msrs))
    record = vcpu.to_dict()
    assert record["version"] == 2
    assert len(record["cpuid"]) == 28 * len(cpuid) and len(record["msrs"]) == 12 * len(msrs)
    assert VcpuState.from_dict(msgpack.unpackb(msgpack.packb(record))) == vcpu
    assert VcpuState.from_dict(msgpack.unpackb(msgpack.packb(vcpu_record_v1(vcpu)))) == vcpu


@pytest.mark.parametrize("version", [3, 0, None, "2", True])
def test_a_vcpu_record_of_another_version_is_refused_naming_the_versions_read(
    version: Any,
) -> None:
    record = {**restorable_state().vcpus[0].to_dict(), "version": version}
    with pytest.raises(
        StateRecordError,
        match=f"vcpu record version {version!r} is not supported \\(want 1 or 2\\)",
    ):
        VcpuState.from_dict(record)


def _array(items: list[bytes]) -> bytes:
    return b"\xdc" + struct.pack(">H", len(items)) + b"".join(items)


def _maps(keys: int) -> bytes:
    """Maps of ``keys`` of the records' keys (others are refused: see the next test)."""
    assert STATE_LIMITS.keys is not None
    names = sorted(STATE_LIMITS.keys)[:keys]
    one = bytes([0x80 | keys]) + b"".join(msgpack.packb(name) + b"\xe0" for name in names)
    return _array([_array([one] * 100)] * 20)


ALLOCATING: dict[str, Callable[[], bytes]] = {
    "empty-arrays": lambda: _array([_array([b"\x90"] * 256)] * 100),
    "empty-maps": lambda: _array([_array([b"\x80"] * 256)] * 100),
    "negative-fixints": lambda: _array([_array([b"\xe0"] * 256)] * 100),
    "uint64": lambda: _array([_array([msgpack.packb((1 << 64) - 1)] * 256)] * 100),
    "short-strings": lambda: _array([_array([msgpack.packb("ab")] * 256)] * 100),
    "wide-strings": lambda: _array([_array([msgpack.packb("a\u20ac")] * 256)] * 100),
    "short-bins": lambda: _array([_array([msgpack.packb(b"ab")] * 256)] * 100),
    "packed-table-bins": lambda: _array([_array([msgpack.packb(bytes(7168))] * 16)] * 8),
    **{f"maps-of-{n}": (lambda n=n: _maps(n)) for n in (1, 2, 3, 5, 6, 8, 11, 12, 15)},
}


@pytest.mark.parametrize("shape", ALLOCATING)
def test_the_cost_estimate_bounds_what_decoding_allocates(shape: str) -> None:
    data = ALLOCATING[shape]()
    generous = MsgpackLimits(
        256, 32, 1 << 16, 1 << 16, 8, STATE_LIMITS.keys, max_decoded=1 << 40, slack=1 << 40
    )
    estimate = measure(data, generous, 1 << 62)
    tracemalloc.start()
    try:
        value = unpack_bounded(data, generous)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del value
    assert peak <= estimate
    if estimate > STATE_LIMITS.budget(len(data)):
        with pytest.raises(MsgpackRefused, match="would decode into more than"):
            unpack_bounded(data, STATE_LIMITS)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\xdd\x00\x01\x00\x00", "an array of 65536"),
        (b"\x91" * 7 + b"\xc0", "nested deeper than 6"),
        (b"\xcb" + bytes(8), "float"),
        (b"\xd4\x01\x00", "ext"),
        (b"\x92\xc0", "truncated"),
        (b"\xc0\xc0", "1 bytes after"),
        (b"\xc6\xff\xff\xff\xff", "a bin of 4294967295"),
        (b"\x81\x90\xc0", "a map key that is not a string"),
        (b"\x81\xa3abc\xc0", "a map key that no record has"),  # would be interned
    ],
)
def test_malformed_records_are_refused_in_one_short_line(data: bytes, problem: str) -> None:
    with pytest.raises(MsgpackRefused, match=problem) as info:
        unpack_bounded(data, STATE_LIMITS)
    assert len(str(info.value)) < 200


# --- on real VMM processes -----------------------------------------------------------------


def refused(vmm: VmmProcess, data: bytes, tmp: Path) -> CommandError:
    path = tmp / "blob"
    path.write_bytes(data)
    with vmm.client(60) as client, open(path, "rb") as handle:
        with pytest.raises(CommandError) as info:
            client.load_state(in_=handle.fileno())
        assert client.query_status()["state"] == "incoming"
    return info.value


def reset_peak(pid: int) -> int:
    """Reset the process's VmHWM to its VmRSS (Linux 4.0+); return that RSS in KiB."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return status_kib(pid, "VmRSS")


@kvm
def test_hostile_state_blobs_cost_the_vmm_a_small_multiple_of_their_size(tmp_path: Path) -> None:
    """Before: the 4 MiB ``wide`` blob took the VMM's peak from ~31 to ~330 MiB."""
    # the blob read (a few copies at most), plus what the decoder may spend on objects
    bound = 4 * HOSTILE_SIZE + STATE_LIMITS.budget(HOSTILE_SIZE)
    with vmm_processes() as vmms:
        vmm = vmms.incoming(memory=None)
        # warm up: the worker thread and the code paths of a refused load-state
        refused(vmm, blob(b"\x80"), tmp_path)
        for name, shape in SHAPES.items():
            payload = shape(HOSTILE_SIZE)
            assert len(payload) <= MAX_STATE_SIZE
            before = reset_peak(vmm.pid)
            error = refused(vmm, blob(payload), tmp_path)
            grown = (status_kib(vmm.pid, "VmHWM") - before) * 1024
            assert error.code == "bad-state", error
            assert len(error.message) < 500
            assert grown <= bound, f"{name}: the VMM's peak grew by {grown >> 20} MiB"
            assert vmm.alive()


@kvm
def test_load_state_refuses_hostile_vcpu_tables_and_the_vmm_stays_incoming(
    tmp_path: Path,
) -> None:
    """Through a real VMM: each is refused (bad-state, one line naming the field) while
    the blob is decoded, before the machine is touched; the VMM stays incoming."""
    cases = ["cpuid-not-whole-entries", "msrs-too-many", "cpuid-empty", "msrs-an-int"]
    state = restorable_state(memory_size=64 * MIB, vcpus=2)
    with vmm_processes() as vmms:
        vmm = vmms.incoming()
        for case in cases:
            field, value, problem = HOSTILE_TABLES[case]
            record = state.to_dict()
            record["vcpus"][1][field] = value
            error = refused(vmm, blob(msgpack.packb(record)), tmp_path)
            assert error.code == "bad-state", error
            assert re.search(problem, error.message), (case, error.message)
            assert len(error.message) < 200
        assert vmm.alive() and vmm.state() == "incoming"


@contextlib.contextmanager
def stalled_sender(vmm: VmmProcess, announced: int) -> Iterator[None]:
    """A load-state whose 20-byte header announces ``announced`` bytes that never come."""
    read_end, write_end = os.pipe()
    result: dict[str, BaseException | None] = {}

    def load() -> None:
        try:
            with vmm.client(60) as client:
                client.load_state(in_=read_end)
            result["error"] = None
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=load)
    try:
        os.write(write_end, struct.pack("<8sIQ", STATE_MAGIC, announced, 0))
        thread.start()
        deadline = time.monotonic() + 30
        # the VMM has read the header once the pipe is empty
        while struct.unpack("i", fcntl.ioctl(write_end, termios.FIONREAD, b"\0" * 4))[0]:
            assert time.monotonic() < deadline, "the VMM never read the header"
            time.sleep(0.01)
        time.sleep(0.3)  # and has done whatever it does with it
        yield
    finally:
        os.close(write_end)  # the load ends (truncated)
        thread.join(60)
        os.close(read_end)
    assert isinstance(result.get("error"), CommandError), result


@kvm
def test_a_stalled_state_header_allocates_nothing_ahead_of_its_bytes() -> None:
    """Before: RSS grew by the 64 MiB the header announced while the sender stalled."""
    with vmm_processes() as vmms:
        vmm = vmms.incoming(memory=None)
        with stalled_sender(vmm, 16):  # warm up the worker thread and the read path
            pass
        before = status_kib(vmm.pid, "VmRSS")
        with stalled_sender(vmm, MAX_STATE_SIZE):
            grown = (status_kib(vmm.pid, "VmRSS") - before) * 1024
        assert grown < 1 * MIB, f"RSS grew by {grown} bytes with no payload sent"
        assert vmm.state() == "incoming"


def restore_peak(path: Path) -> tuple[int, subprocess.CompletedProcess[str]]:
    """``vmipc vmm --restore path`` in a child of a child; its peak RSS in bytes."""
    measure = (
        "import resource, subprocess, sys\n"
        "done = subprocess.run(sys.argv[1:], stdin=subprocess.DEVNULL)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(done.returncode)\n"
    )
    argv = [sys.executable, "-c", measure, sys.executable, "-m", "vmipc", "vmm"]
    argv += ["--restore", str(path), "--no-console-input"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    return int(done.stdout.split()[-1]) * 1024, done


def snapshot_with_config(path: Path, config: bytes) -> None:
    """A complete snapshot file whose config section is ``config`` (the rest is filler)."""
    header = SnapshotHeader(new_snapshot_id(), "vmipc-test")
    sections = [("config", 1, config), ("vcpus", 1, b"\x80"), ("devices", 1, b"\x80")]
    path.write_bytes(build_snapshot(header, [*sections, ("memory", 1, bytes(64))]))


@kvm
def test_a_hostile_config_section_costs_vmm_restore_little(tmp_path: Path) -> None:
    """Before: a 4 MiB config section of empty arrays made ``vmm --restore`` peak at 331 MB."""
    small = tmp_path / "small.vmipc"
    snapshot_with_config(small, b"\x80")
    baseline, done = restore_peak(small)
    assert done.returncode == 1, done.stderr
    hostile = tmp_path / "hostile.vmipc"
    snapshot_with_config(hostile, wide(HOSTILE_SIZE))
    peak, done = restore_peak(hostile)
    assert done.returncode == 1, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    grown = peak - baseline
    assert grown <= 4 * HOSTILE_SIZE, f"vmm --restore peaked {grown >> 20} MiB above baseline"
