#!/usr/bin/env python3
"""Encrypted live migration over TCP: vmipc plain, TLS with certificates and TLS with a
token, beside QEMU 7.2's plain TCP and TLS (``tls-creds-x509``) migration of the same guest.

A 1 GiB, 2-vCPU built-in guest rewriting a working set (``ws=64M rate=8192`` per vCPU, as
in bench_sequences.py's ``ws 64 MiB`` level) migrates over TCP on loopback, again and
again, each destination being the source of the next migration, the configurations taking
turns so that a noisy shared machine slows all of them alike:

- vmipc: ``vmipc receive --listen 127.0.0.1:0 --socket DST`` (a process, with its
  ``vmipc vmm --incoming --memory 1G --vcpus 2`` started before, as QEMU's destination is)
  and ``vmipc.sequences.migrate_tcp`` in this process (what ``vmipc migrate --to tcp:``
  runs), with ``--insecure`` (plain TCP), certificates (``--tls-cert/--tls-key/--tls-ca``)
  or a token file; ``MigrationPolicy(force=True)``, default 50 ms downtime target;
- QEMU: ``-incoming defer`` + ``migrate-incoming tcp:127.0.0.1:PORT``, ``migrate``, polled
  with ``query-migrate`` (``downtime-limit`` 50 ms, ``max-bandwidth`` lifted, forced after
  20 s as in bench_sequences.py); for TLS each QEMU gets ``tls-creds-x509`` objects
  (``endpoint=server`` and ``endpoint=client``, ``verify-peer=on``) and
  ``migrate-set-parameters tls-creds`` on both sides.

Both use the same CA and certificates (P-256, made with ``cryptography`` in the run's
temporary directory under the names QEMU wants). Columns: total time, downtime (each
VMM's own figure), bytes (pages and state) per second of total time. Targets (issue 12):
vmipc's encrypted total ≤ QEMU's encrypted total; vmipc's encrypted downtime ≤ 1.2 times
vmipc's plaintext downtime.

Run: ``.venv/bin/python benchmarks/bench_tls.py [--quick] [--json FILE] [--no-qemu]``.
``--quick``: 2 migrations of each configuration (default 5). Needs /dev/kvm (root).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio
from _common import (
    QemuFailed,
    median,
    note_repeated,
    qemu_or_note,
    ratio,
    say,
    say_banner,
    say_notes,
    table,
    write_json,
)
from bench_sequences import (
    BANNER,
    MAX_DOWNTIME_MS,
    QEMU_FORCE_AFTER_S,
    VCPUS,
    Children,
    QemuVm,
    VmipcVmm,
    boot_qemu,
    describe_tree,
    last_words,
    parse_mib,
    passes_done,
    progress,
    qemu_version,
    read,
    wait_for,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vmipc.sequences import Credentials, MigrationPolicy, SequenceError, migrate_tcp, security_for

MEMORY = "1G"
GUEST_OPTIONS = "ws=64M rate=8192"
HOST = "127.0.0.1"

# --- credentials ----------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_pki(directory: Path) -> None:
    """A CA and a server and a client certificate in ``directory``, under the names QEMU's
    ``tls-creds-x509`` reads (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,
    client-key.pem); the server's names 127.0.0.1 and localhost."""
    directory.mkdir(mode=0o700)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("bench-ca"))
        .issuer_name(_name("bench-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca-cert.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, names in (("server", ["localhost"]), ("client", ["sender.bench"])):
        key = ec.generate_private_key(ec.SECP256R1())
        alt: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        if role == "server":
            alt.append(x509.IPAddress(ipaddress.ip_address(HOST)))
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        (directory / f"{role}-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path = directory / f"{role}-key.pem"
        key_path.write_bytes(_pem_key(key))
        key_path.chmod(0o600)


@dataclass(frozen=True)
class VmipcMode:
    name: str
    #: the receiver's security options
    receive: tuple[str, ...]
    #: the sender's credentials (None: plain TCP)
    credentials: Credentials | None
    encrypted: bool


def vmipc_modes(pki: Path, token: Path) -> list[VmipcMode]:
    certs = security_for(
        HOST,
        cert=str(pki / "client-cert.pem"),
        key=str(pki / "client-key.pem"),
        ca=str(pki / "ca-cert.pem"),
    )
    receiver_certs = (
        *("--tls-cert", str(pki / "server-cert.pem"), "--tls-key", str(pki / "server-key.pem")),
        *("--tls-ca", str(pki / "ca-cert.pem")),
    )
    return [
        VmipcMode("vmipc plain (--insecure)", ("--insecure",), None, False),
        VmipcMode("vmipc TLS, certificates", receiver_certs, certs, True),
        VmipcMode(
            "vmipc TLS, token",
            ("--token-file", str(token)),
            security_for(HOST, token_file=str(token)),
            True,
        ),
    ]


# --- runs -----------------------------------------------------------------------------------


@dataclass
class Run:
    config: str
    total_s: float
    downtime_s: float | None
    bytes: int
    converged: bool
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.bytes / self.total_s if self.total_s > 0 else 0.0


def wait_touched(vm: VmipcVmm | QemuVm) -> None:
    """Until every vCPU has written its working set once (a pass line each)."""
    vm.wait_output(lambda out: BANNER in out, "the guest's banner", 40)
    vm.wait_output(lambda out: passes_done(out) == VCPUS, "every vCPU's first pass", 120)


class Receiver:
    """``vmipc receive --listen 127.0.0.1:0 --socket DST --json`` (killed by pid)."""

    def __init__(self, kids: Children, tmp: Path, name: str, socket: str, args: Sequence[str]):
        self.stderr = tmp / f"{name}.receive.stderr"
        argv = [sys.executable, "-m", "vmipc", "receive", "--listen", f"{HOST}:0"]
        argv += ["--socket", socket, "--json", "--accept-timeout", "120", *args]
        with self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err
            )
        kids.procs.append(self.proc)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("listening on "):
            Children.kill(self.proc)
            raise RuntimeError(f"vmipc receive did not listen: {last_words(self.stderr)}")
        self.port = int(line.rsplit(":", 1)[1])

    def result(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        self.proc.wait(60)
        report: dict[str, Any] = json.loads(out) if out.strip() else {}
        return report


def migrate_vmipc(
    kids: Children, tmp: Path, modes: Sequence[VmipcMode], count: int, notes: list[str]
) -> dict[str, list[Run]]:
    """One source, then ``count`` rounds of one migration per mode (in turn), each into a
    new incoming VMM, which is the source of the next; one plain warm-up first."""
    src = VmipcVmm(
        kids,
        tmp,
        "v-src",
        [
            *("--guest", "builtin", "--vcpus", str(VCPUS), "--memory", MEMORY),
            *(a for opt in GUEST_OPTIONS.split() for a in ("--guest-opt", opt)),
        ],
    )
    runs: dict[str, list[Run]] = {mode.name: [] for mode in modes}
    consoles = [src.console]
    schedule = [modes[0]] + [mode for _ in range(count) for mode in modes]
    try:
        wait_touched(src)
        time.sleep(0.5)
        for index, mode in enumerate(schedule):
            progress(
                f"{mode.name} ({index}/{len(schedule) - 1}{', warm-up' if index == 0 else ''})"
            )
            dst = VmipcVmm(
                kids,
                tmp,
                f"v-dst{index}",
                ["--incoming", "--memory", MEMORY, "--vcpus", str(VCPUS)],
            )
            consoles.append(dst.console)
            with dst.client(30) as client:
                if client.query_status()["state"] != "incoming":
                    raise RuntimeError("the destination VMM is not incoming")
            receiver = Receiver(kids, tmp, f"v-dst{index}", dst.socket, mode.receive)
            migration = functools.partial(
                migrate_tcp,
                src.socket,
                (HOST, receiver.port),
                mode.credentials,
                policy=MigrationPolicy(force=True),
            )
            try:
                report = trio.run(migration)
            except SequenceError as exc:
                notes.append(f"{mode.name}: a migration failed: {exc}")
                Children.kill(receiver.proc)
                dst.quit()
                break
            received = receiver.result()
            if received.get("outcome") != "running":
                notes.append(f"{mode.name}: the receiver said {received}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                src.proc.wait(10)  # the migration told it to quit
            Children.kill(src.proc)
            kids.reap()
            src = dst
            if index > 0:
                runs[mode.name].append(
                    Run(
                        config=mode.name,
                        total_s=report.total_s,
                        downtime_s=report.downtime_s,
                        bytes=report.bytes + report.state_bytes,
                        converged=report.converged,
                        detail={
                            "rounds": report.rounds,
                            "round_details": [asdict(r) for r in report.round_details],
                            "receiver": received,
                            "timeline": [asdict(t) for t in report.timeline],
                        },
                    )
                )
            time.sleep(0.5)  # the guest runs on at the destination
    finally:
        src.quit()
    if any(b"ERROR" in read(console) for console in consoles):
        notes.append("vmipc: the guest printed an error line")
    return runs


def free_port() -> int:
    with socket.create_server((HOST, 0)) as probe:
        return int(probe.getsockname()[1])


def add_tls_objects(vm: QemuVm, pki: Path) -> None:
    for endpoint in ("server", "client"):
        vm.qmp.execute(
            "object-add",
            {
                "qom-type": "tls-creds-x509",
                "id": f"tls-{endpoint}",
                "dir": str(pki),
                "endpoint": endpoint,
                "verify-peer": True,
            },
        )


QEMU_PLAIN, QEMU_TLS = "QEMU plain TCP", "QEMU TLS (x509)"


def migrate_qemu(
    kids: Children,
    qemu: str,
    tmp: Path,
    pki: Path,
    count: int,
    notes: list[str],
    failures: list[str],
) -> dict[str, list[Run]]:
    memory_mib = parse_mib(MEMORY)
    touched = lambda out: passes_done(out) == VCPUS  # noqa: E731
    src = boot_qemu(kids, qemu, tmp, "q-src", memory_mib, GUEST_OPTIONS, touched, 120, failures)
    runs: dict[str, list[Run]] = {QEMU_PLAIN: [], QEMU_TLS: []}
    consoles = [src.serial]
    schedule = [QEMU_PLAIN] + [c for _ in range(count) for c in (QEMU_PLAIN, QEMU_TLS)]
    try:
        add_tls_objects(src, pki)
        time.sleep(0.5)
        for index, config in enumerate(schedule):
            progress(f"{config} ({index}/{len(schedule) - 1}{', warm-up' if index == 0 else ''})")
            tls = config == QEMU_TLS
            dst = QemuVm(kids, qemu, tmp, f"q-dst{index}", memory_mib, GUEST_OPTIONS, incoming=True)
            consoles.append(dst.serial)
            add_tls_objects(dst, pki)
            dst.qmp.execute("migrate-set-parameters", {"tls-creds": "tls-server" if tls else ""})
            uri = f"tcp:{HOST}:{free_port()}"
            dst.qmp.execute("migrate-incoming", {"uri": uri})
            src.migrate_params(MAX_DOWNTIME_MS)
            src.qmp.execute("migrate-set-parameters", {"tls-creds": "tls-client" if tls else ""})
            src.qmp.execute("migrate", {"uri": uri})
            try:
                info, forced = src.wait_migration(120, QEMU_FORCE_AFTER_S)
            except QemuFailed as exc:
                notes.append(f"{config}: a migration failed: {exc}")
                dst.close()
                break
            wait_for(
                lambda d=dst: d.qmp.execute("query-status")["status"] == "running",
                "the QEMU destination running",
                30,
                0.002,
            )
            src.close()
            kids.reap()
            src = dst
            ram = info.get("ram", {})
            if index > 0:
                runs[config].append(
                    Run(
                        config=config,
                        total_s=info["total-time"] / 1e3,
                        downtime_s=info["downtime"] / 1e3 if "downtime" in info else None,
                        bytes=int(ram.get("transferred", 0)),
                        converged=not forced,
                        detail={"query-migrate": info},
                    )
                )
            time.sleep(0.5)
    finally:
        src.close()
    if any(b"ERROR" in read(console) for console in consoles):
        notes.append("QEMU: the guest printed an error line")
    return runs


# --- report ---------------------------------------------------------------------------------


def med(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return median(present) if present else None


def fmt_s(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds:.2f} s"


def fmt_ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.0f} ms"


def fmt_rate(rate: float | None) -> str:
    return "—" if rate is None else f"{rate / (1 << 20):.0f} MiB/s"


def summary(runs: Sequence[Run]) -> dict[str, Any]:
    return {
        "n": len(runs),
        "total_s": med([r.total_s for r in runs]),
        "downtime_s": med([r.downtime_s for r in runs]),
        "bytes": med([float(r.bytes) for r in runs]),
        "rate": med([r.rate for r in runs]),
        "converged": sum(r.converged for r in runs),
    }


def report(results: dict[str, list[Run]], count: int) -> dict[str, Any]:
    sums = {config: summary(runs) for config, runs in results.items()}
    plain = sums.get("vmipc plain (--insecure)", {})
    qemu_tls = sums.get(QEMU_TLS, {})
    say(
        f"## Migration over TCP on loopback of a {MEMORY[:-1]} GiB guest ({VCPUS} vCPUs, "
        f"`{GUEST_OPTIONS}` per vCPU): medians of {count}"
    )
    say()
    rows = []
    for config, s in sums.items():
        rows.append(
            [
                config,
                f"{s['n']} ({s['converged']} converged)",
                fmt_s(s["total_s"]),
                ratio(s["total_s"], qemu_tls.get("total_s")),
                fmt_ms(s["downtime_s"]),
                ratio(s["downtime_s"], plain.get("downtime_s")),
                "—" if s["bytes"] is None else f"{s['bytes'] / (1 << 20):.0f} MiB",
                fmt_rate(s["rate"]),
            ]
        )
    say(
        table(
            [
                "configuration",
                "runs",
                "total",
                "÷ QEMU TLS total",
                "downtime",
                "÷ vmipc plain downtime",
                "bytes",
                "bytes/s",
            ],
            rows,
        )
    )
    say()
    targets: dict[str, Any] = {}
    for config in ("vmipc TLS, certificates", "vmipc TLS, token"):
        s = sums.get(config)
        if not s:
            continue
        total_ratio = _div(s["total_s"], qemu_tls.get("total_s"))
        down_ratio = _div(s["downtime_s"], plain.get("downtime_s"))
        targets[config] = {"total_vs_qemu_tls": total_ratio, "downtime_vs_plain": down_ratio}
        say(
            f"- {config}: total ÷ QEMU TLS total = {_fmt_ratio(total_ratio)} (target ≤ 1.00: "
            f"{_verdict(total_ratio, 1.0)}); downtime ÷ vmipc plain downtime = "
            f"{_fmt_ratio(down_ratio)} (target ≤ 1.20: {_verdict(down_ratio, 1.2)})"
        )
    say()
    breakdown = stop_and_copy(results)
    return {"summary": sums, "targets": targets, "stop_and_copy": breakdown}


def stop_and_copy(results: dict[str, list[Run]]) -> dict[str, Any]:
    """vmipc's downtime in two parts: the last dirty round, whose size the pre-copy policy
    picks (since it settles, well under 1 MiB here in every mode; before, whatever the
    bandwidth it measured left, 0 to ~17 MiB), and the rest (pause, state, flush, lease,
    resume), which is the same work in every run."""
    rows = []
    parts: dict[str, Any] = {}
    for config, runs in results.items():
        if not config.startswith("vmipc") or not runs:
            continue
        finals = [r.detail["round_details"][-1] for r in runs if r.downtime_s is not None]
        rest = [
            r.downtime_s - f["seconds"]
            for r, f in zip(runs, finals, strict=False)
            if r.downtime_s is not None
        ]
        per_mib = [f["seconds"] / (f["bytes"] / (1 << 20)) for f in finals if f["bytes"] >= 1 << 20]
        parts[config] = {
            "final_bytes": med([float(f["bytes"]) for f in finals]),
            "final_s": med([f["seconds"] for f in finals]),
            "final_s_per_mib": med(per_mib),
            "rest_s": med(rest),
        }
    plain = parts.get("vmipc plain (--insecure)", {})
    for config, p in parts.items():
        rows.append(
            [
                config,
                "—" if p["final_bytes"] is None else f"{p['final_bytes'] / (1 << 20):.1f} MiB",
                fmt_ms(p["final_s"]),
                "—" if p["final_s_per_mib"] is None else f"{p['final_s_per_mib'] * 1e3:.1f} ms",
                ratio(p["final_s_per_mib"], plain.get("final_s_per_mib")),
                "—" if p["rest_s"] is None else f"{p['rest_s'] * 1e3:.1f} ms",
                ratio(p["rest_s"], plain.get("rest_s")),
            ]
        )
    say("### vmipc's downtime in parts (medians)")
    say()
    say(
        table(
            [
                "configuration",
                "last dirty round",
                "its time",
                "per MiB (rounds ≥ 1 MiB)",
                "÷ plain",
                "rest of the downtime",
                "÷ plain",
            ],
            rows,
        )
    )
    say()
    return parts


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _verdict(value: float | None, limit: float) -> str:
    return "not measured" if value is None else ("met" if value <= limit else "missed")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 migrations of each kind")
    parser.add_argument("--json", metavar="FILE", help="also write every run here")
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU baselines")
    parser.add_argument(
        "--count",
        type=int,
        metavar="N",
        help=(
            "migrations of each kind (default 5, --quick 2): on a shared machine the "
            "downtime ratio moves with the load, so take 15 or more to rely on it"
        ),
    )
    args = parser.parse_args(argv)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("bench_tls: /dev/kvm is not usable here; nothing to measure", file=sys.stderr)
        return 1
    # a SIGTERM ends the run through the finally clauses, which kill every child
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    began = time.monotonic()
    count = args.count or (2 if args.quick else 5)
    notes: list[str] = []
    failures: list[str] = []
    qemu = qemu_or_note(args.no_qemu, notes, "QEMU rows", progress=progress)
    tree, version = f"vmipc at {describe_tree()}", qemu_version(qemu)
    say_banner("vmipc TLS migration benchmark", args.quick, tree, version)
    kids = Children()
    tmp = Path(tempfile.mkdtemp(prefix="vmipc-bench-tls-"))
    output: dict[str, Any] = {"quick": args.quick}
    try:
        pki = tmp / "pki"
        make_pki(pki)
        token = tmp / "token"
        token.write_text(secrets.token_urlsafe(32) + "\n")
        token.chmod(0o600)
        results = migrate_vmipc(kids, tmp, vmipc_modes(pki, token), count, notes)
        if qemu is not None:
            try:
                results.update(migrate_qemu(kids, qemu, tmp, pki, count, notes, failures))
            except QemuFailed as exc:
                notes.append(f"QEMU rows skipped: {exc}")
        output.update(report(results, count))
        output["runs"] = {config: [asdict(r) for r in runs] for config, runs in results.items()}
    finally:
        kids.kill_all()
        shutil.rmtree(tmp, ignore_errors=True)
    note_repeated(failures, notes)
    output["notes"] = notes
    output["elapsed_s"] = time.monotonic() - began
    say_notes(notes)
    say(f"Total benchmark time: {output['elapsed_s']:.0f} s")
    write_json(args.json, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
