"""The architecture's rules are code: import-linter's contracts (pyproject.toml) hold on this tree, and a
forbidden import planted in a copy of it breaks the contract that names it (so the check can fail)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(),
                                reason="import-linter is not installed in this venv (pip install -e '.[test]')")


def _copy_tree(dst: Path) -> Path:
    for name in ("lab_attendant", "jobs"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def _lint(tree: Path, *contracts: str) -> subprocess.CompletedProcess:
    argv = [str(LINT_IMPORTS), "--no-cache"] + [a for c in contracts for a in ("--contract", c)]
    return subprocess.run(argv, cwd=tree, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"})


def test_contracts_hold_on_the_tree():
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("module, line, contract", [
    ("lab_attendant/cli/status.py", "import torch", "supervisor-torch-free"),
    ("lab_attendant/store/history.py", "from jobs.paging.dense import streamer", "supervisor-torch-free"),
    ("jobs/paging/dense/slots.py", "from lab_attendant import config", "engine-knows-no-jobs"),
    ("jobs/paging/plan/shape.py", "import torch", "plan-torch-free"),
    ("jobs/contract/units.py", "import psutil", "contract-stdlib-only"),
])
def test_a_planted_forbidden_import_breaks_its_contract(tmp_path, module, line, contract):
    tree = _copy_tree(tmp_path)
    clean = _lint(tree, contract)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    target = tree / module
    target.write_text(target.read_text() + f"\n{line}  # planted by the test\n")
    broken = _lint(tree, contract)
    assert broken.returncode != 0
    assert "BROKEN" in broken.stdout and module.replace("/", ".").removesuffix(".py") in broken.stdout


def test_a_planted_cycle_breaks_the_acyclic_contract(tmp_path):
    tree = _copy_tree(tmp_path)
    # cron is a leaf that the scheduler imports; make it import the scheduler back
    target = tree / "lab_attendant" / "cron.py"
    target.write_text(target.read_text() + "\nfrom lab_attendant import scheduler  # planted by the test\n")
    broken = _lint(tree, "no-cycles")
    assert broken.returncode != 0 and ".cron" in broken.stdout and ".scheduler" in broken.stdout


def test_every_module_is_on_the_map():
    """docs/architecture.md lists every module of both packages under its package's heading."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    sections = {}
    for block in text.split("\n### `")[1:]:
        heading, _, body = block.partition("\n")
        sections[heading.rstrip("`")] = body
    missing = []
    for top in ("lab_attendant", "jobs"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.name == "__init__.py" or "__pycache__" in path.parts:
                continue
            package = path.parent.relative_to(ROOT).as_posix() + "/"
            if f"| `{path.name}` |" not in sections.get(package, ""):
                missing.append(path.relative_to(ROOT).as_posix())
    assert not missing, f"add these to docs/architecture.md: {missing}"
