"""The probe kind's read bandwidth is remembered for its disk (state_dir/worker/probe/read_bandwidth.json) and the plan
of a model on that disk uses it for its disk bound: real daemon, real worker, real files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Lab
from tests.fixtures.gguf_headers import gemma3_27b, write_header_only


def test_a_probe_run_gives_the_plan_its_disk_bandwidth(lab: Lab):
    data = lab.root / "data"
    data.mkdir()
    (data / "weights.bin").write_bytes(b"w" * (4 * 1024**2))
    model = data / "gemma-3-27b-it-q4_0.gguf"
    write_header_only(model, *gemma3_27b("Q4_0"))
    rid = lab.submit("probe", f"path={data / 'weights.bin'}")
    lab.cli("daemon", "--burst", timeout=120)
    run = lab.show(rid)
    assert run["state"] == "succeeded", run["reason"]
    measured = json.loads((Path(run["run_dir"]) / "output" / "probe.json").read_text())["read_bandwidth"]
    # only a read with the page cache dropped measures the disk; a warm one is not remembered
    assert measured["remembered"] == measured["page_cache_dropped"]
    plan = json.loads(lab.cli("model", "plan", str(model), "--device-profile", "rtx2080ti", "--batch", "8",
                              "--context", "1024", "--host-ram", "4GiB", "--json").stdout)
    assert plan["from_disk"]
    if measured["remembered"]:
        assert plan["request"]["disk_bytes_per_s"] == measured["bytes_per_s"]
        assert plan["request"]["disk_source"].startswith(f"probe of {data / 'weights.bin'}")
        assert plan["bound_tokens_per_s"] == pytest.approx(8 * measured["bytes_per_s"] / plan["disk_bytes_per_pass"])
    else:
        assert plan["bound_tokens_per_s"] is None and "probe" in plan["bound_note"]
