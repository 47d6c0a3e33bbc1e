"""A real registry for the tests: Debian's docker-registry (CNCF distribution) on
127.0.0.1, and OCI image layouts built here, pushed to it with skopeo.

Layers are gzip tars written with tarfile, so the tests choose exactly what each
layer holds (whiteouts, opaque directories, hard links). The Debian + Open MPI
image's layout is built from the cached squashfs (``sqfs2tar``) and cached next to
it, outside the checkout.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import CACHE

REGISTRY = "/usr/bin/docker-registry"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Registry:
    """A running registry; ``address`` is host:port. ``auth``: (user, password)."""

    directory: Path
    auth: tuple[str, str] | None = None
    port: int = field(default_factory=_free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / "registry.log"

    def start(self) -> Registry:
        self.directory.mkdir(parents=True, exist_ok=True)
        auth = ""
        if self.auth:
            htpasswd = self.directory / "htpasswd"
            subprocess.run(["htpasswd", "-Bbc", str(htpasswd), *self.auth], check=True,
                           capture_output=True)  # fmt: skip
            auth = f"auth:\n  htpasswd:\n    realm: lab\n    path: {htpasswd}\n"
        config = self.directory / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {self.directory}/data\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.address}\n{auth}"
        )
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([REGISTRY, "serve", str(config)], stdout=log,
                                            stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.05)
        raise RuntimeError(f"docker-registry did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def push(self, layout: Path, repository: str, tag: str = "latest",
             index: bool = False) -> None:  # fmt: skip
        """Copy the layout's image (or its whole index: ``index``) to repository:tag."""
        argv = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false"]
        if index:
            argv.append("--all")
        if self.auth:
            argv.append(f"--dest-creds={self.auth[0]}:{self.auth[1]}")
        argv += [f"oci:{layout}", f"docker://{self.address}/{repository}:{tag}"]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"skopeo copy to the lab registry: {done.stderr.strip()}")

    def blob_gets(self) -> int:
        """Blob downloads served so far (from its log)."""
        text = self.log.read_text(errors="replace")
        return sum(1 for line in text.splitlines()
                   if '"GET /v2/' in line and "/blobs/" in line and '" 200 ' in line)  # fmt: skip


# --- OCI layouts ------------------------------------------------------------------------------


@dataclass
class File:
    """One entry of a layer: a file, dir, symlink, hard link (``link``), or device."""

    path: str
    data: bytes = b""
    kind: bytes = tarfile.REGTYPE
    link: str = ""
    mode: int = 0o644


def layer(files: list[File]) -> bytes:
    """A gzip tar of ``files``, reproducible (mtime 0, fixed gzip header)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for item in files:
            info = tarfile.TarInfo(item.path)
            info.type, info.mode, info.mtime = item.kind, item.mode, 0
            info.linkname = item.link
            if item.kind == tarfile.CHRTYPE:
                info.devmajor, info.devminor = 1, 3
            info.size = len(item.data) if item.kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(item.data) if info.size else None)
    return gzip.compress(raw.getvalue(), mtime=0)


def _put_blob(layout: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def image_manifest(layout: Path, layers: list[bytes], config: dict[str, object],
                   architecture: str = "amd64",
                   layer_type: str = OCI_LAYER) -> dict[str, object]:  # fmt: skip
    """Blobs for one image; its manifest's descriptor (with its platform)."""
    diff_ids = [f"sha256:{hashlib.sha256(gzip.decompress(b)).hexdigest()}" for b in layers]
    full = {"architecture": architecture, "os": "linux", "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids}}  # fmt: skip
    manifest = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, **_put_blob(layout, json.dumps(full).encode())},
        "layers": [{"mediaType": layer_type, **_put_blob(layout, b)} for b in layers],
    }  # fmt: skip
    descriptor = _put_blob(layout, json.dumps(manifest).encode())
    return {"mediaType": OCI_MANIFEST, **descriptor,
            "platform": {"architecture": architecture, "os": "linux"}}  # fmt: skip


def write_layout(layout: Path, manifests: list[dict[str, object]]) -> Path:
    """index.json listing ``manifests`` (several: a multi-arch image)."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}))  # fmt: skip
    return layout


def write_index_layout(layout: Path, manifests: list[dict[str, object]]) -> Path:
    """A multi-arch image: an image index listing ``manifests``, as the layout's image."""
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    descriptor = _put_blob(layout, json.dumps(index).encode())
    return write_layout(layout, [{"mediaType": OCI_INDEX, **descriptor}])


def from_tree_layer(tree: Path) -> bytes:
    """A directory as one gzip layer (tar's own order; owner root)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(tree, arcname=".", filter=_as_root)
    return gzip.compress(raw.getvalue(), mtime=0, compresslevel=1)


def _as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def squashfs_layout(squashfs: Path, config: dict[str, object]) -> Path:
    """A one-layer OCI layout of a squashfs image, cached beside it (sqfs2tar | gzip)."""
    stamp = f"{squashfs.stat().st_size}-{squashfs.stat().st_mtime_ns}-"
    key = hashlib.sha256((stamp + json.dumps(config, sort_keys=True)).encode()).hexdigest()[:16]
    target = Path(CACHE) / f"{squashfs.stem}-oci-{key}"
    if target.is_dir():
        return target
    work = Path(tempfile.mkdtemp(dir=CACHE, prefix=".oci-"))
    try:
        with open(work / "layer.tar.gz", "wb") as out:
            tar = subprocess.Popen(["sqfs2tar", str(squashfs)], stdout=subprocess.PIPE)
            subprocess.run(["gzip", "-1", "-n"], stdin=tar.stdout, stdout=out, check=True)
            if tar.wait() != 0:
                raise RuntimeError(f"sqfs2tar {squashfs} failed")
        blob = (work / "layer.tar.gz").read_bytes()
        write_layout(work / "layout", [image_manifest(work / "layout", [blob], config)])
        os.rename(work / "layout", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
