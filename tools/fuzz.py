#!/usr/bin/env python3
"""Fuzz the parsers a hostile peer can reach: a time-bounded, coverage-guided campaign.

Targets (what an attacker controls -> the code that parses it):

* ``server``   -- control-socket bytes and passed fds -> ``ServerProtocol`` (framing,
  msgpack, message shapes, argument and fd validation), answered as the server does.
  Checked: it never raises, and every fd handed to it comes back exactly once (to a
  request, or to be closed): no fd leak.
* ``client``   -- a server's bytes -> ``ClientProtocol``; may raise ``ProtocolError``.
* ``pagestream`` -- a page stream (``load-memory``, ``apply-pages``) ->
  ``PageStreamDecoder``; may raise ``PageStreamError``. Checked: after NEED_DATA fewer than
  ``MAX_HEADER_LENGTH`` bytes stay buffered; data runs are at most ``max_chunk`` bytes and
  inside the layout.
* ``snapshot`` -- a snapshot file (``vmipc vmm --restore``, ``load-memory``/``load-state``
  with ``format: snapshot``) -> ``SnapshotReader`` and the VMM's state-section decoder;
  may raise ``SnapshotError`` / ``BulkError``.
* ``sealed-snapshot`` -- the same with valid checksums: the input is cut into the
  sections' contents and sealed into a well-formed file first (checksums are no defence
  against an attacker, who can compute them), so the state decoders are reached.
* ``state`` -- a state blob's payload (``load-state``) -> ``decode_state``; may raise
  ``BulkError``.

Every execution also checks memory: the peak traced allocation stays under
``--max-peak-mib`` (plus eight times the input), so no length field can make a parser
allocate what the input does not hold. The campaign checks the process's open fds
before and after.

Engines: ``builtin`` (default; no dependency) mutates a corpus seeded with valid inputs
and keeps an input when it reaches new line-to-line edges in vmipc's code (``sys.settrace``
coverage), which is slow per execution but finds deep paths; ``atheris`` (libFuzzer,
``pip install atheris``) is used with ``--engine atheris`` when installed.

    python tools/fuzz.py --seconds 600                 # every target, 10 minutes in all
    python tools/fuzz.py --target state --seconds 60 --crashes /tmp/crashes
    python tools/fuzz.py --engine atheris --target server --seconds 300

Exit status: 0 when nothing but documented errors came out, 1 on a crash (each crashing
input is printed, and saved under ``--crashes`` when given).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import struct
import sys
import time
import traceback
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

if __package__ in (None, ""):  # run as a script from a checkout: use its sources
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import msgpack  # type: ignore[import-untyped, unused-ignore]

from vmipc.formats import (
    NEED_DATA,
    DataRun,
    PageStreamDecoder,
    PageStreamEncoder,
    PageStreamError,
    SnapshotError,
    SnapshotHeader,
    SnapshotReader,
)
from vmipc.formats import snapshot as sn
from vmipc.formats.pagestream import MAX_HEADER_LENGTH
from vmipc.protocol import (
    ClientProtocol,
    ConnectionBroken,
    ErrorCode,
    ErrorInfo,
    Limits,
    ProtocolError,
    RequestReceived,
    RequestRejected,
    ServerProtocol,
    encode_frame,
    load_schema,
    pack,
)
from vmipc.vmm.persist import (
    BulkError,
    decode_state,
    encode_state_blob,
    read_state_sections,
)

_SCHEMA = load_schema()
_PAGE = 4096


class InvariantBroken(AssertionError):
    """The code under test returned normally but broke one of its promises."""


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise InvariantBroken(what)


def _plan(data: bytes) -> tuple[random.Random, bytes]:
    """The first four bytes seed the choices (chunk sizes, options); the rest is the input."""
    seed = int.from_bytes(data[:4].ljust(4, b"\0"), "little")
    return random.Random(seed), data[4:]


def _chunks(rng: random.Random, data: bytes) -> Iterator[bytes]:
    """``data`` in pieces of random sizes: at most 64 pieces, then the rest at once."""
    position = 0
    biggest = rng.choice((1, 7, 64, 4096, 1 << 20))
    for _ in range(64):
        if position >= len(data):
            return
        size = rng.randint(1, biggest)
        yield data[position : position + size]
        position += size
    if position < len(data):
        yield data[position:]


# --- targets ---------------------------------------------------------------------------------


def run_server(data: bytes, limits: Limits | None = None) -> None:
    rng, data = _plan(data)
    limits = limits or Limits(max_frame_size=1 << 16, max_fds_per_request=4, max_in_flight=4)
    proto = ServerProtocol(_SCHEMA, limits)
    next_fd = 1000
    given: list[int] = []
    returned: list[int] = []
    broken = False
    for chunk in _chunks(rng, data):
        count = rng.choice((0, 0, 0, 1, 2, 5))
        fds = list(range(next_fd, next_fd + count))
        next_fd += count
        given.extend(fds)
        events = proto.receive_data(chunk, fds, fds_truncated=rng.random() < 0.05)
        returned.extend(proto.take_discarded_fds())
        for event in events:
            if isinstance(event, RequestReceived):
                returned.extend(event.fds.values())
                error = ErrorInfo(ErrorCode.INTERNAL_ERROR, "fuzz")
                frame = proto.send_error(event.request.id, error)
                _check(len(frame) <= limits.max_frame_size + 4, "reply over the frame limit")
            elif isinstance(event, RequestRejected):
                proto.send_error(event.request_id, event.error)
            elif isinstance(event, ConnectionBroken):
                if event.error is not None:
                    proto.send_connection_error(event.error)
                broken = True
        if broken:
            break
    if not broken and rng.random() < 0.5:
        proto.receive_eof()
    returned.extend(proto.release_fds())
    _check(sorted(returned) == given, f"fds given {given}, returned {sorted(returned)}")


def run_client(data: bytes) -> None:
    rng, data = _plan(data)
    proto = ClientProtocol(max_frame_size=1 << 16)
    for command, args in (
        ("hello", {"versions": [1]}),
        ("query-status", {}),
        ("pause", {}),
    ):
        proto.send_request(command, args)
    for chunk in _chunks(rng, data):
        proto.receive_data(chunk)


_STREAM_LAYOUT = ((0, 64 * _PAGE), (1 << 32, 16 * _PAGE))


def run_pagestream(data: bytes) -> None:
    rng, data = _plan(data)
    max_chunk = rng.choice((100, _PAGE, 1 << 20))
    layout = _STREAM_LAYOUT if rng.random() < 0.5 else None
    # a receiver that takes streams whose pages are not hashed (1.1, apply-pages
    # accept_unhashed): every other check must hold for those as for any
    accept = rng.random() < 0.5
    decoder = PageStreamDecoder(max_chunk=max_chunk, expect_layout=layout, accept_unhashed=accept)
    if rng.random() < 0.5:
        _receive_in_place(decoder, rng, data)
        return
    ranges: tuple[tuple[int, int], ...] | None = layout
    for chunk in [*_chunks(rng, data), b""]:
        decoder.feed(chunk)
        while True:
            event = decoder.next_event()
            if event is NEED_DATA:
                _check(decoder.buffered < MAX_HEADER_LENGTH, f"{decoder.buffered} bytes buffered")
                break
            if decoder.header is not None and ranges is None:
                ranges = decoder.header.layout
            if isinstance(event, DataRun):
                _check(0 < len(event.data) <= max_chunk, f"a data chunk of {len(event.data)}")
                _check_inside(decoder, event.gpa, len(event.data))
            if decoder.ended:
                return


def _check_inside(decoder: PageStreamDecoder, gpa: int, length: int) -> None:
    assert decoder.header is not None
    _check(
        any(s <= gpa and gpa + length <= s + n for s, n in decoder.header.layout),
        f"data at {gpa:#x}+{length} outside RAM",
    )


def _receive_in_place(decoder: PageStreamDecoder, rng: random.Random, data: bytes) -> None:
    """The VMM's receiver (vmm/persist/dataplane.py receive_page_stream): a data run's
    payload handed over with ``feed_payload`` as if read into place, everything else fed
    no more than the decoder still wants (reads of random sizes). Checked besides: a
    payload piece lies inside RAM, and no read goes past the end of the stream."""
    position = 0
    biggest = rng.choice((1, 7, 64, 4096, 1 << 20))
    while not decoder.ended:
        left = decoder.payload_left
        if left and not decoder.buffered and position < len(data):
            size = min(left, rng.randint(1, biggest), len(data) - position)
            _check_inside(decoder, decoder.payload_gpa, size)
            decoder.feed_payload(data[position : position + size])
            position += size
            continue
        event = decoder.next_event()
        if event is NEED_DATA:
            _check(decoder.buffered < MAX_HEADER_LENGTH, f"{decoder.buffered} bytes buffered")
            size = min(decoder.wanted, rng.randint(1, biggest))
            _check(size >= 1, "NEED_DATA with nothing wanted")
            decoder.feed(data[position : position + size])  # b"" once the input ends
            position += size
        elif isinstance(event, DataRun):
            _check_inside(decoder, event.gpa, len(event.data))
    # every byte read went into the stream: nothing after its end was taken from the fd
    _check(
        not decoder.buffered and decoder.offset == min(position, len(data)),
        f"read {min(position, len(data))} bytes, the stream has {decoder.offset}",
    )


_SNAPSHOT_ALLOWED = (SnapshotError, BulkError)


def _read_snapshot(image: bytes) -> None:
    """What ``vmipc vmm --restore`` and ``load-state``/``load-memory`` (format: snapshot) do
    with a snapshot file before trusting it."""

    def pread(size: int, offset: int) -> bytes:
        return image[offset : offset + size]

    reader = SnapshotReader(pread, len(image), max_read=1 << 20)
    names = reader.names
    with contextlib.suppress(SnapshotError):
        reader.check_complete()
    if "memory" in names:
        with contextlib.suppress(SnapshotError):
            reader.memory()
    for entry in reader.entries:
        if entry.length <= reader.max_read:
            with contextlib.suppress(SnapshotError):
                reader.read_section(entry.name)
    with contextlib.suppress(SnapshotError):
        reader.verify()
    fd = os.memfd_create("fuzz-snapshot", os.MFD_CLOEXEC)
    try:
        os.write(fd, image)
        read_state_sections(fd)
    finally:
        os.close(fd)


def run_snapshot(data: bytes) -> None:
    _read_snapshot(data)


def run_sealed_snapshot(data: bytes) -> None:
    rng, data = _plan(data)
    cuts = sorted(rng.randint(0, len(data)) for _ in range(3))
    parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    names = ["config", "vcpus", "devices", "memory"]
    versions = [1, 1, 1, 1]
    if rng.random() < 0.1:
        rng.shuffle(names)
    if rng.random() < 0.1:
        versions[rng.randrange(4)] = rng.choice((0, 2, 255))
    sections = list(zip(names, versions, parts, strict=True))
    header = SnapshotHeader(bytes(range(1, 17)), "fuzz", created_ns=0)
    _read_snapshot(sn.build_snapshot(header, sections))


def run_state(data: bytes) -> None:
    decode_state(data)


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    #: what the code under test may raise on bad input (documented, one-line errors)
    allowed: tuple[type[BaseException], ...]
    seeds: Callable[[], list[bytes]]


def _seed_prefix(value: int) -> bytes:
    return value.to_bytes(4, "little")


def _server_seeds() -> list[bytes]:
    def request(rid: int, command: str, args: dict[str, Any], fds: list[str] = ()) -> bytes:  # type: ignore[assignment]
        message: dict[str, Any] = {"type": "request", "id": rid, "command": command, "args": args}
        if fds:
            message["fds"] = list(fds)
        return encode_frame(pack(message))

    hello = request(1, "hello", {"versions": [1], "client": "fuzz"})
    conversation = hello + b"".join(
        [
            request(2, "query-status", {}),
            request(3, "dump-memory", {"format": "raw"}, ["out"]),
            request(4, "load-state", {}, ["in"]),
            request(5, "subscribe", {"events": ["state-change", "progress"]}),
            request(6, "cancel", {"request": 3}),
            request(7, "pause", {"bogus": 1}),
            request(8, "quit", {}),
        ]
    )
    return [_seed_prefix(s) + conversation for s in (0, 1, 2, 3)] + [_seed_prefix(9) + hello]


def _client_seeds() -> list[bytes]:
    def frame(message: dict[str, Any]) -> bytes:
        return encode_frame(pack(message))

    replies = frame({"type": "result", "id": 1, "result": {"protocol": "1.2"}})
    replies += frame({"type": "error", "id": 2, "error": {"code": "x", "message": "m"}})
    replies += frame({"type": "event", "event": "state-change", "time": 1.0, "data": {}})
    return [_seed_prefix(1) + replies]


def _stream_seed(hashed: bool = True) -> bytes:
    encoder = PageStreamEncoder(_STREAM_LAYOUT, hash_payload=hashed)
    out = bytearray(encoder.header())
    out += encoder.data(0, 2)
    payload = bytes(range(256)) * 32
    encoder.payload(payload)
    out += payload
    out += encoder.zero(4 * _PAGE, 3)
    out += encoder.end_round()
    out += encoder.data(1 << 32, 1)
    encoder.payload(payload[:_PAGE])
    out += payload[:_PAGE]
    out += encoder.end_round()
    out += encoder.end_stream()
    return bytes(out)


def _pagestream_seeds() -> list[bytes]:
    stream, unhashed = _stream_seed(), _stream_seed(hashed=False)
    return [_seed_prefix(s) + stream for s in (0, 1, 2, 3, 4)] + [
        _seed_prefix(s) + unhashed for s in (0, 1, 2, 3, 4)
    ]


def synthetic_state(vcpus: int = 1) -> Any:
    """A MachineState with well-formed records (zeroed kernel structs), built without KVM."""
    import ctypes

    from vmipc.kvm import structs
    from vmipc.vmm.devices import Uart16550, VirtioBlk
    from vmipc.vmm.machine import BootSource, MachineConfig, MachineState
    from vmipc.vmm.state import VcpuState, VmState

    def zeros(kind: Any) -> bytes:
        return bytes(ctypes.sizeof(kind))

    vcpu_records = tuple(
        VcpuState(
            vcpu_id=i,
            mp_state=0,
            regs=zeros(structs.KvmRegs),
            sregs=zeros(structs.KvmSregs),
            xsave=zeros(structs.KvmXsave),
            xcrs=zeros(structs.KvmXcrs),
            debugregs=zeros(structs.KvmDebugregs),
            lapic=zeros(structs.KvmLapicState),
            msrs=((0x10, 1), (0x6E0, 0)),
            vcpu_events=zeros(structs.KvmVcpuEvents),
            cpuid=((0, 0, 0, 1, 2, 3, 4),),
        )
        for i in range(vcpus)
    )
    irqchip = zeros(structs.KvmIrqchip)
    vm = VmState(irqchip, irqchip, irqchip, zeros(structs.KvmPitState2), 12345)
    uart = Uart16550(lambda data: None, lambda level: None).save()
    config = MachineConfig(64 << 20, vcpus, BootSource("none"))
    devices = {"uart": uart, "virtio-blk": VirtioBlk.empty_state()}
    return MachineState(config, vcpu_records, vm, devices)


def _state_payload() -> bytes:
    blob = encode_state_blob(synthetic_state())
    return blob[20:]  # after the 20-byte header: the msgpack payload


def _state_seeds() -> list[bytes]:
    """The state of a 2-vCPU machine as written (vCPU records of version 2: CPUID and MSRs
    packed as bin), with version-1 vCPU records (as arrays, as older VMMs wrote them), and
    with maps and arrays in odd places."""
    payload = encode_state_blob(synthetic_state(vcpus=2))[20:]
    record = msgpack.unpackb(payload, raw=False)
    version_1 = dict(record, vcpus=[_vcpu_record_v1(vcpu) for vcpu in record["vcpus"]])
    odd = dict(record, config=[1, 2], vcpus={"a": 1})
    return [
        payload,
        msgpack.packb(version_1, use_bin_type=True),
        msgpack.packb(odd, use_bin_type=True),
        msgpack.packb([record]),
    ]


def _vcpu_record_v1(record: dict[str, Any]) -> dict[str, Any]:
    """A version-2 vCPU record as version 1 wrote it: the packed tables as arrays."""
    cpuid = [list(entry) for entry in struct.iter_unpack("<7I", record["cpuid"])]
    msrs = [list(pair) for pair in struct.iter_unpack("<IQ", record["msrs"])]
    return dict(record, version=1, cpuid=cpuid, msrs=msrs)


def _snapshot_image() -> bytes:
    from vmipc.vmm.persist import state_sections

    sections = state_sections(synthetic_state())
    regions = ((0, 16 * _PAGE, 0),)
    memory = sn.encode_memory_section(regions, bytes(16 * _PAGE))
    header = SnapshotHeader(bytes(range(16)), "fuzz", created_ns=0)
    return sn.build_snapshot(header, [*sections, ("memory", 1, memory)])


def _snapshot_seeds() -> list[bytes]:
    return [_snapshot_image()]


def _sealed_seeds() -> list[bytes]:
    from vmipc.vmm.persist import state_sections

    parts = [data for _, _, data in state_sections(synthetic_state())]
    regions = ((0, 16 * _PAGE, 0),)
    memory = sn.encode_memory_section(regions, bytes(16 * _PAGE))
    return [_seed_prefix(0) + b"".join([*parts, memory])]


TARGETS = {
    t.name: t
    for t in (
        Target("server", run_server, (), _server_seeds),
        Target("client", run_client, (ProtocolError,), _client_seeds),
        Target("pagestream", run_pagestream, (PageStreamError,), _pagestream_seeds),
        Target("snapshot", run_snapshot, _SNAPSHOT_ALLOWED, _snapshot_seeds),
        Target("sealed-snapshot", run_sealed_snapshot, _SNAPSHOT_ALLOWED, _sealed_seeds),
        Target("state", run_state, (BulkError,), _state_seeds),
    )
}


# --- real sizes -----------------------------------------------------------------------------
#
# Mutating small seeds never reaches the sizes that hurt a whole process: one byte of msgpack
# (an empty array) decodes into a ~70-byte object, so a parser's allocation can look fine
# under the bound of 16 MiB + 8x the input at a few KiB and take hundreds of MiB at a few
# MiB. These inputs are the hostile classes at the sizes the limits allow, run once each at
# the start of a campaign (and by tests/test_fuzz_targets.py); tests/test_hostile_vmm.py
# throws the same classes at real VMM processes.


def _nested_arrays(size: int) -> bytes:
    """msgpack for an array of ``size - 5`` empty arrays: one object per byte."""
    count = size - 5
    return b"\xdd" + count.to_bytes(4, "big") + b"\x90" * count


def _raw_frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def run_server_with_default_limits(data: bytes) -> None:
    run_server(data, Limits())


def hostile_inputs() -> list[tuple[Target, bytes]]:
    """(target, input) pairs: the hostile classes at real sizes."""
    server = Target("server", run_server_with_default_limits, (), list)
    big_type = pack({"type": "x" * 600_000})
    versions = pack(
        {"type": "request", "id": 1, "command": "hello", "args": {"versions": [2] * 400_000}}
    )
    config = sn.build_snapshot(
        SnapshotHeader(bytes(range(16)), "fuzz", created_ns=0),
        [
            ("config", 1, _nested_arrays(2 << 20)),
            ("vcpus", 1, b"\x80"),
            ("devices", 1, b"\x80"),
            ("memory", 1, sn.encode_memory_section(((0, 16 * _PAGE, 0),), bytes(16 * _PAGE))),
        ],
    )
    return [
        (server, _seed_prefix(0) + _raw_frame(big_type)),
        (server, _seed_prefix(0) + _raw_frame(versions)),
        (server, _seed_prefix(0) + _raw_frame(_nested_arrays(1 << 20))),
        (TARGETS["state"], _nested_arrays(2 << 20)),
        (TARGETS["state"], b"\x91" * (2 << 20)),  # nested one inside the other
        (TARGETS["snapshot"], config),
    ]


# --- one execution ---------------------------------------------------------------------------


@dataclass
class Crash:
    target: str
    data: bytes
    error: str

    def describe(self) -> str:
        digest = hashlib.sha1(self.data).hexdigest()[:12]
        return f"{self.target} crash {digest} ({len(self.data)} bytes): {self.error}"


def execute(target: Target, data: bytes, max_peak: int) -> str | None:
    """Run ``target`` on ``data``: None, or what went wrong (an unexpected exception, a
    broken invariant, too much memory, an error message that is not one line)."""
    if tracemalloc.is_tracing():
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
    try:
        target.run(data)
    except target.allowed as exc:
        message = str(exc)
        if "\n" in message or not message:
            return f"{type(exc).__name__} with a message that is not one line: {message!r}"
    except RecursionError:
        return "RecursionError"
    except Exception as exc:
        return "".join(traceback.format_exception(exc)).rstrip()
    if tracemalloc.is_tracing():
        peak = tracemalloc.get_traced_memory()[1] - base
        if peak > max_peak + 8 * len(data):
            return f"allocated {peak >> 10} KiB at peak for {len(data)} bytes of input"
    return None


# --- the builtin coverage-guided engine ------------------------------------------------------

_WATCHED = str(Path(__file__).resolve().parent.parent / "src" / "vmipc")


class Coverage:
    """Line-to-line edges taken in vmipc's code, through ``sys.settrace``."""

    def __init__(self) -> None:
        import vmipc

        self.roots = (os.path.dirname(vmipc.__file__), _WATCHED)
        self.edges: set[tuple[int, int, int]] = set()
        self._watched: dict[Any, bool] = {}

    def _wants(self, frame: FrameType) -> bool:
        code = frame.f_code
        wanted = self._watched.get(code)
        if wanted is None:
            wanted = code.co_filename.startswith(self.roots)
            self._watched[code] = wanted
        return wanted

    def run(self, fn: Callable[[], str | None]) -> tuple[str | None, set[tuple[int, int, int]]]:
        edges: set[tuple[int, int, int]] = set()

        def tracer(frame: FrameType, event: str, arg: Any) -> Any:
            if event != "call" or not self._wants(frame):
                return None
            key = id(frame.f_code)
            last = [frame.f_lineno]

            def local(frame: FrameType, event: str, arg: Any) -> Any:
                if event == "line":
                    edges.add((key, last[0], frame.f_lineno))
                    last[0] = frame.f_lineno
                return local

            return local

        sys.settrace(tracer)
        try:
            outcome = fn()
        finally:
            sys.settrace(None)
        return outcome, edges


_INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 32, (1 << 64) - 1]


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 6))):
        op = rng.randrange(9)
        if op == 0 and out:  # flip a bit
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1 and out:  # an interesting byte
            out[rng.randrange(len(out))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF))
        elif op == 2 and len(out) >= 8:  # an interesting integer, either byte order
            i = rng.randrange(len(out) - 7)
            width = rng.choice((2, 4, 8))
            value = rng.choice(_INTERESTING) % (1 << (8 * width))
            out[i : i + width] = value.to_bytes(width, rng.choice(("little", "big")))
        elif op == 3:  # insert random bytes
            i = rng.randrange(len(out) + 1)
            out[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 4 and out:  # delete a range
            i = rng.randrange(len(out))
            del out[i : i + rng.randint(1, 64)]
        elif op == 5 and out:  # duplicate a range
            i = rng.randrange(len(out))
            out[i:i] = out[i : i + rng.randint(1, 256)]
        elif op == 6 and out:  # truncate
            del out[rng.randrange(len(out)) :]
        elif op == 7 and corpus:  # splice with another input
            other = rng.choice(corpus)
            i, j = rng.randrange(len(out) + 1), rng.randrange(len(other) + 1)
            out = out[:i] + other[j:]
        elif op == 8 and out:  # random bytes over a range
            i = rng.randrange(len(out))
            n = rng.randint(1, 8)
            out[i : i + n] = rng.randbytes(n)
    return bytes(out[: 1 << 20])


@dataclass
class Report:
    target: str
    executions: int = 0
    corpus: int = 0
    edges: int = 0
    crashes: list[Crash] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.target:16} {self.executions:8} runs  corpus {self.corpus:5}  "
            f"edges {self.edges:6}  crashes {len(self.crashes)}"
        )


def fuzz_builtin(
    target: Target, seconds: float, *, seed: int = 0, max_peak: int = 16 << 20
) -> Report:
    rng = random.Random(seed)
    coverage = Coverage()
    report = Report(target.name)
    corpus: list[bytes] = []
    seen: set[str] = set()

    def one(data: bytes) -> bool:
        outcome, edges = coverage.run(lambda: execute(target, data, max_peak))
        report.executions += 1
        if outcome is not None:
            key = outcome.splitlines()[-1]
            if key not in seen:
                seen.add(key)
                report.crashes.append(Crash(target.name, data, outcome))
            return False
        new = edges - coverage.edges
        if new:
            coverage.edges |= new
            corpus.append(data)
        return bool(new)

    for data in target.seeds():
        one(data)
        if data not in corpus:
            corpus.append(data)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        parent = rng.choice(corpus) if corpus and rng.random() < 0.9 else rng.randbytes(64)
        one(mutate(rng, parent, corpus))
    report.corpus = len(corpus)
    report.edges = len(coverage.edges)
    return report


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def campaign(
    names: list[str], seconds: float, *, seed: int = 0, max_peak: int = 16 << 20
) -> list[Report]:
    """Fuzz each target for its share of ``seconds`` with the builtin engine."""
    before = _open_fds()
    started = tracemalloc.is_tracing()
    if not started:
        tracemalloc.start()
    try:
        for target, data in hostile_inputs():
            if target.name in names and (problem := execute(target, data, max_peak)):
                print(Crash(target.name, data, problem).describe(), file=sys.stderr)
        reports = [
            fuzz_builtin(TARGETS[name], seconds / len(names), seed=seed, max_peak=max_peak)
            for name in names
        ]
    finally:
        if not started:
            tracemalloc.stop()
    leaked = _open_fds() - before
    if leaked:
        reports.append(Report("fd-leak", crashes=[Crash("fd-leak", b"", f"fds {leaked}")]))
    return reports


# --- atheris -----------------------------------------------------------------------------------


def fuzz_atheris(names: list[str], seconds: float, max_peak: int) -> int:
    import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]

    targets = [TARGETS[name] for name in names]
    corpus = Path(os.environ.get("TMPDIR", "/tmp")) / "vmipc-fuzz-corpus"
    corpus.mkdir(exist_ok=True)
    for index, target in enumerate(targets):
        for seed in target.seeds():
            (corpus / hashlib.sha1(bytes([index]) + seed).hexdigest()).write_bytes(
                bytes([index]) + seed
            )
    tracemalloc.start()

    def one_input(data: bytes) -> None:
        if not data:
            return
        target = targets[data[0] % len(targets)]
        problem = execute(target, data[1:], max_peak)
        if problem is not None:
            raise RuntimeError(f"{target.name}: {problem}")

    argv = [sys.argv[0], f"-max_total_time={int(seconds)}", "-rss_limit_mb=2048", str(corpus)]
    atheris.instrument_all()  # vmipc is imported already: instrument what is loaded
    atheris.Setup(argv, one_input)
    atheris.Fuzz()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--target", action="append", choices=sorted(TARGETS), help="default: all (repeatable)"
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="the whole campaign's time")
    parser.add_argument("--engine", choices=("builtin", "atheris"), default="builtin")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-peak-mib", type=float, default=16.0)
    parser.add_argument("--crashes", metavar="DIR", help="save crashing inputs here")
    args = parser.parse_args(argv)
    names = args.target or sorted(TARGETS)
    max_peak = int(args.max_peak_mib * (1 << 20))
    if args.engine == "atheris":
        return fuzz_atheris(names, args.seconds, max_peak)
    reports = campaign(names, args.seconds, seed=args.seed, max_peak=max_peak)
    crashes = [crash for report in reports for crash in report.crashes]
    for report in reports:
        print(report.line())
    for crash in crashes:
        print(f"\n{crash.describe()}\n  input: {crash.data[:64].hex()}...")
        print("  " + crash.error.replace("\n", "\n  "))
        if args.crashes:
            folder = Path(args.crashes)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{crash.target}-{hashlib.sha1(crash.data).hexdigest()[:12]}").write_bytes(
                crash.data
            )
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
