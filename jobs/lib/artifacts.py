"""Artifacts ("gems") for refinement: a folder of markdown files with front matter, or a JSONL
file, read into Artifact records that keep the exact source bytes of the body. Stdlib only."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from jobs.contract.confine import Roots
from jobs.contract.errors import ArtifactError

TECHNICAL_STORY = "technical-story"   # FEAT-075: passed through verbatim, never summarized


@dataclass(frozen=True)
class Artifact:
    id: str
    title: str
    kind: str
    tags: tuple[str, ...]
    body: str                 # text after the front matter, exactly as in the source
    source: str               # file (and line, for JSONL) it came from

    @property
    def is_technical_story(self) -> bool:
        return self.kind == TECHNICAL_STORY


def _value(raw: str) -> str | tuple[str, ...]:
    raw = raw.strip()
    if raw.startswith("[") and raw.endswith("]"):
        return tuple(t.strip().strip("'\"") for t in raw[1:-1].split(",") if t.strip())
    return raw.strip("'\"")


def _read(path: Path, roots: Roots | None) -> bytes:
    return roots.read_bytes(path) if roots else path.read_bytes()


def parse_markdown(path: Path, roots: Roots | None = None) -> Artifact:
    """`---` front matter of `key: value` lines (lists as [a, b]), then the body."""
    text = _read(path, roots).decode("utf-8")
    meta: dict = {}
    body = text
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        if end < 0:
            raise ArtifactError(f"{path}: front matter opened with --- but never closed; "
                                "end it with a line holding only ---")
        for line in text[4:end].splitlines():
            key, sep, raw = line.partition(":")
            if sep:
                meta[key.strip()] = _value(raw)
        body = text[end + len("\n---\n"):]
    tags = meta.get("tags", ())
    return Artifact(id=str(meta.get("id") or path.stem), title=str(meta.get("title") or path.stem),
                    kind=str(meta.get("kind") or "note"),
                    tags=tags if isinstance(tags, tuple) else (tags,), body=body, source=str(path))


def parse_jsonl(path: Path, roots: Roots | None = None) -> list[Artifact]:
    out = []
    for n, line in enumerate(_read(path, roots).decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            body = obj.get("body", obj.get("text"))
            if not isinstance(body, str):
                raise ValueError("no 'body' (or 'text') string")
        except ValueError as exc:
            raise ArtifactError(f"{path} line {n}: {exc}; each line must be a JSON object with "
                                "id, title, kind, tags and body") from None
        out.append(Artifact(id=str(obj.get("id") or f"line-{n}"),
                            title=str(obj.get("title") or obj.get("id") or f"line {n}"),
                            kind=str(obj.get("kind") or "note"), tags=tuple(obj.get("tags") or ()),
                            body=body, source=f"{path}:{n}"))
    return out


def load(path: Path, roots: Roots | None = None) -> list[Artifact]:
    """With `roots` (jobs.contract.confine), .md files resolving outside them are skipped with a warning."""
    if path.is_dir():
        found = sorted(path.glob("*.md"))
        items = [parse_markdown(p, roots) for p in (roots.keep(found) if roots else found)]
    elif path.suffix == ".jsonl":
        items = parse_jsonl(path, roots)
    else:
        raise ArtifactError(f"{path} is neither a folder of .md artifacts nor a .jsonl file")
    if not items:
        raise ArtifactError(f"no artifacts in {path}; put .md files with front matter there")
    ids = [a.id for a in items]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ArtifactError(f"artifact ids must be unique; repeated: {', '.join(dup)}")
    return items
