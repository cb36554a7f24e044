"""load_paged_moe against unmodified transformers: logits, greedy decode, batching, layouts."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from moe_helpers import expert_bytes, prompts, save_fused, save_hf, save_per_expert_sharded, tiny_mixtral
from transformers import MixtralForCausalLM

from jobs.contract.errors import BudgetError
from jobs.paging.moe.load import load_paged_moe
from jobs.paging.open import spec_for
from jobs.paging.plan.settings import is_moe_folder

pytestmark = pytest.mark.engine

N_EXPERTS = 3 * 8  # layers x experts of the tiny config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_hf(tiny_mixtral(), tmp_path_factory.mktemp("mixtral"))


@pytest.fixture(scope="module")
def ref(folder):
    return MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("n_cached", [1, 2, 5, N_EXPERTS])
def test_logits_match_transformers(folder, ref, policy, n_cached):
    ids = prompts(3, 16)
    paged = load_paged_moe(spec_for(folder, expert_cache_bytes=n_cached * expert_bytes(ref), cache_policy=policy))
    with torch.no_grad():
        diff = max_diff(paged.model(ids).logits, ref(ids).logits)
        again = max_diff(paged.model(ids).logits, ref(ids).logits)  # warm cache, same answer
    assert diff <= 1e-5 and again <= 1e-5
    s = paged.stats()
    assert s["resident_bytes"] <= s["expert_cache_bytes"] and s["capacity_experts"] == n_cached
    assert s["misses"] > 0 and (s["evictions"] > 0) == (n_cached < N_EXPERTS)
    paged.close()


def test_counters_match_routing(folder, ref):
    """With room for every expert and no prefetch, misses are the distinct experts routed to,
    and every other lookup (one per layer per expert used) is a hit."""
    ids = prompts(2, 12)
    paged = load_paged_moe(spec_for(folder), prefetch=False)
    with torch.no_grad():
        router_logits = ref(ids, output_router_logits=True).router_logits
        paged.model(ids)
        paged.model(ids[:, :5])
        short = ref(ids[:, :5], output_router_logits=True).router_logits
    used = [set(r.topk(2, dim=-1).indices.flatten().tolist()) for r in router_logits]
    used_short = [set(r.topk(2, dim=-1).indices.flatten().tolist()) for r in short]
    s = paged.stats()
    assert s["misses"] == sum(len(u) for u in used)
    assert s["hits"] == sum(len(u) for u in used_short)
    assert s["bytes_h2d"] == s["misses"] * s["expert_bytes"]
    assert [s["per_layer"][i]["misses"] for i in range(3)] == [len(u) for u in used]


def test_greedy_32_tokens_identical(folder, ref):
    ids = prompts(1, 8)
    paged = load_paged_moe(spec_for(folder, expert_cache_bytes=3 * expert_bytes(ref)))
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert torch.equal(paged.model.generate(ids, **kwargs), ref.generate(ids, **kwargs))
    s = paged.stats()
    assert s["prefetch_guesses"] > 0 and 0 <= s["prefetch_hits"] <= s["prefetches"]


def test_left_padded_batch_equals_one_by_one(folder, ref):
    lengths = [5, 11, 8]
    rows = [prompts(1, n, seed=10 + n)[0] for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    paged = load_paged_moe(spec_for(folder, expert_cache_bytes=4 * expert_bytes(ref)))
    batch = paged.model.generate(ids, attention_mask=mask, **kwargs)[:, width:]
    assert torch.equal(batch, ref.generate(ids, attention_mask=mask, **kwargs)[:, width:])
    for i, row in enumerate(rows):
        alone = paged.model.generate(row[None], **kwargs)[0, len(row):]
        assert torch.equal(batch[i], alone), f"prompt {i} differs batched vs alone"


@pytest.mark.parametrize("writer", [save_fused, save_per_expert_sharded])
def test_checkpoint_layouts_load_and_match(tmp_path, ref, writer):
    folder = writer(ref, tmp_path / writer.__name__)
    paged = load_paged_moe(spec_for(folder, expert_cache_bytes=2 * expert_bytes(ref)))
    ids = prompts(2, 10)
    with torch.no_grad():
        assert max_diff(paged.model(ids).logits, ref(ids).logits) <= 1e-5


def test_cpu_miss_exec_same_logits_fewer_copies(folder, ref):
    ids = prompts(1, 6)
    off = load_paged_moe(spec_for(folder, expert_cache_bytes=2 * expert_bytes(ref)), prefetch=False)
    on = load_paged_moe(spec_for(folder, expert_cache_bytes=2 * expert_bytes(ref)), prefetch=False,
                        cpu_miss_exec=True, cpu_miss_max_tokens=6)
    with torch.no_grad():
        assert max_diff(on.model(ids).logits, off.model(ids).logits) <= 1e-6
    assert on.stats()["cpu_execs"] > 0 and off.stats()["cpu_execs"] == 0
    assert on.stats()["bytes_h2d"] < off.stats()["bytes_h2d"]


BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2**-7: one ulp at 1.0
BF16_UNIT_ROUNDOFF = BF16_EPS / 2            # the most one round-to-nearest moves a value, relatively


def routes_and_near_ties(model, ids, eps: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each layer's chosen experts [batch*seq, k] (sorted), and [layers, batch, seq] True where that layer's
    k-th and (k+1)-th router logits lie within 4 ulps of the compute format: there either expert is a correct
    choice, and two implementations may differ (measured flips between transformers' own bf16 experts paths
    sat below 1 ulp)."""
    with torch.no_grad():
        router_logits = model(ids, output_router_logits=True).router_logits
    k = model.config.num_experts_per_tok
    routes, ties = [], []
    for logits in router_logits:
        top = logits.float().topk(k + 1, dim=-1)
        routes.append(top.indices[:, :k].sort(-1).values)
        gap = top.values[:, k - 1] - top.values[:, k]
        ties.append((gap <= 4 * eps * top.values[:, 0].abs().clamp(min=1)).view(ids.shape))
    return routes, torch.stack(ties)


def reached_by_ties(ties: torch.Tensor) -> torch.Tensor:
    """[batch, seq] positions a near-tie can move: its own, and through attention in the layers after it,
    every later position of its row (a tie in the last layer reaches only its own)."""
    return ties.any(0) | ties[:-1].any(0).cummax(dim=-1).values


def test_bf16_close_to_transformers_bf16(folder):
    """Against transformers' grouped_mm experts (its default in 5.x; pinned, since eager sums in bf16):
    the same experts wherever routing is not a near-tie, and logits within bf16 rounding elsewhere."""
    ref16 = MixtralForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                               experts_implementation="grouped_mm").eval()
    assert ref16.config._experts_implementation == "grouped_mm"
    paged = load_paged_moe(spec_for(folder, dtype="bf16", expert_cache_bytes=4 * expert_bytes(ref16, 2)))
    ids = prompts(16, 4)  # short rows: a tie in an early layer takes the rest of its row out
    with torch.no_grad():
        a, b = paged.model(ids).logits.float(), ref16(ids).logits.float()
    assert paged.store.buffer((0, 0)).dtype == torch.bfloat16
    routes_a, ties_a = routes_and_near_ties(paged.model, ids, BF16_EPS)
    routes_b, ties_b = routes_and_near_ties(ref16, ids, BF16_EPS)
    clear = ~reached_by_ties(ties_a | ties_b)
    assert clear.sum() >= ids.numel() // 2  # enough positions left to compare
    for layer, (ra, rb) in enumerate(zip(routes_a, routes_b)):
        same = (ra == rb).all(-1).view(ids.shape)
        assert same[clear].all(), f"layer {layer}: experts differ at a clear position"
    # Where both chose the same experts, the two differ only in how bf16 results are rounded and summed:
    # at most about one rounding per layer for attention and one for the experts, one for the head.
    bound = (2 * paged.model.config.num_hidden_layers + 1) * BF16_EPS * b.abs().max().item()
    print(f"paged vs transformers bf16 at {clear.sum()} clear positions: {max_diff(a[clear], b[clear]):.4f} "
          f"(bound {bound:.4f})")
    assert max_diff(a[clear], b[clear]) <= bound
    paged.close()


def test_bf16_experts_round_once_and_stay_near_fp32(folder, ref):
    """One layer's experts in bf16 against the exact (fp64) weighted sum of the same experts' bf16 outputs:
    accumulating in fp32 and rounding once leaves at most one bf16 rounding (summing in bf16 did not).
    And against the fp32 model's experts: within the first-order error bound of bf16 inputs to fp32-accumulated
    matmuls, propagated through SwiGLU and the weighted sum."""
    paged = load_paged_moe(spec_for(folder, dtype="bf16"), prefetch=False)
    torch.manual_seed(3)
    x = torch.randn(256, ref.config.hidden_size).to(torch.bfloat16)  # exact in both formats
    _, weights, index = ref.model.layers[0].mlp.gate(x.float())
    one = torch.ones_like(weights[:, :1])
    out = paged.pager.run_layer(0, x, index, weights).double()
    # An expert alone with weight 1 comes back exactly as the expert computed it in bf16.
    alone = [paged.pager.run_layer(0, x, index[:, j:j + 1], one).double() for j in range(index.shape[1])]
    exact = sum(weights[:, j, None].double() * alone[j] for j in range(index.shape[1]))
    # One bf16 rounding of the exact sum, plus the fp32 sum's own rounding before it (double rounding).
    magnitude = sum(weights[:, j, None].double() * alone[j].abs() for j in range(index.shape[1]))
    one_rounding = BF16_UNIT_ROUNDOFF * exact.abs() + torch.finfo(torch.float32).eps * magnitude
    ratio = ((out - exact).abs() / one_rounding.clamp(min=torch.finfo(torch.float32).tiny)).max().item()
    print(f"accumulation error: {ratio:.3f} of one bf16 rounding")
    assert ((out - exact).abs() <= one_rounding).all()

    experts = ref.model.layers[0].mlp.experts
    u, inter = BF16_UNIT_ROUNDOFF, ref.config.intermediate_size
    gamma = lambda n: n * torch.finfo(torch.float32).eps  # fp32 accumulation over n terms
    full = torch.zeros_like(out)
    bound = torch.zeros_like(out)
    for j in range(index.shape[1]):
        gate_up, down = experts.gate_up_proj[index[:, j]].double(), experts.down_proj[index[:, j]].double()
        xd = x.double()
        a = torch.einsum("toh,th->to", gate_up, xd)
        a_err = (u + gamma(x.shape[1])) * torch.einsum("toh,th->to", gate_up.abs(), xd.abs()) + u * a.abs()
        g, up = a.chunk(2, -1)
        g_err, up_err = a_err.chunk(2, -1)
        s = F.silu(g)
        s_err = 1.1 * g_err + u * s.abs()  # silu' lies in [-0.1, 1.1]; one rounding of its result
        h = s * up
        h_err = s.abs() * up_err + up.abs() * s_err + s_err * up_err + u * h.abs()
        y = torch.einsum("tho,to->th", down, h)
        y_err = (torch.einsum("tho,to->th", down.abs(), h_err)
                 + (u + gamma(inter)) * torch.einsum("tho,to->th", down.abs(), h.abs() + h_err) + u * y.abs())
        w = weights[:, j, None].double()
        full += w * y
        bound += w * y_err
    bound += u * full.abs() + gamma(index.shape[1]) * bound
    err = (out - full).abs()
    print(f"vs fp32 experts: max error {err.max():.2e}, {(err / bound).max():.3f} of the bound")
    assert (err <= bound).all()
    paged.close()


def test_ram_budget_below_the_staging_ring_names_bytes_needed(folder, ref):
    """Below every expert the store serves the rest from disk through 2 staging slots (64-byte aligned
    in the arena); below those slots it refuses, naming both numbers."""
    staging = 2 * -(-expert_bytes(ref) // 64) * 64
    with pytest.raises(BudgetError, match=f"needs at least {staging} bytes.*or to {N_EXPERTS * staging // 2} "):
        load_paged_moe(spec_for(folder, ram_budget_bytes=staging - 1))
    with load_paged_moe(spec_for(folder, ram_budget_bytes=N_EXPERTS * expert_bytes(ref) - 1)) as paged:
        assert paged.stats()["experts_in_ram"] == N_EXPERTS - 3  # one expert short: 2 make room for staging


def test_cache_budget_below_one_expert_refused_before_reading_weights(folder, ref, tmp_path):
    config_only = tmp_path / "config_only"  # no weights: any read would fail differently
    config_only.mkdir()
    shutil.copy(folder / "config.json", config_only)
    with pytest.raises(BudgetError, match=f"one expert of {expert_bytes(ref)} bytes"):
        load_paged_moe(spec_for(config_only, expert_cache_bytes=expert_bytes(ref) - 1))
    with pytest.raises(BudgetError, match="needs"):
        load_paged_moe(spec_for(config_only, ram_budget_bytes=1000))


def test_is_moe_folder(folder, tmp_path):
    assert is_moe_folder(folder)
    assert not is_moe_folder(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert not is_moe_folder(tmp_path)
    with pytest.raises(ValueError, match="not a MoE"):
        load_paged_moe(spec_for(tmp_path))
