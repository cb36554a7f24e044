"""Issue #31 item 1, the stored side: rows an older version (or a hostile worker, before events were
validated at decode) left in the store — progress as TEXT, a huge number, NaN/Infinity metrics, unreadable
metrics JSON — never crash a view: `list`, `show`, `watch --once`, `stats` and the dashboard's pages answer."""
from __future__ import annotations

import json
import sqlite3
import urllib.error

import pytest

from tests.conftest import Lab
from tests.fixtures.dashboard import get, start_dashboard, stop

pytestmark = pytest.mark.e2e


def test_views_survive_bad_values_left_in_the_store(lab: Lab):
    ids = [lab.submit("sleepy", "seconds=0.1") for _ in range(4)]
    db = lab.state_dir / "lab_attendant.sqlite3"
    with sqlite3.connect(db) as conn:     # what the store held before events were typed at decode
        conn.execute("UPDATE runs SET progress_done = 'abc', progress_total = 'x', state = 'running' "
                     "WHERE id = ?", (ids[0],))
        conn.execute("UPDATE runs SET metrics_json = '{\"tokens_per_s\": NaN, \"x\": Infinity}', "
                     "state = 'succeeded', ended_at = started_at WHERE id = ?", (ids[1],))
        conn.execute("UPDATE runs SET progress_done = 1e30, progress_total = -5, metrics_json = 'not json' "
                     "WHERE id = ?", (ids[2],))
        conn.execute("UPDATE runs SET progress_unit = ?, reason = ? WHERE id = ?",
                     ("\x1b[31m" + "u" * 5000, "[bold]x[/", ids[3]))
    views = [("list",), ("list", "--json"), ("watch", "--once"), ("stats",), ("stats", "--json"),
             *[(verb, str(i)) for i in ids for verb in ("show",)],
             *[("show", str(i), "--json") for i in ids]]
    for args in views:
        proc = lab.cli(*args, check=False)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
    listed = json.loads(lab.cli("list", "--json").stdout)
    assert sorted(r["id"] for r in listed) == sorted(ids)
    assert "NaN" not in lab.cli("show", str(ids[1]), "--json").stdout    # strict JSON out
    proc, url = start_dashboard(lab)
    try:
        for path in ["/", "/api/runs", *[f"/runs/{i}" for i in ids], *[f"/api/runs/{i}" for i in ids]]:
            try:
                body = get(url + path)
            except urllib.error.HTTPError as exc:       # 404 for an API a version lacks is fine; 500 is not
                assert exc.code == 404, (path, exc.code)
                continue
            assert body, path
    finally:
        stop(proc)
