"""Per-layer choice between a model's precise (original dtype) and fast (quantized) decoder layers.

Owns the policy only: a deterministic function of layer sizes, mode and budget; the engines apply it.
"""
from __future__ import annotations

from typing import Sequence

from jobs.contract.errors import BudgetError
from jobs.contract.spec import VARIANT_MODES, ModelSettings

PRECISE, FAST = "precise", "fast"
# One precise layer at each end by default: the first layer sees raw embeddings and the last one
# feeds the lm_head, so their quantization error is not averaged out by later layers (the usual
# finding in mixed-precision schemes); on an 18-layer model it costs 2 of 18 layers at full size.
DEFAULT_KEEP_PRECISE = ModelSettings.keep_precise_layers


def choose_variants(num_layers: int, precise_bytes_per_layer: Sequence[int], fast_bytes_per_layer: Sequence[int],
                    mode: str, *, keep_precise: int = DEFAULT_KEEP_PRECISE, stream_bytes_budget: int | None = None,
                    resident_layers: int = 0) -> list[str]:
    """PRECISE or FAST for every layer.

    precise: all precise. fast: every layer that has quantized tensors is fast (a layer whose fast
    read is not smaller has none and stays precise). auto: the first and last `keep_precise` layers
    precise, the rest fast; with `stream_bytes_budget` (bytes one pass reads from disk), further
    layers are upgraded to precise from the edges inward while the streamed bytes still fit.
    Resident layers (0..resident_layers-1, kept on the device by the VRAM plan) are read once, not
    each pass, and sit on the device at the compute dtype whichever variant they come from, so in
    auto mode they are always precise and never count against the budget. Explicit `fast` means
    fast everywhere, resident layers included: the user asked for the quantized model.
    """
    if mode not in VARIANT_MODES:
        raise ValueError(f"variant {mode!r} is not one of {', '.join(VARIANT_MODES)}")
    if len(precise_bytes_per_layer) != num_layers or len(fast_bytes_per_layer) != num_layers:
        raise ValueError(f"need {num_layers} per-layer sizes for both variants")
    if keep_precise < 0:
        raise ValueError(f"--keep-precise {keep_precise} must be >= 0")
    has_fast = [f < p for p, f in zip(precise_bytes_per_layer, fast_bytes_per_layer)]
    if mode == PRECISE:
        return [PRECISE] * num_layers
    if mode == FAST:
        return [FAST if ok else PRECISE for ok in has_fast]
    choice = [PRECISE if (i < keep_precise or i >= num_layers - keep_precise or i < resident_layers
                          or not has_fast[i]) else FAST for i in range(num_layers)]
    if stream_bytes_budget is None:
        return choice

    def streamed_bytes() -> int:
        return sum(bytes_by_choice(choice, precise_bytes_per_layer, fast_bytes_per_layer)[resident_layers:])

    floor = streamed_bytes()
    if floor > stream_bytes_budget:
        raise BudgetError(
            f"a pass must read {floor} bytes with the first/last {keep_precise} layers precise and the rest "
            f"fast, more than the per-pass budget of {stream_bytes_budget} bytes; raise the budget or lower "
            f"--keep-precise")
    for i in _edges_inward(num_layers):
        if choice[i] == PRECISE:
            continue
        choice[i] = PRECISE
        if streamed_bytes() > stream_bytes_budget:
            choice[i] = FAST  # stop at the first layer that does not fit: precise layers stay at the edges
            break
    return choice


def bytes_by_choice(choice: Sequence[str], precise_bytes_per_layer: Sequence[int],
                    fast_bytes_per_layer: Sequence[int]) -> list[int]:
    """Each layer's size in the variant chosen for it (the caller slices off resident layers)."""
    return [(fast_bytes_per_layer if c == FAST else precise_bytes_per_layer)[i] for i, c in enumerate(choice)]


def _edges_inward(num_layers: int) -> list[int]:
    """0, n-1, 1, n-2, ...: the order in which auto mode upgrades layers."""
    order = []
    for i in range((num_layers + 1) // 2):
        order.append(i)
        if num_layers - 1 - i != i:
            order.append(num_layers - 1 - i)
    return order


def summary(choice: Sequence[str]) -> str:
    """One letter per layer, e.g. "PFFFFP": what stats and run metrics record."""
    return "".join("F" if c == FAST else "P" for c in choice)
