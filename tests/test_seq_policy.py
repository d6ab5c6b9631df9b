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
