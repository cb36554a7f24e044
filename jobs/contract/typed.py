"""Strict frozen dataclasses from parsed TOML or JSON (stdlib only): the one reader behind the
config file and the worker's spec file. Unknown keys, missing keys and wrong types fail naming the key.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

from jobs.contract.units import parse_size


class ByteSize(int):
    """A byte count: an integer, or a string such as "2GiB" / "500MB"."""


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               Path: "a path string", dict: "a table"}


class Reader:
    """Builds dataclass `cls` from a mapping. `what` names the source in messages ("config",
    "spec"); `tables` words keys as TOML sections; relative paths resolve against base_dir."""

    def __init__(self, what: str, error: type[Exception], *, base_dir: Path | None = None,
                 tables: bool = False) -> None:
        self.what, self.error, self.base_dir, self.tables = what, error, base_dir, tables

    def build(self, cls: type, table: dict[str, Any], prefix: str = "") -> Any:
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        for key in table:
            if key not in fields:
                raise self.error(self._unknown(prefix, key, fields))
        kwargs = {k: self.value(prefix + k, v, hints[k]) for k, v in table.items()}
        for name, f in fields.items():
            if name in kwargs:
                continue
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise self.error(f"{self.what} key '{prefix}{name}' is required")
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = self.build(hints[name], {}, f"{prefix}{name}.")
            elif isinstance(f.default, Path) and self.base_dir and not f.default.is_absolute():
                kwargs[name] = self.base_dir / f.default
        return cls(**kwargs)

    def _unknown(self, prefix: str, key: str, names: typing.Iterable[str]) -> str:
        if self.tables and not prefix:
            return (f"unknown {self.what} section [{key}]; known sections: "
                    f"{', '.join('[' + n + ']' for n in names)}")
        where = f" in [{prefix.rstrip('.')}]" if self.tables and prefix else ""
        return f"unknown {self.what} key '{prefix}{key}'; known keys{where}: {', '.join(sorted(names))}"

    def _fail(self, key: str, value: Any, expected: str) -> Exception:
        return self.error(f"{self.what} key '{key}' must be {expected}, got {value!r}")

    def value(self, key: str, value: Any, tp: Any) -> Any:
        origin = typing.get_origin(tp)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise self.error(f"{self.what} key '{key}' must be a table ([{key}])")
            return self.build(tp, value, f"{key}.")
        if origin is tuple:
            if not isinstance(value, list):
                raise self._fail(key, value, "a list")
            item_tp = typing.get_args(tp)[0]
            return tuple(self.value(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value))
        if origin is dict:
            if not isinstance(value, dict):
                raise self._fail(key, value, "a table")
            item_tp = typing.get_args(tp)[1]
            return {k: self.value(f"{key}.{k}", v, item_tp) for k, v in value.items()}
        if origin in (typing.Union, types.UnionType):
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            return None if value is None else self.value(key, value, inner[0])
        if tp is Any:
            return value
        if origin is Literal:
            if value not in typing.get_args(tp):
                raise self._fail(key, value, f"one of {', '.join(map(repr, typing.get_args(tp)))}")
            return value
        if tp is ByteSize:
            if not isinstance(value, (int, str)) or isinstance(value, bool):
                raise self._fail(key, value, "a byte count: an integer or a string such as \"2GiB\"")
            try:
                return ByteSize(parse_size(value))
            except ValueError as exc:
                raise self.error(f"{self.what} key '{key}': {exc}") from None
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        base = str if tp is Path else tp
        if not isinstance(value, base) or (tp in (int, float) and isinstance(value, bool)):
            raise self._fail(key, value, _TYPE_NAMES.get(tp, str(tp)))
        if tp is Path:
            p = Path(value).expanduser()
            return p if p.is_absolute() or self.base_dir is None else self.base_dir / p
        return value
