"""The claim check: is a model-written sentence supported by its cited source, sentence by sentence?
Stdlib only; the methods compared on tests/data/claims/pairs.jsonl by bench/quality_bench.py."""
from __future__ import annotations

import re
from dataclasses import dataclass

from jobs.lib.stoplist import FUNCTION_WORDS

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*|\d+")
NUMBER_WORDS = frozenset("""one two three four five six seven eight nine ten eleven twelve twenty
thirty forty fifty hundred thousand million""".split())


def tokens(text: str) -> list[str]:
    return [w.lower().strip("'-") for w in _WORD.findall(text)]


def stem(word: str) -> str:
    """Crude but enough to match "recipes"/"recipe", "working"/"work", "riding"/"ride", "stopped"/"stop":
    one inflection off, a doubled final consonant and a final e dropped, five letters kept."""
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 2 and not word.endswith("ss"):
            word = word[:-len(suffix)]
            if suffix in ("ing", "ed") and len(word) > 2 and word[-1] == word[-2] and word[-1] not in "aeiousl":
                word = word[:-1]
            break
    if word.endswith("e") and len(word) >= 3:
        word = word[:-1]
    return word[:5]

NEGATIONS = frozenset("""not no never nobody nothing none without lack lacks lacking missing neither nor
n't cannot""".split())
# A qualifier says how much or how far: claimed, it must be in the aligned source sentence (issue #30:
# "Kubernetes (basic)" is not "Kubernetes in production").
QUALIFIERS = frozenset("""basic intermediate advanced fluent native expert senior junior production
professional beginner first last only all every both most many several few""".split())
# Words that name who the text is about, not what happened: never a claim of their own.
SUBJECT = frozenset("candidate candidates author writer note notes text summary i me my we our".split())
# Praise is a judgement the sources never state; a rationale may give it only when the facts do.
PRAISE = frozenset("""good great strong excellent ideal perfect perfectly well-suited suitable suited
qualified fit fits fitting match matches right impressive solid""".split())
# A source clause that only wishes, plans, asks, obliges or compares ("Marta asked if the script could
# count pages", "She wants me to keep doing the site", "I still have to order new cards", "feels like a
# promise") does not support the same words stated as done: the claim must carry the same mood.
IRREALIS = frozenset("""maybe perhaps might could would should hope hopes hoping plan plans planned planning
want wants wanted wish wishes if whether next someday probably will homework todo goal goals idea""".split())
MOODS = {"a wish or plan": re.compile(r"\b(?:" + "|".join(sorted(IRREALIS)) + r")\b|\bgoing to\b|'ll\b",
                                      re.IGNORECASE),
         "an obligation": re.compile(r"\b(?:have|has|need|needs) to\b|\bmust\b", re.IGNORECASE),
         "a comparison": re.compile(r"\b(?:feels?|felt|looks?|looked) like\b|\bas if\b|\bseem(?:s|ed)?\b",
                                    re.IGNORECASE)}
# "the first to", "the only one who": a ranking among others, which "my first night shift" does not support.
_RANK = re.compile(r"\bthe (first|only|last)(?: one| person)? (?:to|who)\b", re.IGNORECASE)
# A posting's title names the job, not what the candidate has been: it supports only a claim about the job.
_JOB_LINE = re.compile(r"^the job is\b", re.IGNORECASE)
_ABOUT_JOB = frozenset("job role position posting".split())
COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
          "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "twenty": 20, "thirty": 30,
          "forty": 40, "fifty": 50, "hundred": 100}
# "me" after these is where or with whom, not someone doing the claim's act for me ("wind behind me").
_PLACE_PREPOSITIONS = frozenset("behind with beside near around about than like of from at in on into".split())
_SPLIT = re.compile(r"(?<=[.!?;])\s+|\n+")
# Clause boundaries inside a sentence: a claim aligns with a few adjacent clauses, so "She does not
# measure anything, so I measured for her" holds a negation for one clause, not for the other.
_CLAUSE = re.compile(r",\s+(?=(?:so|but|and|because|while|which|although|though)\b)|[:;]\s+|\s+[-–—]\s+")
IRREGULAR = {"ran": "run", "went": "go", "gone": "go", "began": "begin", "begun": "begin", "wrote": "write",
             "written": "write", "took": "take", "taken": "take", "gave": "give", "given": "give",
             "made": "make", "left": "leave", "met": "meet", "sold": "sell", "bought": "buy",
             "taught": "teach", "learnt": "learn", "felt": "feel", "kept": "keep", "lost": "lose",
             "found": "find", "came": "come", "got": "get", "sang": "sing", "sung": "sing",
             "broke": "break", "broken": "break", "built": "build", "spent": "spend", "read": "read",
             "drove": "drive", "driven": "drive", "slept": "sleep", "thought": "think", "told": "tell",
             "grew": "grow", "ate": "eat", "rode": "ride", "ridden": "ride", "fell": "fall", "led": "lead"}


def _key(word: str) -> str:
    return stem(IRREGULAR.get(word, word))


def content(text: str) -> list[str]:
    """The claim-bearing words in order: not function words nor subject words; digits kept."""
    return [w for w in tokens(text) if w not in FUNCTION_WORDS and w not in SUBJECT
            and (len(w) > 2 or w.isdigit())]


def source_units(source: str) -> list[str]:
    """The source's sentences, headings and list items each a unit (a title is a statement too)."""
    lines = [re.sub(r"^\s*(?:#+|[-*]|\d+\.)\s*", "", l).replace("**", "").strip() for l in source.splitlines()]
    out = []
    for line in lines:
        if line and not line.startswith(("---", "|")):
            out += [s.strip() for s in _SPLIT.split(line) if s.strip()]
    return out


def _names(sentence: str) -> set[str]:
    """Capitalised words past a sentence's first word, digits and number words: names and numbers."""
    words = re.findall(r"[A-Za-z][A-Za-z'-]*|\d+(?:[.,]\d+)?[A-Za-z]*", sentence)
    out = {w.lower() for i, w in enumerate(words) if i > 0 and w[0].isupper() and w.lower() not in SUBJECT
           and w not in ("I", "The")}
    return out | {w.lower() for w in words if w[0].isdigit() or w.lower() in NUMBER_WORDS}


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""                 # why not, in a few words
    evidence: str = ""               # the source sentence(s) the claim aligned with
    coverage: float = 0.0


# A one- or two-word label before a colon ("Homework:", "Next step:") governs its clause: kept with it.
_LABEL = re.compile(r"^(\w+(?: \w+)?):\s+")


def clauses(source: str) -> list[str]:
    return [c.strip() for u in source_units(source) for c in _CLAUSE.split(_LABEL.sub(r"\1 ", u)) if c.strip()]


# Where one sentence makes two claims: "X and has Y", "X, but lacks Y", "X and I Y".
_COORD = re.compile(r",?\s+(?:and|but|while|so)\s+(?=(?:has|have|had|is|was|were|would|will|lacks?|needs?|"
                    r"I|she|he|they|we|it)\b)", re.IGNORECASE)


def align(claim: str, source: str, *, min_coverage: float = 0.8, window: int = 2) -> Verdict:
    """Every claim of the sentence (its coordinated parts) supported on its own; see align_one."""
    parts = [p for p in _COORD.split(claim) if content(p)]
    if len(parts) <= 1:
        return align_one(claim, source, min_coverage=min_coverage, window=window)
    verdicts = [align_one(p, source, min_coverage=min_coverage, window=window) for p in parts]
    bad = next((v for v in verdicts if not v.ok), None)
    if bad is not None:
        return bad
    return Verdict(True, "", " / ".join(v.evidence for v in verdicts), min(v.coverage for v in verdicts))


def _moods(text: str) -> set[str]:
    return {name for name, pattern in MOODS.items() if pattern.search(text)}


def _negated(words: list[str], keys: set[str] | None) -> bool:
    """A negation in `words`; with `keys`, only one that governs a word of the claim (one of the next
    three words), so "the ritual the pandemic did not break" does not negate "I baked on Saturdays"."""
    for i, w in enumerate(words):
        if w in NEGATIONS or w.endswith("n't"):
            if keys is None or any(_key(x) in keys for x in words[i + 1:i + 4]):
                return True
    return False


def _counts(words: list[str]) -> dict[str, int]:
    """What is counted and how many: {"week": 2} for "two weeks", {"week": 1} for "a week"."""
    out = {}
    for a, b in zip(words, words[1:]):
        n = COUNTS.get(a) if not a.isdigit() else int(a)
        if n is not None and b not in FUNCTION_WORDS and not b.isdigit() and b not in COUNTS:
            out[_key(b)] = n
    return out


def _done_for_me(words: list[str]) -> bool:
    """'me' as the object of someone's act ("my sister drives me"), not a place ("the wind behind me")."""
    return any(w == "me" and (i == 0 or words[i - 1] not in _PLACE_PREPOSITIONS) for i, w in enumerate(words))


def align_one(claim: str, source: str, *, min_coverage: float = 0.8, window: int = 2) -> Verdict:
    """Supported when `window` adjacent clauses of the source hold at least `min_coverage` of the
    claim's content words, every name and number it states, every qualifier and count, the same
    polarity, the same doer, and the same mood (a wish or plan in the source is not a fact)."""
    words = content(claim)
    if not words:
        return Verdict(False, "no claim")
    units = clauses(source)
    if not _ABOUT_JOB & set(tokens(claim)):
        units = [u for u in units if not _JOB_LINE.match(u)]
    keys = [_key(w) for w in words]
    key_set = set(keys)
    names = _names(claim)
    claim_words = tokens(claim)
    claim_counts = _counts(claim_words)
    claim_negated = _negated(claim_words, None)
    claim_moods = _moods(claim)
    rank = _RANK.search(claim)
    # "I was on the till" states where I was, not who put me there: no doer check for a state.
    state = claim_words[1:2] in (["was"], ["am"], ["were"]) and not claim_words[2:3][0].endswith("ing") \
        if len(claim_words) > 2 else False
    agent = next((w for w in claim_words[:3] if w in ("she", "he", "they")), None)
    best: Verdict | None = None
    for i in range(len(units)):
        for j in range(i + 1, min(i + window, len(units)) + 1):
            text = " ".join(units[i:j])
            text_words = tokens(text)
            have = {_key(w) for w in text_words}
            held = [(sum(_key(w) in key_set for w in tokens(u)), u) for u in units[i:j]]
            # Who did it is read from the clause holding most of the claim's words; the mood from
            # every clause that gives it two or more.
            main = tokens(max(held, key=lambda h: h[0])[1])
            givers = [u for n, u in held if n >= 2] or [max(held, key=lambda h: h[0])[1]]
            source_counts = _counts(text_words)
            cov = sum(k in have for k in keys) / len(keys)
            missing_names = {n for n in names if _key(n) not in have and n not in text.lower()}
            reason = ""
            if missing_names:
                reason = f"name or number not in the source sentence: {sorted(missing_names)[0]}"
            elif any(source_counts.get(k, n) != n for k, n in claim_counts.items()):
                reason = "a count differs from the source sentence"
            elif agent and agent not in main and "i" in main:
                reason = f"who did it differs: '{agent}' where the source says 'I'"
            elif claim_words[:1] == ["i"] and not state and _done_for_me(main) and "i" not in main:
                reason = "who did it differs: 'I' where the source says someone did it for me"
            elif any(q in words and _key(q) not in have for q in QUALIFIERS):
                reason = "qualifier not in the source sentence"
            elif claim_negated != _negated(text_words, key_set):
                reason = "negation differs from the source sentence"
            elif any(_moods(u) - claim_moods for u in givers):
                mood = sorted(set().union(*(_moods(u) for u in givers)) - claim_moods)[0]
                reason = f"the source states {mood} where the sentence states a fact"
            elif rank and not any(m.group(1).lower() == rank.group(1).lower() for m in _RANK.finditer(text)):
                reason = f"a ranking ('the {rank.group(1).lower()} to/who') the source does not make"
            elif cov < min_coverage:
                reason = f"only {cov:.0%} of its words in one source sentence"
            v = Verdict(not reason, reason, text, round(cov, 3))
            if best is None or (v.ok, v.coverage) > (best.ok, best.coverage):
                best = v
    return best or Verdict(False, "empty source")


def agrees_with_facts(rationale: str, covered: int, total: int, gaps: list[str]) -> str | None:
    """None when a CV rationale fits the computed coverage, else why not: praise when fewer than half
    the requirements are met, or 'meets all'/'no gaps' while some are missing."""
    words = set(tokens(rationale))
    if covered * 2 < total and words & PRAISE:
        return f"praise at {covered} of {total} requirements"
    if covered == 0 and re.search(r"\b(has|meets|brings|with) (the )?(experience|skills)\b", rationale.lower()):
        return f"claims experience at 0 of {total} requirements"
    if gaps and re.search(r"\b(all|every) (the )?(requirements?|skills)\b|\bno gaps\b", rationale.lower()):
        return "claims every requirement while some are missing"
    return None
