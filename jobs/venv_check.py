"""`python -m jobs.venv_check`: what the experimental venv has, as one JSON line.

Run by `lab-attendant venv check` inside the experimental venv (the supervisor never imports torch).
"""
from __future__ import annotations

import importlib.metadata as md
import json
import sys


def main() -> int:
    out: dict[str, str | bool | list[str] | None] = {"python": sys.version.split()[0], "executable": sys.executable}
    for dist in ("torch", "transformers", "safetensors", "accelerate", "gguf"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    try:
        import torch
        out["torch_cuda"] = torch.version.cuda  # the CUDA it was built for; None: a CPU build
        out["cuda_available"] = torch.cuda.is_available()
        out["cuda_devices"] = [torch.cuda.get_device_name(i)
                               for i in range(torch.cuda.device_count())]
    except Exception as exc:  # noqa: BLE001 - a broken torch is what this check reports
        out["cuda_available"], out["torch_error"] = False, f"{type(exc).__name__}: {exc}"
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
