"""The user's ``shifter`` command: a real prolog, a real container, run as a test user."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import BUSYBOX, DEBIAN, ImageStore
from support import Node

from lab import VENV
from lab.users import GROUP_GID, LabUser
from shifter_sshd.commands import shifter
from shifter_sshd.errors import ShifterError

SHIFTER = os.path.join(VENV, "bin", "shifter")
PRETTY = {BUSYBOX: "BusyBox test root", DEBIAN: "Debian GNU/Linux 12 (bookworm)"}
JOB = "401"
FALLBACK = "entering through the container's sshd"


@dataclass
class Job:
    """A prepared container for ``user`` and the way to call shifter as them."""

    node: Node
    user: LabUser
    image: str
    config: str  # a copy of the node's config the test users can read
    shared: Path  # visible inside the container at the same path (siteFs)
    private: Path  # not visible inside
    extra_env: dict[str, str] = field(default_factory=dict)

    def shifter(
        self, *args: str, user: LabUser | None = None, cwd: Path | str | None = None,
        env: Mapping[str, str | None] | None = None, argv0: str = SHIFTER,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """``shifter ARGS`` as the user, with the variables a Slurm task would have."""
        who = user or self.user
        base: dict[str, str | None] = {
            "PATH": f"{VENV}/bin:/usr/bin:/bin", "SLURM_JOB_ID": JOB, "HOME": who.home,
            "USER": who.name, "SHIFTER_SSHD_CONFIG": self.config, "DISPLAY": ":0",
            "SLURM_PROCID": "0", **self.extra_env, **(env or {}),
        }  # fmt: skip
        directory = str(cwd or self.private)
        base["PWD"] = directory
        argv = ["setpriv", f"--reuid={who.uid}", f"--regid={who.gid}", "--init-groups",
                argv0, *args]  # fmt: skip
        environ = {k: v for k, v in base.items() if v is not None}
        return subprocess.run(argv, cwd=directory, env=environ, capture_output=True,
                              text=True, timeout=60, check=False,
                              input="" if stdin is None else stdin)  # fmt: skip


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A host directory a site would mount at the same path (siteFs), like /global.

    Top-level, because the prolog creates a missing siteFs destination only on
    the container's own tmpfs root, never below an image directory such as /var.
    """
    path = Path(f"/shifter-sshd-test-{uuid.uuid4().hex[:8]}")
    path.mkdir(mode=0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _prepare(node: Node, user: LabUser, image: str, user_tmp: Path, shared: Path,
             job_env: dict[str, str] | None = None, **conf: str) -> Job:  # fmt: skip
    private = user_tmp / "private"
    for directory in (shared, private):
        directory.mkdir(exist_ok=True)
        os.chown(directory, user.uid, user.gid)
    node.write_config(siteFs=f"{shared}:{shared}", **conf)
    config = user_tmp / "udiRoot.conf"
    shutil.copy(node.config, config)
    config.chmod(0o644)
    env = node.job_env(JOB, user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=image,
                       SPANK_SHIFTER_VOLUME=f"{shared}:/data:ro")  # fmt: skip
    env.update(job_env or {})
    done = node.prolog(env)
    assert done.returncode == 0, done.stderr
    assert Path(node.state_path, f"{JOB}.container").exists(), done.stderr
    return Job(node, user, image, str(config), shared, private)


@pytest.fixture(params=[BUSYBOX, DEBIAN])
def job(
    request: pytest.FixtureRequest, node: Node, test_users: list[LabUser], user_tmp: Path,
    shared_dir: Path,
) -> Iterator[Job]:  # fmt: skip
    try:
        yield _prepare(node, test_users[0], request.param, user_tmp, shared_dir)
    finally:
        node.epilog(JOB)
        assert node.leftovers() == []


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, (done.returncode, done.stderr)
    return done.stdout


# --- the user namespace path --------------------------------------------------------------


def test_every_shifter_of_the_job_joins_one_user_namespace(job: Job) -> None:
    """Ranks started by separate shifters (srun) share memory only in one namespace."""
    first = _ok(job.shifter("readlink", "/proc/self/ns/user"))
    second = _ok(job.shifter("readlink", "/proc/self/ns/user"))
    assert first == second != os.readlink("/proc/self/ns/user") + "\n"
    assert "sstestgrp" in _ok(job.shifter("id", "-Gn")).split()  # groups mapped by name
    state = json.loads(Path(job.node.state_path, f"{JOB}.json").read_text())
    os.kill(state["userns_pid"], signal.SIGKILL)  # the user may kill it: it is theirs
    time.sleep(0.1)
    alone = job.shifter("readlink", "/proc/self/ns/user")
    assert alone.returncode == 0, alone.stderr
    assert alone.stdout != first
    assert "its user namespace is gone" in alone.stderr


def test_runs_the_image_as_the_user(job: Job) -> None:
    assert PRETTY[job.image] in _ok(job.shifter("cat", "/etc/os-release"))
    ids = _ok(job.shifter("sh", "-c", "id -u; id -g; cat /proc/self/uid_map"))
    uid, gid, uid_map = ids.splitlines()
    assert (uid, gid) == (str(job.user.uid), str(job.user.gid))
    assert uid_map.split() == [str(job.user.uid), str(job.user.uid), "1"]  # our own userns
    status = _ok(job.shifter("cat", "/proc/self/status"))
    caps = dict(line.split(":", 1) for line in status.splitlines())
    for name in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
        assert int(caps[name], 16) == 0, name


def test_supplementary_groups_still_grant_access(job: Job) -> None:
    secret = job.shared / "group-only"
    secret.write_text("for the group\n")
    os.chown(secret, 0, GROUP_GID)
    secret.chmod(0o640)
    assert _ok(job.shifter("cat", str(secret))) == "for the group\n"


def test_environment(job: Job) -> None:
    lines = _ok(job.shifter("env")).splitlines()
    env = dict(line.split("=", 1) for line in lines if "=" in line)
    assert env["PATH"].startswith("/opt/udiImage/bin:")
    assert env["SHIFTER_RUNTIME"] == "1"
    assert env["SLURM_JOB_ID"] == JOB and env["SLURM_PROCID"] == "0"
    assert env["OMPI_MCA_plm"] == "rsh"
    assert env["USER"] == job.user.name
    assert "DISPLAY" not in env and "SHIFTER_SSHD_CONFIG" in env


def test_working_directory(job: Job, user_tmp: Path) -> None:
    inner = job.shared / "sub"
    inner.mkdir()
    os.chown(inner, job.user.uid, job.user.gid)
    assert _ok(job.shifter("pwd", cwd=inner)).strip() == str(inner)
    hidden = {"HOME": "/nonexistent-home"}
    assert _ok(job.shifter("pwd", cwd=job.private, env=hidden)).strip() == "/"
    home = {"HOME": str(job.shared)}
    assert _ok(job.shifter("pwd", cwd=job.private, env=home)).strip() == str(job.shared)


def test_exit_status_and_streams_pass_through(job: Job) -> None:
    done = job.shifter("sh", "-c", "echo out; echo err >&2; exit 42")
    assert (done.returncode, done.stdout, done.stderr) == (42, "out\n", "err\n")
    assert _ok(job.shifter("cat", stdin="from stdin\n")) == "from stdin\n"


def test_command_not_found_is_127(job: Job) -> None:
    done = job.shifter("no-such-command", "x")
    assert done.returncode == 127
    assert done.stderr == f"shifter: no-such-command: command not found in image: {job.image}\n"
    assert job.shifter("/bin/no-such").returncode == 127


def test_path_search_happens_inside(job: Job) -> None:
    # The host has /usr/bin/env; busybox's root has only /bin/env: found through PATH.
    assert "SHIFTER_RUNTIME=1" in _ok(job.shifter("env"))
    tool = "apt-get" if job.image == DEBIAN else "busybox"
    assert _ok(job.shifter("sh", "-c", f"command -v {tool}")).strip().endswith(tool)


def _script(directory: Path, shebang: str, owner: LabUser) -> Path:
    path = directory / "job.sh"
    path.write_text(f'{shebang}\necho "args: $*"\npwd\ncat /etc/os-release\n')
    path.chmod(0o755)
    os.chown(path, owner.uid, owner.gid)
    return path


SHEBANGS = {
    "env -S": "#!/usr/bin/env -S shifter /bin/sh",
    "absolute": f"#!{SHIFTER} /bin/sh",
    "absolute, options": f"#!{SHIFTER} --image=IMAGE /bin/sh -e",
}


@pytest.mark.parametrize("where", ["shared", "private"])
@pytest.mark.parametrize("shebang", list(SHEBANGS))
def test_script_interpreter(job: Job, where: str, shebang: str) -> None:
    directory = job.shared if where == "shared" else job.private
    script = _script(directory, SHEBANGS[shebang].replace("IMAGE", job.image), job.user)
    done = job.shifter("a b", "c", argv0=str(script), cwd=directory)
    out = _ok(done)
    assert "args: a b c" in out and PRETTY[job.image] in out
    assert out.splitlines()[1] == (str(directory) if where == "shared" else "/")


def test_env_without_s_cannot_pass_an_argument(job: Job) -> None:
    """Documented: the kernel gives env ONE argument, 'shifter /bin/sh'; env fails."""
    script = _script(job.shared, "#!/usr/bin/env shifter /bin/sh", job.user)
    done = job.shifter(argv0=str(script), cwd=job.shared)
    assert done.returncode == 127 and "shifter /bin/sh" in done.stderr


def test_same_image_and_volume_are_accepted(job: Job, image_store: ImageStore) -> None:
    image_id = image_store.busybox_id if job.image == BUSYBOX else image_store.debian_id
    short = job.image.split(":", 1)[1]
    for name in (job.image, short, image_id):
        assert _ok(job.shifter(f"--image={name}", "true")) == ""
    volume = f"{job.shared}/:/data:ro"
    assert _ok(job.shifter("--volume", volume, "--image", job.image, "true")) == ""


# --- errors -----------------------------------------------------------------------------


def test_errors(job: Job, test_users: list[LabUser]) -> None:
    other = test_users[1]
    cases = {
        "outside a job": (job.shifter("true", env={"SLURM_JOB_ID": None}),
                          "shifter: no Slurm job here (SLURM_JOB_ID is not set); run shifter "
                          "inside an allocation: salloc/sbatch --image=...\n"),
        "no container": (job.shifter("true", env={"SLURM_JOB_ID": "999"}),
                         "shifter: no prepared container for job 999 on this node: "
                         "was the job submitted with --image?\n"),
        "another user's job": (job.shifter("true", user=other),
                               f"shifter: job {JOB}: the container belongs to another user, "
                               f"not to you: {other.uid}\n"),
        "another image": (job.shifter("--image=docker:other:1", "true"),
                          f"shifter: --image: this job's image is {job.image}; another image "
                          "needs its own job (for now): docker:other:1\n"),
        "another volume": (job.shifter("--volume=/tmp:/data", "true"),
                           f"shifter: --volume: this job's volumes are '{job.shared}:/data:ro'; "
                           "others need their own job (for now): /tmp:/data\n"),
        "no command": (job.shifter(), "shifter: usage: no command given, and the image has "
                       "none: usage: shifter "
                       "[--image=NAME] [--volume=SPEC] [--module=NAMES] [--] CMD [ARGS...]\n"),
        "another module": (job.shifter("--module=gpu", "true"),
                           "shifter: --module: this job's modules are ''; others need their "
                           "own job (for now): gpu\n"),
        "bad option": (job.shifter("--imgae=x", "true"),
                       "shifter: usage: unknown option: --imgae=x\n"),
    }  # fmt: skip
    for name, (done, message) in cases.items():
        assert (done.returncode, done.stderr) == (1, message), name


def test_the_prologs_error_is_quoted(job: Job) -> None:
    error = Path(job.node.state_path, "998.error")
    error.write_text("shifter-sshd: image: not found: x\n")
    try:
        done = job.shifter("true", env={"SLURM_JOB_ID": "998"})
    finally:
        error.unlink()
    assert done.returncode == 1
    assert done.stderr == ("shifter: job 998: the container could not be prepared: "
                           "shifter-sshd: image: not found: x\n")  # fmt: skip


def test_no_sshd_and_no_userns_is_an_error(job: Job) -> None:
    done = job.shifter("true", env={"SHIFTER_SSHD_FORCE_SSH": "1"})
    assert done.returncode == 1
    assert FALLBACK in done.stderr
    assert "the job has no sshd" in done.stderr


# --- the sshd fallback ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(params=[BUSYBOX, DEBIAN])
def sshd_job(
    request: pytest.FixtureRequest, node: Node, test_users: list[LabUser], user_tmp: Path,
    bundle: str, secret_file: str, shared_dir: Path,
) -> Iterator[Job]:  # fmt: skip
    name = socket.gethostname()
    try:
        started = _prepare(node, test_users[0], request.param, user_tmp, shared_dir,
                           enableSshd="1",
                           optUdiImage=bundle, sshKeySecret=secret_file,
                           sshdPort=str(_free_port()), system="testcluster",
                           job_env={"SLURMD_NODENAME": name, "SLURM_NODELIST": name})  # fmt: skip
        started.extra_env["SHIFTER_SSHD_FORCE_SSH"] = "1"
        yield started
    finally:
        node.epilog(JOB)
        assert node.leftovers() == []


def test_sshd_fallback(sshd_job: Job) -> None:
    job = sshd_job
    done = job.shifter("sh", "-c", "cat /etc/os-release; id -u; pwd; echo $SLURM_JOB_ID; exit 7",
                       cwd=job.shared)  # fmt: skip
    assert done.returncode == 7, done.stderr
    assert PRETTY[job.image] in done.stdout
    assert done.stdout.splitlines()[-3:] == [str(job.user.uid), str(job.shared), JOB]
    # sshd adds "Could not chdir to home directory" when the home is not in the image.
    assert done.stderr.splitlines()[0] == (
        "shifter: unprivileged user namespaces are disabled here (SHIFTER_SSHD_FORCE_SSH is set)"
        "; entering through the container's sshd"
    )
    assert _ok(job.shifter("pwd", cwd=job.private, env={"HOME": "/x"})).strip() == "/"
    env = _ok(job.shifter("env"))
    assert "SHIFTER_RUNTIME=1" in env and "PATH=/opt/udiImage/bin:" in env
    assert _ok(job.shifter("cat", stdin="from stdin\n")) == "from stdin\n"
    missing = job.shifter("no-such-command")
    assert missing.returncode == 127
    assert f"no-such-command: command not found in image: {job.image}" in missing.stderr


def test_sshd_fallback_script(sshd_job: Job) -> None:
    job = sshd_job
    script = _script(job.private, SHEBANGS["env -S"], job.user)
    out = _ok(job.shifter("x y", argv0=str(script), cwd=job.private))
    assert "args: x y" in out and PRETTY[job.image] in out
    time.sleep(0.1)
    leftovers = list(Path(job.node.root(JOB), "tmp").glob(".shifter-script-*"))
    assert leftovers == []


# --- pieces -----------------------------------------------------------------------------


def test_quick_state_path_agrees_with_the_config_parser(tmp_path: Path) -> None:
    from shifter_sshd.config import udiroot as config

    texts = ["", "statePath=/run/x\n", "statePath = /run/y/ # comment\nudiMount=/var/u\n",
             "  # statePath=/c\nstatePath=/run/q\n",
             "# statePath=/no\nstatePath=/run//z\n", "statePath=/a\\\n/b\n",
             "statePath=/a\nstatePath=/b\n", "statePath=relative\n"]  # fmt: skip
    for text in texts:
        path = tmp_path / "udiRoot.conf"
        path.write_text(text)
        try:
            expected: str | None = config.load(str(path)).state_path
        except ShifterError:
            expected = None
        if expected is None:
            with pytest.raises(ShifterError):
                shifter.state_path(str(path))
        else:
            assert shifter.state_path(str(path)) == expected, text


def test_disabled_user_namespaces_are_detected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shifter_sshd.commands import enter
    from shifter_sshd.kernel import syscalls

    switch = tmp_path / "max_user_namespaces"
    monkeypatch.setattr(syscalls, "SYSCTLS", (str(tmp_path / "absent"), str(switch)))
    switch.write_text("15000\n")
    assert syscalls.sysctl_refusal() is None
    switch.write_text("0\n")
    assert syscalls.sysctl_refusal() == f"{enter.DISABLED} ({switch} is 0)"


def test_split_shebang(tmp_path: Path) -> None:
    script = tmp_path / "s"
    script.write_text("#!/x/shifter  --image=a /bin/sh -e \necho\n")
    assert shifter.split_shebang(["--image=a /bin/sh -e", str(script), "1"]) == [
        "--image=a", "/bin/sh", "-e", str(script), "1"]  # fmt: skip
    assert shifter.split_shebang(["echo a", str(script)]) == ["echo a", str(script)]
    assert shifter.split_shebang(["sh", "-c", "echo a b"]) == ["sh", "-c", "echo a b"]
