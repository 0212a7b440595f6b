"""One writer per output: a lock file beside the data, so any machine of a cluster sees it.

The lock is a file created with O_EXCL holding the owner's host, pid and start time; the owner
touches it every ``heartbeat`` seconds. A lock is stale when its owner is a dead process on this
host, or when nobody touched it for ``stale_after`` seconds (an owner on another machine that died).
A stale lock is broken by renaming it to a unique name first: rename is atomic, so when two
processes find the same stale lock only one of them breaks it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType

from eoprep.errors import EoprepError

__all__ = ["LOCK_FILE", "OutputLock"]

LOCK_FILE = ".eoprep.lock"


class OutputLock:
    """Exclusive lock on an output directory; use as a context manager."""

    def __init__(
        self,
        out_dir: Path,
        *,
        wait: bool = False,
        timeout: float | None = None,
        heartbeat: float = 30.0,
        stale_after: float = 600.0,
    ) -> None:
        self.path = Path(out_dir) / LOCK_FILE
        self.wait = wait
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.stale_after = stale_after
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _owner(self) -> dict[str, object] | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _is_stale(self, owner: dict[str, object] | None) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False
        if owner is None:
            return age > 5.0
        if owner.get("host") == socket.gethostname():
            return not pid_alive(int(owner.get("pid", 0)))  # type: ignore[call-overload]
        return age > self.stale_after

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(
                {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "token": self._token}, f
            )
        return True

    def acquire(self) -> None:
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = "it exists and is not a folder" if folder.exists() and not folder.is_dir() else exc.strerror
            raise EoprepError(f"{folder}: cannot hold an output ({reason})") from None
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while not self._try_create():
            owner = self._owner()
            if self._is_stale(owner):
                try:
                    os.rename(self.path, self.path.with_name(f"{LOCK_FILE}.stale-{self._token}"))
                    self.path.with_name(f"{LOCK_FILE}.stale-{self._token}").unlink()
                except FileNotFoundError:
                    pass
                continue
            who = f"pid {owner.get('pid')} on {owner.get('host')}" if owner else "another process"
            if not self.wait:
                raise EoprepError(
                    f"{self.path.parent}: another eoprep run ({who}) is writing this output; retry later or pass --wait"
                )
            if deadline is not None and time.monotonic() > deadline:
                raise EoprepError(f"{self.path.parent}: still locked by {who} after {self.timeout:.0f} s")
            time.sleep(0.5)
        self._beat = threading.Thread(target=self._heartbeat, name="eoprep-lock-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        self._stop.set()
        owner = self._owner()
        if owner is not None and owner.get("token") == self._token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (one we may not signal counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
