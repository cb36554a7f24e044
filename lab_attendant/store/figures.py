"""Figures derived from a run's row (elapsed time, progress fraction, ETA, tokens/s): the CLI,
the dashboard and `stats` show the same numbers because they compute them here.
"""
from __future__ import annotations

import math
import time
from typing import Any

from lab_attendant.store.states import ACTIVE


def elapsed_s(run: Any, now: float | None = None) -> float | None:
    """Time since the worker started (or how long it ran, once ended)."""
    start = run.running_at or run.started_at
    if start is None:
        return None
    return (run.ended_at or now or time.time()) - start


def fraction(run: Any) -> float | None:
    if not run.progress_total:
        return None
    return min(1.0, max(0.0, (run.progress_done or 0) / run.progress_total))


def eta_s(run: Any, now: float | None = None) -> float | None:
    """Remaining time at the run's average pace so far (None before any progress)."""
    frac, spent = fraction(run), elapsed_s(run, now)
    if run.state not in ACTIVE or not frac or spent is None or frac >= 1:
        return None
    return spent * (1 - frac) / frac


def tokens_per_s(run: Any) -> float | None:
    value = run.metrics.get("tokens_per_s")
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None
