"""Shared helpers: a config in a temp dir, the CLI and the daemon as real subprocesses."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTAL_PYTHON = Path(os.environ.get("LAB_ATTENDANT_EXPERIMENTAL_PYTHON",
                                          ROOT / "venvs" / "experimental" / "bin" / "python"))


def wait_for(pred: Callable[[], object], timeout_s: float = 20.0, what: str = "condition"):
    """Poll `pred` until it is truthy. The pause after a check is as long as the check took, between
    50 ms and 0.5 s: a predicate that starts a CLI process (~0.7 s of CPU) must not take a core from
    the daemon under test on a 2-core CI machine, while a cheap one (a read-only SQLite query) must
    still catch a state that lasts under a second (a schedule's idle gap between two firings)."""
    deadline = time.monotonic() + timeout_s
    while True:
        started = time.monotonic()
        value = pred()
        if value:
            return value
        now = time.monotonic()
        if now >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(min(max(now - started, 0.05), 0.5))


@dataclass
class Lab:
    """One isolated lab-attendant installation: config, state and logs under a temp dir."""
    root: Path
    config: Path

    @property
    def state_dir(self) -> Path:
        return self.root / "var"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT)
        env.pop("LAB_ATTENDANT_CONFIG", None)
        for var in ("COLUMNS", "LINES"):   # pytest-xdist workers export 80 columns; views use PIPE_WIDTH
            env.pop(var, None)
        return env

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "lab_attendant.cli.main", "--config",
                               str(self.config), *args], capture_output=True, text=True,
                              env=self.env(), timeout=timeout, cwd=self.root)
        if check and proc.returncode != 0:
            raise AssertionError(f"lab-attendant {' '.join(args)} -> {proc.returncode}\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def submit(self, kind: str, *params: str, extra: tuple[str, ...] = ()) -> int:
        args = ["submit", kind, "--json", *extra]
        for p in params:
            args += ["-p", p]
        return json.loads(self.cli(*args).stdout)["id"]

    def show(self, run_id: int) -> dict:
        return json.loads(self.cli("show", str(run_id), "--json").stdout)

    def state(self, run_id: int) -> str:
        return self.show(run_id)["state"]

    def stored_state(self, run_id: int) -> str | None:
        """The run's state read straight from the store (read-only SQLite, no CLI process), for polling."""
        import sqlite3
        db = self.state_dir / "lab_attendant.sqlite3"
        if not db.exists():
            return None
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
                row = conn.execute("SELECT state FROM runs WHERE id = ?", (run_id,)).fetchone()
        except sqlite3.Error:
            return None
        return row[0] if row else None

    def wait_state(self, run_id: int, states: set[str], timeout_s: float = 30.0) -> dict:
        """`show --json` once the stored state is one of `states` (polled in the store, cheaply)."""
        deadline = time.monotonic() + timeout_s
        while True:
            stored = self.stored_state(run_id)       # None: a store elsewhere (a test's own state_dir)
            if stored is None or stored in states:
                run = self.show(run_id)
                if run["state"] in states:
                    return run
            if time.monotonic() >= deadline:
                run = self.show(run_id)
                if run["state"] in states:
                    return run
                raise AssertionError(f"timed out after {timeout_s} s waiting for run {run_id} to reach "
                                     f"{states}; it is {run['state']}: {run.get('reason')}")
            time.sleep(0.05 if stored is not None else 0.3)

    def start_daemon(self, *flags: str) -> subprocess.Popen:
        log = open(self.root / "daemon.out", "ab")
        return subprocess.Popen([sys.executable, "-m", "lab_attendant.cli.main", "--config",
                                 str(self.config), "daemon", *flags], stdout=log, stderr=log,
                                env=self.env(), cwd=self.root, start_new_session=True)

    def daemon_output(self) -> str:
        p = self.root / "daemon.out"
        return p.read_text() if p.exists() else ""


def write_config(root: Path, *, python: Path | str = sys.executable, heartbeat_s: float = 1.0,
                 extra: str = "", **limits: float) -> Path:
    lim = {"max_concurrent": 2, "default_timeout_s": 120, "kill_grace_s": 1.0,
           "shutdown_grace_s": 5.0, **limits}
    lim_toml = "\n".join(f"{k} = {v}" for k, v in lim.items())
    cfg = root / "lab-attendant.toml"
    cfg.write_text(f"""
[paths]
state_dir = "var"
logs_dir = "logs"
models_dir = "models"
allowed_roots = ["{root}"]

[worker]
python = "{python}"
extra_kinds = ["tests.fixtures.kinds"]
heartbeat_interval_s = {heartbeat_s}

[limits]
{lim_toml}

[daemon]
poll_interval_s = 0.1

[guards]
sensors = "none"
guard_interval_s = 0.2
{extra}
""")
    return cfg


@pytest.fixture
def lab(tmp_path: Path):
    lab = Lab(root=tmp_path, config=write_config(tmp_path))
    daemons: list[subprocess.Popen] = []
    orig = lab.start_daemon

    def start(*flags: str) -> subprocess.Popen:
        proc = orig(*flags)
        daemons.append(proc)
        return proc
    lab.start_daemon = start  # type: ignore[method-assign]
    yield lab
    for proc in daemons:  # never leave a daemon (or its workers) behind
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
    db = lab.state_dir / "lab_attendant.sqlite3"
    if db.exists():  # and no worker group either, whatever state the test left
        import sqlite3
        with sqlite3.connect(db) as conn:
            pids = [r[0] for r in conn.execute("SELECT pid FROM runs WHERE pid IS NOT NULL")]
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


MODEL_DIR = ROOT / "models" / "gemma-3-270m"  # the converted bf16 folder (model import-default --convert)
MODEL_GGUF = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"  # what the default model streams
NEEDS_MODEL = pytest.mark.skipif(not EXPERIMENTAL_PYTHON.exists() or not (MODEL_DIR / "config.json").exists()
                                 or not MODEL_GGUF.is_file(),
                                 reason="needs venvs/experimental, models/gemma-3-270m-q4_k_m.gguf and "
                                        "models/gemma-3-270m (scripts/test.sh: model import-default --convert)")


@pytest.fixture
def model_lab(lab: Lab) -> Lab:
    """The `lab` fixture with the experimental python as worker and the real models folder."""
    write_config(lab.root, python=EXPERIMENTAL_PYTHON, default_timeout_s=900)
    (lab.root / "models").symlink_to(ROOT / "models")
    return lab


@pytest.fixture
def resident_model_lab(model_lab: Lab) -> Lab:
    """model_lab whose default model is the same Gemma-3-270M held resident (its converted bf16 folder, no
    layer budget): for tests of a kind's pipeline, not of streaming, which model_lab's GGUF default covers
    (test_jobs' nightly_insights and demo tests). Streaming 16 of 18 GGUF layers per pass is what made the
    model e2e tests half of the supervisor suite's time on a 2-core CI machine."""
    write_config(model_lab.root, python=EXPERIMENTAL_PYTHON, default_timeout_s=900, extra=RESIDENT_DEFAULT)
    return model_lab


# The [models] table that makes the default model name mean the resident bf16 folder (resident_model_lab).
RESIDENT_DEFAULT = f'[models.gemma-3-270m]\npath = "{MODEL_DIR}"\n'


def write_sensors(path: Path, temperature_c: float, processes: dict[int, int] | None = None,
             **more: object) -> None:
    """One GPU's readings in a `file:` sensors file (written atomically); `more` adds fields such
    as power_w or sm_clock_mhz."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"gpus": [{
        "index": 0, "temperature_c": temperature_c, "memory_used_bytes": 1 << 30,
        "memory_total_bytes": 11811160064,
        "processes": [{"pid": p, "used_bytes": b} for p, b in (processes or {}).items()],
        **more}]}))
    os.replace(tmp, path)


def guard_lab(tmp_path: Path, guards: str = "", cotenant: str = "") -> Lab:
    """A lab whose guards read `tmp_path/sensors.json` (60 °C; limit 85, resume below 75)."""
    sensors = tmp_path / "sensors.json"
    write_sensors(sensors, 60.0)
    extra = (f'sensors = "file:{sensors}"\nthermal_limit_c = 85\nresume_below_c = 75\n'
             f"{guards}\n{cotenant}")
    cfg = write_config(tmp_path, extra=extra)
    # write_config wrote sensors = "none" first; the later key would be a TOML duplicate.
    cfg.write_text(cfg.read_text().replace('sensors = "none"\n', ""))
    return Lab(tmp_path, cfg)
