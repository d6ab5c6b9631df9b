"""Migration over TCP between two network namespaces joined by a veth pair that this test
creates (addresses 10.200.N.1/30 and 10.200.N.2/30 exist only inside those namespaces and
are removed with them): over TLS with certificates the guest continues exactly, and the
session's recording replayed is refused; a plain peer, a peer certified by another CA or
under another name, and a man in the middle flipping one byte are each refused with the
destination never running and the source running on; a client killed mid-way and a
destination VMM killed mid-way (plain TCP, --insecure) each leave exactly one VM running."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.seq_support import (
    VMIPC,
    VmmProcess,
    Vmms,
    check_continuation,
    vmipc,
    vmm_processes,
)
from tests.tls_support import (
    ROOT,
    Ca,
    ProxyProcess,
    check_moved,
    check_source_runs_and_nothing_received,
    wait_gone,
)
from tests.tls_support import Receiver as TlsReceiver
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


def migrate_from(
    ns: str, src: VmmProcess, to: tuple[str, int], *security: str
) -> tuple[int, dict, str]:
    """``vmipc migrate`` run in namespace ``ns`` to ``tcp:HOST:PORT``."""
    done = vmipc(
        "migrate", "--socket", src.socket, "--to", f"tcp:{to[0]}:{to[1]}", "--json", "--force",
        *security, prefix=in_ns(ns),
    )  # fmt: skip
    report = json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}
    return done.returncode, report, done.stderr


def cert_options(cert: tuple[str, str], ca: Ca) -> tuple[str, ...]:
    return ("--tls-cert", cert[0], "--tls-key", cert[1], "--tls-ca", str(ca.path))


@needs_netns
def test_tls_migration_between_namespaces_continues_the_guest_and_its_replay_is_refused() -> None:
    """Certificates, across a veth pair, through a proxy in the destination's namespace
    that records what the sender sent: the guest continues exactly at the destination; the
    recording sent again from the source's namespace to a new receiver with the same
    certificates is dropped before any VMM starts (TLS 1.3's fresh handshake secrets)."""
    with veth_namespaces() as ((ns_a, _), (ns_b, addr_b)), vmm_processes() as vmms:
        ca = Ca(vmms.tmp, "ca")
        recv = cert_options(ca.issue("receiver.test", [addr_b]), ca)
        send = cert_options(ca.issue("sender.test"), ca)
        src = source(vmms, ns_a)
        receiver = TlsReceiver(vmms.tmp, recv, addr=addr_b, prefix=in_ns(ns_b))
        proxy = ProxyProcess(
            in_ns(ns_b), addr_b, (addr_b, receiver.port), Path(vmms.tmp) / "recording"
        )
        try:
            code, report, err = migrate_from(ns_a, src, (addr_b, proxy.port), *send)
            assert code == 0, err
            assert report["outcome"] == "migrated" and report["destination"] == "running"
            flipped, recording = proxy.finish()
            assert not flipped and len(recording) > 1 << 18  # the guest's pages went through
            check_moved(src, receiver)
        finally:
            proxy.stop()
            receiver.stop()
        again = TlsReceiver(vmms.tmp, recv, addr=addr_b, prefix=in_ns(ns_b), name="again")
        try:
            replayed = subprocess.run(
                [*in_ns(ns_a), sys.executable, "-c", REPLAY, addr_b, str(again.port)],
                input=recording,
                capture_output=True,
                cwd=ROOT,
                timeout=60,
            )
            assert replayed.returncode == 0, replayed.stderr
            again.wait_for_line("dropped a peer")
            assert not again.console.exists(), "an incoming VMM was started for the replay"
        finally:
            again.stop()


REPLAY = """
import sys
from tests.tls_support import replay
replay(int(sys.argv[2]), sys.stdin.buffer.read(), host=sys.argv[1])
"""


@needs_netns
def test_peers_between_namespaces_without_the_right_credentials_or_bytes_are_refused() -> None:
    """A receiver with certificates in one namespace, senders in another across a veth
    pair: a plain sender (--insecure), a sender whose certificate another CA signed, and a
    sender certified under a name other than the pinned --tls-peer-name are each dropped
    before any VMM starts, the receiver listening on; then the right sender through a proxy
    that flips one byte of its stream after the handshake: the receiver discards the VMM it
    started before that VMM ever ran. The source runs on through all four and its guest
    continues exactly."""
    with veth_namespaces() as ((ns_a, _), (ns_b, addr_b)), vmm_processes() as vmms:
        ca, other = Ca(vmms.tmp, "ca"), Ca(vmms.tmp, "other")
        recv = cert_options(ca.issue("receiver.test", [addr_b]), ca)
        send = cert_options(ca.issue("sender.test"), ca)
        peers = {
            "plain": ("--insecure",),
            "another CA": cert_options(other.issue("sender.test"), ca),
            "another name": cert_options(ca.issue("intruder.test"), ca),
        }
        src = source(vmms, ns_a)
        receiver = TlsReceiver(
            vmms.tmp,
            (*recv, "--tls-peer-name", "sender.test"),
            addr=addr_b,
            prefix=in_ns(ns_b),
        )
        proxy: ProxyProcess | None = None
        try:
            for n, (peer, security) in enumerate(peers.items(), start=1):
                code, _, err = migrate_from(ns_a, src, (addr_b, receiver.port), *security)
                assert code == 1, f"{peer}: {err}"
                # the receiver closes what it drops: the peer learns at once, no time-out
                assert "timed out" not in err, f"{peer}: {err}"
                receiver.wait_for_line("dropped a peer", n)
                check_source_runs_and_nothing_received(src, receiver)
            proxy = ProxyProcess(
                in_ns(ns_b),
                addr_b,
                (addr_b, receiver.port),
                Path(vmms.tmp) / "recording",
                flip_at=200_000,
            )
            code, _, err = migrate_from(ns_a, src, (addr_b, proxy.port), *send)
            assert code == 1, err
            flipped, _ = proxy.finish()
            assert flipped
            code, received = receiver.result()
            assert code == 1 and received["outcome"] == "discarded", received
            assert received["pid"] is not None  # it had started a VMM, which never ran:
            assert "pass=" not in receiver.console.read_text(errors="replace")
            wait_gone(received["socket"])
            assert src.state() == "running"
            src.wait_for_passes(max(src.passes().values()) + 1)
            check_continuation(src.text(), "")
        finally:
            if proxy is not None:
                proxy.stop()
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
