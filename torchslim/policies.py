"""When to act: tiny policy objects with one question, ``should_trigger(step)``.

The train loop asks each service's policy once per step; a policy costs at most
one clock read. The same shapes serve checkpoints, logging and summaries.

>>> policy = every_n_steps(100)
>>> [s for s in range(1, 401) if policy.should_trigger(s)]
[100, 200, 300, 400]
"""

from __future__ import annotations

import time
from collections.abc import Callable

from torchslim._checks import check_positive, check_positive_int
from torchslim._types import Policy


class EveryNSteps:
    """Due on every global step that is a multiple of ``n``."""

    def __init__(self, n: int) -> None:
        check_positive_int(n, "n")
        self.n = n

    def should_trigger(self, step: int) -> bool:
        return step % self.n == 0

    def __repr__(self) -> str:
        return f"every_n_steps({self.n})"


class EveryNSecs:
    """Due when ``secs`` seconds have passed since it was last due (or created)."""

    def __init__(self, secs: float, clock: Callable[[], float] = time.monotonic) -> None:
        check_positive(secs, "secs")
        self.secs = secs
        self._clock = clock
        self._last = clock()

    def should_trigger(self, step: int) -> bool:
        now = self._clock()
        if now - self._last < self.secs:
            return False
        self._last = now
        return True

    def __repr__(self) -> str:
        return f"every_n_secs({self.secs})"


class AnyOf:
    """Due when any of its policies is due (every policy is asked, so timers stay fair)."""

    def __init__(self, *policies: Policy) -> None:
        self.policies = policies

    def should_trigger(self, step: int) -> bool:
        due = False
        for p in self.policies:
            due = p.should_trigger(step) or due
        return due

    def __repr__(self) -> str:
        return "any_of(" + ", ".join(map(repr, self.policies)) + ")"


class Never:
    """Never due."""

    def should_trigger(self, step: int) -> bool:
        return False

    def __repr__(self) -> str:
        return "never()"


def every_n_steps(n: int) -> Policy:
    """A policy due on every multiple of ``n`` steps."""
    return EveryNSteps(n)


def every_n_secs(secs: float) -> Policy:
    """A policy due every ``secs`` seconds of wall time."""
    return EveryNSecs(secs)


def any_of(*policies: Policy | None) -> Policy:
    """A policy due when any given policy is; ``None`` entries are dropped."""
    kept = [p for p in policies if p is not None]
    if not kept:
        return Never()
    return kept[0] if len(kept) == 1 else AnyOf(*kept)
