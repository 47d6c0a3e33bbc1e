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
import socket
import stat
import time

from .. import faults
from ..errors import ShifterError, node_error, user_error
from ..kernel import privileged as priv
from ..kernel import processes
from ..kernel.userproc import Timeout, UserChild
from ..users import User

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


def start(root_fd: int, user: User, log_inside: str, timeout: float) -> int:
    """Fork sshd inside the root ``root_fd`` names; returns its pid (sshd -D stays put).

    The child reports a failure before exec through a pipe that closes on exec. Once
    it has the user's uid the user may signal it: the wait ends at ``timeout``
    (``sshdStartTimeout``), and a child still not exec'd then is killed.
    """
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
            os.fchdir(root_fd)  # before closing: then no descriptor of ours survives
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.closerange(3, errors_w)
            os.closerange(errors_w + 1, 65536)
            os.set_inheritable(errors_w, False)  # closes itself on exec: success
            os.chroot(".")
            _drop_privileges(user, last_cap)
            faults.inject("sshd child")
            os.execve(SSHD, argv, env)  # noqa: S606 - argv is ours, no shell involved
        except BaseException as err:  # report to the parent, never return into Python
            os.write(errors_w, f"{type(err).__name__}: {err}".encode()[:4000])
        finally:
            os._exit(127)
    os.close(errors_w)
    try:
        with UserChild(pid, timeout) as child:
            try:
                failure = _read_until_exec(errors_r, child)
            except Timeout:
                raise _late(pid, user, timeout) from None
            if not failure:
                child.release()
                return pid
    finally:
        os.close(errors_r)
    raise node_error("sshd", "cannot start", failure)  # the child was killed and reaped


def _read_until_exec(fd: int, child: UserChild) -> str:
    """What the child wrote before exec ('' once exec closed the pipe)."""
    chunks: list[bytes] = []
    while chunk := child.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def _late(pid: int, user: User, timeout: float) -> ShifterError:
    """Whose fault a child that has not exec'd sshd in time is: once it has the user's
    uid, the user's (they may stop or trace it); before, the node's."""
    what = f"did not start within {timeout:g} s (sshdStartTimeout)"
    where = f"pid {pid}, state {processes.state(pid)}"
    if processes.owner(pid) == user.uid:
        return user_error("sshd", f"{what}: stopped or traced by the job's owner", where)
    return node_error("sshd", what, where)


def port_holders(port: int) -> list[int]:
    """Pids holding a listening TCP socket on ``port`` (any address, v4 or v6)."""
    return _pids_holding({inode for _addr, inode in _listeners(port)})


def _pids_holding(inodes: set[str]) -> list[int]:
    if not inodes:
        return []
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and _holds(int(e), inodes)]


def _listeners(port: int) -> list[tuple[str, str]]:
    """(local address, socket inode) of every LISTEN socket on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as handle:
                lines = handle.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, _sep, hex_port = fields[1].rpartition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:
                found.append((address, f"socket:[{fields[9]}]"))
    return found


def _holds(pid: int, inodes: set[str]) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes
                   for fd in os.listdir(f"/proc/{pid}/fd"))  # fmt: skip
    except OSError:
        return False


def wait_ready(pid: int, port: int, ssh_dir: int, left: float, timeout: float) -> None:
    """Until our sshd holds the IPv4 listener on ``port`` and it answers with a banner.

    Whose fault a failure is decides whether the node drains: sshd killed, stopped
    or traced (it runs as the user, who may do all three), a missed deadline
    (``sshdStartTimeout``), or the port taken by someone else, is the job's problem;
    sshd exiting on its own is the node's. ``left``: what remains of ``timeout``.
    """
    deadline = time.monotonic() + left
    while (left := deadline - time.monotonic()) > 0:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            _exited(status, port, _tail(ssh_dir))
        if processes.state(pid) in ("T", "t"):
            raise user_error("sshd", "stopped by a signal during start-up", pid)
        address = _our_ipv4_listener(pid, port)
        if address is not None and _banner(address, port, min(1.0, left)):
            return
        if address is None and _v4_taken_by_other(pid, port):
            raise user_error("sshd", f"port {port} is held by another process",
                             describe(port_holders(port)))  # fmt: skip
        time.sleep(0.005)
    raise user_error("sshd", f"no SSH banner on port {port} within {timeout:g} s "
                     "(sshdStartTimeout; sshd runs as the job's owner, who may hold it)",
                     _tail(ssh_dir))  # fmt: skip


def _exited(status: int, port: int, tail: str) -> None:
    if os.WIFSIGNALED(status):
        raise user_error("sshd", "killed during start-up", f"signal {os.WTERMSIG(status)}")
    if "Address already in use" in tail:
        raise user_error("sshd", f"port {port} is held by another process", tail)
    raise node_error("sshd", f"exited at start (exit {os.WEXITSTATUS(status)})", tail)


def _our_ipv4_listener(pid: int, port: int) -> str | None:
    """The IPv4 address our sshd listens on (as a dotted quad), or None."""
    ours = {inode for _address, inode in _listeners(port) if _holds(pid, {inode})}
    for address, inode in _listeners(port):
        if inode in ours and len(address) == 8:  # /proc/net/tcp: little-endian hex
            dotted = socket.inet_ntoa(bytes.fromhex(address)[::-1])
            return "127.0.0.1" if dotted == "0.0.0.0" else dotted  # noqa: S104
    return None


def _v4_taken_by_other(pid: int, port: int) -> bool:
    """Whether an IPv4 listener on ``port`` is held by a process that is not our sshd.

    sshd forks a child for each connection (our banner check makes one) that holds the
    listener until it closes it: while the racing owner stops or kills sshd, that child
    may be its only holder. It is still in sshd's session (sshd leads the session we
    made for it), so it counts as ours, not as another process on the port.
    """
    inodes = {inode for address, inode in _listeners(port)
              if len(address) == 8 and not _holds(pid, {inode})}  # fmt: skip
    if not inodes:
        return False
    for holder in _pids_holding(inodes):
        stat = processes.read_stat(holder)
        if stat is not None and stat.session != pid:
            return True
    return False


def describe(pids: list[int]) -> str:
    """``pid 12 (sshd, uid 2901), ...`` for messages."""
    parts = []
    for pid in pids:
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
            with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as handle:
                parts.append(f"pid {pid} ({handle.read().strip()}, uid {uid})")
        except OSError:
            continue
    return ", ".join(parts) or "unknown"


def _banner(address: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            return sock.recv(64).startswith(b"SSH-2.0-")
    except OSError:
        return False


def _tail(ssh_dir: int, lines: int = 5) -> str:
    """The end of sshd's log, read by descriptor: the user owns that directory."""
    try:
        fd = priv.open_entry(ssh_dir, "sshd.log", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return "(no sshd log)"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "(sshd log is not a file)"
        size = os.fstat(fd).st_size
        text = os.pread(fd, 4000, max(0, size - 4000)).decode(errors="replace")
    finally:
        os.close(fd)
    return " | ".join(text.strip().splitlines()[-lines:]) or "(empty sshd log)"


def free_port(port: int, exclusive: bool, job_id: str) -> None:
    """A leftover holding the sshd port goes; anyone else's process means no sshd.

    On a node the job has to itself, a user's process in no running job (no job
    cgroup, or one of a job no stepd on this node still serves) is a leftover of an
    earlier job whose epilog never ran: it is killed. A root process on the port is
    the site's configuration clashing with a service: the node's problem. Anything
    else is the job's problem: a clear error, and no sshd.
    """
    holders = port_holders(port)
    if not holders:
        return
    from .. import log

    described = describe(holders)
    if any(processes.owner(pid) == 0 for pid in holders):
        raise node_error("sshd", f"sshdPort {port} is held by a root process", described)
    if not exclusive or not all(_leftover(p, job_id) for p in holders):
        raise user_error("sshd", f"port {port} is held by another process", described)
    log.warning(f"prolog: job {job_id}: killing leftovers holding port {port}: {described}")
    processes.kill_now(holders)
    if port_holders(port):
        raise user_error("sshd", f"port {port} is still held after killing leftovers", described)


def _leftover(pid: int, job_id: str) -> bool:
    from ..slurm import stepd as slurmstepd

    jobs = processes.slurm_jobs(pid)
    return jobs is not None and all(j == job_id or not slurmstepd.job_running(j) for j in jobs)
