"""What ``shifter --ssh-config`` writes, and where it refuses to (commands/outside.py); the
cluster test (test_outside.py) logs in with it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shifter_sshd.commands import outside
from shifter_sshd.errors import ShifterError
from shifter_sshd.lifecycle.record import Container

CA = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample"


def _container(root: Path, port: int = 1204) -> Container:
    return Container("77", {"root": str(root), "uid": os.getuid(), "image": "docker:busybox:x",
                            "image_id": "f" * 64, "volumes": "", "env": {},
                            "sshd_port": port})  # fmt: skip


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "var" / "shifter" / "ssh").mkdir(parents=True)
    (root / "opt" / "udiImage" / "etc").mkdir(parents=True)
    (root / "var" / "shifter" / "ssh" / "id_ed25519").write_text("PRIVATE\n")
    (root / "var" / "shifter" / "ssh" / "id_ed25519-cert.pub").write_text("CERT\n")
    (root / "opt" / "udiImage" / "etc" / "ssh_known_hosts").write_text(
        f"@cert-authority [node1]:1204,[node2]:1204 {CA}\n"
    )
    (root / "var" / "nodesfile").write_text("node1\nnode2\n")
    return root


def test_the_files_and_the_config(tmp_path: Path) -> None:
    material = outside.gather(_container(_root(tmp_path)), "alice", "gateway.example.org")
    os.umask(0)  # whatever the caller's umask, every file is 0600
    try:
        hosts = outside.write(material, str(tmp_path / "out dir"))
    finally:
        os.umask(0o022)
    assert hosts == ["node1", "node2"]
    out = tmp_path / "out dir"
    assert sorted(os.listdir(out)) == sorted(outside.FILES)
    for name in outside.FILES:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert (out / "id_ed25519").read_text() == "PRIVATE\n"
    assert (out / "known_hosts").read_text() == f"@cert-authority node1,node2 {CA}\n"
    config = (out / "config").read_text()
    assert "Host node1 job77-node1\n" in config and "Host node2 job77-node2\n" in config
    for line in (
        "HostKeyAlias node2",
        "Port 1204",
        "User alice",
        "StrictHostKeyChecking yes",
        "IdentitiesOnly yes",
        "GlobalKnownHostsFile /dev/null",
        "ProxyJump gateway.example.org",
        f'IdentityFile "{out}/id_ed25519"',
    ):
        assert f"    {line}\n" in config, line


def test_no_sshd_or_no_material_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ShifterError, match="this job has no container sshd"):
        outside.gather(_container(_root(tmp_path), port=0), "alice", None)
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(ShifterError, match="the container has no ssh material"):
        outside.gather(_container(root), "alice", None)


@pytest.mark.parametrize("how", ["group-writable", "someone else's", "a symlink", "a file"])
def test_a_directory_that_is_not_the_users_alone_is_refused(tmp_path: Path, how: str) -> None:
    material = outside.gather(_container(_root(tmp_path)), "alice", None)
    target = tmp_path / "target"
    if how == "a symlink":
        (tmp_path / "real").mkdir(mode=0o700)
        target.symlink_to(tmp_path / "real")
    elif how == "a file":
        target.write_text("")
    else:
        target.mkdir(mode=0o700)
        if how == "group-writable":
            target.chmod(0o770)
        else:
            os.chown(target, 2901, 2901)
    with pytest.raises(ShifterError, match="--ssh-config"):
        outside.write(material, str(target))
    if target.is_dir() and not target.is_symlink():
        assert os.listdir(target) == []
    assert not (tmp_path / "real").exists() or os.listdir(tmp_path / "real") == []
