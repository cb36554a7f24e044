"""Pure parts of the paging jobs: manifest diffing, clustering, keywords, rubric math, artifacts."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from jobs.lib import artifacts, clustering, manifest, rubric


def test_manifest_diff_new_changed_removed_and_touch_is_unchanged(tmp_path: Path):
    (tmp_path / "a.md").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    (tmp_path / "skip.pdf").write_text("x")
    (tmp_path / ".hidden.md").write_text("x")
    first = manifest.scan(tmp_path)
    assert sorted(first) == ["a.md", "b.txt"]
    old = {rel: {"sha256": i.sha256} for rel, i in first.items()}
    old["gone.md"] = {"sha256": "0" * 64}
    os.utime(tmp_path / "a.md", ns=(1, 1))              # mtime moves, content does not
    (tmp_path / "b.txt").write_text("beta, edited")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("gamma")
    d = manifest.diff(old, manifest.scan(tmp_path))
    assert d.new == ("sub/c.md",) and d.changed == ("b.txt",) and d.removed == ("gone.md",)
    assert d.unchanged == ("a.md",) and d.todo == ("b.txt", "sub/c.md")


def test_manifest_save_load_roundtrip_and_state_folder_per_archive(tmp_path: Path):
    p = manifest.state_folder(tmp_path, tmp_path / "one") / "manifest.json"
    assert p.parent != manifest.state_folder(tmp_path, tmp_path / "two")
    assert manifest.load(p) == {"files": {}, "themes": []}
    manifest.save(p, {"files": {"a.md": {"sha256": "x"}}, "themes": []})
    assert manifest.load(p)["files"] == {"a.md": {"sha256": "x"}}
    assert [f.name for f in p.parent.iterdir()] == ["manifest.json"]   # no temp file left


def test_note_date_from_filename_else_mtime():
    assert manifest.note_date("2009-03-14-first-bike-tour.md", 0) == "2009-03-14"
    assert manifest.note_date("sub/undated.md", 86400 * 10**9 * 2).startswith("1970-01-0")


def test_cluster_groups_similar_vectors_and_respects_max_clusters():
    vecs = [[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0.05, 0.95, 0], [0, 0, 1]]
    assert clustering.cluster(vecs, max_clusters=3) == [[0, 1], [2, 3], [4]]
    assert clustering.cluster(vecs, max_clusters=1, merge_above=0.99) == [[0, 1, 2, 3, 4]]
    # High threshold, many clusters allowed: nothing merges.
    assert clustering.cluster(vecs, max_clusters=5, merge_above=0.999) == [[0], [1], [2], [3], [4]]


def test_cosine():
    assert clustering.cosine([1, 0], [1, 0]) == pytest.approx(1.0)
    assert clustering.cosine([1, 0], [0, 1]) == 0.0
    assert clustering.cosine([0, 0], [1, 1]) == 0.0


def test_keywords_prefer_words_shared_in_the_group_and_rare_elsewhere():
    docs = ["bike tour along the river", "bike tour to the sea", "sourdough bread baking",
            "database outage at night", "cloud migration outage"]
    assert clustering.keywords(docs[:2], docs)[:2] == ["bike", "tour"]
    assert clustering.keywords(docs[3:], docs)[0] == "outage"
    assert clustering.top_terms("Bread, bread and more BREAD baking", 2) == ["bread", "baking"]


def test_yes_probability_is_the_yes_share_of_the_yes_no_mass():
    lp = {" yes": math.log(0.3), " Yes": math.log(0.1), " no": math.log(0.1), " No": math.log(0.0001)}
    assert rubric.yes_probability(lp) == pytest.approx(0.4 / (0.4 + 0.1001))
    even = {o: -5.0 for o in rubric.OPTIONS}
    assert rubric.yes_probability(even) == pytest.approx(0.5)
    # Stable for very negative log-probs (no underflow to 0/0).
    far = {" yes": -900.0, " Yes": -900.0, " no": -901.0, " No": -901.0}
    assert rubric.yes_probability(far) == pytest.approx(1 / (1 + math.exp(-1)))


def test_rubric_score_and_reason():
    per = {"specific": 0.8, "useful": 0.4}
    assert rubric.score(per) == pytest.approx(0.6)
    assert rubric.reason(per) == "strongest on specific (0.80), weakest on useful (0.40)"
    assert rubric.reason({"useful": 0.5}) == "useful: 0.50"


def test_artifacts_front_matter_keeps_body_bytes(tmp_path: Path):
    body = "First line with `code`.\n\nSecond: ünïcode — kept.\n"
    (tmp_path / "x.md").write_text(
        f"---\nid: x1\ntitle: A title\nkind: technical-story\ntags: [a, b]\n---\n{body}")
    (tmp_path / "y.md").write_text("no front matter\n")
    a, b = artifacts.load(tmp_path)
    assert (a.id, a.title, a.kind, a.tags, a.body) == ("x1", "A title", "technical-story",
                                                       ("a", "b"), body)
    assert a.is_technical_story and not b.is_technical_story and b.id == "y"


def test_artifacts_jsonl_and_errors_name_the_file(tmp_path: Path):
    p = tmp_path / "gems.jsonl"
    p.write_text('{"id": "a", "kind": "technical-story", "body": "keep me"}\n\n'
                 '{"id": "b", "text": "other"}\n')
    items = artifacts.load(p)
    assert [(i.id, i.body, i.is_technical_story) for i in items] == [
        ("a", "keep me", True), ("b", "other", False)]
    p.write_text('{"id": "a"}\n')
    with pytest.raises(artifacts.ArtifactError, match="gems.jsonl line 1"):
        artifacts.load(p)
    p.write_text('{"id": "a", "body": "1"}\n{"id": "a", "body": "2"}\n')
    with pytest.raises(artifacts.ArtifactError, match="repeated: a"):
        artifacts.load(p)
