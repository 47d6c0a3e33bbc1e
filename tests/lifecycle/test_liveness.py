"""No job owner can stall the prolog past its deadlines, or drain the node.

Everything the prolog waits on that the job owner can stop, trace or serve has a
deadline from udiRoot.conf, and missing it is the job's error: a child that has
become the user and stops (``SHIFTER_SSHD_FAULT=stop:<point>`` makes it stop itself
at the worst moment, as the user could), a FUSE filesystem whose daemon the user
stops under a ``--volume`` source, a racer stopping every process of the user. And
every kind of ``--volume`` destination ends as a working mount or a named user
error, never a non-zero exit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BUSYBOX
from support import Node, in_root
from test_redteam import Racer, as_user, free_port, hostile_image, user_dir

from lab.users import LabUser

DEADLINE = 2  # seconds, for every timeout these tests set
SLACK = 8  # what a prolog may take beyond its deadlines on a loaded 2-core machine


def _prolog_within(node: Node, env: dict[str, str], limit: float) -> str:
    """Run the prolog; it must exit 0 within ``limit`` seconds. Returns its stderr."""
    started = time.monotonic()
    done = node.prolog(env)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert elapsed < limit, f"prolog took {elapsed:.1f} s: {done.stderr}"
    return done.stderr


def _ends_clean(node: Node, job: str, user: LabUser) -> None:
    assert node.epilog(job).returncode == 0
    assert node.leftovers() == []
    assert _stopped_helpers(user) == []


def _stopped_helpers(user: LabUser) -> list[int]:
    """Processes of ``user`` that are ours (shifter-sshd's comm) and still exist."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if not entry.isdigit() or os.stat(f"/proc/{entry}").st_uid != user.uid:
                continue
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith("shifter-sshd"):
            found.append(int(entry))
    return found


# --- a child that has become the user stops ---------------------------------------------


@pytest.mark.parametrize(
    ("point", "message"),
    [
        ("asuser child", f"took longer than {DEADLINE} s (stopped, or a hung filesystem)"),
        ("userns holder", f"user namespace holder did not start within {DEADLINE} s"),
        ("sshd child", f"did not start within {DEADLINE} s (sshdStartTimeout): stopped or traced"),
    ],
)
def test_a_stopped_child_costs_its_deadline_only(
    node: Node, test_users: list[LabUser], user_tmp: Path, bundle: str, secret_file: str,
    point: str, message: str,
) -> None:  # fmt: skip
    user = test_users[0]
    source = user_dir(user_tmp / "src", user)
    node.write_config(enableSshd="1", optUdiImage=bundle, sshKeySecret=secret_file,
                      sshdPort=str(free_port()), system="liveness", volumeTimeout=str(DEADLINE),
                      sshdStartTimeout=str(DEADLINE), usernsTimeout=str(DEADLINE))  # fmt: skip
    env = node.job_env("631", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=BUSYBOX,
                       SPANK_SHIFTER_VOLUME=f"{source}:/data",
                       SHIFTER_SSHD_FAULT=f"stop:{point}")  # fmt: skip
    stderr = _prolog_within(node, env, DEADLINE + SLACK)
    assert message in stderr
    assert "container ready" not in stderr
    assert message in Path(node.state_path, "631.error").read_text()  # what the user sees
    _ends_clean(node, "631", user)


# --- FUSE sources whose daemon the user stops ---------------------------------------------


class Fuse:
    """A squashfuse mount the user made of a small tree; ``pid``: its daemon."""

    def __init__(self, user: LabUser, base: Path) -> None:
        tree = base / "fuse-tree"
        (tree / "data").mkdir(parents=True)
        (tree / "data" / "hello").write_text("from fuse\n")
        image = base / "fuse.sqsh"
        subprocess.run(["mksquashfs", str(tree), str(image), "-quiet", "-no-progress"],
                       check=True)  # fmt: skip
        self.mountpoint = user_dir(base / "fuse", user)
        done = subprocess.run(as_user(user, ["squashfuse", str(image), str(self.mountpoint)]),
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        assert done.returncode == 0, f"squashfuse as {user.name}: {done.stderr}"
        found = subprocess.run(["pgrep", "-u", str(user.uid), "-f", f"squashfuse {image} "],
                               capture_output=True, text=True)  # fmt: skip
        assert found.returncode == 0, "squashfuse's daemon not found"
        self.pid = int(found.stdout.split()[0])

    def stop(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def close(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        os.kill(self.pid, signal.SIGKILL)
        subprocess.run(["umount", "-l", str(self.mountpoint)], check=False, capture_output=True)


@pytest.fixture
def fuse(test_users: list[LabUser], user_tmp: Path, fuse_device: str) -> Iterator[Fuse]:
    mount = Fuse(test_users[0], user_tmp)
    try:
        yield mount
    finally:
        mount.close()


def test_a_fuse_source_with_a_stopped_daemon_costs_the_deadline_only(
    node: Node, test_users: list[LabUser], fuse: Fuse
) -> None:
    user = test_users[0]
    node.write_config(volumeTimeout=str(DEADLINE))
    fuse.stop()  # before anything looked its files up: every lookup waits on the daemon
    env = node.job_env("632", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=BUSYBOX,
                       SPANK_SHIFTER_VOLUME=f"{fuse.mountpoint}/data:/data")  # fmt: skip
    stderr = _prolog_within(node, env, DEADLINE + SLACK)
    assert f"took longer than {DEADLINE} s (stopped, or a hung filesystem)" in stderr
    _ends_clean(node, "632", user)


def test_root_never_waits_on_a_bound_fuse_source(
    node: Node, test_users: list[LabUser], fuse: Fuse
) -> None:
    """Bound while its daemon runs; the daemon stopped under the running job; the
    epilog tears down without a single call into the filesystem."""
    user = test_users[0]
    env = node.job_env("633", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=BUSYBOX,
                       SPANK_SHIFTER_VOLUME=f"{fuse.mountpoint}/data:/data:ro")  # fmt: skip
    assert "container ready" in _prolog_within(node, env, SLACK)
    seen = in_root(node.root("633"), user.uid, [user.gid], "cat /data/hello")
    assert seen.stdout == "from fuse\n", seen.stderr
    fuse.stop()
    started = time.monotonic()
    assert node.epilog("633").returncode == 0
    assert time.monotonic() - started < SLACK
    assert node.leftovers() == []


# --- a racer stopping every process of the user, all the time ---------------------------------


def test_racer_stopping_everything_of_the_user(
    node: Node, test_users: list[LabUser], user_tmp: Path, racer: str, bundle: str,
    secret_file: str,
) -> None:  # fmt: skip
    """Whatever it catches (the volume helper, the holder, sshd, at any moment), each
    prolog exits 0 within its deadlines and says what happened; nothing stays."""
    user = test_users[0]
    source = user_dir(user_tmp / "src", user)
    node.write_config(enableSshd="1", optUdiImage=bundle, sshKeySecret=secret_file,
                      sshdPort=str(free_port()), system="liveness", volumeTimeout=str(DEADLINE),
                      sshdStartTimeout=str(DEADLINE), usernsTimeout=str(DEADLINE))  # fmt: skip
    outcomes = set()
    with Racer(user, [racer, "stop", ""]) as race:
        for cycle in range(8):
            job = str(640 + cycle)
            env = node.job_env(job, user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=BUSYBOX,
                               SPANK_SHIFTER_VOLUME=f"{source}:/data")  # fmt: skip
            stderr = _prolog_within(node, env, 3 * DEADLINE + SLACK)
            last = stderr.strip().splitlines()[-1]
            assert "container ready" in last or "shifter-sshd: " in last, stderr
            outcomes.add(last.split(": ")[1] if "shifter-sshd: " in last else "ready")
            assert node.epilog(job).returncode == 0
            assert node.leftovers() == []
    assert race.won > 0
    assert outcomes, "no prolog ran"


# --- every kind of --volume destination --------------------------------------------------


def _corpus_image(tree: Path) -> None:
    (tree / "idir" / "sub").mkdir(parents=True)
    (tree / "idir" / "file").write_text("image file\n")
    (tree / "idir" / "link").symlink_to("sub")
    os.mkfifo(tree / "idir" / "fifo")
    (tree / "ilink").symlink_to("idir")
    (tree / "ifile").write_text("a top-level file: not bound into the container\n")


NOT_A_DIR = "destination in the image is not a directory"
NOT_A_FILE = "destination in the image is not a file"
THROUGH_LINK = "destination passes through a symlink"
# destination -> (outcome for a directory source, for a file source); None: mounted
CORPUS: dict[str, tuple[str | None, str | None]] = {
    "/idir": (None, NOT_A_FILE),
    "/idir/sub": (None, NOT_A_FILE),
    "/idir/file": (NOT_A_DIR, None),
    "/idir/fifo": (NOT_A_DIR, NOT_A_FILE),
    "/idir/link": (THROUGH_LINK, THROUGH_LINK),
    "/ilink": (THROUGH_LINK, THROUGH_LINK),
    "/ilink/sub": (THROUGH_LINK, THROUGH_LINK),
    "/ifile": (None, None),  # the container root has the image's directories only
    "/new/deeper": (None, None),
    "/idir/missing": ("destination does not exist in the image",) * 2,
    "/etc/x": ("destination may not cover /etc",) * 2,
    "/opt/udiImage": ("destination may not cover /opt/udiImage",) * 2,
    "/var/hostsfile": ("destination may not cover /var/hostsfile",) * 2,
    "/tmp/x": ("destination lies in a directory the user can write",) * 2,
    "/" + "n" * 300: ("destination unusable (File name too long)",) * 2,
}


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_every_kind_of_destination(
    node: Node, test_users: list[LabUser], user_tmp: Path, kind: str
) -> None:
    user = test_users[0]
    image = hostile_image(node, user_tmp, "corpus", _corpus_image)
    source = user_dir(user_tmp / "srcdir", user)
    (source / "mine").write_text("user data\n")
    if kind == "file":
        source = source / "mine"
    os.chown(source, user.uid, user.gid)
    for number, (dest, outcomes) in enumerate(CORPUS.items()):
        expected = outcomes[0 if kind == "directory" else 1]
        job = str(660 + number)
        env = node.job_env(job, user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=image,
                           SPANK_SHIFTER_VOLUME=f"{source}:{dest}")  # fmt: skip
        stderr = _prolog_within(node, env, SLACK)
        if expected is None:
            assert "container ready" in stderr, (dest, stderr)
            shown = "/mine" if kind == "directory" else ""
            seen = in_root(node.root(job), user.uid, [user.gid], f"cat {dest}{shown}")
            assert seen.stdout == "user data\n", (dest, seen.stderr)
        else:
            assert f"--volume: {expected}" in stderr, (dest, stderr)
        assert node.epilog(job).returncode == 0
        assert node.leftovers() == []
    assert (source if kind == "file" else source / "mine").read_text() == "user data\n"
