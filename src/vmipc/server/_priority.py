"""Who goes first: the connections whose requests pass before everyone else's.

A connection goes first while it holds the pause lease (a checkpoint writing the guest
out, a migration in its stop-and-copy: the guest is down), from the moment its ``pause``
with a lease begins; and while it holds a priority claim (``claim-priority``: a migration
takes one for its whole run). Each of such a client's steps is a request that would
otherwise wait for its turn on the server's one trio thread behind every other
connection's queries, and on a small host the clients sending those queries compete for
the same CPUs as the sequence and the destination VMM.

While anybody goes first, the other connections' requests are let through one at a time,
at most ``rate`` per second, first come first served; once nobody goes first the waiting
ones go at once. They are never refused: a monitor still gets its answers during a long
pause, only later. ``rate`` 0 holds them until nobody goes first, as QEMU's monitor waits
while a migration's stop-and-copy holds its big lock; ``rate`` inf never holds anything
(every connection is served in turn).

``hello`` and ``cancel`` are never held: a new client can still connect, and a client can
still take back a request that is waiting here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import trio

from vmipc.server._lease import LeaseHolder, PauseLease

log = logging.getLogger("vmipc.server")

#: commands that pass at once even while other connections go first
NEVER_HELD = frozenset({"hello", "cancel"})


class Priority:
    """The server's priority claims and the admission of the other requests (see the
    module's text). Everything runs on the trio thread."""

    def __init__(self, lease: PauseLease, rate: float) -> None:
        if not rate >= 0:
            raise ValueError(f"the rate must be 0 or more requests per second, not {rate}")
        self._lease = lease
        lease.on_change = self._changed
        self._interval = math.inf if rate == 0 else 1.0 / rate
        #: connection -> the remover of its close hook
        self._claims: dict[LeaseHolder, Callable[[], None]] = {}
        self._change = trio.Event()
        #: trio's lock is fair: the held requests go in the order they came
        self._turn = trio.Lock()
        #: the trio time at which the next held request may go (never, with rate 0)
        self._next = math.inf if rate == 0 else -math.inf
        #: requests held here now
        self.waiting = 0

    def _changed(self) -> None:
        self._change.set()
        self._change = trio.Event()

    # claims

    def claim(self, connection: LeaseHolder) -> None:
        """``connection`` goes first until :meth:`release` or until it closes."""
        if connection in self._claims:
            return
        self._claims[connection] = connection.add_close_hook(lambda: self._drop(connection))
        log.info("connection %d goes first", connection.id)
        self._changed()

    def release(self, connection: LeaseHolder) -> bool:
        """End ``connection``'s claim; whether it had one."""
        unhook = self._claims.get(connection)
        if unhook is None:
            return False
        unhook()
        self._drop(connection)
        return True

    def _drop(self, connection: LeaseHolder) -> None:
        if self._claims.pop(connection, None) is not None:
            log.info("connection %d no longer goes first", connection.id)
            self._changed()

    def status(self) -> list[int]:
        """For query-status: the connections that go first now."""
        first = self._lease.first
        ids = {conn.id for conn in self._claims}
        if first is not None:
            ids.add(first.id)
        return sorted(ids)

    # admission

    def must_wait(self, connection: LeaseHolder, command: str) -> bool:
        if command in NEVER_HELD or connection in self._claims:
            return False
        first = self._lease.first
        if first is connection:
            return False
        return first is not None or bool(self._claims)

    async def admit(self, connection: LeaseHolder, command: str) -> None:
        """Return when ``connection`` may run ``command``: at once, unless others go
        first; then when its turn has come or nobody goes first any more."""
        if self._interval == 0 or not self.must_wait(connection, command):
            return  # rate inf: nobody is ever held
        self.waiting += 1
        try:
            async with self._turn:
                while self.must_wait(connection, command):
                    now = trio.current_time()
                    if now >= self._next:
                        self._next = now + self._interval
                        return
                    with trio.move_on_at(self._next):
                        await self._change.wait()
        finally:
            self.waiting -= 1
