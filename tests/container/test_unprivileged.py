"""``shifter --image=NAME CMD`` with no job and no root (container/unprivileged.py): run
as an unprivileged test user, it shows the image and the user's home, and leaves no
process, mount or directory behind, even when ``shifter`` is SIGKILLed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import CLI, run

from lab import VENV, fakegpu, images
from lab.users import LabUser
from shifter_sshd.kernel import processes

SHIFTER = os.path.join(VENV, "bin", "shifter")
IMAGE = "docker:busybox:standalone"


@dataclass(frozen=True)
class Site:
    config: str
    directory: Path


@pytest.fixture
def site(user_tmp: Path, fuse_device: str) -> Site:
    """A store the users can read, with the busybox image imported (by root)."""
    config = user_tmp / "udiRoot.conf"
    config.write_text(f"imagePath={user_tmp}/images\nsiteFs={user_tmp}/site:/site\n")
    (user_tmp / "site").mkdir()
    (user_tmp / "site" / "note").write_text("from siteFs\n")
    tree = images.busybox_tree(user_tmp / "busybox", pretty_name="Standalone busybox")
    done = run([CLI, "--config", str(config), "image", "import", str(tree), IMAGE],
               dict(os.environ))  # fmt: skip
    assert done.returncode == 0, done.stderr
    subprocess.run(["chmod", "-R", "a+rX", str(user_tmp)], check=True)
    return Site(str(config), user_tmp)


def _argv(user: LabUser, *args: str) -> list[str]:
    return ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups",
            SHIFTER, *args]  # fmt: skip


def _env(site: Site, user: LabUser) -> dict[str, str]:
    """A login node's environment: no SLURM_JOB_ID."""
    return {"PATH": "/usr/bin:/bin", "HOME": user.home, "USER": user.name, "PWD": user.home,
            "SHIFTER_SSHD_CONFIG": site.config}  # fmt: skip


def _shifter(site: Site, user: LabUser, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_argv(user, *args), env=_env(site, user), cwd=user.home,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


def _theirs(user: LabUser, names: tuple[str, ...]) -> list[str]:
    """The user's processes with one of these command names."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and processes.owner(int(entry)) == user.uid:
            stat = processes.read_stat(int(entry))
            if stat is not None and stat.name in names and stat.state != "Z":
                found.append(f"{entry} {stat.name}")
    return found


@pytest.fixture
def user(test_users: list[LabUser]) -> Iterator[LabUser]:
    who = test_users[1]
    assert _theirs(who, ("squashfuse",)) == []
    yield who
    assert _theirs(who, ("squashfuse",)) == []  # nothing of ours left, whatever happened


@pytest.fixture
def data() -> Iterator[Path]:
    """A volume source under /tmp, which the container's own tmpfs covers there."""
    path = Path(tempfile.mkdtemp(prefix="shifter-sshd-standalone-", dir="/tmp"))
    (path / "in").write_text("a volume\n")
    subprocess.run(["chmod", "-R", "a+rX", str(path)], check=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_image_and_the_home_as_the_user(site: Site, user: LabUser, data: Path) -> None:
    script = ("grep PRETTY_NAME /etc/os-release; id -u; id -un; echo $HOME; ls -d $HOME; "
              "cat /site/note /data/in; echo written > /etc/new && cat /etc/new")  # fmt: skip
    done = _shifter(site, user, f"--image={IMAGE}", f"--volume={data}:/data:ro",
                    "/bin/sh", "-c", script)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        'PRETTY_NAME="Standalone busybox"', str(user.uid), user.name, user.home, user.home,
        "from siteFs", "a volume", "written",
    ]  # fmt: skip
    # the read-only volume is read-only
    done = _shifter(site, user, f"--image={IMAGE}", f"--volume={data}:/data:ro",
                    "/bin/sh", "-c", "echo x > /data/in")  # fmt: skip
    assert done.returncode != 0 and (data / "in").read_text() == "a volume\n"


def test_exit_status_and_a_missing_command(site: Site, user: LabUser) -> None:
    assert _shifter(site, user, f"--image={IMAGE}", "/bin/sh", "-c", "exit 7").returncode == 7
    done = _shifter(site, user, f"--image={IMAGE}", "no-such-command")
    assert done.returncode == 127 and "command not found in image" in done.stderr


def test_sigkill_of_shifter_leaves_nothing(site: Site, user: LabUser) -> None:
    proc = subprocess.Popen(_argv(user, f"--image={IMAGE}", "sleep", "60"),
                            env=_env(site, user), cwd=user.home)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not _theirs(user, ("sleep",)):
            assert proc.poll() is None, "shifter ended early"
            assert time.monotonic() < deadline, "the command never started"
            time.sleep(0.02)
        assert _theirs(user, ("squashfuse",))  # the image is being served
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while _theirs(user, ("squashfuse", "sleep")):
            assert time.monotonic() < deadline, _theirs(user, ("squashfuse", "sleep"))
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image=docker:nosuch:1", "true"], "image: no such image: docker:nosuch:1"),
        ([f"--image={IMAGE}", "--volume=/root:/data", "true"], "--volume: source not readable"),
        ([f"--image={IMAGE}", "--volume=/nowhere:/data", "true"], "--volume: source unusable"),
        ([f"--image={IMAGE}", "--volume=/tmp:/etc/x/../y", "true"], "may not contain '..'"),
    ],
)
def test_bad_input_is_a_clear_error(site: Site, user: LabUser, args: list[str],
                                    message: str) -> None:  # fmt: skip
    done = _shifter(site, user, *args)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("shifter: ") and message in done.stderr, done.stderr


def _import(site: Site, source: str, name: str) -> None:
    done = run([CLI, "--config", site.config, "image", "import", source, name], dict(os.environ))
    assert done.returncode == 0, done.stderr
    subprocess.run(["chmod", "-R", "a+rX", str(site.directory)], check=True)


def _add_config(site: Site, text: str) -> None:
    with open(site.config, "a", encoding="utf-8") as handle:
        handle.write(text)


def test_an_image_cannot_lead_the_writes_and_mounts_out(site: Site, user: LabUser) -> None:
    """An image whose /etc and siteFs mount point are symlinks to a directory of the
    user's on the host: /etc's files and the mount land in the container."""
    trap = Path(tempfile.mkdtemp(prefix="shifter-sshd-trap-", dir="/var/tmp"))
    try:
        os.chown(trap, user.uid, user.gid)
        tree = images.busybox_tree(site.directory / "trap-tree")
        shutil.rmtree(tree / "etc")
        (tree / "etc").symlink_to(trap)
        (tree / "site").symlink_to(f"{trap}/site")
        _import(site, str(tree), "docker:busybox:trap")
        done = _shifter(site, user, "--image=docker:busybox:trap", "/bin/sh", "-c",
                        f"grep -c '^{user.name}:' /etc/passwd; cat /site/note")  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["1", "from siteFs"]
        assert list(trap.iterdir()) == []  # nothing written or made on the host
    finally:
        shutil.rmtree(trap, ignore_errors=True)


def test_the_containers_own_dev(site: Site, user: LabUser) -> None:
    host_only = [
        n for n in ("kmsg", "mem", "loop-control", "sda", "vda") if os.path.exists(f"/dev/{n}")
    ]
    assert host_only, "the host has none of the nodes this test looks for"
    name = f"shifter-sshd-test-{os.getpid()}"
    script = (f"ls -a /dev; echo x > /dev/null; head -c 3 /dev/zero | wc -c; touch /dev/{name}; "
              "[ -c /dev/ptmx ] && echo ptmx")  # fmt: skip
    done = _shifter(site, user, f"--image={IMAGE}", "/bin/sh", "-c", script)
    assert done.returncode == 0, done.stderr
    names = set(done.stdout.split())
    assert {"null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm", "fd",
            "stdin", "stdout", "stderr", "3", "ptmx"} <= names, done.stdout  # fmt: skip
    assert not names & set(host_only), done.stdout
    assert not os.path.exists(f"/dev/{name}")  # the container's /dev is its own tmpfs


def test_modules_and_the_jobs_environment_rule(site: Site, user: LabUser, data: Path) -> None:
    _add_config(site, "defaultModules=base\nmodule_base_siteEnv=BASE_MOD=1\n"
                f"module_extra_siteFs={data}:/extra\nmodule_extra_siteEnv=EXTRA=yes\n")  # fmt: skip
    env = {**_env(site, user), "SLURM_NTASKS": "3", "DISPLAY": ":0"}
    script = ("echo $BASE_MOD $EXTRA $SLURM_NTASKS; cat /extra/in; "
              "env | grep -c -e ^OMPI_MCA_plm= -e ^SHIFTER_HOSTSFILE= -e ^DISPLAY=")  # fmt: skip
    done = subprocess.run(_argv(user, f"--image={IMAGE}", "--module=extra", "/bin/sh", "-c",
                                script), env=env, cwd=user.home, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert done.stdout.splitlines() == ["1 yes 3", "a volume", "0"], done.stderr
    done = _shifter(site, user, f"--image={IMAGE}", "--module=nosuch", "true")
    assert done.returncode == 1 and "--module: no such module on this system: nosuch" in done.stderr


@pytest.fixture
def gpus() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="shifter-sshd-fakegpu-", dir="/var/tmp"))
    os.chmod(top, 0o755)
    fakegpu.build(top, gpus=4)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def test_gpus_from_the_sites_cdi_specs(site: Site, user: LabUser, gpus: Path) -> None:
    _import(site, str(images.debian_squashfs("openmpi")), "docker:debian:gpu")
    _add_config(site, f"cdiSpecDirs={gpus / 'cdi'}\nstatePath={site.directory / 'state'}\n")
    (site.directory / "state").mkdir()
    os.chmod(gpus / "dev" / "nvidia2", 0o600)  # a GPU this user may not open
    script = ("ls /dev | grep nvidia | tr '\\n' ' '; echo; nvidia-smi -L; "
              "echo $NVIDIA_VISIBLE_DEVICES $CUDA_VISIBLE_DEVICES; "
              f"/sbin/ldconfig -p | grep -c 'libcuda.so.1 .*{fakegpu.LIB_FOLDER}'")  # fmt: skip
    done = _shifter(site, user, "--image=docker:debian:gpu", "/bin/sh", "-c", script)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["nvidia-uvm", "nvidia0", "nvidia1", "nvidia3", "nvidiactl"]
    assert [line.split(" (UUID")[0] for line in lines[1:4]] == [
        "GPU 0: Fake GPU", "GPU 1: Fake GPU", "GPU 2: Fake GPU"]  # fmt: skip
    assert lines[4:] == ["0,1,3 0,1,2", "1"], done.stdout
    # In a job that asked for no container: the GPUs Slurm gave it, numbered from 0.
    env = {**_env(site, user), "SLURM_JOB_ID": "4711", "SLURM_JOB_GPUS": "3"}
    done = subprocess.run(_argv(user, "--image=docker:debian:gpu", "/bin/sh", "-c", script),
                          env=env, cwd=user.home, capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].split() == ["nvidia-uvm", "nvidia3", "nvidiactl"]
    assert done.stdout.splitlines()[-2:] == ["3 0", "1"], done.stdout
