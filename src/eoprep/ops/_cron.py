"""Five-field cron expressions (minute hour day-of-month month day-of-week), evaluated in UTC."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from eoprep.errors import EoprepError

__all__ = ["CronSchedule"]

_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 6))


def _parse_field(text: str, name: str, lo: int, hi: int, expr: str) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        body, _, step_text = part.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if body == "*":
                start, stop = lo, hi
            elif "-" in body:
                a, b = body.split("-", 1)
                start, stop = int(a), int(b)
            else:
                start = stop = int(body)
                if step_text:
                    stop = hi
        except ValueError:
            raise EoprepError(f"--cron {expr!r}: {name} field {text!r} is not a number, range, list or step") from None
        if name == "day of week" and stop == 7:
            values.add(0)
            stop = 6
        if not (lo <= start <= hi and lo <= stop <= hi and start <= stop and step > 0):
            raise EoprepError(f"--cron {expr!r}: {name} field {text!r} is outside {lo}-{hi}")
        values.update(range(start, stop + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class CronSchedule:
    """When a cron expression fires; ``next_after`` walks minutes, bounded to a year and a day."""

    expr: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    any_day: bool
    any_weekday: bool

    @classmethod
    def parse(cls, expr: str) -> CronSchedule:
        fields = expr.split()
        if len(fields) != 5:
            raise EoprepError(f"--cron {expr!r}: needs 5 fields (minute hour day-of-month month day-of-week)")
        parsed = [_parse_field(f, *spec, expr) for f, spec in zip(fields, _FIELDS, strict=True)]
        return cls(expr, *parsed, any_day=fields[2] == "*", any_weekday=fields[4] == "*")

    def _day_matches(self, t: dt.datetime) -> bool:
        dom = t.day in self.days
        dow = (t.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow  # cron's rule: when both are restricted, either may match

    def next_after(self, now: dt.datetime) -> dt.datetime:
        t = now.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
        end = t + dt.timedelta(days=367)
        while t < end:
            if t.month not in self.months or not self._day_matches(t):
                t = (t + dt.timedelta(days=1)).replace(hour=0, minute=0)
                continue
            if t.hour not in self.hours:
                t = (t + dt.timedelta(hours=1)).replace(minute=0)
                continue
            if t.minute in self.minutes:
                return t
            t += dt.timedelta(minutes=1)
        raise EoprepError(f"--cron {self.expr!r}: never fires")
