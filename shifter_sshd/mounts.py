"""Every mount the prolog makes goes through here: made, recorded, undone in reverse.

Each mount is made private (or slave) right away: a bind of a shared host mount
(/dev, /sys, a site filesystem) would otherwise join the host's peer group, and a
devpts mounted inside the container would appear on the host.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import log
from . import syscalls as sc
from .errors import node_error
from .state import JobState, Mount, StateStore

NOSUID_NODEV = sc.MS_NOSUID | sc.MS_NODEV


class Mounter:
    """Makes mounts and writes each into the job's state file before going on."""

    def __init__(self, state: JobState, store: StateStore) -> None:
        self.state = state
        self.store = store

    def _record(self, target: str, kind: str) -> None:
        self.state.mounts.append(Mount(os.path.realpath(target), kind))
        self.store.save(self.state)

    def fs(self, fstype: str, source: str, target: str, flags: int, data: str = "") -> None:
        """A new filesystem (tmpfs, proc, devpts, squashfs, overlay), private at once."""
        _do(lambda: sc.mount(source, target, fstype, flags, data), fstype, target)
        self._record(target, fstype)
        _do(lambda: sc.mount(None, target, None, sc.MS_PRIVATE), "make private", target)

    def bind(
        self,
        source: str,
        target: str,
        *,
        read_only: bool,
        flags: int = NOSUID_NODEV,
        recursive: bool = False,
        kind: str = "bind",
    ) -> None:
        """A bind mount with explicit flags; ``source`` may be a /proc/self/fd path."""
        rec = sc.MS_REC if recursive else 0
        _do(lambda: sc.mount(source, target, None, sc.MS_BIND | rec), kind, target)
        self._record(target, kind)
        if recursive:  # every submount gets the flags too, not just the top one
            attrs = _attrs(flags) | (sc.MOUNT_ATTR_RDONLY if read_only else 0)
            _do(lambda: sc.mount_setattr_recursive(target, attrs, sc.MS_SLAVE), "setattr", target)
            return
        # Slave keeps host-side unmounts flowing in; nothing of ours flows out.
        _do(lambda: sc.mount(None, target, None, sc.MS_SLAVE), "make slave", target)
        remount = sc.MS_REMOUNT | sc.MS_BIND | flags | (sc.MS_RDONLY if read_only else 0)
        _do(lambda: sc.mount(None, target, None, remount), "remount", target)

    def remount_read_only(self, target: str) -> None:
        flags = sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY | NOSUID_NODEV
        _do(lambda: sc.mount(None, target, None, flags), "remount read-only", target)


def _attrs(flags: int) -> int:
    """MS_* per-mount flags as MOUNT_ATTR_* bits."""
    pairs = ((sc.MS_NOSUID, sc.MOUNT_ATTR_NOSUID), (sc.MS_NODEV, sc.MOUNT_ATTR_NODEV),
             (sc.MS_NOEXEC, sc.MOUNT_ATTR_NOEXEC))  # fmt: skip
    return sum(attr for flag, attr in pairs if flags & flag)


def _do(call: Callable[[], None], what: str, target: str) -> None:
    try:
        call()
    except OSError as err:
        raise node_error(
            "mount", f"{what} failed ({os.strerror(err.errno or 0)})", target
        ) from None


# --- reading /proc/self/mountinfo -----------------------------------------------------


@dataclass(frozen=True)
class MountInfo:
    mount_id: int
    device: str  # major:minor
    target: str
    fstype: str
    source: str
    options: str  # per-mount options (ro,nosuid,...) then superblock options


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 0 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mountinfo(path: str = "/proc/self/mountinfo") -> list[MountInfo]:
    entries = []
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        for line in handle:
            left, _sep, right = line.rstrip("\n").partition(" - ")
            fields, tail = left.split(" "), right.split(" ")
            entries.append(
                MountInfo(
                    mount_id=int(fields[0]),
                    device=fields[2],
                    target=_unescape(fields[4]),
                    fstype=tail[0],
                    source=_unescape(tail[1]) if len(tail) > 1 else "",
                    options=fields[5] + "," + (tail[2] if len(tail) > 2 else ""),
                )
            )
    return entries


def under(prefix: str, entries: list[MountInfo] | None = None) -> list[MountInfo]:
    """Mounts at or below ``prefix``, deepest (most recently stacked) last."""
    entries = mountinfo() if entries is None else entries
    prefix = prefix.rstrip("/")
    return [e for e in entries if e.target == prefix or e.target.startswith(prefix + "/")]


# --- undoing ---------------------------------------------------------------------------


def unmount_all(state: JobState, areas: list[str], attempts: int = 20) -> list[str]:
    """Unmount the recorded mounts in reverse, then anything left under ``areas``.

    Never deletes a file: what is left behind a mount stays where it was. Returns
    the mount points that could only be detached lazily (still busy), for the log.
    """
    lazy: list[str] = []
    table = mountinfo()
    for record in reversed(state.mounts):
        # A recursive bind (/sys) carries submounts that must come off first.
        for entry in _deepest_first(under(record.target, table)):
            _unmount_one(entry.target, attempts, lazy)
        _unmount_one(record.target, attempts, lazy)
    for _round in range(8):  # the sweep: unrecorded or stacked mounts, deepest first
        left = [e for area in areas for e in under(area)]
        if not left:
            break
        for entry in _deepest_first(left):
            _unmount_one(entry.target, attempts, lazy)
    return lazy


def _deepest_first(entries: list[MountInfo]) -> list[MountInfo]:
    return sorted(entries, key=lambda e: (e.target.count("/"), e.mount_id), reverse=True)


def _unmount_one(target: str, attempts: int, lazy: list[str]) -> None:
    for attempt in range(attempts):
        try:
            sc.umount(target)
            return
        except OSError as err:
            if err.errno in (errno.EINVAL, errno.ENOENT):
                return  # not a mount point (any more): already undone
            if err.errno != errno.EBUSY:
                raise node_error(
                    "unmount", f"failed ({os.strerror(err.errno or 0)})", target
                ) from None
            time.sleep(0.005 * (attempt + 1))
    log.warning(f"unmount: still busy, detaching lazily: {target}")
    try:
        sc.umount(target, sc.UMOUNT_NOFOLLOW | sc.MNT_DETACH)
        lazy.append(target)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOENT):
            raise node_error("unmount", f"lazy detach failed ({err.strerror})", target) from None


# --- copies in other mount namespaces ---------------------------------------------------


def foreign_copies(areas: list[str]) -> dict[int, list[str]]:
    """Mount namespaces other than ours that hold copies of the job's mounts.

    A process that made a new mount namespace while the container was mounted (an
    ``unshare -m``, another container runtime) keeps private copies of its mounts,
    and with them the image's loop device. Returns one pid per such namespace with
    the copied mount points there.
    """
    ours = os.readlink("/proc/self/ns/mnt")
    seen = {ours}
    found: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            namespace = os.readlink(f"/proc/{entry}/ns/mnt")
            if namespace in seen:
                continue
            seen.add(namespace)
            table = mountinfo(f"/proc/{entry}/mountinfo")
        except OSError:
            continue
        copies = [e.target for area in areas for e in under(area, table)]
        if copies:
            found[int(entry)] = copies
    return found


def unmount_in(pid: int, targets: list[str]) -> bool:
    """Detach ``targets`` inside ``pid``'s mount namespace (a forked child enters it)."""
    child = os.fork()
    if child == 0:
        code = 1
        try:
            fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY)
            sc.setns(fd, sc.CLONE_NEWNS)
            for target in sorted(targets, key=lambda t: t.count("/"), reverse=True):
                try:
                    sc.umount(target, sc.UMOUNT_NOFOLLOW | sc.MNT_DETACH)
                except OSError:
                    pass
            code = 0
        finally:
            os._exit(code)
    _pid, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status) == 0
