"""The `nightly_insights` kind: incremental map (one-sentence note per new or changed note) and
grounded reduce (embedding clusters, keywords, a model-written title per theme citing its notes)."""
from __future__ import annotations

import re
import time
from datetime import date
from pathlib import Path
from typing import Any

from .lib import clustering, manifest
from .lib.embed import Embedder
from .lib.llm import Engine, first_sentence

NOTE_CHARS = 800           # of each note shown to the model (the map prompt's budget)
THEME_MEMBERS_SHOWN = 5    # summaries shown when the model names a theme


def _title(rel: str, text: str) -> str:
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return re.sub(r"^\d{4}-\d{2}-\d{2}-?", "", Path(rel).stem).replace("-", " ") or rel


def map_prompt(date_s: str, title: str, text: str) -> str:
    return (f"Diary note from {date_s}, titled \"{title}\":\n{text[:NOTE_CHARS].strip()}\n\n"
            "In one sentence, this note is about")


# One worked example: a base model continues a pattern far better than it follows a request.
THEME_EXAMPLE = ("Notes:\n- 2012: Hiking the ridge trail, about a long hike with my brother\n"
                 "- 2015: My first 10 km race, about finishing a race\nKeywords: hike, race, "
                 "knees\nTitle: \"Staying active outdoors\"\n\n")


def theme_prompt(members: list[dict[str, Any]], words: list[str]) -> str:
    lines = "\n".join(f"- {m['date'][:4]}: {m['title']}, about {m['summary']}"
                      for m in members[:THEME_MEMBERS_SHOWN])
    return (f"Groups of diary notes, each with a short title.\n\n{THEME_EXAMPLE}"
            f"Notes:\n{lines}\nKeywords: {', '.join(words)}\nTitle: \"")


def _since(params: dict[str, Any]) -> str | None:
    since = params.get("since")
    if not since:
        return None
    try:
        return date.fromisoformat(str(since)).isoformat()
    except ValueError:
        raise ValueError(f"param 'since' must be a date like 2015-01-31, got {since!r}") from None


def run(params: dict[str, Any], ctx) -> dict[str, Any]:
    archive = ctx.roots.param("archive", params["archive"])
    since = _since(params)
    max_new_tokens = int(params.get("max_new_tokens") or 32)
    state_path = manifest.state_folder(ctx.state_dir, archive) / "manifest.json"
    old = manifest.load(state_path)
    current = manifest.scan(archive, ctx.roots)
    delta = manifest.diff(old["files"], current)
    dates = {rel: manifest.note_date(rel, info.mtime_ns) for rel, info in current.items()}
    todo = [rel for rel in delta.todo if since is None or dates[rel] >= since]
    skipped_by_cap = todo[params["max_notes"]:] if params.get("max_notes") else []
    todo = todo[:len(todo) - len(skipped_by_cap)]
    ctx.log.info("archive %s: %d notes, %d new, %d changed, %d removed; processing %d",
                 archive, len(current), len(delta.new), len(delta.changed), len(delta.removed),
                 len(todo))
    ctx.progress(0, len(todo), "notes")
    texts = {rel: ctx.roots.read_text(archive / rel, errors="replace") for rel in todo}
    files = {rel: e for rel, e in old["files"].items() if rel in current and rel not in texts}
    engine = None
    try:
        if todo:
            engine = ctx.model(params["batch_size"])
            titles = {rel: _title(rel, texts[rel]) for rel in todo}
            prompts = [map_prompt(dates[rel], titles[rel], texts[rel]) for rel in todo]
            outs = engine.complete(prompts, max_new_tokens=max_new_tokens, stop=("\n",),
                                   progress=lambda d, t: ctx.progress(
                                       d * len(todo) // t, len(todo), "notes"))
            vectors = Embedder().embed([texts[rel] for rel in todo])
            for rel, out, vec in zip(todo, outs, vectors):
                info = current[rel]
                files[rel] = {"sha256": info.sha256, "mtime_ns": info.mtime_ns,
                              "size_bytes": info.size_bytes, "date": dates[rel],
                              "title": titles[rel], "summary": first_sentence(out) or titles[rel],
                              "terms": clustering.top_terms(texts[rel]),
                              "embedding": [round(x, 5) for x in vec]}
            ctx.progress(len(todo), len(todo), "notes")
        considered = sorted(rel for rel in files if since is None or files[rel]["date"] >= since)
        if todo or delta.removed or not old.get("themes") or old.get("since") != since:
            if engine is None and len(considered) >= 2:
                engine = ctx.model(params["batch_size"])
            themes = reduce_themes(archive, files, considered, engine, max_new_tokens)
        else:
            themes = old["themes"]  # nothing changed: the last run's themes still hold
        report = {
            "archive": str(archive), "since": since, "generated_at": time.time(),
            "notes_total": len(considered), "notes_processed": len(todo),
            "notes_processed_paths": [str(archive / rel) for rel in todo],
            "notes_left_for_next_run": len(skipped_by_cap), "notes_removed": list(delta.removed),
            "themes": themes,
            "notes": [{"path": str(archive / rel), "date": files[rel]["date"],
                       "title": files[rel]["title"], "summary": files[rel]["summary"]}
                      for rel in considered],
            "engine": engine.summary() if engine else None,
        }
        md = ctx.write_text("insights.md", render_markdown(report))
        result = ctx.write_json("insights.json", report)
        # Last, and only after the outputs exist: a run killed before here changes nothing.
        manifest.save(state_path, {"archive": str(archive), "since": since, "files": files,
                                   "themes": themes})
    finally:
        if engine is not None:
            engine.close()
    return {"result_path": str(result), "markdown_path": str(md), "notes_processed": len(todo),
            "themes": len(themes), "manifest_path": str(state_path)}


def reduce_themes(archive: Path, files: dict[str, dict[str, Any]], considered: list[str],
                  engine: Engine | None, max_new_tokens: int) -> list[dict[str, Any]]:
    """Cluster the notes by embedding; each theme gets keywords (TF-IDF), a model-written title,
    its year span and the paths of every member note it came from."""
    if len(considered) < 2:
        return []
    vectors = [files[rel]["embedding"] for rel in considered]
    docs = [" ".join([files[rel]["title"], *files[rel].get("terms", ())]) for rel in considered]
    max_clusters = max(3, len(considered) // 3)
    groups = [g for g in clustering.cluster(vectors, max_clusters=max_clusters) if len(g) >= 2]
    themes = []
    for g in groups:
        members = sorted(({**files[considered[i]], "rel": considered[i]} for i in g),
                         key=lambda m: m["date"])
        words = clustering.keywords([docs[i] for i in g], docs)
        themes.append({"keywords": words, "members": members})
    titles = engine.complete([theme_prompt(t["members"], t["keywords"]) for t in themes],
                             max_new_tokens=max_new_tokens, stop=("\"", "\n")) if engine else []
    out = []
    for t, title in zip(themes, titles):
        members = t["members"]
        first, last = members[0]["date"][:4], members[-1]["date"][:4]
        span = first if first == last else f"{first}-{last}"
        name = first_sentence(title).rstrip(".")
        if not name or name in THEME_EXAMPLE:  # small models echo the worked example
            name = ", ".join(t["keywords"][:3])
        out.append({
            "title": name, "keywords": t["keywords"], "years": span,
            "insight": (f"{len(members)} notes from {span} return to this theme "
                        f"({', '.join(t['keywords'][:4])})."),
            "notes": [{"path": str(archive / m["rel"]), "date": m["date"], "title": m["title"]}
                      for m in members],
        })
    return out


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Insights: {report['archive']}", "",
             f"{report['notes_total']} notes considered, {report['notes_processed']} new or "
             f"changed this run" + (f", since {report['since']}" if report["since"] else "") + ".",
             ""]
    if report["notes_left_for_next_run"]:
        lines += [f"{report['notes_left_for_next_run']} more notes wait for the next run "
                  "(max_notes).", ""]
    for i, t in enumerate(report["themes"], 1):
        lines += [f"## {i}. {t['title']} ({t['years']})", "", t["insight"], ""]
        lines += [f"- {n['date']} [{n['title']}]({n['path']})" for n in t["notes"]]
        lines.append("")
    lines += ["## Notes", ""]
    lines += [f"- {n['date']} **{n['title']}**: about {n['summary']} ({n['path']})"
              for n in report["notes"]]
    return "\n".join(lines) + "\n"
