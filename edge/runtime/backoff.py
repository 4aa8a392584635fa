"""Reconnect pacing shared by every driver and link."""

from __future__ import annotations

import random


class Backoff:
    """Capped exponential backoff with equal jitter: first retries quick, then at most ``cap_s``.

    Each delay is drawn from [ceiling/2, ceiling], ceiling = min(cap_s, first_s * 2**attempt),
    so a site's devices that fail together do not retry together.  ``reset()`` after a success.
    """

    def __init__(self, first_s: float = 0.1, cap_s: float = 30.0, rng=random.random):
        self.first_s, self.cap_s, self.rng = first_s, cap_s, rng
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.first_s * 2 ** min(self.attempt, 30))
        self.attempt += 1
        return ceiling / 2 + self.rng() * ceiling / 2

    def reset(self) -> None:
        self.attempt = 0
