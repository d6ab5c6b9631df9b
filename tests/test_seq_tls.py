"""Migration over TLS (channel version 2) on loopback: certificates and token mode continue
the guest exactly; a silent peer, a plain version 1 peer, a wrong token, a certificate from
another CA or for another name, a replayed recording of an authenticated session and a
byte-flipping man in the middle are each refused, with the source running on and no
incoming VMM running the peer's data; plain TCP to or from a non-loopback address is refused
unless --insecure; a shape other than --memory/--vcpus is refused before any VMM starts."""

from __future__ import annotations

import json
import socket
import struct

import msgpack  # type: ignore[import-untyped, unused-ignore]
import pytest

from tests.seq_support import VmmProcess, Vmms, check_continuation, vmipc, vmm_processes
from tests.tls_support import (
    Ca,
    Proxy,
    Receiver,
    check_moved,
    check_source_runs_and_nothing_received,
    replay,
    token_file,
    wait_gone,
)

pytestmark = pytest.mark.kvm


def migrate(src: VmmProcess, port: int, *args: str) -> tuple[int, dict, str]:
    done = vmipc(
        "migrate", "--socket", src.socket, "--to", f"tcp:127.0.0.1:{port}", "--json", *args
    )
    report = json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}
    return done.returncode, report, done.stderr


def source(vmms: Vmms) -> VmmProcess:
    src = vmms.guest()
    src.wait_for_passes(2)
    return src


def test_certificates_migration_continues_the_guest_and_refuses_other_certificates() -> None:
    """Certificates: a sender whose certificate another CA signed, and one whose name is
    not the pinned --tls-peer-name, are dropped before any VMM starts (the receiver listens
    on, the source runs on); the right sender's migration continues the guest exactly."""
    with vmm_processes() as vmms:
        ca, other = Ca(vmms.tmp, "ca"), Ca(vmms.tmp, "other")
        recv_cert, recv_key = ca.issue("receiver.test", ["127.0.0.1"])
        send_cert, send_key = ca.issue("sender.test")
        wrong_name = ca.issue("intruder.test")
        forged = other.issue("sender.test")
        src = source(vmms)
        receiver = Receiver(
            vmms.tmp,
            [
                "--tls-cert",
                recv_cert,
                "--tls-key",
                recv_key,
                "--tls-ca",
                str(ca.path),
                "--tls-peer-name",
                "sender.test",
            ],
        )
        try:
            for n, (cert, key) in enumerate((forged, wrong_name), start=1):
                code, _, err = migrate(
                    src, receiver.port, "--tls-cert", cert, "--tls-key", key,
                    "--tls-ca", str(ca.path),
                )  # fmt: skip
                assert code == 1, err
                receiver.wait_for_line("dropped a peer", n)
                check_source_runs_and_nothing_received(src, receiver)
            assert "certificate" in receiver.errors[-1], receiver.errors
            code, report, err = migrate(
                src, receiver.port, "--tls-cert", send_cert, "--tls-key", send_key,
                "--tls-ca", str(ca.path),
            )  # fmt: skip
            assert code == 0, err
            assert report["destination"] == "running"
            # TLS authenticates every byte: the pages go without a hash of their own
            assert report["page_checksum"] == "headers", report
            check_moved(src, receiver)
        finally:
            receiver.stop()


def test_sender_refuses_a_receiver_whose_certificate_is_not_for_its_host() -> None:
    """The sender checks the receiver's certificate name against the host it connects to
    (or --tls-peer-name): a receiver certified for another name gets nothing."""
    with vmm_processes() as vmms:
        ca = Ca(vmms.tmp, "ca")
        recv_cert, recv_key = ca.issue("elsewhere.test")  # no 127.0.0.1 in it
        send_cert, send_key = ca.issue("sender.test")
        src = source(vmms)
        receiver = Receiver(
            vmms.tmp, ["--tls-cert", recv_cert, "--tls-key", recv_key, "--tls-ca", str(ca.path)]
        )
        try:
            code, _, err = migrate(
                src, receiver.port, "--tls-cert", send_cert, "--tls-key", send_key,
                "--tls-ca", str(ca.path),
            )  # fmt: skip
            assert code == 1, err
            assert "runs on" in err or "runs on" in json.dumps(err), err
            receiver.wait_for_line("dropped a peer")
            check_source_runs_and_nothing_received(src, receiver)
        finally:
            receiver.stop()


def _v1_hello() -> bytes:
    hello = msgpack.packb({"op": "hello", "version": 1, "memory_size": 64 << 20, "vcpus": 2})
    return struct.pack("<I", len(hello)) + hello


def test_token_mode_drops_silent_plain_and_wrong_token_peers_and_refuses_a_replay() -> None:
    """Token mode: a peer that says nothing is dropped by the hello timeout, a plain
    version 1 sender gets a clean refusal it can read, a sender with another token is
    dropped — the receiver listens on through all three and no VMM starts; then the right
    token's migration (through a proxy that records what the sender sent) continues the
    guest exactly, and that recording replayed to a new receiver is refused."""
    with vmm_processes() as vmms:
        token = token_file(vmms.tmp)
        wrong = token_file(vmms.tmp, "wrong")
        src = source(vmms)
        receiver = Receiver(vmms.tmp, ["--token-file", token, "--hello-timeout", "1"])
        try:
            with socket.create_connection(("127.0.0.1", receiver.port), timeout=30) as silent:
                receiver.wait_for_line("no authentication within 1 s")
                assert silent.recv(100) == b""  # dropped
            with socket.create_connection(("127.0.0.1", receiver.port), timeout=30) as plain:
                plain.sendall(_v1_hello())
                (length,) = struct.unpack("<I", plain.recv(4))
                answer = msgpack.unpackb(plain.recv(length))
                assert answer["ok"] is False and "TLS" in answer["error"], answer
            receiver.wait_for_line("dropped a peer", 2)
            code, _, err = migrate(src, receiver.port, "--token-file", wrong)
            assert code == 1, err
            receiver.wait_for_line("dropped a peer", 3)
            assert "wrong token" in receiver.errors[-1], receiver.errors
            check_source_runs_and_nothing_received(src, receiver)

            proxy = Proxy(("127.0.0.1", receiver.port))
            try:
                code, _report, err = migrate(src, proxy.port, "--token-file", token)
            finally:
                proxy.close()
            assert code == 0, err
            check_moved(src, receiver)
        finally:
            receiver.stop()
        recording = bytes(proxy.sent)
        assert len(recording) > 1 << 18  # a whole migration: the guest's pages went through
        again = Receiver(vmms.tmp, ["--token-file", token], name="again")
        try:
            replay(again.port, recording)
            again.wait_for_line("dropped a peer")
            assert not again.console.exists()
        finally:
            again.stop()


def test_a_man_in_the_middle_flipping_one_byte_fails_the_migration_safely() -> None:
    """One byte flipped in the sender's stream after the handshake: the TLS record fails
    its authentication at the receiver, which discards its VMM before it ever ran; the
    source runs on."""
    with vmm_processes() as vmms:
        token = token_file(vmms.tmp)
        src = source(vmms)
        receiver = Receiver(vmms.tmp, ["--token-file", token])
        proxy = Proxy(("127.0.0.1", receiver.port), flip_at=200_000)
        try:
            code, _report, err = migrate(src, proxy.port, "--token-file", token)
            assert code == 1, err
            assert proxy.flipped
            code, received = receiver.result()
            assert code == 1 and received["outcome"] == "discarded", received
            assert received["pid"] is not None  # it had started a VMM, which never ran:
            assert "pass=" not in receiver.console.read_text(errors="replace")
            wait_gone(received["socket"])
            assert src.state() == "running"
            src.wait_for_passes(max(src.passes().values()) + 1)
            check_continuation(src.text(), "")
        finally:
            proxy.close()
            receiver.stop()


def test_a_shape_other_than_the_pinned_one_is_refused_before_a_vmm_starts() -> None:
    with vmm_processes() as vmms:
        token = token_file(vmms.tmp)
        src = source(vmms)  # 64 MiB, 2 vCPUs
        receiver = Receiver(vmms.tmp, ["--token-file", token, "--memory", "32M", "--vcpus", "2"])
        try:
            code, _, err = migrate(src, receiver.port, "--token-file", token)
            assert code == 1, err
            assert "--memory" in err, err
            code, received = receiver.result()
            assert code == 1 and received["outcome"] == "discarded"
            assert received["pid"] is None and not receiver.console.exists()
            assert src.state() == "running"
        finally:
            receiver.stop()


@pytest.mark.parametrize("address", ["0.0.0.0", "10.1.2.3"])
def test_plain_tcp_off_loopback_is_refused_unless_insecure(tmp_path, address: str) -> None:
    refused = vmipc("receive", "--listen", f"{address}:0", timeout=20)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "--insecure" in refused.stderr, refused.stderr
    sent = vmipc("migrate", "--socket", str(tmp_path / "none.sock"), "--to", f"tcp:{address}:1")
    assert sent.returncode == 2
    assert sent.stderr.count("\n") == 1 and "--insecure" in sent.stderr, sent.stderr
    if address == "0.0.0.0":
        receiver = Receiver(str(tmp_path), ["--insecure"], addr=address)
        receiver.stop()
