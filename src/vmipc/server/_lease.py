"""The pause lease: a pause tied to the connection that asked for it.

``pause`` with ``lease`` seconds takes the machine's one lease for its connection. The VMM
resumes the guest by itself when that connection closes, or when the lease passes without
a ``renew-lease`` from it; ``release-lease`` gives it up (the machine stays paused) and any
``resume`` ends it. So a client that dies while it holds a VM paused (in the middle of a
checkpoint, say) does not leave the VM paused forever.

One :class:`PauseLease` per server. Everything runs on the trio thread: the expiry is a
trio system task sleeping until the lease's deadline, which a renewal moves and a closed
connection brings forward to now; it resumes the machine under the server's machine lock,
so it never interleaves with another run-state change.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from vmipc.protocol import CommandError, ErrorCode
from vmipc.vmm.machine_api import MachineApi
from vmipc.vmm.runstate import RunState

log = logging.getLogger("vmipc.server")


class LeaseHolder(Protocol):
    """The connection side of a lease (the server's connection object)."""

    id: int

    def add_close_hook(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Call ``hook`` (on the trio thread) when the connection closes; returns a remover."""
        ...


@dataclass(eq=False)
class _Lease:
    holder: LeaseHolder
    duration: float
    scope: trio.CancelScope
    taken_at: float
    why: str = "expired"
    unhook: Callable[[], None] = field(default=lambda: None)


class PauseLease:
    """The machine's pause lease (at most one). ``closing`` says whether the server is
    shutting down: then an ending lease never resumes the machine."""

    def __init__(
        self, machine: MachineApi, machine_lock: trio.Lock, closing: Callable[[], bool]
    ) -> None:
        self._machine = machine
        self._lock = machine_lock
        self._closing = closing
        self._lease: _Lease | None = None
        #: the connection whose ``pause`` with a lease is under way
        self._taking: LeaseHolder | None = None
        #: called (on the trio thread) whenever :attr:`first` may have changed
        self.on_change: Callable[[], None] = lambda: None

    @property
    def first(self) -> LeaseHolder | None:
        """The connection whose requests go before the others' while the guest is down
        (see ``vmipc.server._priority``): the lease's holder, or the connection whose
        ``pause`` with a lease is under way, or None."""
        return self._taking if self._lease is None else self._lease.holder

    @contextlib.contextmanager
    def taking(self, holder: LeaseHolder) -> Iterator[None]:
        """Around a ``pause`` with a lease: ``holder`` goes first from now on, so that
        neither the pause nor its answer waits behind other connections' requests (the
        guest may be down before the answer is sent)."""
        self._taking = holder
        self.on_change()
        try:
            yield
        finally:
            if self._taking is holder:
                self._taking = None
                self.on_change()

    def status(self) -> dict[str, Any] | None:
        """For query-status: who holds the lease and when it expires, or None."""
        lease = self._lease
        if lease is None:
            return None
        return {
            "connection": lease.holder.id,
            "expires_in": max(0.0, lease.scope.deadline - trio.current_time()),
            "duration": lease.duration,
        }

    def take(self, holder: LeaseHolder, duration: float) -> None:
        """After a successful pause: tie it to ``holder`` for ``duration`` seconds."""
        self.end()
        now = trio.current_time()
        lease = _Lease(holder, duration, trio.CancelScope(deadline=now + duration), now)
        lease.unhook = holder.add_close_hook(lambda: self._holder_closed(lease))
        self._lease = lease
        self.on_change()
        trio.lowlevel.spawn_system_task(self._watch, lease, name="pause lease")

    def _held_by(self, holder: LeaseHolder, command: str) -> _Lease:
        lease = self._lease
        if lease is None or lease.holder is not holder:
            raise CommandError(
                ErrorCode.NO_LEASE,
                f"{command}: this connection holds no pause lease (never taken, released, "
                "ended by a resume, or expired)",
            )
        return lease

    def renew(self, holder: LeaseHolder, duration: float | None) -> float:
        """Move the expiry of ``holder``'s lease to now + duration; seconds left."""
        lease = self._held_by(holder, "renew-lease")
        if duration is not None:
            lease.duration = duration
        lease.scope.deadline = trio.current_time() + lease.duration
        return lease.duration

    def release(self, holder: LeaseHolder) -> None:
        """``holder`` gives its lease up; the machine stays paused."""
        self._held_by(holder, "release-lease")
        log.info("pause lease of connection %d released; the machine stays paused", holder.id)
        self.end()

    def end(self) -> None:
        """The lease ends without resuming anything (a resume, a release, a new pause)."""
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.unhook()
            lease.scope.cancel()
            self.on_change()

    def _holder_closed(self, lease: _Lease) -> None:
        if self._lease is lease:
            lease.why = "its connection closed"
            lease.scope.deadline = -math.inf

    async def _watch(self, lease: _Lease) -> None:
        """Sleep until the lease's deadline; if it is still the lease then, resume."""
        try:
            with lease.scope:
                await trio.sleep_forever()
            if self._lease is not lease:
                return  # ended (released, resumed, replaced) before its time
            async with self._lock:
                if self._lease is not lease:
                    return
                self._lease = None
                lease.unhook()
                self.on_change()
                if self._closing():
                    return
                held = trio.current_time() - lease.taken_at
                state = self._machine.state
                if state is not RunState.PAUSED:
                    return
                log.warning(
                    "pause lease of connection %d %s after %.1fs: resuming the guest",
                    lease.holder.id,
                    lease.why,
                    held,
                )
                self._machine.resume()
        except Exception:  # a system task must never raise
            log.exception("pause lease: resuming the guest failed")
