"""The image store: import from a directory, tar (plain and compressed) or squashfs."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from support import CLI

from lab import images
from shifter_sshd.errors import ShifterError
from shifter_sshd.image import store as image


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, "--config", str(config), *args], capture_output=True, text=True)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    config = tmp_path / "udiRoot.conf"
    config.write_text(f"imagePath={tmp_path}/images\n")
    return config


def test_import_forms_lookup_list_remove(store: Path, tmp_path: Path) -> None:
    tree = images.busybox_tree(tmp_path / "tree")
    first = cli(store, "image", "import", str(tree), "docker:busybox:dir", "--env", "FOO=bar",
                "--workdir", "/root")  # fmt: skip
    assert first.returncode == 0, first.stderr
    image_id = first.stdout.strip()
    assert len(image_id) == 64
    again = cli(store, "image", "import", str(tree), "busybox:again", "--env", "FOO=bar",
                "--workdir", "/root")  # fmt: skip
    assert again.stdout.strip() == image_id  # same content and metadata, same id
    other = cli(store, "image", "import", str(tree), "busybox:other")
    assert other.stdout.strip() != image_id  # other metadata, other image
    for suffix, mode in (("tar", "w"), ("tar.gz", "w:gz"), ("tar.xz", "w:xz")):
        archive = tmp_path / f"root.{suffix}"
        with tarfile.open(archive, mode) as tar:  # type: ignore[call-overload]
            tar.add(tree, arcname=".")
        done = cli(store, "image", "import", str(archive), f"custom:from-{suffix}")
        assert done.returncode == 0, done.stderr
    sqsh = Path(f"{tmp_path}/images/data/{image_id}.sqsh")
    done = cli(store, "image", "import", str(sqsh), "local:copy", "--env", "FOO=bar",
               "--workdir", "/root")  # fmt: skip
    assert done.stdout.strip() == image_id
    listed = cli(store, "image", "list").stdout
    assert "docker:busybox:dir\t" + image_id in listed
    assert "custom:from-tar.gz\t" in listed
    assert cli(store, "image", "lookup", "busybox:dir").stdout.strip() == image_id
    meta = image.Store(f"{tmp_path}/images").get(image_id).metadata
    assert meta.env["FOO"] == "bar" and meta.workdir == "/root"
    assert [n for n in os.listdir(f"{tmp_path}/images") if n.startswith(".import")] == []
    for name in ("docker:busybox:dir", "busybox:again", "local:copy"):
        assert cli(store, "image", "remove", name).returncode == 0
    assert not sqsh.exists()  # the last name went, so did the data
    assert cli(store, "image", "lookup", "busybox:dir").returncode == 3


def test_hostile_tar_is_packed_not_extracted(store: Path, tmp_path: Path) -> None:
    """tar2sqfs never writes members to disk: ../ and symlinked parents touch nothing."""
    archive = tmp_path / "evil.tar"
    victim = tmp_path / "victim"
    with tarfile.open(archive, "w") as tar:
        link = tarfile.TarInfo("etc")
        link.type, link.linkname = tarfile.SYMTYPE, str(tmp_path)
        tar.addfile(link)
        data = b"pwned\n"
        member = tarfile.TarInfo("etc/victim")
        member.size = len(data)
        import io

        tar.addfile(member, io.BytesIO(data))
    done = cli(store, "image", "import", str(archive), "docker:evil")
    assert not victim.exists()
    assert done.returncode in (0, 2)


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["lookup", "docker:nosuch"], "shifter-sshd: image: no such image: docker:nosuch", 3),
        (["lookup", "a b"], "image name: malformed image name: 'a b'", 3),
        (["lookup", "docker:../../etc"], "malformed image name: docker:../../etc", 3),
        (["lookup", ""], "malformed image name: ''", 3),
        (["import", "/nonexistent", "docker:x"], "image import: source not found: /nonexistent", 2),
        (
            ["import", "/etc/hostname", "docker:x"],
            "not a directory, tar archive or squashfs: /etc/hostname",
            2,
        ),
        (
            ["import", "/etc", "docker:x", "--env", "NOPE"],
            "image import --env: expected NAME=value",
            2,
        ),
        (
            ["import", "/etc", "docker:x", "--env", "A=1\nPermitRootLogin yes"],
            "image import --env: control character in value: '1\\nPermitRootLogin yes'",
            2,
        ),
        (
            ["import", "/etc", "docker:x", "--workdir", "/a\x1b[2J"],
            "image import --workdir: control character in value",
            2,
        ),
        (["remove", "docker:nosuch"], "no such image: docker:nosuch", 3),
    ],
)
def test_image_errors(store: Path, args: list[str], message: str, code: int) -> None:
    done = cli(store, "image", *args)
    assert done.returncode == code, done.stderr
    assert message in done.stderr


def test_corrupt_squashfs_refused(store: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.sqsh"
    bad.write_bytes(b"hsqs" + b"\0" * 200)
    done = cli(store, "image", "import", str(bad), "docker:bad")
    assert done.returncode == 2
    assert "unsquashfs failed" in done.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("docker:ubuntu:22.04", ("docker", "ubuntu:22.04")),
        ("ubuntu:22.04", ("docker", "ubuntu:22.04")),
        ("ubuntu:latest", ("docker", "ubuntu:latest")),
        ("custom:site/image", ("custom", "site/image")),
        ("docker:nvcr.io/nvidia/pytorch:23.01-py3", ("docker", "nvcr.io/nvidia/pytorch:23.01-py3")),
    ],
)
def test_parse_name(text: str, expected: tuple[str, str]) -> None:
    name = image.parse_name(text)
    assert (name.type, name.tag) == expected


@pytest.mark.parametrize(
    "text", ["", "docker:", "docker:a//b", "-x", "a\nb", "docker:./x", "x" * 600]
)
def test_parse_name_refuses(text: str) -> None:
    with pytest.raises(ShifterError, match="malformed image name"):
        image.parse_name(text)


def test_the_store_is_readable_whatever_the_umask(user_tmp: Path) -> None:
    tmp_path = user_tmp
    store = user_tmp / "udiRoot.conf"
    store.write_text(f"imagePath={user_tmp}/images\n")
    store.chmod(0o644)
    tree = images.busybox_tree(tmp_path / "tree")
    done = subprocess.run(["sh", "-c", 'umask 077; exec "$@"', "sh", CLI, "--config",
                           str(store), "image", "import", str(tree), "docker:busybox:umask"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    images_dir = tmp_path / "images"
    for path in [images_dir, *images_dir.rglob("*")]:
        if path.name.startswith(".") or path.name == ".lock":
            continue
        mode = path.stat().st_mode & 0o777
        assert mode in (0o755, 0o644), (path, oct(mode))
    lookup = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", CLI,
                             "--config", str(store), "image", "lookup", "docker:busybox:umask"],
                            capture_output=True, text=True)  # fmt: skip
    assert lookup.returncode == 0, lookup.stderr  # any user's submit-time lookup works


@pytest.mark.parametrize(("layout", "message"), [
    ("docker-save", "unreadable docker save archive"),
    ("oci-archive", "the index lists no manifest"),
    ("oci-directory", "the index lists no manifest"),
])  # fmt: skip
def test_broken_image_archives_fail_cleanly(store: Path, tmp_path: Path, layout: str,
                                            message: str) -> None:  # fmt: skip
    """Image archives import through the pull's path (tests/image/test_pull.py); a broken one
    is a one-line error, and nothing is left in the store."""
    source = tmp_path / "image"
    source.mkdir()
    if layout == "docker-save":
        (source / "manifest.json").write_text('[{"Layers": ["abc/layer.tar"]}]')
        (source / "abc").mkdir()
        (source / "abc" / "layer.tar").write_bytes(b"")
    else:
        (source / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        (source / "index.json").write_text("{}")
        (source / "blobs").mkdir()
    target = source
    if layout != "oci-directory":
        target = tmp_path / "image.tar.gz"
        with tarfile.open(target, "w:gz") as tar:
            tar.add(source, arcname=".")
    done = cli(store, "image", "import", str(target), "docker:archive:1")
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1
    data = tmp_path / "images" / "data"
    assert not data.exists() or not any(data.iterdir())
    assert not [p for p in (tmp_path / "images").iterdir() if p.name.startswith(".import-")]
