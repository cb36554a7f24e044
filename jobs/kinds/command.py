"""The `command` kind: run the user's own program (an argv list, never a shell) as part of the worker's
process group, so the guards, timeouts, co-tenant suspension and killpg treat it as a worker.

Its output goes to the run log (the worker's stdout and stderr); its exit code is the run's result: 0
succeeds, anything else fails the run with a reason naming the code or the signal. The program sees only
the environment variables in jobs.contract.command.ENV_ALLOWED (plus LAB_ATTENDANT_RUN_ID and
LAB_ATTENDANT_OUTPUT_DIR), not whatever the daemon inherited.
"""
from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

from jobs.contract.command import child_env

TERM_GRACE_S = 5.0     # after the worker's own SIGTERM: how long the program may take to exit


class CommandFailed(RuntimeError):
    """The program ended with a non-zero exit code or by a signal (its own output says why: no
    traceback of ours in the run log)."""
    quiet = True


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def run(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    argv = [str(a) for a in params["argv"]]
    cwd = str(ctx.roots.param("cwd", params["cwd"])) if params.get("cwd") else str(ctx.output_dir)
    env = child_env(os.environ, run_id=ctx.run_id, output_dir=str(ctx.output_dir))
    ctx.log.info("running %s in %s", argv, cwd)
    # Same process group as the worker (no new session): the daemon's killpg reaches the program too.
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, close_fds=True)
    try:
        code = proc.wait()
    except BaseException:        # Terminated (the group's SIGTERM reached it as well) or an error here
        try:
            proc.wait(TERM_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    ctx.metric(exit_code=code)
    if code != 0:
        raise CommandFailed(f"{argv[0]} {_how(code)}")
    return {"argv": argv, "cwd": cwd, "exit_code": code}
