"""Typed command methods, generated from the schema (version 1.10).

Do not edit: run ``python tools/gencode.py``. Their result types are in ``_results``, imported
here for type checkers only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, cast

from vmipc.client._common import FdLike, ProgressCallback

if TYPE_CHECKING:
    from vmipc.client._results import (
        ApplyPagesResult,
        AttachDiskResult,
        CancelResult,
        ClaimPriorityResult,
        ConfigureResult,
        DirtyLogStartResult,
        DirtyLogStopResult,
        DumpDirtyResult,
        DumpDiskResult,
        DumpMemoryResult,
        DumpStateResult,
        FlushDevicesResult,
        HelloResult,
        LoadMemoryResult,
        LoadStateResult,
        PauseResult,
        QueryDirtyResult,
        QueryStatusResult,
        QuitResult,
        ReleaseLeaseResult,
        ReleasePriorityResult,
        RenewLeaseResult,
        ResumeResult,
        SubscribeResult,
    )

SCHEMA_VERSION = "1.10"


class AsyncCommands:
    """One coroutine method per schema command; each sends it with ``call``."""

    async def call(
        self,
        command: str,
        /,
        *,
        fds: Mapping[str, FdLike] | None = None,
        on_progress: ProgressCallback | None = None,
        **args: Any,
    ) -> Any:
        raise NotImplementedError

    async def hello(
        self,
        *,
        versions: list[int],
        client: str = "",
        minor: int | None = None,
    ) -> HelloResult:
        """The handshake: the first request on every connection. Negotiates the protocol version
        (the highest major both sides speak) and returns the server's identity, its catalogue of
        command and event names, its capabilities and its limits. Until it succeeds every other
        request gets ``handshake-required``. From 1.8 a client names its ``minor`` version too.

        Allowed in states: any. Since protocol 1.0.
        Errors: unsupported-version, and the common errors (handshake-required, invalid-message,
        unknown-command, invalid-arguments, invalid-fds, limit-exceeded, shutting-down,
        internal-error, not-permitted, chain-broken).
        """
        args: dict[str, Any] = {"versions": versions}
        if client != "":
            args["client"] = client
        if minor is not None:
            args["minor"] = minor
        return cast("HelloResult", await self.call("hello", **args))

    async def query_commands(self) -> dict[str, Any]:
        """The server's machine-readable catalogue: this very schema document (commands with their
        arguments, fds, results, states, errors and docs; events; error codes; run states), as
        the server implements it.

        Allowed in states: any. Since protocol 1.0.
        Errors: the common errors only (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error,
        not-permitted, chain-broken).
        """
        return cast("dict[str, Any]", await self.call("query-commands"))

    async def subscribe(self, *, events: list[str]) -> SubscribeResult:
        """Choose the events this connection receives. Replaces the previous choice; an empty list
        unsubscribes from everything. ``progress`` events only ever report this connection's own
        requests.

        Allowed in states: any. Since protocol 1.0.
        Errors: the common errors only (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error,
        not-permitted, chain-broken).
        """
        return cast("SubscribeResult", await self.call("subscribe", events=events))

    async def cancel(self, *, request: int) -> CancelResult:
        """Cancel one of this connection's requests that is still in flight. A cancellable request,
        or one that has not started yet, stops and answers with error ``cancelled``; a request
        that cannot be stopped once started completes and answers normally. Closing the
        connection cancels its requests the same way.

        Allowed in states: any. Since protocol 1.0.
        Errors: the common errors only (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error,
        not-permitted, chain-broken).
        """
        return cast("CancelResult", await self.call("cancel", request=request))

    async def query_status(self) -> QueryStatusResult:
        """The machine's run state and shape.

        Allowed in states: any. Since protocol 1.0.
        Errors: the common errors only (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error,
        not-permitted, chain-broken).
        """
        return cast("QueryStatusResult", await self.call("query-status"))

    async def pause(self, *, lease: float | None = None) -> PauseResult:
        """Stop the vCPUs: returns once every vCPU is parked outside KVM_RUN with its pending exit
        completed, so the machine's state is complete and consistent. A plain pause belongs to
        the machine, not to the connection: another connection (or process) may ``resume``, and
        it outlives the connection. With ``lease`` (since 1.3) the pause is tied to this
        connection: if the connection closes, or ``lease`` seconds pass without a ``renew-lease``
        from it, the VMM resumes the guest by itself (it logs a warning and sends
        ``state-change``); ``release-lease`` gives the lease up and leaves the machine paused,
        and any ``resume`` ends it. At most one lease exists (the machine is paused while it
        does).

        Allowed in states: running. Since protocol 1.0.
        Errors: invalid-state, and the common errors (handshake-required, invalid-message,
        unknown-command, invalid-arguments, invalid-fds, limit-exceeded, shutting-down,
        internal-error, not-permitted, chain-broken).
        """
        args: dict[str, Any] = {}
        if lease is not None:
            args["lease"] = lease
        return cast("PauseResult", await self.call("pause", **args))

    async def resume(self) -> ResumeResult:
        """Let the vCPUs of a paused machine run again. Ends a pause lease, whoever holds it.

        Allowed in states: paused. Since protocol 1.0.
        Errors: invalid-state, damaged, and the common errors (handshake-required,
        invalid-message, unknown-command, invalid-arguments, invalid-fds, limit-exceeded,
        shutting-down, internal-error, not-permitted, chain-broken).
        """
        return cast("ResumeResult", await self.call("resume"))

    async def renew_lease(self, *, lease: float | None = None) -> RenewLeaseResult:
        """Extend the pause lease this connection holds: it now expires ``lease`` seconds from now
        (by default after the lease's duration). Succeeds only while the lease still holds, so a
        success also proves that the machine has stayed paused since the ``pause`` that took it.

        Allowed in states: any. Since protocol 1.3.
        Errors: no-lease, and the common errors (handshake-required, invalid-message,
        unknown-command, invalid-arguments, invalid-fds, limit-exceeded, shutting-down,
        internal-error, not-permitted, chain-broken).
        """
        args: dict[str, Any] = {}
        if lease is not None:
            args["lease"] = lease
        return cast("RenewLeaseResult", await self.call("renew-lease", **args))

    async def release_lease(self) -> ReleaseLeaseResult:
        """Give up the pause lease this connection holds without resuming: the machine stays paused,
        now as after a plain ``pause`` (nothing resumes it when this connection closes). Succeeds
        only while the lease still holds, so a success also proves that the machine has stayed
        paused since the ``pause``. Live migration sends it just before resuming the destination,
        so that a client that dies after the switch-over never resumes the source.

        Allowed in states: any. Since protocol 1.3.
        Errors: no-lease, and the common errors (handshake-required, invalid-message,
        unknown-command, invalid-arguments, invalid-fds, limit-exceeded, shutting-down,
        internal-error, not-permitted, chain-broken).
        """
        return cast("ReleaseLeaseResult", await self.call("release-lease"))

    async def claim_priority(self) -> ClaimPriorityResult:
        """This connection's requests go first until ``release-priority`` or until the connection
        closes: while any connection goes first, other connections' requests are held and let
        through one at a time, at most the server's ``held_request_rate`` per second (200 by
        default), in the order they came; they are never refused. For a sequence whose steps must
        not wait behind other clients' queries: live migration claims it for its whole run. The
        holder of the pause lease goes first as well, without a claim, from the moment its
        ``pause`` begins until the lease ends. ``hello`` and ``cancel`` are never held. Several
        connections may hold claims at once; claiming again changes nothing.

        Allowed in states: any. Since protocol 1.4.
        Errors: the common errors only (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error,
        not-permitted, chain-broken).
        """
        return cast("ClaimPriorityResult", await self.call("claim-priority"))

    async def release_priority(self) -> ReleasePriorityResult:
        """End this connection's priority claim (see ``claim-priority``). Its requests go first
        still while it holds the pause lease.

        Allowed in states: any. Since protocol 1.4.
        Errors: the common errors only (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error,
        not-permitted, chain-broken).
        """
        return cast("ReleasePriorityResult", await self.call("release-priority"))

    async def quit(self) -> QuitResult:
        """Shut the VMM down: the server answers, stops accepting connections, tells every other
        connection ``shutting-down``, releases the machine and exits.

        Allowed in states: any. Since protocol 1.0.
        Errors: the common errors only (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error,
        not-permitted, chain-broken).
        """
        return cast("QuitResult", await self.call("quit"))

    async def dump_memory(
        self,
        *,
        format: Literal["stream", "raw", "snapshot"] = "stream",
        checksum: Literal["full", "headers"] = "full",
        out: FdLike,
        on_progress: ProgressCallback | None = None,
    ) -> DumpMemoryResult:
        """Write guest RAM to the ``out`` fd, by the VMM, straight from the memory file (sendfile to
        pipes and sockets, pwrite to files): never through the client. ``format: stream``
        (default) writes one page stream (protocol/page-stream.md): never-touched and all-zero
        pages become zero records, so the stream is about as large as the RAM in use. ``raw``
        writes the flat RAM image (regions in memory-file order; a regular file keeps holes for
        zero pages, and the image replaces what the file held from the fd's position on, so that
        the file ends with it). ``snapshot`` appends the memory section of a snapshot file at the
        file's end and returns its table entry (the fd must be a regular file). ``raw`` into a
        regular file and ``snapshot`` write at file offsets: an fd opened with O_APPEND, which
        would turn them into appends, is refused (``invalid-fds``) before anything is written.
        Allowed while paused (a consistent image) and while running (the first pass of a pre-copy
        migration: each run is copied before it is sent so its checksum is right; with
        ``checksum: headers`` nothing needs to be right, and the runs go zero-copy). Cancellable;
        reports progress in bytes.

        Allowed in states: paused, running. Since protocol 1.1.
        Errors: invalid-state, cancelled, peer-closed, io-error, and the common errors
        (handshake-required, invalid-message, unknown-command, invalid-arguments, invalid-fds,
        limit-exceeded, shutting-down, internal-error, not-permitted, chain-broken).
        """
        args: dict[str, Any] = {}
        if format != "stream":
            args["format"] = format
        if checksum != "full":
            args["checksum"] = checksum
        result = await self.call("dump-memory", **args, fds={"out": out}, on_progress=on_progress)
        return cast("DumpMemoryResult", result)

    async def dump_state(
        self,
        *,
        format: Literal["blob", "snapshot"] = "blob",
        out: FdLike,
        on_progress: ProgressCallback | None = None,
    ) -> DumpStateResult:
        """Write everything that is not RAM — the machine configuration, every vCPU's registers
        (regs, sregs, XSAVE, XCRs, debug registers, LAPIC, MSRs, events, CPUID), the in-kernel
        PICs, IOAPIC, PIT and clock, and the UART — to the ``out`` fd. ``format: blob`` (default)
        writes one self-delimiting, checksummed state blob (protocol/state-blob.md); ``snapshot``
        appends the config, vcpus and devices sections of a snapshot file and returns their table
        entries (a regular file, not opened with O_APPEND: ``invalid-fds``). Only while paused.

        Allowed in states: paused. Since protocol 1.1.
        Errors: invalid-state, cancelled, peer-closed, io-error, and the common errors
        (handshake-required, invalid-message, unknown-command, invalid-arguments, invalid-fds,
        limit-exceeded, shutting-down, internal-error, not-permitted, chain-broken).
        """
        args: dict[str, Any] = {}
        if format != "blob":
            args["format"] = format
        result = await self.call("dump-state", **args, fds={"out": out}, on_progress=on_progress)
        return cast("DumpStateResult", result)

    async def flush_devices(self) -> FlushDevicesResult:
        """Make what the guest wrote to a writable disk durable (fdatasync of its image); a
        read-only disk is never flushed, a VMM without a disk does nothing. ``pause`` drains the
        block device but does not flush it: a checkpoint sends this while the guest is paused, so
        that the image on disk matches the snapshot, and a migration with shared storage sends it
        before the destination may run.

        Allowed in states: paused, running. Since protocol 1.8.
        Errors: invalid-state, io-error, and the common errors (handshake-required,
        invalid-message, unknown-command, invalid-arguments, invalid-fds, limit-exceeded,
        shutting-down, internal-error, not-permitted, chain-broken).
        """
        return cast("FlushDevicesResult", await self.call("flush-devices"))

    async def dump_disk(
        self,
        *,
        out: FdLike,
        on_progress: ProgressCallback | None = None,
    ) -> DumpDiskResult:
        """Write the block device's image to the ``out`` fd as a snapshot file's ``disk`` section
        (protocol/snapshot-file.md), appended at the file's end, and return its table entry (the
        fd must be a regular file, not O_APPEND: ``invalid-fds`` before anything is written).
        Sparse: only the image's data extents are read (SEEK_DATA/SEEK_HOLE) and all-zero 4 KiB
        blocks are left out, so a restore keeps holes as holes; the bytes go from the image to
        the file with copy_file_range where the kernel allows, else pwrite. Paused only: the
        block device is drained, so the image is the paused moment (no flush is needed: the image
        is read through the device's own file). A read-only disk is dumped like a writable one
        (the section records its mode). ``no-disk`` when the VMM has no block device.
        Cancellable; reports progress in bytes of the disk gone through.

        Allowed in states: paused. Since protocol 1.9.
        Errors: invalid-state, no-disk, cancelled, io-error, and the common errors
        (handshake-required, invalid-message, unknown-command, invalid-arguments, invalid-fds,
        limit-exceeded, shutting-down, internal-error, not-permitted, chain-broken).
        """
        result = await self.call("dump-disk", fds={"out": out}, on_progress=on_progress)
        return cast("DumpDiskResult", result)

    async def dirty_log_start(self) -> DirtyLogStartResult:
        """Start dirty-page tracking (KVM's dirty log on every memory slot, plus pages the VMM
        itself writes). The first ``dump-dirty`` sends the pages written since now. Idempotent.

        Allowed in states: paused, running. Since protocol 1.1.
        Errors: invalid-state, and the common errors (handshake-required, invalid-message,
        unknown-command, invalid-arguments, invalid-fds, limit-exceeded, shutting-down,
        internal-error, not-permitted, chain-broken).
        """
        return cast("DirtyLogStartResult", await self.call("dirty-log-start"))

    async def dirty_log_stop(self) -> DirtyLogStopResult:
        """Stop dirty-page tracking and forget pending dirty pages. Idempotent.

        Allowed in states: crashed, paused, running, shutdown. Since protocol 1.1.
        Errors: invalid-state, and the common errors (handshake-required, invalid-message,
        unknown-command, invalid-arguments, invalid-fds, limit-exceeded, shutting-down,
        internal-error, not-permitted, chain-broken).
        """
        return cast("DirtyLogStopResult", await self.call("dirty-log-stop"))

    async def query_dirty(self) -> QueryDirtyResult:
        """How many pages were written since the previous ``dump-dirty`` (or since
        ``dirty-log-start``), without resetting: the next ``dump-dirty`` still sends them.

        Allowed in states: paused, running. Since protocol 1.1.
        Errors: invalid-state, dirty-log-off, and the common errors (handshake-required,
        invalid-message, unknown-command, invalid-arguments, invalid-fds, limit-exceeded,
        shutting-down, internal-error, not-permitted, chain-broken).
        """
        return cast("QueryDirtyResult", await self.call("query-dirty"))

    async def dump_dirty(
        self,
        *,
        format: Literal["stream", "snapshot"] = "stream",
        section: int | None = None,
        epoch: str | None = None,
        checksum: Literal["full", "headers"] = "full",
        out: FdLike,
        on_progress: ProgressCallback | None = None,
    ) -> DumpDirtyResult:
        """Write the pages written since the previous ``dump-dirty`` (or since ``dirty-log-start``)
        to the ``out`` fd as one page stream, and start a new round of tracking. While running,
        pages written during the dump are reported by the next call. With ``epoch`` (since 1.5)
        it takes the pages only if the dirty log is still in that epoch, so a client chaining
        dumps (incremental checkpoints) knows that nobody else took dirty pages since its last
        one. With ``format: snapshot`` (since 1.6) the pages are not sent as a stream but written
        in place into the memory image of a snapshot file's memory section (``section``: its file
        offset, as ``dump-memory format=snapshot`` returned it): each data page at its image
        offset, all-zero pages as holes. A live checkpoint brings a first pass taken while the
        guest ran up to date this way, round after round, the last one while paused; the
        section's checksum is then the client's to recompute.

        Allowed in states: paused, running. Since protocol 1.1.
        Errors: invalid-state, cancelled, peer-closed, io-error, dirty-log-off, dirty-log-moved,
        bad-snapshot, and the common errors (handshake-required, invalid-message,
        unknown-command, invalid-arguments, invalid-fds, limit-exceeded, shutting-down,
        internal-error, not-permitted, chain-broken).
        """
        args: dict[str, Any] = {}
        if format != "stream":
            args["format"] = format
        if section is not None:
            args["section"] = section
        if epoch is not None:
            args["epoch"] = epoch
        if checksum != "full":
            args["checksum"] = checksum
        result = await self.call("dump-dirty", **args, fds={"out": out}, on_progress=on_progress)
        return cast("DumpDirtyResult", result)

    async def load_memory(
        self,
        *,
        format: Literal["stream", "raw", "snapshot"] = "stream",
        in_: FdLike,
        on_progress: ProgressCallback | None = None,
    ) -> LoadMemoryResult:
        """On an incoming VMM: fill guest RAM from the ``in`` fd. ``format: stream`` (default) reads
        one page stream (like ``apply-pages``), ``raw`` a flat image as ``dump-memory`` writes
        it, ``snapshot`` the memory section of a complete snapshot file (on a VMM without a
        machine yet, the machine is built from the file's config section). A regular file on
        which the VMM gets a read lease (one of its own user, opened read-only, nobody writing
        it) is mapped copy-on-write as guest RAM, as ``vmm --restore`` maps it (since 1.8):
        checked first as that checks a file (structure, state sections' checksums, layout), but
        the memory section's checksum is not read (``vmipc snapshot verify`` does; nothing is
        read, so ``bytes`` and ``data_pages`` are 0); a writer of the file then waits until RAM
        is copied off it. Any other fd is read into RAM, its checksum verified first. Allowed
        until the received guest first runs (also after ``load-state``, which may come first); a
        load that fails half-way makes ``resume`` refuse (``damaged``) until a complete load
        succeeds: a ``raw`` image or a ``snapshot`` (whose holes are zeroed), or a page stream
        that covers every page of RAM (as ``dump-memory`` writes one); a stream of some pages
        only (a dirty round, an empty stream) keeps the refusal, but is fine after a complete
        load.

        Allowed in states: incoming, paused. Since protocol 1.1.
        Errors: invalid-state, cancelled, peer-closed, io-error, bad-stream, bad-snapshot,
        not-configured, and the common errors (handshake-required, invalid-message,
        unknown-command, invalid-arguments, invalid-fds, limit-exceeded, shutting-down,
        internal-error, not-permitted, chain-broken).
        """
        args: dict[str, Any] = {}
        if format != "stream":
            args["format"] = format
        result = await self.call("load-memory", **args, fds={"in": in_}, on_progress=on_progress)
        return cast("LoadMemoryResult", result)

    async def apply_pages(
        self,
        *,
        accept_unhashed: bool = False,
        in_: FdLike,
        on_progress: ProgressCallback | None = None,
    ) -> ApplyPagesResult:
        """On an incoming VMM: apply one page stream from the ``in`` fd to guest RAM as it arrives,
        reading exactly the stream (never past its end, so one socket can carry several streams
        in turn). Every round's checksum is verified (over every byte, or over the record headers
        only in a stream written with ``checksum: headers``, which needs ``accept_unhashed``); a
        bad stream answers ``bad-stream``. Allowed until the received guest first runs (also
        after ``load-state``, which may come first); a load that fails half-way makes ``resume``
        refuse (``damaged``) until a complete load succeeds: a ``raw`` image or a ``snapshot``
        (whose holes are zeroed), or a page stream that covers every page of RAM (as
        ``dump-memory`` writes one); a stream of some pages only (a dirty round, an empty stream)
        keeps the refusal, but is fine after a complete load.

        Allowed in states: incoming, paused. Since protocol 1.1.
        Errors: invalid-state, cancelled, peer-closed, io-error, bad-stream, not-configured, and
        the common errors (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error,
        not-permitted, chain-broken).
        """
        args: dict[str, Any] = {}
        if accept_unhashed:
            args["accept_unhashed"] = accept_unhashed
        result = await self.call("apply-pages", **args, fds={"in": in_}, on_progress=on_progress)
        return cast("ApplyPagesResult", result)

    async def configure(self, *, memory_size: int, vcpus: int) -> ConfigureResult:
        """On an incoming VMM started without --memory/--vcpus: build its machine, paused, with no
        guest, so that pages can be loaded into it before the state comes (``load-state`` then
        only sets registers). A live migration sends the source's shape this way. On a VMM that
        has a machine already, the same shape is accepted (nothing changes) and another is
        refused.

        Allowed in states: incoming. Since protocol 1.8.
        Errors: invalid-state, invalid-arguments, and the common errors (handshake-required,
        invalid-message, unknown-command, invalid-arguments, invalid-fds, limit-exceeded,
        shutting-down, internal-error, not-permitted, chain-broken).
        """
        result = await self.call("configure", memory_size=memory_size, vcpus=vcpus)
        return cast("ConfigureResult", result)

    async def attach_disk(self, *, readonly: bool = False, disk: FdLike) -> AttachDiskResult:
        """On an incoming VMM started without --disk: give its block device an image, as the
        ``disk`` fd (the VMM opens nothing itself). The fd must be a regular file or block
        device, open for reading and, unless ``readonly``, for writing too (not O_APPEND), of a
        size that is a positive multiple of 512 bytes; otherwise ``invalid-fds`` and nothing
        changes. The VMM keeps its own duplicate. Send it before ``load-state`` (before or after
        ``configure`` and the memory loads): the state's disk record is then checked against this
        image. A VMM that has a disk already (``vmm --disk``, or an earlier ``attach-disk``)
        refuses with ``disk-present``. ``vmipc restore --disk`` and ``vmipc migrate --disk`` send
        it.

        Allowed in states: incoming. Since protocol 1.9.
        Errors: invalid-state, invalid-fds, disk-present, and the common errors
        (handshake-required, invalid-message, unknown-command, invalid-arguments, invalid-fds,
        limit-exceeded, shutting-down, internal-error, not-permitted, chain-broken).
        """
        args: dict[str, Any] = {}
        if readonly:
            args["readonly"] = readonly
        return cast("AttachDiskResult", await self.call("attach-disk", **args, fds={"disk": disk}))

    async def load_state(
        self,
        *,
        format: Literal["blob", "snapshot"] = "blob",
        accept_disk: bool = False,
        in_: FdLike,
    ) -> LoadStateResult:
        """On an incoming VMM: read the machine state from the ``in`` fd (``format: blob`` as
        ``dump-state`` writes it, or ``snapshot`` sections of a snapshot file) and restore every
        vCPU and device. A VMM started without --memory/--vcpus builds its machine from the
        state's configuration; otherwise the configuration must match. The block device's record
        names the disk the state was taken with (its size and fingerprint, docs/formats.md): this
        VMM's disk must be that one unless ``accept_disk``. The machine is then ``paused``:
        ``resume`` runs the guest.

        Allowed in states: incoming. Since protocol 1.1.
        Errors: invalid-state, cancelled, peer-closed, io-error, bad-state, bad-snapshot, and the
        common errors (handshake-required, invalid-message, unknown-command, invalid-arguments,
        invalid-fds, limit-exceeded, shutting-down, internal-error, not-permitted, chain-broken).
        """
        args: dict[str, Any] = {}
        if format != "blob":
            args["format"] = format
        if accept_disk:
            args["accept_disk"] = accept_disk
        return cast("LoadStateResult", await self.call("load-state", **args, fds={"in": in_}))


class SyncCommands:
    """One blocking method per schema command; each sends it with ``call``."""

    def call(
        self,
        command: str,
        /,
        *,
        fds: Mapping[str, FdLike] | None = None,
        on_progress: ProgressCallback | None = None,
        **args: Any,
    ) -> Any:
        raise NotImplementedError

    def hello(
        self,
        *,
        versions: list[int],
        client: str = "",
        minor: int | None = None,
    ) -> HelloResult:
        """The handshake: the first request on every connection. Negotiates the protocol version
        (the highest major both sides speak) and returns the server's identity, its catalogue of
        command and event names, its capabilities and its limits. Until it succeeds every other
        request gets ``handshake-required``. From 1.8 a client names its ``minor`` version too.

        Allowed in states: any. Since protocol 1.0.
        Errors: unsupported-version, and the common errors (handshake-required, invalid-message,
        unknown-command, invalid-arguments, invalid-fds, limit-exceeded, shutting-down,
        internal-error, not-permitted, chain-broken).
        """
        args: dict[str, Any] = {"versions": versions}
        if client != "":
            args["client"] = client
        if minor is not None:
            args["minor"] = minor
        return cast("HelloResult", self.call("hello", **args))

    def query_commands(self) -> dict[str, Any]:
        """The server's machine-readable catalogue: this very schema document (commands with their
        arguments, fds, results, states, errors and docs; events; error codes; run states), as
        the server implements it.

        Allowed in states: any. Since protocol 1.0.
        Errors: the common errors only (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error,
        not-permitted, chain-broken).
        """
        return cast("dict[str, Any]", self.call("query-commands"))

    def subscribe(self, *, events: list[str]) -> SubscribeResult:
        """Choose the events this connection receives. Replaces the previous choice; an empty list
        unsubscribes from everything. ``progress`` events only ever report this connection's own
        requests.

        Allowed in states: any. Since protocol 1.0.
        Errors: the common errors only (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error,
        not-permitted, chain-broken).
        """
        return cast("SubscribeResult", self.call("subscribe", events=events))

    def cancel(self, *, request: int) -> CancelResult:
        """Cancel one of this connection's requests that is still in flight. A cancellable request,
        or one that has not started yet, stops and answers with error ``cancelled``; a request
        that cannot be stopped once started completes and answers normally. Closing the
        connection cancels its requests the same way.

        Allowed in states: any. Since protocol 1.0.
        Errors: the common errors only (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error,
        not-permitted, chain-broken).
        """
        return cast("CancelResult", self.call("cancel", request=request))

    def query_status(self) -> QueryStatusResult:
        """The machine's run state and shape.

        Allowed in states: any. Since protocol 1.0.
        Errors: the common errors only (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error,
        not-permitted, chain-broken).
        """
        return cast("QueryStatusResult", self.call("query-status"))

    def pause(self, *, lease: float | None = None) -> PauseResult:
        """Stop the vCPUs: returns once every vCPU is parked outside KVM_RUN with its pending exit
        completed, so the machine's state is complete and consistent. A plain pause belongs to
        the machine, not to the connection: another connection (or process) may ``resume``, and
        it outlives the connection. With ``lease`` (since 1.3) the pause is tied to this
        connection: if the connection closes, or ``lease`` seconds pass without a ``renew-lease``
        from it, the VMM resumes the guest by itself (it logs a warning and sends
        ``state-change``); ``release-lease`` gives the lease up and leaves the machine paused,
        and any ``resume`` ends it. At most one lease exists (the machine is paused while it
        does).

        Allowed in states: running. Since protocol 1.0.
        Errors: invalid-state, and the common errors (handshake-required, invalid-message,
        unknown-command, invalid-arguments, invalid-fds, limit-exceeded, shutting-down,
        internal-error, not-permitted, chain-broken).
        """
        args: dict[str, Any] = {}
        if lease is not None:
            args["lease"] = lease
        return cast("PauseResult", self.call("pause", **args))

    def resume(self) -> ResumeResult:
        """Let the vCPUs of a paused machine run again. Ends a pause lease, whoever holds it.

        Allowed in states: paused. Since protocol 1.0.
        Errors: invalid-state, damaged, and the common errors (handshake-required,
        invalid-message, unknown-command, invalid-arguments, invalid-fds, limit-exceeded,
        shutting-down, internal-error, not-permitted, chain-broken).
        """
        return cast("ResumeResult", self.call("resume"))

    def renew_lease(self, *, lease: float | None = None) -> RenewLeaseResult:
        """Extend the pause lease this connection holds: it now expires ``lease`` seconds from now
        (by default after the lease's duration). Succeeds only while the lease still holds, so a
        success also proves that the machine has stayed paused since the ``pause`` that took it.

        Allowed in states: any. Since protocol 1.3.
        Errors: no-lease, and the common errors (handshake-required, invalid-message,
        unknown-command, invalid-arguments, invalid-fds, limit-exceeded, shutting-down,
        internal-error, not-permitted, chain-broken).
        """
        args: dict[str, Any] = {}
        if lease is not None:
            args["lease"] = lease
        return cast("RenewLeaseResult", self.call("renew-lease", **args))

    def release_lease(self) -> ReleaseLeaseResult:
        """Give up the pause lease this connection holds without resuming: the machine stays paused,
        now as after a plain ``pause`` (nothing resumes it when this connection closes). Succeeds
        only while the lease still holds, so a success also proves that the machine has stayed
        paused since the ``pause``. Live migration sends it just before resuming the destination,
        so that a client that dies after the switch-over never resumes the source.

        Allowed in states: any. Since protocol 1.3.
        Errors: no-lease, and the common errors (handshake-required, invalid-message,
        unknown-command, invalid-arguments, invalid-fds, limit-exceeded, shutting-down,
        internal-error, not-permitted, chain-broken).
        """
        return cast("ReleaseLeaseResult", self.call("release-lease"))

    def claim_priority(self) -> ClaimPriorityResult:
        """This connection's requests go first until ``release-priority`` or until the connection
        closes: while any connection goes first, other connections' requests are held and let
        through one at a time, at most the server's ``held_request_rate`` per second (200 by
        default), in the order they came; they are never refused. For a sequence whose steps must
        not wait behind other clients' queries: live migration claims it for its whole run. The
        holder of the pause lease goes first as well, without a claim, from the moment its
        ``pause`` begins until the lease ends. ``hello`` and ``cancel`` are never held. Several
        connections may hold claims at once; claiming again changes nothing.

        Allowed in states: any. Since protocol 1.4.
        Errors: the common errors only (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error,
        not-permitted, chain-broken).
        """
        return cast("ClaimPriorityResult", self.call("claim-priority"))

    def release_priority(self) -> ReleasePriorityResult:
        """End this connection's priority claim (see ``claim-priority``). Its requests go first
        still while it holds the pause lease.

        Allowed in states: any. Since protocol 1.4.
        Errors: the common errors only (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error,
        not-permitted, chain-broken).
        """
        return cast("ReleasePriorityResult", self.call("release-priority"))

    def quit(self) -> QuitResult:
        """Shut the VMM down: the server answers, stops accepting connections, tells every other
        connection ``shutting-down``, releases the machine and exits.

        Allowed in states: any. Since protocol 1.0.
        Errors: the common errors only (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error,
        not-permitted, chain-broken).
        """
        return cast("QuitResult", self.call("quit"))

    def dump_memory(
        self,
        *,
        format: Literal["stream", "raw", "snapshot"] = "stream",
        checksum: Literal["full", "headers"] = "full",
        out: FdLike,
        on_progress: ProgressCallback | None = None,
    ) -> DumpMemoryResult:
        """Write guest RAM to the ``out`` fd, by the VMM, straight from the memory file (sendfile to
        pipes and sockets, pwrite to files): never through the client. ``format: stream``
        (default) writes one page stream (protocol/page-stream.md): never-touched and all-zero
        pages become zero records, so the stream is about as large as the RAM in use. ``raw``
        writes the flat RAM image (regions in memory-file order; a regular file keeps holes for
        zero pages, and the image replaces what the file held from the fd's position on, so that
        the file ends with it). ``snapshot`` appends the memory section of a snapshot file at the
        file's end and returns its table entry (the fd must be a regular file). ``raw`` into a
        regular file and ``snapshot`` write at file offsets: an fd opened with O_APPEND, which
        would turn them into appends, is refused (``invalid-fds``) before anything is written.
        Allowed while paused (a consistent image) and while running (the first pass of a pre-copy
        migration: each run is copied before it is sent so its checksum is right; with
        ``checksum: headers`` nothing needs to be right, and the runs go zero-copy). Cancellable;
        reports progress in bytes.

        Allowed in states: paused, running. Since protocol 1.1.
        Errors: invalid-state, cancelled, peer-closed, io-error, and the common errors
        (handshake-required, invalid-message, unknown-command, invalid-arguments, invalid-fds,
        limit-exceeded, shutting-down, internal-error, not-permitted, chain-broken).
        """
        args: dict[str, Any] = {}
        if format != "stream":
            args["format"] = format
        if checksum != "full":
            args["checksum"] = checksum
        result = self.call("dump-memory", **args, fds={"out": out}, on_progress=on_progress)
        return cast("DumpMemoryResult", result)

    def dump_state(
        self,
        *,
        format: Literal["blob", "snapshot"] = "blob",
        out: FdLike,
        on_progress: ProgressCallback | None = None,
    ) -> DumpStateResult:
        """Write everything that is not RAM — the machine configuration, every vCPU's registers
        (regs, sregs, XSAVE, XCRs, debug registers, LAPIC, MSRs, events, CPUID), the in-kernel
        PICs, IOAPIC, PIT and clock, and the UART — to the ``out`` fd. ``format: blob`` (default)
        writes one self-delimiting, checksummed state blob (protocol/state-blob.md); ``snapshot``
        appends the config, vcpus and devices sections of a snapshot file and returns their table
        entries (a regular file, not opened with O_APPEND: ``invalid-fds``). Only while paused.

        Allowed in states: paused. Since protocol 1.1.
        Errors: invalid-state, cancelled, peer-closed, io-error, and the common errors
        (handshake-required, invalid-message, unknown-command, invalid-arguments, invalid-fds,
        limit-exceeded, shutting-down, internal-error, not-permitted, chain-broken).
        """
        args: dict[str, Any] = {}
        if format != "blob":
            args["format"] = format
        result = self.call("dump-state", **args, fds={"out": out}, on_progress=on_progress)
        return cast("DumpStateResult", result)

    def flush_devices(self) -> FlushDevicesResult:
        """Make what the guest wrote to a writable disk durable (fdatasync of its image); a
        read-only disk is never flushed, a VMM without a disk does nothing. ``pause`` drains the
        block device but does not flush it: a checkpoint sends this while the guest is paused, so
        that the image on disk matches the snapshot, and a migration with shared storage sends it
        before the destination may run.

        Allowed in states: paused, running. Since protocol 1.8.
        Errors: invalid-state, io-error, and the common errors (handshake-required,
        invalid-message, unknown-command, invalid-arguments, invalid-fds, limit-exceeded,
        shutting-down, internal-error, not-permitted, chain-broken).
        """
        return cast("FlushDevicesResult", self.call("flush-devices"))

    def dump_disk(
        self,
        *,
        out: FdLike,
        on_progress: ProgressCallback | None = None,
    ) -> DumpDiskResult:
        """Write the block device's image to the ``out`` fd as a snapshot file's ``disk`` section
        (protocol/snapshot-file.md), appended at the file's end, and return its table entry (the
        fd must be a regular file, not O_APPEND: ``invalid-fds`` before anything is written).
        Sparse: only the image's data extents are read (SEEK_DATA/SEEK_HOLE) and all-zero 4 KiB
        blocks are left out, so a restore keeps holes as holes; the bytes go from the image to
        the file with copy_file_range where the kernel allows, else pwrite. Paused only: the
        block device is drained, so the image is the paused moment (no flush is needed: the image
        is read through the device's own file). A read-only disk is dumped like a writable one
        (the section records its mode). ``no-disk`` when the VMM has no block device.
        Cancellable; reports progress in bytes of the disk gone through.

        Allowed in states: paused. Since protocol 1.9.
        Errors: invalid-state, no-disk, cancelled, io-error, and the common errors
        (handshake-required, invalid-message, unknown-command, invalid-arguments, invalid-fds,
        limit-exceeded, shutting-down, internal-error, not-permitted, chain-broken).
        """
        result = self.call("dump-disk", fds={"out": out}, on_progress=on_progress)
        return cast("DumpDiskResult", result)

    def dirty_log_start(self) -> DirtyLogStartResult:
        """Start dirty-page tracking (KVM's dirty log on every memory slot, plus pages the VMM
        itself writes). The first ``dump-dirty`` sends the pages written since now. Idempotent.

        Allowed in states: paused, running. Since protocol 1.1.
        Errors: invalid-state, and the common errors (handshake-required, invalid-message,
        unknown-command, invalid-arguments, invalid-fds, limit-exceeded, shutting-down,
        internal-error, not-permitted, chain-broken).
        """
        return cast("DirtyLogStartResult", self.call("dirty-log-start"))

    def dirty_log_stop(self) -> DirtyLogStopResult:
        """Stop dirty-page tracking and forget pending dirty pages. Idempotent.

        Allowed in states: crashed, paused, running, shutdown. Since protocol 1.1.
        Errors: invalid-state, and the common errors (handshake-required, invalid-message,
        unknown-command, invalid-arguments, invalid-fds, limit-exceeded, shutting-down,
        internal-error, not-permitted, chain-broken).
        """
        return cast("DirtyLogStopResult", self.call("dirty-log-stop"))

    def query_dirty(self) -> QueryDirtyResult:
        """How many pages were written since the previous ``dump-dirty`` (or since
        ``dirty-log-start``), without resetting: the next ``dump-dirty`` still sends them.

        Allowed in states: paused, running. Since protocol 1.1.
        Errors: invalid-state, dirty-log-off, and the common errors (handshake-required,
        invalid-message, unknown-command, invalid-arguments, invalid-fds, limit-exceeded,
        shutting-down, internal-error, not-permitted, chain-broken).
        """
        return cast("QueryDirtyResult", self.call("query-dirty"))

    def dump_dirty(
        self,
        *,
        format: Literal["stream", "snapshot"] = "stream",
        section: int | None = None,
        epoch: str | None = None,
        checksum: Literal["full", "headers"] = "full",
        out: FdLike,
        on_progress: ProgressCallback | None = None,
    ) -> DumpDirtyResult:
        """Write the pages written since the previous ``dump-dirty`` (or since ``dirty-log-start``)
        to the ``out`` fd as one page stream, and start a new round of tracking. While running,
        pages written during the dump are reported by the next call. With ``epoch`` (since 1.5)
        it takes the pages only if the dirty log is still in that epoch, so a client chaining
        dumps (incremental checkpoints) knows that nobody else took dirty pages since its last
        one. With ``format: snapshot`` (since 1.6) the pages are not sent as a stream but written
        in place into the memory image of a snapshot file's memory section (``section``: its file
        offset, as ``dump-memory format=snapshot`` returned it): each data page at its image
        offset, all-zero pages as holes. A live checkpoint brings a first pass taken while the
        guest ran up to date this way, round after round, the last one while paused; the
        section's checksum is then the client's to recompute.

        Allowed in states: paused, running. Since protocol 1.1.
        Errors: invalid-state, cancelled, peer-closed, io-error, dirty-log-off, dirty-log-moved,
        bad-snapshot, and the common errors (handshake-required, invalid-message,
        unknown-command, invalid-arguments, invalid-fds, limit-exceeded, shutting-down,
        internal-error, not-permitted, chain-broken).
        """
        args: dict[str, Any] = {}
        if format != "stream":
            args["format"] = format
        if section is not None:
            args["section"] = section
        if epoch is not None:
            args["epoch"] = epoch
        if checksum != "full":
            args["checksum"] = checksum
        result = self.call("dump-dirty", **args, fds={"out": out}, on_progress=on_progress)
        return cast("DumpDirtyResult", result)

    def load_memory(
        self,
        *,
        format: Literal["stream", "raw", "snapshot"] = "stream",
        in_: FdLike,
        on_progress: ProgressCallback | None = None,
    ) -> LoadMemoryResult:
        """On an incoming VMM: fill guest RAM from the ``in`` fd. ``format: stream`` (default) reads
        one page stream (like ``apply-pages``), ``raw`` a flat image as ``dump-memory`` writes
        it, ``snapshot`` the memory section of a complete snapshot file (on a VMM without a
        machine yet, the machine is built from the file's config section). A regular file on
        which the VMM gets a read lease (one of its own user, opened read-only, nobody writing
        it) is mapped copy-on-write as guest RAM, as ``vmm --restore`` maps it (since 1.8):
        checked first as that checks a file (structure, state sections' checksums, layout), but
        the memory section's checksum is not read (``vmipc snapshot verify`` does; nothing is
        read, so ``bytes`` and ``data_pages`` are 0); a writer of the file then waits until RAM
        is copied off it. Any other fd is read into RAM, its checksum verified first. Allowed
        until the received guest first runs (also after ``load-state``, which may come first); a
        load that fails half-way makes ``resume`` refuse (``damaged``) until a complete load
        succeeds: a ``raw`` image or a ``snapshot`` (whose holes are zeroed), or a page stream
        that covers every page of RAM (as ``dump-memory`` writes one); a stream of some pages
        only (a dirty round, an empty stream) keeps the refusal, but is fine after a complete
        load.

        Allowed in states: incoming, paused. Since protocol 1.1.
        Errors: invalid-state, cancelled, peer-closed, io-error, bad-stream, bad-snapshot,
        not-configured, and the common errors (handshake-required, invalid-message,
        unknown-command, invalid-arguments, invalid-fds, limit-exceeded, shutting-down,
        internal-error, not-permitted, chain-broken).
        """
        args: dict[str, Any] = {}
        if format != "stream":
            args["format"] = format
        result = self.call("load-memory", **args, fds={"in": in_}, on_progress=on_progress)
        return cast("LoadMemoryResult", result)

    def apply_pages(
        self,
        *,
        accept_unhashed: bool = False,
        in_: FdLike,
        on_progress: ProgressCallback | None = None,
    ) -> ApplyPagesResult:
        """On an incoming VMM: apply one page stream from the ``in`` fd to guest RAM as it arrives,
        reading exactly the stream (never past its end, so one socket can carry several streams
        in turn). Every round's checksum is verified (over every byte, or over the record headers
        only in a stream written with ``checksum: headers``, which needs ``accept_unhashed``); a
        bad stream answers ``bad-stream``. Allowed until the received guest first runs (also
        after ``load-state``, which may come first); a load that fails half-way makes ``resume``
        refuse (``damaged``) until a complete load succeeds: a ``raw`` image or a ``snapshot``
        (whose holes are zeroed), or a page stream that covers every page of RAM (as
        ``dump-memory`` writes one); a stream of some pages only (a dirty round, an empty stream)
        keeps the refusal, but is fine after a complete load.

        Allowed in states: incoming, paused. Since protocol 1.1.
        Errors: invalid-state, cancelled, peer-closed, io-error, bad-stream, not-configured, and
        the common errors (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error,
        not-permitted, chain-broken).
        """
        args: dict[str, Any] = {}
        if accept_unhashed:
            args["accept_unhashed"] = accept_unhashed
        result = self.call("apply-pages", **args, fds={"in": in_}, on_progress=on_progress)
        return cast("ApplyPagesResult", result)

    def configure(self, *, memory_size: int, vcpus: int) -> ConfigureResult:
        """On an incoming VMM started without --memory/--vcpus: build its machine, paused, with no
        guest, so that pages can be loaded into it before the state comes (``load-state`` then
        only sets registers). A live migration sends the source's shape this way. On a VMM that
        has a machine already, the same shape is accepted (nothing changes) and another is
        refused.

        Allowed in states: incoming. Since protocol 1.8.
        Errors: invalid-state, invalid-arguments, and the common errors (handshake-required,
        invalid-message, unknown-command, invalid-arguments, invalid-fds, limit-exceeded,
        shutting-down, internal-error, not-permitted, chain-broken).
        """
        return cast("ConfigureResult", self.call("configure", memory_size=memory_size, vcpus=vcpus))

    def attach_disk(self, *, readonly: bool = False, disk: FdLike) -> AttachDiskResult:
        """On an incoming VMM started without --disk: give its block device an image, as the
        ``disk`` fd (the VMM opens nothing itself). The fd must be a regular file or block
        device, open for reading and, unless ``readonly``, for writing too (not O_APPEND), of a
        size that is a positive multiple of 512 bytes; otherwise ``invalid-fds`` and nothing
        changes. The VMM keeps its own duplicate. Send it before ``load-state`` (before or after
        ``configure`` and the memory loads): the state's disk record is then checked against this
        image. A VMM that has a disk already (``vmm --disk``, or an earlier ``attach-disk``)
        refuses with ``disk-present``. ``vmipc restore --disk`` and ``vmipc migrate --disk`` send
        it.

        Allowed in states: incoming. Since protocol 1.9.
        Errors: invalid-state, invalid-fds, disk-present, and the common errors
        (handshake-required, invalid-message, unknown-command, invalid-arguments, invalid-fds,
        limit-exceeded, shutting-down, internal-error, not-permitted, chain-broken).
        """
        args: dict[str, Any] = {}
        if readonly:
            args["readonly"] = readonly
        return cast("AttachDiskResult", self.call("attach-disk", **args, fds={"disk": disk}))

    def load_state(
        self,
        *,
        format: Literal["blob", "snapshot"] = "blob",
        accept_disk: bool = False,
        in_: FdLike,
    ) -> LoadStateResult:
        """On an incoming VMM: read the machine state from the ``in`` fd (``format: blob`` as
        ``dump-state`` writes it, or ``snapshot`` sections of a snapshot file) and restore every
        vCPU and device. A VMM started without --memory/--vcpus builds its machine from the
        state's configuration; otherwise the configuration must match. The block device's record
        names the disk the state was taken with (its size and fingerprint, docs/formats.md): this
        VMM's disk must be that one unless ``accept_disk``. The machine is then ``paused``:
        ``resume`` runs the guest.

        Allowed in states: incoming. Since protocol 1.1.
        Errors: invalid-state, cancelled, peer-closed, io-error, bad-state, bad-snapshot, and the
        common errors (handshake-required, invalid-message, unknown-command, invalid-arguments,
        invalid-fds, limit-exceeded, shutting-down, internal-error, not-permitted, chain-broken).
        """
        args: dict[str, Any] = {}
        if format != "blob":
            args["format"] = format
        if accept_disk:
            args["accept_disk"] = accept_disk
        return cast("LoadStateResult", self.call("load-state", **args, fds={"in": in_}))
