"""The morning view against a real daemon: `watch` piped into a file yields flushed frames with a
labelled phase, a narrow `watch`/`list` keeps ID and STATE whole, `show --output` prints an output
(confined to the run's output folder) and `list --format` shows peak RSS and exit codes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import Lab, wait_for

pytestmark = pytest.mark.e2e
FRAME_HEAD = re.compile(r"^lab-attendant  \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", re.M)


def _cli(lab: Lab, *args: str, columns: int | None = None, **kw) -> subprocess.CompletedProcess:
    env = lab.env()
    env.pop("COLUMNS", None)
    if columns:
        env["COLUMNS"] = str(columns)
    return subprocess.run([sys.executable, "-m", "lab_attendant.cli.main", "--config",
                           str(lab.config), *args], capture_output=True, env=env, cwd=lab.root,
                          timeout=60, **kw)


def test_watch_into_a_file_yields_flushed_frames_and_narrow_views_keep_id_and_state(lab: Lab):
    lab.start_daemon()
    rid = lab.submit("sleepy", "seconds=60", "phase=reading notes",
                     extra=("--name", "a-rather-long-run-name"))
    wait_for(lambda: lab.show(rid)["progress"]["phase"] == "reading notes" or None, 30,
             "the phase label to reach the store")
    out = lab.root / "watch.txt"
    with open(out, "wb") as fh:   # killed by SIGTERM like `timeout 3 lab-attendant watch > f`
        subprocess.run(["timeout", "3", sys.executable, "-m", "lab_attendant.cli.main", "--config",
                        str(lab.config), "watch", "--interval", "0.5"], stdout=fh,
                       env=lab.env(), cwd=lab.root)
    text = out.read_text()
    assert len(FRAME_HEAD.findall(text)) >= 2, text
    assert "\x1b[" not in text and "Ctrl-C" not in text          # plain frames, no cursor moves
    row = next(ln for ln in text.splitlines() if ln.split()[:1] == [str(rid)])
    assert "running" in row and re.search(r"reading notes \d+/600", row), row

    for width in (80, 50):
        frame = _cli(lab, "watch", "--once", columns=width, text=True).stdout
        line = next(ln for ln in frame.splitlines() if ln.split()[:1] == [str(rid)])
        assert line.split()[1:].count("running") == 1 and "…" not in line.split()[0], frame
        head = next(ln for ln in frame.splitlines() if ln.startswith("ID"))
        assert "STATE" in head and all(len(ln) <= width for ln in frame.splitlines()), frame
    listed = _cli(lab, "list", columns=80, text=True).stdout
    head, row = listed.splitlines()[:2]
    assert head.split()[0] == "ID" and "STATE" in head and "REASON" in head, listed
    assert row.split()[0] == str(rid) and "running" in row
    lab.cli("cancel", str(rid))


def test_show_output_prints_an_output_confined_to_the_run_folder(lab: Lab):
    rid = lab.submit("insights_report", "seconds=0.3")
    lab.cli("daemon", "--burst", timeout=120)
    run = lab.wait_state(rid, {"succeeded"})
    shown = _cli(lab, "show", str(rid), "--output")           # no NAME: the first .md
    assert shown.returncode == 0 and shown.stdout.startswith(b"# Insights: fixture archive\n")
    assert b"**streaming**" in shown.stdout                   # raw Markdown in a pipe
    named = _cli(lab, "show", str(rid), "--output", "result.json")
    assert json.loads(named.stdout)["insights"].endswith("insights.md")

    outdir = os.path.join(run["run_dir"], "output")
    secret = lab.root / "secret.txt"
    secret.write_text("not the run's\n")
    os.symlink(secret, os.path.join(outdir, "link.md"))
    os.mkdir(os.path.join(lab.root, "elsewhere"))
    os.symlink(lab.root / "elsewhere", os.path.join(outdir, "sub"))
    (lab.root / "elsewhere" / "x.md").write_text("outside\n")
    for name, why in (("link.md", "a symlink"), ("sub/x.md", "a symlink"),
                      ("../spec.json", "name a file inside its output folder"),
                      (str(secret), "name a file inside its output folder"),
                      ("missing.md", "No such file")):
        refused = _cli(lab, "show", str(rid), "--output", name, text=True)
        assert refused.returncode == 2 and why in refused.stderr, (name, refused.stderr)
        assert "not the run's" not in refused.stdout and "outside" not in refused.stdout


def test_list_format_shows_peak_rss_exit_codes_and_saccts_names(lab: Lab):
    ok = lab.submit("hog", "target_rss_bytes=120MiB", "hold_s=1.5")
    bad = lab.submit("crash")
    lab.cli("daemon", "--burst", timeout=120)
    lab.wait_state(ok, {"succeeded"})
    lab.wait_state(bad, {"failed"})
    peak = lab.show(ok)["peak_rss_bytes"]
    assert peak >= 120 * 1024**2, peak
    out = _cli(lab, "list", "--format", "JobID,state,ExitCode,MaxRSS,maxgpu", text=True).stdout
    head, *rows = out.splitlines()
    assert head.split() == ["ID", "STATE", "EXIT", "MAXRSS", "MAXGPU"]
    by_id = {r.split()[0]: r for r in rows}
    m = re.fullmatch(rf"\s*{ok}\s+succeeded\s+0\s+([\d.]+) MiB\s+-\s*", by_id[str(ok)])
    assert m and float(m.group(1)) >= 120, out
    assert by_id[str(bad)].split()[1:3] == ["failed", "1"] and by_id[str(bad)].split()[-1] == "-"
    refused = _cli(lab, "list", "--format", "id,cpus", text=True)
    assert refused.returncode == 2 and "unknown column 'cpus'" in refused.stderr
