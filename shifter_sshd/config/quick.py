"""The few udiRoot.conf keys that ``shifter`` and the epilog need, read without config/udiroot.py.

config/udiroot.py is the one parser of udiRoot.conf: every key, its default, its errors.
Loading it costs about 20 ms (dataclasses, re), more than the interpreter's own
start, on every task start and every job end. These readers apply the same syntax
(comments only at line start, ``key=value``, surrounding blanks dropped) to files
without the unusual: anything they cannot read exactly as config/udiroot.py would (a
backslash continuation, a key given twice, a value config/udiroot.py would refuse) makes
them answer None, and the caller goes to config.load, which also gives the precise
error. tests/config/test_quickconf.py checks that both agree, Shifter's own files included.
"""

from __future__ import annotations

import os

DEFAULT_PATH = "/etc/shifter/udiRoot.conf"
ENV_PATH = "SHIFTER_SSHD_CONFIG"

# config.Config's defaults for the keys read here (the test compares them).
PATH_DEFAULTS = {"udiMount": "/var/udiMount", "loopMount": "/var/udiLoopMount",
                 "statePath": "/run/shifter-sshd"}  # fmt: skip
KILL_GRACE_DEFAULT = 5.0


def resolve_path(cli_path: str | None = None) -> str:
    """The config path: ``--config``, else $SHIFTER_SSHD_CONFIG, else the default."""
    return cli_path or os.environ.get(ENV_PATH) or DEFAULT_PATH


def read_text(path: str) -> str | None:
    """The file's text; None when it cannot be read (config.load says why)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError):
        return None


def values(text: str, keys: tuple[str, ...]) -> dict[str, str] | None:
    """The raw values of ``keys`` present in ``text``; None for anything unusual."""
    if "\\" in text:
        return None
    found: dict[str, str] = {}
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):
            continue
        key, sep, value = raw.partition("=")
        key = key.strip()
        if sep and key in keys:
            if key in found:
                return None  # config/udiroot.py refuses a scalar given twice
            found[key] = value.strip()
    return found


def path_value(found: dict[str, str], key: str) -> str | None:
    """A path key's value as config/udiroot.py's parser gives it; None when it would refuse it."""
    value = found.get(key, PATH_DEFAULTS[key])
    if not value.startswith("/") or "\0" in value:
        return None
    return os.path.normpath(value)


def seconds_value(found: dict[str, str], key: str, default: float) -> float | None:
    """A seconds key's value as udiroot.py's parser gives it; None when it would refuse it."""
    if key not in found:
        return default
    try:
        number = float(found[key])
    except ValueError:
        return None
    return number if 0 <= number <= 3600 else None


class Places:
    """Where a job's container lives, and how long its processes get: teardown's needs."""

    def __init__(self, udi_mount: str, loop_mount: str, state_path: str,
                 kill_grace: float) -> None:  # fmt: skip
        self.udi_mount = udi_mount
        self.loop_mount = loop_mount
        self.state_path = state_path
        self.kill_grace = kill_grace


def places(text: str) -> Places | None:
    """udiMount, loopMount, statePath and killGrace; None for anything unusual."""
    found = values(text, (*PATH_DEFAULTS, "killGrace"))
    if found is None:
        return None
    udi, loop = path_value(found, "udiMount"), path_value(found, "loopMount")
    state = path_value(found, "statePath")
    grace = seconds_value(found, "killGrace", KILL_GRACE_DEFAULT)
    if udi is None or loop is None or state is None or grace is None:
        return None
    return Places(udi, loop, state, grace)
