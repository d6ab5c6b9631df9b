"""The VMM's data plane: a machine's RAM and state in and out through passed fds.

As Firecracker's ``persist.rs``: page streams, snapshot memory sections and raw images of
guest RAM (:mod:`.dataplane`), the state blob and state sections (:mod:`.statecodec`),
moved by cancellable blocking system calls (:mod:`.transfer`) and kept sparse with the
files' holes (:mod:`.extents`), and what a snapshot file must hold to be restored
(:mod:`.restorable`). Everything here is blocking
and runs in a worker thread, but for the non-blocking socket calls of :mod:`.nowait`;
nothing here knows of trio or the control protocol.
"""

from __future__ import annotations

from vmipc.vmm.persist.dataplane import (
    RUN_PAGES,
    PageCoverage,
    Stats,
    can_map_snapshot,
    map_snapshot_memory,
    memory_section_at,
    read_raw_image,
    read_snapshot_memory,
    receive_page_stream,
    send_page_stream,
    update_memory_section,
    write_memory_section,
    write_raw_image,
)
from vmipc.vmm.persist.diskdump import DiskStats, write_disk_section
from vmipc.vmm.persist.errors import BulkError
from vmipc.vmm.persist.extents import data_extents, punch_hole
from vmipc.vmm.persist.nowait import (
    BufferedInput,
    BufferTransfer,
    recv_nowait,
    send_nowait,
    whole_page_stream,
)
from vmipc.vmm.persist.restorable import Restorable, check_config, check_restorable
from vmipc.vmm.persist.statecodec import (
    MAX_STATE_SIZE,
    STATE_HEADER_SIZE,
    STATE_LIMITS,
    STATE_MAGIC,
    decode_state,
    encode_state_blob,
    read_state_blob,
    read_state_sections,
    state_blob_header,
    state_from_payload,
    state_sections,
    truncated_header,
    truncated_payload,
    write_state_sections,
)
from vmipc.vmm.persist.transfer import PeerClosed, Transfer, TransferCancelled, fd_kind

__all__ = [
    "MAX_STATE_SIZE",
    "RUN_PAGES",
    "STATE_HEADER_SIZE",
    "STATE_LIMITS",
    "STATE_MAGIC",
    "BufferTransfer",
    "BufferedInput",
    "BulkError",
    "DiskStats",
    "PageCoverage",
    "PeerClosed",
    "Restorable",
    "Stats",
    "Transfer",
    "TransferCancelled",
    "can_map_snapshot",
    "check_config",
    "check_restorable",
    "data_extents",
    "decode_state",
    "encode_state_blob",
    "fd_kind",
    "map_snapshot_memory",
    "memory_section_at",
    "punch_hole",
    "read_raw_image",
    "read_snapshot_memory",
    "read_state_blob",
    "read_state_sections",
    "receive_page_stream",
    "recv_nowait",
    "send_nowait",
    "send_page_stream",
    "state_blob_header",
    "state_from_payload",
    "state_sections",
    "truncated_header",
    "truncated_payload",
    "update_memory_section",
    "whole_page_stream",
    "write_disk_section",
    "write_memory_section",
    "write_raw_image",
    "write_state_sections",
]
