"""Property test (Hypothesis): the CLI, driven in-process with random argv and random config
files, exits 0, 1 or 2, never prints a traceback, and leaves the store unchanged when it exits 2.

Verbs that start processes or write outside the temp dir (daemon, venv, model, service) are left
out; everything else a user can type is fair game, including garbage.
"""
from __future__ import annotations

import json
import math
import sqlite3
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lab_attendant.cli.main import main

NUMBER_TEXT = st.one_of(
    st.integers(min_value=-(10**25), max_value=10**25).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "0", "-0", "", "x", "1_0", "0x10", " 3 "]))
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
PARAM_KEYS = st.sampled_from(["seconds", "grandchild", "quiet", "lines", "archive", "since",
                              "max_notes", "top_k", "batch_size", "path", "read_limit_bytes",
                              "max_new_tokens", "model", "zz"])
PARAM_VALUES = st.one_of(NUMBER_TEXT, TEXT, st.sampled_from(
    ["true", "maybe", "2015-01-31", "2025-02-31", "yesterday", "/etc", "..", "2GiB", "-1MiB"]))
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.one_of(PARAM_KEYS, TEXT), inner, max_size=3)),
    max_leaves=6)
CRON = st.one_of(
    st.lists(st.sampled_from(["*", "0", "7", "1-5", "*/15", "31", "2", "SUN", "mon-fri", "60",
                              "0,30", "L", "?", "5-1", "*/0", "-1"]), min_size=4, max_size=7)
    .map(" ".join),
    st.sampled_from(["@daily", "@hourly", "@weekly", "@monthly", "@yearly", "@reboot", "@never",
                     "0 0 31 2 *", "0 0 30 2 *", "0 0 31 4,6 *", "0 3 * * 7", ""]),
    TEXT)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, (int, str)):
        return json.dumps(v) if isinstance(v, str) else str(v)
    return "[" + ", ".join(_toml_value(x) for x in v) + "]"


TOML_VALUES = st.one_of(st.integers(min_value=-(10**20), max_value=10**20), st.floats(), st.booleans(),
                        TEXT, st.lists(st.one_of(st.integers(-5, 5), TEXT), max_size=3))
SECTION_KEYS = {
    "limits": ["max_concurrent", "default_timeout_s", "kill_grace_s", "shutdown_grace_s", "x"],
    "daemon": ["poll_interval_s", "x"],
    "guards": ["sensors", "guard_interval_s", "thermal_limit_c", "resume_below_c",
               "min_available_ram_bytes", "max_worker_rss_bytes", "sensors_lost_grace_s"],
    "worker": ["heartbeat_interval_s", "default_model", "python"],
    "logging": ["max_bytes", "backup_count"],
    "service": ["watchdog_s"],
    "backups": ["keep", "interval_s"],
    "retries": ["base_s", "max_s", "kinds"],
    "nosuch": ["x"],
}


@st.composite
def config_text(draw, root: Path) -> str:
    extra = draw(st.sampled_from(['"tests.fixtures.kinds"'] * 4 + ['', '"no_such_module_q"']))
    lines = [f'[paths]\nstate_dir = "{root}/var"\nlogs_dir = "{root}/logs"\n'
             f'allowed_roots = ["{root}"]\n',
             f'[worker]\npython = "{sys.executable}"\n'
             f'extra_kinds = [{extra}]\n'
             'heartbeat_interval_s = 1.0\n[guards]\nsensors = "none"\n']
    if draw(st.integers(0, 2)) == 0:   # a third of the configs stay valid, so verbs get to run
        return "".join(lines)
    for section in draw(st.lists(st.sampled_from(sorted(SECTION_KEYS)), max_size=3, unique=True)):
        if section in ("worker", "guards"):
            section += "_"   # an unknown section; the real ones are written above
        keys = draw(st.lists(st.sampled_from(SECTION_KEYS.get(section, ["x"])), max_size=3, unique=True))
        lines.append(f"[{section}]\n" + "".join(f"{k} = {_toml_value(draw(TOML_VALUES))}\n" for k in keys))
    for i in range(draw(st.integers(0, 2))):
        params = draw(st.dictionaries(PARAM_KEYS, st.one_of(TOML_VALUES, PARAM_VALUES), max_size=2))
        lines.append(f'[[schedules]]\nid = "s{i}"\ncron = {json.dumps(draw(CRON))}\n'
                     f'kind = {json.dumps(draw(st.sampled_from(["sleepy", "nightly_insights", "probe", "nope"])))}\n'
                     f'timezone = {json.dumps(draw(st.sampled_from(["", "UTC", "Europe/Berlin", "Mars/Base"])))}\n'
                     "[schedules.params]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in params.items()))
    if draw(st.booleans()):
        lines.append(draw(st.sampled_from(["garbage = = 1\n", "[limits\n", "\x00\n", "[[paths]]\n"])))
    return "".join(lines)


@st.composite
def argv(draw, root: Path) -> list[str]:
    verb = draw(st.sampled_from(["submit", "submit", "submit", "list", "show", "cancel", "logs",
                                 "retry", "status", "kinds", "schedules", "db", "nonsense",
                                 "hold", "release", "stats", "prune", "update", "update", "pause",
                                 "resume", "parallel"]))
    out = [verb]
    if verb == "submit":
        out.append(draw(st.sampled_from(["sleepy", "probe", "nightly_insights", "cv_matching",
                                         "paging_echo", "nope", "-p", "command", "command"])))
        for _ in range(draw(st.integers(0, 3))):
            out += ["-p", f"{draw(PARAM_KEYS)}={draw(PARAM_VALUES)}"]
        if draw(st.booleans()):
            out += ["--priority", draw(NUMBER_TEXT)]
        if draw(st.booleans()):
            out += ["--timeout", draw(NUMBER_TEXT)]
        if draw(st.booleans()):
            out += ["--retries", draw(NUMBER_TEXT)]
        for flag in draw(st.lists(st.sampled_from(["--after", "--afterany", "--afternotok"]),
                                  max_size=2)):
            out += [flag, draw(st.one_of(NUMBER_TEXT, st.sampled_from(["1", "2", "1,3", "9"])))]
        if draw(st.booleans()):
            out += ["--name", draw(st.one_of(TEXT, st.sampled_from(["solo", "batch-1"])))]
        out += draw(st.lists(st.sampled_from(["--singleton", "--notify", "end", "--notify",
                                              "sometimes"]), max_size=2))
        if draw(st.booleans()):
            f = root / "params.json"
            f.write_text(json.dumps(draw(JSON_VALUES)) if draw(st.booleans()) else draw(TEXT))
            out += ["--params-file", str(f)]
        # the command kind's flags, and a program after `--` (any kind: only `command` takes one)
        out += draw(st.lists(st.sampled_from(["--gpu", "--cwd", str(root), "--cwd", "/etc"]), max_size=2))
        if draw(st.booleans()):
            out += ["--", *draw(st.lists(st.one_of(TEXT, st.sampled_from(
                [sys.executable, "true", "no-such-program", "-c", "--json", "--", "$(id)", "a b"])),
                max_size=4))]
    elif verb == "list":
        if draw(st.booleans()):
            out += ["--state", draw(st.one_of(st.sampled_from(["queued", "lost", "running"]), TEXT))]
        if draw(st.booleans()):
            out += ["--limit", draw(NUMBER_TEXT)]
        if draw(st.booleans()):
            out += ["--format", draw(st.one_of(st.sampled_from(
                ["id,state,exit,maxrss,maxgpu", "JobID,ExitCode,MaxRSS", "id,,phase", ""]), TEXT))]
    elif verb in ("show", "cancel", "logs", "retry", "hold", "release", "update"):
        if verb not in ("cancel", "hold", "release") or draw(st.booleans()):
            out.append(draw(st.one_of(NUMBER_TEXT, st.sampled_from(["1", "2", "3", "5", "8"]))))
        if verb == "show" and draw(st.booleans()):
            out.append("--output")
            if draw(st.booleans()):
                out.append(draw(st.one_of(st.sampled_from(["../spec.json", "/etc/passwd",
                                                           "result.json", "a/../b"]), TEXT)))
        if verb in ("cancel", "hold", "release"):
            if draw(st.booleans()):
                out.append(draw(st.one_of(NUMBER_TEXT, st.sampled_from(["1", "2", "3"]))))
            for flag in draw(st.lists(st.sampled_from(["--state", "--name", "--kind"]),
                                      max_size=2, unique=True)):
                out += [flag, draw(st.one_of(TEXT, st.sampled_from(
                    ["queued", "held,queued", "running", "sleepy", "*", "batch-*", "[x"])))]
            out += draw(st.lists(st.just("--dry-run"), max_size=1))
        if verb == "retry" and draw(st.booleans()):
            out.append("--force")
        if verb == "update":
            for flag in draw(st.lists(st.sampled_from(["--priority", "--timeout", "--begin",
                                                       "-p"]), max_size=3)):
                out += [flag, draw(st.sampled_from(["seconds=0.1", "seconds=x", "zz=1", "+1h"])
                                   if flag in ("-p", "--begin") else
                                   st.one_of(st.sampled_from(["5", "60"]), NUMBER_TEXT))]
    elif verb == "parallel":
        out += draw(st.sampled_from([[], ["--reset"], ["3"], ["0"], ["-1"], ["2000"], ["x"],
                                     ["2", "--reset"]]))
    elif verb in ("stats", "prune"):
        if draw(st.booleans()):
            out += ["--since" if verb == "stats" else "--older-than",
                    draw(st.one_of(st.sampled_from(["7d", "0s", "30m", "1.5h", "2w"]), TEXT))]
        if verb == "prune":
            out += draw(st.lists(st.sampled_from(["--dry-run", "--keep-failed", "1", "2"]),
                                 max_size=2, unique=True))
    elif verb == "db":
        out += draw(st.sampled_from([["check"], ["backup", str(root / "b.sqlite3")], ["backup"],
                                     ["frob"]]))
    if verb in ("submit", "list", "show", "status", "schedules", "stats", "prune") and \
            draw(st.booleans()):
        out.append("--json")
    return out + ([draw(TEXT)] if draw(st.integers(0, 9)) == 9 else [])


def _snapshot(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return list(conn.iterdump())


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prop")
    cfg = root / "base.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{root}/var"\nlogs_dir = "{root}/logs"\n'
                   f'allowed_roots = ["{root}"]\n[worker]\npython = "{sys.executable}"\n'
                   'extra_kinds = ["tests.fixtures.kinds"]\n[guards]\nsensors = "none"\n')
    for _ in range(3):  # a store with runs in it, so show/cancel/logs find something
        assert main(["--config", str(cfg), "submit", "sleepy"]) == 0
    return root


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_argv_and_config_exit_cleanly(root: Path, data, capsys, monkeypatch):
    monkeypatch.chdir(root)   # `db backup TEXT` writes where it is told: inside root, never the checkout
    cfg = root / "lab-attendant.toml"
    cfg.write_text(data.draw(config_text(root)), errors="surrogateescape")
    args = data.draw(argv(root))
    db = root / "var" / "lab_attendant.sqlite3"
    before = _snapshot(db)
    capsys.readouterr()
    try:
        code = main(["--config", str(cfg), *args])
    except SystemExit as exc:       # argparse: --help (0) or a usage error (2)
        code = exc.code
    out, err = capsys.readouterr()
    event(f"exit {code}")
    event(f"{args[0]} exit {code}")
    assert code in (0, 1, 2), (args, code, err)
    assert "Traceback" not in err, (args, err)
    if code == 2:
        assert _snapshot(db) == before, (args, err)
        assert err.strip(), "exit 2 without saying why"
