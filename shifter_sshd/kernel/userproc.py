"""Children of root that become the job user: every wait on them has a deadline.

The moment a child takes the job user's uid, it is the user's to signal, stop,
ptrace or freeze, and nothing root does with it may then wait without a limit: a
read from its pipe, the reap after it exits. A prolog held past PrologTimeout
drains the node, and it would be the user who held it (a job owner who stops her
own processes at the right moment). So:

- reads wait for the descriptor with ``select`` until the child's deadline; past
  it, ``Timeout`` (the caller's user error, which names the config key);
- leaving the ``with`` block kills the child (SIGKILL also ends a stopped or
  traced process) and reaps it, waiting at most ``REAP_SECONDS``: a child frozen by
  a cgroup v1 freezer does not die until thawed, and is then left to init rather
  than waited for;
- ``release()`` keeps a child that is meant to outlive the prolog (the user
  namespace holder, sshd), once it has done what the prolog waited for.
"""

from __future__ import annotations

import os
import select
import time

SIGKILL = 9  # the signal module's enum costs the prolog ~2.6 ms to import
REAP_SECONDS = 1.0


class Timeout(Exception):
    """The child did not answer before its deadline (stopped, traced, frozen, or stuck
    on one of the user's filesystems)."""


class UserChild:
    """A forked child (``pid``) whose every wait ends at ``timeout`` seconds from now."""

    def __init__(self, pid: int, timeout: float) -> None:
        self.pid = pid
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self._done = False  # reaped, or released to run on

    def __enter__(self) -> UserChild:
        return self

    def __exit__(self, *_exc: object) -> None:
        if not self._done:
            self.kill()

    def left(self) -> float:
        """Seconds until the deadline; Timeout once it has passed."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Timeout
        return left

    def wait_readable(self, fd: int) -> None:
        """Until ``fd`` (a pipe or socket from the child) can be read without blocking."""
        while not select.select([fd], [], [], self.left())[0]:
            pass  # woken early (a signal): the deadline still holds

    def read(self, fd: int, size: int) -> bytes:
        self.wait_readable(fd)
        return os.read(fd, size)

    def wait(self) -> int | None:
        """The child's exit status once it ends before the deadline; None past it (it
        is then killed and reaped on leaving the block)."""
        while True:
            status = self._poll()
            if status is not None:
                return status
            if time.monotonic() >= self.deadline:
                return None
            time.sleep(0.002)

    def kill(self) -> bool:
        """SIGKILL and reap; False when it did not go within REAP_SECONDS (frozen)."""
        self._done = True
        try:
            os.kill(self.pid, SIGKILL)
        except ProcessLookupError:
            pass
        until = time.monotonic() + REAP_SECONDS
        while self._poll() is None:
            if time.monotonic() >= until:
                from .. import log

                log.warning(f"process {self.pid} (the job user's) did not die on SIGKILL "
                            f"within {REAP_SECONDS:g} s (frozen?): left to init")  # fmt: skip
                return False
            time.sleep(0.002)
        return True

    def release(self) -> None:
        """Let it run on: the caller keeps its pid (and start time) to stop it later."""
        self._done = True

    def _poll(self) -> int | None:
        try:
            done, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            self._done = True
            return 0  # reaped already
        if done == 0:
            return None
        self._done = True
        return status
