"""Unprivileged test users, created idempotently on the host.

Two users let the tests show that one job's container refuses another user; the
extra group shows that supplementary groups reach the container.
"""

from __future__ import annotations

import grp
import pwd
import subprocess
from dataclasses import dataclass

GROUP = "sstestgrp"
GROUP_GID = 2990


@dataclass(frozen=True)
class LabUser:
    name: str
    uid: int
    gid: int
    home: str


USERS = (("sstest1", 2901), ("sstest2", 2902))


def ensure_users() -> list[LabUser]:
    """Create the test users and their shared group if missing; return them."""
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        subprocess.run(["groupadd", "-g", str(GROUP_GID), GROUP], check=True)
    users = []
    for name, uid in USERS:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            argv = ["useradd", "-m", "-u", str(uid), "-U", "-G", GROUP, "-s", "/bin/bash"]
            subprocess.run([*argv, "-p", "*", name], check=True)
            entry = pwd.getpwnam(name)
        _unlock(name)
        users.append(LabUser(name, entry.pw_uid, entry.pw_gid, entry.pw_dir))
    return users


def _unlock(name: str) -> None:
    """``*`` (no password) instead of useradd's ``!`` (locked): a root sshd with
    UsePAM no refuses a locked account even with a valid certificate."""
    with open("/etc/shadow", encoding="utf-8") as handle:
        for line in handle:
            fields = line.split(":")
            if fields[0] == name and fields[1].startswith("!"):
                subprocess.run(["usermod", "-p", "*", name], check=True)
