"""[notify] with a real daemon: a command gets the failed run in its environment; a URL that
accepts and never answers times out while the daemon keeps admitting; the main log carries one
start and one end line per run, at error level for a failure."""
from __future__ import annotations

import json
import socket
import sys
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Lab, wait_for, write_config

pytestmark = pytest.mark.e2e

DUMP_ENV = """import json, os, sys
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({k: v for k, v in os.environ.items() if k.startswith("LAB_ATTENDANT_")}) + "\\n")
"""


def _main_log(lab: Lab) -> list[dict]:
    return [json.loads(line) for line in (lab.logs_dir / "lab_attendant.log").read_text().splitlines()]


def test_notify_command_receives_the_env_of_a_failed_run_and_the_textfile_counts_it(lab: Lab):
    script, dump = lab.root / "dump_env.py", lab.root / "notified.jsonl"
    script.write_text(DUMP_ENV)
    lab.config = write_config(lab.root, extra=f'\n[notify]\non = ["failed"]\n'
                              f'command = ["{sys.executable}", "{script}", "{dump}"]\n'
                              '[metrics]\ntextfile = "textfile/lab_attendant.prom"\n')
    failed = lab.submit("crash")
    ok = lab.submit("sleepy", "seconds=0.2")
    lab.cli("daemon", "--burst", timeout=60)       # waits for notifications in flight at exit
    (env,) = [json.loads(line) for line in dump.read_text().splitlines()]
    assert env["LAB_ATTENDANT_RUN_ID"] == str(failed) and env["LAB_ATTENDANT_RUN_KIND"] == "crash"
    assert env["LAB_ATTENDANT_RUN_STATE"] == "failed"
    assert "fixture crash: bad input on purpose" in env["LAB_ATTENDANT_RUN_REASON"]
    assert env["LAB_ATTENDANT_RUN_EXIT_CODE"] == "1" and env["LAB_ATTENDANT_HOST"]
    ended = {l["run_id"]: l for l in _main_log(lab) if l.get("event") == "run ended"}
    assert ended[failed]["level"] == "error" and ended[failed]["state"] == "failed"
    assert ended[ok]["level"] == "info" and ended[ok]["state"] == "succeeded"
    started = [l["run_id"] for l in _main_log(lab) if l.get("event") == "run started"]
    assert sorted(started) == sorted([failed, ok])
    prom = (lab.root / "textfile" / "lab_attendant.prom").read_text()   # node_exporter's input
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(prom) for s in fam.samples}
    assert samples[("lab_attendant_runs_total", (("kind", "crash"), ("state", "failed")))] == 1


class _SilentServer:
    """Accepts connections and never answers; notes when the client gives up (EOF)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted_at: float | None = None
        self.closed_at: float | None = None
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        self.accepted_at = time.time()
        with conn:
            while conn.recv(65536):          # the request; then b"" once the client closes
                pass
        self.closed_at = time.time()


def test_dead_notify_url_times_out_without_blocking_the_daemon(lab: Lab):
    server = _SilentServer()
    lab.config = write_config(lab.root, extra=f'\n[notify]\nurl = "http://127.0.0.1:{server.port}'
                              f'/lab"\ntimeout_s = 6\n')
    lab.start_daemon()
    failed = lab.submit("crash")
    lab.wait_state(failed, {"failed"})
    wait_for(lambda: server.accepted_at, what="the notification to connect")
    nxt = lab.submit("sleepy", "seconds=0.2")
    run = lab.wait_state(nxt, {"succeeded"})
    # The next run was admitted and finished while the POST was still hanging.
    assert server.closed_at is None or run["ended_at"] < server.closed_at
    wait_for(lambda: server.closed_at, 30, "the notification to time out")
    wait_for(lambda: any(l.get("event") == "notify POST failed" and "timed out" in l["error"]
                         for l in _main_log(lab)), 10, "the timeout to be logged")


def test_a_run_name_with_cr_lf_still_notifies_without_injecting_a_header(lab: Lab):
    """A CR/LF (or NUL) in a name or reason made the Title header (or the env var) invalid:
    the notification was dropped. Control characters are stripped from every field."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    got: list[dict] = []

    class Record(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            got.append({"headers": dict(self.headers), "body": body})
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Record)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        lab.config = write_config(lab.root, extra=f'\n[notify]\nurl = "http://127.0.0.1:'
                                  f'{server.server_address[1]}/lab"\n')
        lab.submit("crash", extra=("-J", "nightly\r\nX-Injected: 1\x1b[2J"))
        lab.cli("daemon", "--burst", timeout=60)   # waits for notifications in flight at exit
    finally:
        server.shutdown()
    (note,) = got
    assert "X-Injected" not in note["headers"]
    assert "'nightly X-Injected: 1[2J' (crash) failed" in note["headers"]["Title"]
    assert "\x1b" not in note["body"] and "\r" not in note["body"]
