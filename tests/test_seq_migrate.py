"""Live migration between two VMMs on this host, on real KVM with the built-in guest: the
console continues exactly; a guest that dirties memory fast converges or gives up per the
policy; faults at every step leave exactly one VM running."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.seq_support import (
    VCPUS,
    VmmProcess,
    check_continuation,
    check_structure,
    running_count,
    vmipc,
    vmm_processes,
    wait_for,
)
from vmipc.client import SyncClient, open_client
from vmipc.protocol import CommandError
from vmipc.sequences import (
    MigrationPolicy,
    SequenceError,
    migrate,
)
from vmipc.sequences._migrate import LocalDestination

pytestmark = pytest.mark.kvm

BIG_WS = 8 << 20
#: pages per second per vCPU: more than dirty tracking lets a guest write on this host
#: (~110-140 MiB/s, see KVM-FACTS.md), yet slow enough to check its output with the model
FAST_RATE = 20000


def migrate_cli(src: VmmProcess, dst: VmmProcess, *extra: str) -> tuple[int, dict]:
    done = vmipc("migrate", "--socket", src.socket, "--to", dst.socket, "--json", *extra)
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def assert_moved(src: VmmProcess, dst: VmmProcess, ws: int | None) -> None:
    """The source quit; the destination runs the guest on exactly (``ws`` None: a guest
    too fast for the model; its pass lines are checked for gaps and repeats)."""
    assert src.wait_exit() == 0
    assert dst.state() == "running"
    dst.wait_for_passes(max(src.passes().values()) + 2)
    with dst.client() as client:
        client.pause()
    if ws is None:
        check_structure(src.text() + dst.text())
    else:
        check_continuation(src.text(), dst.text(), ws)


def assert_stayed(src: VmmProcess, dst: VmmProcess, ws: int | None) -> None:
    """The source runs on exactly; the destination is gone."""
    assert src.state() == "running"
    dst.wait_exit()
    src.wait_for_passes(max(src.passes().values()) + 2)
    if ws is None:
        check_structure(src.text())
    else:
        check_continuation(src.text(), "", ws)
    assert dst.text() == ""


def test_migrate_moves_the_running_guest_and_reports(tmp_path: Path) -> None:
    with vmm_processes() as vmms:
        src = vmms.guest()
        dst = vmms.incoming()
        src.wait_for_passes(2)
        code, report = migrate_cli(src, dst)
        assert code == 0
        assert report["outcome"] == "migrated" and report["converged"]
        assert report["source"] == "quit" and report["destination"] == "running"
        assert 0 < report["downtime_s"] < report["total_s"]
        assert report["rounds"] == len(report["round_details"]) - 1
        assert report["round_details"][0]["kind"] == "full"
        assert report["round_details"][-1]["kind"] == "final"
        assert report["bytes"] == sum(r["bytes"] for r in report["round_details"])
        assert report["state_bytes"] > 0
        assert_moved(src, dst, 256 << 10)


def test_migrate_into_an_incoming_vmm_without_a_shape_sends_the_sources() -> None:
    """`vmm --incoming` without --memory/--vcpus: migrate sends the source's shape
    (`configure`), as Cloud Hypervisor's receive-migration takes its config from the
    source. Before, it refused: "the destination has no machine yet"."""
    with vmm_processes() as vmms:
        src = vmms.guest()
        dst = vmms.incoming(memory=None)
        src.wait_for_passes(2)
        code, report = migrate_cli(src, dst)
        assert code == 0, report
        assert report["outcome"] == "migrated"
        assert_moved(src, dst, 256 << 10)


def test_configure_refuses_another_shape_and_what_it_cannot_build() -> None:
    with vmm_processes() as vmms:
        dst = vmms.incoming()
        with dst.client() as client:
            same = client.configure(memory_size=64 << 20, vcpus=VCPUS)
            assert same == {"memory_size": 64 << 20, "vcpus": VCPUS}
            for memory_size, vcpus in ((128 << 20, VCPUS), (64 << 20, VCPUS + 1)):
                with pytest.raises(CommandError) as refused:
                    client.configure(memory_size=memory_size, vcpus=vcpus)
                assert refused.value.code == "invalid-arguments"
                assert "does not fit" in refused.value.message
        bare = vmms.incoming("bare", memory=None)
        with bare.client() as client:
            for memory_size, vcpus in (((64 << 20) + 100, 1), (64 << 20, 65), (4096, 1)):
                with pytest.raises(CommandError) as refused:
                    client.configure(memory_size=memory_size, vcpus=vcpus)
                assert refused.value.code == "invalid-arguments"
            assert client.query_status()["memory_size"] == 0


def test_a_guest_dirtying_fast_converges_or_gives_up_cleanly() -> None:
    with vmm_processes() as vmms:
        src = vmms.guest(ws=BIG_WS, rate=0)  # as fast as it can: too fast for the model
        dst = vmms.incoming()
        src.wait_for_passes(2)
        # the default policy: either outcome is allowed, but it must be a clean one
        code, report = migrate_cli(src, dst)
        if report["outcome"] == "migrated":
            assert code == 0
            assert_moved(src, dst, None)
            return
        assert code == 1 and report["outcome"] == "gave-up"
        assert report["destination"] == "the destination was discarded"
        assert_stayed(src, dst, None)


def test_a_migration_that_cannot_converge_gives_up_then_force_moves_it() -> None:
    with vmm_processes() as vmms:
        src = vmms.guest(ws=BIG_WS, rate=FAST_RATE)
        dst = vmms.incoming()
        src.wait_for_passes(2)
        code, report = migrate_cli(src, dst, "--max-downtime", "0.001", "--max-rounds", "3")
        assert code == 1 and report["outcome"] == "gave-up" and report["downtime_s"] is None
        assert 1 <= report["rounds"] <= 3
        assert_stayed(src, dst, BIG_WS)

        again = vmms.incoming("dst2")
        code, report = migrate_cli(
            src, again, "--max-downtime", "0.001", "--max-rounds", "3", "--force"
        )
        assert code == 0 and report["outcome"] == "migrated" and report["forced"]
        assert report["round_details"][-1]["kind"] == "final"
        assert_moved(src, again, BIG_WS)


#: pages per second per vCPU for a guest that pre-copy catches up with: ~80 MiB/s in all,
#: a fraction of the rate a round sends at, so each round leaves a fraction of the last
SETTLING_RATE = 10000
#: and a working set big enough that what it dirties during the full pass takes several
#: times the settling floor (1 ms) to send, however fast this machine's rounds are (with
#: 8 MiB a vCPU in 64 MiB, a fast full pass left ~1 ms: no settling round, now and then)
SETTLING_WS = 32 << 20


def test_a_converged_migration_settles_on_a_smaller_last_round() -> None:
    """Once the predicted downtime meets the target, pre-copy goes on with dirty rounds
    while each is expected to halve what is dirty (``settle``, on by default): a guest
    dirtying a few MiB per full pass gets at least one such round, its report counts
    them, and it continues exactly. ``--no-settle`` stops as soon as it converges."""
    with vmm_processes() as vmms:
        src = vmms.guest(ws=SETTLING_WS, rate=SETTLING_RATE, memory="256M")
        dst = vmms.incoming(memory="256M")
        src.wait_for_passes(2)
        code, report = migrate_cli(src, dst)
        assert code == 0 and report["outcome"] == "migrated" and report["converged"], report
        kinds = [r["kind"] for r in report["round_details"]]
        assert kinds == ["full"] + ["dirty"] * (report["rounds"] - 1) + ["final"]
        assert 1 <= report["settle_rounds"] <= report["rounds"] - 1, (
            report["settled"],
            report["round_details"],
        )
        assert_moved(src, dst, SETTLING_WS)

        src = vmms.guest("src2", ws=SETTLING_WS, rate=SETTLING_RATE, memory="256M")
        dst = vmms.incoming("dst2", memory="256M")
        src.wait_for_passes(2)
        code, report = migrate_cli(src, dst, "--no-settle")
        assert code == 0 and report["outcome"] == "migrated" and report["converged"], report
        assert report["settle_rounds"] == 0
        assert_moved(src, dst, SETTLING_WS)


def test_a_destination_that_is_not_incoming_is_left_alone() -> None:
    with vmm_processes() as vmms:
        src = vmms.guest()
        other = vmms.guest("other")
        src.wait_for_passes(1)
        done = vmipc("migrate", "--socket", src.socket, "--to", other.socket)
        assert done.returncode == 1
        assert "prepare" in done.stderr and "not incoming" in done.stderr
        assert src.state() == "running" and other.state() == "running"


# --- faults --------------------------------------------------------------------------------


class Relay:
    """A channel for the transfers that copies through this process, to break the stream:
    ``cut`` closes the n-th transfer after some bytes, ``corrupt`` flips a byte in it."""

    def __init__(self, transfer: int, mode: str, at: int = 200_000) -> None:
        self.transfer = transfer
        self.mode = mode
        self.at = at
        self.count = 0
        self.threads: list[threading.Thread] = []

    def __call__(self) -> tuple[int, int, Callable[[], None]]:
        src_end, relay_in = socket.socketpair()
        relay_out, dst_end = socket.socketpair()
        broken = self.count == self.transfer
        self.count += 1

        def copy() -> None:
            seen = 0
            done = not broken
            try:
                while data := relay_in.recv(1 << 16):
                    if not done and seen + len(data) > self.at:
                        done = True
                        cut = self.at - seen
                        if self.mode == "cut":
                            relay_out.sendall(data[:cut])
                            break
                        data = data[:cut] + bytes([data[cut] ^ 0x55]) + data[cut + 1 :]
                    seen += len(data)
                    relay_out.sendall(data)
            except OSError:
                pass
            relay_out.shutdown(socket.SHUT_RDWR)
            relay_in.shutdown(socket.SHUT_RDWR)

        thread = threading.Thread(target=copy, daemon=True)
        thread.start()
        self.threads.append(thread)

        def close() -> None:
            for s in (src_end, dst_end):
                s.close()
            thread.join(10)
            relay_in.close()
            relay_out.close()

        return src_end.fileno(), dst_end.fileno(), close


async def migrate_with(
    src: VmmProcess,
    dst: VmmProcess,
    *,
    channel: object = None,
    on_step: object = None,
    **policy: object,
) -> object:
    """Migrate with a policy of ``policy`` (a timeout of 15 s unless given)."""
    async with open_client(src.socket) as s, open_client(dst.socket) as d:
        dest = LocalDestination(d, dst.socket, *([channel] if channel else []))  # type: ignore[list-item]
        policy.setdefault("timeout", 15.0)
        return await migrate(
            s,
            dest,
            policy=MigrationPolicy(**policy),  # type: ignore[arg-type]
            on_step=on_step,  # type: ignore[arg-type]
        )


@pytest.mark.parametrize(
    ("transfer", "mode"),
    [(0, "cut"), (0, "corrupt"), (1, "corrupt"), (1, "cut")],
    ids=["full-pass-cut", "full-pass-corrupt", "later-round-corrupt", "later-round-cut"],
)
def test_a_broken_stream_resumes_the_source_and_discards_the_destination(
    transfer: int, mode: str
) -> None:
    with vmm_processes() as vmms:
        src = vmms.guest(ws=2 << 20)
        dst = vmms.incoming()
        src.wait_for_passes(2)
        # max_downtime 0 keeps it in pre-copy rounds; transfer 1 is the first dirty round
        # (or, if it converges at once, the final one with the source paused)
        relay = Relay(transfer, mode, at=5000 if transfer else 200_000)
        with pytest.raises(SequenceError) as info:
            trio.run(lambda: migrate_with(src, dst, channel=relay, max_downtime=0.0, force=True))
        assert "runs" in info.value.outcome and "discarded" in info.value.outcome, info.value
        assert "bad-stream" in str(info.value) or "peer-closed" in str(info.value)
        assert_stayed(src, dst, 2 << 20)


STEPS = ["dirty-log-start", "full pass", "dirty round", "pause", "last dirty round", "state"]


@pytest.mark.parametrize("step", STEPS)
def test_the_destination_killed_at_a_step_leaves_the_source_running(step: str) -> None:
    with vmm_processes() as vmms:
        src = vmms.guest()
        dst = vmms.incoming()
        src.wait_for_passes(2)

        def kill(at: str) -> None:
            if at == step:
                dst.kill()

        with pytest.raises(SequenceError) as info:
            trio.run(
                lambda: migrate_with(
                    src, dst, on_step=kill, max_downtime=0.0, max_rounds=1, force=True
                )
            )
        assert "runs" in info.value.outcome, info.value
        assert running_count(src, dst) == 1
        assert_stayed(src, dst, 256 << 10)


def test_the_source_killed_after_the_state_went_over_leaves_the_destination_running() -> None:
    with vmm_processes() as vmms:
        src = vmms.guest()
        dst = vmms.incoming()
        src.wait_for_passes(2)

        def kill(at: str) -> None:
            if at == "resume the destination":
                src.kill()

        report = trio.run(lambda: migrate_with(src, dst, on_step=kill))
        assert report.destination == "running"  # type: ignore[attr-defined]
        assert "quit failed" in report.source  # type: ignore[attr-defined]
        assert running_count(src, dst) == 1
        dst.wait_for_passes(max(src.passes().values()) + 2)
        with dst.client() as client:
            client.pause()
        check_continuation(src.text(), dst.text())


KILL_CLIENT = """
import os, signal, sys, trio
from vmipc.sequences import MigrationPolicy, migrate_local
step = sys.argv[3]
def hook(at):
    if at == step:
        os.kill(os.getpid(), signal.SIGKILL)
policy = MigrationPolicy(max_downtime=0.0, max_rounds=1, force=True)
trio.run(lambda: migrate_local(sys.argv[1], sys.argv[2], on_step=hook, policy=policy))
"""


@pytest.mark.parametrize("step", ["full pass", "dirty round", "pause"])
def test_the_migrating_client_killed_at_a_step_leaves_one_vm_running(step: str) -> None:
    import subprocess

    with vmm_processes() as vmms:
        src = vmms.guest()
        dst = vmms.incoming()
        src.wait_for_passes(2)
        proc = subprocess.run(
            [sys.executable, "-c", KILL_CLIENT, src.socket, dst.socket, step], timeout=30
        )
        assert proc.returncode == -9
        assert src.state() == "running"
        assert dst.state() == "incoming"  # never resumed: a VMM to discard, not a VM
        assert running_count(src, dst) == 1
        src.wait_for_passes(max(src.passes().values()) + 2)
        check_continuation(src.text(), "")
        assert os.path.exists(dst.socket)


@pytest.mark.parametrize("confirm", ["hangs", "refused"])
def test_a_late_resume_reply_never_runs_two_vms(
    confirm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The destination's `resume` reply is late (its VMM is stopped at the switch-over),
    and asking again on a fresh connection cannot confirm anything: that connection hangs,
    or is refused because the destination's connection table is full. "Cannot confirm" is
    not "gone": the source stays paused, and once the destination wakes up and runs the
    resume it was sent, exactly one VM runs. (It used to resume the source: two ran.)"""
    import signal as signals

    from vmipc.sequences import _migrate

    monkeypatch.setattr(_migrate, "RESUME_TIMEOUT", 1.0)
    with vmm_processes() as vmms:
        src = vmms.guest()
        dst = vmms.incoming()
        src.wait_for_passes(2)
        crowd: list[SyncClient] = []
        if confirm == "refused":  # fill the destination's connection table first
            for _ in range(127):  # the migration holds one of its 128
                crowd.append(dst.client(20))

        def stop(at: str) -> None:
            if at == "resume the destination":
                os.kill(dst.pid, signals.SIGSTOP)

        try:
            with pytest.raises(SequenceError) as info:
                trio.run(lambda: migrate_with(src, dst, on_step=stop))
            assert "unknown" in info.value.outcome, info.value
            assert src.state() == "paused"
        finally:
            os.kill(dst.pid, signals.SIGCONT)
            for client in crowd:
                client.close()
        wait_for(lambda: dst.state() == "running", timeout=20, what="the late resume")
        assert running_count(src, dst) == 1
        assert src.state() == "paused"


def test_a_vmm_that_cannot_be_reached_is_named_with_its_side(tmp_path: Path) -> None:
    with vmm_processes() as vmms:
        src = vmms.guest()
        nowhere = str(tmp_path / "nowhere.sock")
        done = vmipc("migrate", "--socket", src.socket, "--to", nowhere)
        assert done.returncode == 3
        assert f"cannot reach the destination VMM at {nowhere}: No such file" in done.stderr
        done = vmipc("migrate", "--socket", nowhere, "--to", src.socket)
        assert f"cannot reach the source VMM at {nowhere}: No such file" in done.stderr
        assert src.state() == "running"


def test_a_dump_state_failing_inside_the_ordered_stop_and_copy_leaves_the_source_running() -> None:
    """Both VMMs speak 1.8, so the stop-and-copy goes as two ordered chains. The source's
    dump-state gets an fd it cannot write (a pipe's read end): it fails, the source's
    chain stops there, the client stops waiting for the destination's load-state (which
    cancels it), the source is resumed and the destination discarded: one VM runs, the
    source, exactly continued."""
    made: list[int] = []
    armed = {"on": False}

    def channel() -> tuple[int, int, Callable[[], None]]:
        if armed["on"] and made:  # the stop-and-copy's second channel: the state's
            r, w = os.pipe()
            made.append(r)

            def close() -> None:
                for fd in (r, w):
                    with contextlib.suppress(OSError):
                        os.close(fd)

            return r, r, close  # dump-state gets a read end: not writable
        left, right = socket.socketpair()
        if armed["on"]:
            made.append(left.fileno())

        def close_pair() -> None:
            left.close()
            right.close()

        return left.fileno(), right.fileno(), close_pair

    def arm(at: str) -> None:
        if at == "pause":
            armed["on"] = True

    with vmm_processes() as vmms:
        src = vmms.guest()
        dst = vmms.incoming()
        src.wait_for_passes(2)
        with SyncClient(src.socket) as a, SyncClient(dst.socket) as b:
            assert a.supports_ordered and b.supports_ordered
        with pytest.raises(SequenceError) as info:
            trio.run(
                lambda: migrate_with(
                    src,
                    dst,
                    channel=channel,
                    on_step=arm,
                    max_downtime=0.0,
                    max_rounds=1,
                    force=True,
                )
            )
        assert info.value.step == "state", info.value
        assert "invalid-fds" in str(info.value), info.value
        assert "runs" in info.value.outcome and "discarded" in info.value.outcome
        assert len(made) == 2  # the chained path made both channels at the pause
        assert running_count(src, dst) == 1
        assert_stayed(src, dst, 256 << 10)


@pytest.mark.parametrize("step", ["last dirty round", "state", "release-lease"])
def test_the_migrating_client_killed_inside_the_ordered_stop_and_copy_leaves_one_vm_running(
    step: str,
) -> None:
    """The chains were sent; the client dies while waiting for their replies: the source's
    lease holder is gone, so its VMM resumes it (release-lease is never chained); the
    destination, incoming or paused with the state loaded, never runs."""
    import subprocess

    with vmm_processes() as vmms:
        src = vmms.guest()
        dst = vmms.incoming()
        src.wait_for_passes(2)
        proc = subprocess.run(
            [sys.executable, "-c", KILL_CLIENT, src.socket, dst.socket, step], timeout=30
        )
        assert proc.returncode == -9
        wait_for(lambda: src.state() == "running", timeout=15, what="the source resuming")
        assert dst.state() in ("incoming", "paused")
        assert running_count(src, dst) == 1
        src.wait_for_passes(max(src.passes().values()) + 2)
        check_continuation(src.text(), "")


# --- page streams without a hash of their pages (protocol 1.10) ----------------------------


def record_calls(client: Any, seen: list[tuple[str, dict[str, Any]]]) -> None:
    """Note every request ``client`` sends, chained or not: (command, its arguments)."""
    call, send_ordered = client.call, client.send_ordered

    async def recording_call(command: str, /, **kwargs: Any) -> Any:
        seen.append((command, {k: v for k, v in kwargs.items() if k not in ("fds", "on_progress")}))
        return await call(command, **kwargs)

    async def recording_send(calls: Any) -> Any:
        seen.extend((c.command, dict(c.args)) for c in calls)
        return await send_ordered(calls)

    client.call = recording_call
    client.send_ordered = recording_send


async def migrate_recorded(
    src: VmmProcess, dst: VmmProcess, *, dest_minor: int | None = None, channel: Any = None
) -> tuple[Any, list[tuple[str, dict[str, Any]]], list[tuple[str, dict[str, Any]]]]:
    """A migration with dirty rounds (max_downtime 0, then forced) over the client's own
    socket pairs (or ``channel``); the destination's connection speaks 1.``dest_minor``
    when given (an older VMM, as the negotiated version makes it)."""
    from vmipc.client import _async

    async with contextlib.AsyncExitStack() as stack:
        s = await stack.enter_async_context(open_client(src.socket))
        if dest_minor is None:
            d = await stack.enter_async_context(open_client(dst.socket))
        else:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(_async, "CLIENT_MINOR", dest_minor)
                d = await stack.enter_async_context(open_client(dst.socket))
            assert d.protocol_version == f"1.{dest_minor}"
        sent: list[tuple[str, dict[str, Any]]] = []
        applied: list[tuple[str, dict[str, Any]]] = []
        record_calls(s, sent)
        record_calls(d, applied)
        dest = LocalDestination(d, dst.socket, *([channel] if channel else []))
        policy = MigrationPolicy(timeout=15.0, max_downtime=0.0, max_rounds=2, force=True)
        report = await migrate(s, dest, policy=policy)
        return report, sent, applied


def test_a_migration_over_its_own_socket_pairs_sends_unhashed_streams_and_continues() -> None:
    """Both VMMs speak 1.10 and the channel is the client's own socket pair: every page
    stream goes with ``checksum: headers`` and is applied with ``accept_unhashed``, the
    full pass, the dirty rounds and the last round in the ordered stop-and-copy; the
    guest continues exactly."""
    with vmm_processes() as vmms:
        src = vmms.guest(ws=2 << 20)
        dst = vmms.incoming()
        src.wait_for_passes(2)
        report, sent, applied = trio.run(lambda: migrate_recorded(src, dst))
        assert report.outcome == "migrated"
        dumps = [args for command, args in sent if command in ("dump-memory", "dump-dirty")]
        applies = [args for command, args in applied if command == "apply-pages"]
        assert len(dumps) == len(applies) == len(report.round_details) >= 3
        assert all(args.get("checksum") == "headers" for args in dumps), dumps
        assert all(args.get("accept_unhashed") is True for args in applies), applies
        assert_moved(src, dst, 2 << 20)


@pytest.mark.parametrize("other", ["older destination", "caller's channel"])
def test_an_older_destination_or_another_channel_keeps_full_checksums(other: str) -> None:
    """A destination whose connection speaks 1.9 (it knows no ``accept_unhashed``), or a
    channel the caller gave (a relay, anything: not this client's own socket pair), gets
    hashed streams only, and the migration still continues the guest exactly."""
    with vmm_processes() as vmms:
        src = vmms.guest(ws=2 << 20)
        dst = vmms.incoming()
        src.wait_for_passes(2)
        if other == "older destination":
            run = functools.partial(migrate_recorded, src, dst, dest_minor=9)
        else:
            relay = Relay(-1, "cut")  # copies every transfer through this process intact
            run = functools.partial(migrate_recorded, src, dst, channel=relay)
        report, sent, applied = trio.run(run)
        assert report.outcome == "migrated"
        dumps = [args for command, args in sent if command in ("dump-memory", "dump-dirty")]
        applies = [args for command, args in applied if command == "apply-pages"]
        assert len(dumps) == len(applies) >= 3
        assert not any("checksum" in args for args in dumps), dumps
        assert not any("accept_unhashed" in args for args in applies), applies
        assert_moved(src, dst, 2 << 20)
