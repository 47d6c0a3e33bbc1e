"""The Slurm versions the lab runs: Debian 12's own 22.05, or 24.11 (trixie) and 26.05
(sid) from a Debian root each, cached outside the checkout.

A version root holds that release's Slurm daemons, client commands, munge tools and
development headers (debootstrap minbase, about 30 s and 300 MB each, once). Each
lab machine makes it its root (pivot_root in its own mount namespace), with the
host's paths the jobs need bound in: /proc, /sys, /dev, /run, /tmp, /var/tmp,
/home, the users, the project's venv and the Python it runs on. pivot_root, not
chroot: a chrooted process may not create a user namespace, which ``shifter``
does. Nothing is mounted on the host.

``SHIFTER_SSHD_LAB_SLURM=22.05|24.11|26.05`` (or ``Cluster(slurm=...)``) selects one.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import CACHE

ENV = "SHIFTER_SSHD_LAB_SLURM"
HOST_VERSION = "22.05"  # Debian 12's slurm-wlm, installed on the host
SUITES = {"24.11": "trixie", "26.05": "sid"}
VERSIONS = (HOST_VERSION, *SUITES)
NEWEST = "26.05"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("slurmd", "slurmctld", "slurm-client", "munge", "libslurm-dev", "procps",
            "psmisc", "openssh-client", "libexpat1", "libffi8", "zlib1g")  # fmt: skip
# Where a machine assembles its version root before pivoting into it (a tmpfs over
# /mnt, in its own namespace).
MACHINE_ROOT = "/mnt/slurm-root"
# Host paths bound into the root, recursively (mounts below them come along).
BIND_DIRS = ("/proc", "/sys", "/dev", "/run", "/tmp", "/var/tmp", "/home", "/opt/shifter-sshd")
BIND_FILES = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/hosts", "/etc/resolv.conf")


def selected(version: str | None = None) -> str:
    """The version asked for (argument, else $SHIFTER_SSHD_LAB_SLURM, else 22.05)."""
    chosen = version or os.environ.get(ENV) or HOST_VERSION
    if chosen not in VERSIONS:
        raise ValueError(f"{ENV}: Slurm {chosen} is not one of {', '.join(VERSIONS)}")
    return chosen


def root(version: str) -> str | None:
    """The version's Debian root (built once), or None for the host's own Slurm."""
    if version == HOST_VERSION:
        return None
    target = Path(CACHE) / f"slurm-{version}-{SUITES[version]}"
    if (target / ".complete").exists():
        return str(target)
    os.makedirs(CACHE, exist_ok=True)
    with open(Path(CACHE) / f".slurm-{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".complete").exists():
            _build(version, target)
    return str(target)


def _build(version: str, target: Path) -> None:
    partial = Path(f"{target}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"lab: building the Slurm {version} root ({SUITES[version]}), once", file=sys.stderr)
    done = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                           SUITES[version], str(partial), MIRROR],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"debootstrap {SUITES[version]}: {done.stdout[-2000:]}{done.stderr}")
    found = subprocess.run(["chroot", str(partial), "slurmd", "-V"], capture_output=True,
                           text=True, check=False).stdout.split()  # fmt: skip
    if len(found) != 2 or not found[1].startswith(version + "."):
        raise RuntimeError(f"the {SUITES[version]} root has Slurm {found}, not {version}")
    # Mount points for what machines bind in (the root itself is never changed later).
    for path in (*BIND_DIRS, *_python_dirs()):
        (partial / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for path in (*BIND_FILES, *_python_files()):
        (partial / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (partial / path.lstrip("/")).touch()
    (partial / ".complete").write_text(found[1] + "\n")
    os.rename(partial, target)


def include_dir(version: str) -> str:
    """Where that version's slurm/spank.h is, for building the SPANK plugin."""
    found = root(version)
    return os.path.join(found, "usr", "include") if found else "/usr/include"


def _python_files() -> tuple[str, ...]:
    """The interpreter the project's venv runs: every absolute hop of its python3 link
    (``venv/bin/python3 -> /usr/bin/python3 -> python3.11``), each bound in."""
    from . import VENV

    hops, path = [], os.path.join(VENV, "bin", "python3")
    for _hop in range(8):
        if not os.path.islink(path):
            break
        target = os.readlink(path)
        path = target if target.startswith("/") else os.path.join(os.path.dirname(path), target)
        if not path.startswith(VENV + "/"):
            hops.append(path)
    return tuple(dict.fromkeys([*hops, os.path.realpath(path)]))


def _python_dirs() -> tuple[str, ...]:
    import sysconfig

    return (sysconfig.get_paths()["stdlib"],)


def machine_script(version_root: str, extra_dirs: tuple[str, ...]) -> str:
    """Shell run in a new machine after its own setup: the chroot with the binds."""
    r = MACHINE_ROOT
    lines = ["mount -t tmpfs -o mode=0755,size=1m lab-roots /mnt", f"mkdir -p {r}",
             f"mount --bind {version_root} {r}"]  # fmt: skip
    for path in (*BIND_DIRS, *extra_dirs, *_python_dirs()):
        lines += [f"mkdir -p {r}{path}", f"mount --rbind {path} {r}{path}"]
    for path in (*BIND_FILES, *_python_files()):
        lines += [f"mkdir -p {os.path.dirname(r + path)}", f"[ -e {r}{path} ] || : > {r}{path}",
                  f"mount --bind {path} {r}{path}"]  # fmt: skip
    # The version root becomes the machine's /: whatever enters the machine later
    # (nsenter) starts there, and the host's tree is let go.
    lines += [f"mkdir -p {r}/.lab-host", f"cd {r}", "pivot_root . .lab-host",
              "umount -l /.lab-host"]  # fmt: skip
    return "\n".join(lines) + "\n"
