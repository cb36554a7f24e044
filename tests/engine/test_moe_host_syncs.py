"""Host syncs on the expert pager's routing path, counted on the CPU: every op that makes the host read a
device value (tolist, item, nonzero, one-argument where, unique, bool, a copy to the host) is recorded
by a TorchFunctionMode while a layer's run_layer runs; the bound is one per layer."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from moe_helpers import prompts, save_hf, tiny_mixtral
from torch.overrides import TorchFunctionMode

from jobs.paging.moe.load import load_paged_moe
from jobs.paging.open import spec_for

pytestmark = pytest.mark.engine

_READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.nonzero, torch.nonzero, torch.unique,
          torch.Tensor.unique, torch.unique_consecutive, torch.Tensor.__bool__, torch.Tensor.__int__,
          torch.Tensor.__float__, torch.Tensor.__index__, torch.masked_select, torch.Tensor.masked_select,
          torch.bincount, torch.Tensor.bincount, torch.Tensor.cpu, torch.Tensor.numpy, torch.argwhere}


class HostReads(TorchFunctionMode):
    """Counts, per layer being run, the calls that need a device -> host sync on CUDA."""

    def __init__(self) -> None:
        super().__init__()
        self.layer: int | None = None
        self.per_layer: Counter[int] = Counter()
        self.names: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reads = func in _READS or (func in (torch.where, torch.Tensor.where) and len(args) + len(kwargs) == 1)
        if reads and self.layer is not None:
            self.per_layer[self.layer] += 1
            self.names[getattr(func, "__name__", str(func))] += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("batch", [1, 4])
def test_one_host_sync_per_layer_on_the_routing_path(tmp_path, batch):
    """prefetch off (its guess reads one vector per layer, a path of its own): a forward over `batch`
    prompts reads the routing once per MoE layer, where unique().tolist() and a where() per routed expert
    made it 1 + experts-routed reads (9 for 8 experts at batch 4 x 12)."""
    model = tiny_mixtral()
    folder = save_hf(model, tmp_path / "mix")
    ids = prompts(batch, 12)
    with load_paged_moe(spec_for(folder), prefetch=False) as paged, torch.no_grad():
        reference = paged.model(ids).logits
        counter = HostReads()
        run_layer = paged.pager.run_layer

        def counted(layer, *args):
            counter.layer = layer
            try:
                return run_layer(layer, *args)
            finally:
                counter.layer = None

        paged.pager.run_layer = counted
        with counter:
            logits = paged.model(ids).logits
    layers = model.config.num_hidden_layers
    assert sorted(counter.per_layer) == list(range(layers)), counter.per_layer
    assert all(n == 1 for n in counter.per_layer.values()), (counter.per_layer, counter.names)
    assert counter.names == Counter({"tolist": layers})
    assert torch.equal(logits, reference)
