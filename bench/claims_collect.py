"""Collect real model sentences for the claim-check labelled set: the embedded model's note summaries,
artifact summaries and CV rationales, built with the kinds' own prompts, written unlabelled for reading."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.contract.spec import ModelSpec  # noqa: E402
from jobs.kinds import artifact_refinement as ar  # noqa: E402
from jobs.kinds import cv_matching as cvm  # noqa: E402
from jobs.kinds import nightly_insights as ni  # noqa: E402
from jobs.lib import (
    artifacts,  # noqa: E402
    fewshot,  # noqa: E402
    manifest,  # noqa: E402
)
from jobs.lib import grounded as guard  # noqa: E402
from jobs.lib.embed import Embedder  # noqa: E402
from jobs.paging.generate import Sampling, generate  # noqa: E402
from jobs.paging.open import open_model  # noqa: E402

EX = ROOT / "examples"
OWN = ROOT / "tests" / "data" / "claims"


def note_items(folders: tuple[Path, ...] = (EX / "archive", OWN / "own_notes")) -> list[dict]:
    out = []
    for folder in folders:
        for p in sorted(folder.glob("*.md")):
            text = p.read_text()
            d, t = manifest.note_date(p.name, 0), ni._title(p.name, text)
            for e in (0, 1):
                out.append({"task": "note_summary", "file": str(p.relative_to(ROOT)), "example": e,
                            "source": text, "prompt": ni.map_prompt(d, t, text, e), "prefix": ""})
    return out


def artifact_items() -> list[dict]:
    out = []
    for a in artifacts.load(EX / "gems"):
        if a.is_technical_story:
            continue
        for e in (0, 1):
            out.append({"task": "artifact_summary", "file": str(Path(a.source).relative_to(ROOT)), "example": e,
                        "source": a.body, "prompt": ar.summary_prompt(a, e), "prefix": ""})
    return out


def cv_items(embedder: Embedder, pairs: list[tuple[Path, list[Path]]] | None = None) -> list[dict]:
    out = []
    if pairs is None:
        pairs = [(EX / "cv" / "cv.md", sorted((EX / "cv" / "postings").glob("*.md"))),
                 (OWN / "own_cv" / "cv-frontend.md",
                  [*sorted((EX / "cv" / "postings").glob("*.md")), OWN / "own_cv" / "posting-platform.md"])]
    for cv_path, postings in pairs:
        cv_text = cv_path.read_text()
        units = cvm.cv_units(cv_text)
        unit_vecs = embedder.embed(units)
        for p in postings:
            text = p.read_text()
            reqs = cvm.requirements(text)
            per = cvm.match(reqs, embedder.embed(reqs), units, unit_vecs)
            s = {"requirements": per, "strengths": [r for r in per if r["covered"]],
                 "gaps": [r for r in per if not r["covered"]]}
            src = cvm.rationale_source(cvm.title_of(p, text), per)
            for e in (0, 1):
                out.append({"task": "cv_rationale", "file": f"{cv_path.relative_to(ROOT)} x {p.relative_to(ROOT)}",
                            "example": e, "source": src, "facts": cvm.facts(s),
                            "covered": len(s["strengths"]), "requirements": len(per),
                            "gaps": [g["requirement"] for g in s["gaps"]],
                            "prompt": cvm.rationale_prompt(cvm.title_of(p, text), s["strengths"], s["gaps"], e),
                            "prefix": "The candidate"})
    return out


def _key(c: dict) -> tuple[str, str, str]:
    return c["task"], " x ".join(Path(f).name for f in c["file"].split(" x ")), str(c["example"])


def merge(candidate_files: list[Path], labels: Path, out: Path) -> int:
    """candidates.jsonl + labels.tsv (read by hand: task, file, example, T/F, why) -> pairs.jsonl with the
    source each sentence is checked against and what the kinds forbid it to echo."""
    lab = {}
    for line in labels.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            task, name, example, label, why = line.split("\t")
            lab[(task, name, example)] = (label == "T", why)
    rows = []
    seen = set()
    for c in (json.loads(line) for f in candidate_files if f.exists() for line in f.read_text().splitlines()):
        if _key(c) in seen:
            continue
        seen.add(_key(c))
        if _key(c) not in lab:
            continue
        label, why = lab[_key(c)]
        if c["task"] == "note_summary":
            name = Path(c["file"]).name
            echoes = [ni._title(name, c["source"]), manifest.note_date(name, 0), *ni.EXAMPLE_TEXTS]
            source = c["source"]
        elif c["task"] == "artifact_summary":
            echoes = [artifacts.parse_markdown(ROOT / c["file"]).title, *ar.EXAMPLE_TEXTS]
            source = c["source"]
        else:
            echoes = [y for *_, y in fewshot.RATIONALES]
            source = c["source"] + "\n" + (ROOT / c["file"].split(" x ")[0]).read_text()  # + the CV
        rows.append({**c, "source": source, "echoes": echoes, "label": label, "why": why})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} labelled pairs ({sum(r['label'] for r in rows)} true) -> {out}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=OWN / "candidates.jsonl")
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "gemma-3-270m")
    ap.add_argument("--merge", action="store_true", help="write pairs.jsonl from the candidates and labels.tsv")
    ap.add_argument("--notes-from-end", action="store_true",
                    help="only the bundled notes' first tries, last note first (a second collector)")
    ap.add_argument("--notes", type=Path, nargs="*", default=None, metavar="DIR",
                    help="only the notes in these folders (a held-out set); with --cv, only those items")
    ap.add_argument("--cv", type=Path, nargs="*", default=None, metavar="CV",
                    help="only these CVs, each against every --postings file")
    ap.add_argument("--postings", type=Path, nargs="*", default=[], metavar="P")
    ap.add_argument("--merge-heldout", nargs="?", const="heldout", default=None, metavar="NAME",
                    help="write pairs-NAME.jsonl from candidates-NAME.jsonl and labels-NAME.tsv "
                         "(a held-out set; NAME defaults to heldout, e.g. heldout2)")
    args = ap.parse_args()
    if args.merge:
        return merge([args.out, OWN / "candidates-2.jsonl"], OWN / "labels.tsv", OWN / "pairs.jsonl")
    if args.merge_heldout:
        n = args.merge_heldout
        return merge([OWN / f"candidates-{n}.jsonl"], OWN / f"labels-{n}.tsv", OWN / f"pairs-{n}.jsonl")
    embedder = Embedder()
    if args.notes is not None or args.cv is not None:   # only the named items (a held-out set)
        cvs = [(c.resolve(), [p.resolve() for p in args.postings]) for c in args.cv or []]
        items = (cv_items(embedder, cvs) if cvs else []) + note_items(tuple(d.resolve() for d in args.notes or []))
    else:
        items = cv_items(embedder) + artifact_items() + note_items()
    # Own notes first, then the bundled ones: a partial run still covers every source type.
    items.sort(key=lambda i: (i["task"] != "note_summary" or "own_notes" not in i["file"]))
    done = {(d["task"], d["file"], d["example"]) for d in map(json.loads, args.out.read_text().splitlines())
            } if args.out.exists() else set()
    items = [i for i in items if (i["task"], i["file"], i["example"]) not in done]
    if args.notes_from_end:
        items = [i for i in reversed(items) if i["example"] == 0 and "examples/archive" in i["file"]]
    loaded = open_model(ModelSpec(name="gemma-3-270m", path=str(args.model)), batch_size=8)
    try:
        for first in range(0, len(items), 8):
            batch = items[first:first + 8]
            res = generate(loaded, [i["prompt"] for i in batch], max_new_tokens=40, batch_size=8,
                           sampling=Sampling(no_repeat_ngram_size=3), stop=("\n",))
            with args.out.open("a") as f:   # appended per batch: a long collection can be resumed
                for item, c in zip(batch, res.outputs):
                    raw = c.text.strip()
                    sentence = guard.clean(f"{item['prefix']} {raw}" if item["prefix"] else raw)
                    f.write(json.dumps({**{k: v for k, v in item.items() if k != "prompt"},
                                        "sentence": sentence}) + "\n")
            print(f"{first + len(batch)}/{len(items)} in {res.wall_s:.0f} s", flush=True)
    finally:
        loaded.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
