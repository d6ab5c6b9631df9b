"""The data formats: the page stream and the snapshot file (sans-I/O codecs).

Bytes in, records out: nothing here reads or writes files or sockets, so every path is
testable with plain byte strings. The specs are ``protocol/page-stream.md`` and
``protocol/snapshot-file.md``; the modules :mod:`vmipc.formats.pagestream` and
:mod:`vmipc.formats.snapshot` hold the details, and the names most callers need are
re-exported here.
"""

from __future__ import annotations

from vmipc.formats.errors import (
    BadRecord,
    ChecksumMismatchError,
    CorruptError,
    FormatError,
    LayoutMismatch,
    MissingSection,
    PageStreamChecksumMismatch,
    PageStreamCorrupt,
    PageStreamError,
    PageStreamTruncated,
    PageStreamUnsupportedVersion,
    SnapshotChecksumMismatch,
    SnapshotCorrupt,
    SnapshotError,
    SnapshotTruncated,
    SnapshotUnsupportedVersion,
    TruncatedError,
    UnsupportedVersionError,
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

__all__ = [
    "NEED_DATA",
    "BadRecord",
    "ChecksumMismatchError",
    "CorruptError",
    "DataRun",
    "FormatError",
    "LayoutMismatch",
    "MissingSection",
    "NeedData",
    "PageRun",
    "PageStreamChecksumMismatch",
    "PageStreamCorrupt",
    "PageStreamDecoder",
    "PageStreamEncoder",
    "PageStreamError",
    "PageStreamTruncated",
    "PageStreamUnsupportedVersion",
    "RoundEnd",
    "SnapshotChecksumMismatch",
    "SnapshotCorrupt",
    "SnapshotError",
    "SnapshotTruncated",
    "SnapshotUnsupportedVersion",
    "StreamEnd",
    "StreamHeader",
    "TruncatedError",
    "UnsupportedVersionError",
    "ZeroRun",
    "bitmap_to_runs",
    "runs_to_bitmap",
    "split_zero_runs",
]
