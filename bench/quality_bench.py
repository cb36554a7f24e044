"""Quality of the three model jobs against hand labels (tests/data/quality/), on the real models.

Runs nightly_insights (whole examples/archive), artifact_refinement (examples/gems) and
cv_matching (examples/cv, every posting explained) through a one-shot daemon with a private
config, then scores the outputs: clustering vs topic labels (ARI), share of generated fields the
validator accepts, theme titles on topic, ranking vs quality labels (Spearman), NDCG@3 for
postings, labelled covered requirements shown as strengths. Prints a table, writes JSON.

  venvs/experimental/bin/python bench/quality_bench.py --label after
  venvs/experimental/bin/python bench/quality_bench.py --label before --code /tmp/q-before
  venvs/experimental/bin/python bench/quality_bench.py --calibrate   # cv threshold on cv_pairs
  venvs/experimental/bin/python bench/quality_bench.py --report      # table in docs/quality.md
  python3 bench/quality_bench.py --claims     # claim check on tests/data/claims/pairs.jsonl (no model)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.lib import grounded as guard  # noqa: E402
from jobs.lib import quality

EX = ROOT / "examples"


def run_jobs(code: Path, work: Path, max_notes: int, model: str | None) -> dict[str, Path]:
    """Submit the three kinds with `code`'s lab_attendant/jobs, run a burst daemon, return the
    output folder of each kind."""
    cfg = work / "lab.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{work}/var"\nlogs_dir = "{work}/logs"\n'
                   f'models_dir = "{ROOT}/models"\nallowed_roots = ["{EX}"]\n'
                   f'[worker]\npython = "{ROOT}/venvs/experimental/bin/python"\n'
                   + ((work / "models.toml").read_text() if (work / "models.toml").exists() else ""))
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}

    def cli(*args: str) -> str:
        return subprocess.run([str(ROOT / ".venv/bin/python"), "-c",
                               "from lab_attendant.cli.main import main; main()", "--config", str(cfg),
                               *args], env=env, check=True, capture_output=True, text=True,
                              cwd=work).stdout   # not ROOT: `python -c` puts the cwd first on sys.path

    extra = ["-p", f"model={model}"] if model else []
    ids = {
        "nightly_insights": cli("submit", "nightly_insights", "-p", f"archive={EX / 'archive'}",
                                "-p", f"max_notes={max_notes}", *extra),
        "artifact_refinement": cli("submit", "artifact_refinement", "-p", f"gems={EX / 'gems'}",
                                   *extra),
        "cv_matching": cli("submit", "cv_matching", "-p", f"cv={EX / 'cv/cv.md'}", "-p",
                           f"postings={EX / 'cv/postings'}", "-p", "top_k=6", *extra),
    }
    cli("daemon", "--burst", "--experimental-paging")
    out = {}
    for kind, rid in ids.items():
        run = json.loads(cli("show", rid.strip(), "--json"))
        if run["state"] != "succeeded":
            raise SystemExit(f"{kind} run {rid.strip()} ended {run['state']}: {run['reason']}")
        out[kind] = Path(run["result_path"]).parent
    return out


def score_insights(out: Path, labels: dict) -> dict:
    rep = json.loads((out / "insights.json").read_text())
    topic = {n: t for n, t in labels["notes"].items()}
    notes = {Path(n["path"]).name: n for n in rep["notes"]}
    cluster = {name: f"single-{name}" for name in notes}
    for i, t in enumerate(rep["themes"]):
        for n in t["notes"]:
            cluster[Path(n["path"]).name] = f"theme-{i}"
    names = sorted(n for n in notes if n in topic)
    texts = {n: (EX / "archive" / n).read_text() for n in names}
    ok = [guard.check(notes[n]["summary"].removeprefix("about "), source=texts[n],
                      echoes=[notes[n]["title"], notes[n]["date"]]) is None for n in names]
    titles_ok, on_topic = [], []
    for t in rep["themes"]:
        members = [Path(n["path"]).name for n in t["notes"]]
        major = Counter(topic[m] for m in members if m in topic).most_common(1)[0][0]
        on_topic.append(quality.on_topic(t["title"], major, labels["topic_words"]))
        titles_ok.append(guard.check(t["title"], source=" ".join(
            [*t.get("keyphrases", t.get("keywords", [])), *(n["title"] for n in t["notes"])]),
            exact=[n["title"] for n in t["notes"]],
            rules=guard.Rules(min_words=2, max_words=7, sentence=False, max_commas=0)) is None)
    extractive = sum(bool(n.get("extractive")) for n in rep["notes"])
    return {"notes": len(names), "themes": len(rep["themes"]),
            "ari": round(quality.adjusted_rand([topic[n] for n in names],
                                               [cluster[n] for n in names]), 3),
            "summaries_valid": round(sum(ok) / len(ok), 3),
            "summaries_extractive": extractive,
            "titles_valid": round(sum(titles_ok) / max(1, len(titles_ok)), 3),
            "titles_on_topic": round(sum(on_topic) / max(1, len(on_topic)), 3),
            "template_insights": sum("return to this theme" in t["insight"] for t in rep["themes"])}


def score_artifacts(out: Path, labels: dict) -> dict:
    rows = json.loads((out / "ranking.json").read_text())["artifacts"]
    q = labels["artifacts"]
    rho = quality.spearman([r["score"] for r in rows], [q[r["id"]] for r in rows])
    summ = [r for r in rows if r["treatment"] == "summarized"]
    bodies = {r["id"]: Path(r["source"]).read_text().split("\n---\n", 1)[-1] for r in summ}
    ok = [guard.check(r["summary"], source=bodies[r["id"]], echoes=[r["title"]]) is None
          for r in summ]
    return {"artifacts": len(rows), "spearman": round(rho, 3),
            "summaries_valid": round(sum(ok) / max(1, len(ok)), 3),
            "summaries_extractive": sum(bool(r.get("extractive")) for r in summ),
            "criteria": len(rows[0]["criteria"])}


def score_cv(out: Path, labels: dict) -> dict:
    rep = json.loads((out / "matches.json").read_text())
    lab = labels["postings"]
    rel = [lab[Path(r["path"]).name]["relevance"] for r in rep["ranking"]]
    covered = shown = false_gaps = strengths = right = 0
    valid = []
    for t in rep["top"]:
        want = set(lab[Path(t["path"]).name]["covered"])
        got = {s["requirement"] for s in t["strengths"]}
        covered += len(want)
        shown += len(want & got)
        false_gaps += len(want - got)
        strengths += len(got)
        right += len(got & want)
        text = t.get("rationale_model") if "rationale_model" in t else t.get("rationale", "")
        src = " ".join([t["title"], *(r["requirement"] + " " + r["evidence"]
                                     for r in t["requirements"])])
        valid.append(bool(text) and guard.check(
            text, source=src, forbid=[g["requirement"] for g in t.get("gaps", ())]) is None)
    return {"postings": len(rep["ranking"]), "ndcg3": round(quality.ndcg(rel, 3), 3),
            "covered_shown": round(shown / max(1, covered), 3), "false_gaps": false_gaps,
            "strength_precision": round(right / max(1, strengths), 3),
            "rationales_valid": round(sum(valid) / max(1, len(valid)), 3)}


def calibrate() -> dict:
    from jobs.lib.embed import Embedder
    pairs = quality.load_pairs()
    e = Embedder()
    a = e.embed([p["requirement"] for p in pairs])
    b = e.embed([p["cv"] for p in pairs])
    sims = [sum(x * y for x, y in zip(u, v)) for u, v in zip(a, b)]
    t, f1 = quality.best_threshold(sims, [p["covered"] for p in pairs])
    return {"pairs": len(pairs), "threshold": t, "f1": f1}


ROWS = [  # (part, key, what a person reads)
    ("insights", "ari", "notes: clustering vs topic labels (adjusted Rand index)"),
    ("insights", "summaries_valid", "notes: summaries the validator accepts"),
    ("insights", "summaries_extractive", "notes: summaries that are extractive fallbacks"),
    ("insights", "titles_valid", "themes: titles the validator accepts"),
    ("insights", "titles_on_topic", "themes: titles on the labelled topic"),
    ("insights", "template_insights", "themes: template insights"),
    ("artifacts", "criteria", "artifacts: rubric criteria"),
    ("artifacts", "spearman", "artifacts: ranking vs quality labels (Spearman)"),
    ("artifacts", "summaries_valid", "artifacts: summaries the validator accepts"),
    ("artifacts", "summaries_extractive", "artifacts: summaries that are extractive fallbacks"),
    ("cv", "ndcg3", "postings: NDCG@3 vs graded relevance"),
    ("cv", "covered_shown", "postings: labelled covered requirements shown as strengths"),
    ("cv", "false_gaps", "postings: covered requirements listed as gaps"),
    ("cv", "strength_precision", "postings: strengths that are labelled covered"),
    ("cv", "rationales_valid", "postings: model rationale sentences the validator accepts"),
]


def report(dest: Path) -> None:
    """docs/quality.md's table from bench/results/quality_{before,after}.json."""
    res = {k: json.loads((ROOT / "bench/results" / f"quality_{k}.json").read_text())
           for k in ("before", "after")}
    lines = ["| measure | before | after |", "|---|---|---|"]
    lines += [f"| {what} | {res['before'][part].get(key, '–')} | {res['after'][part].get(key, '–')} |"
              for part, key, what in ROWS]
    text = dest.read_text()
    start, end = text.index("<!-- table -->") + len("<!-- table -->"), text.index("<!-- /table -->")
    dest.write_text(text[:start] + "\n" + "\n".join(lines) + "\n" + text[end:])
    print("\n".join(lines))


def claims_report() -> dict:
    """The claim check on each hand-labelled set (the development set, the two held-out sets, and all of
    them): precision/recall per method, recall among the true sentences the field rules accept, job runs
    replayed over the same real outputs (share of shown sentences false, share model-written), and the
    align grid on the development set."""
    from jobs.lib import claims_eval
    sets = {name: claims_eval.load_pairs(claims_eval.PAIRS.parent / f"{name}.jsonl")
            for name in ("pairs", "pairs-heldout", "pairs-heldout2")}
    sets["all"] = [p for pairs in sets.values() for p in pairs]
    out: dict = {}
    for set_name, pairs in sets.items():
        methods = {name: claims_eval.confusion(pairs, keep) for name, keep in claims_eval.METHODS.items()}
        useful = [p for p in pairs if claims_eval._text_rules(p) is None]   # what the field rules accept
        recall_after_rules = {name: claims_eval.confusion(useful, keep)["recall"]
                              for name, keep in claims_eval.METHODS.items()}
        runs = {name: claims_eval.replay(pairs, keep) for name, keep in claims_eval.METHODS.items()}
        print(f"\n== {set_name}: {len(pairs)} labelled pairs ({sum(p['label'] for p in pairs)} true), "
              f"{len({(p['task'], p['file']) for p in pairs})} items")
        print(f"{'method':34} {'precision':>9} {'recall':>7} {'recall|rules':>12} {'kept':>5} {'shown false':>11} "
              f"{'model-written':>13}")
        for name, c in methods.items():
            r = runs[name]
            print(f"{name:34} {c['precision']:9.3f} {c['recall']:7.3f} {recall_after_rules[name]:12.3f} "
                  f"{c['kept']:5d} {r['shown_false']:>4}/{r['items']:<3} {r['shown_false_share']:.3f} "
                  f"{r['model_written_share']:8.3f}  {r['model_written_by_task']}")
        out[set_name] = {"pairs": len(pairs), "methods": methods, "recall_after_field_rules": recall_after_rules,
                         "replayed_runs": runs}
    grid = claims_eval.grid(sets["pairs"])
    print("\nalign grid on the development set (rules + facts + align at window clauses, min coverage):")
    for g in grid:
        print(f"  window {g['window']} coverage {g['min_coverage']:.2f}: precision {g['precision']:.3f} "
              f"recall {g['recall']:.3f}")
    return {"sets": out, "grid": grid}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="after", help="name of this measurement (before/after)")
    ap.add_argument("--code", type=Path, default=ROOT, help="checkout whose jobs are measured")
    ap.add_argument("--max-notes", type=int, default=41)
    ap.add_argument("--model", help="a [models.NAME] of --config (default: the embedded model)")
    ap.add_argument("--config", type=Path, help="TOML whose [models.*] tables are copied in")
    ap.add_argument("--calibrate", action="store_true", help="only calibrate the cv threshold")
    ap.add_argument("--keep", action="store_true", help="keep the run folders (path printed)")
    ap.add_argument("--score", type=Path, help="only score the run folders --keep left there")
    ap.add_argument("--report", action="store_true",
                    help="only rewrite docs/quality.md's table from the before/after JSON")
    ap.add_argument("--claims", action="store_true",
                    help="only score the claim check on tests/data/claims/pairs.jsonl (no model needed)")
    args = ap.parse_args()
    if args.claims:
        from machine import write_results  # bench/ is this script's folder, first on sys.path
        print(f"wrote {write_results('claims', claims_report())}")
        return
    if args.report:
        report(ROOT / "docs" / "quality.md")
        return
    if args.calibrate:
        print(json.dumps(calibrate(), indent=1))
        return
    labels = quality.load_labels()
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        if args.keep:
            tmp = tempfile.mkdtemp(prefix="quality-kept-")
            print(f"run folders kept in {tmp}")
        if args.config:   # the private config gets the user's [models.*] tables, nothing else
            import tomllib
            models = tomllib.loads(args.config.read_text()).get("models", {})
            (Path(tmp) / "models.toml").write_text("".join(
                f"[models.{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in t.items())
                for name, t in models.items()))
        outs = ({k: args.score / "var/runs" / str(i) / "output" for i, k in enumerate(
                    ("nightly_insights", "artifact_refinement", "cv_matching"), 1)}
                if args.score else run_jobs(args.code.resolve(), Path(tmp), args.max_notes,
                                            args.model))
        res = {"label": args.label, "machine": f"{platform.node()} {platform.machine()} "
               f"{os.cpu_count()} cpus", "model": args.model or "gemma-3-270m (fp32, cpu)",
               "insights": score_insights(outs["nightly_insights"], labels),
               "artifacts": score_artifacts(outs["artifact_refinement"], labels),
               "cv": score_cv(outs["cv_matching"], labels), "wall_s": round(time.time() - start)}
    for part in ("insights", "artifacts", "cv"):
        for k, v in res[part].items():
            print(f"{args.label:8} {part:10} {k:22} {v}")
    dest = ROOT / "bench" / "results" / f"quality_{args.label}.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
