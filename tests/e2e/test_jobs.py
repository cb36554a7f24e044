"""The three paging jobs end to end: real daemon, real worker in the experimental venv, the real
Gemma-3-270M and MiniLM, small slices of the sample data copied into the test's folder."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import EXPERIMENTAL_PYTHON, MODEL_DIR, NEEDS_MODEL, ROOT, Lab, write_config

EXAMPLES = ROOT / "examples"

pytestmark = [pytest.mark.e2e, pytest.mark.slow, NEEDS_MODEL]


def _burst(lab: Lab) -> None:
    lab.cli("daemon", "--burst", "--experimental-paging", timeout=400)


def _succeeded(lab: Lab, rid: int) -> dict:
    run = lab.show(rid)
    assert run["state"] == "succeeded", (run["reason"], lab.cli("logs", str(rid)).stdout[-3000:])
    assert run["progress"]["total"] is not None and run["progress"]["done"] == run["progress"]["total"]
    return run


def _outside_file(lab: Lab, name: str, text: str) -> Path:
    """A file outside the lab's allowed root (a symlink to it is what confinement must refuse)."""
    d = lab.root.parent / f"{lab.root.name}-outside"
    d.mkdir(exist_ok=True)
    (d / name).write_text(text)
    return d / name


def _copy(names: list[str], src: Path, dst: Path) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(src / n, dst / n)) for n in names]


NOTES = ["2009-03-14-first-bike-tour.md", "2018-06-09-bike-tour-to-the-sea.md",
         "2014-06-14-the-database-outage.md"]


def test_nightly_insights_incremental_and_a_killed_run_changes_nothing(resident_model_lab: Lab):
    lab = resident_model_lab
    archive = lab.root / "archive"
    notes = _copy(NOTES, EXAMPLES / "archive", archive)
    secret = _outside_file(lab, "2020-01-01-secret.md", "# Payroll\nThe password is hunter2.\n")
    (archive / secret.name).symlink_to(secret)       # read by no one: it resolves outside
    rid = lab.submit("nightly_insights", f"archive={archive}", "max_new_tokens=8")
    _burst(lab)
    run = _succeeded(lab, rid)
    report = json.loads(Path(run["result_path"]).read_text())
    assert report["notes_processed"] == 3 and report["notes_total"] == 3
    assert [e for e in run["events"] if e["kind"] == "warning" and secret.name in e["reason"]]
    assert "hunter2" not in (Path(run["result_path"]).parent / "insights.md").read_text()
    md = (Path(run["result_path"]).parent / "insights.md").read_text()
    assert md.startswith("# Insights") and "3 of 3 notes" in md
    assert "return to this theme" not in md                  # no template insight
    for t in report["themes"]:
        assert t["title"] and "," not in t["title"] and str(archive) in t["insight"]
    for n in report["notes"]:
        assert n["summary"] and n["summary"] != n["title"] and "extractive" in n
    cited = [n["path"] for t in report["themes"] for n in t["notes"]] + \
        [n["path"] for n in report["notes"]]
    assert cited and all(Path(p).is_file() and Path(p).parent == archive for p in cited)
    assert run["metrics"]["tokens_generated"] > 0 and run["metrics"]["tokens_per_s"] > 0
    assert run["metrics"]["engine_num_layers"] == 18
    manifest = next((lab.state_dir / "worker" / "nightly_insights" / "insights").glob("*/manifest.json"))
    manifest_after_first = manifest.read_bytes()

    again = lab.submit("nightly_insights", f"archive={archive}", "max_new_tokens=8")
    _burst(lab)
    assert json.loads(Path(_succeeded(lab, again)["result_path"]).read_text())[
        "notes_processed"] == 0

    notes[2].write_text(notes[2].read_text() + "\nAdded later: we also wrote a runbook.\n")
    lab.start_daemon("--experimental-paging")
    killed = lab.submit("nightly_insights", f"archive={archive}", "max_new_tokens=8")
    lab.wait_state(killed, {"running"}, timeout_s=60)
    time.sleep(2.0)
    lab.cli("cancel", str(killed))
    gone = lab.wait_state(killed, {"cancelled"}, timeout_s=30)
    out = Path(gone["run_dir"]) / "output"
    assert not list(out.glob("insights*")) and not list(out.glob(".*tmp*"))
    assert manifest.read_bytes() == manifest_after_first

    last = lab.submit("nightly_insights", f"archive={archive}", "max_new_tokens=8")
    lab.wait_state(last, {"succeeded", "failed"}, timeout_s=300)
    report = json.loads(Path(_succeeded(lab, last)["result_path"]).read_text())
    assert report["notes_processed_paths"] == [str(notes[2])]
    assert manifest.read_bytes() != manifest_after_first


def test_artifact_refinement_ranks_all_and_never_summarizes_technical_stories(resident_model_lab: Lab):
    lab = resident_model_lab
    gems = _copy(["g01-disk-full-outage.md", "g04-sourdough-card.md", "g11-quantized-kv-cache.md"],
                 EXAMPLES / "gems", lab.root / "gems")
    rid = lab.submit("artifact_refinement", f"gems={lab.root / 'gems'}", "max_new_tokens=8")
    _burst(lab)
    run = _succeeded(lab, rid)
    out = Path(run["result_path"]).parent
    ranking = json.loads(Path(run["result_path"]).read_text())["artifacts"]
    assert [r["rank"] for r in ranking] == [1, 2, 3]
    assert [r["score"] for r in ranking] == sorted((r["score"] for r in ranking), reverse=True)
    assert all(0 < r["score"] < 1 and r["reason"] for r in ranking)
    by_id = {r["id"]: r for r in ranking}
    refined = (out / "refined.md").read_text()
    prompts = json.loads((out / "prompts.json").read_text())
    summarize = [p for p in prompts if p["purpose"] == "summarize"]
    assert {p["artifact"] for p in summarize} == {"g04-sourdough-card"}   # two few-shot variants
    for gem in (gems[0], gems[2]):
        body = gem.read_text().split("\n---\n", 1)[1]
        row = by_id[gem.stem]
        assert row["treatment"] == "verbatim" and "summary" not in row
        assert Path(row["verbatim_path"]).read_bytes() == body.encode()
        assert body.rstrip("\n") in refined
        first_line = body.splitlines()[0]
        assert not any(first_line[:60] in p["prompt"] for p in summarize)
    card = by_id["g04-sourdough-card"]
    assert card["treatment"] == "summarized" and card["summary"] and "extractive" in card
    assert card["extractive"] or card["summary"] not in gems[1].read_text()   # generated, or...
    assert not card["extractive"] or card["summary"].rstrip(" …") in " ".join(
        gems[1].read_text().split())                                            # ...quoted from it
    assert sum(p["purpose"] == "rubric" for p in prompts) == 3 * 4        # four criteria
    for r in ranking:   # the reason quotes this artifact's own words
        quote = r["reason"].split('"')[1].rstrip(" …")
        assert quote and quote in " ".join(Path(r["source"]).read_text().split())


def test_cv_matching_ranks_postings_and_explains_the_top_k(resident_model_lab: Lab):
    lab = resident_model_lab
    postings = _copy(["p1-platform-team-lead.md", "p4-frontend-developer.md",
                      "p6-ml-research-scientist.md"], EXAMPLES / "cv" / "postings",
                     lab.root / "postings")
    cv = _copy(["cv.md"], EXAMPLES / "cv", lab.root)[0]
    secret = _outside_file(lab, "p9-secret.md", "# Secret posting\n- knows hunter2\n")
    (lab.root / "postings" / secret.name).symlink_to(secret)
    rid = lab.submit("cv_matching", f"cv={cv}", f"postings={lab.root / 'postings'}", "top_k=2",
                     "max_new_tokens=8")
    _burst(lab)
    run = _succeeded(lab, rid)
    report = json.loads(Path(run["result_path"]).read_text())
    assert sorted(r["path"] for r in report["ranking"]) == sorted(map(str, postings))
    assert report["ranking"][0]["path"].endswith("p1-platform-team-lead.md")  # the obvious fit
    assert len(report["top"]) == 2
    cv_text = cv.read_text()
    for top in report["top"]:
        assert Path(top["path"]).is_file()
        assert all(s["evidence"] in cv_text.replace("**", "") for s in top["strengths"])
        assert top["rationale"].startswith("The CV supports")
    md = (Path(run["result_path"]).parent / "matches.md").read_text()
    assert "3 postings" in md
    assert (Path(run["result_path"]).parent / "matches.md").read_text().startswith("# CV matches")
    assert run["metrics"]["model"] == "gemma-3-270m"


def test_unknown_model_is_refused_at_submit(model_lab: Lab):
    (model_lab.root / "p").mkdir()
    (model_lab.root / "cv.md").write_text("cv")
    proc = model_lab.cli("submit", "cv_matching", "-p", f"cv={model_lab.root / 'cv.md'}",
                         "-p", f"postings={model_lab.root / 'p'}", "-p", "model=nope", check=False)
    assert proc.returncode == 2 and "unknown model 'nope'" in proc.stderr
    assert json.loads(model_lab.cli("list", "--json").stdout) == []


def test_quantize_then_a_run_on_the_4bit_variant_records_the_choice(model_lab: Lab):
    """`model quantize` writes the variant beside the original (unchanged); a [models.NAME] table
    with variant/kv_cache runs on it through the daemon, and the run's metrics say what was used."""
    lab = model_lab
    original = MODEL_DIR / "model.safetensors"
    before = (original.stat().st_size, original.stat().st_mtime_ns)
    # the default model streams its GGUF; the variant is written for the converted bf16 folder
    write_config(lab.root, python=EXPERIMENTAL_PYTHON, default_timeout_s=900, extra=f"""
[models.fast]
path = "{MODEL_DIR}"
vram_budget_bytes = "96MiB"
variant = "fast"
kv_cache = "int8"
""")
    out = json.loads(lab.cli("model", "quantize", "fast", timeout=900).stdout)
    assert Path(out["variant"]).resolve() == MODEL_DIR / "variants" / "q4g64"  # models/ is a symlink
    assert 0.25 < out["bytes_quantized"] / out["bytes_precise"] < 0.3
    assert (original.stat().st_size, original.stat().st_mtime_ns) == before
    archive = lab.root / "archive"
    _copy(NOTES[:1], EXAMPLES / "archive", archive)
    rid = lab.submit("nightly_insights", f"archive={archive}", "max_new_tokens=4", "model=fast")
    _burst(lab)
    m = _succeeded(lab, rid)["metrics"]
    assert m["model"] == "fast" and m["engine_variants"] == "F" * 18
    assert m["kv_cache"] == "int8" and m["kv_cache_peak_bytes"] > 0
    # 16 streamed fast layers a pass: ~3.1 MB each instead of ~11.1 MB in bf16.
    assert 16 * 2_500_000 < m["engine_bytes_read_per_pass"] < 16 * 3_500_000


DEMO_FALSE = ["First bike tour: I learned to ride a bike",
              "Reading The Name of the Rose: I read the short stories of Lea, and I was surprised to find "
              "that she was a writer"]


def test_the_demo_insights_show_no_sentence_the_claim_check_rejects(model_lab: Lab):
    """Issue #30: every summary shown as the model's is supported by its note (claims.align), the
    others are marked extracted, and the two false demo sentences are never shown as model text."""
    from jobs.lib import claims

    lab = model_lab
    archive = lab.root / "archive"
    names = ["2009-03-14-first-bike-tour.md", "2010-10-12-reading-the-name-of-the-rose.md",
             "2018-06-09-bike-tour-to-the-sea.md"]
    _copy(names, EXAMPLES / "archive", archive)
    rid = lab.submit("nightly_insights", f"archive={archive}")
    _burst(lab)
    run = _succeeded(lab, rid)
    # The embedded default (README's first command) is streamed from its GGUF layer by layer: 16 of 18
    # layers read from the file every pass, in blocks (~3.8 MB a layer, not bf16's ~11 MB).
    m = run["metrics"]
    assert m["engine_num_layers"] == 18 and m["engine_streamed_layers"] == 16
    assert m["engine_bytes_read"] >= 16 * 3_000_000
    report = json.loads(Path(run["result_path"]).read_text())
    md = (Path(run["result_path"]).parent / "insights.md").read_text()
    assert "model `gemma-3-270m`" in md and "checked claim by claim" in md
    for n in report["notes"]:
        note = Path(n["path"]).read_text()
        assert n["provenance"] in ("model, checked", "extracted")
        if n["provenance"] == "extracted":
            assert n["extractive"] and f"{n['summary']} *(extracted)*" in md
            assert " ".join(n["summary"].split()).rstrip(" …") in " ".join(note.split())
        else:
            assert claims.align(n["summary"], note).ok and n["evidence"]
    for false in DEMO_FALSE:
        assert not claims.align(false, (EXAMPLES / "archive" / names[0]).read_text()).ok
        assert not claims.align(false, (EXAMPLES / "archive" / names[1]).read_text()).ok
        assert false.split(": ", 1)[1] not in md
