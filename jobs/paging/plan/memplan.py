"""The memory plan: every byte a model run takes on the device and in pinned host RAM, computed from
config.json (and safetensors headers when the folder has them) before any weight is read (stdlib only:
the supervisor's `model plan` and `submit` use it, and so does the engine at load).

Device: CUDA context, embeddings/lm_head/norms, resident decoder layers, streaming slots (or, for MoE,
every non-expert weight and the expert cache), KV cache by layer type and KV kind, prefill activations for
the attention implementation used, dequantizing temporaries of fast layers, and a fragmentation margin.
Host: pinned bytes exactly as the engine pins them (one arena per use, no power-of-two rounding), the RAM
cache and the expert store, against the host's available memory.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from jobs.contract.errors import BudgetError
from jobs.contract.units import format_duration, format_size
from jobs.paging.plan.expert_budget import STAGING_SLOTS, default_ram_budget_bytes, expert_host_plan
from jobs.paging.plan.profiles import DeviceProfile
from jobs.paging.plan.shape import DTYPE_BYTES, ModelShape

GiB = 1024**3
MiB = 1024**2
MARGIN_FRACTION = 0.05          # fragmentation: the caching allocator serves ~5 % more than is live
MARGIN_MIN_BYTES = 256 * MiB    # ... and never less than this on a CUDA device
# On the host (a cpu run): the tokenizer (Gemma's 262k vocabulary: 320 MiB RSS), malloc arenas and small
# temporaries, measured at 0.35-0.8 GiB above the counted bytes with Gemma-3-270M (bench/plan_bench.py).
HOST_MARGIN_FRACTION = 0.20
HOST_MARGIN_MIN_BYTES = 512 * MiB
KV_RESIDUAL_TOKENS = 128        # int8 KV keeps the newest tokens unquantized (kv_cache.DEFAULT_RESIDUAL_TOKENS)
KV_GROUP = 64                   # int8 KV group along the head dimension


# -- the plan -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanRequest:
    """What the run asks for; the budgets are the [models.NAME] settings of the same names."""
    batch: int = 8
    context: int = 2048               # prompt + generated tokens per row
    dtype: str = "fp16"               # the compute dtype (capability.resolve_dtype's answer)
    kv_cache: str = "fp"
    attention: str = "sdpa"           # "eager": the math path materializes B*H*L^2 scores
    fp16_safe: bool = False           # fp32 residual stream and fp32-accumulated MLP
    prefetch: bool = True
    variant: str = "precise"          # precise | fast | auto (dense: auto keeps keep_precise edges precise)
    keep_precise: int = 1
    bits: int = 4
    group_size: int = 64
    vram_budget_bytes: int | None = None    # dense: decoder layers on the device (an upper bound)
    ram_budget_bytes: int | None = None     # dense: streamed layers cached in host RAM; moe: experts in RAM
    expert_cache_bytes: int | None = None   # moe: the device expert cache (None: what fits)
    disk_bytes_per_s: float | None = None   # measured read bandwidth (probe), for the disk bound
    disk_source: str = ""             # where disk_bytes_per_s came from, for the bound's note

    @classmethod
    def for_model(cls, spec: Any, *, batch: int, dtype: str, **fields: Any) -> "PlanRequest":
        """What a [models.NAME] entry (jobs.contract.spec.ModelSpec) asks for at this batch and compute dtype;
        `fields` add what only the caller knows (fp16_safe, the disk bound)."""
        return cls(batch=batch, dtype=dtype, context=spec.context_tokens, kv_cache=spec.kv_cache,
                   variant=spec.variant, vram_budget_bytes=spec.vram_budget_bytes,
                   ram_budget_bytes=spec.ram_budget_bytes, expert_cache_bytes=spec.expert_cache_bytes, **fields)


@dataclass
class MemoryPlan:
    fits: bool
    reason: str
    model: str
    device: str
    request: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)   # item, where, bytes, detail
    peak_device_bytes: int = 0
    device_memory_bytes: int = 0
    peak_pinned_bytes: int = 0
    host_ram_bytes: int = 0
    bytes_per_pass: int = 0           # host -> device per pass over the weights (cpu: layers handed over)
    disk_bytes_per_pass: int = 0      # read from disk per pass once the RAM cache is warm
    bound_tokens_per_s: float | None = None
    bound_note: str = ""
    resident_layers: int = 0
    streaming_slots: int = 0
    ram_cache_layers: int = 0
    layer_bytes: int = 0
    expanded_layers: int = 0          # gguf: resident layers also held expanded (nothing streams, room left)
    expanded_head: bool = False       # gguf: the lm_head also held expanded (every layer expanded, room left)
    expert_cache_slots: int = 0
    experts_in_ram: int = 0
    weights_format: str = "safetensors"      # "gguf": blocks are read, cached and sent; expanded per use
    bytes_by_block_type: dict[str, int] = field(default_factory=dict)   # gguf: the file's tensor bytes
    page_cache_bytes: int | None = None      # host RAM left for the page cache beside what the run holds
    from_disk: bool = False                  # the bytes read per pass do not stay in RAM between passes
    bound_from_ram_tokens_per_s: float | None = None    # if every byte per pass came from RAM
    bound_from_disk_tokens_per_s: float | None = None   # if the disk_bytes_per_pass came from disk
    faster: list[dict[str, Any]] = field(default_factory=list)   # what would raise the bound, and to what
    job: dict[str, Any] | None = None        # --prompts N --tokens T: the least time such a job takes
    shape: ModelShape | None = field(default=None, repr=False)   # what the plan was made from (not JSON)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("shape")
        return out

    def batch_memory_bytes(self, rows: int, tokens: int) -> int:
        """KV cache and prefill activations of `rows` x `tokens` as this plan counts them."""
        assert self.shape is not None, "a plan made by make_plan knows its shape"
        req = PlanRequest(**{**self.request, "batch": rows, "context": tokens})
        s = DTYPE_BYTES[req.dtype]
        return (kv_cache_bytes(self.shape, rows, tokens, req.kv_cache, s)
                + activation_bytes(self.shape, req, s, moe=self.shape.moe)["peak"])

    def batch_fits(self, rows: int, tokens: int) -> bool:
        """A batch fits when its KV cache and activations fit what the plan reserved for batch x context,
        whatever its shape: 16 rows of 46 tokens need far less than 8 rows of 2048."""
        return self.batch_memory_bytes(rows, tokens) <= self.batch_memory_bytes(self.request["batch"],
                                                                                self.request["context"])

    def job_seconds(self, prompts: int, tokens: int) -> float | None:
        """The least time N prompts x T new tokens take at the bound: one pass per token (and one prefill
        pass) per batch of prompts."""
        if not self.bound_tokens_per_s:
            return None
        batch = self.request["batch"]
        return math.ceil(prompts / batch) * (tokens + 1) * batch / self.bound_tokens_per_s

    def table(self) -> str:
        lines = [f"memory plan: {self.model} on {self.device}, batch {self.request['batch']} x context "
                 f"{self.request['context']} tokens, {self.request['dtype']}, kv {self.request['kv_cache']}", ""]
        width = max(len(r["item"]) for r in self.rows) if self.rows else 10
        for r in self.rows:
            lines.append(f"  {r['item']:<{width}}  {r['where']:<11} {format_size(r['bytes']):>10}  {r['detail']}")
        lines += ["",
                  f"  peak {'host' if self.device.startswith('cpu') else 'device'} memory   "
                  f"{format_size(self.peak_device_bytes)} of "
                  f"{format_size(self.device_memory_bytes)}",
                  f"  peak pinned host RAM {format_size(self.peak_pinned_bytes)}   host RAM held "
                  f"{format_size(self.host_ram_bytes)}",
                  f"  per pass             {format_size(self.bytes_per_pass)} to the device, "
                  f"{format_size(self.disk_bytes_per_pass)} read from the weights' file"
                  + ("" if not self.disk_bytes_per_pass else ": from disk every pass" if self.from_disk
                     else ": kept in the page cache after the first pass"),
                  "  bound                " + (f"<= {self.bound_tokens_per_s:.3g} tokens/s ({self.bound_note})"
                                             if self.bound_tokens_per_s else self.bound_note)]
        if self.bytes_by_block_type:
            lines.append("  weights (GGUF)       " + ", ".join(f"{k} {format_size(v)}"
                                                             for k, v in self.bytes_by_block_type.items()))
        if self.job:
            lines.append(f"  a job of {self.job['prompts']} prompts x {self.job['tokens']} tokens takes "
                         + (f"at least {format_duration(self.job['seconds'])}" if self.job["seconds"] is not None
                            else "an unknown time (no bound)"))
        if self.bytes_per_pass and not self.faster:
            lines += ["", "faster: nothing this plan can change (4-bit weights, RAM for the page cache and the "
                      "largest batch that fits are already there): a card with more memory keeps more layers"]
        if self.faster:
            lines += ["", "faster:"]
            lines += [f"  {f['what']}: {format_size(f['bytes_per_pass'])} per pass"
                      + (f", <= {f['bound_tokens_per_s']:.3g} tokens/s" if f["bound_tokens_per_s"] else "")
                      for f in self.faster]
        lines += ["", ("fits: " if self.fits else "does not fit: ") + self.reason]
        return "\n".join(lines)


def kv_cache_bytes(shape: ModelShape, batch: int, context: int, kind: str, dtype_bytes: int) -> int:
    """The whole KV cache at `context` tokens: sliding layers hold only their window."""
    per_token_head = shape.head_dim
    total = 0
    for layer_type in shape.layer_types:
        tokens = context if layer_type != "sliding_attention" or not shape.sliding_window \
            else min(context, shape.sliding_window)
        if kind == "int8":
            fp_tokens = min(tokens, KV_RESIDUAL_TOKENS)
            group = min(KV_GROUP, per_token_head)
            elem = (tokens - fp_tokens) * (1 + 2 * dtype_bytes / group) + fp_tokens * dtype_bytes
        elif kind == "fp8":
            elem = tokens * (1 + 4 / per_token_head)   # e4m3 codes, one fp32 scale per token and head
        else:
            elem = tokens * dtype_bytes
        total += math.ceil(2 * batch * shape.kv_heads * per_token_head * elem)
    return total


def activation_bytes(shape: ModelShape, req: PlanRequest, dtype_bytes: int, *, moe: bool = False) -> dict[str, int]:
    """Peak transient bytes of a prefill pass (one layer at a time): residual stream, attention, MLP, logits."""
    tokens = req.batch * req.context
    s = dtype_bytes
    wide = 4 if (req.fp16_safe or s == 4) else s
    residual = 3 * tokens * shape.hidden * wide
    qkv = tokens * (shape.heads + 2 * shape.kv_heads) * shape.head_dim * s
    repeat = 2 * tokens * shape.heads * shape.head_dim * s if shape.kv_heads < shape.heads else 0
    attn_out = tokens * shape.heads * shape.head_dim * s
    if req.attention == "eager":   # scores in the dtype, softmax in fp32, probabilities back in the dtype
        scores = req.batch * shape.heads * req.context ** 2 * (4 + 2 * s)
    else:                          # fused kernels: no scores; the boolean masks (full and sliding) remain
        scores = req.batch * req.context ** 2 * len(set(shape.layer_types))
    attention = qkv + repeat + attn_out + scores
    mlp_tokens = tokens
    mlp = 3 * mlp_tokens * shape.intermediate * (4 if req.fp16_safe else s)
    if moe:   # routed tokens: at worst every token to one expert, plus the fp32 accumulator and router
        mlp += tokens * shape.hidden * 4 + tokens * shape.num_experts * 4
    logits = req.batch * shape.vocab * (4 + s)
    return {"residual": residual, "attention": attention, "scores": scores, "mlp": mlp, "logits": logits,
            "peak": residual + max(attention, mlp, logits)}


def _gguf_expansion_bytes(shape: ModelShape, s: int) -> int:
    """The reused buffer one weight expands into, plus fp32 temporaries of the block arithmetic."""
    return shape.largest_matrix_numel * (s + 4)


def packed_bytes(numel: int, bits: int, group_size: int) -> int:
    """An HQQ weight as stored: codes plus an fp16 scale and zero per group."""
    return math.ceil(numel * bits / 8) + 4 * math.ceil(numel / group_size)


def _margins(device: DeviceProfile) -> tuple[float, int]:
    return ((HOST_MARGIN_FRACTION, HOST_MARGIN_MIN_BYTES) if device.kind == "cpu"
            else (MARGIN_FRACTION, MARGIN_MIN_BYTES))


def _margin(used: int, device: DeviceProfile) -> int:
    fraction, least = _margins(device)
    return max(least, math.ceil(used * fraction))


def _room(capacity: int, fixed: int, device: DeviceProfile) -> int:
    """Largest L with fixed + L + margin(fixed + L) <= capacity."""
    fraction, least = _margins(device)
    return min(int(capacity / (1 + fraction)), capacity - least) - fixed


def make_plan(shape: ModelShape, device: DeviceProfile, req: PlanRequest, model: str = "model") -> MemoryPlan:
    """The plan for one (model, device, request); `fits` False with a sentence naming what would fit
    (what would make it faster is faster.faster_options, which the supervisor's `model plan` adds)."""
    plan = plan_only(shape, device, req, model)
    if not plan.fits:
        plan.reason += _suggest(shape, device, req, plan)
    return plan


def plan_only(shape: ModelShape, device: DeviceProfile, req: PlanRequest, model: str) -> MemoryPlan:
    """The plan alone, without the search for what would fit instead (make_plan adds it)."""
    plan = (_plan_moe if shape.moe else _plan_dense)(shape, device, req, model)
    plan.shape = shape
    plan.weights_format = shape.weights_format
    plan.bytes_by_block_type = dict(shape.bytes_by_block_type)
    return plan


def _common(shape: ModelShape, device: DeviceProfile, req: PlanRequest, model: str) -> tuple[MemoryPlan, int]:
    s = DTYPE_BYTES[req.dtype]
    plan = MemoryPlan(True, "", model, f"{device.name} ({format_size(device.memory_bytes)})",
                      asdict(req), device_memory_bytes=device.memory_bytes)
    where = "device" if device.kind == "cuda" else "host RAM"
    kv = kv_cache_bytes(shape, req.batch, req.context, req.kv_cache, s)
    act = activation_bytes(shape, req, s, moe=shape.moe)
    windows = f", sliding layers keep {shape.sliding_window}" if shape.sliding_window else ""
    rows = [("CUDA context", device.context_bytes, "driver, cuBLAS workspace")] if device.kind == "cuda" else []
    rows += [("embeddings, lm_head, norms", shape.non_layer_stored_bytes if shape.gguf else shape.non_layer_numel * s,
              ("tied" if shape.tied else "embeddings and lm_head")
              + (", GGUF blocks: rows looked up, lm_head in chunks" if shape.gguf else "")),
             (f"KV cache ({req.kv_cache})", kv, f"{req.batch} x {req.context} tokens x {shape.num_layers} "
              f"layers{windows}"),
             ("activations (prefill)", act["peak"], f"{req.attention} attention; MLP {format_size(act['mlp'])}, "
              f"attention {format_size(act['attention'])}, logits {format_size(act['logits'])}")]
    for item, n, detail in rows:
        plan.rows.append({"item": item, "where": where, "bytes": int(n), "detail": detail})
    return plan, s


def _add(plan: MemoryPlan, item: str, where: str, n: int, detail: str) -> None:
    plan.rows.append({"item": item, "where": where, "bytes": int(n), "detail": detail})


def _device_sum(plan: MemoryPlan, device: DeviceProfile) -> int:
    where = "device" if device.kind == "cuda" else "host RAM"
    return sum(r["bytes"] for r in plan.rows if r["where"] == where)


def _plan_dense(shape: ModelShape, device: DeviceProfile, req: PlanRequest, model: str) -> MemoryPlan:
    plan, s = _common(shape, device, req, model)
    cuda = device.kind == "cuda"
    where = "device" if cuda else "host RAM"
    n = shape.num_layers
    # a GGUF layer stays in its blocks everywhere but the one weight being expanded for use
    layer = shape.layer_stored_bytes if shape.gguf else shape.layer_numel * s
    packed = packed_bytes(shape.layer_numel, req.bits, req.group_size)
    fast = req.variant in ("fast", "auto") and not shape.gguf
    fixed = sum(r["bytes"] for r in plan.rows)
    if fast:   # packed parts land beside the slot, and one weight expands through temporaries
        fixed += 2 * packed + shape.largest_matrix_numel * (1 + 2 * s)
    if shape.gguf:
        fixed += _gguf_expansion_bytes(shape, s)
    room = _room(device.memory_bytes, fixed, device)
    plan.layer_bytes = layer
    if req.vram_budget_bytes is not None and req.vram_budget_bytes > room:
        plan.fits = False
        plan.reason = (f"vram_budget_bytes {format_size(req.vram_budget_bytes)} of decoder layers does not fit "
                       f"{device.name}: the rest of the run takes {format_size(fixed)} of "
                       f"{format_size(device.memory_bytes)}, leaving {format_size(max(0, room))} for layers")
        return _finish(plan, device)
    budget = room if req.vram_budget_bytes is None else req.vram_budget_bytes
    if budget >= n * layer:
        resident, slots = n, 0
    elif budget < layer:
        plan.fits = False
        plan.reason = (f"one decoder layer ({format_size(layer)}) does not fit beside the rest of the run "
                       f"({format_size(fixed)}) on {device.name} ({format_size(device.memory_bytes)})")
        if req.vram_budget_bytes is not None and req.vram_budget_bytes < layer <= room:
            plan.reason = (f"vram_budget_bytes {format_size(req.vram_budget_bytes)} cannot hold one decoder "
                           f"layer of {format_size(layer)}; give at least {layer} bytes ({2 * layer} to "
                           "overlap reading with compute)")
        return _finish(plan, device)
    else:
        slots = 2 if req.prefetch and budget >= 2 * layer else 1
        resident = min(n - 1, (budget - slots * layer) // layer)
    streamed = n - resident
    if shape.gguf:
        _add(plan, "block expansion", where, _gguf_expansion_bytes(shape, s),
             f"one {shape.largest_matrix_numel:,}-element weight at a time into one reused {req.dtype} buffer, "
             "plus fp32 scratch")
    if fast and streamed:
        _add(plan, "fast-layer expansion", where, 2 * packed + shape.largest_matrix_numel * (1 + 2 * s),
             f"packed parts of {min(2, streamed)} layers + one {shape.largest_matrix_numel:,}-element weight expanding")
    _add(plan, "resident layers", where, resident * layer, f"{resident} of {n} x {format_size(layer)}")
    if shape.gguf and resident == n:
        # Nothing streams: room left over holds resident layers expanded too, so they skip the expansion
        # per use. Where layers stream, blocks stay blocks: a resident layer as blocks saves PCIe bytes
        # on every pass, and expanding on the device costs far less than moving a layer.
        expanded_layer = shape.layer_numel * s
        plan.expanded_layers = min(n, max(0, budget - n * layer) // expanded_layer) if expanded_layer else 0
        if plan.expanded_layers:
            _add(plan, "expanded resident layers", where, plan.expanded_layers * expanded_layer,
                 f"{plan.expanded_layers} of {n} x {format_size(expanded_layer)} {req.dtype}, expanded once at "
                 "first use (the rest expand per use)")
        head = shape.vocab * shape.hidden * s   # the head, tied or not, is vocab x hidden
        left = budget - n * layer - plan.expanded_layers * expanded_layer
        if plan.expanded_layers == n and left >= head:
            plan.expanded_head = True
            _add(plan, "expanded lm_head", where, head, f"{shape.vocab:,} x {shape.hidden:,} {req.dtype}, expanded "
                 "once at first use instead of in chunks every pass")
    _add(plan, "streaming slots", where, slots * layer, f"{slots} preallocated, double buffered" if slots == 2
         else f"{slots}" + (" (no prefetch)" if slots else ""))
    plan.resident_layers, plan.streaming_slots = resident, slots
    crossing = packed if fast else layer
    if streamed:
        host_layer = crossing
        ram_layers = min(streamed, (req.ram_budget_bytes or 0) // host_layer)
        plan.ram_cache_layers = ram_layers
        host_where = "pinned host" if cuda else "host RAM"
        if cuda:   # one pinned staging buffer per slot (slots.SlotRing)
            _add(plan, "staging ring", host_where, slots * host_layer,
                 f"{slots} x {format_size(host_layer)}, one exact arena")
        if ram_layers:
            _add(plan, "RAM cache", host_where, ram_layers * host_layer,
                 f"{ram_layers} of {streamed} streamed layers kept between passes")
        plan.bytes_per_pass = streamed * crossing
        stored = packed if fast else layer if shape.gguf else shape.layer_numel * shape.stored_bytes
        plan.disk_bytes_per_pass = (streamed - ram_layers) * stored
    return _finish(plan, device)


def _plan_moe(shape: ModelShape, device: DeviceProfile, req: PlanRequest, model: str) -> MemoryPlan:
    plan, s = _common(shape, device, req, model)
    cuda = device.kind == "cuda"
    where = "device" if cuda else "host RAM"
    # every decoder layer without its routed experts: attention, norms, routers, shared experts, dense MLPs
    dense = (shape.decoder_stored_bytes if shape.gguf
             else (shape.decoder_numel or shape.num_layers * shape.layer_numel) * s)
    moe_layers = shape.moe_layers or shape.num_layers
    _add(plan, "attention, norms, routers", where, dense, f"{shape.num_layers} layers, resident"
         + (f", {shape.num_layers - moe_layers} of them with a dense MLP" if moe_layers < shape.num_layers else ""))
    fast = req.variant in ("fast", "auto") and not shape.gguf
    expert = packed_bytes(shape.expert_numel, req.bits, req.group_size) if fast else shape.expert_numel * s
    if fast:
        _add(plan, "expert expansion", where, shape.expert_numel * (1 + 2 * s), "one expert dequantized at a time")
    if shape.gguf:
        expert = shape.expert_stored_bytes
        _add(plan, "block expansion", where, _gguf_expansion_bytes(shape, s),
             f"one {shape.largest_matrix_numel:,}-element weight at a time into one reused {req.dtype} buffer")
    total_experts = moe_layers * shape.num_experts
    budget = req.ram_budget_bytes
    if budget is None and cuda:   # pinned pages cannot be swapped: at most half of what the host has free
        budget = default_ram_budget_bytes(total_experts, expert, device.host_ram_bytes)
    try:
        host: tuple[int, int, int] | BudgetError = expert_host_plan(total_experts, expert, budget)
    except BudgetError as exc:
        host = exc
    fixed = sum(r["bytes"] for r in plan.rows)
    if not cuda and not isinstance(host, BudgetError):  # on the CPU the store takes the memory the cache comes from
        fixed += host[1] + host[2]
    room = _room(device.memory_bytes, fixed, device)
    cache = min(total_experts * expert, room) if req.expert_cache_bytes is None else req.expert_cache_bytes
    if cache > room or cache < expert:
        plan.fits = False
        plan.reason = (f"the expert cache ({format_size(cache)}) does not fit: the rest of the run takes "
                       f"{format_size(fixed)} of {format_size(device.memory_bytes)}, leaving "
                       f"{format_size(max(0, room))}; one expert is {format_size(expert)}")
        return _finish(plan, device)
    slots = min(total_experts, cache // expert)
    plan.expert_cache_slots = slots
    _add(plan, "expert cache", where, slots * expert, f"{slots} of {total_experts} experts x {format_size(expert)}")
    if isinstance(host, BudgetError):
        plan.fits, plan.reason = False, str(host)
        return _finish(plan, device)
    in_ram, arena, staging = host
    plan.experts_in_ram = in_ram
    host_where = "pinned host" if cuda else "host RAM"
    _add(plan, "expert store", host_where, arena, f"{in_ram} of {total_experts} experts in one arena; "
         f"{total_experts - in_ram} read from disk (page cache) when missed")
    if staging:
        _add(plan, "staging ring", host_where, staging, f"{STAGING_SLOTS} expert slots")
    # Per decode step with uniform routing: distinct experts a layer needs, the share not on the device.
    active = shape.num_experts * (1 - (1 - shape.experts_per_token / shape.num_experts) ** req.batch)
    miss = 1 - slots / total_experts
    plan.bytes_per_pass = int(moe_layers * active * miss * expert)
    plan.disk_bytes_per_pass = int(plan.bytes_per_pass * (1 - in_ram / total_experts))
    return _finish(plan, device, note="uniform routing")


def _finish(plan: MemoryPlan, device: DeviceProfile, note: str = "") -> MemoryPlan:
    cuda = device.kind == "cuda"
    used = _device_sum(plan, device)
    fraction, least = _margins(device)
    plan.rows.append({"item": "fragmentation margin" if cuda else "host margin", "where": "device" if cuda
                      else "host RAM", "bytes": _margin(used, device),
                      "detail": f"{fraction:.0%} of the above, at least {format_size(least)}"
                      + ("" if cuda else ": tokenizer, malloc arenas, temporaries")})
    used += plan.rows[-1]["bytes"]
    plan.peak_device_bytes = used
    plan.peak_pinned_bytes = sum(r["bytes"] for r in plan.rows if r["where"] == "pinned host")
    plan.host_ram_bytes = sum(r["bytes"] for r in plan.rows if r["where"] in ("pinned host", "host RAM"))
    if plan.fits and used > device.memory_bytes:
        plan.fits = False
        plan.reason = f"peak {format_size(used)} exceeds {device.name}'s {format_size(device.memory_bytes)}"
    host = device.host_ram_bytes
    if plan.fits and host is not None and plan.host_ram_bytes > host:
        plan.fits = False
        plan.reason = (f"host RAM: the run holds {format_size(plan.host_ram_bytes)} but "
                       f"{format_size(host)} is available; lower ram_budget_bytes")
    if plan.fits:
        plan.reason = (f"peak {format_size(used)} of {format_size(device.memory_bytes)} on {device.name}"
                       + (f", {format_size(plan.peak_pinned_bytes)} pinned" if cuda else ""))
    _bounds(plan, device, note)
    return plan


def _bounds(plan: MemoryPlan, device: DeviceProfile, note: str) -> None:
    """tokens/s bounds from the bytes each pass moves: over PCIe from RAM, and from the disk when what is
    read per pass cannot stay in the page cache (more than the host RAM left beside the run)."""
    cuda = device.kind == "cuda"
    batch = plan.request["batch"]
    host = device.host_ram_bytes
    held = plan.peak_device_bytes if not cuda else plan.host_ram_bytes
    plan.page_cache_bytes = None if host is None else max(0, host - held)
    plan.from_disk = bool(plan.disk_bytes_per_pass) and (plan.page_cache_bytes is None
                                                         or plan.disk_bytes_per_pass > plan.page_cache_bytes)
    ram_note = ""
    if cuda and plan.bytes_per_pass and device.h2d_bytes_per_s:
        plan.bound_from_ram_tokens_per_s = batch * device.h2d_bytes_per_s / plan.bytes_per_pass
        ram_note = (f"batch x {device.h2d_bytes_per_s / 1e9:.0f} GB/s PCIe / {format_size(plan.bytes_per_pass)}"
                    " per pass")
    disk_bw = plan.request.get("disk_bytes_per_s")
    source = plan.request.get("disk_source") or "given"
    disk_note = ""
    if disk_bw and plan.disk_bytes_per_pass:
        plan.bound_from_disk_tokens_per_s = batch * disk_bw / plan.disk_bytes_per_pass
        disk_note = (f"batch x {disk_bw / 1e9:.2g} GB/s disk ({source}) / {format_size(plan.disk_bytes_per_pass)} "
                     "per pass")
    cache = ("host RAM unknown" if plan.page_cache_bytes is None
             else f"{format_size(plan.page_cache_bytes)} of host RAM left for the page cache")
    if plan.from_disk and plan.bound_from_disk_tokens_per_s is not None:
        bounds = [(plan.bound_from_disk_tokens_per_s, f"{disk_note}: {format_size(plan.disk_bytes_per_pass)} "
                   f"per pass exceed the {cache}")]
        if plan.bound_from_ram_tokens_per_s is not None:
            bounds.append((plan.bound_from_ram_tokens_per_s, ram_note))
        plan.bound_tokens_per_s, plan.bound_note = min(bounds)
    elif plan.from_disk:
        plan.bound_note = (f"{format_size(plan.disk_bytes_per_pass)} per pass come from disk ({cache}); give "
                           "--disk-bandwidth, disk_bytes_per_s, or run the probe kind on the model's disk for "
                           "the disk bound" + (f"; from RAM it would be <= {plan.bound_from_ram_tokens_per_s:.3g}"
                                               " tokens/s" if plan.bound_from_ram_tokens_per_s else ""))
    elif plan.bound_from_ram_tokens_per_s is not None:
        plan.bound_tokens_per_s = plan.bound_from_ram_tokens_per_s
        plan.bound_note = ram_note + (f"; the page cache keeps what is read ({cache})"
                                      if plan.disk_bytes_per_pass else "")
    else:
        plan.bound_note = ("nothing streams: compute-bound" if not plan.bytes_per_pass
                           else f"streams from host memory ({cache}): compute-bound")
    if note and plan.bound_tokens_per_s:
        plan.bound_note += f", {note}"


def _suggest(shape: ModelShape, device: DeviceProfile, req: PlanRequest, failed: MemoryPlan) -> str:
    """What would fit instead: a smaller batch, a shorter context, or a smaller vram budget."""
    def fits(**changes: Any) -> bool:
        trial = replace(req, **changes)
        return plan_only(shape, device, trial, "").fits

    tips = []
    if req.vram_budget_bytes is not None and req.vram_budget_bytes < shape.layer_numel * DTYPE_BYTES[req.dtype]:
        return ""  # the reason already names the least budget that holds a layer
    if req.vram_budget_bytes is not None and fits(vram_budget_bytes=None):
        free = _plan_dense(shape, device, replace(req, vram_budget_bytes=None), "")
        tips.append(f"vram_budget_bytes <= {free.resident_layers * free.layer_bytes + free.streaming_slots * free.layer_bytes}"
                    f" ({format_size((free.resident_layers + free.streaming_slots) * free.layer_bytes)})")
    if req.expert_cache_bytes is not None and fits(expert_cache_bytes=None):
        tips.append("expert_cache_bytes unset (what fits)")
    batch = next((b for b in range(req.batch - 1, 0, -1) if fits(batch=b)), None)
    if batch:
        tips.append(f"batch_size {batch} at {req.context} tokens")
    low, high = 0, req.context
    while high - low > 16:       # the longest context that fits at this batch
        mid = (low + high) // 2
        low, high = (mid, high) if fits(context=mid) else (low, mid)
    if low >= 64:
        tips.append(f"context {low} tokens at batch {req.batch}")
    if req.kv_cache == "fp" and fits(kv_cache="int8"):
        tips.append("kv_cache = \"int8\"")
    if req.variant == "precise" and fits(variant="fast"):
        tips.append("variant \"fast\" (lab-attendant model quantize NAME --bits 4)")
    if not tips:
        return "; nothing smaller fits this device: use a bigger card, or a smaller model"
    return "; what fits instead: " + ", or ".join(tips)
