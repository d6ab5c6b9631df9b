"""The run states of a machine, shared by the VMM and everything that reports on it."""

from __future__ import annotations

import enum


class RunState(enum.StrEnum):
    """Where a machine is in its life. The values are wire-visible (query-status, events)."""

    #: built, guest loaded, vCPUs not started yet
    CREATED = "created"
    #: vCPUs are in (or entering) KVM_RUN
    RUNNING = "running"
    #: every vCPU is parked outside KVM_RUN with its pending exit completed
    PAUSED = "paused"
    #: waiting for incoming memory and state; no guest booted
    INCOMING = "incoming"
    #: the guest asked to power off (exit port); vCPUs stopped
    SHUTDOWN = "shutdown"
    #: the guest died: triple fault, emulation failure, entry failure; vCPUs stopped
    CRASHED = "crashed"
    #: the VMM released the machine
    DESTROYED = "destroyed"
