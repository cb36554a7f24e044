"""Reads a Hugging Face decoder-only safetensors folder one decoder layer at a time.

Owns key layouts (text-only, Gemma-3 multimodal prefixes), per-layer byte sizes and disk-read counters.
"""
from __future__ import annotations

import json
import math
import logging
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from jobs.paging.errors import ModelFolderError

logger = logging.getLogger(__name__)

# Where the text decoder lives, most specific first: Gemma3ForConditionalGeneration as released
# (27B), as newer transformers write it, then plain causal LMs. The vision tower is never read.
_TEXT_LAYOUTS = (
    ("language_model.model.", "language_model.lm_head."),
    ("model.language_model.", "lm_head."),
    ("model.", "lm_head."),
)
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class TensorEntry:
    key: str          # name inside the checkpoint file
    file: Path        # shard that holds it
    nbytes: int       # bytes on disk, from the safetensors header
    numel: int        # elements, so sizes at another dtype need no tensor read


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Tensor sizes from a file's JSON header alone (no tensor data is touched)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    return {k: TensorEntry(k, path, v["data_offsets"][1] - v["data_offsets"][0], math.prod(v["shape"]))
            for k, v in header.items()}


class ModelStore:
    """Index of one model folder: which checkpoint tensors make up each decoder layer, and a reader."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self.config = _load_config(self.model_dir)
        self.text_config = self.config.get_text_config()
        entries = _index_tensors(self.model_dir)
        self.layer_entries, self.other_entries, self.prefix = _split_by_layer(entries, self.model_dir)
        self.num_layers = self.text_config.num_hidden_layers
        if len(self.layer_entries) != self.num_layers:
            raise ModelFolderError(
                f"config.json in {self.model_dir} declares {self.num_layers} layers but the safetensors "
                f"hold {len(self.layer_entries)} (prefix {self.prefix!r}layers.N)"
            )
        self.bytes_read = 0
        self._lock = threading.Lock()  # the prefetch thread and the caller may both read
        self._handles: dict[Path, object] = {}

    @property
    def layer_nbytes(self) -> list[int]:
        """Bytes each decoder layer occupies in the checkpoint files."""
        return [sum(e.nbytes for e in layer.values()) for layer in self.layer_entries]

    def layer_nbytes_as(self, dtype: torch.dtype) -> list[int]:
        """Bytes each decoder layer needs once converted to `dtype` (what the budgets count)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return [sum(e.numel * itemsize for e in layer.values()) for layer in self.layer_entries]

    def read_layer(self, index: int, dtype: torch.dtype, *, pin: bool = False) -> dict[str, torch.Tensor]:
        """The tensors of decoder layer `index`, named relative to the layer module."""
        return self._read(self.layer_entries[index], dtype, pin)

    def read_non_layer(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Embeddings, final norm and lm_head (when not tied), named as in a *ForCausalLM model."""
        return self._read(self.other_entries, dtype, pin=False)

    def _read(self, entries: dict[str, TensorEntry], dtype: torch.dtype, pin: bool) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        with self._lock:
            for name, entry in entries.items():
                handle = self._handles.get(entry.file)
                if handle is None:
                    handle = self._handles[entry.file] = safe_open(str(entry.file), framework="pt", device="cpu")
                tensor = handle.get_tensor(entry.key)  # copies just this tensor out of the mmap
                self.bytes_read += entry.nbytes
                if tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor = tensor.to(dtype)
                if pin:
                    # Page-locked so the host->device copy can run async; torch caches pinned blocks.
                    tensor = tensor.pin_memory()
                out[name] = tensor
        return out

    def close(self) -> None:
        with self._lock:
            self._handles.clear()


def _load_config(model_dir: Path):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not model_dir.is_dir():
        raise ModelFolderError(f"model folder {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise ModelFolderError(f"no config.json in {model_dir}: point --model at a Hugging Face model folder")
    config = AutoConfig.from_pretrained(model_dir)
    text_type = config.get_text_config().model_type
    if text_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or config.is_encoder_decoder:
        raise ModelFolderError(
            f"config.json in {model_dir} describes model_type {text_type!r}, which is not a decoder-only causal LM"
        )
    return config


def _index_tensors(model_dir: Path) -> dict[str, TensorEntry]:
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = sorted({model_dir / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelFolderError(f"{index_path.name} in {model_dir} names missing shards: {', '.join(missing)}")
    else:
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ModelFolderError(f"no *.safetensors in {model_dir} (only safetensors checkpoints can be streamed)")
    entries: dict[str, TensorEntry] = {}
    for path in files:
        entries.update(read_safetensors_header(path))
    return entries


def _split_by_layer(entries: dict[str, TensorEntry], model_dir: Path):
    """Group checkpoint keys into per-layer dicts and the rest, under CausalLM names."""
    for body_prefix, head_prefix in _TEXT_LAYOUTS:
        if any(k.startswith(body_prefix + "layers.") for k in entries):
            break
    else:
        raise ModelFolderError(f"no decoder layers (keys like model.layers.0.*) in the safetensors of {model_dir}")
    layers: dict[int, dict[str, TensorEntry]] = {}
    others: dict[str, TensorEntry] = {}
    for key, entry in entries.items():
        if key.startswith(body_prefix):
            rest = key[len(body_prefix):]
            m = _LAYER_RE.match(rest)
            if m:
                layers.setdefault(int(m.group(1)), {})[m.group(2)] = entry
            else:
                others["model." + rest] = entry
        elif key.startswith(head_prefix):
            others["lm_head." + key[len(head_prefix):]] = entry
    if sorted(layers) != list(range(len(layers))):
        raise ModelFolderError(f"decoder layer numbers in {model_dir} are not contiguous: {sorted(layers)}")
    logger.debug("%s: %d layers under %r, %d other tensors", model_dir, len(layers), body_prefix, len(others))
    return [layers[i] for i in range(len(layers))], others, body_prefix
