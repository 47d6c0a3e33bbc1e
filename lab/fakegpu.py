"""Fake NVIDIA GPUs for machines without one: device nodes, a driver, a CDI spec.

What a GPU node has, in miniature and under one directory (the host's /dev is not
touched):

- ``dev/nvidia0..N-1``, ``dev/nvidiactl``, ``dev/nvidia-uvm``: character devices made
  with mknod. They carry /dev/full's numbers (1:7), which any user may open: the
  container only ever holds the job's own, which is what the tests check.
- ``lib/libnvidia-ml.so.<version>`` (soname libnvidia-ml.so.1) and
  ``lib/libcuda.so.<version>`` (soname libcuda.so.1): tiny shared libraries.
- ``bin/nvidia-smi``: links against libnvidia-ml.so.1 and, like ``nvidia-smi -L``,
  lists the GPUs it can open, with the host device index in the UUID; libcuda
  answers cuInit, cuDeviceGetCount, cuDeviceGet and cuDeviceGetName the same way.
  Both look in /dev, or in $FAKE_GPU_DEV (the fake nodes' directory, on the host).
- ``cdi/fake-gpu.yaml`` (or .json): the spec ``nvidia-ctk cdi generate`` would write
  for them, with the libraries in /usr/local/nvidia/lib64, a folder the loader
  searches only through its cache, so a working nvidia-smi in a container proves
  the native update-ldcache hook.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

VERSION = "550.54.15"
LIB_FOLDER = "/usr/local/nvidia/lib64"
FAKE_RDEV = os.makedev(1, 7)

NVML_C = """
const char *fake_nvml_name(void) { return "Fake GPU"; }
"""
# The CUDA driver API calls tests/gpu/check.sh makes, answered from the device nodes
# this process can open: /dev, or $FAKE_GPU_DEV on the host.
CUDA_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static int opened[64], count = -1;
static void scan(void) {
    const char *dev = getenv("FAKE_GPU_DEV");
    count = 0;
    for (int i = 0; i < 64; i++) {
        char path[512];
        snprintf(path, sizeof path, "%s/nvidia%d", dev ? dev : "/dev", i);
        int fd = open(path, O_RDWR);
        if (fd >= 0) { close(fd); opened[count++] = i; }
    }
}
int cuInit(unsigned int flags) { (void)flags; scan(); return 0; }
int cuDeviceGetCount(int *n) { if (count < 0) return 3; *n = count; return 0; }
int cuDeviceGet(int *device, int ordinal) {
    if (ordinal < 0 || ordinal >= count) return 101;
    *device = ordinal; return 0;
}
int cuDeviceGetName(char *name, int len, int device) {
    if (device < 0 || device >= count) return 101;
    snprintf(name, len, "Fake GPU %d", opened[device]); return 0;
}
"""
SMI_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
const char *fake_nvml_name(void);
int main(void) {
    char host[256] = "";
    int found = 0;
    const char *dev = getenv("FAKE_GPU_DEV");
    gethostname(host, sizeof host - 1);
    for (int i = 0; i < 64; i++) {
        char path[512];
        snprintf(path, sizeof path, "%s/nvidia%d", dev ? dev : "/dev", i);
        int fd = open(path, O_RDWR);
        if (fd < 0)
            continue;
        close(fd);
        printf("GPU %d: %s (UUID: GPU-fake-%s-%d)\n", found++, fake_nvml_name(), host, i);
    }
    if (!found) {
        fprintf(stderr, "No devices were found\n");
        return 6;
    }
    return 0;
}
"""


def build(directory: str | Path, gpus: int = 4, spec_format: str = "yaml") -> Path:
    """The fake driver, devices and spec under ``directory``; returns the spec dir."""
    top = Path(directory)
    for sub in ("dev", "lib", "bin", "cdi", "src"):
        (top / sub).mkdir(parents=True, exist_ok=True)
    for name in [f"nvidia{i}" for i in range(gpus)] + ["nvidiactl", "nvidia-uvm"]:
        node = top / "dev" / name
        if not node.exists():
            os.mknod(node, stat.S_IFCHR | 0o666, FAKE_RDEV)
        os.chmod(node, 0o666)
    _compile(top, "libnvidia-ml", NVML_C)
    _compile(top, "libcuda", CUDA_C)
    for name in ("libnvidia-ml", "libcuda"):  # what the host's loader would find
        link = top / "lib" / f"{name}.so.1"
        if not link.is_symlink():
            link.symlink_to(f"{name}.so.{VERSION}")
    smi = top / "src" / "nvidia-smi.c"
    smi.write_text(SMI_C)
    subprocess.run(["gcc", "-O1", "-o", str(top / "bin" / "nvidia-smi"), str(smi),
                    str(top / "lib" / f"libnvidia-ml.so.{VERSION}")], check=True)  # fmt: skip
    spec = spec_dict(top, gpus)
    target = top / "cdi" / f"fake-gpu.{spec_format}"
    target.write_text(json.dumps(spec, indent=1) if spec_format == "json" else to_yaml(spec))
    subprocess.run(["chmod", "-R", "a+rX", str(top)], check=True)
    return top / "cdi"


def _compile(top: Path, name: str, source: str) -> None:
    path = top / "src" / f"{name}.c"
    path.write_text(source)
    soname = f"{name}.so.1"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", f"-Wl,-soname,{soname}", "-o",
                    str(top / "lib" / f"{name}.so.{VERSION}"), str(path)], check=True)  # fmt: skip


def spec_dict(top: Path, gpus: int) -> dict[str, object]:
    """What nvidia-ctk writes, for the fake driver: per-GPU nodes, shared edits."""
    dev = top / "dev"
    libs = [f"libnvidia-ml.so.{VERSION}", f"libcuda.so.{VERSION}"]
    hook = {"hookName": "createContainer", "path": "/usr/bin/nvidia-cdi-hook"}
    return {
        "cdiVersion": "0.5.0",
        "kind": "nvidia.com/gpu",
        "devices": [
            {"name": str(i), "containerEdits": {"deviceNodes": [
                {"path": f"/dev/nvidia{i}", "hostPath": str(dev / f"nvidia{i}")}]}}
            for i in range(gpus)
        ] + [{"name": "all", "containerEdits": {"deviceNodes": [
            {"path": f"/dev/nvidia{i}", "hostPath": str(dev / f"nvidia{i}")}
            for i in range(gpus)]}}],
        "containerEdits": {
            "env": ["NVIDIA_VISIBLE_DEVICES=void"],
            "deviceNodes": [{"path": "/dev/nvidiactl", "hostPath": str(dev / "nvidiactl")},
                            {"path": "/dev/nvidia-uvm", "hostPath": str(dev / "nvidia-uvm")}],
            "mounts": [{"hostPath": str(top / "lib" / lib), "containerPath": f"{LIB_FOLDER}/{lib}",
                        "options": ["ro", "nosuid", "nodev", "bind"]} for lib in libs]
            + [{"hostPath": str(top / "bin" / "nvidia-smi"), "containerPath": "/usr/bin/nvidia-smi",
                "options": ["ro", "nosuid", "nodev", "bind"]}],
            "hooks": [
                {**hook, "args": ["nvidia-cdi-hook", "create-symlinks",
                                  "--link", f"libcuda.so.1::{LIB_FOLDER}/libcuda.so"]},
                {**hook, "args": ["nvidia-cdi-hook", "update-ldcache", "--folder", LIB_FOLDER]},
            ],
        },
    }  # fmt: skip


def to_yaml(spec: dict[str, object]) -> str:
    import yaml

    return str(yaml.safe_dump(spec, sort_keys=False))
