"""`lab-attendant venv` and `model`: the experimental venv, model folders, their memory plan and
quantized variants (the tools that need torch run in the experimental venv)."""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

from jobs.contract.spec import DEFAULT_BATCH_SIZE, DEFAULT_MODEL, DEFAULT_MODEL_FILE, KV_KINDS, VARIANT_MODES, ModelSpec
from jobs.contract.units import format_size, size_arg
from jobs.paging.plan.gguf_header import is_gguf
from lab_attendant import PROJECT_ROOT, ollama, venv
from lab_attendant.config import Config, read_registry, register_model
from lab_attendant.errors import UserError
from lab_attendant.plan import PROFILE_CHOICES, device_profile, is_model_path, model_shape, path_spec, plan_model
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
        argv = [str(_worker_python(cfg)), "-m", "jobs.paging.convert", "--gguf", str(models_dir / DEFAULT_MODEL_FILE)]
        if args.convert:
            argv += ["--convert", "--out", str(models_dir / DEFAULT_MODEL)]
        return _run_worker_tool(argv, "model conversion")
    if args.model_cmd == "plan":
        return cmd_model_plan(cfg, args)
    if args.model_cmd == "add":
        return cmd_model_add(cfg, args)
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
    registered = read_registry(cfg.paths.state_dir)
    if not models_dir.is_dir() and not registered:
        print(f"no models in {models_dir}; run `lab-attendant model import-default` or `lab-attendant model add`")
        return 0
    for d in sorted(p for p in models_dir.iterdir() if (p / "config.json").exists()) if models_dir.is_dir() else ():
        print(f"{d.name:<30} {format_size(_dir_size(d)):>10}  {d}")
    for name, model in registered.items():
        path = Path(model.path or "")
        size = _dir_size(path) if path.is_dir() else path.stat().st_size if path.is_file() else 0
        print(f"{name:<30} {format_size(size):>10}  {path}  (registered)")
    return 0


def cmd_model_plan(cfg: Config, args: argparse.Namespace) -> int:
    """The memory plan as a table (or --json); exit 2 when it does not fit."""
    path = Path(args.name)
    spec = path_spec(path) if is_model_path(path) else cfg.model_spec(args.name)
    overrides = {k: v for k, v in (("vram_budget_bytes", args.vram_budget), ("ram_budget_bytes", args.ram_budget),
                                   ("kv_cache", args.kv_cache), ("variant", args.variant)) if v is not None}
    spec = dataclasses.replace(spec, **overrides)
    name = args.device_profile or ("cpu" if spec.device == "cpu" else "auto")
    if (args.prompts is None) != (args.tokens is None):
        raise UserError("give --prompts N and --tokens T together: the job's size is both")
    plan = plan_model(spec, device_profile(name), batch=args.batch, context=args.context,
                      disk_bytes_per_s=args.disk_bandwidth, state_dir=cfg.kind_state_dir("probe"),
                      host_ram_bytes=args.host_ram,
                      job=(args.prompts, args.tokens) if args.prompts is not None else None)
    print(dumps(plan.to_json(), indent=2) if args.json else plan.table())
    if not plan.fits:
        print(f"error: model '{spec.name}' does not fit {plan.device}: {plan.reason}", file=sys.stderr)
        return 2
    return 0


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def cmd_model_add(cfg: Config, args: argparse.Namespace) -> int:
    """Register a GGUF file (or Ollama's blob of one) or a safetensors folder as [models.NAME] in
    state_dir/models.toml; nothing is written next to the weights."""
    if bool(args.path) == bool(args.ollama):
        raise UserError("give either PATH (a .gguf file or a model folder) or --ollama MODEL:TAG")
    path = ollama.find_blob(args.ollama) if args.ollama else Path(args.path).expanduser().resolve()
    if not (is_gguf(path) or _has_weights(path)):
        raise UserError(f"{path} is neither a GGUF file nor a folder with config.json and *.safetensors weights; "
                        "point at a .gguf file (any part of a split one) or a Hugging Face model folder")
    if args.name in cfg.models:
        raise UserError(f"the config file already has [models.{args.name}]; change its path there or pick "
                        "another name")
    shape = model_shape(ModelSpec(name=args.name, path=str(path)))   # refuses a file it cannot plan
    table: dict[str, str | int] = {"path": str(path), "kind": "moe" if shape.moe else "dense"}
    if args.device:
        table["device"] = args.device
    if args.disk_bandwidth:
        table["disk_bytes_per_s"] = args.disk_bandwidth
    registry = register_model(cfg.paths.state_dir, args.name, table)
    print(f"registered model '{args.name}' ({shape.weights_format}, {shape.model_type}, {table['kind']}): "
          f"{path} in {registry}; see `lab-attendant model plan {args.name}`")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("venv", help="the experimental venv workers run in")
    vsub = v.add_subparsers(dest="venv_cmd", required=True)
    vc = vsub.add_parser("create", help="create or update it from venvs/experimental.txt")
    vc.add_argument("--torch-spec", help=f"pip spec for torch (default ${venv.TORCH_SPEC_ENV} or "
                    f"{venv.DEFAULT_TORCH_SPEC}, the CUDA build matching the NVIDIA driver when NVML sees a GPU); "
                    "e.g. a build you already use, with its own --index-url")
    vc.add_argument("--force", action="store_true", help="reinstall even if up to date")
    vsub.add_parser("check", help="what it has: torch version, CUDA")
    v.set_defaults(fn=cmd_venv)

    m = sub.add_parser("model", help="model folders")
    msub = m.add_subparsers(dest="model_cmd", required=True)
    mi = msub.add_parser("import-default", help="place the bundled Gemma-3-270M GGUF under models/")
    mi.add_argument("--convert", action="store_true",
                    help="also write it as a bf16 safetensors folder (a resident reference for tests)")
    msub.add_parser("list", help="model folders with size on disk")
    mp = msub.add_parser("plan", help="what a model's run takes on the device and in pinned RAM, before any "
                                      "weight is read; exit 2 when it does not fit")
    mp.add_argument("name", help="a [models.NAME], a .gguf file (header only is read), or a model folder "
                    "(config.json alone is enough)")
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
    mp.add_argument("--host-ram", type=size_arg, help="host RAM free for the run and the page cache "
                    "(default: MemAvailable): past it, what a pass reads comes from disk")
    mp.add_argument("--prompts", type=_positive_int, help="with --tokens: how long a job of N prompts takes")
    mp.add_argument("--tokens", type=_positive_int, help="new tokens per prompt, for --prompts")
    mp.add_argument("--json", action="store_true", help="machine-readable: the plan as JSON")
    ma = msub.add_parser("add", help="register a .gguf file, Ollama's copy of a model or a safetensors folder "
                         "as [models.NAME] (in STATE_DIR/models.toml); nothing is written beside the weights")
    ma.add_argument("name", help="the [models.NAME] to register")
    ma.add_argument("path", nargs="?", help="a .gguf file (any part of a split one) or a model folder")
    ma.add_argument("--ollama", metavar="MODEL:TAG", help="the model Ollama pulled, e.g. gemma3:27b "
                    "(found under $OLLAMA_MODELS or ~/.ollama/models)")
    ma.add_argument("--device", help="where it runs: cpu, cuda, cuda:1 (default: cpu)")
    ma.add_argument("--disk-bandwidth", type=size_arg, help="read bytes/s of its disk, for the plan's disk bound")
    mq = msub.add_parser("quantize", help="write a 4-bit (HQQ) variant of a model beside its files "
                         "(MODEL/variants/q4g64); the original files are not changed")
    mq.add_argument("name", help=f"a [models.NAME] table or {DEFAULT_MODEL}")
    mq.add_argument("--bits", type=int, default=4, choices=(4, 8), help="bits per weight (default 4)")
    mq.add_argument("--group-size", type=int, default=64, help="weights per scale/zero pair (default 64)")
    mq.add_argument("--force", action="store_true", help="write it again even if it exists")
    mq.add_argument("--device", help="run HQQ there, e.g. cuda (a Mixtral matrix takes ~1 min on CPU)")
    m.set_defaults(fn=cmd_model)
