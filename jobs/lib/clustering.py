"""Grouping notes into themes: cosine similarity, average-link agglomerative clustering and
TF-IDF keywords per group. Stdlib only, deterministic, so the reduce step stays grounded."""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

_WORD_RE = re.compile(r"[a-zA-Z][a-zA-Z'-]{3,}")
STOPWORDS = frozenset("""
about after again also always another because been before being between both could didn't does
doing down each even every first from have having here into just know last like little made make
many more most much must myself never next once only other over same should since some still such
than that their them then there these they thing things think this those though three through time
today very want week were what when where which while will with without would year years your
""".split())


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


def cluster(vectors: Sequence[Sequence[float]], *, max_clusters: int,
            merge_above: float = 0.4) -> list[list[int]]:
    """Average-link agglomerative clustering: merge the most similar pair while there are more
    than `max_clusters` groups or the pair's similarity exceeds `merge_above`. Returns index
    lists, largest group first, each sorted; ties break on the lowest index (deterministic)."""
    n = len(vectors)
    sim = [[cosine(vectors[i], vectors[j]) for j in range(n)] for i in range(n)]
    groups = [[i] for i in range(n)]
    while len(groups) > 1:
        best, pair = -2.0, (0, 1)
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                s = sum(sim[i][j] for i in groups[a] for j in groups[b]) / (
                    len(groups[a]) * len(groups[b]))
                if s > best:
                    best, pair = s, (a, b)
        if len(groups) <= max_clusters and best <= merge_above:
            break
        a, b = pair
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b]
    return sorted(groups, key=lambda g: (-len(g), g[0]))


def words(text: str) -> list[str]:
    return [w.lower().strip("'-") for w in _WORD_RE.findall(text)
            if w.lower() not in STOPWORDS]


def keywords(group_texts: Sequence[str], all_texts: Sequence[str], top: int = 5) -> list[str]:
    """The words that best tell this group from the whole corpus (TF-IDF over documents)."""
    doc_freq = Counter(w for t in all_texts for w in set(words(t)))
    n_docs = len(all_texts)
    tf = Counter(w for t in group_texts for w in set(words(t)))  # documents in the group using w
    scored = {w: c * math.log((1 + n_docs) / (1 + doc_freq[w])) for w, c in tf.items()}
    return [w for w, _ in sorted(scored.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]


def top_terms(text: str, top: int = 15) -> list[str]:
    """A note's most frequent content words (ties: first seen), kept in the manifest for keywords."""
    counts = Counter(words(text))
    return [w for w, _ in counts.most_common(top)]
