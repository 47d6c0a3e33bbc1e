"""Fault injection for the tests: make any prolog or teardown step fail or die.

``SHIFTER_SSHD_FAULT=<raise|kill|bug>:<step name>`` (bug: an unexpected exception),
``delay:<step name>:<seconds>``, or ``stop:<point>``: a child that has become the job
user stops itself (SIGSTOP) at ``point`` ("asuser child", "userns holder", "sshd
child"), as the user could stop it there.
slurmd passes a job's user only SPANK_* variables, so no job can set this; it exists
for the fault-injection suite, which kills the prolog and epilog at every step and
checks the next run cleans up, and for the cluster test that slows one node's prolog.
"""

from __future__ import annotations

import os

from .errors import node_error

VARIABLE = "SHIFTER_SSHD_FAULT"


def inject(step: str) -> None:
    setting = os.environ.get(VARIABLE)
    if not setting:
        return
    action, _sep, name = setting.partition(":")
    name, _sep, seconds = name.partition(":")
    if name != step:
        return
    if action == "delay":
        import time

        time.sleep(float(seconds or 1))
    if action == "kill":
        os.kill(os.getpid(), 9)  # SIGKILL
    if action == "stop":
        os.kill(os.getpid(), 19)  # SIGSTOP
    if action == "bug":
        raise RuntimeError(f"fault injection: a bug at step {step}")
    if action == "raise":
        raise node_error("fault injection", "failing on purpose at step", step)
