"""The image store under ``imagePath``: squashfs files named by their content digest.

Layout::

    imagePath/data/<id>.sqsh     the image (id: sha256 over its digest and metadata)
    imagePath/data/<id>.json     its metadata (env, entrypoint, workdir, created)
    imagePath/names/<type>/<tag> the id a name points at (tag percent-encoded)

An import builds everything under a temporary name on the same filesystem and
renames it into place, so a reader (the prolog on another node, the SPANK plugin)
never sees a half-written image. Names are resolved at submission and the id is
pinned, so a job runs the image it was submitted with even if the name moves.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import ShifterError, node_error, usage_error, user_error
from .oci import COMPRESSED_TAR

TYPE_CHECKING = False  # importing typing costs every prolog ~3 ms; mypy knows this name
if TYPE_CHECKING:
    from ..config.udiroot import Config

IMAGE_TYPES = ("docker", "custom", "local")
DEFAULT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/@+-]*$")
_ID = re.compile(r"^[0-9a-f]{64}$")
SQUASHFS_MAGIC = b"hsqs"


@dataclass(frozen=True)
class ImageName:
    """``type:tag``; ``str()`` gives the canonical spelling."""

    type: str
    tag: str

    def __str__(self) -> str:
        return f"{self.type}:{self.tag}"


@dataclass(frozen=True)
class Metadata:
    env: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ENV))
    entrypoint: str | None = None  # a shell command (image import --entrypoint)
    workdir: str | None = None
    command: tuple[str, ...] = ()  # ENTRYPOINT + CMD of a pulled image, as argv
    user: str | None = None  # the image's USER: recorded, not used (jobs run as their owner)
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_raw(cls, raw: dict[str, object]) -> Metadata:
        """Stored metadata of any version: the fields this one knows."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        for name in ("command", "labels"):
            items = values.get(name)
            if isinstance(items, list):
                values[name] = tuple(tuple(i) if isinstance(i, list) else i for i in items)
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Record:
    """One stored image."""

    id: str
    path: str
    size: int
    created: str
    metadata: Metadata
    digest: str = ""  # the registry manifest's, for pulled images


def parse_name(text: str, default_type: str = "docker") -> ImageName:
    """``docker:ubuntu:22.04`` or ``ubuntu:22.04`` (type = defaultImageType)."""
    where = "image name"
    if not text or len(text) > 512 or any(c.isspace() or ord(c) < 32 for c in text):
        raise user_error(where, "malformed image name", repr(text))
    kind, sep, rest = text.partition(":")
    if sep and kind in (*IMAGE_TYPES, "id"):  # id:<digest>, Shifter's name for an image id
        image_type, tag = kind, rest
    else:
        image_type, tag = default_type, text
    if not _TAG.match(tag) or any(part in ("", ".", "..") for part in tag.split("/")):
        raise user_error(where, "malformed image name", text)
    return ImageName(image_type, tag)


def _no_control(where: str, value: str) -> str:
    """Values end up in sshd_config and in logs: no newline or other control character."""
    if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in value):
        raise usage_error(where, "control character in value", repr(value))
    return value


def parse_metadata_args(env: list[str], entrypoint: str | None, workdir: str | None) -> Metadata:
    merged = dict(DEFAULT_ENV)
    for item in env:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise usage_error("image import --env", "expected NAME=value", item)
        merged[name] = _no_control("image import --env", value)
    for where, given in (("--entrypoint", entrypoint), ("--workdir", workdir)):
        if given is not None:
            _no_control(f"image import {where}", given)
    if workdir is not None and not workdir.startswith("/"):
        raise usage_error("image import --workdir", "must be an absolute path", workdir)
    return Metadata(env=merged, entrypoint=entrypoint, workdir=workdir)


def _quote(tag: str) -> str:
    """A tag as one file name: everything but [A-Za-z0-9_.-] percent-encoded."""
    return "".join(
        c if c.isascii() and (c.isalnum() or c in "_.-") else f"%{ord(c):02X}" for c in tag
    )


def _unquote(name: str) -> str:
    return re.sub(r"%([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), name)


class Store:
    """The image store of one ``imagePath``."""

    def __init__(self, root: str, default_type: str = "docker") -> None:
        self.root = root
        self.default_type = default_type
        self.data = os.path.join(root, "data")
        self.names = os.path.join(root, "names")

    @classmethod
    def from_config(cls, config: Config) -> Store:
        return cls(config.image_path, config.default_image_type)

    # --- reading: used by the SPANK plugin (as the user) and the prolog -------------

    def lookup(self, name: str) -> Record:
        parsed = parse_name(name, self.default_type)
        if parsed.type == "id":
            return self.get(parsed.tag)
        try:
            with open(self._name_path(parsed), encoding="utf-8") as handle:
                image_id = json.load(handle)["id"]
        except FileNotFoundError:
            raise user_error("image", "no such image", str(parsed)) from None
        except (OSError, ValueError, KeyError) as err:
            raise node_error("image store", f"unreadable name entry ({err})", str(parsed)) from None
        return self.get(image_id, name=str(parsed))

    def get(self, image_id: str, name: str | None = None) -> Record:
        if not _ID.match(image_id):
            raise user_error("image", "malformed image id", image_id)
        path = os.path.join(self.data, f"{image_id}.sqsh")
        try:
            with open(os.path.join(self.data, f"{image_id}.json"), encoding="utf-8") as handle:
                raw = json.load(handle)
            size = os.stat(path).st_size
        except FileNotFoundError:
            label = f"{name} ({image_id[:12]})" if name else image_id
            raise user_error("image", "image no longer in the store", label) from None
        except (OSError, ValueError) as err:
            raise node_error("image store", f"unreadable image ({err})", image_id) from None
        meta = Metadata.from_raw(raw.get("metadata", {}))
        return Record(image_id, path, size, raw.get("created", ""), meta, raw.get("digest", ""))

    def list(self) -> Iterator[tuple[str, Record]]:
        if not os.path.isdir(self.names):
            return
        for image_type in sorted(os.listdir(self.names)):
            for encoded in sorted(os.listdir(os.path.join(self.names, image_type))):
                name = f"{image_type}:{_unquote(encoded)}"
                try:
                    yield name, self.lookup(name)
                except ShifterError:
                    continue

    # --- writing: admin only ---------------------------------------------------------

    def import_image(self, source: str, name: str, metadata: Metadata) -> Record:
        import tempfile

        parsed = parse_name(name, self.default_type)
        if not os.path.exists(source):
            raise usage_error("image import", "source not found", source)
        self.make_dirs()
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".import-") as tmp:
            partial = os.path.join(tmp, "image.sqsh")
            _to_squashfs(source, partial)
            image_id = _image_id(_sha256(partial), metadata)
            with self._locked():
                self._commit(partial, image_id, metadata, source)
                _write_atomic(self._name_path(parsed), json.dumps({"id": image_id}) + "\n")
        return self.get(image_id, name=str(parsed))

    def add_squashfs(self, partial: str, metadata: Metadata, names: tuple[str, ...], source: str,
                     digest: str) -> Record:  # fmt: skip
        """A squashfs built elsewhere in this store (``pull``), under ``names``."""
        parsed = [parse_name(n, self.default_type) for n in names]
        image_id = _image_id(_sha256(partial), metadata)
        with self._locked():
            self._commit(partial, image_id, metadata, source, digest)
            for name in parsed:
                _write_atomic(self._name_path(name), json.dumps({"id": image_id}) + "\n")
        return self.get(image_id, name=names[0] if names else None)

    def by_digest(self, digest: str) -> Record | None:
        """The stored image pulled from the manifest ``digest``, if any."""
        try:
            with open(self._digest_path(digest), encoding="utf-8") as handle:
                return self.get(json.load(handle)["id"])
        except (OSError, ValueError, KeyError, ShifterError):
            return None

    def name(self, name: str, image_id: str) -> None:
        """Point ``name`` at a stored image."""
        parsed = parse_name(name, self.default_type)
        self.get(image_id)
        with self._locked():
            _write_atomic(self._name_path(parsed), json.dumps({"id": image_id}) + "\n")

    def gc(self, in_use: set[str], max_age: float = 86400.0) -> tuple[str, ...]:
        """Remove the data no name and no container on this node (``in_use``) uses, and
        what pulls or imports killed mid-way left behind; the ids removed."""
        import shutil
        import time

        removed = []
        with self._locked():
            keep = {record.id for _name, record in self.list()} | in_use
            for entry in sorted(os.listdir(self.data)) if os.path.isdir(self.data) else []:
                image_id = entry.split(".", 1)[0]
                if _ID.match(image_id) and image_id not in keep:
                    os.unlink(os.path.join(self.data, entry))
                    if entry.endswith(".sqsh"):
                        removed.append(image_id)
            digests = os.path.join(self.root, "digests")
            for entry in os.listdir(digests) if os.path.isdir(digests) else []:
                path = os.path.join(digests, entry)
                with open(path, encoding="utf-8") as handle:
                    target = json.load(handle).get("id", "")
                if not os.path.exists(os.path.join(self.data, f"{target}.sqsh")):
                    os.unlink(path)
            for entry in os.listdir(self.root):  # a pull or import killed mid-way
                path = os.path.join(self.root, entry)
                if entry.startswith((".pull-", ".import-")) and os.path.isdir(path) \
                        and time.time() - os.stat(path).st_mtime > max_age:  # fmt: skip
                    shutil.rmtree(path, ignore_errors=True)
        return tuple(removed)

    def remove(self, name: str) -> None:
        parsed = parse_name(name, self.default_type)
        record = self.lookup(name)
        with self._locked():
            os.unlink(self._name_path(parsed))
            still_named = any(r.id == record.id for _n, r in self.list())
            if not still_named:
                # A running job's loop device keeps its own reference to the file.
                os.unlink(record.path)
                os.unlink(os.path.join(self.data, f"{record.id}.json"))

    def _commit(self, partial: str, image_id: str, metadata: Metadata, source: str,
                digest: str = "") -> None:  # fmt: skip
        final = os.path.join(self.data, f"{image_id}.sqsh")
        import time

        meta = {
            "id": image_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": source if digest else os.path.abspath(source),
            "digest": digest,
            "metadata": dataclasses.asdict(metadata),
        }
        os.chmod(partial, 0o644)
        if not os.path.exists(final):
            os.rename(partial, final)
        _write_atomic(os.path.join(self.data, f"{image_id}.json"), json.dumps(meta, indent=1))
        if digest:
            os.makedirs(os.path.dirname(self._digest_path(digest)), mode=0o755, exist_ok=True)
            _write_atomic(self._digest_path(digest), json.dumps({"id": image_id}) + "\n")

    def _digest_path(self, digest: str) -> str:
        return os.path.join(self.root, "digests", digest.replace(":", "-"))

    def _name_path(self, name: ImageName) -> str:
        return os.path.join(self.names, name.type, _quote(name.tag))

    def make_dirs(self) -> None:
        """The store's directories, 0755 whatever the umask: users look names up."""
        for path in (self.root, self.data, self.names, *(
            os.path.join(self.names, t) for t in IMAGE_TYPES
        )):  # fmt: skip
            os.makedirs(path, mode=0o755, exist_ok=True)
            os.chmod(path, 0o755)  # noqa: S103 - the users' plugin reads the store

    def _locked(self) -> FileLock:
        return FileLock(os.path.join(self.root, ".lock"))


class FileLock:
    """An exclusive flock on a lock file: the store's while names and data change, and
    one per digest while it is pulled (``image/pull.py``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> None:
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *_exc: object) -> None:
        os.close(self.fd)


def _to_squashfs(source: str, output: str) -> None:
    """Turn a directory, a tar archive or a squashfs file into a squashfs file."""
    import shutil

    if os.path.isdir(source):
        _run(["mksquashfs", source, output, "-noappend", "-comp", "zstd", "-quiet",
              "-no-progress", "-mkfs-time", "0", "-reproducible"], source)  # fmt: skip
        return
    with open(source, "rb") as handle:
        head = handle.read(512)
    if head.startswith(SQUASHFS_MAGIC):
        shutil.copyfile(source, output)
        _run(["unsquashfs", "-s", output], source)  # refuses a corrupt superblock
    elif head.startswith(COMPRESSED_TAR) or head[257:262] == b"ustar":
        # tar2sqfs never extracts: hostile members (../, symlinked parents) touch no disk.
        with open(source, "rb") as stdin:
            _run(["tar2sqfs", "--quiet", "--no-skip", "--compressor", "zstd", "--force",
                  output], source, stdin=stdin)  # fmt: skip
    else:
        raise usage_error("image import", "not a directory, tar archive or squashfs", source)


def _run(argv: list[str], source: str, stdin: object = None) -> None:
    import subprocess

    try:
        subprocess.run(argv, check=True, capture_output=True, stdin=stdin)  # type: ignore[call-overload]
    except subprocess.CalledProcessError as err:
        output = (err.stderr or err.stdout or b"").decode(errors="replace").strip()
        last = output.splitlines()[-1] if output else f"exit {err.returncode}"
        raise usage_error("image import", f"{argv[0]} failed ({last})", source) from None


def _image_id(squashfs_digest: str, metadata: Metadata) -> str:
    """The id covers the files and the metadata: same tree, other env, other image."""
    import hashlib

    canonical = json.dumps(dataclasses.asdict(metadata), sort_keys=True)
    return hashlib.sha256(f"{squashfs_digest}\n{canonical}".encode()).hexdigest()


def _sha256(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: str, text: str) -> None:
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
