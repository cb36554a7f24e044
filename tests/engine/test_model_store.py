"""The store reads exactly one layer's tensors per layer read, under every supported key layout."""
from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import header_sizes

from jobs.contract.errors import ModelFolderError
from jobs.paging.dense import model_store
from jobs.paging.dense.model_store import ModelStore

pytestmark = pytest.mark.engine


def _checkpoint_sizes(model_dir):
    sizes = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        sizes.update(header_sizes(path))
    return sizes


@pytest.mark.parametrize("kind", ["llama", "language_model.model.", "model.language_model."])
def test_layer_read_touches_only_that_layer(tiny_dirs, monkeypatch, kind):
    model_dir = tiny_dirs[kind]
    sizes = _checkpoint_sizes(model_dir)
    prefix = "model." if kind == "llama" else kind
    requested: list[str] = []
    real_safe_open = model_store.safe_open

    class SpyHandle:
        def __init__(self, *args, **kwargs):
            self._inner = real_safe_open(*args, **kwargs)

        def get_tensor(self, key):
            requested.append(key)
            return self._inner.get_tensor(key)

    monkeypatch.setattr(model_store, "safe_open", SpyHandle)
    store = ModelStore(model_dir)
    for index in range(store.num_layers):
        requested.clear()
        before = store.bytes_read
        tensors = store.read_layer(index, torch.float32)
        expected = {k for k in sizes if k.startswith(f"{prefix}layers.{index}.")}
        assert set(requested) == expected
        assert store.bytes_read - before == sum(sizes[k] for k in expected)
        assert len(tensors) == len(expected)
    requested.clear()
    store.read_non_layer(torch.float32)
    assert not any(".layers." in k or "vision" in k for k in requested)


def test_gemma_270m_layer_bytes_match_header(gemma_dir):
    sizes = header_sizes(gemma_dir / "model.safetensors")
    store = ModelStore(gemma_dir)
    assert store.num_layers == 18
    for index, nbytes in enumerate(store.layer_nbytes):
        assert nbytes == sum(v for k, v in sizes.items() if k.startswith(f"model.layers.{index}."))
    assert store.layer_nbytes_as(torch.float32)[0] == 2 * store.layer_nbytes[0]  # bf16 on disk


def test_not_a_model_folder_names_what_is_missing(tmp_path, tiny_dirs):
    with pytest.raises(ModelFolderError, match="no config.json"):
        ModelStore(tmp_path)
    (tmp_path / "config.json").write_text((tiny_dirs["llama"] / "config.json").read_text())
    with pytest.raises(ModelFolderError, match=r"no \*\.safetensors"):
        ModelStore(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ModelFolderError, match="not a decoder-only"):
        ModelStore(tmp_path)
