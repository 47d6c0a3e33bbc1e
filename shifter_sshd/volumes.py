"""siteFs and the user's ``--volume`` binds.

A user's volume source is opened by a child process that has become the user, and
the open descriptor is passed back: the prolog binds exactly what the user could
open, with no window to swap the path for something only root can read.
"""

from __future__ import annotations

import os
import stat

from .config import SiteMount, parse_mount_spec
from .errors import ShifterError, node_error, user_error
from .mounts import Mounter
from .rootpath import Root
from .users import User

VOLUME_FLAGS = ("ro", "rw")
# Destinations a volume may not be, cover, or sit inside.
PROTECTED = ("/etc", "/usr", "/bin", "/sbin", "/proc", "/sys", "/dev", "/opt/udiImage")
# Destinations a volume may not be or cover (the prolog writes them).
PROTECTED_FILES = ("/var/hostsfile", "/var/nodesfile", "/var/shifter")


def parse_volumes(text: str) -> list[SiteMount]:
    """``/src:/dst[:ro];...`` from --volume; every problem is the user's to fix."""
    mounts = []
    for spec in (s.strip() for s in text.split(";")):
        if not spec:
            continue
        try:
            mount = parse_mount_spec("--volume", spec, VOLUME_FLAGS)
        except ShifterError as err:
            raise user_error(err.where, err.what, err.value) from None
        check_destination(mount.dest)
        mounts.append(mount)
    return mounts


def check_destination(dest: str) -> None:
    def covers(protected: str) -> bool:
        return dest == protected or protected.startswith(dest.rstrip("/") + "/")

    top = dest.split("/")[1] if dest != "/" else ""
    if dest == "/" or top.startswith("lib"):
        raise user_error("--volume", "destination not allowed", dest)
    for protected in PROTECTED:
        if covers(protected) or dest.startswith(protected + "/"):
            raise user_error("--volume", f"destination may not cover {protected}", dest)
    for protected in PROTECTED_FILES:
        if covers(protected):
            raise user_error("--volume", f"destination may not cover {protected}", dest)


def mount_site_fs(m: Mounter, root: Root, site_fs: list[SiteMount]) -> None:
    for mount in site_fs:
        if not os.path.exists(mount.source):
            raise node_error("siteFs", "source does not exist on this node", mount.source)
        target = _destination(root, mount.dest, os.path.isdir(mount.source), "siteFs")
        m.bind(mount.source, target, read_only=mount.read_only, recursive=mount.recursive,
               kind="siteFs")  # fmt: skip


def mount_user_volumes(m: Mounter, root: Root, user: User, volumes: list[SiteMount]) -> None:
    for mount in volumes:
        fd = open_as_user(mount.source, user, writable=not mount.read_only)
        try:
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
            target = _destination(root, mount.dest, is_dir, "--volume")
            m.bind(f"/proc/self/fd/{fd}", target, read_only=mount.read_only, kind="volume")
        finally:
            os.close(fd)


def _destination(root: Root, dest: str, is_dir: bool, where: str) -> str:
    """The real mount point for ``dest``, created only on the container's own tmpfs.

    A missing destination below an image directory or a site filesystem is not
    created: that would write into the image's mount or onto a host filesystem.
    """
    if root.exists(dest):
        real = root.real(dest)
        if os.path.isdir(real) != is_dir:
            kind = "a directory" if is_dir else "a file"
            raise user_error(where, f"destination in the image is not {kind}", dest)
        return real
    parent = os.path.dirname(dest)
    if not root.exists(parent) or os.stat(root.real(parent)).st_dev != os.stat(root.path).st_dev:
        raise user_error(where, "destination does not exist in the image", dest)
    if is_dir:
        return root.makedirs(dest)
    root.write(dest, b"", mode=0o644)
    return root.real(dest)


def open_as_user(path: str, user: User, writable: bool) -> int:
    """Open ``path`` as the user in a child process; the descriptor comes back."""
    import socket  # only jobs with volumes pay for it

    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # child: become the user, open, send the descriptor, exit
        code = 1
        try:
            parent_sock.close()
            os.setgroups(user.gids)
            os.setgid(user.gid)
            os.setuid(user.uid)
            flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            fd = os.open(path, flags)
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                code = 4
            elif writable and not os.access(path, os.W_OK):
                code = 3
            else:
                socket.send_fds(child_sock, [b"ok"], [fd])
                code = 0
        except OSError as err:
            code = {2: 2, 13: 3}.get(err.errno or 0, 1)
        finally:
            os._exit(code)
    child_sock.close()
    try:
        _msg, fds, _flags, _addr = socket.recv_fds(parent_sock, 16, 1)
    finally:
        parent_sock.close()
        _pid, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0 and fds:
        return fds[0]
    access = "writable" if writable else "readable"
    reason = {
        2: "source does not exist",
        3: f"source not {access} by {user.name}",
        4: "source is not a directory or file",
    }
    raise user_error("--volume", reason.get(code, "cannot open source"), path)
