"""Crontab semantics checked against croniter, an independent implementation: the next fire
times of our APScheduler triggers equal croniter's, for fixed cases and Hypothesis-drawn ones."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from croniter import croniter
from hypothesis import given, settings
from hypothesis import strategies as st

from lab_attendant.config import parse_config
from lab_attendant.cron import CronError, parse, trigger
from lab_attendant.errors import ConfigError

UTC = timezone.utc
START = datetime(2026, 11, 30, 16, 7, 13, tzinfo=UTC)   # a Monday


def ours(expr: str, n: int, start: datetime = START) -> list[datetime]:
    t, out, prev, now = trigger(expr, "UTC"), [], None, start
    for _ in range(n):
        nxt = t.get_next_fire_time(prev, now)
        out.append(nxt)
        prev, now = nxt, nxt + timedelta(seconds=1)
    return out


def theirs(expr: str, n: int, start: datetime = START) -> list[datetime]:
    it = croniter(expr, start - timedelta(microseconds=1))   # croniter: strictly after start
    return [it.get_next(datetime) for _ in range(n)]


@pytest.mark.parametrize("expr, first", [
    ("0 3 * * 0", datetime(2026, 12, 6, 3, 0, tzinfo=UTC)),      # Sunday, not Monday
    ("0 3 * * 7", datetime(2026, 12, 6, 3, 0, tzinfo=UTC)),      # 7 is Sunday too
    ("0 3 * * 1-5", datetime(2026, 12, 1, 3, 0, tzinfo=UTC)),    # Tuesday is next
    ("0 3 * * 6", datetime(2026, 12, 5, 3, 0, tzinfo=UTC)),      # Saturday
    ("@daily", datetime(2026, 12, 1, 0, 0, tzinfo=UTC)),
    ("@hourly", datetime(2026, 11, 30, 17, 0, tzinfo=UTC)),
    ("@weekly", datetime(2026, 12, 6, 0, 0, tzinfo=UTC)),
    ("@monthly", datetime(2026, 12, 1, 0, 0, tzinfo=UTC)),
    ("@yearly", datetime(2027, 1, 1, 0, 0, tzinfo=UTC)),
    ("0 0 29 2 *", datetime(2028, 2, 29, 0, 0, tzinfo=UTC)),
])
def test_standard_weekdays_and_macros(expr, first):
    assert ours(expr, 1)[0] == first
    assert ours(expr, 12) == theirs(expr, 12)


@pytest.mark.parametrize("expr", ["0 0 31 2 *", "0 0 30 2 *", "0 0 31 4,6,9,11 *",
                                  "0 0 30-31 2 *", "@reboot", "@often", "0 0 * * 8", "60 * * * *",
                                  "0 0 0 * *", "0 0 * 13 *", "0 0 * * 5-1", "*/0 * * * *",
                                  "0 0 L * *", "0 0 ? * *", "* * * *", "1 2 3 4 5 6 7"])
def test_impossible_or_nonstandard_expressions_are_refused(expr):
    with pytest.raises(CronError):
        parse(expr)


def test_impossible_date_is_refused_at_config_load():
    data = {"worker": {"extra_kinds": ["tests.fixtures.kinds"]},
            "schedules": [{"id": "feb", "cron": "0 0 31 2 *", "kind": "sleepy"}]}
    with pytest.raises(ConfigError, match="schedule 'feb': bad cron.*never fires"):
        parse_config(data, base_dir=Path("/"), source=None)


def test_day_of_month_or_day_of_week():
    # crontab runs on the 13th *or* on Fridays (APScheduler alone would want Friday the 13th).
    got = ours("0 12 13 * 5", 6)
    assert all(d.day == 13 or d.weekday() == 4 for d in got)
    assert got == theirs("0 12 13 * 5", 6)


def _field(lo: int, hi: int, names: list[str] = ()) -> st.SearchStrategy[str]:
    num = st.integers(lo, hi).map(str)
    if names:
        num = st.one_of(num, st.sampled_from(names))
    # A-B with A < B: croniter 7 reads a one-value range such as `1-1` in the month field as
    # "every month" (ours: January only), so degenerate ranges are left out of the comparison.
    rng = st.tuples(st.integers(lo, hi - 1), st.integers(1, hi - lo)).map(
        lambda ab: f"{ab[0]}-{min(hi, ab[0] + ab[1])}")
    stepped = st.tuples(rng, st.integers(1, hi)).map(lambda t: f"{t[0]}/{t[1]}")
    star = st.one_of(st.just("*"), st.integers(1, hi).map(lambda n: f"*/{n}"))
    # '*' stands alone, as people write it (in a list it would only blur the day rule).
    return st.one_of(star, st.lists(st.one_of(num, rng, stepped), min_size=1, max_size=3)
                     .map(",".join))


CRONS = st.tuples(_field(0, 59), _field(0, 23), _field(1, 31), _field(1, 12, ["jan", "jun", "dec"]),
                  _field(0, 7, ["sun", "mon", "fri", "sat"])).map(" ".join)


@settings(max_examples=150, deadline=None)
@given(expr=CRONS)
def test_next_fire_times_match_croniter(expr: str):
    try:
        parse(expr)
    except CronError:
        return  # an impossible date: croniter would loop or raise; we refuse at load
    day, weekday = expr.split()[2], expr.split()[4]
    if any(f.startswith("*/") for f in (day, weekday)) and "*" not in (day, weekday):
        # `*/2` beside a restricted day field: cronie reads it as '*' (both days must match),
        # croniter as a restriction (either may match). We follow cronie; no common answer.
        return
    assert ours(expr, 8) == theirs(expr, 8), expr


def test_a_stepped_star_counts_as_star_in_the_day_rule_as_cronie_does():
    # `*/2` in the day field beside a weekday: both must match (odd-numbered Mondays only).
    got = ours("0 0 */2 * 1", 4)
    assert all(d.weekday() == 0 and d.day % 2 == 1 for d in got)
