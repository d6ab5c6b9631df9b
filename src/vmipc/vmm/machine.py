"""The machine: guest RAM, vCPU threads, devices, boot, pause and resume.

Thread model: one thread per vCPU runs KVM_RUN; every other caller (the control server's
event loop and worker threads, the CLI) changes the run state through the methods here,
which take the machine's lock. Pause closes a gate, sets ``immediate_exit`` on every vCPU
and kicks each vCPU thread with a signal so a vCPU spinning in guest ring 3 leaves
KVM_RUN at once; it is done when every vCPU reports itself parked (``pause`` blocks for
it, ``begin_pause``/``finish_pause`` never block long: see docs/vmm.md).

The records a machine is built from and saves to (``MachineConfig``, ``BootSource`` in
vmm/config.py, ``MachineState`` in vmm/state.py) are re-exported here with the class that
takes and returns them; its userspace devices are a part of their own (vmm/devices/).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

from vmipc.kvm import Kvm, KvmError, Vcpu, Vm
from vmipc.kvm.structs import KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, KvmClockData
from vmipc.vmm.config import MAX_VCPUS as MAX_VCPUS
from vmipc.vmm.config import BootSource as BootSource
from vmipc.vmm.config import MachineConfig as MachineConfig
from vmipc.vmm.devices import DEVICES, DeviceManager, DeviceResources, DiskImage, Uart16550
from vmipc.vmm.dirtylog import DirtyLog
from vmipc.vmm.iobus import IoBus, MmioBus
from vmipc.vmm.kick import KICK_SIGNAL, install_kick_handler
from vmipc.vmm.loaders import (
    BootPlan,
    GuestImageError,
    load_bootsector_file,
    load_multiboot,
    load_multiboot_file,
)
from vmipc.vmm.machine_api import InvalidStateError, StateChange
from vmipc.vmm.memory import GuestMemory
from vmipc.vmm.runstate import RunState
from vmipc.vmm.state import MachineState as MachineState
from vmipc.vmm.state import (
    StateRecordError,
    readable_msrs,
    restore_vcpu,
    restore_vm,
    save_vcpu,
    save_vm,
)
from vmipc.vmm.vcpu import (
    GuestStopped,
    VcpuThread,
    apply_bios_lapic_setup,
    apply_boot_plan,
    configure_cpuid,
    describe_registers,
)

log = logging.getLogger("vmipc.vmm")

_TSS_ADDR = 0xFFFBD000
_IDENTITY_MAP_ADDR = 0xFFFBC000


#: The built-in guest's options (guest/README.md), with the long spellings users may type.
BUILTIN_GUEST_OPTIONS = {
    "ws": "ws",
    "working-set": "ws",
    "rate": "rate",
    "passes": "passes",
    "seed": "seed",
    "hz": "hz",
    "every": "every",
    # the disk workload (guest/README.md): vCPU 0 drives the virtio block device
    "disk": "disk",
    "depth": "depth",
    "blocks": "blocks",
    # disk=3, the I/O benchmark (benchmarks/bench_blk.py)
    "benchms": "benchms",
    "seqbs": "seqbs",
    "beat": "beat",
    "beatonly": "beatonly",
}


def builtin_cmdline(config: MachineConfig) -> str:
    """The built-in guest's command line: the vCPU count plus the user's guest options."""
    options = {BUILTIN_GUEST_OPTIONS.get(k, k): v for k, v in config.boot.guest_options}
    options["vcpus"] = str(config.vcpus)
    return " ".join(f"{key}={value}" for key, value in options.items())


class Machine:
    """A KVM virtual machine with its vCPU threads and devices."""

    def __init__(
        self,
        config: MachineConfig,
        console: Callable[[bytes], None],
        *,
        kvm_path: str = "/dev/kvm",
        kvm: Kvm | None = None,
        memory: GuestMemory | None = None,
        disk: DiskImage | None = None,
    ) -> None:
        """``memory``: RAM built by the caller (e.g. mapped from a snapshot); ``kvm``: an
        open /dev/kvm to use instead of opening ``kvm_path`` (a sandboxed VMM can no longer
        open paths). The machine owns both from now on. ``disk``: the block device's image
        (the caller keeps owning it and closes it after the machine)."""
        if not 1 <= config.vcpus <= MAX_VCPUS:
            raise ValueError(f"vcpus must be 1..{MAX_VCPUS}, not {config.vcpus}")
        install_kick_handler()
        self.config = config
        # One lock for the run state; the machine's waiters (pause, start, wait_stopped)
        # wait on ``_cond``, each vCPU thread on a condition of its own over the same lock:
        # a vCPU that parks wakes only the pauser, and a state change wakes no parked vCPU
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        #: a pause begun by begin_pause and not yet finished (see begin_pause)
        self._pausing = False
        #: called once (with the lock held) when a pending pause can finish or failed
        self._pause_waker: Callable[[], None] | None = None
        self._state = RunState.CREATED
        self._stop_reason: str | None = None
        self._gate_closed = True
        #: holds on the vCPUs that leave the run state alone (see _vcpus_held)
        self._holds = 0
        self._stopping = False
        self._parked: set[int] = set()
        self._listeners: list[Callable[[StateChange], None]] = []
        self._threads: list[VcpuThread] = []
        self.vcpus: list[Vcpu] = []
        self._paused_clock: int | None = None
        self.disk = disk

        self.kvm = kvm if kvm is not None else Kvm(kvm_path)
        self.vm: Vm | None = None
        self.memory: GuestMemory | None = memory
        try:
            self.kvm.require()
            self.vm = self.kvm.create_vm()
            if memory is not None and memory.size != config.memory_size:
                raise ValueError("the memory given does not have the configured size")
            self.memory = memory if memory is not None else GuestMemory(config.memory_size)
            self._register_memory()
            #: which pages of RAM were written (dirty-log-start, query-dirty, dump-dirty)
            self.dirty_log = DirtyLog(self.memory, self.vm.get_dirty_log, self._log_dirty_pages)
            self._create_platform()
            self.iobus = IoBus()
            self.mmio_bus = MmioBus()
            self.devices = DeviceManager(
                DEVICES,
                DeviceResources(console, self._irq_line, self.memory, disk),
                self.iobus,
                self.mmio_bus,
            )
            supported = self.kvm.get_supported_cpuid()
            self._cpuid: list[ctypes.Structure] = []
            for index in range(config.vcpus):
                vcpu = self.vm.create_vcpu(index)
                self.vcpus.append(vcpu)
                self._cpuid.append(configure_cpuid(vcpu, supported, config.vcpus))
            self._msr_indices = readable_msrs(self.vcpus[0], self.kvm.get_msr_index_list())
            self.boot_plan = self._load_guest()
            if self.boot_plan is not None:
                apply_boot_plan(self.vcpus[0], self.boot_plan)
                apply_bios_lapic_setup(self.vcpus[0])
        except BaseException:
            self._release()
            raise
        for vcpu in self.vcpus:
            self._threads.append(
                VcpuThread(
                    vcpu,
                    self.iobus,
                    self.mmio_bus,
                    threading.Condition(self._lock),
                    lambda: self._gate_closed or self._holds > 0,
                    lambda: self._stopping,
                    self._note_parked,
                    self._guest_stopped,
                )
            )

    @classmethod
    def create(cls, config: MachineConfig, console: Callable[[bytes], None]) -> Machine:
        return cls(config, console)

    # --- construction -------------------------------------------------------------

    def _register_memory(self, flags: int = 0) -> None:
        assert self.vm is not None and self.memory is not None
        for slot, region in enumerate(self.memory.regions):
            self.vm.set_user_memory_region(
                slot,
                region.gpa,
                region.size,
                self.memory.host_address + region.offset,
                flags,
            )

    def _log_dirty_pages(self, enabled: bool) -> None:
        self._register_memory(KVM_MEM_LOG_DIRTY_PAGES if enabled else 0)

    def _create_platform(self) -> None:
        assert self.vm is not None
        try:
            self.vm.set_identity_map_addr(_IDENTITY_MAP_ADDR)
            self.vm.set_tss_addr(_TSS_ADDR)
        except KvmError as exc:  # only VMX needs them; other backends may refuse
            log.debug("TSS/identity map address not set: %s", exc)
        self.vm.create_irqchip()
        self.vm.create_pit2(KVM_PIT_SPEAKER_DUMMY)

    def _load_guest(self) -> BootPlan | None:
        assert self.memory is not None
        boot = self.config.boot
        if boot.kind == "none":
            return None
        if boot.kind == "bootsector":
            if not boot.path:
                raise GuestImageError("a boot sector needs a file")
            return load_bootsector_file(self.memory, boot.path)
        if boot.kind == "multiboot":
            if not boot.path:
                raise GuestImageError("a multiboot kernel needs a file")
            return load_multiboot_file(self.memory, boot.path, boot.cmdline)
        if boot.kind == "builtin":
            from vmipc.guest import BUILTIN_GUEST_PATH

            image = BUILTIN_GUEST_PATH.read_bytes()
            return load_multiboot(self.memory, image, builtin_cmdline(self.config))
        raise GuestImageError(f"unknown boot source {boot.kind!r}")

    # --- Pausable (vmm/machine_api.py) ------------------------------------------------

    @property
    def state(self) -> RunState:
        return self._state

    @property
    def vcpu_count(self) -> int:
        return self.config.vcpus

    @property
    def memory_size(self) -> int:
        return self.config.memory_size

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    def add_listener(self, callback: Callable[[StateChange], None]) -> Callable[[], None]:
        with self._cond:
            self._listeners.append(callback)

        def unsubscribe() -> None:
            with self._cond:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return unsubscribe

    def start(self, *, paused: bool = False) -> None:
        """CREATED -> RUNNING (or PAUSED, with every vCPU parked before its first KVM_RUN)."""
        with self._cond:
            if self._state is not RunState.CREATED:
                raise InvalidStateError("start", self._state)
            self._gate_closed = paused
            if paused:
                self.devices.quiesce()
            for vcpu in self.vcpus:
                vcpu.kvm_run.immediate_exit = 1 if paused else 0
            for thread in self._threads:
                thread.start()
            while paused and len(self._parked) < len(self._threads):
                self._cond.wait()
            change = self._set_state(RunState.PAUSED if paused else RunState.RUNNING)
        self.watch_file_lease()  # threads start here, in capability mode
        self._notify(change)

    def watch_file_lease(self) -> None:
        """Watch the read lease of the snapshot file RAM is mapped from, if any: when a
        writer breaks it, RAM is copied off the file first. At start, and after RAM was
        mapped from a file later (``GuestMemory.map_file``). Idempotent."""
        memory = self.memory
        if memory is not None and memory.file_lease is not None:
            memory.file_lease.watch(self._copy_ram_off_file)

    def pause(self) -> None:
        """RUNNING -> PAUSED; returns when every vCPU is parked with its exit completed."""
        with self._cond:
            while self._pausing:  # another caller's pause is under way: it decides
                self._cond.wait()
            self._begin_pause_locked()
            try:
                # A kick that lands just before KVM_RUN is caught by immediate_exit; waiting
                # with a short timeout only re-checks, it never re-kicks a parked thread.
                while (change := self._finish_pause_locked()) is None:
                    self._cond.wait(0.05)
            finally:
                self._pausing = False
                self._cond.notify_all()
        self._notify(change)

    def begin_pause(self, wake: Callable[[], None], *, within: float = 0.0) -> bool:
        """Start RUNNING -> PAUSED without blocking for long: close the gate, kick the
        vCPUs, and wait at most ``within`` seconds for them to park.

        For a caller that must not block (the control server's event loop): True when the
        machine is PAUSED already; else ``wake`` is called once, from a vCPU thread or a
        device's worker (it must not block, and runs with the machine's lock held), when
        :meth:`finish_pause` can tell the outcome: every vCPU parked, and every request a
        device took completed (a disk request may take as long as the disk does). Raises
        InvalidStateError unless RUNNING (or while another caller's pause is under way).

        A vCPU in guest mode leaves KVM_RUN and parks some tens of microseconds after its
        kick: a short ``within`` lets the last one hand over straight to this thread (a
        futex wakeup) instead of through ``wake`` and the caller's event loop, while a
        vCPU that cannot stop soon (in the kernel on a userfault, say) still costs the
        caller no more than ``within``.
        """
        with self._cond:
            if self._pausing:
                raise InvalidStateError("pause", self._state)
            self._begin_pause_locked()
            if within > 0 and len(self._parked) < len(self._threads):
                deadline = time.monotonic() + within
                while len(self._parked) < len(self._threads) and self._state is RunState.RUNNING:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
        return self.finish_pause(wake)

    def finish_pause(self, wake: Callable[[], None]) -> bool:
        """Finish the pause :meth:`begin_pause` began: True once PAUSED (and the listeners
        told); False when a vCPU is not parked yet (``wake`` is called once when it is).
        Raises InvalidStateError when the guest stopped meanwhile."""
        with self._cond:
            if not self._pausing:
                raise InvalidStateError("pause", self._state)
            try:
                change = self._finish_pause_locked()
            except BaseException:
                self._pausing = False
                self._cond.notify_all()
                raise
            if change is None:
                self._pause_waker = wake
                return False
            self._pausing = False
            self._cond.notify_all()
        self._notify(change)
        return True

    def _begin_pause_locked(self) -> None:
        if self._state is not RunState.RUNNING:
            raise InvalidStateError("pause", self._state)
        self._pausing = True
        self._gate_closed = True
        for vcpu in self.vcpus:
            vcpu.kvm_run.immediate_exit = 1
        self._kick_all()

    def _finish_pause_locked(self) -> StateChange | None:
        """The pause's change once every vCPU is parked; None before; raises if the guest
        stopped meanwhile."""
        if self._state is not RunState.RUNNING:  # the guest stopped meanwhile
            raise InvalidStateError("pause", self._state)
        if len(self._parked) < len(self._threads):
            return None
        # pause drains: every request a device took has completed, its used entry written;
        # a disk request may take long (an fdatasync): the device says when it is done
        if not self.devices.quiesce_nowait(self._devices_drained):
            return None
        self._pause_waker = None
        self._freeze_clock()
        return self._set_state(RunState.PAUSED)

    def resume(self, *, wake: bool = True) -> None:
        """PAUSED -> RUNNING: each vCPU continues exactly where it stopped.

        Returns once the state is RUNNING and every vCPU thread has been woken; it does
        not wait for them to re-enter KVM_RUN (nothing could go wrong there that a reply
        could report: a vCPU that fails later stops the machine and says so).
        ``wake=False``: the threads are woken by :meth:`wake_vcpus`."""
        with self._cond:
            if self._state is not RunState.PAUSED:
                raise InvalidStateError("resume", self._state)
            self._thaw_clock()
            if not self._holds:  # a hold lets the devices go when it ends
                self.devices.resume()
            for vcpu in self.vcpus:
                vcpu.kvm_run.immediate_exit = 0
            self._gate_closed = False
            change = self._set_state(RunState.RUNNING)
            if wake:
                self._release_vcpus_locked()
        self._notify(change)

    def wake_vcpus(self) -> None:
        """Let the vCPU threads go after ``resume(wake=False)``; nothing unless RUNNING
        (a pause since has kept them parked: they never left)."""
        with self._cond:
            if self._state is RunState.RUNNING:
                self._release_vcpus_locked()

    def wait_stopped(self, timeout: float | None = None) -> RunState:
        """Block until the guest powers off or dies (or ``timeout`` passes); returns the state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._state not in (RunState.SHUTDOWN, RunState.CRASHED, RunState.DESTROYED):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._state

    def close(self) -> None:
        """Stop every vCPU thread and release all KVM resources. Idempotent."""
        with self._cond:
            if self._state is RunState.DESTROYED:
                return
            self._stop_all_locked()
        for thread in self._threads:
            if thread.thread.is_alive() and thread.thread is not threading.current_thread():
                thread.thread.join()
        with self._cond:
            change = self._set_state(RunState.DESTROYED)
        self._notify(change)
        self._release()

    # --- state ------------------------------------------------------------------------

    def save_state(self) -> MachineState:
        """The complete non-RAM state. Only while PAUSED, when every vCPU stopped cleanly."""
        with self._cond:
            if self._state is not RunState.PAUSED:
                raise InvalidStateError("save the state", self._state)
            assert self.vm is not None
            return MachineState(
                config=self.config,
                vcpus=tuple(
                    save_vcpu(vcpu, self._msr_indices, cpuid)
                    for vcpu, cpuid in zip(self.vcpus, self._cpuid, strict=True)
                ),
                vm=save_vm(self.vm, clock=self._paused_clock),
                devices=self.devices.save(),
            )

    def restore_state(self, state: MachineState, *, accept_disk: bool = False) -> None:
        """Make this paused machine continue exactly as ``state`` was taken.

        The machine must have been built with the same memory size and vCPU count, and
        with the disk the state was taken with (its size and fingerprint; with
        ``accept_disk`` any disk of the same mode); the guest RAM is loaded separately.
        """
        with self._cond:
            if self._state is not RunState.PAUSED:
                raise InvalidStateError("load state", self._state)
            try:
                mismatch = state.config.mismatch(self.config) or self.devices.check(
                    state.devices, accept_disk=accept_disk
                )
            except OSError as exc:  # the disk's fingerprint could not be read
                mismatch = f"virtio-blk: the disk cannot be read: {exc.strerror or exc}"
            if mismatch:
                raise StateRecordError(f"state does not fit this machine: {mismatch}")
            assert self.vm is not None
            where = "vm"
            try:
                for vcpu, vcpu_state in zip(self.vcpus, state.vcpus, strict=True):
                    where = f"vcpu {vcpu.id}"
                    # the CPUID set at start-up is not set again when it is the same
                    self._cpuid[vcpu.id] = restore_vcpu(vcpu, vcpu_state, self._cpuid[vcpu.id])
                where = "vm"
                restore_vm(self.vm, state.vm)
            except KvmError as exc:
                # KVM refused a register or device value of the record (EINVAL): the
                # record is bad, like one that fails to decode, not the host
                raise StateRecordError(f"{where}: KVM refused {exc.strerror or exc}") from None
            self._paused_clock = state.vm.clock
            self.devices.restore(state.devices)  # after the irqchips: see Uart16550.restore
            self.config = state.config

    def attach_disk(self, disk: DiskImage) -> None:
        """Put ``disk`` behind the block device of this machine, which has none and has
        never run (an incoming machine, before its state; the caller keeps owning it)."""
        with self._cond:
            if self.disk is not None:
                raise ValueError("the machine has a disk already")
            if self._state not in (RunState.CREATED, RunState.PAUSED):
                raise InvalidStateError("attach a disk", self._state)
            self.disk = disk
            self.devices.attach_disk(disk)

    def flush_devices(self) -> None:
        """Make what the guest wrote to a writable disk durable (fdatasync): what a
        checkpoint calls. A read-only disk is never flushed; pause alone does not flush.
        OSError if the host cannot."""
        self.devices.flush()

    def feed_console(self, data: bytes) -> int:
        """Console input for the guest's COM1; returns how many bytes were taken."""
        return self.devices.get("uart", Uart16550).feed_input(data)

    @property
    def power_off_code(self) -> int | None:
        """The byte the guest wrote to the power-off port, once it has."""
        return self.devices.power_off_code

    # --- internals ------------------------------------------------------------------

    def _freeze_clock(self) -> None:
        """Guest time stops while paused (as QEMU does): remember kvmclock now, put it back
        on resume, and save this value with the state."""
        assert self.vm is not None
        self._paused_clock = int(self.vm.get_clock().clock)

    def _thaw_clock(self) -> None:
        assert self.vm is not None
        if self._paused_clock is not None:
            self.vm.set_clock(KvmClockData(clock=self._paused_clock))
            self._paused_clock = None

    def _irq_line(self, irq: int, level: int) -> None:
        if self.vm is not None and self.vm.fd >= 0:
            self.vm.irq_line(irq, level)

    def _kick_all(self) -> None:
        for thread in self._threads:
            ident = thread.thread.ident
            if ident is not None and thread.thread.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    signal.pthread_kill(ident, KICK_SIGNAL)

    def _note_parked(self, thread: VcpuThread, parked: bool) -> None:
        # called with the lock held
        if parked:
            self._parked.add(thread.vcpu.id)
            self._cond.notify_all()
            if len(self._parked) == len(self._threads):  # the last one: the pause is done
                self._wake_pauser()
        else:
            self._parked.discard(thread.vcpu.id)

    def _devices_drained(self) -> None:
        # from a device's worker, holding none of its locks
        with self._cond:
            self._cond.notify_all()
            if self._pausing and len(self._parked) == len(self._threads):
                self._wake_pauser()

    def _wake_pauser(self) -> None:
        # with the lock held
        waker, self._pause_waker = self._pause_waker, None
        if waker is not None:
            try:
                waker()
            except Exception:  # a vCPU thread must not die of its pauser's failure
                log.exception("pause waker failed")

    def _release_vcpus_locked(self) -> None:
        """Wake every parked vCPU thread to look at the gate again."""
        for thread in self._threads:
            thread.wake()

    def _guest_stopped(self, thread: VcpuThread, stop: GuestStopped) -> None:
        """A vCPU hit power-off or a fatal exit: stop the whole machine, keep the process."""
        if stop.crashed:
            log.error("%s; %s", stop.reason, describe_registers(thread.vcpu))
        else:
            log.info("%s", stop.reason)
        with self._cond:
            if self._state in (RunState.SHUTDOWN, RunState.CRASHED, RunState.DESTROYED):
                return
            self._stop_reason = stop.reason
            self._stop_all_locked()
            change = self._set_state(RunState.CRASHED if stop.crashed else RunState.SHUTDOWN)
        self._notify(change)

    def _stop_all_locked(self) -> None:
        self._stopping = True
        self._gate_closed = True
        for vcpu in self.vcpus:
            if vcpu.fd >= 0:
                vcpu.kvm_run.immediate_exit = 1
        self._kick_all()
        self._cond.notify_all()
        self._release_vcpus_locked()

    @contextlib.contextmanager
    def _vcpus_held(self) -> Iterator[None]:
        """Every vCPU parked outside KVM_RUN meanwhile, like a pause, but the run state (and
        guest time) go on: nobody sees a pause. A pause or resume meanwhile takes effect
        as usual; a resume only lets the vCPUs run once the hold ends."""
        with self._cond:
            self._holds += 1
            if not self._stopping:
                for vcpu in self.vcpus:
                    vcpu.kvm_run.immediate_exit = 1
                self._kick_all()
            while not self._stopping and any(
                thread.thread.is_alive() and thread.vcpu.id not in self._parked
                for thread in self._threads
            ):
                self._cond.wait(0.05)
            # devices write RAM too: a hold stops every writer
            self.devices.quiesce()
        try:
            yield
        finally:
            with self._cond:
                self._holds -= 1
                if not self._holds and not self._gate_closed and not self._stopping:
                    self.devices.resume()
                    for vcpu in self.vcpus:
                        vcpu.kvm_run.immediate_exit = 0
                    self._release_vcpus_locked()

    def _copy_ram_off_file(self, deadline: float) -> None:
        """A writer is about to change the snapshot file guest RAM is mapped from (its read
        lease broke): copy RAM off it, while the guest runs, then with the vCPUs held for
        what changed meanwhile (docs/vmm.md, "Lazy restore"), before ``deadline``. If that
        fails, the guest is stopped for good: it must not run on pages the writer may
        change or cut off, and its RAM reads as zeros from then on (never SIGBUS)."""
        memory = self.memory
        if memory is None:
            return
        held = 0.0

        @contextlib.contextmanager
        def hold() -> Iterator[None]:
            nonlocal held
            started = time.monotonic()
            try:
                with self._vcpus_held():
                    yield
            finally:
                held = time.monotonic() - started

        started = time.monotonic()
        try:
            memory.detach_from_file(hold, deadline)
        except Exception as exc:  # whatever it was, the guest must not run on the file
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
            try:
                memory.abandon_file()
            except OSError as error:
                log.error("cannot map zeros over guest RAM: %s", error.strerror)
            self._crash(f"guest RAM could not be copied off the snapshot file: {why}")
            return
        log.warning(
            "warning: the snapshot file is being written: guest RAM copied off it in %.3f s "
            "(vCPUs held for the last %.3f s)",
            time.monotonic() - started,
            held,
        )

    def _crash(self, reason: str) -> None:
        log.error("%s", reason)
        with self._cond:
            if self._state in (RunState.SHUTDOWN, RunState.CRASHED, RunState.DESTROYED):
                return
            self._stop_reason = reason
            self._stop_all_locked()
            change = self._set_state(RunState.CRASHED)
        self._notify(change)

    def _set_state(self, new: RunState) -> StateChange:
        change = StateChange(self._state, new, self._stop_reason)
        self._state = new
        self._cond.notify_all()
        if new is not RunState.RUNNING:
            self._wake_pauser()  # a pause under way fails (the guest stopped)
        return change

    def _notify(self, change: StateChange) -> None:
        with self._cond:
            listeners = list(self._listeners)
        for callback in listeners:
            try:
                callback(change)
            except Exception:
                log.exception("state listener failed")

    def _release(self) -> None:
        if self.memory is not None and self.memory.file_lease is not None:
            self.memory.file_lease.close()  # before the vCPUs: its copy may hold them
        if getattr(self, "devices", None) is not None:
            self.devices.close()  # their workers use RAM: stopped before it goes
        for vcpu in self.vcpus:
            vcpu.close()
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if self.vm is not None:
            self.vm.close()
        self.kvm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<Machine {self.config.vcpus} vcpu(s) {self.config.memory_size >> 20} MiB "
            f"{self._state.value} pid={os.getpid()}>"
        )
