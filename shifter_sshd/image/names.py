"""Shifter's image names for registry images, and where each one is pulled from.

``docker:ubuntu:22.04`` (Docker Hub, ``library/ubuntu``), ``docker:nvcr.io/nvidia/
pytorch:24.05-py3``, ``docker:localhost:5000/team/app:1``, ``docker:ubuntu@sha256:...``.
The first path component is a registry when it has a ``.`` or a ``:`` or is
``localhost``, as Docker decides; otherwise the image is on ``defaultRegistry``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import user_error

DOCKER_HUB = "docker.io"
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_REGISTRY = re.compile(r"^[A-Za-z0-9.-]+(?::[0-9]{1,5})?$")


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port]
    repository: str  # library/ubuntu
    tag: str | None
    digest: str | None  # sha256:...

    def transport(self, registry: str | None = None) -> str:
        """skopeo's ``docker://`` reference, from ``registry`` (a mirror) if given."""
        suffix = f"@{self.digest}" if self.digest else f":{self.tag}"
        return f"docker://{registry or self.registry}/{self.repository}{suffix}"

    def __str__(self) -> str:
        suffix = f"@{self.digest}" if self.digest else f":{self.tag}"
        return f"{self.registry}/{self.repository}{suffix}"


def parse(tag: str, default_registry: str = DOCKER_HUB) -> Reference:
    """The part of a ``docker:`` name after the type."""
    name, digest = tag, None
    if "@" in tag:
        name, _at, digest = tag.partition("@")
        if not _DIGEST.match(digest):
            raise user_error("image name", "malformed digest (sha256:<64 hex>)", tag)
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
        if not _REGISTRY.match(registry):
            raise user_error("image name", "malformed registry", registry)
    else:
        registry, path = default_registry, name
    path, colon, version = path.rpartition(":") if ":" in path else (path, "", "")
    image_tag = version if colon else (None if digest else "latest")
    if image_tag is not None and not _TAG.match(image_tag):
        raise user_error("image name", "malformed tag", image_tag)
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not path or not all(_COMPONENT.match(part) for part in path.split("/")):
        raise user_error("image name", "malformed repository name (lower case, digits, "
                         "separators)", path or tag)  # fmt: skip
    return Reference(registry, path, image_tag, digest)


def platform() -> tuple[str, str]:
    """(os, architecture) in OCI's words, for picking a multi-arch index's manifest."""
    import os

    machine = os.uname().machine
    names = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x",
             "riscv64": "riscv64"}  # fmt: skip
    return "linux", names.get(machine, machine)
