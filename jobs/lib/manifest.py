"""The incremental-run manifest of an archive folder: path -> mtime, size, sha256 and cached results.

Stdlib only. Lives in the spec's state_dir (STATE_DIR/worker/nightly_insights)/insights/<sha of the archive path>/manifest.json, written atomically.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.contract.atomic import write_atomic
from jobs.contract.confine import Roots

NOTE_SUFFIXES = (".md", ".txt")
_DATE_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})")


@dataclass(frozen=True)
class FileInfo:
    rel: str                  # path relative to the archive, "/"-separated
    mtime_ns: int
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class Diff:
    new: tuple[str, ...]
    changed: tuple[str, ...]
    removed: tuple[str, ...]
    unchanged: tuple[str, ...]

    @property
    def todo(self) -> tuple[str, ...]:
        return tuple(sorted(self.new + self.changed))


def state_folder(state_dir: Path, archive: Path) -> Path:
    key = hashlib.sha256(str(archive.resolve()).encode()).hexdigest()[:16]
    return state_dir / "insights" / key


def sha256_file(path: Path, roots: Roots | None = None) -> str:
    return hashlib.sha256(roots.read_bytes(path) if roots else path.read_bytes()).hexdigest()


def scan(archive: Path, roots: Roots | None = None) -> dict[str, FileInfo]:
    """Every note (.md/.txt, hidden files skipped) under `archive`, keyed by relative path; with
    `roots`, notes resolving outside them are skipped with a warning (jobs.contract.confine)."""
    found = [p for p in sorted(archive.rglob("*"))
             if p.is_file() and p.suffix.lower() in NOTE_SUFFIXES and not any(
                 part.startswith(".") for part in p.relative_to(archive).parts)]
    out = {}
    for p in (roots.keep(found) if roots else found):
        rel = p.relative_to(archive).as_posix()
        st = p.stat()
        out[rel] = FileInfo(rel, st.st_mtime_ns, st.st_size, sha256_file(p, roots))
    return out


def diff(old: dict[str, dict[str, Any]], current: dict[str, FileInfo]) -> Diff:
    """Compare the manifest's entries with a fresh scan. A file whose mtime moved but whose
    content hash did not is unchanged (a `touch` costs nothing); new content is `changed`."""
    new, changed, unchanged = [], [], []
    for rel, info in current.items():
        entry = old.get(rel)
        if entry is None:
            new.append(rel)
        elif entry.get("sha256") != info.sha256:
            changed.append(rel)
        else:
            unchanged.append(rel)
    removed = sorted(set(old) - set(current))
    return Diff(tuple(new), tuple(changed), tuple(removed), tuple(unchanged))


def note_date(rel: str, mtime_ns: int) -> str:
    """YYYY-MM-DD from a filename prefix, else from the file's mtime."""
    m = _DATE_RE.match(Path(rel).name)
    if m:
        return "-".join(m.groups())
    import time
    return time.strftime("%Y-%m-%d", time.localtime(mtime_ns / 1e9))


def load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"files": {}, "themes": []}
    return json.loads(path.read_text())


def save(path: Path, manifest: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
