"""Snapshot files on disk, offline: seal, verify, publish, chains and merge.

Everything a client does to a snapshot file by itself, without a VMM: seal the sections
that building blocks wrote (:func:`seal`), check a file (:func:`verify_file`,
:func:`verify_restorable`), publish it atomically under its final name
(:class:`PendingFile`), follow and check an incremental chain (:func:`resolve_chain`),
write the sections a chain relies on (an increment's memory around a ``dump-dirty``
stream, the ``dirty-log`` epoch), and flatten a chain into one full snapshot
(:func:`merge`), and write a snapshot's disk section out to a new image
(:func:`extract_disk`). The byte format itself (header, table, sections) is the sans-I/O codec in
:mod:`vmipc.formats`; this package is the blocking file work around it, for the
sequences (``vmipc.sequences.checkpoint``, ``restore_into``) and ``vmipc snapshot``. It
never talks to a VMM and never imports trio: from trio, run it in a thread.
"""

from __future__ import annotations

from vmipc._util import fixup_module_metadata
from vmipc.snapshots._chain import (
    ChainError,
    ChainLink,
    append_dirty_log,
    check_link,
    increment_descriptor,
    increment_entry,
    read_dirty_epoch,
    read_link,
    resolve_chain,
    verify_links,
)
from vmipc.snapshots._disk import DiskExtraction, disk_section, extract_disk, has_disk
from vmipc.snapshots._merge import MergeReport, merge, merge_chain
from vmipc.snapshots._publish import PendingFile, temp_path_for
from vmipc.snapshots._ranges import hash_range, pwrite_all, reader_of, rehashed
from vmipc.snapshots._seal import PRODUCER, entries_of, new_header, seal
from vmipc.snapshots._verify import verify_file, verify_restorable, verify_section

__all__ = [
    "PRODUCER",
    "ChainError",
    "ChainLink",
    "DiskExtraction",
    "MergeReport",
    "PendingFile",
    "append_dirty_log",
    "check_link",
    "disk_section",
    "entries_of",
    "extract_disk",
    "has_disk",
    "hash_range",
    "increment_descriptor",
    "increment_entry",
    "merge",
    "merge_chain",
    "new_header",
    "pwrite_all",
    "read_dirty_epoch",
    "read_link",
    "reader_of",
    "rehashed",
    "resolve_chain",
    "seal",
    "temp_path_for",
    "verify_file",
    "verify_links",
    "verify_restorable",
    "verify_section",
]

fixup_module_metadata(__name__, globals())
