"""The mount table, read by mount id, and copies of our mounts in other namespaces."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from shifter_sshd.kernel import mounts
from shifter_sshd.kernel import privileged as priv
from shifter_sshd.kernel.fds import Fd


def _mount_tmpfs(area: Path, name: str) -> int:
    (area / name).mkdir()
    area_fd = Fd(os.open(area, os.O_PATH | os.O_DIRECTORY))
    mount = Fd(priv.new_mount("tmpfs", {}, priv.NOSUID_NODEV))
    with area_fd, mount, Fd(priv.open_entry(area_fd.fd, name)) as target:
        return priv.attach(mount.fd, target.fd)


def _detach(area: Path, name: str) -> None:
    with Fd(os.open(area, os.O_PATH | os.O_DIRECTORY)) as area_fd:
        priv.detach(area_fd.fd, name)


def test_names_with_spaces_and_newlines_come_back_unescaped(tmp_path: Path) -> None:
    name = "job 7\nx\\y"
    mount_id = _mount_tmpfs(tmp_path, name)
    try:
        seen = [m for m in mounts.mountinfo() if m.mount_id == mount_id]
        assert [m.target for m in seen] == [os.fsencode(tmp_path / name)]
        assert [m.mount_id for m in mounts.under(str(tmp_path), mounts.mountinfo())] == [mount_id]
    finally:
        _detach(tmp_path, name)
    assert mounts.under(str(tmp_path), mounts.mountinfo()) == []


def test_a_copy_in_another_namespace_is_found_and_detached(tmp_path: Path) -> None:
    """Someone's ``unshare -m`` while the job ran keeps a copy of its mounts (and the
    image's loop device) alive: the epilog finds the namespace and detaches the copy
    there, by descriptor."""
    _mount_tmpfs(tmp_path, "42")
    holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{holder.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            assert time.monotonic() < deadline, "unshare did not make its namespace"
            time.sleep(0.01)
        _detach(tmp_path, "42")
        job_dir = str(tmp_path / "42")
        copies = mounts.foreign_copies([job_dir])
        assert copies.get(holder.pid) == [os.fsencode(job_dir)]
        assert mounts.unmount_in(holder.pid, copies[holder.pid], timeout=5)
        assert holder.pid not in mounts.foreign_copies([job_dir])
    finally:
        holder.kill()
        holder.wait()
