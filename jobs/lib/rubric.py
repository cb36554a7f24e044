"""Rubric scoring from option log-probabilities: P(yes) / (P(yes) + P(no)) per criterion, their
mean as the score, and a one-line reason. Stdlib only; the model side lives in jobs/lib/llm.py."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

YES = (" yes", " Yes")
NO = (" no", " No")
OPTIONS = YES + NO


def _logsumexp(values: Sequence[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def yes_probability(logprobs: Mapping[str, float]) -> float:
    """Share of "yes" in the mass the model puts on yes/no answers (both capitalisations)."""
    ly = _logsumexp([logprobs[o] for o in YES])
    ln = _logsumexp([logprobs[o] for o in NO])
    return 1.0 / (1.0 + math.exp(ln - ly))


def score(per_criterion: Mapping[str, float]) -> float:
    return sum(per_criterion.values()) / len(per_criterion)


def reason(per_criterion: Mapping[str, float]) -> str:
    ranked = sorted(per_criterion.items(), key=lambda kv: (-kv[1], kv[0]))
    (best, p_best), (worst, p_worst) = ranked[0], ranked[-1]
    if best == worst:
        return f"{best}: {p_best:.2f}"
    return f"strongest on {best} ({p_best:.2f}), weakest on {worst} ({p_worst:.2f})"


def explain(per_criterion: Mapping[str, float], quote: Mapping[str, str],
            baseline: Mapping[str, float] | None = None) -> str:
    """The criterion this artifact does best and worst on, relative to `baseline` (the collection's
    mean per criterion: a small model rates every text alike on some criteria, so raw order would
    name the same pair every time), with the artifact's own phrase closest to the strongest one."""
    base = baseline or {c: 0.0 for c in per_criterion}
    ranked = sorted(per_criterion, key=lambda c: (-(per_criterion[c] - base[c]), c))
    best, worst = ranked[0], ranked[-1]
    if best == worst:
        return f"{best} ({per_criterion[best]:.2f}), as in \"{quote[best]}\"."
    def rel(c: str) -> str:
        return (f"{per_criterion[c]:.2f}" if baseline is None else
                f"{per_criterion[c]:.2f}, {per_criterion[c] - base[c]:+.2f} vs the collection")
    return (f"strongest on {best} ({rel(best)}), as in \"{quote[best]}\"; "
            f"weakest on {worst} ({rel(worst)}).")
