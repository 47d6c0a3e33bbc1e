"""Opening the user's volume sources as the user, in a child process, with a deadline.

The child takes the user's groups, gid and uid and opens every source with O_PATH,
following symlinks as the user would: it reaches exactly what the user can reach.
It looks at what it opened (type, filesystem, whether the user may read and write
it) and passes each descriptor back over a socket. So the prolog (root) never
looks a user's path up itself and never waits on the user's filesystems: a hung
NFS or FUSE server, or the user stopping the child (it is theirs to signal), costs
at most the deadline, after which the child is killed and the job gets a user error
(``userproc`` holds the rules for every wait on a child that has become the user).

What root then does with the descriptors never calls into the source's filesystem:
``open_tree`` on an O_PATH descriptor, ``move_mount`` and ``mount_setattr`` work on
the mount tree alone, and the mount id comes from fdinfo, not ``fstat``. A FUSE
source whose daemon the user stops (sshfs, squashfuse) can hold the child, never
root.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from dataclasses import dataclass

from .. import faults
from ..users import User
from . import syscalls as sc
from .userproc import Timeout, UserChild

__all__ = ["Source", "Timeout", "open_sources"]

_HEADER = struct.Struct("=iIqBB")  # errno, st_mode, statfs f_type, readable, writable


@dataclass
class Source:
    """One opened source; ``fd`` is -1 when ``error`` (an errno) says why not."""

    path: str
    fd: int = -1
    mode: int = 0
    fstype: int = 0
    readable: bool = False
    writable: bool = False
    error: int = 0


def open_sources(paths: list[str], user: User, timeout: float) -> list[Source]:
    """Every path opened as ``user``; raises Timeout when the deadline passes."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        parent.close()
        _child(child, paths, user)  # never returns
    child.close()
    try:
        with UserChild(pid, timeout) as helper:
            return _receive(parent, paths, helper)
    finally:
        parent.close()


def _child(sock: socket.socket, paths: list[str], user: User) -> None:
    """Only the socket survives: no descriptor of the prolog's reaches the user's process."""
    code = 1
    try:
        keep = sock.fileno()
        os.closerange(3, keep)
        os.closerange(keep + 1, 65536)
        os.setgroups(user.gids)
        os.setgid(user.gid)
        os.setuid(user.uid)
        faults.inject("asuser child")
        for path in paths:
            _send_one(sock, path)
        code = 0
    finally:
        os._exit(code)


def _send_one(sock: socket.socket, path: str) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as err:
        sock.send(_HEADER.pack(err.errno or 5, 0, 0, 0, 0))
        return
    try:
        info = os.fstat(fd)
        fstype = sc.fstatfs_type(fd)
        readable = os.access(sc.fd_path(fd), os.R_OK)
        writable = os.access(sc.fd_path(fd), os.W_OK)
        header = _HEADER.pack(0, info.st_mode, fstype, readable, writable)
        sock.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    except OSError as err:
        sock.send(_HEADER.pack(err.errno or 5, 0, 0, 0, 0))
    finally:
        os.close(fd)


def _receive(sock: socket.socket, paths: list[str], helper: UserChild) -> list[Source]:
    found: list[Source] = []
    try:
        for path in paths:
            helper.wait_readable(sock.fileno())
            data, ancillary, _flags, _addr = sock.recvmsg(64, socket.CMSG_SPACE(4))
            found.append(_decode(path, data, ancillary))
    except BaseException:
        for source in found:
            if source.fd >= 0:
                os.close(source.fd)
        raise
    return found


def _decode(path: str, data: bytes, ancillary: list[tuple[int, int, bytes]]) -> Source:
    fds = [
        fd
        for level, kind, raw in ancillary
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
        for fd in array.array("i", raw[: len(raw) - len(raw) % 4])
    ]
    if len(data) != _HEADER.size:  # the child died mid-way
        for fd in fds:
            os.close(fd)
        return Source(path, error=5)  # EIO
    error, mode, fstype, readable, writable = _HEADER.unpack(data)
    if error or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        return Source(path, error=error or 5)
    os.set_inheritable(fds[0], False)
    return Source(path, fds[0], mode, fstype, bool(readable), bool(writable))
