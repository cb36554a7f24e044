"""The CLI's face: every argument of every verb has help text, --version, completion scripts,
and the units and times people read (when.py, views.py)."""
from __future__ import annotations

import argparse
import importlib.metadata
import time
from types import SimpleNamespace

import pytest
from rich.console import Console

from lab_attendant.cli.columns import parse_format, runs_table
from lab_attendant.cli.main import build_parser, main
from lab_attendant.cli.render import duration, ellipsize, metric
from lab_attendant.cli.when import parse_age, parse_begin
from lab_attendant.errors import UserError
from lab_attendant.store.figures import eta_s
from lab_attendant.store.states import RunState


def _walk(parser: argparse.ArgumentParser, path: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{path} {name}", "(the verb itself)", helps.get(name)
                yield from _walk(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, "/".join(action.option_strings) or action.dest, action.help


def test_every_argument_of_every_verb_has_help():
    seen = list(_walk(build_parser(), "lab-attendant"))
    missing = [f"{verb}: {arg}" for verb, arg, text in seen if not (text or "").strip()]
    assert not missing, "arguments without help:\n" + "\n".join(missing)
    verbs = {verb for verb, *_ in seen}
    for verb in ("list", "watch", "wait", "hold", "release", "stats", "prune", "schedules run",
                 "completion", "service install", "db backup"):
        assert f"lab-attendant {verb}" in verbs


def test_top_level_help_names_every_verb(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for verb in ("schedules", "service", "watch", "wait", "stats", "prune", "db", "completion"):
        assert f"\n    {verb} " in out, verb


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == \
        f"lab-attendant {importlib.metadata.version('lab-attendant')}"


@pytest.mark.parametrize("shell, needle", [("bash", "complete"), ("zsh", "#compdef")])
def test_completion_scripts_come_from_the_parser(shell, needle, capsys, tmp_path):
    assert main(["--config", str(tmp_path / "none.toml"), "completion", shell]) == 2  # no config
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path}/var"\nlogs_dir = "{tmp_path}/logs"\n')
    capsys.readouterr()
    assert main(["--config", str(cfg), "completion", shell]) == 0
    script = capsys.readouterr().out
    assert needle in script and "lab-attendant" in script
    assert "--older-than" in script and "--keep-failed" in script   # prune's options


def test_ages_and_begin_times():
    assert parse_age("7d") == 7 * 86400 and parse_age("90s") == 90 and parse_age("1.5h") == 5400
    with pytest.raises(ValueError, match="7d"):
        parse_age("soon")
    from datetime import datetime
    now = datetime(2026, 11, 30, 19, 0).astimezone()
    assert parse_begin("+2h", now) == now.timestamp() + 7200
    assert parse_begin("20:30", now) == now.replace(hour=20, minute=30).timestamp()
    assert parse_begin("18:00", now) == now.replace(day=1, month=12, hour=18).timestamp()
    assert parse_begin("tomorrow 02:00", now) == now.replace(day=1, month=12, hour=2).timestamp()
    assert parse_begin("2026-12-24T08:00+00:00") == 1798099200.0
    for bad in ("25:00", "someday", "+3x"):
        with pytest.raises(ValueError):
            parse_begin(bad, now)


def test_units_people_read():
    assert [duration(s) for s in (0.42, 42, 185, 7620, 3 * 86400 + 4 * 3600)] == \
        ["0.4 s", "42 s", "3 min 05 s", "2 h 07 min", "3 d 04 h"]
    assert metric("kv_cache_peak_bytes", 3 * 1024**2) == "3.0 MiB"
    assert metric("read_bytes_per_s", 2 * 1024**3) == "2.0 GiB/s"
    assert metric("tokens_per_s", 12.3456789) == "12.3 tokens/s" and metric("model_load_s", 65) == "1 min 05 s"
    assert metric("tokens_generated", 12345) == "12,345"
    text = "dependency failed, not started: run 4 (failed): ValueError"
    assert ellipsize(text, 30) == "dependency failed, not…" and ellipsize(text, 200) == text
    assert ellipsize("result written to /var/runs/1/output/matches.json", 30) == \
        "result written to /var/runs/1…"                 # a path is cut, not dropped whole
    assert metric("engine_bytes_read", 8 * 1024**3) == "8.0 GiB"


def _run(**kw):
    base = dict(id=7, name="nightly", kind="sleepy", state=RunState.RUNNING, priority=0,
                reason="worker pid 1 started: a long reason about what happened next", metrics={},
                submitted_at=time.time() - 100, started_at=time.time() - 60,
                running_at=time.time() - 60, ended_at=None, progress_done=30, progress_total=60,
                progress_unit="ticks")
    return SimpleNamespace(**{**base, **kw})


def test_the_runs_table_cuts_reasons_at_words_and_shows_progress():
    run = _run()
    assert 55 < eta_s(run) < 65                                   # half done in a minute
    console = Console(width=110, record=True, color_system=None)
    console.print(runs_table(console, [run, _run(id=8, state=RunState.SUCCEEDED,
                                                 ended_at=time.time())]))
    out = console.export_text()
    head, row, done = out.splitlines()[:3]
    assert head.split() == ["ID", "NAME", "KIND", "STATE", "PROGRESS", "ELAPSED", "PRI",
                            "SUBMITTED", "REASON"]
    assert "50%" in row and "1 min 00 s" in row and "nightly" in row
    reason = row[head.index("REASON"):].rstrip()
    assert reason.endswith("…") and run.reason.startswith(reason[:-1].rstrip())
    assert reason[:-1].rstrip().split()[-1] in run.reason.split()   # cut between words
    assert "30/60 ticks" in done                                  # an ended run: its last count


@pytest.mark.parametrize("width", [80, 60, 40])
def test_a_narrow_list_keeps_id_state_and_reason_and_drops_the_least_useful_first(width: int):
    runs = [_run(id=123456, name="nightly-insights-long-name", progress_phase="reading notes"),
            _run(id=7, state=RunState.SUCCEEDED, ended_at=time.time())]
    console = Console(width=width, record=True, color_system=None)
    console.print(runs_table(console, runs))
    head, first = console.export_text().splitlines()[:2]
    cols = head.split()
    assert cols[0] == "ID" and "STATE" in cols and "REASON" in cols
    assert first.split()[0] == "123456" and "running" in first.split()   # never 'N…'
    order = ["PRI", "SUBMITTED", "ELAPSED", "NAME", "KIND", "PROGRESS"]   # dropped first -> last
    dropped = [c for c in order if c not in cols]
    assert dropped == order[:len(dropped)] and (width > 60 or dropped)
    assert all(len(line) <= width for line in console.export_text().splitlines())


def test_list_format_takes_our_names_and_saccts_and_refuses_unknown_ones():
    assert parse_format("JobID,State,MaxRSS,ExitCode,maxgpu") == ["id", "state", "maxrss", "exit",
                                                                  "maxgpu"]
    with pytest.raises(UserError, match="unknown column 'cpu' in --format; columns: ID"):
        parse_format("id,cpu")
