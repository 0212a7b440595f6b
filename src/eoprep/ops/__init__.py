"""Ops: what makes unattended runs safe — an output lock, and a cron schedule for nightly refreshes."""

from __future__ import annotations

from eoprep.ops._cron import CronSchedule
from eoprep.ops._lock import OutputLock, pid_alive

__all__ = ["CronSchedule", "OutputLock", "pid_alive"]
