"""Run outcomes from the daemon's loop: a run that fails before its worker starts still gets its
end line and its notification (a real command through the real Host, a real SQLite store)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from lab_attendant.guards.host import Host
from lab_attendant.store.states import RunState
from tests.unit.fakes import make_daemon, run_state


def test_a_run_failing_at_spawn_is_notified(tmp_path: Path):
    dump = tmp_path / "env.json"
    script = tmp_path / "dump.py"
    script.write_text("import json, os, sys\njson.dump({k: v for k, v in os.environ.items() "
                      "if k.startswith('LAB_ATTENDANT_')}, open(sys.argv[1], 'w'))\n")
    d, _, _ = make_daemon(tmp_path, notify={"command": [sys.executable, str(script), str(dump)]})
    try:
        d.outcomes.notifications.host = Host()     # the command runs for real
        rid = d.store.submit(kind="no_such_kind", params={}, priority=0, timeout_s=60,
                             needs_paging=False).id
        d.tick()
        assert run_state(d, rid)[0] is RunState.FAILED
    finally:
        d.close()                                  # waits for the notification in flight
    env = json.loads(dump.read_text())
    assert env["LAB_ATTENDANT_RUN_ID"] == str(rid) and env["LAB_ATTENDANT_RUN_STATE"] == "failed"
    assert "unknown kind 'no_such_kind'" in env["LAB_ATTENDANT_RUN_REASON"]
