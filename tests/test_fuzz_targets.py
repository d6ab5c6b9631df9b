"""The fuzz campaign's targets (tools/fuzz.py) in the test suite: hypothesis-driven inputs
(random, and mutations of valid seeds), plus a short run of the coverage-guided engine.

The longer campaign is ``python tools/fuzz.py --seconds 600`` (or ``--engine atheris``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import tracemalloc
from pathlib import Path
from types import ModuleType

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmipc.vmm.persist import BulkError, decode_state


def _load_fuzz() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "tools" / "fuzz.py"
    spec = importlib.util.spec_from_file_location("vmipc_tools_fuzz", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzz()
NAMES = sorted(fuzz.TARGETS)
SEEDS = {name: fuzz.TARGETS[name].seeds() for name in NAMES}
MAX_PEAK = 16 << 20


def check(name: str, data: bytes) -> None:
    problem = fuzz.execute(fuzz.TARGETS[name], data, MAX_PEAK)
    assert problem is None, f"{name}: {problem}"


@pytest.mark.parametrize("name", NAMES)
def test_the_seeds_are_handled(name: str) -> None:
    for seed in SEEDS[name]:
        check(name, seed)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(NAMES), data=st.binary(max_size=2000))
def test_random_bytes(name: str, data: bytes) -> None:
    check(name, data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(NAMES),
    which=st.integers(0, 100),
    edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 1 << 20),
    head=st.binary(max_size=4),
)
def test_mutated_seeds(
    name: str, which: int, edits: list[tuple[int, int]], cut: int, head: bytes
) -> None:
    seeds = SEEDS[name]
    data = bytearray(seeds[which % len(seeds)])
    for position, value in edits:
        data[position % len(data)] = value
    check(name, head + bytes(data[: cut % (len(data) + 1) or len(data)]))


def test_a_short_coverage_guided_campaign_finds_nothing() -> None:
    before = set(os.listdir("/proc/self/fd"))
    started = time.monotonic()
    reports = fuzz.campaign(NAMES, 5.0, seed=int(time.time()) % 1000)
    assert time.monotonic() - started < 15
    crashes = [crash.describe() + "\n" + crash.error for r in reports for crash in r.crashes]
    assert not crashes, "\n\n".join(crashes)
    assert all(report.executions > 10 for report in reports), [r.line() for r in reports]
    assert set(os.listdir("/proc/self/fd")) <= before


@pytest.mark.parametrize("index", range(len(fuzz.hostile_inputs())))
def test_hostile_inputs_at_real_sizes_stay_within_the_memory_bound(index: int) -> None:
    """A 600 KB echo, 400k versions, a megabyte of empty arrays in a request, a state blob
    or a snapshot config section of two million objects: each only raises a documented
    one-line error and allocates at most 16 MiB + 8x its size (before the limits, the
    state payload alone allocated ~150 MiB and the request frame killed the server)."""
    target, data = fuzz.hostile_inputs()[index]
    tracemalloc.start()
    try:
        problem = fuzz.execute(target, data, MAX_PEAK)
    finally:
        tracemalloc.stop()
    assert problem is None, problem


def test_the_harness_notices_what_it_must_notice() -> None:
    """A target that raises something undocumented, breaks an invariant, or allocates far
    more than its input is reported."""

    def undocumented(data: bytes) -> None:
        raise KeyError("boom")

    def hungry(data: bytes) -> None:
        block = bytearray(32 << 20)
        del block

    def leaky(data: bytes) -> None:
        fuzz._check(False, "fds given [1], returned []")

    tracemalloc.start()
    try:
        for run, expected in ((undocumented, "KeyError"), (hungry, "allocated"), (leaky, "fds")):
            target = fuzz.Target("t", run, (ValueError,), list)
            problem = fuzz.execute(target, b"x", MAX_PEAK)
            assert problem is not None and expected in problem
    finally:
        tracemalloc.stop()


# what the campaign found, kept as regressions


@pytest.mark.parametrize(
    "record",
    [
        7,  # not a map at all
        [1, 2],
        {"version": 1, "config": [1, 2]},  # a config that is not a map
        {"version": 1, "config": {"version": 1, "memory_size": 1, "vcpus": 1, "boot": 5}},
    ],
)
def test_a_state_payload_of_the_wrong_shape_is_bad_state(record: object) -> None:
    with pytest.raises(BulkError, match="state record refused"):
        decode_state(msgpack.packb(record))


def test_a_state_field_cannot_make_the_vmm_allocate() -> None:
    """``bytes(n)`` of a hostile int would allocate n bytes: fields must be bytes."""
    record = msgpack.unpackb(fuzz._state_payload(), raw=False)
    record["vcpus"][0]["xsave"] = 1 << 40
    with pytest.raises(BulkError, match="xsave: bytes expected"):
        decode_state(msgpack.packb(record))
    record = msgpack.unpackb(fuzz._state_payload(), raw=False)
    record["vm"]["pit"] = 1 << 40
    with pytest.raises(BulkError, match="pit: bytes expected"):
        decode_state(msgpack.packb(record))
    for table in ("cpuid", "msrs"):  # packed (vcpu record version 2): no count to trust
        record = msgpack.unpackb(fuzz._state_payload(), raw=False)
        record["vcpus"][0][table] = 1 << 40
        with pytest.raises(BulkError, match=f"{table}: bytes expected"):
            decode_state(msgpack.packb(record))
