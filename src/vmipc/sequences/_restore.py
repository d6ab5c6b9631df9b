"""Restore: a snapshot file (or an incremental chain) loaded into an incoming VMM.

The exact guarantee of every step is in docs/sequences.md.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from vmipc.client import Client, open_client
from vmipc.sequences._common import (
    ProgressCallback,
    SequenceError,
    best_effort,
    describe,
    watch_progress,
)
from vmipc.sequences._steps import StepHook, Steps, StepTiming, observe_replies
from vmipc.snapshots import ChainError, ChainLink, extract_disk, resolve_chain, verify_links


@dataclass(frozen=True)
class RestoreReport:
    path: str
    vm: str
    vcpus: int
    memory_size: int
    total_s: float
    #: the files loaded, base first (one for a full snapshot)
    chain: list[str] = field(default_factory=list)
    #: every step as it ran, in order (docs/sequences.md#timelines)
    timeline: tuple[StepTiming, ...] = ()


async def restore_into(
    client: Client,
    path: str,
    *,
    resume: bool = True,
    discard_on_failure: bool = False,
    parents: Sequence[str] = (),
    chain_dir: str | None = None,
    verify: bool = False,
    disk: str | None = None,
    disk_readonly: bool = False,
    disk_from_snapshot: str | None = None,
    accept_disk: bool = False,
    on_step: StepHook | None = None,
    on_progress: ProgressCallback | None = None,
) -> RestoreReport:
    """Restore the snapshot at ``path`` into an incoming VMM (``vmipc vmm --incoming``)::

        query-status                      must be incoming
        (disk-from-snapshot)              the file's disk section written out to a new image
        attach-disk                       with ``disk``: the image, opened here
        load-memory format=snapshot       checks the file; builds the machine from config
        load-state  format=snapshot       (accept_disk: with another disk than the file's)
        resume                            (unless resume=False: it stays paused)

    ``disk``: the path of the disk image the VMM gets as an fd (``attach-disk``; read-only
    with ``disk_readonly``) — for a VMM started without ``--disk``. Either way the VMM's
    disk must be the one the snapshot was taken with (its size and fingerprint), else
    ``load-state`` is refused, unless ``accept_disk``.

    ``disk_from_snapshot``: instead of ``disk``, a new image file (never an existing one)
    that the snapshot's disk section (``vmipc checkpoint --with-disk``) is written out to,
    here, and passed in its recorded mode; removed again when the restore fails, as no VM
    has run on it.

    ``load-memory`` of a file checks it as ``vmm --restore`` does (its structure, the
    state sections' checksums, the memory's layout) and maps its memory section lazily
    under a read lease, so its time does not grow with the data; the memory section's
    checksum, which reads every byte, is checked first with ``verify`` (as ``vmm --restore
    --verify``), else not at all.

    An incremental snapshot is restored with its chain: its parents are looked for among
    ``parents`` (files) and the snapshots in ``chain_dir``, and each link's parent id and
    table checksum are checked, and every increment verified, before anything is sent.
    Then ``load-memory`` of the base, ``apply-pages`` of each increment's page stream in
    order (the fd positioned at its memory data), ``load-state`` of ``path``, ``resume``.

    On failure nothing runs (a failed load makes the VMM refuse resume); with
    ``discard_on_failure`` the incoming VMM is also told to quit. ``on_step``: called
    with the name of each step before it runs; ``on_progress``: with the data of each
    ``progress`` event of the loads.
    """
    started = time.monotonic()
    steps = Steps(on_step, phase="restore")

    async def not_started(exc: BaseException) -> str:
        outcome = "the incoming VM was not started"
        if discard_on_failure and isinstance(exc, Exception):
            _, error = await best_effort(client.quit)
            outcome += (
                "; its VMM was told to quit"
                if error is None
                else f"; quitting its VMM failed ({describe(error)})"
            )
        return outcome

    async with (
        observe_replies(steps, client),
        watch_progress(on_progress, client),
        steps.phase(not_started),
    ):
        async with steps.step("query-status"):
            status = await client.query_status()
            if status["state"] != "incoming":
                raise SequenceError(
                    "query-status",
                    f"the VMM is {status['state']}, not incoming",
                    "nothing was done",
                )
        async with steps.step("chain"):
            chain = await trio.to_thread.run_sync(_find_chain, path, parents, chain_dir, verify)
        if disk is not None and disk_from_snapshot is not None:
            raise ValueError("disk and disk_from_snapshot exclude each other")
        written: str | None = None
        try:
            if disk_from_snapshot is not None:
                async with steps.step("disk-from-snapshot"):
                    extracted = await trio.to_thread.run_sync(
                        extract_disk, path, disk_from_snapshot
                    )
                written, disk, disk_readonly = extracted.path, extracted.path, extracted.readonly
            if disk is not None:
                async with steps.step("attach-disk"):
                    await attach_disk(client, disk, readonly=disk_readonly)
            loaded = await _load(client, steps, chain, accept_disk=accept_disk)
        except BaseException:
            if written is not None:  # nothing loaded, no VM can run on it: this restore's alone
                with contextlib.suppress(OSError):
                    os.unlink(written)
            raise
        if resume:
            async with steps.step("resume"):
                await client.resume()
    return RestoreReport(
        path=path,
        vm="running" if resume else "paused",
        vcpus=loaded["vcpus"],
        memory_size=loaded["memory_size"],
        total_s=time.monotonic() - started,
        chain=[link.path for link in chain],
        timeline=steps.timeline(),
    )


def _find_chain(
    path: str, parents: Sequence[str], chain_dir: str | None, verify: bool
) -> list[ChainLink]:
    """The chain of ``path``, each increment verified (small files), and the base too
    (every byte) with ``verify``."""
    links = resolve_chain(path, parents=parents, chain_dir=chain_dir)
    verify_links(links, base=verify)
    return links


async def attach_disk(client: Client, path: str, *, readonly: bool = False) -> int:
    """Open the disk image at ``path`` here and pass it to the incoming VMM behind
    ``client`` (``attach-disk``); returns its size. OSError if it cannot be opened."""
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
    fd = os.open(path, flags)
    try:
        result = await client.attach_disk(disk=fd, readonly=readonly)
    finally:
        os.close(fd)
    size: int = result["size"]
    return size


async def _load(
    client: Client, steps: Steps, chain: list[ChainLink], *, accept_disk: bool = False
) -> Any:
    """``load-memory`` of the base, ``apply-pages`` of each increment, ``load-state`` of
    the newest; returns load-state's result."""
    with contextlib.ExitStack() as files:
        opened = [files.enter_context(open(link.path, "rb")) for link in chain]
        async with steps.step("load-memory"):
            await client.load_memory(format="snapshot", in_=opened[0].fileno())
        for link, snapshot in zip(chain[1:], opened[1:], strict=True):
            async with steps.step(f"apply-pages {link.path}"):
                fd = snapshot.fileno()
                os.lseek(fd, link.memory.data_offset, os.SEEK_SET)
                applied = await client.apply_pages(in_=fd)
                if applied["bytes"] != link.memory.data_size:
                    raise ChainError(
                        f"{link.path}: the page stream is {applied['bytes']} bytes, "
                        f"its memory section {link.memory.data_size}"
                    )
        async with steps.step("load-state"):
            # accept_disk goes out only when true: an older VMM knows no such argument
            return await client.load_state(
                format="snapshot", in_=opened[-1].fileno(), accept_disk=accept_disk
            )


def restore_into_blocking(socket_path: str, path: str, **options: Any) -> RestoreReport:
    async def main() -> RestoreReport:
        async with open_client(socket_path, client_name="vmipc restore") as client:
            return await restore_into(client, path, **options)

    return trio.run(main)


__all__ = ["RestoreReport", "restore_into", "restore_into_blocking"]
