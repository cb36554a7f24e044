"""Scores the claim check on the labelled pairs (tests/data/claims/pairs.jsonl): precision and recall of
each method, and the job policy replayed over the real outputs (which sentence a run would show). Stdlib."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

from jobs.lib import claims
from jobs.lib import grounded as guard

PAIRS = Path(__file__).resolve().parents[2] / "tests" / "data" / "claims" / "pairs.jsonl"
RULES = {"note_summary": guard.Rules(min_words=5, max_words=45),        # nightly_insights.SUMMARY_RULES
         "artifact_summary": guard.Rules(min_words=6, max_words=45),    # artifact_refinement.SUMMARY_RULES
         "cv_rationale": guard.Rules(min_words=6, max_words=40)}        # cv_matching.RATIONALE_RULES


def load_pairs(path: Path = PAIRS) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _facts(p: dict) -> str | None:
    if p["task"] != "cv_rationale":
        return None
    return claims.agrees_with_facts(p["sentence"], p["covered"], p["requirements"], p["gaps"])


def _text_rules(p: dict) -> str | None:
    """The field rules the kinds apply before any claim check (empty, loops, echoes of the examples)."""
    out = p["sentence"].removeprefix("The candidate ").strip() if p["task"] == "cv_rationale" else p["sentence"]
    return guard.check(out, source=p["source"], rules=RULES[p["task"]], echoes=p.get("echoes", ()))


METHODS: dict[str, Callable[[dict], bool]] = {
    # what shipped before issue #30: the field rules with word-overlap grounding (and the gap 'forbid')
    "overlap (before)": lambda p: _text_rules(p) is None and guard.check(
        p["sentence"].removeprefix("The candidate ").strip() if p["task"] == "cv_rationale" else p["sentence"],
        source=p["source"], rules=RULES[p["task"]], forbid=p.get("gaps", ()) if p["task"] == "cv_rationale"
        else ()) is None,
    "align only": lambda p: claims.align(p["sentence"], p["source"]).ok,
    "rules + align + facts (shipped)": lambda p: _text_rules(p) is None and claims.align(
        p["sentence"], p["source"]).ok and _facts(p) is None,
}


def confusion(pairs: Iterable[dict], keep: Callable[[dict], bool]) -> dict:
    """'positive' = the check keeps the sentence (shows it as the model's). precision = kept ones that
    are true; recall = true ones kept; false_shown_share = 1 - precision."""
    tp = fp = fn = tn = 0
    for p in pairs:
        k = keep(p)
        tp += k and p["label"]
        fp += k and not p["label"]
        fn += (not k) and p["label"]
        tn += (not k) and not p["label"]
    prec = tp / (tp + fp) if tp + fp else 1.0
    return {"pairs": tp + fp + fn + tn, "true": tp + fn, "false": fp + tn, "kept": tp + fp,
            "precision": round(prec, 3), "recall": round(tp / (tp + fn) if tp + fn else 0.0, 3),
            "false_shown_share": round(1 - prec, 3)}


def grid(pairs: list[dict]) -> list[dict]:
    """align's two settings over a grid: the numbers the shipped defaults were chosen from."""
    out = []
    for window in (1, 2, 3, 4):
        for cov in (0.5, 0.6, 0.67, 0.75, 0.8, 0.9, 1.0):
            c = confusion(pairs, lambda p: _text_rules(p) is None and _facts(p) is None and claims.align(
                p["sentence"], p["source"], min_coverage=cov, window=window).ok)
            out.append({"window": window, "min_coverage": cov, **c})
    return out


def replay(pairs: list[dict], keep: Callable[[dict], bool]) -> dict:
    """A job run replayed: per item (note, artifact, posting) the first try (example 0) that the check
    keeps is shown, else the second, else the extractive sentence (true by construction: a source
    sentence). Reports the share of shown sentences that are false and of items with a model sentence."""
    items: dict[tuple[str, str], list[dict]] = {}
    for p in pairs:
        items.setdefault((p["task"], p["file"]), []).append(p)
    shown_false = model_items = 0
    per_task: dict[str, list[int]] = {}
    for (task, _), tries in items.items():
        pick = next((p for p in sorted(tries, key=lambda p: p["example"]) if keep(p)), None)
        model_items += pick is not None
        shown_false += pick is not None and not pick["label"]
        t = per_task.setdefault(task, [0, 0])
        t[0] += 1
        t[1] += pick is not None
    n = len(items)
    return {"items": n, "shown_false": shown_false,
            "shown_false_share": round(shown_false / n, 3) if n else 0.0,
            "model_written_share": round(model_items / n, 3) if n else 0.0,
            "model_written_by_task": {k: f"{v[1]}/{v[0]}" for k, v in sorted(per_task.items())}}
