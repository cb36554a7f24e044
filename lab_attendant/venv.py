"""Create and check the experimental venv the workers run in (torch lives only there).

torch is installed first from a spec the user can override, so a CUDA build already chosen stays; without
one, the build that matches the NVIDIA driver NVML reports (a CUDA wheel index), else the default spec.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab_attendant import PROJECT_ROOT
from lab_attendant.errors import UserError

TORCH_SPEC_ENV = "LAB_ATTENDANT_TORCH_SPEC"
DEFAULT_TORCH_SPEC = "torch==2.13.0"
REQUIREMENTS = PROJECT_ROOT / "venvs" / "experimental.txt"
STAMP_NAME = ".lab-attendant-stamp"
TORCH_INDEX_URL = "https://download.pytorch.org/whl/{tag}"
# The CUDA builds of DEFAULT_TORCH_SPEC, newest first: (the CUDA version the driver must support, wheel tag).
# A driver supports every CUDA up to the one NVML reports, so the newest build it covers is taken.
TORCH_CUDA_BUILDS = (((13, 0), "cu130"), ((12, 8), "cu128"), ((12, 6), "cu126"))
FIX_CPU_TORCH = "lab-attendant venv create --force"


@dataclass(frozen=True)
class TorchInstall:
    """What `venv create` installs torch from: pip arguments, and why those."""
    args: tuple[str, ...]
    why: str

    @property
    def text(self) -> str:
        return " ".join(self.args)


def driver_cuda_version(nvml: Any = None) -> tuple[int, int] | None:
    """The newest CUDA the NVIDIA driver supports, as NVML reports it (12040 -> (12, 4)); None without an
    NVIDIA GPU, driver or pynvml. `nvml`: pynvml, or a fake in tests."""
    try:
        nv = nvml or importlib.import_module("pynvml")
        nv.nvmlInit()
        try:
            if nv.nvmlDeviceGetCount() < 1:
                return None
            version = int(nv.nvmlSystemGetCudaDriverVersion())
        finally:
            nv.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver, no GPU or no pynvml: no CUDA to match
        return None
    return version // 1000, version % 1000 // 10


def torch_install(torch_spec: str | None, driver_cuda: tuple[int, int] | None) -> TorchInstall:
    """The pip arguments for torch: the spec given (flag or $LAB_ATTENDANT_TORCH_SPEC; it may carry its own
    --index-url) wins; else, with an NVIDIA driver, the newest CUDA build it supports; else the default."""
    spec = torch_spec or os.environ.get(TORCH_SPEC_ENV)
    if spec:
        return TorchInstall(tuple(shlex.split(spec)), "the torch spec given")
    if driver_cuda is None:
        return TorchInstall((DEFAULT_TORCH_SPEC,), "no NVIDIA GPU seen by NVML")
    for needs, tag in TORCH_CUDA_BUILDS:
        if driver_cuda >= needs:
            return TorchInstall((DEFAULT_TORCH_SPEC, "--index-url", TORCH_INDEX_URL.format(tag=tag)),
                                f"the NVIDIA driver supports CUDA {driver_cuda[0]}.{driver_cuda[1]}: the {tag} build")
    oldest = TORCH_CUDA_BUILDS[-1][0]
    raise UserError(f"the NVIDIA driver supports CUDA {driver_cuda[0]}.{driver_cuda[1]} and {DEFAULT_TORCH_SPEC}'s "
                    f"CUDA builds need {oldest[0]}.{oldest[1]} or later: update the driver, or give "
                    "--torch-spec 'torch==VERSION --index-url https://download.pytorch.org/whl/cuXYZ' for a "
                    "build it supports")


def worker_torch_cuda(python: Path) -> str | None:
    """The CUDA version the worker venv's torch was built for ('12.8'), 'cpu' for a CPU build, None when
    it cannot be told (no torch there): read from torch/version.py, without starting that python."""
    venv_dir = Path(python).parent.parent
    for version_py in sorted(venv_dir.glob("lib/python3*/site-packages/torch/version.py")):
        try:
            text = version_py.read_text()
        except OSError:
            return None
        match = re.search(r"^cuda\b[^=]*=\s*(None|'([^']*)'|\"([^\"]*)\")", text, re.M)
        if match is None:
            return None
        return "cpu" if match.group(1) == "None" else (match.group(2) or match.group(3))
    return None



def venv_python(venv_dir: Path) -> Path:
    return venv_dir / "bin" / "python"


def _stamp(torch_spec: str) -> str:  # the whole pip argument text: a new index reinstalls
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


def create(venv_dir: Path, *, torch_spec: str | None, log_path: Path, force: bool = False,
           nvml: Any = None) -> dict:
    install = torch_install(torch_spec, driver_cuda_version(nvml))
    torch_spec = install.text
    stamp_path = venv_dir / STAMP_NAME
    py = venv_python(venv_dir)
    if (not force and py.exists() and stamp_path.exists()
            and stamp_path.read_text().strip() == _stamp(torch_spec)):
        print(f"experimental venv {venv_dir} is up to date (torch spec {torch_spec!r})",
              file=sys.stderr)
        return check(venv_dir, nvml=nvml)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
    if not py.exists():
        _step(1, 4, f"creating venv {venv_dir}", [sys.executable, "-m", "venv", str(venv_dir)],
              log_path)
    else:
        print(f"[1/4] venv {venv_dir} exists", file=sys.stderr)
    _step(2, 4, f"installing {torch_spec} ({install.why})", [*pip, *install.args], log_path)
    _step(3, 4, f"installing {REQUIREMENTS.name}", [*pip, "-r", str(REQUIREMENTS)], log_path)
    print("[4/4] checking", file=sys.stderr)
    info = check(venv_dir, nvml=nvml)
    stamp_path.write_text(_stamp(torch_spec) + "\n")
    return info


def check(venv_dir: Path, *, nvml: Any = None) -> dict:
    """What the venv has (jobs.venv_check's JSON), plus `warning` when an NVIDIA GPU is here and its torch
    is a CPU build (the workers would refuse device = "cuda")."""
    py = venv_python(venv_dir)
    if not py.exists():
        raise UserError(f"no experimental venv at {venv_dir}; run `lab-attendant venv create`")
    proc = subprocess.run([str(py), "-m", "jobs.venv_check"], capture_output=True, text=True,
                          cwd=PROJECT_ROOT)
    if proc.returncode != 0:
        raise UserError(f"the experimental venv's python failed: {proc.stderr.strip()[-500:]}")
    info = json.loads(proc.stdout)
    driver = driver_cuda_version(nvml)
    info["driver_cuda"] = None if driver is None else f"{driver[0]}.{driver[1]}"
    if driver is not None and info.get("torch") and info.get("torch_cuda") is None:
        info["warning"] = (f"NVIDIA GPU present, CPU torch in the worker venv ({info['torch']}): run "
                           f"`{FIX_CPU_TORCH}` to install the CUDA build for the driver's CUDA {info['driver_cuda']}")
    return info
