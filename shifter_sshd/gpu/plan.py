"""The job's GPUs in its container: which (Slurm's gres), what (CDI), and putting it there.

Slurm tells the Prolog the node's GPUs of the job in SLURM_JOB_GPUS (its gres
indexes; CUDA_VISIBLE_DEVICES where gres sets only that). Each index names a CDI
device (``gpuCdiDevice``, default ``nvidia.com/gpu={index}``); the spec says
which device nodes, libraries and binaries that takes. ``plan`` decides all of it
before anything is mounted (so a wrong spec fails the prolog early), ``apply``
binds the files after /dev exists and before any user volume is mounted.

Hooks are never run. The standard NVIDIA ones are done natively: update-ldcache
(soname links and a new /etc/ld.so.cache, ``gpu/ldcache.py``), create-symlinks, and
chmod (on the container's own /dev). Others are logged and skipped.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, field

from .. import log
from ..container import devfs
from ..errors import node_error, user_error
from ..kernel import privileged as priv
from ..kernel import syscalls as sc
from ..kernel.fds import Fd
from ..kernel.rootpath import Root
from . import cdi, ldcache

TYPE_CHECKING = False  # typing costs every prolog ~3 ms; mypy knows this name
if TYPE_CHECKING:
    from collections.abc import Mapping

    from ..config.udiroot import Config
    from ..container.rootfs import Tree

MODULE = "gpu"  # --module=gpu: the opt-in when gpuInjection=module
NATIVE_HOOKS = ("update-ldcache", "create-symlinks", "chmod")
SKIPPED_HOOKS = {
    "enable-cuda-compat": "the image's CUDA forward-compatibility libraries are not enabled",
    "disable-device-node-modification": "the container's /dev is made fresh for each job",
}


@dataclass
class Plan:
    indexes: list[str]  # Slurm's GPU indexes on this node
    nodes: list[devfs.Node] = field(default_factory=list)
    mounts: list[cdi.Mount] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    dev_modes: dict[str, int] = field(default_factory=dict)  # /dev dirs a chmod hook sets
    ldcache_folders: list[str] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)  # (target, link)


def job_gpus(job_env: Mapping[str, str]) -> list[str]:
    """Slurm's GPU indexes for this job on this node: ``0,1`` or ``0-3,6``."""
    raw = job_env.get("SLURM_JOB_GPUS") or job_env.get("CUDA_VISIBLE_DEVICES") or ""
    indexes: list[str] = []
    for part in raw.replace(" ", "").split(","):
        first, dash, last = part.partition("-")
        if not part or part == "NoDevFiles":
            continue
        if not first.isdigit() or (dash and not last.isdigit()):
            raise node_error("gpus", "SLURM_JOB_GPUS is not a list of indexes", raw)
        numbers = range(int(first), int(last) + 1) if dash else [int(first)]
        indexes += [str(n) for n in numbers if str(n) not in indexes]
    return indexes


def plan(
    config: Config,
    job_env: Mapping[str, str],
    modules: tuple[str, ...],
    indexes: list[str] | None = None,
) -> Plan | None:
    """What to inject for this job, or None: no GPU here, or the site turned it off.

    ``indexes``: the GPUs to inject where no Slurm job names them (``usable``)."""
    asked = MODULE in modules
    if config.gpu_injection == "off" or (config.gpu_injection == "module" and not asked):
        return None
    if indexes is None:
        indexes = job_gpus(job_env)
    if not indexes:
        if asked:
            raise user_error("--module", "the job has no GPU on this node (ask Slurm for "
                             "some: --gres=gpu:N or --gpus-per-node=N)", MODULE)  # fmt: skip
        return None
    names = [config.gpu_cdi_device.replace("{index}", index) for index in indexes]
    edits = cdi.select(config.cdi_spec_dirs, names)
    result = Plan(indexes, mounts=edits.mounts)
    for node in edits.device_nodes:
        result.nodes.append(_node(node))
    for mount in edits.mounts:
        if not os.path.exists(mount.host_path):
            raise node_error("cdi", "a spec mounts a file this node does not have",
                             mount.host_path)  # fmt: skip
    for hook in edits.hooks:
        _hook(hook, result)
    for reason in edits.ignored:
        log.info(f"gpus: CDI edit ignored: {reason}")
    result.env = dict(item.split("=", 1) for item in edits.env)
    # After the spec's own (nvidia-ctk writes NVIDIA_VISIBLE_DEVICES=void): what the job
    # has. CUDA numbers the devices it can open from 0, and only the job's are here.
    result.env["NVIDIA_VISIBLE_DEVICES"] = ",".join(indexes)
    result.env["CUDA_VISIBLE_DEVICES"] = ",".join(str(n) for n in range(len(indexes)))
    return result


def usable(config: Config) -> list[str]:
    """Outside any job: the GPUs of the site's specs whose every device node (the
    spec's own, nvidiactl, and the GPU's) this user may open, by index."""
    prefix, _sep, suffix = config.gpu_cdi_device.partition("{index}")
    found = []
    for qualified, (spec, name) in cdi.registry(config.cdi_spec_dirs).items():
        index = qualified.removeprefix(prefix).removesuffix(suffix)
        if not (qualified.startswith(prefix) and qualified.endswith(suffix) and index.isdigit()):
            continue
        nodes = [*spec.edits.device_nodes, *spec.devices[name].device_nodes]
        if nodes and all(os.access(n.host_path, os.R_OK | os.W_OK) for n in nodes):
            found.append(index)
    return sorted(found, key=int)


def _node(node: cdi.DeviceNode) -> devfs.Node:
    """The device node to make: the spec's numbers where it gives them, else the host's."""
    relative = node.path.removeprefix("/dev/")
    try:
        host = devfs.from_host(node.host_path, relative)
    except OSError as err:
        if node.major is None or node.minor is None:
            raise node_error("cdi", f"a spec's device node is missing ({err.strerror})",
                             node.host_path) from None  # fmt: skip
        host = devfs.Node(relative, stat.S_IFCHR, 0, 0o666)
    kind = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}.get(node.type or "", host.kind)
    rdev = os.makedev(node.major, node.minor) if node.major is not None and \
        node.minor is not None else host.rdev  # fmt: skip
    mode = node.file_mode if node.file_mode is not None else host.mode
    uid = node.uid if node.uid is not None else host.uid
    gid = node.gid if node.gid is not None else host.gid
    return devfs.Node(relative, kind, rdev, stat.S_IMODE(mode), uid, gid, host.host)


def _hook(hook: cdi.Hook, result: Plan) -> None:
    """The effect of an NVIDIA hook (nvidia-ctk hook X / nvidia-cdi-hook X), natively."""
    args = list(hook.args)
    name = next((a for a in args if a in NATIVE_HOOKS or a in SKIPPED_HOOKS), None)
    if name is None:
        log.warning(f"gpus: CDI hook not run (only NVIDIA's standard hooks are done, "
                    f"natively): {' '.join(args) or hook.path}")  # fmt: skip
        return
    if name in SKIPPED_HOOKS:
        log.info(f"gpus: CDI hook {name} skipped: {SKIPPED_HOOKS[name]}")
        return
    options = _options(args[args.index(name) + 1 :])
    if name == "update-ldcache":
        result.ldcache_folders += [os.path.normpath(f) for f in options.get("--folder", [])]
    elif name == "create-symlinks":
        for link in options.get("--link", []):
            target, sep, path = link.partition("::")
            if not sep or not path.startswith("/"):
                raise node_error("cdi", "create-symlinks --link must be TARGET::/PATH", link)
            result.links.append((target, os.path.normpath(path)))
    else:
        mode = int(options.get("--mode", ["755"])[-1], 8)
        for path in options.get("--path", []):
            if os.path.normpath(path).startswith("/dev/"):
                result.dev_modes[os.path.normpath(path).removeprefix("/dev/")] = mode


def _options(args: list[str]) -> dict[str, list[str]]:
    """``--name value`` and ``--name=value`` pairs, each name possibly repeated."""
    found: dict[str, list[str]] = {}
    pending = None
    for arg in args:
        if pending is not None:
            found.setdefault(pending, []).append(arg)
            pending = None
        elif arg.startswith("--") and "=" in arg:
            name, _sep, value = arg.partition("=")
            found.setdefault(name, []).append(value)
        elif arg.startswith("--"):
            pending = arg
    return found


# --- applying ----------------------------------------------------------------------------


def apply(tree: Tree, gpus: Plan) -> None:
    """Bind the spec's files, make its links and the loader's cache, in the container."""
    places = _Places(tree)
    try:
        folders = [
            os.path.dirname(p)
            for p in (
                *(m.container_path for m in gpus.mounts),
                *(link for _target, link in gpus.links),
            )
        ]
        places.prepare([*folders, *gpus.ldcache_folders])
        bound: dict[str, list[tuple[str, str]]] = {}  # folder -> [(name, host path)]
        for mount in gpus.mounts:
            folder, name = os.path.split(mount.container_path)
            _bind(tree, places.directory(folder), name, mount)
            bound.setdefault(folder, []).append((name, mount.host_path))
        for folder in gpus.ldcache_folders:
            _soname_links(places.directory(folder), bound.get(folder, []))
        for target, link in gpus.links:
            folder, name = os.path.split(link)
            _replace_link(places.directory(folder), name, target)
        if gpus.ldcache_folders:
            _write_cache(tree, gpus.ldcache_folders, bound)
    finally:
        places.close()


class _Places:
    """Directories in the container where entries are made, overlaid when read-only.

    A directory of the image is read-only: it gets an overlay whose upper layer lives
    in the job's root-owned scratch, so the image is never written and the mount
    points made there are root's. A directory others may write is refused: the user
    could race the prolog there.
    """

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self.root = Root(tree.root)
        self.opened: dict[str, int] = {}

    def prepare(self, folders: list[str]) -> None:
        """Overlay every read-only directory entries will be made in, shallowest first.

        An overlay mounted on a directory hides what is mounted below it: one put on
        /usr/lib (for /lib/firmware/..., through Debian's /lib -> usr/lib) after the
        libraries were bound in /usr/lib/x86_64-linux-gnu would hide them. Overlaid
        first, the ancestor makes its descendants writable, and they need none.
        """
        anchors: dict[str, str] = {}  # where it is on the host -> its path in the container
        for folder in folders:
            path, fd = self._existing(os.path.normpath(folder))
            try:
                if os.fstatvfs(fd).f_flag & os.ST_RDONLY:
                    anchors.setdefault(os.readlink(sc.fd_path(fd)), path)
            finally:
                os.close(fd)
        for _where, path in sorted(anchors.items(), key=lambda item: item[0].count("/")):
            self.directory(path)

    def _existing(self, path: str) -> tuple[str, int]:
        """The deepest directory of ``path`` that exists in the container, opened."""
        while True:
            try:
                return path, self.root.open(path, os.O_PATH | os.O_DIRECTORY)
            except FileNotFoundError:
                if path == "/":
                    raise
                path = os.path.dirname(path)

    def directory(self, path: str) -> int:
        path = os.path.normpath(path)
        if path in self.opened:
            return self.opened[path]
        try:
            fd = self.root.open(path, os.O_PATH | os.O_DIRECTORY)
        except FileNotFoundError:
            parent = self.directory(os.path.dirname(path))
            fd = priv.make_dir(parent, os.path.basename(path))
        with Fd(fd) as owned:
            info = os.fstat(owned.fd)
            if info.st_uid != 0 or info.st_mode & 0o022:
                raise user_error("gpus", "the image's directory for GPU files is not root's "
                                 "alone", path)  # fmt: skip
            read_only = os.fstatvfs(owned.fd).f_flag & os.ST_RDONLY
            fd = self._overlay(owned.take(), path) if read_only else owned.take()
        self.opened[path] = fd
        return fd

    def _overlay(self, lower: int, path: str) -> int:
        """An overlay on ``lower`` (which this closes); the overlay's descriptor."""
        number = len(self.opened)
        layers = {"lowerdir": lower}
        try:
            for part in ("upper", "work"):
                layers[f"{part}dir"] = priv.make_dir(self.tree.scratch, f"gpu{number}.{part}")
            options = {"source": "shifter-gpu"} | {k: sc.fd_path(v) for k, v in layers.items()}
            mount = priv.new_mount("overlay", options, priv.NOSUID_NODEV)
            try:
                priv.attach(mount, lower)
            except BaseException:
                os.close(mount)
                raise
        except OSError as err:
            raise node_error("gpus", f"cannot overlay a directory for GPU files ({err.strerror})",
                             path) from None  # fmt: skip
        finally:
            for fd in layers.values():
                os.close(fd)
        self.tree.mounts += 1
        return mount

    def close(self) -> None:
        for fd in self.opened.values():
            os.close(fd)
        self.opened.clear()
        self.root.close()


def _bind(tree: Tree, folder: int, name: str, mount: cdi.Mount) -> None:
    """The host file or directory at ``name`` in ``folder``, read-only unless the spec
    says rw; nosuid and nodev always (``volumes.bind``, as for siteFs)."""
    from ..container import volumes

    def target_for(is_dir: bool) -> int:
        return priv.make_dir(folder, name) if is_dir else _mount_point(folder, name)

    volumes.bind_host_path(tree, mount.host_path, ("cdi", "cannot open a spec's mount"),
                           target_for, "rw" not in mount.options,
                           "rbind" in mount.options)  # fmt: skip


def _mount_point(folder: int, name: str) -> int:
    """An empty file at ``name`` (the image's own file there is covered, as with binds)."""
    try:
        return priv.open_entry(folder, name)
    except FileNotFoundError:
        return priv.make_file(folder, name)
    except OSError:  # a symlink: replaced in the overlay's upper layer
        priv.remove_entry(folder, name)
        return priv.make_file(folder, name)


def _soname_links(folder: int, libraries: list[tuple[str, str]]) -> None:
    for link, target in soname_links(libraries):
        _replace_link(folder, link, target)


def soname_links(libraries: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """What ldconfig makes in a folder: (soname, file) links for the bound libraries
    ((name in the folder, host path) each)."""
    links = []
    for name, host_path in libraries:
        found = soname_of(host_path)
        if found and found[0].decode() != name:
            links.append((found[0].decode(), name))
    return links


def _replace_link(folder: int, name: str, target: str) -> None:
    """``name`` -> ``target``, replacing a symlink there (the image's older driver's);
    a file or directory there is left alone, as ldconfig leaves it."""
    try:
        if not stat.S_ISLNK(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode):
            log.info(f"gpus: {name} exists and is not a symlink: left as it is")
            return
        priv.remove_entry(folder, name)
    except FileNotFoundError:
        pass
    priv.symlink(folder, name, target)


def soname_of(host_path: str) -> tuple[bytes, int] | None:
    """A host library's soname, mapped not read (driver libraries are tens of MB)."""
    import mmap  # only where there are GPUs

    try:
        with open(host_path, "rb") as handle, \
                mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:  # fmt: skip
            return ldcache.soname(data)  # type: ignore[arg-type]
    except (OSError, ValueError, IndexError, struct.error):
        return None


def _write_cache(tree: Tree, folders: list[str], bound: dict[str, list[tuple[str, str]]]) -> None:
    """The image's /etc/ld.so.cache with the bound libraries added (by their sonames)."""
    priv.write_file(tree.etc, "ld.so.cache", cache(image_cache(tree.etc), folders, bound), 0o644)


def cache(image: list[ldcache.Entry] | None, folders: list[str],
          bound: dict[str, list[tuple[str, str]]]) -> bytes:  # fmt: skip
    """An ld.so.cache: the image's entries and the libraries bound in ``folders``."""
    entries = list(image or [])
    for folder in folders:
        for _name, host_path in bound.get(folder, []):
            found = soname_of(host_path)
            if found:
                soname, flags = found
                entries.append(ldcache.Entry(soname, f"{folder}/{soname.decode()}".encode(),
                                             flags))  # fmt: skip
    return ldcache.write(entries)


def image_cache(etc_fd: int) -> list[ldcache.Entry] | None:
    """The entries of the image's own /etc/ld.so.cache (``etc_fd``: its /etc)."""
    try:
        with Root(etc_fd) as etc:
            fd = etc.open("ld.so.cache", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, 64 << 20)
    finally:
        os.close(fd)
    entries = ldcache.read(data)
    extension = 1 << 62  # entries of the glibc-hwcaps extension: not carried over
    return None if entries is None else [e for e in entries if not e.hwcap & extension]
