"""The `artifact_refinement` kind: rank every artifact by rubric log-probabilities, summarize the
others, pass technical stories through verbatim (FEAT-075). Every prompt built goes to prompts.json."""
from __future__ import annotations

from typing import Any

from .atomic import write_atomic
from .lib import artifacts, rubric
from .lib.llm import first_sentence

BODY_CHARS = 800           # of each artifact shown to the model
CRITERIA = {
    "specific": "Is this text specific and concrete, with real details?",
    "useful": "Would this text be worth rereading in a few years?",
}


def rubric_prompt(a: artifacts.Artifact, question: str) -> str:
    return (f"Text titled \"{a.title}\":\n{a.body[:BODY_CHARS].strip()}\n\n"
            f"Question: {question} Answer yes or no.\nAnswer:")


def summary_prompt(a: artifacts.Artifact) -> str:
    if a.is_technical_story:  # FEAT-075: a technical story never reaches summarization
        raise AssertionError(f"refusing to summarize technical story {a.id}")
    return f"Text titled \"{a.title}\":\n{a.body[:BODY_CHARS].strip()}\n\nIn one sentence, the text says that"


def run(params: dict[str, Any], ctx) -> dict[str, Any]:
    items = artifacts.load(ctx.roots.param("gems", params["gems"]), ctx.roots)
    to_summarize = [a for a in items if not a.is_technical_story]
    scoring = [(a, name, rubric_prompt(a, q)) for a in items for name, q in CRITERIA.items()]
    summarizing = [(a, summary_prompt(a)) for a in to_summarize]
    # Written before the model sees anything, so what was asked is inspectable even on failure.
    ctx.write_json("prompts.json", [
        *({"purpose": "rubric", "artifact": a.id, "criterion": c, "prompt": p} for a, c, p in scoring),
        *({"purpose": "summarize", "artifact": a.id, "prompt": p} for a, p in summarizing)])
    total = len(scoring) + len(summarizing)
    ctx.progress(0, total, "prompts")
    engine = ctx.model(params["batch_size"])
    try:
        logprobs = engine.option_logprobs([p for _, _, p in scoring], rubric.OPTIONS,
                                          progress=lambda d, t: ctx.progress(d, total, "prompts"))
        summaries = engine.complete(
            [p for _, p in summarizing], max_new_tokens=int(params.get("max_new_tokens") or 40),
            stop=("\n",), progress=lambda d, t: ctx.progress(
                len(scoring) + d * len(summarizing) // t, total, "prompts"))
        metrics = engine.summary()
    finally:
        engine.close()
    per: dict[str, dict[str, float]] = {a.id: {} for a in items}
    for (a, name, _), lp in zip(scoring, logprobs):
        per[a.id][name] = round(rubric.yes_probability(lp), 4)
    summary_of = {a.id: first_sentence(s) for (a, _), s in zip(summarizing, summaries)}
    verbatim_dir = ctx.output_dir / "verbatim"
    verbatim_dir.mkdir(exist_ok=True)
    ranked = sorted(items, key=lambda a: (-rubric.score(per[a.id]), a.id))
    rows = []
    for rank, a in enumerate(ranked, 1):
        row = {"rank": rank, "id": a.id, "title": a.title, "kind": a.kind, "tags": list(a.tags),
               "score": round(rubric.score(per[a.id]), 4), "criteria": per[a.id],
               "reason": rubric.reason(per[a.id]), "source": a.source}
        if a.is_technical_story:
            path = write_atomic(verbatim_dir / f"{a.id}.md", a.body.encode("utf-8"))
            row.update(treatment="verbatim", verbatim_path=str(path))
        else:
            row.update(treatment="summarized", summary=summary_of[a.id] or a.title)
        rows.append(row)
    ctx.progress(total, total, "prompts")
    ctx.write_text("refined.md", render_markdown(rows, {a.id: a for a in items}))
    result = ctx.write_json("ranking.json", {"source": params["gems"], "criteria": CRITERIA,
                                             "artifacts": rows, "engine": metrics})
    return {"result_path": str(result), "artifacts": len(rows),
            "verbatim": sum(r["treatment"] == "verbatim" for r in rows)}


def render_markdown(rows: list[dict[str, Any]], by_id: dict[str, artifacts.Artifact]) -> str:
    lines = ["# Refined artifacts", "",
             "Ranked by rubric score (mean P(yes) over the criteria). Technical stories are "
             "reproduced verbatim and never summarized (FEAT-075).", ""]
    for r in rows:
        lines += [f"## {r['rank']}. {r['title']} ({r['kind']}, score {r['score']:.2f})", "",
                  f"Why: {r['reason']}.", ""]
        if r["treatment"] == "verbatim":
            lines += ["Verbatim:", "", by_id[r["id"]].body.rstrip("\n"), ""]
        else:
            lines += [f"Summary: the text says that {r['summary']}", ""]
    return "\n".join(lines) + "\n"
