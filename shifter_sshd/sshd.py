"""Starting and stopping the job's sshd: inside the container, as the user, no privilege.

The child chroots into the container root, takes the user's groups, gid and uid,
drops every capability from its bounding and ambient sets, sets NO_NEW_PRIVS, starts
a new session, closes inherited descriptors and execs sshd with a clean environment
and an absolute argv[0] (sshd re-execs itself). A non-root sshd can only ever log in
its own uid; without privileges it could not do otherwise even if it wanted to.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import time

from .errors import node_error
from .users import User

SSHD = "/opt/udiImage/libexec/sshd"
SSHD_CONFIG = "/opt/udiImage/etc/sshd_config"
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_NO_NEW_PRIVS = 38
_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    if _libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl({option}): {os.strerror(code)}")


def _last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap", "rb") as handle:
        return int(handle.read())


def _drop_privileges(user: User, last: int) -> None:
    for cap in range(last + 1):  # needs CAP_SETPCAP: before the uid changes
        _prctl(PR_CAPBSET_DROP, cap)
    os.setgroups(user.gids)
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)  # clears permitted and effective caps
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def start(root: str, user: User, log_inside: str) -> int:
    """Fork sshd inside ``root``; returns its pid (sshd -D does not fork again)."""
    last_cap = _last_cap()  # read before chroot: nothing of the host is reachable after
    env = {"PATH": "/opt/udiImage/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
           "OPENSSL_CONF": "/opt/udiImage/share/openssl.cnf"}  # fmt: skip
    argv = [SSHD, "-D", "-f", SSHD_CONFIG, "-E", log_inside]
    errors_r, errors_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(errors_r)
            os.setsid()
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.closerange(3, errors_w)
            os.closerange(errors_w + 1, 65536)
            os.set_inheritable(errors_w, False)  # closes itself on exec: success
            os.chroot(root)
            os.chdir("/")
            _drop_privileges(user, last_cap)
            os.execve(SSHD, argv, env)  # noqa: S606 - argv is ours, no shell involved
        except BaseException as err:  # report to the parent, never return into Python
            os.write(errors_w, f"{type(err).__name__}: {err}".encode()[:4000])
        finally:
            os._exit(127)
    os.close(errors_w)
    with os.fdopen(errors_r, "rb") as pipe:
        failure = pipe.read().decode(errors="replace")
    if failure:
        os.waitpid(pid, 0)
        raise node_error("sshd", "cannot start", failure)
    return pid


def wait_ready(pid: int, port: int, log_host_path: str, timeout: float = 10.0) -> None:
    """Until the port answers with an SSH banner; quote sshd's log if it died instead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            raise node_error("sshd", f"exited at start ({_status(status)})", _tail(log_host_path))
        if _banner(port) and _listens(pid, port):
            return
        time.sleep(0.005)
    raise node_error("sshd", f"no SSH banner on port {port} after {timeout:.0f} s",
                     _tail(log_host_path))  # fmt: skip


def _banner(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            return sock.recv(64).startswith(b"SSH-2.0-")
    except OSError:
        return False


def _listens(pid: int, port: int) -> bool:
    """Whether the banner came from our sshd: it holds the listening socket on ``port``.

    Another process holding the port would answer too, and our sshd would die on
    ``Address already in use`` a moment later.
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as handle:
                for line in handle.readlines()[1:]:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{fields[9]}]")
        except OSError:
            continue
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes
                   for fd in os.listdir(f"/proc/{pid}/fd"))  # fmt: skip
    except OSError:
        return False


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


def _tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read()[-4000:]
    except OSError:
        return "(no sshd log)"
    return " | ".join(text.strip().splitlines()[-lines:]) or "(empty sshd log)"


def stop(pid: int, started: int) -> bool:
    """SIGTERM our sshd by its pid, never a recycled pid; True if it was signalled.

    Waiting and SIGKILL are teardown's (processes.stop), for sshd and its sessions alike.
    """
    from . import processes

    if pid <= 0 or processes.start_time(pid) != started:
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True
