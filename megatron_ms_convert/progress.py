"""A run's progress in bytes, summed over its workers: per phase ("write", then "verify" with
--verify), the bytes done of the bytes expected. Plain bookkeeping, no display (command.py shows it).

Each plan is expected to handle a known number of bytes in each of its phases (`expect`); its worker
reports how far it got (`update`, the bytes of that plan done so far, as the runner's progress
messages carry them) and the plan counts as fully done when it ends (`finish`), whatever it
reported. A phase's count only grows and never passes what its plans were expected to handle, so a
worker whose reports over- or undershoot its plan's size cannot make the total run backwards or
beyond 100 %.
"""

from __future__ import annotations

from typing import Hashable

PHASES = ("write", "verify")
PHASE_LABELS = {"write": "converting", "verify": "verifying"}


class ByteProgress:
    def __init__(self) -> None:
        self._expected: dict[tuple[Hashable, str], int] = {}
        self._done: dict[tuple[Hashable, str], int] = {}

    def expect(self, key: Hashable, phase: str, nbytes: int) -> None:
        """Plan `key` will handle `nbytes` in `phase`."""
        self._expected[key, phase] = max(0, nbytes)
        self._done.setdefault((key, phase), 0)

    def update(self, key: Hashable, phase: str, done: int) -> int:
        """Plan `key` has handled `done` bytes of `phase` so far; returns by how much the phase's
        count grew (0 for a report behind an earlier one, or for a phase not expected)."""
        if (key, phase) not in self._expected:
            return 0
        now = min(max(done, self._done[key, phase]), self._expected[key, phase])
        grown, self._done[key, phase] = now - self._done[key, phase], now
        return grown

    def finish(self, key: Hashable) -> dict[str, int]:
        """Plan `key` has ended: every phase of it counts as done. Returns by how much each phase grew."""
        return {phase: self.update(key, phase, self._expected[key, phase])
                for (each, phase) in list(self._expected) if each == key}

    def total(self, phase: str) -> int:
        return sum(n for (_, each), n in self._expected.items() if each == phase)

    def done(self, phase: str) -> int:
        return sum(n for (_, each), n in self._done.items() if each == phase)

    def phases(self) -> list[str]:
        """The phases some plan is expected in, in run order."""
        return [phase for phase in PHASES if any(each == phase for _, each in self._expected)]


def progress_line(progress: ByteProgress, elapsed_s: float) -> str:
    """One line for a log file: each phase's GB done of the total, and the rate so far."""
    parts = []
    for phase in progress.phases():
        done, total = progress.done(phase), progress.total(phase)
        parts.append(f"{PHASE_LABELS[phase]} {done / 1e9:.2f} of {total / 1e9:.2f} GB"
                     f" ({100 * done / total if total else 100:.0f} %)")
    rate = sum(progress.done(phase) for phase in progress.phases()) / max(elapsed_s, 1e-9) / 1e9
    return "progress: " + ", ".join(parts) + f", {rate:.2f} GB/s"
