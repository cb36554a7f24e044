"""Guarded generation: a validator for every generated field and the retry-then-extractive policy.
Stdlib only (the model and the embedder are passed in), so the rules are unit-tested without torch."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from jobs.lib import claims
from jobs.lib.claims import NUMBER_WORDS, stem, tokens
from jobs.lib.stoplist import STOPWORDS

_DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
LOOP_NGRAM = 3              # a word 3-gram said twice in one field is a loop
ECHO_NGRAM = 4              # a word 4-gram taken from an example is an echo
ECHO_MIN_WORDS = 12         # ...from a text at least this long (a title's 4-gram is fine, #30)
DANGLING = ("the following", "as follows", "following:")


def numbers(text: str) -> set[str]:
    """Digits and number words: a number the source does not hold is an invented fact."""
    return {w for w in tokens(text) if w.isdigit() or w in NUMBER_WORDS}


def content_words(text: str) -> set[str]:
    return {stem(w) for w in tokens(text) if w not in STOPWORDS and len(w) > 2 and not w.isdigit()}


def sentences(text: str) -> list[str]:
    """Sentences of prose; markdown headings, front matter markers and empty lines dropped."""
    lines = [re.sub(r"^\s*(?:[-*]|\d+\.)\s+", "", l).replace("**", "").strip()
             for l in text.splitlines()]
    prose = " ".join(l for l in lines if l and not l.startswith(("#", "---", "|")))
    return [s.strip() for s in _SENTENCE_END.split(prose) if len(tokens(s)) >= 3]


@dataclass(frozen=True)
class Rules:
    """What a field must be; every rule's rejection is one short reason string."""
    min_words: int = 3
    max_words: int = 60
    min_overlap: int = 1             # content words shared with the source
    sentence: bool = True            # must read as a clause: no trailing ':' or dangling phrase
    max_commas: int | None = None    # a title with more commas is a keyword list
    grounded_share: float = 0.0      # share of its content words the source must hold (titles: 1)


def check(text: str, *, source: str, echoes: Sequence[str] = (), rules: Rules = Rules(),
          forbid: Sequence[str] = (), exact: Sequence[str] = ()) -> str | None:
    """None when `text` is acceptable, else why not: empty, punctuation, too short/long, dangling,
    keyword list, echo (of a date, of anything in `echoes` such as the title or the few-shot
    example, or repeating one of `exact` whole: a theme title may reuse a note title's words),
    loop, contradiction (claims most content words of a `forbid` phrase, e.g. a requirement the
    CV lacks), invented number, ungrounded."""
    text = text.strip()
    if not text:
        return "empty"
    words = tokens(text)
    if not any(w.isalpha() for w in words):
        return "punctuation"
    if len(words) < rules.min_words:
        return "too short"
    if len(words) > rules.max_words:
        return "too long"
    if rules.sentence and (text.rstrip().endswith(":") or any(d in text.lower() for d in DANGLING)):
        return "dangling"
    if rules.max_commas is not None and text.count(",") > rules.max_commas:
        return "keyword list"
    if _DATE.search(text):
        return "echo: date"
    own = content_words(text)
    if any(_norm(text) == _norm(x) for x in exact):
        return "echo"
    grams4 = {tuple(words[i:i + ECHO_NGRAM]) for i in range(len(words) - ECHO_NGRAM + 1)}
    for echo in echoes:
        if echo and (_norm(text) in _norm(echo) or (own and own <= content_words(echo))):
            return "echo"
        e = tokens(echo)
        # A 4-gram of a long text (a worked example) is a copy; of a short title, it names the subject.
        if len(e) >= ECHO_MIN_WORDS and grams4 & {tuple(e[i:i + ECHO_NGRAM])
                                                  for i in range(len(e) - ECHO_NGRAM + 1)}:
            return "echo"
    grams = [tuple(words[i:i + LOOP_NGRAM]) for i in range(len(words) - LOOP_NGRAM + 1)]
    if len(grams) != len(set(grams)) or any(
            w not in STOPWORDS and len(w) > 3 and w in words[i + 1:i + 3] for i, w in enumerate(words)):
        return "loop"
    for phrase in forbid:
        f = content_words(phrase)
        if len(f) >= 2 and len(f & own) >= max(2, 0.6 * len(f)):
            return "contradiction"
    if numbers(text) - numbers(source):
        return "invented number"
    grounded = own & content_words(source)
    if len(grounded) < rules.min_overlap or len(grounded) < rules.grounded_share * len(own):
        return "ungrounded"
    return None


def _norm(text: str) -> str:
    return " ".join(tokens(text))


def clean(text: str, limit_chars: int = 300) -> str:
    """The completion's first sentence, whitespace folded, quotes and list markers trimmed."""
    text = " ".join(text.split()).strip(" \"'`*-")
    for i, ch in enumerate(text):
        if ch in ".!?" and (i + 1 == len(text) or text[i + 1] == " "):
            return text[:i + 1]
    return text[:limit_chars]


@dataclass
class Ask:
    """One generated field: the prompts to try in order (each with a different few-shot example),
    the source it must be grounded in, what it must not echo, and the extractive answer."""
    prompts: Sequence[str]
    source: str
    fallback: str
    echoes: Sequence[str] = ()
    rules: Rules = Rules()
    prefix: str = ""                # text the prompt already committed to ("The candidate")
    forbid: Sequence[str] = ()      # phrases the answer must not claim (see check)
    exact: Sequence[str] = ()       # texts the answer must not repeat whole (see check)
    # A sentence shown as the model's must be supported by the source, claim by claim (claims.align);
    # off only for fields that are not statements (a theme title).
    claim_check: bool = True
    facts: Callable[[str], str | None] | None = None   # computed facts the text must agree with


EXTRACTED = "extracted"             # a source sentence, shown because every model try was rejected
CHECKED = "model, checked"          # the model's sentence, each claim aligned with a source sentence
UNCHECKED = "model"                 # the model's text, checked by the field rules only (titles)


@dataclass
class Answer:
    text: str
    extractive: bool
    rejected: list[str] = field(default_factory=list)   # one reason per rejected try
    evidence: str = ""                                   # the source sentence(s) the text aligned with
    provenance: str = ""

    def __post_init__(self) -> None:
        if not self.provenance:
            self.provenance = EXTRACTED if self.extractive else CHECKED

    def as_json(self) -> dict:
        return {"text": self.text, "provenance": self.provenance, "extractive": self.extractive,
                "evidence": self.evidence, "rejected": self.rejected}


Complete = Callable[[list[str]], list[str]]


def verdict(ask: Ask, out: str) -> tuple[str, str | None, str]:
    """(shown text, why it is rejected or None, the aligned source sentence) for one completion."""
    text = clean(f"{ask.prefix} {out}" if ask.prefix else out)
    why = check(out if ask.prefix else text, source=ask.source, echoes=ask.echoes, rules=ask.rules,
                forbid=ask.forbid, exact=ask.exact)
    evidence = ""
    if why is None and ask.claim_check:
        v = claims.align(text, ask.source)
        why, evidence = (None, v.evidence) if v.ok else (f"unsupported ({v.reason})", "")
    if why is None and ask.facts is not None:
        why = ask.facts(text)
    return text, why, evidence


def generate(asks: Sequence[Ask], complete: Complete) -> list[Answer]:
    """Try every ask's first prompt in one batch, its next prompt for those rejected, and so on;
    an ask whose every try is rejected gets its extractive fallback (marked as such)."""
    answers: list[Answer | None] = [None] * len(asks)
    rejected: list[list[str]] = [[] for _ in asks]
    for attempt in range(max((len(a.prompts) for a in asks), default=0)):
        todo = [i for i, a in enumerate(asks) if answers[i] is None and attempt < len(a.prompts)]
        if not todo:
            break
        outs = complete([asks[i].prompts[attempt] for i in todo])
        for i, out in zip(todo, outs):
            text, why, evidence = verdict(asks[i], out)
            if why is None:
                answers[i] = Answer(text, False, rejected[i], evidence,
                                    CHECKED if asks[i].claim_check else UNCHECKED)
            else:
                rejected[i].append(f"{why}: {text[:80]!r}")
    return [ans or Answer(a.fallback, True, rejected[i]) for i, (a, ans) in enumerate(zip(asks, answers))]


def central_sentence(text: str, embed: Callable[[list[str]], list[list[float]]],
                     max_words: int = 40) -> str:
    """The sentence closest to the mean of all the text's sentences (MiniLM vectors): the text's
    most central sentence, the extractive stand-in for a summary."""
    cands = sentences(text) or [" ".join(text.split())[:200]]
    if len(cands) == 1:
        return _shorten(cands[0], max_words)
    vecs = embed(cands)
    mean = [sum(col) / len(vecs) for col in zip(*vecs)]
    best = max(range(len(cands)), key=lambda i: (sum(x * y for x, y in zip(vecs[i], mean)), -i))
    return _shorten(cands[best], max_words)


def _shorten(sentence: str, max_words: int) -> str:
    words = sentence.split()
    return sentence if len(words) <= max_words else " ".join(words[:max_words]) + " …"
