"""Bulk-data building blocks: dumps and loads of memory and state through passed fds,
and dirty-page tracking. The VMM never opens a path: it reads and writes the fds.

Each handler is an adapter: it checks the fds, calls one method of the machine's
``Snapshottable`` or ``Migratable`` role (vmm/machine_api.py) in a worker thread, and
turns what it raises into the command's error codes. The work itself is the VMM's data
plane (vmm/persist/).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from vmipc.commands._registry import CommandContext, handler
from vmipc.kvm import KvmError
from vmipc.memory_layout import PAGE_SIZE
from vmipc.protocol import CommandError, ErrorCode
from vmipc.vmm.devices import DiskImageError
from vmipc.vmm.dirtylog import DirtyLogMoved, DirtyLogOff
from vmipc.vmm.machine_api import DirtyDump, DiskPresent, NoDisk
from vmipc.vmm.persist import (
    STATE_HEADER_SIZE,
    BufferedInput,
    BufferTransfer,
    BulkError,
    PeerClosed,
    Stats,
    Transfer,
    TransferCancelled,
    fd_kind,
    recv_nowait,
    send_nowait,
    state_blob_header,
    state_from_payload,
    truncated_header,
    truncated_payload,
    whole_page_stream,
)

T = TypeVar("T")


async def _run_bulk(ctx: CommandContext, phase: str, work: Callable[[Transfer], T]) -> T:
    """Run ``work`` in a worker thread, with progress reports of ``phase``; a cancelled
    request kicks it out of any blocked system call and waits for it, so the fd is
    released before the reply."""

    def report(done: int) -> None:
        ctx.progress(phase, done, transfer.total)

    transfer = Transfer.unbound(report)

    def worker() -> T:
        transfer.bind()
        try:
            return work(transfer)
        finally:
            transfer.finish()

    try:
        return await trio.to_thread.run_sync(worker, abandon_on_cancel=True)
    except trio.Cancelled:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(transfer.cancel)
        raise
    except TransferCancelled:
        raise CommandError("cancelled", f"{ctx.command} was cancelled") from None
    except PeerClosed as exc:
        raise CommandError("peer-closed", f"{ctx.command}: {exc}") from None
    except KvmError:
        raise  # the machine's ioctl, not the fd: an internal error
    except (BulkError, OSError) as exc:
        raise _command_error(ctx, exc) from None


def _command_error(ctx: CommandContext, exc: BulkError | OSError) -> CommandError:
    """What the client hears of a bulk failure: its own code, or io-error."""
    if isinstance(exc, BulkError):
        return CommandError(exc.code, f"{ctx.command}: {exc}")
    return CommandError("io-error", f"{ctx.command}: {exc.strerror or exc}")


def _require_file(ctx: CommandContext, name: str, what: str) -> int:
    fd = ctx.fds[name]
    if fd_kind(fd) != "file":
        raise CommandError(
            "invalid-fds",
            f"{ctx.command}: format {what} needs a regular file for fd {name!r}",
            {"fd": name, "problem": "not a regular file"},
        )
    return fd


def _require_positional(ctx: CommandContext, name: str, what: str, *, read: bool = False) -> int:
    """The fd of a format written at file offsets (raw into a file, snapshot sections):
    refused before anything is written when it cannot be written that way."""
    fd = ctx.fds[name]
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & os.O_APPEND:
        # Linux's pwrite ignores the offset on an O_APPEND file and appends: pages and
        # sections would land at the wrong offsets, and the reply would say it went well
        raise CommandError(
            "invalid-fds",
            f"{ctx.command}: format {what} writes at file offsets, which fd {name!r} opened "
            "with O_APPEND turns into appends (open the file without O_APPEND, e.g. "
            "--fd out=+FILE rather than >> FILE)",
            {"fd": name, "problem": "opened with O_APPEND"},
        )
    if read and flags & os.O_ACCMODE != os.O_RDWR:
        raise CommandError(
            "invalid-fds",
            f"{ctx.command}: format {what} reads the file as well as writing it: fd {name!r} "
            "must be open for reading and writing (e.g. --fd out=+FILE)",
            {"fd": name, "problem": "not open for reading"},
        )
    return fd


def _stats(stats: Stats, **extra: Any) -> dict[str, Any]:
    return {
        "data_pages": stats.data_pages,
        "zero_pages": stats.zero_pages,
        "bytes": stats.bytes,
        **extra,
    }


# --- memory --------------------------------------------------------------------------------


def _hash_payload(ctx: CommandContext, fmt: str, fd: int) -> bool:
    """Whether a page stream's round checksums cover the pages (``checksum: full``, the
    default) or the record headers only (``headers``, 1.10): only as a page stream, never
    into a regular file (a file is read back by whoever finds it: it keeps every hash)."""
    if ctx.args["checksum"] == "full":
        return True
    if fmt != "stream" or fd_kind(fd) == "file":
        raise CommandError(
            ErrorCode.INVALID_ARGUMENTS,
            f"{ctx.command}: checksum headers is for a page stream into a socket or a pipe "
            "(files and snapshot sections keep full checksums)",
            {"argument": "checksum", "problem": "only for format stream, not into a file"},
        )
    return False


@handler("dump-memory")
async def dump_memory(ctx: CommandContext) -> dict[str, Any]:
    fmt = ctx.args["format"]
    fd = ctx.fds["out"]
    hashed = _hash_payload(ctx, fmt, fd)
    if fmt == "snapshot":
        _require_file(ctx, "out", "snapshot")
        _require_positional(ctx, "out", "snapshot")
    elif fmt == "raw" and fd_kind(fd) == "file":
        _require_positional(ctx, "out", "raw")
    dump = await _run_bulk(
        ctx, "memory", lambda t: ctx.machine.dump_memory(fd, fmt, t, hash_payload=hashed)
    )
    section = None if dump.section is None else dump.section.to_dict()
    return _stats(dump.stats, consistent=dump.consistent, section=section)


@handler("load-memory", exclusive=True)
async def load_memory(ctx: CommandContext) -> dict[str, Any]:
    fmt = ctx.args["format"]
    fd = ctx.fds["in"]
    if fmt == "snapshot":
        _require_file(ctx, "in", "snapshot")
    stats = await _run_bulk(ctx, "memory", lambda t: ctx.machine.load_memory(fd, fmt, t))
    return _stats(stats, rounds=stats.rounds)


@handler("apply-pages", exclusive=True)
async def apply_pages(ctx: CommandContext) -> dict[str, Any]:
    fd = ctx.fds["in"]
    accept = ctx.args["accept_unhashed"]
    stream = await _whole_small_stream(ctx, fd) if fd_kind(fd) == "socket" else None
    if stream is not None:
        try:
            stats = ctx.machine.apply_pages(fd, BufferedInput(stream), accept_unhashed=accept)
        except PeerClosed as exc:
            raise CommandError("peer-closed", f"{ctx.command}: {exc}") from None
        except (BulkError, OSError) as exc:
            raise _command_error(ctx, exc) from None
    else:
        stats = await _run_bulk(
            ctx, "memory", lambda t: ctx.machine.apply_pages(fd, t, accept_unhashed=accept)
        )
    return _stats(stats, rounds=stats.rounds)


#: a page stream up to this size, all of it in the socket when it first has data, is
#: applied from the event loop (a migration's last round for an idle guest); any other
#: is read by a worker thread, which takes the fd with nothing consumed from it
INLINE_STREAM_BYTES = 128 << 10


async def _whole_small_stream(ctx: CommandContext, fd: int) -> bytes | None:
    """Once the socket ``fd`` has data: when a whole page stream of at most
    INLINE_STREAM_BYTES is there, the stream, taken off the socket (and nothing after it);
    else None, and nothing was taken."""
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        trio.lowlevel.notify_closing(fd)  # a worker thread or the server takes it next
    buffer = bytearray(INLINE_STREAM_BYTES)
    try:
        peeked = recv_nowait(fd, buffer, 0, len(buffer), peek=True)
        length = None if not peeked else whole_page_stream(memoryview(buffer)[:peeked])
        if length is None:
            return None
        taken = 0
        while taken < length:
            moved = recv_nowait(fd, buffer, taken, length - taken)
            if not moved:  # the bytes peeked are there: neither happens
                raise CommandError("io-error", f"{ctx.command}: the socket lost bytes")
            taken += moved
    except PeerClosed as exc:
        raise CommandError("peer-closed", f"{ctx.command}: {exc}") from None
    except OSError as exc:
        raise _command_error(ctx, exc) from None
    return bytes(buffer[:length])


# --- state -----------------------------------------------------------------------------------


@handler("flush-devices")
async def flush_devices(ctx: CommandContext) -> dict[str, Any]:
    if not ctx.machine.flush_needed:
        # nothing to make durable: answered without a worker thread's two hops (the
        # request sits in a migration's stop-and-copy chain)
        return {}
    try:
        await trio.to_thread.run_sync(ctx.machine.flush_devices)
    except OSError as exc:
        raise _command_error(ctx, exc) from None
    return {}


@handler("dump-state")
async def dump_state(ctx: CommandContext) -> dict[str, Any]:
    fmt = ctx.args["format"]
    fd = ctx.fds["out"]
    if fmt == "blob" and fd_kind(fd) == "socket" and _small(ctx):
        return await _dump_state_to_socket(ctx, fd)
    if fmt == "snapshot":
        _require_file(ctx, "out", "snapshot")
        _require_positional(ctx, "out", "snapshot")
    dump = await _run_bulk(ctx, "state", lambda t: ctx.machine.dump_state(fd, fmt, t))
    return {"bytes": dump.bytes, "sections": [entry.to_dict() for entry in dump.sections]}


@handler("load-state", exclusive=True)
async def load_state(ctx: CommandContext) -> dict[str, Any]:
    fmt = ctx.args["format"]
    fd = ctx.fds["in"]
    if fmt == "snapshot":
        _require_file(ctx, "in", "snapshot")
    accept_disk = ctx.args["accept_disk"]
    if fmt == "blob" and fd_kind(fd) == "socket":
        config = await _load_state_from_socket(ctx, fd, accept_disk)
    else:
        config = await _run_bulk(
            ctx, "state", lambda t: ctx.machine.load_state(fd, fmt, t, accept_disk=accept_disk)
        )
    return {"vcpus": config.vcpus, "memory_size": config.memory_size}


# The state blob through a socket, on the event loop: a migration's stop-and-copy waits
# for it, and for an idle guest the two thread hops of a worker (there and back, each a
# wake-up of another thread that must take the GIL) cost more than the work itself — a
# few KVM ioctls per vCPU and a few kilobytes. The socket is never switched to
# non-blocking (its file description may be shared): each call says MSG_DONTWAIT, and
# the loop waits for readiness in between. Anything else takes the worker-thread path.

#: vCPUs up to which the state is saved, and restored, on the event loop (each costs
#: about 0.15-0.25 ms of ioctls there; more would hold up other connections)
INLINE_STATE_VCPUS = 4
#: a state blob up to this size is decoded on the event loop (bigger: a worker thread),
#: so that a hostile one holds the loop up for a millisecond or two at most
INLINE_STATE_BYTES = 64 << 10
#: what one receive of a state blob may take
_STATE_RECV = 64 << 10


def _small(ctx: CommandContext) -> bool:
    """A machine whose state is saved or restored on the event loop: built (a restore that
    must build it first takes a worker thread), with few vCPUs, and no disk (its state
    reads the disk for the identity's fingerprint: disk I/O stays off the loop)."""
    return 1 <= ctx.machine.vcpu_count <= INLINE_STATE_VCPUS and not ctx.machine.has_disk


async def _dump_state_to_socket(ctx: CommandContext, fd: int) -> dict[str, Any]:
    # (the reply before this one, the chain's dump-dirty, is in the socket already: the
    # server sends a reply straight when nothing is queued before it)
    blob = ctx.machine.state_blob()
    await _send_socket(ctx, fd, blob)
    ctx.progress("state", len(blob), len(blob))
    return {"bytes": len(blob), "sections": []}


async def _send_socket(ctx: CommandContext, fd: int, data: bytes) -> None:
    """All of ``data`` into the socket ``fd``, waiting on the event loop while it is full."""
    waited = False
    try:
        sent = 0
        while sent < len(data):
            moved = send_nowait(fd, data[sent:] if sent else data)
            if moved is None:
                waited = True
                await trio.lowlevel.wait_writable(fd)
            else:
                sent += moved
    except PeerClosed as exc:
        raise CommandError("peer-closed", f"{ctx.command}: {exc}") from None
    except OSError as exc:
        raise _command_error(ctx, exc) from None
    finally:
        if waited:
            trio.lowlevel.notify_closing(fd)  # the server closes it once answered


async def _load_state_from_socket(ctx: CommandContext, fd: int, accept_disk: bool) -> Any:
    waited = False

    async def receive(buffer: bytearray, size: int) -> int:
        """Up to ``size`` more bytes onto the end of ``buffer``: how many (0: input ended)."""
        nonlocal waited
        start = len(buffer)
        buffer.extend(bytes(size))  # grown by what may arrive now, at most _STATE_RECV
        while True:
            moved = recv_nowait(fd, buffer, start, size)
            if moved is not None:
                del buffer[start + moved :]
                return moved
            waited = True
            await trio.lowlevel.wait_readable(fd)

    try:
        if _small(ctx) and recv_nowait(fd, bytearray(1), 0, 1, peek=True) is None:
            # nothing there yet (the source is still pausing): warm the path up meanwhile
            ctx.machine.rehearse_load_state()
        header = bytearray()
        while len(header) < STATE_HEADER_SIZE:
            if not await receive(header, STATE_HEADER_SIZE - len(header)):
                raise truncated_header(
                    f"the input ended {STATE_HEADER_SIZE - len(header)} bytes early"
                )
        length, stored = state_blob_header(header)
        payload = bytearray()
        while len(payload) < length:
            if not await receive(payload, min(length - len(payload), _STATE_RECV)):
                raise truncated_payload(length - len(payload))
        if length <= INLINE_STATE_BYTES and _small(ctx):
            state = state_from_payload(payload, stored)
            return ctx.machine.restore_state(state, accept_disk=accept_disk)
        return await trio.to_thread.run_sync(
            lambda: ctx.machine.restore_state(
                state_from_payload(payload, stored), accept_disk=accept_disk
            )
        )
    except PeerClosed as exc:
        raise CommandError("peer-closed", f"{ctx.command}: {exc}") from None
    except (BulkError, OSError) as exc:
        raise _command_error(ctx, exc) from None
    finally:
        if waited:
            trio.lowlevel.notify_closing(fd)  # the server closes it once answered


# --- the block device's image (1.9) ------------------------------------------------------------


@handler("dump-disk")
async def dump_disk(ctx: CommandContext) -> dict[str, Any]:
    """The image, sparsely, as a snapshot's ``disk`` section (vmm/persist/diskdump.py)."""
    fd = ctx.fds["out"]
    _require_file(ctx, "out", "snapshot")
    _require_positional(ctx, "out", "snapshot")
    try:
        dump = await _run_bulk(ctx, "disk", lambda t: ctx.machine.dump_disk(fd, t))
    except NoDisk as exc:
        raise CommandError(ErrorCode.NO_DISK, f"dump-disk: {exc}") from None
    stats = dump.stats
    return {
        "disk_size": stats.disk_size,
        "data_bytes": stats.data_bytes,
        "extents": stats.extents,
        "bytes": stats.bytes,
        "section": dump.section.to_dict(),
    }


# --- dirty pages -------------------------------------------------------------------------------


@handler("dirty-log-start", exclusive=True)
async def dirty_log_start(ctx: CommandContext) -> dict[str, Any]:
    return {"epoch": await trio.to_thread.run_sync(ctx.machine.dirty_log_start)}


@handler("dirty-log-stop", exclusive=True)
async def dirty_log_stop(ctx: CommandContext) -> dict[str, Any]:
    await trio.to_thread.run_sync(ctx.machine.dirty_log_stop)
    return {}


def _dirty_log_off(ctx: CommandContext) -> CommandError:
    return CommandError(
        ErrorCode.DIRTY_LOG_OFF, f"{ctx.command}: dirty logging is off (send dirty-log-start)"
    )


@handler("query-dirty")
async def query_dirty(ctx: CommandContext) -> dict[str, Any]:
    try:
        count = await trio.to_thread.run_sync(ctx.machine.query_dirty)
    except DirtyLogOff:
        raise _dirty_log_off(ctx) from None
    return {
        "dirty_pages": count.pages,
        "dirty_bytes": count.pages * PAGE_SIZE,
        "epoch": count.epoch,
    }


@handler("dump-dirty")
async def dump_dirty(ctx: CommandContext) -> dict[str, Any]:
    fd = ctx.fds["out"]
    section = None
    if ctx.args["format"] == "snapshot":
        _require_file(ctx, "out", "snapshot")
        _require_positional(ctx, "out", "snapshot", read=True)
        section = ctx.args["section"]
        if section is None:
            raise CommandError(
                ErrorCode.INVALID_ARGUMENTS,
                "dump-dirty: format snapshot needs section (the memory section's offset)",
                {"argument": "section", "problem": "required with format snapshot"},
            )
    epoch = ctx.args["epoch"]
    # before anything is taken: a refused request must not lose the dirty pages
    hashed = _hash_payload(ctx, ctx.args["format"], fd)
    try:
        if section is None and fd_kind(fd) == "socket":
            dump = await _dump_dirty_to_socket(ctx, fd, epoch, hashed)
        else:
            dump = await _run_bulk(
                ctx,
                "pages",
                lambda t: ctx.machine.dump_dirty(
                    fd, t, epoch=epoch, section=section, hash_payload=hashed
                ),
            )
    except DirtyLogOff:
        raise _dirty_log_off(ctx) from None
    except DirtyLogMoved as exc:
        raise CommandError(
            ErrorCode.DIRTY_LOG_MOVED,
            f"dump-dirty: {exc}; nothing was taken",
            {"expected": exc.expected, "epoch": exc.current},
        ) from None
    return {**_stats(dump.stats, consistent=dump.consistent), "epoch": dump.epoch}


#: dirty pages up to which a page stream to a socket is made in memory and sent from the
#: event loop (more: a worker thread writes it): a paused idle guest's last round
INLINE_DIRTY_PAGES = 64
#: what such a stream may take: the pages, and records of at most 32 bytes per page
_INLINE_DIRTY_BYTES = INLINE_DIRTY_PAGES * (PAGE_SIZE + 32) + 4096


async def _dump_dirty_to_socket(
    ctx: CommandContext, fd: int, epoch: str | None, hashed: bool
) -> DirtyDump:
    """dump-dirty as a page stream into a socket: the pages taken on the event loop (an
    ioctl and a bitmap walk), and when they are few the stream made in memory and sent
    from the loop (see the state blob's reasons above), else written by a worker."""
    taken = ctx.machine.take_dirty(epoch)
    if taken.pages > INLINE_DIRTY_PAGES:
        return await _run_bulk(
            ctx, "pages", lambda t: ctx.machine.send_dirty(fd, t, taken, hash_payload=hashed)
        )
    gathered = BufferTransfer(_INLINE_DIRTY_BYTES)
    dump = ctx.machine.send_dirty(fd, gathered, taken, hash_payload=hashed)
    await _send_socket(ctx, fd, bytes(gathered.data))
    ctx.progress("pages", taken.pages * PAGE_SIZE, taken.pages * PAGE_SIZE)
    return dump


# --- the incoming machine ----------------------------------------------------------------------


@handler("configure", exclusive=True)
async def configure(ctx: CommandContext) -> dict[str, Any]:
    memory_size, vcpus = ctx.args["memory_size"], ctx.args["vcpus"]
    try:
        config = await trio.to_thread.run_sync(ctx.machine.configure_incoming, memory_size, vcpus)
    except ValueError as exc:
        raise CommandError(
            ErrorCode.INVALID_ARGUMENTS,
            f"configure: {exc}"[:240],
            {"argument": "memory_size", "problem": str(exc)[:200]},
        ) from None
    return {"memory_size": config.memory_size, "vcpus": config.vcpus}


@handler("attach-disk", exclusive=True)
async def attach_disk(ctx: CommandContext) -> dict[str, Any]:
    fd, readonly = ctx.fds["disk"], ctx.args["readonly"]
    try:
        size = await trio.to_thread.run_sync(lambda: ctx.machine.attach_disk(fd, readonly=readonly))
    except DiskImageError as exc:
        raise CommandError(
            ErrorCode.INVALID_FDS,
            f"attach-disk: {exc}",
            {"fd": "disk", "problem": exc.problem},
        ) from None
    except DiskPresent as exc:
        raise CommandError(ErrorCode.DISK_PRESENT, f"attach-disk: {exc}") from None
    return {"size": size}
