"""A container root built by the caller, in namespaces of their own, without root.

What ``shifter --image`` does where no prolog built one (lifecycle/standalone.py runs
these steps in order). No setuid helper and no privilege beyond what any user has in
a user namespace they create:

- A user namespace in which the caller is uid 0 (their own uid outside, nothing else
  mapped), and a mount namespace: nothing mounted here is ever visible outside, and
  it all goes with the last process in it. The image's files, owned by 0 in the
  squashfs, are the caller's here: the overlay can write them.
- A tmpfs over ``/tmp`` (in that namespace only) holds the image, mounted by
  ``squashfuse -f`` from the open squashfs, an overlay with a tmpfs upper layer over
  it (the container's writable root), and nothing else: no directory is made on the
  host.
- Every path in the root is resolved in the root (``Root``: openat2 RESOLVE_IN_ROOT)
  and acted on by descriptor (``/proc/self/fd/N``): an image whose /etc or mount
  points are symlinks to the host (``/etc -> /home/you``) cannot make the caller's
  own shifter write or mount on the host's files.
- /dev is a tmpfs of the container's own, holding binds of the host's usual nodes,
  ``hostDevices`` and the GPUs chosen (as the job's /dev holds them); /dev/pts is the
  host's, so the caller's terminal is a terminal inside.
- CMD runs in a nested user namespace where the caller's uid is theirs again, drops
  to that uid (and with it every capability) and execs. Both children (squashfuse
  and CMD) get SIGKILL when ``shifter`` dies (PR_SET_PDEATHSIG): killing ``shifter``
  leaves no process, mount or file.
"""

from __future__ import annotations

import ctypes
import os
import stat
import time

from ..errors import ShifterError, reason, user_error
from ..kernel.fds import Fd
from ..kernel.rootpath import Root
from . import devfs

TYPE_CHECKING = False
if TYPE_CHECKING:
    from _thread import LockType

SQUASHFUSE = "/usr/bin/squashfuse"
WORK = "/tmp"  # covered by our tmpfs, in our mount namespace only
MOUNT_TIMEOUT = 10.0  # seconds for squashfuse to mount the image
WARM_BYTES = 64 << 20  # of CMD's file read ahead; a bigger one is read as it runs
CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, SIGKILL, SIGTERM = 1, 9, 15

Bind = tuple[int, str, bool]  # (O_PATH descriptor of the source, destination, read-only)

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    if _libc.mount(source.encode(), target.encode(), fstype and fstype.encode(), flags,
                   data.encode() or None) != 0:  # fmt: skip
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target)


def _fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


# --- namespaces and the image ------------------------------------------------------------


def enter_namespaces(uid: int, gid: int) -> None:
    if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
        code = ctypes.get_errno()
        raise ShifterError("--image", "cannot make a user namespace here "
                           f"({os.strerror(code)}): unprivileged user namespaces are off?",
                           "shifter --image outside a job")  # fmt: skip
    _map_self(f"0 {uid} 1", f"0 {gid} 1")
    _mount("none", "/", None, MS_REC | MS_PRIVATE)  # nothing of ours goes back


def _map_self(uid_map: str, gid_map: str) -> None:
    """Our own one-line maps, groups denied: what any user may write for themselves."""
    for name, text in (("setgroups", "deny"), ("uid_map", uid_map), ("gid_map", gid_map)):
        with open(f"/proc/self/{name}", "w", encoding="ascii") as handle:
            handle.write(text)


def open_source(path: str, where: str) -> int:
    """``path`` on the host as an O_PATH descriptor, bound later by descriptor."""
    try:
        return os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as err:
        raise user_error(where, f"source unusable ({reason(err)})", path) from None


def cover_work() -> None:
    _mount("shifter", WORK, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700")
    for name in ("image", "upper", "work", "root"):
        os.mkdir(f"{WORK}/{name}", 0o700)


def serve_image(image_fd: int) -> int:
    """The image's squashfs at WORK/image; returns squashfuse's pid.

    The FUSE mount is made here, by this process (capable in its user namespace),
    and squashfuse serves the open /dev/fuse as ``/dev/fd/N`` (libfuse's protocol
    for a caller that mounted): an exec'd squashfuse has no capability left (its uid
    is not 0 here) and could not mount by itself.
    """
    image = f"{WORK}/image"
    fuse = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        _mount("squashfuse", image, "fuse.squashfuse", MS_NOSUID | MS_NODEV | MS_RDONLY,
               f"fd={fuse},rootmode=40000,user_id=0,group_id=0")  # fmt: skip
        pid = os.fork()
        if pid == 0:
            try:
                _die_with_parent()
                for fd in (image_fd, fuse):
                    os.set_inheritable(fd, True)
                null = os.open("/dev/null", os.O_RDWR)
                os.dup2(null, 0)
                os.dup2(null, 1)
                argv = [SQUASHFUSE, "-f", f"/dev/fd/{image_fd}", f"/dev/fd/{fuse}"]
                os.execv(SQUASHFUSE, argv)  # noqa: S606 - argv is ours
            finally:
                os._exit(127)
    finally:
        os.close(fuse)
    _wait_served(image, pid)
    return pid


def _wait_served(image: str, pid: int) -> None:
    """Until squashfuse answers on the mount (a listing of its root returns)."""
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            raise ShifterError("--image", "squashfuse could not serve the image",
                               f"exit {os.waitstatus_to_exitcode(status)}")  # fmt: skip
        try:
            if os.listdir(image):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop(pid)
            raise ShifterError("--image", f"squashfuse did not serve the image within "
                               f"{MOUNT_TIMEOUT:g} s", SQUASHFUSE)  # fmt: skip
        time.sleep(0.0005)


def warm(command: str, search: str) -> LockType:
    """Read CMD's file once, in a thread, while the root is being built; join with
    ``warmed``. Its first exec through FUSE would fault its pages in one by one (12 ms
    for busybox, more than half of a bare start); read ahead by squashfuse on the
    other core while we work, the exec finds them cached."""
    import _thread

    done = _thread.allocate_lock()
    done.acquire()

    def read() -> None:
        try:
            _read_command(command, search)
        except OSError:
            pass  # a command not found, or unreadable: its exec says so
        finally:
            done.release()

    _thread.start_new_thread(read, ())
    return done


def warmed(lock: LockType) -> None:
    lock.acquire()


def _read_command(command: str, search: str) -> None:
    if command.startswith("/"):
        candidates = [command]
    elif "/" in command:
        return  # relative to the working directory: not worth guessing
    else:
        candidates = [f"{d}/{command}" for d in search.split(":") if d.startswith("/")]
    with Root.at(f"{WORK}/image") as image:
        for path in candidates:
            try:
                fd = image.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    left = WARM_BYTES
                    while left > 0 and (got := len(os.read(fd, min(left, 1 << 20)))):
                        left -= got
            finally:
                os.close(fd)
            return


def _die_with_parent() -> None:
    _libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the parent went before prctl took hold
        os._exit(1)


def stop(pid: int) -> None:
    try:
        os.kill(pid, SIGTERM)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


# --- the root ----------------------------------------------------------------------------


def overlay() -> Root:
    """The container's writable root over the image; every lookup in it stays in it.

    ``userxattr``: the overlay keeps its marks (a directory made where the image had a
    file or link is "opaque") in user.* attributes, which our namespace may set;
    trusted.* ones it may not, and such a mkdir would fail with EIO."""
    root = f"{WORK}/root"
    layers = f"lowerdir={WORK}/image,upperdir={WORK}/upper,workdir={WORK}/work"
    _mount("overlay", root, "overlay", MS_NOSUID | MS_NODEV, f"{layers},userxattr")
    return Root.at(root)


def mount_system(inside: Root, devices: list[tuple[int, str]]) -> None:
    """/proc and /sys of the host; a /dev of the container's own with ``devices``
    (O_PATH descriptors of host nodes, and their paths under /dev), the usual links,
    the host's /dev/pts and a /dev/shm."""
    for system in ("/proc", "/sys"):
        fd = os.open(system, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            bind(fd, inside, system, read_only=False, where="rootfs")
        finally:
            os.close(fd)
    with Fd(directory(inside, "/dev")) as point:
        _mount("shifter-dev", _fd_path(point.fd), "tmpfs", MS_NOSUID | MS_NOEXEC,
               "mode=0755,size=512k")  # fmt: skip
    for source, path in devices:
        with Fd(_point(inside, f"/dev/{path}", is_dir=False)) as target:
            _mount(_fd_path(source), _fd_path(target.fd), None, MS_BIND)
    with Fd(directory(inside, "/dev")) as dev:
        for name, points_to in devfs.LINKS.items():
            if name != "ptmx":  # the host's node, bound: its devpts is the host's
                os.symlink(points_to, name, dir_fd=dev.fd)
    pts = os.open("/dev/pts", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    with Fd(pts):
        bind(pts, inside, "/dev/pts", read_only=False, where="rootfs")
    with Fd(directory(inside, "/dev/shm")) as shm:
        _mount("shm", _fd_path(shm.fd), "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")


def directory(inside: Root, path: str) -> int:
    """``path`` in the container as an O_PATH descriptor, made where missing."""
    path = os.path.normpath(path)
    try:
        return inside.open(path, os.O_PATH | os.O_DIRECTORY)
    except FileNotFoundError:
        if path == "/":
            raise
    os.close(_make(inside, path, is_dir=True))
    return inside.open(path, os.O_PATH | os.O_DIRECTORY)


def _point(inside: Root, path: str, is_dir: bool) -> int:
    """A mount point at ``path`` (found, or made empty), as an O_PATH descriptor."""
    try:
        return inside.open(path, os.O_PATH | (os.O_DIRECTORY if is_dir else 0))
    except FileNotFoundError:
        return _make(inside, path, is_dir)


def _make(inside: Root, path: str, is_dir: bool) -> int:
    with Fd(directory(inside, os.path.dirname(path))) as folder:
        parent, name = folder.fd, os.path.basename(path)
        for _attempt in range(2):
            try:
                if is_dir:
                    os.mkdir(name, 0o755, dir_fd=parent)
                else:
                    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                    os.close(os.open(name, flags, 0o644, dir_fd=parent))
                break
            except FileExistsError:  # a dangling symlink of the image's: ours to replace
                os.unlink(name, dir_fd=parent)
    return inside.open(path, os.O_PATH)


def bind(source: int, inside: Root, dest: str, read_only: bool, where: str = "--volume") -> None:
    """The host entry held by ``source`` bound at ``dest`` in the container."""
    is_dir = stat.S_ISDIR(os.fstat(source).st_mode)
    try:
        with Fd(_point(inside, dest, is_dir)) as target:
            _mount(_fd_path(source), _fd_path(target.fd), None, MS_BIND | MS_REC)
        if read_only:  # on the new mount (reached through it); the host's locked flags stay
            with Fd(inside.open(dest, os.O_PATH)) as top:
                flags = MS_REMOUNT | MS_BIND | MS_RDONLY | _locked_flags(top.fd)
                _mount("none", _fd_path(top.fd), None, flags)
    except OSError as err:
        raise user_error(where, f"cannot bind the source ({reason(err)})",
                         os.readlink(_fd_path(source))) from None  # fmt: skip


def _locked_flags(fd: int) -> int:
    got = os.fstatvfs(fd).f_flag
    return (
        (MS_NOSUID if got & os.ST_NOSUID else 0)
        | (MS_NODEV if got & os.ST_NODEV else 0)
        | (MS_NOEXEC if got & os.ST_NOEXEC else 0)
    )


def write_files(inside: Root, folder: str, files: dict[str, bytes]) -> None:
    """Files of ours in ``folder``, replacing what the image has there."""
    with Fd(directory(inside, folder)) as opened:
        parent = opened.fd
        for name, data in files.items():
            try:
                os.unlink(name, dir_fd=parent)
            except FileNotFoundError:
                pass
            except IsADirectoryError:
                raise user_error("image", "a directory stands where a file goes",
                                 f"{folder}/{name}") from None  # fmt: skip
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with open(os.open(name, flags, 0o644, dir_fd=parent), "wb") as handle:
                handle.write(data)


def link(inside: Root, path: str, target: str) -> None:
    """``path`` -> ``target``, replacing a symlink there; a file there is left alone."""
    with Fd(directory(inside, os.path.dirname(path))) as folder:
        parent, name = folder.fd, os.path.basename(path)
        try:
            if not stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                return
            os.unlink(name, dir_fd=parent)
        except FileNotFoundError:
            pass
        os.symlink(target, name, dir_fd=parent)


# --- the command -------------------------------------------------------------------------


def run_inside(argv: list[str], env: dict[str, str], cwd: str, ids: tuple[int, int]) -> int:
    """CMD, chrooted, as the caller again: a nested user namespace maps their uid
    onto ours (0 here, which is theirs outside), then the uid is dropped to theirs."""
    uid, gid = ids
    pid = os.fork()
    if pid == 0:
        code = 127
        try:
            _die_with_parent()
            if _libc.unshare(CLONE_NEWUSER) != 0:
                raise OSError(ctypes.get_errno(), "unshare")
            _map_self(f"{uid} 0 1", f"{gid} 0 1")
            os.chroot(f"{WORK}/root")
            for where in (cwd, env.get("HOME", "/"), "/"):
                try:
                    os.chdir(where)
                    break
                except OSError:
                    continue
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)  # every capability goes with uid 0
            os.execvpe(argv[0], argv, env)  # noqa: S606 - the caller's own command, as the caller
        except FileNotFoundError:
            os.write(2, f"shifter: {argv[0]}: command not found in image\n".encode())
        except OSError as err:
            os.write(2, f"shifter: {argv[0]}: {err.strerror}\n".encode())
            code = 126
        finally:
            os._exit(code)
    return _wait(pid)


def _wait(pid: int) -> int:
    import signal  # after the fork: while CMD's exec runs on the other core

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    for signum in (signal.SIGINT, signal.SIGQUIT):  # the terminal sends them to CMD too
        signal.signal(signum, signal.SIG_IGN)
    while True:
        try:
            _done, status = os.waitpid(pid, 0)
        except InterruptedError:
            continue
        code = os.waitstatus_to_exitcode(status)
        return code if code >= 0 else 128 - code  # killed by a signal: as a shell says it
