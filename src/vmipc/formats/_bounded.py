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

import functools
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

#: what a value with no payload costs, by its type byte: positive fixints (cached), nil,
#: false, true; negative fixints (not cached); 0 for every other type byte
_PLAIN_COST = [
    _SLOT if kind <= 0x7F or kind in (0xC0, 0xC2, 0xC3) else _SLOT + _INT if kind >= 0xE0 else 0
    for kind in range(256)
]
#: the integers of a fixed width: (bytes after the type byte, cost); uint8 is a cached int
_FIXED_WIDTH = {
    kind: (width, _SLOT + (0 if kind == 0xCC else _INT))
    for kind, width in {
        0xCC: 1,
        0xCD: 2,
        0xCE: 4,
        0xCF: 8,
        0xD0: 1,
        0xD1: 2,
        0xD2: 4,
        0xD3: 8,
    }.items()
}
_STR_LEN = {0xD9: 1, 0xDA: 2, 0xDB: 4}
_BIN_LEN = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_ARRAY_LEN = {0xDC: 2, 0xDD: 4}
_MAP_LEN = {0xDE: 2, 0xDF: 4}


def _str_cost(text: bytes) -> int:
    """A str of these UTF-8 bytes, decoded."""
    return _SLOT + _STR + (len(text) if text.isascii() else 4 * len(text))


@functools.lru_cache(maxsize=8)
def _key_costs(keys: frozenset[str]) -> dict[bytes, int]:
    """A limit's map keys as they appear in the data, and what each costs decoded
    (computed once per set of keys: a state's decode is on a migration's critical path)."""
    return {key.encode(): _str_cost(key.encode()) for key in keys}


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
    (so the walk itself takes time in proportion to the budget, not to the data).

    One loop, written for speed (it runs on every state a migration loads): a map's key
    and value are taken in one turn, type bytes are looked up in tables, and lengths are
    read inline."""
    view = memoryview(data).cast("B")
    end = len(view)
    pos = 0
    cost = 0
    keys = None if limits.keys is None else _key_costs(limits.keys)
    max_depth = limits.max_depth
    max_str = limits.max_str_len
    plain = _PLAIN_COST
    #: what is still to read in each open container: an array's items (> 0), a map's
    #: key-value pairs (negative), 0 once done; the first entry holds the one root object
    left = [1]
    while left:
        items = left[-1]
        if items > 0:
            left[-1] = items - 1
        elif items < 0:
            left[-1] = items + 1
            # the key: a string, one of the records' field names if they are given
            if pos >= end:
                raise MsgpackRefused(f"truncated at byte {end}")
            kind = view[pos]
            pos += 1
            if 0xA0 <= kind <= 0xBF:
                size = kind & 0x1F
            elif kind in _STR_LEN:
                width = _STR_LEN[kind]
                if pos + width > end:
                    raise MsgpackRefused(f"truncated at byte {end}")
                size = int.from_bytes(view[pos : pos + width], "big")
                pos += width
            else:
                raise MsgpackRefused(f"a map key that is not a string at byte {pos - 1}")
            if size > max_str:
                raise MsgpackRefused(f"a string of {size} (at most {max_str}) at byte {pos}")
            if pos + size > end:
                raise MsgpackRefused(f"truncated at byte {end}")
            text = view[pos : pos + size].tobytes()
            if keys is None:
                cost += _str_cost(text)
            elif text in keys:
                cost += keys[text]
            else:
                raise MsgpackRefused(f"a map key that no record has at byte {pos}")
            pos += size
        else:
            left.pop()
            continue
        # a value
        if pos >= end:
            raise MsgpackRefused(f"truncated at byte {end}")
        kind = view[pos]
        pos += 1
        price = plain[kind]
        if price:  # the most common values, done here
            cost += price
            if cost > budget:
                raise _over(end, budget, pos)
            continue
        if 0x80 <= kind <= 0x9F:  # fixmap, fixarray
            count = kind & 0x0F
            is_map = kind <= 0x8F
        elif kind in _FIXED_WIDTH:
            width, price = _FIXED_WIDTH[kind]
            if pos + width > end:
                raise MsgpackRefused(f"truncated at byte {end}")
            pos += width
            cost += price
            count = -1
        else:
            if kind in _BIN_LEN:
                width = _BIN_LEN[kind]
            elif kind in _STR_LEN:
                width = _STR_LEN[kind]
            elif kind in _ARRAY_LEN:
                width = _ARRAY_LEN[kind]
            elif kind in _MAP_LEN:
                width = _MAP_LEN[kind]
            elif 0xA0 <= kind <= 0xBF:
                width = 0
            else:
                raise MsgpackRefused(f"type byte {kind:#04x} (float, ext) at byte {pos - 1}")
            if pos + width > end:
                raise MsgpackRefused(f"truncated at byte {end}")
            size = int.from_bytes(view[pos : pos + width], "big") if width else kind & 0x1F
            pos += width
            if kind in _ARRAY_LEN or kind in _MAP_LEN:
                count = size
                is_map = kind in _MAP_LEN
            else:
                if kind in _BIN_LEN:
                    if size > limits.max_bin_len:
                        raise MsgpackRefused(
                            f"a bin of {size} (at most {limits.max_bin_len}) at byte {pos}"
                        )
                    price = _SLOT + _BIN + size
                else:
                    if size > max_str:
                        raise MsgpackRefused(
                            f"a string of {size} (at most {max_str}) at byte {pos}"
                        )
                    if pos + size > end:
                        raise MsgpackRefused(f"truncated at byte {end}")
                    price = _str_cost(view[pos : pos + size].tobytes())
                if pos + size > end:
                    raise MsgpackRefused(f"truncated at byte {end}")
                pos += size
                cost += price
                count = -1
        if count >= 0:
            if is_map:
                if count > limits.max_map_len:
                    raise MsgpackRefused(
                        f"a map of {count} (at most {limits.max_map_len}) at byte {pos}"
                    )
            elif count > limits.max_array_len:
                raise MsgpackRefused(
                    f"an array of {count} (at most {limits.max_array_len}) at byte {pos}"
                )
            if len(left) > max_depth:
                raise MsgpackRefused(f"nested deeper than {max_depth} at byte {pos}")
            cost += _SLOT + (_DICT + _DICT_ENTRY * count if is_map else _LIST)
            left.append(-count if is_map else count)
        if cost > budget:
            raise _over(end, budget, pos)
    if pos != end:
        raise MsgpackRefused(f"{end - pos} bytes after the record")
    return cost


def _over(size: int, budget: int, pos: int) -> MsgpackRefused:
    return MsgpackRefused(
        f"{size} bytes that would decode into more than {budget} bytes (stopped at byte {pos})"
    )
