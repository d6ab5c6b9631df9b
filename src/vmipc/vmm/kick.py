"""The signal that kicks a thread out of a blocking system call (KVM_RUN, a write to a
pipe nobody reads): its handler does nothing, so the call returns EINTR."""

from __future__ import annotations

import signal
import threading

KICK_SIGNAL = signal.SIGUSR1


def _ignore_signal(signum: int, frame: object) -> None:
    """The kick only has to interrupt KVM_RUN; nothing to do when it is delivered."""


def install_kick_handler() -> None:
    """Install the no-op handler for the vCPU kick signal (must run in the main thread)."""
    current = signal.getsignal(KICK_SIGNAL)
    if current is _ignore_signal:
        return
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "install_kick_handler() must first run in the main thread (Machine() does it)"
        )
    signal.signal(KICK_SIGNAL, _ignore_signal)
