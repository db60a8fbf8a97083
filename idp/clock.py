"""Time, injectable: every expiry in the provider is checked against ``Clock``,
so tests move time forward instead of sleeping."""

from __future__ import annotations

import time


class Clock:
    def __call__(self) -> float:
        return time.time()


class FrozenClock(Clock):
    """A clock that only moves when told to (tests, benchmarks)."""

    def __init__(self, start: float | None = None):
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ShiftedClock(Clock):
    """Real time plus an offset that only grows when told to: for live servers
    (browser tests) whose timers must run while a test skips ahead."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds
