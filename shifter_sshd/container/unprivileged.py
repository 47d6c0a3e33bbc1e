"""``shifter --image=NAME CMD`` with no job and no root: a container the user builds.

Login nodes and shared jobs have no prolog-built container. Here the caller makes one
in namespaces of their own, with no setuid helper and no privilege beyond what any
user has in a user namespace they create:

1. Everything named from the host is opened first (the image's squashfs from the
   site's store, the volume sources as the caller, so a source they cannot read is
   refused with the prolog's words), and every request is checked by the same rules
   as a job's (``volumes.parse_volumes``).
2. A user namespace in which the caller is uid 0 (their own uid outside, nothing
   else mapped), and a mount namespace: nothing mounted here is ever visible
   outside, and it all goes with the last process in it. The image's files, owned by
   0 in the squashfs, are the caller's here: the overlay can write them.
3. A tmpfs over ``/tmp`` (in that namespace only) holds the image, mounted by
   ``squashfuse -f`` from the open squashfs, an overlay with a tmpfs upper layer over
   it (the container's writable root), and nothing else: no directory is made on
   the host.
4. /dev, /proc and /sys of the host, the home directory, siteFs and the volumes are
   bound in; /etc/passwd and /etc/group get the same entries as in a job
   (``etc.files``); the environment follows the job's rules
   (``environment.container_env``).
5. A child enters a nested user namespace where the caller's uid is theirs again,
   chroots, drops to that uid (and with it every capability) and execs CMD. Both
   children (squashfuse and CMD) get SIGKILL when ``shifter`` dies
   (PR_SET_PDEATHSIG): killing ``shifter`` leaves no process, mount or file.
"""

from __future__ import annotations

import ctypes
import os
import stat
import time

from ..config.udiroot import Config
from ..errors import ShifterError, reason, user_error

SQUASHFUSE = "/usr/bin/squashfuse"
WORK = "/tmp"  # covered by our tmpfs, in our mount namespace only
MOUNT_TIMEOUT = 10.0  # seconds for squashfuse to mount the image
CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 32, 4096, 16384
MS_NOEXEC, MS_PRIVATE = 8, 1 << 18
PR_SET_PDEATHSIG, SIGKILL, SIGTERM = 1, 9, 15

_libc = ctypes.CDLL(None, use_errno=True)


def _call(result: int, what: str, value: object) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}", value)


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _call(_libc.mount(source.encode(), target.encode(), fstype and fstype.encode(),
                      flags, data.encode() or None), "mount", target)  # fmt: skip


class Request:
    """What the caller asked for, checked and opened before any namespace exists."""

    def __init__(self, config: Config, image: str, volume_text: str, argv: list[str]) -> None:
        from .. import users
        from ..image import store
        from . import volumes

        self.config = config
        self.record = store.Store.from_config(config).lookup(image)
        self.volumes = volumes.parse_volumes(volume_text, config.max_volumes)
        self.user = users.lookup(os.getuid(), None, config.max_group_count)
        self.argv = argv
        for volume in self.volumes:
            _readable(volume.source)
        try:
            self.image_fd = os.open(self.record.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise user_error("image", f"cannot read the image ({reason(err)})",
                             self.record.path) from None  # fmt: skip


def _readable(source: str) -> None:
    """The caller may read (and search) the source: the prolog's rule, in the words
    of its child that opens sources as the user."""
    try:
        info = os.stat(source)
    except OSError as err:
        raise user_error("--volume", f"source unusable ({reason(err)})", source) from None
    want = os.R_OK | (os.X_OK if stat.S_ISDIR(info.st_mode) else 0)
    if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
        raise user_error("--volume", "source is neither a directory nor a regular file", source)
    if not os.access(source, want):
        raise user_error("--volume", "source not readable by you", source)


def run(request: Request, environ: dict[str, str]) -> int:
    """Build the container and run the command in it; returns its exit status."""
    uid, gid = os.getuid(), os.getgid()
    _own_namespaces(uid, gid)
    binds = _open_binds(request)  # before our tmpfs covers /tmp, where sources may be
    _cover_work()
    squashfuse = _mount_image(request.image_fd)
    try:
        root = _build_root(request, binds)
        env = _environment(request, environ)
        argv = request.argv or _default(request)
        return _run_inside(root, argv, env, _workdir(request), (uid, gid))
    finally:
        _stop(squashfuse)


def _own_namespaces(uid: int, gid: int) -> None:
    if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
        code = ctypes.get_errno()
        raise ShifterError("--image", "cannot make a user namespace here "
                           f"({os.strerror(code)}): unprivileged user namespaces are off?",
                           "shifter --image outside a job")  # fmt: skip
    _map_self(f"0 {uid} 1", f"0 {gid} 1")
    _mount("none", "/", None, MS_REC | MS_PRIVATE)  # nothing of ours goes back


def _open_binds(request: Request) -> list[tuple[int, str, str, bool]]:
    """(O_PATH descriptor, source, destination, read-only) of the home directory, siteFs and
    the volumes: opened once, bound by descriptor (``/proc/self/fd/N``)."""
    wanted = [(m.source, m.dest, m.read_only) for m in request.config.site_fs]
    home = request.user.home
    if home.startswith("/") and os.path.isdir(home):
        wanted.insert(0, (home, home, False))
    wanted += [(v.source, v.dest, v.read_only) for v in request.volumes]
    binds = []
    for source, dest, read_only in wanted:
        try:
            fd = os.open(source, os.O_PATH | os.O_CLOEXEC)
        except OSError as err:
            raise user_error("--volume", f"source unusable ({reason(err)})", source) from None
        binds.append((fd, source, dest, read_only))
    return binds


def _cover_work() -> None:
    _mount("shifter", WORK, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700")
    for name in ("image", "upper", "work", "root"):
        os.mkdir(f"{WORK}/{name}", 0o700)


def _map_self(uid_map: str, gid_map: str) -> None:
    """Our own one-line maps, groups denied: what any user may write for themselves."""
    for name, text in (("setgroups", "deny"), ("uid_map", uid_map), ("gid_map", gid_map)):
        with open(f"/proc/self/{name}", "w", encoding="ascii") as handle:
            handle.write(text)


def _mount_image(image_fd: int) -> int:
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
    """Until squashfuse answers on the mount (a stat of its root returns)."""
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
            _stop(pid)
            raise ShifterError("--image", f"squashfuse did not serve the image within "
                               f"{MOUNT_TIMEOUT:g} s", SQUASHFUSE)  # fmt: skip
        time.sleep(0.0005)


def _die_with_parent() -> None:
    _libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the parent went before prctl took hold
        os._exit(1)


def _stop(pid: int) -> None:
    try:
        os.kill(pid, SIGTERM)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _build_root(request: Request, binds: list[tuple[int, str, str, bool]]) -> str:
    root = f"{WORK}/root"
    _mount("overlay", root, "overlay", MS_NOSUID | MS_NODEV,
           f"lowerdir={WORK}/image,upperdir={WORK}/upper,workdir={WORK}/work")  # fmt: skip
    for system in ("/dev", "/proc", "/sys"):
        _bind(system, root + system, read_only=False)
    for fd, source, dest, read_only in binds:
        try:
            _bind(f"/proc/self/fd/{fd}", root + dest, read_only, label=source)
        finally:
            os.close(fd)
    _write_etc(request, root)
    return root


def _bind(source: str, target: str, read_only: bool, label: str = "") -> None:
    """``source`` bound at ``target`` (made in the writable root when missing)."""
    if not os.path.lexists(target):
        if os.path.isdir(source):
            os.makedirs(target, 0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
    try:
        _mount(source, target, None, MS_BIND | MS_REC)
        if read_only:  # the flags the host's mount had must stay (the kernel locks them)
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY | _locked_flags(target)
            _mount("none", target, None, flags)
    except OSError as err:
        why = f"cannot bind the source ({reason(err)})"
        raise user_error("--volume", why, label or source) from None


def _locked_flags(path: str) -> int:
    got = os.statvfs(path).f_flag
    return (
        (MS_NOSUID if got & os.ST_NOSUID else 0)
        | (MS_NODEV if got & os.ST_NODEV else 0)
        | (MS_NOEXEC if got & os.ST_NOEXEC else 0)
    )


def _write_etc(request: Request, root: str) -> None:
    from ..kernel.rootpath import Root
    from . import etc

    with Root.at(root) as image:
        shell = request.user.shell if image.is_file(request.user.shell) else "/bin/sh"
        texts = etc.files(request.config, request.user, shell, image)
    os.makedirs(f"{root}/etc", 0o755, exist_ok=True)
    for name, text in texts.items():
        path = f"{root}/etc/{name}"
        if os.path.islink(path) or os.path.isfile(path):
            os.unlink(path)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)


def _environment(request: Request, environ: dict[str, str]) -> dict[str, str]:
    from . import environment

    env = environment.container_env(request.config, request.record.metadata.env)
    for name in ("TERM", "LANG", "HOME", "USER", "LOGNAME"):
        if name in environ:
            env[name] = environ[name]
    return env


def _default(request: Request) -> list[str]:
    meta = request.record.metadata
    if meta.command:
        return list(meta.command)
    if meta.entrypoint:
        return ["/bin/sh", "-c", meta.entrypoint]
    raise ShifterError("usage", "no command given, and the image has none", request.record.id)


def _workdir(request: Request) -> str:
    cwd = os.environ.get("PWD") or ""
    return cwd if cwd.startswith("/") else request.record.metadata.workdir or "/"


def _run_inside(root: str, argv: list[str], env: dict[str, str], cwd: str,
                ids: tuple[int, int]) -> int:  # fmt: skip
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
            os.chroot(root)
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
    import signal

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
