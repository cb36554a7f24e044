"""The validators of guarded generation (jobs/lib/grounded.py), each rejection rule shown with a real
bad output captured from the jobs on Gemma-3-270M (2026-11-30 runs over examples/), and the
retry-then-extractive policy with a scripted completer."""
from __future__ import annotations

from pathlib import Path

from jobs.lib import grounded as guard
from jobs.lib import keyphrases

ROOT = Path(__file__).resolve().parents[2]
RECIPES = (ROOT / "examples/archive/2007-11-19-grandmother-recipes.md").read_text()
BOOK = (ROOT / "examples/gems/g08-grandmothers-book.md").read_text()
CV = (ROOT / "examples/cv/cv.md").read_text()


def test_each_rule_rejects_a_real_bad_output():
    # nightly_insights, "Grandmother's recipes": the model answered only ":".
    assert guard.check(":", source=RECIPES) == "punctuation"
    assert guard.check("", source=RECIPES) == "empty"
    # nightly_insights: "about the following:" and the title restated.
    assert guard.check("the notes are about the following:", source=RECIPES) == "dangling"
    assert guard.check("learning Python in the evenings.", source="Python evenings",
                       echoes=["Learning Python in the evenings"]) == "echo"
    # nightly_insights (issue #17): "about the 2024-02-18."
    assert guard.check("about the 2024-02-18 and the models.", source="models") == "echo: date"
    # artifact_refinement, g08: a loop.
    looped = ('the book was "a book of recipes" and that it was "a book of recipes" because it was '
              '"a book of recipes".')
    assert guard.check(looped, source=BOOK) == "loop"
    # cv_matching (issue #17): a rationale about a different candidate.
    assert guard.check("The candidate is a data analyst with experience in revenue management.",
                       source="Site reliability engineer; Linux servers; incident response") \
        == "ungrounded"
    # nightly_insights titles before #17: a keyword list.
    assert guard.check("print, shop, appeared", source="print shop",
                       rules=guard.Rules(min_words=2, sentence=False, max_commas=0)) == "keyword list"
    assert guard.check("the tour", source="tour") == "too short"
    # artifact_refinement, g10: the few-shot example's summary pasted onto the bike-tour list.
    assert guard.check("Packing list for a week-long bike tour: fuel, cleaning, mileage, key and "
                       "damage reports.", source="bike tour packing list", echoes=[
                           "A checklist for returning the club van: fuel, cleaning, mileage, key "
                           "and damage reports."]) == "echo"
    # cv_matching, ML research scientist: the CV has none of it.
    assert guard.check("has worked in a research lab and has a PhD in machine learning.",
                       source="PhD in machine learning", forbid=[
                           "PhD in machine learning or a related field"]) == "contradiction"
    # cv_matching, team lead: "a team of 10 people" (the CV says seven).
    assert guard.check("has lead a team of 10 people and has experience in cloud infrastructure.",
                       source="Lead a team of seven. cloud infrastructure") == "invented number"
    # cv_matching, site reliability engineer: a stutter.
    assert guard.check("has been in the field for 10 years and has been a reliable and reliable "
                       "site reliability engineer.", source="Site reliability engineer") == "loop"
    # cv_matching, team lead: claims the very requirement listed as a gap.
    assert guard.check("has worked as a team lead, booking platform, and has experience leading a "
                       "small engineering team.", source="team lead booking platform",
                       forbid=["Experience leading a small engineering team"]) == "contradiction"


def test_a_title_may_reuse_words_of_a_note_title_but_not_repeat_it():
    rules = guard.Rules(min_words=2, sentence=False, max_commas=0, grounded_share=1.0)
    assert guard.check("Bike tour", source="bike tour", exact=["First bike tour"], rules=rules) is None
    assert guard.check("First bike tour", source="bike tour", exact=["First bike tour"],
                       rules=rules) == "echo"
    # nightly_insights, whole archive: the few-shot example's title, reworded, for a health theme.
    assert guard.check("Work in the garden", source="desk physiotherapist burnout work",
                       echoes=["Working in the garden"], rules=rules) == "echo"
    assert guard.check("Work in the office", source="desk physiotherapist burnout work",
                       rules=rules) == "ungrounded"


def test_a_grounded_sentence_passes():
    assert guard.check("I copied my grandmother's recipes into a notebook and measured them.",
                       source=RECIPES, echoes=["Grandmother's recipes"]) is None


def test_retry_uses_the_next_prompt_then_the_extractive_fallback():
    asks = [guard.Ask(prompts=["p0", "p1"], source=RECIPES, fallback="FALLBACK A"),
            guard.Ask(prompts=["q0", "q1"], source=RECIPES, fallback="FALLBACK B")]
    seen: list[list[str]] = []
    scripted = {"p0": ":", "p1": "I measured for her that a handful of flour is about 120 grams.",
                "q0": "", "q1": "about the following:"}

    def complete(prompts: list[str]) -> list[str]:
        seen.append(prompts)
        return [scripted[p] for p in prompts]

    a, b = guard.generate(asks, complete)
    assert seen == [["p0", "q0"], ["p1", "q1"]]          # one batch per attempt
    assert not a.extractive and a.text.startswith("I measured") and a.rejected == ["punctuation: ':'"]
    assert b.extractive and b.text == "FALLBACK B" and len(b.rejected) == 2


def test_central_sentence_is_the_one_nearest_the_mean():
    # A stand-in embedder with known geometry: the middle sentence sits between the other two.
    vecs = {"Alpha beta gamma one.": [1.0, 0.0], "Alpha beta gamma two.": [0.7, 0.7],
            "Alpha beta gamma three.": [0.0, 1.0]}
    text = " ".join(vecs)
    assert guard.central_sentence(text, lambda xs: [vecs[x] for x in xs]) == "Alpha beta gamma two."


def test_keyphrases_drop_stopwords_and_prefer_what_the_group_shares():
    docs = [["print shop", "print", "layout"], ["print shop", "print", "invoice"],
            ["bread", "sourdough"], ["bread", "oven"]]
    scores = keyphrases.class_tfidf([docs[:2], docs[2:]])
    assert max(scores[0], key=scores[0].get) == "print shop"
    assert max(scores[1], key=scores[1].get) == "bread"
    assert "afternoon" not in keyphrases.candidates("In the afternoon, along the river, already late")
    assert keyphrases.candidates("the print shop's new print shop")[:2] == ["print", "shop"]
    assert "print shop" in keyphrases.candidates("the print shop's new print shop")
    assert "hands blistered" not in keyphrases.candidates("my hands blistered on the bike")
    assert keyphrases.label(["layout", "print shop"]) == "Print shop"
    assert keyphrases.label(["bread", "oven"]) == "Bread and oven"


def test_mmr_skips_near_duplicates():
    phrases = ["bike tour", "bike", "tent"]
    vecs = [[1.0, 0.0], [0.99, 0.14], [0.6, 0.8]]
    assert keyphrases.mmr(phrases, vecs, [1.0, 0.0], k=2) == ["bike tour", "tent"]
