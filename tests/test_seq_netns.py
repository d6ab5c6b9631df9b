"""Migration over TCP between two network namespaces joined by a veth pair that this test
creates (addresses 10.200.N.1/30 and 10.200.N.2/30 exist only inside those namespaces and
are removed with them): over TLS with certificates the guest continues exactly; a client
killed mid-way and a destination VMM killed mid-way (plain TCP, --insecure) each leave
exactly one VM running."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.seq_support import (
    VMIPC,
    VmmProcess,
    Vmms,
    check_continuation,
    vmm_processes,
    wait_for,
)
from vmipc.client import SyncClient

pytestmark = pytest.mark.kvm


def _netns_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` is unavailable: {probe.stderr.strip()}"
    return None


UNAVAILABLE = _netns_unavailable()


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=10)


@contextmanager
def veth_namespaces() -> Iterator[tuple[tuple[str, str], tuple[str, str]]]:
    """Two namespaces joined by a veth pair; yields ((ns_a, ip_a), (ns_b, ip_b))."""
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b = f"vmipc-{tag}-a", f"vmipc-{tag}-b"
    net = 200 + os.getpid() % 50  # 10.200.N.0/30, N in 200..249
    addr_a, addr_b = f"10.200.{net}.1", f"10.200.{net}.2"
    made: list[str] = []
    try:
        for ns in (ns_a, ns_b):
            ip("netns", "add", ns)
            made.append(ns)
        ip(
            "link",
            "add",
            f"vm{tag}a",
            "netns",
            ns_a,
            "type",
            "veth",
            "peer",
            "name",
            f"vm{tag}b",
            "netns",
            ns_b,
        )
        for ns, dev, addr in ((ns_a, f"vm{tag}a", addr_a), (ns_b, f"vm{tag}b", addr_b)):
            ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield (ns_a, addr_a), (ns_b, addr_b)
    finally:
        for ns in made:  # deleting a namespace removes its veth end and addresses
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def in_ns(ns: str) -> tuple[str, ...]:
    return ("ip", "netns", "exec", ns)


class Receiver:
    def __init__(
        self,
        ns: str | None,
        addr: str,
        tmp: str,
        socket: str | None = None,
        security: tuple[str, ...] = ("--insecure",),
    ) -> None:
        self.console = Path(tmp) / "received.console"
        argv = [*(in_ns(ns) if ns else ()), *VMIPC, "receive", "--listen", f"{addr}:0", "--json"]
        argv += ["--console", str(self.console), "--accept-timeout", "30", *security]
        if socket:
            argv += ["--socket", socket]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("listening on "), line
        self.port = int(line.rsplit(":", 1)[1])

    def result(self) -> tuple[int, dict]:
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        code = self.proc.wait(timeout=30)
        return code, json.loads(out)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def quit_vmm_at(socket: str, pid: int | None) -> None:
    try:
        with SyncClient(socket, timeout=5) as client:
            client.quit()
    except Exception:
        if pid:
            os.kill(pid, 9)


def source(vmms: Vmms, ns: str) -> VmmProcess:
    src = vmms.guest(prefix=in_ns(ns))
    src.wait_for_passes(2)
    return src


needs_netns = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")


@needs_netns
def test_tls_migration_between_namespaces_continues_the_guest() -> None:
    from tests.tls_support import Ca

    with veth_namespaces() as ((ns_a, _), (ns_b, addr_b)), vmm_processes() as vmms:
        ca = Ca(vmms.tmp, "ca")
        recv_cert, recv_key = ca.issue("receiver.test", [addr_b])
        send_cert, send_key = ca.issue("sender.test")
        src = source(vmms, ns_a)
        receiver = Receiver(
            ns_b,
            addr_b,
            vmms.tmp,
            security=("--tls-cert", recv_cert, "--tls-key", recv_key, "--tls-ca", str(ca.path)),
        )
        try:
            done = subprocess.run(
                [
                    *in_ns(ns_a),
                    *VMIPC,
                    "migrate",
                    "--socket",
                    src.socket,
                    "--to",
                    f"tcp:{addr_b}:{receiver.port}",
                    "--json",
                    *("--tls-cert", send_cert, "--tls-key", send_key, "--tls-ca", str(ca.path)),
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            report = json.loads(done.stdout)
            assert report["outcome"] == "migrated" and report["destination"] == "running"
            code, received = receiver.result()
            assert code == 0 and received["outcome"] == "running"
            assert received["peer"].startswith("10.200.")
            assert src.wait_exit() == 0
            try:
                with SyncClient(received["socket"], timeout=10) as client:
                    assert client.query_status()["state"] == "running"
                    reached = max(src.passes().values())

                    deadline = time.monotonic() + 10
                    while time.monotonic() < deadline:
                        text = receiver.console.read_text()
                        if text.count("\n") > 6 and f"pass={reached + 2} " in text:
                            break
                        time.sleep(0.05)
                    client.pause()
                check_continuation(src.text(), receiver.console.read_text())
            finally:
                quit_vmm_at(received["socket"], received["pid"])
                wait_for(lambda: not os.path.exists(received["socket"]), what="the VMM to quit")
                os.rmdir(os.path.dirname(received["socket"]))  # receive made it for its VMM
        finally:
            receiver.stop()


KILL_CLIENT = """
import os, signal, sys, trio
from vmipc.sequences import MigrationPolicy, migrate_tcp
def hook(at):
    if at == sys.argv[3]:
        os.kill(os.getpid(), signal.SIGKILL)
policy = MigrationPolicy(max_downtime=0.0, max_rounds=2, force=True)
trio.run(lambda: migrate_tcp(sys.argv[1], (sys.argv[2], int(sys.argv[4])), on_step=hook,
                             policy=policy))
"""


@needs_netns
def test_a_client_killed_mid_migration_over_tcp_leaves_the_source_running() -> None:
    with veth_namespaces() as ((ns_a, _), (ns_b, addr_b)), vmm_processes() as vmms:
        src = source(vmms, ns_a)
        receiver = Receiver(ns_b, addr_b, vmms.tmp)
        try:
            killed = subprocess.run(
                [
                    *in_ns(ns_a),
                    sys.executable,
                    "-c",
                    KILL_CLIENT,
                    src.socket,
                    addr_b,
                    "dirty round",
                    str(receiver.port),
                ],
                timeout=60,
            )
            assert killed.returncode in (-9, 137)
            code, received = receiver.result()
            assert code == 1 and received["outcome"] == "discarded", received
            assert received["transfers"] >= 1
            assert not os.path.exists(received["socket"]), "the destination VMM is still there"
            assert src.state() == "running"
            src.wait_for_passes(max(src.passes().values()) + 2)
            check_continuation(src.text(), "")
        finally:
            receiver.stop()


KILL_DESTINATION = """
import os, signal, sys, trio
from vmipc.sequences import MigrationPolicy, SequenceError, migrate_tcp
def hook(at):
    if at == "dirty round":
        os.kill(int(sys.argv[4]), signal.SIGKILL)
policy = MigrationPolicy(max_downtime=0.0, max_rounds=2, force=True, timeout=20)
try:
    trio.run(lambda: migrate_tcp(sys.argv[1], (sys.argv[2], int(sys.argv[3])), on_step=hook,
                                 policy=policy))
except SequenceError as exc:
    print(exc.outcome)
    sys.exit(1)
"""


@needs_netns
def test_a_destination_vmm_killed_mid_migration_over_tcp_leaves_the_source_running() -> None:
    with veth_namespaces() as ((ns_a, _), (ns_b, addr_b)), vmm_processes() as vmms:
        src = source(vmms, ns_a)
        dst = vmms.incoming(prefix=in_ns(ns_b))
        receiver = Receiver(ns_b, addr_b, vmms.tmp, socket=dst.socket)
        try:
            failed = subprocess.run(
                [
                    *in_ns(ns_a),
                    sys.executable,
                    "-c",
                    KILL_DESTINATION,
                    src.socket,
                    addr_b,
                    str(receiver.port),
                    str(dst.pid),
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert failed.returncode == 1, failed.stderr
            assert "the source VM runs" in failed.stdout, failed.stdout
            code, received = receiver.result()
            assert code == 1 and received["outcome"] == "discarded"
            assert not dst.alive()
            assert src.state() == "running"
            src.wait_for_passes(max(src.passes().values()) + 2)
            check_continuation(src.text(), "")
        finally:
            receiver.stop()


def test_receive_into_a_running_vmm_refuses_and_leaves_it_running() -> None:
    """``vmipc receive --socket S`` given a VMM that is not incoming (here a running guest)
    refuses the migration and never quits that VMM: only a destination it verified as a
    fitting incoming VMM is its to discard."""
    import socket as socketlib
    import struct

    import msgpack  # type: ignore[import-untyped, unused-ignore]

    with vmm_processes() as vmms:
        running = vmms.guest("running")
        running.wait_for_passes(1)
        receiver = Receiver(None, "127.0.0.1", vmms.tmp, running.socket)
        try:
            with socketlib.create_connection(("127.0.0.1", receiver.port), timeout=20) as peer:
                hello = msgpack.packb(
                    {"op": "hello", "version": 2, "memory_size": 64 << 20, "vcpus": 2}
                )
                peer.sendall(struct.pack("<I", len(hello)) + hello)
                code, report = receiver.result()
        finally:
            receiver.stop()
        assert code != 0
        assert report["outcome"] == "discarded"
        assert "not incoming" in report["reason"]
        assert running.state() == "running"
        before = max(running.passes().values())
        running.wait_for_passes(before + 1)


def test_receive_refuses_a_control_frame_of_a_million_objects_before_building_them() -> None:
    """A TCP peer's control frame (at most 1 MiB) may not decode into much more than its
    bytes: a megabyte of empty arrays (once ~70 MiB of lists) is refused by the decoder's
    container budget, and no VMM is started."""
    import socket as socketlib
    import struct

    with vmm_processes() as vmms:
        receiver = Receiver(None, "127.0.0.1", vmms.tmp)
        try:
            count = (1 << 20) - 16
            payload = b"\xdd" + struct.pack(">I", count) + b"\x90" * count
            with socketlib.create_connection(("127.0.0.1", receiver.port), timeout=20) as peer:
                peer.sendall(struct.pack("<I", len(payload)) + payload)
                code, report = receiver.result()
        finally:
            receiver.stop()
    assert code != 0
    assert report["outcome"] == "discarded"
    assert "decoding limit" in report["reason"], report
    assert report["pid"] is None  # no incoming VMM was started for it
