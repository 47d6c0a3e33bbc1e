"""Images from a real registry (Debian's docker-registry on 127.0.0.1, lab.registry):
names, layer semantics, the image config, the store's guarantees, every error."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import CLI, Node, in_root

from lab import VENV, images, registry
from lab.registry import File, Registry
from lab.users import LabUser

SHIFTERIMG = os.path.join(VENV, "bin", "shifterimg")
DIR, LINK, SYM = tarfile.DIRTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="shifter-sshd-pull-", dir="/var/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def reg(work: Path) -> Iterator[Registry]:
    started = Registry(work / "registry").start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def busybox_layout(work: Path) -> Path:
    tree = images.busybox_tree(work / "busybox-tree")
    layout = work / "busybox-layout"
    config: dict[str, object] = {"Env": ["PATH=/usr/bin:/bin", "FROM_IMAGE=yes"],
              "Entrypoint": ["/bin/echo"],
              "Cmd": ["hello from the image"], "WorkingDir": "/tmp", "User": "1000",
              "Labels": {"org.example.team": "lab"}}  # fmt: skip
    blob = registry.from_tree_layer(tree)
    return registry.write_layout(layout, [registry.image_manifest(layout, [blob], config)])


def _config(path: Path, reg: Registry, *extra: str) -> str:
    path.mkdir(exist_ok=True)
    config = path / "udiRoot.conf"
    lines = [f"imagePath={path}/images", f"insecureRegistries={reg.address}", *extra]
    config.write_text("\n".join(lines) + "\n")
    return str(config)


def _cli(config: str, *args: str, binary: str = CLI) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary, "--config", config, *args], capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip


def _nothing_partial(store: Path) -> None:
    assert [p.name for p in store.iterdir() if p.name.startswith((".pull-", ".import-"))
            and p.is_dir()] == []  # fmt: skip


def _tree(squashfs: Path) -> dict[str, str]:
    """path -> what it is (content for files, target for links) in a squashfs."""
    listing = subprocess.run(["unsquashfs", "-lls", "-d", "", str(squashfs)], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    found = {}
    for line in listing.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 6 or not fields[5].startswith("/"):
            continue
        path = fields[5]
        if fields[0].startswith("l"):
            link, _arrow, target = path.partition(" -> ")
            found[link] = f"-> {target}"
            continue
        if fields[0].startswith("d"):
            found[path] = "dir"
        else:
            cat = subprocess.run(["unsquashfs", "-cat", str(squashfs), path], capture_output=True,
                                 check=True).stdout  # fmt: skip
            found[path] = cat.decode(errors="replace")
    return found


def test_pull_runs_with_the_images_config(
    work: Path, reg: Registry, busybox_layout: Path, node: Node, test_users: list[LabUser]
) -> None:
    reg.push(busybox_layout, "lab/busybox", "1")
    name = f"docker:{reg.address}/lab/busybox:1"
    node.write_config(insecureRegistries=reg.address)
    done = _cli(node.config, "image", "pull", name)
    assert done.returncode == 0, done.stderr
    listed = _cli(node.config, "image", "list", "--long").stdout
    assert "label org.example.team: lab" in listed and "workdir: /tmp" in listed
    assert "command: /bin/echo hello from the image" in listed and "user: 1000" in listed
    user = test_users[0]
    env = node.job_env("401", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=name)
    assert node.prolog(env).returncode == 0
    inside = in_root(node.root("401"), user.uid, [user.gid], "grep PRETTY /etc/os-release")
    assert "BusyBox test root" in inside.stdout
    described = json.loads(Path(node.state_path, "401.container").read_text())
    assert described["env"]["FROM_IMAGE"] == "yes" and described["workdir"] == "/tmp"
    assert described["command"] == ["/bin/echo", "hello from the image"]
    assert node.epilog("401").returncode == 0
    assert node.leftovers() == []


def test_a_second_pull_downloads_nothing_and_concurrent_pulls_download_once(
    work: Path, reg: Registry, busybox_layout: Path
) -> None:
    reg.push(busybox_layout, "lab/once", "1")
    config = _config(work / "once", reg)
    name = f"docker:{reg.address}/lab/once:1"
    before = reg.blob_gets()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _n: _cli(config, "image", "pull", name), range(4)))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert len({r.stdout for r in results}) == 1
    assert reg.blob_gets() - before == 2  # the config and the one layer, once
    again = _cli(config, "image", "pull", name)
    assert "up to date" in again.stderr and reg.blob_gets() - before == 2
    _nothing_partial(work / "once" / "images")


def test_layers_merge_as_the_image_spec_says(work: Path, reg: Registry) -> None:
    """Whiteouts, opaque directories, hard links within and across layers, a file
    deleted then re-added, a directory replacing a file, symlinks, device nodes."""
    layers = [
        registry.layer([
            File("a", kind=DIR, mode=0o755), File("a/old", b"old"), File("a/sub", kind=DIR),
            File("a/sub/deep", b"deep"), File("b", kind=DIR), File("b/gone", b"gone"),
            File("b/kept", b"kept"), File("c", kind=DIR), File("c/target", b"shared"),
            File("c/link", kind=LINK, link="c/target"), File("d", kind=DIR),
            File("d/again", b"first"), File("e", b"a file"), File("s", kind=SYM, link="c/target"),
            File("dev", kind=DIR), File("dev/null", kind=tarfile.CHRTYPE),
            File("h", kind=DIR), File("h/orig", b"original", mode=0o4755),
        ]),
        registry.layer([
            File("a/.wh..wh..opq"), File("a/new", b"new"), File("b/.wh.gone"),
            File("d/.wh.again"), File("e", kind=DIR), File("e/inside", b"inside"),
            File("h/hard", kind=LINK, link="h/orig"),
        ]),
        registry.layer([
            File("d/again", b"second"), File("h/.wh.orig"), File("c/.wh.link"),
            File("x/y/z", b"implicit parents"),
        ]),
    ]  # fmt: skip
    layout = work / "whiteouts"
    registry.write_layout(layout, [registry.image_manifest(layout, layers, {})])
    reg.push(layout, "lab/whiteouts", "1")
    config = _config(work / "whiteouts-store", reg)
    done = _cli(config, "image", "pull", f"docker:{reg.address}/lab/whiteouts:1")
    assert done.returncode == 0, done.stderr
    squashfs = next((work / "whiteouts-store" / "images" / "data").glob("*.sqsh"))
    tree = _tree(squashfs)
    assert tree == {
        "/a": "dir",
        "/a/new": "new",  # opaque: old and sub/ hidden, new kept
        "/b": "dir",
        "/b/kept": "kept",  # gone: whited out
        "/c": "dir",
        "/c/target": "shared",  # the link whited out, its target stays
        "/d": "dir",
        "/d/again": "second",  # deleted, then added again
        "/e": "dir",
        "/e/inside": "inside",  # a directory replacing a file
        "/s": "-> c/target",
        "/dev": "dir",  # device nodes left out
        "/h": "dir",
        "/h/hard": "original",  # its target deleted: the link keeps the data
        "/x": "dir",
        "/x/y": "dir",
        "/x/y/z": "implicit parents",
    }, tree
    modes = subprocess.run(["unsquashfs", "-lls", str(squashfs), "/h/hard"], capture_output=True,
                           text=True, check=True).stdout  # fmt: skip
    assert "-rwsr-xr-x" in modes  # setuid kept in the image (nosuid neutralises it)


def test_the_same_digest_gives_the_same_squashfs(work: Path, reg: Registry,
                                                 busybox_layout: Path) -> None:  # fmt: skip
    reg.push(busybox_layout, "lab/repro", "1")
    digests = []
    for store in ("repro1", "repro2"):
        config = _config(work / store, reg)
        assert _cli(config, "image", "pull", f"docker:{reg.address}/lab/repro:1").returncode == 0
        squashfs = next((work / store / "images" / "data").glob("*.sqsh"))
        digests.append(hashlib.sha256(squashfs.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_a_multi_arch_index_gives_this_nodes_platform(work: Path, reg: Registry) -> None:
    layout = work / "multiarch"
    manifests = [registry.image_manifest(layout, [registry.layer([File("arch", arch.encode())])],
                                         {}, architecture=arch)
                 for arch in ("arm64", "amd64", "ppc64le")]  # fmt: skip
    registry.write_index_layout(layout, manifests)
    reg.push(layout, "lab/multi", "1", index=True)
    config = _config(work / "multi", reg)
    assert _cli(config, "image", "pull", f"docker:{reg.address}/lab/multi:1").returncode == 0
    squashfs = next((work / "multi" / "images" / "data").glob("*.sqsh"))
    machine = {"x86_64": "amd64", "aarch64": "arm64"}[os.uname().machine]
    assert _tree(squashfs)["/arch"] == machine


def test_a_private_registry_needs_the_auth_file(work: Path, busybox_layout: Path) -> None:
    private = Registry(work / "private", auth=("labuser", "s3cret")).start()
    try:
        private.push(busybox_layout, "team/app", "1")
        name = f"docker:{private.address}/team/app:1"
        config = _config(work / "private-store", private)
        refused = _cli(config, "image", "pull", name)
        assert refused.returncode != 0 and "not authorized (registryAuthFile)" in refused.stderr
        auth = work / "auth.json"
        token = base64.b64encode(b"labuser:s3cret").decode()
        auth.write_text(json.dumps({"auths": {private.address: {"auth": token}}}))
        auth.chmod(0o600)
        config = _config(work / "private-store", private, f"registryAuthFile={auth}")
        done = _cli(config, "image", "pull", name)
        assert done.returncode == 0, done.stderr
    finally:
        private.stop()


def test_errors_name_the_image_and_leave_nothing(work: Path, reg: Registry,
                                                 busybox_layout: Path) -> None:  # fmt: skip
    store = work / "errors"
    config = _config(store, reg)
    cases = [
        (f"docker:{reg.address}/lab/nosuch:1", "no such image or tag"),
        ("docker:127.0.0.1:9/lab/x:1", "registry unreachable"),
        (f"docker:{reg.address}/lab/UPPER:1", "malformed repository name"),
        ("docker:ubuntu@sha256:abc", "malformed digest"),
    ]
    for name, cause in cases:
        done = _cli(config, "image", "pull", name)
        assert done.returncode != 0 and cause in done.stderr, (name, done.stderr)
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("shifter-sshd: image")
    reg.push(busybox_layout, "lab/plain", "1")
    plain = _cli(_config(store, reg), "image", "pull", f"docker:{reg.address}/lab/plain:1")
    assert plain.returncode == 0
    strict = store / "strict.conf"
    strict.write_text(f"imagePath={store}/images\n")  # the registry is not listed as insecure
    done = _cli(str(strict), "image", "pull", f"docker:{reg.address}/lab/plain:1")
    assert "speaks plain HTTP: list it in insecureRegistries" in done.stderr
    _nothing_partial(store / "images")


def test_digest_mismatch_and_no_space(work: Path, busybox_layout: Path) -> None:
    own = Registry(work / "corrupt").start()
    try:
        own.push(busybox_layout, "lab/bad", "1")
        blobs = sorted((own.directory / "data").rglob("blobs/sha256/*/*/data"),
                       key=lambda p: p.stat().st_size)  # fmt: skip
        biggest = blobs[-1]  # the layer
        biggest.write_bytes(biggest.read_bytes()[:-10] + b"0123456789")
        store = work / "corrupt-store"
        done = _cli(_config(store, own), "image", "pull", f"docker:{own.address}/lab/bad:1")
        assert done.returncode != 0 and "digest mismatch" in done.stderr, done.stderr
        _nothing_partial(store / "images")
        assert not list((store / "images" / "data").glob("*"))
    finally:
        own.stop()
    tiny = work / "tiny"
    tiny.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tiny", str(tiny)], check=True)
    try:
        space = Registry(work / "space").start()
        try:
            space.push(busybox_layout, "lab/big", "1")
            config = tiny / "udiRoot.conf"
            config.write_text(f"imagePath={tiny}/images\ninsecureRegistries={space.address}\n")
            done = _cli(str(config), "image", "pull", f"docker:{space.address}/lab/big:1")
            assert done.returncode != 0 and "not enough space in the image store" in done.stderr
            _nothing_partial(tiny / "images")
        finally:
            space.stop()
    finally:
        subprocess.run(["umount", str(tiny)], check=True)


def test_a_moved_tag_keeps_the_old_image_until_gc(work: Path, reg: Registry) -> None:
    store = work / "moves"
    config = _config(store, reg)
    ids = []
    for content in (b"one", b"two"):
        layout = work / f"moves-{content.decode()}"
        layer = registry.layer([File("version", content)])
        registry.write_layout(layout, [registry.image_manifest(layout, [layer], {})])
        reg.push(layout, "lab/moves", "latest")
        done = _cli(config, "image", "pull", f"docker:{reg.address}/lab/moves")
        assert done.returncode == 0, done.stderr
        ids.append(done.stdout.strip())
    assert ids[0] != ids[1]
    data = store / "images" / "data"
    assert (data / f"{ids[0]}.sqsh").exists()  # a job submitted with it still runs it
    state = work / "moves-state"
    state.mkdir()
    (state / "77.json").write_text(json.dumps({"job_id": "77", "root": "/r", "scratch": "/s",
                                               "image_id": ids[0]}))  # fmt: skip
    with_state = _config(store, reg, f"statePath={state}")
    assert _cli(with_state, "image", "gc").stdout == ""  # a container here uses it
    (state / "77.json").unlink()
    assert _cli(with_state, "image", "gc").stdout == f"removed {ids[0]}\n"
    assert not (data / f"{ids[0]}.sqsh").exists() and (data / f"{ids[1]}.sqsh").exists()


def test_shifterimg_verbs(work: Path, reg: Registry, busybox_layout: Path,
                          test_users: list[LabUser]) -> None:  # fmt: skip
    reg.push(busybox_layout, "lab/verbs", "2")
    config = _config(work / "verbs", reg)
    name = f"docker:{reg.address}/lab/verbs:2"
    pulled = _cli(config, "pull", name, binary=SHIFTERIMG)
    assert pulled.returncode == 0 and "pulled" in pulled.stdout, pulled.stderr
    assert "up to date" in _cli(config, "pull", name, binary=SHIFTERIMG).stdout
    listed = _cli(config, "images", binary=SHIFTERIMG).stdout
    assert f"{reg.address}/lab/verbs:2" in listed and "READY" in listed
    image_id = _cli(config, "lookup", name, binary=SHIFTERIMG).stdout.strip()
    user = test_users[0]
    as_user = subprocess.run(["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}",
                              "--clear-groups", SHIFTERIMG, "--config", config, "pull", name],
                             capture_output=True, text=True, check=False)  # fmt: skip
    assert as_user.returncode == 3 and "ask them to pull it" in as_user.stderr
    lookup = subprocess.run(["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}",
                             "--clear-groups", SHIFTERIMG, "--config", config, "lookup", name],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert lookup.stdout.strip() == image_id and len(image_id) == 64


@pytest.mark.parametrize("form", ["oci-directory", "oci-archive", "docker-save"])
def test_import_of_image_archives(work: Path, busybox_layout: Path, form: str) -> None:
    store = work / f"import-{form}"
    store.mkdir()
    config = store / "udiRoot.conf"
    config.write_text(f"imagePath={store}/images\n")
    source: Path = busybox_layout
    if form == "oci-archive":
        source = store / "image.tar"
        with tarfile.open(source, "w") as tar:
            tar.add(busybox_layout, arcname=".")
    elif form == "docker-save":
        source = _docker_save(busybox_layout, store / "saved.tar")
    done = _cli(str(config), "image", "import", str(source), "docker:imported:1")
    assert done.returncode == 0, done.stderr
    listed = _cli(str(config), "image", "list", "--long").stdout
    assert "command: /bin/echo hello from the image" in listed
    squashfs = next((store / "images" / "data").glob("*.sqsh"))
    assert "BusyBox test root" in _tree(squashfs)["/etc/os-release"]


def _docker_save(layout: Path, target: Path) -> Path:
    """What ``docker save`` writes for the layout's image: manifest.json, config, layers."""
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    config = manifest["config"]["digest"][7:]
    layers = [layer["digest"][7:] for layer in manifest["layers"]]
    entries = [{"Config": f"{config}.json", "RepoTags": ["imported:1"],
                "Layers": [f"{d}/layer.tar" for d in layers]}]  # fmt: skip
    with tarfile.open(target, "w") as tar:
        members = [("manifest.json", json.dumps(entries).encode()),
                   (f"{config}.json", (blobs / config).read_bytes())]  # fmt: skip
        members += [(f"{d}/layer.tar", (blobs / d).read_bytes()) for d in layers]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return target


def test_a_mirror_is_asked_first(work: Path, reg: Registry, busybox_layout: Path) -> None:
    """registryMirrors: the image comes from the mirror while its registry is down."""
    mirror = Registry(work / "mirror").start()
    try:
        mirror.push(busybox_layout, "lab/mirrored", "1")
        down = "127.0.0.1:9"  # nothing listens there
        config = _config(work / "mirrored", mirror, f"registryMirrors={down}={mirror.address}",
                         f"insecureRegistries={down}")  # fmt: skip
        done = _cli(config, "image", "pull", f"docker:{down}/lab/mirrored:1")
        assert done.returncode == 0, done.stderr
        assert mirror.blob_gets() == 2
    finally:
        mirror.stop()


def test_an_unsupported_layer_type_is_refused(work: Path, reg: Registry) -> None:
    layout = work / "foreign"
    registry.write_layout(layout, [registry.image_manifest(layout, [registry.layer([
        File("x", b"x")])], {}, layer_type="application/vnd.example.encrypted+gzip")])  # fmt: skip
    reg.push(layout, "lab/foreign", "1")
    store = work / "foreign-store"
    done = _cli(_config(store, reg), "image", "pull", f"docker:{reg.address}/lab/foreign:1")
    assert done.returncode != 0
    assert "unsupported layer media type: application/vnd.example.encrypted+gzip" in done.stderr
    _nothing_partial(store / "images")
    assert not list((store / "images" / "data").glob("*"))


def test_an_import_changed_by_options_is_not_known_by_the_registry_digest(
    work: Path, busybox_layout: Path
) -> None:
    """Imported as it is, a layout keeps its manifest digest (a later pull of that digest
    finds it); with --env it is another image, which the digest must not name."""
    for extra, has_digest in (([], True), (["--env", "FOO=1"], False)):
        store = work / f"import-digest-{has_digest}"
        store.mkdir()
        config = store / "udiRoot.conf"
        config.write_text(f"imagePath={store}/images\n")
        done = _cli(str(config), "image", "import", str(busybox_layout), "docker:x:1", *extra)
        assert done.returncode == 0, done.stderr
        listed = _cli(str(config), "image", "list", "--long").stdout
        assert ("digest: sha256:" in listed) == has_digest, listed
        assert (store / "images" / "digests").is_dir() == has_digest
