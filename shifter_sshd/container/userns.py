"""One user namespace per job per node, which every ``shifter`` of the job joins.

``shifter`` needs a user namespace to chroot without privilege. If each call made
its own, the ranks of one node would sit in sibling namespaces, and the kernel
refuses what MPI's intra-node transports need between those: ``/proc/<peer>/fd/N``
(UCX's shared memory, MPICH) and process_vm_readv (CMA, Open MPI's vader). In one
namespace they work as on the host.

So the prolog starts a holder per job per node: a process that becomes the job user
(groups, gid, uid), creates a user namespace (owned by the user, so the user's
``shifter`` may join it), waits while root writes its maps, and then sleeps for the
job's lifetime. The maps are the user's own ids only: the uid, and each of the
user's groups (written by root, so the supplementary groups show by name inside);
``setgroups`` is denied, so no process in it can drop a group to get past a
group-denying permission. Owning the namespace gives the user nothing they could
not get with ``unshare -U`` themselves: the mount, network and every other
namespace stay the host's, owned by root.

The holder is adopted into the job's extern step with the sshd (``jobstep``), and
teardown stops it by pid and start time. If it is gone (the user killed it, or
unprivileged user namespaces are off), ``shifter`` falls back to a namespace of its
own, or to the sshd.
"""

from __future__ import annotations

import ctypes
import os

from .. import faults
from ..kernel import privileged as priv
from ..kernel import processes
from ..kernel.userproc import UserChild
from ..users import User

HOLDER = "/bin/sleep"
HOLDER_NAME = "shifter-sshd-userns"  # its argv[0], for ps
CLONE_NEWUSER = 0x10000000


def start(user: User, timeout: float) -> tuple[int, int]:
    """Start the job's holder; (pid, start time), or (0, 0) when none can be made.

    The child is the user's from its ``setresuid`` on: stopped or traced before it
    reports, it costs ``timeout`` seconds (``usernsTimeout``) and raises ``Timeout``.
    """
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _holder(user, ready_w, go_r)  # never returns
    os.close(ready_w)
    os.close(go_r)
    try:
        with UserChild(pid, timeout) as holder:
            if holder.read(ready_r, 1) != b"u":
                return 0, 0  # no user namespaces here: killed and reaped on the way out
            try:
                _write_maps(pid, user)
                os.write(go_w, b"m")  # EPIPE too: the user may kill it at any moment
            except OSError:
                return 0, 0  # it died meanwhile (the user killed it)
            holder.wait_readable(ready_r)  # closed on exec: it runs the holder program
            if os.read(ready_r, 1) != b"":
                return 0, 0
            holder.release()
    finally:
        os.close(ready_r)
        os.close(go_w)
    return pid, processes.start_time(pid) or 0


def _holder(user: User, ready: int, go: int) -> None:
    """The child: its own session, no descriptor of ours, the user, a new namespace."""
    code = 1
    try:
        os.setsid()
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        for fd in range(3, 1024):
            if fd not in (ready, go):
                try:
                    os.close(fd)
                except OSError:
                    pass
        os.chdir("/")
        os.setgroups(user.gids)
        os.setresgid(user.gid, user.gid, user.gid)
        os.setresuid(user.uid, user.uid, user.uid)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWUSER) != 0:
            os._exit(2)  # unprivileged user namespaces are off here
        faults.inject("userns holder")
        os.write(ready, b"u")
        if os.read(go, 1) != b"m":
            os._exit(3)
        os.close(go)
        os.set_inheritable(ready, False)  # closes on exec: the parent sees EOF
        os.execv(HOLDER, [HOLDER_NAME, "infinity"])  # noqa: S606 - a fixed program
    finally:
        os._exit(code)


def _write_maps(pid: int, user: User) -> None:
    """The user's own ids, written by root: the groups too, setgroups denied."""
    priv.write_id_maps(pid, user.uid, list(dict.fromkeys(user.gids)))
