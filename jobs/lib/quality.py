"""Quality measures for the job outputs against hand labels (tests/data/quality/): adjusted Rand
index, Spearman correlation, NDCG@k, threshold calibration and the theme-title topic check. Stdlib only."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Hashable, Sequence

from jobs.lib.grounded import content_words, stem

LABELS = Path(__file__).resolve().parents[2] / "tests" / "data" / "quality"


def load_labels() -> dict:
    return json.loads((LABELS / "labels.json").read_text())


def load_pairs() -> list[dict]:
    return [json.loads(l) for l in (LABELS / "cv_pairs.jsonl").read_text().splitlines() if l.strip()]


def adjusted_rand(labels_a: Sequence[Hashable], labels_b: Sequence[Hashable]) -> float:
    """Adjusted Rand index of two labelings of the same items (1 = same partition, ~0 = chance)."""
    def c2(n: int) -> float:
        return n * (n - 1) / 2
    n = len(labels_a)
    table = Counter(zip(labels_a, labels_b))
    sum_ij = sum(c2(v) for v in table.values())
    sum_a = sum(c2(v) for v in Counter(labels_a).values())
    sum_b = sum(c2(v) for v in Counter(labels_b).values())
    expected = sum_a * sum_b / c2(n) if n > 1 else 0.0
    top = (sum_a + sum_b) / 2 - expected
    return (sum_ij - expected) / top if top else 1.0


def _ranks(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1   # ties share their mean rank
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else 0.0


def ndcg(ranked_relevance: Sequence[float], k: int = 3) -> float:
    """NDCG@k of a ranking given each ranked item's graded relevance."""
    def dcg(rel: Sequence[float]) -> float:
        return sum((2 ** r - 1) / math.log2(i + 2) for i, r in enumerate(rel[:k]))
    ideal = dcg(sorted(ranked_relevance, reverse=True))
    return dcg(ranked_relevance) / ideal if ideal else 0.0


def best_threshold(sims: Sequence[float], covered: Sequence[bool]) -> tuple[float, float]:
    """(threshold, F1): the cut between labelled pairs' similarities with the best F1 for
    'covered'; the midpoint between neighbouring similarities, so it does not sit on a pair."""
    pts = sorted(set(sims))
    cuts = [(a + b) / 2 for a, b in zip(pts, pts[1:])] or pts
    best = (0.0, -1.0)
    for t in cuts:
        tp = sum(s >= t and c for s, c in zip(sims, covered))
        fp = sum(s >= t and not c for s, c in zip(sims, covered))
        fn = sum(s < t and c for s, c in zip(sims, covered))
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        if f1 > best[1]:
            best = (round(t, 4), round(f1, 4))
    return best


def on_topic(title: str, topic: str, topic_words: dict[str, str]) -> bool:
    """A theme title is on topic when it shares a (stemmed) word with the topic's word list."""
    words = {stem(w) for w in topic_words[topic].split()}
    return bool(content_words(title) & words)
