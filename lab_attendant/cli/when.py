"""Times and ages a user types: `--since 7d`, `--older-than 30d`, `--begin +2h` / `02:00` /
`tomorrow 02:00` / ISO 8601 (stdlib only). A time without a zone is local time.
"""
from __future__ import annotations

import argparse
import re
from datetime import datetime, timedelta

AGE_UNITS_S = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*$")
_CLOCK_RE = re.compile(r"^(?:(today|tomorrow)\s+)?([0-9]{1,2}):([0-9]{2})$")
AGE_HELP = "a number and a unit: 90s, 30m, 12h, 7d, 2w"
BEGIN_HELP = ("when the run may start: +90s, +30m, +2h, +1d (from now), 02:00 (the next one), "
              "tomorrow 02:00, or an ISO time such as 2026-12-01T02:00 (local time unless it "
              "names a zone)")


def parse_age(text: str) -> float:
    """Seconds in '7d', '12h', '30m', '90s', '2w'; ValueError names the accepted forms."""
    m = _AGE_RE.match(text.lower())
    if m is None or (m.group(2) or "s") not in AGE_UNITS_S:
        raise ValueError(f"cannot read {text!r} as an age; write {AGE_HELP}")
    return float(m.group(1)) * AGE_UNITS_S[m.group(2) or "s"]


def parse_begin(text: str, now: datetime | None = None) -> float:
    """Epoch seconds for `--begin`; ValueError names the accepted forms."""
    now = now or datetime.now().astimezone()
    raw = text.strip().lower()
    if raw == "now":
        return now.timestamp()
    if raw.startswith("+"):
        return now.timestamp() + parse_age(raw[1:])
    clock = _CLOCK_RE.match(raw)
    if clock:
        day, hour, minute = clock.group(1), int(clock.group(2)), int(clock.group(3))
        if hour > 23 or minute > 59:
            raise ValueError(f"cannot read {text!r}: {hour:02d}:{minute:02d} is not a time of day")
        at = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if day == "tomorrow" or (day is None and at <= now):
            at += timedelta(days=1)
        return at.timestamp()
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a time; use {BEGIN_HELP}") from None
    if at.tzinfo is None:
        at = at.astimezone()       # naive: local time
    return at.timestamp()


def _arg(parse):
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


age_arg = _arg(parse_age)        # argparse `type=`: a bad value is a usage error (exit 2)
begin_arg = _arg(parse_begin)
