"""Where Ollama keeps a model it pulled: its manifest under ~/.ollama/models (or $OLLAMA_MODELS) names the
GGUF blob, so `model add NAME --ollama gemma3:27b` reuses the download without copying it."""
from __future__ import annotations

import json
import os
from pathlib import Path

from lab_attendant.errors import UserError

MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
DEFAULT_REGISTRY = "registry.ollama.ai"


def models_dir() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def manifest_path(ref: str, root: Path) -> Path:
    """gemma3:27b -> manifests/registry.ollama.ai/library/gemma3/27b; user/model and host/user/model too."""
    name, _, tag = ref.partition(":")
    parts = name.split("/")
    if len(parts) == 1:
        parts = [DEFAULT_REGISTRY, "library", *parts]
    elif len(parts) == 2:
        parts = [DEFAULT_REGISTRY, *parts]
    return root.joinpath("manifests", *parts, tag or "latest")


def find_blob(ref: str, root: Path | None = None) -> Path:
    """The GGUF blob of an Ollama model reference; UserError saying what to do when it is not there."""
    root = root or models_dir()
    manifest = manifest_path(ref, root)
    try:
        layers = json.loads(manifest.read_text())["layers"]
    except FileNotFoundError:
        raise UserError(f"Ollama has no model {ref!r} in {root} (no {manifest}); run `ollama pull {ref}` or set "
                        "OLLAMA_MODELS to the folder Ollama keeps its models in") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"Ollama manifest {manifest} cannot be read ({exc}); run `ollama pull {ref}` again") from None
    digests = [layer.get("digest", "") for layer in layers if layer.get("mediaType") == MODEL_MEDIA_TYPE]
    if not digests:
        raise UserError(f"Ollama manifest {manifest} has no model layer ({MODEL_MEDIA_TYPE}); is {ref!r} a "
                        "model, not an adapter?")
    blob = root / "blobs" / digests[0].replace(":", "-")
    if not blob.is_file():
        raise UserError(f"Ollama's manifest for {ref!r} names {blob.name}, which is not in {blob.parent}; run "
                        f"`ollama pull {ref}` again")
    return blob
