"""Container Device Interface specs: what a site's GPU vendor tooling says to inject.

``nvidia-ctk cdi generate`` (or ``shifter-sshd cdi generate``) writes one spec per
device kind under /etc/cdi or /var/run/cdi: device nodes, driver libraries and
binaries to bind, environment, and hooks. This module reads every spec in the
configured directories (JSON or YAML, cdiVersion 0.3.0 to 0.8.0), refuses fields it
does not know (a spec it half understood would give a job half a driver), and
gathers the container edits for the devices a job was given. Nothing here touches
the container: ``gpu/plan.py`` applies the edits, hooks included, natively.

Spec files are the site's: every problem in one is a node error naming the file.
A later directory overrides an earlier one for the same device (/var/run/cdi is
the runtime's, written at boot, and wins over /etc/cdi, as in the CDI spec).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..errors import node_error

VERSIONS = ("0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0")
WHERE = "cdi"

_TOP = {"cdiVersion", "kind", "annotations", "devices", "containerEdits"}
_DEVICE = {"name", "annotations", "containerEdits"}
_EDITS = {"env", "deviceNodes", "hooks", "mounts", "intelRdt", "additionalGids", "netDevices"}
_NODE = {"path", "hostPath", "type", "major", "minor", "fileMode", "permissions", "uid", "gid"}
_MOUNT = {"hostPath", "containerPath", "options", "type"}
_HOOK = {"hookName", "path", "args", "env", "timeout"}
# Edits this runtime cannot apply to a container that is a set of mounts: said, not fatal.
IGNORED_EDITS = {
    "intelRdt": "no resource control groups are made per container",
    "additionalGids": "processes run with the job user's own groups",
    "netDevices": "the container shares the node's network",
}


@dataclass(frozen=True)
class DeviceNode:
    path: str  # in the container, under /dev
    host_path: str  # on the host; the same path when the spec gives none
    type: str | None = None  # "c" or "b"; None: the host node's
    major: int | None = None
    minor: int | None = None
    file_mode: int | None = None
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True)
class Mount:
    host_path: str
    container_path: str
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Hook:
    hook_name: str
    path: str
    args: tuple[str, ...] = ()


@dataclass
class Edits:
    """containerEdits, merged over the spec and every selected device."""

    env: list[str] = field(default_factory=list)
    device_nodes: list[DeviceNode] = field(default_factory=list)
    mounts: list[Mount] = field(default_factory=list)
    hooks: list[Hook] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # what could not be applied, and why

    def add(self, other: Edits) -> None:
        self.env += other.env
        self.device_nodes += [n for n in other.device_nodes if n not in self.device_nodes]
        self.mounts += [m for m in other.mounts if m not in self.mounts]
        self.hooks += [h for h in other.hooks if h not in self.hooks]
        self.ignored += [i for i in other.ignored if i not in self.ignored]


@dataclass
class Spec:
    path: str
    kind: str
    edits: Edits  # the spec's own containerEdits: applied once when any device is used
    devices: dict[str, Edits]


# --- reading -----------------------------------------------------------------------------


def spec_files(directories: tuple[str, ...]) -> list[str]:
    """Spec files in directory order, each directory's files by name."""
    found = []
    for directory in directories:
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            continue
        except OSError as err:
            raise node_error(WHERE, f"cannot list the spec directory ({err.strerror})",
                             directory) from None  # fmt: skip
        found += [os.path.join(directory, n) for n in names
                  if n.endswith((".json", ".yaml", ".yml")) and not n.startswith(".")]  # fmt: skip
    return found


def load(path: str) -> Spec:
    """One spec file, checked field by field."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise node_error(WHERE, f"cannot read the spec ({err.strerror})", path) from None
    raw = _parse(data, path)
    _known(raw, _TOP, path, "the spec")
    version = raw.get("cdiVersion")
    if version not in VERSIONS:
        raise node_error(WHERE, f"{path}: cdiVersion not one of {', '.join(VERSIONS)}",
                         str(version))  # fmt: skip
    kind = raw.get("kind")
    if not isinstance(kind, str) or kind.count("/") != 1 or not all(kind.split("/")):
        raise node_error(WHERE, f"{path}: kind must be vendor/class", str(kind))
    devices: dict[str, Edits] = {}
    for number, device in enumerate(_list(raw, "devices", path, "the spec")):
        where = f"devices[{number}]"
        _known(device, _DEVICE, path, where)
        name = device.get("name")
        if not isinstance(name, str) or not name or "/" in name or "=" in name:
            raise node_error(WHERE, f"{path}: {where}.name is not a device name", str(name))
        if name in devices:
            raise node_error(WHERE, f"{path}: device listed twice", f"{kind}={name}")
        devices[name] = _edits(device.get("containerEdits"), path, f"{where}.containerEdits")
    if not devices:
        raise node_error(WHERE, f"{path}: the spec lists no device", kind)
    return Spec(path, kind, _edits(raw.get("containerEdits"), path, "containerEdits"), devices)


def _parse(data: bytes, path: str) -> dict[str, object]:
    try:
        if path.endswith(".json"):
            raw = json.loads(data)
        else:
            import yaml

            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 10x faster
            raw = yaml.load(data, Loader=loader)  # noqa: S506 - a safe loader
    except Exception as err:  # json's and yaml's many error classes
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise node_error(WHERE, f"{path}: not a valid spec ({first})", path) from None
    if not isinstance(raw, dict):
        raise node_error(WHERE, f"{path}: a spec is a mapping", type(raw).__name__)
    return raw


def _known(raw: object, known: set[str], path: str, where: str) -> None:
    if not isinstance(raw, dict):
        raise node_error(WHERE, f"{path}: {where} must be a mapping", type(raw).__name__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise node_error(WHERE, f"{path}: unknown field in {where}", str(unknown[0]))


def _list(raw: dict[str, object], key: str, path: str, where: str) -> list[dict[str, object]]:
    value = raw.get(key) or []
    if not isinstance(value, list):
        raise node_error(WHERE, f"{path}: {where}.{key} must be a list", type(value).__name__)
    return value


def _edits(raw: object, path: str, where: str) -> Edits:
    edits = Edits()
    if raw is None:
        return edits
    _known(raw, _EDITS, path, where)
    assert isinstance(raw, dict)
    for key, reason in IGNORED_EDITS.items():
        if raw.get(key):
            edits.ignored.append(f"{key}: {reason}")
    for number, value in enumerate(raw.get("env") or []):
        if not isinstance(value, str) or "=" not in value or "\n" in value:
            raise node_error(WHERE, f"{path}: {where}.env[{number}] is not NAME=VALUE", str(value))
        edits.env.append(value)
    for number, node in enumerate(_list(raw, "deviceNodes", path, where)):
        edits.device_nodes.append(_device_node(node, path, f"{where}.deviceNodes[{number}]"))
    for number, mount in enumerate(_list(raw, "mounts", path, where)):
        edits.mounts.append(_mount(mount, path, f"{where}.mounts[{number}]"))
    for number, hook in enumerate(_list(raw, "hooks", path, where)):
        edits.hooks.append(_hook(hook, path, f"{where}.hooks[{number}]"))
    return edits


def _absolute(raw: dict[str, object], key: str, path: str, where: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise node_error(WHERE, f"{path}: {where}.{key} must be an absolute path", str(value))
    return os.path.normpath(value)


def _number(raw: dict[str, object], key: str, path: str, where: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise node_error(WHERE, f"{path}: {where}.{key} must be a number", str(value))
    return value


def _device_node(raw: dict[str, object], path: str, where: str) -> DeviceNode:
    _known(raw, _NODE, path, where)
    target = _absolute(raw, "path", path, where)
    if not target.startswith("/dev/"):
        raise node_error(WHERE, f"{path}: {where}.path must be under /dev", target)
    host = _absolute(raw, "hostPath", path, where) if raw.get("hostPath") else target
    kind = raw.get("type")
    if kind not in (None, "c", "u", "b"):
        raise node_error(WHERE, f"{path}: {where}.type must be c or b", str(kind))
    mode = raw.get("fileMode")
    if mode is not None and (not isinstance(mode, int) or isinstance(mode, bool)):
        raise node_error(WHERE, f"{path}: {where}.fileMode must be a number", str(mode))
    return DeviceNode(target, host, "c" if kind == "u" else kind,
                      _number(raw, "major", path, where), _number(raw, "minor", path, where),
                      mode, _number(raw, "uid", path, where),
                      _number(raw, "gid", path, where))  # fmt: skip


def _mount(raw: dict[str, object], path: str, where: str) -> Mount:
    _known(raw, _MOUNT, path, where)
    options = raw.get("options") or []
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise node_error(WHERE, f"{path}: {where}.options must be a list of words", str(options))
    kind = raw.get("type")
    if kind not in (None, "bind", "none"):
        raise node_error(WHERE, f"{path}: {where}: only bind mounts are supported", str(kind))
    return Mount(_absolute(raw, "hostPath", path, where),
                 _absolute(raw, "containerPath", path, where), tuple(options))  # fmt: skip


def _hook(raw: dict[str, object], path: str, where: str) -> Hook:
    _known(raw, _HOOK, path, where)
    args = raw.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise node_error(WHERE, f"{path}: {where}.args must be a list of words", str(args))
    name = raw.get("hookName")
    if not isinstance(name, str):
        raise node_error(WHERE, f"{path}: {where}.hookName missing", str(name))
    return Hook(name, _absolute(raw, "path", path, where), tuple(args))


# --- selecting ---------------------------------------------------------------------------


def registry(directories: tuple[str, ...]) -> dict[str, tuple[Spec, str]]:
    """``kind=name`` -> (spec, name) over every spec; later directories win."""
    devices: dict[str, tuple[Spec, str]] = {}
    owner: dict[str, str] = {}
    for path in spec_files(directories):
        spec = load(path)
        for name in spec.devices:
            qualified = f"{spec.kind}={name}"
            earlier = owner.get(qualified)
            if earlier and os.path.dirname(earlier) == os.path.dirname(path):
                raise node_error(WHERE, f"device in two specs of one directory ({earlier} and "
                                 f"{path})", qualified)  # fmt: skip
            devices[qualified], owner[qualified] = (spec, name), path
    return devices


def select(directories: tuple[str, ...], wanted: list[str]) -> Edits:
    """The merged edits for the fully qualified device names ``wanted``."""
    devices = registry(directories)
    edits, specs_used = Edits(), []
    for qualified in wanted:
        if qualified not in devices:
            where = " ".join(directories)
            raise node_error(WHERE, f"no spec in {where} lists the device Slurm gave this job",
                             qualified)  # fmt: skip
        spec, name = devices[qualified]
        if spec not in specs_used:
            specs_used.append(spec)
            edits.add(spec.edits)
        edits.add(spec.devices[name])
    return edits
