"""A GGUF file as a model path, supervisor side: its header read without a weight byte, the plan from it
(Gemma-3-27B Q4_0 on the 2080 Ti), the disk-aware bound, `model add` of a file and of Ollama's blob.
The files are header-only GGUFs of the real models written by tests/fixtures/gguf_headers.py (stdlib);
tests/engine/test_gguf_header.py checks the reader against gguf-py's own writer and reader."""
from __future__ import annotations

import builtins
import io
import json
import os
from pathlib import Path

import pytest

from jobs.contract.errors import SettingError
from jobs.paging.plan import disk, gguf_header
from jobs.paging.plan.gguf_header import read_header
from jobs.paging.plan.memplan import PlanRequest, make_plan
from jobs.paging.plan.profiles import profile
from jobs.paging.plan.shape import shape_from_folder, shape_from_path
from lab_attendant.cli.main import main
from tests.conftest import write_config
from tests.fixtures.gguf_headers import gemma3_27b, mixtral_8x7b_q4_k_m, write_header_only

ROOT = Path(__file__).resolve().parents[2]
GiB = 1024**3


@pytest.fixture(scope="module")
def q4_0(tmp_path_factory) -> tuple[Path, int]:
    path = tmp_path_factory.mktemp("gguf") / "gemma-3-27b-it-q4_0.gguf"
    return path, write_header_only(path, *gemma3_27b("Q4_0"))


class ReadRecorder:
    """Every os.pread of the GGUF, and any builtin open of it (none is allowed: the reader uses pread)."""

    def __init__(self, monkeypatch, path: Path) -> None:
        self.path, self.reads = path.resolve(), []
        real_pread, real_open = os.pread, builtins.open
        fds: set[int] = set()
        real_os_open = os.open

        def os_open(p, *a, **k):
            fd = real_os_open(p, *a, **k)
            if isinstance(p, (str, os.PathLike)) and Path(p).resolve() == self.path:
                fds.add(fd)
            return fd

        def pread(fd, n, offset):
            data = real_pread(fd, n, offset)
            if fd in fds:
                self.reads.append((offset, len(data)))
            return data

        def guarded_open(p, *a, **k):
            if isinstance(p, (str, os.PathLike)) and Path(p).resolve() == self.path:
                raise AssertionError(f"{p} opened outside the header reader")
            return real_open(p, *a, **k)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(os, "pread", pread)
        monkeypatch.setattr(builtins, "open", guarded_open)
        monkeypatch.setattr(io, "open", guarded_open)

    @property
    def furthest_byte(self) -> int:
        return max(offset + n for offset, n in self.reads)


def test_the_27b_q4_0_header_gives_exact_bytes_and_reads_only_the_header(q4_0, monkeypatch):
    path, data_offset = q4_0
    rec = ReadRecorder(monkeypatch, path)
    header = read_header(path)
    assert rec.reads and rec.furthest_byte <= data_offset
    assert header.version == 3 and header.architecture == "gemma3" and header.data_offsets == (data_offset,)
    assert len(header.tensors) == 2 + 62 * 13
    q = header.tensors["blk.0.attn_q.weight"]
    assert q.type_name == "Q4_0" and q.shape == (5376, 4096) and q.nbytes == 5376 * 4096 // 32 * 18
    assert header.tensors["token_embd.weight"].nbytes == 5376 * 262208 // 32 * 18
    assert os.path.getsize(path) == max(t.offset_bytes + t.nbytes for t in header.tensors.values())


def test_the_27b_gguf_shape_matches_its_config_json(q4_0):
    gguf, folder = shape_from_path(q4_0[0]), shape_from_folder(ROOT / "examples/configs/gemma-3-27b-it")
    for field in ("num_layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab", "tied",
                  "layer_numel", "non_layer_numel", "largest_matrix_numel", "layer_types", "sliding_window"):
        assert getattr(gguf, field) == getattr(folder, field), field
    assert gguf.layer_types.count("full_attention") == 62 // 6
    layer_bytes = 3 * 5376 * 21504 // 32 * 18 + (2 * 5376 * 4096 + 2 * 5376 * 2048) // 32 * 18 + (4 * 5376 + 2 * 128) * 4
    assert gguf.weights_format == "gguf" and gguf.layer_stored_bytes == layer_bytes
    assert gguf.decoder_stored_bytes == 62 * layer_bytes            # the 13.4 GiB of decoder layers
    assert round(gguf.decoder_stored_bytes / GiB, 1) == 13.4


def test_model_plan_fits_the_27b_q4_0_on_the_2080ti_without_reading_a_weight_byte(q4_0, tmp_path, monkeypatch,
                                                                                 capsys):
    """The issue's acceptance: batch 8 x 1024, header only, and the bound says where the bytes come from."""
    path, data_offset = q4_0
    config = write_config(tmp_path)
    rec = ReadRecorder(monkeypatch, path)
    rc = main(["--config", str(config), "model", "plan", str(path), "--device-profile", "rtx2080ti", "--batch", "8",
               "--context", "1024", "--host-ram", "16GiB", "--disk-bandwidth", "2GB", "--prompts", "100",
               "--tokens", "256", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 0 and plan["fits"], plan["reason"]
    assert rec.reads and rec.furthest_byte <= data_offset        # not one byte of tensor data was read
    assert plan["weights_format"] == "gguf" and set(plan["bytes_by_block_type"]) == {"Q4_0", "F32"}
    assert plan["peak_device_bytes"] <= int(10.76 * GiB)
    layer = shape_from_path(path).layer_stored_bytes
    assert plan["layer_bytes"] == layer and plan["bytes_per_pass"] == (62 - plan["resident_layers"]) * layer
    # 16 GiB of host RAM keep the ~12 GiB read per pass: PCIe bounds it, the 2 GB/s disk only the first pass
    assert not plan["from_disk"] and plan["page_cache_bytes"] >= plan["disk_bytes_per_pass"]
    assert plan["bound_tokens_per_s"] == pytest.approx(8 * 12e9 / plan["bytes_per_pass"])
    assert plan["bound_from_disk_tokens_per_s"] == pytest.approx(8 * 2e9 / plan["disk_bytes_per_pass"])
    assert plan["job"]["seconds"] == pytest.approx(13 * 257 * 8 / plan["bound_tokens_per_s"])
    # on an 8 GiB host the same bytes come from the disk every pass, and the plan says so
    main(["--config", str(config), "model", "plan", str(path), "--device-profile", "rtx2080ti", "--batch", "8",
          "--context", "1024", "--host-ram", "8GiB", "--disk-bandwidth", "2GB"])
    table = capsys.readouterr().out
    assert "GB/s disk (--disk-bandwidth)" in table and "exceed the" in table and "faster:" in table
    assert "of free host RAM, so the" in table


def test_resident_gguf_layers_are_expanded_only_where_nothing_streams(q4_0):
    """Blocks vs expanded for resident layers: on the 2080 Ti the 27B streams, so every resident layer stays
    blocks (each one saves PCIe bytes per pass); where every layer's blocks fit with room to spare, that
    room holds whole layers expanded, at the compute dtype, and the plan counts them."""
    path, _ = q4_0
    shape = shape_from_path(path)
    card = make_plan(shape, profile("rtx2080ti", host_ram_bytes=32 * GiB), PlanRequest(batch=1, context=1024))
    assert card.fits and card.resident_layers < 62 and card.expanded_layers == 0
    assert not any(r["item"] == "expanded resident layers" for r in card.rows)
    blocks, expanded = 62 * shape.layer_stored_bytes, shape.layer_numel * 2
    for extra, want in ((0, 0), (expanded - 1, 0), (expanded, 1), (10 * expanded + 5, 10), (62 * expanded, 62)):
        plan = make_plan(shape, profile("h100"), PlanRequest(batch=1, context=1024, dtype="fp16",
                                                                  vram_budget_bytes=blocks + extra))
        assert plan.fits and plan.resident_layers == 62 and plan.expanded_layers == want, (extra, plan.reason)
        rows = [r for r in plan.rows if r["item"] == "expanded resident layers"]
        assert sum(r["bytes"] for r in rows) == want * expanded
        assert not plan.expanded_head
    head = shape.vocab * shape.hidden * 2   # the tied 262k x 5376 head: 2.6 GiB in fp16
    for extra, want_head in ((head - 1, False), (head, True)):
        plan = make_plan(shape, profile("h100"), PlanRequest(batch=1, context=1024, dtype="fp16",
                                                             vram_budget_bytes=blocks + 62 * expanded + extra))
        assert plan.fits and plan.expanded_layers == 62 and plan.expanded_head is want_head


def test_an_fp16_folder_plan_names_the_4bit_file_and_the_disk(tmp_path, capsys):
    config = write_config(tmp_path)
    rc = main(["--config", str(config), "model", "plan", str(ROOT / "examples/configs/gemma-3-27b-it"),
               "--device-profile", "rtx2080ti", "--batch", "1", "--context", "2048", "--host-ram", "16GiB",
               "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 0 and plan["weights_format"] == "safetensors" and plan["from_disk"]
    assert plan["bound_tokens_per_s"] is None and "--disk-bandwidth" in plan["bound_note"]
    four_bit = next(f for f in plan["faster"] if f["what"].startswith("a 4-bit GGUF"))
    # 4.5 bits against 16: under a third of the bytes, and it stays in 16 GiB of RAM
    assert four_bit["bytes_per_pass"] < plan["bytes_per_pass"] / 3 and not four_bit["from_disk"]
    assert four_bit["bound_tokens_per_s"] > plan["bound_from_ram_tokens_per_s"]


def test_mixtral_q4_k_m_plans_its_experts_from_the_fused_blocks(tmp_path):
    path = tmp_path / "mixtral-8x7b-q4_k_m.gguf"
    write_header_only(path, *mixtral_8x7b_q4_k_m())
    shape = shape_from_path(path)
    assert shape.moe and shape.model_type == "mixtral" and shape.num_experts == 8 and shape.moe_layers == 32
    assert shape.expert_numel == 3 * 4096 * 14336 and not shape.tied
    header = read_header(path)
    per_expert = [sum(header.tensors[f"blk.{i}.ffn_{p}_exps.weight"].nbytes // 8 for p in ("gate", "up", "down"))
                  for i in range(32)]
    assert shape.expert_stored_bytes == max(per_expert)
    plan = make_plan(shape, profile("rtx2080ti", host_ram_bytes=32 * GiB), PlanRequest(batch=1, context=1024))
    assert plan.fits and plan.expert_cache_slots > 0
    assert {r["item"]: r["bytes"] for r in plan.rows}["expert cache"] == plan.expert_cache_slots * max(per_expert)


def test_split_parts_are_gathered_and_a_missing_part_is_named(tmp_path):
    meta, tensors = gemma3_27b("Q4_0")
    half = len(tensors) // 2
    for no, part in ((1, tensors[:half]), (2, tensors[half:])):
        write_header_only(tmp_path / f"g-0000{no}-of-00002.gguf",
                          {**meta, "split.no": no - 1, "split.count": 2, "split.tensors.count": len(tensors)}, part)
    header = read_header(tmp_path / "g-00002-of-00002.gguf")
    assert len(header.files) == 2 and len(header.tensors) == len(tensors)
    assert header.tensors["blk.61.ffn_down.weight"].file.name == "g-00002-of-00002.gguf"
    assert shape_from_path(tmp_path / "g-00001-of-00002.gguf").num_layers == 62
    (tmp_path / "g-00002-of-00002.gguf").unlink()
    with pytest.raises(SettingError, match="missing g-00002-of-00002.gguf"):
        read_header(tmp_path / "g-00001-of-00002.gguf")


def test_damaged_files_get_a_sentence(tmp_path):
    path = tmp_path / "m.gguf"
    data_offset = write_header_only(path, *gemma3_27b("Q4_0"))
    os.truncate(path, data_offset + 1000)
    with pytest.raises(SettingError, match="truncated; download it again"):
        read_header(path)
    os.truncate(path, 2000)
    with pytest.raises(SettingError, match="ends inside its GGUF header"):
        read_header(path)
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(SettingError, match="not a GGUF file"):
        gguf_header.read_header(path)


def test_model_add_registers_a_gguf_and_ollamas_blob_and_refuses_other_paths(q4_0, tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path)

    def cli(*args: str) -> int:
        return main(["--config", str(config), *args])

    assert cli("model", "add", "g27", str(q4_0[0])) == 0
    assert "registered model 'g27' (gguf, gemma3_text, dense)" in capsys.readouterr().out
    # a fake Ollama store: manifest -> model layer digest -> blob (a GGUF without a .gguf suffix)
    store = tmp_path / "ollama"
    digest = "sha256:" + "ab" * 32
    blob = store / "blobs" / ("sha256-" + "ab" * 32)
    blob.parent.mkdir(parents=True)
    write_header_only(blob, *mixtral_8x7b_q4_k_m())
    manifest = store / "manifests/registry.ollama.ai/library/mixtral/8x7b"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "cd" * 32},
        {"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": 1}]}))
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    assert cli("model", "add", "mixtral", "--ollama", "mixtral:8x7b", "--device", "cuda") == 0
    assert "(gguf, mixtral, moe)" in capsys.readouterr().out
    registry = (tmp_path / "var" / "models.toml").read_text()
    assert str(blob) in registry and str(q4_0[0]) in registry and 'kind = "moe"' in registry
    assert cli("model", "list") == 0
    listed = capsys.readouterr().out
    assert "g27" in listed and str(blob) in listed and "(registered)" in listed
    # registered names plan like config tables, from the registry file
    assert cli("model", "plan", "mixtral", "--device-profile", "rtx2080ti", "--batch", "1", "--json") == 0
    assert json.loads(capsys.readouterr().out)["expert_cache_slots"] > 0
    # refusals, each one line that says what to do
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    for args, match in ((("nothing", str(empty)), "neither a GGUF file nor a folder with config.json and"),
                        (("nothing", str(tmp_path / "nowhere.gguf")), "neither a GGUF file"),
                        (("x", "--ollama", "gemma3:27b"), "Ollama has no model 'gemma3:27b'")):
        assert cli("model", "add", *args) == 2
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1
    assert "nothing" not in (tmp_path / "var" / "models.toml").read_text()


def test_a_probe_measurement_is_remembered_for_its_disk_and_used_by_the_plan(q4_0, tmp_path, capsys):
    state = tmp_path / "var" / "worker" / "probe"    # cfg.kind_state_dir("probe"): where the probe keeps it
    state.mkdir(parents=True)
    warm = {"path": str(q4_0[0]), "bytes_per_s": 3e9, "page_cache_dropped": False, "bytes_read": 1}
    assert not disk.remember_read_bandwidth(state, warm)      # a page-cache read says nothing of the disk
    assert disk.remember_read_bandwidth(state, {**warm, "bytes_per_s": 5e8, "page_cache_dropped": True})
    bandwidth, source = disk.remembered_read_bandwidth(state, q4_0[0])
    assert bandwidth == 5e8 and source.startswith(f"probe of {q4_0[0]}")
    config = write_config(tmp_path)
    main(["--config", str(config), "model", "plan", str(q4_0[0]), "--device-profile", "rtx2080ti", "--batch", "8",
          "--context", "1024", "--host-ram", "4GiB", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["from_disk"] and plan["request"]["disk_source"].startswith("probe of")
    assert plan["bound_tokens_per_s"] == pytest.approx(8 * 5e8 / plan["disk_bytes_per_pass"])

