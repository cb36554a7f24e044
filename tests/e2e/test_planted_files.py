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


NAMES = ["[/x]", "[link=file:///etc/passwd]click[/link]", "\x1b]8;;file:///etc/passwd\x1b\\click",
         ":smile: [bold]b", "\x1b[2J\x07cleared"]


def test_a_run_name_is_shown_as_typed_never_as_markup_or_terminal_codes(lab: Lab):
    """'[/x]' made `list` and `show` fail with rich's MarkupError; '[link=...]' printed a
    hyperlink; an ESC in a name reached the terminal."""
    ids = {lab.submit("sleepy", "seconds=0", extra=("-J", name)): name for name in NAMES}
    outputs = [lab.cli(*args, check=False) for args in (["list"], ["watch", "--once"])]
    outputs += [lab.cli("show", str(rid), check=False) for rid in ids]
    for proc in outputs:
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout       # no escape reaches
    for proc, name in zip(outputs[2:], ids.values()):
        assert name.replace("\x1b", "").replace("\x07", "") in proc.stdout   # shown as typed
    assert "[/x]" in outputs[0].stdout


@pytest.mark.parametrize("odd", ["w?mode=ro", "a#b", "p%41c"])
def test_a_state_dir_with_uri_characters_is_the_one_used(tmp_path, odd: str):
    """'?', '#' and '%' in state_dir were spliced into SQLite URLs/URIs: `w?mode=ro` put the
    store in a folder named `w`; the backup read another file or failed."""
    from tests.conftest import write_config
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace('state_dir = "var"', f'state_dir = "{odd}"'))
    lab = Lab(root=tmp_path, config=cfg)
    rid = lab.submit("sleepy", "seconds=0")
    assert (tmp_path / odd / "lab_attendant.sqlite3").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {odd, "lab-attendant.toml", "logs"})
    lab.cli("db", "backup", str(tmp_path / "copy.sqlite3"))
    import sqlite3
    with sqlite3.connect(tmp_path / "copy.sqlite3") as conn:
        assert [r[0] for r in conn.execute("SELECT id FROM runs")] == [rid]
