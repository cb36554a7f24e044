"""Files planted where a worker or the CLI will look (issue #31, items 7 and 9): real daemon,
real workers, the real CLI. A planted run folder must not run code; a run name is not markup."""
from __future__ import annotations

import pytest

from tests.conftest import Lab

pytestmark = pytest.mark.e2e


def test_a_module_planted_in_the_next_run_folder_is_not_imported(lab: Lab):
    """The worker runs `python -m jobs.worker` with cwd = its run folder: without a safe import
    path, a `jobs/` package planted there (by an earlier run) would replace ours."""
    first = lab.submit("sleepy", "seconds=0")
    marker = lab.root / "planted-code-ran"
    planted = lab.state_dir / "runs" / str(first + 1) / "jobs"
    planted.mkdir(parents=True)
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    second = lab.submit("sleepy", "seconds=0")
    assert second == first + 1
    lab.cli("daemon", "--burst", timeout=120)
    assert lab.state(second) == "succeeded", lab.show(second)["reason"]
    assert not marker.exists()


def test_run_ids_are_not_reused_after_prune(lab: Lab):
    rid = lab.submit("sleepy", "seconds=0")
    lab.cli("daemon", "--burst", timeout=120)
    lab.cli("prune", str(rid))
    assert lab.cli("show", str(rid), check=False).returncode != 0
    assert lab.submit("sleepy", "seconds=0") == rid + 1
