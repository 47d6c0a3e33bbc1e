"""udiRoot.conf: Shifter's file format, every key parsed here with its default.

A Shifter site's udiRoot.conf must work as it is, so Shifter keys this project has
no use for are accepted with a warning; a key nobody knows is an error that names
the file, the line, the key and the closest known key, because a typo silently
ignored (``udiMont=``) would put a container root somewhere nobody expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ShifterError, node_error, usage_error
from . import values as v
from .quick import DEFAULT_PATH, resolve_path
from .values import SiteMount, parse_mount_spec

TYPE_CHECKING = False  # importing typing costs every prolog ~3 ms; mypy knows this name
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeAlias


@dataclass(frozen=True)
class Module:
    """A ``module_<name>_*`` group: site mounts and environment a job can ask for."""

    name: str
    site_fs: tuple[SiteMount, ...] = ()
    site_env: tuple[tuple[str, str], ...] = ()
    site_env_append: tuple[tuple[str, str], ...] = ()
    site_env_prepend: tuple[tuple[str, str], ...] = ()
    site_env_unset: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()  # modules that cannot be active with this one
    enabled: bool = True


@dataclass(frozen=True)
class Config:
    """The effective configuration. Field defaults are the documented defaults."""

    path: str = DEFAULT_PATH
    udi_mount: str = "/var/udiMount"
    loop_mount: str = "/var/udiLoopMount"
    image_path: str = "/var/lib/shifter/images"
    opt_udi_image: str = "/opt/shifter/udiImage"
    etc_path: str | None = None
    users_to_import: tuple[str, ...] = ()
    site_fs: tuple[SiteMount, ...] = ()
    site_env: tuple[tuple[str, str], ...] = ()
    site_env_append: tuple[tuple[str, str], ...] = ()
    site_env_prepend: tuple[tuple[str, str], ...] = ()
    site_env_unset: tuple[str, ...] = ()
    rootfs_type: str = "tmpfs"
    mount_propagation: str = "private"
    mount_udi_root_writable: bool = True
    max_group_count: int = 31
    default_image_type: str = "docker"
    system: str | None = None
    default_modules: tuple[str, ...] = ()
    modules: tuple[Module, ...] = ()
    enable_sshd: bool = True
    sshd_port: int = 1204
    sshd_job_containment: bool = True
    ssh_key_secret: str = "/etc/shifter/ssh_key_secret"  # noqa: S105 - a path
    ssh_cert_grace: int = 600
    ssh_cert_max_lifetime: int = 7 * 24 * 3600
    state_path: str = "/run/shifter-sshd"
    kill_grace: float = 5.0
    max_volumes: int = 64
    max_image_mounts: int = 256
    volume_timeout: float = 20.0
    sshd_start_timeout: float = 10.0
    sshd_allow_tcp_forwarding: str = "yes"  # OpenSSH's AllowTcpForwarding: IDEs need it
    userns_timeout: float = 5.0
    gpu_injection: str = "auto"  # auto: the job's GPUs; module: only with --module=gpu
    cdi_spec_dirs: tuple[str, ...] = ("/etc/cdi", "/var/run/cdi")
    gpu_cdi_device: str = "nvidia.com/gpu={index}"
    host_devices: tuple[str, ...] = ("fuse", "infiniband", "knem", "xpmem", "hfi1*", "cxi*")
    default_registry: str = "docker.io"
    registry_mirrors: tuple[tuple[str, str], ...] = ()
    insecure_registries: tuple[str, ...] = ()
    registry_auth_file: str | None = None
    keep_device_nodes: bool = False
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def module(self, name: str) -> Module | None:
        for module in self.modules:
            if module.name == name:
                return module
        return None


IMAGE_TYPES = ("docker", "custom", "local", "id")

# --- the key table: file key -> (Config field, parser, repeatable) --------------------
# Repeatable keys accumulate over several lines; a scalar given twice is an error.

Parser: TypeAlias = "Callable[[str, str, str], Any]"

KEYS: dict[str, tuple[str, Parser, bool]] = {
    "udiMount": ("udi_mount", v.path, False),
    "loopMount": ("loop_mount", v.path, False),
    "imagePath": ("image_path", v.path, False),
    "optUdiImage": ("opt_udi_image", v.path, False),
    "etcPath": ("etc_path", v.optional_path, False),
    "usersToImport": ("users_to_import", v.names, True),
    "siteFs": ("site_fs", v.site_fs, True),
    "siteEnv": ("site_env", v.env_pairs, True),
    "siteEnvAppend": ("site_env_append", v.env_pairs, True),
    "siteEnvPrepend": ("site_env_prepend", v.env_pairs, True),
    "siteEnvUnset": ("site_env_unset", v.env_names, True),
    "rootfsType": ("rootfs_type", v.word(("tmpfs", "ramfs")), False),
    "mountUdiRootWritable": ("mount_udi_root_writable", v.boolean, False),
    "maxGroupCount": ("max_group_count", v.int_range(0, 65536), False),
    "defaultImageType": ("default_image_type", v.word(IMAGE_TYPES), False),
    "mountPropagationStyle": ("mount_propagation", v.word(("private", "slave")), False),
    "system": ("system", v.optional_word, False),
    "defaultModules": ("default_modules", v.names, True),
    "enableSshd": ("enable_sshd", v.boolean, False),
    "sshdPort": ("sshd_port", v.int_range(1, 65535), False),
    "sshdJobContainment": ("sshd_job_containment", v.boolean, False),
    "sshKeySecret": ("ssh_key_secret", v.path, False),
    "sshCertGrace": ("ssh_cert_grace", v.int_range(0, 7 * 24 * 3600), False),
    "sshCertMaxLifetime": ("ssh_cert_max_lifetime", v.int_range(60, 366 * 24 * 3600), False),
    "statePath": ("state_path", v.path, False),
    "killGrace": ("kill_grace", v.seconds, False),
    "maxVolumes": ("max_volumes", v.int_range(0, 10000), False),
    "maxImageMounts": ("max_image_mounts", v.int_range(1, 100000), False),
    "volumeTimeout": ("volume_timeout", v.seconds, False),
    "sshdStartTimeout": ("sshd_start_timeout", v.seconds, False),
    "sshdAllowTcpForwarding": (
        "sshd_allow_tcp_forwarding",
        v.word(("yes", "no", "local", "remote")),
        False,
    ),
    "usernsTimeout": ("userns_timeout", v.seconds, False),
    "gpuInjection": ("gpu_injection", v.word(("auto", "module", "off")), False),
    "cdiSpecDirs": ("cdi_spec_dirs", v.paths, True),
    "gpuCdiDevice": ("gpu_cdi_device", v.cdi_device, False),
    "hostDevices": ("host_devices", v.globs, True),
    "defaultRegistry": ("default_registry", v.word(), False),
    "registryMirrors": ("registry_mirrors", v.host_pairs, True),
    "insecureRegistries": ("insecure_registries", v.hosts, True),
    "registryAuthFile": ("registry_auth_file", v.optional_path, False),
    "keepDeviceNodes": ("keep_device_nodes", v.boolean, False),
}

# module_<name>_<key>: key -> (Module field, parser)
MODULE_KEYS: dict[str, tuple[str, Parser]] = {
    "siteFs": ("site_fs", v.site_fs),
    "siteEnv": ("site_env", v.env_pairs),
    "siteEnvAppend": ("site_env_append", v.env_pairs),
    "siteEnvPrepend": ("site_env_prepend", v.env_pairs),
    "siteEnvUnset": ("site_env_unset", v.env_names),
    "conflict": ("conflicts", v.names),
    "enabled": ("enabled", v.boolean),
}

# Every other key Shifter's UdiRootConfig.c knows (and a few it knew once), with why it
# means nothing here: accepted with a warning that says so, never fatal.
IGNORED_KEYS: dict[str, str] = {
    "udiRootPath": "shifter-sshd's commands are found where it is installed",
    "cpPath": "no external tools are run", "mvPath": "no external tools are run",
    "chmodPath": "no external tools are run", "ddPath": "no external tools are run",
    "modprobePath": "no kernel modules are loaded", "insmodPath": "no kernel modules are loaded",
    "mkfsXfsPath": "perNodeCache volumes are not supported",
    "kmodBasePath": "no kernel modules are loaded", "kmodCacheFile": "no kernel modules are loaded",
    "autoLoadKernelModule": "no kernel modules are loaded",
    "perNodeCachePath": "perNodeCache volumes are not supported",
    "perNodeCacheSizeLimit": "perNodeCache volumes are not supported",
    "perNodeCacheAllowedFsType": "perNodeCache volumes are not supported",
    "sitePreMountHook": "no site script runs as root in the prolog (use siteFs and modules)",
    "sitePostMountHook": "no site script runs as root in the prolog (use siteFs and modules)",
    "optionalSshdAsRoot": "the sshd always runs as the job user (Shifter ignores it too)",
    "allowLocalChroot": "local: images are not supported",
    "allowLibcPwdCalls": "the job user comes from the host's NSS, read by the prolog",
    "populateEtcDynamically": "/etc is always generated (etcPath files are copied when set)",
    "imageGateway": "there is no image gateway (images come from shifter-sshd image)",
    "gatewayTimeout": "there is no image gateway",
    "nodeContextPrefix": "defunct in Shifter as well",
    "batchType": "only Slurm is supported",
    "siteResources": "removed from Shifter in 2017; use modules",
    "siteEnvPath": "not a Shifter key any more", "enableUserNamespaces": "always on when allowed",
    "imageDir": "not a Shifter key any more",
}  # fmt: skip
IGNORED_MODULE_KEYS: dict[str, str] = {
    "userhook": "no site script runs in the container on entry",
    "roothook": "no site script runs as root in the prolog",
    "copyPath": "nothing is copied into /opt/udiImage (use the module's siteFs)",
}


def _logical_lines(text: str, path: str, warnings: list[str]) -> list[tuple[int, str]]:
    """Shifter's reader: ``#`` in the first column starts a comment (nowhere else), a
    line without ``=`` is skipped, a trailing backslash joins the next line with one
    space (comment lines inside are skipped, a blank line ends it). Lines whose first
    non-blank character is ``#`` are comments too (Shifter would refuse them)."""
    lines: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#"):
            continue
        if pending and not stripped:
            lines.append((start, " ".join(pending)))
            pending = []
            continue
        if not pending:
            if "=" not in stripped:
                if stripped:
                    warnings.append(f"{path}:{number}: line without '=' ignored: {stripped}")
                continue
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        lines.append((start, " ".join(p for p in pending if p)))
        pending = []
    if pending:
        lines.append((start, " ".join(p for p in pending if p)))
    return lines


def parse(text: str, path: str = DEFAULT_PATH) -> Config:
    """Parse udiRoot.conf text; raises ShifterError naming file, line, key and value."""
    values: dict[str, Any] = {}
    seen: dict[str, int] = {}
    module_values: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    for number, line in _logical_lines(text, path, warnings):
        where = f"{path}:{number}"
        key, _sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if key in KEYS:
            field_name, parser, repeatable = KEYS[key]
            if key in seen and not repeatable:
                warnings.append(f"{where}: {key} given again (first at line {seen[key]}): "
                                "the last one counts, as in Shifter")  # fmt: skip
            seen.setdefault(key, number)
            parsed = parser(where, key, value)
            values[field_name] = values.get(field_name, ()) + parsed if repeatable else parsed
        elif key in IGNORED_KEYS:
            warnings.append(f"{where}: {key} ignored: {IGNORED_KEYS[key]}")
        elif key.startswith("module_"):
            _module_key(where, key, value, module_values, warnings)
        else:
            raise node_error(where, f"unknown key{_suggest(key)}", key)
    values["site_fs"] = v.only_mounts(values.get("site_fs", ()), warnings)
    if values.get("mount_propagation") == "slave":
        warnings.append(f"{path}: mountPropagationStyle=slave: binds are private copies here, "
                        "so host mounts made later do not reach running containers")  # fmt: skip
    modules = tuple(
        _module(name, fields, warnings) for name, fields in sorted(module_values.items())
    )
    config = Config(path=path, modules=modules, warnings=tuple(warnings), **values)
    _check_whole(config)
    return config


def _module_key(where: str, key: str, value: str, module_values: dict[str, dict[str, Any]],
                warnings: list[str]) -> None:  # fmt: skip
    """``module_<name>_<subkey>``, split at underscores as Shifter does."""
    parts = [part for part in key.split("_") if part]
    if len(parts) < 3:
        warnings.append(f"{where}: module key without a name and subkey ignored: {key}")
        return
    name, subkey = parts[1], parts[2]
    if len(parts) > 3:
        warnings.append(f"{where}: module names cannot hold '_' (Shifter reads module {name}, "
                        f"key {subkey}): {key}")  # fmt: skip
    if subkey in IGNORED_MODULE_KEYS:
        warnings.append(f"{where}: module_{name}_{subkey} ignored: {IGNORED_MODULE_KEYS[subkey]}")
        module_values.setdefault(name, {})
        return
    if subkey not in MODULE_KEYS:
        choices = ", ".join(sorted(MODULE_KEYS))
        warnings.append(f"{where}: unknown module key ignored (known: {choices}): {key}")
        module_values.setdefault(name, {})
        return
    field_name, parser = MODULE_KEYS[subkey]
    parsed = parser(where, f"module_{name}_{subkey}", value)
    fields = module_values.setdefault(name, {})
    if isinstance(parsed, tuple):
        fields[field_name] = fields.get(field_name, ()) + parsed
    else:
        fields[field_name] = parsed


def _module(name: str, fields: dict[str, Any], warnings: list[str]) -> Module:
    if "site_fs" in fields:
        fields = {**fields, "site_fs": v.only_mounts(fields["site_fs"], warnings)}
    return Module(name=name, **fields)


def _suggest(key: str) -> str:
    import difflib

    known = list(KEYS) + sorted(IGNORED_KEYS)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:
        lowered = {k.lower(): k for k in known}
        if key.lower() in lowered:
            close = [lowered[key.lower()]]
    return f" (did you mean {close[0]}?)" if close else ""


def _check_whole(config: Config) -> None:
    """Checks that involve several keys."""
    where = config.path
    roots = {"udiMount": config.udi_mount, "loopMount": config.loop_mount}
    for name, path in roots.items():
        if path == "/" or path.count("/") < 2:
            raise node_error(where, f"{name} is too close to / to be used as a mount area", path)
    if config.udi_mount == config.loop_mount:
        raise node_error(where, "udiMount and loopMount must differ", config.udi_mount)
    for name in config.default_modules:
        if config.module(name) is None:
            raise node_error(where, "defaultModules names an undefined module", name)


def load(cli_path: str | None = None) -> Config:
    path = resolve_path(cli_path)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise node_error("config", "file not found", path) from None
    except (OSError, UnicodeDecodeError) as err:
        raise node_error("config", f"cannot read ({err})", path) from None
    return parse(text, path)


def describe(config: Config) -> str:
    """The effective configuration in udiRoot.conf syntax, for ``config check``."""
    lines = [f"# effective configuration from {config.path}"]
    for key, (field_name, _parser, _repeat) in KEYS.items():
        lines.append(f"{key}={_render(getattr(config, field_name))}")
    for module in config.modules:
        for subkey, (field_name, _parser) in MODULE_KEYS.items():
            lines.append(f"module_{module.name}_{subkey}={_render(getattr(module, field_name))}")
    return "\n".join(lines) + "\n"


def _render(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple) and value and all(isinstance(i, tuple) for i in value):
        return " ".join(f"{name}={setting}" for name, setting in value)  # env pairs
    if isinstance(value, tuple):
        return " ".join(_render(item) for item in value)
    if isinstance(value, SiteMount):
        flags = ",".join(f for f, on in (("ro", value.read_only), ("rec", value.recursive)) if on)
        return f"{value.source}:{value.dest}" + (f":{flags}" if flags else "")
    return str(value)


__all__ = [
    "DEFAULT_PATH",
    "KEYS",
    "Config",
    "Module",
    "ShifterError",
    "SiteMount",
    "load",
    "parse",
    "parse_mount_spec",
    "resolve_path",
    "usage_error",
]
