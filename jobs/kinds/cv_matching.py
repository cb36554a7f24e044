"""The `cv_matching` kind: match each posting requirement against each CV sentence or list item
(MiniLM), rank postings by how well their requirements are met, and explain the top k: strengths
with the CV evidence quoted, gaps where nothing in the CV supports a requirement, a rationale."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from jobs.lib import claims, fewshot
from jobs.lib import grounded as guard
from jobs.lib.clustering import cosine
from jobs.lib.embed import Embedder

# A requirement whose closest CV unit is at least this similar is covered. Calibrated with
# bench/quality_bench.py --calibrate on tests/data/quality/cv_pairs.jsonl (labelled pairs written
# for this, none from examples/): the threshold with the best F1 there; see docs/quality.md.
STRENGTH_SIMILARITY = 0.41
LIST_ITEMS_MIN = 3          # a line with this many commas is a list: each item is its own unit
RATIONALE_RULES = guard.Rules(min_words=6, max_words=40)
POSTING_SUFFIXES = (".md", ".txt")


def lines_of(text: str) -> list[str]:
    """Content lines: headings and blank lines dropped, bullet and bold markers stripped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        out.append(re.sub(r"^[-*]\s+", "", line).replace("**", ""))
    return out


def requirements(text: str) -> list[str]:
    bullets = [re.sub(r"^[-*]\s+", "", l.strip()) for l in text.splitlines()
               if re.match(r"^\s*[-*]\s+", l)]
    return bullets or [s for s in re.split(r"(?<=[.!?])\s+", " ".join(lines_of(text))) if s]


def cv_sentences(text: str) -> list[str]:
    return [s for line in lines_of(text) for s in re.split(r"(?<=[.!?])\s+", line) if s]


def cv_units(text: str) -> list[str]:
    """The CV as short units to match: sentences, and the items of list-like lines ("Python, SQL and
    PostgreSQL, Linux servers, …"), so one long Skills line does not dilute every match."""
    out = []
    for sent in cv_sentences(text):
        body = sent.split(":", 1)[1] if re.match(r"^[^,]{1,30}:\s", sent) else sent
        if body.count(",") >= LIST_ITEMS_MIN:
            out += [i.strip(" .") for i in re.split(r",|;|\band\b", body) if i.strip(" .")]
        elif sent.strip():
            out.append(sent.strip())
    return out


def title_of(path: Path, text: str) -> str:
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem


def _mean(vectors: list[list[float]]) -> list[float]:
    return [sum(col) / len(vectors) for col in zip(*vectors)]


def rationale_prompt(title: str, strengths: list[dict], gaps: list[dict], example: int = 0) -> str:
    """Few-shot for a base model: fixed neutral jobs with matched and missing requirements, then
    one connecting sentence; this job's block is built from the evidence found."""
    def block(job: str, have: list[str], lack: list[str]) -> str:
        return (f"Job: {job}\nMeets: {'; '.join(have) or 'none'}\nLacks: {'; '.join(lack) or 'none'}"
                "\nIn one sentence:")
    shots = "".join(f"{block(j, h, l)} {y}\n\n" for j, h, l, y in
                    fewshot.rotate(fewshot.RATIONALES, example, 2))
    have = [f"{s['requirement']} (CV: \"{s['evidence']}\")" for s in strengths]
    return (f"How well a candidate fits a job, from the evidence in the CV.\n\n{shots}"
            + block(title, have, [g["requirement"] for g in gaps]) + " The candidate")


def facts(s: dict) -> str:
    """The template part of a rationale: coverage counts and what is missing."""
    n, k = len(s["requirements"]), len(s["strengths"])
    lack = "; ".join(g["requirement"] for g in s["gaps"])
    return (f"The CV supports {k} of {n} requirements" + (f"; missing: {lack}." if lack else "."))


def rationale_source(title: str, per_req: list[dict], cv_text: str = "") -> str:
    """What a rationale may claim, one sentence per fact: the job, each covered requirement with its
    CV evidence, each gap as a lack (a sentence saying the candidate lacks a gap is then supported),
    then the CV itself (what the candidate did)."""
    lines = [f"The job is {title}."]
    lines += [f"The candidate meets {r['requirement']}: {r['evidence'].rstrip('.')}." for r in per_req
              if r["covered"]]
    lines += [f"The candidate lacks {r['requirement']}." for r in per_req if not r["covered"]]
    return "\n".join([*lines, cv_text])


def _facts_check(s: dict[str, Any]):
    """The rationale must agree with the computed coverage (no praise at 0 of 4)."""
    gaps = [g["requirement"] for g in s["gaps"]]
    return lambda text: claims.agrees_with_facts(text, len(s["strengths"]), len(s["requirements"]), gaps)


def match(reqs: list[str], req_vecs: list[list[float]], units: list[str],
          unit_vecs: list[list[float]]) -> list[dict[str, Any]]:
    """Each requirement against every CV unit: the closest unit is its evidence."""
    out = []
    for req, rv in zip(reqs, req_vecs):
        sims = [cosine(rv, u) for u in unit_vecs]
        best = max(range(len(sims)), key=lambda i: (sims[i], -i))
        out.append({"requirement": req, "evidence": units[best], "similarity": round(sims[best], 4),
                    "covered": sims[best] >= STRENGTH_SIMILARITY})
    return out


def run(params: dict[str, Any], ctx) -> dict[str, Any]:
    cv_path = ctx.roots.param("cv", params["cv"])
    postings_dir = ctx.roots.param("postings", params["postings"])
    top_k = params["top_k"]  # defaulted by jobs.contract.kinds.validate_params
    if top_k < 1:
        raise ValueError("param 'top_k' must be at least 1")
    postings = ctx.roots.keep(sorted(p for p in postings_dir.iterdir()
                                     if p.suffix in POSTING_SUFFIXES))
    if not postings:
        raise ValueError(f"no postings (.md/.txt) in {postings_dir}; put one file per posting there")
    texts = {p: ctx.roots.read_text(p) for p in postings}
    cv_text = ctx.roots.read_text(cv_path)
    units = cv_units(cv_text)
    reqs = {p: requirements(t) for p, t in texts.items()}
    # Progress counts steps: one per posting matched, one per rationale written.
    total = len(postings) + min(top_k, len(postings))
    ctx.progress(0, total, "steps", "matching postings")
    embedder = Embedder()
    unit_vecs = embedder.embed(units)
    # Ranking stays at the posting level (the CV's sentences as a whole against the posting's
    # requirements as a whole: the role's overall fit); requirements are matched one by one.
    profile = _mean(embedder.embed(cv_sentences(cv_text)))
    scored = []
    for i, p in enumerate(postings, 1):
        req_vecs = embedder.embed(reqs[p])
        per_req = match(reqs[p], req_vecs, units, unit_vecs)
        scored.append({"path": str(p), "title": title_of(p, texts[p]),
                       "score": round(cosine(profile, _mean(req_vecs)), 4),
                       "coverage": round(sum(r["covered"] for r in per_req) / len(per_req), 4),
                       "requirements": per_req})
        ctx.progress(i, total, "steps", "matching postings")
    scored.sort(key=lambda s: (-s["score"], s["path"]))
    top = scored[:top_k]
    for s in top:
        s["strengths"] = [r for r in s["requirements"] if r["covered"]]
        s["gaps"] = [r for r in s["requirements"] if not r["covered"]]
    asks = [guard.Ask(prompts=[rationale_prompt(s["title"], s["strengths"], s["gaps"], e)
                               for e in (0, 1)], prefix="The candidate", rules=RATIONALE_RULES,
                      source=rationale_source(s["title"], s["requirements"], cv_text),
                      echoes=[y for *_, y in fewshot.RATIONALES], fallback="",
                      facts=_facts_check(s))
            for s in top]
    engine = ctx.model(params["batch_size"])
    try:
        answers = engine.guarded(asks, max_new_tokens=int(params.get("max_new_tokens") or 40),
                                 progress=lambda d, t: ctx.progress(
                                     min(total - 1, len(postings) + d * len(top) // t), total, "steps",
                                     "rationales"))
        metrics = engine.summary()
    finally:
        engine.close()
    ctx.progress(total, total, "steps", "rationales")
    for s, ask, ans in zip(top, asks, answers):
        s.update(rationale=" ".join(x for x in (facts(s), ans.text) if x),
                 rationale_model=None if ans.extractive else ans.text,
                 rationale_extractive=ans.extractive,
                 # Per sentence: the computed facts, then the model's sentence if one passed the check.
                 rationale_sentences=[{"text": facts(s), "provenance": "computed"}] + (
                     [] if ans.extractive else [{"text": ans.text, "provenance": ans.provenance,
                                                 "evidence": ans.evidence}]),
                 rationale_rejected=ans.rejected, rationale_prompt=ask.prompts[0])
    report = {"cv": str(cv_path), "postings_dir": str(postings_dir), "top_k": top_k,
              "postings": len(postings), "strength_similarity": STRENGTH_SIMILARITY,
              "cv_units": units,
              "ranking": [{"rank": i, "path": s["path"], "title": s["title"], "score": s["score"],
                           "coverage": s["coverage"]} for i, s in enumerate(scored, 1)],
              "top": top, "engine": metrics, "model": metrics.get("model")}
    ctx.write_text("matches.md", render_markdown(report))
    result = ctx.write_json("matches.json", report)
    return {"result_path": str(result), "postings": len(postings), "top": [s["path"] for s in top]}


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# CV matches for {report['cv']}", "",
             f"{report['postings']} postings; a requirement counts as covered when a CV sentence or "
             f"list item reaches similarity {report['strength_similarity']:.2f}.", "",
             f"Each rationale starts with the computed coverage; a sentence after it is written by model "
             f"`{report.get('model') or 'the model'}` and shown only when every claim in it is in the CV "
             "or the computed facts (and agrees with the coverage).", "",
             "| rank | posting | similarity | requirements covered |", "|---|---|---|---|"]
    lines += [f"| {r['rank']} | {r['title']} | {r['score']:.2f} | {r['coverage']:.0%} |"
              for r in report["ranking"]]
    for i, s in enumerate(report["top"], 1):
        lines += ["", f"## {i}. {s['title']}", "", f"Posting: {s['path']}", "",
                  f"Rationale: {s['rationale']}" + ("" if s.get("rationale_model") else
                                                    " *(no model sentence passed the check)*"),
                  "", "Strengths:"]
        lines += [f"- {r['requirement']} — CV: \"{r['evidence']}\" ({r['similarity']:.2f})"
                  for r in s["strengths"]] or ["- none found"]
        lines += ["", "Gaps:"]
        lines += [f"- {r['requirement']} (closest CV: \"{r['evidence']}\", {r['similarity']:.2f})"
                  for r in s["gaps"]] or ["- none found"]
    return "\n".join(lines) + "\n"
