"""The `generate` kind's inputs without torch: JSONL/chat/txt/folder parsing, a bad line named by its number,
stop strings, the submit-time check (chat needs a template), and the kind's params in the registry."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.contract.errors import ParamError
from jobs.contract.kinds import registry, validate_params
from jobs.contract.model_facts import ModelFacts
from jobs.contract.prompts_input import check_params, has_chat_template, load_prompts, parse_stop


def _jsonl(path: Path, *lines: object) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def test_jsonl_prompts_and_chat_lines_keep_input_order(tmp_path: Path):
    p = _jsonl(tmp_path / "p.jsonl", {"id": "b", "prompt": "Two"}, "",
               {"id": "a", "messages": [{"role": "user", "content": "Hi"}]}, {"prompt": "Three"})
    items = load_prompts(p)
    assert [i.id for i in items] == ["b", "a", "line-4"]
    assert items[0].prompt == "Two" and items[1].messages == ({"role": "user", "content": "Hi"},)


@pytest.mark.parametrize("bad, says", [
    ("{not json", "line 2 is not valid JSON"),
    (json.dumps({"id": "x"}), "line 2 has neither"),
    (json.dumps({"id": "x", "messages": [{"role": "user"}]}), "line 2 has neither"),
    (json.dumps(["a list"]), "line 2 is not a JSON object"),
])
def test_a_bad_line_is_named_by_its_number(tmp_path: Path, bad: str, says: str):
    p = _jsonl(tmp_path / "p.jsonl", {"id": "ok", "prompt": "fine"}, bad)
    with pytest.raises(ParamError, match=says):
        load_prompts(p)


def test_txt_folder_duplicates_and_empty(tmp_path: Path):
    (tmp_path / "one.txt").write_text("first line\n\nsecond line\n")
    assert [i.prompt for i in load_prompts(tmp_path / "one.txt")] == ["first line", "second line"]
    d = tmp_path / "folder"
    d.mkdir()
    (d / "b.md").write_text("# B\nbody")
    (d / "a.txt").write_text("A prompt")
    (d / "skip.json").write_text("{}")
    assert [i.id for i in load_prompts(d)] == ["a.txt", "b.md"]
    with pytest.raises(ParamError, match="appears twice"):
        load_prompts(_jsonl(tmp_path / "dup.jsonl", {"id": "x", "prompt": "a"}, {"id": "x", "prompt": "b"}))
    with pytest.raises(ParamError, match="holds no prompts"):
        load_prompts(_jsonl(tmp_path / "empty.jsonl", ""))
    with pytest.raises(ParamError, match="neither a .jsonl"):
        load_prompts(tmp_path / "x.csv")


def test_stop_strings():
    assert parse_stop(None) == () and parse_stop("\\n") == ("\n",) and parse_stop("END") == ("END",)
    assert parse_stop('["\\n\\n", "Q:"]') == ("\n\n", "Q:")
    with pytest.raises(ParamError, match="JSON list of strings"):
        parse_stop("[1, 2]")


def test_chat_needs_a_template_at_submit(tmp_path: Path):
    p = _jsonl(tmp_path / "c.jsonl", {"id": "c", "messages": [{"role": "user", "content": "Hi"}]})
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>"}))
    assert not has_chat_template(model)
    with pytest.raises(ParamError, match="no chat template"):
        check_params({"prompts": str(p)}, ModelFacts.of_folder(model))
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    check_params({"prompts": str(p)}, ModelFacts.of_folder(model))


def test_generate_kind_params_are_validated_and_confined(tmp_path: Path):
    kind = registry()["generate"]
    assert kind.needs_paging
    p = _jsonl(tmp_path / "p.jsonl", {"id": "a", "prompt": "x"})
    out = validate_params(kind, {"prompts": str(p), "temperature": "0.7", "seed": "3"}, [tmp_path])
    assert out["temperature"] == 0.7 and out["max_new_tokens"] == 128 and out["top_p"] == 1.0
    with pytest.raises(ParamError, match="outside the allowed roots"):
        validate_params(kind, {"prompts": str(p)}, [tmp_path / "elsewhere"])
    with pytest.raises(ParamError, match="line 2"):
        validate_params(kind, {"prompts": str(_jsonl(tmp_path / "b.jsonl", {"prompt": "a"}, "{"))},
                        [tmp_path])
    with pytest.raises(ParamError, match="'temperature' must be"):
        validate_params(kind, {"prompts": str(p), "temperature": "-1"}, [tmp_path])
