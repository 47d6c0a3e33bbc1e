"""The job user as the host's NSS knows them, for /etc inside the container.

Looked up once in the prolog (root, host NSS) so that nothing inside the container
ever needs the host's NSS modules: the container gets plain ``files`` entries.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

from .errors import node_error, user_error


@dataclass(frozen=True)
class Group:
    name: str
    gid: int


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    gecos: str
    home: str
    shell: str
    groups: tuple[Group, ...]  # primary group first, at most maxGroupCount in all

    @property
    def gids(self) -> list[int]:
        return [group.gid for group in self.groups]

    def passwd_line(self, shell: str | None = None) -> str:
        gecos = self.gecos.replace(":", " ").replace("\n", " ")
        return f"{self.name}:x:{self.uid}:{self.gid}:{gecos}:{self.home}:{shell or self.shell}"


def lookup(uid: int, expected_name: str | None, max_groups: int) -> User:
    """The user with ``uid``; refuses a name that does not match (a confused slurmd)."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        raise node_error("job user", "uid unknown to this node's NSS", uid) from None
    if expected_name and entry.pw_name != expected_name:
        raise node_error("job user", f"SLURM_JOB_USER does not match uid {uid}", expected_name)
    if uid == 0:
        raise user_error("job user", "containers are not built for root jobs", entry.pw_name)
    return User(
        name=entry.pw_name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        gecos=entry.pw_gecos,
        home=entry.pw_dir,
        shell=entry.pw_shell or "/bin/sh",
        groups=_groups(entry.pw_name, entry.pw_gid, max_groups),
    )


def _groups(name: str, primary: int, max_groups: int) -> tuple[Group, ...]:
    gids = [primary] + [g for g in os.getgrouplist(name, primary) if g != primary]
    groups = []
    for gid in gids[: max(1, max_groups)]:
        try:
            groups.append(Group(grp.getgrgid(gid).gr_name, gid))
        except KeyError:
            groups.append(Group(f"group{gid}", gid))
    return tuple(groups)


def lookup_name(name: str) -> tuple[str, Group] | None:
    """A ``usersToImport`` entry: its passwd line and primary group, or None if unknown."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    try:
        group = Group(grp.getgrgid(entry.pw_gid).gr_name, entry.pw_gid)
    except KeyError:
        group = Group(f"group{entry.pw_gid}", entry.pw_gid)
    gecos = entry.pw_gecos.replace(":", " ")
    line = (
        f"{entry.pw_name}:x:{entry.pw_uid}:{entry.pw_gid}:{gecos}:{entry.pw_dir}:{entry.pw_shell}"
    )
    return line, group
