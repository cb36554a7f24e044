"""Job-kind registry: name -> module, params schema, needs_paging (stdlib only).

The supervisor validates a submission here without importing torch; the worker imports `module`.
"""
from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Callable, Iterable

from jobs.contract.command import parse_argv, resolve_program
from jobs.contract.errors import ParamError
from jobs.contract.kv_rank_inputs import check_params as _kv_rank_check
from jobs.contract.model_facts import ModelFacts
from jobs.contract.prompts_input import check_params as _prompts_check
from jobs.contract.spec import DEFAULT_BATCH_SIZE
from jobs.contract.units import parse_size

PARAM_TYPES = ("str", "int", "float", "bool", "size", "date", "file", "dir", "path", "argv")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Param:
    name: str
    type: str                     # one of PARAM_TYPES; file/dir must exist, all paths confined;
                                  # argv: a list of strings whose program is resolved at submit
    required: bool = False
    default: Any = None
    help: str = ""
    min: float | None = None      # int/float/size: inclusive bounds, checked at submit and load
    max: float | None = None


@dataclass(frozen=True)
class Kind:
    name: str
    module: str                   # imported by the worker; must define `function(params, ctx)`
    help: str
    params: tuple[Param, ...] = ()
    needs_paging: bool = False    # held unless the daemon runs with --experimental-paging
    paging_param: str | None = None  # a bool param that makes a run a paging run (`command --gpu`)
    function: str = "run"
    # Checks across params past their types (stdlib only): check(params, model) raises ParamError. model is
    # None in validate_params, the run's ModelFacts in check_with_model (submit: e.g. a rank vs head_dim).
    check: Callable[[dict[str, Any], ModelFacts | None], None] | None = None

    def run_needs_paging(self, params: dict[str, Any]) -> bool:
        """Whether a run with these (validated) params waits for --experimental-paging and the guards'
        paging rules: the kind's own flag, or its paging_param set."""
        flag = params.get(self.paging_param) if self.paging_param else None
        return self.needs_paging or flag is True or str(flag).lower() in _TRUE


# Every model-using kind takes these; `model` names a [models.NAME] table (default: the
# embedded gemma-3-270m), which the daemon resolves into the run's spec.
_MODEL_PARAMS = (
    Param("model", "str", help="a [models.NAME] from the config (default: [worker] default_model)"),
    Param("max_new_tokens", "int", min=1, max=32768,
          help="tokens generated per answer (default: the kind's own)"),
    Param("batch_size", "int", default=DEFAULT_BATCH_SIZE, min=1, max=4096,
          help="prompts per pass over the weights"),
)

BUILTIN_KINDS: tuple[Kind, ...] = (
    Kind("probe", "jobs.kinds.probe",
         "Report the worker environment (python/torch/transformers, CUDA, free disk) and "
         "measure sequential read bandwidth of a file or the model folder.",
         params=(Param("path", "path", help="file or folder to read (default: models dir)"),
                 Param("read_limit_bytes", "size", default=256 * 1024**2, min=1,
                       help="read at most this many bytes for the bandwidth figure"))),
    Kind("nightly_insights", "jobs.kinds.nightly_insights",
         "Read an archive of notes (.md/.txt) incrementally (only new or changed notes since the "
         "last successful run), summarize each with the model, group them into themes that cite "
         "their notes; writes insights.md and insights.json.",
         params=(Param("archive", "dir", required=True, help="folder of notes"),
                 Param("since", "date", help="only notes dated on or after YYYY-MM-DD"),
                 Param("max_notes", "int", min=1, help="process at most this many notes per "
                       "run; the rest wait for the next run"),
                 *_MODEL_PARAMS), needs_paging=True),
    Kind("artifact_refinement", "jobs.kinds.artifact_refinement",
         "Rank artifacts (a folder of .md with front matter, or a .jsonl file) by rubric "
         "log-probabilities, summarize them, and pass technical stories through verbatim "
         "(FEAT-075); writes ranking.json, refined.md and prompts.json.",
         params=(Param("gems", "path", required=True, help="artifacts folder or .jsonl file"),
                 *_MODEL_PARAMS), needs_paging=True),
    Kind("cv_matching", "jobs.kinds.cv_matching",
         "Rank job postings against a CV by MiniLM embedding similarity and explain the top k "
         "(covered requirements with CV evidence, gaps, a model rationale); writes matches.json "
         "and matches.md.",
         params=(Param("cv", "file", required=True, help="the CV (markdown or text)"),
                 Param("postings", "dir", required=True, help="folder of postings (.md/.txt)"),
                 Param("top_k", "int", default=3, min=1, max=1000, help="postings to explain"),
                 *_MODEL_PARAMS), needs_paging=True),
    Kind("kv_rank_study", "jobs.kinds.kv_rank_study",
         "Measure whether a rank-r KV cache (truncated SVD of each layer's and head's K and V) keeps the "
         "model's next token, against int8/int4/int2 quantization and keeping the last N tokens at equal "
         "bytes, scoring passages teacher-forced; writes kv_rank.json, kv_rank.md and kv_rank.svg.",
         params=(Param("texts", "path", required=True,
                       help="folder of .txt/.md passages or a .jsonl with a 'text' per line"),
                 Param("ranks", "str", default="4,8,16,32,64",
                       help="comma-separated SVD ranks, each from 1 to the model's head_dim"),
                 Param("context", "int", default=512, min=2, max=1_000_000,
                       help="prefix tokens whose cache is compressed"),
                 Param("continuation", "int", default=64, min=1, max=100_000,
                       help="tokens scored after the prefix"),
                 Param("max_texts", "int", min=1, help="study at most this many passages (default: all)"),
                 *(p for p in _MODEL_PARAMS if p.name == "model"),
                 Param("batch_size", "int", default=DEFAULT_BATCH_SIZE, min=1, max=4096,
                       help="cache variants scored per pass over the weights")),
         needs_paging=True, check=_kv_rank_check),
    Kind("generate", "jobs.kinds.generate",
         "Run a batch of prompts through the model: a .jsonl of {\"id\",\"prompt\"} or chat "
         "{\"id\",\"messages\"} lines, a .txt of one prompt per line, or a folder of .txt/.md; "
         "writes completions.jsonl as it goes (a retry continues after the last complete line) and "
         "completions.md.",
         params=(Param("prompts", "path", required=True,
                       help=".jsonl, .txt (one prompt per line) or folder of .txt/.md prompts"),
                 *(p for p in _MODEL_PARAMS if p.name != "max_new_tokens"),
                 Param("max_new_tokens", "int", default=128, min=1, max=32768,
                       help="tokens generated per prompt at most"),
                 Param("temperature", "float", default=0.0, min=0.0, max=100.0,
                       help="0 decodes greedily; above 0 samples with this temperature"),
                 Param("top_p", "float", default=1.0, min=1e-6, max=1.0,
                       help="nucleus mass kept when sampling"),
                 Param("stop", "str", help="stop string (\\n for a newline) or a JSON list of them"),
                 Param("seed", "int", default=0, min=0, max=2**63 - 1,
                       help="sampling seed (each batch uses seed + its first prompt's index)")),
         needs_paging=True, check=_prompts_check),
    Kind("command", "jobs.kinds.command",
         "Run your own program (an argv list, never a shell) under the guards and timeouts: output to the "
         "run log, its exit code decides success; `submit command [--gpu] [--cwd DIR] -- PROGRAM ARGS…`.",
         params=(Param("argv", "argv", required=True, help="the program and its arguments"),
                 Param("cwd", "dir", help="working folder, inside the allowed roots (default: the run's "
                       "output folder)"),
                 Param("gpu", "bool", default=False, help="a GPU run: waits for --experimental-paging, "
                       "suspends the co-tenants and is watched like the paging kinds")),
         paging_param="gpu"),
)


def registry(extra_modules: Iterable[str] = ()) -> dict[str, Kind]:
    """Built-in kinds plus those listed by `KINDS` in each extra module (config worker.extra_kinds)."""
    kinds = {k.name: k for k in BUILTIN_KINDS}
    for mod_name in extra_modules:
        mod = importlib.import_module(mod_name)
        for kind in getattr(mod, "KINDS", ()):
            kinds[kind.name] = kind
    return kinds


def _in_range(param: Param, value: int | float) -> int | float:
    """Finite and within the param's declared min/max; ParamError saying the range otherwise."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ParamError(f"param '{param.name}' must be a finite number, got {value!r}")
    lo, hi = param.min, param.max
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = (f"between {lo:g} and {hi:g}" if lo is not None and hi is not None else
                  f"at least {lo:g}" if lo is not None else f"at most {hi:g}")
        raise ParamError(f"param '{param.name}' must be {bounds}, got {value!r}")
    return value


def _coerce(param: Param, value: Any, roots: tuple[Path, ...], base_dir: Path | None,
            must_exist: bool = True) -> Any:
    name, tp = param.name, param.type
    if tp == "argv":
        return resolve_program(parse_argv(value), base_dir, must_exist)
    if tp == "str":
        return str(value)
    if tp == "date":
        try:
            return date.fromisoformat(str(value)).isoformat()
        except ValueError:
            raise ParamError(f"param '{name}' must be a date like 2015-01-31, got {value!r}") from None
    if tp == "bool":
        if isinstance(value, bool):
            return value
        if str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise ParamError(f"param '{name}' must be true or false, got {value!r}")
    if tp in ("int", "float"):
        try:
            if isinstance(value, bool) or (tp == "int" and isinstance(value, float)):
                raise TypeError
            number = int(value) if tp == "int" else float(value)
        except (TypeError, ValueError, OverflowError):
            raise ParamError(f"param '{name}' must be {'an integer' if tp == 'int' else 'a number'}"
                             f", got {value!r}") from None
        return _in_range(param, number)
    if tp == "size":
        try:
            size = parse_size(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ParamError(f"param '{name}': {exc}") from None
        return _in_range(param, size)
    # Paths: resolved (symlinks too) and confined to the configured roots. A relative path is
    # relative to base_dir (a schedule's: the config file's folder), else to the working directory.
    path = Path(os.path.expanduser(str(value)))
    path = (base_dir / path if base_dir is not None else path).resolve()
    if must_exist and tp == "file" and not path.is_file():
        raise ParamError(f"param '{name}': file {path} does not exist")
    if must_exist and tp == "dir" and not path.is_dir():
        raise ParamError(f"param '{name}': folder {path} does not exist")
    if must_exist and tp == "path" and not path.exists():
        raise ParamError(f"param '{name}': {path} does not exist")
    if not any(path.is_relative_to(r.resolve()) for r in roots):
        listed = ", ".join(str(r) for r in roots) or "none: [paths] allowed_roots = []"
        raise ParamError(f"param '{name}': {path} is outside the allowed roots ({listed}); move "
                         "it there or add its folder to [paths] allowed_roots")
    return str(path)


def validate_params(kind: Kind, raw: dict[str, Any], allowed_roots: Iterable[Path], *,
                    base_dir: Path | None = None, must_exist: bool = True) -> dict[str, Any]:
    """Return typed params with defaults filled in; ParamError names the first bad param.

    Relative path params resolve against base_dir when given (schedules: the config file's
    folder, like every other path in the config), else against the working directory (`submit`).
    must_exist=False (a schedule at config load) checks everything but whether files exist yet."""
    roots = tuple(allowed_roots)
    known = {p.name: p for p in kind.params}
    for key in raw:
        if key not in known:
            hint = ", ".join(known) if known else "none"
            raise ParamError(f"kind '{kind.name}' has no param '{key}' (params: {hint})")
    out: dict[str, Any] = {}
    for p in kind.params:
        if p.name in raw and raw[p.name] is not None:
            out[p.name] = _coerce(p, raw[p.name], roots, base_dir, must_exist)
        elif p.required:
            raise ParamError(f"kind '{kind.name}' needs param '{p.name}' ({p.help or p.type}); "
                             f"pass -p {p.name}=VALUE")
        elif p.default is not None:
            out[p.name] = p.default
    if kind.check is not None:
        kind.check(out, None)
    return out


def check_with_model(kind: Kind, params: dict[str, Any], model: ModelFacts | Path) -> None:
    """The kind's checks that need its model (facts read without torch: a folder's JSON files, or what the
    supervisor read from a GGUF header); ParamError if one fails."""
    if kind.check is not None:
        kind.check(params, model if isinstance(model, ModelFacts) else ModelFacts.of_folder(model))


def parse_assignment(text: str) -> tuple[str, str]:
    """'key=value' from `-p`; ParamError for anything else."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ParamError(f"malformed -p {text!r}: write -p key=value")
    return key.strip(), value
