"""The `generate` kind end to end: real daemon, real worker, the real Gemma-3-270M; completions equal the
engine's own generate CLI, a killed run's retry writes each prompt once, chat lines use the template."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import (
    EXPERIMENTAL_PYTHON,
    MODEL_DIR,
    NEEDS_MODEL,
    RESIDENT_DEFAULT,
    ROOT,
    Lab,
    wait_for,
    write_config,
)

# Gemma's turn format (as its instruction-tuned tokenizers ship it), added to a copy of the embedded
# base model's folder: the base model has no chat template of its own.
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
                  "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}"
                  "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
PROMPTS = [{"id": "fence", "prompt": "The storm knocked the garden fence flat, so"},
           {"id": "bread", "prompt": "To bake a loaf of bread you need flour, water,"},
           {"id": "lisbon", "prompt": "Lisbon is the capital of"}]


def _chat_model(root: Path) -> Path:
    d = root / "models-chat" / "gemma-chat"
    d.mkdir(parents=True)
    for f in MODEL_DIR.iterdir():
        if f.name != "tokenizer_config.json" and f.is_file():
            (d / f.name).symlink_to(f)
    cfg = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": GEMMA_TEMPLATE}))
    return d


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1800)   # two model loads and two generations on a shared CPU
@NEEDS_MODEL
def test_completions_equal_the_engine_cli_and_chat_uses_the_template(model_lab: Lab):
    lab = model_lab
    model = _chat_model(lab.root)
    write_config(lab.root, python=EXPERIMENTAL_PYTHON, default_timeout_s=900,
                 extra=f'[models.chat]\npath = "{model}"\n')
    chat = {"id": "hello", "messages": [{"role": "user", "content": "Say hello to Lea."}]}
    prompts = _jsonl(lab.root / "prompts.jsonl", [*PROMPTS, chat])
    rid = lab.submit("generate", f"prompts={prompts}", "model=chat", "max_new_tokens=12",
                     "batch_size=2")
    lab.cli("daemon", "--burst", "--experimental-paging", timeout=400)
    run = lab.show(rid)
    assert run["state"] == "succeeded", (run["reason"], lab.cli("logs", str(rid)).stdout[-3000:])
    assert run["progress"]["done"] == run["progress"]["total"] == 4 and run["progress"]["unit"] == "prompts"
    out = Path(run["result_path"]).parent
    lines = _lines(out / "completions.jsonl")
    assert [l["id"] for l in lines] == ["fence", "bread", "lisbon", "hello"]
    assert all(l["finish_reason"] in ("eos", "stop", "length") and 0 < l["tokens"] <= 12 for l in lines)
    assert lines[3]["chat"] and lines[3]["prompt"].startswith("<start_of_turn>user\nSay hello to Lea.")
    assert lines[3]["prompt"].endswith("<start_of_turn>model\n")
    # The engine's own CLI on the same folder, prompts and batch size gives the same text.
    cli_prompts = _jsonl(lab.root / "cli.jsonl", [{"prompt": l["prompt"]} for l in lines])
    cli = subprocess.run([str(EXPERIMENTAL_PYTHON), "-m", "jobs.paging.generate", "--model", str(model),
                          "--prompts-file", str(cli_prompts), "--max-new-tokens", "12", "--batch-size", "2",
                          "--json"], capture_output=True, text=True, cwd=ROOT, timeout=600, check=True)
    assert [o["text"] for o in json.loads(cli.stdout)["outputs"]] == [l["completion"] for l in lines]
    md = (out / "completions.md").read_text()
    assert "model `chat`" in md and "## 4. hello" in md
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompts"] == 4 and summary["resumed_after"] == 0
    assert summary["tokens_generated"] == sum(l["tokens"] for l in lines) > 0


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1800)
@NEEDS_MODEL
def test_a_killed_run_is_retried_and_writes_each_prompt_once(model_lab: Lab):
    lab = model_lab
    write_config(lab.root, python=EXPERIMENTAL_PYTHON, default_timeout_s=900,
                 extra="[retries]\nbase_s = 0.2\n" + RESIDENT_DEFAULT)     # the pipeline, not streaming
    rows = [*PROMPTS, {"id": "kayak", "prompt": "We paddled the sea kayaks out to the island and"}]
    prompts = _jsonl(lab.root / "prompts.jsonl", rows)
    lab.start_daemon("--experimental-paging")
    rid = lab.submit("generate", f"prompts={prompts}", "max_new_tokens=24", "batch_size=1",
                     extra=("--retries", "1"))
    run = lab.wait_state(rid, {"running"}, timeout_s=60)
    live = Path(run["run_dir"]) / "output" / "completions.jsonl"
    wait_for(lambda: live.exists() and len(_lines(live)) >= 1, 300, "the first completion line")
    os.kill(run["pid"], signal.SIGKILL)
    first_attempt = _lines(live)
    assert 1 <= len(first_attempt) < len(rows)
    retried = wait_for(lambda: [r for r in json.loads(lab.cli("list", "--json").stdout)
                                if r.get("retry_of") == rid], 60, "the retry")[0]
    done = lab.wait_state(retried["id"], {"succeeded", "failed"}, timeout_s=600)
    assert done["state"] == "succeeded", (done["reason"], lab.cli("logs", str(retried["id"])).stdout[-3000:])
    out = Path(done["result_path"]).parent
    lines = _lines(out / "completions.jsonl")
    assert [l["id"] for l in lines] == [r["id"] for r in rows]        # each prompt once, input order
    assert lines[:len(first_attempt)] == first_attempt                  # kept, not redone
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_after"] >= len(first_attempt)
    assert not list((lab.state_dir / "worker" / "generate").glob("*/completions.partial.jsonl"))


@pytest.mark.e2e
def test_a_bad_line_is_refused_at_submit_naming_it(lab: Lab):
    bad = lab.root / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "fine"}\n{"id": "b", "promt": "typo"}\n')
    proc = lab.cli("submit", "generate", "-p", f"prompts={bad}", check=False)
    assert proc.returncode != 0 and "line 2" in proc.stderr and "'prompt'" in proc.stderr
    assert json.loads(lab.cli("list", "--json").stdout) == []
