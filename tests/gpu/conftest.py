"""GPU tests: every test here is marked gpu + engine and skipped without CUDA; engine helpers import.

They run in the experimental venv (scripts/test.sh) and on a lent GPU machine with
`venvs/experimental/bin/python -m pytest tests/gpu`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "engine"))  # engine_helpers / moe_helpers: shared, not a package

try:
    import torch
except ImportError:  # the supervisor's venv: these tests need the experimental one
    collect_ignore_glob = ["test_*.py"]
    torch = None


def pytest_collection_modifyitems(config, items):
    cuda = torch is not None and torch.cuda.is_available()
    for item in items:
        if Path(str(item.fspath)).resolve().parent != HERE:
            continue  # this hook sees the whole session's items
        item.add_marker(pytest.mark.gpu)
        item.add_marker(pytest.mark.engine)
        if not cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
