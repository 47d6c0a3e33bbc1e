"""Value parsers for udiRoot.conf keys: each takes (where, key, raw value).

They raise ShifterError naming the file, line, key and value, so config.py's key
table (every key with its default and parser, in one place) stays a table.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from .errors import ShifterError, node_error


@dataclass(frozen=True)
class SiteMount:
    """A ``siteFs`` entry or a user's ``--volume``: host ``source`` at ``dest``."""

    source: str
    dest: str
    read_only: bool = False
    recursive: bool = False


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


SITE_FS_FLAGS = ("ro", "rw", "rec")


def parse_mount_spec(where: str, spec: str, allowed_flags: tuple[str, ...]) -> SiteMount:
    """Parse ``source:dest[:flags]``; also used for the user's ``--volume``."""
    parts = spec.split(":")
    if len(parts) < 2 or len(parts) > 3 or not parts[0] or not parts[1]:
        raise ShifterError(where, "expected source:destination[:flags]", spec)
    source, dest = parts[0], parts[1]
    flags = [f for f in parts[2].split(",") if f] if len(parts) == 3 else []
    for path in (source, dest):
        if not path.startswith("/"):
            raise ShifterError(where, "paths must be absolute", path)
        if "\0" in path or any(p == ".." for p in path.split("/")):
            raise ShifterError(where, "paths may not contain '..'", path)
    for flag in flags:
        if flag not in allowed_flags:
            raise ShifterError(where, f"unknown flag (allowed: {', '.join(allowed_flags)})", flag)
    return SiteMount(
        source=os.path.normpath(source),
        dest=os.path.normpath(dest),
        read_only="ro" in flags,
        recursive="rec" in flags,
    )


def site_fs(where: str, key: str, value: str) -> tuple[SiteMount, ...]:
    specs = [s for s in re.split(r"[;\s]+", value) if s]
    try:
        return tuple(parse_mount_spec(where, spec, SITE_FS_FLAGS) for spec in specs)
    except ShifterError as err:
        raise node_error(where, f"{key}: {err.what}", err.value) from None


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
