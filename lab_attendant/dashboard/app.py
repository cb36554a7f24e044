"""The dashboard's Starlette app and its server: GET routes only (pages, /api/runs, /metrics),
a read-only store, loopback unless --allow-remote.
"""
from __future__ import annotations

import ipaddress
import time
from pathlib import Path
from typing import Any, BinaryIO, Iterator
from urllib.parse import quote

from markdown_it import MarkdownIt
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from jobs.contract.units import format_size
from lab_attendant.config import Config
from lab_attendant.dashboard import metrics, plots
from lab_attendant.dashboard import pages as views
from lab_attendant.dashboard.access import (
    LOOPBACK_NAMES,
    TOKEN_PARAM,
    Access,
    Policy,
    host_names,
    new_token,
    read_token,
)
from lab_attendant.dashboard.readonly import open_readonly, session
from lab_attendant.errors import UserError

HERE = Path(__file__).resolve().parent
TEXT_SUFFIXES = (".txt", ".json", ".jsonl", ".log", ".csv", ".tsv")
# Markdown from job outputs: raw HTML off, so a model's output cannot inject markup or script.
_markdown = MarkdownIt("commonmark", {"html": False}).enable("table")


def fmt_time(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts)) if ts else "–"


def fmt_duration(s: float | None) -> str:
    if s is None:
        return "–"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {sec:02d}s" if m else f"{sec}s"


class _App(Starlette):
    """Starlette with `Access` outermost, outside its error middleware: a 500 carries the
    security headers too."""

    policy = Policy(allowed_hosts=LOOPBACK_NAMES, token=None)

    def build_middleware_stack(self) -> Any:
        return Access(super().build_middleware_stack(), self.policy)


def create_app(cfg: Config, policy: Policy | None = None) -> Starlette:
    engine = open_readonly(cfg.db_path)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters.update(time=fmt_time, duration=fmt_duration, size=format_size)

    def page(request: Request, template: str, **ctx: Any) -> Response:
        return templates.TemplateResponse(request, template, {"nav": template, **ctx})

    def filters(request: Request) -> dict[str, str]:
        q = request.query_params
        return {k: q.get(k, "") for k in ("state", "kind", "schedule", "since", "until")}

    def runs_page(request: Request) -> Response:
        f = filters(request)
        with session(engine) as s:
            rows = views.runs(s, state=f["state"] or None, kind=f["kind"] or None,
                              schedule=f["schedule"] or None, since=f["since"] or None,
                              until=f["until"] or None)
            return page(request, "runs.html", runs=rows, f=f, choices=views.choices(s),
                        counts=views.counts(s))

    def run_page(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        with session(engine) as s:
            d = views.run_detail(s, cfg, run_id)
            run = views.get_run(s, run_id)
            log = views.log_tail(cfg, run)
            rendered = []
            for o in d["outputs"]:
                if o["name"] in views.RENDERED_OUTPUTS and o["size_bytes"] <= views.OUTPUT_PREVIEW_BYTES:
                    text = views.read_output_text(run, o["name"])
                    if text is not None:
                        rendered.append((o["name"], _markdown.render(text)))
        charts = plots.run_charts(d["samples"], thermal_limit_c=cfg.guards.thermal_limit_c,
                                  resume_below_c=cfg.guards.resume_below_c,
                                  vram_budget_bytes=int(cfg.guards.vram_budget_bytes))
        return page(request, "run.html", d=d, r=d["run"], charts=charts, log=log,
                    rendered=rendered)

    def output(request: Request) -> Response:
        name = request.path_params["name"]
        with session(engine) as s:
            run = views.get_run(s, request.path_params["run_id"])
        suffix = Path(name).suffix
        if suffix == ".md":
            text = views.read_output_text(run, name)
            if text is not None:    # larger ones are served as text, not rendered per request
                return page(request, "output.html", run_id=run.id, name=name,
                            html=_markdown.render(text))
        fh, size_bytes = views.open_output(run, name)
        if suffix in TEXT_SUFFIXES + (".md",):
            return _stream(fh, size_bytes, "text/plain; charset=utf-8")
        # Anything else is a download, never rendered here (an .html output cannot run script).
        return _stream(fh, size_bytes, "application/octet-stream", download=name)

    def guards_page(request: Request) -> Response:
        with session(engine) as s:
            g = views.guard_timeline(s)
        return page(request, "guards.html", g=g, timeline=plots.guard_strip(g["events"]))

    def schedules_page(request: Request) -> Response:
        with session(engine) as s:
            rows = views.schedules(s, cfg)
        return page(request, "schedules.html", schedules=rows)

    def api_runs(request: Request) -> Response:
        f = filters(request)
        limit = request.query_params.get("limit", "200")
        if not limit.isdigit():
            raise UserError(f"limit must be a whole number, got {limit!r}")
        with session(engine) as s:
            return JSONResponse(views.runs(s, limit=int(limit), **{k: v or None for k, v in f.items()}))

    def api_run(request: Request) -> Response:
        with session(engine) as s:
            return JSONResponse(views.run_detail(s, cfg, request.path_params["run_id"]))

    def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.exposition(lambda: session(engine)),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    async def user_error(request: Request, exc: Exception) -> Response:
        return PlainTextResponse(str(exc), status_code=400)

    async def not_found(request: Request, exc: Exception) -> Response:
        return PlainTextResponse(str(exc), status_code=404)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return PlainTextResponse(str(exc.detail), status_code=exc.status_code,
                                 headers=getattr(exc, "headers", None))

    # starlette types a handler as taking Exception; ours take the subclass they are registered for
    handlers: dict[Any, Any] = {UserError: user_error, LookupError: not_found, HTTPException: http_error}
    app = _App(routes=[
        Route("/", runs_page), Route("/runs/{run_id:int}", run_page),
        Route("/runs/{run_id:int}/outputs/{name}", output),
        Route("/guards", guards_page), Route("/schedules", schedules_page),
        Route("/api/runs", api_runs), Route("/api/runs/{run_id:int}", api_run),
        Route("/metrics", metrics_endpoint),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ], exception_handlers=handlers)
    if policy is not None:
        app.policy = policy
    app.state.engine = engine
    return app


def _stream(fh: BinaryIO, size_bytes: int, media_type: str, download: str | None = None) -> Response:
    """The opened file itself (never its path again, which could be swapped), in chunks."""
    def chunks() -> Iterator[bytes]:
        with fh:
            left = size_bytes
            while left > 0 and (data := fh.read(min(left, 1024 * 1024))):
                left -= len(data)
                yield data
    headers = {"Content-Length": str(size_bytes)}
    if download is not None:
        headers["Content-Disposition"] = f"attachment; filename*=UTF-8''{quote(download)}"
    return StreamingResponse(chunks(), media_type=media_type, headers=headers)


def check_bind(bind: str, allow_remote: bool) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--bind takes HOST:PORT, e.g. 127.0.0.1:8765, got {bind!r}")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        raise UserError(f"refusing to listen on {host}: the dashboard has no login, and anyone "
                        "who reaches the port can read run params, logs and outputs. Bind to "
                        "127.0.0.1 and use `ssh -L 8765:127.0.0.1:8765 HOST`, or pass "
                        "--allow-remote (a token is then required) if the network is yours")
    return host, int(port)


def serve(cfg: Config, bind: str, *, allow_remote: bool = False, token: bool = False,
          token_file: Path | None = None, allowed_hosts: tuple[str, ...] = ()) -> int:
    import uvicorn
    host, port = check_bind(bind, allow_remote)
    # Beyond loopback anyone on the network could read runs: a token is required there; on
    # loopback it keeps out other local users (--token, or --token-file).
    secret = (read_token(token_file) if token_file is not None
              else new_token() if token or allow_remote else None)
    app = create_app(cfg, Policy(allowed_hosts=host_names(host, allowed_hosts), token=secret))
    url = f"http://{bind}"
    if secret is not None and token_file is None:
        url += f"/?{TOKEN_PARAM}={secret}"
    print(f"lab-attendant dashboard on {url} (store {cfg.db_path}, read-only"
          f"{', token required' if secret else ''}); Ctrl-C stops it", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    return 0
