"""The Linux system calls Python lacks: the new mount API, openat2, umount2, loop setup.

Calling them directly instead of forking mount(8) and losetup(8) keeps the prolog
close to a shell script's speed. More importantly they work on file descriptors:
openat2 resolves a path once (RESOLVE_IN_ROOT keeps an untrusted image's symlinks
inside its root), and open_tree / fsmount / mount_setattr / move_mount build a
mount detached, with its flags, and attach it to a directory held open, so no
path is looked up twice. Linux 5.12 or newer (mount_setattr).

Every wrapper raises OSError with the errno; paths are bytes-safe (os.fsencode).
The syscall numbers are the same on every architecture for calls added after 5.0.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long
_libc.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint,
                           ctypes.c_int]  # fmt: skip

# mount(2) flags, still the vocabulary of siteFs and volume options.
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19

MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_REMOVEDIR = 0x200
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000

OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_EMPTY_PATH = 0x40
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000

_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432
_SYS_OPENAT2 = 437
_SYS_MOUNT_SETATTR = 442

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4


def _result(value: int, what: str, path: object = None) -> int:
    if value < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}", path)
    return value


def _b(path: str | bytes) -> bytes:
    return os.fsencode(path)


def openat2(dirfd: int, path: str | bytes, flags: int, resolve: int, mode: int = 0) -> int:
    """``openat2(2)``: with RESOLVE_IN_ROOT, '..' and absolute symlinks stop at dirfd."""
    how = struct.pack("QQQ", flags | os.O_CLOEXEC, mode, resolve)
    buf = ctypes.create_string_buffer(how, len(how))
    raw = _b(path)
    return _result(int(_libc.syscall(_SYS_OPENAT2, dirfd, raw, buf, len(how))), "openat2", path)


def open_tree(fd: int, recursive: bool) -> int:
    """A detached, private copy of the mount tree at ``fd`` (the object fd names)."""
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    args = (ctypes.c_int(fd), b"", ctypes.c_uint(flags))
    return _result(int(_libc.syscall(_SYS_OPEN_TREE, *args)), "open_tree")


def fsopen(fstype: str) -> int:
    return _result(int(_libc.syscall(_SYS_FSOPEN, fstype.encode(), 1)), "fsopen", fstype)


def fsconfig_string(fs_fd: int, key: str, value: str | bytes) -> None:
    args = (ctypes.c_int(fs_fd), ctypes.c_uint(FSCONFIG_SET_STRING), key.encode(), _b(value))
    _result(int(_libc.syscall(_SYS_FSCONFIG, *args, ctypes.c_int(0))), f"fsconfig {key}", value)


def fsconfig_flag(fs_fd: int, key: str) -> None:
    args = (ctypes.c_int(fs_fd), ctypes.c_uint(FSCONFIG_SET_FLAG), key.encode(), None)
    _result(int(_libc.syscall(_SYS_FSCONFIG, *args, ctypes.c_int(0))), f"fsconfig {key}")


def fsconfig_create(fs_fd: int) -> None:
    args = (ctypes.c_int(fs_fd), ctypes.c_uint(FSCONFIG_CMD_CREATE), None, None, ctypes.c_int(0))
    _result(int(_libc.syscall(_SYS_FSCONFIG, *args)), "fsconfig create")


def fsmount(fs_fd: int, attrs: int) -> int:
    """A detached mount of the configured filesystem, its attributes set from the start."""
    args = (ctypes.c_int(fs_fd), ctypes.c_uint(1), ctypes.c_uint(attrs))  # FSMOUNT_CLOEXEC
    return _result(int(_libc.syscall(_SYS_FSMOUNT, *args)), "fsmount")


def mount_setattr(fd: int, attr_set: int, attr_clr: int = 0, propagation: int = 0,
                  recursive: bool = True) -> None:  # fmt: skip
    """``mount_setattr(2)`` on the mount (tree) ``fd`` names, detached or not."""
    attr = struct.pack("QQQQ", attr_set, attr_clr, propagation, 0)
    buf = ctypes.create_string_buffer(attr, len(attr))
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    args = (ctypes.c_int(fd), b"", ctypes.c_uint(flags), buf, ctypes.c_size_t(len(attr)))
    _result(int(_libc.syscall(_SYS_MOUNT_SETATTR, *args)), "mount_setattr")


def move_mount(mount_fd: int, target_fd: int) -> None:
    """Attach the detached mount ``mount_fd`` on the directory or file ``target_fd``."""
    flags = MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH
    args = (ctypes.c_int(mount_fd), b"", ctypes.c_int(target_fd), b"", ctypes.c_uint(flags))
    _result(int(_libc.syscall(_SYS_MOVE_MOUNT, *args)), "move_mount")


def umount_fd(fd: int, flags: int = MNT_DETACH) -> None:
    """Unmount the mount whose root ``fd`` is, by fd: /proc/self/fd/N names exactly it."""
    _result(_libc.umount2(fd_path(fd).encode(), flags), "umount2")


def fchownat_empty(fd: int, uid: int, gid: int) -> None:
    """``fchownat(fd, "", uid, gid, AT_EMPTY_PATH)``: works on O_PATH descriptors too."""
    _result(_libc.fchownat(fd, b"", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "fchownat")


def fstatfs_type(fd: int) -> int:
    """The filesystem magic (``f_type``) of what ``fd`` names."""
    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type is the first word
    _result(_libc.fstatfs(fd, buf), "fstatfs")
    return int(struct.unpack_from("l", buf.raw, 0)[0])


def mount_id(fd: int) -> int:
    """The id of the mount ``fd`` lies on, as /proc/self/mountinfo numbers it."""
    with open(f"/proc/self/fdinfo/{fd}", "rb") as handle:
        for line in handle:
            if line.startswith(b"mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.ENOSYS, "no mnt_id in fdinfo", fd)


def setns(fd: int, nstype: int) -> None:
    _result(_libc.setns(fd, nstype), "setns")


def fd_path(fd: int) -> str:
    """A path naming exactly what fd refers to, for calls that take only paths."""
    return f"/proc/self/fd/{fd}"


def attach_loop(backing_fd: int, name: str) -> tuple[str, int]:
    """Attach the open file to a free loop device, read-only, freeing itself on last close.

    Returns the device and an open descriptor on it: the caller mounts, then closes
    the descriptor. Autoclear means the device detaches when the squashfs mount goes
    away, so a crash between attach and mount, or a lazy unmount, leaks no device.
    """
    control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _attempt in range(32):
            number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
            device = f"/dev/loop{number}"
            dev_fd = _configure(device, backing_fd, name)
            if dev_fd >= 0:
                return device, dev_fd
    finally:
        os.close(control)
    raise OSError(errno.EBUSY, "no free loop device after 32 attempts", name)


def _configure(device: str, file_fd: int, name: str) -> int:
    """LOOP_CONFIGURE; -1 when another process took the device first."""
    dev_fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # struct loop_config { u32 fd; u32 block_size; struct loop_info64 info; u64 reserved[8]; }
        # In loop_info64, lo_flags is the u32 at offset 52 and lo_file_name[64] at 56.
        info = bytearray(232)
        struct.pack_into("I", info, 52, LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR)
        raw = os.fsencode(name)[-63:]
        info[56 : 56 + len(raw)] = raw
        config = struct.pack("II", file_fd, 0) + bytes(info) + bytes(64)
        fcntl.ioctl(dev_fd, LOOP_CONFIGURE, config)
        return dev_fd
    except OSError as err:
        os.close(dev_fd)
        if err.errno == errno.EBUSY:
            return -1
        raise


# --- what the kernel allows users ------------------------------------------------------

USERNS_DISABLED = "unprivileged user namespaces are disabled here"
SYSCTLS = ("/proc/sys/user/max_user_namespaces", "/proc/sys/kernel/unprivileged_userns_clone")


def sysctl_refusal() -> str | None:
    """The kernel's switches for unprivileged user namespaces (Debian has a second)."""
    for path in SYSCTLS:
        try:
            with open(path, encoding="ascii") as handle:
                if handle.read().strip() == "0":
                    return f"{USERNS_DISABLED} ({path} is 0)"
        except OSError:
            continue
    return None
