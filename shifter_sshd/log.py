"""Logging to stderr and syslog, without the cost of importing ``logging``.

slurmd discards a prolog's output unless it fails, so syslog is where admins look;
stderr is for people running a command by hand and for tests.
"""

from __future__ import annotations

import os
import sys
import syslog

_opened = False
_quiet = False


def _open() -> None:
    global _opened
    if not _opened:
        syslog.openlog("shifter-sshd", syslog.LOG_PID, syslog.LOG_DAEMON)
        _opened = True


def set_quiet(quiet: bool) -> None:
    """Keep informational lines off stderr (warnings and errors still go there)."""
    global _quiet
    _quiet = quiet


def _emit(priority: int, label: str, message: str) -> None:
    _open()
    syslog.syslog(priority, message)
    if priority <= syslog.LOG_WARNING or not _quiet:
        prefix = "" if message.startswith("shifter-sshd:") else "shifter-sshd: "
        sys.stderr.write(f"{prefix}{label}{message}\n")
        sys.stderr.flush()


def debug(message: str) -> None:
    if os.environ.get("SHIFTER_SSHD_DEBUG"):
        _emit(syslog.LOG_DEBUG, "debug: ", message)


def info(message: str) -> None:
    _emit(syslog.LOG_INFO, "", message)


def warning(message: str) -> None:
    _emit(syslog.LOG_WARNING, "warning: ", message)


def error(message: str) -> None:
    _emit(syslog.LOG_ERR, "", message)
