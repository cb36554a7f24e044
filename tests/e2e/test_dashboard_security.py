"""The dashboard against a browser tab, a neighbour and a planted file (issue #31, item 8): the
real dashboard process on a loopback port, a store a real daemon wrote, raw HTTP requests."""
from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab_attendant.dashboard.access import SECURITY_HEADERS
from tests.conftest import Lab, wait_for, write_config
from tests.fixtures.dashboard import free_port, stop

pytestmark = pytest.mark.e2e


def request(port: int, path: str, *, host: str | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host or f"127.0.0.1:{port}")
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def start(lab: Lab, *args: str) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    out = lab.root / f"dashboard-{port}.out"
    bind = next((a for a in args if ":" in a and not a.startswith("-")), f"127.0.0.1:{port}")
    extra = [a for a in args if a != bind]
    proc = subprocess.Popen([sys.executable, "-m", "lab_attendant.cli.main", "--config",
                             str(lab.config), "dashboard", "--bind", bind.format(port=port),
                             *extra], stdout=open(out, "ab"), stderr=subprocess.STDOUT,
                            env=lab.env(), cwd=lab.root, start_new_session=True)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(out.read_text())
        return "dashboard on" in out.read_text()
    wait_for(up, 30, "the dashboard to start")
    wait_for(lambda: _answers(port), 30, "the dashboard to answer")
    return proc, port, out


def _answers(port: int) -> bool:
    try:
        request(port, "/static/none")
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Lab:
    root = tmp_path_factory.mktemp("dashsec")
    lab = Lab(root=root, config=write_config(root))
    for _ in range(2):
        lab.submit("sleepy", "seconds=0")
    lab.cli("daemon", "--burst", timeout=120)
    return lab


@pytest.fixture(scope="module")
def dash(lab: Lab):
    proc, port, _ = start(lab)
    yield port
    stop(proc)


def _has_security_headers(headers: dict[str, str]) -> bool:
    return all(headers.get(k.lower()) == v for k, v in SECURITY_HEADERS.items())


def test_a_foreign_host_header_is_refused_with_headers(dash: int):
    """A DNS-rebinding page reaches 127.0.0.1 with its own name in Host: refused."""
    status, headers, body = request(dash, "/api/runs", host=f"evil.example:{dash}")
    assert status == 421 and b"unknown Host 'evil.example'" in body
    assert _has_security_headers(headers)
    for host in (f"127.0.0.1:{dash}", f"localhost:{dash}", "localhost"):
        assert request(dash, "/api/runs", host=host)[0] == 200


def test_ids_beyond_sqlite_range_are_404_with_headers(dash: int):
    for path in ("/runs/99999999999999999999", f"/api/runs/{2**63}", "/runs/0",
                 "/runs/12345/outputs/x.txt"):
        status, headers, _ = request(dash, path)
        assert status == 404, path
        assert _has_security_headers(headers)


def test_hard_links_and_swapped_folders_in_a_run_are_not_served(lab: Lab, dash: int):
    out1 = lab.state_dir / "runs" / "1" / "output"
    os.link(lab.state_dir / "lab_attendant.sqlite3", out1 / "store.txt")
    (out1 / "notes.txt").write_text("run 1's own notes\n")
    names = [o["name"] for o in json.loads(request(dash, "/api/runs/1")[2])["outputs"]]
    assert "store.txt" not in names and "notes.txt" in names
    assert request(dash, "/runs/1/outputs/store.txt")[0] == 404
    status, headers, body = request(dash, "/runs/1/outputs/notes.txt")
    assert status == 200 and body == b"run 1's own notes\n"
    assert headers["content-type"].startswith("text/plain")
    # run 2's output folder swapped for a link to run 1's: nothing is served through it
    out2 = lab.state_dir / "runs" / "2" / "output"
    os.rename(out2, out2.with_name("output.orig"))
    os.symlink(out1, out2)
    assert json.loads(request(dash, "/api/runs/2")[2])["outputs"] == []
    assert request(dash, "/runs/2/outputs/notes.txt")[0] == 404


def test_a_large_markdown_output_is_served_as_text_not_rendered(lab: Lab, dash: int):
    out1 = lab.state_dir / "runs" / "1" / "output"
    (out1 / "big.md").write_text("# title\n" + "word " * 200_000)      # ~1 MiB
    (out1 / "small.md").write_text("# Small title\n")
    status, headers, body = request(dash, "/runs/1/outputs/big.md")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert body.startswith(b"# title\n") and int(headers["content-length"]) == len(body)
    status, _, body = request(dash, "/runs/1/outputs/small.md")
    assert status == 200 and b"<h1>Small title</h1>" in body


def test_a_fifo_or_a_symlink_as_a_run_log_does_not_hang_the_run_page(lab: Lab, dash: int):
    logs = lab.logs_dir / "runs"
    (logs / "1.log").unlink(missing_ok=True)
    os.mkfifo(logs / "1.log")
    (logs / "2.log").unlink(missing_ok=True)
    os.symlink("/dev/zero", logs / "2.log")
    assert request(dash, "/runs/1")[0] == 200
    assert request(dash, "/runs/2")[0] == 200


def test_token_required_with_allow_remote_and_with_token(lab: Lab):
    proc, port, out = start(lab, "0.0.0.0:{port}", "--allow-remote")
    try:
        status, headers, body = request(port, "/api/runs")
        assert status == 401 and b"needs its token" in body and _has_security_headers(headers)
        link = next(line for line in out.read_text().splitlines() if "dashboard on" in line)
        token = link.split("?token=")[1].split()[0]
        assert request(port, "/api/runs", host="gpu-box.lan",
                       headers={"Authorization": f"Bearer {token}"})[0] == 200
        assert request(port, "/api/runs", headers={"Authorization": "Bearer wrong"})[0] == 401
        status, headers, _ = request(port, f"/?token={token}")
        assert status == 303 and headers["location"] == "/"
        cookie = headers["set-cookie"].split(";")[0]
        assert "httponly" in headers["set-cookie"].lower()
        assert request(port, "/api/runs", headers={"Cookie": cookie})[0] == 200
    finally:
        stop(proc)
    token_file = lab.root / "token"
    token_file.write_text("s3cret-token\n")
    token_file.chmod(0o644)
    refused = subprocess.run([sys.executable, "-m", "lab_attendant.cli.main", "--config",
                              str(lab.config), "dashboard", "--token-file", str(token_file)],
                             capture_output=True, text=True, env=lab.env(), timeout=60)
    assert refused.returncode == 2 and "can be read by other users" in refused.stderr
    token_file.chmod(0o600)
    proc, port, out = start(lab, "--token-file", str(token_file))
    try:
        assert "s3cret" not in out.read_text()
        assert request(port, "/api/runs")[0] == 401
        assert request(port, "/api/runs",
                       headers={"Authorization": "Bearer s3cret-token"})[0] == 200
    finally:
        stop(proc)


def test_port_alone_listens_on_loopback_and_a_bad_port_is_refused(lab: Lab):
    port = free_port()
    out = lab.root / f"dashboard-port-{port}.out"
    proc = subprocess.Popen([sys.executable, "-m", "lab_attendant.cli.main", "--config",
                             str(lab.config), "dashboard", "--port", str(port)],
                            stdout=open(out, "ab"), stderr=subprocess.STDOUT, env=lab.env(),
                            cwd=lab.root, start_new_session=True)
    try:
        wait_for(lambda: _answers(port), 30, "the dashboard to answer on --port")
        assert f"dashboard on http://127.0.0.1:{port}" in out.read_text()
        assert request(port, "/api/runs")[0] == 200
    finally:
        stop(proc)
    refused = subprocess.run([sys.executable, "-m", "lab_attendant.cli.main", "--config",
                              str(lab.config), "dashboard", "--port", "70000"],
                             capture_output=True, text=True, env=lab.env(), timeout=60)
    assert refused.returncode == 2 and "--port takes a port number" in refused.stderr
