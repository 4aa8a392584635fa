"""Reconnect and restart pacing: the one backoff of the uplink, the DEIE link, the
daemon's supervisor, every driver and the OCPP chargers' command retries."""

from __future__ import annotations

import random


class Backoff:
    """Capped exponential backoff with jitter: first retries quick, then at most about ``cap_s``.

    Each delay is drawn from [ceiling * lo, ceiling * hi] with ``jitter=(lo, hi)``,
    ceiling = min(cap_s, first_s * 2**attempt), so a site's devices that fail together do
    not retry together.  The default, (0.5, 1.0), is "equal jitter": [ceiling/2, ceiling].
    ``reset()`` after a success.

    Users and their figures: the uplink (0.5 s first, 5 s cap), the DEIE link (0.5 s,
    30 s), the daemon's supervisor (1 s, 30 s, jitter 0.8-1.2), SunSpec and IEC 104
    reconnects (min(0.1 s, cycle), 30 s and 10 s), OCPP command retries (1 s, 60 s), the
    controller's paced retries to a refusing device (1 s first).
    """

    def __init__(self, first_s: float = 0.1, cap_s: float = 30.0, rng=random.random, *,
                 jitter: tuple[float, float] = (0.5, 1.0)):
        if not 0 <= jitter[0] <= jitter[1]:
            raise ValueError(f"jitter must be (lo, hi) with 0 <= lo <= hi, got {jitter!r}")
        self.first_s, self.cap_s, self.rng = first_s, cap_s, rng
        self.jitter = jitter
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.first_s * 2 ** min(self.attempt, 30))
        self.attempt += 1
        lo, hi = self.jitter
        return ceiling * lo + self.rng() * ceiling * (hi - lo)

    def reset(self) -> None:
        self.attempt = 0
