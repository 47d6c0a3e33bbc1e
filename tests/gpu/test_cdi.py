"""CDI specs, the loader cache, Slurm's GPU indexes and ``cdi generate``: the pure parts,
checked against real files (the host's own ld.so.cache, glibc's ldconfig, lab.fakegpu)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DEBIAN
from support import CLI, TESTS, Node, in_root, run

from lab import fakegpu
from lab.users import LabUser
from shifter_sshd.errors import Kind, ShifterError
from shifter_sshd.gpu import cdi, cdigen, ldcache
from shifter_sshd.gpu import plan as gpus

NODE = {"deviceNodes": [{"path": "/dev/x0"}]}
MINIMAL = {"cdiVersion": "0.5.0", "kind": "example.com/gpu",
           "devices": [{"name": "0", "containerEdits": NODE}]}  # fmt: skip


def _write(tmp_path: Path, spec: object, name: str = "spec.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(spec) if name.endswith(".json") else fakegpu.to_yaml(spec))  # type: ignore[arg-type]
    return str(path)


@pytest.mark.parametrize("version", cdi.VERSIONS)
@pytest.mark.parametrize("name", ["spec.json", "spec.yaml"])
def test_every_version_and_format_loads(tmp_path: Path, version: str, name: str) -> None:
    spec = cdi.load(_write(tmp_path, {**MINIMAL, "cdiVersion": version}, name))
    assert spec.kind == "example.com/gpu" and list(spec.devices) == ["0"]
    assert spec.devices["0"].device_nodes[0].host_path == "/dev/x0"  # hostPath defaults


@pytest.mark.parametrize(("change", "message"), [
    ({"colour": 1}, "unknown field in the spec: colour"),
    ({"kind": "gpu"}, "kind must be vendor/class: gpu"),
    ({"devices": []}, "the spec lists no device"),
    ({"devices": [{"name": "0"}, {"name": "0"}]}, "device listed twice: example.com/gpu=0"),
    ({"devices": [{"name": "a/b"}]}, "is not a device name: a/b"),
    ({"containerEdits": {"deviceNodes": [{"path": "/etc/x"}]}}, "path must be under /dev"),
    ({"containerEdits": {"mounts": [{"hostPath": "lib", "containerPath": "/x"}]}},
     "hostPath must be an absolute path: lib"),
    ({"containerEdits": {"mounts": [{"hostPath": "/a", "containerPath": "/b", "type": "nfs"}]}},
     "only bind mounts are supported: nfs"),
    ({"containerEdits": {"env": ["NOEQUALS"]}}, "env[0] is not NAME=VALUE"),
    ({"containerEdits": {"hooks": [{"hookName": "x", "path": "/x", "args": [1]}]}},
     "args must be a list of words"),
    ({"containerEdits": {"deviceNodes": [{"path": "/dev/x", "major": -1}]}}, "major must be"),
])  # fmt: skip
def test_what_a_spec_may_not_say(tmp_path: Path, change: dict[str, object], message: str) -> None:
    with pytest.raises(ShifterError) as caught:
        cdi.load(_write(tmp_path, {**MINIMAL, **change}))
    assert message in str(caught.value) and caught.value.kind == Kind.NODE
    assert str(tmp_path / "spec.json") in str(caught.value)


def test_edits_it_cannot_apply_are_said_not_fatal(tmp_path: Path) -> None:
    spec = cdi.load(_write(tmp_path, {**MINIMAL, "cdiVersion": "0.7.0",
                                      "containerEdits": {"additionalGids": [44]}}))  # fmt: skip
    assert spec.edits.ignored == ["additionalGids: processes run with the job user's own groups"]


def test_later_directories_win_and_one_directory_may_not_conflict(tmp_path: Path) -> None:
    first, second = tmp_path / "etc", tmp_path / "run"
    first.mkdir()
    second.mkdir()
    _write(first, MINIMAL, "a.json")
    other = {**MINIMAL, "devices": [{"name": "0", "containerEdits": {"env": ["FROM=run"]}}]}
    _write(second, other, "b.yaml")
    edits = cdi.select((str(first), str(second)), ["example.com/gpu=0"])
    assert edits.env == ["FROM=run"] and edits.device_nodes == []
    _write(first, other, "c.json")
    with pytest.raises(ShifterError, match="device in two specs of one directory"):
        cdi.select((str(first), str(second)), ["example.com/gpu=0"])


@pytest.mark.parametrize(("value", "expected"), [
    ("0,1", ["0", "1"]), ("0-2,5", ["0", "1", "2", "5"]), ("", []), ("NoDevFiles", []),
    ("3", ["3"]), ("1,1", ["1"]),
])  # fmt: skip
def test_slurms_gpu_indexes(value: str, expected: list[str]) -> None:
    assert gpus.job_gpus({"SLURM_JOB_GPUS": value}) == expected
    assert gpus.job_gpus({"CUDA_VISIBLE_DEVICES": value}) == expected


def test_slurms_gpu_indexes_malformed() -> None:
    with pytest.raises(ShifterError, match="not a list of indexes: 0,x"):
        gpus.job_gpus({"SLURM_JOB_GPUS": "0,x"})


# --- the loader cache ------------------------------------------------------------------------


def test_cache_round_trip_keeps_ldconfigs_order() -> None:
    """The host's own cache, written by glibc's ldconfig: read, rewritten, same order."""
    data = Path("/etc/ld.so.cache").read_bytes()
    entries = ldcache.read(data)
    assert entries is not None and len(entries) > 50
    again = ldcache.read(ldcache.write(entries))
    assert again is not None
    assert [(e.soname, e.path, e.flags) for e in again] == [
        (e.soname, e.path, e.flags) for e in entries
    ]


def test_a_written_cache_is_what_ldconfig_reads(tmp_path: Path) -> None:
    flags = ldcache.FLAG_X86_64_LIBC6
    entries = [ldcache.Entry(b"libfoo.so.1", b"/opt/x/libfoo.so.1", flags),
               ldcache.Entry(b"libfoo.so.10", b"/opt/x/libfoo.so.10", flags),
               ldcache.Entry(b"libbar.so.2", b"/opt/y/libbar.so.2", flags)]  # fmt: skip
    cache = tmp_path / "ld.so.cache"
    cache.write_bytes(ldcache.write(entries))
    listed = subprocess.run(["/sbin/ldconfig", "-p", "-C", str(cache)], capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    assert "3 libs found in cache" in listed
    assert listed.index("libfoo.so.10") < listed.index("libfoo.so.1 ") < listed.index("libbar")
    assert "libbar.so.2 (libc6,x86-64) => /opt/y/libbar.so.2" in listed


@pytest.mark.parametrize(("one", "two", "sign"), [
    (b"libc.so.6", b"libc.so.6", 0), (b"libfoo.so.10", b"libfoo.so.9", 1),
    (b"libfoo.so.1", b"libfoo.so", 1), (b"liba.so", b"libb.so", -1), (b"lib1.so", b"liba.so", 1),
])  # fmt: skip
def test_libcmp_is_glibcs(one: bytes, two: bytes, sign: int) -> None:
    result = ldcache.libcmp(one, two)
    assert (result > 0) - (result < 0) == sign


def test_soname_of_real_libraries() -> None:
    assert ldcache.soname(Path("/usr/lib/x86_64-linux-gnu/libz.so.1").read_bytes()) == (
        b"libz.so.1", ldcache.FLAG_X86_64_LIBC6)  # fmt: skip
    assert ldcache.soname(b"not an ELF file at all, not at all") is None


# --- cdi generate ------------------------------------------------------------------------------


def _fake_host(top: Path) -> cdigen.Host:
    """The fake driver as a node would have it: its libraries in the loader cache."""
    lib = top / "lib"
    entries = [ldcache.Entry(name.encode(), str(lib / name).encode(), ldcache.FLAG_X86_64_LIBC6)
               for name in ("libnvidia-ml.so.1", "libcuda.so.1")]  # fmt: skip
    (top / "ld.so.cache").write_bytes(ldcache.write(entries))
    return cdigen.Host(dev=str(top / "dev"), ld_cache=str(top / "ld.so.cache"),
                       bin_dirs=(str(top / "bin"),), firmware=str(top / "firmware"),
                       version_file=str(top / "no-version"))  # fmt: skip


def test_generated_spec_describes_the_driver(tmp_path: Path) -> None:
    fakegpu.build(tmp_path, gpus=3)
    spec = cdigen.generate(_fake_host(tmp_path))
    path = tmp_path / "generated.yaml"
    path.write_text(cdigen.render(spec, "yaml"))
    loaded = cdi.load(str(path))  # what the prolog reads
    assert sorted(loaded.devices) == ["0", "1", "2", "all"]
    assert [n.path for n in loaded.edits.device_nodes] == ["/dev/nvidiactl", "/dev/nvidia-uvm"]
    mounted = sorted(os.path.basename(m.container_path) for m in loaded.edits.mounts)
    assert mounted == [f"libcuda.so.{fakegpu.VERSION}", f"libnvidia-ml.so.{fakegpu.VERSION}",
                       "nvidia-smi"]  # fmt: skip
    hooks = [h.args for h in loaded.edits.hooks]
    assert hooks[0][1:3] == ("create-symlinks", "--link") and hooks[1][1] == "update-ldcache"


def test_generate_without_a_driver_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ShifterError, match="no GPU device node"):
        cdigen.generate(cdigen.Host(dev=str(tmp_path)))
    done = run([CLI, "cdi", "generate"], {"PATH": os.environ["PATH"]})
    has_gpu = any(n.startswith("nvidia") and n[6:].isdigit() for n in os.listdir("/dev"))
    if has_gpu:  # a real GPU node: a spec
        assert done.returncode == 0 and "nvidia.com/gpu" in done.stdout, done.stderr
    else:
        assert done.returncode == 1
        assert "cdi generate: no GPU device node (is the driver loaded?)" in done.stderr


@pytest.fixture
def driver_dir() -> Iterator[Path]:
    """Where a driver could be: root's, not under a directory others may write (the
    prolog refuses to make mount points in one), and not in any image: under /opt."""
    top = Path(f"/opt/shifter-sshd-fakegpu-{uuid.uuid4().hex[:8]}")
    top.mkdir(mode=0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def test_a_generated_spec_serves_the_prolog(
    node: Node, test_users: list[LabUser], driver_dir: Path
) -> None:
    """End to end: fake driver, ``cdi generate`` from it, a job with GPU 1."""
    top = driver_dir
    fakegpu.build(top, gpus=2)
    specs = top / "generated"
    specs.mkdir()
    (specs / "nvidia.json").write_text(cdigen.render(cdigen.generate(_fake_host(top)), "json"))
    node.write_config(cdiSpecDirs=str(specs))
    user = test_users[0]
    env = node.job_env("311", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=DEBIAN,
                       SLURM_JOB_GPUS="1")  # fmt: skip
    done = node.prolog(env)
    assert done.returncode == 0, done.stderr
    smi = f"{top}/bin/nvidia-smi"  # nvidia-ctk's layout: the host's own paths
    inside = in_root(node.root("311"), user.uid, [user.gid], f"{smi} -L; ls {top}/lib")
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.count("GPU-fake-") == 1 and "-1)" in inside.stdout
    assert "libcuda.so\n" in inside.stdout  # the create-symlinks hook's link
    assert node.epilog("311").returncode == 0
    assert node.leftovers() == []


def test_the_real_gpu_check_passes_on_fake_gpus(driver_dir: Path) -> None:
    """tests/gpu/check.sh, pointed at lab.fakegpu: what it will do on a real GPU node."""
    fakegpu.build(driver_dir, gpus=3)
    env = {**os.environ, "GPU_CHECK_DEV": str(driver_dir / "dev"),
           "GPU_CHECK_SMI": str(driver_dir / "bin" / "nvidia-smi"),
           "GPU_CHECK_LIBS": str(driver_dir / "lib"), "GPU_CHECK_SPECS": str(driver_dir / "cdi"),
           "GPU_CHECK_SMI_IN": "/usr/bin/nvidia-smi"}  # fmt: skip
    script = TESTS / "gpu" / "check.sh"
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("cuda devices: 3") == 2 and "gpu check: OK" in done.stdout
