"""The claim check (jobs/lib/claims.py) on the cases issue #30 quoted, and its precision/recall floors on
the hand-labelled real outputs in tests/data/claims/pairs.jsonl (floors: what was measured, rounded down)."""
from __future__ import annotations

from pathlib import Path

import pytest

from jobs.lib import claims, claims_eval

ROOT = Path(__file__).resolve().parents[2]
ARCHIVE = ROOT / "examples" / "archive"
OWN = ROOT / "tests" / "data" / "claims"
LLAMA = (OWN / "own_notes" / "2025-01-11-llama-on-the-desktop.md").read_text()
BIKE = (ARCHIVE / "2009-03-14-first-bike-tour.md").read_text()
ROSE = (ARCHIVE / "2010-10-12-reading-the-name-of-the-rose.md").read_text()
RECIPES = (ARCHIVE / "2007-11-19-grandmother-recipes.md").read_text()
CV = (OWN / "own_cv" / "cv-frontend.md").read_text()


def test_the_false_sentences_issue_30_quotes_are_rejected():
    assert not claims.align("I ran Llama locally on a 70B model.", LLAMA).ok
    assert not claims.align("I'm using this script to search my notes for similar months.", LLAMA).ok
    assert not claims.align("First bike tour: I learned to ride a bike.", BIKE).ok
    assert not claims.align("Reading The Name of the Rose: I read the short stories of Lea, and I was "
                            "surprised to find that she was a writer.", ROSE).ok


def test_true_sentences_are_kept_with_their_evidence():
    v = claims.align("The 13B model ran at 30 tokens per second.", LLAMA)
    assert v.ok and "13B" in v.evidence
    assert claims.align("I finished The Name of the Rose after two months.", ROSE).ok
    assert claims.align("I measured for her that a handful of flour is about 120 grams.", RECIPES).ok


def test_numbers_names_qualifiers_and_negation_must_align():
    assert not claims.align("The 13B model ran at 40 tokens per second.", LLAMA).ok          # number
    assert not claims.align("I drove to work on Mondays and Thursdays.",                      # my sister did
                            (OWN / "own_notes" / "2025-03-15-broken-wrist.md").read_text()).ok
    assert not claims.align("The bike tour was three days along the river to Lisbon.", BIKE).ok  # name
    facts = "The candidate lacks Kubernetes in production.\n" + CV
    assert not claims.align("The candidate has Kubernetes in production.", facts).ok       # basic only
    assert claims.align("The candidate lacks Kubernetes in production.", facts).ok
    assert claims.align("The candidate has basic Kubernetes skills.", facts).ok


def test_a_wish_a_plan_or_homework_is_not_a_fact():
    python = (ARCHIVE / "2008-02-10-learning-python.md").read_text()   # "Marta asked if the script could…"
    v = claims.align("I learned to use a loop to count pages per customer.", python)
    assert not v.ok and "a wish or plan" in v.reason
    assert claims.align("Marta asked if the script could count pages per customer.", python).ok
    stats = (ARCHIVE / "2009-09-30-evening-class-statistics.md").read_text()   # "Homework: measure …"
    assert not claims.align("I measured the press for two weeks and plotted the results.", stats).ok
    junior = (ARCHIVE / "2013-05-28-junior-developer-offer.md").read_text()   # "She wants me to keep…"
    assert not claims.align("I keep doing the bakery site.", junior).ok


def test_counts_negation_scope_and_where_me_stands():
    burnout = (ARCHIVE / "2018-11-25-burnout-warning.md").read_text()   # "taking two weeks off"
    assert not claims.align("I'm taking a week off.", burnout).ok
    assert claims.align("I'm taking two weeks off.", burnout).ok
    # "Baking on Saturday mornings is the one ritual the pandemic did not break": the negation is the
    # pandemic's, not the baking's.
    sourdough = (ARCHIVE / "2020-09-05-sourdough-again.md").read_text()
    assert claims.align("I bake on Saturday mornings.", sourdough).ok
    assert not claims.align("I do not bake on Saturday mornings.", sourdough).ok
    dike = (ARCHIVE / "2018-06-09-bike-tour-to-the-sea.md").read_text()   # "riding … the wind behind me"
    assert claims.align("I rode the dike with the wind behind me for once.", dike).ok


def test_an_obligation_a_ranking_a_state_and_the_jobs_own_title():
    held = OWN / "heldout_notes"
    wallet = (held / "2026-03-21-lost-wallet.md").read_text()   # "I still have to order new cards"
    v = claims.align("I had to order new cards, which took about a week.", wallet)
    assert not v.ok and "obligation" in v.reason
    assert claims.align("I still have to order new cards.", wallet).ok
    shift = (held / "2026-02-07-night-shift.md").read_text()   # "Worked my first night shift"
    assert not claims.align("I was the first to work at the warehouse.", shift).ok
    assert claims.align("I worked my first night shift at the warehouse.", shift).ok
    bank = (held / "2026-04-18-food-bank.md").read_text()   # "Rosa … put me on the till in the last hour"
    assert claims.align("I was on the till for the last hour.", bank).ok
    assert not claims.align("I put Rosa on the till for the last hour.", bank).ok
    source = "The job is Site reliability engineer.\nThe candidate lacks Linux servers and networking.\n" + CV
    assert not claims.align("The candidate has been a site reliability engineer.", source).ok
    assert claims.align("The job is site reliability engineer.", source).ok


def test_a_rationale_must_agree_with_the_computed_facts():
    good = "The candidate has worked as a frontend developer and is a good candidate for the job."
    assert claims.agrees_with_facts(good, 0, 4, ["TypeScript"]) == "praise at 0 of 4 requirements"
    assert claims.agrees_with_facts(good, 4, 4, []) is None
    assert claims.agrees_with_facts("The candidate meets all requirements.", 3, 4, ["Go"]) is not None
    assert claims.agrees_with_facts("The candidate builds web shops but lacks React.", 1, 4, ["React"]) is None


# Floors: what was measured on each set (docs/quality.md; 2-core x86 CPU VM), rounded down, for the check of
# 2026-12-07. pairs.jsonl is the development set the rules were chosen on; pairs-heldout.jsonl was held out,
# measured once (precision 0.800, recall 0.769, 4 of 35 shown false) and then used for a second round of
# rules; pairs-heldout2.jsonl was collected and labelled blind after that round and measured once, untouched.
# Per set: pairs, true, false, precision, recall, shown-false share (replayed runs), model-written share.
FLOORS = {
    "pairs.jsonl": (136, 63, 73, 0.96, 0.80, 0.015, 0.52),           # measured 0.962 / 0.810 / 1 of 68 / 0.529
    "pairs-heldout.jsonl": (70, 26, 44, 0.95, 0.80, 0.029, 0.37),    # measured 0.955 / 0.808 / 1 of 35 / 0.371
    "pairs-heldout2.jsonl": (80, 62, 18, 0.94, 0.77, 0.025, 0.80),   # measured 0.941 / 0.774 / 1 of 40 / 0.800
}


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_floors_on_the_labelled_real_outputs(name):
    n, true, false, precision, recall, shown_false, model_written = FLOORS[name]
    pairs = claims_eval.load_pairs(OWN / name)
    assert len(pairs) >= n and sum(p["label"] for p in pairs) >= true
    assert sum(not p["label"] for p in pairs) >= false
    shipped = claims_eval.METHODS["rules + align + facts (shipped)"]
    c = claims_eval.confusion(pairs, shipped)
    assert c["precision"] >= precision and c["recall"] >= recall
    # The check must beat what shipped before on the same pairs, or it is not worth its misses.
    assert c["precision"] > claims_eval.confusion(pairs, claims_eval.METHODS["overlap (before)"])["precision"]
    run = claims_eval.replay(pairs, shipped)
    assert run["shown_false_share"] <= shown_false and run["model_written_share"] >= model_written
