"""Checkpoint and suspend: building blocks composed into one snapshot file.

A checkpoint is, in this order (each line one building block, or the client's own small
write)::

    query-status                      running or paused?
    pause                             (only if it was running)
    <client> create TEMP (same directory, O_EXCL), write the header at 0
    dump-state  format=snapshot       the VMM appends config, vcpus, devices
    dump-memory format=snapshot       the VMM appends the memory section
    dump-disk                         (with_disk) the VMM appends the disk section
    <client> write the section table + trailer (encode_table)
    resume                            (checkpoint, only if it paused the VM)
    <client> verify TEMP, fsync TEMP, rename TEMP -> FILE, fsync the directory
    quit                              (suspend only, after the rename is durable)

The kind of checkpoint is its :data:`CheckpointMode`: :class:`Full` (``track``: dirty
logging started afresh before resuming, so that an increment can follow),
:class:`Incremental` (only the pages written since ``parent``: ``query-dirty`` first, the
header carries ``FLAG_INCREMENTAL`` and the parent's id and table checksum, and instead of
``dump-memory`` a ``dump-dirty`` page stream) or :class:`Live` (RAM copied while the guest
runs). A mode that makes no sense (an increment without a parent, a live increment)
cannot be written. Every snapshot taken while dirty logging runs records the dirty log's
epoch in a ``dirty-log`` section.

In the code, :class:`_Checkpoint` runs the phases in order (:meth:`_Checkpoint.run`), each
with one rollback; the memory section is a strategy per mode (``_memory.py``), called at
the same points of every checkpoint. The exact guarantee of every step is in
docs/sequences.md.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import trio

from vmipc.client import Client, CommandError, open_client
from vmipc.formats import SectionEntry, SnapshotHeader
from vmipc.sequences._common import (
    DEFAULT_LEASE,
    PauseLease,
    ProgressCallback,
    SequenceError,
    best_effort,
    describe,
    resume_if_paused,
    supports,
    watch_progress,
)
from vmipc.sequences._memory import (
    DIRTY_LOG_OFF_HINT,
    FullMemory,
    IncrementMemory,
    LiveMemory,
    check_tracking,
    dirty_epoch,
)
from vmipc.sequences._steps import StepHook, Steps, StepTiming, nothing_done, observe_replies
from vmipc.snapshots import (
    PRODUCER,
    PendingFile,
    append_dirty_log,
    entries_of,
    pwrite_all,
    read_link,
    seal,
    verify_file,
)

Then = Literal["resume", "pause", "quit"]


# --- the modes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Full:
    """A full checkpoint: the whole RAM, dumped while the VM is paused. ``track``: start
    dirty logging afresh before resuming, so that an :class:`Incremental` one can follow
    (not for a suspend: its VMM quits)."""

    track: bool = False


@dataclass(frozen=True)
class Incremental:
    """Only the pages written since the snapshot at ``parent`` was taken. Dirty logging
    must be running on the VMM since then: the parent was a ``Full(track=True)`` or an
    incremental checkpoint, the newest of its chain, taken from this VMM; refused
    (nothing done) otherwise. Dirty logging keeps running."""

    parent: str


@dataclass(frozen=True)
class Live:
    """A full checkpoint of a running VM that copies RAM while the guest runs, then brings
    the copy up to date with the pages it wrote meanwhile (``dump-dirty format=snapshot``,
    a few rounds while it runs, the last while paused): the pause lasts about as long as
    the last round and the state, not the whole RAM. It uses dirty logging (started if
    off, stopped again afterwards unless ``track`` or it was on before) and takes its
    dirty pages: the snapshot records the dirty log's epoch, so an incremental chain may
    continue from it. Of a paused VM, a plain full checkpoint."""

    track: bool = False


CheckpointMode: TypeAlias = Full | Incremental | Live


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
    #: every step as it ran, in order (docs/sequences.md#timelines)
    timeline: tuple[StepTiming, ...] = field(default=())


#: what a pause lease that ended during the dumps spoils
SNAPSHOT_LEASE_LOST = (
    "the pause lease ended before the snapshot was complete (the VMM resumed the "
    "guest), so the snapshot would not be one consistent moment"
)


async def checkpoint(
    client: Client,
    path: str,
    *,
    mode: CheckpointMode = Full(),
    then: Then = "resume",
    verify: bool = True,
    producer: str = PRODUCER,
    lease: float | None = DEFAULT_LEASE,
    on_step: StepHook | None = None,
    on_progress: ProgressCallback | None = None,
    with_disk: bool = False,
) -> SnapshotReport:
    """Write a snapshot of the VM behind ``client`` to ``path``, atomically.

    ``mode``: :class:`Full` (with or without ``track``), :class:`Incremental` or
    :class:`Live`. ``then``: ``resume`` (a checkpoint: the VM runs again, or stays paused
    if it was paused before), ``pause`` (leave it paused), ``quit`` (suspend: the VMM
    quits once the file is durable under its final name). ``verify`` reads the finished
    file back and checks every checksum before publishing it.

    ``lease``: pause with a pause lease of that many seconds (renewed while the dumps
    run), so that the VMM resumes the guest by itself if this client dies or hangs before
    it resumes the VM or publishes the file; None for a plain pause. Before sealing, a
    renewal (or, for ``pause``, the release) proves the VM stayed paused throughout.

    On failure raises :class:`SequenceError`; the final name is never touched, the
    temporary file is removed, and a VM this call paused is resumed. A failure after dirty
    logging was touched (dump-dirty consumed the dirty pages, or tracking was restarted)
    stops dirty logging, so that no later incremental snapshot can miss pages: the next
    checkpoint must be a full one.

    ``with_disk``: the block device's image goes into the file too (a ``disk`` section,
    ``dump-disk``, while the guest is paused), so that the VM and its disk move as one
    file; a VMM without ``dump-disk`` is refused before anything is done, one without
    a disk fails at ``dump-disk`` (``no-disk``; the VM is resumed, no file is left).

    ``on_step``: called with the name of each step before it runs; ``on_progress``: with
    the data of each ``progress`` event of the dumps (bytes of RAM gone through).
    """
    run = _Checkpoint(client, path, then=then, verify=verify, producer=producer, lease=lease)
    run.with_disk = with_disk
    run.steps = Steps(on_step)
    async with observe_replies(run.steps, client), watch_progress(on_progress, client):
        return await run.run(mode)


async def suspend(
    client: Client,
    path: str,
    *,
    mode: Full | Incremental = Full(),
    verify: bool = True,
) -> SnapshotReport:
    """Checkpoint to ``path``, then quit the VMM: the VM lives on only in the file."""
    return await checkpoint(client, path, mode=mode, then="quit", verify=verify)


@dataclass
class _DirtyLog:
    """What a checkpoint knows of the VMM's dirty log, and what it did to it."""

    #: the epoch an increment's dump-dirty must find, or the one the snapshot records
    epoch: str | None = None
    #: dirty pages were taken or logging restarted: a failure must stop it (else a later
    #: increment could miss pages)
    touched: bool = False


class _Checkpoint:
    """One checkpoint as it goes: its phases in order (:meth:`run`), what they did so far
    (for the rollback and the report)."""

    #: the memory part of the checkpoint's mode (chosen once what it needs is checked)
    memory: FullMemory
    header: SnapshotHeader
    #: the block device's image goes into the file (a ``disk`` section)
    with_disk: bool = False

    def __init__(
        self,
        client: Client,
        path: str,
        *,
        then: Then,
        verify: bool,
        producer: str,
        lease: float | None,
    ) -> None:
        self.client = client
        self.then = then
        self.verify = verify
        self.producer = producer
        self.lease_seconds = lease
        self.steps = Steps()
        self.started = time.monotonic()
        self.file = PendingFile(path)
        self.dirty = _DirtyLog()
        self.entries: list[SectionEntry] = []
        self.table_checksum = 0
        self.lease = PauseLease.none(client)
        self.we_paused = False
        self.resumed = False
        self.paused_at = self.started

    @property
    def path(self) -> str:
        return self.file.path

    async def run(self, mode: CheckpointMode) -> SnapshotReport:
        during = self.steps.during
        async with self.steps.phase(nothing_done):
            with during("prepare"):
                status = await self._query_status()
                self.memory = await self._memory_for(mode, status)
        self.header = self.memory.header(self.producer)
        # the guest runs (a live checkpoint copies RAM meanwhile). The file first: what can
        # fail before the pause does, and the guest never stops for a file it cannot have
        async with self.steps.phase(self._abandon):
            with during("before pause"):
                async with self.steps.step("create the file"):
                    self.create_file()
                await self.memory.before_pause(self)
        with during("paused"):
            await self._pause(status["state"] == "running")
        # the guest is paused. Pipelined requests plug in at _dump: dump-state and the
        # memory part could be sent without waiting for each other's reply
        async with self.steps.phase(self._roll_back):
            with during("paused"):
                await self._while_paused()
                downtime = await self._resume()
            # a suspend (or --leave-paused) keeps the VM paused to the end
            with during("after resume" if self.resumed else "paused"):
                await self.memory.after_resume(self)
                size = await self.lease.keep_while(self._publish)
                self.file.close()
        # the snapshot is complete under its final name
        vm = "running" if self.resumed else "paused"
        if self.then == "quit":
            with during("paused"):
                downtime = await self._quit()
            vm = "quit"
        return self._report(size, vm, downtime)

    # --- the phases, in order ----------------------------------------------------------

    async def _query_status(self) -> dict[str, Any]:
        async with self.steps.step("query-status"):
            status = dict(await self.client.query_status())
        if status["state"] not in ("running", "paused"):
            raise SequenceError("query-status", f"the VM is {status['state']}", "nothing was done")
        if self.with_disk and not supports(self.client, "dump-disk"):
            raise SequenceError(
                "query-status",
                "the VMM cannot dump its disk (dump-disk is protocol 1.9)",
                "nothing was done",
            )
        return status

    async def _memory_for(self, mode: CheckpointMode, status: dict[str, Any]) -> FullMemory:
        """The memory strategy of ``mode`` for a VM in ``status``, once what it needs is
        checked. Sets the dirty-log epoch: the one an increment's ``dump-dirty`` must
        find; for a full checkpoint, the one it records when dirty logging runs (asked
        before the pause: should it change before the snapshot's moment, an increment from
        this one is refused, never wrong)."""
        track = self.then != "quit"
        if isinstance(mode, Incremental):
            async with self.steps.step("parent"):
                parent = await trio.to_thread.run_sync(read_link, mode.parent)
            self.dirty.epoch = await check_tracking(self.client, parent, int(status["memory_size"]))
            return IncrementMemory(parent, track)
        if not mode.track:
            async with self.steps.step("query-dirty"):
                self.dirty.epoch = await dirty_epoch(self.client)
        track = track and mode.track
        if isinstance(mode, Live) and status["state"] == "running":
            return LiveMemory(track, logging_before=self.dirty.epoch is not None)
        return FullMemory(track)

    async def _pause(self, running: bool) -> None:
        self.paused_at = time.monotonic()
        if not running:
            return
        async with self.steps.phase(self._abandon_pause), self.steps.step("pause"):
            self.lease = await PauseLease.pause(self.client, self.lease_seconds)
        self.we_paused = True
        self.paused_at = time.monotonic()

    async def _while_paused(self) -> None:
        """The dumps under the pause lease (into the file made before the pause), the
        seal, and the proof that the lease held."""
        await self.lease.keep_while(self._dump)
        if not self.memory.seals_after_resume:
            # no fsync here: the file's contents are fixed once the dumps return, so the
            # flush to disk happens after the guest runs again, before the rename
            async with self.steps.step("seal"):
                await self.seal()
        if self.lease.held:
            # the proof that the VM stayed paused through the dumps; for "pause" the VM
            # stays paused as asked, for "quit" the lease is kept until the file is durable
            release = self.then == "pause"
            async with self.steps.step("release-lease" if release else "renew-lease"):
                await self.lease.prove(release=release, lost=SNAPSHOT_LEASE_LOST)

    async def _dump(self) -> None:
        async with self.steps.step("dump-state"):
            state = await self.client.dump_state(format="snapshot", out=self.file.fd)
            self.entries = entries_of(state)
        await self.memory.while_paused(self)
        if self.dirty.epoch is not None and self.memory.records_epoch:
            self.entries.append(append_dirty_log(self.file.fd, self.dirty.epoch))
        if self.with_disk:
            # the image as the paused guest left it: pause drained the device, and the VMM
            # reads it through the device's own file, so what is not yet flushed is seen
            async with self.steps.step("dump-disk"):
                disk = await self.client.dump_disk(out=self.file.fd)
                self.entries.append(SectionEntry.from_dict(disk["section"]))
            # no flush-devices: the snapshot holds the disk and is fsynced before it is
            # published; the image the guest runs on again is not the snapshot's any more
            return
        if supports(self.client, "flush-devices"):
            # pause drained the block device; its image on disk must match the snapshot
            async with self.steps.step("flush-devices"):
                await self.client.flush_devices()

    async def _resume(self) -> float:
        """Resume a VM this checkpoint paused (``then="resume"``); returns the downtime."""
        if self.then != "resume" or not self.we_paused:
            return 0.0
        async with self.steps.step("resume"):
            await self.client.resume()
            self.resumed = True
            self.lease.ended()
        return time.monotonic() - self.paused_at

    async def _publish(self) -> int:
        if self.verify:
            async with self.steps.step("verify"):
                await trio.to_thread.run_sync(verify_file, self.file.fd)
        async with self.steps.step("publish"):
            return await trio.to_thread.run_sync(self.file.publish)

    async def _quit(self) -> float:
        """Suspend: release the lease (the proof the VM stayed paused until the file was
        durable), quit the VMM; returns the downtime."""
        if self.lease.held:
            outcome = (
                f"the snapshot is complete at {self.path}; the VM runs on (its pause lease "
                "ended), so its VMM was not told to quit"
            )

            async def runs_on(exc: BaseException) -> str:
                return outcome

            async with self.steps.phase(runs_on), self.steps.step("release-lease"):
                await self.lease.prove(release=True, lost=SNAPSHOT_LEASE_LOST)
        async with self.steps.step("quit"):
            _, error = await best_effort(self.client.quit)
        if error is not None:
            raise SequenceError(
                "quit", error, f"the snapshot is complete at {self.path}; the VM is still paused"
            )
        return time.monotonic() - self.paused_at

    # --- what the memory part calls ----------------------------------------------------

    def create_file(self) -> None:
        """Create the temporary file and write the header at 0."""
        fd = self.file.create()
        pwrite_all(fd, self.header.encode(), 0)

    async def seal(self) -> None:
        self.table_checksum = await trio.to_thread.run_sync(
            functools.partial(seal, self.file.fd, self.entries, self.header, sync=False)
        )

    # --- what a failure leaves behind ----------------------------------------------------

    async def _abandon(self, exc: BaseException) -> str:
        """Before the pause: the file goes, and what the memory part did for itself."""
        self.file.discard()
        await self.memory.abandon(self)
        return "no snapshot was written; the VM runs on"

    async def _abandon_pause(self, exc: BaseException) -> str:
        await self._abandon(exc)
        if isinstance(exc, CommandError):
            return "no snapshot was written; the VM is as it was"
        if isinstance(exc, Exception):
            # the reply was lost (the VMM died, the connection broke): it may have paused
            return "no snapshot was written; " + await resume_if_paused(self.client)
        return "no snapshot was written"

    async def _roll_back(self, exc: BaseException) -> str:
        """After the pause: the file goes, a VM this checkpoint paused runs again, and
        dirty logging whose pages were taken is stopped."""
        self.file.discard()
        outcome = "no snapshot was written"
        if self.we_paused and not self.resumed:
            outcome += "; " + await resume_if_paused(self.client)
        if self.dirty.touched:
            _, error = await best_effort(self.client.dirty_log_stop)
            outcome += (
                "; dirty logging was stopped (the next checkpoint must be a full one)"
                if error is None
                else f"; stopping dirty logging failed ({describe(error)})"
            )
        return outcome

    def _report(self, size: int, vm: str, downtime: float) -> SnapshotReport:
        parent = self.memory.parent
        return SnapshotReport(
            path=self.path,
            snapshot_id=self.header.snapshot_id.hex(),
            table_checksum=self.table_checksum,
            size=size,
            vm=vm,
            downtime_s=downtime,
            total_s=time.monotonic() - self.started,
            sections=[dict(e.to_dict()) for e in self.entries],
            parent_id=None if parent is None else parent.snapshot_id,
            tracking=self.memory.track,
            incremental_pages=self.memory.pages,
            dirty_epoch=self.dirty.epoch if self.memory.records_epoch else None,
            timeline=self.steps.timeline(),
        )


# --- blocking wrappers ---------------------------------------------------------------------


def checkpoint_blocking(socket_path: str, path: str, **options: Any) -> SnapshotReport:
    async def main() -> SnapshotReport:
        async with open_client(socket_path, client_name="vmipc checkpoint") as client:
            return await checkpoint(client, path, **options)

    return trio.run(main)


def suspend_blocking(socket_path: str, path: str, *, verify: bool = True) -> SnapshotReport:
    return checkpoint_blocking(socket_path, path, then="quit", verify=verify)


__all__ = [
    "DIRTY_LOG_OFF_HINT",
    "CheckpointMode",
    "Full",
    "Incremental",
    "Live",
    "SnapshotReport",
    "checkpoint",
    "checkpoint_blocking",
    "suspend",
    "suspend_blocking",
]
