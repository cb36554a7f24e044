"""The `generate` kind: a batch of the user's prompts through the run's model, written to completions.jsonl
as it goes (one line per prompt, input order); a retry continues after the previous attempt's last line."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from jobs.contract.atomic import write_atomic
from jobs.contract.errors import ParamError
from jobs.contract.prompts_input import PromptItem, load_prompts, parse_stop
from jobs.paging.generate import Sampling

RESUME_FORMAT = 1   # bump when a completions line changes meaning: an older partial file is not resumed


def render(items: list[PromptItem], tokenizer: Any, model_dir: Path) -> list[str]:
    """Each item's prompt text; chat items through the tokenizer's own chat template (its leading BOS
    dropped: the engine's tokenizer call adds one, and two BOS tokens change the output)."""
    if any(i.messages for i in items) and not getattr(tokenizer, "chat_template", None):
        first = next(i for i in items if i.messages)
        raise ParamError(f"param 'prompts': prompt {first.id!r} is a chat ('messages') but model folder "
                         f"{model_dir} has no chat template; give it a 'prompt' string instead")
    out = []
    for i in items:
        if not i.messages:
            out.append(i.prompt or "")
            continue
        text = tokenizer.apply_chat_template(list(i.messages), tokenize=False, add_generation_prompt=True)
        bos = tokenizer.bos_token or ""
        out.append(text[len(bos):] if bos and text.startswith(bos) else text)
    return out


def resume_key(prompts_bytes: bytes, model: dict[str, Any], params: dict[str, Any]) -> str:
    """Same prompts, model and params (bar the model name's table) -> the same partial file."""
    ident = {"prompts_sha256": hashlib.sha256(prompts_bytes).hexdigest(), "model": model,
             "params": {k: v for k, v in sorted(params.items()) if k != "prompts"},
             "format": RESUME_FORMAT}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:24]


def read_done(path: Path, ids: list[str]) -> list[dict[str, Any]]:
    """The complete lines of a partial file that match the prompts in order; a torn last line (the
    kill came mid-write) and anything after a mismatch are cut off the file."""
    if not path.is_file():
        return []
    done: list[dict[str, Any]] = []
    keep_bytes = 0
    with path.open("rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                break
            try:
                rec = json.loads(raw)
            except ValueError:
                break
            if len(done) >= len(ids) or rec.get("id") != ids[len(done)]:
                break
            done.append(rec)
            keep_bytes += len(raw)
    with path.open("r+b") as fh:
        fh.truncate(keep_bytes)
    return done


def _append(path: Path, lines: list[dict[str, Any]]) -> None:
    with path.open("ab") as fh:
        fh.write(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in lines))
        fh.flush()
        os.fsync(fh.fileno())


def finish_reason(token_ids: list[int], text_cut: bool, eos: set[int], max_new_tokens: int) -> str:
    if token_ids and token_ids[-1] in eos:
        return "eos"
    if text_cut:
        return "stop"
    return "length" if len(token_ids) >= max_new_tokens else "stop"


def run(params: dict[str, Any], ctx) -> dict[str, Any]:
    prompts_path = ctx.roots.param("prompts", params["prompts"])
    items = load_prompts(prompts_path, ctx.roots)
    raw = (prompts_path.read_bytes() if prompts_path.is_file() else
           b"\0".join(i.id.encode() + b"\0" + (i.prompt or "").encode() for i in items))
    stop = parse_stop(params.get("stop"))
    max_new_tokens, batch_size = int(params["max_new_tokens"]), int(params["batch_size"])
    temperature, seed = float(params.get("temperature") or 0.0), int(params.get("seed") or 0)
    spec = ctx.spec.model
    key = resume_key(raw, {"name": spec.name, "path": spec.path, **spec.settings()}, params)
    partial = ctx.state_dir / key / "completions.partial.jsonl"   # state_dir: this kind's own folder
    partial.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(partial, [i.id for i in items])
    resumed = len(done)
    if done:
        ctx.log.info("resuming %s: %d of %d prompts were completed by an earlier attempt",
                     prompts_path, len(done), len(items))
    live = ctx.output_dir / "completions.jsonl"      # the same lines, in this run's folder as they come
    write_atomic(live, b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in done))
    ctx.progress(len(done), len(items), "prompts")
    engine = ctx.model(batch_size)
    try:
        from jobs.paging.generate import eos_ids_of
        eos = eos_ids_of(engine.loaded.model, engine.loaded.tokenizer)
        texts = render(items, engine.loaded.tokenizer, Path(spec.path))
        for first in range(len(done), len(items), batch_size):
            batch = list(range(first, min(first + batch_size, len(items))))
            # Seeded per batch from its first prompt's index: a resumed run samples what one run would.
            sampling = (Sampling(greedy=False, temperature=temperature, top_p=float(params["top_p"]),
                                 seed=seed + first) if temperature > 0 else Sampling(seed=seed + first))
            res = engine.run([texts[i] for i in batch], max_new_tokens=max_new_tokens, sampling=sampling,
                             stop=stop)
            per_prompt_s = res.wall_s / len(batch)
            lines = []
            for i, c in zip(batch, res.outputs):
                full = engine.loaded.tokenizer.decode(c.token_ids, skip_special_tokens=True)
                lines.append({"index": i, "id": items[i].id, "prompt": texts[i], "completion": c.text,
                              "tokens": len(c.token_ids),
                              "finish_reason": finish_reason(c.token_ids, c.text != full, eos, max_new_tokens),
                              "batch_wall_s": round(res.wall_s, 4), "per_prompt_s": round(per_prompt_s, 4),
                              "chat": bool(items[i].messages)})
            _append(partial, lines)
            _append(live, lines)
            done += lines
            ctx.progress(len(done), len(items), "prompts")
        metrics = engine.summary()
    finally:
        engine.close()
    result = write_atomic(live, b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in done))
    md = ctx.write_text("completions.md", render_markdown(done, spec.name, params))
    summary = {"prompts": len(items), "resumed_after": resumed, "model": spec.name,
               "tokens_generated": sum(r["tokens"] for r in done),
               "finish_reasons": {k: sum(r["finish_reason"] == k for r in done)
                                  for k in ("eos", "stop", "length")},
               "engine": metrics, "generated_at": time.time()}
    ctx.write_json("summary.json", summary)
    partial.unlink(missing_ok=True)       # complete: a new submission of the same prompts starts fresh
    return {"result_path": str(result), "markdown_path": str(md), "prompts": len(items),
            "resumed_after": summary["resumed_after"]}


def render_markdown(lines: list[dict[str, Any]], model: str, params: dict[str, Any]) -> str:
    how = (f"temperature {params['temperature']}, top_p {params['top_p']}, seed {params['seed']}"
           if params.get("temperature") else "greedy")
    out = [f"# Completions: {params['prompts']}", "",
           f"{len(lines)} prompts, written by model `{model}` ({how}, at most {params['max_new_tokens']} "
           "new tokens each). Every completion below is the model's raw text, unchecked.", ""]
    for r in lines:
        out += [f"## {r['index'] + 1}. {r['id']} ({r['tokens']} tokens, {r['finish_reason']})", "",
                "Prompt:", "", "```", r["prompt"].rstrip(), "```", "", "Completion:", "", "```",
                r["completion"].rstrip(), "```", ""]
    return "\n".join(out) + "\n"
