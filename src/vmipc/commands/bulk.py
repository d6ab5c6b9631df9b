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
from vmipc.vmm.machine_api import DiskPresent, NoDisk
from vmipc.vmm.persist import BulkError, PeerClosed, Stats, Transfer, TransferCancelled, fd_kind

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


@handler("dump-memory")
async def dump_memory(ctx: CommandContext) -> dict[str, Any]:
    fmt = ctx.args["format"]
    fd = ctx.fds["out"]
    if fmt == "snapshot":
        _require_file(ctx, "out", "snapshot")
        _require_positional(ctx, "out", "snapshot")
    elif fmt == "raw" and fd_kind(fd) == "file":
        _require_positional(ctx, "out", "raw")
    dump = await _run_bulk(ctx, "memory", lambda t: ctx.machine.dump_memory(fd, fmt, t))
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
    stats = await _run_bulk(ctx, "memory", lambda t: ctx.machine.apply_pages(fd, t))
    return _stats(stats, rounds=stats.rounds)


# --- state -----------------------------------------------------------------------------------


@handler("flush-devices")
async def flush_devices(ctx: CommandContext) -> dict[str, Any]:
    try:
        await trio.to_thread.run_sync(ctx.machine.flush_devices)
    except OSError as exc:
        raise _command_error(ctx, exc) from None
    return {}


@handler("dump-state")
async def dump_state(ctx: CommandContext) -> dict[str, Any]:
    fmt = ctx.args["format"]
    fd = ctx.fds["out"]
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
    config = await _run_bulk(
        ctx, "state", lambda t: ctx.machine.load_state(fd, fmt, t, accept_disk=accept_disk)
    )
    return {"vcpus": config.vcpus, "memory_size": config.memory_size}


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
    try:
        dump = await _run_bulk(
            ctx, "pages", lambda t: ctx.machine.dump_dirty(fd, t, epoch=epoch, section=section)
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
