"""The `cv_matching` kind: rank postings against a CV by MiniLM cosine similarity, then explain the
top-k: requirements the CV covers (with its best line as evidence), gaps, and a model rationale."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .lib.clustering import cosine
from .lib.embed import Embedder
from .lib.llm import first_sentence

STRENGTH_SIMILARITY = 0.4   # a requirement whose best CV line is at least this close is covered
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


def title_of(path: Path, text: str) -> str:
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem


def _mean(vectors: list[list[float]]) -> list[float]:
    return [sum(col) / len(vectors) for col in zip(*vectors)]


def rationale_prompt(title: str, strengths: list[dict], gaps: list[dict]) -> str:
    have = "; ".join(s["requirement"] for s in strengths) or "none"
    lack = "; ".join(g["requirement"] for g in gaps) or "none"
    return (f"Job: {title}\nRequirements the candidate meets: {have}\n"
            f"Requirements the candidate lacks: {lack}\n"
            "In one sentence, how well the candidate fits this job: The candidate")


def run(params: dict[str, Any], ctx) -> dict[str, Any]:
    cv_path = ctx.roots.param("cv", params["cv"])
    postings_dir = ctx.roots.param("postings", params["postings"])
    top_k = params["top_k"]  # defaulted by jobs.kinds.validate_params
    if top_k < 1:
        raise ValueError("param 'top_k' must be at least 1")
    postings = ctx.roots.keep(sorted(p for p in postings_dir.iterdir()
                                     if p.suffix in POSTING_SUFFIXES))
    if not postings:
        raise ValueError(f"no postings (.md/.txt) in {postings_dir}; put one file per posting there")
    texts = {p: ctx.roots.read_text(p) for p in postings}
    # Sentences, not paragraphs: the evidence quoted for a requirement stays short and precise.
    cv_lines = [s for line in lines_of(ctx.roots.read_text(cv_path))
                for s in re.split(r"(?<=[.!?])\s+", line) if s]
    reqs = {p: requirements(t) for p, t in texts.items()}
    total = len(postings) + min(top_k, len(postings))
    ctx.progress(0, total, "postings")
    embedder = Embedder()
    cv_vecs = embedder.embed(cv_lines)
    cv_vec = _mean(cv_vecs)
    scored = []
    for i, p in enumerate(postings, 1):
        req_vecs = embedder.embed(reqs[p])
        per_req = []
        for req, rv in zip(reqs[p], req_vecs):
            sims = [cosine(rv, cv) for cv in cv_vecs]
            best = max(range(len(sims)), key=sims.__getitem__)
            per_req.append({"requirement": req, "evidence": cv_lines[best],
                            "similarity": round(sims[best], 4)})
        scored.append({"path": str(p), "title": title_of(p, texts[p]),
                       "score": round(cosine(cv_vec, _mean(req_vecs)), 4),
                       "coverage": round(sum(r["similarity"] >= STRENGTH_SIMILARITY
                                             for r in per_req) / len(per_req), 4),
                       "requirements": per_req})
        ctx.progress(i, total, "postings")
    scored.sort(key=lambda s: (-s["score"], s["path"]))
    top = scored[:top_k]
    for s in top:
        s["strengths"] = [r for r in s["requirements"] if r["similarity"] >= STRENGTH_SIMILARITY]
        s["gaps"] = [r for r in s["requirements"] if r["similarity"] < STRENGTH_SIMILARITY]
    engine = ctx.model(params["batch_size"])
    try:
        prompts = [rationale_prompt(s["title"], s["strengths"], s["gaps"]) for s in top]
        outs = engine.complete(prompts, max_new_tokens=int(params.get("max_new_tokens") or 40),
                               stop=("\n",), progress=lambda d, t: ctx.progress(
                                   len(postings) + d * len(top) // t, total, "postings"))
        metrics = engine.summary()
    finally:
        engine.close()
    for s, prompt, out in zip(top, prompts, outs):
        s.update(rationale=first_sentence(f"The candidate {out}") if out else "",
                 rationale_prompt=prompt)
    report = {"cv": str(cv_path), "postings_dir": str(postings_dir), "top_k": top_k,
              "strength_similarity": STRENGTH_SIMILARITY,
              "ranking": [{"rank": i, "path": s["path"], "title": s["title"], "score": s["score"],
                           "coverage": s["coverage"]} for i, s in enumerate(scored, 1)],
              "top": top, "engine": metrics}
    ctx.write_text("matches.md", render_markdown(report))
    result = ctx.write_json("matches.json", report)
    return {"result_path": str(result), "postings": len(postings), "top": [s["path"] for s in top]}


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# CV matches for {report['cv']}", "", "| rank | posting | similarity | coverage |",
             "|---|---|---|---|"]
    lines += [f"| {r['rank']} | {r['title']} | {r['score']:.2f} | {r['coverage']:.0%} |"
              for r in report["ranking"]]
    for i, s in enumerate(report["top"], 1):
        lines += ["", f"## {i}. {s['title']}", "", f"Posting: {s['path']}", "",
                  f"Rationale (model): {s['rationale'] or '(no answer)'}", "", "Strengths:"]
        lines += [f"- {r['requirement']} — CV: \"{r['evidence']}\" ({r['similarity']:.2f})"
                  for r in s["strengths"]] or ["- none found"]
        lines += ["", "Gaps:"]
        lines += [f"- {r['requirement']} (closest CV line {r['similarity']:.2f})"
                  for r in s["gaps"]] or ["- none found"]
    return "\n".join(lines) + "\n"
