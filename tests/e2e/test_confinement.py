"""Path confinement where the worker opens files, end to end: real daemon, real worker, real
symlinks (the `probe` kind reads whatever its path param names)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import Lab

pytestmark = pytest.mark.e2e


@pytest.fixture
def outside(lab: Lab) -> Path:
    d = lab.root.parent / f"{lab.root.name}-outside"     # not under the lab's allowed root
    d.mkdir()
    (d / "secret.bin").write_bytes(b"s" * 4096)
    return d


def test_symlinked_file_is_skipped_with_a_warning_event(lab: Lab, outside: Path):
    data = lab.root / "data"
    data.mkdir()
    (data / "a.bin").write_bytes(b"a" * 8192)
    os.symlink(outside / "secret.bin", data / "link.bin")
    rid = lab.submit("probe", f"path={data}")
    lab.cli("daemon", "--burst", timeout=120)
    run = lab.show(rid)
    assert run["state"] == "succeeded", run["reason"]
    warnings = [e["reason"] for e in run["events"] if e["kind"] == "warning"]
    assert len(warnings) == 1 and "link.bin" in warnings[0] and "outside the allowed roots" in warnings[0]
    report = json.loads((Path(run["run_dir"]) / "output" / "probe.json").read_text())
    assert report["read_bandwidth"]["files"] == 1 and report["read_bandwidth"]["bytes_read"] == 8192


def test_folder_swapped_for_a_symlink_after_submit_fails_the_run(lab: Lab, outside: Path):
    data = lab.root / "data"
    data.mkdir()
    (data / "a.bin").write_bytes(b"a" * 8192)
    rid = lab.submit("probe", f"path={data}")              # inside the roots at submit
    data.rename(lab.root / "moved")
    os.symlink(outside, data)                              # ... and swapped before it runs
    lab.cli("daemon", "--burst", timeout=120)
    run = lab.show(rid)
    assert run["state"] == "failed"
    text = run["reason"] + " ".join(e["reason"] for e in run["events"])
    assert "outside the allowed roots" in text and str(data) in text
    assert not (Path(run["run_dir"]) / "output" / "probe.json").exists()
