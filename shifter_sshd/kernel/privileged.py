"""The privileged core: every mount, unmount, chown, chmod and file write made as root.

This module is what a security reviewer reads first (docs/security.md, "The
privileged core"). Its rules:

- **No path lookups.** Every function acts on a file descriptor the caller resolved
  once, or on a single name (no ``/``) inside a directory descriptor, and never
  follows a symlink there (``O_NOFOLLOW``, ``RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH``).
  Whoever renames, swaps or symlinks things meanwhile changes nothing about what
  the call acts on.
- **Mounts are built detached.** ``fsmount`` (new filesystems) and ``open_tree``
  (binds) give a mount that is not attached anywhere; its attributes (read-only,
  nosuid, nodev, noexec) and private propagation are set while detached, and only
  then ``move_mount`` attaches it on a directory descriptor. No mount is ever
  visible without its flags, and binds are private: nothing propagates back.
- **Files are created, never opened in place.** Whatever stands at the name is
  unlinked, a new file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW``, and owner
  and mode are set on the open descriptor.
- **Unmounting names a mount by descriptor.** ``detach`` opens the entry of a
  root-owned area without following anything and detaches the mount tree whose root
  that descriptor is; a path string is never handed to umount2.

Callers decide what an ``OSError`` means (the user's mistake or a broken node).
"""

from __future__ import annotations

import os
import stat
import struct

from . import syscalls as sc

NOSUID_NODEV = sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV
_BENEATH = sc.RESOLVE_BENEATH | sc.RESOLVE_NO_SYMLINKS | sc.RESOLVE_NO_MAGICLINKS
_WRITE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_STACKED = 64  # mounts stacked on one job directory; more means something else is wrong


def _name(name: str) -> str:
    """One directory entry: no separator, not '.' or '..', not empty."""
    if not name or "/" in name or name in (".", ".."):
        raise OSError(22, "not a single file name", name)
    return name


# --- looking things up, without following anything ------------------------------------


def open_entry(dir_fd: int, name: str, flags: int = os.O_PATH) -> int:
    """``name`` in ``dir_fd``, never through a symlink; a symlink there is ELOOP."""
    fd = sc.openat2(dir_fd, _name(name), flags | os.O_NOFOLLOW, _BENEATH)
    if flags & os.O_PATH and stat.S_ISLNK(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(40, "is a symlink", name)  # ELOOP
    return fd


def open_dir(dir_fd: int, name: str) -> int:
    """The directory ``name`` in ``dir_fd`` as a real (not O_PATH) descriptor."""
    return open_entry(dir_fd, name, os.O_RDONLY | os.O_DIRECTORY)


def reopen_dir(fd: int) -> int:
    """A real descriptor on the directory an O_PATH (or mount) descriptor names."""
    return sc.openat2(fd, ".", os.O_RDONLY | os.O_DIRECTORY, _BENEATH)


# --- directories, files, symlinks ---------------------------------------------------


def make_dir(dir_fd: int, name: str, mode: int = 0o755, owner: tuple[int, int] = (0, 0)) -> int:
    """The directory ``name`` in ``dir_fd``, made if missing; returns a real descriptor.

    An existing directory is returned as it is (the image's, say); a symlink or a
    file standing there is an error, never followed.
    """
    try:
        os.mkdir(_name(name), 0o700, dir_fd=dir_fd)
    except FileExistsError:
        return open_dir(dir_fd, name)
    fd = open_dir(dir_fd, name)
    try:
        os.fchown(fd, *owner)
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_file(dir_fd: int, name: str, data: bytes, mode: int = 0o644,
               owner: tuple[int, int] = (0, 0)) -> None:  # fmt: skip
    """Replace ``name`` in ``dir_fd`` with a new regular file holding ``data``.

    A directory standing there is IsADirectoryError. Someone creating the name again
    between our unlink and our create loses: we retry, and give up with EEXIST.
    """
    for _attempt in range(4):
        try:
            os.unlink(_name(name), dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        try:
            fd = os.open(name, _WRITE, 0o600, dir_fd=dir_fd)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(17, "kept reappearing while being replaced", name)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchown(fd, *owner)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def make_file(dir_fd: int, name: str) -> int:
    """A new empty root-owned file ``name`` (a mount point for a file); O_PATH fd."""
    fd = os.open(_name(name), _WRITE, 0o644, dir_fd=dir_fd)
    os.close(fd)
    return open_entry(dir_fd, name)


def symlink(dir_fd: int, name: str, target: str) -> None:
    os.symlink(target, _name(name), dir_fd=dir_fd)


def make_node(dir_fd: int, name: str, kind: int, rdev: int, mode: int,
              owner: tuple[int, int] = (0, 0)) -> None:  # fmt: skip
    """A device node (``kind`` stat.S_IFCHR or S_IFBLK) in the container's own /dev.

    Only ever called on the tmpfs ``devfs`` made for the container: the host's /dev
    is not touched, and which devices a job may open stays the job's device cgroup's
    decision (Slurm's ConstrainDevices).
    """
    if kind not in (stat.S_IFCHR, stat.S_IFBLK):
        raise OSError(22, "not a device type", name)
    os.mknod(_name(name), kind | 0o600, rdev, dir_fd=dir_fd)
    fd = open_entry(dir_fd, name)
    try:
        set_owner(fd, owner[0], owner[1], mode & 0o7777)
    finally:
        os.close(fd)


def set_owner(fd: int, uid: int, gid: int, mode: int) -> None:
    """Owner and mode of what ``fd`` names, O_PATH descriptors included.

    ``/proc/self/fd/N`` names exactly the descriptor's object, as glibc's
    ``fchmodat(fd, "", mode, AT_EMPTY_PATH)`` does it.
    """
    sc.fchownat_empty(fd, uid, gid)
    os.chmod(sc.fd_path(fd), mode)


def grant_traverse(dir_fd: int, uid: int) -> None:
    """POSIX ACL on a root-owned directory: ``uid`` may enter and list it, others not.

    The container root is mode 0750 root:root plus ``user:<uid>:r-x``: root and the
    job user reach the container's files through the host's ``udiMount/<job>``,
    nobody else, whatever the permissions below it say.
    """
    user_obj, user, group_obj, mask, other = 0x01, 0x02, 0x04, 0x10, 0x20
    undefined = 0xFFFFFFFF
    entries = ((user_obj, 7, undefined), (user, 5, uid), (group_obj, 5, undefined),
               (mask, 5, undefined), (other, 0, undefined))  # fmt: skip
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    real = reopen_dir(dir_fd)
    try:
        os.setxattr(real, "system.posix_acl_access", acl)
    finally:
        os.close(real)


# --- mounts -------------------------------------------------------------------------


def new_mount(fstype: str, options: dict[str, str], attrs: int) -> int:
    """A new, detached filesystem (tmpfs, proc, devpts, squashfs, overlay) with ``attrs``.

    Option values that name files are ``/proc/self/fd/N`` of descriptors the caller
    holds (overlay layers), never paths looked up again. With MOUNT_ATTR_RDONLY the
    superblock is read-only too (a block device is then opened read-only).
    """
    fs = sc.fsopen(fstype)
    try:
        if attrs & sc.MOUNT_ATTR_RDONLY:
            sc.fsconfig_flag(fs, "ro")
        for key, value in options.items():
            sc.fsconfig_string(fs, key, value)
        sc.fsconfig_create(fs)
        return sc.fsmount(fs, attrs)
    finally:
        os.close(fs)


def clone(fd: int, attrs: int, recursive: bool) -> int:
    """A detached private copy of the mount tree at ``fd``, ``attrs`` set on every mount.

    Recursive copies carry the submounts of the source (a volume with a filesystem
    mounted inside shows it, and never the files hidden underneath).
    """
    tree = sc.open_tree(fd, recursive)
    try:
        sc.mount_setattr(tree, attrs, 0, sc.MS_PRIVATE, recursive=recursive)
    except BaseException:
        os.close(tree)
        raise
    return tree


def attach(mount_fd: int, target_fd: int) -> int:
    """Attach the detached ``mount_fd`` on ``target_fd``; returns the new mount's id."""
    sc.move_mount(mount_fd, target_fd)
    return sc.mount_id(mount_fd)


def set_read_only(mount_fd: int) -> None:
    """Make one attached mount (not its submounts) read-only."""
    sc.mount_setattr(mount_fd, sc.MOUNT_ATTR_RDONLY, recursive=False)


def is_mount_root(fd: int, parent_fd: int) -> bool:
    """Whether ``fd`` (opened inside ``parent_fd``) is the root of a mount on top of it."""
    return sc.mount_id(fd) != sc.mount_id(parent_fd)


def detach(area_fd: int, name: str) -> int:
    """Detach every mount tree stacked on ``name`` in the root-owned ``area_fd``.

    Each tree is made private first (its unmount then reaches no peer), then
    detached lazily as a whole: a busy mount costs nothing here, and the kernel
    frees it once its last user lets go. Returns how many trees were detached.
    """
    count = 0
    for _round in range(MAX_STACKED):
        try:
            fd = open_entry(area_fd, name)
        except FileNotFoundError:
            return count
        try:
            if not is_mount_root(fd, area_fd):
                return count
            sc.mount_setattr(fd, 0, 0, sc.MS_PRIVATE, recursive=True)
            sc.umount_fd(fd, sc.MNT_DETACH)
            count += 1
        finally:
            os.close(fd)
    raise OSError(16, f"more than {MAX_STACKED} mounts stacked", name)  # EBUSY


def remove_dir(area_fd: int, name: str) -> None:
    """rmdir, never a recursive delete: what is left behind a mount stays."""
    os.rmdir(_name(name), dir_fd=area_fd)


# --- files the job path writes outside the container ------------------------------------


def replace_file(dir_fd: int, name: str, data: bytes, owner: int, mode: int) -> None:
    """``name`` replaced atomically (statePath's files): a new file under a temporary
    name, owner and mode set, renamed over it; readers see the old or the new whole."""
    tmp = f".{_name(name)}.{os.getpid()}.tmp"
    try:
        os.unlink(tmp, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, _WRITE, 0o600, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchown(fd, owner, -1)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def remove_entry(dir_fd: int, name: str) -> None:
    """Unlink ``name`` (never a directory) in ``dir_fd``: an image's file we replace."""
    os.unlink(_name(name), dir_fd=dir_fd)


def set_mode(fd: int, mode: int) -> None:
    """The permission bits of a directory we made (devfs), on its descriptor."""
    os.fchmod(fd, mode & 0o7777)


# --- loop devices and user namespaces -----------------------------------------------------


def attach_loop(backing_fd: int, name: str) -> tuple[str, int]:
    """A read-only autoclear loop device over ``backing_fd``: (its /dev name, an open fd).
    The mount made from it holds it from then on; autoclear frees it with the mount."""
    return sc.attach_loop(backing_fd, name)


def write_id_maps(pid: int, uid: int, gids: list[int]) -> None:
    """setgroups deny, then the uid and gid maps of our child ``pid`` (the userns holder,
    not yet reaped, so the pid cannot name another process): each file opened below
    one descriptor on /proc/<pid>, never by a path looked up twice."""
    proc = os.open(f"/proc/{pid}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1\n"),
                           ("gid_map", "".join(f"{g} {g} 1\n" for g in gids))):  # fmt: skip
            fd = os.open(name, os.O_WRONLY | os.O_CLOEXEC, dir_fd=proc)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
    finally:
        os.close(proc)
