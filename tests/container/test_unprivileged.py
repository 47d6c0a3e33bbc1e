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

from lab import VENV, images
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
