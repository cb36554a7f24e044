"""`lab-attendant watch` in a real terminal (tmux): the running run's progress advances on screen,
and Ctrl-C leaves cleanly (exit 0, a closing line)."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.conftest import Lab, wait_for

pytestmark = pytest.mark.e2e
TMUX = shutil.which("tmux")


@pytest.mark.skipif(TMUX is None, reason="needs tmux (scripts/test.sh installs it with apt "
                    "when run as root)")
def test_watch_shows_progress_advancing_and_leaves_on_ctrl_c(lab: Lab):
    lab.start_daemon()
    rid = lab.submit("sleepy", "seconds=120")
    lab.wait_state(rid, {"running"})
    tmux = [TMUX, "-S", str(lab.root / "tmux.sock")]
    watch = shlex.join([sys.executable, "-m", "lab_attendant.cli.main", "--config", str(lab.config),
                        "watch", "--interval", "0.5"])
    subprocess.run([*tmux, "new-session", "-d", "-x", "150", "-y", "40", "-s", "w",
                    f"{watch}; echo WATCH-EXIT=$?; sleep 120"], env=lab.env(), check=True,
                   cwd=lab.root)
    row = re.compile(rf"^\s*{rid}\s.*\brunning\b.*?(\d+)%", re.M)

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", "w"], capture_output=True,
                              text=True, check=True).stdout

    def percent() -> int | None:
        m = row.search(screen())
        return int(m.group(1)) if m else None

    try:
        first = wait_for(lambda: percent(), 60, "watch to show the running run's progress")
        later = wait_for(lambda: (p := percent()) is not None and p > first and p, 60,
                         "the progress on screen to advance")
        assert later > first
        assert "daemon pid" in screen() and "sleepy" in screen()
        subprocess.run([*tmux, "send-keys", "-t", "w", "C-c"], check=True)
        shown = wait_for(lambda: "WATCH-EXIT=" in (s := screen()) and s, 30, "watch to exit")
        assert "WATCH-EXIT=0" in shown and "stopped watching" in shown
        assert "Traceback" not in shown
    finally:
        subprocess.run([*tmux, "kill-server"], check=False)
