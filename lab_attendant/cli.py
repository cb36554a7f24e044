"""The `lab-attendant` command: a job daemon for one GPU workstation and the verbs to feed it.

CLI and daemon talk only through the SQLite file: submit works with no daemon running. This module
is the parser and the verbs that fit in a few lines; the others live in a module per noun.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from jobs.errors import ParamError
from jobs.kinds import check_with_model, parse_assignment, registry, validate_params
from jobs.spec import DEFAULT_BATCH_SIZE, DEFAULT_MODEL, KV_KINDS, VARIANT_MODES, ModelSpec
from jobs.units import format_size, size_arg

from . import PROJECT_ROOT, dbcli, deps, history, prune, runinfo, venv, waiting, watch
from .config import Config, load_config
from .errors import EXIT_STORE_UNUSABLE, StoreUnusable, UserError
from .logsetup import log_for, setup_logging
from .plan import PROFILE_CHOICES, check_fits, device_profile, folder_spec, plan_model
from .deps import check_after
from .runinfo import get_run
from .states import TERMINAL, RunState
from .status import cmd_status
from .store import Store
from .retry import retry_now
from .validate import (check_executor, check_retries, check_submit_options, check_worker_python,
                       dumps)
from .when import BEGIN_HELP, begin_arg


def _store(cfg: Config) -> Store:
    return Store(cfg.db_path)


# -- verbs ----------------------------------------------------------------------------------------
def cmd_daemon(cfg: Config, args: argparse.Namespace) -> int:
    from .daemon import Daemon
    check_worker_python(Path(cfg.worker.python))
    setup_logging(cfg.paths.logs_dir, console=True, max_bytes=cfg.logging.max_bytes,
                  backup_count=cfg.logging.backup_count)   # the daemon alone rotates
    return Daemon(cfg, experimental_paging=args.experimental_paging, burst=args.burst).run()


def _read_params(args: argparse.Namespace) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    if args.params_file:
        path = Path(args.params_file)
        if not path.is_file():
            raise UserError(f"params file {path} does not exist")
        try:
            loaded = json.loads(path.read_bytes())
        except (ValueError, RecursionError) as exc:
            raise UserError(f"params file {path} is not a JSON object: {exc}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"params file {path} must hold a JSON object like "
                            f"{{\"key\": \"value\"}}, not {type(loaded).__name__}")
        raw.update(loaded)
    for item in args.param or []:
        key, value = parse_assignment(item)
        raw[key] = value
    return raw


def _check_model(spec: ModelSpec) -> None:
    """What the supervisor can see without torch: a quantized variant exists when one is asked for."""
    path = Path(spec.path)
    if spec.variant != "precise" and not any(path.glob("variants/*/variant.json")):
        raise UserError(f"model '{spec.name}' asks for variant '{spec.variant}' but {path} has no "
                        f"quantized variant; run `lab-attendant model quantize {spec.name} --bits 4` "
                        "or set variant = \"precise\"")


def cmd_submit(cfg: Config, args: argparse.Namespace) -> int:
    kinds = registry(cfg.worker.extra_kinds)
    kind = kinds.get(args.kind)
    if kind is None:
        raise UserError(f"unknown kind '{args.kind}'; known kinds: {', '.join(sorted(kinds))} "
                        "(see `lab-attendant kinds`)")
    params = validate_params(kind, _read_params(args), cfg.allowed_roots)
    if any(p.name == "model" for p in kind.params):
        model = cfg.model_spec(params.get("model"))
        _check_model(model)  # fails here, not in the worker
        check_with_model(kind, params, Path(model.path))
        check_fits(model, params.get("batch_size"))  # an impossible plan is refused now, not after a load
    check_submit_options(args.priority, args.timeout)
    check_retries(args.retries)
    executor = cfg.executor.choose(kind.name, params.get("model"), args.executor)
    check_executor(executor, cfg)
    store = _store(cfg)
    after = check_after(store, [int(x) for x in args.after]) if args.after else []
    run = store.submit(kind=kind.name, params=params, priority=args.priority, executor=executor,
                       timeout_s=args.timeout or cfg.limits.default_timeout_s,
                       needs_paging=kind.needs_paging,
                       max_retries=cfg.retries_for(kind.name) if args.retries is None
                       else args.retries, name=args.name, after=after, not_before=args.begin,
                       reason=_submit_reason(after))
    log_for(kind.needs_paging, "lab_attendant.cli").info("run submitted", run_id=run.id,
                                                          kind=kind.name)
    if args.json and not args.wait:
        print(dumps(run.to_dict()))
    elif not args.wait:
        print(run.id)
    _submit_notes(cfg, store, run)
    if not args.wait:
        return 0
    print(f"submitted run {run.id} ({kind.name}); waiting (Ctrl-C stops waiting, not the run)",
          file=sys.stderr)
    code, runs = waiting.Follower(cfg, store, [run.id], timeout_s=None,
                                  no_daemon=args.no_daemon).follow()
    if code != waiting.EXIT_INTERRUPTED:
        waiting.report(code, runs, args.json, single=True)
    return code


def _submit_reason(after: list[int]) -> str:
    if not after:
        return "submitted"
    if len(after) == 1:
        return f"submitted; starts once run {after[0]} has succeeded"
    return f"submitted; starts once runs {', '.join(map(str, after))} have succeeded"


def _submit_notes(cfg: Config, store: Store, run) -> None:
    """What the user cannot see from the queue: nobody will run it yet, or it will be held."""
    if not waiting.daemon_alive(cfg):
        print(f"lab-attendant: no daemon is running; run {run.id} waits in the queue until one "
              "starts (`lab-attendant daemon`)", file=sys.stderr)
        return
    row = store.latest_daemon()
    if run.needs_paging and row is not None and not row.experimental_paging:
        print(f"lab-attendant: run {run.id} is a paging kind and the daemon (pid {row.pid}) "
              "runs without --experimental-paging: it holds the run until a daemon starts "
              "with that flag", file=sys.stderr)


def cmd_dashboard(cfg: Config, args: argparse.Namespace) -> int:
    from .dashboard.app import serve   # the web stack is imported only by this verb
    return serve(cfg, args.bind, allow_remote=args.allow_remote)


def cmd_retry(cfg: Config, args: argparse.Namespace) -> int:
    """A new run of an ended one, linked to it; its params are checked again like a submit's."""
    store = _store(cfg)
    old = get_run(store, args.id)
    kind = registry(cfg.worker.extra_kinds).get(old.kind)
    if kind is None:
        raise UserError(f"run {old.id}'s kind '{old.kind}' is not registered any more")
    validate_params(kind, old.params, cfg.allowed_roots)   # still there, still confined
    run = retry_now(store, old.id)
    print(dumps(run.to_dict()) if args.json else f"run {run.id} retries run {old.id}")
    return 0


def cmd_cancel(cfg: Config, args: argparse.Namespace) -> int:
    store = _store(cfg)
    for rid in args.ids:           # every id exists before any is cancelled
        get_run(store, rid)
    for rid in args.ids:
        run = store.request_cancel(rid)
        if run.state is RunState.CANCELLED:
            print(f"run {run.id} cancelled")
        elif run.state in TERMINAL:
            print(f"run {run.id} already ended ({run.state}); nothing to cancel")
        else:
            print(f"run {run.id} is {run.state}; the daemon will stop it (SIGTERM, then SIGKILL "
                  f"after {cfg.limits.kill_grace_s:g} s)")
    return 0


def cmd_schedules(cfg: Config, args: argparse.Namespace) -> int:
    from .scheduler import Schedules, next_fire_times
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


def _venv_dir(cfg: Config) -> Path:
    return Path(cfg.worker.python).parent.parent


def cmd_venv(cfg: Config, args: argparse.Namespace) -> int:
    if args.venv_cmd == "create":
        info = venv.create(_venv_dir(cfg), torch_spec=args.torch_spec, force=args.force,
                           log_path=cfg.paths.logs_dir / "venv-create.log")
    else:
        info = venv.check(_venv_dir(cfg))
    print(dumps(info, indent=2))
    return 0


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _worker_python(cfg: Config) -> Path:
    python = Path(cfg.worker.python)
    if not python.exists():
        raise UserError(f"worker python {python} not found; run `lab-attendant venv create`")
    return python


def _run_worker_tool(argv: list[str], what: str) -> int:
    """A model tool in the experimental venv (torch lives there): its stderr passes through."""
    proc = subprocess.run(argv, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise UserError(f"{what} failed (exit {proc.returncode}); see the output above")
    print(proc.stdout.strip())
    return 0


def cmd_model(cfg: Config, args: argparse.Namespace) -> int:
    models_dir = cfg.paths.models_dir
    if args.model_cmd == "import-default":
        out = models_dir / DEFAULT_MODEL
        argv = [str(_worker_python(cfg)), "-m", "jobs.paging.convert", "--out", str(out)]
        return _run_worker_tool(argv, "model conversion")
    if args.model_cmd == "plan":
        return cmd_model_plan(cfg, args)
    if args.model_cmd == "quantize":
        path = Path(cfg.model_spec(args.name).path)  # ConfigError (a UserError) for an unknown name
        if not (path / "config.json").is_file():
            raise UserError(f"model '{args.name}' folder {path} has no config.json; run `lab-attendant "
                            "model import-default` or fix its [models.NAME] path")
        argv = [str(_worker_python(cfg)), "-m", "jobs.paging.quant", "--model", str(path),
                "--bits", str(args.bits), "--group-size", str(args.group_size)]
        if args.force:
            argv.append("--force")
        if args.device:
            argv += ["--device", args.device]
        return _run_worker_tool(argv, "quantization")
    if not models_dir.is_dir():
        print(f"no models in {models_dir}; run `lab-attendant model import-default`")
        return 0
    for d in sorted(p for p in models_dir.iterdir() if (p / "config.json").exists()):
        print(f"{d.name:<30} {format_size(_dir_size(d)):>10}  {d}")
    return 0


def cmd_model_plan(cfg: Config, args: argparse.Namespace) -> int:
    """The memory plan as a table (or --json); exit 2 when it does not fit."""
    folder = Path(args.name)
    spec = folder_spec(folder) if (folder / "config.json").is_file() else cfg.model_spec(args.name)
    overrides = {k: v for k, v in (("vram_budget_bytes", args.vram_budget), ("ram_budget_bytes", args.ram_budget),
                                   ("kv_cache", args.kv_cache), ("variant", args.variant)) if v is not None}
    spec = dataclasses.replace(spec, **overrides)
    name = args.device_profile or ("cpu" if spec.device == "cpu" else "auto")
    plan = plan_model(spec, device_profile(name), batch=args.batch, context=args.context,
                      disk_bytes_per_s=args.disk_bandwidth)
    print(dumps(plan.to_json(), indent=2) if args.json else plan.table())
    if not plan.fits:
        print(f"error: model '{spec.name}' does not fit {plan.device}: {plan.reason}", file=sys.stderr)
        return 2
    return 0


def cmd_service(cfg: Config, args: argparse.Namespace) -> int:
    from . import service
    if args.service_cmd == "uninstall":
        removed, commands = service.uninstall(user=args.user)
        for path in removed:
            print(f"removed {path}")
        if not removed:
            print(f"nothing to remove: no {service.UNIT_NAME} in {service.unit_dir(args.user)}")
    else:
        files = service.render(cfg, user=args.user, experimental_paging=args.experimental_paging,
                               nvidia_modprobe=args.nvidia_modprobe)
        for warning in files.warnings:
            print(f"lab-attendant: warning: {warning}", file=sys.stderr)
        if args.print:
            print(files.unit_text, end="")
            if files.dropin_text is not None:
                print(f"\n# ---- drop-in {files.dropin_path}\n{files.dropin_text}", end="")
            return 0
        commands = service.install(files, cfg, user=args.user)
        print(f"wrote {files.unit_path}")
        if files.dropin_text is not None:
            print(f"wrote {files.dropin_path} (experimental paging on while it exists)")
        if args.user:
            commands.append(["loginctl", "enable-linger", service.run_as_user()])
    print("lab-attendant does not run systemctl itself; now run:")
    for argv in commands:
        print("  " + shlex.join(argv))
    return 0


# -- parser ---------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: exit 2, one line + hint
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("lab-attendant")
    except PackageNotFoundError:     # a checkout run without `pip install -e .`
        return "unknown (not installed)"


def _id_list(text: str) -> list[int]:
    """'3,4' -> [3, 4] for --after."""
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a run id list like 3 or 3,4") from None
    if not ids or any(i < 1 for i in ids):
        raise argparse.ArgumentTypeError(f"{text!r} is not a run id list like 3 or 3,4")
    return ids


def cmd_completion(cfg: Config, args: argparse.Namespace) -> int:
    import shtab
    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


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

    s = sub.add_parser("submit", help="queue a run (sbatch)")
    s.add_argument("kind", help="a job kind (see `lab-attendant kinds`)")
    s.add_argument("-p", "--param", action="append", metavar="KEY=VALUE",
                   help="a job param, repeatable (see `lab-attendant kinds` for each kind's)")
    s.add_argument("--params-file", metavar="F", help="JSON object of params")
    s.add_argument("-J", "--name", help="a label for the run, shown by list and matched by "
                   "`list --name`")
    s.add_argument("--after", type=_id_list, action="extend", metavar="ID[,ID]",
                   help="start only once these runs have succeeded (afterok); if one of them "
                   "fails for good, this run is cancelled with a reason naming it")
    s.add_argument("--begin", type=begin_arg, metavar="TIME", help=BEGIN_HELP)
    s.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    s.add_argument("--timeout", type=float, metavar="S", help="seconds before the run is stopped")
    s.add_argument("--retries", type=int, metavar="N", help="retry a failed or lost run N times, "
                   "with exponential back-off (default: [retries] kinds, else 0)")
    s.add_argument("--executor", choices=("local", "slurm"), help="where the worker runs: this "
                   "machine, or a Slurm batch job (default: [executor] in the config)")
    s.add_argument("--wait", action="store_true", help="follow progress; exit as `wait` does "
                   "(0 only on success)")
    waiting.add_no_daemon(s)
    s.add_argument("--json", action="store_true", help="machine-readable: the run as JSON")
    s.set_defaults(fn=cmd_submit)

    runinfo.add_parsers(sub)
    waiting.add_parsers(sub)
    watch.add_parsers(sub)

    rt = sub.add_parser("retry", help="queue an ended run again (a new run linked to the old one)")
    rt.add_argument("id", type=int, help="an ended run that did not succeed")
    rt.add_argument("--json", action="store_true", help="machine-readable: the new run as JSON")
    rt.set_defaults(fn=cmd_retry)

    c = sub.add_parser("cancel", help="cancel runs (waiting ones at once; running ones SIGTERM, "
                       "then SIGKILL after grace)")
    c.add_argument("ids", type=int, nargs="+", metavar="ID", help="runs to cancel")
    c.set_defaults(fn=cmd_cancel)
    deps.add_parsers(sub, _Parser)

    st = sub.add_parser("status", help="daemon, queue and running runs")
    st.add_argument("--json", action="store_true", help="machine-readable: the status as JSON")
    st.set_defaults(fn=cmd_status)

    history.add_parsers(sub)
    prune.add_parsers(sub)

    db = sub.add_parser("dashboard", help="serve a read-only web view of runs, guards and "
                        "schedules, with /metrics and /api/runs (opens the store read-only)")
    db.add_argument("--bind", default="127.0.0.1:8765", metavar="HOST:PORT",
                    help="where to listen (default 127.0.0.1:8765; loopback only unless "
                    "--allow-remote)")
    db.add_argument("--allow-remote", action="store_true",
                    help="allow a non-loopback --bind: the dashboard has no login, so anyone "
                    "who can reach the port sees run params, logs and outputs")
    db.set_defaults(fn=cmd_dashboard)

    sc = sub.add_parser("schedules", help="configured schedules and their next fire times; "
                        "`schedules run ID` fires one now")
    sc.add_argument("--json", action="store_true", help="machine-readable output")
    scsub = sc.add_subparsers(dest="schedules_cmd", parser_class=_Parser, metavar="run")
    sr = scsub.add_parser("run", help="fire a schedule now (a run as its next firing would make)")
    sr.add_argument("id", help="the schedule's id in the config")
    sr.add_argument("--json", action="store_true", help="machine-readable: the run as JSON")
    sc.set_defaults(fn=cmd_schedules)

    v = sub.add_parser("venv", help="the experimental venv workers run in")
    vsub = v.add_subparsers(dest="venv_cmd", required=True, parser_class=_Parser)
    vc = vsub.add_parser("create", help="create or update it from venvs/experimental.txt")
    vc.add_argument("--torch-spec", help=f"pip spec for torch (default ${venv.TORCH_SPEC_ENV} or "
                    f"{venv.DEFAULT_TORCH_SPEC}); e.g. a CUDA build you already use")
    vc.add_argument("--force", action="store_true", help="reinstall even if up to date")
    vsub.add_parser("check", help="what it has: torch version, CUDA")
    v.set_defaults(fn=cmd_venv)

    m = sub.add_parser("model", help="model folders")
    msub = m.add_subparsers(dest="model_cmd", required=True, parser_class=_Parser)
    msub.add_parser("import-default", help="convert the bundled Gemma-3-270M to safetensors")
    msub.add_parser("list", help="model folders with size on disk")
    mp = msub.add_parser("plan", help="what a model's run takes on the device and in pinned RAM, before any "
                                      "weight is read; exit 2 when it does not fit")
    mp.add_argument("name", help="a [models.NAME], or a model folder (config.json alone is enough)")
    mp.add_argument("--device-profile", choices=PROFILE_CHOICES,
                    help="plan for this card (auto: the local GPU; default: the model's device)")
    mp.add_argument("--batch", type=_positive_int, default=DEFAULT_BATCH_SIZE, help="prompts per pass")
    mp.add_argument("--context", type=_positive_int, help="prompt + new tokens per row (default: context_tokens)")
    mp.add_argument("--vram-budget", type=size_arg, help="decoder-layer bytes on the device (an upper bound)")
    mp.add_argument("--ram-budget", type=size_arg, help="host RAM for cached layers / experts")
    mp.add_argument("--kv-cache", choices=KV_KINDS, help="KV cache layout to plan for "
                    "(default: the model's kv_cache)")
    mp.add_argument("--variant", choices=VARIANT_MODES, help="precise weights or a quantized "
                    "variant (default: the model's variant)")
    mp.add_argument("--disk-bandwidth", type=size_arg, help="measured read bytes/s (e.g. 2GB), for the disk bound")
    mp.add_argument("--json", action="store_true", help="machine-readable: the plan as JSON")
    mq = msub.add_parser("quantize", help="write a 4-bit (HQQ) variant of a model beside its files "
                         "(MODEL/variants/q4g64); the original files are not changed")
    mq.add_argument("name", help=f"a [models.NAME] table or {DEFAULT_MODEL}")
    mq.add_argument("--bits", type=int, default=4, choices=(4, 8), help="bits per weight (default 4)")
    mq.add_argument("--group-size", type=int, default=64, help="weights per scale/zero pair (default 64)")
    mq.add_argument("--force", action="store_true", help="write it again even if it exists")
    mq.add_argument("--device", help="run HQQ there, e.g. cuda (a Mixtral matrix takes ~1 min on CPU)")
    m.set_defaults(fn=cmd_model)

    dbcli.add_parser(sub, _Parser)

    co = sub.add_parser("completion", help="print a shell completion script (generated from "
                        "this parser by shtab), e.g. `source <(lab-attendant completion bash)`")
    co.add_argument("shell", choices=("bash", "zsh", "tcsh"), help="the shell to complete in")
    co.set_defaults(fn=cmd_completion)

    sv = sub.add_parser("service", help="install or remove the systemd unit (prints the "
                        "systemctl commands, does not run them)")
    svsub = sv.add_subparsers(dest="service_cmd", required=True, parser_class=_Parser)
    si = svsub.add_parser("install", help="render the unit with this checkout's paths and write "
                          "it to /etc/systemd/system (or ~/.config/systemd/user with --user)")
    si.add_argument("--experimental-paging", action="store_true",
                    help="also write a drop-in that starts the daemon with the flag")
    si.add_argument("--print", action="store_true", help="print the unit, write nothing")
    si.add_argument("--nvidia-modprobe", action="store_true",
                    help="run nvidia-modprobe as root before the daemon starts (creates "
                    "/dev/nvidia-uvm after a boot; NoNewPrivileges= blocks its setuid bit)")
    su = svsub.add_parser("uninstall", help="remove the unit, its drop-in and enable links")
    for p_ in (si, su):
        p_.add_argument("--user", action="store_true", help="a systemd --user unit")
    sv.set_defaults(fn=cmd_service)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
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
