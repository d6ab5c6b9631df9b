"""Crash consistency of a checkpoint, on real KVM with the built-in guest: the source VMM
is killed (SIGKILL) at chosen and at random points of a second checkpoint to the FILE of
a first, good one.

After every kill: FILE is byte for byte the first checkpoint (the same inode: it was never
opened for writing), or — when the snapshot was already complete and proven when the VMM
died (killed while the client verified it, or after it was published) — the complete new
snapshot, which ``vmipc snapshot verify`` accepts; nothing partial is ever under the final
name; no ``.FILE.*.partial`` is left behind (the client, which survives, removes its
temporary file); and ``vmipc vmm --restore FILE`` runs a guest that continues exactly from
the moment of the snapshot FILE holds.

A fresh source VMM runs the deterministic guest for every kill point. The second
checkpoint leaves the VM paused (``--leave-paused``), so the killed VMM's console ends at
that snapshot's moment, and a new FILE can be checked exactly too.

"During" a building block means: its request was sent and its reply had not arrived when
the VMM died — the checkpoint's error names that step. For ``dump-memory`` the kill also
lands while the VMM is writing: the file is shorter than a finished memory section.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.seq_support import VmmProcess, check_continuation, vmipc, vmm_processes
from vmipc.client import open_client
from vmipc.formats import SnapshotReader
from vmipc.sequences import SequenceError, SnapshotReport, _checkpoint, checkpoint

pytestmark = pytest.mark.kvm

#: the kill points' random choices derive from this (printed with every point)
SEED = int(os.environ.get("VMIPC_CRASH_SEED", "6"))
WS = 1 << 20
NAME = "vm.snap"
NICE = ("nice", "-n", "10")

#: point -> the step the checkpoint fails at (None: it succeeds, FILE is the new snapshot;
#: "either": a random moment, any outcome allowed as long as it is one of the two)
POINTS: dict[str, str | None] = {
    "after-pause": "dump-state",
    "during-dump-state": "dump-state",
    "during-dump-memory": "dump-memory",
    "during-seal": "release-lease",
    "during-verify": None,
    "after-publish": None,
    "random-1": "either",
    "random-2": "either",
    "random-3": "either",
}


@dataclass(frozen=True)
class First:
    """The first, good checkpoint: its file, content digest and inode, the console up to
    its moment."""

    path: Path
    digest: str
    inode: int
    before: str
    #: where its memory section ends (a finished dump-memory makes the file this long)
    memory_end: int


def digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def leftovers(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".partial"))


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> Iterator[First]:
    path = tmp_path_factory.mktemp("first") / NAME
    with vmm_processes() as vmms:
        src = vmms.guest(ws=WS)
        src.wait_for_passes(2)
        done = vmipc("checkpoint", "--socket", src.socket, str(path), "--leave-paused")
        assert done.returncode == 0, done.stderr
        before = src.text()
    with open(path, "rb") as f:
        memory = SnapshotReader.from_file(f).entry("memory")
    yield First(path, digest(path), path.stat().st_ino, before, memory.offset + memory.length)


class Killer:
    """SIGKILLs one VMM once, from the test's thread or a helper thread."""

    def __init__(self, vmm: VmmProcess) -> None:
        self.vmm = vmm
        self.killed = threading.Event()
        self.size_at_kill: int | None = None
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def now(self, fd: int | None = None) -> None:
        with self._lock:
            if self.killed.is_set():
                return
            os.kill(self.vmm.pid, signal.SIGKILL)
            self.killed.set()
        self.vmm.proc.wait(timeout=15)
        if fd is not None:
            self.size_at_kill = os.fstat(fd).st_size

    def after(self, seconds: float) -> None:
        """Kill ``seconds`` from now (a thread, so the sequence runs on meanwhile)."""
        self._start(lambda: None if self.killed.wait(seconds) else self.now())

    def when_larger(self, fd: int, size: int, stop: threading.Event) -> None:
        """Kill as soon as the file ``fd`` grows beyond ``size`` bytes (unless ``stop``)."""

        def watch() -> None:
            while not stop.is_set():
                if os.fstat(fd).st_size > size:
                    self.now(fd)
                    return
                time.sleep(0)

        self._start(watch)

    def _start(self, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self._threads.append(thread)

    def join(self) -> None:
        for thread in self._threads:
            thread.join(15)


class KillingClient:
    """A real client whose VMM is killed at ``point`` of the building-block calls."""

    def __init__(self, client: Any, point: str, killer: Killer, rng: random.Random) -> None:
        self._client = client
        self._point = point
        self._killer = killer
        self._rng = rng

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._client, name)
        killer, rng = self._killer, self._rng
        if name == "pause" and self._point == "after-pause":

            async def pause(*args: Any, **kwargs: Any) -> Any:
                result = await real(*args, **kwargs)
                killer.now()
                return result

            return pause
        if name == "dump_state" and self._point == "during-dump-state":

            async def dump_state(*args: Any, **kwargs: Any) -> Any:
                # the request goes out at once; the VMM needs a few ms to answer
                killer.after(rng.uniform(0, 0.0005))
                return await real(*args, **kwargs)

            return dump_state
        if name == "dump_memory" and self._point == "during-dump-memory":

            async def dump_memory(*args: Any, out: int, **kwargs: Any) -> Any:
                stop = threading.Event()
                # the watcher's own fd of the file: the sequence closes ``out`` and
                # removes the file as soon as it sees the VMM gone
                watched = os.dup(out)
                # past the memory descriptor, at the first data written
                beyond = os.fstat(out).st_size + rng.randint(4096, 8192)
                killer.when_larger(watched, beyond, stop)
                try:
                    return await real(*args, out=out, **kwargs)
                finally:
                    stop.set()
                    killer.join()
                    os.close(watched)

            return dump_memory
        return real


#: the points whose kill must land while a reply is awaited; a kill that came too late
#: (the machine was slow to run the killing thread) is retried on a fresh VMM
IN_FLIGHT = ("during-dump-state", "during-dump-memory")
ATTEMPTS = 3
REAL_SEAL = _checkpoint.seal
REAL_VERIFY = _checkpoint.verify_file


@pytest.mark.parametrize("point", list(POINTS))
def test_a_source_vmm_killed_during_a_checkpoint_leaves_the_old_file_or_a_complete_new_one(
    first: First, point: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(f"{SEED}-{point}")
    expected = POINTS[point]
    for attempt in range(ATTEMPTS):
        directory = tmp_path / f"attempt-{attempt}"
        directory.mkdir()
        outcome, killer = kill_during_checkpoint(first, point, rng, directory, monkeypatch)
        what = f"{point} (seed {SEED}, attempt {attempt + 1}: {outcome})"
        if expected in ("either", None):
            assert expected == "either" or isinstance(outcome, SnapshotReport), what
            return
        landed = isinstance(outcome, SequenceError) and outcome.step == expected
        if point == "during-dump-memory":
            # and the VMM was still writing: no finished memory section yet
            assert killer.size_at_kill is not None or not landed, what
            landed = landed and killer.size_at_kill is not None
            landed = landed and killer.size_at_kill < first.memory_end  # type: ignore[operator]
        if landed:
            return
        assert point in IN_FLIGHT, f"the checkpoint did not fail at {expected}: {what}"
    raise AssertionError(f"{ATTEMPTS} kills all missed the {point} window (seed {SEED})")


def kill_during_checkpoint(
    first: First,
    point: str,
    rng: random.Random,
    directory: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[SnapshotReport | SequenceError, Killer]:
    """A second checkpoint to FILE (in ``directory``, the first one's inode) from a fresh
    VMM killed at ``point``; checks FILE, the temporary files and the restore."""
    path = directory / NAME
    os.link(first.path, path)  # FILE is the first checkpoint (the same inode)
    with vmm_processes() as vmms:
        # niced, so that the test's killing thread gets a CPU at once on a small machine
        # whose cores the VMM's threads (vCPUs, the dump) keep busy
        src = vmms.guest(ws=WS, prefix=NICE)
        src.wait_for_passes(rng.randint(1, 3))
        killer = Killer(src)

        def seal(*args: Any, **kwargs: Any) -> int:
            killer.now()
            return REAL_SEAL(*args, **kwargs)

        def verify_file(*args: Any, **kwargs: Any) -> None:
            killer.now()
            REAL_VERIFY(*args, **kwargs)

        if point == "during-seal":
            monkeypatch.setattr(_checkpoint, "seal", seal)
        if point == "during-verify":
            monkeypatch.setattr(_checkpoint, "verify_file", verify_file)
        delay = rng.uniform(0, 0.04)

        async def attempt() -> SnapshotReport | SequenceError:
            with trio.fail_after(60):
                async with open_client(src.socket) as client:
                    if point.startswith("random"):
                        killer.after(delay)
                    try:
                        report = await checkpoint(
                            KillingClient(client, point, killer, rng),  # type: ignore[arg-type]
                            str(path),
                            then="pause",
                        )
                    except SequenceError as exc:
                        return exc
                    if point == "after-publish":
                        killer.now()
                    return report

        outcome = trio.run(attempt)
        monkeypatch.undo()
        killer.after(0)  # a kill that missed (or a random one the checkpoint outran): now
        killer.join()
        assert killer.killed.is_set() and not src.alive()

        untouched = path.stat().st_ino == first.inode
        what = f"{point} (seed {SEED}, {outcome})"
        assert leftovers(directory) == [], f"temporary files left after {what}"
        if isinstance(outcome, SequenceError):
            assert untouched, f"FILE was replaced although the checkpoint failed: {what}"
            assert any(
                words in outcome.outcome
                for words in ("no snapshot was written", "nothing was done")
            ), what
        else:
            assert not untouched and outcome.path == str(path), what
        if untouched:
            assert digest(path) == first.digest, f"FILE changed: {what}"
            before = first.before
        else:
            # the new snapshot: complete and checked; the VM was paused at its moment
            # until the VMM died, so the killed VMM's console ends at that moment
            verified = vmipc("snapshot", "verify", str(path))
            assert verified.returncode == 0, verified.stderr
            before = src.text()
        print(
            f"\n{point}: "
            + (f"failed at {outcome.step}" if isinstance(outcome, SequenceError) else "published")
            + (f", killed {delay * 1e3:.1f} ms in" if point.startswith("random") else "")
            + f"; FILE {'the first checkpoint' if untouched else 'the new snapshot'}"
        )
        reached = max(check_continuation(before, "", WS).values())
        restored = vmms._start("restored", ["--restore", str(path)], [])
        restored.wait_for_passes(reached + 1)
        with restored.client() as client:
            client.pause()
        check_continuation(before, restored.text(), WS)
    return outcome, killer
