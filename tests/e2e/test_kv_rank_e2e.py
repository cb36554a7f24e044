"""kv_rank_study end to end: bad params exit 2 at submit (nothing queued), and a small study through the real
daemon and worker on the real Gemma-3-270M writes its three outputs."""
from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import EXPERIMENTAL_PYTHON, NEEDS_MODEL, RESIDENT_DEFAULT, ROOT, Lab, write_config

TEXTS = ROOT / "examples" / "kv_texts"

pytestmark = [pytest.mark.e2e, NEEDS_MODEL]


@pytest.fixture
def kv_lab(model_lab: Lab) -> Lab:
    """model_lab (tests/conftest.py) with two of the sample passages copied in."""
    lab = model_lab
    texts = lab.root / "texts"
    texts.mkdir()
    for name in sorted(p.name for p in TEXTS.iterdir())[:2]:
        shutil.copy2(TEXTS / name, texts / name)
    return lab


@pytest.mark.parametrize("params, needle", [
    (["ranks=0"], "every rank must be at least 1"),
    (["ranks=8,257"], "> head_dim 256"),            # read from the model's config.json, no torch
    (["texts=EMPTY"], "no passages"),
])
def test_bad_params_exit_2_at_submit(kv_lab: Lab, params: list[str], needle: str):
    (kv_lab.root / "empty").mkdir()
    raw = {"texts": str(kv_lab.root / "texts")}
    raw.update(p.split("=", 1) for p in params)
    raw["texts"] = raw["texts"].replace("EMPTY", str(kv_lab.root / "empty"))
    args = [a for k, v in raw.items() for a in ("-p", f"{k}={v}")]
    proc = kv_lab.cli("submit", "kv_rank_study", *args, check=False)
    assert proc.returncode == 2 and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert json.loads(kv_lab.cli("list", "--json").stdout) == []


@pytest.mark.slow
def test_a_small_study_runs_through_the_daemon(kv_lab: Lab):
    lab = kv_lab
    write_config(lab.root, python=EXPERIMENTAL_PYTHON, default_timeout_s=900, extra=RESIDENT_DEFAULT)
    rid = lab.submit("kv_rank_study", f"texts={lab.root / 'texts'}", "context=64", "continuation=16",
                     "ranks=4,32", "batch_size=6")
    lab.cli("daemon", "--burst", "--experimental-paging", timeout=400)
    run = lab.show(rid)
    assert run["state"] == "succeeded", (run["reason"], lab.cli("logs", str(rid)).stdout[-3000:])
    assert run["progress"]["done"] == run["progress"]["total"] and run["progress"]["unit"] == "caches"
    out = Path(run["result_path"]).parent
    assert Path(run["result_path"]).name == "kv_rank.json"
    report = json.loads(Path(run["result_path"]).read_text())
    rows = {r["label"]: r for r in report["results"]}
    assert report["positions"] == 2 * 16 and [p["id"] for p in report["passages"]] == \
        sorted(p.stem for p in (lab.root / "texts").iterdir())
    assert rows["full"]["top1_agreement"] == 1 and rows["full"]["mean_kl"] == 0
    assert {"svd r=4", "svd r=32", "int8", "int4", "int2"} <= set(rows)
    assert all(r["matched_to"] in rows for r in report["results"] if r["method"] == "last_n")
    assert rows["svd r=32"]["mean_kl"] < rows["svd r=4"]["mean_kl"]
    assert report["cache"]["head_dim"] == 256 and report["cache"]["sliding_layers"] == 15
    assert report["claim"]["rank"] == 32 and report["claim"]["text"]
    # the study's own passes are the engine's work: counted, not left at zero
    assert report["engine"]["prompt_tokens"] == 2 * (64 + 16 * len(rows)) and report["engine"]["engine_busy_s"] > 0
    assert run["metrics"]["prompt_tokens_per_s"] > 0
    assert run["progress"]["total"] == 2 * len(rows)
    md = (out / "kv_rank.md").read_text()
    assert md.startswith("# KV rank study: gemma-3-270m") and "## Verdict" in md
    ET.fromstring((out / "kv_rank.svg").read_text())
