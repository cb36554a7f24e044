"""Who may ask the dashboard, and what every answer carries: the Host check (a DNS-rebinding page
cannot read it), the token (required with --allow-remote), and the security headers.

One pure ASGI layer wrapped around the whole app, outside Starlette's error middleware, so a
refusal, a 404 and a 500 carry the same headers as a page.
"""
from __future__ import annotations

import hmac
import ipaddress
import secrets
import stat
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.responses import PlainTextResponse, RedirectResponse

from lab_attendant.errors import UserError

SECURITY_HEADERS = {
    # Everything is served from here: no CDN, no inline script; inline SVG needs no style.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                               "script-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",          # run params and outputs stay out of shared caches
}
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
TOKEN_COOKIE = "lab_attendant_token"
TOKEN_PARAM = "token"


@dataclass(frozen=True)
class Policy:
    allowed_hosts: frozenset[str] | None   # Host header names (no port) accepted; None: any
    token: str | None                      # required on every request when set


def host_names(host: str, extra: tuple[str, ...]) -> frozenset[str] | None:
    """What Host headers a dashboard bound to `host` answers: loopback names for a loopback bind,
    the bind address itself, and --allowed-host names. A wildcard bind (0.0.0.0, ::) cannot know
    its names: with no --allowed-host it accepts any, and the token (required there) protects."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    if addr is not None and addr.is_unspecified and not extra:
        return None
    named = {f"[{host}]" if addr is not None and addr.version == 6 else host, *extra}
    return frozenset(n.lower() for n in named) | LOOPBACK_NAMES


def read_token(path: Path) -> str:
    """A token file: ours, not readable by others, one non-empty line."""
    try:
        st = path.stat()
        text = path.read_text().strip()
    except OSError as exc:
        raise UserError(f"--token-file {path} cannot be read ({exc.strerror}); write a secret "
                        "line to it (e.g. `openssl rand -hex 24 > FILE; chmod 600 FILE`)") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise UserError(f"--token-file {path} can be read by other users; `chmod 600 {path}`")
    if not text or "\n" in text:
        raise UserError(f"--token-file {path} must hold one non-empty line")
    return text


def new_token() -> str:
    return secrets.token_urlsafe(24)


def _host_of(headers: dict[bytes, bytes]) -> str:
    host = headers.get(b"host", b"").decode("latin-1").strip().lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class Access:
    """ASGI middleware: Host check, token check, security headers on every response."""

    def __init__(self, app: Any, policy: Policy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)   # lifespan
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + [
                    (k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
            await send(message)

        refusal = self._refusal(scope)
        app = refusal if refusal is not None else self.app
        await app(scope, receive, send_with_headers)

    def _refusal(self, scope: dict) -> Any:
        headers = dict(scope.get("headers", []))
        allowed = self.policy.allowed_hosts
        host = _host_of(headers)
        if allowed is not None and host not in allowed:
            return PlainTextResponse(
                f"unknown Host {host!r}: this dashboard answers to {', '.join(sorted(allowed))} "
                "(start it with --allowed-host NAME to add a name)", status_code=421)
        token = self.policy.token
        if token is None:
            return None
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        if TOKEN_PARAM in query and hmac.compare_digest(query[TOKEN_PARAM], token):
            # The link the dashboard printed: keep the token in a cookie, drop it from the URL.
            rest = urlencode({k: v for k, v in query.items() if k != TOKEN_PARAM})
            response = RedirectResponse(scope["path"] + (f"?{rest}" if rest else ""), 303)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response
        try:
            cookie = SimpleCookie(headers.get(b"cookie", b"").decode("latin-1"))
        except CookieError:
            cookie = SimpleCookie()
        offered = cookie[TOKEN_COOKIE].value if TOKEN_COOKIE in cookie else ""
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if auth.lower().startswith("bearer "):
            offered = auth[7:].strip()
        if offered and hmac.compare_digest(offered, token):
            return None
        return PlainTextResponse("this dashboard needs its token: open the link it printed at "
                                 "start, or send `Authorization: Bearer TOKEN`", status_code=401,
                                 headers={"WWW-Authenticate": "Bearer"})
