"""Many pause/resume cycles from concurrent clients on real KVM: the pause's guarantees
hold every time (every vCPU parked: two state dumps in a row hold the same registers,
the console stands still), none deadlocks or loses a vCPU, and the guest then goes on
printing exactly its model's lines."""

from __future__ import annotations

import tempfile
import threading
import time

import pytest

from tests.builtin_guest import check_against_model
from tests.seq_support import VCPUS, WS, vmm_processes
from vmipc.client import CommandError, SyncClient
from vmipc.vmm.persist import decode_state

#: the state blob's header: magic, payload length, checksum (vmm/persist/statecodec.py)
STATE_HEADER_SIZE = 8 + 4 + 8

pytestmark = pytest.mark.kvm

CLIENTS = 4
CYCLES_EACH = 50


def vcpu_registers(client: SyncClient, directory: str) -> list[tuple[int, bytes, bytes]]:
    """dump-state: each vCPU's run state and registers (what a running vCPU changes; the
    LAPIC timer and the TSC tick on while paused, as in any VMM)."""
    with tempfile.TemporaryFile(dir=directory) as out:
        client.dump_state(out=out.fileno())
        out.seek(0)
        blob = out.read()
    state = decode_state(blob[STATE_HEADER_SIZE:])
    return [(vcpu.mp_state, vcpu.regs, vcpu.sregs) for vcpu in state.vcpus]


def test_two_hundred_pause_resume_cycles_from_four_clients_keep_every_guarantee() -> None:
    with vmm_processes() as vmms:
        vmm = vmms.guest()
        vmm.wait_for_passes(1)
        failures: list[str] = []
        done = [0] * CLIENTS

        def cycles(index: int) -> None:
            try:
                with vmm.client(timeout=30) as client:
                    while done[index] < CYCLES_EACH:
                        try:
                            # one client pauses with a lease: the lease path is in the mix
                            if index == 0:
                                client.pause(lease=30)
                            else:
                                client.pause()
                        except CommandError as exc:
                            # another client's pause holds the machine: try again
                            assert exc.code == "invalid-state", exc
                            if failures:
                                return  # a failed client may have left it paused
                            time.sleep(0.0005)
                            continue
                        status = client.query_status()
                        assert status["state"] == "paused", status
                        console = vmm.console.stat().st_size
                        first = vcpu_registers(client, vmms.tmp)
                        second = vcpu_registers(client, vmms.tmp)
                        # every vCPU parked: no register moved in between
                        assert len(first) == VCPUS and first == second, "a vCPU ran while paused"
                        assert vmm.console.stat().st_size == console, "printed while paused"
                        client.resume()
                        done[index] += 1
                        time.sleep(0.001 * (index + 1))  # let the guest run a moment
            except BaseException as exc:
                failures.append(f"client {index}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=cycles, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)  # only catches a hang
        assert not any(thread.is_alive() for thread in threads), "a pause/resume hung"
        assert not failures, failures
        assert sum(done) == CLIENTS * CYCLES_EACH
        with vmm.client() as client:
            assert client.query_status()["state"] == "running"
        # every vCPU still runs: each prints more passes after the cycles
        before = vmm.passes()
        vmm.wait_for_passes(max(before.values()) + 2, timeout=30)
        with vmm.client() as client:
            client.pause()
        text = vmm.text()
    lines = text.split("\n")[:-1]
    passes = check_against_model(lines, VCPUS, WS)
    assert all(passes.get(vcpu, 0) >= before.get(vcpu, 0) + 2 for vcpu in range(VCPUS)), passes
