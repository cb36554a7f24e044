"""Worker-side path confinement (jobs.contract.confine) on real files and symlinks: a file param or
folder that resolves outside fails, a symlinked file inside a folder is skipped with a warning,
and a read re-checks what was opened."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobs.contract.confine import OutsideRoots, Roots
from jobs.lib import artifacts, manifest


@pytest.fixture
def tree(tmp_path: Path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "notes").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.md").write_text("# Secret\nthe payroll password is hunter2\n")
    (root / "notes" / "2020-01-01-ok.md").write_text("# Fine\nan ordinary note\n")
    os.symlink(outside / "secret.md", root / "notes" / "2020-01-02-link.md")
    warnings: list[str] = []
    return root, outside, Roots([str(root)], warnings.append), warnings


def test_symlinked_file_in_a_folder_is_skipped_with_a_warning(tree):
    root, outside, roots, warnings = tree
    found = manifest.scan(root / "notes", roots)
    assert list(found) == ["2020-01-01-ok.md"]
    assert len(warnings) == 1 and "2020-01-02-link.md" in warnings[0] and "outside" in warnings[0]
    assert "hunter2" not in repr(found)


def test_folder_swapped_for_a_symlink_after_submit_fails(tree):
    root, outside, roots, _ = tree
    assert roots.param("archive", root / "notes") == (root / "notes").resolve()
    (root / "notes").rename(root / "old")
    os.symlink(outside, root / "notes")          # the swap: same path, now pointing outside
    with pytest.raises(OutsideRoots, match="param 'archive'.*outside the allowed roots"):
        roots.param("archive", root / "notes")


def test_a_read_checks_the_file_actually_opened(tree):
    root, outside, roots, _ = tree
    assert roots.read_text(root / "notes" / "2020-01-01-ok.md").startswith("# Fine")
    with pytest.raises(OutsideRoots):
        roots.read_bytes(root / "notes" / "2020-01-02-link.md")
    with pytest.raises(OutsideRoots):             # .. through a symlinked folder component too
        os.symlink(outside, root / "door")
        roots.read_bytes(root / "door" / "secret.md")


def test_artifacts_skip_symlinks_outside(tree):
    root, outside, roots, warnings = tree
    gems = root / "gems"
    gems.mkdir()
    (gems / "a.md").write_text("---\nid: a\n---\nbody\n")
    os.symlink(outside / "secret.md", gems / "b.md")
    items = artifacts.load(gems, roots)
    assert [a.id for a in items] == ["a"] and any("b.md" in w for w in warnings)


def test_no_roots_means_nothing_may_be_read(tmp_path: Path):
    (tmp_path / "f.md").write_text("x")
    with pytest.raises(OutsideRoots):
        Roots([], lambda m: None).param("cv", tmp_path / "f.md")


def test_probe_rechecks_each_file_once_opened(tree):
    """`probe` listed the files, then opened each with plain open(): a file swapped for a link
    to a secret between the listing and the open was read."""
    from jobs.kinds.probe import measure_read_bandwidth
    root, outside, roots, _ = tree
    data = root / "data"
    data.mkdir()
    (data / "a.bin").write_bytes(b"a" * 3 * 1024**2)       # the larger one: read first
    (data / "b.bin").write_bytes(b"b" * 1024**2)
    (outside / "big-secret.bin").write_bytes(b"s" * 1024**2)

    def swap_b(done: int, total: int) -> None:              # while a.bin is being read
        if not (data / "b.bin").is_symlink():
            (data / "b.bin").unlink()
            os.symlink(outside / "big-secret.bin", data / "b.bin")
    with pytest.raises(OutsideRoots, match="b.bin"):
        measure_read_bandwidth(data, 64 * 1024**2, progress=swap_b, roots=roots)


def test_a_fifo_is_never_read(tree):
    root, _, roots, _ = tree
    os.mkfifo(root / "pipe")
    with pytest.raises(OutsideRoots, match="not a regular file"):
        roots.read_bytes(root / "pipe")


def test_empty_allowed_roots_means_none_and_the_state_dir_is_not_a_default(tmp_path: Path):
    from jobs.contract.errors import ParamError
    from jobs.contract.kinds import registry, validate_params
    from lab_attendant.config import parse_config
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "lab_attendant.sqlite3").write_bytes(b"")
    default = parse_config({"paths": {"state_dir": "var"}}, base_dir=tmp_path, source=None)
    assert not any((tmp_path / "var").resolve().is_relative_to(r.resolve())
                   for r in default.allowed_roots)
    probe = registry()["probe"]
    with pytest.raises(ParamError, match="outside the allowed roots"):
        validate_params(probe, {"path": str(tmp_path / "var" / "lab_attendant.sqlite3")},
                        default.allowed_roots)
    none = parse_config({"paths": {"allowed_roots": []}}, base_dir=tmp_path, source=None)
    assert none.allowed_roots == ()
    with pytest.raises(ParamError, match=r"none: \[paths\] allowed_roots = \[\]"):
        validate_params(probe, {"path": str(Path(__file__))}, none.allowed_roots)
