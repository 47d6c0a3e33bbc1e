"""Reading the mount table: what of a job is still mounted, here and in other namespaces.

Mounts are told apart by their id (and parent id), never by following a path:
a job's tree is every mount whose chain of parents leads to the job's root or
scratch mount. Mount points are kept as bytes, so no name a user gives a
directory (newlines, invalid UTF-8) can break the reading.
"""

from __future__ import annotations

import os

from . import syscalls as sc


class MountInfo:
    """One line of mountinfo (a plain class: dataclasses costs the epilog 8 ms)."""

    __slots__ = ("fstype", "mount_id", "parent_id", "target")

    def __init__(self, mount_id: int, parent_id: int, target: bytes, fstype: str) -> None:
        self.mount_id = mount_id
        self.parent_id = parent_id
        self.target = target  # unescaped
        self.fstype = fstype

    def __repr__(self) -> str:
        return f"MountInfo({self.mount_id}, {self.parent_id}, {self.target!r}, {self.fstype})"


def _unescape(field: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash as \\ooo."""
    if b"\\" not in field:
        return field
    out, i = bytearray(), 0
    while i < len(field):
        if field[i] == 0x5C and field[i + 1 : i + 4].isdigit():
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


def mountinfo(path: str = "/proc/self/mountinfo") -> list[MountInfo]:
    with open(path, "rb") as handle:
        lines = handle.read().splitlines()
    entries = []
    for line in lines:
        left, _sep, right = line.partition(b" - ")
        fields = left.split(b" ")
        fstype = right.split(b" ", 1)[0].decode(errors="replace")
        entries.append(MountInfo(int(fields[0]), int(fields[1]), _unescape(fields[4]), fstype))
    return entries


def under(prefix: str | bytes, entries: list[MountInfo]) -> list[MountInfo]:
    """Mounts at or below the path ``prefix``."""
    raw = os.fsencode(prefix).rstrip(b"/")
    return [e for e in entries if e.target == raw or e.target.startswith(raw + b"/")]


def tree(top_ids: set[int], entries: list[MountInfo]) -> set[int]:
    """Ids of the mounts ``top_ids`` and of everything mounted below them."""
    children: dict[int, list[int]] = {}
    for entry in entries:
        children.setdefault(entry.parent_id, []).append(entry.mount_id)
    found, todo = set(), [i for i in top_ids if any(e.mount_id == i for e in entries)]
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo.extend(children.get(current, []))
    return found


# --- copies in other mount namespaces ---------------------------------------------------


def foreign_copies(job_dirs: list[str]) -> dict[int, list[bytes]]:
    """Mount namespaces other than ours that hold copies of the job's mounts.

    A process that made a new mount namespace while the container was mounted (an
    ``unshare -m``, another container runtime) keeps private copies of its mounts,
    and with them the image's loop device. Returns one pid per such namespace with
    the job directories (root-owned paths) that have a copy mounted there; each
    copy's submounts go with it.
    """
    ours = os.readlink("/proc/self/ns/mnt")
    seen = {ours}
    wanted = {os.fsencode(path).rstrip(b"/") for path in job_dirs}
    found: dict[int, list[bytes]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            namespace = os.readlink(f"/proc/{entry}/ns/mnt")
            if namespace in seen:
                continue
            seen.add(namespace)
            table = mountinfo(f"/proc/{entry}/mountinfo")
        except (OSError, ValueError, IndexError):
            continue
        copies = sorted({e.target for e in table if e.target in wanted})
        if copies:
            found[int(entry)] = copies
    return found


def unmount_in(pid: int, targets: list[bytes], timeout: float) -> bool:
    """Detach ``targets`` inside ``pid``'s mount namespace (a forked child enters it).

    The targets are the job's own directories in the root-owned areas. In that
    namespace, as in ours, each area is opened without following a symlink and the
    job's entry is detached by descriptor (``privileged.detach``: whole trees, as often
    as copies are stacked there); a path inside a namespace someone else may have
    built is never handed to umount2. The namespace may be the user's, with their
    FUSE mount on the way to a target: the child waits on their daemon, so it gets
    ``timeout`` seconds (``killGrace``) and is then killed.
    """
    child = os.fork()
    if child == 0:
        code = 1
        try:
            fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY)
            sc.setns(fd, sc.CLONE_NEWNS)
            code = 0 if all(_detach_copy(target) for target in targets) else 1
        finally:
            os._exit(code)
    from .userproc import UserChild

    with UserChild(child, timeout) as helper:
        status = helper.wait()
    return status is not None and os.waitstatus_to_exitcode(status) == 0


def _detach_copy(target: bytes) -> bool:
    """``area/<job>`` detached in the namespace we are in; False if it could not be."""
    from . import privileged

    area, _sep, name = target.rpartition(b"/")
    try:
        area_fd = sc.openat2(sc.AT_FDCWD, os.fsdecode(area) or "/",
                             os.O_PATH | os.O_DIRECTORY, sc.RESOLVE_NO_SYMLINKS)  # fmt: skip
    except FileNotFoundError:
        return True  # no such area there: nothing of ours is mounted in it
    except OSError:
        return False
    try:
        privileged.detach(area_fd, os.fsdecode(name))
    except OSError:
        return False
    finally:
        os.close(area_fd)
    return True
