"""The `lab-attendant` command: a job daemon for one GPU workstation and the verbs to feed it.

CLI and daemon talk only through the SQLite file: submit works with no daemon running. This module
is the parser and the verbs that fit in a few lines; the others live in a module per noun.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from jobs.contract.errors import ParamError
from jobs.contract.kinds import registry
from lab_attendant.cli import db as dbcli
from lab_attendant.cli import holds, prune, queue, service, stats, submit, watch
from lab_attendant.cli import model as modelcli
from lab_attendant.cli import runs as runinfo
from lab_attendant.cli import wait as waiting
from lab_attendant.cli.status import cmd_status
from lab_attendant.config import Config, load_config
from lab_attendant.errors import EXIT_STORE_UNUSABLE, StoreUnusable, UserError
from lab_attendant.service.logsetup import setup_logging
from lab_attendant.service.private import private_process
from lab_attendant.store.db import Store
from lab_attendant.store.states import RunState
from lab_attendant.validate import check_worker_python, dumps


def _store(cfg: Config) -> Store:
    return Store(cfg.db_path)


# -- verbs ----------------------------------------------------------------------------------------
def cmd_daemon(cfg: Config, args: argparse.Namespace) -> int:
    from lab_attendant.daemon.loop import Daemon
    check_worker_python(Path(cfg.worker.python))
    setup_logging(cfg.paths.logs_dir, console=True, max_bytes=cfg.logging.max_bytes,
                  backup_count=cfg.logging.backup_count)   # the daemon alone rotates
    return Daemon(cfg, experimental_paging=args.experimental_paging, burst=args.burst).run()


def cmd_dashboard(cfg: Config, args: argparse.Namespace) -> int:
    from lab_attendant.dashboard.app import serve  # the web stack is imported only by this verb
    bind = args.bind
    if args.port is not None:      # --port N: the --bind host (loopback by default) on port N
        if not 0 < args.port < 65536:
            raise UserError(f"--port takes a port number from 1 to 65535, got {args.port}")
        bind = f"{bind.rpartition(':')[0] or '127.0.0.1'}:{args.port}"
    return serve(cfg, bind, allow_remote=args.allow_remote, token=args.token,
                 token_file=args.token_file, allowed_hosts=tuple(args.allowed_host))


def cmd_schedules(cfg: Config, args: argparse.Namespace) -> int:
    from lab_attendant.scheduler import Schedules, next_fire_times
    if args.schedules_cmd == "run":
        run = Schedules(cfg, registry(cfg.worker.extra_kinds)).fire_now(_store(cfg), args.id)
        print(dumps(run.to_dict()) if args.json else f"run {run.id} {run.state}: {run.reason}")
        return 0 if run.state is not RunState.SKIPPED else 1
    rows = [{"id": s.id, "cron": s.cron, "kind": s.kind, "params": s.params,
             "timezone": s.timezone or "local", "next_fire_time": nxt.isoformat() if nxt else None}
            for s, nxt in next_fire_times(cfg)]
    if args.json:
        print(dumps(rows))
        return 0
    if not rows:
        print("no schedules; add [[schedules]] tables to the config")
    for r in rows:
        print(f"{r['id']:<20} {r['cron']:<18} {r['kind']:<20} next {r['next_fire_time']} "
              f"({r['timezone']})")
    return 0


# -- parser ---------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's own errors: exit 2, one line + hint
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("lab-attendant")
    except PackageNotFoundError:     # a checkout run without `pip install -e .`
        return "unknown (not installed)"


def cmd_completion(cfg: Config, args: argparse.Namespace) -> int:
    import shtab
    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lab-attendant", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="TOML config (default: $LAB_ATTENDANT_CONFIG, "
                   "./lab-attendant.toml, built-in defaults)")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser, metavar="VERB")

    d = sub.add_parser("daemon", help="run the supervisor loop")
    d.add_argument("--burst", action="store_true", help="process the queue, exit when it is empty")
    d.add_argument("--experimental-paging", action="store_true",
                   help="allow paging kinds (in memory only: off again on next start)")
    d.set_defaults(fn=cmd_daemon)

    submit.register(sub)
    runinfo.register(sub)
    waiting.register(sub)
    watch.register(sub)

    holds.register(sub)
    queue.register(sub)

    st = sub.add_parser("status", help="daemon, queue and running runs")
    st.add_argument("--json", action="store_true", help="machine-readable: the status as JSON")
    st.set_defaults(fn=cmd_status)

    stats.register(sub)
    prune.register(sub)

    db = sub.add_parser("dashboard", help="serve a read-only web view of runs, guards and "
                        "schedules, with /metrics and /api/runs (opens the store read-only)")
    db.add_argument("--bind", default="127.0.0.1:8765", metavar="HOST:PORT",
                    help="where to listen (default 127.0.0.1:8765; loopback only unless "
                    "--allow-remote)")
    db.add_argument("--port", type=int, metavar="N",
                    help="listen on port N (on the --bind host: 127.0.0.1 unless given)")
    db.add_argument("--allow-remote", action="store_true",
                    help="allow a non-loopback --bind; a token is then required (printed in "
                    "the start-up link, or --token-file)")
    db.add_argument("--token", action="store_true",
                    help="require a token on loopback too (keeps out other local users)")
    db.add_argument("--token-file", type=Path, metavar="FILE",
                    help="the token to require, from a file only you can read")
    db.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                    help="a Host name the dashboard answers to besides its --bind address and "
                    "localhost (others get 421: a DNS-rebinding page cannot read it)")
    db.set_defaults(fn=cmd_dashboard)

    sc = sub.add_parser("schedules", help="configured schedules and their next fire times; "
                        "`schedules run ID` fires one now")
    sc.add_argument("--json", action="store_true", help="machine-readable output")
    scsub = sc.add_subparsers(dest="schedules_cmd", parser_class=_Parser, metavar="run")
    sr = scsub.add_parser("run", help="fire a schedule now (a run as its next firing would make)")
    sr.add_argument("id", help="the schedule's id in the config")
    sr.add_argument("--json", action="store_true", help="machine-readable: the run as JSON")
    sc.set_defaults(fn=cmd_schedules)

    modelcli.register(sub)

    dbcli.register(sub)

    co = sub.add_parser("completion", help="print a shell completion script (generated from "
                        "this parser by shtab), e.g. `source <(lab-attendant completion bash)`")
    co.add_argument("shell", choices=("bash", "zsh", "tcsh"), help="the shell to complete in")
    co.set_defaults(fn=cmd_completion)

    service.register(sub)
    return p


def _parse(argv: list[str]) -> argparse.Namespace:
    """argparse, except that everything after the first `--` is a program's argv (`submit command --
    PROGRAM ARGS…`), kept verbatim: argparse would have matched its `-x` words against our options."""
    head, sep, tail = argv, False, []
    if "--" in argv:
        i = argv.index("--")
        head, sep, tail = argv[:i], True, argv[i + 1:]
    parser = build_parser()
    args = parser.parse_args(head)
    if sep:
        if not hasattr(args, "argv"):
            parser.error(f"`{args.cmd}` takes nothing after `--`")
        args.argv = [*args.argv, *tail]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config)
        private_process(cfg.paths.state_dir, cfg.paths.logs_dir, cfg.backups_dir)
        if args.cmd != "daemon":
            setup_logging(cfg.paths.logs_dir, console=False)
        code = args.fn(cfg, args)
        sys.stdout.flush()         # a closed pipe shows here, inside the handlers below
        return code
    except (UserError, ParamError) as exc:
        print(f"lab-attendant: error: {exc}", file=sys.stderr)
        return 2
    except StoreUnusable as exc:   # corrupt or unreadable store: the sentence names the fix
        print(f"lab-attendant: error: {exc}", file=sys.stderr)
        return EXIT_STORE_UNUSABLE if args.cmd == "daemon" else 1   # the unit won't restart 3
    except OSError as exc:         # the machine, not the input: a folder we cannot create, ...
        if isinstance(exc, BrokenPipeError):
            return _quiet_broken_pipe()
        print(f"lab-attendant: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _quiet_broken_pipe() -> int:
    """The reader went away (`list --json | head`): stop quietly, as head asked. stdout goes to
    /dev/null so the interpreter's final flush does not print a second BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 0


if __name__ == "__main__":
    sys.exit(main())
