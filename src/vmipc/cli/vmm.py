"""``vmipc vmm``: start a VMM (and, with --socket, its control server)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import grp
import logging
import os
import pwd
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vmipc.cli import EXIT_ENVIRONMENT, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from vmipc.formats import FormatError
from vmipc.kvm import KvmError, KvmUnavailableError, MissingCapabilityError
from vmipc.memory_layout import MemoryConfigError, layout_for
from vmipc.vmm.builder import (
    Built,
    RestoreError,
    RestoreOptions,
    build_for_boot,
    build_from_snapshot,
    build_incoming,
)
from vmipc.vmm.devices import DiskImage, DiskImageError, parse_disk_option
from vmipc.vmm.host import MachineHost
from vmipc.vmm.loaders import GuestImageError
from vmipc.vmm.machine import (
    BUILTIN_GUEST_OPTIONS,
    MAX_VCPUS,
    BootSource,
    Machine,
    MachineConfig,
)
from vmipc.vmm.machine_api import StateChange
from vmipc.vmm.memory import parse_size
from vmipc.vmm.runstate import RunState
from vmipc.vmm.sandbox import SandboxError, enter_capability_mode

if TYPE_CHECKING:
    from vmipc.server import Server, SocketConfig

log = logging.getLogger("vmipc.vmm")


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "vmm",
        help="start a VMM with a guest",
        description=(
            "Start a KVM virtual machine. Without --socket it runs until the guest powers "
            "off or dies, or until SIGINT/SIGTERM. With --socket it also serves the control "
            "protocol and runs until a client sends quit."
        ),
    )
    boot = parser.add_mutually_exclusive_group()
    boot.add_argument(
        "--guest",
        choices=["builtin"],
        help="boot the built-in deterministic test guest (the default)",
    )
    boot.add_argument("--bootsector", metavar="FILE", help="boot a raw 512-byte boot sector")
    boot.add_argument("--multiboot", metavar="FILE", help="boot a multiboot (v1) kernel")
    boot.add_argument(
        "--restore",
        metavar="FILE",
        help=(
            "restore a snapshot: configuration, vCPUs and devices from the file, guest RAM "
            "mapped from it lazily (copy-on-write) unless --eager; runs at once unless --paused"
        ),
    )
    parser.add_argument(
        "--eager", action="store_true", help="with --restore: load all of RAM before running"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="with --restore: check the memory section's checksum first (reads all of it)",
    )
    parser.add_argument("--cmdline", default="", help="kernel command line (--multiboot)")
    parser.add_argument(
        "--guest-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option for the built-in guest, e.g. ws=8M rate=4096 passes=10 (repeatable)",
    )
    parser.add_argument("--memory", help="guest RAM, e.g. 64M, 1G (default 64M)")
    parser.add_argument(
        "--disk",
        metavar="FILE[,readonly]",
        help=(
            "a virtio-mmio block device backed by this image (a regular file or block "
            "device, opened now: the sandboxed VMM opens nothing later); with ,readonly the "
            "guest cannot write it. With --restore or --incoming it must be the disk the "
            "state was taken with: the same mode, size and fingerprint (a hash of the size "
            "and of 16 sampled blocks, recorded in the state: a disk written since the "
            "state was taken is refused too), unless --force-disk. An --incoming VMM "
            "without --disk can be given its image over the socket (attach-disk; "
            "vmipc restore/migrate --disk)"
        ),
    )
    parser.add_argument(
        "--force-disk",
        action="store_true",
        help=(
            "with --restore: restore with the --disk given even if its size or fingerprint "
            "is not the snapshot's (another disk, or one written since the snapshot); its "
            "mode must still match. The guest then finds on it what is there"
        ),
    )
    parser.add_argument(
        "--disk-from-snapshot",
        metavar="NEWIMG",
        help=(
            "with --restore: write the snapshot's disk section (vmipc checkpoint --with-disk) "
            "to the new image file NEWIMG (created, never overwritten; sparse), checked whole "
            "first, and run the restored VM on it"
        ),
    )
    parser.add_argument("--vcpus", type=int, help="number of vCPUs (default 1)")
    boot.add_argument(
        "--incoming",
        action="store_true",
        help=(
            "boot nothing: wait (paused) for memory and state through the control socket; "
            "the configuration comes from --memory/--vcpus if given, else from the first "
            "configure (vmipc migrate sends the source's), load-state or snapshot load-memory"
        ),
    )
    parser.add_argument(
        "--console",
        default="-",
        metavar="PATH|-",
        help="where COM1 output goes: a file (appended) or - for stdout (default)",
    )
    parser.add_argument(
        "--no-console-input",
        action="store_true",
        help="do not forward standard input to COM1 (with --console -)",
    )
    parser.add_argument("--socket", metavar="PATH", help="serve the control protocol here")
    parser.add_argument(
        "--readonly-socket",
        metavar="PATH",
        help=(
            "with --socket: a second socket for monitoring that allows only queries and "
            "events (hello, query-commands, subscribe, cancel, query-status, query-dirty)"
        ),
    )
    readonly = parser.add_argument_group(
        "the read-only socket",
        "Who may connect: the socket file's mode and group open it on the file system, and "
        "every peer's uid or gid (SO_PEERCRED) must then be allowed: the VMM's own uid and "
        "root always are, the socket's group is by default.",
    )
    readonly.add_argument(
        "--readonly-socket-group",
        metavar="GROUP",
        help="give the socket file this group (a name or a gid) and allow its members",
    )
    readonly.add_argument(
        "--readonly-socket-mode",
        type=_mode,
        metavar="MODE",
        help="the socket file's mode, in octal (default 0600, or 0660 with a group)",
    )
    readonly.add_argument(
        "--readonly-allow-uid",
        action="append",
        default=[],
        metavar="UID",
        help="also allow peers with this uid (a user name or a number; repeatable)",
    )
    readonly.add_argument(
        "--readonly-allow-gid",
        action="append",
        default=[],
        metavar="GID",
        help="also allow peers with this gid (a group name or a number; repeatable)",
    )
    readonly.add_argument(
        "--readonly-max-connections",
        type=_count,
        metavar="N",
        help="at most N connections at once (default 32; the control socket has its own 128)",
    )
    readonly.add_argument(
        "--readonly-idle-timeout",
        type=_seconds,
        metavar="SECONDS",
        help=(
            "close a connection that has no request in flight and no event subscribed for "
            "this long (default 60; 0: never)"
        ),
    )
    parser.add_argument(
        "--held-request-rate",
        type=_rate,
        metavar="N",
        help=(
            "with --socket: while a client goes first (it holds a pause lease or claimed "
            "priority), let the other clients' requests through at most N a second "
            "(default 200; 0: hold them until nobody goes first; inf: never hold them)"
        ),
    )
    parser.add_argument(
        "--no-sandbox",
        action="store_true",
        help=(
            "do not enter capability mode (by default, once started, the VMM cannot open, "
            "create or remove paths and keeps no capability: Landlock, no_new_privs, "
            "capabilities dropped and a seccomp allow-list)"
        ),
    )
    parser.add_argument(
        "--paused", action="store_true", help="with --socket: create (or restore) the VM paused"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.set_defaults(run=run)


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not rate >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (or inf), not {text}")
    return rate


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"not a permission mode: {text}")
    return mode


def _count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {text}")
    return count


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return seconds


def _uid(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise ValueError(f"no such user: {text}") from None


def _gid(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ValueError(f"no such group: {text}") from None


def _read_only_socket(args: argparse.Namespace) -> SocketConfig:
    """The read-only socket's settings. ValueError (one line) for a user or group that
    does not exist."""
    from vmipc.server import READ_ONLY_COMMANDS, SocketConfig

    group = _gid(args.readonly_socket_group) if args.readonly_socket_group else None
    # the uids and gids named are *more* peers: the VMM's uid and root, and the socket's
    # group, stay allowed
    uids = gids = None
    if args.readonly_allow_uid:
        uids = frozenset({os.geteuid(), 0, *map(_uid, args.readonly_allow_uid)})
    if args.readonly_allow_gid:
        gids = frozenset(map(_gid, args.readonly_allow_gid))
        if group is not None:
            gids |= {group}
    spec = SocketConfig(
        args.readonly_socket,
        READ_ONLY_COMMANDS,
        "read-only",
        allowed_uids=uids,
        allowed_gids=gids,
        socket_mode=args.readonly_socket_mode,
        socket_group=group,
    )
    if args.readonly_max_connections is not None:
        spec = dataclasses.replace(spec, max_connections=args.readonly_max_connections)
    if args.readonly_idle_timeout is not None:
        spec = dataclasses.replace(spec, idle_timeout=args.readonly_idle_timeout or None)
    return spec


def _console_sink(target: str) -> tuple[Callable[[bytes], None], int | None]:
    if target == "-":
        return (lambda data: _write_all(1, data)), None
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    return (lambda data: _write_all(fd, data)), fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BrokenPipeError:
            return  # the reader went away; the guest must not die of it
        view = view[written:]


def _config_from(args: argparse.Namespace) -> MachineConfig:
    options: list[tuple[str, str]] = []
    for item in args.guest_opt:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--guest-opt wants KEY=VALUE, not {item!r}")
        if key not in BUILTIN_GUEST_OPTIONS:
            known = ", ".join(sorted(BUILTIN_GUEST_OPTIONS))
            raise ValueError(f"unknown guest option {key!r} (known: {known})")
        options.append((key, value))
    if args.bootsector:
        boot = BootSource(kind="bootsector", path=args.bootsector)
    elif args.multiboot:
        boot = BootSource(kind="multiboot", path=args.multiboot, cmdline=args.cmdline)
    else:
        boot = BootSource(kind="builtin", guest_options=tuple(options))
    if options and boot.kind != "builtin":
        raise ValueError("--guest-opt applies to the built-in guest only")
    if args.disk:
        parse_disk_option(args.disk)  # a bad option is a usage error, before anything opens
    memory_size = parse_size(args.memory or "64M")
    layout_for(memory_size)  # a size it cannot use is a usage error, not an environment one
    vcpus = 1 if args.vcpus is None else args.vcpus
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ValueError(f"--vcpus must be 1..{MAX_VCPUS}")
    return MachineConfig(memory_size=memory_size, vcpus=vcpus, boot=boot)


def _forward_stdin(host: MachineHost) -> None:
    """Feed standard input to COM1 until EOF (runs in a daemon thread)."""
    while True:
        try:
            data = os.read(0, 4096)
        except OSError:
            return
        if not data:
            return
        view = data
        while view and host.state not in (RunState.SHUTDOWN, RunState.CRASHED):
            machine = host.machine
            taken = machine.feed_console(view) if machine is not None else 0
            view = view[taken:]
            if view:
                threading.Event().wait(0.01)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="vmipc: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = _config_from(args)
    except (ValueError, MemoryConfigError) as exc:
        print(f"vmipc vmm: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        sink, console_fd = _console_sink(args.console)
    except OSError as exc:
        print(f"vmipc vmm: cannot open console {args.console}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    if args.incoming and not args.socket:
        print(
            "vmipc vmm: --incoming needs --socket (that is how the guest arrives)", file=sys.stderr
        )
        return EXIT_USAGE
    if args.disk_from_snapshot and (not args.restore or args.disk):
        print("vmipc vmm: --disk-from-snapshot goes with --restore, not --disk", file=sys.stderr)
        return EXIT_USAGE
    if (args.eager or args.verify) and not args.restore:
        print("vmipc vmm: --eager and --verify go with --restore", file=sys.stderr)
        return EXIT_USAGE
    if args.force_disk and not (args.restore and args.disk):
        print("vmipc vmm: --force-disk goes with --restore and --disk", file=sys.stderr)
        return EXIT_USAGE
    if args.paused and not args.socket:
        print("vmipc vmm: --paused needs --socket (something must resume it)", file=sys.stderr)
        return EXIT_USAGE
    if args.readonly_socket and not args.socket:
        print("vmipc vmm: --readonly-socket goes with --socket", file=sys.stderr)
        return EXIT_USAGE
    readonly_options = [
        name
        for name, value in vars(args).items()
        if name.startswith("readonly_") and name != "readonly_socket" and value not in (None, [])
    ]
    if readonly_options and not args.readonly_socket:
        option = "--" + readonly_options[0].replace("_", "-")
        print(f"vmipc vmm: {option} goes with --readonly-socket", file=sys.stderr)
        return EXIT_USAGE
    read_only = None
    if args.readonly_socket:
        try:
            read_only = _read_only_socket(args)
        except ValueError as exc:
            print(f"vmipc vmm: {exc}", file=sys.stderr)
            return EXIT_USAGE
    with contextlib.ExitStack() as cleanup:
        if console_fd is not None:
            cleanup.callback(os.close, console_fd)
        try:
            # 1. everything that needs a path: /dev/kvm, the guest image, the snapshot,
            #    the sockets; 2. capability mode; 3. threads (vCPUs, stdin, trio workers)
            built = _build(args, config, sink, cleanup)
            host = built.host
            server = None
            if args.socket:
                try:
                    server = _bind_server(host, args, read_only, cleanup)
                except OSError as exc:  # a socket path that cannot be used
                    print(f"vmipc vmm: cannot serve: {exc.strerror}", file=sys.stderr)
                    return EXIT_USAGE
            status = _enter_sandbox(args, server)
            if status != EXIT_OK:
                return status
            built.start()
        except (GuestImageError, DiskImageError) as exc:
            print(f"vmipc vmm: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except (RestoreError, FormatError) as exc:
            print(f"vmipc vmm: cannot restore {args.restore}: {exc}", file=sys.stderr)
            return EXIT_FAILED
        except (KvmUnavailableError, MissingCapabilityError) as exc:
            print(f"vmipc vmm: KVM is not usable: {exc}", file=sys.stderr)
            return EXIT_ENVIRONMENT
        except MemoryConfigError as exc:
            print(f"vmipc vmm: {exc}", file=sys.stderr)
            return EXIT_ENVIRONMENT
        except KvmError as exc:
            print(f"vmipc vmm: KVM refused to build the VM: {exc}", file=sys.stderr)
            return EXIT_ENVIRONMENT
        if args.console == "-" and not args.no_console_input:
            threading.Thread(target=_forward_stdin, args=(host,), daemon=True).start()
        if server is not None:
            return _run_with_server(host, server, args)
        assert host.machine is not None
        return _run_standalone(host.machine)


def _build(
    args: argparse.Namespace,
    config: MachineConfig,
    sink: Callable[[bytes], None],
    cleanup: contextlib.ExitStack,
) -> Built:
    """The machine host the arguments ask for (every file it needs opened), and the step
    that starts it once the VMM is in capability mode."""
    disk = None
    if args.disk:
        path, readonly = parse_disk_option(args.disk)
        disk = DiskImage.open(path, readonly=readonly)
        cleanup.callback(disk.close)  # after the machine (the stack unwinds in reverse)
    if args.disk_from_snapshot:
        disk = _disk_from_snapshot(args.restore, args.disk_from_snapshot, cleanup)
    if args.restore:
        options = RestoreOptions(
            eager=args.eager,
            verify=args.verify,
            paused=args.paused,
            disk=disk,
            accept_disk=args.force_disk,
        )
        try:
            return build_from_snapshot(args.restore, sink, options, cleanup)
        except BaseException:
            if args.disk_from_snapshot:  # written for this restore alone: no VM runs on it
                with contextlib.suppress(OSError):
                    os.unlink(args.disk_from_snapshot)
            raise
    if args.incoming:
        configured = args.memory is not None or args.vcpus is not None
        return build_incoming(sink, cleanup, config if configured else None, disk)
    return build_for_boot(config, sink, cleanup, disk)


def _disk_from_snapshot(snapshot: str, path: str, cleanup: contextlib.ExitStack) -> DiskImage:
    """The snapshot's disk section written out to the new image ``path`` (checked whole:
    structure and checksum; else FormatError and no file), opened in the section's mode."""
    from vmipc.snapshots import extract_disk

    try:
        extracted = extract_disk(snapshot, path)
    except FileExistsError:
        raise DiskImageError(f"--disk-from-snapshot {path}: the file exists") from None
    except OSError as exc:
        raise DiskImageError(f"--disk-from-snapshot {path}: {exc.strerror or exc}") from None
    disk = DiskImage.open(path, readonly=extracted.readonly)
    cleanup.callback(disk.close)
    return disk


def _bind_server(
    host: MachineHost,
    args: argparse.Namespace,
    read_only: SocketConfig | None,
    cleanup: contextlib.ExitStack,
) -> Server:
    """The control server with its sockets bound (before capability mode)."""
    from vmipc.server import Server, ServerConfig

    config = ServerConfig(extra_sockets=(read_only,) if read_only is not None else ())
    if args.held_request_rate is not None:
        config = dataclasses.replace(config, held_request_rate=args.held_request_rate)
    server = Server(host, config)
    server.bind(args.socket)
    cleanup.callback(server.close_sockets)
    return server


def _enter_sandbox(args: argparse.Namespace, server: Server | None) -> int:
    """Capability mode, unless --no-sandbox; EXIT_OK or the exit code of a failure."""
    if args.no_sandbox:
        log.warning(
            "warning: the sandbox is off (--no-sandbox): the VMM may open, create and "
            "remove any path its user can"
        )
        return EXIT_OK
    _preload_runtime_modules()
    socket_dirs = sorted({os.path.dirname(path) for path in server.socket_paths}) if server else []
    # the terminal stays the controlling one only while console input is read from it
    reads_terminal = args.console == "-" and not args.no_console_input and os.isatty(0)
    try:
        report = enter_capability_mode(removable_dirs=socket_dirs, keep_terminal=reads_terminal)
    except SandboxError as exc:
        print(f"vmipc vmm: cannot enter capability mode: {exc}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    for directory in report.unremovable_dirs:
        log.warning(
            "warning: uid %d without capabilities may not remove files in %s: its socket "
            "file will be left behind when the VMM quits (give the directory to uid %d)",
            os.geteuid(),
            directory,
            os.geteuid(),
        )
    if not report.filesystem_locked:
        log.warning(
            "warning: %s: the VMM can still open paths (running with %s)",
            report.landlock_missing,
            report.describe(),
        )
    elif not report.seccomp:
        log.warning("warning: no seccomp filter (%s)", report.seccomp_missing)
    else:
        log.info("capability mode: %s", report.describe())
    return EXIT_OK


#: the packages whose code a running VMM executes (not the client, CLI or sequences)
_RUNTIME_PACKAGES = (
    "vmipc.kvm",
    "vmipc.vmm",
    "vmipc.formats",
    "vmipc.protocol",
    "vmipc.commands",
    "vmipc.server",
)


def _preload_runtime_modules() -> None:
    """Import every module the running VMM may import lazily: in capability mode Python
    can no longer read a module's file (an import there fails with PermissionError)."""
    import importlib
    import pkgutil

    import trio  # noqa: F401

    for name in _RUNTIME_PACKAGES:
        package = importlib.import_module(name)
        for info in pkgutil.walk_packages(package.__path__, f"{name}."):
            importlib.import_module(info.name)


def _run_standalone(machine: Machine) -> int:
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if machine.state is RunState.CREATED:  # a restored machine runs already
            machine.start()
        while not stop.is_set():
            state = machine.wait_stopped(0.2)
            if state in (RunState.SHUTDOWN, RunState.CRASHED):
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return _exit_code_for(machine)


def _exit_code_for(machine: Machine | None, state: RunState | None = None) -> int:
    """0, or 1 when the guest crashed or powered off with a failure code. ``state``: the
    last state before the machine was closed (a server closes it on quit)."""
    if machine is None:
        return EXIT_OK
    state = state or machine.state
    if state is RunState.CRASHED:
        print(f"vmipc vmm: guest crashed: {machine.stop_reason}", file=sys.stderr)
        return EXIT_FAILED
    if state is RunState.SHUTDOWN and machine.power_off_code not in (None, 0):
        return EXIT_FAILED
    return EXIT_OK


def _run_with_server(host: MachineHost, server: Server, args: argparse.Namespace) -> int:
    import trio

    async def main() -> None:
        if host.machine is not None and not host.incoming and not args.restore:
            host.machine.start(paused=args.paused)
        async with trio.open_nursery() as nursery:

            async def serve_then_stop() -> None:
                await server.serve()
                nursery.cancel_scope.cancel()

            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(serve_then_stop)
            nursery.start_soon(stop_on_signal)

    final: list[RunState] = []

    def remember(change: StateChange) -> None:
        if change.new in (RunState.SHUTDOWN, RunState.CRASHED):
            final.append(change.new)

    host.add_listener(remember)
    trio.run(main)
    return _exit_code_for(host.machine, final[-1] if final else None)
