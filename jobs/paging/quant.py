"""4-bit (or 8-bit) weight-only variants of a model folder, through HQQ (Half-Quadratic Quantization).

Owns the variant format both engines read: per quantized weight three plain tensors (`KEY.W_q` packed
codes, `KEY.scale`, `KEY.zero`, grouped along the input dimension) in safetensors shards under
`MODEL/variants/q{bits}g{group}/`, and a `variant.json` manifest written last. The original files are
never touched. Quantizing and dequantizing are HQQ's (`hqq.core.quantize.Quantizer`); dequantizing
runs wherever the packed tensors are, so the engines copy 4-bit bytes and expand them on the device.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

VARIANTS_DIR = "variants"
MANIFEST_NAME = "variant.json"
FORMAT_VERSION = 1
PARTS = ("W_q", "scale", "zero")
SUPPORTED_BITS = (4, 8)
# Decoder-layer tensors, whatever prefix the layout puts before `layers.N.`.
_LAYER_KEY_RE = re.compile(r"(^|\.)layers\.\d+\.")
# transformers 5's fused Mixtral experts, [E, 2I, H] and [E, H, I]: quantized one expert slice at a
# time under `KEY.E`, so a reader pages one expert without touching the other E-1.
_FUSED_EXPERTS_RE = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")
_SHARD_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 64

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"--bits {self.bits} is not supported: use one of {SUPPORTED_BITS}")
        if self.group_size < 8 or self.group_size & (self.group_size - 1):
            raise ValueError(f"--group-size {self.group_size} must be a power of two >= 8 (e.g. 64)")

    @property
    def name(self) -> str:
        """Folder name of the variant under MODEL/variants/."""
        return f"q{self.bits}g{self.group_size}"

    def quantizable(self, shape: tuple[int, ...] | torch.Size) -> bool:
        """2-D weights whose rows split into whole groups (an even number of them, for 4-bit packing)."""
        if len(shape) != 2 or shape[1] % self.group_size:
            return False
        groups = shape[0] * shape[1] // self.group_size
        return self.bits != 4 or groups % 2 == 0

    def nbytes(self, shape: tuple[int, ...] | torch.Size) -> int:
        """Bytes of the three parts: packed codes plus an fp16 scale and zero per group."""
        numel = shape[0] * shape[1]
        return numel * self.bits // 8 + 2 * 2 * (numel // self.group_size)


def quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """HQQ-quantize one [out, in] weight: {"W_q": uint8 codes, "scale": fp16, "zero": fp16}."""
    from hqq.core.quantize import Quantizer

    if not spec.quantizable(weight.shape):
        raise ValueError(f"weight of shape {tuple(weight.shape)} cannot be quantized with {spec}")
    w_q, meta = Quantizer.quantize(weight, nbits=spec.bits, group_size=spec.group_size, axis=1,
                                   optimize=True, round_zero=False, device=str(weight.device))
    return {"W_q": w_q.contiguous(), "scale": meta["scale"].to(torch.float16).contiguous(),
            "zero": meta["zero"].to(torch.float16).contiguous()}


def dequantize_weight(parts: dict[str, torch.Tensor], shape: tuple[int, int], spec: QuantSpec,
                      dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight in `dtype`, computed on the device the parts are on."""
    from hqq.core.quantize import Quantizer

    packing = Quantizer.bit_to_packing[spec.bits]
    meta = {"nbits": spec.bits, "group_size": spec.group_size, "shape": torch.Size(shape), "axis": 1,
            "packing": packing, "view_as_float": False, "compute_dtype": dtype,
            "unpack_view_dtype": Quantizer.unpack_view_dtype[packing],
            "scale": parts["scale"].to(dtype), "zero": parts["zero"].to(dtype)}
    return Quantizer.dequantize(parts["W_q"], meta)


def variant_dir(model_dir: str | Path, spec: QuantSpec) -> Path:
    return Path(model_dir) / VARIANTS_DIR / spec.name


class Variant:
    """A written variant: which original keys it quantized, their shapes and where their parts are."""

    def __init__(self, path: Path) -> None:
        self.path = path
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no {MANIFEST_NAME} in {path}: the variant is missing or was interrupted")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT_VERSION:
            raise ValueError(f"{manifest_path} has format {self.manifest.get('format')!r}, this engine reads "
                             f"{FORMAT_VERSION}; quantize the model again")
        self.spec = QuantSpec(self.manifest["bits"], self.manifest["group_size"])
        self.shapes: dict[str, tuple[int, int]] = {k: tuple(v) for k, v in self.manifest["tensors"].items()}
        self.file_of: dict[str, Path] = {k: path / f for k, f in self.manifest["files"].items()}

    @classmethod
    def open(cls, model_dir: str | Path, spec: QuantSpec | None = None) -> "Variant":
        """The variant `spec` of the folder, or its only one when spec is None."""
        if spec is not None:
            return cls(variant_dir(model_dir, spec))
        found = sorted(p for p in (Path(model_dir) / VARIANTS_DIR).glob("*") if (p / MANIFEST_NAME).is_file())
        if not found:
            raise FileNotFoundError(f"{model_dir} has no quantized variant; run `lab-attendant model quantize "
                                    f"NAME --bits 4` (or python -m jobs.paging.quant --model {model_dir})")
        if len(found) > 1:
            raise ValueError(f"{model_dir} has several variants ({', '.join(p.name for p in found)}); name one")
        return cls(found[0])

    def part_keys(self, key: str) -> list[str]:
        return [f"{key}.{part}" for part in PARTS]

    def nbytes(self, key: str) -> int:
        return self.spec.nbytes(self.shapes[key])


def _expert_slice(f: Any, key: str, expert: int) -> Any:
    """Expert `expert`'s [out, in] slice of a fused [E, out, in] tensor, read on its own."""
    return f.get_slice(key)[expert]


def write_variant(model_dir: str | Path, spec: QuantSpec, *, force: bool = False,
                  device: str | torch.device = "cpu") -> Path:
    """Quantize every quantizable decoder-layer weight of the folder into MODEL/variants/NAME.

    Non-decoder tensors (embeddings, lm_head, final norm) and small ones (norms, biases) are left to
    the original files. Fused 3-D expert tensors are quantized per expert as `KEY.E`. In a Mixtral
    folder attention weights are quantized too (the dense engine can use them); the expert pager
    reads only the expert parts and keeps attention precise. `device` is where HQQ runs: a
    14336x4096 weight takes ~85 s on a busy 2-core CPU, well under a second on a GPU. Written into
    NAME.tmp and renamed, manifest last: a crash leaves no variant.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}: only safetensors folders can be quantized")
    out = variant_dir(model_dir, spec)
    if (out / MANIFEST_NAME).is_file() and not force:
        logger.info("variant %s already written", out)
        return out
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    shapes: dict[str, list[int]] = {}
    file_of: dict[str, str] = {}
    kept: list[str] = []
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    precise_bytes = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(set(file_of.values())) + 1:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt", "quantizer": "hqq"})
            file_of.update({k.rsplit(".", 1)[0]: name for k in shard})
            shard, shard_bytes = {}, 0

    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if not _LAYER_KEY_RE.search(key):
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                pieces: list[tuple[str, Any, Callable[[], Any]]]
                if len(shape) == 3 and _FUSED_EXPERTS_RE.search(key):
                    # one [out, in] slice per expert, read one at a time
                    pieces = [(f"{key}.{e}", shape[1:], partial(_expert_slice, f, key, e))
                              for e in range(shape[0])]
                else:
                    pieces = [(key, shape, partial(f.get_tensor, key))]
                if not all(spec.quantizable(s) for _, s, _ in pieces):
                    kept.append(key)
                    continue
                for name, piece_shape, read in pieces:
                    weight = read()
                    if not weight.is_floating_point():
                        kept.append(key)
                        break
                    precise_bytes += weight.numel() * weight.element_size()
                    for part, tensor in quantize_weight(weight.to(device), spec).items():
                        shard[f"{name}.{part}"] = tensor.cpu()
                        shard_bytes += tensor.numel() * tensor.element_size()
                    shapes[name] = list(piece_shape)
                    if shard_bytes >= _SHARD_BYTES:
                        flush()
    flush()
    if not shapes:
        shutil.rmtree(tmp)
        raise ValueError(f"no decoder-layer weight in {model_dir} can be quantized with group size "
                         f"{spec.group_size}; try a smaller --group-size")
    import hqq

    manifest = {
        "format": FORMAT_VERSION, "quantizer": "hqq", "quantizer_version": getattr(hqq, "__version__", "?"),
        "bits": spec.bits, "group_size": spec.group_size, "axis": 1, "scale_dtype": "float16",
        "tensors": shapes, "files": file_of, "kept_precise": kept,
        "source_files": {p.name: p.stat().st_size for p in files},
        "bytes_precise": precise_bytes, "bytes_quantized": sum(spec.nbytes(tuple(s)) for s in shapes.values()),
        "quantize_s": round(time.perf_counter() - start, 1),
    }
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    logger.info("wrote %s: %d weights, %d -> %d bytes in %.1f s", out, len(shapes), precise_bytes,
                manifest["bytes_quantized"], manifest["quantize_s"])
    return out


if __name__ == "__main__":  # python -m jobs.paging.quant: the flags live in cli.py
    from jobs.paging.cli import quant_main
    raise SystemExit(quant_main())
