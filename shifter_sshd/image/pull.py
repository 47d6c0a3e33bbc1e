"""``shifter-sshd image pull``: a registry image into the store, through skopeo.

skopeo (containers/image, the registry client Podman uses) speaks the registry
protocol: authentication, mirrors' fallbacks, digest verification of every blob.
This module asks it two things: the manifest's digest for this node's platform
(``skopeo inspect --raw``), and the image at that digest as an OCI layout in a
private directory of the store. Then ``layers`` merges the layers into a squashfs
and the store commits it under the name, all or nothing.

A pull is idempotent by digest: when the store holds the image of that manifest
already, only the name moves (nothing is downloaded). Pulls of one digest take
turns on a lock file, so concurrent pulls download once. Every failure is one line
naming the image and the cause, and leaves nothing in the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile

from .. import log
from ..errors import ShifterError, node_error, usage_error, user_error
from . import layers, oci
from . import names as imageref
from . import store as image

TYPE_CHECKING = False  # typing costs ~3 ms; mypy knows this name
if TYPE_CHECKING:
    from ..config.udiroot import Config

SKOPEO = "skopeo"
TIMEOUT = 1800  # seconds for one skopeo command
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}  # nothing of the caller's
EXPANSION = 4  # free space wanted per compressed byte: the plain layers and the squashfs
_CAUSES = (  # skopeo's words -> ours
    ("connection refused", "registry unreachable"), ("no such host", "registry unreachable"),
    ("i/o timeout", "registry unreachable"), ("manifest unknown", "no such image or tag"),
    ("name unknown", "no such image or tag"), ("not found", "no such image or tag"),
    ("unauthorized", "not authorized (registryAuthFile)"),
    ("authentication required", "not authorized (registryAuthFile)"),
    ("http response to https client", "the registry speaks plain HTTP: list it in "
     "insecureRegistries"),
    ("digest", "digest mismatch: the registry sent other data than its manifest names"),
)  # fmt: skip


def pull(config: Config, name: str) -> tuple[image.Record, bool]:
    """Pull ``name`` (``docker:...``); the record, and whether anything was downloaded."""
    parsed = image.parse_name(name, config.default_image_type)
    if parsed.type != "docker":
        raise usage_error("image pull", "only docker: images come from registries", name)
    ref = imageref.parse(parsed.tag, config.default_registry)
    store = image.Store.from_config(config)
    store.make_dirs()
    manifest, digest, source = _resolve(config, ref, str(parsed))
    found = store.by_digest(digest)
    if found is None:
        with _locked(store, digest):
            found = store.by_digest(digest)  # another pull of it may have just finished
            if found is None:
                return _fetch(config, store, str(parsed), ref, digest, manifest, source), True
    store.name(str(parsed), found.id)
    return store.get(found.id, name=str(parsed)), False


def _resolve(config: Config, ref: imageref.Reference,
             name: str) -> tuple[dict[str, object], str, str]:  # fmt: skip
    """(this platform's manifest, its digest, the registry that answered)."""
    raw, registry = _skopeo_first(config, ref, name, lambda r: ["inspect", "--raw", r])
    digest = ref.digest if ref.digest and not _is_index(raw) else _digest(raw)
    if _is_index(raw):
        index = _loads(raw, name)
        chosen = _choose(index, name)
        digest = str(chosen.get("digest"))
        pinned = imageref.Reference(ref.registry, ref.repository, None, digest)
        raw, registry = _skopeo_first(config, pinned, name, lambda r: ["inspect", "--raw", r])
        if _digest(raw) != digest:
            raise user_error("image pull", f"{name}: digest mismatch: the registry sent other "
                             "data than its index names", digest)  # fmt: skip
    return _loads(raw, name), digest, registry


def _is_index(raw: bytes) -> bool:
    try:
        media = json.loads(raw).get("mediaType")
    except (ValueError, AttributeError):
        return False
    return media in oci.INDEX_TYPES or b'"manifests"' in raw[:4096]


def _choose(index: dict[str, object], name: str) -> dict[str, object]:
    try:
        return oci.pick_manifest(index, imageref.platform(), name)
    except ShifterError as err:
        raise user_error("image pull", f"{name}: {err.what}", err.value) from None


def _digest(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _loads(raw: bytes, name: str) -> dict[str, object]:
    try:
        value = json.loads(raw)
    except ValueError:
        raise user_error("image pull", f"{name}: the registry sent no valid manifest",
                         raw[:60].decode(errors="replace")) from None  # fmt: skip
    if not isinstance(value, dict):
        raise user_error("image pull", f"{name}: the registry sent no valid manifest", "")
    return value


def _fetch(config: Config, store: image.Store, name: str, ref: imageref.Reference,
           digest: str, manifest: dict[str, object], registry: str) -> image.Record:  # fmt: skip
    media = manifest.get("mediaType")
    if media is not None and media not in oci.MANIFEST_TYPES:
        raise user_error("image pull", f"{name}: unsupported media type", str(media))
    _check_space(store, manifest, name)
    work = tempfile.mkdtemp(dir=store.root, prefix=".pull-")
    os.chmod(work, 0o700)  # nothing of the image is anyone else's business on the way
    try:
        layout = os.path.join(work, "layout")
        pinned = imageref.Reference(ref.registry, ref.repository, None, digest)
        _skopeo(config, registry, name, ["copy", "--quiet", *_flags(config, registry, "src"),
                pinned.transport(registry), f"oci:{layout}:image"])  # fmt: skip
        pulled = oci.read_layout(layout)
        partial = _squashfs(config, pulled, work, name, owned=True)
        return store.add_squashfs(partial, metadata(pulled), (name,), str(ref), digest)
    except ShifterError as err:
        raise ShifterError("image pull", f"{name}: {err.what}", err.value, err.kind) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _squashfs(config: Config, pulled: oci.Image, work: str, name: str, owned: bool) -> str:
    """The image's layers, decompressed into ``work``, merged into ``work/image.sqsh``.
    ``owned``: the blobs are this pull's copies, removed once read (half the space)."""
    plain = []
    for number, blob in enumerate(pulled.layers):
        plain.append(os.path.join(work, f"plain{number}.tar"))
        layers.decompress(blob, plain[-1])
        if owned:
            os.unlink(blob)
    partial = os.path.join(work, "image.sqsh")
    dropped = layers.to_squashfs(plain, partial, config.keep_device_nodes)
    if dropped:
        log.info(f"image: {name}: {dropped} device node(s) or unsafe entries left out")
    return partial


def metadata(pulled: oci.Image) -> image.Metadata:
    """The image config as the store keeps it: ENV over the default PATH."""
    env = {**image.DEFAULT_ENV, **pulled.env}
    labels = tuple(sorted(pulled.labels.items()))
    return image.Metadata(env=env, workdir=pulled.workdir, command=tuple(pulled.command),
                          user=pulled.user, labels=labels)  # fmt: skip


def _check_space(store: image.Store, manifest: dict[str, object], name: str) -> None:
    layers_ = manifest.get("layers")
    size = sum(int(layer.get("size", 0)) for layer in layers_ if isinstance(layer, dict)) \
        if isinstance(layers_, list) else 0  # fmt: skip
    info = os.statvfs(store.root)
    free = info.f_bavail * info.f_frsize
    if size * EXPANSION > free:
        raise node_error("image pull", f"{name}: not enough space in the image store (needs "
                         f"about {size * EXPANSION >> 20} MiB, {free >> 20} MiB free)",
                         store.root)  # fmt: skip


def _locked(store: image.Store, digest: str) -> image.FileLock:
    """One pull per digest at a time, across processes (and nodes, on a shared store
    whose filesystem honours flock)."""
    return image.FileLock(os.path.join(store.root, f".pull-{digest.replace(':', '-')}.lock"))


# --- skopeo ----------------------------------------------------------------------------


def _mirrors(config: Config, registry: str) -> list[str]:
    """The registries to ask, in order: the configured mirrors, then the registry."""
    return [m for r, m in config.registry_mirrors if r == registry] + [registry]


def _flags(config: Config, registry: str, side: str) -> list[str]:
    """TLS and credentials for ``registry``; ``side`` is skopeo copy's src (or "" for inspect)."""
    prefix = f"--{side}-" if side else "--"
    flags = []
    if registry in config.insecure_registries:
        flags.append(f"{prefix}tls-verify=false")
    if config.registry_auth_file:
        flags.append(f"{prefix}authfile={config.registry_auth_file}")
    return flags


def _skopeo_first(config: Config, ref: imageref.Reference, name: str,
                  command: object) -> tuple[bytes, str]:  # fmt: skip
    """Run an inspect against each mirror, then the registry; the first answer wins."""
    failure: ShifterError | None = None
    for registry in _mirrors(config, ref.registry):
        argv = command(ref.transport(registry))  # type: ignore[operator]
        try:
            return _skopeo(config, registry, name, [argv[0], *_flags(config, registry, ""),
                                                    *argv[1:]]), registry  # fmt: skip
        except ShifterError as err:
            failure = err
            if registry != ref.registry:
                log.info(f"image pull: mirror {registry} failed for {name}: {err.what}")
    assert failure is not None
    raise failure


def _skopeo(config: Config, registry: str, name: str, args: list[str]) -> bytes:
    if shutil.which(SKOPEO) is None:
        raise node_error("image pull", "skopeo is not installed (apt install skopeo)", SKOPEO)
    try:
        done = subprocess.run([SKOPEO, *args], capture_output=True, timeout=TIMEOUT,
                              check=False, stdin=subprocess.DEVNULL,
                              env=ENV)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise user_error("image pull", f"{name}: registry unreachable (no answer within "
                         f"{TIMEOUT} s)", registry) from None  # fmt: skip
    if done.returncode != 0:
        raise user_error("image pull", f"{name}: {_cause(done.stderr)}", registry)
    return done.stdout


def _cause(stderr: bytes) -> str:
    text = stderr.decode(errors="replace").strip()
    last = text.splitlines()[-1] if text else "skopeo failed"
    message = last.split('msg="', 1)[-1].rstrip('"') if 'msg="' in last else last
    lowered = message.lower()
    for words, cause in _CAUSES:
        if words in lowered:
            return cause
    return message[:300]


def import_archive(config: Config, source: str, name: str,
                   overrides: image.Metadata) -> image.Record:  # fmt: skip
    """``image import`` of an OCI layout (directory or tar) or a ``docker save`` archive:
    the same layer merge as a pull, the image's own config, import's options on top."""
    store = image.Store.from_config(config)
    store.make_dirs()
    work = tempfile.mkdtemp(dir=store.root, prefix=".import-")
    os.chmod(work, 0o700)
    try:
        if os.path.isdir(source):
            pulled = oci.read_layout(source)
        elif _tar_has(source, "oci-layout"):
            layout = os.path.join(work, "layout")
            _unpack_layout(source, layout)
            pulled = oci.read_layout(layout)
        else:
            pulled = oci.read_docker_archive(source, work)
        partial = _squashfs(config, pulled, work, name, owned=not os.path.isdir(source))
        meta = metadata(pulled)
        env = {**meta.env, **{k: v for k, v in overrides.env.items()
                              if image.DEFAULT_ENV.get(k) != v}}  # fmt: skip
        merged = image.Metadata(env=env, entrypoint=overrides.entrypoint,
                                workdir=overrides.workdir or meta.workdir, command=meta.command,
                                user=meta.user, labels=meta.labels)  # fmt: skip
        # The digest names the image as its registry has it: not when options changed it.
        digest = pulled.digest if merged == meta else ""
        return store.add_squashfs(partial, merged, (name,), os.path.abspath(source), digest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tar_has(path: str, member: str) -> bool:
    import tarfile

    try:
        with tarfile.open(path, "r:*") as tar:
            return any(m.name.lstrip("./") == member for m in tar)
    except (tarfile.TarError, OSError):
        return False


def _unpack_layout(archive: str, layout: str) -> None:
    """An OCI layout tar's index and blobs, copied out by member (never extracted by the
    archive's own paths: only ``index.json``, ``oci-layout`` and ``blobs/sha256/<hex>``)."""
    import re
    import tarfile

    os.makedirs(os.path.join(layout, "blobs", "sha256"))
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            name = member.name.lstrip("./")
            if not member.isreg():
                continue
            wanted = name in ("index.json", "oci-layout") or re.fullmatch(
                r"blobs/sha256/[0-9a-f]{64}", name)  # fmt: skip
            if not wanted:
                continue
            target = os.path.join(layout, name)
            source = tar.extractfile(member)
            assert source is not None
            with open(target, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
