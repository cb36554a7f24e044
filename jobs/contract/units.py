"""Byte-size parsing and formatting shared by the supervisor and the worker (stdlib only).

Accepts plain integers and suffixed sizes: '500MB' (10^6), '2GiB' (2^30), '1.5G' (treated as GiB).
"""
from __future__ import annotations

import argparse
import re

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Return a byte count from '2GiB', '500MB', '1024' or an int; ValueError says the forms."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must be >= 0, got {text}")
        return text
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"cannot read size {text!r}: use a byte count or a number with a unit "
            "such as 500MB, 2GiB, 1.5G"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n_bytes: float) -> str:
    """Human-readable binary size: 1536 -> '1.5 KiB'."""
    size = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def size_arg(text: str) -> int:
    """parse_size as an argparse `type=`: a bad size is a usage error (exit 2), not a traceback."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def format_duration(seconds: float) -> str:
    """'0.4 s', '42 s', '3 min 05 s', '2 h 07 min', '3 d 04 h' (the plan's job time, the CLI's durations)."""
    s = max(0.0, seconds)
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h} h {m:02d} min"
    d, h = divmod(h, 24)
    return f"{d} d {h:02d} h"
