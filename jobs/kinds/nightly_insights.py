"""The `nightly_insights` kind: incremental map (one-sentence note per new or changed note) and
grounded reduce (embedding clusters, keywords, a model-written title per theme citing its notes)."""
from __future__ import annotations

import re
import time
from datetime import date
from pathlib import Path
from typing import Any, Callable

from jobs.lib import clustering, fewshot, keyphrases, manifest
from jobs.lib import grounded as guard
from jobs.lib.embed import Embedder
from jobs.lib.llm import Engine

NOTE_CHARS = 800           # of each note shown to the model (the map prompt's budget)
RESULT_FORMAT = 3          # bump when per-note results change meaning: cached ones are redone


def _title(rel: str, text: str) -> str:
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return re.sub(r"^\d{4}-\d{2}-\d{2}-?", "", Path(rel).stem).replace("-", " ") or rel


def map_prompt(date_s: str, title: str, text: str, example: int = 0) -> str:
    """Few-shot for a base model: two fixed neutral notes with their summaries, then this note."""
    shots = "".join(f"Note ({d}), \"{t}\":\n{x}\nSummary: {y}\n\n"
                    for d, t, x, y in fewshot.rotate(fewshot.NOTES, example, 2))
    return (f"Diary notes, each followed by a one-sentence summary of what happened.\n\n{shots}"
            f"Note ({date_s}), \"{title}\":\n{text[:NOTE_CHARS].strip()}\nSummary:")


def theme_prompt(phrases: list[str], example: int = 0) -> str:
    """Few-shot: keyphrases -> a short theme title (note titles are left out: shown them, the small
    model copies one)."""
    shots = "".join(f"Keyphrases: {', '.join(k)}\nTitle: {y}\n\n"
                    for _, k, y in fewshot.rotate(fewshot.THEMES, example, 3))
    return (f"Themes in a diary, each with a short title of two to five words.\n\n{shots}"
            f"Keyphrases: {', '.join(phrases)}\nTitle:")


# Nothing a note summary or a theme title may repeat: the worked examples it was shown.
EXAMPLE_TEXTS = [x for *_, x in fewshot.NOTES] + [n[1] for n in fewshot.NOTES] + \
    [y for *_, y in fewshot.THEMES]
SUMMARY_RULES = guard.Rules(min_words=5, max_words=45)
TITLE_RULES = guard.Rules(min_words=2, max_words=7, sentence=False, max_commas=0,
                          grounded_share=1.0)


def _since(params: dict[str, Any]) -> str | None:
    since = params.get("since")
    if not since:
        return None
    try:
        return date.fromisoformat(str(since)).isoformat()
    except ValueError:
        raise ValueError(f"param 'since' must be a date like 2015-01-31, got {since!r}") from None


def summarize(engine: Engine, embedder: Embedder, notes: list[tuple[str, str, str]],
              max_new_tokens: int, progress=None) -> list[guard.Answer]:
    """One validated sentence per (date, title, text): the model's, retried once with the other
    worked example, else the note's most central sentence (marked extractive)."""
    asks = [guard.Ask(prompts=[map_prompt(d, t, x, 0), map_prompt(d, t, x, 1)], source=x,
                      fallback=guard.central_sentence(x, embedder.embed),
                      echoes=[t, d, *EXAMPLE_TEXTS], rules=SUMMARY_RULES)
            for d, t, x in notes]
    return engine.guarded(asks, max_new_tokens=max_new_tokens, progress=progress)


def run(params: dict[str, Any], ctx) -> dict[str, Any]:
    archive = ctx.roots.param("archive", params["archive"])
    since = _since(params)
    max_new_tokens = int(params.get("max_new_tokens") or 40)
    state_path = manifest.state_folder(ctx.state_dir, archive) / "manifest.json"
    old = manifest.load(state_path)
    if old["files"] and old.get("result_format") != RESULT_FORMAT:
        ctx.log.info("manifest %s holds results of an older format; every note is read again",
                     state_path)
        old = {"files": {}, "themes": []}
    current = manifest.scan(archive, ctx.roots)
    delta = manifest.diff(old["files"], current)
    dates = {rel: manifest.note_date(rel, info.mtime_ns) for rel, info in current.items()}
    todo = [rel for rel in delta.todo if since is None or dates[rel] >= since]
    skipped_by_cap = todo[params["max_notes"]:] if params.get("max_notes") else []
    todo = todo[:len(todo) - len(skipped_by_cap)]
    ctx.log.info("archive %s: %d notes, %d new, %d changed, %d removed; processing %d",
                 archive, len(current), len(delta.new), len(delta.changed), len(delta.removed),
                 len(todo))
    reading = "reading notes"   # then "themes": each stage's count is labelled (no 83 % -> 0 %)
    ctx.progress(0, len(todo), "notes", reading)
    texts = {rel: ctx.roots.read_text(archive / rel, errors="replace") for rel in todo}
    files = {rel: e for rel, e in old["files"].items() if rel in current and rel not in texts}
    engine = None
    embedder = Embedder()
    try:
        if todo:
            engine = ctx.model(params["batch_size"])
            titles = {rel: _title(rel, texts[rel]) for rel in todo}
            answers = summarize(engine, embedder, [(dates[r], titles[r], texts[r]) for r in todo],
                                max_new_tokens, progress=lambda d, t: ctx.progress(
                                    min(d * len(todo) // t, len(todo) - 1), len(todo), "notes", reading))
            vectors = embedder.embed([texts[rel] for rel in todo])
            for rel, ans, vec in zip(todo, answers, vectors):
                info = current[rel]
                files[rel] = {"sha256": info.sha256, "mtime_ns": info.mtime_ns,
                              "size_bytes": info.size_bytes, "date": dates[rel],
                              "title": titles[rel], "summary": ans.text,
                              "extractive": ans.extractive, "rejected": ans.rejected,
                              "provenance": ans.provenance, "evidence": ans.evidence,
                              "terms": clustering.top_terms(texts[rel]),
                              "phrases": keyphrases.candidates(texts[rel]),
                              "embedding": [round(x, 5) for x in vec]}
            ctx.progress(len(todo), len(todo), "notes", reading)
        considered = sorted(rel for rel in files if since is None or files[rel]["date"] >= since)
        if todo or delta.removed or not old.get("themes") or old.get("since") != since:
            if engine is None and len(considered) >= 2:
                engine = ctx.model(params["batch_size"])
            themes = reduce_themes(archive, files, considered, engine, embedder, max_new_tokens,
                                   progress=lambda d, t: ctx.progress(d, t, "themes", "themes"))
        else:
            themes = old["themes"]  # nothing changed: the last run's themes still hold
        in_scope = sum(1 for rel in current if since is None or dates[rel] >= since)
        report = {
            "archive": str(archive), "since": since, "generated_at": time.time(),
            "notes_in_archive": len(current), "notes_in_scope": in_scope,
            "notes_total": len(considered), "notes_processed": len(todo),
            "notes_processed_paths": [str(archive / rel) for rel in todo],
            "notes_left_for_next_run": len(skipped_by_cap), "notes_removed": list(delta.removed),
            "themes": themes,
            "notes": [{"path": str(archive / rel), "date": files[rel]["date"],
                       "title": files[rel]["title"], "summary": files[rel]["summary"],
                       "extractive": files[rel].get("extractive", False),
                       "provenance": files[rel].get("provenance", guard.EXTRACTED),
                       "evidence": files[rel].get("evidence", ""),
                       "rejected": files[rel].get("rejected", [])}
                      for rel in considered],
            "engine": engine.summary() if engine else None,
            "model": engine.name if engine else None,
            "summaries_by_model": sum(not files[rel].get("extractive", True) for rel in considered),
        }
        md = ctx.write_text("insights.md", render_markdown(report))
        result = ctx.write_json("insights.json", report)
        # Last, and only after the outputs exist: a run killed before here changes nothing.
        manifest.save(state_path, {"archive": str(archive), "since": since, "files": files,
                                   "themes": themes, "result_format": RESULT_FORMAT})
    finally:
        if engine is not None:
            engine.close()
    return {"result_path": str(result), "markdown_path": str(md), "notes_processed": len(todo),
            "themes": len(themes), "manifest_path": str(state_path)}


def theme_phrases(groups: list[list[dict[str, Any]]], embedder: Embedder, k: int = 4
                  ) -> list[list[str]]:
    """Per group: c-TF-IDF candidates (the top 12), then MMR over their MiniLM vectors against the
    group's centroid, so the label's phrases are on topic and not four forms of one word."""
    docs = [[m.get("phrases") or [*keyphrases.candidates(m["title"]), *m.get("terms", ())]
             for m in g] for g in groups]
    out = []
    for g, scores in zip(groups, keyphrases.class_tfidf(docs)):
        ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:12]
        top = [p for p, _ in ranked]
        if not top:
            out.append(keyphrases.candidates(" ".join(m["title"] for m in g))[:k])
            continue
        vecs = embedder.embed(top)
        centroid = [sum(col) / len(g) for col in zip(*(m["embedding"] for m in g))]
        out.append(keyphrases.mmr(top, vecs, centroid, k=k, weights=[w for _, w in ranked]))
    return out


def fallback_title(members: list[dict[str, Any]], phrases: list[str]) -> str:
    """The keyphrase label when a keyphrase is shared by two of the theme's notes; else the theme
    is named by its first and last notes (two words that each occur once name nothing)."""
    uses = [set(m.get("phrases") or ()) for m in members]
    if any(sum(p in u for u in uses) >= 2 for p in phrases):
        return keyphrases.label(phrases)
    return f"{members[0]['title']} … {members[-1]['title']}"


def insight(members: list[dict[str, Any]], archive: Path) -> str:
    """What the theme's earliest and latest notes say, each cited: a sentence about change over
    time built from the notes' own (validated or extractive) summaries."""
    def cite(m: dict[str, Any]) -> str:
        return f"[{m['title']}]({archive / m['rel']})"

    def said(m: dict[str, Any]) -> str:
        text = m["summary"].rstrip(".")
        text = text if re.match(r"I\b|[A-Z][a-z]*[A-Z]|[A-Z]{2}", text) else text[0].lower() + text[1:]
        return f"{text} {EXTRACTED_MARK}" if m.get("extractive") else text

    first, last = members[0], members[-1]
    if first["date"][:4] == last["date"][:4]:
        return (f"In {first['date'][:4]}, {said(first)} ({cite(first)}); {len(members) - 1} more "
                f"note{'s' if len(members) > 2 else ''} that year return to it, ending with: "
                f"{said(last)} ({cite(last)}).")
    return (f"In {first['date'][:4]}, {said(first)} ({cite(first)}); by {last['date'][:4]}, "
            f"{said(last)} ({cite(last)}).")


def reduce_themes(archive: Path, files: dict[str, dict[str, Any]], considered: list[str],
                  engine: Engine | None, embedder: Embedder, max_new_tokens: int,
                  progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Cluster the notes by embedding; each theme gets keyphrases (c-TF-IDF + MMR), a validated
    model-written title (else the keyphrase label), its year span, an insight and its notes."""
    if len(considered) < 2:
        return []
    vectors = [files[rel]["embedding"] for rel in considered]
    max_clusters = max(3, len(considered) // 3)
    groups = [sorted(({**files[considered[i]], "rel": considered[i]} for i in g),
                     key=lambda m: m["date"])
              for g in clustering.cluster(vectors, max_clusters=max_clusters) if len(g) >= 2]
    phrases = theme_phrases(groups, embedder)
    if progress:
        progress(0, len(groups))
    asks = [guard.Ask(prompts=[theme_prompt(p, 0), theme_prompt(p, 1)],
                      source=" ".join([*p, *(m["title"] + " " + m["summary"] for m in g)]),
                      fallback=fallback_title(g, p), rules=TITLE_RULES, claim_check=False,
                      echoes=EXAMPLE_TEXTS, exact=[m["title"] for m in g])
            for g, p in zip(groups, phrases)]
    titles = guard.generate(asks, lambda prompts: engine.complete(
        prompts, max_new_tokens=min(max_new_tokens, 16), stop=("\n",), no_repeat_ngram_size=2)
    ) if engine else [guard.Answer(a.fallback, True) for a in asks]
    if progress:
        progress(len(groups), len(groups))
    out = []
    for members, p, title in zip(groups, phrases, titles):
        first, last = members[0]["date"][:4], members[-1]["date"][:4]
        out.append({
            "title": title.text.rstrip("."), "title_extractive": title.extractive,
            "title_rejected": title.rejected, "keyphrases": p, "keywords": p,
            "years": first if first == last else f"{first}-{last}",
            "insight": insight(members, archive),
            # The insight is a template around its notes' summaries: as trustworthy as each of them.
            "insight_provenance": [{"path": str(archive / m["rel"]),
                                    "provenance": m.get("provenance", guard.EXTRACTED)}
                                   for m in (members[0], members[-1])],
            "notes": [{"path": str(archive / m["rel"]), "date": m["date"], "title": m["title"]}
                      for m in members],
        })
    return out


EXTRACTED_MARK = "*(extracted)*"


def provenance_note(report: dict[str, Any]) -> str:
    """Who wrote what: the reader's key to which sentences to trust as the note's own words."""
    notes = report["notes"]
    by_model = sum(not n.get("extractive") for n in notes)
    model = report.get("model") or (report.get("engine") or {}).get("model") or "the model"
    return (f"Summaries: {by_model} of {len(notes)} written by model `{model}` and checked claim by claim "
            f"against their note; the rest, marked {EXTRACTED_MARK}, are the note's own most central "
            "sentence. Theme titles are the model's; insights quote the summaries.")


def render_markdown(report: dict[str, Any]) -> str:
    total = report.get("notes_in_scope", report["notes_total"])
    head = (f"{report['notes_total']} of {total} notes"
            + (f" since {report['since']}" if report["since"] else " in the archive")
            + f" considered ({report['notes_processed']} read this run).")
    lines = [f"# Insights: {report['archive']}", "", head, "", provenance_note(report), ""]
    if report["notes_left_for_next_run"]:
        lines += [f"{report['notes_left_for_next_run']} more notes wait for the next run "
                  "(max_notes).", ""]
    for i, t in enumerate(report["themes"], 1):
        lines += [f"## {i}. {t['title']} ({t['years']})", "",
                  f"Keyphrases: {', '.join(t.get('keyphrases', t['keywords']))}.", "", t["insight"], ""]
        lines += [f"- {n['date']} [{n['title']}]({n['path']})" for n in t["notes"]]
        lines.append("")
    lines += ["## Notes", ""]
    lines += [f"- {n['date']} **{n['title']}**: {n['summary']}"
              + (f" {EXTRACTED_MARK}" if n.get("extractive") else "") + f" ({n['path']})"
              for n in report["notes"]]
    return "\n".join(lines) + "\n"
