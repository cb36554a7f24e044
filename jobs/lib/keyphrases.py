"""Theme keyphrases: candidate words and two-word phrases (stoplist-filtered), class-based TF-IDF
over groups of documents, and MMR to keep the chosen phrases diverse. Stdlib only."""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

from jobs.lib.stoplist import STOPWORDS

_TOKEN = re.compile(r"[A-Za-z][A-Za-z'-]*|[.,;:!?()\"\n]")


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def candidates(text: str, top: int = 40) -> list[str]:
    """The text's content words and two-word phrases (both words content words, no punctuation
    between them, said at least twice: once is a collocation by chance), most frequent first
    (ties: first seen). Possessives fold to the noun; adverbs in -ly are dropped."""
    runs: list[list[str]] = [[]]
    for tok in _TOKEN.findall(text):
        w = tok.lower().removesuffix("'s").strip("'-")
        if len(w) < 3 or w in STOPWORDS or not w.isalpha() or w.endswith("ly"):
            runs.append([])
        else:
            runs[-1].append(w)
    counts: Counter[str] = Counter()
    for run in runs:
        counts.update(run)
        counts.update(f"{a} {b}" for a, b in zip(run, run[1:]))
    return [p for p, c in counts.most_common() if c >= 2 or " " not in p][:top]


def class_tfidf(groups: Sequence[Sequence[Sequence[str]]]) -> list[dict[str, float]]:
    """c-TF-IDF (as in BERTopic) with document counts: a phrase scores by the share of the group's
    documents using it times log(1 + mean phrases per group / documents using it anywhere).
    `groups` holds, per group, each document's candidate phrases."""
    df = Counter(p for g in groups for doc in g for p in set(doc))
    mean_len = sum(len(set(doc)) for g in groups for doc in g) / max(1, len(groups))
    out = []
    for g in groups:
        tf = Counter(p for doc in g for p in set(doc))
        n = max(1, len(g))
        # Two-word phrases are rarer by nature; a small lift keeps a shared bigram above its parts.
        out.append({p: (c / n) * math.log(1 + mean_len / df[p]) * (1.2 if " " in p else 1.0)
                    for p, c in tf.items()})
    return out


def mmr(phrases: Sequence[str], vectors: Sequence[Sequence[float]], centroid: Sequence[float],
        k: int = 4, diversity: float = 0.6, weights: Sequence[float] | None = None) -> list[str]:
    """Maximal marginal relevance: next the phrase most relevant (like the theme's centroid, times
    its c-TF-IDF weight scaled to 0..1 when given) and least like those already chosen (vectors
    L2-normalised); also drops a phrase sharing a word with a chosen one."""
    top = max(weights) if weights else 0.0
    # `top` is non-zero only when weights were given, so `weights` is indexed only then.
    rel = [_dot(v, centroid) * (0.5 + 0.5 * weights[i] / top if weights and top else 1.0)
           for i, v in enumerate(vectors)]
    chosen: list[int] = []
    left = list(range(len(phrases)))
    while left and len(chosen) < k:
        def gain(i: int) -> float:
            redundancy = max((_dot(vectors[i], vectors[j]) for j in chosen), default=0.0)
            return (1 - diversity) * rel[i] - diversity * redundancy
        best = max(left, key=lambda i: (gain(i), -i))
        left.remove(best)
        if any(set(phrases[best].split()) & set(phrases[j].split()) for j in chosen):
            continue
        chosen.append(best)
    return [phrases[i] for i in chosen]


def label(phrases: Sequence[str]) -> str:
    """A readable fallback title from the top keyphrases: the first two-word phrase ("Print shop"),
    else the first two words ("Bread and oven")."""
    if not phrases:
        return "Untitled theme"
    two = [p for p in phrases[:2] if " " in p]
    text = two[0] if two else phrases[0] if len(phrases) == 1 else f"{phrases[0]} and {phrases[1]}"
    return text[0].upper() + text[1:]
