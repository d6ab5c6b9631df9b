"""The errors the data-format codecs raise when the *data* is bad.

Every error is one line, ``"<where>: <problem>"``: ``where`` names the part of the data
(``"header"``, ``"section 'memory'"``, ``"round 3"``, ...), ``problem`` says what is wrong
(truncated, a checksum mismatch, a bad record, a version this reader does not read...).
Callers print ``str(error)`` and never a traceback.

Catch :class:`FormatError` (either format), or :class:`PageStreamError` /
:class:`SnapshotError` (one format); :class:`MissingSection` is the one case a caller
handles apart (a snapshot without a section it needs).

Misuse of an *encoder* or *writer* by its caller (a run outside RAM, a payload of the wrong
length) is a bug in the caller, not bad data: it raises :class:`ValueError`.
"""

from __future__ import annotations

from vmipc.errors import VmipcError

__all__ = [
    "FormatError",
    "MissingSection",
    "PageStreamError",
    "SnapshotError",
]


class FormatError(VmipcError):
    """Base of every data-format error: ``str(error)`` is ``"<where>: <problem>"``."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        #: the part of the data that is wrong, e.g. ``"section 'memory'"``
        self.where = where
        #: what is wrong with it, one line
        self.problem = problem


class PageStreamError(FormatError):
    """A page stream is unusable (truncated, damaged, a bad record, a version or a memory
    layout this receiver does not take); a receiver must not resume a guest from it."""


class SnapshotError(FormatError):
    """A snapshot file is unusable (truncated, damaged, a version this reader does not
    read); nothing may be restored from it."""


class MissingSection(SnapshotError):
    """A section the caller needs is not in the file."""
