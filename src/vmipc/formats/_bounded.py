"""msgpack decoding with a bound on what the decoded objects cost (pure: no I/O).

msgpack's own limits (``max_array_len``, ``max_map_len``, ...) bound one container at a
time, not how many there are: one byte (``0x90``, an empty array) decodes to a list of about
70 bytes, so a 4 MiB blob of them costs some 300 MiB. :func:`unpack_bounded` first walks the
encoded bytes without building anything, adds up an upper bound of what each object will
take in CPython, and refuses the data if that exceeds a budget (a multiple of the data's
size, and an absolute cap) or breaks a per-container, nesting or type limit; only then does
it decode, with msgpack's own limits as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack  # type: ignore[import-untyped]

from vmipc.errors import VmipcError
from vmipc.formats._common import BytesLike

__all__ = ["DecodeBudget", "MsgpackLimits", "MsgpackRefused", "measure", "unpack_bounded"]


class MsgpackRefused(ValueError, VmipcError):
    """The data is not one msgpack object within the limits (one line, no input echoed)."""


@dataclass(frozen=True)
class MsgpackLimits:
    """What one decoded record may hold. Floats and ext types are never accepted."""

    max_array_len: int
    max_map_len: int
    max_str_len: int
    max_bin_len: int
    #: containers nested at most this deep
    max_depth: int
    #: map keys must be strings, and one of these if given: msgpack interns every map key,
    #: so keys never seen before would grow the interpreter's table of interned strings
    keys: frozenset[str] | None = None
    #: the objects may take at most ``amplification`` times the encoded bytes, plus
    #: ``slack`` (small records: a map costs more than its few bytes) ...
    amplification: int = 16
    slack: int = 64 << 10
    #: ... and never more than ``max_decoded`` bytes
    max_decoded: int = 16 << 20

    def budget(self, size: int) -> int:
        """What ``size`` encoded bytes may cost decoded."""
        return min(self.amplification * size + self.slack, self.max_decoded)


class DecodeBudget:
    """The bytes decoded objects may still take: one budget for several records that
    together make one whole (a snapshot's state sections)."""

    def __init__(self, left: int) -> None:
        self.left = left


# Upper bounds of what CPython (3.11+, 64-bit) allocates per decoded object, in bytes,
# including the garbage collector's header for containers and the 8-byte slot the object
# takes in its parent. tests/test_state_limits.py checks them against tracemalloc.
_SLOT = 8
_LIST = 72  # + a slot per item
_DICT = 240  # + per entry (hash table index, entry, growth while filling)
_DICT_ENTRY = 80
_INT = 40  # an int outside the cached -5..256
#: + 1 byte per character (ASCII), 4 if any is not ASCII; msgpack interns map keys, so the
#: interpreter's table of interned strings grows too (and is copied when it doubles)
_STR = 240
_BIN = 40  # + 1 per byte

_FIXED_WIDTH = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
_STR_LEN = {0xD9: 1, 0xDA: 2, 0xDB: 4}
_BIN_LEN = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_ARRAY_LEN = {0xDC: 2, 0xDD: 4}
_MAP_LEN = {0xDE: 2, 0xDF: 4}


def unpack_bounded(
    data: BytesLike, limits: MsgpackLimits, budget: DecodeBudget | None = None
) -> Any:
    """The one msgpack object that is all of ``data`` (str as str, bin as bytes, arrays as
    lists), if it keeps within ``limits`` and, decoded, fits in ``budget`` (which it then
    uses up; default ``limits.budget(len(data))``); else :class:`MsgpackRefused`."""
    if budget is None:
        budget = DecodeBudget(limits.budget(len(data)))
    budget.left -= measure(data, limits, budget.left)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:  # a map key not a str
        raise MsgpackRefused(f"not a msgpack record ({type(exc).__name__})") from None


def measure(data: BytesLike, limits: MsgpackLimits, budget: int) -> int:
    """Walk ``data`` as one msgpack object without decoding it; return the upper bound of
    what decoding it costs, or raise :class:`MsgpackRefused` as soon as a limit is broken
    (so the walk itself takes time in proportion to the budget, not to the data)."""
    view = memoryview(data).cast("B")
    end = len(view)
    pos = 0
    cost = 0
    keys = None if limits.keys is None else {key.encode() for key in limits.keys}
    #: items still to read in each open container (the first entry: the one root object),
    #: and whether it is a map (whose items alternate key, value)
    left = [1]
    maps = [False]

    def length(size: int) -> int:
        nonlocal pos
        if pos + size > end:
            raise MsgpackRefused(f"truncated at byte {end}")
        value = int.from_bytes(view[pos : pos + size], "big")
        pos += size
        return value

    def bounded(count: int, limit: int, what: str) -> int:
        if count > limit:
            raise MsgpackRefused(f"{what} of {count} (at most {limit}) at byte {pos}")
        return count

    while left:
        if not left[-1]:
            left.pop()
            maps.pop()
            continue
        is_key = maps[-1] and left[-1] % 2 == 0
        left[-1] -= 1
        if pos >= end:
            raise MsgpackRefused(f"truncated at byte {end}")
        kind = view[pos]
        pos += 1
        if is_key and not (0xA0 <= kind <= 0xBF or kind in _STR_LEN):
            raise MsgpackRefused(f"a map key that is not a string at byte {pos - 1}")
        items = -1  # a container's items, -1 for a scalar
        if kind <= 0x7F or kind in (0xC0, 0xC2, 0xC3):  # fixint (cached), nil, bools
            cost += _SLOT
        elif kind >= 0xE0:  # negative fixint
            cost += _SLOT + _INT
        elif kind <= 0x8F:
            items = 2 * bounded(kind & 0x0F, limits.max_map_len, "a map")
        elif kind <= 0x9F:
            items = bounded(kind & 0x0F, limits.max_array_len, "an array")
        elif kind <= 0xBF or kind in _STR_LEN:
            size = kind & 0x1F if kind <= 0xBF else length(_STR_LEN[kind])
            bounded(size, limits.max_str_len, "a string")
            if pos + size > end:
                raise MsgpackRefused(f"truncated at byte {end}")
            text = view[pos : pos + size].tobytes()
            if is_key and keys is not None and text not in keys:
                raise MsgpackRefused(f"a map key that no record has at byte {pos}")
            wide = not text.isascii()
            cost += _SLOT + _STR + size * (4 if wide else 1)
            pos += size
        elif kind in _BIN_LEN:
            size = bounded(length(_BIN_LEN[kind]), limits.max_bin_len, "a bin")
            if pos + size > end:
                raise MsgpackRefused(f"truncated at byte {end}")
            cost += _SLOT + _BIN + size
            pos += size
        elif kind in _FIXED_WIDTH:
            length(_FIXED_WIDTH[kind])
            cost += _SLOT + (0 if kind == 0xCC else _INT)  # uint8 is a cached small int
        elif kind in _ARRAY_LEN:
            items = bounded(length(_ARRAY_LEN[kind]), limits.max_array_len, "an array")
        elif kind in _MAP_LEN:
            items = 2 * bounded(length(_MAP_LEN[kind]), limits.max_map_len, "a map")
        else:
            raise MsgpackRefused(f"type byte {kind:#04x} (float, ext) at byte {pos - 1}")
        if items >= 0:
            if len(left) > limits.max_depth:
                raise MsgpackRefused(f"nested deeper than {limits.max_depth} at byte {pos}")
            is_map = kind <= 0x8F or kind in _MAP_LEN
            cost += _SLOT + (_DICT + _DICT_ENTRY * items // 2 if is_map else _LIST)
            left.append(items)
            maps.append(is_map)
        if cost > budget:
            raise MsgpackRefused(
                f"{len(view)} bytes that would decode into more than {budget} bytes "
                f"(stopped at byte {pos})"
            )
    if pos != end:
        raise MsgpackRefused(f"{end - pos} bytes after the record")
    return cost
