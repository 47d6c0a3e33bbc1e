"""Test images: a busybox root with no libc, Debian bookworm with Open MPI or MPICH.

The Debian roots take a minute with debootstrap, so their squashfs files are cached
under ``lab.CACHE`` (outside the checkout) and rebuilt only when missing. Builds
are atomic (temporary name, then rename) and serialised with a lock file, so two
test runs never see a half-built image.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from . import CACHE

MIRROR = "http://deb.debian.org/debian"
BUSYBOX = "/bin/busybox"
# The MPI test programs compiled into the Debian images; the cache name carries a
# digest of their sources, so a changed program rebuilds the image once.
PROGRAMS = {"mpi_hello": Path(__file__).with_name("mpi_hello.c"),
            "mpi_pingpong": Path(__file__).with_name("mpi_pingpong.c")}  # fmt: skip

# variant -> (extra packages, MPI compiler wrapper on the host)
DEBIAN_VARIANTS = {
    "openmpi": ("openmpi-bin,openssh-client", "mpicc.openmpi"),
    "mpich": ("mpich,openssh-client", "mpicc.mpich"),
}


def busybox_tree(dest: str | Path, pretty_name: str = "BusyBox test root") -> Path:
    """A root of busybox-static only: no libc, no ssh client, built in a second."""
    root = Path(dest)
    for sub in ("bin", "etc", "tmp", "var", "root", "home"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run(
        [BUSYBOX, "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    for applet in applets:
        link = root / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    (root / "etc" / "os-release").write_text(
        f'NAME="BusyBox"\nID=busybox\nPRETTY_NAME="{pretty_name}"\n'
    )
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    return root


def _locked(name: str) -> int:
    os.makedirs(CACHE, exist_ok=True)
    fd = os.open(os.path.join(CACHE, f".{name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def debian_squashfs(variant: str = "openmpi") -> Path:
    """The cached squashfs of a Debian bookworm minbase root with an MPI; built once."""
    packages, mpicc = DEBIAN_VARIANTS[variant]
    target = Path(CACHE) / f"debian-{variant}-{_programs_digest()}.sqsh"
    lock = _locked(f"debian-{variant}")
    try:
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=CACHE, prefix=f".build-{variant}-") as tmp:
            tree = Path(tmp) / "root"
            subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={packages}",
                 "bookworm", str(tree), MIRROR],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            _add_programs(tree, mpicc)
            partial = Path(tmp) / "image.sqsh"
            for stale in Path(CACHE).glob(f"debian-{variant}*.sqsh"):
                stale.unlink()  # built from other test programs: never used again
            subprocess.run(
                ["mksquashfs", str(tree), str(partial), "-comp", "zstd", "-noappend",
                 "-quiet", "-no-progress"],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            os.rename(partial, target)
        return target
    finally:
        os.close(lock)


def _programs_digest() -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, source in sorted(PROGRAMS.items()):
        digest.update(name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:12]


def _add_programs(tree: Path, mpicc: str) -> None:
    """Compile the MPI test programs on the host (same Debian release) into the tree."""
    bindir = tree / "usr" / "local" / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    for name, source in PROGRAMS.items():
        subprocess.run([mpicc, "-O2", "-o", str(bindir / name), str(source)], check=True)
