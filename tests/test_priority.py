"""Who goes first (protocol 1.4): a connection holding the pause lease or a priority claim
has its requests served before everyone else's; the others' requests are held and let
through one at a time at the server's ``held_request_rate``, never refused, and all go
once nobody goes first. ``hello`` and ``cancel`` are never held.

The admission rule is checked in trio's virtual time (MockClock), so the rate is asserted
exactly without a wall-clock timing; the conversations run against a live server (rate 0
makes "held until the claim ends" hold by construction); the last test migrates a real
guest on KVM and watches the claim from another client.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from tests.control_support import RecordingMachine, Served, serving
from tests.seq_support import vmipc, vmm_processes
from vmipc.client import open_client
from vmipc.protocol import Error
from vmipc.sequences import LocalDestination, MigrationNotConverged, MigrationPolicy, migrate
from vmipc.server import PauseLease, Priority, ServerConfig

# --- the admission rule, in virtual time ----------------------------------------------------


class FakeConnection:
    def __init__(self, number: int) -> None:
        self.id = number
        self.hooks: list[Callable[[], None]] = []

    def add_close_hook(self, hook: Callable[[], None]) -> Callable[[], None]:
        self.hooks.append(hook)
        return lambda: self.hooks.remove(hook)

    def close(self) -> None:
        for hook in list(self.hooks):
            hook()


def virtual(test: Callable[[], Any]) -> None:
    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0))


def test_held_requests_go_at_the_rate_in_the_order_they_came_and_all_go_when_the_claim_ends() -> (
    None
):
    async def main() -> None:
        lease = PauseLease(RecordingMachine(), trio.Lock(), lambda: False)
        priority = Priority(lease, rate=10.0)
        first, others = FakeConnection(1), [FakeConnection(n) for n in range(2, 9)]
        admitted: list[tuple[int, float]] = []

        async def ask(conn: FakeConnection, command: str = "query-status") -> None:
            await priority.admit(conn, command)
            admitted.append((conn.id, trio.current_time()))

        start = trio.current_time()
        with trio.fail_after(60):  # virtual time: a request held for good fails at once
            async with trio.open_nursery() as nursery:
                priority.claim(first)
                assert priority.status() == [1]
                for conn in others:
                    nursery.start_soon(ask, conn)
                    await trio.sleep(0.001)  # arrive in this order
                await ask(first)  # the claimant never waits
                await trio.sleep(0.35 - (trio.current_time() - start))
                assert priority.waiting == len(others) - 4
                assert priority.release(first)
                assert not priority.release(first)
        times = [round(at - start, 3) for _, at in admitted]
        assert [n for n, _ in admitted] == [2, 1, 3, 4, 5, 6, 7, 8]
        # one every 0.1 s from the first held one; at 0.35 the claim ended: the rest at once
        assert times == [0.0, 0.007, 0.1, 0.2, 0.3, 0.35, 0.35, 0.35]
        assert priority.status() == [] and priority.waiting == 0

    virtual(main)


def test_the_lease_holder_goes_first_from_its_pause_until_the_lease_ends() -> None:
    async def main() -> None:
        machine = RecordingMachine()
        lease = PauseLease(machine, trio.Lock(), lambda: False)
        priority = Priority(lease, rate=0.0)
        holder, other = FakeConnection(1), FakeConnection(2)
        assert not priority.must_wait(other, "query-status")
        with lease.taking(holder):
            assert priority.must_wait(other, "query-status")
            assert not priority.must_wait(holder, "query-status")
            machine.pause()
            lease.take(holder, 30.0)
        assert priority.status() == [1]
        for command in ("hello", "cancel"):
            assert not priority.must_wait(other, command)
        done = trio.Event()

        async def held() -> None:
            await priority.admit(other, "query-status")
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(held)
            await trio.sleep(20)  # rate 0: held however long the lease lasts
            assert not done.is_set() and priority.waiting == 1
            lease.release(holder)  # the machine stays paused, nobody goes first
            with trio.fail_after(60):
                await done.wait()
        assert priority.status() == []

    virtual(main)


def test_a_closing_claimant_stops_going_first() -> None:
    async def main() -> None:
        lease = PauseLease(RecordingMachine(), trio.Lock(), lambda: False)
        priority = Priority(lease, rate=0.0)
        claimant, other = FakeConnection(1), FakeConnection(2)
        priority.claim(claimant)
        priority.claim(claimant)  # again: nothing changes
        # virtual time: a request held for good fails the test at once instead of hanging
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(priority.admit, other, "query-status")
                await trio.sleep(1)
                assert priority.waiting == 1
                claimant.close()
        assert priority.status() == []

    virtual(main)


def test_a_negative_rate_is_refused() -> None:
    lease = PauseLease(RecordingMachine(), trio.Lock(), lambda: False)
    with pytest.raises(ValueError):
        Priority(lease, rate=-1.0)


# --- conversations with a live server --------------------------------------------------------


def held_requests(served: Served, count: int) -> None:
    """Wait until the server holds ``count`` requests back."""
    deadline = time.monotonic() + 5
    while served.thread.run_sync(lambda: served.thread.server.priority.waiting) != count:
        assert time.monotonic() < deadline, "the request was not held"
        time.sleep(0.005)


def test_a_claim_holds_other_requests_until_it_is_released() -> None:
    with serving(ServerConfig(held_request_rate=0)) as s, s.connect(hello=False) as a:
        me = a.hello()["connection"]
        with s.connect() as b:
            assert a.result(a.request("claim-priority", args={})) == {}
            status = a.result(a.request("query-status", args={}))
            assert status["first"] == [me] and status["lease"] is None
            waiting = b.request("query-status", args={})
            held_requests(s, 1)
            # the claimant's requests pass the held one
            assert a.result(a.request("query-status", args={}))["state"] == "running"
            held_requests(s, 1)
            assert a.result(a.request("release-priority", args={})) == {"released": True}
            assert b.result(waiting)["first"] == []
            assert a.result(a.request("release-priority", args={})) == {"released": False}


def test_at_the_default_rate_held_requests_are_answered_while_the_claim_lasts() -> None:
    with serving() as s, s.connect() as a, s.connect() as b:
        a.result(a.request("claim-priority", args={}))
        for _ in range(5):
            assert len(b.result(b.request("query-status", args={}))["first"]) == 1
        assert a.result(a.request("release-priority", args={})) == {"released": True}


def test_a_pause_with_a_lease_goes_first_and_query_status_shows_the_lease() -> None:
    with serving(ServerConfig(held_request_rate=0)) as s, s.connect(hello=False) as a:
        me = a.hello()["connection"]
        with s.connect() as b:
            s.machine.pause_delay = 0.3
            pausing = a.request("pause", args={"lease": 30.0})
            deadline = time.monotonic() + 5
            while "pause" not in s.machine.calls:  # the pause is under way
                assert time.monotonic() < deadline
                time.sleep(0.005)
            waiting = b.request("query-status", args={})
            held_requests(s, 1)
            assert a.result(pausing) == {}
            status = a.result(a.request("query-status", args={}))
            assert status["first"] == [me] and status["lease"]["connection"] == me
            assert 0 < status["lease"]["expires_in"] <= status["lease"]["duration"] == 30.0
            held_requests(s, 1)
            a.result(a.request("release-lease", args={}))
            status = b.result(waiting)
            assert status["state"] == "paused"
            assert status["lease"] is None and status["first"] == []


def test_hello_and_cancel_pass_and_a_closed_claimant_frees_the_held() -> None:
    with serving(ServerConfig(held_request_rate=0)) as s, s.connect() as b:
        a = s.connect()
        a.result(a.request("claim-priority", args={}))
        with s.connect() as c:  # hello is never held
            cancelled = c.request("query-status", args={})
            held_requests(s, 1)
            assert c.result(c.request("cancel", args={"request": cancelled})) == {"cancelled": True}
            reply = c.reply(cancelled)
            assert isinstance(reply, Error) and reply.error.code == "cancelled"
        waiting = b.request("query-status", args={})
        held_requests(s, 1)
        a.close()
        assert b.result(waiting)["first"] == []


# --- a real migration claims priority for its whole run ---------------------------------------


@pytest.mark.kvm
def test_a_migration_goes_first_while_it_runs_and_gives_the_claim_up_when_it_gives_up() -> None:
    with vmm_processes() as vmms:
        src = vmms.guest(ws=8 << 20, rate=20000)
        dst = vmms.incoming()
        src.wait_for_passes(1)
        seen: list[list[int]] = []
        seen_at_destination: list[list[int]] = []

        async def main() -> None:
            async with (
                open_client(src.socket, client_name="migration") as seq,
                open_client(src.socket, client_name="watcher") as watcher,
                open_client(dst.socket) as dest,
                open_client(dst.socket, client_name="watcher") as dest_watcher,
            ):
                me = seq.server_info["connection"]
                dest_me = dest.server_info["connection"]

                async def on_step(step: str) -> None:
                    if step in ("full pass", "dirty round"):
                        seen.append((await watcher.query_status())["first"])
                        seen_at_destination.append((await dest_watcher.query_status())["first"])

                with pytest.raises(MigrationNotConverged):
                    await migrate(
                        seq,
                        LocalDestination(dest, dst.socket),
                        policy=MigrationPolicy(max_downtime=0.0001, max_rounds=2),
                        on_step=on_step,
                    )
                assert seen and all(first == [me] for first in seen), seen
                # the destination's loads go first as well
                assert all(first == [dest_me] for first in seen_at_destination)
                # it gave up: the source runs on and nobody goes first any more
                status = await seq.query_status()
                assert status["state"] == "running" and status["first"] == []

        trio.run(main)


@pytest.mark.kvm
def test_the_vmm_takes_its_held_request_rate_from_the_command_line() -> None:
    bad = vmipc("vmm", "--held-request-rate", "-1", "--guest", "builtin")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "vmipc vmm: error: argument --held-request-rate: must be 0 or more (or inf), not -1"
    )
    with vmm_processes() as vmms:
        vmm = vmms._start("held", ["--guest", "builtin", "--held-request-rate", "0"], [])

        async def main() -> None:
            async with (
                open_client(vmm.socket) as first,
                open_client(vmm.socket) as other,
                trio.open_nursery() as nursery,
            ):
                await first.claim_priority()
                answers: list[dict[str, Any]] = []

                async def ask() -> None:
                    answers.append(dict(await other.query_status()))

                nursery.start_soon(ask)
                # rate 0: whatever the claimant does meanwhile, the other one waits
                for _ in range(20):
                    await first.query_status()
                    await trio.sleep(0.01)
                assert answers == []
                assert await first.release_priority() == {"released": True}
                with trio.fail_after(10):
                    while not answers:
                        await trio.sleep(0.01)
                assert answers[0]["first"] == []

        trio.run(main)
