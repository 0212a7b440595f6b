"""Shard objects written with O_DIRECT: exact bytes, atomic replacement, and the buffered way where refused."""

from __future__ import annotations

import errno
import os

import pytest

from eoprep.sinks import _direct
from eoprep.sinks._direct import write_direct

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")


def test_writes_the_parts_exactly_and_replaces_an_older_object(tmp_path):
    path = tmp_path / "c" / "0" / "0"
    parts = [os.urandom(5000), b"", os.urandom(4096), os.urandom(17)]
    assert write_direct(path, parts) == 9113
    assert path.read_bytes() == b"".join(parts)
    shorter = [b"x" * 100]
    assert write_direct(path, shorter) == 100
    assert path.read_bytes() == b"x" * 100
    assert sorted(p.name for p in path.parent.iterdir()) == ["0"]  # no .partial left behind
    buffered = tmp_path / "plain"
    buffered.write_bytes(b"")
    assert path.stat().st_mode == buffered.stat().st_mode


def test_a_file_system_that_refuses_o_direct_is_written_the_buffered_way(tmp_path, monkeypatch):
    real_open = os.open

    def refusing(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(_direct, "_refused", set())
    monkeypatch.setattr(os, "open", refusing)
    path = tmp_path / "shard"
    assert write_direct(path, [b"abc"]) is None
    assert list(tmp_path.iterdir()) == []
    assert tmp_path.stat().st_dev in _direct._refused  # not tried again on this device


def test_other_errors_are_raised_and_leave_nothing_behind(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    path = tmp_path / "shard"
    with pytest.raises(OSError, match="No space"):
        write_direct(path, [b"abc" * 5000])
    assert list(tmp_path.iterdir()) == []
