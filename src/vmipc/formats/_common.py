"""Helpers shared by the page-stream and snapshot codecs (pure: no I/O)."""

from __future__ import annotations

import xxhash

#: what the codecs accept as bytes (``collections.abc.Buffer`` needs Python 3.12)
BytesLike = bytes | bytearray | memoryview

#: a preallocated run of zeros: zero-page checks compare against it, checksums of holes
#: hash slices of it
ZERO_CHUNK_SIZE = 1 << 20
ZEROS = bytes(ZERO_CHUNK_SIZE)


def align_up(value: int, alignment: int) -> int:
    """The smallest multiple of ``alignment`` (a power of two) that is >= ``value``."""
    return (value + alignment - 1) & -alignment


def is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def checksum(data: BytesLike) -> int:
    """xxh3_64 of ``data`` as an unsigned 64-bit integer (seed 0)."""
    return xxhash.xxh3_64_intdigest(data)


class Checksum:
    """A streaming xxh3_64 (seed 0): feed the bytes in order, in any chunking.

    ``update_zeros(n)`` feeds ``n`` zero bytes without the caller allocating them, for
    holes (zero pages) that are not stored but are covered by the checksum.
    """

    __slots__ = ("_hash", "length")

    def __init__(self) -> None:
        self._hash = xxhash.xxh3_64()
        #: number of bytes fed so far
        self.length = 0

    def update(self, data: BytesLike) -> None:
        self._hash.update(data)
        self.length += len(data) if not isinstance(data, memoryview) else data.nbytes

    def update_zeros(self, count: int) -> None:
        if count < 0:
            raise ValueError(f"negative zero count {count}")
        self.length += count
        while count:
            step = min(count, ZERO_CHUNK_SIZE)
            self._hash.update(ZEROS[:step] if step < ZERO_CHUNK_SIZE else ZEROS)
            count -= step

    def digest(self) -> int:
        """The checksum of everything fed so far (feeding may continue afterwards)."""
        return self._hash.intdigest()


def version_problem(
    found: tuple[int, int], supported: tuple[int, int], what: str = "format version"
) -> str | None:
    """Why a reader of ``supported`` (major, minor) must refuse data of version ``found``,
    or None when it may read it.

    The rule, for both formats: the major must be equal; the minor must not be newer than
    the reader's (a reader reads every older minor of its major).
    """
    (major, minor), (our_major, our_minor) = found, supported
    if major != our_major:
        return (
            f"{what} {major}.{minor} is not supported "
            f"(this reader reads {our_major}.0 to {our_major}.{our_minor})"
        )
    if minor > our_minor:
        return (
            f"{what} {major}.{minor} is newer than this reader's "
            f"{our_major}.{our_minor}; upgrade vmipc to read it"
        )
    return None
