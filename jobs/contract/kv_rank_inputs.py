"""The `kv_rank_study` kind's inputs, read and checked without torch: passages (a folder of .txt/.md or a .jsonl),
the ranks list, and the checks the supervisor runs at submit (`check_params`, hooked in as the kind's `check`)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.contract.confine import Roots
from jobs.contract.errors import ParamError
from jobs.contract.model_facts import ModelFacts

TEXT_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class Passage:
    id: str                   # file stem, or the line's "id" (else "line-N") for JSONL
    text: str
    source: str               # file (and line, for JSONL)


def parse_ranks(raw: Any) -> tuple[int, ...]:
    """'4,8,16' (or a list of ints) -> sorted unique ranks; ParamError for anything else or a rank < 1."""
    items = raw if isinstance(raw, (list, tuple)) else str(raw).replace(" ", "").split(",")
    try:
        ranks = [int(r) for r in items if str(r) != ""]
    except ValueError:
        raise ParamError(f"param 'ranks' must be comma-separated integers like 4,8,16,32, got {raw!r}") from None
    if not ranks:
        raise ParamError("param 'ranks' is empty; pass at least one rank, e.g. -p ranks=8,32")
    bad = [r for r in ranks if r < 1]
    if bad:
        raise ParamError(f"param 'ranks' holds {bad[0]}: every rank must be at least 1")
    return tuple(sorted(set(ranks)))


def load_passages(path: str | Path, roots: Roots | None = None) -> list[Passage]:
    """A folder's .txt/.md files (sorted by name, one passage each) or a .jsonl's lines ({"text": ...});
    ParamError when there is none or a line is malformed. With `roots` (the worker), the path is resolved
    again and confined, files that resolve outside are skipped with a warning, and each read is checked
    (jobs.contract.confine)."""
    path = Path(path) if roots is None else roots.param("texts", path)

    def read(p: Path) -> str:
        return p.read_text(encoding="utf-8") if roots is None else roots.read_text(p)

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if roots is not None:
            files = roots.keep(files)
        passages = [Passage(p.stem, read(p), str(p)) for p in files]
    elif path.is_file() and path.suffix == ".jsonl":
        passages = []
        for n, line in enumerate(read(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text = obj.get("text", obj.get("body")) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    raise ValueError("no 'text' string")
            except ValueError as exc:
                raise ParamError(f"{path} line {n}: {exc}; each line must be a JSON object with a "
                                 "'text' string") from None
            passages.append(Passage(str(obj.get("id") or f"line-{n}"), text, f"{path}:{n}"))
    else:
        raise ParamError(f"param 'texts': {path} is neither a folder of .txt/.md passages nor a .jsonl file")
    passages = [p for p in passages if p.text.strip()]
    if not passages:
        raise ParamError(f"param 'texts': no passages in {path}; put .txt/.md files there (or 'text' lines in "
                         "the .jsonl), each longer than context + continuation tokens")
    return passages


def check_params(params: dict[str, Any], model: ModelFacts | None) -> None:
    """ParamError for a study that cannot run: bad ranks, no passages, a rank above the context or (the model
    given) the model's head_dim: one head's K or V matrix has rank at most min(tokens, head_dim). Sizes have
    their bounds in the kind's Params."""
    ranks = parse_ranks(params.get("ranks", ""))
    context = params.get("context")
    if context is not None and ranks[-1] > context:
        raise ParamError(f"param 'ranks' holds {ranks[-1]} > context {context}: a cache of {context} tokens has "
                         f"rank at most {context}; lower the rank or raise the context")
    if "texts" in params and Path(params["texts"]).exists():  # a schedule's may appear later
        load_passages(params["texts"])
    if model is not None:
        head_dim = model.head_dim
        if head_dim is not None and ranks[-1] > head_dim:
            raise ParamError(f"param 'ranks' holds {ranks[-1]} > head_dim {head_dim} of the model in {model.where}: "
                             f"one head's K or V has rank at most {head_dim}; use ranks up to {head_dim}")
