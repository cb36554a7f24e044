"""kv_rank_study without torch: submit-side checks (ranks, passages, head_dim from config.json) and the report
(verdict, markdown, SVG) built from a results table."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from jobs.contract.errors import ParamError
from jobs.contract.kinds import check_with_model, registry, validate_params
from jobs.contract.kv_rank_inputs import load_passages, parse_ranks
from jobs.lib.kv_report import render_markdown, render_svg, verdict

KIND = registry()["kv_rank_study"]


@pytest.fixture
def texts(tmp_path: Path) -> Path:
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("One passage of text.")
    (folder / "b.md").write_text("# Another\n\nwith a heading.")
    (folder / "skip.json").write_text("{}")
    return folder


def _validate(tmp_path: Path, **raw) -> dict:
    return validate_params(KIND, raw, [tmp_path])


def test_ranks_parse_sorted_unique_and_refuse_nonsense():
    assert parse_ranks("32, 4,8,8") == (4, 8, 32)
    for bad in ("0", "4,-1", "four", "", ","):
        with pytest.raises(ParamError, match="ranks"):
            parse_ranks(bad)


def test_defaults_and_passages_from_a_folder_or_jsonl(tmp_path: Path, texts: Path):
    params = _validate(tmp_path, texts=str(texts))
    assert (params["ranks"], params["context"], params["continuation"]) == ("4,8,16,32,64", 512, 64)
    assert [p.id for p in load_passages(texts)] == ["a", "b"]
    lines = tmp_path / "p.jsonl"
    lines.write_text(json.dumps({"id": "x", "text": "hello"}) + "\n\n" + json.dumps({"text": "again"}) + "\n")
    assert [(p.id, p.text) for p in load_passages(lines)] == [("x", "hello"), ("line-3", "again")]


@pytest.mark.parametrize("raw, needle", [
    ({"ranks": "0"}, "every rank must be at least 1"),
    ({"ranks": "-4,8"}, "every rank must be at least 1"),
    ({"ranks": "600"}, "> context 512"),
    ({"context": "1"}, "context"),
    ({"continuation": "0"}, "continuation"),
])
def test_bad_params_are_refused(tmp_path: Path, texts: Path, raw: dict, needle: str):
    with pytest.raises(ParamError, match=needle):
        _validate(tmp_path, texts=str(texts), **raw)


def test_empty_texts_are_refused(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n")
    with pytest.raises(ParamError, match="no passages"):
        _validate(tmp_path, texts=str(empty))
    (tmp_path / "bad.jsonl").write_text('{"title": "no text"}\n')
    with pytest.raises(ParamError, match="line 1"):
        _validate(tmp_path, texts=str(tmp_path / "bad.jsonl"))


def test_a_rank_above_the_models_head_dim_is_refused(tmp_path: Path, texts: Path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"text_config": {"head_dim": 64, "hidden_size": 640}}))
    check_with_model(KIND, _validate(tmp_path, texts=str(texts), ranks="8,64"), model)
    with pytest.raises(ParamError, match="> head_dim 64"):
        check_with_model(KIND, _validate(tmp_path, texts=str(texts), ranks="8,65"), model)
    (model / "config.json").write_text(json.dumps({"hidden_size": 512, "num_attention_heads": 8}))
    with pytest.raises(ParamError, match="> head_dim 64"):
        check_with_model(KIND, _validate(tmp_path, texts=str(texts), ranks="128"), model)


def _row(method: str, setting: int, bytes_rel: float, agree: float, kl: float, matched: str | None = None) -> dict:
    label = {"full": "full", "svd": f"svd r={setting}", "int": f"int{setting}", "last_n": f"last {setting}",
             "sink_last": f"first 4 + last {setting - 4}"}[method]
    return {"method": method, "setting": setting, "label": label, "bytes": round(bytes_rel * 1000),
            "bytes_rel": bytes_rel, "matched_to": matched, "top1_agreement": agree, "mean_kl": kl,
            "perplexity": 20 + 10 * kl, "energy_kept": {"keys": 0.9, "values": 0.6} if method == "svd" else None}


def _report(svd32_agree: float, head_dim: int = 256) -> dict:
    results = [_row("full", 0, 1.0, 1.0, 0.0), _row("svd", 8, 0.05, 0.5, 1.0),
               _row("svd", 32, 0.19, svd32_agree, 0.4), _row("int", 2, 0.16, 0.2, 2.5),
               _row("int", 4, 0.28, 0.86, 0.09), _row("last_n", 96, 0.19, 0.55, 0.7, "svd r=32"),
               _row("sink_last", 96, 0.19, 0.58, 0.6, "svd r=32")]
    return {"model": "m", "context": 512, "continuation": 64, "positions": 320, "texts": "t",
            "passages": [{"id": str(i)} for i in range(5)], "skipped": [{"id": "short", "tokens": 100}],
            "method": "how", "results": results,
            "cache": {"layers": 18, "sliding_layers": 15, "global_layers": 3, "sliding_window": 512,
                      "sliding_tokens": 511, "global_tokens": 512, "kv_heads": 1, "head_dim": head_dim,
                      "compute_dtype": "fp32", "storage_float_bytes": 2, "full_bytes": 2**20}}


def test_verdict_follows_the_numbers():
    low = verdict(_report(0.62))
    assert low["holds"] is False and low["smallest_rank_keeping_fidelity"] is None
    assert "does not hold" in low["text"] and "32/256 = 12.5 %" in low["text"]
    # The baselines nearest rank 32's bytes are last-96 (sized to it) and int2; int4 is further away.
    assert "keeping the last 96 tokens (19.0 %) agrees at 55.0 %" in low["text"]
    assert "keeping first 4 + the last 92 tokens (19.0 %) agrees at 58.0 %" in low["text"]
    assert "int2 (16.0 %) agrees at 20.0 %" in low["text"] and "SVD is ahead of them all" in low["text"]
    beaten = _report(0.5)
    assert "last 96, first 4 + last 92 beat SVD with no more bytes" in verdict(beaten)["text"]
    assert "No baseline with no more bytes agrees more often than SVD at any measured rank" in low["text"]
    assert ("agrees more often than SVD at 1 of 2 measured ranks (e.g. rank 32, 19.0 % of the bytes, 50.0 %: "
            "first 4 + last 92 at 19.0 % agrees at 58.0 %)") in verdict(beaten)["text"]
    # Fidelity alone is not enough at head_dim 256: the bytes of rank 32 stay above 10 %.
    assert verdict(_report(0.97))["holds"] is False
    assert verdict(_report(0.97))["smallest_rank_keeping_fidelity"] == 32
    wide = _report(0.97, head_dim=1024)
    for r in wide["results"]:
        if r["label"] == "svd r=32":
            r["bytes_rel"] = 0.04
    assert verdict(wide)["holds"] is True and "holds" in verdict(wide)["text"]
    missing = _report(0.9)
    missing["results"] = [r for r in missing["results"] if r["label"] != "svd r=32"]
    assert verdict(missing)["holds"] is None and "not measured" in verdict(missing)["text"]


def test_markdown_and_svg_render_every_row():
    report = _report(0.62)
    report["claim"] = verdict(report)
    md = render_markdown(report)
    assert md.count("\n| ") == 1 + len(report["results"])  # header + one row each
    assert "## Verdict" in md and "short (100 tokens)" in md and "90.0 % / 60.0 %" in md
    svg = ET.fromstring(render_svg(report))
    ns = "{http://www.w3.org/2000/svg}"
    assert len(svg.findall(f"{ns}polyline")) == 5 + 4   # per method and panel; full has no KL > 0 to draw
    assert len(svg.findall(f"{ns}circle")) == len(report["results"]) * 2 - 1  # full has KL 0: no log point


def test_passages_are_confined_in_the_worker(tmp_path):
    from jobs.contract.confine import OutsideRoots, Roots

    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir(), outside.mkdir()
    (inside / "a.txt").write_text("a passage that stays inside")
    (outside / "secret.txt").write_text("must never be read")
    (inside / "b.txt").symlink_to(outside / "secret.txt")
    warnings: list[str] = []
    roots = Roots([str(inside)], warnings.append)
    assert [p.text for p in load_passages(inside, roots)] == ["a passage that stays inside"]
    assert len(warnings) == 1 and "b.txt" in warnings[0] and "outside the allowed roots" in warnings[0]
    (tmp_path / "swapped").symlink_to(outside)         # a folder param that resolves outside fails the run
    with pytest.raises(OutsideRoots):
        load_passages(tmp_path / "swapped", roots)


def test_a_gguf_model_gives_its_head_dim_and_chat_template_from_the_header(tmp_path: Path, texts: Path):
    """A .gguf default has no config.json: the supervisor reads the facts from the header (no weight byte)."""
    from lab_attendant.plan import model_facts
    from tests.fixtures.gguf_headers import gemma3_27b, write_header_only

    metadata, tensors = gemma3_27b("Q4_0")
    path = tmp_path / "gemma-3-27b-q4_0.gguf"
    write_header_only(path, {**metadata, "tokenizer.chat_template": "{{ messages }}"}, tensors)
    facts = model_facts(path)
    assert facts.head_dim == 128 and facts.has_chat_template is True
    check_with_model(KIND, _validate(tmp_path, texts=str(texts), ranks="8,128"), facts)
    with pytest.raises(ParamError, match="> head_dim 128"):
        check_with_model(KIND, _validate(tmp_path, texts=str(texts), ranks="129"), facts)
