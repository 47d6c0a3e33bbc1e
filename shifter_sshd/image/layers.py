"""An image's layers as one tree, streamed into tar2sqfs: nothing is ever extracted.

OCI's layer semantics (image-spec, layer.md): layers apply in order; a ``.wh.NAME``
entry deletes NAME (and what is below it) from the layers beneath; a
``.wh..wh..opq`` entry empties its directory of what the layers beneath put there;
an entry replaces what stood at its path (a directory over a directory keeps the
children). Hard links may name a file of a lower layer; when that file is later
deleted or replaced, the link keeps the data it had, as a plain file.

The tree is built from the tar headers alone (each layer decompressed once into
the pull's private scratch directory, for random access), then written as a new
tar, sorted by path (parents first, hard links last, pax xattrs kept), into
tar2sqfs's stdin. Root reads the layers as data; no file of an image ever lands
on a host filesystem, so hostile names (``../``, symlinked parents) change nothing.
Same layers, same squashfs: the order is fixed, implicit directories get fixed
attributes, and tar2sqfs writes no time of its own.
"""

from __future__ import annotations

import copy
import os
import subprocess
import tarfile
from dataclasses import dataclass, field
from typing import IO

from ..errors import ShifterError, usage_error

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
COMPRESSIONS = {"gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd"}


@dataclass
class _Member:
    layer: int
    info: tarfile.TarInfo
    source: _Member | None = None  # a hard link: the member it named when it was made


@dataclass
class _Node:
    member: _Member | None = None  # None: a directory no layer names (implicit)
    children: dict[str, _Node] = field(default_factory=dict)

    @property
    def is_dir(self) -> bool:
        return self.member is None or self.member.info.isdir()


def decompress(blob: str, output: str) -> None:
    """A layer blob (tar, gzip or zstd) as a plain tar file."""
    with open(blob, "rb") as handle:
        head = handle.read(4)
    if head.startswith(COMPRESSIONS["gzip"]):
        argv = ["gzip", "-dc", blob]
    elif head.startswith(COMPRESSIONS["zstd"]):
        argv = ["zstd", "-dcq", blob]
    else:
        os.link(blob, output) if _same_fs(blob, output) else _copy(blob, output)
        return
    with open(output, "wb") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE, check=False)
    if done.returncode != 0:
        raise usage_error("image layer", "cannot decompress "
                          f"({done.stderr.decode(errors='replace').strip()})", blob)  # fmt: skip


def _same_fs(one: str, two: str) -> bool:
    return os.stat(one).st_dev == os.stat(os.path.dirname(two) or ".").st_dev


def _copy(source: str, target: str) -> None:
    import shutil

    shutil.copyfile(source, target)


def _clean(name: str) -> str | None:
    """A member's path relative to the root; None for one that leaves it."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    return None if ".." in parts else "/".join(parts)


class Tree:
    """The merged tree of an image's layers."""

    def __init__(self, keep_devices: bool = False) -> None:
        self.root = _Node()
        self.keep_devices = keep_devices
        self.archives: list[tarfile.TarFile] = []
        self.dropped = 0  # device nodes and entries leaving the root

    def add_layer(self, path: str) -> None:
        try:
            archive = tarfile.open(path, "r:")  # noqa: SIM115 - kept open for writing out
            members = archive.getmembers()
        except (tarfile.TarError, OSError) as err:
            raise usage_error("image layer", f"not a tar archive ({err})", path) from None
        layer = len(self.archives)
        self.archives.append(archive)
        for info in members:  # whiteouts first: they apply to the layers beneath only
            name = _clean(info.name)
            if name is None:
                continue
            parent, _sep, base = name.rpartition("/")
            if base == OPAQUE:
                node = self._find(parent)
                if node is not None and node.is_dir:
                    node.children.clear()
            elif base.startswith(WHITEOUT):
                node = self._find(parent)
                if node is not None:
                    node.children.pop(base[len(WHITEOUT) :], None)
        for info in members:
            name = _clean(info.name)
            if name is None or (not self.keep_devices and (info.ischr() or info.isblk())):
                self.dropped += 1
                continue
            if name.rpartition("/")[2].startswith(WHITEOUT):
                continue
            self._put(name, _Member(layer, info))

    def _find(self, path: str) -> _Node | None:
        node = self.root
        for part in path.split("/") if path else []:
            node = node.children.get(part)  # type: ignore[assignment]
            if node is None or not node.is_dir:
                return None
        return node

    def _put(self, path: str, member: _Member) -> None:
        if not path:  # the root directory's own entry
            self.root.member = member if member.info.isdir() else self.root.member
            return
        parent = self.root
        parts = path.split("/")
        for part in parts[:-1]:
            child = parent.children.get(part)
            if child is None or not child.is_dir:  # a file in the way goes, as in overlayfs
                child = _Node()
                parent.children[part] = child
            parent = child
        if member.info.islnk():
            target = _clean(member.info.linkname) or ""
            found = self._find_entry(target)
            if found is None or found.member is None or found.is_dir:
                self.dropped += 1  # a link to nothing (or to a directory): not kept
                return
            member.source = found.member.source or found.member
        existing = parent.children.get(parts[-1])
        if existing is not None and existing.is_dir and member.info.isdir():
            existing.member = member  # a directory over a directory: children stay
        else:
            parent.children[parts[-1]] = _Node(member)

    def _find_entry(self, path: str) -> _Node | None:
        parent, _sep, base = path.rpartition("/")
        node = self._find(parent)
        return None if node is None else node.children.get(base)

    # --- writing ----------------------------------------------------------------------

    def write(self, output: tarfile.TarFile) -> int:
        """The tree as a tar, parents before children, hard links last; entries written."""
        links: list[tuple[str, _Member]] = []
        written: dict[int, str] = {}  # id(member) -> the path it was written at
        count = self._write_dir(output, "", self.root, links, written)
        for path, member in links:
            assert member.source is not None
            info = self._header(member.source, path)
            if id(member.source) in written:  # the very file it named: still a link
                info.type, info.linkname, info.size = tarfile.LNKTYPE, written[id(member.source)], 0
                output.addfile(info)
            else:  # that file went or changed later: the link keeps its data
                output.addfile(info, self._data(member.source))
            count += 1
        return count

    def _write_dir(self, output: tarfile.TarFile, path: str, node: _Node,
                   links: list[tuple[str, _Member]], written: dict[int, str]) -> int:  # fmt: skip
        count = 0
        for name in sorted(node.children):
            child = node.children[name]
            child_path = f"{path}/{name}" if path else name
            if child.member is not None and child.member.source is not None:
                links.append((child_path, child.member))
                continue
            if child.member is None:
                info = tarfile.TarInfo(child_path)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
                output.addfile(info)
            else:
                info = self._header(child.member, child_path)
                data = self._data(child.member) if child.member.info.isreg() else None
                output.addfile(info, data)
                written[id(child.member)] = child_path
            count += 1
            if child.is_dir:
                count += self._write_dir(output, child_path, child, links, written)
        return count

    @staticmethod
    def _header(member: _Member, path: str) -> tarfile.TarInfo:
        info = copy.copy(member.info)
        info.name = path
        info.pax_headers = {k: v for k, v in member.info.pax_headers.items()
                            if k.startswith("SCHILY.xattr.")}  # fmt: skip
        if info.isdir():
            info.size = 0
        return info

    def _data(self, member: _Member) -> IO[bytes] | None:
        return self.archives[member.layer].extractfile(member.info)

    def close(self) -> None:
        for archive in self.archives:
            archive.close()


def to_squashfs(layer_tars: list[str], output: str, keep_devices: bool = False) -> int:
    """Merge ``layer_tars`` (plain tar files, lowest first) into the squashfs ``output``."""
    tree = Tree(keep_devices)
    try:
        for path in layer_tars:
            tree.add_layer(path)
        argv = ["tar2sqfs", "--quiet", "--no-skip", "--compressor", "zstd", "--force",
                "--num-jobs", str(os.cpu_count() or 1), output]  # fmt: skip
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        assert process.stdin is not None
        try:
            with tarfile.open(fileobj=process.stdin, mode="w|", format=tarfile.PAX_FORMAT) as out:
                tree.write(out)
            process.stdin.close()
        except BrokenPipeError:
            pass
        error = process.stderr.read() if process.stderr else b""
        if process.wait() != 0:
            last = error.decode(errors="replace").strip().splitlines()[-1:] or ["failed"]
            raise ShifterError("image", f"tar2sqfs failed ({last[0]})", output)
        return tree.dropped
    finally:
        tree.close()
