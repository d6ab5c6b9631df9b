"""The VMM's one machine slot: what the control server serves.

A VMM either boots a guest (the slot holds a machine from the start) or waits to receive
one (``--incoming``): then the slot is empty, its state is ``incoming``, and the machine is
built when its configuration arrives — from ``--memory``/``--vcpus`` at start-up, or from
the first ``load-state``. A received machine stays ``incoming`` until its state is
loaded; then it is ``paused`` and ``resume`` runs it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from vmipc.vmm.machine import BootSource, Machine, MachineConfig, MachineState
from vmipc.vmm.machine_api import InvalidStateError, StateChange
from vmipc.vmm.runstate import RunState

#: a damage reason is cut to this many characters: it quotes an error about hostile data
MAX_DAMAGE_REASON = 240


class MachineDamaged(InvalidStateError):
    """``resume`` of a received machine whose memory failed a load and has not been loaded
    completely since; ``reason`` says which load failed and why."""

    def __init__(self, reason: str, state: RunState) -> None:
        super().__init__(
            f"resume a guest whose incoming memory failed its checks ({reason})", state
        )
        self.reason = reason


class MachineHost:
    """Holds the VMM's machine (or its absence) and forwards the machine API to it."""

    def __init__(
        self,
        console: Callable[[bytes], None],
        machine: Machine | None = None,
        *,
        machine_factory: Callable[[MachineConfig, Callable[[bytes], None]], Machine] = Machine,
    ) -> None:
        self._console = console
        self._factory = machine_factory
        self._lock = threading.RLock()
        self._listeners: list[Callable[[StateChange], None]] = []
        self._machine: Machine | None = None
        #: True while a received machine waits for its state (reported as ``incoming``)
        self._awaiting_state = machine is None
        #: True for a received machine until it first runs: memory may still be loaded
        self._receiving = machine is None
        #: why the received memory cannot be trusted (a load failed half-way), until a
        #: load replaces all of it
        self._damaged: str | None = None
        self._closed = False
        if machine is not None:
            self._adopt(machine)

    # --- the slot -----------------------------------------------------------------------

    @property
    def machine(self) -> Machine | None:
        return self._machine

    @property
    def incoming(self) -> bool:
        """The machine waits for its state (``incoming``)."""
        return self._awaiting_state

    @property
    def receiving(self) -> bool:
        """A received machine that has not run yet: loads are allowed."""
        return self._receiving and not self._closed

    @property
    def damaged(self) -> str | None:
        """Why the received memory cannot be run (a load failed), or None."""
        return self._damaged

    def mark_damaged(self, reason: str) -> None:
        """A load failed half-way: refuse to resume until a complete load succeeds."""
        if len(reason) > MAX_DAMAGE_REASON:
            reason = reason[: MAX_DAMAGE_REASON - 1] + "\u2026"
        self._damaged = reason

    def mark_complete(self) -> None:
        """A load that replaced every page of RAM succeeded: whatever a failed load left
        is gone. (A load of some pages only, after a failure, leaves the mark: the other
        pages may still hold what failed its checks.)"""
        self._damaged = None

    def require_machine(self, operation: str) -> Machine:
        machine = self._machine
        if machine is None:
            raise InvalidStateError(operation, RunState.INCOMING)
        return machine

    def configure(self, config: MachineConfig) -> Machine:
        """Build the incoming machine from ``config`` (paused, no guest booted).

        If a machine is already there, ``config`` must fit it (same memory and vCPUs).
        """
        with self._lock:
            if self._machine is not None:
                mismatch = config.mismatch(self._machine.config)
                if mismatch:
                    raise ValueError(f"incoming configuration does not fit this VMM: {mismatch}")
                return self._machine
            if not self._awaiting_state:
                raise InvalidStateError("configure a machine", self.state)
            empty = MachineConfig(config.memory_size, config.vcpus, BootSource("none"))
            machine = self._factory(empty, self._console)
            try:
                machine.start(paused=True)
            except BaseException:
                machine.close()
                raise
            self._adopt(machine)
            return machine

    def load_state(self, state: MachineState) -> None:
        """Restore ``state`` into the incoming machine (building it first if needed)."""
        with self._lock:
            if not self._awaiting_state:
                raise InvalidStateError("load state", self.state)
            machine = self.configure(state.config)
            machine.restore_state(state)
            self._awaiting_state = False
        self._notify(StateChange(RunState.INCOMING, RunState.PAUSED, None))

    def _adopt(self, machine: Machine) -> None:
        self._machine = machine
        machine.add_listener(self._forward)

    def _forward(self, change: StateChange) -> None:
        if self._awaiting_state:
            return  # a received machine's own start-up transitions are not news
        self._notify(change)

    def _notify(self, change: StateChange) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for callback in listeners:
            callback(change)

    # --- MachineApi -----------------------------------------------------------------------

    @property
    def state(self) -> RunState:
        if self._closed:
            return RunState.DESTROYED
        if self._awaiting_state:
            return RunState.INCOMING
        assert self._machine is not None
        return self._machine.state

    @property
    def vcpu_count(self) -> int:
        return self._machine.vcpu_count if self._machine is not None else 0

    @property
    def memory_size(self) -> int:
        return self._machine.memory_size if self._machine is not None else 0

    @property
    def stop_reason(self) -> str | None:
        return self._machine.stop_reason if self._machine is not None else None

    def start(self) -> None:
        self.require_machine("start").start()

    def pause(self) -> None:
        if self._awaiting_state:
            raise InvalidStateError("pause", RunState.INCOMING)
        self.require_machine("pause").pause()

    def resume(self) -> None:
        if self._awaiting_state:
            raise InvalidStateError("resume", RunState.INCOMING)
        if self._damaged is not None:
            raise MachineDamaged(self._damaged, self.state)
        self.require_machine("resume").resume()
        self._receiving = False

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            old = self.state
            self._closed = True
            machine = self._machine
        if machine is not None:
            machine.close()
        if old is RunState.INCOMING:
            self._notify(StateChange(old, RunState.DESTROYED, None))

    def add_listener(self, callback: Callable[[StateChange], None]) -> Callable[[], None]:
        with self._lock:
            self._listeners.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return unsubscribe
