"""Value parsers for udiRoot.conf keys: each takes (where, key, raw value).

They raise ShifterError naming the file, line, key and value, so config/udiroot.py's key
table (every key with its default and parser, in one place) stays a table.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ShifterError, node_error


@dataclass(frozen=True)
class SiteMount:
    """A ``siteFs`` entry or a user's ``--volume``: host ``source`` at ``dest``."""

    source: str
    dest: str
    read_only: bool = False
    recursive: bool = False
    extra: tuple[str, ...] = ()  # Shifter's flags with no effect here (slave, perNodeCache=...)


def path(where: str, key: str, value: str) -> str:
    if not value.startswith("/") or "\0" in value:
        raise node_error(where, f"{key} must be an absolute path", value)
    return os.path.normpath(value)


def optional_path(where: str, key: str, value: str) -> str | None:
    return path(where, key, value) if value else None


def boolean(where: str, key: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise node_error(where, f"{key} must be 0 or 1", value)


def int_range(low: int, high: int) -> Callable[[str, str, str], int]:
    def parse(where: str, key: str, value: str) -> int:
        try:
            number = int(value, 10)
        except ValueError:
            raise node_error(where, f"{key} must be an integer", value) from None
        if not low <= number <= high:
            raise node_error(where, f"{key} must be between {low} and {high}", value)
        return number

    return parse


def seconds(where: str, key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise node_error(where, f"{key} must be a number of seconds", value) from None
    if not 0 <= number <= 3600:
        raise node_error(where, f"{key} must be between 0 and 3600 seconds", value)
    return number


_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def names(where: str, key: str, value: str) -> tuple[str, ...]:
    names = tuple(value.replace(",", " ").split())
    for name in names:
        if not _NAME.match(name):
            raise node_error(where, f"{key} has an invalid name", name)
    return names


def paths(where: str, key: str, value: str) -> tuple[str, ...]:
    return tuple(path(where, key, item) for item in value.replace(",", " ").split())


_GLOB = re.compile(r"^[A-Za-z0-9_.*?\[\]-]+$")


def globs(where: str, key: str, value: str) -> tuple[str, ...]:
    """Names with shell wildcards (``hfi1*``): entries of one directory, never a path."""
    found = tuple(value.replace(",", " ").split())
    for name in found:
        if not _GLOB.match(name) or name in (".", ".."):
            raise node_error(where, f"{key} has an invalid name pattern", name)
    return found


_HOST = re.compile(r"^[A-Za-z0-9.-]+(?::[0-9]{1,5})?$")


def hosts(where: str, key: str, value: str) -> tuple[str, ...]:
    """Registry addresses, ``host`` or ``host:port``."""
    found = tuple(value.replace(",", " ").split())
    for host in found:
        if not _HOST.match(host):
            raise node_error(where, f"{key} has an invalid host[:port]", host)
    return found


def host_pairs(where: str, key: str, value: str) -> tuple[tuple[str, str], ...]:
    """``registry=mirror`` pairs (each a host[:port])."""
    pairs = []
    for item in value.replace(",", " ").split():
        registry, sep, mirror = item.partition("=")
        if not sep or not _HOST.match(registry) or not _HOST.match(mirror):
            raise node_error(where, f"{key} entries are registry=mirror (host[:port])", item)
        pairs.append((registry, mirror))
    return tuple(pairs)


def cdi_device(where: str, key: str, value: str) -> str:
    """``vendor/class=name``, where ``{index}`` stands for Slurm's GPU index."""
    kind, sep, name = value.partition("=")
    if not sep or kind.count("/") != 1 or "{index}" not in name or any(c.isspace() for c in value):
        raise node_error(where, f"{key} must look like nvidia.com/gpu={{index}}", value)
    return value


def word(choices: tuple[str, ...] | None = None) -> Callable[[str, str, str], str]:
    def parse(where: str, key: str, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise node_error(where, f"{key} must be a single word", value)
        if choices is not None and value not in choices:
            raise node_error(where, f"{key} must be one of {', '.join(choices)}", value)
        return value

    return parse


def optional_word(where: str, key: str, value: str) -> str | None:
    return word()(where, key, value) if value else None


SITE_FS_FLAGS = ("ro", "rw", "rec", "slave", "private", "perNodeCache")
NO_EFFECT = ("slave", "pernodecache")  # accepted for Shifter's sake, warned about


def parse_mount_spec(where: str, spec: str, allowed_flags: tuple[str, ...],
                     site: bool = False) -> SiteMount:  # fmt: skip
    """``source:dest[:flag[:flag...]]`` (flags also comma-separated), as Shifter's VolumeMap.

    A site entry may be a single path (mounted at the same path). Flags are matched
    without case; ``perNodeCache=<options>`` keeps its options.
    """
    parts = spec.split(":")
    if site and len(parts) == 1:
        parts = [parts[0], parts[0]]
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ShifterError(where, "expected source:destination[:flags]", spec)
    source, dest = parts[0], parts[1]
    flags = [f for part in parts[2:] for f in _split_flags(part) if f]
    if not site and len(parts) > 3:
        raise ShifterError(where, "expected source:destination[:flags]", spec)
    for path in (source, dest):
        if not path.startswith("/"):
            raise ShifterError(where, "paths must be absolute", path)
        if "\0" in path or any(p == ".." for p in path.split("/")):
            raise ShifterError(where, "paths may not contain '..'", path)
    lowered = [f.split("=", 1)[0].lower() for f in flags]
    for flag, name in zip(flags, lowered, strict=True):
        if name not in [a.lower() for a in allowed_flags]:
            raise ShifterError(where, f"unknown flag (allowed: {', '.join(allowed_flags)})", flag)
    return SiteMount(
        source=os.path.normpath(source),
        dest=os.path.normpath(dest),
        read_only="ro" in lowered,
        recursive="rec" in lowered,
        extra=tuple(f for f, n in zip(flags, lowered, strict=True) if n in NO_EFFECT),
    )


def _split_flags(part: str) -> list[str]:
    """Our ``ro,rec``; but a ``perNodeCache=size=1G,fs=xfs`` keeps its commas."""
    if part.lower().startswith("pernodecache="):
        return [part]
    return part.split(",")


def site_fs(where: str, key: str, value: str) -> tuple[SiteMount, ...]:
    """Entries separated by ``;`` (Shifter) or whitespace (earlier Shifter, ours)."""
    specs = [s.strip('"') for s in re.split(r"[;\s]+", value) if s.strip('"')]
    try:
        return tuple(parse_mount_spec(where, spec, SITE_FS_FLAGS, site=True) for spec in specs)
    except ShifterError as err:
        raise node_error(where, f"{key}: {err.what}", err.value) from None


def only_mounts(mounts: tuple[SiteMount, ...], warnings: list[str]) -> tuple[SiteMount, ...]:
    """Drop Shifter's perNodeCache entries, and say what slave means here."""
    kept = []
    for mount in mounts:
        names = {flag.split("=", 1)[0].lower() for flag in mount.extra}
        if "pernodecache" in names:
            warnings.append(f"siteFs: perNodeCache volumes are not supported: {mount.dest} skipped")
            continue
        if "slave" in names:
            warnings.append(f"siteFs: {mount.dest}: slave propagation not supported (binds are "
                            "private copies): host mounts made later do not reach it")  # fmt: skip
        kept.append(mount)
    return tuple(kept)


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def env_pairs(where: str, key: str, value: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in value.split():
        name, sep, setting = item.partition("=")
        if not sep or not _ENV_NAME.match(name):
            raise node_error(where, f"{key} entries must be NAME=value", item)
        pairs.append((name, setting))
    return tuple(pairs)


def env_names(where: str, key: str, value: str) -> tuple[str, ...]:
    names = tuple(value.split())
    for name in names:
        if not _ENV_NAME.match(name):
            raise node_error(where, f"{key} entries must be variable names", name)
    return names
