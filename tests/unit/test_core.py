"""States, config, params, units, protocol: pure logic, no processes."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobs.contract import protocol
from jobs.contract.errors import ParamError
from jobs.contract.kinds import Kind, Param, parse_assignment, registry, validate_params
from jobs.contract.units import format_size, parse_size
from lab_attendant.config import load_config, parse_config
from lab_attendant.errors import ConfigError
from lab_attendant.store.states import ALLOWED, TERMINAL, RunState, can_transition


def test_terminal_states_have_no_way_out_and_every_state_is_in_the_table():
    assert set(ALLOWED) == set(RunState)
    for s in TERMINAL:
        assert ALLOWED[s] == frozenset()
    assert can_transition(RunState.QUEUED, RunState.STARTING)
    assert not can_transition(RunState.QUEUED, RunState.SUCCEEDED)
    assert not can_transition(RunState.SUCCEEDED, RunState.QUEUED)
    assert can_transition(RunState.RUNNING, RunState.KILLED_THERMAL)


def test_config_defaults_and_relative_paths(tmp_path: Path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[paths]\nstate_dir = "st"\n[limits]\nkill_grace_s = 3\n')
    cfg = load_config(cfg_file)
    assert cfg.paths.state_dir == tmp_path / "st"
    assert cfg.paths.logs_dir == tmp_path / "logs"          # default, relative to the file
    assert cfg.limits.kill_grace_s == 3.0 and isinstance(cfg.limits.kill_grace_s, float)
    assert cfg.db_path == tmp_path / "st" / "lab_attendant.sqlite3"


@pytest.mark.parametrize("data, needle", [
    ({"limits": {"max_concurent": 1}}, "limits.max_concurent"),
    ({"limits": {"max_concurrent": "2"}}, "limits.max_concurrent' must be an integer"),
    ({"limits": {"max_concurrent": True}}, "must be an integer"),
    ({"workers": {}}, "unknown config section [workers]"),
    ({"paths": {"allowed_roots": "/x"}}, "paths.allowed_roots' must be a list"),
    ({"worker": {"extra_kinds": [1]}}, "worker.extra_kinds[0]"),
    ({"guards": {"max_worker_rss_bytes": "lots"}}, "guards.max_worker_rss_bytes': cannot read"),
    ({"guards": {"vram_budget_bytes": 1.5}}, "must be a byte count"),
    ({"guards": {"sensors": "gpu"}}, "guards.sensors"),
    ({"guards": {"resume_below_c": 90}}, "must not exceed guards.thermal_limit_c"),
    ({"cotenants": {"earnode": {"stop": ["x"]}}}, "[cotenants.earnode] needs both"),
    ({"cotenants": {"earnode": {}}}, "[cotenants.earnode] needs either unit"),
    ({"cotenants": {"earnode": {"stop": "systemctl stop earnode", "start": ["x"]}}},
     "cotenants.earnode.stop' must be a list"),
])
def test_config_rejects_unknown_keys_and_wrong_types(data, needle):
    with pytest.raises(ConfigError, match=None) as err:
        parse_config(data, base_dir=Path("/"), source=None)
    assert needle in str(err.value)


def test_guards_and_cotenants_sections(tmp_path: Path):
    cfg = parse_config({"guards": {"max_worker_rss_bytes": "2GiB", "sensors": "file:s.json"},
                        "cotenants": {"earnode": {"unit": "earnode.service"}}},
                       base_dir=tmp_path, source=None)
    assert cfg.guards.max_worker_rss_bytes == 2 * 1024**3
    assert cfg.cotenants["earnode"].stop_argv == ("systemctl", "stop", "earnode.service")
    assert cfg.cotenants["earnode"].start_argv == ("systemctl", "start", "earnode.service")


def test_config_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    assert load_config().source is None
    (tmp_path / "lab-attendant.toml").write_text("[limits]\nmax_concurrent = 3\n")
    assert load_config().limits.max_concurrent == 3
    other = tmp_path / "other.toml"
    other.write_text("[limits]\nmax_concurrent = 4\n")
    monkeypatch.setenv("LAB_ATTENDANT_CONFIG", str(other))
    assert load_config().limits.max_concurrent == 4
    explicit = tmp_path / "explicit.toml"
    explicit.write_text("[limits]\nmax_concurrent = 5\n")
    assert load_config(explicit).limits.max_concurrent == 5
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_example_config_loads():
    cfg = load_config(Path(__file__).parents[2] / "examples" / "lab-attendant.toml")
    assert cfg.limits.max_concurrent >= 1


KIND = Kind("k", "m", "h", params=(Param("n", "int", required=True), Param("f", "float"),
                                   Param("b", "bool", default=False), Param("s", "size"),
                                   Param("d", "dir"), Param("x", "file")))


def test_params_are_typed_and_defaults_filled(tmp_path: Path):
    out = validate_params(KIND, {"n": "3", "f": "0.5", "b": "yes", "s": "2GiB", "d": str(tmp_path)},
                          [tmp_path])
    assert out == {"n": 3, "f": 0.5, "b": True, "s": 2 * 1024**3, "d": str(tmp_path.resolve())}


@pytest.mark.parametrize("raw, needle", [
    ({}, "needs param 'n'"),
    ({"n": "x"}, "'n' must be an integer"),
    ({"n": 1, "b": "maybe"}, "'b' must be true or false"),
    ({"n": 1, "s": "lots"}, "cannot read size"),
    ({"n": 1, "zz": 1}, "has no param 'zz'"),
    ({"n": 1, "x": "/nope/nope"}, "does not exist"),
])
def test_bad_params_raise_with_the_param_name(raw, needle, tmp_path: Path):
    with pytest.raises(ParamError) as err:
        validate_params(KIND, raw, [tmp_path])
    assert needle in str(err.value)


def test_paths_are_confined_to_roots_even_through_symlinks(tmp_path: Path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (outside / "secret").write_text("x")
    os.symlink(outside / "secret", root / "link")
    with pytest.raises(ParamError, match="outside the allowed roots"):
        validate_params(KIND, {"n": 1, "x": str(root / "link")}, [root])
    with pytest.raises(ParamError, match="outside the allowed roots"):
        validate_params(KIND, {"n": 1, "x": str(root / ".." / "outside" / "secret")}, [root])


def test_assignment_parsing():
    assert parse_assignment("a=b=c") == ("a", "b=c")
    assert parse_assignment("a=") == ("a", "")
    for bad in ("a", "=b", ""):
        with pytest.raises(ParamError):
            parse_assignment(bad)


def test_registry_has_probe_and_loads_extra_modules():
    assert "probe" in registry()
    assert registry(["tests.fixtures.kinds"])["paging_echo"].needs_paging


def test_sizes():
    assert parse_size("500MB") == 500_000_000
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("1.5G") == int(1.5 * 1024**3)
    assert parse_size(" 1024 ") == 1024 and parse_size(7) == 7
    for bad in ("", "12 parsecs", "-1", "1e9"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert format_size(1536) == "1.5 KiB" and format_size(3) == "3 B"


def test_protocol_line_buffer_splits_and_skips_garbage():
    buf = protocol.LineBuffer()
    data = protocol.encode("progress", done=1, total=2, unit="x") + b"not json\n"
    data += protocol.encode("result", path="/p")
    events = list(buf.feed(data[:10])) + list(buf.feed(data[10:]))
    assert [type(e) for e in events] == [protocol.Progress, protocol.Rejected, protocol.Result]
    assert events[0].done == 1 and events[2].path == "/p" and events[1].line == b"not json"
    with pytest.raises(ValueError):
        protocol.encode("bogus")


def test_event_writer_writes_to_its_fd():
    r, w = os.pipe()
    protocol.EventWriter(w).emit("heartbeat")
    os.close(w)
    assert isinstance(protocol.decode(os.read(r, 4096)), protocol.Heartbeat)
    protocol.EventWriter(None).emit("heartbeat")   # ad-hoc runs: a silent sink
