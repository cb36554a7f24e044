"""Create and check the experimental venv the workers run in (torch lives only there).

torch is installed first from a spec the user can override, so a CUDA build already chosen stays.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lab_attendant import PROJECT_ROOT
from lab_attendant.errors import UserError

TORCH_SPEC_ENV = "LAB_ATTENDANT_TORCH_SPEC"
DEFAULT_TORCH_SPEC = "torch==2.13.0"
REQUIREMENTS = PROJECT_ROOT / "venvs" / "experimental.txt"
STAMP_NAME = ".lab-attendant-stamp"



def venv_python(venv_dir: Path) -> Path:
    return venv_dir / "bin" / "python"


def _stamp(torch_spec: str) -> str:
    return hashlib.sha256((torch_spec + "\n").encode() + REQUIREMENTS.read_bytes()).hexdigest()


def _step(n: int, total: int, text: str, argv: list[str], log_path: Path) -> None:
    """Run one install step, its output to log_path, with a one-line live status on stderr."""
    print(f"[{n}/{total}] {text} ...", file=sys.stderr, flush=True)
    start = time.monotonic()
    with open(log_path, "ab") as log_fh:
        log_fh.write(f"\n$ {' '.join(argv)}\n".encode())
        log_fh.flush()
        # hqq's sdist runs its optional CUDA-extension build from egg_info unless told not to; its
        # pure-torch path is the one we use, so the install stays quick and the same everywhere.
        env = {**os.environ, "DISABLE_CUDA": "1"}
        proc = subprocess.Popen(argv, stdout=log_fh, stderr=subprocess.STDOUT, env=env)
        spinner = "|/-\\"
        i = 0
        while proc.poll() is None:
            if sys.stderr.isatty():
                print(f"\r  {spinner[i % 4]} {time.monotonic() - start:5.0f} s", end="",
                      file=sys.stderr, flush=True)
            i += 1
            time.sleep(0.5)
    if sys.stderr.isatty():
        print("\r", end="", file=sys.stderr)
    if proc.returncode != 0:
        raise UserError(f"step '{text}' failed (exit {proc.returncode}); see {log_path}")
    print(f"  done in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)


def create(venv_dir: Path, *, torch_spec: str | None, log_path: Path, force: bool = False) -> dict:
    torch_spec = torch_spec or os.environ.get(TORCH_SPEC_ENV) or DEFAULT_TORCH_SPEC
    stamp_path = venv_dir / STAMP_NAME
    py = venv_python(venv_dir)
    if (not force and py.exists() and stamp_path.exists()
            and stamp_path.read_text().strip() == _stamp(torch_spec)):
        print(f"experimental venv {venv_dir} is up to date (torch spec {torch_spec!r})",
              file=sys.stderr)
        return check(venv_dir)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
    if not py.exists():
        _step(1, 4, f"creating venv {venv_dir}", [sys.executable, "-m", "venv", str(venv_dir)],
              log_path)
    else:
        print(f"[1/4] venv {venv_dir} exists", file=sys.stderr)
    _step(2, 4, f"installing {torch_spec}", [*pip, torch_spec], log_path)
    _step(3, 4, f"installing {REQUIREMENTS.name}", [*pip, "-r", str(REQUIREMENTS)], log_path)
    print("[4/4] checking", file=sys.stderr)
    info = check(venv_dir)
    stamp_path.write_text(_stamp(torch_spec) + "\n")
    return info


def check(venv_dir: Path) -> dict:
    py = venv_python(venv_dir)
    if not py.exists():
        raise UserError(f"no experimental venv at {venv_dir}; run `lab-attendant venv create`")
    proc = subprocess.run([str(py), "-m", "jobs.venv_check"], capture_output=True, text=True,
                          cwd=PROJECT_ROOT)
    if proc.returncode != 0:
        raise UserError(f"the experimental venv's python failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)
