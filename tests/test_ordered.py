"""Ordered request chains and server timings (protocol 1.8), on real KVM: the VMM runs as
a subprocess with the built-in guest. A chain runs in order; a failure in the middle
stops it there and leaves the machine as documented; a chained request of a closed
connection never runs; the per-connection limits hold for waiting requests."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.control_support import RawConnection
from tests.seq_support import VmmProcess, vmipc, vmm_processes, wait_for
from vmipc.client import (
    Call,
    CommandError,
    Reply,
    ServerTiming,
    SyncClient,
    open_client,
    server_timing,
)
from vmipc.client._generated import SCHEMA_VERSION
from vmipc.protocol import Error, Event, Result

pytestmark = pytest.mark.kvm


@contextlib.contextmanager
def guest() -> Iterator[VmmProcess]:
    with vmm_processes() as vmms:
        vmm = vmms.guest()
        vmm.wait_for_passes(1)
        yield vmm


def raw(vmm: VmmProcess, *, minor: int | None = 8) -> RawConnection:
    conn = RawConnection(vmm.socket, timeout=20)
    args: dict[str, object] = {"versions": [1]}
    if minor is not None:
        args["minor"] = minor
    rid = conn.request("hello", args=args)
    reply = conn.reply(rid)
    assert isinstance(reply, Result), reply
    return conn


def unread_pipe() -> tuple[int, int]:
    """A pipe nobody reads yet: a dump into it blocks once its buffer is full."""
    r, w = os.pipe()
    return r, w


def drain(fd: int) -> int:
    """Read ``fd`` to its end; the bytes read."""
    total = 0
    while chunk := os.read(fd, 1 << 20):
        total += len(chunk)
    return total


def test_a_chain_runs_in_order_and_every_reply_says_what_it_took() -> None:
    with guest() as vmm, SyncClient(vmm.socket, timeout=20) as client:
        assert client.protocol_version == SCHEMA_VERSION and client.supports_ordered
        seen: list[tuple[str, ServerTiming]] = []
        remove = client.add_reply_observer(lambda command, took: seen.append((command, took)))
        r, w = os.pipe()
        try:
            results = client.call_ordered(
                [
                    Call("pause", lease=10),
                    Call("dump-state", fds={"out": w}),
                    Call("release-lease"),
                    Call("query-status"),
                ]
            )
            os.close(w)
            w = -1
            assert drain(r) == results[1]["bytes"] > 0
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
        # dump-state needs a paused machine; query-status saw the lease released: in order
        status = results[3]
        assert status["state"] == "paused" and status["lease"] is None
        for result in results:
            assert isinstance(result, Reply)
            assert isinstance(result.server, ServerTiming)
            assert result.server.queued >= 0 and result.server.ran >= 0
        assert server_timing(results[1]) is results[1].server
        assert [c for c, _ in seen] == ["pause", "dump-state", "release-lease", "query-status"]
        remove()
        client.resume()
        assert seen[-1][0] == "query-status"  # removed: the resume was not observed
        assert vmm.state() == "running"


def test_a_failure_in_the_middle_stops_the_chain_and_leaves_the_lease_as_documented() -> None:
    """pause (lease) succeeds, dump-state into a pipe whose reader is gone fails, and
    release-lease is answered chain-broken without running: the lease still holds, so the
    machine stays paused while the connection lives and resumes when it closes. The fds
    of the requests that did not run are closed."""
    with guest() as vmm:
        conn = raw(vmm)
        dead_r, dead_w = os.pipe()
        os.close(dead_r)  # dump-state into it fails: its reader is gone
        later_r, later_w = os.pipe()
        try:
            ids = [
                conn.request("pause", args={"lease": 30}, chain=7),
                conn.request("dump-state", attach=[dead_w], fds=["out"], chain=7),
                conn.request("release-lease", chain=7),
                conn.request("dump-memory", attach=[later_w], fds=["out"], chain=7),
            ]
            os.close(dead_w)
            os.close(later_w)
            pause = conn.reply(ids[0])
            assert isinstance(pause, Result)
            failed = conn.error(ids[1])
            assert failed.error.code in ("invalid-fds", "peer-closed"), failed
            for rid in ids[2:]:
                broken = conn.error(rid)
                assert broken.error.code == "chain-broken", broken
                assert broken.error.details["chain"] == 7
                assert broken.error.details["failed"] == {
                    "id": ids[1],
                    "command": "dump-state",
                    "code": failed.error.code,
                }
            # dump-memory never ran and its fd was closed: the pipe ends, empty
            assert drain(later_r) == 0
            # release-lease did not run: this connection still holds the lease
            status = conn.result(conn.request("query-status"))
            assert status["state"] == "paused"
            assert status["lease"] is not None
            # a broken chain stays broken for later requests
            late = conn.error(conn.request("query-status", chain=7))
            assert late.error.code == "chain-broken"
            # another chain is not affected
            assert conn.result(conn.request("query-status", chain=8))["state"] == "paused"
        finally:
            os.close(later_r)
            conn.close()
        # the lease's holder closed: the VMM resumes the guest by itself
        wait_for(lambda: vmm.state() == "running", timeout=15, what="the lease's resume")


def test_a_chained_request_of_a_closed_connection_never_runs() -> None:
    """dump-memory into a pipe nobody reads blocks; pause waits behind it in the chain.
    The connection closes: dump-memory is cancelled and the pause never runs."""
    with guest() as vmm, SyncClient(vmm.socket, timeout=20, events=["state-change"]) as watch:
        conn = raw(vmm)
        r, w = unread_pipe()
        try:
            conn.request("dump-memory", attach=[w], fds=["out"], chain=1)
            conn.request("pause", chain=1)
            os.close(w)
            w = -1
            os.read(r, 4096)  # the dump has begun
            conn.close()
            drain(r)  # the server closed its copy: the dump was cancelled
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
        time.sleep(0.5)  # room for a wrongly run pause (not a timing assertion)
        assert vmm.state() == "running"
        assert watch.query_status()["state"] == "running"
        with contextlib.suppress(TimeoutError):
            watch._sock.settimeout(0.2)
            event = watch.next_event()
            pytest.fail(f"the machine changed state: {event}")


def test_limits_hold_for_waiting_requests_and_a_refusal_breaks_the_chain_after_it() -> None:
    """40 chained requests behind a blocked dump: those past max_in_flight (32) are
    refused at once with limit-exceeded, and the chain stops at the first of them; the
    ones before it run once the dump ends."""
    with guest() as vmm:
        conn = raw(vmm)
        limit = 32
        r, w = unread_pipe()
        try:
            ids = [conn.request("dump-memory", attach=[w], fds=["out"], chain=3)]
            os.close(w)
            w = -1
            ids += [conn.request("query-status", chain=3) for _ in range(39)]
            refused = [conn.error(rid) for rid in ids[limit:]]
            assert {e.error.code for e in refused} == {"limit-exceeded"}
            assert drain(r) > 0
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
        assert isinstance(conn.reply(ids[0]), Result)
        for rid in ids[1:limit]:
            assert conn.result(rid)["state"] == "running"
        late = conn.error(conn.request("query-status", chain=3))
        assert late.error.code == "chain-broken"
        assert late.error.details["failed"]["id"] == ids[limit]
        assert late.error.details["failed"]["code"] == "limit-exceeded"
        conn.close()


def test_a_cancelled_waiting_request_breaks_its_chain() -> None:
    with guest() as vmm:
        conn = raw(vmm)
        r, w = unread_pipe()
        try:
            first = conn.request("dump-memory", attach=[w], fds=["out"], chain=5)
            os.close(w)
            w = -1
            waiting = conn.request("pause", chain=5)
            after = conn.request("pause", chain=5)
            assert conn.result(conn.request("cancel", args={"request": waiting})) == {
                "cancelled": True
            }
            assert conn.error(waiting).error.code == "cancelled"
            drain(r)
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
        assert isinstance(conn.reply(first), Result)
        broken = conn.error(after)
        assert broken.error.code == "chain-broken"
        assert broken.error.details["failed"]["id"] == waiting
        assert vmm.state() == "running"
        conn.close()


def test_an_older_client_gets_the_envelope_it_knows() -> None:
    """A client that names no minor (every client before 1.8) never sees ``took`` and may
    not send ``chain``; one that names 8 gets ``took`` on every reply."""
    with guest() as vmm:
        old = raw(vmm, minor=None)
        rid = old.request("query-status")
        reply = old.reply(rid)
        assert isinstance(reply, Result) and reply.took is None
        refused = old.error(old.request("query-status", chain=1))
        assert refused.error.code == "invalid-message"
        assert refused.took is None
        old.close()
        new = raw(vmm)
        reply = new.reply(new.request("query-status"))
        assert isinstance(reply, Result) and isinstance(reply.took, ServerTiming)
        error = new.reply(new.request("resume"))
        assert isinstance(error, Error) and error.error.code == "invalid-state"
        assert isinstance(error.took, ServerTiming)
        new.close()


def test_the_async_client_sends_a_whole_chain_before_awaiting() -> None:
    async def main(path: str) -> None:
        async with open_client(path) as client:
            seen: list[str] = []
            client.add_reply_observer(lambda command, took: seen.append(command))
            r, w = os.pipe()
            try:
                handles = await client.send_ordered(
                    [
                        Call("pause", lease=10),
                        Call("dump-state", fds={"out": w}),
                        Call("resume"),
                        Call("resume"),  # fails: running again
                        Call("query-status"),
                    ]
                )
                os.close(w)
                w = -1
                assert [h.command for h in handles][:2] == ["pause", "dump-state"]
                await handles[0].result()
                state = await handles[1].result()
                assert drain(r) == state["bytes"]
                await handles[2].result()
                with pytest.raises(CommandError) as failed:
                    await handles[3].result()
                assert failed.value.code == "invalid-state"
                assert isinstance(failed.value.server, ServerTiming)
                with pytest.raises(CommandError) as broken:
                    await handles[4].result()
                assert broken.value.code == "chain-broken"
            finally:
                os.close(r)
                if w >= 0:
                    os.close(w)
            assert seen == ["pause", "dump-state", "resume", "resume", "query-status"]
            with pytest.raises(CommandError) as info:
                await client.call_ordered([Call("resume"), Call("query-status")])
            assert info.value.code == "invalid-state"

    with guest() as vmm:
        trio.run(main, vmm.socket)
        assert vmm.state() == "running"


def test_events_are_not_mistaken_for_replies() -> None:
    """A chained request's reply and the events it causes may come in any order."""
    with guest() as vmm:
        conn = raw(vmm)
        conn.result(conn.request("subscribe", args={"events": ["state-change"]}))
        ids = [conn.request("pause", chain=2), conn.request("resume", chain=2)]
        for rid in ids:
            assert isinstance(conn.reply(rid), Result)
        kinds = {conn.event().data["new"] for _ in range(2)}
        assert kinds == {"paused", "running"}
        assert not any(isinstance(m, Event) and m.event != "state-change" for m in [])
        conn.close()


def test_vmipc_call_sends_commands_separated_by_double_dashes_as_one_chain(
    tmp_path: Path,
) -> None:
    with guest() as vmm:
        state = tmp_path / "state.bin"
        done = vmipc(
            "call",
            "--socket",
            vmm.socket,
            "pause",
            "lease=5",
            "--",
            "dump-state",
            "--fd",
            f"out={state}",
            "--",
            "release-lease",
            "--",
            "query-status",
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("pause:\ndump-state:\n  bytes: ")
        assert "release-lease:\nquery-status:\n  state: paused\n" in done.stdout
        assert state.stat().st_size > 0
        # the lease was released: closing the connection left the guest paused
        assert vmm.state() == "paused"
        done = vmipc(
            "call", "--socket", vmm.socket, "--json", "pause", "--", "resume", "--", "resume"
        )
        assert done.returncode == 1
        replies = json.loads(done.stdout)
        assert [r["command"] for r in replies] == ["pause", "resume", "resume"]
        assert replies[0]["error"]["code"] == "invalid-state"
        assert replies[1]["error"]["code"] == "chain-broken"
        assert replies[2]["error"]["details"]["failed"]["command"] == "pause"
        assert "resume: chain-broken" in done.stderr
        assert vmm.state() == "paused"
        bad = vmipc("call", "--socket", vmm.socket, "resume", "--", "no-such-command")
        assert bad.returncode == 2 and "no-such-command" in bad.stderr
        assert vmm.state() == "paused"  # refused before anything was sent
        assert vmipc("call", "--socket", vmm.socket, "resume").returncode == 0
