"""Reads a Hugging Face decoder-only safetensors folder one decoder layer at a time.

Owns key layouts (text-only, Gemma-3 multimodal prefixes), per-layer byte sizes and disk-read counters,
and where a layer's fast variant lives (packed parts from MODEL/variants/NAME/, the rest from the original).
"""
from __future__ import annotations

import json
import logging
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from jobs.contract.errors import ModelFolderError
from jobs.paging.mapped import MappedFiles
from jobs.paging.plan.shape import safetensors_header
from jobs.paging.quant import QuantSpec, Variant

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
    return {k: TensorEntry(k, path, v["data_offsets"][1] - v["data_offsets"][0], math.prod(v["shape"]))
            for k, v in safetensors_header(path).items()}


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
        self.variant: Variant | None = None  # set by open_variant()
        self.fast_entries: list[dict[str, TensorEntry]] = []   # per layer, packed parts under NAME.W_q/...
        self.fast_shapes: list[dict[str, tuple[int, int]]] = []  # per layer, quantized name -> weight shape
        self._lock = threading.Lock()  # the prefetch thread and the caller may both read
        self._handles: dict[Path, safe_open] = {}
        self._mapped = MappedFiles()  # zero-copy views for read_layer_into

    @property
    def layer_nbytes(self) -> list[int]:
        """Bytes each decoder layer occupies in the checkpoint files."""
        return [sum(e.nbytes for e in layer.values()) for layer in self.layer_entries]

    def layer_nbytes_as(self, dtype: torch.dtype) -> list[int]:
        """Bytes each decoder layer needs once converted to `dtype` (what the budgets count)."""
        return [sum(e.numel * dtype.itemsize for e in layer.values()) for layer in self.layer_entries]

    @property
    def layer_nbytes_fast(self) -> list[int]:
        """Bytes a fast read of each layer takes from disk: packed parts plus the unquantized rest."""
        self._need_variant()
        return [sum(e.nbytes for e in layer.values()) for layer in self.fast_entries]

    def layer_nbytes_fast_as(self, dtype: torch.dtype) -> list[int]:
        """Host bytes of each fast layer: packed parts as stored, the rest converted to `dtype`."""
        self._need_variant()
        return [sum(e.nbytes if name.rpartition(".")[0] in shapes else e.numel * dtype.itemsize
                    for name, e in layer.items()) for layer, shapes in zip(self.fast_entries, self.fast_shapes)]

    def open_variant(self, spec: QuantSpec | None = None) -> None:
        """Index the folder's quantized variant `spec` (its only one when None) so read_layer_fast() can read it."""
        try:
            variant = Variant.open(self.model_dir, spec)
        except FileNotFoundError:
            raise ModelFolderError(
                f"{self.model_dir} has no quantized variant for fast layers: run `lab-attendant model quantize "
                f"{self.model_dir.name} --bits 4` (or python -m jobs.paging.quant --model {self.model_dir}) "
                "first, or use --variant precise") from None
        except ValueError as exc:
            raise ModelFolderError(str(exc)) from None
        parts: dict[str, TensorEntry] = {}
        for path in sorted(set(variant.file_of.values())):
            if not path.is_file():
                raise ModelFolderError(f"variant {variant.path} names a missing shard {path.name}; quantize again")
            parts.update(read_safetensors_header(path))
        self.fast_entries, self.fast_shapes = [], []
        for layer in self.layer_entries:
            entries: dict[str, TensorEntry] = {}
            shapes: dict[str, tuple[int, int]] = {}
            for name, entry in layer.items():
                if entry.key not in variant.shapes:
                    entries[name] = entry  # norms and other small tensors come from the original files
                    continue
                for part_key in variant.part_keys(entry.key):
                    if part_key not in parts:
                        raise ModelFolderError(f"variant {variant.path} lacks {part_key}; quantize again")
                    entries[name + part_key[len(entry.key):]] = parts[part_key]
                shapes[name] = variant.shapes[entry.key]
            self.fast_entries.append(entries)
            self.fast_shapes.append(shapes)
        self.variant = variant

    def _need_variant(self) -> None:
        if self.variant is None:
            raise RuntimeError("open_variant() must run before fast layers are read or sized")

    def read_layer(self, index: int, dtype: torch.dtype, *, pin: bool = False,
                   narrow_only: bool = False) -> dict[str, torch.Tensor]:
        """The tensors of decoder layer `index`, named relative to the layer module, in `dtype`.

        narrow_only: convert only tensors stored wider than `dtype`; the rest travel as stored and the
        device converts them (what crosses and what the RAM cache holds never exceed `dtype`'s bytes).
        """
        return self._read(self.layer_entries[index], dtype, pin, narrow_only=narrow_only)

    def read_layer_fast(self, index: int, dtype: torch.dtype, *, pin: bool = False,
                        narrow_only: bool = False) -> dict[str, torch.Tensor]:
        """Layer `index` from the variant: quantized weights as their packed parts (NAME.W_q uint8,
        NAME.scale and NAME.zero fp16, as stored: dequantizing is the caller's, on its device), the rest in `dtype`
        (narrow_only: as read_layer).
        """
        self._need_variant()
        packed = {n for n in self.fast_entries[index] if n.rpartition(".")[0] in self.fast_shapes[index]}
        return self._read(self.fast_entries[index], dtype, pin, keep_dtype=packed, narrow_only=narrow_only)

    def read_layer_into(self, index: int, out: dict[str, torch.Tensor], *, fast: bool = False) -> None:
        """Copy layer `index` (its fast variant's packed parts when `fast`) straight from the page cache into
        `out` (views of a streaming slot or its pinned staging buffer), converting to each view's dtype on the
        way: no intermediate tensor is allocated."""
        entries = self.fast_entries[index] if fast else self.layer_entries[index]
        for name, entry in entries.items():
            with self._lock:
                source = self._mapped[entry.file].view(entry.key)
                self.bytes_read += entry.nbytes
            out[name].copy_(source.view(out[name].shape))

    def layer_parts(self, index: int, *, fast: bool = False) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """(shape, stored dtype) of each tensor of layer `index` (or its fast parts), from the headers."""
        entries = self.fast_entries[index] if fast else self.layer_entries[index]
        out = {}
        for name, entry in entries.items():
            dtype, shape, *_ = self._mapped[entry.file].entries[entry.key]
            out[name] = (torch.Size(shape), dtype)
        return out

    def read_non_layer(self, dtype: torch.dtype, *, narrow_only: bool = False) -> dict[str, torch.Tensor]:
        """Embeddings, final norm and lm_head (when not tied), named as in a *ForCausalLM model."""
        return self._read(self.other_entries, dtype, pin=False, narrow_only=narrow_only)

    def _read(self, entries: dict[str, TensorEntry], dtype: torch.dtype, pin: bool,
              keep_dtype: frozenset[str] | set[str] = frozenset(), narrow_only: bool = False) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        with self._lock:
            for name, entry in entries.items():
                handle = self._handles.get(entry.file)
                if handle is None:
                    handle = self._handles[entry.file] = safe_open(str(entry.file), framework="pt", device="cpu")
                tensor = handle.get_tensor(entry.key)  # copies just this tensor out of the mmap
                self.bytes_read += entry.nbytes
                convert = tensor.is_floating_point() and tensor.dtype != dtype and name not in keep_dtype
                if convert and not (narrow_only and tensor.element_size() <= dtype.itemsize):
                    tensor = tensor.to(dtype)
                if pin:
                    # Page-locked so the host->device copy can run async; torch caches pinned blocks.
                    tensor = tensor.pin_memory()
                out[name] = tensor
        return out

    def close(self) -> None:
        with self._lock:
            self._handles.clear()
            self._mapped.close()


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
