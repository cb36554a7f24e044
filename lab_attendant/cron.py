"""Standard crontab expressions -> APScheduler 3 triggers: Sunday is 0 or 7, `1-5` is Monday to
Friday, @daily/@hourly/@weekly/@monthly/@yearly macros, day-of-month OR day-of-week.

APScheduler's own cron fields number weekdays from Monday=0 and AND the two day fields, so every
field is expanded here to an explicit set and handed over as a list of values and weekday names.
"""
from __future__ import annotations

import calendar
from dataclasses import dataclass

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger

MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
          "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
          "@hourly": "0 * * * *"}
_MONTHS = {m.lower(): i for i, m in enumerate(calendar.month_abbr) if m}
_DAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_APS_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")   # names APScheduler reads right


@dataclass(frozen=True)
class _Field:
    name: str
    lo: int
    hi: int
    names: dict[str, int] | None = None


_SECOND, _MINUTE, _HOUR = _Field("second", 0, 59), _Field("minute", 0, 59), _Field("hour", 0, 23)
_DOM, _MONTH = _Field("day of month", 1, 31), _Field("month", 1, 12, _MONTHS)
_DOW = _Field("day of week", 0, 7, _DAYS)    # 7 is Sunday too


class CronError(ValueError):
    """A crontab expression we refuse; the message says which field and what to write."""


def _number(f: _Field, text: str) -> int:
    low = text.lower()
    if f.names and low in f.names:
        return f.names[low]
    if not text.isdigit():
        raise CronError(f"{f.name} field: {text!r} is not a number"
                        + (f" or a name ({', '.join(f.names)})" if f.names else ""))
    value = int(text)
    if not f.lo <= value <= f.hi:
        raise CronError(f"{f.name} field: {value} is outside {f.lo}-{f.hi}")
    return value


def expand(f: _Field, text: str) -> frozenset[int]:
    """One field's values: `*`, `N`, `A-B`, any of them `/STEP`, comma lists; names where the
    field has them. Day of week comes back as 0-6 with Sunday 0."""
    out: set[int] = set()
    for part in text.split(","):
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise CronError(f"{f.name} field: step in {part!r} must be a positive number")
            step = int(step_text)
        if base == "*":
            first, last = f.lo, (6 if f is _DOW else f.hi)
        elif "-" in base:
            a, _, b = base.partition("-")
            first, last = _number(f, a), _number(f, b)
            if first > last:
                raise CronError(f"{f.name} field: range {base!r} runs backwards; write it low-high")
        else:
            first = _number(f, base)
            last = (6 if f is _DOW else f.hi) if slash else first   # `N/S`: N, N+S, ... to the end
        out.update(range(first, last + 1, step))
    if f is _DOW:
        out = {0 if d == 7 else d for d in out}
    return frozenset(out)


@dataclass(frozen=True)
class CronSpec:
    """The expanded sets of one expression (weekdays 0-6, Sunday 0)."""
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    # Both day fields written without a leading '*': a day matching either one fires (cronie and
    # Vixie cron decide on the first character, so `*/2` counts as '*', and `0-6` does not).
    day_or: bool


def parse(expr: str) -> CronSpec:
    """CronError for anything standard crontab would not run, including dates that never come."""
    text = MACROS.get(expr.strip().lower(), expr)
    if text.strip().startswith("@"):
        raise CronError(f"unknown macro {expr.strip()!r}; use one of {', '.join(MACROS)} "
                        "(@reboot is not supported: the daemon has no boot event)")
    fields = text.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    elif len(fields) != 6:
        raise CronError(f"cron {expr!r} has {len(fields)} fields; write 5 (minute hour day "
                        "month weekday), 6 (second first) or a macro such as @daily")
    sets = [expand(f, t) for f, t in zip((_SECOND, _MINUTE, _HOUR, _DOM, _MONTH, _DOW), fields)]
    seconds, minutes, hours, days, months, weekdays = sets
    spec = CronSpec(seconds, minutes, hours, days, months, weekdays, day_or=not fields[3].startswith("*") and not fields[5].startswith("*"))
    if not spec.day_or:
        # Both day fields must match: some month in the set must have one of those days
        # (February counts 29: leap years come); the weekday then comes round in some year.
        longest = {m: 29 if m == 2 else calendar.monthrange(2001, m)[1] for m in spec.months}
        if not any(d <= longest[m] for m in spec.months for d in spec.days):
            raise CronError(f"cron {expr!r} never fires: no month in it has day "
                            f"{', '.join(map(str, sorted(spec.days)))}")
    return spec


def _csv(values: frozenset[int]) -> str:
    return ",".join(map(str, sorted(values)))


def trigger(expr: str, timezone: str = "") -> BaseTrigger:
    """An APScheduler trigger that fires exactly when crontab would run `expr`."""
    spec = parse(expr)
    common = dict(second=_csv(spec.seconds), minute=_csv(spec.minutes), hour=_csv(spec.hours),
                  month=_csv(spec.months), timezone=timezone or None)
    days = _csv(spec.days) if len(spec.days) < 31 else "*"
    weekdays = ",".join(_APS_DAYS[d] for d in sorted(spec.weekdays)) if len(spec.weekdays) < 7 else "*"
    if spec.day_or:
        # crontab: either day field matching is enough (APScheduler alone would need both).
        return OrTrigger([CronTrigger(day=days, **common), CronTrigger(day_of_week=weekdays, **common)])
    return CronTrigger(day=days, day_of_week=weekdays, **common)
