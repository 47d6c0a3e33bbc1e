"""What GPU injection adds to the prolog: 8 GPUs, a spec of realistic size, side by side.

Run as root: ``python -m benchmarks.bench_gpus [rounds]`` (default 15). A fake driver
(lab.fakegpu) with 8 GPUs and about 60 libraries (one tiny shared library per name
nvidia-ctk lists, and as many more), plus the
driver's binaries; the spec in YAML, as nvidia-ctk writes it. Each round runs the
prolog and epilog of a job with all 8 GPUs and of the same job without GPUs, on the
Debian image, in turn; prints the medians, the prolog's "gpus" step and the
difference. The goal is at most 20 ms more.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from lab import VENV, fakegpu, images, users

PROLOG = os.path.join(VENV, "bin", "shifter-sshd-prolog")
EPILOG = os.path.join(VENV, "bin", "shifter-sshd-epilog")
CLI = os.path.join(VENV, "bin", "shifter-sshd")
LIB_NAMES = ("libcuda", "libcudadebugger", "libnvidia-ml", "libnvidia-ptxjitcompiler",
             "libnvidia-nvvm", "libnvidia-opencl", "libnvidia-gpucomp", "libnvidia-allocator",
             "libnvidia-cfg", "libnvidia-opticalflow", "libnvcuvid", "libnvidia-encode",
             "libnvidia-fbc", "libEGL_nvidia", "libGLESv1_CM_nvidia", "libGLESv2_nvidia",
             "libGLX_nvidia", "libnvidia-eglcore", "libnvidia-glcore", "libnvidia-glsi",
             "libnvidia-glvkspirv", "libnvidia-rtcore", "libnvoptix", "libnvidia-tls",
             "libnvidia-ngx", "libnvidia-pkcs11", "libnvidia-egl-gbm", "libnvidia-egl-wayland",
             "libnvidia-vulkan-producer", "libnvidia-wayland-client")  # fmt: skip
GPUS = 8


def driver(top: Path) -> Path:
    """The fake driver with ~60 library files; returns the spec directory."""
    specs = fakegpu.build(top, gpus=GPUS)
    spec = fakegpu.spec_dict(top, GPUS)
    edits = spec["containerEdits"]
    assert isinstance(edits, dict)
    source = top / "src" / "tiny.c"
    source.write_text("int tiny(void) { return 0; }\n")
    names = [*LIB_NAMES, *(f"libnvidia-part{i}" for i in range(30))]
    for name in names:
        lib = top / "lib" / f"{name}.so.{fakegpu.VERSION}"
        if lib.exists():
            continue  # libcuda and libnvidia-ml: lab.fakegpu's, in the spec already
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), f"-Wl,-soname,{name}.so.1",
                        str(source)], check=True)  # fmt: skip
        edits["mounts"].append({"hostPath": str(lib),
                                "containerPath": f"{fakegpu.LIB_FOLDER}/{lib.name}",
                                "options": ["ro", "nosuid", "nodev", "bind"]})  # fmt: skip
    (specs / "fake-gpu.yaml").write_text(fakegpu.to_yaml(spec))
    subprocess.run(["chmod", "-R", "a+rX", str(top)], check=True)
    return specs


def _timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False, cwd="/")
    elapsed = time.perf_counter() - started
    if done.returncode != 0 or "error" in done.stderr:
        raise SystemExit(f"{argv[0]} failed: {done.stderr}")
    return elapsed, done.stderr


def _step(stderr: str, name: str) -> float:
    for line in stderr.splitlines():
        if line.startswith(f"timing {name} "):
            return float(line.rsplit(" ", 1)[1]) / 1000
    return 0.0


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    work = Path(tempfile.mkdtemp(prefix="bench-gpus-", dir="/var/tmp"))
    top = Path(f"/opt/bench-gpus-{uuid.uuid4().hex[:8]}")
    try:
        os.chmod(work, 0o755)
        specs = driver(top)
        mounts = len(list((top / "lib").iterdir())) + 1
        config = work / "udiRoot.conf"
        config.write_text(f"imagePath={work}/images\nudiMount=/var/udiMount-bgpu\n"
                          f"loopMount=/var/udiLoopMount-bgpu\nstatePath=/run/shifter-sshd-bgpu\n"
                          f"optUdiImage={work}/udiImage\nenableSshd=0\n"
                          f"cdiSpecDirs={specs}\n")  # fmt: skip
        (work / "udiImage").mkdir()
        subprocess.run([CLI, "--config", str(config), "image", "import",
                        str(images.debian_squashfs("openmpi")), "docker:debian:bgpu"],
                       check=True, capture_output=True)  # fmt: skip
        user = users.ensure_users()[0]
        base = {"SLURM_JOB_ID": "9", "SLURM_JOB_UID": str(user.uid),
                "SLURM_JOB_GID": str(user.gid), "SLURM_JOB_USER": user.name,
                "SLURMD_NODENAME": "node1", "SLURM_NODELIST": "node1",
                "SLURM_JOB_CPUS_PER_NODE": "2", "SPANK_SHIFTER_IMAGE": "docker:debian:bgpu",
                "SHIFTER_SSHD_TIMING": "1"}  # fmt: skip
        with_gpus = {**base, "SLURM_JOB_GPUS": ",".join(str(i) for i in range(GPUS))}
        rows: dict[str, list[float]] = {}
        for number in range(rounds + 1):  # round 0 warms up
            for label, env in (("no GPU", base), (f"{GPUS} GPUs", with_gpus)):
                prolog, err = _timed([PROLOG, "--config", str(config)], env)
                epilog, _ = _timed([EPILOG, "--config", str(config)], {"SLURM_JOB_ID": "9"})
                if number:
                    rows.setdefault(f"prolog, {label}", []).append(prolog)
                    for step in ("request", "system", "gpus"):  # spec reading, /dev, binds
                        rows.setdefault(f"  {step} step, {label}", []).append(_step(err, step))
                    rows.setdefault(f"epilog, {label}", []).append(epilog)
        medians = {key: statistics.median(values) for key, values in rows.items()}
        print(f"\n{GPUS} GPUs, {mounts} files bound (libraries and nvidia-smi), {rounds} rounds,"
              " medians:")  # fmt: skip
        for key, value in medians.items():
            print(f"  {key:<30} {value * 1000:.1f} ms")
        extra = medians[f"prolog, {GPUS} GPUs"] - medians["prolog, no GPU"]
        print(f"  {'prolog: added by the GPUs':<30} {extra * 1000:.1f} ms (goal: <= 20 ms)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
