"""The `generate` kind's inputs, read and checked without torch: a .jsonl of {"id","prompt"} or chat
{"id","messages"} lines, a .txt of one prompt per line, or a folder of .txt/.md files (one prompt each)."""
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
class PromptItem:
    id: str                                   # the line's "id" (else "line-N"), or the file's name
    prompt: str | None = None                 # plain text, sent as is
    messages: tuple[dict[str, str], ...] = ()  # chat turns, rendered with the model's chat template


def _read(path: Path, roots: Roots | None) -> str:
    try:
        return roots.read_text(path) if roots else path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ParamError(f"param 'prompts': {path} is not UTF-8 text; save it as UTF-8") from None


def _line(obj: Any, n: int, path: Path) -> PromptItem:
    where = f"param 'prompts': {path} line {n}"
    if not isinstance(obj, dict):
        raise ParamError(f"{where} is not a JSON object; write {{\"id\": ..., \"prompt\": ...}}")
    pid = str(obj.get("id", f"line-{n}"))
    if isinstance(obj.get("prompt"), str) and obj["prompt"]:
        return PromptItem(pid, prompt=obj["prompt"])
    msgs = obj.get("messages")
    if isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs):
        return PromptItem(pid, messages=tuple({"role": m["role"], "content": m["content"]} for m in msgs))
    raise ParamError(f"{where} has neither a non-empty 'prompt' string nor a 'messages' list of "
                     "{\"role\", \"content\"} objects; fix that line")


def load_prompts(path: str | Path, roots: Roots | None = None) -> list[PromptItem]:
    """Every prompt in input order; ParamError naming the file and line of the first bad one. With
    `roots` (the worker), files are read through confinement (a symlinked file outside is skipped)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in TEXT_SUFFIXES and p.is_file())
        items = [PromptItem(p.name, prompt=_read(p, roots)) for p in (roots.keep(files) if roots else files)]
        items = [i for i in items if i.prompt and i.prompt.strip()]
    elif path.suffix == ".jsonl":
        items = []
        for n, raw in enumerate(_read(path, roots).splitlines(), 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ParamError(f"param 'prompts': {path} line {n} is not valid JSON ({exc.msg}); "
                                 "fix that line") from None
            items.append(_line(obj, n, path))
    elif path.suffix == ".txt":
        items = [PromptItem(f"line-{n}", prompt=line) for n, line in
                 enumerate(_read(path, roots).splitlines(), 1) if line.strip()]
    else:
        raise ParamError(f"param 'prompts': {path} is neither a .jsonl, a .txt nor a folder of .txt/.md "
                         "files; pass one of those")
    if not items:
        raise ParamError(f"param 'prompts': {path} holds no prompts; add at least one")
    ids = [i.id for i in items]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup is not None:
        raise ParamError(f"param 'prompts': id {dup!r} appears twice in {path}; give every prompt its own id")
    return items


def has_chat_template(model_dir: Path) -> bool:
    """Whether the model folder ships a chat template (tokenizer_config.json or chat_template.jinja)."""
    return bool(ModelFacts.of_folder(model_dir).has_chat_template)


def parse_stop(raw: Any) -> tuple[str, ...]:
    """`stop`: one string (\\n written as backslash-n) or a JSON list of strings."""
    if raw in (None, ""):
        return ()
    text = str(raw)
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError:
            items = None
        if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
            raise ParamError(f"param 'stop' must be a string or a JSON list of strings, got {text!r}")
        return tuple(items)
    return (text.replace("\\n", "\n").replace("\\t", "\t"),)


def check_params(params: dict[str, Any], model: ModelFacts | None) -> None:
    """At submit: the prompts read and parse (bad lines named), stop parses, and chat lines only for a
    model that has a chat template."""
    parse_stop(params.get("stop"))
    if "prompts" not in params or not Path(params["prompts"]).exists():
        return   # must_exist=False (a schedule at config load): checked when the run starts
    items = load_prompts(params["prompts"])
    if model is not None and any(i.messages for i in items) and model.has_chat_template is False:
        first = next(i for i in items if i.messages)
        raise ParamError(f"param 'prompts': prompt {first.id!r} is a chat ('messages') but model "
                         f"{model.where} has no chat template; give it a 'prompt' string instead")
