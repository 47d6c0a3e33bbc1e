"""The container root: a tmpfs with the image bound in, writable /etc and /var, /dev.

Layout for job J (FINDINGS, "Container root and devpts"):

    loopMount/J            tmpfs (scratch): never visible inside the container
    loopMount/J/image      the image's squashfs, loop-mounted ro,nosuid,nodev
    loopMount/J/{etc,var}.{upper,work}   the writable layers of /etc and /var
    udiMount/J             tmpfs: the container's /
      /usr /home ...       the image's top-level directories, bound ro,nosuid,nodev
      /etc /var            overlays: the image's, plus what the prolog writes
      /opt/udiImage        optUdiImage, read-only
      /proc /sys /dev      proc, /sys (rbind, slave), /dev with a new devpts instance
      /tmp /dev/shm        tmpfs
"""

from __future__ import annotations

import os
import stat

from . import log
from . import syscalls as sc
from .config import Config
from .errors import node_error
from .mounts import NOSUID_NODEV, Mounter
from .rootpath import Root

# Top-level names the prolog provides itself instead of binding the image's.
PROVIDED = frozenset({"etc", "var", "tmp", "proc", "sys", "dev", "opt"})
TTY_GID = 5


def job_dirs(config: Config, job_id: str) -> tuple[str, str]:
    """(container root, scratch) for a job."""
    return os.path.join(config.udi_mount, job_id), os.path.join(config.loop_mount, job_id)


def make_mount_points(root: str, scratch: str) -> None:
    for path in (root, scratch):
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            if os.path.islink(path) or not os.path.isdir(path):
                raise node_error("rootfs", "mount point is not a directory", path) from None


def mount_scratch(m: Mounter, scratch: str) -> None:
    m.fs("tmpfs", "shifter-scratch", scratch, NOSUID_NODEV, "mode=0700")
    for sub in ("image", "etc.upper", "etc.work", "var.upper", "var.work", "empty"):
        os.mkdir(os.path.join(scratch, sub), 0o755)


def mount_root(m: Mounter, config: Config, root: str) -> None:
    m.fs(config.rootfs_type, "shifter-root", root, NOSUID_NODEV, "mode=0755")


def mount_image(m: Mounter, image_file: str, scratch: str) -> str:
    """Loop-mount the squashfs; returns where the image's / now is."""
    target = os.path.join(scratch, "image")
    try:
        device, device_fd = sc.attach_loop(image_file)
    except OSError as err:
        what = f"cannot attach a loop device ({err.strerror})"
        raise node_error("image mount", what, image_file) from None
    m.state.loop_device = device
    try:
        m.fs("squashfs", device, target, sc.MS_RDONLY | NOSUID_NODEV)
    finally:
        os.close(device_fd)  # the mount holds the device now; autoclear frees it with it
    return target


def bind_image_tree(m: Mounter, image_dir: str, root: str) -> None:
    """Bind the image's top-level directories; copy its top-level symlinks (merged /usr)."""
    for entry in os.scandir(image_dir):
        if entry.name in PROVIDED:
            continue
        _place(m, entry, root)
    with Root(image_dir) as image:
        if image.exists("/opt"):
            os.mkdir(os.path.join(root, "opt"), 0o755)
            for entry in os.scandir(image.real("/opt")):
                if entry.name != "udiImage":
                    _place(m, entry, os.path.join(root, "opt"))


def _place(m: Mounter, entry: os.DirEntry[str], parent: str) -> None:
    target = os.path.join(parent, entry.name)
    if entry.is_symlink():
        os.symlink(os.readlink(entry.path), target)
    elif entry.is_dir(follow_symlinks=False):
        os.mkdir(target, 0o755)
        m.bind(entry.path, target, read_only=True, kind="image")
    else:
        log.debug(f"rootfs: skipping image top-level entry that is not a directory: {entry.name}")


def mount_overlays(m: Mounter, image_dir: str, scratch: str, root: str) -> None:
    """/etc and /var: the image's, writable, with the changes kept in scratch."""
    with Root(image_dir) as image:
        for name in ("etc", "var"):
            lower = _image_dir_or_empty(image, name, scratch)
            target = os.path.join(root, name)
            os.mkdir(target, 0o755)
            upper, work = (os.path.join(scratch, f"{name}.{part}") for part in ("upper", "work"))
            options = f"lowerdir={lower},upperdir={upper},workdir={work}"
            m.fs("overlay", f"shifter-{name}", target, NOSUID_NODEV, options)


def _image_dir_or_empty(image: Root, name: str, scratch: str) -> str:
    try:
        real = image.real(name)
    except OSError:
        real = ""
    if real and stat.S_ISDIR(os.stat(real).st_mode) and "," not in real and ":" not in real:
        return real
    log.info(f"rootfs: image has no usable /{name}; starting from an empty one")
    return os.path.join(scratch, "empty")


def mount_system(m: Mounter, root: str) -> None:
    """proc, sys, dev with a new devpts instance, /dev/shm and /tmp."""
    for name in ("proc", "sys", "dev", "tmp"):
        os.mkdir(os.path.join(root, name), 0o755)
    m.fs("proc", "proc", f"{root}/proc", NOSUID_NODEV | sc.MS_NOEXEC)
    m.bind("/sys", f"{root}/sys", read_only=True, flags=NOSUID_NODEV | sc.MS_NOEXEC,
           recursive=True, kind="sys")  # fmt: skip
    m.bind("/dev", f"{root}/dev", read_only=False, flags=sc.MS_NOSUID, kind="dev")
    # A private devpts: the container's ptys are not the host's, and a non-root sshd
    # can chown its pty to (uid, tty) only if the instance's gid is the tty group.
    m.fs("devpts", "devpts", f"{root}/dev/pts", sc.MS_NOSUID | sc.MS_NOEXEC,
         f"newinstance,gid={TTY_GID},mode=620,ptmxmode=0666")  # fmt: skip
    m.bind(f"{root}/dev/pts/ptmx", f"{root}/dev/ptmx", read_only=False, flags=sc.MS_NOSUID,
           kind="ptmx")  # fmt: skip
    m.fs("tmpfs", "shm", f"{root}/dev/shm", NOSUID_NODEV, "mode=1777")
    m.fs("tmpfs", "tmp", f"{root}/tmp", NOSUID_NODEV, "mode=1777")


def mount_udiimage(m: Mounter, config: Config, root: str) -> bool:
    """optUdiImage read-only at /opt/udiImage; False when the site has none."""
    if not os.path.isdir(config.opt_udi_image):
        if config.enable_sshd:
            raise node_error("udiImage", "optUdiImage missing (run shifter-sshd udiimage build)",
                             config.opt_udi_image)  # fmt: skip
        log.debug("rootfs: no optUdiImage; /opt/udiImage stays empty")
        return False
    target = os.path.join(root, "opt", "udiImage")
    os.makedirs(target, mode=0o755, exist_ok=True)
    m.bind(config.opt_udi_image, target, read_only=True, kind="udiImage")
    return True


def finish(m: Mounter, config: Config, root: str) -> None:
    if not config.mount_udi_root_writable:
        m.remount_read_only(root)
