"""`lab-attendant submit` and `retry`: a run's params read, checked (kind, confinement, model, fit,
executor, dependencies, notify) and queued; the notes a user cannot see from the queue."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from jobs.contract.kinds import Kind, check_with_model, parse_assignment, registry, validate_params
from jobs.contract.spec import ModelSpec
from lab_attendant import venv
from lab_attendant.cli import wait as waiting
from lab_attendant.cli.when import BEGIN_HELP, begin_arg
from lab_attendant.config import Config
from lab_attendant.daemon.notify import NOTIFY_CHOICES
from lab_attendant.errors import UserError
from lab_attendant.plan import check_fits, model_facts
from lab_attendant.service.logsetup import log_for
from lab_attendant.store.db import Store
from lab_attendant.store.deps import check_after
from lab_attendant.store.lifecycle import AFTER_ANY, AFTER_NOTOK, AFTER_OK
from lab_attendant.store.retry import retry_now
from lab_attendant.store.states import RunState
from lab_attendant.validate import check_executor, check_retries, check_submit_options, dumps


def read_params(args: argparse.Namespace) -> dict[str, Any]:
    """-p KEY=VALUE (and submit's --params-file) as typed, not yet checked."""
    raw: dict[str, Any] = {}
    if getattr(args, "params_file", None):
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
    # The `command` kind's flags, as sbatch/pueue spell them: the program after `--`, --cwd, --gpu.
    if getattr(args, "argv", None):
        raw["argv"] = list(args.argv)
    if getattr(args, "cwd", None):
        raw["cwd"] = args.cwd
    if getattr(args, "gpu", False):
        raw["gpu"] = True
    return raw


WEIGHT_PATTERNS = ("*.safetensors", "*.gguf")  # what the engine reads weights from


def _check_model(spec: ModelSpec) -> None:
    """What the supervisor can see without torch: a quantized variant exists when one is asked for."""
    path = Path(spec.path)
    if spec.variant != "precise" and not any(path.glob("variants/*/variant.json")):
        raise UserError(f"model '{spec.name}' asks for variant '{spec.variant}' but {path} has no "
                        f"quantized variant; run `lab-attendant model quantize {spec.name} --bits 4` "
                        "or set variant = \"precise\"")


def _check_runnable(spec: ModelSpec, worker_python: Path) -> None:
    """After the plan (which config.json alone answers): the folder holds weights, and a cuda model has a
    CUDA build of torch in the worker venv."""
    path = Path(spec.path)
    if path.is_dir() and not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
        raise UserError(f"model '{spec.name}': {path} holds no weights (no .safetensors or .gguf file); copy "
                        "the model's weight files into it, or point [models." + spec.name + "] path at the folder "
                        "that has them")
    if spec.device.startswith("cuda") and venv.worker_torch_cuda(worker_python) == "cpu":
        raise UserError(f"model '{spec.name}' has device = \"{spec.device}\" but the worker venv's torch is a CPU "
                        f"build; run `{venv.FIX_CPU_TORCH}` on the machine with the NVIDIA GPU (it installs the "
                        "CUDA build its driver supports), or set device = \"cpu\"")


def checked_params(cfg: Config, kind: Kind, raw: dict[str, Any]) -> dict[str, Any]:
    """A run's params checked as a submit checks them (`update -p` too): typed, confined, and
    for a model kind the model's variant, facts, memory plan and worker torch."""
    params = validate_params(kind, raw, cfg.allowed_roots)
    if any(p.name == "model" for p in kind.params):
        model = cfg.model_spec(params.get("model"))
        _check_model(model)  # fails here, not in the worker
        check_with_model(kind, params, model_facts(Path(model.path)))
        check_fits(model, params.get("batch_size"))  # an impossible plan is refused now, not after a load
        _check_runnable(model, Path(cfg.worker.python))
    return params


def known_kind(cfg: Config, name: str) -> Kind:
    kinds = registry(cfg.worker.extra_kinds)
    kind = kinds.get(name)
    if kind is None:
        raise UserError(f"unknown kind '{name}'; known kinds: {', '.join(sorted(kinds))} "
                        "(see `lab-attendant kinds`)")
    return kind


def _check_notify(cfg: Config, notify: str | None) -> None:
    if notify and not (cfg.notify.command or cfg.notify.url):
        raise UserError(f"--notify {notify} needs a [notify] command or url in the config "
                        f"({cfg.source or 'built-in defaults'}); add one, or submit without "
                        "--notify")


def cmd_submit(cfg: Config, args: argparse.Namespace) -> int:
    kind = known_kind(cfg, args.kind)
    if args.argv and not any(p.type == "argv" for p in kind.params):
        raise UserError(f"kind '{kind.name}' takes no program after `--` (only the command kind does); "
                        "pass its params with -p KEY=VALUE")
    params = checked_params(cfg, kind, read_params(args))
    check_submit_options(args.priority, args.timeout)
    check_retries(args.retries)
    if args.singleton and not args.name:
        raise UserError("--singleton waits for other runs of the same name: give the run one "
                        "with --name NAME")
    _check_notify(cfg, args.notify)
    executor = cfg.executor.choose(kind.name, params.get("model"), args.executor)
    check_executor(executor, cfg)
    store = Store(cfg.db_path)
    deps = {t: check_after(store, ids, t) if ids else []
            for t, ids in ((AFTER_OK, args.after), (AFTER_ANY, args.afterany),
                           (AFTER_NOTOK, args.afternotok))}
    run = store.submit(kind=kind.name, params=params, priority=args.priority, executor=executor,
                       timeout_s=args.timeout or cfg.limits.default_timeout_s,
                       needs_paging=kind.run_needs_paging(params),
                       max_retries=cfg.retries_for(kind.name) if args.retries is None
                       else args.retries, name=args.name, after=deps[AFTER_OK],
                       after_any=deps[AFTER_ANY], after_notok=deps[AFTER_NOTOK],
                       singleton=args.singleton, notify=args.notify, not_before=args.begin,
                       reason=_submit_reason(deps, args.name if args.singleton else None))
    log_for(run.needs_paging, "lab_attendant.cli.main").info("run submitted", run_id=run.id,
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


_DEP_VERBS = {AFTER_OK: "succeeded", AFTER_ANY: "ended", AFTER_NOTOK: "failed"}


def _submit_reason(deps: dict[str, list[int]], singleton_name: str | None) -> str:
    """'submitted; starts once run 3 has succeeded and runs 4, 5 have ended'."""
    parts = [(f"run {ids[0]} has " if len(ids) == 1 else
              f"runs {', '.join(map(str, ids))} have ") + _DEP_VERBS[t]
             for t, ids in deps.items() if ids]
    if singleton_name is not None:
        parts.append(f"no other run named '{singleton_name}' is running")
    return "submitted; starts once " + " and ".join(parts) if parts else "submitted"


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


def cmd_retry(cfg: Config, args: argparse.Namespace) -> int:
    """A new run of an ended one, linked to it; its params are checked again like a submit's."""
    store = Store(cfg.db_path)
    old = store.must_get(args.id)
    kind = registry(cfg.worker.extra_kinds).get(old.kind)
    if kind is None:
        raise UserError(f"run {old.id}'s kind '{old.kind}' is not registered any more")
    validate_params(kind, old.params, cfg.allowed_roots)   # still there, still confined
    run = retry_now(store, old.id, force=args.force)
    verb = "re-runs" if old.state is RunState.SUCCEEDED else "retries"
    print(dumps(run.to_dict()) if args.json else f"run {run.id} {verb} run {old.id}")
    return 0


def _id_list(text: str) -> list[int]:
    """'3,4' -> [3, 4] for --after."""
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a run id list like 3 or 3,4") from None
    if not ids or any(i < 1 for i in ids):
        raise argparse.ArgumentTypeError(f"{text!r} is not a run id list like 3 or 3,4")
    return ids


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("submit", help="queue a run (sbatch)")
    s.add_argument("kind", help="a job kind (see `lab-attendant kinds`)")
    s.add_argument("argv", nargs="*", metavar="-- PROGRAM ARGS",
                   help="for the command kind: the program and its arguments after `--` (no shell)")
    s.add_argument("--cwd", metavar="DIR", help="command kind: its working folder (inside the allowed "
                   "roots; default: the run's output folder)")
    s.add_argument("--gpu", action="store_true", help="command kind: a GPU run (needs the daemon's "
                   "--experimental-paging; guards and co-tenant suspension apply as to the paging kinds)")
    s.add_argument("-p", "--param", action="append", metavar="KEY=VALUE",
                   help="a job param, repeatable (see `lab-attendant kinds` for each kind's)")
    s.add_argument("--params-file", metavar="F", help="JSON object of params")
    s.add_argument("-J", "--name", help="a label for the run, shown by list and matched by "
                   "`list --name`")
    s.add_argument("--after", type=_id_list, action="extend", metavar="ID[,ID]", default=[],
                   help="start only once these runs have succeeded (afterok); if one of them "
                   "fails for good, this run is cancelled with a reason naming it")
    s.add_argument("--afterany", type=_id_list, action="extend", metavar="ID[,ID]", default=[],
                   help="start only once these runs have ended, however they ended")
    s.add_argument("--afternotok", type=_id_list, action="extend", metavar="ID[,ID]",
                   default=[], help="start only once these runs have ended without success "
                   "(failed, cancelled, timed out, killed...); if one succeeds, this run is "
                   "cancelled with a reason naming it")
    s.add_argument("--singleton", action="store_true", help="start only while no other run "
                   "of the same --name is starting or running (one at a time per name)")
    s.add_argument("--notify", choices=NOTIFY_CHOICES, help="notify ([notify] command or url) "
                   "when this run ends (end), ends without success (fail), or starts and ends "
                   "(all), besides [notify] on")
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

    rt = sub.add_parser("retry", help="queue an ended run again (a new run linked to the old one)")
    rt.add_argument("id", type=int, help="an ended run that did not succeed")
    rt.add_argument("--force", action="store_true", help="run it again even if it succeeded "
                    "or was retried already (pueue restart)")
    rt.add_argument("--json", action="store_true", help="machine-readable: the new run as JSON")
    rt.set_defaults(fn=cmd_retry)

