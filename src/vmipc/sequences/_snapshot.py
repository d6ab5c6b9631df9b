"""Checkpoint, suspend and restore: building blocks composed into one snapshot file.

A checkpoint is, in this order (each line one building block, or the client's own small
write)::

    query-status                      running or paused?
    pause                             (only if it was running)
    <client> create TEMP (same directory, O_EXCL), write the header at 0
    dump-state  format=snapshot       the VMM appends config, vcpus, devices
    dump-memory format=snapshot       the VMM appends the memory section
    <client> write the section table + trailer (encode_table), fsync TEMP
    resume                            (checkpoint, only if it paused the VM)
    <client> verify TEMP, rename TEMP -> FILE, fsync the directory
    quit                              (suspend only, after the rename is durable)

The exact guarantee of every step is in docs/sequences.md.
"""

from __future__ import annotations

import functools
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

import trio

from vmipc import __version__
from vmipc.client import Client, open_client
from vmipc.formats import (
    SectionEntry,
    SnapshotHeader,
    SnapshotReader,
    encode_table,
    new_snapshot_id,
)
from vmipc.sequences._common import (
    SequenceError,
    best_effort,
    describe,
    fsync_dir,
    resume_if_paused,
    unlink_quietly,
)

PRODUCER = f"vmipc {__version__}"
Then = Literal["resume", "pause", "quit"]


@dataclass(frozen=True)
class SnapshotReport:
    """What a checkpoint or suspend did."""

    path: str
    snapshot_id: str
    table_checksum: int
    size: int
    #: the guest's state after the sequence: running, paused or quit
    vm: str
    #: seconds from pause to resume (or to quit for suspend); 0 if it was paused already
    downtime_s: float
    total_s: float
    sections: list[dict[str, Any]]


def temp_path_for(path: str) -> str:
    """A temporary name in the same directory as ``path`` (so the rename is atomic)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{secrets.token_hex(4)}.partial")


def seal(fd: int, entries: list[SectionEntry], header: SnapshotHeader) -> int:
    """Finish a snapshot written by building blocks: the header at 0 and, last, the section
    table and trailer after the sections; then fsync. Returns the table checksum."""
    table = encode_table(entries, header.snapshot_id, os.fstat(fd).st_size)
    os.pwrite(fd, header.encode(), 0)
    os.pwrite(fd, table.data, table.offset)
    os.fsync(fd)
    return table.table_checksum


def verify_file(fd: int, *, full: bool = True) -> None:
    """Raise FormatError unless the file is a complete snapshot (every checksum if full)."""
    reader = SnapshotReader(functools.partial(os.pread, fd), os.fstat(fd).st_size)
    reader.check_complete()
    if full:
        reader.verify()


async def checkpoint(
    client: Client,
    path: str,
    *,
    then: Then = "resume",
    verify: bool = True,
    producer: str = PRODUCER,
) -> SnapshotReport:
    """Write a full snapshot of the VM behind ``client`` to ``path``, atomically.

    ``then``: ``resume`` (a checkpoint: the VM runs again, or stays paused if it was
    paused before), ``pause`` (leave it paused), ``quit`` (suspend: the VMM quits once the
    file is durable under its final name). ``verify`` reads the finished file back and
    checks every checksum before publishing it.

    On failure raises :class:`SequenceError`; the final name is never touched, the
    temporary file is removed, and a VM this call paused is resumed.
    """
    started = time.monotonic()
    status = await client.query_status()
    if status["state"] not in ("running", "paused"):
        raise SequenceError("query-status", f"the VM is {status['state']}", "nothing was done")
    we_paused = status["state"] == "running"
    paused_at = time.monotonic()
    if we_paused:
        await client.pause()
        paused_at = time.monotonic()
    temp = temp_path_for(path)
    step = "create the file"
    fd = -1
    resumed = False
    try:
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        header = SnapshotHeader(new_snapshot_id(), producer, created_ns=time.time_ns())
        os.pwrite(fd, header.encode(), 0)
        step = "dump-state"
        state = await client.dump_state(format="snapshot", out=fd)
        step = "dump-memory"
        memory = await client.dump_memory(format="snapshot", out=fd)
        assert memory["section"] is not None
        step = "seal"
        entries = [SectionEntry.from_dict(e) for e in [*state["sections"], memory["section"]]]
        table_checksum = seal(fd, entries, header)
        downtime = 0.0
        if then == "resume" and we_paused:
            step = "resume"
            await client.resume()
            resumed = True
            downtime = time.monotonic() - paused_at
        if verify:
            step = "verify"
            await trio.to_thread.run_sync(verify_file, fd)
        step = "publish"
        size = os.fstat(fd).st_size
        os.close(fd)
        fd = -1
        os.rename(temp, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
        unlink_quietly(temp)
        outcome = "no snapshot was written"
        if we_paused and not resumed:
            outcome += "; " + await resume_if_paused(client)
        if isinstance(exc, Exception):
            raise SequenceError(step, exc, outcome) from exc
        raise
    vm = "running" if resumed else "paused"
    if then == "quit":
        _, error = await best_effort(client.quit)
        downtime = time.monotonic() - paused_at
        if error is not None:
            raise SequenceError(
                "quit", error, f"the snapshot is complete at {path}; the VM is still paused"
            )
        vm = "quit"
    return SnapshotReport(
        path=path,
        snapshot_id=header.snapshot_id.hex(),
        table_checksum=table_checksum,
        size=size,
        vm=vm,
        downtime_s=downtime,
        total_s=time.monotonic() - started,
        sections=[dict(e.to_dict()) for e in entries],
    )


async def suspend(client: Client, path: str, *, verify: bool = True) -> SnapshotReport:
    """Checkpoint to ``path``, then quit the VMM: the VM lives on only in the file."""
    return await checkpoint(client, path, then="quit", verify=verify)


@dataclass(frozen=True)
class RestoreReport:
    path: str
    vm: str
    vcpus: int
    memory_size: int
    total_s: float


async def restore_into(
    client: Client, path: str, *, resume: bool = True, discard_on_failure: bool = False
) -> RestoreReport:
    """Restore the snapshot at ``path`` into an incoming VMM (``vmipc vmm --incoming``)::

        query-status                      must be incoming
        load-memory format=snapshot       verifies the file; builds the machine from config
        load-state  format=snapshot
        resume                            (unless resume=False: it stays paused)

    On failure nothing runs (a failed load makes the VMM refuse resume); with
    ``discard_on_failure`` the incoming VMM is also told to quit.
    """
    started = time.monotonic()
    step = "query-status"
    try:
        status = await client.query_status()
        if status["state"] != "incoming":
            raise SequenceError(
                step, f"the VMM is {status['state']}, not incoming", "nothing was done"
            )
        with open(path, "rb") as snapshot:
            step = "load-memory"
            await client.load_memory(format="snapshot", in_=snapshot.fileno())
            step = "load-state"
            loaded = await client.load_state(format="snapshot", in_=snapshot.fileno())
        if resume:
            step = "resume"
            await client.resume()
    except SequenceError:
        raise
    except Exception as exc:
        outcome = "the incoming VM was not started"
        if discard_on_failure:
            _, error = await best_effort(client.quit)
            outcome += (
                "; its VMM was told to quit"
                if error is None
                else (f"; quitting its VMM failed ({describe(error)})")
            )
        raise SequenceError(step, exc, outcome) from exc
    return RestoreReport(
        path=path,
        vm="running" if resume else "paused",
        vcpus=loaded["vcpus"],
        memory_size=loaded["memory_size"],
        total_s=time.monotonic() - started,
    )


# --- blocking wrappers ---------------------------------------------------------------------


def checkpoint_blocking(socket_path: str, path: str, **options: object) -> SnapshotReport:
    async def main() -> SnapshotReport:
        async with open_client(socket_path, client_name="vmipc checkpoint") as client:
            return await checkpoint(client, path, **options)  # type: ignore[arg-type]

    return trio.run(main)


def suspend_blocking(socket_path: str, path: str, *, verify: bool = True) -> SnapshotReport:
    return checkpoint_blocking(socket_path, path, then="quit", verify=verify)


def restore_into_blocking(socket_path: str, path: str, **options: object) -> RestoreReport:
    async def main() -> RestoreReport:
        async with open_client(socket_path, client_name="vmipc restore") as client:
            return await restore_into(client, path, **options)  # type: ignore[arg-type]

    return trio.run(main)


__all__ = [
    "RestoreReport",
    "SnapshotReport",
    "checkpoint",
    "checkpoint_blocking",
    "restore_into",
    "restore_into_blocking",
    "seal",
    "suspend",
    "suspend_blocking",
    "temp_path_for",
    "verify_file",
]
