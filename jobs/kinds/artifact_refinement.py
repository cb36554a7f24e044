"""The `artifact_refinement` kind: rank every artifact by rubric log-probabilities, summarize the
others, pass technical stories through verbatim (FEAT-075). Every prompt built goes to prompts.json."""
from __future__ import annotations

from typing import Any

from jobs.contract.atomic import write_atomic
from jobs.lib import artifacts, fewshot, rubric
from jobs.lib import grounded as guard
from jobs.lib.embed import Embedder

BODY_CHARS = 800           # of each artifact shown to the model
CRITERIA = {
    "specific": "Does this text give concrete details such as names, numbers or exact steps?",
    "actionable": "Does this text tell the reader what to do or what rule to follow?",
    "reusable": "Would this text help someone again in a similar situation years later?",
    "self-contained": "Can a stranger understand this text without any other context?",
}
# What a quote for each criterion should look like (MiniLM picks the artifact's closest sentence).
EVIDENCE = {
    "specific": "On 12 June at 21:40 the disk was at 100 percent, 2 GB a day.",
    "actionable": "Always do this first, then check that, and never skip this step.",
    "reusable": "The rule we follow since then, every time this happens.",
    "self-contained": "This explains what happened, why it happened and what we did.",
}
SUMMARY_RULES = guard.Rules(min_words=6, max_words=45)
EXAMPLE_TEXTS = [x for _, x, _ in fewshot.ARTIFACTS] + [y for *_, y in fewshot.ARTIFACTS]


def rubric_prompt(a: artifacts.Artifact, question: str) -> str:
    return (f"Text titled \"{a.title}\":\n{a.body[:BODY_CHARS].strip()}\n\n"
            f"Question: {question} Answer yes or no.\nAnswer:")


def summary_prompt(a: artifacts.Artifact, example: int = 0) -> str:
    """Few-shot for a base model: two fixed neutral texts with their summaries, then this one."""
    if a.is_technical_story:  # FEAT-075: a technical story never reaches summarization
        raise AssertionError(f"refusing to summarize technical story {a.id}")
    shots = "".join(f"Title: {t}\nText: {x}\nSummary: {y}\n\n"
                    for t, x, y in fewshot.rotate(fewshot.ARTIFACTS, example, 2))
    return (f"Short texts, each followed by a one-sentence summary.\n\n{shots}"
            f"Title: {a.title}\nText: {' '.join(a.body[:BODY_CHARS].split())}\nSummary:")


def quotes(items: list[artifacts.Artifact], embedder: Embedder) -> dict[str, dict[str, str]]:
    """Per artifact and criterion, the artifact's sentence closest to what that criterion looks
    like (shortened to a phrase): the evidence a reason quotes."""
    ev = dict(zip(EVIDENCE, embedder.embed(list(EVIDENCE.values()))))
    out = {}
    for a in items:
        sents = guard.sentences(a.body) or [a.title]
        vecs = embedder.embed(sents)
        out[a.id] = {c: _phrase(sents[max(range(len(sents)), key=lambda i: sum(
            x * y for x, y in zip(vecs[i], v)))]) for c, v in ev.items()}
    return out


def _phrase(sentence: str, max_words: int = 12) -> str:
    words = sentence.rstrip(".").split()
    return " ".join(words) if len(words) <= max_words else " ".join(words[:max_words]) + " …"


def run(params: dict[str, Any], ctx) -> dict[str, Any]:
    items = artifacts.load(ctx.roots.param("gems", params["gems"]), ctx.roots)
    to_summarize = [a for a in items if not a.is_technical_story]
    scoring = [(a, name, rubric_prompt(a, q)) for a in items for name, q in CRITERIA.items()]
    summarizing = [(a, summary_prompt(a, 0), summary_prompt(a, 1)) for a in to_summarize]
    # Written before the model sees anything, so what was asked is inspectable even on failure.
    ctx.write_json("prompts.json", [
        *({"purpose": "rubric", "artifact": a.id, "criterion": c, "prompt": p} for a, c, p in scoring),
        *({"purpose": "summarize", "artifact": a.id, "prompt": p}
          for a, *ps in summarizing for p in ps)])
    total = len(scoring) + len(summarizing)
    ctx.progress(0, total, "prompts", "scoring")
    embedder = Embedder()
    engine = ctx.model(params["batch_size"])
    try:
        logprobs = engine.option_logprobs([p for _, _, p in scoring], rubric.OPTIONS,
                                          progress=lambda d, t: ctx.progress(d, total, "prompts", "scoring"))
        asks = [guard.Ask(prompts=ps, source=a.body, rules=SUMMARY_RULES,
                          fallback=guard.central_sentence(a.body, embedder.embed),
                          echoes=[a.title, *EXAMPLE_TEXTS]) for a, *ps in summarizing]
        answers = engine.guarded(asks, max_new_tokens=int(params.get("max_new_tokens") or 40),
                                 progress=lambda d, t: ctx.progress(
                                     min(total - 1, len(scoring) + d * len(summarizing) // t), total, "prompts",
                                     "summarizing"))
        metrics = engine.summary()
    finally:
        engine.close()
    quoted = quotes(items, embedder)
    per: dict[str, dict[str, float]] = {a.id: {} for a in items}
    for (a, name, _), lp in zip(scoring, logprobs):
        per[a.id][name] = round(rubric.yes_probability(lp), 4)
    summary_of = {a.id: ans for (a, *_), ans in zip(summarizing, answers)}
    verbatim_dir = ctx.output_dir / "verbatim"
    verbatim_dir.mkdir(exist_ok=True)
    ranked = sorted(items, key=lambda a: (-rubric.score(per[a.id]), a.id))
    baseline = {c: sum(per[a.id][c] for a in items) / len(items) for c in CRITERIA}
    rows = []
    for rank, a in enumerate(ranked, 1):
        row = {"rank": rank, "id": a.id, "title": a.title, "kind": a.kind, "tags": list(a.tags),
               "score": round(rubric.score(per[a.id]), 4), "criteria": per[a.id],
               "reason": rubric.explain(per[a.id], quoted[a.id], baseline), "source": a.source}
        if a.is_technical_story:
            path = write_atomic(verbatim_dir / f"{a.id}.md", a.body.encode("utf-8"))
            row.update(treatment="verbatim", verbatim_path=str(path))
        else:
            ans = summary_of[a.id]
            row.update(treatment="summarized", summary=ans.text, extractive=ans.extractive,
                       provenance=ans.provenance, evidence=ans.evidence, rejected=ans.rejected)
        rows.append(row)
    ctx.progress(total, total, "prompts", "summarizing")
    ctx.write_text("refined.md", render_markdown(rows, {a.id: a for a in items}, metrics.get("model")))
    result = ctx.write_json("ranking.json", {"source": params["gems"], "criteria": CRITERIA,
                                             "artifacts": rows, "engine": metrics,
                                             "model": metrics.get("model"),
                                             "reason_provenance": "computed: rubric scores and quoted "
                                                                  "artifact sentences"})
    return {"result_path": str(result), "artifacts": len(rows),
            "verbatim": sum(r["treatment"] == "verbatim" for r in rows)}


def render_markdown(rows: list[dict[str, Any]], by_id: dict[str, artifacts.Artifact],
                    model: str | None = None) -> str:
    lines = ["# Refined artifacts", "",
             f"Ranked by rubric score (mean P(yes) over {len(CRITERIA)} criteria: "
             f"{', '.join(CRITERIA)}). Technical stories are "
             "reproduced verbatim and never summarized (FEAT-075).", "",
             f"Summaries are written by model `{model or 'the model'}` and checked claim by claim against "
             "their artifact; a summary marked *(extracted)* is the artifact's own most central sentence. "
             "Reasons are computed from the scores and quote the artifact.", ""]
    for r in rows:
        lines += [f"## {r['rank']}. {r['title']} ({r['kind']}, score {r['score']:.2f})", "",
                  f"Why: {r['reason']}", ""]
        if r["treatment"] == "verbatim":
            lines += ["Verbatim:", "", by_id[r["id"]].body.rstrip("\n"), ""]
        else:
            lines += [f"Summary: {r['summary']}{' *(extracted)*' if r.get('extractive') else ''}", ""]
    return "\n".join(lines) + "\n"
