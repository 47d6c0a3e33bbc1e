"""``shifter --image=NAME CMD`` with no job, or in a job that asked for no container:
the caller's own container, built without root, gone with its last process.

The same container a job's prolog would build for the user, from the same rules:
the image from the site's store, ``--volume`` checked as the job's are, the modules
(``defaultModules`` and ``--module``) with their siteFs and environment, the GPUs
from the site's CDI specs (the job's, in a job; outside one, every GPU whose device
nodes the user may open), the user's /etc entries. The mechanics of building it in
the caller's own namespaces are container/unprivileged.py's; this is their order.

Everything named is checked and opened before any namespace exists, so a mistake is
refused with the prolog's words and nothing is made.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from .. import users
from ..config.udiroot import Config, SiteMount
from ..container import environment, hostsfile, unprivileged, volumes
from ..errors import ShifterError, reason, user_error
from ..image import store

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

    from ..gpu.plan import Plan
    from ..kernel.rootpath import Root


@dataclass
class Request:
    """What the caller asked for, checked."""

    config: Config
    record: store.Record
    mounts: list[SiteMount]  # siteFs, the modules' siteFs, then --volume
    user: users.User
    argv: list[str]
    env: dict[str, str]  # the container's: image, site, modules, GPUs (not the caller's)
    gpus: Plan | None
    image_fd: int


def prepare(config: Config, image: str, volume_text: str, asked: tuple[str, ...],
            argv: list[str], caller: Mapping[str, str]) -> Request:  # fmt: skip
    record = store.Store.from_config(config).lookup(image)
    user = users.lookup(os.getuid(), None, config.max_group_count)
    modules = environment.modules(config, asked)
    given = volumes.parse_volumes(volume_text, config.max_volumes)
    for volume in given:
        _readable(volume.source)
    site_fs = [*config.site_fs, *(m for module in modules for m in module.site_fs)]
    gpus = _gpus(config, caller, tuple(m.name for m in modules) + asked)
    env = environment.container_env(config, record.metadata.env, modules)
    env.update(gpus.env if gpus else {})
    # No container sshd to launch ranks through, no /var/hostsfile: the job path's
    # launcher settings would send mpirun to ssh into containers that do not exist.
    for name in [*environment.LAUNCHERS, *hostsfile.ENVIRONMENT]:
        env.pop(name, None)
    argv = argv or _default(record)
    try:
        image_fd = os.open(record.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise user_error("image", f"cannot read the image ({reason(err)})",
                         record.path) from None  # fmt: skip
    return Request(config, record, [*site_fs, *given], user, argv, env, gpus, image_fd)


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


def _gpus(config: Config, caller: Mapping[str, str], modules: tuple[str, ...]) -> Plan | None:
    if config.gpu_injection == "off":
        return None
    in_job = bool(caller.get("SLURM_JOB_ID"))
    # A login node without specs: not even the CDI reader is loaded ("gpu": plan.MODULE).
    if not in_job and "gpu" not in modules and not any(map(_listed, config.cdi_spec_dirs)):
        return None
    from ..gpu import plan

    if in_job:
        return plan.plan(config, caller, modules)  # the job's, as Slurm gave them
    found = plan.usable(config)
    if not found and plan.MODULE in modules:
        raise user_error("--module", "no GPU here that you may open", plan.MODULE)
    return plan.plan(config, caller, modules, found)


def _listed(directory: str) -> bool:
    try:
        return bool(os.listdir(directory))
    except OSError:
        return False


def _default(record: store.Record) -> list[str]:
    meta = record.metadata
    if meta.command:
        return list(meta.command)
    if meta.entrypoint:
        return ["/bin/sh", "-c", meta.entrypoint]
    raise ShifterError("usage", "no command given, and the image has none", record.id)


def run(request: Request, env: dict[str, str]) -> int:
    """Build the container and run the command in it; returns its exit status."""
    uid, gid = os.getuid(), os.getgid()
    unprivileged.enter_namespaces(uid, gid)
    devices = _devices(request)
    site = _open_binds(request)  # before our tmpfs covers /tmp, where sources may be
    unprivileged.cover_work()
    squashfuse = unprivileged.serve_image(request.image_fd)
    try:
        warming = unprivileged.warm(request.argv[0], env.get("PATH", ""))
        with unprivileged.overlay() as inside:
            unprivileged.mount_system(inside, devices)
            if request.gpus:  # before the user's volumes, as in a job
                from ..gpu import userns

                userns.apply(inside, request.gpus)
            for fd, dest, read_only in site:
                unprivileged.bind(fd, inside, dest, read_only)
            unprivileged.write_files(inside, "/etc", _etc(request, inside))
        for fd in [fd for fd, _path in devices] + [fd for fd, _dest, _ro in site]:
            os.close(fd)
        unprivileged.warmed(warming)
        return unprivileged.run_inside(request.argv, env, _workdir(request), (uid, gid))
    finally:
        unprivileged.stop(squashfuse)


def _devices(request: Request) -> list[tuple[int, str]]:
    """The host's nodes for the container's /dev, opened: the usual ones, hostDevices,
    /dev/ptmx, and the GPUs'."""
    from ..container import devfs

    found = [(n.host, n.path) for n in devfs.host_devices(request.config.host_devices)]
    opened = [(unprivileged.open_source(host, "hostDevices"), path)
              for host, path in [*found, ("/dev/ptmx", "ptmx")]]  # fmt: skip
    if request.gpus:
        from ..gpu import userns

        opened += userns.device_sources(request.gpus)
    return opened


def _open_binds(request: Request) -> list[unprivileged.Bind]:
    """The home directory, siteFs, the modules' siteFs and the volumes, opened once and
    bound by descriptor."""
    wanted = [(m.source, m.dest, m.read_only) for m in request.mounts]
    home = request.user.home
    if home.startswith("/") and os.path.isdir(home):
        wanted.insert(0, (home, home, False))
    return [(unprivileged.open_source(source, "--volume"), dest, read_only)
            for source, dest, read_only in wanted]  # fmt: skip


def _etc(request: Request, inside: Root) -> dict[str, bytes]:
    from ..container import etc

    user = request.user
    shell = user.shell if inside.is_file(user.shell) else "/bin/sh"
    texts = etc.files(request.config, user, shell, inside)
    return {name: text.encode() for name, text in texts.items()}


def _workdir(request: Request) -> str:
    cwd = os.environ.get("PWD") or ""
    return cwd if cwd.startswith("/") else request.record.metadata.workdir or "/"
