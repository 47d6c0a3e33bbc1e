"""The privileged core on its own: each function acts on the descriptor it is given,
never on a path looked up again, and never through a symlink (kernel/privileged.py).

Every test works in its own temporary directory and detaches what it mounts.
"""

from __future__ import annotations

import ctypes
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shifter_sshd.kernel import mounts
from shifter_sshd.kernel import privileged as priv
from shifter_sshd.kernel import syscalls as sc
from shifter_sshd.kernel.fds import Fd


@pytest.fixture
def top(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A root-owned directory and an O_PATH descriptor on it."""
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        yield tmp_path, fd
    finally:
        os.close(fd)


def test_single_names_only(top: tuple[Path, int]) -> None:
    _path, fd = top
    for bad in ("", ".", "..", "a/b", "/etc"):
        with pytest.raises(OSError, match="not a single file name"):
            priv.open_entry(fd, bad)
        with pytest.raises(OSError, match="not a single file name"):
            priv.make_dir(fd, bad)


def test_a_symlink_is_never_followed(
    top: tuple[Path, int], tmp_path_factory: pytest.TempPathFactory
) -> None:
    path, fd = top
    outside = tmp_path_factory.mktemp("outside")
    (outside / "victim").write_text("host file\n")
    (path / "link").symlink_to(outside)
    (path / "file").symlink_to(outside / "victim")
    with pytest.raises(OSError) as opened:
        priv.open_entry(fd, "link")
    assert opened.value.errno == 40  # ELOOP
    with pytest.raises(OSError):
        os.close(priv.make_dir(fd, "link"))
    # a file write replaces the symlink standing at the name; the target is untouched
    priv.write_file(fd, "file", b"ours\n", 0o640, (0, 0))
    assert (outside / "victim").read_text() == "host file\n"
    assert not (path / "file").is_symlink() and (path / "file").read_text() == "ours\n"
    assert stat.S_IMODE((path / "file").stat().st_mode) == 0o640


def test_a_descriptor_keeps_acting_on_what_was_resolved(top: tuple[Path, int]) -> None:
    """The owner renames the directory away and puts a symlink in its place: the calls
    on the descriptor still land in the renamed directory, nothing at the symlink."""
    path, fd = top
    (path / "d").mkdir()
    (path / "elsewhere").mkdir()
    with Fd(priv.open_dir(fd, "d")) as held:
        os.rename(path / "d", path / "moved")
        (path / "d").symlink_to(path / "elsewhere")
        os.close(priv.make_dir(held.fd, "made", 0o750, (2901, 2901)))
        priv.write_file(held.fd, "written", b"x", 0o600, (2901, 2901))
        priv.replace_file(held.fd, "replaced", b"y", 2901, 0o400)
    assert sorted(os.listdir(path / "moved")) == ["made", "replaced", "written"]
    assert os.listdir(path / "elsewhere") == []
    made = (path / "moved" / "made").stat()
    assert (made.st_uid, made.st_gid, stat.S_IMODE(made.st_mode)) == (2901, 2901, 0o750)


def test_replace_file_is_atomic_and_leaves_no_temporary(top: tuple[Path, int]) -> None:
    path, fd = top
    (path / "state.json").write_text("old")
    seen: set[str] = set()
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                seen.add((path / "state.json").read_text())
            except FileNotFoundError:
                seen.add("missing")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(300):
            priv.replace_file(fd, "state.json", b"new" * (n % 7 + 1), 2901, 0o440)
    finally:
        done.set()
        thread.join()
    assert seen <= {"old"} | {"new" * k for k in range(1, 8)}, seen - {"old"}
    info = (path / "state.json").stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (2901, 0o440)
    assert os.listdir(path) == ["state.json"]


def test_remove_entry_never_removes_a_directory(top: tuple[Path, int]) -> None:
    path, fd = top
    (path / "dir").mkdir()
    (path / "dir" / "keep").write_text("data")
    with pytest.raises(IsADirectoryError):
        priv.remove_entry(fd, "dir")
    assert (path / "dir" / "keep").read_text() == "data"
    (path / "f").write_text("")
    priv.remove_entry(fd, "f")
    assert not (path / "f").exists()


def test_set_owner_and_mode_on_an_o_path_descriptor(top: tuple[Path, int]) -> None:
    path, fd = top
    (path / "x").write_text("")
    with Fd(priv.open_entry(fd, "x")) as entry:
        priv.set_owner(entry.fd, 2901, 2902, 0o604)
    info = (path / "x").stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (2901, 2902, 0o604)
    (path / "d").mkdir()
    with Fd(priv.open_dir(fd, "d")) as directory:
        priv.set_mode(directory.fd, 0o4711)  # only the permission bits go through
    assert stat.S_IMODE((path / "d").stat().st_mode) == 0o4711


def _mount_at(path: Path) -> mounts.MountInfo | None:
    found = [m for m in mounts.mountinfo() if m.target == os.fsencode(path)]
    return found[-1] if found else None


def test_mounts_are_built_detached_and_undone_by_descriptor(top: tuple[Path, int]) -> None:
    path, fd = top
    (path / "job").mkdir()
    (path / "job" / "under").write_text("hidden by the mount")
    mount = Fd(priv.new_mount("tmpfs", {"mode": "0700"}, priv.NOSUID_NODEV))
    try:
        assert _mount_at(path / "job") is None  # not visible anywhere yet
        with mount, Fd(priv.open_entry(fd, "job")) as target:
            mount_id = priv.attach(mount.fd, target.fd)
        seen = _mount_at(path / "job")
        assert seen is not None and seen.mount_id == mount_id
        flags = os.statvfs(path / "job").f_flag
        assert flags & os.ST_NOSUID and flags & os.ST_NODEV
        assert not (path / "job" / "under").exists()
        # a bind of it, read-only, onto a second directory
        (path / "copy").mkdir()
        with Fd(priv.open_entry(fd, "job")) as source, Fd(priv.open_entry(fd, "copy")) as dest:
            clone = Fd(priv.clone(source.fd, sc.MOUNT_ATTR_RDONLY | priv.NOSUID_NODEV, False))
            with clone:
                priv.attach(clone.fd, dest.fd)
        with pytest.raises(OSError):
            (path / "copy" / "new").write_text("read-only")
    finally:
        assert priv.detach(fd, "copy") in (0, 1)
        assert priv.detach(fd, "job") == 1
    assert _mount_at(path / "job") is None and _mount_at(path / "copy") is None
    assert (path / "job" / "under").read_text() == "hidden by the mount"
    priv.remove_dir(fd, "copy")
    with pytest.raises(OSError):
        priv.remove_dir(fd, "job")  # never a recursive delete


def test_detach_refuses_a_symlink_to_a_mount(top: tuple[Path, int]) -> None:
    """The owner replaces the job directory by a symlink to some other mount: detach
    sees a symlink (ELOOP), never the mount behind it."""
    path, fd = top
    (path / "job").symlink_to("/proc")
    with pytest.raises(OSError) as refused:
        priv.detach(fd, "job")
    assert refused.value.errno == 40
    assert _mount_at(Path("/proc")) is not None


def test_a_loop_device_frees_itself_with_its_last_descriptor(tmp_path: Path) -> None:
    backing = tmp_path / "image.squashfs"
    backing.write_bytes(b"\0" * 65536)
    with Fd(os.open(backing, os.O_RDONLY | os.O_CLOEXEC)) as image:
        device, device_fd = priv.attach_loop(image.fd, str(backing))
    name = os.path.basename(device)
    sysfs = Path(f"/sys/block/{name}/loop")
    try:
        assert sysfs.joinpath("backing_file").read_text().strip() == str(backing)
        assert Path(f"/sys/block/{name}/ro").read_text().strip() == "1"
        assert sysfs.joinpath("autoclear").read_text().strip() == "1"
    finally:
        os.close(device_fd)
    assert not sysfs.joinpath("backing_file").exists()  # autoclear: gone with the last close


def test_id_maps_are_written_below_one_proc_descriptor() -> None:
    """The user namespace holder's maps: the user's own ids, groups denied."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        os.setresgid(2901, 2901, 2901)
        os.setgroups([])
        os.setresuid(2901, 2901, 2901)
        code = 0 if libc.unshare(0x10000000) == 0 else 1  # CLONE_NEWUSER
        os.write(ready_w, bytes([code]))
        os.read(go_r, 1)
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"\0", "unshare(CLONE_NEWUSER) failed as the test user"
        priv.write_id_maps(pid, 2901, [2901, 2902])
        proc = Path(f"/proc/{pid}")
        assert proc.joinpath("uid_map").read_text().split() == ["2901", "2901", "1"]
        assert proc.joinpath("gid_map").read_text().split() == [
            "2901",
            "2901",
            "1",
            "2902",
            "2902",
            "1",
        ]
        assert proc.joinpath("setgroups").read_text().strip() == "deny"
        with pytest.raises(OSError):  # a map is written once
            priv.write_id_maps(pid, 0, [0])
    finally:
        os.write(go_w, b"g")
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)
