"""The data formats: the page stream and the snapshot file (sans-I/O codecs).

Bytes in, records out: nothing here reads or writes files or sockets, so every path is
testable with plain byte strings. The specs are ``protocol/page-stream.md`` and
``protocol/snapshot-file.md``; the modules :mod:`vmipc.formats.pagestream` and
:mod:`vmipc.formats.snapshot` hold the details, and the names most callers need are
re-exported here, with :func:`checksum` / :class:`Checksum` (xxh3_64, one-shot and
streaming), the checksum both formats use, and :func:`unpack_bounded`, the msgpack decoding
of the state records (a state blob, a snapshot's state sections) with a bound on what the
decoded objects cost.
"""

from __future__ import annotations

from vmipc._util import fixup_module_metadata
from vmipc.formats._bounded import DecodeBudget, MsgpackLimits, MsgpackRefused, unpack_bounded
from vmipc.formats._common import Checksum, checksum
from vmipc.formats.errors import (
    FormatError,
    MissingSection,
    PageStreamError,
    SnapshotError,
)
from vmipc.formats.pagestream import (
    NEED_DATA,
    DataRun,
    NeedData,
    PageRun,
    PageStreamDecoder,
    PageStreamEncoder,
    RoundEnd,
    StreamEnd,
    StreamHeader,
    ZeroRun,
    bitmap_to_runs,
    runs_to_bitmap,
    split_zero_runs,
)
from vmipc.formats.snapshot import (
    MemoryDescriptor,
    MemoryRegion,
    MemorySection,
    MemorySectionWriter,
    SectionEntry,
    SnapshotHeader,
    SnapshotReader,
    TableBlock,
    encode_table,
    new_snapshot_id,
    section_entry,
    section_offset,
)

__all__ = [
    "NEED_DATA",
    "Checksum",
    "DataRun",
    "DecodeBudget",
    "FormatError",
    "MemoryDescriptor",
    "MemoryRegion",
    "MemorySection",
    "MemorySectionWriter",
    "MissingSection",
    "MsgpackLimits",
    "MsgpackRefused",
    "NeedData",
    "PageRun",
    "PageStreamDecoder",
    "PageStreamEncoder",
    "PageStreamError",
    "RoundEnd",
    "SectionEntry",
    "SnapshotError",
    "SnapshotHeader",
    "SnapshotReader",
    "StreamEnd",
    "StreamHeader",
    "TableBlock",
    "ZeroRun",
    "bitmap_to_runs",
    "checksum",
    "encode_table",
    "new_snapshot_id",
    "runs_to_bitmap",
    "section_entry",
    "section_offset",
    "split_zero_runs",
    "unpack_bounded",
]

fixup_module_metadata(__name__, globals())
