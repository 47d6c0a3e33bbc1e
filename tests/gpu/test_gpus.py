"""GPUs in the container from CDI specs, on one node with fake GPUs (lab.fakegpu).

The prolog runs as slurmd would run it, with SLURM_JOB_GPUS set as gres sets it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BUSYBOX, DEBIAN
from support import Node, in_root

from lab import fakegpu
from lab.users import LabUser

SMI = "/usr/bin/nvidia-smi"


@pytest.fixture(scope="module")
def fake_gpus() -> Iterator[Path]:
    """Four fake GPUs, their driver and a YAML spec, readable by the test users."""
    top = Path(tempfile.mkdtemp(prefix="shifter-sshd-fakegpu-", dir="/var/tmp"))
    os.chmod(top, 0o755)
    fakegpu.build(top, gpus=4)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def _host_nvidia_nodes() -> set[str]:
    return {name for name in os.listdir("/dev") if name.startswith("nvidia")}


def _prolog(node: Node, user: LabUser, job: str, image: str = DEBIAN, **extra: str) -> str:
    env = node.job_env(job, user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=image, **extra)
    done = node.prolog(env)
    assert done.returncode == 0, done.stderr
    return done.stderr


@pytest.mark.parametrize("spec_format", ["yaml", "json"])
def test_the_jobs_gpus_and_only_those(
    node: Node, test_users: list[LabUser], fake_gpus: Path, spec_format: str, tmp_path: Path
) -> None:
    specs = tmp_path / "cdi"
    specs.mkdir()
    spec = fakegpu.spec_dict(fake_gpus, 4)
    text = json.dumps(spec) if spec_format == "json" else fakegpu.to_yaml(spec)
    (specs / f"gpu.{spec_format}").write_text(text)
    node.write_config(cdiSpecDirs=str(specs))
    user, before = test_users[0], _host_nvidia_nodes()
    _prolog(node, user, "301", SLURM_JOB_GPUS="1,3")
    script = ("ls /dev; nvidia-smi -L; /sbin/ldconfig -p | grep -E 'lib(cuda|nvidia-ml)'; "
              f"readlink {fakegpu.LIB_FOLDER}/libcuda.so; cat /dev/nvidia0; "
              "(exec 3<> /dev/nvidia1) && echo opened")  # fmt: skip
    inside = in_root(node.root("301"), user.uid, [user.gid], script)
    out = inside.stdout
    listed = out.split("GPU 0")[0].split()
    assert {n for n in listed if n.startswith("nvidia")} == {"nvidia1", "nvidia3", "nvidiactl",
                                                             "nvidia-uvm"}, out  # fmt: skip
    assert "GPU 0: Fake GPU (UUID: GPU-fake-" in out and out.count("(UUID: GPU-fake-") == 2
    assert "-1)\n" in out and "-3)\n" in out, out
    assert f"libcuda.so.1 (libc6,x86-64) => {fakegpu.LIB_FOLDER}/libcuda.so.1" in out, out
    assert f"libnvidia-ml.so.1 (libc6,x86-64) => {fakegpu.LIB_FOLDER}/libnvidia-ml.so.1" in out
    assert "libcuda.so.1\n" in out  # the create-symlinks hook's link
    assert "/dev/nvidia0: No such file or directory" in inside.stderr
    assert "opened" in out
    cache = in_root(node.root("301"), user.uid, [user.gid], "/sbin/ldconfig -p").stdout
    assert "libc.so.6 (libc6,x86-64)" in cache  # the image's own entries are kept
    env = json.loads(Path(node.state_path, "301.container").read_text())["env"]
    assert (env["CUDA_VISIBLE_DEVICES"], env["NVIDIA_VISIBLE_DEVICES"]) == ("0,1", "1,3")
    assert _host_nvidia_nodes() == before  # the host's /dev untouched
    assert node.epilog("301").returncode == 0
    assert node.leftovers() == []


def test_jobs_without_gpus_get_none_and_a_dev_of_their_own(
    node: Node, test_users: list[LabUser], fake_gpus: Path
) -> None:
    node.write_config(cdiSpecDirs=str(fake_gpus / "cdi"))
    user = test_users[0]
    _prolog(node, user, "302", image=BUSYBOX)
    root = node.root("302")
    inside = in_root(root, user.uid, [user.gid], "ls -a /dev; ls /dev/pts; echo ok > /dev/null")
    names = set(inside.stdout.split())
    assert {"null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm", "fd",
            "stdin", "stdout", "stderr"} <= names, inside.stdout  # fmt: skip
    assert not any(n.startswith(("nvidia", "sd", "loop", "mem", "kmsg")) for n in names), names
    assert not os.path.exists(f"{root}{SMI}")
    # /dev is the container's own tmpfs: a node made there (by root) is not the host's
    os.mknod(f"{root}/dev/shifter-test-node", 0o20600, os.makedev(1, 3))
    assert not os.path.exists("/dev/shifter-test-node")
    assert node.epilog("302").returncode == 0
    assert node.leftovers() == []


def test_module_gpu_without_gpus_is_the_users_mistake(
    node: Node, test_users: list[LabUser], fake_gpus: Path
) -> None:
    node.write_config(cdiSpecDirs=str(fake_gpus / "cdi"), gpuInjection="module")
    user = test_users[0]
    err = _prolog(node, user, "303", SPANK_SHIFTER_MODULE="gpu")
    assert "--module: the job has no GPU on this node" in err
    assert node.epilog("303").returncode == 0
    # with the module and GPUs: injected; without the module: not
    _prolog(node, user, "304", SPANK_SHIFTER_MODULE="gpu", SLURM_JOB_GPUS="0")
    assert os.path.exists(f"{node.root('304')}/dev/nvidia0")
    _prolog(node, user, "305", SLURM_JOB_GPUS="2")
    assert not os.path.exists(f"{node.root('305')}/dev/nvidia2")
    for job in ("304", "305"):
        assert node.epilog(job).returncode == 0
    assert node.leftovers() == []


@pytest.mark.parametrize(("change", "message"), [
    ("cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices: [\n", "not a valid spec"),
    ("cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n- name: '0'\n  colour: red\n",
     "unknown field in devices[0]: colour"),
    ("cdiVersion: 0.1.0\nkind: nvidia.com/gpu\ndevices: []\n", "cdiVersion not one of"),
    ("missing-node", "a spec's device node is missing (No such file or directory)"),
    ("missing-lib", "a spec mounts a file this node does not have"),
    ("no-device", "no spec in"),
])  # fmt: skip
def test_a_broken_spec_is_the_nodes_problem_for_gpu_jobs_only(
    node: Node, test_users: list[LabUser], fake_gpus: Path, tmp_path: Path, change: str,
    message: str,
) -> None:  # fmt: skip
    specs = tmp_path / "cdi"
    specs.mkdir()
    spec = fakegpu.spec_dict(fake_gpus, 4)
    if change == "missing-node":
        spec["devices"][0]["containerEdits"]["deviceNodes"][0]["hostPath"] = "/nonexistent/nv0"  # type: ignore[index]
    elif change == "missing-lib":
        spec["containerEdits"]["mounts"][0]["hostPath"] = "/nonexistent/libcuda.so"  # type: ignore[index]
    elif change == "no-device":
        spec["devices"] = spec["devices"][1:]  # type: ignore[index]
    text = fakegpu.to_yaml(spec) if change.startswith(("missing-", "no-")) else change
    (specs / "gpu.yaml").write_text(text)
    node.write_config(cdiSpecDirs=str(specs))
    user = test_users[0]
    env = node.job_env("306", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=DEBIAN,
                       SLURM_JOB_GPUS="0")  # fmt: skip
    done = node.prolog(env)
    assert done.returncode == 1, done.stderr  # the site's spec is wrong: drain
    assert message in done.stderr and "shifter-sshd: cdi: " in done.stderr, done.stderr
    assert node.epilog("306").returncode == 0
    _prolog(node, user, "307", image=BUSYBOX)  # a job without GPUs never reads the specs
    assert node.epilog("307").returncode == 0
    assert node.leftovers() == []


def test_files_in_a_new_directory_high_up_do_not_hide_the_libraries(
    node: Node, test_users: list[LabUser], fake_gpus: Path, tmp_path: Path
) -> None:
    """A spec's file whose directory the image lacks, high up (/usr/fake-firmware here;
    /lib/firmware/nvidia/<version> of a real driver, through /lib -> usr/lib), listed
    after the libraries: its overlay goes on /usr first, so the libraries bound below
    it stay visible."""
    firmware = tmp_path / "gsp.bin"
    firmware.write_text("firmware blob\n")
    firmware.chmod(0o644)
    spec = fakegpu.spec_dict(fake_gpus, 4)
    edits = spec["containerEdits"]
    assert isinstance(edits, dict)
    edits["mounts"].append({"hostPath": str(firmware),
                            "containerPath": "/usr/fake-firmware/550/gsp.bin",
                            "options": ["ro", "nosuid", "nodev", "bind"]})  # fmt: skip
    specs = tmp_path / "cdi"
    specs.mkdir()
    (specs / "gpu.json").write_text(json.dumps(spec))
    node.write_config(cdiSpecDirs=str(specs))
    user = test_users[0]
    _prolog(node, user, "308", SLURM_JOB_GPUS="2")
    inside = in_root(node.root("308"), user.uid, [user.gid],
                     "nvidia-smi -L; cat /usr/fake-firmware/550/gsp.bin")  # fmt: skip
    assert inside.returncode == 0, inside.stderr
    assert "GPU 0: Fake GPU" in inside.stdout and "-2)" in inside.stdout
    assert "firmware blob" in inside.stdout
    assert node.epilog("308").returncode == 0
    assert node.leftovers() == []
