"""The dashboard's outer layer on a real Starlette app, called as ASGI: a 500 carries the
security headers (Starlette's error middleware answers outside user middleware), and the Host
names a bind accepts."""
from __future__ import annotations

import asyncio

from starlette.routing import Route

from lab_attendant.dashboard.access import LOOPBACK_NAMES, SECURITY_HEADERS, Policy, host_names
from lab_attendant.dashboard.app import _App


def _boom(request):
    raise RuntimeError("a view crashed")


def _get(app, path: str, host: bytes = b"127.0.0.1:8765") -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"host", host)], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 8765)}
    try:
        asyncio.run(app(scope, receive, send))
    except RuntimeError:
        pass      # Starlette re-raises after answering 500, for the server to log
    return sent


def test_a_crashing_view_answers_500_with_the_security_headers():
    app = _App(routes=[Route("/boom", _boom)])
    start = _get(app, "/boom")[0]
    assert start["status"] == 500
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    assert all(headers[k.lower()] == v for k, v in SECURITY_HEADERS.items())


def test_the_host_check_runs_before_any_view():
    app = _App(routes=[Route("/boom", _boom)])
    app.policy = Policy(allowed_hosts=LOOPBACK_NAMES, token=None)
    assert _get(app, "/boom", host=b"attacker.example")[0]["status"] == 421


def test_host_names_per_bind():
    assert host_names("127.0.0.1", ()) == LOOPBACK_NAMES
    assert host_names("::1", ()) == LOOPBACK_NAMES | {"[::1]"}
    assert host_names("0.0.0.0", ()) is None                      # the token protects
    assert host_names("0.0.0.0", ("GPU-Box",)) == LOOPBACK_NAMES | {"0.0.0.0", "gpu-box"}
    assert "192.168.1.5" in host_names("192.168.1.5", ())
