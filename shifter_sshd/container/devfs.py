"""The container's /dev: a small tmpfs of its own, never the host's devtmpfs.

Binding the host's /dev would show every host device node, and a node made in it
would appear on the host. Instead the prolog makes a tmpfs, creates in it the
usual character devices, the host devices HPC jobs need (``hostDevices``:
interconnects such as /dev/infiniband, fuse...) and the job's GPUs (from CDI,
``gpu/plan.py``), each with the host node's numbers, mode and owner, then attaches it.
Which of these a job may actually open stays the job's device cgroup's decision
(Slurm's ConstrainDevices); a GPU the job was not given is simply not there.

Everything is created while the tmpfs is still detached, so no user can reach it.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass

from ..kernel import privileged as priv
from ..kernel import syscalls as sc

STANDARD = ("null", "zero", "full", "random", "urandom", "tty")
LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
         "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"}  # fmt: skip
DIRS = ("pts", "shm")  # mount points: devpts and a tmpfs (rootfs.mount_system)
MAX_DEPTH = 4  # /dev/<dir>/<dir>/<node>: deeper host trees are not copied


@dataclass(frozen=True)
class Node:
    """A device node to create, at ``path`` relative to the container's /dev."""

    path: str
    kind: int  # stat.S_IFCHR or stat.S_IFBLK
    rdev: int
    mode: int
    uid: int = 0
    gid: int = 0
    host: str = ""  # the host's node it copies (``shifter --image`` binds that one)


def from_host(host_path: str, path: str) -> Node:
    """The node at ``host_path`` (not followed if a symlink), to be made at ``path``."""
    info = os.lstat(host_path)
    if not (stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)):
        raise OSError(19, "not a device node", host_path)  # ENODEV
    return Node(path, stat.S_IFMT(info.st_mode), info.st_rdev, stat.S_IMODE(info.st_mode),
                info.st_uid, info.st_gid, host_path)  # fmt: skip


def host_devices(patterns: tuple[str, ...], dev: str = "/dev") -> list[Node]:
    """The usual devices, and the host's entries of /dev matching ``patterns`` (device
    nodes, or directories of them such as infiniband/); absent ones are skipped."""
    nodes = []
    for name in STANDARD:
        try:
            nodes.append(from_host(os.path.join(dev, name), name))
        except OSError:
            continue
    try:
        names = sorted(os.listdir(dev))
    except OSError:
        return nodes
    for name in names:
        if name not in STANDARD and any(fnmatch.fnmatchcase(name, p) for p in patterns):
            nodes += _tree(os.path.join(dev, name), name, 1)
    return nodes


def _tree(host_path: str, path: str, depth: int) -> list[Node]:
    try:
        info = os.lstat(host_path)
    except OSError:
        return []
    if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
        return [from_host(host_path, path)]
    if not stat.S_ISDIR(info.st_mode) or depth >= MAX_DEPTH:
        return []  # symlinks (/dev/fd...) and sockets are not copied
    found = []
    for name in sorted(os.listdir(host_path)):
        found += _tree(os.path.join(host_path, name), f"{path}/{name}", depth + 1)
    return found


def make(nodes: list[Node], modes: dict[str, int] | None = None) -> int:
    """A detached tmpfs holding ``nodes``, the standard links and mount points; its fd.

    ``modes``: directories (relative to /dev) whose mode a CDI chmod hook sets.
    """
    mount = priv.new_mount("tmpfs", {"source": "shifter-dev", "mode": "0755", "size": "512k"},
                           sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NOEXEC)  # fmt: skip
    try:
        made: set[str] = set()
        for node in nodes:
            if node.path in made:
                continue
            made.add(node.path)
            parent = _directory(mount, node.path.split("/")[:-1])
            try:
                priv.make_node(parent, node.path.rsplit("/", 1)[-1], node.kind, node.rdev,
                               node.mode, (node.uid, node.gid))  # fmt: skip
            finally:
                os.close(parent)
        for name, target in LINKS.items():
            priv.symlink(mount, name, target)
        for name in DIRS:
            os.close(priv.make_dir(mount, name))
        for path, mode in (modes or {}).items():
            directory = _directory(mount, path.split("/"))
            try:
                priv.set_mode(directory, mode)
            finally:
                os.close(directory)
    except BaseException:
        os.close(mount)
        raise
    return mount


def _directory(mount: int, parts: list[str]) -> int:
    """The directory ``parts`` below the tmpfs root, made as needed; a real fd."""
    current = priv.reopen_dir(mount)
    for part in parts:
        try:
            child = priv.make_dir(current, part)
        finally:
            os.close(current)
        current = child
    return current
