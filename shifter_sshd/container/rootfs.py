"""The container root: a tmpfs with the image bound in, writable /etc and /var, /dev.

Layout for job J::

    loopMount/J            tmpfs (scratch, 0700): never visible inside the container
    loopMount/J/image      the image's squashfs, loop-mounted ro,nosuid,nodev
    loopMount/J/{etc,var}.{upper,work}   the writable layers of /etc and /var
    udiMount/J             tmpfs: the container's /, 0750 root plus an ACL entry for
                           the job user: nobody else reaches anything below it
      /usr /home ...       the image's top-level directories, bound ro,nosuid,nodev
      /etc /var            overlays: the image's, plus what the prolog writes
      /opt/udiImage        optUdiImage, read-only
      /proc /sys /dev      proc, /sys (recursive, read-only), /dev with its own devpts
      /tmp /dev/shm /run   tmpfs (/run as in any container: the image's is not used)

Every mount is made detached with its flags and attached on a directory descriptor
(``privileged``); the descriptors of the mounts later steps write into are kept in
``Tree``. Only two mounts are attached in root-owned host directories (the root
and scratch tmpfs); everything else hangs below them, so teardown detaches two
trees.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from ..config.udiroot import Config
from ..errors import node_error, user_error
from ..kernel import privileged as priv
from ..kernel import syscalls as sc
from ..kernel.fds import Fd
from ..kernel.rootpath import Root
from . import devfs

# Top-level names the prolog provides itself instead of binding the image's.
PROVIDED = frozenset({"etc", "var", "tmp", "run", "proc", "sys", "dev", "opt"})
TTY_GID = 5
RO = sc.MOUNT_ATTR_RDONLY | priv.NOSUID_NODEV
SCRATCH_DIRS = ("image", "etc.upper", "etc.work", "var.upper", "var.work", "empty")


@dataclass
class Tree:
    """Descriptors of one job's mounts, for the steps that mount or write into them."""

    root: int = -1  # the container's / (mount descriptor)
    scratch: int = -1
    image: int = -1  # the squashfs
    etc: int = -1  # the /etc and /var overlays
    var: int = -1
    dev: int = -1
    udi: int = -1  # /opt/udiImage
    ssh: int = -1  # /var/shifter/ssh, the user's: sshd's log is read through it
    root_id: int = 0
    image_mounts: set[int] = field(default_factory=set)  # immutable: squashfs binds
    volume_mounts: set[int] = field(default_factory=set)  # the user's --volume binds
    # Our own writable mounts, private to the container (root and /run tmpfs, the
    # /etc and /var overlays): where a site's mount point may be created.
    writable: set[int] = field(default_factory=set)
    mounts: int = 0  # how many the tree holds, for the log

    def close(self) -> None:
        for name in ("root", "scratch", "image", "etc", "var", "dev", "udi", "ssh"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def container(self) -> Root:
        """The container root for in-root lookups."""
        return Root(self.root)


def job_dir(area_fd: int, job_id: str) -> int:
    """The job's directory in an area, root-owned 0700 (a mount covers it)."""
    try:
        return priv.make_dir(area_fd, job_id, 0o700)
    except OSError as err:
        raise node_error("rootfs", f"job directory unusable ({err.strerror})", job_id) from None


def _tmpfs(mode: str, attrs: int = priv.NOSUID_NODEV, size: str = "") -> int:
    options = {"source": "shifter-sshd", "mode": mode, **({"size": size} if size else {})}
    return priv.new_mount("tmpfs", options, attrs)


def mount_scratch(tree: Tree, target_fd: int) -> int:
    """The scratch tmpfs (0700: root only); returns its mount id."""
    with Fd(_tmpfs("0700")) as mount:
        mount_id = priv.attach(mount.fd, target_fd)
        tree.scratch = mount.take()
    for name in SCRATCH_DIRS:
        os.close(priv.make_dir(tree.scratch, name))
    tree.mounts += 1
    return mount_id


def mount_root(tree: Tree, config: Config, target_fd: int, uid: int) -> int:
    """The container's / : 0750 root plus ``user:<uid>:r-x``, set before it is attached."""
    fstype = config.rootfs_type
    options = {"source": "shifter-sshd", "mode": "0750"}
    with Fd(priv.new_mount(fstype, options, priv.NOSUID_NODEV)) as mount:
        try:
            priv.grant_traverse(mount.fd, uid)
        except OSError as err:
            raise node_error("rootfs", f"cannot set the root's ACL ({err.strerror}; {fstype} "
                             "needs POSIX ACL support)", config.udi_mount) from None  # fmt: skip
        tree.root_id = priv.attach(mount.fd, target_fd)
        tree.writable.add(tree.root_id)
        tree.root = mount.take()
    tree.mounts += 1
    return tree.root_id


def mount_image(tree: Tree, image_file: str) -> str:
    """Loop-mount the squashfs at scratch/image; returns the loop device."""
    try:
        backing = os.open(image_file, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as err:
        raise node_error("image mount", f"cannot open ({err.strerror})", image_file) from None
    try:
        device, device_fd = priv.attach_loop(backing, image_file)
    except OSError as err:
        raise node_error("image mount", f"cannot attach a loop device ({err.strerror})",
                         image_file) from None  # fmt: skip
    finally:
        os.close(backing)
    try:
        options = {"source": device}  # /dev is root's: the name cannot be redirected
        mount = Fd(priv.new_mount("squashfs", options, RO))
    except OSError as err:  # the store's file is not a squashfs the kernel accepts
        raise user_error("image mount", f"image cannot be mounted ({err.strerror})",
                         image_file) from None  # fmt: skip
    finally:
        os.close(device_fd)  # the mount holds the device now; autoclear frees it with it
    with mount, Fd(priv.open_entry(tree.scratch, "image")) as target:
        priv.attach(mount.fd, target.fd)
        tree.image = mount.take()
    tree.mounts += 1
    return device


def bind_image_tree(tree: Tree, limit: int) -> None:
    """Bind the image's top-level directories; copy its top-level symlinks (merged /usr)."""
    with Fd(priv.reopen_dir(tree.image)) as image:
        opt, opt_names = _image_opt(tree)
        with Fd(opt):  # -1 (no /opt) is nothing to close
            names = [name for name in os.listdir(image.fd) if name not in PROVIDED]
            if len(names) + len(opt_names) > limit:
                raise user_error("image", f"more than {limit} top-level directories to bind "
                                 "(maxImageMounts)", len(names) + len(opt_names))  # fmt: skip
            for name in names:
                _place(tree, image.fd, name, tree.root)
            if opt >= 0:
                target = priv.make_dir(tree.root, "opt")
                try:
                    for name in opt_names:
                        _place(tree, opt, name, target)
                finally:
                    os.close(target)


def _image_opt(tree: Tree) -> tuple[int, list[str]]:
    """The image's /opt (resolved inside the image) and its entries but udiImage."""
    try:
        with Root(tree.image) as image:
            opt = Fd(image.open("opt", os.O_RDONLY | os.O_DIRECTORY))
    except OSError:
        return -1, []
    with opt:
        names = [name for name in os.listdir(opt.fd) if name != "udiImage"]
        return opt.take(), names


def _place(tree: Tree, parent: int, name: str, target_parent: int) -> None:
    try:
        info = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if stat.S_ISLNK(info.st_mode):
            priv.symlink(target_parent, name, os.readlink(name, dir_fd=parent))
        elif stat.S_ISDIR(info.st_mode):
            source = priv.open_entry(parent, name)
            try:
                mount = Fd(priv.clone(source, RO, recursive=False))
            finally:
                os.close(source)
            with mount, Fd(priv.make_dir(target_parent, name)) as target:
                tree.image_mounts.add(priv.attach(mount.fd, target.fd))
                tree.mounts += 1
    except OSError as err:
        raise user_error("image", f"cannot place a top-level entry ({err.strerror})",
                         name) from None  # fmt: skip


def mount_overlays(tree: Tree) -> None:
    """/etc and /var: the image's, writable, with the changes kept in scratch."""
    for name in ("etc", "var"):
        layers = {"lowerdir": _image_dir_or_empty(tree, name)}
        try:
            for part in ("upper", "work"):
                layers[f"{part}dir"] = priv.open_entry(tree.scratch, f"{name}.{part}")
            options = {"source": f"shifter-{name}"} | {k: sc.fd_path(v) for k, v in layers.items()}
            try:
                mount = Fd(priv.new_mount("overlay", options, priv.NOSUID_NODEV))
            except OSError as err:
                raise user_error("image", f"cannot overlay the image's /{name} "
                                 f"({err.strerror})", name) from None  # fmt: skip
            with mount, Fd(priv.make_dir(tree.root, name)) as target:
                tree.writable.add(priv.attach(mount.fd, target.fd))
                setattr(tree, name, mount.take())
        finally:
            for fd in layers.values():
                os.close(fd)
        tree.mounts += 1


def _image_dir_or_empty(tree: Tree, name: str) -> int:
    """The image's /etc or /var (resolved inside the image), else scratch/empty."""
    try:
        with Root(tree.image) as image:
            return image.open(name, os.O_PATH | os.O_DIRECTORY)
    except OSError:
        from .. import log

        log.info(f"rootfs: image has no usable /{name}; starting from an empty one")
        return priv.open_entry(tree.scratch, "empty")


def mount_system(tree: Tree, devices: list[devfs.Node], modes: dict[str, int]) -> None:
    """proc, sys, a /dev of the container's own (``devfs``) with a new devpts instance,
    /dev/shm, /tmp and /run."""
    no_exec = priv.NOSUID_NODEV | sc.MOUNT_ATTR_NOEXEC
    _attach_new(tree, tree.root, "proc", priv.new_mount("proc", {"source": "proc"}, no_exec))
    _attach_new(tree, tree.root, "sys", _clone_host("/sys", RO | sc.MOUNT_ATTR_NOEXEC, True))
    try:
        tree.dev = devfs.make(devices, modes)
    except OSError as err:
        raise node_error("rootfs", f"cannot make the container's /dev ({err.strerror})",
                         err.filename or "/dev") from None  # fmt: skip
    _attach_new(tree, tree.root, "dev", tree.dev, keep=True)
    # A private devpts: the container's ptys are not the host's, and a non-root sshd
    # can chown its pty to (uid, tty) only if the instance's gid is the tty group.
    options = {"source": "devpts", "gid": str(TTY_GID), "mode": "620", "ptmxmode": "0666"}
    devpts = priv.new_mount("devpts", options, sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NOEXEC)
    _attach_existing(tree, tree.dev, "pts", devpts)
    _attach_existing(tree, tree.dev, "shm", _tmpfs("1777"))
    _attach_new(tree, tree.root, "tmp", _tmpfs("1777"))
    tree.writable.add(_attach_new(tree, tree.root, "run", _tmpfs("0755")))


def _clone_host(path: str, attrs: int, recursive: bool) -> int:
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return priv.clone(fd, attrs, recursive)
    finally:
        os.close(fd)


def _attach_new(tree: Tree, parent: int, name: str, mount: int, keep: bool = False) -> int:
    """Attach ``mount`` on a directory made (or found) in ``parent``; closes it unless
    ``keep`` (then it is the tree's)."""
    with Fd(-1 if keep else mount):
        return _attach(tree, priv.make_dir(parent, name), mount)


def _attach_existing(tree: Tree, parent: int, name: str, mount: int, keep: bool = False) -> int:
    """Attach ``mount`` on an entry that must already exist in ``parent`` (host /dev)."""
    with Fd(-1 if keep else mount):
        try:
            target = priv.open_entry(parent, name)
        except OSError as err:
            raise node_error("rootfs", f"/dev/{name} unusable ({err.strerror})", name) from None
        return _attach(tree, target, mount)


def _attach(tree: Tree, target: int, mount: int) -> int:
    """Attach ``mount`` on ``target``, which is closed; ``mount`` stays the caller's."""
    with Fd(target):
        mount_id = priv.attach(mount, target)
    tree.mounts += 1
    return mount_id


def mount_udiimage(tree: Tree, config: Config) -> str:
    """optUdiImage read-only at /opt/udiImage; the version directory bound ('' if none)."""
    try:
        source = os.open(config.opt_udi_image, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        if config.enable_sshd:
            raise node_error("udiImage", "optUdiImage missing (run shifter-sshd udiimage build)",
                             config.opt_udi_image) from None  # fmt: skip
        return ""
    try:
        version = os.readlink(sc.fd_path(source))
        mount = priv.clone(source, RO, recursive=False)
    finally:
        os.close(source)
    tree.udi = mount  # the tree's from here: Tree.close closes it
    opt = priv.make_dir(tree.root, "opt")
    try:
        _attach_new(tree, opt, "udiImage", mount, keep=True)
    finally:
        os.close(opt)
    return version


def finish(tree: Tree, config: Config) -> None:
    if not config.mount_udi_root_writable:
        priv.set_read_only(tree.root)
