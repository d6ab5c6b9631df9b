"""The errors the data-format codecs raise when the *data* is bad.

Every error is one line, ``"<where>: <problem>"``: ``where`` names the part of the data
(``"header"``, ``"section 'memory'"``, ``"round 3"``, ...), ``problem`` says what is wrong.
Callers print ``str(error)`` and never a traceback.

Two ways to catch, both supported by multiple inheritance:

* by format: :class:`PageStreamError` or :class:`SnapshotError` (everything about that
  format), or :class:`FormatError` (either);
* by kind: :class:`TruncatedError` (the data ends too early), :class:`CorruptError`
  (damaged or malformed; :class:`ChecksumMismatchError` when a checksum caught it),
  :class:`UnsupportedVersionError` (a format version this reader does not read).

Misuse of an *encoder* or *writer* by its caller (a run outside RAM, a payload of the wrong
length) is a bug in the caller, not bad data: it raises :class:`ValueError`.
"""

from __future__ import annotations

from vmipc.errors import VmipcError

__all__ = [
    "BadRecord",
    "ChecksumMismatchError",
    "CorruptError",
    "FormatError",
    "LayoutMismatch",
    "MissingSection",
    "PageStreamChecksumMismatch",
    "PageStreamCorrupt",
    "PageStreamError",
    "PageStreamTruncated",
    "PageStreamUnsupportedVersion",
    "SnapshotChecksumMismatch",
    "SnapshotCorrupt",
    "SnapshotError",
    "SnapshotTruncated",
    "SnapshotUnsupportedVersion",
    "TruncatedError",
    "UnsupportedVersionError",
]


class FormatError(VmipcError):
    """Base of every data-format error: ``str(error)`` is ``"<where>: <problem>"``."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        #: the part of the data that is wrong, e.g. ``"section 'memory'"``
        self.where = where
        #: what is wrong with it, one line
        self.problem = problem


# -- kinds --------------------------------------------------------------------------------


class TruncatedError(FormatError):
    """The data ends before the format says it may (a cut file, a closed stream)."""


class CorruptError(FormatError):
    """The data is damaged or malformed."""


class ChecksumMismatchError(CorruptError):
    """A stored checksum does not match the data it covers."""


class UnsupportedVersionError(FormatError):
    """The data is in a format version this reader does not read (newer, or another major)."""


# -- page stream --------------------------------------------------------------------------


class PageStreamError(FormatError):
    """A page stream is unusable; a receiver must not resume a guest from it."""


class PageStreamTruncated(PageStreamError, TruncatedError):
    """The stream ended (EOF) before its end-of-stream record."""


class PageStreamCorrupt(PageStreamError, CorruptError):
    """The stream is damaged (bad magic, a record header that fails its check, ...)."""


class PageStreamChecksumMismatch(PageStreamCorrupt, ChecksumMismatchError):
    """A round's checksum (or the stream header's) does not match the bytes received."""


class BadRecord(PageStreamCorrupt):
    """A well-formed record that is not allowed here: a run outside RAM, an unaligned
    address, a record type out of place, a round number out of sequence."""


class PageStreamUnsupportedVersion(PageStreamError, UnsupportedVersionError):
    """The stream's format version is not one this decoder reads."""


class LayoutMismatch(PageStreamError):
    """The stream's page size or memory layout differs from the one the receiver expects."""


# -- snapshot file ------------------------------------------------------------------------


class SnapshotError(FormatError):
    """A snapshot file is unusable; nothing may be restored from it."""


class SnapshotTruncated(SnapshotError, TruncatedError):
    """The file is shorter than its structure says (cut, or never finished)."""


class SnapshotCorrupt(SnapshotError, CorruptError):
    """The file is damaged or malformed."""


class SnapshotChecksumMismatch(SnapshotCorrupt, ChecksumMismatchError):
    """A section's (or the header's, table's, trailer's) checksum does not match."""


class SnapshotUnsupportedVersion(SnapshotError, UnsupportedVersionError):
    """The file's format version (or a section's version) is not one this reader reads."""


class MissingSection(SnapshotError):
    """A section the caller needs is not in the file."""
