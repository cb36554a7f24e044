"""Expert-paging benchmark: hit rate vs cache size, prefetch accuracy, tok/s against baselines.

Not a test: prints a table, writes bench/results/moe_<host>_<date>.json, never asserts timings.

  python bench/moe_bench.py                                   # CPU, tiny + small random models
  python bench/moe_bench.py --device cuda --mixtral-8x7b-shape --layers 4   # on a GPU box
  python bench/moe_bench.py --variant both                    # + 4-bit (HQQ q4g64) expert rows
  python bench/moe_bench.py --device cuda --mixtral-8x7b-shape --layers 4 --variant fast
  python bench/moe_bench.py --family all --configs tiny,small  # DeepSeek-V2, Qwen3/Qwen2-MoE, OLMoE

--variant fast writes the folder's q4g64 variant first, with HQQ running on --device: one
14336x4096 weight took ~85 s on the shared 2-core CPU host, so a 4-layer Mixtral-shape variant
(96 expert and 16 attention matrices) is hours on CPU and seconds to minutes on a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

from jobs.contract.units import format_size  # noqa: E402
from jobs.paging.dtypes import torch_dtype  # noqa: E402
from jobs.paging.moe.families import find_experts, layout_of  # noqa: E402
from jobs.paging.moe.load import load_paged_moe  # noqa: E402
from jobs.paging.moe.store import expert_nbytes  # noqa: E402
from jobs.paging.open import spec_for  # noqa: E402
from jobs.paging.quant import QuantSpec, write_variant  # noqa: E402

CONFIGS = {  # random weights: routing is near uniform, so hit rates are a floor for real models
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_local_experts=8,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
    "small": dict(hidden_size=256, intermediate_size=896, num_hidden_layers=8, num_local_experts=8,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=2048),
    "mixtral-8x7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_local_experts=8, num_attention_heads=32, num_key_value_heads=8,
                         vocab_size=32000),
}
# --family: the released models' expert counts and top-k, scaled down (hidden, layers, expert width);
# DeepSeek keeps its dense first layer and shared experts, Qwen2-MoE its gated shared expert.
_LITE = dict(n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1,
             q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
FAMILY_SHAPES = {
    "deepseek_v2": {**_LITE, "topk_method": "greedy", "n_group": 1, "topk_group": 1},
    # DeepSeek-V2 (236B)'s group-limited routing at the Lite's 64 experts: 8 groups, top-6 within the best 3
    "deepseek_v2_grouped": {**_LITE, "model_type": "deepseek_v2", "topk_method": "group_limited_greedy",
                            "n_group": 8, "topk_group": 3},
    "qwen3_moe": dict(num_experts=128, num_experts_per_tok=8, norm_topk_prob=True),
    "qwen2_moe": dict(num_experts=60, num_experts_per_tok=4),
    "olmoe": dict(num_experts=64, num_experts_per_tok=8),
}
FAMILY_SIZES = {  # (hidden, layers, expert intermediate, dense/shared intermediate, vocab)
    "tiny": (64, 4, 32, 128, 512),
    "small": (256, 6, 128, 512, 2048),
}
CACHE_FRACTIONS = (0.125, 0.25, 0.5, 0.75, 1.0)
CARD_BYTES = 11 * 1024**3          # the 2080 Ti the seed targets
CARD_HEADROOM_BYTES = 3 * 1024**3 // 2  # CUDA context, activations, KV cache
FAST_SPEC = QuantSpec(4, 64)  # what `lab-attendant model quantize NAME --bits 4` writes


def write_random_model(folder: Path, shape: dict, dtype: torch.dtype, seed: int = 0) -> Path:
    """A Mixtral folder in the released per-expert layout, one shard per layer so RAM holds
    one layer at a time (Mixtral-8x7B shape: ~2.8 GB bf16 per layer)."""
    config = MixtralConfig(**shape, num_experts_per_tok=2, max_position_embeddings=4096,
                           initializer_range=0.1 if shape["hidden_size"] < 1024 else 0.02)
    config.save_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)
    std = config.initializer_range

    def rand(*size):
        return (torch.randn(*size, generator=gen) * std).to(dtype)

    h, i, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads
    head_dim = h // config.num_attention_heads
    weight_map = {}
    shards = {"model-dense.safetensors": {
        "model.embed_tokens.weight": rand(config.vocab_size, h), "lm_head.weight":
        rand(config.vocab_size, h), "model.norm.weight": torch.ones(h, dtype=dtype)}}
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        shard = {p + "input_layernorm.weight": torch.ones(h, dtype=dtype),
                 p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype),
                 p + "self_attn.q_proj.weight": rand(h, h),
                 p + "self_attn.k_proj.weight": rand(kv * head_dim, h),
                 p + "self_attn.v_proj.weight": rand(kv * head_dim, h),
                 p + "self_attn.o_proj.weight": rand(h, h),
                 p + "block_sparse_moe.gate.weight": rand(config.num_local_experts, h)}
        for e in range(config.num_local_experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            shard.update({q + "w1.weight": rand(i, h), q + "w3.weight": rand(i, h),
                          q + "w2.weight": rand(h, i)})
        shards[f"model-layer{layer:03d}.safetensors"] = shard
    for name, shard in shards.items():
        save_file(shard, str(folder / name))
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def copy_bandwidth_bytes_per_s(n_bytes: int, device: torch.device, repeats: int = 30) -> float:
    """Host->device bandwidth for expert-sized copies (memcpy when the device is the CPU); the
    fastest of `repeats`, because a shared machine's noise only ever makes a copy slower."""
    pin = device.type == "cuda"
    src = torch.ones(n_bytes // 4, dtype=torch.float32, pin_memory=pin)
    dst = torch.zeros(n_bytes // 4, dtype=torch.float32, device=device)
    best_s = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=pin)
        _sync(device)
        best_s = min(best_s, time.perf_counter() - t0)
    return src.numel() * 4 / best_s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(model, ids: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    """Generated tokens per second (all rows), greedy, prefill included."""
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    _sync(device)
    return ids.shape[0] * new_tokens / (time.perf_counter() - t0)


def paged_row(folder, config, *, device, dtype, cache_bytes, policy, batch, new_tokens,
              bandwidth, label, repeats, **flags) -> dict:
    """Best of `repeats` fresh loads (routing and so the counters are the same each time; only
    the shared host's noise differs)."""
    ids = torch.randint(3, config.vocab_size, (batch, 16), generator=torch.Generator()
                        .manual_seed(1)).to(device)
    tok_s, s = 0.0, None
    spec = spec_for(folder, device=device, dtype=dtype, expert_cache_bytes=cache_bytes, cache_policy=policy,
                    variant=flags.pop("variant", "precise"))
    for _ in range(repeats):
        paged = load_paged_moe(spec, **flags)
        run_tok_s = timed_generate(paged.model, ids, new_tokens, torch.device(device))
        if run_tok_s > tok_s:
            tok_s, s = run_tok_s, paged.stats()
        moe_layers = paged.store.num_layers  # a dense layer mixed in pages nothing
        paged.close()
    tokens = batch * new_tokens
    # The physical bound: what crossed the host->device link per token, at the measured
    # bandwidth. At batch-1 decode without prefetch that is layers x top_k x (1 - hit rate) x
    # expert bytes; prefetch copies count too, since they use the same link.
    bytes_per_token = s["bytes_h2d"] / tokens
    formula_bytes = (moe_layers * config.num_experts_per_tok
                     * (1 - s["hit_rate_without_prefetch"]) * s["expert_bytes"])
    copy_bound = bandwidth / bytes_per_token if bytes_per_token else None
    return {"label": label, "variant": s["expert_variant"], "expert_bytes": s["expert_bytes"],
            "policy": policy, "batch": batch, "cache_experts": s["capacity_experts"],
            "cache_bytes": s["allocated_bytes"], "hit_rate": round(s["hit_rate"], 4),
            "hit_rate_without_prefetch": round(s["hit_rate_without_prefetch"], 4),
            "prefetch_accuracy": round(s["prefetch_accuracy"], 4),
            "prefetch_hits": s["prefetch_hits"], "prefetches": s["prefetches"],
            "evictions": s["evictions"], "bytes_h2d_per_token": bytes_per_token,
            "formula_bytes_per_token_batch1": formula_bytes, "stall_s": round(s["stall_s"], 4),
            "tok_s": round(tok_s, 2),
            "copy_bound_tok_s": round(copy_bound, 2) if copy_bound else None,
            "achieved_vs_bound": round(tok_s / copy_bound, 4) if copy_bound else None,
            "cpu_execs": s["cpu_execs"],
            "prefetch_accuracy_by_layer": {layer: round(c["prefetch_guess_hits"] / c["prefetch_guesses"], 4)
                                           for layer, c in s["per_layer"].items() if c["prefetch_guesses"]}}


def best_tok_s(model, ids, new_tokens, device, repeats: int) -> float:
    return round(max(timed_generate(model, ids, new_tokens, device) for _ in range(repeats)), 2)


def baseline_rows(folder, config, *, device, dtype, batch, new_tokens, offload_dir,
                  repeats) -> list:
    ids = torch.randint(3, config.vocab_size, (batch, 16), generator=torch.Generator()
                        .manual_seed(1)).to(device)
    resident = MixtralForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    rows = [{"label": "resident (transformers)", "batch": batch,
             "tok_s": best_tok_s(resident, ids, new_tokens, device, repeats)}]
    del resident
    # accelerate's answer to the same problem: every layer's experts module offloaded to disk
    # (memory-mapped, so after one pass it is page cache), everything else resident.
    device_map = {"model.embed_tokens": str(device), "model.norm": str(device),
                  "model.rotary_emb": str(device), "lm_head": str(device)}
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        device_map.update({p + n: str(device) for n in (
            "self_attn", "input_layernorm", "post_attention_layernorm", "mlp.gate")})
        device_map[p + "mlp.experts"] = "disk"
    offloaded = MixtralForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device_map,
                                                   offload_folder=offload_dir).eval()
    rows.append({"label": "accelerate disk offload of experts", "batch": batch,
                 "tok_s": best_tok_s(offloaded, ids, new_tokens, device, repeats)})
    return rows


def run_config(name: str, shape: dict, args, out_rows: list) -> None:
    device, dtype = torch.device(args.device), torch_dtype(args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_random_model(Path(tmp) / name, shape, dtype)
        config = MixtralConfig.from_pretrained(folder)
        expert_bytes = expert_nbytes(config, dtype)
        all_experts = config.num_hidden_layers * config.num_local_experts
        bandwidth = copy_bandwidth_bytes_per_s(expert_bytes, device)
        common = dict(device=args.device, dtype=args.dtype, bandwidth=bandwidth,
                      repeats=args.repeats)
        variants = ("precise", "fast") if args.variant == "both" else (args.variant,)
        if "fast" in variants:
            t0 = time.perf_counter()
            write_variant(folder, FAST_SPEC, device=device)
            print(f"{name}: wrote the {FAST_SPEC.name} variant in {time.perf_counter() - t0:.1f} s "
                  f"on {device}")
        rows = []
        if args.mixtral_8x7b_shape:
            # What an 11 GB card leaves for experts in the full 32-layer model, per layer, times
            # the layers built here.
            # embeddings + lm_head, and q/k/v/o of 32 layers, in bf16 (norms and routers: noise)
            dense_bytes = 2 * 32000 * 4096 * 2 + 32 * 4096 * (2 * 4096 + 2 * 1024) * 2
            per_layer = (CARD_BYTES - CARD_HEADROOM_BYTES - dense_bytes) / 32
            budget = max(expert_bytes, int(per_layer * config.num_hidden_layers))
            for variant in variants:
                # CPU execution of a 4-bit miss dequantizes on the host (~0.75 s per 14336x4096
                # matrix on the CPU host): never a win at this size, so not measured for fast.
                for batch in (1, 8):
                    for cpu_exec in ((False, True) if variant == "precise" else (False,)):
                        rows.append(paged_row(folder, config, cache_bytes=budget, policy="lru",
                                              batch=batch, new_tokens=args.new_tokens,
                                              label="paged 11GB-card budget"
                                              + (" + cpu exec" if cpu_exec else ""),
                                              cpu_miss_exec=cpu_exec, variant=variant,
                                              **common))
        elif "precise" in variants:
            # The policy curve without prefetch, so LRU vs LFU is not blurred by look-ahead.
            for frac in CACHE_FRACTIONS:
                for policy in ("lru", "lfu"):
                    rows.append(paged_row(folder, config, policy=policy, batch=1,
                                          cache_bytes=max(1, round(frac * all_experts)) * expert_bytes,
                                          new_tokens=args.new_tokens, label="paged, no prefetch",
                                          prefetch=False, **common))
            quarter = max(1, all_experts // 4) * expert_bytes
            for batch in (1, 8):
                rows += baseline_rows(folder, config, device=device, dtype=dtype, batch=batch,
                                      new_tokens=args.new_tokens, offload_dir=Path(tmp) / "off",
                                      repeats=args.repeats)
                for label, flags in (("paged 25%, no prefetch", {"prefetch": False}),
                                     ("paged 25% + prefetch", {}),
                                     ("paged 25% + prefetch + cpu exec", {"cpu_miss_exec": True})):
                    rows.append(paged_row(folder, config, policy="lru", batch=batch,
                                          cache_bytes=quarter, new_tokens=args.new_tokens,
                                          label=label, **flags, **common))
        if "fast" in variants and not args.mixtral_8x7b_shape:
            # The same bytes as the precise 25 % rows (4-bit experts fit 3.5-7x as many), and the
            # same number of experts (same hit rate: what 4-bit copies and dequantizing cost).
            quarter = max(1, all_experts // 4) * expert_bytes
            h, i = config.hidden_size, config.intermediate_size
            fast_bytes = 2 * FAST_SPEC.nbytes((i, h)) + FAST_SPEC.nbytes((h, i))
            for batch in (1, 8):
                rows.append(paged_row(folder, config, policy="lru", batch=batch,
                                      cache_bytes=max(1, all_experts // 4) * fast_bytes,
                                      new_tokens=args.new_tokens, label="paged 25% experts, no prefetch",
                                      variant="fast", prefetch=False, **common))
                for label, flags in (("paged 25% bytes, no prefetch", {"prefetch": False}),
                                     ("paged 25% bytes + prefetch", {}),
                                     ("paged 25% bytes + prefetch + cpu exec", {"cpu_miss_exec": True})):
                    rows.append(paged_row(folder, config, policy="lru", batch=batch,
                                          cache_bytes=quarter, new_tokens=args.new_tokens,
                                          label=label, variant="fast", **flags, **common))
        for row in rows:
            row.setdefault("expert_bytes", expert_bytes)
            row.update(config=name, copy_bandwidth_gb_s=bandwidth / 1e9)
        out_rows += rows
        print_table(name, rows, expert_bytes, bandwidth)


def write_family_model(folder: Path, family: str, size: str, seed: int = 0) -> tuple[Path, object]:
    """A random model of `family` at `size`, written by transformers' own save_pretrained."""
    hidden, layers, inter, dense, vocab = FAMILY_SIZES[size]
    extra = dict(FAMILY_SHAPES[family])
    family = extra.pop("model_type", family)
    if family == "deepseek_v2":
        extra.update(kv_lora_rank=hidden // 2, num_key_value_heads=4)
    if family in ("deepseek_v2", "qwen3_moe", "qwen2_moe"):
        extra["moe_intermediate_size"] = inter
    if family == "qwen2_moe":
        extra["shared_expert_intermediate_size"] = dense
    config = AutoConfig.for_model(family, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                  num_key_value_heads=extra.pop("num_key_value_heads", 2), vocab_size=vocab,
                                  intermediate_size=inter if family == "olmoe" else dense,
                                  max_position_embeddings=4096, initializer_range=0.1, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **extra)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder, config


def run_family(family: str, size: str, args, out_rows: list) -> None:
    """Hit rate vs cache size (LRU and LFU, no prefetch), then look-ahead prefetch and CPU execution of
    misses at a quarter of the experts, against transformers resident: batch 1."""
    device, dtype = torch.device(args.device), torch_dtype(args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        folder, config = write_family_model(Path(tmp) / family, family, size)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config)
        layout = layout_of(meta, find_experts(meta))
        expert_bytes = layout.expert_numel * dtype.itemsize
        all_experts = layout.num_layers * layout.num_experts
        bandwidth = copy_bandwidth_bytes_per_s(expert_bytes, device)
        common = dict(device=args.device, dtype=args.dtype, bandwidth=bandwidth, repeats=args.repeats,
                      new_tokens=args.new_tokens, batch=1)
        rows = []
        for frac in CACHE_FRACTIONS:
            for policy in ("lru", "lfu"):
                rows.append(paged_row(folder, config, policy=policy, label="paged, no prefetch", prefetch=False,
                                      cache_bytes=max(1, round(frac * all_experts)) * expert_bytes, **common))
        ids = torch.randint(3, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1)).to(device)
        resident = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        rows.append({"label": "resident (transformers)", "batch": 1,
                     "tok_s": best_tok_s(resident, ids, args.new_tokens, device, args.repeats)})
        del resident
        for label, flags in (("paged 25% + prefetch", {}), ("paged 25% + prefetch + cpu exec", {"cpu_miss_exec": True})):
            rows.append(paged_row(folder, config, policy="lru", cache_bytes=max(1, all_experts // 4) * expert_bytes,
                                  label=label, **flags, **common))
        name = f"{family}-{size}"
        for row in rows:
            row.setdefault("expert_bytes", expert_bytes)
            row.update(config=name, family=family, moe_layers=list(layout.layers), experts=layout.num_experts,
                       top_k=layout.experts_per_token, copy_bandwidth_gb_s=bandwidth / 1e9)
        out_rows += rows
        print_table(f"{name}: {layout.num_layers} MoE layers {list(layout.layers)} of {config.num_hidden_layers} x "
                    f"{layout.num_experts} experts, top-{layout.experts_per_token}", rows, expert_bytes, bandwidth)


def print_table(name: str, rows: list, expert_bytes: int, bandwidth: float) -> None:
    print(f"\n## {name}: precise expert {format_size(expert_bytes)}, copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s")
    cols = ("label", "variant", "policy", "batch", "cache_experts", "hit_rate",
            "hit_rate_without_prefetch", "prefetch_accuracy", "bytes_h2d_per_token",
            "formula_bytes_per_token_batch1", "stall_s", "tok_s", "copy_bound_tok_s",
            "achieved_vs_bound")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        cells = []
        for c in cols:
            v = row.get(c, "")
            cells.append(format_size(v) if "per_token" in c and v != "" else str(v))
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="fp32 on CPU, bf16 on CUDA by default")
    parser.add_argument("--configs", default="tiny,small", help="comma list of " + ",".join(CONFIGS))
    parser.add_argument("--family", default=None, help="a non-Mixtral family instead (" + ",".join(FAMILY_SHAPES)
                        + ", or all), at the --configs sizes " + ",".join(FAMILY_SIZES))
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--mixtral-8x7b-shape", action="store_true",
                        help="random bf16 weights of Mixtral-8x7B shape, 11 GB-card cache budget")
    parser.add_argument("--layers", type=int, default=4, help="layers built in 8x7b mode")
    parser.add_argument("--variant", default="precise", choices=("precise", "fast", "both"),
                        help="expert format: precise (--dtype), fast (HQQ q4g64), or both")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timings keep the best of these (default 3; 1 in 8x7b mode)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: stable figures on a shared 2-core host)")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (1 if args.mixtral_8x7b_shape else 3)
    info = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    rows: list = []
    if args.family:
        for family in (["deepseek_v2", "qwen3_moe", "qwen2_moe", "olmoe"] if args.family == "all"
                       else args.family.split(",")):
            for size in args.configs.split(","):
                run_family(family, size, args, rows)
    elif args.mixtral_8x7b_shape:
        shape = {**CONFIGS["mixtral-8x7b"], "num_hidden_layers": args.layers}
        run_config(f"mixtral-8x7b-shape-{args.layers}L", shape, args, rows)
    else:
        for name in args.configs.split(","):
            run_config(name, CONFIGS[name], args, rows)
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(exist_ok=True)
    suffix = "" if args.variant == "precise" else f"_{args.variant}"  # precise runs keep their name
    suffix += ("_families" if args.family == "all" else f"_{args.family.replace(',', '_')}") if args.family else ""
    path = out_dir / f"moe_{info['hostname']}_{datetime.date.today().isoformat()}{suffix}.json"
    path.write_text(json.dumps({"machine": info, "args": vars(args), "rows": rows}, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
