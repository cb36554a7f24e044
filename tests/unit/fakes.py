"""FakeHost: a controllable clock and a record of signals, in place of lab_attendant.host.Host."""
from __future__ import annotations


class FakeHost:
    def __init__(self) -> None:
        self.now = 1000.0
        self.signals: list[tuple[int, int]] = []     # (pgid, signal)
        self.alive_groups: set[int] = set()

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def killpg(self, pgid: int, sig: int) -> bool:
        self.signals.append((pgid, sig))
        return pgid in self.alive_groups

    def group_alive(self, pgid: int) -> bool:
        return pgid in self.alive_groups
