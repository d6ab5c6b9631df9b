"""The surface of a machine that the layers above (server, commands) may use.

The concrete class is :class:`vmipc.vmm.machine.Machine`; this Protocol is what the
control server is written against, so it never reaches into VMM internals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vmipc.errors import VmipcError
from vmipc.vmm.runstate import RunState


@dataclass(frozen=True)
class StateChange:
    """A run-state transition. ``reason`` explains stops (e.g. "triple fault on vcpu 1")."""

    old: RunState
    new: RunState
    reason: str | None = None


class InvalidStateError(VmipcError):
    """The operation is not allowed in the machine's current run state."""

    def __init__(self, operation: str, state: RunState) -> None:
        super().__init__(f"cannot {operation} while {state.value}")
        self.operation = operation
        self.state = state


class MachineApi(Protocol):
    @property
    def state(self) -> RunState: ...

    @property
    def vcpu_count(self) -> int: ...

    @property
    def memory_size(self) -> int: ...

    @property
    def stop_reason(self) -> str | None:
        """Why the machine stopped (shutdown / crashed), else None."""
        ...

    def start(self) -> None:
        """CREATED -> RUNNING: start the vCPU threads."""

    def pause(self) -> None:
        """RUNNING -> PAUSED. Blocks until every vCPU is parked outside KVM_RUN.

        Raises InvalidStateError unless RUNNING. Call it from a worker thread.
        """

    def resume(self) -> None:
        """PAUSED -> RUNNING. Raises InvalidStateError unless PAUSED."""

    def close(self) -> None:
        """Stop every vCPU thread and release KVM resources (-> DESTROYED). Idempotent."""

    def add_listener(self, callback: Callable[[StateChange], None]) -> Callable[[], None]:
        """Call ``callback`` (from any thread) on every state change; returns an unsubscribe."""
        ...
