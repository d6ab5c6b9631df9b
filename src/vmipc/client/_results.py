"""The result types of the command methods and the events' data, generated from the schema
(version 1.10).

Do not edit: run ``python tools/gencode.py``. ``vmipc.client`` loads this module on first use
of one of the types it exports: building them costs a short-lived `vmipc call` ~1.5 ms.
"""

from __future__ import annotations

from typing import Literal, TypedDict


class HelloResultServer(TypedDict):
    """Who answered."""

    name: str
    """The server's name."""
    version: str
    """The server software's version."""
    pid: int
    """The VMM's process id."""


class HelloResultLimits(TypedDict):
    """The server's limits for this connection."""

    max_frame_size: int
    """Largest frame payload, in bytes, the server sends (and, before 1.7, accepts; see
    `max_request_size`).
    """
    max_fds_per_request: int
    """Most fds one request may carry."""
    max_in_flight: int
    """Most requests one connection may have in flight."""
    max_request_size: int
    """Largest request frame payload, in bytes, the server accepts (requests are small; replies and
    events may be up to `max_frame_size`).
    """


class HelloResult(TypedDict):
    """The result of ``hello``."""

    protocol: str
    """The negotiated protocol version, `major.minor`: with `minor` (1.8), the lower of the client's
    and the server's minor; without, the server's.
    """
    server: HelloResultServer
    """Who answered."""
    commands: list[str]
    """The names of the commands available in the negotiated version on this connection (a socket
    restricted to some commands lists only those; since 1.2).
    """
    events: list[str]
    """The names of the events available in the negotiated version."""
    capabilities: list[str]
    """Optional protocol features the server supports: `fd-passing`, `events`, `progress`, `cancel`.
    """
    limits: HelloResultLimits
    """The server's limits for this connection."""
    connection: int
    """This connection's number: the one the server's log, `query-status`'s `lease` and `first` use.
    """


class SubscribeResult(TypedDict):
    """The result of ``subscribe``."""

    events: list[str]
    """The events now subscribed, sorted."""


class CancelResult(TypedDict):
    """The result of ``cancel``."""

    cancelled: bool
    """Whether the request will answer `cancelled`: false if it is not in flight, already done, or
    cannot be stopped.
    """


class QueryStatusResultLease(TypedDict):
    """The pause lease, or null when nobody holds one."""

    connection: int
    """The number of the connection holding it (see `hello`'s `connection`)."""
    expires_in: float
    """Seconds until it expires unless renewed."""
    duration: float
    """Its length in seconds: what a `renew-lease` without `lease` extends it by."""


class QueryStatusResult(TypedDict):
    """The result of ``query-status``."""

    state: Literal["created", "running", "paused", "incoming", "shutdown", "crashed", "destroyed"]
    """The run state."""
    vcpu_count: int
    """Number of vCPUs."""
    memory_size: int
    """Guest memory size in bytes."""
    stop_reason: str | None
    """Why the machine stopped (states `shutdown` and `crashed`), else null."""
    lease: QueryStatusResultLease | None
    """The pause lease, or null when nobody holds one."""
    first: list[int]
    """The numbers of the connections whose requests go first now (see `claim-priority`): the pause
    lease's holder and the priority claimants. Empty when nobody does.
    """


class PauseResult(TypedDict):
    """The result of ``pause``."""


class ResumeResult(TypedDict):
    """The result of ``resume``."""


class RenewLeaseResult(TypedDict):
    """The result of ``renew-lease``."""

    expires_in: float
    """Seconds until the lease expires unless renewed again."""


class ReleaseLeaseResult(TypedDict):
    """The result of ``release-lease``."""


class ClaimPriorityResult(TypedDict):
    """The result of ``claim-priority``."""


class ReleasePriorityResult(TypedDict):
    """The result of ``release-priority``."""

    released: bool
    """False when this connection held no claim."""


class QuitResult(TypedDict):
    """The result of ``quit``."""


class DumpMemoryResultSection(TypedDict):
    """A snapshot section-table entry: pass it on to finish the file (`vmipc snapshot seal`)."""

    name: str
    """Section name (config, vcpus, devices, memory)."""
    version: int
    """The section's record version."""
    offset: int
    """File offset of the section (4096-aligned)."""
    length: int
    """Its length in bytes."""
    checksum: int
    """xxh3_64 of its bytes."""


class DumpMemoryResult(TypedDict):
    """The result of ``dump-memory``."""

    data_pages: int
    """Pages sent (or received) as data."""
    zero_pages: int
    """Pages sent (or received) as zero runs, never as data."""
    bytes: int
    """Bytes written to (or read from) the fd."""
    consistent: bool | None
    """Whether the guest was paused, so the image is one consistent moment (a running guest's dump
    is the first pass of a pre-copy migration).
    """
    section: DumpMemoryResultSection | None
    """A snapshot section-table entry: pass it on to finish the file (`vmipc snapshot seal`)."""


class DumpStateResultSectionsItem(TypedDict):
    """A snapshot section-table entry: pass it on to finish the file (`vmipc snapshot seal`)."""

    name: str
    """Section name (config, vcpus, devices, memory)."""
    version: int
    """The section's record version."""
    offset: int
    """File offset of the section (4096-aligned)."""
    length: int
    """Its length in bytes."""
    checksum: int
    """xxh3_64 of its bytes."""


class DumpStateResult(TypedDict):
    """The result of ``dump-state``."""

    bytes: int
    """Bytes written."""
    sections: list[DumpStateResultSectionsItem]
    """The snapshot section-table entries written (empty for a blob)."""


class FlushDevicesResult(TypedDict):
    """The result of ``flush-devices``."""


class DumpDiskResultSection(TypedDict):
    """A snapshot section-table entry: pass it on to finish the file (`vmipc snapshot seal`)."""

    name: str
    """Section name (config, vcpus, devices, memory)."""
    version: int
    """The section's record version."""
    offset: int
    """File offset of the section (4096-aligned)."""
    length: int
    """Its length in bytes."""
    checksum: int
    """xxh3_64 of its bytes."""


class DumpDiskResult(TypedDict):
    """The result of ``dump-disk``."""

    disk_size: int
    """The disk's size in bytes (whole sectors)."""
    data_bytes: int
    """Bytes of the image stored (non-zero blocks of its data extents)."""
    extents: int
    """Extents stored."""
    bytes: int
    """The section's length in bytes."""
    section: DumpDiskResultSection
    """A snapshot section-table entry: pass it on to finish the file (`vmipc snapshot seal`)."""


class DirtyLogStartResult(TypedDict):
    """The result of ``dirty-log-start``."""

    epoch: str
    """The dirty log's epoch: it names the moment the dirty pages count from, and changes whenever
    they start counting afresh (`dirty-log-start` after logging was off, every `dump-dirty`). The
    next `dump-dirty` sends the pages written since this epoch began.
    """


class DirtyLogStopResult(TypedDict):
    """The result of ``dirty-log-stop``."""


class QueryDirtyResult(TypedDict):
    """The result of ``query-dirty``."""

    dirty_pages: int
    """Pages dirty now."""
    dirty_bytes: int
    """The same in bytes."""
    epoch: str
    """The epoch these pages were counted in (see `dirty-log-start`)."""


class DumpDirtyResult(TypedDict):
    """The result of ``dump-dirty``."""

    data_pages: int
    """Pages sent (or received) as data."""
    zero_pages: int
    """Pages sent (or received) as zero runs, never as data."""
    bytes: int
    """Bytes written to (or read from) the fd."""
    consistent: bool | None
    """Whether the guest was paused, so the image is one consistent moment (a running guest's dump
    is the first pass of a pre-copy migration).
    """
    epoch: str
    """The new epoch, which the next `dump-dirty` counts from."""


class LoadMemoryResult(TypedDict):
    """The result of ``load-memory``."""

    data_pages: int
    """Pages sent (or received) as data."""
    zero_pages: int
    """Pages sent (or received) as zero runs, never as data."""
    bytes: int
    """Bytes written to (or read from) the fd."""
    rounds: int | None
    """Page-stream rounds received (stream format)."""


class ApplyPagesResult(TypedDict):
    """The result of ``apply-pages``."""

    data_pages: int
    """Pages sent (or received) as data."""
    zero_pages: int
    """Pages sent (or received) as zero runs, never as data."""
    bytes: int
    """Bytes written to (or read from) the fd."""
    rounds: int | None
    """Rounds received."""


class ConfigureResult(TypedDict):
    """The result of ``configure``."""

    memory_size: int
    """The machine's RAM in bytes."""
    vcpus: int
    """Its vCPUs."""


class AttachDiskResult(TypedDict):
    """The result of ``attach-disk``."""

    size: int
    """The disk's size in bytes, as the guest sees it."""


class LoadStateResult(TypedDict):
    """The result of ``load-state``."""

    vcpus: int
    """vCPUs restored."""
    memory_size: int
    """The machine's RAM in bytes."""


class StateChangeData(TypedDict):
    """The data of the ``state-change`` event."""

    old: Literal["created", "running", "paused", "incoming", "shutdown", "crashed", "destroyed"]
    """The state before."""
    new: Literal["created", "running", "paused", "incoming", "shutdown", "crashed", "destroyed"]
    """The state now."""
    reason: str | None
    """Why, for stops (e.g. `triple fault on vcpu 1`), else null."""


class ProgressData(TypedDict):
    """The data of the ``progress`` event."""

    request: int
    """The id of the request."""
    command: str
    """Its command."""
    phase: str
    """What it is doing, in a word or two."""
    done: int
    """Units done. Since 1.8, for dump-memory, dump-dirty, load-memory and apply-pages: bytes of
    guest RAM gone through, zero pages and holes included (a stream says a zero page in a few
    bytes, a sparse file skips it); for the others, bytes moved through the fd.
    """
    total: int | None
    """Units in all (dump-memory, load-memory: the RAM size; dump-dirty: the dirty pages taken, in
    bytes), or null when unknown (apply-pages: the stream says when it ends).
    """
