"""Logging to stderr and syslog, without the cost of importing ``logging``.

slurmd discards a prolog's output unless it fails, so syslog is where admins look;
stderr is for people running a command by hand and for tests.

Messages carry what users chose (paths, image names, environment values), so every
control character is escaped (``\\n``, ``\\x1b``...): no user can forge a log line
or a terminal escape in an admin's log viewer.
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


def escape(text: str) -> str:
    """Control characters (and lone surrogates from undecodable bytes) made visible."""
    if text.isprintable():
        return text
    out = []
    for char in text:
        code = ord(char)
        if char.isprintable() and not 0xD800 <= code <= 0xDFFF:
            out.append(char)
        elif 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for an undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        else:
            out.append(repr(char)[1:-1] if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def _emit(priority: int, label: str, message: str) -> None:
    message = escape(message)
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


def internal_error(message: str) -> None:
    """A bug: the message, then the traceback one line at a time (syslog keeps lines)."""
    import traceback

    error(message)
    for line in traceback.format_exc().rstrip().splitlines():
        _emit(syslog.LOG_ERR, "", f"  {line}")
