"""The paged stand-in for a transformers MoE family's experts module (MixtralExperts, Qwen3MoeExperts,
DeepseekV2Experts, ...: the seam families.find_experts checks), and the schedule that feeds it.

Owns the order in which a layer's experts are paged in and run, router look-ahead prefetch and
CPU execution of misses; the cache decides where experts live, transformers does the rest.
"""
from __future__ import annotations

import logging
from collections import deque

import torch
import torch.nn.functional as F
from torch import nn

from jobs.paging.moe.cache import ExpertCache
from jobs.paging.moe.families import find_experts
from jobs.paging.moe.store import ExpertStore

log = logging.getLogger(__name__)


class PagedExperts(nn.Module):
    """Same call as the family's experts: forward(hidden_states, top_k_index, top_k_weights); no weights."""

    def __init__(self, layer_idx: int, pager: "ExpertPager"):
        super().__init__()
        self.layer_idx = layer_idx
        self.pager = pager  # a plain object, so not a submodule: model.parameters() stays dense

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return self.pager.run_layer(self.layer_idx, hidden_states, top_k_index, top_k_weights)


class ExpertPager:
    """Runs one layer's experts from the cache, hits first, paging misses in a bounded window."""

    def __init__(self, model, store: ExpertStore, cache: ExpertCache, *, prefetch: bool = True,
                 cpu_miss_exec: bool = False, cpu_miss_max_tokens: int = 4, experts: dict | None = None):
        """`experts`: decoder layer -> the family's experts module it replaces (families.find_experts;
        found on `model` when not given). Routers, shared experts and dense MLP layers stay as they are."""
        experts = find_experts(model) if experts is None else experts
        self.store, self.cache = store, cache
        self.device = cache.device
        self.num_experts = store.num_experts
        self.act_fn = next(iter(experts.values())).act_fn  # the family's own activation module
        self.prefetch = prefetch
        # A miss with few tokens (batch-1 decode) costs one expert copy over PCIe but only a few
        # GEMVs on the host: cheaper to run where the weights already are.
        self.cpu_miss_exec = cpu_miss_exec
        self.cpu_miss_max_tokens = cpu_miss_max_tokens
        self._layers = model.model.layers
        self._after_attention: dict[int, torch.Tensor] = {}
        self._guesses: dict[int, set[int]] = {}
        self._hooks = []
        # Look-ahead: layer L guesses layer L+1's experts when L+1 has any (a MoE layer after a dense one
        # included); the first layer is never guessed.
        self._target = {idx: idx + 1 for idx in range(len(self._layers) - 1) if idx + 1 in experts}
        for idx, layer in enumerate(self._layers):
            if idx in experts:
                layer.mlp.experts = PagedExperts(idx, self)
            if not prefetch or idx not in self._target or not hasattr(layer, "post_attention_layernorm"):
                continue
            # The residual stream right after layer L's attention is what L+1's router will roughly see;
            # capture it at the input of L's post-attention norm.
            self._hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(
                self._capture_hook(idx)))
            if idx not in experts:
                # A dense layer has no run_layer to start the look-ahead from: its MLP's start does,
                # so the first MoE layer after dense ones (DeepSeek's layer 1) is prefetched too.
                self._hooks.append(layer.mlp.register_forward_pre_hook(self._dense_hook(idx)))

    def _dense_hook(self, idx: int):
        def hook(_module, _args):
            self._prefetch_next(idx)
        return hook

    def _capture_hook(self, idx: int):
        def hook(_module, args):
            self._after_attention[idx] = args[0]
        return hook

    @torch.no_grad()
    def run_layer(self, layer: int, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor) -> torch.Tensor:
        # fp32 accumulator, rounded to the model dtype once at the end: what transformers' grouped_mm
        # and batched_mm paths do (weight and sum in fp32). Rounding each expert's share to bf16 and
        # summing in bf16 moved outputs by an ulp, enough to flip a near-tie in the next router.
        out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        tokens, counts = self._route(top_k_index)
        needed = [e for e, n in enumerate(counts) if n]
        self._score_guess(layer, needed)
        # Hits first: they are counted and used before this layer's own misses can evict them.
        needed.sort(key=lambda e: not self.cache.is_resident((layer, e)))
        on_host = [e for e in needed if self._run_on_host(layer, e, counts[e])]
        on_device = deque(e for e in needed if e not in on_host)
        window = min(len(on_device), self.cache.slots_for(layer))
        in_flight: deque[int] = deque()

        def page_in() -> None:
            while on_device and len(in_flight) < window:
                key = (layer, on_device.popleft())
                self.cache.fetch(key)
                self.cache.protect(key)
                in_flight.append(key[1])

        page_in()
        self._prefetch_next(layer)  # queued behind this layer's demand copies on the side stream
        for expert in on_host:
            self.cache.note_cpu_exec((layer, expert))
            self._apply(out, hidden_states, tokens[expert], top_k_weights,
                        *self.store.weights((layer, expert)))
        while in_flight:
            key = (layer, in_flight.popleft())
            self._apply(out, hidden_states, tokens[key[1]], top_k_weights,
                        *self.cache.weights(key))
            self.cache.release(key)
            page_in()
        return out.to(hidden_states.dtype)

    def _route(self, top_k_index: torch.Tensor) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], list[int]]:
        """Each routed expert's (token rows, top-k positions), as torch.where(top_k_index == e) gives them,
        and the tokens per expert, for one host sync per layer: the per-expert counts are the only
        number the host reads (unique().tolist() and a where() per expert were one sync each).
        A stable sort of the flat (token-major) routing keeps each expert's rows in token order."""
        k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts_dev = torch.zeros(self.num_experts, dtype=torch.int64, device=flat.device)
        counts_dev.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int64))  # no sync, unlike bincount
        counts = counts_dev.tolist()  # the one host sync of the routing path
        tokens, start = {}, 0
        for expert, n in enumerate(counts):
            if n:
                positions = order[start:start + n]
                tokens[expert] = (positions // k, positions % k)
            start += n
        return tokens, counts

    def _apply(self, out, hidden_states, tokens, top_k_weights, gate_up, down) -> None:
        """One expert's SwiGLU MLP on its tokens, weighted in fp32 and added into the fp32 `out`."""
        token_idx, top_k_pos = tokens
        state = hidden_states[token_idx]
        if gate_up.device != state.device:  # CPU execution of a miss: move activations, not weights
            state = state.to(gate_up.device)
        gate, up = F.linear(state, gate_up).chunk(2, dim=-1)
        expert_out = F.linear(self.act_fn(gate) * up, down).to(out.device)
        # The expert's output stays in the model dtype, as grouped_mm returns it; the weighting is fp32.
        weighted = expert_out.float() * top_k_weights[token_idx, top_k_pos, None].float()
        # index_put_ rather than index_add_: the result is the same (a token meets an expert at most
        # once, so no row gets two adds in one call), but CPU index_add_ took ~35 ms a call with 2
        # OpenMP threads on a busy host. Experts are added in page-in order, not by top-k position as
        # grouped_mm's sum(dim=1) does: identical for top-2 (fp32 a+b == b+a), last-bit differences
        # for top-k > 2.
        out.index_put_((token_idx,), weighted, accumulate=True)

    def _run_on_host(self, layer: int, expert: int, n_tokens: int) -> bool:
        return (self.cpu_miss_exec and n_tokens <= self.cpu_miss_max_tokens
                and not self.cache.is_resident((layer, expert)))

    @torch.no_grad()
    def _prefetch_next(self, layer: int) -> None:
        """Guess layer+1's experts with its own norm and router on the post-attention residual of
        `layer`. The router is the family's own, so DeepSeek's group-limited routing and
        scaling apply to the guess as they will to the real routing."""
        residual = self._after_attention.pop(layer, None)
        target = self._target.get(layer)
        if not self.prefetch or residual is None or target is None:
            return
        nxt = self._layers[target]
        # .forward() bypasses module hooks, so transformers' router-logit recorder never sees it.
        normed = nxt.post_attention_layernorm.forward(residual)
        routed = nxt.mlp.gate.forward(normed.reshape(-1, normed.shape[-1]))
        if not (isinstance(routed, tuple) and len(routed) == 3):
            # a router that returns only logits leaves top-k to its MoE block: no guess to make
            log.warning("layer %d's router returns no (logits, weights, indices); no look-ahead for it", target)
            self._target.pop(layer)
            return
        _, scores, indices = routed
        weight = torch.zeros(self.num_experts, device=scores.device, dtype=torch.float32)
        weight.index_add_(0, indices.flatten(), scores.flatten().float())
        weight_list = weight.tolist()  # one device sync, not one per expert
        ranked = sorted((e for e, w in enumerate(weight_list) if w > 0),
                        key=lambda e: -weight_list[e])
        self._guesses[target] = set(ranked)
        for expert in ranked[:self.cache.slots_for(target)]:
            if not self.cache.fetch((target, expert), prefetch=True):
                break

    def _score_guess(self, layer: int, needed: list[int]) -> None:
        guess = self._guesses.pop(layer, None)
        if guess is not None:
            self.cache.count(layer, "prefetch_guesses", len(guess))
            self.cache.count(layer, "prefetch_guess_hits", len(guess & set(needed)))

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._after_attention.clear()
