"""`lab-attendant venv` and `model`: the experimental venv, model folders, their memory plan and
quantized variants (the tools that need torch run in the experimental venv)."""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

from jobs.contract.spec import DEFAULT_BATCH_SIZE, DEFAULT_MODEL, KV_KINDS, VARIANT_MODES
from jobs.contract.units import format_size, size_arg
from lab_attendant import PROJECT_ROOT, venv
from lab_attendant.config import Config
from lab_attendant.errors import UserError
from lab_attendant.plan import PROFILE_CHOICES, device_profile, folder_spec, plan_model
from lab_attendant.validate import dumps


def _venv_dir(cfg: Config) -> Path:
    return Path(cfg.worker.python).parent.parent


def cmd_venv(cfg: Config, args: argparse.Namespace) -> int:
    if args.venv_cmd == "create":
        info = venv.create(_venv_dir(cfg), torch_spec=args.torch_spec, force=args.force,
                           log_path=cfg.paths.logs_dir / "venv-create.log")
    else:
        info = venv.check(_venv_dir(cfg))
    print(dumps(info, indent=2))
    if info.get("warning"):  # a warning, not a failure: CPU runs still work (exit 0)
        print(f"lab-attendant: {info['warning']}", file=sys.stderr)
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def add_parsers(sub, parser_class: type[argparse.ArgumentParser]) -> None:
    v = sub.add_parser("venv", help="the experimental venv workers run in")
    vsub = v.add_subparsers(dest="venv_cmd", required=True, parser_class=parser_class)
    vc = vsub.add_parser("create", help="create or update it from venvs/experimental.txt")
    vc.add_argument("--torch-spec", help=f"pip spec for torch (default ${venv.TORCH_SPEC_ENV} or "
                    f"{venv.DEFAULT_TORCH_SPEC}, the CUDA build matching the NVIDIA driver when NVML sees a GPU); "
                    "e.g. a build you already use, with its own --index-url")
    vc.add_argument("--force", action="store_true", help="reinstall even if up to date")
    vsub.add_parser("check", help="what it has: torch version, CUDA")
    v.set_defaults(fn=cmd_venv)

    m = sub.add_parser("model", help="model folders")
    msub = m.add_subparsers(dest="model_cmd", required=True, parser_class=parser_class)
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
