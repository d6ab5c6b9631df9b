"""The state codec: a machine's non-RAM state as a self-delimiting blob (dump-state and
load-state through pipes and sockets, protocol/state-blob.md) and as the config, vcpus and
devices sections of a snapshot file, decoded within bounds (a hostile blob cannot make the
VMM allocate more than a small multiple of its size).
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
from typing import Any

import msgpack  # type: ignore[import-untyped]

from vmipc.formats import (
    DecodeBudget,
    FormatError,
    MsgpackLimits,
    MsgpackRefused,
    SectionEntry,
    SnapshotReader,
    checksum,
    section_entry,
    section_offset,
    unpack_bounded,
)
from vmipc.formats.snapshot import SECTION_CONFIG, SECTION_DEVICES, SECTION_VCPUS
from vmipc.kvm.structs import KvmXsave
from vmipc.vmm.devices import DEFAULT_RX_BACKLOG
from vmipc.vmm.machine import MAX_VCPUS, MachineConfig, MachineState
from vmipc.vmm.persist.errors import BulkError
from vmipc.vmm.persist.transfer import PeerClosed, Transfer
from vmipc.vmm.state import (
    CPUID_ENTRY,
    MAX_CPUID_ENTRIES,
    MAX_MSRS,
    MSR_ENTRY,
    STATE_RECORD_KEYS,
)

STATE_MAGIC = b"VMIPCST1"
_STATE_HEADER = struct.Struct("<8sIQ")  # magic, payload length, xxh3_64 of the payload
#: A maximal state is about 1.2 MB: 64 vCPUs with 256 CPUID entries, 255 MSRs and 6 KiB of
#: kernel structs each, and a 60 KiB command line (tests/test_state_limits.py builds it;
#: 1.37 MB with version-1 vCPU records, whose tables were arrays).
MAX_STATE_SIZE = 2 << 20
#: What a state record can hold (vmm/state.py, vmm/machine.py, vmm/devices/uart.py), so
#: that no blob decodes into more than a small multiple of its size.
STATE_LIMITS = MsgpackLimits(
    # CPUID entries and MSRs (fewer than 256) of a version-1 vCPU record, vCPUs (64), guest
    # options
    max_array_len=max(MAX_CPUID_ENTRIES, MAX_MSRS + 1, MAX_VCPUS),
    # the largest record, virtio-blk's, has 18 keys
    max_map_len=32,
    # the multiboot command line (under 60 KiB), a path (PATH_MAX)
    max_str_len=64 << 10,
    # the largest kernel struct (XSAVE), the UART's input backlog, a vCPU's packed CPUID
    # (7 KiB: 256 entries of 28 bytes) and MSRs (255 of 12 bytes)
    max_bin_len=max(
        ctypes.sizeof(KvmXsave),
        DEFAULT_RX_BACKLOG,
        MAX_CPUID_ENTRIES * CPUID_ENTRY.size,
        MAX_MSRS * MSR_ENTRY.size,
    ),
    # state > vcpus > vcpu > cpuid > entry in a version-1 vCPU record (version 2 stops at
    # vcpu; state > config > boot > guest_options > option is as deep)
    max_depth=6,
    # the records' fields (each record's to_dict uses its field names), their versions,
    # and the names of the user devices
    keys=STATE_RECORD_KEYS,
    # a maximal state decodes into about 2 MB of msgpack objects (estimated; 11 MB with
    # version-1 vCPU records), and its records into about 9 MB (the vCPUs' tables as
    # tuples of ints: from_dict counts the vCPU records before it unpacks any)
    max_decoded=16 << 20,
)
#: the payload is read in pieces of this size: memory follows the bytes that arrived, not
#: the length the header announces
_STATE_READ = 64 << 10
#: what a growing payload buffer is extended with (no allocation per growth)
_GROW_ZEROS = memoryview(bytes(MAX_STATE_SIZE // 2))


def encode_state_blob(state: MachineState) -> bytes:
    """The self-delimiting state blob dump-state writes to pipes and sockets."""
    payload: bytes = msgpack.packb(state.to_dict(), use_bin_type=True)
    return _STATE_HEADER.pack(STATE_MAGIC, len(payload), checksum(payload)) + payload


#: bytes of a state blob's header (magic, payload length, checksum)
STATE_HEADER_SIZE = _STATE_HEADER.size


def state_blob_header(header: bytes | bytearray) -> tuple[int, int]:
    """The payload length and checksum a state blob's header announces; BulkError if the
    header is not one, or announces more than a state can be (nothing is allocated from
    the length: readers grow their buffer as the bytes arrive)."""
    magic, length, stored = _STATE_HEADER.unpack(header)
    if magic != STATE_MAGIC:
        raise BulkError("bad-state", f"not a vmipc state blob (magic {bytes(magic)!r})")
    if length > MAX_STATE_SIZE:
        raise BulkError("bad-state", f"state blob claims {length} bytes (limit {MAX_STATE_SIZE})")
    return length, stored


def state_from_payload(payload: bytes | bytearray, stored: int) -> MachineState:
    """The state a blob's whole payload holds, checked against the header's checksum."""
    if checksum(payload) != stored:
        raise BulkError("bad-state", "state blob checksum mismatch (corrupt)")
    return decode_state(payload)


def truncated_header(exc: BaseException | str) -> BulkError:
    return BulkError("bad-state", f"state blob truncated in its header: {exc}")


def truncated_payload(missing: int) -> BulkError:
    return BulkError("bad-state", f"state blob truncated: the input ended {missing} bytes early")


def read_state_blob(fd: int, transfer: Transfer) -> MachineState:
    header = bytearray(STATE_HEADER_SIZE)
    try:
        transfer.readinto(fd, memoryview(header))
    except PeerClosed as exc:
        raise truncated_header(exc) from None
    length, stored = state_blob_header(header)
    payload = bytearray()
    got = 0
    while got < length:
        # Read straight into the payload's own buffer, grown as bytes arrive (to at most
        # twice what arrived, never to the length the header announces), never past the
        # blob's end (the fd may carry more after it).
        if got == len(payload):
            grow = min(length - got, max(_STATE_READ, got))
            payload[got:] = _GROW_ZEROS[:grow]
        with memoryview(payload) as view:
            moved = transfer.read_into(fd, view[got:])
        if not moved:
            raise truncated_payload(length - got)
        got += moved
    return state_from_payload(payload, stored)


def decode_state(payload: bytes | bytearray) -> MachineState:
    try:
        return _state_from_record(unpack_bounded(payload, STATE_LIMITS))
    except MsgpackRefused as exc:
        raise BulkError("bad-state", f"state record refused: {exc}") from None


def _state_from_record(record: Any) -> MachineState:
    try:
        return MachineState.from_dict(record)
    except (ValueError, TypeError, KeyError) as exc:
        raise BulkError("bad-state", f"state record refused: {exc}") from None


def state_sections(state: MachineState) -> list[tuple[str, int, bytes]]:
    """The snapshot sections that hold the non-RAM state: (name, version, bytes)."""
    record = state.to_dict()
    return [
        (SECTION_CONFIG, MachineConfig.VERSION, msgpack.packb(record["config"])),
        (SECTION_VCPUS, 1, msgpack.packb({"version": record["version"], "vcpus": record["vcpus"]})),
        (SECTION_DEVICES, 1, msgpack.packb({"vm": record["vm"], "devices": record["devices"]})),
    ]


def write_state_sections(state: MachineState, fd: int, transfer: Transfer) -> list[SectionEntry]:
    entries = []
    for name, version, data in state_sections(state):
        offset = section_offset(os.fstat(fd).st_size)
        transfer.write_at(fd, data, offset)
        entries.append(section_entry(name, version, offset, data))
    return entries


def read_state_sections(fd: int) -> MachineState:
    """The state in the config, vcpus and devices sections of snapshot file ``fd``: together
    no bigger than a state blob may be, and decoded within one budget."""
    names = (SECTION_CONFIG, SECTION_VCPUS, SECTION_DEVICES)
    try:
        reader = SnapshotReader(
            functools.partial(os.pread, fd), os.fstat(fd).st_size, max_read=MAX_STATE_SIZE
        )
        size = sum(reader.entry(name).length for name in names)
        if size > MAX_STATE_SIZE:
            raise BulkError(
                "bad-snapshot",
                f"the state sections hold {size} bytes (a machine's state is at most "
                f"{MAX_STATE_SIZE})",
            )
        budget = DecodeBudget(STATE_LIMITS.budget(size))
        parts = []
        for name in names:
            data = reader.read_section(name)
            try:
                parts.append(unpack_bounded(data, STATE_LIMITS, budget))
            except MsgpackRefused as exc:
                raise BulkError("bad-snapshot", f"section '{name}': {exc}") from None
    except FormatError as exc:
        raise BulkError("bad-snapshot", str(exc)) from None
    config, vcpus, devices = parts
    try:
        record = {
            "version": vcpus["version"],
            "config": config,
            "vcpus": vcpus["vcpus"],
            "vm": devices["vm"],
            "devices": devices["devices"],
        }
    except (KeyError, TypeError) as exc:
        raise BulkError("bad-snapshot", f"state sections lack {exc}") from None
    return _state_from_record(record)
