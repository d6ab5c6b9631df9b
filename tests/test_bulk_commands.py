"""The bulk-data building blocks on real KVM with the built-in guest: dumps and loads of
memory and state through every kind of fd, dirty tracking, cancellation, errors."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.builtin_guest import Console, check_against_model
from tests.control_support import ServerThread, short_tmpdir
from vmipc.client import SyncClient, open_client
from vmipc.formats import (
    NEED_DATA,
    DataRun,
    PageStreamDecoder,
    SectionEntry,
    SnapshotHeader,
    StreamEnd,
    ZeroRun,
    encode_table,
    new_snapshot_id,
)
from vmipc.formats.snapshot import HEADER_SIZE, MEMORY_DESCRIPTOR_SIZE
from vmipc.memory_layout import MIB
from vmipc.protocol import CommandError
from vmipc.vmm.host import MachineHost
from vmipc.vmm.machine import BootSource, Machine, MachineConfig
from vmipc.vmm.runstate import RunState

pytestmark = pytest.mark.kvm

WS = 256 * 1024
MEMORY = 64 * MIB


class Vmm:
    """A VMM in this process: a machine host and its control server on a thread."""

    def __init__(self, host: MachineHost, console: Console, path: str) -> None:
        self.host = host
        self.console = console
        self.path = path
        self.server = ServerThread(host, path).start()

    def client(self) -> SyncClient:
        return SyncClient(self.path, timeout=30)

    @property
    def machine(self) -> Machine:
        assert self.host.machine is not None
        return self.host.machine

    def close(self) -> None:
        self.server.stop()
        self.host.close()


@contextlib.contextmanager
def vmms() -> Iterator[Callable[..., Vmm]]:
    """Make VMMs: ``make()`` boots the built-in guest, ``make(incoming=True)`` receives."""
    made: list[Vmm] = []
    with short_tmpdir() as tmp:

        def make(*, incoming: bool = False, vcpus: int = 2, **options: str) -> Vmm:
            console = Console()
            if incoming:
                host = MachineHost(console)
            else:
                options = {"ws": str(WS), **options}
                source = BootSource("builtin", guest_options=tuple(options.items()))
                host = MachineHost(console, Machine(MachineConfig(MEMORY, vcpus, source), console))
                assert host.machine is not None
                host.machine.start()
            vmm = Vmm(host, console, os.path.join(tmp, f"vmm{len(made)}.sock"))
            made.append(vmm)
            return vmm

        try:
            yield make
        finally:
            for vmm in made:
                vmm.close()


def decode_stream(data: bytes) -> dict[int, bytes]:
    """Page-aligned guest-physical address -> page bytes (zero pages as zeros)."""
    decoder = PageStreamDecoder()
    decoder.feed(data)
    decoder.feed(b"")
    pages: dict[int, bytes] = {}
    while True:
        event = decoder.next_event()
        assert event is not NEED_DATA
        if isinstance(event, DataRun):
            for offset in range(0, len(event.data), 4096):
                pages[event.gpa + offset] = event.data[offset : offset + 4096]
        elif isinstance(event, ZeroRun):
            for index in range(event.npages):
                pages[event.gpa + index * 4096] = bytes(4096)
        elif isinstance(event, StreamEnd):
            return pages


def ram_of(machine: Machine) -> bytes:
    assert machine.memory is not None
    return bytes(machine.memory.view)


def read_all(fd: int, sink: bytearray) -> None:
    while chunk := os.read(fd, 1 << 20):
        sink.extend(chunk)


@contextlib.contextmanager
def fd_pair(kind: str, tmp: Path) -> Iterator[tuple[int, Callable[[], bytes]]]:
    """A writable fd of ``kind`` for the VMM, and a function that returns what arrived."""
    if kind == "file":
        path = tmp / "dump"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            yield fd, path.read_bytes
        finally:
            os.close(fd)
        return
    with channel(kind, tmp) as pair:
        received = bytearray()
        reader = threading.Thread(target=read_all, args=(pair.read_end, received))
        reader.start()

        def result() -> bytes:
            pair.close_writer()
            reader.join(30)
            return bytes(received)

        try:
            yield pair.write_end, result
        finally:
            pair.close_writer()
            reader.join(30)


# --- memory ------------------------------------------------------------------------------


def test_raw_dump_while_paused_equals_ram_byte_for_byte_and_keeps_holes(tmp_path: Path) -> None:
    with vmms() as make:
        vmm = make()
        vmm.console.wait_for_passes(2, 1)
        with vmm.client() as client:
            client.pause()
            with open(tmp_path / "ram.img", "wb") as image:
                result = client.dump_memory(format="raw", out=image.fileno())
            assert result["consistent"] is True
            dumped = (tmp_path / "ram.img").read_bytes()
            assert dumped == ram_of(vmm.machine)
            blocks = os.stat(tmp_path / "ram.img").st_blocks * 512
            assert blocks < MEMORY // 4, "zero pages were written instead of left as holes"


@pytest.mark.parametrize("kind", ["file", "pipe", "socketpair", "tcp"])
def test_stream_dump_through_every_fd_kind_equals_ram(kind: str, tmp_path: Path) -> None:
    with vmms() as make:
        vmm = make()
        vmm.console.wait_for_passes(2, 1)
        with vmm.client() as client, fd_pair(kind, tmp_path) as (fd, received):
            client.pause()
            result = client.dump_memory(out=fd)
            data = received()
        pages = decode_stream(data)
        ram = ram_of(vmm.machine)
        assert len(pages) == MEMORY // 4096
        assert b"".join(pages[gpa] for gpa in range(0, MEMORY, 4096)) == ram
        assert result["data_pages"] + result["zero_pages"] == MEMORY // 4096
        assert result["zero_pages"] > result["data_pages"], "zero pages went as data"
        assert len(data) < MEMORY // 2


def test_state_and_memory_into_a_fresh_incoming_vmm_continue_the_guest(tmp_path: Path) -> None:
    with vmms() as make:
        source = make(rate="8192")
        source.console.wait_for_passes(2, 2)
        target = make(incoming=True)
        with source.client() as src, target.client() as dst:
            assert dst.query_status()["state"] == "incoming"
            src.pause()
            reached = max(source.console.passes().values())
            with fd_pair("pipe", tmp_path) as (fd, received):
                src.dump_state(out=fd)
                blob = received()
            with fd_pair("socketpair", tmp_path) as (fd, received):
                src.dump_memory(out=fd)
                stream = received()
            state_r, state_w = os.pipe()
            os.write(state_w, blob)
            os.close(state_w)
            assert dst.load_state(in_=state_r) == {"vcpus": 2, "memory_size": MEMORY}
            os.close(state_r)
            assert dst.query_status()["state"] == "paused"
            (tmp_path / "stream").write_bytes(stream)
            with open(tmp_path / "stream", "rb") as stream_file:
                dst.apply_pages(in_=stream_file.fileno())
            assert ram_of(target.machine) == ram_of(source.machine)
            dst.resume()
            target.console.wait_for_passes(2, reached + 2)
            dst.pause()
    combined = (source.console.text + target.console.text).split("\n")[:-1]
    assert min(check_against_model(combined, 2, WS).values()) >= reached + 2


def compose_snapshot(client: SyncClient, path: Path) -> None:
    """A snapshot file from building blocks: the VMM appends its sections to the file, the
    client writes the header and, last, the section table."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        state = client.dump_state(format="snapshot", out=fd)
        memory = client.dump_memory(format="snapshot", out=fd)
        assert memory["data_pages"] > 0 and memory["zero_pages"] > memory["data_pages"]
        entries = [SectionEntry.from_dict(e) for e in [*state["sections"], memory["section"]]]
        snapshot_id = new_snapshot_id()
        table = encode_table(entries, snapshot_id, os.fstat(fd).st_size)
        os.pwrite(fd, table.data, table.offset)
        os.pwrite(fd, SnapshotHeader(snapshot_id, "vmipc-test").encode(), 0)
    finally:
        os.close(fd)


def test_a_snapshot_composed_from_building_blocks_restores(tmp_path: Path) -> None:
    path = tmp_path / "snap.vmipc"
    with vmms() as make:
        source = make()
        source.console.wait_for_passes(2, 1)
        target = make(incoming=True)
        with source.client() as src, target.client() as dst:
            src.pause()
            reached = max(source.console.passes().values())
            compose_snapshot(src, path)
            with open(path, "rb") as snapshot:
                dst.load_memory(format="snapshot", in_=snapshot.fileno())
                dst.load_state(format="snapshot", in_=snapshot.fileno())
            dst.resume()
            target.console.wait_for_passes(2, reached + 1)
            dst.pause()
    combined = (source.console.text + target.console.text).split("\n")[:-1]
    check_against_model(combined, 2, WS)


# --- dirty pages -------------------------------------------------------------------------


def working_set_base(ram: bytes, vcpu: int, passes: dict[int, int]) -> int:
    """Find vCPU ``vcpu``'s working set in RAM by its first page's first word, which is a
    pure function of the pass that last wrote it (guest/README.md)."""
    from vmipc.guest import _mix64

    vbase = _mix64(_mix64(0) ^ vcpu)
    t0 = _mix64(0xA5A5A5A5A5A5A5A5 ^ 0)
    done = passes[vcpu]
    for pass_no in (done + 1, done, done + 2):
        word = (_mix64(_mix64(vbase ^ pass_no) ^ 0) ^ t0).to_bytes(8, "little")
        offset = ram.find(word)
        while offset >= 0 and offset % 4096:
            offset = ram.find(word, offset + 1)
        if offset >= 0:
            return offset
    raise AssertionError(f"working set of vcpu {vcpu} not found")


def test_dirty_tracking_reports_every_page_the_guest_wrote(tmp_path: Path) -> None:
    with vmms() as make:
        vmm = make(rate="16384")
        vmm.console.wait_for_passes(2, 1)
        with vmm.client() as client:
            with pytest.raises(CommandError) as refused:
                client.query_dirty()
            assert refused.value.code == "dirty-log-off"
            client.dirty_log_start()
            start = vmm.console.passes()
            vmm.console.wait_for_passes(2, max(start.values()) + 2)
            client.pause()
            passes = vmm.console.passes()
            pending = client.query_dirty()["dirty_pages"]
            with fd_pair("pipe", tmp_path) as (fd, received):
                result = client.dump_dirty(out=fd)
                dirty = decode_stream(received())
            assert result["data_pages"] + result["zero_pages"] == pending == len(dirty)
            ram = ram_of(vmm.machine)
            for vcpu in range(2):
                base = working_set_base(ram, vcpu, passes)
                working_set = set(range(base, base + WS, 4096))
                assert working_set <= set(dirty), f"vcpu {vcpu}: dirty pages missed"
            # Extra pages are the guest's own: its image and bss (per-vCPU blocks, stacks,
            # the kvmclock pages, page tables) end below 4 MiB.
            extra = set(dirty) - {
                gpa
                for vcpu in range(2)
                for gpa in range(
                    working_set_base(ram, vcpu, passes),
                    working_set_base(ram, vcpu, passes) + WS,
                    4096,
                )
            }
            assert all(gpa < 4 * MIB for gpa in extra), sorted(hex(g) for g in extra)[:10]
            for gpa, page in dirty.items():
                assert page == ram[gpa : gpa + 4096]
            # the next round starts empty while paused
            assert client.query_dirty()["dirty_pages"] == 0
            client.dirty_log_stop()


def test_the_dirty_log_epoch_changes_with_every_take_and_guards_dump_dirty(
    tmp_path: Path,
) -> None:
    """dump-dirty with ``epoch`` takes the pages only in that epoch: another epoch means
    somebody took them (or logging restarted) since, and then nothing is taken."""
    with vmms() as make:
        vmm = make(rate="16384")
        vmm.console.wait_for_passes(2, 1)
        with vmm.client() as client:
            first = client.dirty_log_start()["epoch"]
            assert client.dirty_log_start()["epoch"] == first  # idempotent: same epoch
            # two more passes: the second one wrote its pages after logging started
            vmm.console.wait_for_passes(2, max(vmm.console.passes().values()) + 2)
            client.pause()
            pending = client.query_dirty()
            assert pending["epoch"] == first and pending["dirty_pages"] > 0
            with fd_pair("file", tmp_path) as (fd, received):
                with pytest.raises(CommandError) as moved:
                    client.dump_dirty(out=fd, epoch="0123456789abcdef")
                assert moved.value.code == "dirty-log-moved"
                assert moved.value.details == {"expected": "0123456789abcdef", "epoch": first}
                assert received() == b""  # nothing written...
            assert client.query_dirty() == pending  # ...and nothing taken
            with fd_pair("pipe", tmp_path) as (fd, received):
                result = client.dump_dirty(out=fd, epoch=first)
                assert len(decode_stream(received())) == pending["dirty_pages"]
            second = result["epoch"]
            assert second != first
            assert client.query_dirty() == {"dirty_pages": 0, "dirty_bytes": 0, "epoch": second}
            with fd_pair("pipe", tmp_path) as (fd, _), pytest.raises(CommandError) as moved:
                client.dump_dirty(out=fd, epoch=first)  # the old epoch is gone
            assert moved.value.code == "dirty-log-moved"
            client.dirty_log_stop()
            third = client.dirty_log_start()["epoch"]
            assert third not in (first, second)
            client.dirty_log_stop()


def test_dump_dirty_brings_a_memory_section_taken_while_running_up_to_date(
    tmp_path: Path,
) -> None:
    """dump-dirty format=snapshot (1.6) writes the dirty pages into a snapshot memory
    section in place: a first pass taken while the guest ran, brought up to date round
    after round and last while paused, equals RAM at that moment byte for byte. A wrong
    offset or fd takes nothing."""
    with vmms() as make:
        vmm = make(rate="16384")
        vmm.console.wait_for_passes(2, 1)
        fd = os.open(tmp_path / "live.snap", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, HEADER_SIZE)  # sections come after the header
            with vmm.client() as client:
                client.dirty_log_start()
                first = client.dump_memory(format="snapshot", out=fd)
                assert first["consistent"] is False
                section = first["section"]["offset"]
                for _ in range(2):
                    # two more passes: the second one wrote its pages after the last take
                    vmm.console.wait_for_passes(2, max(vmm.console.passes().values()) + 2)
                    done = client.dump_dirty(format="snapshot", section=section, out=fd)
                    assert done["data_pages"] > 0 and done["consistent"] is False
                vmm.console.wait_for_passes(2, max(vmm.console.passes().values()) + 2)
                client.pause()
                pending = client.query_dirty()
                assert pending["dirty_pages"] > 0
                for args, code in [
                    ({"section": section + 4096}, "bad-snapshot"),
                    ({"section": 0}, "bad-snapshot"),
                    ({}, "invalid-arguments"),
                ]:
                    with pytest.raises(CommandError) as refused:
                        client.dump_dirty(format="snapshot", out=fd, **args)
                    assert refused.value.code == code
                with fd_pair("pipe", tmp_path) as (pipe, _), pytest.raises(CommandError) as info:
                    client.dump_dirty(format="snapshot", section=section, out=pipe)
                assert info.value.code == "invalid-fds"
                assert client.query_dirty() == pending  # nothing was taken
                last = client.dump_dirty(format="snapshot", section=section, out=fd)
                assert last["consistent"] is True
                assert last["data_pages"] + last["zero_pages"] == pending["dirty_pages"]
                ram = ram_of(vmm.machine)
                image = os.pread(fd, len(ram), section + MEMORY_DESCRIPTOR_SIZE)
                assert image == ram
                client.dirty_log_stop()
        finally:
            os.close(fd)


# --- positional writers: what the file held, O_APPEND, write-only fds --------------------


def test_a_raw_dump_into_an_existing_file_reads_back_as_ram_byte_for_byte(
    tmp_path: Path,
) -> None:
    """Zero pages are not written but must not keep the file's old bytes, and the file
    ends where the image ends; from the fd's position on (before it stays)."""
    with vmms() as make:
        vmm = make()
        vmm.console.wait_for_passes(2, 1)
        path = tmp_path / "ram.img"
        prefix = b"kept" * 1024
        with vmm.client() as client:
            client.pause()
            for old_size in (MEMORY + 3 * MIB, MEMORY // 2):
                path.write_bytes(prefix + b"\xa5" * old_size)
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                try:
                    os.lseek(fd, len(prefix), os.SEEK_SET)
                    client.dump_memory(format="raw", out=fd)
                    assert os.lseek(fd, 0, os.SEEK_CUR) == len(prefix) + MEMORY
                finally:
                    os.close(fd)
                dumped = path.read_bytes()
                assert dumped[: len(prefix)] == prefix
                assert len(dumped) == len(prefix) + MEMORY, old_size
                assert dumped[len(prefix) :] == ram_of(vmm.machine), old_size


def test_positional_dumps_refuse_an_append_mode_fd_before_writing_anything(
    tmp_path: Path,
) -> None:
    """With O_APPEND, Linux's pwrite appends wherever it was asked to write: raw images and
    snapshot sections would land at the wrong offsets. Refused (invalid-fds) up front;
    stream dumps, which only append, still take such an fd."""
    with vmms() as make:
        vmm = make()
        vmm.console.wait_for_passes(2, 1)
        path = tmp_path / "appended"
        with vmm.client() as client:
            client.pause()
            client.dirty_log_start()
            calls: list[tuple[str, Callable[[int], Any]]] = [
                ("raw", lambda fd: client.dump_memory(format="raw", out=fd)),
                ("memory", lambda fd: client.dump_memory(format="snapshot", out=fd)),
                ("state", lambda fd: client.dump_state(format="snapshot", out=fd)),
                (
                    "dirty",
                    lambda fd: client.dump_dirty(format="snapshot", section=HEADER_SIZE, out=fd),
                ),
            ]
            pending = client.query_dirty()
            for what, call in calls:
                path.write_bytes(b"old bytes")
                fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
                try:
                    error = expect_error(lambda: call(fd), "invalid-fds")  # noqa: B023
                finally:
                    os.close(fd)
                assert "O_APPEND" in str(error), what
                assert error.details == {"fd": "out", "problem": "opened with O_APPEND"}, what
                assert path.read_bytes() == b"old bytes", what
            assert client.query_dirty() == pending  # dump-dirty took nothing
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            try:
                client.dump_memory(out=fd)  # a stream only appends: fine
            finally:
                os.close(fd)
            assert path.read_bytes().startswith(b"old bytes")
            assert len(path.read_bytes()) > 4096
            client.dirty_log_stop()


def test_dump_dirty_into_a_snapshot_refuses_a_write_only_fd_before_taking_pages(
    tmp_path: Path,
) -> None:
    """format=snapshot reads the section's descriptor first: a write-only fd is an
    invalid-fds that says so, not an io-error "Bad file descriptor" after the take."""
    with vmms() as make:
        vmm = make()
        vmm.console.wait_for_passes(2, 1)
        path = tmp_path / "live.snap"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, HEADER_SIZE)
            with vmm.client() as client:
                client.pause()
                client.dirty_log_start()
                section = client.dump_memory(format="snapshot", out=fd)["section"]["offset"]
                client.resume()
                vmm.console.wait_for_passes(2, max(vmm.console.passes().values()) + 1)
                client.pause()
                pending = client.query_dirty()
                assert pending["dirty_pages"] > 0
                write_only = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    error = expect_error(
                        lambda: client.dump_dirty(
                            format="snapshot", section=section, out=write_only
                        ),
                        "invalid-fds",
                    )
                finally:
                    os.close(write_only)
                assert "reading" in str(error)
                assert error.details == {"fd": "out", "problem": "not open for reading"}
                assert client.query_dirty() == pending  # nothing was taken
                client.dirty_log_stop()
        finally:
            os.close(fd)


def test_load_state_that_kvm_refuses_is_bad_state(tmp_path: Path) -> None:
    """Registers KVM refuses (EFER with reserved bits) are bad input, not an internal
    error; the VMM stays incoming."""
    from vmipc.kvm import structs
    from vmipc.vmm.persist import encode_state_blob

    with vmms() as make:
        source = make()
        source.console.wait_for_passes(2, 1)
        target = make(incoming=True)
        with source.client() as src, target.client() as dst:
            src.pause()
            state = source.machine.save_state()
            vcpu = state.vcpus[0]
            sregs = structs.KvmSregs.from_buffer_copy(vcpu.sregs)
            sregs.efer = 0xFFFF_0000_0000
            bad = dataclasses.replace(
                state,
                vcpus=(dataclasses.replace(vcpu, sregs=bytes(sregs)), *state.vcpus[1:]),
            )
            blob = tmp_path / "state"
            blob.write_bytes(encode_state_blob(bad))
            with open(blob, "rb") as handle:
                error = expect_error(lambda: dst.load_state(in_=handle.fileno()), "bad-state")
            assert "KVM_SET_SREGS" in str(error)
            assert dst.query_status()["state"] == "incoming"
            expect_error(dst.resume, "invalid-state")


# --- a stuck reader, errors ------------------------------------------------------------


def test_a_reader_that_stops_reading_does_not_hang_the_vmm() -> None:
    async def scenario(path: str) -> None:
        read_end, write_end = os.pipe()
        try:
            async with open_client(path) as client, open_client(path) as other:
                await client.pause()
                async with trio.open_nursery() as nursery:
                    outcome: list[str] = []

                    async def dump() -> None:
                        try:
                            await client.dump_memory(format="raw", out=write_end)
                            outcome.append("finished")
                        except CommandError as exc:
                            outcome.append(exc.code)

                    nursery.start_soon(dump)
                    await trio.sleep(0.3)
                    # the dump is stuck on a full pipe; the server still answers
                    with trio.fail_after(5):
                        status = await other.query_status()
                    assert status["state"] == "paused"
                    nursery.cancel_scope.cancel()
                with trio.fail_after(10):
                    await other.resume()
                    assert (await other.query_status())["state"] == "running"
                assert outcome == []  # the client's own cancellation ended the call
        finally:
            os.close(read_end)
            os.close(write_end)

    with vmms() as make:
        vmm = make()
        trio.run(scenario, vmm.path)
        time.sleep(0.1)
        assert vmm.host.state is RunState.RUNNING


def expect_error(call: Callable[[], Any], code: str) -> CommandError:
    with pytest.raises(CommandError) as info:
        call()
    assert info.value.code == code, info.value
    return info.value


def test_documented_refusals(tmp_path: Path) -> None:
    with vmms() as make:
        vmm = make()
        incoming = make(incoming=True)
        read_end, write_end = os.pipe()
        try:
            with vmm.client() as client, incoming.client() as receiver:
                expect_error(lambda: client.dump_state(out=write_end), "invalid-state")
                client.pause()
                expect_error(
                    lambda: client.dump_memory(format="snapshot", out=write_end), "invalid-fds"
                )
                expect_error(lambda: client.load_state(in_=read_end), "invalid-state")
                expect_error(lambda: receiver.apply_pages(in_=read_end), "not-configured")
                os.write(write_end, b"not a state blob at all")
                expect_error(lambda: receiver.load_state(in_=read_end), "bad-state")
                assert receiver.query_status()["state"] == "incoming"
        finally:
            os.close(read_end)
            os.close(write_end)


def test_a_corrupt_page_stream_is_refused_and_the_guest_cannot_resume(tmp_path: Path) -> None:
    with vmms() as make:
        source = make()
        source.console.wait_for_passes(2, 1)
        target = make(incoming=True)
        with source.client() as src, target.client() as dst:
            src.pause()
            with fd_pair("pipe", tmp_path) as (fd, received):
                src.dump_state(out=fd)
                blob = received()
            with fd_pair("pipe", tmp_path) as (fd, received):
                src.dump_memory(out=fd)
                stream = bytearray(received())
            state_file = tmp_path / "state"
            state_file.write_bytes(blob)
            with open(state_file, "rb") as handle:
                dst.load_state(in_=handle.fileno())
            stream[len(stream) // 2] ^= 0x40
            (tmp_path / "bad").write_bytes(bytes(stream))
            with open(tmp_path / "bad", "rb") as handle:
                error = expect_error(lambda: dst.apply_pages(in_=handle.fileno()), "bad-stream")
            assert "page stream" in str(error)
            expect_error(dst.resume, "damaged")
            (tmp_path / "good").write_bytes(bytes(stream[: len(stream) // 2 - 1]))
            with open(tmp_path / "good", "rb") as handle:
                expect_error(lambda: dst.apply_pages(in_=handle.fileno()), "bad-stream")
            stream[len(stream) // 2] ^= 0x40
            (tmp_path / "good").write_bytes(bytes(stream))
            with open(tmp_path / "good", "rb") as handle:
                dst.apply_pages(in_=handle.fileno())
            dst.resume()
            assert dst.query_status()["state"] == "running"


class Channel:
    """A connected (write end, read end) pair of fds; for "file" a file opened twice.

    Each end is closed exactly once: closing an fd twice could close a number that the
    in-process server has reused for an fd a client passed it meanwhile."""

    def __init__(self, kind: str, tmp: Path) -> None:
        if kind == "file":
            path = tmp / f"channel-{time.monotonic_ns()}"
            self.write_end = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            self.read_end = os.open(path, os.O_RDONLY)
        elif kind == "pipe":
            self.read_end, self.write_end = os.pipe()
        elif kind == "socketpair":
            left, right = socket.socketpair()
            self.write_end, self.read_end = left.detach(), right.detach()
        else:  # tcp on loopback
            listener = socket.create_server(("127.0.0.1", 0))
            sender = socket.create_connection(listener.getsockname())
            receiver, _ = listener.accept()
            listener.close()
            self.write_end, self.read_end = sender.detach(), receiver.detach()
        self._open = {self.write_end, self.read_end}

    def close(self, fd: int) -> None:
        if fd in self._open:
            self._open.remove(fd)
            os.close(fd)

    def close_writer(self) -> None:
        """The writing side is done: the reader sees the end of the data."""
        self.close(self.write_end)

    def close_all(self) -> None:
        for fd in list(self._open):
            self.close(fd)


@contextlib.contextmanager
def channel(kind: str, tmp: Path) -> Iterator[Channel]:
    pair = Channel(kind, tmp)
    try:
        yield pair
    finally:
        pair.close_all()


def vmm_to_vmm(
    kind: str,
    tmp: Path,
    dump: Callable[[int], Any],
    load: Callable[[int], Any],
) -> tuple[Any, Any]:
    """Run ``dump(write_fd)`` on one VMM and ``load(read_fd)`` on the other through a
    channel of ``kind``: at the same time (pipes and sockets), or one after the other
    (files). The data goes from VMM to VMM; the test only passes fds."""
    with channel(kind, tmp) as pair:
        if kind == "file":
            dumped = dump(pair.write_end)
            return dumped, load(pair.read_end)
        box: dict[str, Any] = {}

        def run_dump() -> None:
            try:
                box["dump"] = dump(pair.write_end)
            except BaseException as exc:
                box["dump"] = exc
            finally:
                # the VMM closed its copy; ours goes too, so the reader sees the end
                pair.close_writer()

        thread = threading.Thread(target=run_dump)
        thread.start()
        loaded = load(pair.read_end)
        thread.join(30)
        if isinstance(box.get("dump"), BaseException):
            raise box["dump"]
        return box["dump"], loaded


@pytest.mark.parametrize("kind", ["file", "pipe", "socketpair", "tcp"])
def test_every_dump_and_load_through_every_fd_kind(kind: str, tmp_path: Path) -> None:
    with vmms() as make:
        source = make(rate="8192")
        source.console.wait_for_passes(2, 1)
        target = make(incoming=True)
        # a migration destination is started with the source's shape (--memory/--vcpus)
        target.host.configure(MachineConfig(MEMORY, 2))
        src_state, dst_state = source.client(), target.client()
        with source.client() as src, target.client() as dst:
            src.dirty_log_start()
            dst_side = target.client()
            try:
                # pre-copy: the first pass while the guest runs, then a dirty round
                vmm_to_vmm(
                    kind,
                    tmp_path,
                    lambda fd: src.dump_memory(out=fd),
                    lambda fd: dst_side.apply_pages(in_=fd),
                )
                src.pause()
                reached = max(source.console.passes().values())
                dumped, loaded = vmm_to_vmm(
                    kind,
                    tmp_path,
                    lambda fd: src.dump_dirty(out=fd),
                    lambda fd: dst_side.load_memory(format="stream", in_=fd),
                )
                assert loaded["data_pages"] == dumped["data_pages"] > 0
                assert ram_of(target.machine) == ram_of(source.machine)
                vmm_to_vmm(
                    kind,
                    tmp_path,
                    lambda fd: src.dump_memory(format="raw", out=fd),
                    lambda fd: dst_side.load_memory(format="raw", in_=fd),
                )
                assert ram_of(target.machine) == ram_of(source.machine)
                vmm_to_vmm(
                    kind,
                    tmp_path,
                    lambda fd: src_state.dump_state(out=fd),
                    lambda fd: dst_state.load_state(in_=fd),
                )
            finally:
                dst_side.close()
                src_state.close()
                dst_state.close()
            # (not RAM-equal any more: restoring kvmclock makes KVM rewrite the guest's
            # pvclock page on the target)
            dst.resume()
            target.console.wait_for_passes(2, reached + 1)
            dst.pause()
    combined = (source.console.text + target.console.text).split("\n")[:-1]
    check_against_model(combined, 2, WS)


def test_long_commands_report_progress(tmp_path: Path) -> None:
    with vmms() as make:
        vmm = make(ws="16M")
        vmm.console.wait_for_passes(2, 1)
        seen: list[dict[str, Any]] = []
        with SyncClient(vmm.path, timeout=30, events=["progress"]) as client:
            client.pause()
            with fd_pair("pipe", tmp_path) as (fd, received):
                result = client.dump_memory(
                    format="raw", out=fd, on_progress=lambda e: seen.append(e.data)
                )
                received()
        assert seen, "no progress events"
        assert all(event["command"] == "dump-memory" for event in seen)
        done = [event["done"] for event in seen]
        assert done == sorted(done)
        assert all(event["total"] == MEMORY for event in seen)
        assert result["bytes"] == MEMORY


def test_bulk_commands_leak_no_fds(tmp_path: Path) -> None:
    from tests.control_support import describe_fds, open_fds, wait_for_fds

    with vmms() as make:
        source = make()
        source.console.wait_for_passes(2, 1)
        target = make(incoming=True)
        target.host.configure(MachineConfig(MEMORY, 2))
        with source.client() as src, target.client() as dst:
            src.pause()
            baseline = open_fds()
            for kind in ("file", "pipe", "socketpair", "tcp"):
                vmm_to_vmm(
                    kind,
                    tmp_path,
                    lambda fd: src.dump_memory(out=fd),
                    lambda fd: dst.apply_pages(in_=fd),
                )
            read_end, write_end = os.pipe()
            os.close(read_end)
            expect_error(lambda: src.dump_memory(format="raw", out=write_end), "invalid-fds")
            os.close(write_end)
            leaked = wait_for_fds(baseline)
            assert not leaked, describe_fds(leaked)


# --- small transfers through sockets, done on the event loop ----------------------------


@contextlib.contextmanager
def _sent_through_socket(data: bytes, *, close: bool = True) -> Iterator[int]:
    """The reading end's fd (for a request, which owns it) of a socket pair that ``data``
    is written into by a thread (then its writing end shut, when ``close``; else kept open
    until the block ends, as if more were to follow)."""
    left, right = socket.socketpair()

    def send() -> None:
        with contextlib.suppress(OSError):
            left.sendall(data)
            if close:
                left.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        yield right.detach()
    finally:
        left.shutdown(socket.SHUT_RDWR)
        sender.join(30)
        left.close()


def test_the_state_and_a_small_dirty_round_through_sockets_continue_the_guest(
    tmp_path: Path,
) -> None:
    """What the stop-and-copy sends through socket pairs (the state blob, a paused guest's
    last few dirty pages) goes on the event loop, and refuses what the worker-thread path
    refuses: a blob cut in its header or payload, a corrupt one, a page stream for other
    RAM (the destination stays incoming). Then the guest continues exactly."""
    from vmipc.formats import PageStreamEncoder

    with vmms() as make:
        source = make(rate="256")  # a pass of the working set in a quarter of a second
        source.console.wait_for_passes(2, 1)
        target = make(incoming=True)
        with source.client() as src, target.client() as dst:
            src.dirty_log_start()
            with fd_pair("pipe", tmp_path) as (fd, received):
                src.dump_memory(out=fd)
                streams = [received()]
            src.pause()
            reached = max(source.console.passes().values())
            # the last rounds: a few pages, then none (made in memory, sent from the loop)
            for _ in range(2):
                left, right = socket.socketpair()
                with left, right:
                    reply = src.dump_dirty(out=left.fileno())
                    left.shutdown(socket.SHUT_WR)
                    stream = bytearray()
                    read_all(right.fileno(), stream)
                streams.append(bytes(stream))
            assert reply["data_pages"] + reply["zero_pages"] <= 64
            left, right = socket.socketpair()
            with left, right:
                state = src.dump_state(out=left.fileno())
                left.shutdown(socket.SHUT_WR)
                blob = bytearray()
                read_all(right.fileno(), blob)
            assert state["bytes"] == len(blob)

            # refusals first: nothing of them may stick (into a machine built already, as
            # a migration's destination is: its state is restored on the loop)
            dst.configure(memory_size=MEMORY, vcpus=2)
            corrupt = bytearray(blob)
            corrupt[-5] ^= 0x10
            for bad in (blob[:10], blob[: len(blob) // 2], b"X" * len(blob), corrupt):
                with _sent_through_socket(bytes(bad)) as fd:
                    error = expect_error(lambda fd=fd: dst.load_state(in_=fd), "bad-state")
                assert dst.query_status()["state"] == "incoming"
            assert "checksum" in str(error)
            other = PageStreamEncoder([(0, MEMORY // 2)])
            alien = other.header() + other.end_round() + other.end_stream()
            with _sent_through_socket(alien) as fd:
                expect_error(lambda: dst.apply_pages(in_=fd), "bad-stream")

            # then the real thing, each through a socket
            for stream in streams:
                with _sent_through_socket(stream, close=False) as fd:
                    dst.apply_pages(in_=fd)
            assert ram_of(target.machine) == ram_of(source.machine)
            with _sent_through_socket(bytes(blob)) as fd:
                assert dst.load_state(in_=fd) == {"vcpus": 2, "memory_size": MEMORY}
            dst.resume()
            target.console.wait_for_passes(2, reached + 2)
            dst.pause()
    combined = (source.console.text + target.console.text).split("\n")[:-1]
    assert min(check_against_model(combined, 2, WS).values()) >= reached + 2


def test_unhashed_page_streams_between_two_vmms_are_taken_only_when_accepted(
    tmp_path: Path,
) -> None:
    """Protocol 1.10: ``checksum: headers`` streams (page stream 1.1) of a running and a
    paused guest, through socket pairs; apply-pages refuses them (``bad-stream``, on the
    event loop's path and the worker's) unless ``accept_unhashed``, and then the guest
    continues exactly. Files, raw images and snapshot sections keep full checksums."""
    import struct

    from vmipc.formats import PageStreamEncoder

    with vmms() as make:
        source = make(rate="256")
        source.console.wait_for_passes(2, 1)
        target = make(incoming=True)
        with source.client() as src, target.client() as dst:
            out = os.open(tmp_path / "file", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                for call in (
                    lambda: src.dump_memory(format="raw", checksum="headers", out=out),
                    lambda: src.dump_memory(checksum="headers", out=out),
                    lambda: src.dump_dirty(checksum="headers", out=out),
                    lambda: src.dump_dirty(
                        format="snapshot", section=0, checksum="headers", out=out
                    ),
                ):
                    error = expect_error(call, "invalid-arguments")
                    assert error.details["argument"] == "checksum"
                assert os.fstat(out).st_size == 0
            finally:
                os.close(out)
            src.dirty_log_start()
            with fd_pair("socketpair", tmp_path) as (fd, received):
                full = src.dump_memory(checksum="headers", out=fd)
                streams = [received()]
            assert full["consistent"] is False
            assert struct.unpack_from("<HHxxxxxxxxI", streams[0], 8) == (1, 1, 1)
            src.pause()
            reached = max(source.console.passes().values())
            with fd_pair("socketpair", tmp_path) as (fd, received):
                src.dump_dirty(checksum="headers", out=fd)
                streams.append(received())

            with fd_pair("socketpair", tmp_path) as (fd, received):
                src.dump_state(out=fd)
                blob = received()

            dst.configure(memory_size=MEMORY, vcpus=2)
            with _sent_through_socket(blob) as fd:
                dst.load_state(in_=fd)  # first: a refused stream then shows as damage
            small = PageStreamEncoder([(0, MEMORY)], hash_payload=False)
            empty = small.header() + small.end_round() + small.end_stream()
            for stream in (empty, streams[0]):  # the loop's path, then a worker's
                with _sent_through_socket(stream) as fd:
                    error = expect_error(lambda fd=fd: dst.apply_pages(in_=fd), "bad-stream")
                assert "not hashed" in str(error)
            # load-memory never takes one (it has no such argument)
            with _sent_through_socket(streams[0]) as fd:
                error = expect_error(lambda: dst.load_memory(format="stream", in_=fd), "bad-stream")
            assert "not hashed" in str(error)
            expect_error(dst.resume, "damaged")
            for stream in streams:
                with _sent_through_socket(stream, close=False) as fd:
                    dst.apply_pages(in_=fd, accept_unhashed=True)
            assert ram_of(target.machine) == ram_of(source.machine)
            dst.resume()
            target.console.wait_for_passes(2, reached + 2)
            dst.pause()
    combined = (source.console.text + target.console.text).split("\n")[:-1]
    assert min(check_against_model(combined, 2, WS).values()) >= reached + 2
