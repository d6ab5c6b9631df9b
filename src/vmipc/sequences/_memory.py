"""The memory part of a checkpoint, one strategy per kind: a full one (an image dumped
while the VM is paused), an increment (the pages written since the parent, around a
``dump-dirty`` page stream) and a live one (RAM copied while the guest runs, brought up to
date while it is paused). The rest of a checkpoint is the same for all three
(``_checkpoint.py``); each strategy is called at the same points of it:

    (chosen by ``_checkpoint._memory_for``, nothing done yet: what it needs is checked)
    before_pause                             the guest runs (live: the pre-copy)
    while_paused                             after dump-state: the memory section
    after_resume                             (live) the memory section's checksum
    abandon                                  a failure before the pause: undo own work

Everything they write goes through the run they are given (its file, entries, dirty log
and steps), so that the run's rollback sees it.
"""

from __future__ import annotations

import math
import os
import time
from typing import TYPE_CHECKING

import trio

from vmipc.client import Client, CommandError
from vmipc.formats import SectionEntry, SnapshotHeader, new_snapshot_id, section_offset
from vmipc.formats.snapshot import FLAG_INCREMENTAL, MEMORY_DESCRIPTOR_SIZE
from vmipc.sequences._common import SequenceError, best_effort
from vmipc.snapshots import (
    ChainError,
    ChainLink,
    increment_descriptor,
    increment_entry,
    new_header,
    pwrite_all,
    read_dirty_epoch,
    rehashed,
)

if TYPE_CHECKING:
    from vmipc.sequences._checkpoint import _Checkpoint

DIRTY_LOG_OFF_HINT = (
    "take a full checkpoint with --track (Full(track=True)) first; a restarted or restored "
    "VMM, a failed incremental checkpoint or a migration that gave up needs a new full one"
)

STALE_PARENT_HINT = (
    "take the increment from the newest snapshot of the chain, or a full checkpoint with "
    "--track (Full(track=True)) to start a new chain"
)

#: a live checkpoint's rounds while the guest runs, at most
LIVE_ROUNDS = 5
#: it stops them once the last round, paused, is predicted to take no longer than this
LIVE_TARGET_S = 0.02
_PAGE = 4096


class FullMemory:
    """A full checkpoint's memory: ``dump-memory`` while the VM is paused (an image).
    With ``track``, dirty logging is started afresh right after it, so that an increment
    can follow. The base of the other strategies: each step does nothing by default."""

    #: the memory section is hashed anew after the resume, then the file sealed
    seals_after_resume = False
    #: the parent, for an increment
    parent: ChainLink | None = None
    #: data pages in an increment's memory section
    pages: int | None = None

    def __init__(self, track: bool) -> None:
        self.track = track

    @property
    def records_epoch(self) -> bool:
        """Whether the snapshot records the dirty-log epoch (when logging runs)."""
        return True

    def header(self, producer: str) -> SnapshotHeader:
        return new_header(producer)

    async def before_pause(self, run: _Checkpoint) -> None:
        pass

    async def while_paused(self, run: _Checkpoint) -> None:
        async with run.steps.step("dump-memory"):
            memory = await run.client.dump_memory(format="snapshot", out=run.file.fd)
            assert memory["section"] is not None
            run.entries.append(SectionEntry.from_dict(memory["section"]))
        if self.track:
            # afresh: pages dirty from an earlier chain must not count
            async with run.steps.step("dirty-log-start"):
                run.dirty.touched = True
                await run.client.dirty_log_stop()
                run.dirty.epoch = (await run.client.dirty_log_start()).get("epoch")

    async def after_resume(self, run: _Checkpoint) -> None:
        pass

    async def abandon(self, run: _Checkpoint) -> None:
        pass


class IncrementMemory(FullMemory):
    """An increment's memory: the pages written since ``parent`` was taken. The client
    writes a memory descriptor (encoding page stream), ``dump-dirty`` writes the stream at
    the fd's position right after it, in the dirty-log epoch the parent recorded, and the
    client reads the section back for its checksum."""

    def __init__(self, parent: ChainLink, track: bool) -> None:
        super().__init__(track)
        self.parent = parent

    def header(self, producer: str) -> SnapshotHeader:
        assert self.parent is not None
        return SnapshotHeader(
            new_snapshot_id(),
            producer,
            flags=FLAG_INCREMENTAL,
            parent_id=self.parent.header.snapshot_id,
            parent_checksum=self.parent.table_checksum,
            created_ns=time.time_ns(),
        )

    async def while_paused(self, run: _Checkpoint) -> None:
        assert self.parent is not None
        async with run.steps.step("dump-dirty"):
            run.dirty.touched = True
            try:
                entry, self.pages, run.dirty.epoch = await _dump_increment(
                    run.client, run.file.fd, self.parent, run.dirty.epoch
                )
            except CommandError as exc:
                if exc.code == "dirty-log-moved":
                    # nothing was taken: the dirty log is as it was, for the real newest
                    run.dirty.touched = False
                raise
            run.entries.append(entry)


class LiveMemory(FullMemory):
    """A live checkpoint's memory: the file is created and RAM copied into it while the
    guest runs, then rounds of the pages dirtied meanwhile (dirty logging started for it
    if off); while paused one last round brings the copy to the paused moment, and after
    the resume the section is hashed anew. Logging it started for itself is stopped
    again unless ``track``."""

    seals_after_resume = True

    def __init__(self, track: bool, logging_before: bool) -> None:
        super().__init__(track)
        self.logging_before = logging_before
        self.entry: SectionEntry | None = None

    @property
    def records_epoch(self) -> bool:
        # a live checkpoint that started dirty logging for itself stops it afterwards:
        # its epoch then names nothing
        return self.track or self.logging_before

    async def before_pause(self, run: _Checkpoint) -> None:
        async with run.steps.step("dirty-log-start"):
            run.dirty.touched = True
            run.dirty.epoch = (await run.client.dirty_log_start())["epoch"]
        async with run.steps.step("live pre-copy"):
            self.entry, run.dirty.epoch = await _live_precopy(
                run.client, run.file.fd, run.dirty.epoch
            )

    async def while_paused(self, run: _Checkpoint) -> None:
        assert self.entry is not None
        # bring the copy taken while the guest ran up to this paused moment
        async with run.steps.step("last dirty round"):
            last = await run.client.dump_dirty(
                format="snapshot", section=self.entry.offset, out=run.file.fd, epoch=run.dirty.epoch
            )
            run.dirty.epoch = last["epoch"]
            # first in the file; its checksum is recomputed after the resume
            run.entries.insert(0, self.entry)

    async def after_resume(self, run: _Checkpoint) -> None:
        stale = self.entry
        assert stale is not None
        async with run.steps.step("seal"):
            fresh = await trio.to_thread.run_sync(rehashed, run.file.fd, stale)
            run.entries = [fresh if e is stale else e for e in run.entries]
            await run.seal()
            if not self.records_epoch:
                # it only served this checkpoint; failing to stop it costs the guest a
                # little speed, not the snapshot
                await best_effort(run.client.dirty_log_stop)
                run.dirty.touched = False

    async def abandon(self, run: _Checkpoint) -> None:
        if not self.logging_before:
            await best_effort(run.client.dirty_log_stop)


async def dirty_epoch(client: Client) -> str | None:
    """The VMM's dirty-log epoch now, or None when dirty logging is off (or the VMM is
    older than protocol 1.5 and has no epochs)."""
    try:
        return (await client.query_dirty()).get("epoch")
    except CommandError as exc:
        if exc.code != "dirty-log-off":
            raise
        return None


async def check_tracking(client: Client, parent: ChainLink, memory_size: int) -> str | None:
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
    pwrite_all(fd, increment_descriptor(parent.memory.descriptor), offset)
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
