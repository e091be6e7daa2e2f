"""Per-section wall-clock accounting for one forward step.

JAX dispatches asynchronously, so a section's time is only meaningful if the
section's outputs are waited for before the clock is read. ``StepTimer`` does
that only when enabled (profiling runs); otherwise ``mark`` is a no-op and the
engine runs fully asynchronously.
"""
from __future__ import annotations

import time
from collections import defaultdict

import jax


class StepTimer:
    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self.totals: dict[str, float] = defaultdict(float)
        self._last = time.perf_counter()

    def start(self) -> None:
        self.totals = defaultdict(float)
        self._last = time.perf_counter()

    def mark(self, section: str, *outputs) -> None:
        """Charge the time since the previous mark to ``section``, after its outputs exist."""
        if not self.enabled:
            return
        if outputs:
            jax.block_until_ready(outputs)
        now = time.perf_counter()
        self.totals[section] += now - self._last
        self._last = now

    def add(self, section: str, seconds: float) -> None:
        """Move ``seconds`` already charged elsewhere into ``section`` (e.g. transfer waits)."""
        if self.enabled:
            self.totals[section] += seconds
