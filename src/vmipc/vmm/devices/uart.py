"""A 16550A UART (the PC's COM1) as a pure, thread-safe device model.

The VMM calls :meth:`Uart16550.io_read` / :meth:`Uart16550.io_write` from vCPU threads on
port-I/O exits for the eight ports from the base (0x3f8 for COM1), and
:meth:`Uart16550.feed_input` from whatever thread reads the console. Every public operation
runs entirely under the device's one lock, including the ``sink`` and ``irq`` callbacks it
makes, so an operation is never half-done when another thread (pause, snapshot) gets the
lock, and transmitted bytes and interrupt-line changes reach the callbacks in the exact order
the guest caused them.

The model follows the National PC16550D data sheet closely enough for Linux's 8250 driver
(autoconfig, loopback probe, THRE re-assert test), FreeBSD's uart(4) (loopback FIFO-size
probe) and polled writers. Deliberate simplifications, none visible to those drivers:

* Transmission is instantaneous: a THR write reaches the sink at once, so LSR.THRE and
  LSR.TEMT are always set and the THR-empty interrupt re-arms right after every THR write
  (the interrupt line pulses low and high again, as on hardware, when that is the only
  source).
* There is no character timer. In FIFO mode, when the rx FIFO holds fewer bytes than the
  trigger level, the "character timeout" indication (IIR 0x0C) is reported at once instead
  of four character times later; drivers treat it like "data available".
* Parity, framing and break errors never occur; the only line-status error is overrun
  (LSR.OE), which loopback traffic can cause. Console input never overruns: it is offered
  through :meth:`Uart16550.feed_input`, which accepts only what fits.
* The modem-status inputs are wired to "carrier, data set ready, clear to send" (MSR 0xB0)
  outside loopback.
* The line settings (divisor latch, LCR word length, parity, stop bits, break) are stored
  and read back but do not change the bytes: the sink gets all 8 bits of every THR write.

On a PC the UART's interrupt output reaches the interrupt controller only while MCR.OUT2 is
set; in loopback mode the OUT2 pin is forced inactive, so the line is gated off there too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import ClassVar

__all__ = [
    "COM1_BASE",
    "COM1_IRQ",
    "DEFAULT_RX_BACKLOG",
    "FIFO_SIZE",
    "PORT_COUNT",
    "Uart16550",
    "UartState",
]

#: first I/O port of COM1 and its ISA interrupt line
COM1_BASE = 0x3F8
COM1_IRQ = 4
#: number of consecutive ports a 16550 decodes
PORT_COUNT = 8
#: depth of the receive FIFO in FIFO mode (the transmit FIFO is never observable)
FIFO_SIZE = 16
#: default size of the host-side input buffer behind the receive FIFO
DEFAULT_RX_BACKLOG = 4096
#: the most a restored record may ask the VMM to buffer of console input (bytes)
MAX_RX_BACKLOG = 1 << 20

# Register offsets from the base port.
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

# IER: interrupt enable
IER_ERBFI = 0x01  # received data available (and character timeout)
IER_ETBEI = 0x02  # transmitter holding register empty
IER_ELSI = 0x04  # receiver line status
IER_EDSSI = 0x08  # modem status
IER_MASK = 0x0F

# IIR: interrupt identification (bits 0-3), FIFO-enabled flags (bits 6-7)
IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_CTI = 0x0C
IIR_FIFO_ENABLED = 0xC0

# FCR: FIFO control
FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_DMA_MODE = 0x08
FCR_TRIGGER = 0xC0
FCR_STORED = FCR_ENABLE | FCR_DMA_MODE | FCR_TRIGGER
RX_TRIGGER_LEVELS = (1, 4, 8, 14)

# LCR: line control
LCR_DLAB = 0x80

# MCR: modem control
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

# LSR: line status
LSR_DR = 0x01
LSR_OE = 0x02
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

# MSR: modem status (deltas in bits 0-3, line states in bits 4-7)
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTAS = 0x0F
MSR_LINES = 0xF0
#: what the (virtual) modem presents outside loopback: carrier, data set ready, clear to send
MSR_IDLE_LINES = MSR_DCD | MSR_DSR | MSR_CTS

_RESET_DIVISOR = 12  # 9600 baud from the PC's 1.8432 MHz clock
_BYTES = tuple(bytes((i,)) for i in range(256))


def _fifo_capacity(fcr: int) -> int:
    return FIFO_SIZE if fcr & FCR_ENABLE else 1


def _modem_lines(mcr: int) -> int:
    """The MSR line bits (4-7) the UART sees for a given MCR."""
    if not mcr & MCR_LOOP:
        return MSR_IDLE_LINES
    # Loopback: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
    return ((mcr & MCR_RTS) << 3) | ((mcr & MCR_DTR) << 5) | ((mcr & (MCR_OUT1 | MCR_OUT2)) << 4)


@dataclass(frozen=True)
class UartState:
    """Everything a :class:`Uart16550` needs to continue exactly where it was saved.

    The interrupt identification (IIR) and the interrupt-line level are not stored: both are
    functions of the fields below. ``thr_ipending`` is the THR-empty interrupt latch (set
    when THR empties or IER.ETBEI is turned on, cleared by reading IIR while it is the
    reported source or by writing THR); it is only ever set while IER.ETBEI is.

    ``rx_fifo`` holds the bytes the guest can read now (at most 16 in FIFO mode, 1
    otherwise); ``rx_backlog`` the accepted console input waiting behind it, of at most
    ``rx_backlog_limit`` bytes.

    Constructing a record checks it: a value out of range, or a combination the device can
    never be in, raises :class:`ValueError`.
    """

    VERSION: ClassVar[int] = 1

    ier: int
    lcr: int
    mcr: int
    lsr: int
    msr: int
    scr: int
    dll: int
    dlm: int
    fcr: int
    thr_ipending: bool
    rx_fifo: bytes
    rx_backlog: bytes
    rx_backlog_limit: int

    def __post_init__(self) -> None:
        for name in ("ier", "lcr", "mcr", "lsr", "msr", "scr", "dll", "dlm", "fcr"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= 0xFF:
                raise ValueError(f"UartState.{name} must be an int in 0..255, not {value!r}")
        if type(self.thr_ipending) is not bool:
            raise ValueError(f"UartState.thr_ipending must be a bool, not {self.thr_ipending!r}")
        for name in ("rx_fifo", "rx_backlog"):
            if type(getattr(self, name)) is not bytes:
                raise ValueError(f"UartState.{name} must be bytes")
        limit = self.rx_backlog_limit
        if type(limit) is not int or not 0 <= limit <= MAX_RX_BACKLOG:
            raise ValueError(
                f"UartState.rx_backlog_limit must be an int in 0 .. {MAX_RX_BACKLOG}, not {limit!r}"
            )

        def bad(why: str) -> ValueError:
            return ValueError(f"inconsistent UartState: {why}")

        if self.ier & ~IER_MASK:
            raise bad(f"IER {self.ier:#04x} has bits above 3 set")
        if self.mcr & ~MCR_MASK:
            raise bad(f"MCR {self.mcr:#04x} has bits above 4 set")
        if self.fcr & ~FCR_STORED or (self.fcr and not self.fcr & FCR_ENABLE):
            raise bad(f"FCR {self.fcr:#04x} is not a programmable FIFO setting")
        if self.lsr & ~(LSR_DR | LSR_OE | LSR_THRE | LSR_TEMT) or (
            self.lsr & (LSR_THRE | LSR_TEMT) != LSR_THRE | LSR_TEMT
        ):
            raise bad(f"LSR {self.lsr:#04x} is not DR/OE with THRE and TEMT set")
        if bool(self.lsr & LSR_DR) != bool(self.rx_fifo):
            raise bad("LSR.DR does not match whether rx_fifo holds data")
        if self.msr & MSR_LINES != _modem_lines(self.mcr):
            raise bad(f"MSR {self.msr:#04x} does not show the modem lines MCR implies")
        capacity = _fifo_capacity(self.fcr)
        if len(self.rx_fifo) > capacity:
            raise bad(f"rx_fifo holds {len(self.rx_fifo)} bytes, more than {capacity}")
        if len(self.rx_backlog) > limit:
            raise bad(f"rx_backlog holds {len(self.rx_backlog)} bytes, more than {limit}")
        if self.rx_backlog and len(self.rx_fifo) < capacity and not self.mcr & MCR_LOOP:
            raise bad("rx_backlog is waiting while the rx FIFO has room")
        if self.thr_ipending and not self.ier & IER_ETBEI:
            raise bad("thr_ipending is set while IER.ETBEI is clear")

    def to_dict(self) -> dict[str, int | bytes]:
        """A msgpack-friendly mapping (ints and bytes only), including ``"version"``."""
        return {
            "version": self.VERSION,
            "ier": self.ier,
            "lcr": self.lcr,
            "mcr": self.mcr,
            "lsr": self.lsr,
            "msr": self.msr,
            "scr": self.scr,
            "dll": self.dll,
            "dlm": self.dlm,
            "fcr": self.fcr,
            "thr_ipending": int(self.thr_ipending),
            "rx_fifo": self.rx_fifo,
            "rx_backlog": self.rx_backlog,
            "rx_backlog_limit": self.rx_backlog_limit,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> UartState:
        """Rebuild a record from :meth:`to_dict` output.

        Raises :class:`ValueError` if ``d`` is not a mapping, lacks an integer
        ``"version"``, has a version other than :attr:`VERSION` (newer records are refused
        rather than half-understood), misses or adds keys, or holds values of the wrong type
        or an impossible device state.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"UartState record must be a mapping, not {type(d).__name__}")
        version = d.get("version")
        if type(version) is not int:
            raise ValueError(f"UartState record has no integer 'version' (got {version!r})")
        if version > cls.VERSION:
            raise ValueError(
                f"UartState record version {version} is newer than this build supports"
                f" (version {cls.VERSION})"
            )
        if version != cls.VERSION:
            raise ValueError(f"unknown UartState record version {version}")
        expected = {"version"} | {f.name for f in fields(cls)}
        missing = expected - d.keys()
        extra = d.keys() - expected
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(sorted(missing))}")
            if extra:
                parts.append(f"unexpected {', '.join(sorted(map(str, extra)))}")
            raise ValueError(f"UartState record keys: {'; '.join(parts)}")

        def get_int(key: str) -> int:
            value = d[key]
            if type(value) is not int:
                raise ValueError(f"UartState record {key!r} must be an int, not {value!r}")
            return value

        def get_bytes(key: str) -> bytes:
            value = d[key]
            if not isinstance(value, bytes | bytearray):
                raise ValueError(f"UartState record {key!r} must be bytes, not {value!r}")
            return bytes(value)

        thr_ipending = d["thr_ipending"]
        if thr_ipending not in (0, 1) or type(thr_ipending) not in (int, bool):
            raise ValueError(
                f"UartState record 'thr_ipending' must be 0 or 1, not {thr_ipending!r}"
            )
        return cls(
            ier=get_int("ier"),
            lcr=get_int("lcr"),
            mcr=get_int("mcr"),
            lsr=get_int("lsr"),
            msr=get_int("msr"),
            scr=get_int("scr"),
            dll=get_int("dll"),
            dlm=get_int("dlm"),
            fcr=get_int("fcr"),
            thr_ipending=bool(thr_ipending),
            rx_fifo=get_bytes("rx_fifo"),
            rx_backlog=get_bytes("rx_backlog"),
            rx_backlog_limit=get_int("rx_backlog_limit"),
        )


class Uart16550:
    """A 16550A UART behind eight I/O ports.

    ``sink`` receives every transmitted byte (one ``bytes`` object per THR write, in order,
    exactly once; loopback traffic is not transmitted). ``irq(level)`` drives the interrupt
    line, 1 asserted and 0 deasserted, and is called only when the level changes; the line
    starts deasserted. Both callbacks run under the device lock: they must be quick and must
    not call back into the device (that raises :class:`RuntimeError` rather than
    deadlocking).

    ``rx_backlog_limit`` bounds the host-side input buffer behind the receive FIFO (see
    :meth:`feed_input`).
    """

    def __init__(
        self,
        sink: Callable[[bytes], None],
        irq: Callable[[int], None] | None = None,
        *,
        rx_backlog_limit: int = DEFAULT_RX_BACKLOG,
    ) -> None:
        if rx_backlog_limit < 0:
            raise ValueError(f"rx_backlog_limit must be >= 0, not {rx_backlog_limit}")
        self._sink = sink
        self._irq = irq
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._lsr = LSR_THRE | LSR_TEMT
        self._msr = MSR_IDLE_LINES
        self._scr = 0
        self._dll = _RESET_DIVISOR
        self._dlm = 0
        self._fcr = 0
        self._thr_ipending = False
        self._rx_fifo = bytearray()
        self._rx_backlog = bytearray()
        self._rx_backlog_limit = rx_backlog_limit
        self._irq_level = 0
        self._tx_bytes = 0

    # ---------------------------------------------------------------- public API

    @property
    def tx_bytes(self) -> int:
        """Bytes handed to the sink since this object was built (not saved in the state)."""
        return self._tx_bytes

    @property
    def irq_level(self) -> int:
        """The level this device last drove on its interrupt line (after OUT2 gating)."""
        return self._irq_level

    def io_read(self, offset: int) -> int:
        """The guest reads the port ``base + offset`` (offset 0..7); returns a byte."""
        if not 0 <= offset < PORT_COUNT:
            raise ValueError(f"UART register offset must be 0..7, not {offset}")
        self._enter()
        try:
            return self._read(offset)
        finally:
            self._leave()

    def io_write(self, offset: int, value: int) -> None:
        """The guest writes ``value`` (low 8 bits used) to the port ``base + offset``."""
        if not 0 <= offset < PORT_COUNT:
            raise ValueError(f"UART register offset must be 0..7, not {offset}")
        self._enter()
        try:
            self._write(offset, value & 0xFF)
        finally:
            self._leave()

    def feed_input(self, data: bytes) -> int:
        """Offer console input; returns how many leading bytes of ``data`` were accepted.

        Accepted bytes go into the receive FIFO while it has room (16 bytes in FIFO mode,
        1 otherwise) and then into the input buffer behind it (``rx_backlog_limit`` bytes),
        which refills the FIFO as the guest reads. The caller keeps the rest and offers it
        again later. In loopback mode the serial input is disconnected: input waits in the
        buffer until loopback ends.
        """
        self._enter()
        try:
            room = self._rx_backlog_limit - len(self._rx_backlog)
            if not self._mcr & MCR_LOOP:
                room += _fifo_capacity(self._fcr) - len(self._rx_fifo)
            accepted = min(len(data), room)
            if accepted > 0:
                self._rx_backlog += data[:accepted]
                self._refill()
                self._update_irq()
            return accepted
        finally:
            self._leave()

    def save(self) -> UartState:
        """Snapshot the device between two operations. Never fails."""
        self._enter()
        try:
            return UartState(
                ier=self._ier,
                lcr=self._lcr,
                mcr=self._mcr,
                lsr=self._lsr,
                msr=self._msr,
                scr=self._scr,
                dll=self._dll,
                dlm=self._dlm,
                fcr=self._fcr,
                thr_ipending=self._thr_ipending,
                rx_fifo=bytes(self._rx_fifo),
                rx_backlog=bytes(self._rx_backlog),
                rx_backlog_limit=self._rx_backlog_limit,
            )
        finally:
            self._leave()

    @classmethod
    def restore(
        cls,
        state: UartState,
        sink: Callable[[bytes], None],
        irq: Callable[[int], None] | None = None,
    ) -> Uart16550:
        """Build a device that continues exactly from ``state``, using live callbacks.

        The device takes its interrupt line to be at the level ``state`` implies and does
        not call ``irq`` now: the interrupt controller's own restored state already holds
        that level (KVM irqchips are restored before userspace devices).
        """
        uart = cls(sink, irq, rx_backlog_limit=state.rx_backlog_limit)
        uart._ier = state.ier
        uart._lcr = state.lcr
        uart._mcr = state.mcr
        uart._lsr = state.lsr
        uart._msr = state.msr
        uart._scr = state.scr
        uart._dll = state.dll
        uart._dlm = state.dlm
        uart._fcr = state.fcr
        uart._thr_ipending = state.thr_ipending
        uart._rx_fifo = bytearray(state.rx_fifo)
        uart._rx_backlog = bytearray(state.rx_backlog)
        uart._irq_level = uart._line_level()
        return uart

    # ---------------------------------------------------------------- locking

    def _enter(self) -> None:
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError("Uart16550 called from its own sink or irq callback")
        self._lock.acquire()
        self._owner = me

    def _leave(self) -> None:
        self._owner = None
        self._lock.release()

    # ---------------------------------------------------------------- registers

    def _read(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR:
            return self._dll if dlab else self._read_rbr()
        if offset == IER:
            return self._dlm if dlab else self._ier
        if offset == IIR:
            return self._read_iir()
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            value = self._lsr
            if value & LSR_ERRORS:  # reading LSR clears the error bits
                self._lsr &= ~LSR_ERRORS
                self._update_irq()
            return value
        if offset == MSR:
            value = self._msr
            if value & MSR_DELTAS:  # reading MSR clears the delta bits
                self._msr &= MSR_LINES
                self._update_irq()
            return value
        return self._scr

    def _write(self, offset: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if offset == THR:
            if dlab:
                self._dll = value
            else:
                self._transmit(value)
        elif offset == IER:
            if dlab:
                self._dlm = value
            else:
                self._write_ier(value)
        elif offset == FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            self._write_mcr(value)
        elif offset == SCR:
            self._scr = value
        # LSR and MSR are read-only: writes are ignored.

    def _read_rbr(self) -> int:
        if not self._rx_fifo:
            return 0
        value = self._rx_fifo.pop(0)
        self._refill()
        if not self._rx_fifo:
            self._lsr &= ~LSR_DR
        self._update_irq()
        return value

    def _read_iir(self) -> int:
        ident = self._interrupt_id()
        if ident == IIR_THRI:
            # Reading IIR while THR-empty is the reported source clears that interrupt.
            self._thr_ipending = False
            self._update_irq()
        return ident | (IIR_FIFO_ENABLED if self._fcr & FCR_ENABLE else 0)

    def _transmit(self, value: int) -> None:
        # Writing THR clears the THR-empty interrupt; the byte leaves at once, THR is empty
        # again, and the interrupt re-arms.
        self._thr_ipending = False
        self._update_irq()
        try:
            if self._mcr & MCR_LOOP:
                self._loop_back(value)
            else:
                self._tx_bytes += 1
                self._sink(_BYTES[value])
        finally:
            self._thr_ipending = bool(self._ier & IER_ETBEI)
            self._update_irq()

    def _loop_back(self, value: int) -> None:
        """A byte arrives at the receiver from the transmitter (loopback mode)."""
        if len(self._rx_fifo) < _fifo_capacity(self._fcr):
            self._rx_fifo.append(value)
        elif self._fcr & FCR_ENABLE:
            self._lsr |= LSR_OE  # FIFO full: the byte in the shift register is lost
        else:
            self._rx_fifo[0] = value  # RBR still unread: overwritten
            self._lsr |= LSR_OE
        self._lsr |= LSR_DR

    def _write_ier(self, value: int) -> None:
        value &= IER_MASK
        changed = self._ier ^ value
        self._ier = value
        if changed & IER_ETBEI:
            # Turning ETBEI on while THR is empty (always) raises the THR-empty interrupt
            # even if reading IIR had cleared it; Linux's THRE test checks for this.
            # Turning it off forgets the latch.
            self._thr_ipending = bool(value & IER_ETBEI)
        self._update_irq()

    def _write_fcr(self, value: int) -> None:
        was_enabled = self._fcr & FCR_ENABLE
        if value & FCR_ENABLE:
            self._fcr = value & FCR_STORED
            # Changing FCR.ENABLE resets both FIFOs; so does the reset bit.
            clear_rx = not was_enabled or bool(value & FCR_CLEAR_RX)
        else:
            # With ENABLE clear the other bits are not programmed.
            self._fcr = 0
            clear_rx = bool(was_enabled)
        if clear_rx:
            self._rx_fifo.clear()
            self._lsr &= ~LSR_DR
            self._refill()
        # The transmit FIFO is always empty: FCR_CLEAR_TX has nothing to do.
        self._update_irq()

    def _write_mcr(self, value: int) -> None:
        self._mcr = value & MCR_MASK
        old_lines = self._msr & MSR_LINES
        new_lines = _modem_lines(self._mcr)
        changed = old_lines ^ new_lines
        deltas = (changed >> 4) & (MSR_DCTS | MSR_DDSR | MSR_DDCD)
        if old_lines & MSR_RI and not new_lines & MSR_RI:
            deltas |= MSR_TERI  # trailing edge of ring indicator
        self._msr = new_lines | (self._msr & MSR_DELTAS) | deltas
        self._refill()  # leaving loopback reconnects the input
        self._update_irq()

    # ---------------------------------------------------------------- internals

    def _refill(self) -> None:
        """Move buffered input into the rx FIFO while it has room (not in loopback)."""
        if not self._rx_backlog or self._mcr & MCR_LOOP:
            return
        room = _fifo_capacity(self._fcr) - len(self._rx_fifo)
        if room > 0:
            self._rx_fifo += self._rx_backlog[:room]
            del self._rx_backlog[:room]
            self._lsr |= LSR_DR

    def _interrupt_id(self) -> int:
        """The highest-priority pending, enabled interrupt (IIR bits 0-3)."""
        ier = self._ier
        if ier & IER_ELSI and self._lsr & LSR_ERRORS:
            return IIR_RLSI
        if ier & IER_ERBFI and self._rx_fifo:
            if not self._fcr & FCR_ENABLE:
                return IIR_RDI
            if len(self._rx_fifo) >= RX_TRIGGER_LEVELS[self._fcr >> 6]:
                return IIR_RDI
            return IIR_CTI
        if ier & IER_ETBEI and self._thr_ipending:
            return IIR_THRI
        if ier & IER_EDSSI and self._msr & MSR_DELTAS:
            return IIR_MSI
        return IIR_NO_INT

    def _line_level(self) -> int:
        if self._mcr & (MCR_OUT2 | MCR_LOOP) != MCR_OUT2:
            return 0
        return 0 if self._interrupt_id() == IIR_NO_INT else 1

    def _update_irq(self) -> None:
        level = self._line_level()
        if level != self._irq_level:
            self._irq_level = level
            if self._irq is not None:
                self._irq(level)
