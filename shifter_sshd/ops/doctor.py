"""``shifter-sshd doctor``: everything a node needs, checked before a job finds out.

Each check says what it looked at and what is wrong, one line each, so an admin
can fix a node before it drains: the configuration and every path it names (with
safe owners and modes), the kernel features the prolog uses, the OpenSSH bundle
(its self-check), the sshd port, this installation itself, and, given slurm.conf,
the Slurm settings the prolog and the SPANK plugin rely on. ``config check`` runs
the configuration's part.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable
from dataclasses import asdict

from ..config.udiroot import Config
from ..errors import ShifterError
from .findings import Finding, Found, problem, warning


def _owned_safely(found: Found, check: str, path: str, readable_by_all: bool) -> None:
    """Root's, writable by nobody else; optionally readable and searchable by all."""
    try:
        info = os.stat(path)
    except OSError as err:
        problem(found, check, f"{path}: {err.strerror}")
        return
    if info.st_uid != 0 or info.st_mode & 0o022:
        problem(
            found,
            check,
            f"{path}: must be root's and not group/other-writable "
            f"(owner {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o})",
        )
    needed = 0o005 if stat.S_ISDIR(info.st_mode) else 0o004
    if readable_by_all and info.st_mode & needed != needed:
        problem(
            found,
            check,
            f"{path}: users must be able to read it (mode {stat.S_IMODE(info.st_mode):o})",
        )


# --- the configuration and its paths ----------------------------------------------------


def config_paths(config: Config) -> Found:
    """What ``config check`` adds to parsing: every path the file names, usable."""
    found: Found = []
    _owned_safely(found, "imagePath", config.image_path, readable_by_all=True)
    if config.enable_sshd:
        if not os.path.isdir(config.opt_udi_image):
            problem(
                found,
                "optUdiImage",
                f"{config.opt_udi_image}: missing (run shifter-sshd udiimage build)",
            )
        else:
            _owned_safely(found, "optUdiImage", config.opt_udi_image, readable_by_all=True)
        _secret(found, config)
    if config.etc_path and not os.path.isdir(config.etc_path):
        problem(found, "etcPath", f"{config.etc_path}: not a directory")
    site_fs = [*config.site_fs, *(m for module in config.modules for m in module.site_fs)]
    for mount in site_fs:
        if not os.path.exists(mount.source):
            problem(found, "siteFs", f"{mount.source}: source does not exist on this node")
    from .. import users

    for name in config.users_to_import:
        if users.lookup_name(name) is None:
            problem(found, "usersToImport", f"{name}: no such user on this node")
    for key, path in (("statePath", config.state_path), ("udiMount", config.udi_mount),
                      ("loopMount", config.loop_mount)):  # fmt: skip
        if os.path.exists(path):
            _owned_safely(found, key, path, readable_by_all=key != "loopMount")
    return found


def _secret(found: Found, config: Config) -> None:
    from ..ssh import keys

    try:
        keys.load_secret(config.ssh_key_secret)
    except ShifterError as err:
        problem(found, "sshKeySecret", str(err).removeprefix("shifter-sshd: "))


# --- the kernel, the bundle, the port, this installation -------------------------------


def kernel() -> Found:
    found: Found = []
    with open("/proc/filesystems", encoding="ascii") as handle:
        known = {line.split()[-1] for line in handle if line.strip()}
    for fstype in ("squashfs", "overlay", "tmpfs", "devpts", "proc"):
        if fstype not in known:
            problem(found, "kernel", f"filesystem {fstype} not available (modprobe {fstype}?)")
    if not os.path.exists("/dev/loop-control"):
        problem(found, "kernel", "no /dev/loop-control (modprobe loop)")
    _try(found, "openat2 (Linux 5.6)", _openat2)
    _try(found, "the new mount API and mount_setattr (Linux 5.12)", _mount_api)
    _try(found, "POSIX ACLs on tmpfs (CONFIG_TMPFS_POSIX_ACL)", _tmpfs_acl)
    from ..kernel.syscalls import sysctl_refusal

    refusal = sysctl_refusal()
    if refusal:
        warning(
            found,
            "kernel",
            f"{refusal}: shifter goes through the sshd (no PMI-2, no "
            "shared memory between srun-launched ranks)",
        )
    return found


def _try(found: Found, what: str, probe: Callable[[], None]) -> None:
    try:
        probe()
    except OSError as err:
        problem(found, "kernel", f"{what} does not work: {err.strerror or err}")


def _openat2() -> None:
    from ..kernel import syscalls as sc

    os.close(sc.openat2(sc.AT_FDCWD, "/", os.O_PATH, sc.RESOLVE_NO_SYMLINKS))


def _mount_api() -> None:
    from ..kernel import privileged as priv

    mount = priv.new_mount("tmpfs", {"source": "shifter-sshd-doctor"}, priv.NOSUID_NODEV)
    try:
        priv.set_read_only(mount)
    finally:
        os.close(mount)


def _tmpfs_acl() -> None:
    from ..kernel import privileged as priv

    mount = priv.new_mount("tmpfs", {"source": "shifter-sshd-doctor"}, priv.NOSUID_NODEV)
    try:
        priv.grant_traverse(mount, 65534)
    finally:
        os.close(mount)


def bundle(config: Config) -> Found:
    """The bundle's own self-check: ssh -V, ssh-keygen and sshd -t in a libc-less root."""
    found: Found = []
    if not (config.enable_sshd and os.path.isdir(config.opt_udi_image)):
        return found
    import tempfile
    from pathlib import Path

    from ..ssh import bundle as udiimage

    with tempfile.TemporaryDirectory(prefix="shifter-sshd-doctor-") as work:
        try:
            udiimage.self_check(Path(udiimage.current(config.opt_udi_image)), Path(work))
        except ShifterError as err:
            problem(found, "optUdiImage", str(err).removeprefix("shifter-sshd: "))
    return found


def port(config: Config) -> Found:
    """sshdPort free, or held by a job's sshd of ours."""
    found: Found = []
    if not config.enable_sshd:
        return found
    from ..lifecycle.state import StateStore
    from ..ssh import sshd

    store = StateStore(config.state_path)
    ours = {s.sshd_pid for job in store.job_ids() if (s := store.load(job))}
    others = [pid for pid in sshd.port_holders(config.sshd_port) if pid not in ours]
    if others:
        problem(found, "sshdPort", f"{config.sshd_port} is held by {sshd.describe(others)}")
    return found


def installation() -> Found:
    """This installation cannot be changed by users, nor its commands by their environment."""
    found: Found = []
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in (sys.prefix, os.path.join(sys.prefix, "bin"), package):
        _owned_safely(found, "installation", path, readable_by_all=True)
    for name in ("shifter", "shifterimg", "shifter-sshd", "shifter-sshd-prolog",
                 "shifter-sshd-epilog"):  # fmt: skip
        script = os.path.join(sys.prefix, "bin", name)
        try:
            with open(script, "rb") as handle:
                first = handle.readline()
        except OSError:
            problem(found, "installation", f"{script}: missing")
            continue
        if not first.rstrip().endswith((b" -I", b" -IS")):
            warning(
                found,
                "installation",
                f"{script}: Python not started isolated (-I): a "
                "user's PYTHONHOME or PYTHONPATH reaches it "
                "(python -m shifter_sshd.commands.launchers)",
            )
    return found


def cdi_specs(config: Config) -> Found:
    """Every CDI spec reads (GPU jobs' prologs would fail on a broken one)."""
    from ..gpu import cdi

    found: Found = []
    if config.gpu_injection == "off":
        return found
    try:
        cdi.registry(config.cdi_spec_dirs)
    except ShifterError as err:
        problem(found, "cdi", str(err).removeprefix("shifter-sshd: "))
    return found


def run(config: Config, slurm_conf: str | None) -> Found:
    """Every check, in the order an admin would fix things."""
    found = [Finding("config", w, False) for w in config.warnings]
    found += config_paths(config) + kernel() + bundle(config) + port(config) + installation()
    found += cdi_specs(config)
    if slurm_conf:
        from .doctor_slurm import slurm

        found += slurm(config, slurm_conf)
    return found


def report(found: Found, as_json: bool) -> str:
    if as_json:
        import json

        problems = any(f.problem for f in found)
        return json.dumps({"ok": not problems, "findings": [asdict(f) for f in found]}, indent=1)
    lines = [f"shifter-sshd: doctor: {'' if f.problem else 'warning: '}{f.check}: {f.detail}"
             for f in found]  # fmt: skip
    if not any(f.problem for f in found):
        lines.append("shifter-sshd: doctor: no problem found")
    return "\n".join(lines)
