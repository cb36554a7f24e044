"""`lab-attendant update`, `pause`, `resume` and `parallel` (scontrol update, pueue edit, pause,
parallel): a waiting run's settings and the queue's controls; the changes are lab_attendant.store.queue's."""
from __future__ import annotations

import argparse
import json

from lab_attendant.cli.render import duration, local_time
from lab_attendant.cli.submit import checked_params, known_kind, read_params
from lab_attendant.cli.when import BEGIN_HELP, begin_arg
from lab_attendant.config import Config
from lab_attendant.errors import UserError
from lab_attendant.store import queue
from lab_attendant.store.db import Store
from lab_attendant.store.states import ACTIVE
from lab_attendant.store.tables import Run
from lab_attendant.validate import check_executor, check_submit_options, dumps


def cmd_update(cfg: Config, args: argparse.Namespace) -> int:
    changes: dict[str, object] = {}
    if args.priority is not None or args.timeout is not None:
        check_submit_options(args.priority or 0, args.timeout)
    if args.priority is not None:
        changes["priority"] = args.priority
    if args.timeout is not None:
        changes["timeout_s"] = args.timeout
    if args.begin is not None:
        changes["not_before"] = args.begin
    if args.executor is not None:
        check_executor(args.executor, cfg)
        changes["executor"] = args.executor
    store = Store(cfg.db_path)
    run = store.must_get(args.id)
    hint = ""
    if args.param:
        # The run's params with these replaced, checked whole as a submit checks them.
        merged = {**run.params, **read_params(args)}
        kind = known_kind(cfg, run.kind)
        params = checked_params(cfg, kind, merged)
        changes["params_json"] = json.dumps(params, sort_keys=True)
        changes["needs_paging"] = kind.run_needs_paging(params)   # `-p gpu=true` on a command run
        hint = _executor_hint(cfg, run, kind.name, params, args.executor)
    if not changes:
        raise UserError("nothing to update: give --priority, --begin, --timeout, --executor or "
                        "-p KEY=VALUE")
    changed = queue.edit(store, run.id, **changes)
    if args.json:
        print(dumps(store.must_get(run.id).to_dict()))
        return 0
    if not changed:
        print(f"run {run.id} unchanged (it already had those settings)")
        return 0
    after = store.must_get(run.id)
    shown = {"priority": f"priority {after.priority}",
             "timeout_s": f"timeout {duration(after.timeout_s)}",
             "not_before": f"begins {local_time(after.not_before)}",
             "params_json": f"params {after.params_json}",
             "needs_paging": "a GPU run (waits for --experimental-paging)" if after.needs_paging
             else "not a GPU run",
             "executor": f"executor {after.executor}"}
    print(f"run {run.id} updated: " + ", ".join(shown[k] for k in changed))
    if hint:
        print(hint)
    return 0


def _executor_hint(cfg: Config, run: Run, kind: str, params: dict, requested: str | None) -> str:
    """A new model that [executor] routes elsewhere: the run keeps the executor it was given (submit's
    --executor may have chosen it; the row does not say), and the line says how to follow the config."""
    old_model, new_model = run.params.get("model"), params.get("model")
    want = cfg.executor.choose(kind, new_model)
    if requested or want in (cfg.executor.choose(kind, old_model), run.executor):
        return ""
    return (f"note: [executor] sends model {new_model!r} to {want}; run {run.id} stays on {run.executor} "
            f"(`lab-attendant update {run.id} --executor {want}` moves it)")


def cmd_pause(cfg: Config, args: argparse.Namespace) -> int:
    store = Store(cfg.db_path)
    act = queue.pause if args.cmd == "pause" else queue.resume
    changed, now = act(store)
    running = len(store.list_runs(states=ACTIVE))
    if args.cmd == "pause":
        print(f"queue paused since {local_time(now.paused_since)}: no run starts until "
              f"`lab-attendant resume`; {running} running go on" if changed else
              f"queue already paused since {local_time(now.paused_since)}")
    else:
        print("queue resumed: the daemon starts waiting runs again" if changed else
              "queue was not paused")
    return 0


def cmd_parallel(cfg: Config, args: argparse.Namespace) -> int:
    store = Store(cfg.db_path)
    configured = cfg.limits.max_concurrent
    if args.reset and args.n is not None:
        raise UserError("give N or --reset, not both")
    if args.reset:
        now = queue.set_parallel(store, None)
    elif args.n is not None:
        now = queue.set_parallel(store, args.n)
    else:
        now = queue.controls(store)
    source = ("set by `lab-attendant parallel`; the config says "
              f"{configured}" if now.max_concurrent is not None else "the config's max_concurrent")
    n = now.parallel(configured)
    print(f"parallel: up to {n} run{'' if n == 1 else 's'} at once ({source})")
    if args.n is not None and args.n < len(store.list_runs(states=ACTIVE)):
        print("runs already running go on; no new one starts until fewer are running")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    u = sub.add_parser("update", help="change a waiting run's priority, begin time, timeout or "
                       "params (scontrol update)")
    u.add_argument("id", type=int, help="a queued or held run")
    u.add_argument("--priority", type=int, help="higher runs first")
    u.add_argument("--begin", type=begin_arg, metavar="TIME", help=BEGIN_HELP)
    u.add_argument("--timeout", type=float, metavar="S", help="seconds before the run is stopped")
    u.add_argument("--executor", choices=("local", "slurm"), help="where its worker will run: this "
                   "machine, or a Slurm batch job")
    u.add_argument("-p", "--param", action="append", metavar="KEY=VALUE",
                   help="replace a param, repeatable; the params are checked as a submit's")
    u.add_argument("--json", action="store_true", help="machine-readable: the run as JSON")
    u.set_defaults(fn=cmd_update)

    pa = sub.add_parser("pause", help="start no new runs until `resume`; running ones go on "
                        "(kept across daemon restarts)")
    pa.set_defaults(fn=cmd_pause)
    re = sub.add_parser("resume", help="start waiting runs again after `pause`")
    re.set_defaults(fn=cmd_pause)

    pl = sub.add_parser("parallel", help="how many runs may run at once, changed while the "
                        "daemon runs (pueue parallel); without N, print it")
    pl.add_argument("n", type=int, nargs="?", metavar="N", help="runs at once (1 to "
                    f"{queue.MAX_PARALLEL})")
    pl.add_argument("--reset", action="store_true", help="back to the config's max_concurrent")
    pl.set_defaults(fn=cmd_parallel)
