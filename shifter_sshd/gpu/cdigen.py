"""``shifter-sshd cdi generate``: a CDI spec from the NVIDIA driver installed on this node.

For sites without the NVIDIA Container Toolkit. It writes what ``nvidia-ctk cdi
generate`` writes, in its layout: one device per GPU (named by its minor number,
which is Slurm's gres index when gres.conf lists /dev/nvidia[0-N]) and ``all``; the
control nodes; the driver's user-space libraries, found through the host's loader
cache (so the driver's own install location, whatever the distribution); its
binaries and GSP firmware; and the two hooks (soname links and loader cache, and
``libcuda.so``) that shifter-sshd does natively. The same spec serves other CDI
runtimes, which run the hooks with the toolkit's ``nvidia-cdi-hook``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass

from ..errors import node_error
from . import ldcache

# The driver's user-space libraries, as nvidia-ctk lists them (compute, utility,
# video, graphics); what a node lacks is skipped.
LIBRARIES = (
    "libcuda.so.*", "libcudadebugger.so.*", "libnvidia-ml.so.*", "libnvidia-ptxjitcompiler.so.*",
    "libnvidia-nvvm.so.*", "libnvidia-opencl.so.*", "libnvidia-gpucomp.so.*",
    "libnvidia-allocator.so.*", "libnvidia-cfg.so.*", "libnvidia-opticalflow.so.*",
    "libnvidia-pkcs11*.so.*", "libnvcuvid.so.*", "libnvidia-encode.so.*", "libnvidia-fbc.so.*",
    "libEGL_nvidia.so.*", "libGLESv1_CM_nvidia.so.*", "libGLESv2_nvidia.so.*",
    "libGLX_nvidia.so.*", "libnvidia-eglcore.so.*", "libnvidia-glcore.so.*",
    "libnvidia-glsi.so.*", "libnvidia-glvkspirv.so.*", "libnvidia-rtcore.so.*",
    "libnvoptix.so.*", "libnvidia-tls.so.*", "libnvidia-ngx.so.*",
)  # fmt: skip
BINARIES = ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced", "nvidia-cuda-mps-control",
            "nvidia-cuda-mps-server")  # fmt: skip
CONTROL = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")
HOOK = "/usr/bin/nvidia-cdi-hook"
MOUNT_OPTIONS = ["ro", "nosuid", "nodev", "bind"]


@dataclass(frozen=True)
class Host:
    """Where to look: the real node's paths, or a test's stand-ins."""

    dev: str = "/dev"
    ld_cache: str = "/etc/ld.so.cache"
    bin_dirs: tuple[str, ...] = ("/usr/bin", "/usr/sbin", "/bin", "/sbin")
    firmware: str = "/lib/firmware/nvidia"
    version_file: str = "/proc/driver/nvidia/version"


def generate(host: Host = Host(), kind: str = "nvidia.com/gpu") -> dict[str, object]:
    """The spec for this node's driver and GPUs; a node error when there is no driver."""
    gpus = sorted((int(m[1]), m[0]) for n in _list(host.dev)
                  if (m := re.fullmatch(r"nvidia(\d+)", n)))  # fmt: skip
    if not gpus:
        raise node_error("cdi generate", "no GPU device node (is the driver loaded?)",
                         f"{host.dev}/nvidia*")  # fmt: skip
    libraries = _libraries(host.ld_cache)
    version = _version(host, libraries)
    devices = [{"name": str(index), "containerEdits": {"deviceNodes": [_node(host, name)]}}
               for index, name in gpus]  # fmt: skip
    devices.append({"name": "all", "containerEdits": {
        "deviceNodes": [_node(host, name) for _index, name in gpus]}})  # fmt: skip
    control = [_node(host, n) for n in CONTROL if os.path.exists(os.path.join(host.dev, n))]
    caps = os.path.join(host.dev, "nvidia-caps")
    control += [_node(host, f"nvidia-caps/{n}") for n in _list(caps)]
    mounts = [_mount(path) for path in libraries]
    mounts += [_mount(path) for name in BINARIES if (path := _binary(host, name))]
    firmware = os.path.join(host.firmware, version) if version else ""
    mounts += [_mount(os.path.join(firmware, n)) for n in _list(firmware) if n.endswith(".bin")]
    folders = sorted({os.path.dirname(path) for path in libraries})
    hooks = [{"hookName": "createContainer", "path": HOOK,
              "args": ["nvidia-cdi-hook", "update-ldcache"]
              + [arg for folder in folders for arg in ("--folder", folder)]}]  # fmt: skip
    cuda = [path for path in libraries if os.path.basename(path).startswith("libcuda.so.")]
    if cuda:
        link = f"libcuda.so.1::{os.path.dirname(cuda[0])}/libcuda.so"
        args = ["nvidia-cdi-hook", "create-symlinks", "--link", link]
        hooks.insert(0, {"hookName": "createContainer", "path": HOOK, "args": args})
    return {"cdiVersion": "0.5.0", "kind": kind, "devices": devices,
            "containerEdits": {"env": ["NVIDIA_VISIBLE_DEVICES=void"], "deviceNodes": control,
                               "mounts": mounts, "hooks": hooks}}  # fmt: skip


def render(spec: dict[str, object], form: str) -> str:
    if form == "json":
        return json.dumps(spec, indent=2) + "\n"
    import yaml

    return str(yaml.safe_dump(spec, sort_keys=False))


def _list(directory: str) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return []


def _node(host: Host, name: str) -> dict[str, object]:
    return {"path": f"/dev/{name}", "hostPath": os.path.join(host.dev, name)}


def _mount(path: str) -> dict[str, object]:
    return {"hostPath": path, "containerPath": path, "options": MOUNT_OPTIONS}


def _binary(host: Host, name: str) -> str | None:
    for directory in host.bin_dirs:
        path = os.path.join(directory, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _libraries(cache_path: str) -> list[str]:
    """The driver's libraries (the versioned files) listed in the host's loader cache."""
    try:
        with open(cache_path, "rb") as handle:
            entries = ldcache.read(handle.read()) or []
    except OSError as err:
        raise node_error("cdi generate", f"cannot read the loader cache ({err.strerror})",
                         cache_path) from None  # fmt: skip
    found: dict[str, None] = {}
    for entry in entries:
        real = os.path.realpath(os.fsdecode(entry.path))
        if any(fnmatch.fnmatchcase(os.path.basename(real), p) for p in LIBRARIES):
            found[real] = None
    return sorted(found)


def _version(host: Host, libraries: list[str]) -> str:
    """The driver version: from the kernel module, else libcuda's file name."""
    try:
        with open(host.version_file, encoding="utf-8") as handle:
            found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+\.\d+(?:\.\d+)?)", handle.read())
            if found:
                return found[1]
    except OSError:
        pass
    for path in libraries:
        found = re.fullmatch(r"libcuda\.so\.(\d+\.\d+(?:\.\d+)?)", os.path.basename(path))
        if found:
            return found[1]
    return ""
