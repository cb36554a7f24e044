"""The generate command line: JSON shape, and exit 2 with one clear message on bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from engine_helpers import REPO_ROOT

from jobs.contract.units import format_size
from jobs.paging.dense.model_store import ModelStore

pytestmark = pytest.mark.engine


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "jobs.paging.generate", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_json_output_shape(tiny_dirs):
    model_dir = tiny_dirs["llama"]
    layer_bytes = max(ModelStore(model_dir).layer_nbytes_as(torch.float32))
    proc = run_cli("--model", str(model_dir), "--prompt", "Hello there", "--prompt", "The sky is",
                   "--max-new-tokens", "5", "--dtype", "fp32", "--vram-budget", str(3 * layer_bytes),
                   "--batch-size", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [o["prompt"] for o in out["outputs"]] == ["Hello there", "The sky is"]
    for o in out["outputs"]:
        assert isinstance(o["text"], str)
        assert 1 <= len(o["token_ids"]) <= 5 and all(isinstance(t, int) for t in o["token_ids"])
    stats = out["stats"]
    for key in ("bytes_read", "bytes_h2d", "io_wait_s", "compute_s", "tokens_generated", "wall_s"):
        assert key in stats
    assert stats["tokens_generated"] == sum(len(o["token_ids"]) for o in out["outputs"])
    assert stats["bytes_read"] > 0 and stats["resident_layers"] == 1


def test_budget_too_small_exits_2_before_work(tiny_dirs):
    layer_bytes = max(ModelStore(tiny_dirs["llama"]).layer_nbytes_as(torch.float32))
    proc = run_cli("--model", str(tiny_dirs["llama"]), "--prompt", "x", "--dtype", "fp32",
                   "--vram-budget", f"{layer_bytes // 2}", "--json")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert f"cannot hold one decoder layer of {format_size(layer_bytes)}; give at least {layer_bytes} bytes" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_non_model_folder_exits_2_naming_what_is_missing(tmp_path):
    proc = run_cli("--model", str(tmp_path), "--prompt", "x")
    assert proc.returncode == 2
    assert "no config.json" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_size_exits_2():
    proc = run_cli("--model", ".", "--prompt", "x", "--vram-budget", "lots")
    assert proc.returncode == 2 and "cannot read size" in proc.stderr


def test_moe_folder_refuses_a_dense_only_flag_before_loading(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", "num_local_experts": 4}))
    proc = run_cli("--model", str(tmp_path), "--prompt", "x", "--vram-budget", "1GiB")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "is moe and cannot honour vram_budget_bytes = 1073741824" in proc.stderr


def test_every_model_setting_has_one_flag_with_its_default_and_choices():
    """A setting is declared once, in ModelSettings: each field (kind aside: it comes from the folder) is the
    dest of exactly one generate flag, with the field's default and, for a Literal, the same choices."""
    import dataclasses
    import typing

    from jobs.contract.spec import ModelSettings
    from jobs.paging.cli import generate_parser, setting_names

    actions = {a.dest: a for a in generate_parser()._actions}
    hints = typing.get_type_hints(ModelSettings)
    for field in dataclasses.fields(ModelSettings):
        if field.name == "kind":
            assert field.name not in setting_names()
            continue
        assert field.name in setting_names()
        action = actions.get(field.name)
        assert action is not None, f"ModelSettings.{field.name} has no generate flag"
        assert action.default == field.default, field.name
        choices = typing.get_args(hints[field.name])
        if typing.get_origin(hints[field.name]) is typing.Literal:
            assert tuple(action.choices) == choices, field.name


def test_the_flags_reach_the_spec(tiny_dirs):
    from jobs.paging.cli import _model_spec, generate_parser

    args = generate_parser().parse_args(["--model", str(tiny_dirs["llama"]), "--prompt", "x", "--vram-budget", "1MiB",
                                         "--keep-precise", "2", "--device-memory", "3MiB", "--kernels", "torch",
                                         "--kv-cache", "int8", "--context-tokens", "64"])
    spec = _model_spec(args)
    assert (spec.kind, spec.vram_budget_bytes, spec.keep_precise_layers, spec.device_memory_bytes, spec.kernels,
            spec.kv_cache, spec.context_tokens) == ("dense", 1 << 20, 2, 3 << 20, "torch", "int8", 64)
