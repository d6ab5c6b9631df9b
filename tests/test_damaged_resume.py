"""An incoming VMM whose memory failed a load half-way never runs the guest until a complete
load replaces every page: not after an empty or partial apply-pages, and the refusal says
why. Real VMM processes, real KVM."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.seq_support import VCPUS, check_continuation, vmm_processes
from tests.test_bulk_commands import compose_snapshot, ram_of, vmms
from vmipc.client import SyncClient
from vmipc.formats import (
    NEED_DATA,
    DataRun,
    PageStreamDecoder,
    PageStreamEncoder,
    StreamEnd,
    StreamHeader,
    ZeroRun,
)
from vmipc.formats.pagestream import end_of_round
from vmipc.protocol import CommandError
from vmipc.vmm.persist import PageCoverage

pytestmark = pytest.mark.kvm

PAGE = 4096


def records(stream: bytes) -> tuple[StreamHeader, list[DataRun | ZeroRun]]:
    decoder = PageStreamDecoder()
    decoder.feed(stream)
    decoder.feed(b"")
    header: StreamHeader | None = None
    runs: list[DataRun | ZeroRun] = []
    while True:
        event = decoder.next_event()
        assert event is not NEED_DATA
        if isinstance(event, StreamHeader):
            header = event
        elif isinstance(event, DataRun | ZeroRun):
            runs.append(event)
        elif isinstance(event, StreamEnd):
            assert header is not None
            return header, runs


def poisoned(stream: bytes) -> bytes:
    """The same runs with every data page 0xcc (int3), and a round checksum that does not
    match: what a corrupted transfer leaves in RAM when it fails at its round's end."""
    header, runs = records(stream)
    encoder = PageStreamEncoder(header.layout)
    out = bytearray(encoder.header())
    for run in runs:
        if isinstance(run, ZeroRun):
            out += encoder.zero(run.gpa, run.npages)
            continue
        assert run.gpa % PAGE == 0 and len(run.data) % PAGE == 0
        out += encoder.data(run.gpa, len(run.data) // PAGE)
        payload = b"\xcc" * len(run.data)
        encoder.payload(payload)
        out += payload
    right = struct.unpack_from("<Q", encoder.end_round(), 16)[0]  # the round's checksum
    return bytes(out + end_of_round(0, right ^ 1) + encoder.end_stream())


def partial(stream: bytes) -> bytes:
    """A valid stream of only the first data run (as a dirty round would be)."""
    header, runs = records(stream)
    encoder = PageStreamEncoder(header.layout)
    out = bytearray(encoder.header())
    first = next(run for run in runs if isinstance(run, DataRun))
    out += encoder.data(first.gpa, len(first.data) // PAGE)
    encoder.payload(first.data)
    out += first.data
    return bytes(out + encoder.end_round() + encoder.end_stream())


def empty(stream: bytes) -> bytes:
    header, _ = records(stream)
    encoder = PageStreamEncoder(header.layout)
    return encoder.header() + encoder.end_round() + encoder.end_stream()


def refused_resume(client: SyncClient) -> CommandError:
    with pytest.raises(CommandError) as info:
        client.resume()
    error = info.value
    assert error.code == "damaged", error
    reason = error.details["reason"]
    assert "load-memory" in reason and "checksum" in reason, reason
    assert reason in error.message
    assert len(error.message) <= 400
    return error


def test_a_guest_never_runs_on_memory_that_failed_its_checksum(tmp_path: Path) -> None:
    """Before: resume was refused as "cannot resume while paused" (no reason, code
    invalid-state); an empty apply-pages then cleared the mark and resume ran the guest on
    the 0xcc pages (KVM internal error)."""
    with vmm_processes() as vmms:
        source = vmms.guest()
        source.wait_for_passes(1)
        target = vmms.incoming()
        with source.client() as src, target.client() as dst:
            src.pause()
            with open(tmp_path / "state", "wb") as out:
                src.dump_state(out=out.fileno())
            with open(tmp_path / "memory", "wb") as out:
                src.dump_memory(out=out.fileno())
            good = (tmp_path / "memory").read_bytes()
            for name, make in (("bad", poisoned), ("empty", empty), ("partial", partial)):
                (tmp_path / name).write_bytes(make(good))

            with open(tmp_path / "state", "rb") as handle:
                dst.load_state(in_=handle.fileno())
            with pytest.raises(CommandError) as info, open(tmp_path / "bad", "rb") as handle:
                dst.load_memory(in_=handle.fileno())
            assert info.value.code == "bad-stream"
            refused_resume(dst)

            # loads that do not replace every page leave the mark
            with open(tmp_path / "empty", "rb") as handle:
                assert dst.apply_pages(in_=handle.fileno())["data_pages"] == 0
            refused_resume(dst)
            with open(tmp_path / "partial", "rb") as handle:
                assert dst.apply_pages(in_=handle.fileno())["data_pages"] > 0
            with open(tmp_path / "empty", "rb") as handle:
                dst.load_memory(in_=handle.fileno())
            refused_resume(dst)
            assert dst.query_status()["state"] == "paused"
            assert target.text() == ""  # the guest never ran

            # a complete load does: every page replaced by bytes that passed their checks
            with open(tmp_path / "memory", "rb") as handle:
                dst.load_memory(in_=handle.fileno())
            # later rounds (a dirty round after the full pass) keep it runnable
            with open(tmp_path / "partial", "rb") as handle:
                dst.apply_pages(in_=handle.fileno())
            dst.resume()
        target.wait_for_passes(max(source.passes().values()) + 1, VCPUS)
        with target.client() as dst:
            dst.pause()
        check_continuation(source.text(), target.text())


def poison_everywhere(layout: tuple[tuple[int, int], ...]) -> bytes:
    """0xcc in every page of RAM, and a round checksum that does not match."""
    encoder = PageStreamEncoder(layout)
    out = bytearray(encoder.header())
    chunk = b"\xcc" * (1024 * PAGE)
    for gpa, size in layout:
        for start in range(gpa, gpa + size, len(chunk)):
            count = min(len(chunk), gpa + size - start)
            out += encoder.data(start, count // PAGE)
            encoder.payload(chunk[:count])
            out += chunk[:count]
    right = struct.unpack_from("<Q", encoder.end_round(), 16)[0]
    return bytes(out + end_of_round(0, right ^ 1) + encoder.end_stream())


def test_a_snapshot_load_after_a_failed_one_replaces_every_page(tmp_path: Path) -> None:
    """The snapshot's holes are zeroed, not left as the failed load's 0xcc: then the load is
    complete and the guest may run. (Before, holes kept whatever was in RAM.)"""
    with vmms() as make:
        source = make()
        source.console.wait_for_passes(2, 1)
        target = make(incoming=True)
        with source.client() as src, target.client() as dst:
            src.pause()
            compose_snapshot(src, tmp_path / "snap.vmipc")
            with open(tmp_path / "snap.vmipc", "rb") as snapshot:
                dst.load_state(format="snapshot", in_=snapshot.fileno())
            assert target.host.machine is not None and target.host.machine.memory is not None
            layout = tuple(target.host.machine.memory.ram_ranges())
            (tmp_path / "bad").write_bytes(poison_everywhere(layout))
            with pytest.raises(CommandError) as info, open(tmp_path / "bad", "rb") as handle:
                dst.load_memory(in_=handle.fileno())
            assert info.value.code == "bad-stream"
            refused_resume(dst)
            with open(tmp_path / "snap.vmipc", "rb") as snapshot:
                dst.load_memory(format="snapshot", in_=snapshot.fileno())
            assert ram_of(target.machine) == ram_of(source.machine)
            dst.resume()
            assert dst.query_status()["state"] == "running"


@pytest.mark.parametrize(
    ("pieces", "complete"),
    [
        ([(0, 16 * PAGE)], True),
        ([(0, 8 * PAGE), (8 * PAGE, 8 * PAGE)], True),
        ([(8 * PAGE, 8 * PAGE), (0, 8 * PAGE)], True),  # any order
        ([(0, 5000), (5000, 16 * PAGE - 5000)], True),  # a data run in unaligned pieces
        ([(0, 15 * PAGE)], False),
        ([(PAGE, 15 * PAGE)], False),
        ([(0, 3 * PAGE), (4 * PAGE, 12 * PAGE)], False),
        ([(0, 8 * PAGE), (0, 8 * PAGE)], False),  # the same pages twice
        ([], False),
    ],
)
def test_page_coverage(pieces: list[tuple[int, int]], complete: bool) -> None:
    for pages in (16, 19):  # whole bytes of the bitmap, and a partial last byte
        coverage = PageCoverage(pages * PAGE)
        for offset, length in pieces:
            coverage.add(offset, length)
        if pages == 19:
            coverage.add(16 * PAGE, 3 * PAGE)
        assert coverage.complete() is complete, (pages, pieces)
