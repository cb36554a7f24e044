"""A claimed run as the RunSpec its worker reads (jobs.contract.spec): the kind's entry point, the model's
settings, folders and roots from the config; why a run cannot start is a ConfigError sentence."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs.contract.kinds import Kind
from jobs.contract.spec import SPEC_VERSION, RunSpec
from lab_attendant.config import Config
from lab_attendant.errors import ConfigError


def build_spec(cfg: Config, kinds: dict[str, Kind], run: Any, python: str | Path, *,
               python_is_here: bool = True) -> RunSpec:
    """The run's spec; `python_is_here`: the worker runs on this machine, so its interpreter
    must exist here."""
    kind = kinds.get(run.kind)
    if kind is None:
        raise ConfigError(f"unknown kind '{run.kind}' (not in this daemon's registry)")
    if python_is_here and not Path(python).exists():
        raise ConfigError(f"worker python {python} not found; run `lab-attendant venv create` or "
                          "set [worker] python in the config")
    model = (cfg.model_spec(run.params.get("model"))              # ConfigError: an unknown name
             if any(p.name == "model" for p in kind.params) else None)
    run_dir = cfg.runs_dir / str(run.id)
    return RunSpec(
        version=SPEC_VERSION, run_id=run.id, kind=run.kind, module=kind.module,
        function=kind.function, params=run.params, needs_paging=run.needs_paging,
        run_dir=str(run_dir), output_dir=str(run_dir / "output"),
        state_dir=str(cfg.kind_state_dir(run.kind)), models_dir=str(cfg.paths.models_dir),
        logs_dir=str(cfg.paths.logs_dir), heartbeat_interval_s=cfg.worker.heartbeat_interval_s,
        model=model, allowed_roots=tuple(str(r.resolve()) for r in cfg.allowed_roots))
