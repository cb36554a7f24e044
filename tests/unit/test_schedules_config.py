"""[[schedules]] and [models.NAME] config: validation at load, next fire times, model specs."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from lab_attendant.config import parse_config
from lab_attendant.errors import ConfigError
from lab_attendant.scheduler import next_fire_times, parse_cron

BASE = {"worker": {"extra_kinds": ["tests.fixtures.kinds"]}}


def _cfg(tmp_path: Path, **sections):
    return parse_config({**BASE, **sections}, base_dir=tmp_path, source=None)


def _fire_once(cfg_file: Path, schedule_id: str, db: Path, *, experimental_paging: bool):
    """The run one firing of the schedule makes in a fresh store, as the daemon loop dispatches it."""
    from jobs.contract.kinds import registry
    from lab_attendant.config import load_config
    from lab_attendant.scheduler import Firing, Schedules
    from lab_attendant.store.db import Store

    cfg = load_config(cfg_file)
    schedules = Schedules(cfg, registry(cfg.worker.extra_kinds))
    schedules.firings.put(Firing(schedule_id, 0.0))
    store = Store(db)
    try:
        (run,) = schedules.dispatch(store, experimental_paging=experimental_paging)
    finally:
        store.close()
    return run


def _sched(**kw):
    return {"id": "nightly", "cron": "30 2 * * *", "kind": "sleepy", **kw}


def test_schedules_load_and_next_fire_time(tmp_path: Path):
    cfg = _cfg(tmp_path, schedules=[_sched(params={"seconds": 1}, timezone="UTC")])
    (s, nxt), = next_fire_times(cfg, datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc))
    assert s.id == "nightly" and s.params == {"seconds": 1}
    assert nxt == datetime(2026, 1, 2, 2, 30, tzinfo=timezone.utc)


def test_six_field_cron_has_seconds():
    t = parse_cron("*/10 * * * * *", "UTC")
    now = datetime(2026, 1, 1, 12, 0, 1, tzinfo=timezone.utc)
    assert t.get_next_fire_time(None, now) == datetime(2026, 1, 1, 12, 0, 10, tzinfo=timezone.utc)


@pytest.mark.parametrize("sched, message", [
    (_sched(cron="61 2 * * *"), "schedule 'nightly': bad cron '61 2 * * *'"),
    (_sched(cron="* * *"), "schedule 'nightly': bad cron"),
    (_sched(timezone="Mars/Olympus"), "schedule 'nightly': bad cron"),
    (_sched(kind="nope"), "schedule 'nightly': unknown kind 'nope'"),
    (_sched(params={"naps": 2}), "schedule 'nightly': kind 'sleepy' has no param 'naps'"),
    (_sched(misfire_grace_s=0), "misfire_grace_s must be > 0"),
    ({"id": "x", "kind": "sleepy"}, "config key 'schedules[0].cron' is required"),
    (_sched(crn="1"), "unknown config key 'schedules[0].crn'"),
])
def test_bad_schedules_fail_at_load_naming_the_schedule(tmp_path: Path, sched, message):
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, schedules=[sched])
    assert message in str(err.value)


def test_duplicate_schedule_ids_fail(tmp_path: Path):
    with pytest.raises(ConfigError, match="'nightly' is defined twice"):
        _cfg(tmp_path, schedules=[_sched(), _sched()])


def test_models_sizes_kinds_and_default(tmp_path: Path):
    cfg = _cfg(tmp_path, paths={"models_dir": "m"}, models={
        "big": {"path": "/data/gemma-27b", "vram_budget_bytes": "2GiB", "ram_budget_bytes": 1024,
                "dtype": "bf16", "device": "cuda"},
        "mix": {"kind": "moe", "expert_cache_bytes": "500MB", "variant": "fast", "kv_cache": "int8"}})
    big = cfg.model_spec("big")
    assert big.vram_budget_bytes == 2 * 1024**3 and big.ram_budget_bytes == 1024
    assert (big.path, big.kind, big.dtype) == ("/data/gemma-27b", "dense", "bf16")
    mix = cfg.model_spec("mix")
    assert mix.path == str(tmp_path / "m" / "mix") and mix.expert_cache_bytes == 500 * 10**6
    assert (mix.variant, mix.kv_cache, mix.keep_precise_layers) == ("fast", "int8", 1)
    default = cfg.model_spec(None)
    assert default.name == "gemma-3-270m" and default.path == str(tmp_path / "m" / "gemma-3-270m-q4_k_m.gguf")
    assert (default.device, default.dtype) == ("cpu", "auto")        # fp32 on the CPU
    assert (default.variant, default.kv_cache, default.kernels) == ("precise", "fp", "auto")
    with pytest.raises(ConfigError, match=r"unknown model 'nope'; add a \[models.nope\] table"):
        cfg.model_spec("nope")


@pytest.mark.parametrize("model, message", [
    ({"kind": "sparse"}, "config key 'models.x.kind' must be one of 'dense', 'moe'"),
    ({"vram_budget_bytes": "lots"}, "config key 'models.x.vram_budget_bytes': cannot read size"),
    ({"vram_budget_bytes": True}, "config key 'models.x.vram_budget_bytes'"),
    ({"dtype": "int4"}, "config key 'models.x.dtype' must be one of"),
    ({"budget": 1}, "unknown config key 'models.x.budget'"),
    ({"variant": "int4"}, "config key 'models.x.variant' must be one of 'precise', 'fast', 'auto'"),
    ({"kv_cache": "int4"}, "config key 'models.x.kv_cache' must be one of 'fp', 'int8', 'fp8'"),
    ({"kernels": "triton"}, "config key 'models.x.kernels' must be one of"),
    ({"keep_precise_layers": -1}, "keep_precise_layers must be 0 or more"),
])
def test_bad_model_tables_name_the_key(tmp_path: Path, model, message):
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, models={"x": model})
    assert message in str(err.value)


def test_relative_path_params_of_a_schedule_resolve_against_the_config_folder(tmp_path: Path):
    """Like every path in the config, and unlike `submit -p` (the caller's cwd): the daemon's cwd
    (often / under systemd) must not decide which folder a nightly run reads."""
    conf_dir = tmp_path / "conf"
    (conf_dir / "notes").mkdir(parents=True)
    cfg_file = conf_dir / "lab-attendant.toml"
    cfg_file.write_text(f'[paths]\nallowed_roots = ["{tmp_path}"]\n[worker]\nextra_kinds = ["tests.fixtures.kinds"]\n'
                        '[[schedules]]\nid = "n"\ncron = "30 2 * * *"\nkind = "probe"\n'
                        'params = { path = "notes" }\n')
    assert Path.cwd() != conf_dir
    run = _fire_once(cfg_file, "n", tmp_path / "db.sqlite3", experimental_paging=False)
    assert run.state == "queued", run.reason
    assert run.params["path"] == str(conf_dir / "notes")


def test_a_model_setting_its_engine_cannot_honour_fails_at_load(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"model 'mix' is moe and cannot honour vram_budget_bytes"):
        _cfg(tmp_path, models={"mix": {"kind": "moe", "vram_budget_bytes": "2GiB"}})
    with pytest.raises(ConfigError, match=r"model 'big' is dense and cannot honour cache_policy = 'lfu'"):
        _cfg(tmp_path, models={"big": {"cache_policy": "lfu"}})


def test_a_firing_is_checked_against_its_model_like_a_submit(tmp_path: Path):
    """kv_rank_study's rank above the model's head_dim is refused at submit; a schedule's firing is
    skipped with the same sentence instead of starting a worker that would fail on it."""
    import json

    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "head_dim": 64}))
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("A passage the study would read. " * 100)
    cfg_file = tmp_path / "lab-attendant.toml"
    cfg_file.write_text(f'[paths]\nallowed_roots = ["{tmp_path}"]\n[models.tiny]\npath = "{model}"\n'
                        '[[schedules]]\nid = "k"\ncron = "30 2 * * *"\nkind = "kv_rank_study"\n'
                        'params = { texts = "texts", model = "tiny", ranks = "8,128", context = 256 }\n')
    run = _fire_once(cfg_file, "k", tmp_path / "db.sqlite3", experimental_paging=True)
    assert run.state == "skipped" and "128 > head_dim 64" in run.reason, run.reason
