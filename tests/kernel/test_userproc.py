"""A child that becomes the user costs at most its deadline, however the user holds it."""

from __future__ import annotations

import os
import signal
import time

import pytest

from shifter_sshd.kernel.userproc import Timeout, UserChild


def _child_as_user(stop_self: bool) -> tuple[int, int]:
    """A child that takes uid 2901, then stops itself (or writes one byte and exits)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        os.setresgid(2901, 2901, 2901)
        os.setgroups([])
        os.setresuid(2901, 2901, 2901)
        if stop_self:
            os.kill(os.getpid(), signal.SIGSTOP)
        os.write(write_fd, b"x")
        os._exit(0)
    os.close(write_fd)
    return pid, read_fd


def test_a_stopped_child_costs_its_deadline_then_is_killed_and_reaped() -> None:
    pid, fd = _child_as_user(stop_self=True)
    started = time.monotonic()
    try:
        with UserChild(pid, 0.5) as child, pytest.raises(Timeout):
            child.read(fd, 1)
    finally:
        os.close(fd)
    assert time.monotonic() - started < 5.5  # bounded: the 0.5 s deadline, reaping, slack
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped by the context manager


def test_a_child_that_answers_is_read_and_reaped() -> None:
    pid, fd = _child_as_user(stop_self=False)
    try:
        with UserChild(pid, 5) as child:
            assert child.read(fd, 1) == b"x"
            assert child.read(fd, 1) == b""  # exited: its end of the pipe closed
            assert child.wait() == 0
    finally:
        os.close(fd)
