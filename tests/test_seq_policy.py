"""The migration policy on its own: made once and checked then, and its decision to give
up on pre-copy as a table (no VMM, no clock)."""

from __future__ import annotations

import pytest

from vmipc.sequences import DEFAULT_MAX_ROUNDS, MigrationPolicy


@pytest.mark.parametrize(
    "options",
    [
        {"max_downtime": -0.001},
        {"max_rounds": -1},
        {"timeout": 0},
        {"timeout": -1},
        {"switch_timeout": 0},
    ],
)
def test_a_policy_that_makes_no_sense_cannot_be_made(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        MigrationPolicy(**options)  # type: ignore[arg-type]


def test_a_policy_is_a_frozen_value() -> None:
    policy = MigrationPolicy(force=True)
    assert policy == MigrationPolicy(force=True) and policy.max_rounds == DEFAULT_MAX_ROUNDS
    with pytest.raises(AttributeError):
        policy.force = False  # type: ignore[misc]


POLICY = MigrationPolicy(max_downtime=0.05, max_rounds=5, timeout=10)


@pytest.mark.parametrize(
    ("dirty_rounds", "stalled", "elapsed", "reason"),
    [
        (0, 0, 0.0, None),
        (4, 2, 7.9, None),
        (5, 0, 0.0, "not converged after 5 rounds"),
        (5, 3, 9.0, "not converged after 5 rounds"),  # rounds first
        (2, 3, 0.0, "no progress for 3 rounds"),
        (2, 2, 8.1, "not converged before the timeout"),  # 80 % of the timeout
    ],
)
def test_when_pre_copy_gives_up(
    dirty_rounds: int, stalled: int, elapsed: float, reason: str | None
) -> None:
    said = POLICY.give_up_reason(
        predicted=0.25, dirty_rounds=dirty_rounds, stalled=stalled, elapsed=elapsed
    )
    if reason is None:
        assert said is None
    else:
        assert said == f"{reason} (predicted downtime 250.0 ms > 50.0 ms)"


def test_the_predicted_downtime_counts_the_round_trips_of_the_switch_over() -> None:
    assert MigrationPolicy.predicted_downtime(1000, 1000.0, 0.0) == 1.0
    assert MigrationPolicy.predicted_downtime(0, 1000.0, 0.001) == pytest.approx(0.004)


# --- settling: once converged, more rounds while each is expected to halve the set -----------

MIB = 1 << 20
SETTLING = MigrationPolicy(max_downtime=0.05, max_rounds=5, timeout=10)


def settled(
    dirty: float,
    last: float,
    seconds: float,
    *,
    round_trip: float = 0.0003,
    dirty_rounds: int = 1,
    elapsed: float = 1.0,
    policy: MigrationPolicy = SETTLING,
) -> str | None:
    """Why ``policy`` stops settling with ``dirty`` bytes dirty after a round that sent
    ``last`` bytes in ``seconds`` (None: one more round)."""
    return policy.settled_reason(
        dirty_bytes=int(dirty),
        last_bytes=int(last),
        last_seconds=seconds,
        round_trip=round_trip,
        dirty_rounds=dirty_rounds,
        elapsed=elapsed,
    )


def test_settling_is_on_by_default_with_a_floor_of_one_millisecond() -> None:
    assert MigrationPolicy().settle and MigrationPolicy().settle_floor == 0.001
    with pytest.raises(ValueError):
        MigrationPolicy(settle_floor=-0.001)


def test_a_shrinking_dirty_set_gets_one_more_round() -> None:
    # a dirty round of 20 MiB in 30 ms left 2 MiB: the next round leaves ~10 % of it
    assert settled(2 * MIB, 20 * MIB, 0.030) is None
    # right after the full pass (the bench_tls case: 13 MiB dirty after 134 MiB in 0.3 s)
    assert settled(13 * MIB, 134 * MIB, 0.3, dirty_rounds=0) is None


def test_a_dirty_set_that_does_not_shrink_stops_at_once() -> None:
    # a working set rewritten flat out: as much dirty as the last round sent
    said = settled(32 * MIB, 32 * MIB, 0.025)
    assert said is not None and said.startswith("another round would leave")
    # just above half
    assert settled(11 * MIB, 20 * MIB, 0.030, round_trip=0.0) is not None
    assert settled(9 * MIB, 20 * MIB, 0.030, round_trip=0.0) is None


def test_a_round_that_costs_mostly_round_trips_does_not_pay() -> None:
    # 1.2 MiB left by a 2 MiB round of 3 ms, with 2 ms round trips: the next round lasts
    # about as long as the last one, and the guest dirties as much again
    said = settled(1.2 * MIB, 2 * MIB, 0.003, round_trip=0.002)
    assert said is not None and said.startswith("another round would leave")


def test_an_idle_guest_stops_at_once() -> None:
    # a few pages dirty after the full pass: the last round would take far less than 1 ms
    said = settled(40 << 10, 20 * MIB, 0.05, dirty_rounds=0)
    assert said is not None and "floor" in said
    assert settled(0, 20 * MIB, 0.05, dirty_rounds=0) is not None


def test_an_idle_guest_stops_at_once_even_when_its_full_pass_was_mostly_zero_pages() -> None:
    # bench_migration_gap.py's idle guest (512 MiB, 31 data pages): the full pass sent 125
    # KiB in 7 ms, scanning zero pages, so its rate (18 MB/s) makes 7 dirty pages look
    # like 1.6 ms of sending; a round of a few pages is never worth it
    said = settled(28920, 127704, 0.007, dirty_rounds=0)
    assert said is not None and "KiB" in said


def test_settling_stays_within_the_policys_limits() -> None:
    # shrinking well, but no round left, or past 80 % of the timeout
    said = settled(2 * MIB, 20 * MIB, 0.030, dirty_rounds=5)
    assert said is not None and "rounds" in said
    said = settled(2 * MIB, 20 * MIB, 0.030, elapsed=8.1)
    assert said is not None and "timeout" in said
    assert settled(2 * MIB, 20 * MIB, 0.030, dirty_rounds=4, elapsed=7.9) is None
    no_dirty_rounds = MigrationPolicy(max_rounds=0)
    assert settled(2 * MIB, 20 * MIB, 0.03, dirty_rounds=0, policy=no_dirty_rounds) is not None


def test_settling_can_be_turned_off() -> None:
    off = MigrationPolicy(settle=False)
    said = settled(2 * MIB, 20 * MIB, 0.030, policy=off)
    assert said is not None and "off" in said


def test_a_higher_floor_stops_sooner() -> None:
    # 2 MiB at 20 MiB / 30 ms: a last round of ~3 ms
    assert settled(2 * MIB, 20 * MIB, 0.030, policy=MigrationPolicy(settle_floor=0.005))
    assert settled(2 * MIB, 20 * MIB, 0.030, policy=MigrationPolicy(settle_floor=0.002)) is None
