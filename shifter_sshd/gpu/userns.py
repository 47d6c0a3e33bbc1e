"""A GPU plan (``plan.py``) put into a root the caller owns: ``shifter --image`` without
a job (container/unprivileged.py builds that root).

The job's prolog works as root on a root-owned tree (``plan.apply``); here every
directory of the image is the caller's own in their user namespace, and the overlay's
upper layer takes any change, so the spec's files are bound and its links and loader
cache written straight in, each path resolved inside the root. The device nodes are
binds of the host's, in the container's own /dev (``unprivileged.mount_system``):
the chmod hook's modes for /dev directories do not apply.
"""

from __future__ import annotations

import os

from ..container import unprivileged
from ..errors import node_error, reason
from ..kernel.rootpath import Root
from . import plan

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .plan import Plan


def device_sources(gpus: Plan) -> list[tuple[int, str]]:
    """The plan's device nodes as (O_PATH descriptor of the host's node, path under /dev)."""
    found = []
    for node in gpus.nodes:
        if not node.host:
            raise node_error("cdi", "a spec's device node is not on this host", node.path)
        try:
            found.append((os.open(node.host, os.O_PATH | os.O_CLOEXEC), node.path))
        except OSError as err:
            raise node_error("cdi", f"cannot open a spec's device node ({reason(err)})",
                             node.host) from None  # fmt: skip
    return found


def apply(inside: Root, gpus: Plan) -> None:
    """Bind the spec's files, make its links and the loader's cache, in the container."""
    bound: dict[str, list[tuple[str, str]]] = {}  # folder -> [(name, host path)]
    for mount in gpus.mounts:
        source = unprivileged.open_source(mount.host_path, "cdi")
        try:
            unprivileged.bind(source, inside, mount.container_path, "rw" not in mount.options,
                              where="cdi")  # fmt: skip
        finally:
            os.close(source)
        folder, name = os.path.split(os.path.normpath(mount.container_path))
        bound.setdefault(folder, []).append((name, mount.host_path))
    for folder in gpus.ldcache_folders:
        for link, target in plan.soname_links(bound.get(folder, [])):
            unprivileged.link(inside, f"{folder}/{link}", target)
    for target, path in gpus.links:
        unprivileged.link(inside, path, target)
    if gpus.ldcache_folders:
        etc = unprivileged.directory(inside, "/etc")
        try:
            data = plan.cache(plan.image_cache(etc), gpus.ldcache_folders, bound)
        finally:
            os.close(etc)
        unprivileged.write_files(inside, "/etc", {"ld.so.cache": data})
