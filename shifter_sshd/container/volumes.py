"""siteFs and the user's ``--volume`` binds.

A user's sources are opened by a child process that has become the user
(``asuser``), and the descriptors are bound: the prolog mounts exactly what the user
could open, with no window to swap a path for something only root can read. Binds
are recursive, so a filesystem mounted inside a source comes along and nothing it
hides shows.

Destinations are canonical (``//``, ``.`` collapsed; ``..`` refused) and checked
against the protected list, then resolved one component at a time, never through
a symlink, never inside another volume and never inside a directory the user can
write: nothing the user controls can move a destination while root mounts on it.
A missing destination is created only on the container's own root tmpfs.
"""

from __future__ import annotations

import functools
import os
import stat

from ..config.udiroot import SiteMount, parse_mount_spec
from ..errors import ShifterError, node_error, reason, user_error
from ..kernel import privileged as priv
from ..kernel import syscalls as sc
from ..kernel.fds import Fd
from ..users import User

TYPE_CHECKING = False  # importing typing costs every prolog ~3 ms; mypy knows this name
if TYPE_CHECKING:  # rootfs (and devfs) are the prolog's: shifter --image needs neither
    from collections.abc import Callable

    from ..kernel.asuser import Source
    from .rootfs import Tree

VOLUME_FLAGS = ("ro", "rw")
# Destinations a volume may not be, cover, or sit inside.
PROTECTED = ("/etc", "/usr", "/bin", "/sbin", "/proc", "/sys", "/dev", "/opt/udiImage")
# Destinations a volume may not be or cover (the prolog writes them).
PROTECTED_FILES = ("/var/hostsfile", "/var/nodesfile", "/var/shifter")
# Sources that are kernel interfaces, not data (statfs f_type).
PSEUDO_FS = {
    0x6E736673: "nsfs", 0x9FA0: "proc", 0x62656572: "sysfs", 0x27E0EB: "cgroup",
    0x63677270: "cgroup2", 0xCAFE4A11: "bpf", 0x73636673: "securityfs",
    0x64626720: "debugfs", 0x74726163: "tracefs", 0x1CD1: "devpts",
    0xDE5E81E4: "efivarfs", 0x6165676C: "pstore", 0x42494E4D: "binfmt_misc",
    0xF97CFF8C: "selinuxfs", 0x50494446: "pidfs", 0x09041934: "anon_inode",
}  # fmt: skip
_NO_FOLLOW = sc.RESOLVE_BENEATH | sc.RESOLVE_NO_SYMLINKS | sc.RESOLVE_NO_MAGICLINKS


def canonical(where: str, dest: str) -> str:
    """``//a/./b/`` -> ``/a/b``; '..' and control characters are refused."""
    parts = [part for part in dest.split("/") if part not in ("", ".")]
    if not dest.startswith("/") or ".." in parts:
        raise user_error(where, "destination must be absolute, without '..'", dest)
    if any(ord(c) < 32 or ord(c) == 127 for c in dest):
        raise user_error(where, "control character in destination", repr(dest))
    return "/" + "/".join(parts)


def parse_volumes(text: str, limit: int = 64) -> list[SiteMount]:
    """``/src:/dst[:ro];...`` from --volume; every problem is the user's to fix."""
    mounts = []
    for spec in (s.strip() for s in text.split(";")):
        if not spec:
            continue
        try:
            mount = parse_mount_spec("--volume", spec, VOLUME_FLAGS)
        except ShifterError as err:
            raise user_error(err.where, err.what, err.value) from None
        dest = canonical("--volume", mount.dest)
        check_destination(dest)
        mounts.append(SiteMount(mount.source, dest, mount.read_only, True))
    if len(mounts) > limit:
        raise user_error("--volume", f"more than {limit} volumes (maxVolumes)", len(mounts))
    _no_nesting([m.dest for m in mounts])
    return mounts


def _no_nesting(dests: list[str]) -> None:
    """No destination equal to or below another: nothing mounts inside a user's volume."""
    seen: set[str] = set()
    for dest in sorted(dests, key=lambda d: d.count("/")):
        parts = dest.split("/")
        for depth in range(2, len(parts) + 1):
            outer = "/".join(parts[:depth])
            if outer in seen:
                raise user_error("--volume", f"destination lies inside another volume ({outer})",
                                 dest)  # fmt: skip
        seen.add(dest)


def check_destination(dest: str) -> None:
    """The canonical ``dest`` against the protected list."""

    def covers(protected: str) -> bool:
        return dest == protected or protected.startswith(dest.rstrip("/") + "/")

    top = dest.split("/")[1] if dest != "/" else ""
    if dest == "/" or top.startswith("lib"):
        raise user_error("--volume", "destination not allowed", dest)
    for protected in PROTECTED:
        if covers(protected) or dest.startswith(protected + "/"):
            raise user_error("--volume", f"destination may not cover {protected}", dest)
    for protected in PROTECTED_FILES:
        if covers(protected):
            raise user_error("--volume", f"destination may not cover {protected}", dest)


# --- siteFs ---------------------------------------------------------------------------


def mount_site_fs(tree: Tree, site_fs: list[SiteMount]) -> None:
    """The site's binds: sources are the admin's paths, destinations resolved in-root."""
    for mount in site_fs:
        bind_host_path(tree, mount.source, ("siteFs", "source unusable on this node"),
                       functools.partial(_site_target, tree, mount.dest),
                       mount.read_only, mount.recursive)  # fmt: skip


def bind_host_path(tree: Tree, host_path: str, error: tuple[str, str],
                   target_for: Callable[[bool], int], read_only: bool,
                   recursive: bool) -> None:  # fmt: skip
    """An admin's host path (siteFs, a CDI spec's mount) bound onto the destination
    ``target_for(is_dir)`` opens: one open, one fstat, one bind, every descriptor
    closed once. ``error``: where and what a source that cannot be opened is (the
    node's problem: the admin named it)."""
    try:
        source = Fd(os.open(host_path, os.O_PATH | os.O_CLOEXEC))
    except OSError as err:
        raise node_error(error[0], f"{error[1]} ({err.strerror})", host_path) from None
    with source:
        is_dir = stat.S_ISDIR(os.fstat(source.fd).st_mode)
        with Fd(target_for(is_dir)) as target:
            bind(tree, source.fd, target.fd, read_only, recursive)


def _site_target(tree: Tree, dest: str, is_dir: bool) -> int:
    """siteFs may follow the image's symlinks (inside the root); the image is immutable."""
    with tree.container() as container:
        try:
            target = Fd(container.open(dest))
        except FileNotFoundError:
            return _walk(tree, canonical("siteFs", dest), is_dir, "siteFs", tree.writable)
        except OSError as err:
            why = reason(err)
            raise user_error("siteFs", f"destination unusable in the image ({why})", dest) from None
    with target:
        _check_kind(target.fd, is_dir, dest, "siteFs")
        return target.take()


# --- the user's volumes ---------------------------------------------------------------


def mount_user_volumes(tree: Tree, user: User, volumes: list[SiteMount], timeout: float) -> None:
    if not volumes:
        return
    from ..kernel import asuser

    try:
        sources = asuser.open_sources([v.source for v in volumes], user, timeout)
    except asuser.Timeout:
        raise user_error("--volume", f"opening the sources as {user.name} took longer than "
                         f"{timeout:g} s (stopped, or a hung filesystem)",
                         ";".join(v.source for v in volumes)) from None  # fmt: skip
    try:
        for volume, source in zip(volumes, sources, strict=True):
            _check_source(volume, source, user)
            is_dir = stat.S_ISDIR(source.mode)
            check = _parent_check(tree, volume.dest, user)
            with Fd(_walk(tree, volume.dest, is_dir, "--volume", {tree.root_id}, check)) as target:
                try:
                    mount_id = bind(tree, source.fd, target.fd, volume.read_only, True)
                except OSError as err:  # e.g. a source under an unbindable mount
                    raise user_error("--volume", f"cannot bind the source ({err.strerror})",
                                     volume.source) from None  # fmt: skip
            tree.volume_mounts.add(mount_id)
    finally:
        for source in sources:
            if source.fd >= 0:
                os.close(source.fd)


def _check_source(volume: SiteMount, source: Source, user: User) -> None:
    reasons = {
        2: "source does not exist",
        13: f"source not readable by {user.name}",
        40: "source path has a symlink loop",
        20: "source path is not a directory",
    }
    if source.error:
        raise user_error("--volume", reasons.get(source.error, "cannot open source "
                         f"({os.strerror(source.error)})"), volume.source)  # fmt: skip
    if not (stat.S_ISDIR(source.mode) or stat.S_ISREG(source.mode)):
        raise user_error("--volume", "source is not a directory or file", volume.source)
    if source.fstype in PSEUDO_FS:
        what = f"source is a kernel interface ({PSEUDO_FS[source.fstype]}), not data"
        raise user_error("--volume", what, volume.source)
    if not source.readable:
        raise user_error("--volume", f"source not readable by {user.name}", volume.source)
    if not volume.read_only and not source.writable:
        raise user_error("--volume", f"source not writable by {user.name}", volume.source)


def _parent_check(tree: Tree, dest: str, user: User) -> Callable[[int], None]:
    """No destination below another volume or a directory the user can change."""

    def check(fd: int) -> None:
        mount_id = sc.mount_id(fd)
        if mount_id in tree.volume_mounts:
            raise user_error("--volume", "destination lies inside another volume", dest)
        if mount_id in tree.image_mounts:
            return  # the image's squashfs: nobody can change it
        info = os.fstat(fd)
        if (info.st_uid == user.uid or info.st_mode & 0o002
                or (info.st_mode & 0o020 and info.st_gid in user.gids)):  # fmt: skip
            raise user_error("--volume", "destination lies in a directory the user can write",
                             dest)  # fmt: skip

    return check


# --- destinations -----------------------------------------------------------------------


def _walk(tree: Tree, dest: str, is_dir: bool, where: str, on: set[int],
          check: Callable[[int], None] | None = None) -> int:  # fmt: skip
    """``dest`` opened from the root one name at a time, never through a symlink;
    ``check`` sees each directory before a name in it is opened, and a missing rest
    is created on one of the mounts ``on``. Returns an O_PATH descriptor."""
    parts = dest.strip("/").split("/")
    with Fd(os.dup(tree.root)) as current:
        for depth, name in enumerate(parts):
            if check is not None:
                check(current.fd)
            try:
                child = priv.open_entry(current.fd, name)
            except FileNotFoundError:
                return _create_below(current.fd, parts[depth:], is_dir, dest, where, on)
            except OSError as err:
                what = "destination passes through a symlink" if err.errno == 40 else (
                    f"destination unusable ({reason(err)})")  # fmt: skip
                raise user_error(where, what, dest) from None
            current.replace(child)
        _check_kind(current.fd, is_dir, dest, where)
        return current.take()


def _create_below(parent: int, missing: list[str], is_dir: bool, dest: str, where: str,
                  on: set[int]) -> int:  # fmt: skip
    """The missing part of ``dest``, only on one of the container's own mounts ``on``
    (the root tmpfs for the user's volumes): never in the image or on a host filesystem."""
    if sc.mount_id(parent) not in on:
        raise user_error(where, "destination does not exist in the image", dest)
    try:
        with Fd(os.dup(parent)) as current:
            for name in missing[:-1]:
                current.replace(priv.make_dir(current.fd, name))
            if is_dir:
                return priv.make_dir(current.fd, missing[-1])
            return priv.make_file(current.fd, missing[-1])
    except OSError as err:  # the container's own tmpfs: the request's doing (a long name)
        raise user_error(where, f"cannot create the destination ({err.strerror})", dest) from None


def _check_kind(fd: int, is_dir: bool, dest: str, where: str) -> None:
    """A directory onto a directory, a file onto a regular file (not a fifo or device)."""
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISDIR(mode) if is_dir else stat.S_ISREG(mode)):
        kind = "a directory" if is_dir else "a file"
        raise user_error(where, f"destination in the image is not {kind}", dest)


def bind(tree: Tree, source: int, target: int, read_only: bool, recursive: bool) -> int:
    """Bind (a recursive private copy of) ``source`` on ``target``; returns its mount id.
    Both descriptors stay the caller's."""
    attrs = priv.NOSUID_NODEV | (sc.MOUNT_ATTR_RDONLY if read_only else 0)
    with Fd(priv.clone(source, attrs, recursive)) as mount:
        mount_id = priv.attach(mount.fd, target)
    tree.mounts += 1
    return mount_id
