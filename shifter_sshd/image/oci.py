"""OCI image layouts (what ``skopeo copy ... oci:DIR`` writes) and ``docker save`` archives:
the manifest for this node's platform, its layers, and the image config.

Everything read here is untrusted input: sizes are bounded, blobs are named by
digest only (never by a path from a file), and every media type is checked.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from ..errors import usage_error
from . import names as imageref

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")  # fmt: skip
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")  # fmt: skip
LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)  # fmt: skip
MAX_JSON = 4 << 20
# First bytes of the tar compressions tar2sqfs reads.
COMPRESSED_TAR = (b"\x1f\x8b", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd", b"BZh")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass
class Image:
    """One platform's image: its layers (files, lowest first) and its config."""

    digest: str  # the manifest's, which names this image in the store
    layers: list[str]
    env: dict[str, str] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)  # ENTRYPOINT + CMD
    workdir: str | None = None
    user: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    platform: str = ""


def _json(path: str, what: str) -> dict[str, object]:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_JSON + 1)
        raw = json.loads(data)
    except (OSError, ValueError) as err:
        raise usage_error("image", f"unreadable {what} ({err})", path) from None
    if len(data) > MAX_JSON or not isinstance(raw, dict):
        raise usage_error("image", f"not a valid {what}", path)
    return raw


def _blob(layout: str, digest: object) -> str:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise usage_error("image", "malformed digest in the image", str(digest))
    return os.path.join(layout, "blobs", "sha256", digest.removeprefix("sha256:"))


def read_layout(layout: str, want: tuple[str, str] | None = None) -> Image:
    """The image in an OCI layout directory, for ``want`` = (os, architecture)."""
    index = _json(os.path.join(layout, "index.json"), "OCI index")
    descriptor = pick_manifest(index, want or imageref.platform(), layout)
    for _depth in range(4):  # an index may point at an index
        media = descriptor.get("mediaType")
        if media in MANIFEST_TYPES:
            break
        if media not in INDEX_TYPES:
            raise usage_error("image", "unsupported media type", str(media))
        index = _json(_blob(layout, descriptor.get("digest")), "image index")
        descriptor = pick_manifest(index, want or imageref.platform(), layout)
    manifest = _json(_blob(layout, descriptor.get("digest")), "image manifest")
    return _image(layout, str(descriptor.get("digest")), manifest)


def pick_manifest(index: dict[str, object], want: tuple[str, str], where: str) -> dict[str, object]:
    """The manifest for ``want`` (or the only one there is)."""
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise usage_error("image", "the index lists no manifest", where)
    if len(manifests) == 1 and not isinstance(manifests[0].get("platform"), dict):
        return dict(manifests[0])
    for entry in manifests:
        platform = entry.get("platform") if isinstance(entry, dict) else None
        if isinstance(platform, dict) and (platform.get("os"), platform.get("architecture")) \
                == want:  # fmt: skip
            return dict(entry)
    platforms = [e.get("platform") for e in manifests if isinstance(e, dict)]
    offered = sorted({f"{p.get('os')}/{p.get('architecture')}" for p in platforms
                      if isinstance(p, dict)})  # fmt: skip
    raise usage_error("image", f"no manifest for {want[0]}/{want[1]} (the image has "
                      f"{', '.join(offered) or 'none'})", where)  # fmt: skip


def _image(layout: str, digest: str, manifest: dict[str, object]) -> Image:
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise usage_error("image", "the manifest lists no layers", digest)
    paths = []
    for layer in layers:
        media = layer.get("mediaType") if isinstance(layer, dict) else None
        if media not in LAYER_TYPES:
            raise usage_error("image", "unsupported layer media type", str(media))
        paths.append(_blob(layout, layer.get("digest")))
    config = manifest.get("config")
    raw = _json(_blob(layout, config.get("digest") if isinstance(config, dict) else None),
                "image config")  # fmt: skip
    return from_config(raw, digest, paths)


def from_config(raw: dict[str, object], digest: str, layers: list[str]) -> Image:
    """The image config's ENV, ENTRYPOINT/CMD, WORKDIR, USER and LABELs, checked."""
    settings = raw.get("config") if isinstance(raw.get("config"), dict) else {}
    assert isinstance(settings, dict)
    image = Image(digest, layers, platform=f"{raw.get('os', '')}/{raw.get('architecture', '')}")
    for item in settings.get("Env") or []:
        name, sep, value = str(item).partition("=")
        if sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and _printable(value):
            image.env[name] = value
    command = [*(settings.get("Entrypoint") or []), *(settings.get("Cmd") or [])]
    image.command = [str(c) for c in command if _printable(str(c))]
    workdir = settings.get("WorkingDir")
    image.workdir = workdir if isinstance(workdir, str) and workdir.startswith("/") \
        and _printable(workdir) else None  # fmt: skip
    user = settings.get("User")
    image.user = user if isinstance(user, str) and user and _printable(user) else None
    labels = settings.get("Labels") or {}
    if isinstance(labels, dict):
        image.labels = {str(k): str(v) for k, v in labels.items()
                        if _printable(str(k)) and _printable(str(v))}  # fmt: skip
    return image


def _printable(text: str) -> bool:
    return not any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in text)


def read_docker_archive(archive: str, scratch: str) -> Image:
    """A ``docker save`` tar: its layers copied out (by member, never extracted by name)."""
    import hashlib
    import tarfile

    try:
        with tarfile.open(archive, "r:*") as tar:
            manifest = _member_json(tar, "manifest.json")
            if not isinstance(manifest, list) or len(manifest) != 1:
                raise usage_error("image import", "docker save archive with other than one "
                                  "image", archive)  # fmt: skip
            entry = manifest[0]
            config = _member_json(tar, str(entry.get("Config")))
            layers = []
            for number, name in enumerate(entry.get("Layers") or []):
                target = os.path.join(scratch, f"layer{number}.tar")
                member = tar.extractfile(str(name))
                if member is None:
                    raise usage_error("image import", "missing layer in the archive", str(name))
                with open(target, "wb") as out:
                    while chunk := member.read(1 << 20):
                        out.write(chunk)
                layers.append(target)
            digest = "sha256:" + hashlib.sha256(json.dumps(manifest).encode()).hexdigest()
    except (tarfile.TarError, KeyError, OSError) as err:
        raise usage_error("image import", f"unreadable docker save archive ({err})",
                          archive) from None  # fmt: skip
    if not isinstance(config, dict):
        raise usage_error("image import", "unreadable image config", archive)
    return from_config(config, digest, layers)


def _member_json(tar: object, name: str) -> object:
    import tarfile

    assert isinstance(tar, tarfile.TarFile)
    member = tar.extractfile(name)
    if member is None:
        raise KeyError(name)
    return json.loads(member.read(MAX_JSON))


# --- telling an image archive from a root filesystem ------------------------------------


def is_image_archive(source: str) -> bool:
    """An OCI layout directory or tar, or a ``docker save`` archive (not a root tree)."""
    if os.path.isdir(source):
        return _is_image_layout(set(os.listdir(source)))
    try:
        with open(source, "rb") as handle:
            head = handle.read(512)
    except OSError:
        return False
    if head.startswith(COMPRESSED_TAR) or head[257:262] == b"ustar":
        return _is_image_layout(_first_members(source))
    return False


def _is_image_layout(names: set[str]) -> bool:
    """``docker save`` (manifest.json and layer tars) or an OCI layout (oci-layout, blobs/)."""
    return "oci-layout" in names or ("manifest.json" in names and "etc" not in names) or (
        "index.json" in names and "blobs" in names)  # fmt: skip


def _first_members(path: str, count: int = 64) -> set[str]:
    """The top-level names among the first members of a (compressed) tar archive."""
    import tarfile

    names: set[str] = set()
    try:
        with tarfile.open(path, mode="r|*") as archive:
            for number, member in enumerate(archive):
                names.add(member.name.lstrip("./").split("/", 1)[0])
                if number >= count:
                    break
    except (tarfile.TarError, OSError, EOFError):
        return set()  # tar2sqfs will say what is wrong with it
    return names
