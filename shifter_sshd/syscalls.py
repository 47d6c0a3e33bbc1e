"""The few Linux system calls Python lacks: mount, umount2, openat2 and loop setup.

Calling them directly instead of forking mount(8) and losetup(8) is what keeps
the prolog close to a shell script's speed; openat2 with RESOLVE_IN_ROOT is what
keeps an untrusted image's symlinks from steering a write or a mount outside its root.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19

MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
_SYS_OPENAT2 = 437

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4


def _check(result: int, what: str, path: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}", path)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    result = _libc.mount(
        source.encode() if source is not None else None,
        target.encode(),
        fstype.encode() if fstype is not None else None,
        flags,
        data.encode() if data else None,
    )
    _check(result, "mount", target)


def umount(target: str, flags: int = UMOUNT_NOFOLLOW) -> None:
    _check(_libc.umount2(target.encode(), flags), "umount", target)


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """``openat2(2)``: with RESOLVE_IN_ROOT, '..' and absolute symlinks stop at dirfd."""
    how = struct.pack("QQQ", flags | os.O_CLOEXEC, mode, resolve)
    buf = ctypes.create_string_buffer(how, len(how))
    fd = int(_libc.syscall(_SYS_OPENAT2, dirfd, path.encode(), buf, len(how)))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return fd


_SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
AT_SYMLINK_NOFOLLOW = 0x100
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8


def mount_setattr_recursive(target: str, attr_set: int, propagation: int = 0) -> None:
    """``mount_setattr(2)`` on a whole mount tree: remount can only change the top one."""
    attr = struct.pack("QQQQ", attr_set, 0, propagation, 0)
    buf = ctypes.create_string_buffer(attr, len(attr))
    flags = AT_RECURSIVE | AT_SYMLINK_NOFOLLOW
    result = int(
        _libc.syscall(_SYS_MOUNT_SETATTR, AT_FDCWD, target.encode(), flags, buf, len(attr))
    )
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount_setattr: {os.strerror(code)}", target)


CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000


def setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


def fd_path(fd: int) -> str:
    """A path naming exactly what fd refers to, for mount(2) to act on."""
    return f"/proc/self/fd/{fd}"


def attach_loop(backing: str) -> tuple[str, int]:
    """Attach ``backing`` read-only to a free loop device that frees itself on last close.

    Returns the device and an open descriptor on it: the caller mounts, then closes
    the descriptor. Autoclear means the device detaches when the squashfs mount goes
    away, so a crash between attach and mount, or a lazy unmount, leaks no device.
    """
    file_fd = os.open(backing, os.O_RDONLY | os.O_CLOEXEC)
    try:
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _attempt in range(32):
                number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
                device = f"/dev/loop{number}"
                dev_fd = _configure(device, file_fd, backing)
                if dev_fd >= 0:
                    return device, dev_fd
        finally:
            os.close(control)
    finally:
        os.close(file_fd)
    raise OSError(errno.EBUSY, "no free loop device after 32 attempts", backing)


def _configure(device: str, file_fd: int, backing: str) -> int:
    """LOOP_CONFIGURE; -1 when another process took the device first."""
    dev_fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # struct loop_config { u32 fd; u32 block_size; struct loop_info64 info; u64 reserved[8]; }
        # In loop_info64, lo_flags is the u32 at offset 52 and lo_file_name[64] at 56.
        info = bytearray(232)
        struct.pack_into("I", info, 52, LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR)
        name = backing.encode()[-63:]
        info[56 : 56 + len(name)] = name
        config = struct.pack("II", file_fd, 0) + bytes(info) + bytes(64)
        fcntl.ioctl(dev_fd, LOOP_CONFIGURE, config)
        return dev_fd
    except OSError as err:
        os.close(dev_fd)
        if err.errno == errno.EBUSY:
            return -1
        raise
