"""Length-prefixed frames over a byte stream, with file descriptors matched to frames.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of payload.
A frame whose announced length is over the limit is refused as soon as its header is
read, before any of the payload is.

File descriptors (SCM_RIGHTS) belong to the frame that *starts* in the chunk of bytes
they arrived with. A sender attaches a request's fds to the ``sendmsg()`` that carries
the first byte of that request's frame and sends no other frame's bytes in that call;
Linux then hands the fds to the ``recvmsg()`` that returns that first byte, and ends
that ``recvmsg()`` at the end of the bytes sent with the fds, so no later frame can
start in the same chunk. The decoder records, for every group of fds, the stream
positions of the chunk they came with and gives them to the one frame that starts in
that chunk and reaches its end. Fds that no frame can own are *discarded*: the caller
must close them (see :meth:`FrameDecoder.take_discarded_fds`).

This module does no I/O: bytes and fd numbers in, frames out.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from vmipc._record import field, record
from vmipc.protocol._errors import ErrorCode, LocalProtocolError, RemoteProtocolError

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
#: the default bound on a frame's payload, in bytes
DEFAULT_MAX_FRAME_SIZE = 1 << 20
#: the default bound on a request frame's payload, in bytes. Requests are small: the
#: largest a client sends (a ``hello`` with its name) is about a hundred bytes. A
#: payload's size bounds what decoding it costs (every msgpack object takes a byte at
#: least; see ``_messages.REQUEST_DECODE_LIMITS``), so requests get a much smaller bound
#: than replies: a hostile one costs a fraction of a millisecond, not a third of a second
DEFAULT_MAX_REQUEST_SIZE = 4 << 10
#: the default bound on the fds attached to one request
DEFAULT_MAX_FDS = 8


def encode_frame(payload: bytes, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Prefix ``payload`` with its length. Raises LocalProtocolError over the limit."""
    if len(payload) > max_frame_size:
        raise LocalProtocolError(
            ErrorCode.FRAME_TOO_LARGE,
            f"frame of {len(payload)} bytes is over the limit of {max_frame_size}",
            {"size": len(payload), "limit": max_frame_size},
        )
    return HEADER.pack(len(payload)) + payload


@record(frozen=False)
class Frame:
    """One decoded frame and the fds that came with it (now owned by the receiver)."""

    payload: bytes
    fds: list[int] = field(default_factory=list)
    #: the kernel dropped some of this frame's fds (MSG_CTRUNC), or more than the
    #: limit arrived; those that did arrive are still in ``fds``
    fds_truncated: bool = False


@record(frozen=False)
class _FdGroup:
    start: int  # stream offset of the first byte of the chunk the fds came with
    end: int  # stream offset just past that chunk
    fds: list[int]
    truncated: bool


class FrameDecoder:
    """Feed bytes (and fds) in with :meth:`feed`; take whole frames out with :meth:`next_frame`.

    Errors: :meth:`next_frame` raises :class:`RemoteProtocolError` with code
    ``frame-too-large`` when a header announces more than ``max_frame_size`` bytes, and
    with code ``too-many-fds`` when more than ``max_fds`` fds arrived for a frame that is
    not complete yet (see :meth:`_check_unfinished`);
    :meth:`feed_eof` raises it with code ``invalid-message`` when the stream ends inside
    a frame. After an error the decoder is unusable; close its fds with
    :meth:`release_fds`.
    """

    def __init__(
        self,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_fds: int = DEFAULT_MAX_FDS,
    ) -> None:
        self.max_frame_size = max_frame_size
        self.max_fds = max_fds
        self._buf = bytearray()
        self._buf_offset = 0  # stream offset of self._buf[0]
        self._groups: list[_FdGroup] = []
        self._discarded: list[int] = []
        self._broken = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned in a frame."""
        return len(self._buf)

    def feed(self, data: bytes, fds: Sequence[int] = (), *, fds_truncated: bool = False) -> None:
        """Add the bytes of one ``recvmsg()`` and the fds that came with them.

        The decoder owns ``fds`` from now on: they come back either in a :class:`Frame`
        or from :meth:`take_discarded_fds` / :meth:`release_fds`.
        """
        start = self._buf_offset + len(self._buf)
        self._buf += data
        if fds or fds_truncated:
            if self._broken or not data:
                # fds with no bytes cannot belong to any frame
                self._discarded.extend(fds)
                return
            self._groups.append(_FdGroup(start, start + len(data), list(fds), fds_truncated))

    def next_frame(self) -> Frame | None:
        """Return the next whole frame, or None until more bytes arrive."""
        if self._broken:
            return None
        if len(self._buf) < HEADER_SIZE:
            self._check_unfinished()
            return None
        (length,) = HEADER.unpack_from(self._buf)
        frame_start = self._buf_offset
        if length > self.max_frame_size:
            self._broken = True
            raise RemoteProtocolError(
                ErrorCode.FRAME_TOO_LARGE,
                f"frame of {length} bytes announced; the limit is {self.max_frame_size}",
                {"size": length, "limit": self.max_frame_size},
            )
        total = HEADER_SIZE + length
        if len(self._buf) < total:
            self._check_unfinished()
            return None
        payload = bytes(self._buf[HEADER_SIZE:total])
        del self._buf[:total]
        self._buf_offset += total
        frame_end = frame_start + total
        frame = Frame(payload)
        keep: list[_FdGroup] = []
        for group in self._groups:
            if group.start <= frame_start < group.end and frame_end >= group.end:
                frame.fds.extend(group.fds)
                frame.fds_truncated = frame.fds_truncated or group.truncated
            elif group.end <= frame_end:
                # came with bytes where no frame starts (or an earlier frame's tail)
                self._discarded.extend(group.fds)
            else:
                keep.append(group)
        self._groups = keep
        if len(frame.fds) > self.max_fds:
            frame.fds_truncated = True
        return frame

    def _check_unfinished(self) -> None:
        """Bound the fds held for the frame that is still arriving.

        Every whole frame has been taken, so each group of fds still held came with bytes
        of that frame: the group whose chunk holds its first byte is its own, the others
        can belong to no frame (a sender attaches a request's fds to its first byte) and
        are only discarded when the frame completes. A peer trickling a frame in, fds on
        every chunk, would make us hold fds without bound until then: past the per-request
        limit, the stream is broken instead.
        """
        start = self._buf_offset
        own = stray = 0
        for group in self._groups:
            if group.start <= start < group.end:
                own += len(group.fds)
            else:
                stray += len(group.fds)
        # more than the limit in the frame's own group is the request's to refuse
        # (limit-exceeded); the kernel already bounds it (the receive's ancillary space)
        if min(own, self.max_fds) + stray > self.max_fds:
            self._broken = True
            raise RemoteProtocolError(
                ErrorCode.TOO_MANY_FDS,
                f"{own + stray} fds arrived with a frame still incomplete; the limit is "
                f"{self.max_fds}, sent with the first byte of a request's frame",
                {"fds": own + stray, "limit": self.max_fds},
            )

    def feed_eof(self) -> None:
        """The stream ended. Raises RemoteProtocolError if it ended inside a frame."""
        if self._buf and not self._broken:
            self._broken = True
            raise RemoteProtocolError(
                ErrorCode.INVALID_MESSAGE,
                f"connection closed inside a frame ({len(self._buf)} bytes pending)",
                {"pending": len(self._buf)},
            )

    def take_discarded_fds(self) -> list[int]:
        """Fds that no frame owns; the caller must close them now."""
        fds, self._discarded = self._discarded, []
        return fds

    def release_fds(self) -> list[int]:
        """Every fd the decoder still holds (for teardown); the caller must close them."""
        fds = self.take_discarded_fds()
        for group in self._groups:
            fds.extend(group.fds)
        self._groups = []
        return fds
