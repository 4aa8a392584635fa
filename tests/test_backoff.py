"""The one backoff (edge/runtime/backoff.py): each user's figures as they were."""

from __future__ import annotations

import pytest

from edge.runtime.backoff import Backoff


def delays(backoff: Backoff, n: int) -> list[float]:
    return [backoff.next_delay() for _ in range(n)]


@pytest.mark.parametrize("r", [0.0, 0.37, 1.0])
def test_equal_jitter_by_default(r):
    backoff = Backoff(first_s=0.5, cap_s=30.0, rng=lambda: r)
    for attempt, delay in enumerate(delays(backoff, 12)):
        ceiling = min(30.0, 0.5 * 2 ** attempt)
        assert delay == pytest.approx(ceiling / 2 + r * ceiling / 2)


def test_supervisor_jitter_is_0_8_to_1_2_of_a_doubling_delay_capped_at_30_s():
    low = delays(Backoff(first_s=1.0, cap_s=30.0, rng=lambda: 0.0, jitter=(0.8, 1.2)), 7)
    high = delays(Backoff(first_s=1.0, cap_s=30.0, rng=lambda: 1.0, jitter=(0.8, 1.2)), 7)
    assert low == pytest.approx([0.8, 1.6, 3.2, 6.4, 12.8, 24.0, 24.0])
    assert high == pytest.approx([1.2, 2.4, 4.8, 9.6, 19.2, 36.0, 36.0])


def test_reset_starts_again_from_the_first_delay():
    backoff = Backoff(first_s=1.0, cap_s=60.0, rng=lambda: 1.0)
    assert delays(backoff, 3) == [1.0, 2.0, 4.0]
    assert backoff.attempt == 3
    backoff.reset()
    assert backoff.next_delay() == 1.0


def test_many_attempts_stay_at_the_cap():
    backoff = Backoff(first_s=0.1, cap_s=10.0, rng=lambda: 1.0)
    backoff.attempt = 10_000
    assert backoff.next_delay() == 10.0


def test_jitter_must_be_an_ordered_non_negative_range():
    with pytest.raises(ValueError):
        Backoff(jitter=(1.2, 0.8))
