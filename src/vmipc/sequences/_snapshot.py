"""Checkpoint, suspend and restore: building blocks composed into one snapshot file.

A checkpoint is, in this order (each line one building block, or the client's own small
write)::

    query-status                      running or paused?
    pause                             (only if it was running)
    <client> create TEMP (same directory, O_EXCL), write the header at 0
    dump-state  format=snapshot       the VMM appends config, vcpus, devices
    dump-memory format=snapshot       the VMM appends the memory section
    <client> write the section table + trailer (encode_table)
    resume                            (checkpoint, only if it paused the VM)
    <client> verify TEMP, fsync TEMP, rename TEMP -> FILE, fsync the directory
    quit                              (suspend only, after the rename is durable)

An incremental checkpoint (``parent=``) differs in three lines: ``query-dirty`` first
(dirty logging must be running, in the epoch the parent records, else it is refused before
anything happens), the header carries ``FLAG_INCREMENTAL`` and the parent's id and table
checksum, and instead of ``dump-memory`` the client writes a memory descriptor (encoding
page stream) and ``dump-dirty epoch=...`` writes the pages written since the parent right
after it, at the fd's position; the client reads the section back for its checksum. A full
checkpoint with ``track_dirty`` sends ``dirty-log-start`` before resuming, so that the next
incremental one covers exactly the pages written since. Every snapshot taken while dirty
logging runs records the dirty log's epoch in a ``dirty-log`` section.

The exact guarantee of every step is in docs/sequences.md.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from vmipc.client import Client, CommandError, open_client
from vmipc.formats import SectionEntry, SnapshotHeader, new_snapshot_id, section_offset
from vmipc.formats.snapshot import FLAG_INCREMENTAL, MEMORY_DESCRIPTOR_SIZE
from vmipc.sequences._common import (
    DEFAULT_LEASE,
    PauseLease,
    SequenceError,
    best_effort,
    describe,
    resume_if_paused,
    while_renewing,
)
from vmipc.snapshots import (
    PRODUCER,
    ChainError,
    ChainLink,
    PendingFile,
    append_dirty_log,
    increment_descriptor,
    increment_entry,
    read_dirty_epoch,
    read_link,
    rehashed,
    resolve_chain,
    seal,
    verify_file,
    verify_links,
)

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
    #: the parent's snapshot id (an incremental snapshot), else None
    parent_id: str | None = None
    #: dirty logging runs on the VMM, so an incremental checkpoint may follow this one
    tracking: bool = False
    #: pages stored as data in the memory section of an incremental snapshot
    incremental_pages: int | None = None
    #: the dirty-log epoch the snapshot records (its ``dirty-log`` section): an
    #: incremental checkpoint may follow it while the VMM is still in this epoch
    dirty_epoch: str | None = None


DIRTY_LOG_OFF_HINT = (
    "take a full checkpoint with --track (track_dirty=True) first; a restarted or restored "
    "VMM, a failed incremental checkpoint or a migration that gave up needs a new full one"
)


STALE_PARENT_HINT = (
    "take the increment from the newest snapshot of the chain, or a full checkpoint with "
    "--track (track_dirty=True) to start a new chain"
)


async def dirty_epoch(client: Client) -> str | None:
    """The VMM's dirty-log epoch now, or None when dirty logging is off (or the VMM is
    older than protocol 1.5 and has no epochs)."""
    try:
        return (await client.query_dirty()).get("epoch")
    except CommandError as exc:
        if exc.code != "dirty-log-off":
            raise
        return None


async def _check_tracking(client: Client, parent: ChainLink, memory_size: int) -> str | None:
    """An incremental checkpoint needs dirty logging running on a VM with the parent's
    RAM, in the epoch the parent recorded (nobody took dirty pages since the parent was
    taken); raise SequenceError (nothing done) otherwise. Returns the epoch the increment's
    ``dump-dirty`` must find, None for a VMM without epochs (before protocol 1.5: then
    what the chain relies on cannot be checked)."""
    if parent.memory_size != memory_size:
        raise SequenceError(
            "parent",
            f"{parent.path} is a snapshot of a VM with {parent.memory_size} bytes of RAM, "
            f"this one has {memory_size}",
            "nothing was done",
        )
    try:
        recorded = await trio.to_thread.run_sync(read_dirty_epoch, parent.path)
    except ChainError as exc:
        raise SequenceError("parent", exc, "nothing was done") from exc
    try:
        query = await client.query_dirty()
    except CommandError as exc:
        if exc.code != "dirty-log-off":
            raise SequenceError("query-dirty", exc, "nothing was done") from exc
        raise SequenceError(
            "query-dirty",
            "dirty logging is off on this VMM, so the pages written since the parent are unknown",
            f"nothing was done; {DIRTY_LOG_OFF_HINT}",
        ) from exc
    current = query.get("epoch")
    if current is None:
        return None
    if recorded is None:
        raise SequenceError(
            "parent",
            f"{parent.path} records no dirty-log epoch (it was taken while dirty logging "
            "was off, or by an older vmipc), so the pages written since it cannot be told",
            f"nothing was done; {STALE_PARENT_HINT}",
        )
    if recorded != current:
        raise SequenceError(
            "parent",
            f"{parent.path} is not the newest snapshot of this VMM's dirty log: dirty pages "
            "were taken since it (a later increment, a migration's rounds, another client's "
            "dump-dirty) or dirty logging restarted, so an increment from it would miss pages",
            f"nothing was done; dirty logging runs on; {STALE_PARENT_HINT}",
        )
    return recorded


async def _dump_increment(
    client: Client, fd: int, parent: ChainLink, epoch: str | None
) -> tuple[SectionEntry, int, str | None]:
    """The memory section of an increment: the client writes the descriptor, dump-dirty
    (only in the dirty-log ``epoch``, when known) writes its page stream at the fd's
    position right after it, the client reads it back for the checksum. Returns the
    entry, the number of data pages and the new epoch."""
    offset = section_offset(os.fstat(fd).st_size)
    os.pwrite(fd, increment_descriptor(parent.memory.descriptor), offset)
    os.lseek(fd, offset + MEMORY_DESCRIPTOR_SIZE, os.SEEK_SET)
    result = await client.dump_dirty(out=fd, epoch=epoch)  # None: not sent
    written = os.fstat(fd).st_size - offset - MEMORY_DESCRIPTOR_SIZE
    if written != result["bytes"]:
        raise RuntimeError(
            f"dump-dirty reported {result['bytes']} bytes but the file grew by {written}"
        )
    entry, pages = await trio.to_thread.run_sync(
        increment_entry, fd, offset, parent.memory.descriptor
    )
    return entry, pages, result.get("epoch")


#: a live checkpoint's rounds while the guest runs, at most
LIVE_ROUNDS = 5
#: it stops them once the last round, paused, is predicted to take no longer than this
LIVE_TARGET_S = 0.02
_PAGE = 4096


async def _live_precopy(client: Client, fd: int, epoch: str) -> tuple[SectionEntry, str]:
    """A live checkpoint's first part, while the guest runs: its memory section (a copy of
    RAM taken while it changed), then rounds writing the pages dirtied meanwhile into it,
    until the rest is small or stops shrinking. Every round expects the dirty log's
    ``epoch`` (nobody else may take pages: they would be missing from the copy). Returns
    the section's entry (its checksum is stale from the first round on) and the epoch."""
    began = time.monotonic()
    first = await client.dump_memory(format="snapshot", out=fd)
    assert first["section"] is not None
    entry = SectionEntry.from_dict(first["section"])
    rate = max(first["bytes"], _PAGE) / max(time.monotonic() - began, 1e-6)
    smallest = math.inf
    for _ in range(LIVE_ROUNDS):
        dirty = (await client.query_dirty())["dirty_bytes"]
        if dirty / rate <= LIVE_TARGET_S or dirty >= smallest:
            break
        smallest = dirty
        began = time.monotonic()
        done = await client.dump_dirty(format="snapshot", section=entry.offset, out=fd, epoch=epoch)
        epoch = done["epoch"]
        rate = max(done["bytes"], _PAGE) / max(time.monotonic() - began, 1e-6)
    return entry, epoch


#: what a pause lease that ended during the dumps spoils
SNAPSHOT_LEASE_LOST = (
    "the pause lease ended before the snapshot was complete (the VMM resumed the "
    "guest), so the snapshot would not be one consistent moment"
)


async def checkpoint(
    client: Client,
    path: str,
    *,
    then: Then = "resume",
    verify: bool = True,
    producer: str = PRODUCER,
    parent: str | None = None,
    track_dirty: bool = False,
    lease: float | None = DEFAULT_LEASE,
    live: bool = False,
) -> SnapshotReport:
    """Write a snapshot of the VM behind ``client`` to ``path``, atomically.

    ``then``: ``resume`` (a checkpoint: the VM runs again, or stays paused if it was
    paused before), ``pause`` (leave it paused), ``quit`` (suspend: the VMM quits once the
    file is durable under its final name). ``verify`` reads the finished file back and
    checks every checksum before publishing it.

    ``parent``: write an *incremental* snapshot holding only the pages written since the
    snapshot at ``parent`` was taken. Dirty logging must be running on the VMM since then:
    the parent was a full checkpoint with ``track_dirty=True`` or an incremental one, the
    newest of its chain, taken from this VMM. Refused (nothing done) when logging is off.
    ``track_dirty`` (full checkpoints): start dirty logging before resuming, afresh, so
    that an incremental checkpoint can follow. Incremental checkpoints keep it running.

    ``lease``: pause with a pause lease of that many seconds (renewed while the dumps
    run), so that the VMM resumes the guest by itself if this client dies or hangs before
    it resumes the VM or publishes the file; None for a plain pause. Before sealing, a
    renewal (or, for ``pause``, the release) proves the VM stayed paused throughout.

    ``live`` (full checkpoints of a running VM): copy RAM while the guest runs, then bring
    the copy up to date with the pages it wrote meanwhile (``dump-dirty format=snapshot``,
    a few rounds while it runs, the last while paused): the pause lasts about as long as
    the last round and the state, not the whole RAM. It uses dirty logging (started if
    off, stopped again afterwards unless ``track_dirty`` or it was on before) and takes
    its dirty pages: the snapshot records the dirty log's epoch, so an incremental chain
    may continue from it.

    On failure raises :class:`SequenceError`; the final name is never touched, the
    temporary file is removed, and a VM this call paused is resumed. A failure after dirty
    logging was touched (dump-dirty consumed the dirty pages, or tracking was restarted)
    stops dirty logging, so that no later incremental snapshot can miss pages: the next
    checkpoint must be a full one.
    """
    started = time.monotonic()
    try:
        status = await client.query_status()
    except Exception as exc:
        raise SequenceError("query-status", exc, "nothing was done") from exc
    if status["state"] not in ("running", "paused"):
        raise SequenceError("query-status", f"the VM is {status['state']}", "nothing was done")
    base: ChainLink | None = None
    #: the dirty-log epoch: the one the increment's dump-dirty must find; for a full
    #: checkpoint, the one it records when dirty logging runs (asked before the pause:
    #: should it change before the snapshot's moment, an increment from this one is
    #: refused, never wrong)
    epoch: str | None = None
    if parent is not None:
        try:
            base = await trio.to_thread.run_sync(read_link, parent)
        except ChainError as exc:
            raise SequenceError("parent", exc, "nothing was done") from exc
        epoch = await _check_tracking(client, base, int(status["memory_size"]))
    elif not track_dirty:
        try:
            epoch = await dirty_epoch(client)
        except Exception as exc:
            raise SequenceError("query-dirty", exc, "nothing was done") from exc
    track = then != "quit" and (track_dirty or base is not None)
    if live and base is not None:
        raise ValueError("a live checkpoint is a full one: it takes no parent")
    live_run = live and status["state"] == "running"
    target = PendingFile(path)
    fd = -1
    tracking_touched = False
    #: dirty logging ran before this checkpoint (someone's chain): leave it on
    logging_before = epoch is not None
    memory_entry: SectionEntry | None = None
    #: a live checkpoint that started dirty logging for itself stops it afterwards: its
    #: epoch then names nothing
    records_epoch = track or logging_before or not live_run
    header = SnapshotHeader(new_snapshot_id(), producer, created_ns=time.time_ns())

    async def abandon_live_file() -> None:
        """Before the pause, a live checkpoint gives up: its file goes, and the dirty
        logging it started for itself."""
        target.discard()
        if not logging_before:
            await best_effort(client.dirty_log_stop)

    if live_run:
        step = "dirty-log-start"
        try:
            fd = target.create()
            os.pwrite(fd, header.encode(), 0)
            tracking_touched = True
            epoch = (await client.dirty_log_start())["epoch"]
            step = "live pre-copy"
            memory_entry, epoch = await _live_precopy(client, fd, epoch)
        except BaseException as exc:
            await abandon_live_file()
            if isinstance(exc, Exception):
                raise SequenceError(step, exc, "no snapshot was written; the VM runs on") from exc
            raise
    we_paused = status["state"] == "running"
    paused_at = time.monotonic()
    leased = False
    if we_paused:
        try:
            leased = (await PauseLease.pause(client, lease)).held
        except BaseException as exc:
            if live_run:
                await abandon_live_file()
            if isinstance(exc, CommandError):
                outcome = "no snapshot was written; the VM is as it was"
                raise SequenceError("pause", exc, outcome) from exc
            if isinstance(exc, Exception):
                # the reply was lost (the VMM died, the connection broke): it may have paused
                outcome = "no snapshot was written; " + await resume_if_paused(client)
                raise SequenceError("pause", exc, outcome) from exc
            raise
        paused_at = time.monotonic()
    renewing = lease if leased else None
    step = "create the file"
    resumed = False
    pages: int | None = None

    async def dumps(fd: int) -> tuple[list[SectionEntry], int | None]:
        nonlocal step, tracking_touched, epoch
        step = "dump-state"
        state = await client.dump_state(format="snapshot", out=fd)
        entries = [SectionEntry.from_dict(e) for e in state["sections"]]
        pages = None
        if memory_entry is not None:
            # live: bring the copy taken while the guest ran up to this paused moment
            step = "last dirty round"
            last = await client.dump_dirty(
                format="snapshot", section=memory_entry.offset, out=fd, epoch=epoch
            )
            epoch = last["epoch"]
            # first in the file; its checksum is recomputed after the resume
            entries.insert(0, memory_entry)
        elif base is None:
            step = "dump-memory"
            memory = await client.dump_memory(format="snapshot", out=fd)
            assert memory["section"] is not None
            entries.append(SectionEntry.from_dict(memory["section"]))
            if track:
                # afresh: pages dirty from an earlier chain must not count
                step = "dirty-log-start"
                tracking_touched = True
                await client.dirty_log_stop()
                epoch = (await client.dirty_log_start()).get("epoch")
        else:
            step = "dump-dirty"
            tracking_touched = True
            try:
                entry, pages, epoch = await _dump_increment(client, fd, base, epoch)
            except CommandError as exc:
                if exc.code == "dirty-log-moved":
                    # nothing was taken: the dirty log is as it was, for the real newest
                    tracking_touched = False
                raise
            entries.append(entry)
        if epoch is not None and records_epoch:
            entries.append(append_dirty_log(fd, epoch))
        return entries, pages

    async def publish(fd: int) -> int:
        nonlocal step
        if verify:
            step = "verify"
            await trio.to_thread.run_sync(verify_file, fd)
        step = "publish"
        return await trio.to_thread.run_sync(target.publish)

    try:
        if fd < 0:
            fd = target.create()
        if base is not None:
            header = SnapshotHeader(
                new_snapshot_id(),
                producer,
                flags=FLAG_INCREMENTAL,
                parent_id=base.header.snapshot_id,
                parent_checksum=base.table_checksum,
                created_ns=time.time_ns(),
            )
        os.pwrite(fd, header.encode(), 0)
        entries, pages = await while_renewing(client, renewing, functools.partial(dumps, fd))
        step = "seal"
        # no fsync here: the file's contents are fixed once the dumps return, so the
        # flush to disk happens after the guest runs again, before the rename (a live
        # checkpoint seals after the resume: its memory section is hashed anew first)
        table_checksum = 0
        if memory_entry is None:
            table_checksum = await trio.to_thread.run_sync(
                functools.partial(seal, fd, entries, header, sync=False)
            )
        if leased:
            # the proof that the VM stayed paused through the dumps; for "pause" the VM
            # stays paused as asked, for "quit" the lease is kept until the file is durable
            step = "release-lease" if then == "pause" else "renew-lease"
            await PauseLease(client, lease).prove(release=then == "pause", lost=SNAPSHOT_LEASE_LOST)
            leased = then != "pause"
        downtime = 0.0
        if then == "resume" and we_paused:
            step = "resume"
            await client.resume()
            resumed = True
            leased = False
            downtime = time.monotonic() - paused_at
        if memory_entry is not None:
            step = "seal"
            fresh = await trio.to_thread.run_sync(rehashed, fd, memory_entry)
            entries = [fresh if e is memory_entry else e for e in entries]
            table_checksum = await trio.to_thread.run_sync(
                functools.partial(seal, fd, entries, header, sync=False)
            )
            if not records_epoch:
                # it only served this checkpoint; failing to stop it costs the guest a
                # little speed, not the snapshot
                await best_effort(client.dirty_log_stop)
                tracking_touched = False
        size = await while_renewing(
            client, lease if leased else None, functools.partial(publish, fd)
        )
        target.close()
    except BaseException as exc:
        target.discard()
        outcome = "no snapshot was written"
        if we_paused and not resumed:
            outcome += "; " + await resume_if_paused(client)
        if tracking_touched:
            _, error = await best_effort(client.dirty_log_stop)
            outcome += (
                "; dirty logging was stopped (the next checkpoint must be a full one)"
                if error is None
                else f"; stopping dirty logging failed ({describe(error)})"
            )
        if isinstance(exc, Exception):
            raise SequenceError(step, exc, outcome) from exc
        raise
    vm = "running" if resumed else "paused"
    if then == "quit":
        if leased:
            try:
                await PauseLease(client, lease).prove(release=True, lost=SNAPSHOT_LEASE_LOST)
            except Exception as exc:
                raise SequenceError(
                    "release-lease",
                    exc,
                    f"the snapshot is complete at {path}; the VM runs on (its pause lease "
                    "ended), so its VMM was not told to quit",
                ) from exc
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
        parent_id=None if base is None else base.snapshot_id,
        tracking=track,
        incremental_pages=pages,
        dirty_epoch=epoch if records_epoch else None,
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
    #: the files loaded, base first (one for a full snapshot)
    chain: list[str] = field(default_factory=list)


async def restore_into(
    client: Client,
    path: str,
    *,
    resume: bool = True,
    discard_on_failure: bool = False,
    parents: Sequence[str] = (),
    chain_dir: str | None = None,
) -> RestoreReport:
    """Restore the snapshot at ``path`` into an incoming VMM (``vmipc vmm --incoming``)::

        query-status                      must be incoming
        load-memory format=snapshot       verifies the file; builds the machine from config
        load-state  format=snapshot
        resume                            (unless resume=False: it stays paused)

    An incremental snapshot is restored with its chain: its parents are looked for among
    ``parents`` (files) and the snapshots in ``chain_dir``, and each link's parent id and
    table checksum are checked, and every increment verified, before anything is sent.
    Then ``load-memory`` of the base, ``apply-pages`` of each increment's page stream in
    order (the fd positioned at its memory data), ``load-state`` of ``path``, ``resume``.

    On failure nothing runs (a failed load makes the VMM refuse resume); with
    ``discard_on_failure`` the incoming VMM is also told to quit.
    """
    started = time.monotonic()
    step = "query-status"
    chain: list[ChainLink] = []
    try:
        status = await client.query_status()
        if status["state"] != "incoming":
            raise SequenceError(
                step, f"the VMM is {status['state']}, not incoming", "nothing was done"
            )
        step = "chain"

        def find_chain() -> list[ChainLink]:
            links = resolve_chain(path, parents=parents, chain_dir=chain_dir)
            verify_links(links)
            return links

        chain = await trio.to_thread.run_sync(find_chain)
        with contextlib.ExitStack() as files:
            opened = [files.enter_context(open(link.path, "rb")) for link in chain]
            step = "load-memory"
            await client.load_memory(format="snapshot", in_=opened[0].fileno())
            for link, snapshot in zip(chain[1:], opened[1:], strict=True):
                step = f"apply-pages {link.path}"
                fd = snapshot.fileno()
                os.lseek(fd, link.memory.data_offset, os.SEEK_SET)
                applied = await client.apply_pages(in_=fd)
                if applied["bytes"] != link.memory.data_size:
                    raise ChainError(
                        f"{link.path}: the page stream is {applied['bytes']} bytes, "
                        f"its memory section {link.memory.data_size}"
                    )
            step = "load-state"
            loaded = await client.load_state(format="snapshot", in_=opened[-1].fileno())
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
        chain=[link.path for link in chain],
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
    "DIRTY_LOG_OFF_HINT",
    "RestoreReport",
    "SnapshotReport",
    "checkpoint",
    "checkpoint_blocking",
    "restore_into",
    "restore_into_blocking",
    "suspend",
    "suspend_blocking",
]
