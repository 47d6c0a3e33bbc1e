"""How ``shifter`` gets into the container: a user namespace and chroot, else the sshd.

Everything that depends on the host's view (the caller's cwd, the script file
the kernel handed us) is settled in ``plan`` before anything changes, so both
ways in run the same command in the same directory with the same environment.
"""

from __future__ import annotations

import errno
import os
import sys
import warnings  # noqa: F401 - os.execvpe imports it lazily: after chroot it would be gone

from ..errors import ShifterError
from ..kernel import processes
from ..kernel import syscalls as sc

# typing costs ~9 ms to import, a third of shifter's start; mypy knows this name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..lifecycle.record import Container

CLONE_NEWUSER = 0x10000000
RESOLVE = sc.RESOLVE_IN_ROOT | sc.RESOLVE_NO_MAGICLINKS
DISABLED = sc.USERNS_DISABLED
# unshare(CLONE_NEWUSER) errors that mean "not allowed here", not "shifter is broken".
REFUSALS = {errno.EPERM, errno.EACCES, errno.ENOSPC, errno.EUSERS, errno.EINVAL, errno.ENOSYS}
FORCE_SSH = "SHIFTER_SSHD_FORCE_SSH"  # tests: take the sshd path as if userns were off
SSH = "/usr/bin/ssh"
SSH_IDENTITY = "/var/shifter/ssh/id_ed25519"
SSH_KNOWN_HOSTS = "/opt/udiImage/etc/ssh_known_hosts"
SCRIPT_FD = 9  # where the sshd path's remote shell holds a handed-over script
EXIT_CANNOT_EXEC = 126
EXIT_NOT_FOUND = 127


class Unavailable(Exception):
    """No user namespace for us here; the sshd is the way in."""


class Plan:
    """What to run, where, with what; the same for both ways in."""

    def __init__(self, container: Container, argv: list[str], env: dict[str, str]) -> None:
        self.container = container
        self.argv = argv
        self.env = env
        self.root_fd = -1
        self.cwd = "/"
        self.script_index = -1  # argv index of a host script not visible inside
        self.script_fd = -1  # that script, open on the host


def plan(container: Container, argv: list[str], env: dict[str, str]) -> Plan:
    """Open the root, pick the working directory, find a script to hand over."""
    p = Plan(container, list(argv), env)
    try:
        p.root_fd = os.open(container.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise ShifterError(f"job {container.job_id}", f"container root unusable ({err.strerror})",
                           container.root) from None  # fmt: skip
    script = _script_argument(p.argv)
    host_script = _stat(p.argv[script]) if script > 0 else None
    p.cwd = _settle_cwd(p, _cwd_candidates(container, env))
    if host_script is not None and not _visible(p, p.argv[script], host_script):
        try:
            p.script_fd = os.open(p.argv[script], os.O_RDONLY | os.O_CLOEXEC)
            p.script_index = script
        except OSError:
            pass  # unreadable: the interpreter inside will say so
    return p


def _script_argument(argv: list[str]) -> int:
    """The index of a script whose shebang runs shifter (we are its interpreter), or -1."""
    index = next((i for i, arg in enumerate(argv) if i and not arg.startswith("-")), -1)
    if index < 0:
        return -1
    line = first_line(argv[index])
    return index if line.startswith("#!") and "shifter" in line else -1


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _cwd_candidates(container: Container, env: dict[str, str]) -> list[str]:
    """Caller's directory (logical, then physical), image workdir, home, /."""
    found = [_logical_cwd()]
    try:
        found.append(os.getcwd())
    except OSError:
        pass  # the caller's directory was removed
    return [path for path in (*found, container.workdir, env.get("HOME", ""), "/")
            if path.startswith("/")]  # fmt: skip


def _logical_cwd() -> str:
    """$PWD (the path as the user typed it, through symlinks) if it is still the cwd."""
    logical = os.environ.get("PWD", "")
    try:
        here, there = os.stat("."), os.stat(logical)
    except OSError:
        return ""
    return logical if (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino) else ""


def _settle_cwd(p: Plan, candidates: list[str]) -> str:
    """Move into the first candidate that exists inside the root and is searchable.

    openat2(RESOLVE_IN_ROOT) resolves every symlink and '..' as the container will
    see them, so nothing leads outside; fchdir checks the user may enter it.
    """
    for path in candidates:
        try:
            fd = sc.openat2(p.root_fd, path, os.O_PATH | os.O_DIRECTORY, RESOLVE)
        except OSError:
            continue
        try:
            os.fchdir(fd)
            return path
        except OSError:
            continue
        finally:
            os.close(fd)
    raise ShifterError(f"job {p.container.job_id}", "cannot enter the container root",
                       p.container.root)  # fmt: skip


def _visible(p: Plan, path: str, host: os.stat_result) -> bool:
    """Whether ``path`` inside the container (from the chosen cwd) is the host's file."""
    inside = path if path.startswith("/") else os.path.join(p.cwd, path)
    try:
        fd = sc.openat2(p.root_fd, inside, os.O_PATH, RESOLVE)
    except OSError:
        return False
    try:
        there = os.fstat(fd)
    finally:
        os.close(fd)
    return (there.st_dev, there.st_ino) == (host.st_dev, host.st_ino)


def enter(p: Plan, force_ssh: bool) -> int:
    """Exec CMD inside; returns only an exit status when that fails."""
    reason = f"{DISABLED} ({FORCE_SSH} is set)" if force_ssh else sc.sysctl_refusal()
    if reason is None:
        try:
            enter_userns(p)
            return exec_inside(p)
        except Unavailable as why:
            reason = str(why)
    sys.stderr.write(f"shifter: {reason}; entering through the container's sshd\n")
    return exec_ssh(p)


# --- the user namespace -----------------------------------------------------------------


def enter_userns(p: Plan) -> None:
    """The job's user namespace on this node (else one of our own), then chroot.

    Every ``shifter`` of the job joins the namespace the prolog's holder keeps
    (container/userns.py), so ranks of one node can share memory (CMA, /proc/<pid>/fd). When
    the holder is gone, a namespace of our own still runs the command. Raises
    Unavailable when no user namespace can be had at all.
    """
    if not _join_job_namespace(p):
        _own_namespace()
    try:
        os.chroot(sc.fd_path(p.root_fd))  # the cwd chosen by plan() is already inside
    except PermissionError as err:  # e.g. an LSM that strips the namespace's capabilities
        raise Unavailable(f"{DISABLED} (chroot: {err.strerror})") from None


def _join_job_namespace(p: Plan) -> bool:
    """setns into the holder's namespace: ours to join, as the user owns it."""
    pid, started = p.container.userns
    if pid <= 0:
        return False
    try:
        fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        fd = -1
    try:
        if fd < 0 or _alive_since(pid) != started:  # after the open: it is that process
            sys.stderr.write(
                f"shifter: job {p.container.job_id}: its user namespace is gone; "
                "this command cannot share memory with the job's other ranks\n"
            )
            return False
        sc.setns(fd, CLONE_NEWUSER)
        return True
    except OSError:
        return False
    finally:
        if fd >= 0:
            os.close(fd)


def _alive_since(pid: int) -> int:
    """The start time of ``pid`` while it lives; -1 when gone or a zombie."""
    stat = processes.read_stat(pid)
    return -1 if stat is None or stat.state in ("Z", "X") else stat.start


def _own_namespace() -> None:
    """A new user namespace mapping our own ids; raises Unavailable."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(CLONE_NEWUSER) != 0:
        code = ctypes.get_errno()
        if code in REFUSALS:
            raise Unavailable(f"{DISABLED} (unshare: {os.strerror(code)})")
        raise ShifterError("user namespace", "unshare failed", os.strerror(code))
    try:
        _write("/proc/self/setgroups", "deny")  # required before an unprivileged gid_map
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    except PermissionError as err:  # e.g. an LSM that strips the namespace's capabilities
        raise Unavailable(f"{DISABLED} ({err.filename}: {err.strerror})") from None


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def exec_inside(p: Plan) -> int:
    """execve CMD, looked up with the container's PATH; 126/127 if that fails."""
    argv = list(p.argv)
    if p.script_index > 0:
        os.set_inheritable(p.script_fd, True)
        argv[p.script_index] = sc.fd_path(p.script_fd)
    try:
        os.execvpe(argv[0], argv, p.env)  # noqa: S606 - CMD is the user's own, no shell
    except FileNotFoundError:
        return _exec_failed(p, "command not found in image", EXIT_NOT_FOUND)
    except OSError as err:
        return _exec_failed(p, f"cannot execute ({err.strerror}) in image", EXIT_CANNOT_EXEC)


def _exec_failed(p: Plan, what: str, code: int) -> int:
    sys.stderr.write(f"shifter: {p.argv[0]}: {what}: {p.container.label}\n")
    return code


# --- the sshd fallback ------------------------------------------------------------------


def exec_ssh(p: Plan) -> int:
    """Run CMD through the job's sshd on this node with the job identity."""
    c = p.container
    if "PMI_FD" in p.env:  # srun --mpi=pmi2: a descriptor ssh cannot carry
        raise ShifterError(f"job {c.job_id}", "PMI-2 (srun --mpi=pmi2) needs shifter's direct "
                           "way in (a user namespace); through the sshd its PMI_FD is lost: "
                           "use --mpi=pmix, or ask the admins to allow user namespaces",
                           "PMI_FD")  # fmt: skip
    if c.sshd_port <= 0:
        raise ShifterError(f"job {c.job_id}", f"cannot enter: {DISABLED} and the job has no sshd",
                           c.root)  # fmt: skip
    identity = os.path.join(c.root, SSH_IDENTITY.lstrip("/"))
    if not os.access(identity, os.R_OK):
        raise ShifterError(f"job {c.job_id}", "cannot read the job's ssh identity", identity)
    argv = ssh_argv(p, identity, _node_name())
    try:
        os.execv(SSH, argv)  # noqa: S606 - a fixed program, arguments quoted for the far shell
    except OSError as err:
        raise ShifterError("sshd fallback", f"cannot run ssh ({err.strerror})", SSH) from None


def _node_name() -> str:
    """The name the job's host certificate and known hosts carry for this node."""
    name = os.environ.get("SLURMD_NODENAME", "")
    if not name:
        import socket

        name = socket.gethostname().split(".")[0]
    return name


def ssh_argv(p: Plan, identity: str, host: str) -> list[str]:
    """The host's ssh with explicit options only: no user or system config applies."""
    known = os.path.join(p.container.root, SSH_KNOWN_HOSTS.lstrip("/"))
    tty = "-tt" if os.isatty(0) else "-T"
    options = {
        "CertificateFile": f"{identity}-cert.pub", "UserKnownHostsFile": known,
        "GlobalKnownHostsFile": "/dev/null", "StrictHostKeyChecking": "yes",
        "BatchMode": "yes", "IdentitiesOnly": "yes", "LogLevel": "ERROR",
        "ConnectTimeout": "10",
    }  # fmt: skip
    flat = [arg for name, value in options.items() for arg in ("-o", f"{name}={value}")]
    return [SSH, "-F", "/dev/null", "-i", identity, *flat, "-p", str(p.container.sshd_port),
            tty, host, "--", remote_command(p)]  # fmt: skip


def remote_command(p: Plan) -> str:
    """A POSIX shell line doing what exec_inside does: cwd, environment, lookup, exec."""
    from shlex import quote

    argv = list(p.argv)
    lines = [f"cd {quote(p.cwd)} || exit 1"]
    exports = [f"{name}={quote(value)}" for name, value in p.env.items() if name.isidentifier()]
    if exports:
        lines.append("export " + " ".join(exports))
    if p.script_index > 0:
        copy = _copy_script(p)
        lines.append(f"exec {SCRIPT_FD}< {quote(copy)} && rm -f {quote(copy)} || exit 1")
        argv[p.script_index] = f"/proc/self/fd/{SCRIPT_FD}"
    missing = f"shifter: {argv[0]}: command not found in image: {p.container.label}"
    lines.append(f"command -v {quote(argv[0])} >/dev/null 2>&1 || "
                 f"{{ echo {quote(missing)} >&2; exit {EXIT_NOT_FOUND}; }}")  # fmt: skip
    lines.append("exec " + " ".join(quote(arg) for arg in argv))
    return "\n".join(lines)


def _copy_script(p: Plan) -> str:
    """Copy the host script into the container's /tmp; the remote shell unlinks it."""
    name = f".shifter-script-{os.getpid()}-{os.urandom(4).hex()}"
    tmp = sc.openat2(p.root_fd, "/tmp", os.O_PATH | os.O_DIRECTORY, RESOLVE)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        out = os.open(name, flags, 0o600, dir_fd=tmp)
    finally:
        os.close(tmp)
    try:
        while chunk := os.read(p.script_fd, 1 << 16):
            os.write(out, chunk)
    finally:
        os.close(out)
    return f"/tmp/{name}"


def first_line(path: str) -> str:
    """The first line of a small prefix of a host file; '' for anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        head = os.read(fd, 256) if _is_regular(fd) else b""
    except OSError:
        head = b""
    finally:
        os.close(fd)
    return head.split(b"\n", 1)[0].decode(errors="replace")


def _is_regular(fd: int) -> bool:
    import stat

    return stat.S_ISREG(os.fstat(fd).st_mode)
