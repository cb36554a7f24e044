"""The `command` kind's contract (stdlib only): its argv checked and its program resolved at submit, and
the environment allow-list the program runs with.

The program runs as the user and may open anything the user can; what is confined is its working folder
(the `cwd` param, under the allowed roots), not the files it chooses to read.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from jobs.contract.errors import ParamError

MAX_ARGS = 1024
MAX_ARG_CHARS = 32 * 1024

# What the program inherits from the daemon's environment; everything else is dropped (secrets in the
# daemon's environment, LD_PRELOAD, PYTHONPATH pointing into this checkout). Documented in README.
ENV_ALLOWED = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
               "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES",
               "PYTORCH_CUDA_ALLOC_CONF", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
               "OMP_NUM_THREADS", "MKL_NUM_THREADS", "SLURM_JOB_ID")
ENV_ALLOWED_PREFIXES = ("LC_",)


def child_env(environ: Mapping[str, str], *, run_id: int, output_dir: str) -> dict[str, str]:
    """The allow-listed part of `environ`, plus the run's id and output folder."""
    env = {k: v for k, v in environ.items()
           if k in ENV_ALLOWED or k.startswith(ENV_ALLOWED_PREFIXES)}
    env.setdefault("PATH", os.defpath)
    env["LAB_ATTENDANT_RUN_ID"] = str(run_id)
    env["LAB_ATTENDANT_OUTPUT_DIR"] = output_dir
    return env


def parse_argv(value: Any) -> list[str]:
    """A non-empty list of strings (or its JSON text, as `-p argv=[...]` gives it); ParamError otherwise."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ParamError("param 'argv' must be a JSON list of strings like [\"echo\", \"hi\"]; "
                             "or write the command after `--`: submit command -- echo hi") from None
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise ParamError("param 'argv' must be a non-empty list of strings: submit command -- PROGRAM ARGS…")
    if len(value) > MAX_ARGS:
        raise ParamError(f"param 'argv' has {len(value)} arguments; at most {MAX_ARGS} are accepted")
    for arg in value:
        if "\0" in arg:
            raise ParamError("param 'argv': an argument holds a NUL character, which no program can receive")
        if len(arg) > MAX_ARG_CHARS:
            raise ParamError(f"param 'argv': an argument is {len(arg)} characters long; at most "
                             f"{MAX_ARG_CHARS} are accepted (pass a file instead)")
    return list(value)


def resolve_program(argv: list[str], base_dir: Path | None, must_exist: bool) -> list[str]:
    """argv with its program made absolute now, from the submitter's PATH or folder, so the daemon runs
    the program the user meant whatever its own PATH; ParamError if there is none."""
    prog = argv[0]
    if not must_exist:
        return argv
    if "/" in prog:
        path = Path(os.path.expanduser(prog))
        path = (base_dir / path if base_dir is not None else path).absolute()
    else:
        found = shutil.which(prog)
        if found is None:
            raise ParamError(f"command '{prog}' is not on your PATH; give its full path")
        path = Path(found).absolute()
    if not path.is_file() or not os.access(path, os.X_OK):
        raise ParamError(f"command {path} is not an executable file; check the path, or `chmod +x` it")
    return [str(path), *argv[1:]]
