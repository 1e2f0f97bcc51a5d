"""policies: tables of which steps (or clock readings) trigger, and the
arguments that are refused."""

from __future__ import annotations

import pytest

from torchslim import policies


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


class Recorder:
    """A policy that answers from a fixed set of steps and remembers every question."""

    def __init__(self, due_steps: set[int]) -> None:
        self.due_steps = due_steps
        self.asked: list[int] = []

    def should_trigger(self, step: int) -> bool:
        self.asked.append(step)
        return step in self.due_steps


@pytest.mark.parametrize(
    "n, steps, due",
    [
        (1, range(1, 6), [1, 2, 3, 4, 5]),
        (2, range(1, 8), [2, 4, 6]),
        (3, range(1, 10), [3, 6, 9]),
        (100, range(1, 401), [100, 200, 300, 400]),
        (5, range(7, 23), [10, 15, 20]),  # resumed at step 7: multiples of n, not every n-th call
    ],
)
def test_every_n_steps(n, steps, due):
    policy = policies.every_n_steps(n)
    assert [s for s in steps if policy.should_trigger(s)] == due


def test_every_n_steps_answers_the_same_when_asked_twice():
    policy = policies.every_n_steps(4)
    assert [policy.should_trigger(8), policy.should_trigger(8), policy.should_trigger(9)] == [True, True, False]


# Each row: seconds between triggers, then the clock readings at which the policy is asked
# (the clock starts at 0 when the policy is made), and which of those are due.
@pytest.mark.parametrize(
    "secs, times, due",
    [
        (10, [1, 9.9, 10, 11, 19.9, 20], [False, False, True, False, False, True]),
        (10, [25, 26, 34.9, 35], [True, False, False, True]),  # measured from the last trigger, no catch-up burst
        (0.5, [0.5, 1.0, 1.2, 1.5], [True, True, False, True]),
        (60, [0, 30, 59], [False, False, False]),
    ],
)
def test_every_n_secs_with_a_fake_clock(secs, times, due):
    clock = FakeClock(now=0.0)
    policy = policies.EveryNSecs(secs, clock=clock)
    answers = []
    for t in times:
        clock.now = t
        answers.append(policy.should_trigger(step=0))
    assert answers == due


def test_every_n_secs_reads_the_clock_once_per_question():
    clock = FakeClock()
    policy = policies.EveryNSecs(5, clock=clock)
    reads = clock.reads
    for _ in range(3):
        policy.should_trigger(1)
    assert clock.reads - reads == 3


def test_every_n_secs_uses_wall_time_by_default():
    policy = policies.every_n_secs(3600)
    assert isinstance(policy, policies.EveryNSecs)
    assert not policy.should_trigger(1)


@pytest.mark.parametrize(
    "due_a, due_b, steps, due",
    [
        ({2, 4}, {3}, [1, 2, 3, 4, 5], [False, True, True, True, False]),
        (set(), set(), [1, 2], [False, False]),
        ({1, 2}, {1, 2}, [1, 2, 3], [True, True, False]),
    ],
)
def test_any_of_table(due_a, due_b, steps, due):
    a, b = Recorder(due_a), Recorder(due_b)
    policy = policies.any_of(a, None, b)
    assert [policy.should_trigger(s) for s in steps] == due
    # Every policy is asked at every step, even when an earlier one is already due.
    assert a.asked == steps and b.asked == steps


def test_any_of_keeps_timers_fair():
    clock = FakeClock(now=0.0)
    timer = policies.EveryNSecs(10, clock=clock)
    policy = policies.any_of(policies.every_n_steps(1), timer)
    clock.now = 10
    assert policy.should_trigger(1)  # due by steps; the timer still took its turn
    clock.now = 15
    assert not timer.should_trigger(2)  # its interval restarted at 10


@pytest.mark.parametrize("given", [(), (None,), (None, None)])
def test_any_of_nothing_is_never(given):
    policy = policies.any_of(*given)
    assert not any(policy.should_trigger(s) for s in range(0, 1000, 7))


def test_any_of_one_policy_is_that_policy():
    only = policies.every_n_steps(3)
    assert policies.any_of(None, only) is only


@pytest.mark.parametrize(
    "make, arg, error, message",
    [
        (policies.every_n_steps, 0, ValueError, "`n` must be positive, got 0"),
        (policies.every_n_steps, -1, ValueError, "`n` must be positive, got -1"),
        (policies.every_n_steps, 1.5, TypeError, "`n` must be a positive int, got 1.5"),
        (policies.every_n_steps, 2.0, TypeError, "`n` must be a positive int, got 2.0"),
        (policies.every_n_steps, True, TypeError, "`n` must be a positive int, got True"),
        (policies.every_n_steps, None, TypeError, "`n` must be a positive int, got None"),
        (policies.every_n_secs, 0, ValueError, "`secs` must be positive, got 0"),
        (policies.every_n_secs, -0.5, ValueError, "`secs` must be positive, got -0.5"),
        (policies.every_n_secs, float("nan"), ValueError, "`secs` must be positive"),
        (policies.every_n_secs, True, TypeError, "`secs` must be a positive number, got True"),
        (policies.every_n_secs, "10", TypeError, "`secs` must be a positive number, got '10'"),
    ],
)
def test_bad_arguments(make, arg, error, message):
    with pytest.raises(error, match=message):
        make(arg)

