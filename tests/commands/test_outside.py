"""``shifter --ssh-config DIR`` on the lab cluster: from the login node (the host, or the
controller's machine for other Slurm versions) into the job's container on two nodes,
with the OpenSSH client called the way VS Code Remote-SSH calls it; refused for
another user, for a job without an sshd, and useless once the job has ended.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cluster import OTHER, USER, settled

from lab import VENV
from lab.site import BUSYBOX, Site
from lab.vcluster import Cluster

pytestmark = pytest.mark.cluster  # make test runs these on every Slurm version

SHIFTER = os.path.join(VENV, "bin", "shifter")
HOME = Path("/home") / USER


def _wait_running(cluster: Cluster, job: int, marker: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert time.monotonic() < deadline, cluster.job(job)
        time.sleep(0.2)


def _other_ca() -> str:
    """Some other CA's public key, ``ssh-ed25519 AAAA...``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public = Ed25519PrivateKey.generate().public_key()
    return public.public_bytes(serialization.Encoding.OpenSSH,
                               serialization.PublicFormat.OpenSSH).decode()  # fmt: skip


def _ssh(cluster: Cluster, config: Path, *args: str, user: str = USER,
         stdin: str | None = None) -> tuple[int, str, str]:  # fmt: skip
    argv = ["ssh", "-F", str(config), "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", *args]
    if stdin is not None:
        argv = ["sh", "-c", 'printf %s "$0" | exec "$@"', stdin, *argv]
    done = cluster.client(argv, user=user, check=False, timeout=60)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
def marker() -> Iterator[Path]:
    """A file the job makes once it runs; it and the test's ssh directories go after."""
    path = HOME / f"outside-{os.getpid()}"
    yield path
    path.unlink(missing_ok=True)
    for made in (HOME / ".ssh").glob(f"job-*-{os.getpid()}*"):
        shutil.rmtree(made, ignore_errors=True)


def test_login_node_into_the_jobs_container_on_two_nodes(
    cluster: Cluster, site: Site, marker: Path
) -> None:
    args = ["-N2", "-w", "node[1-2]", "--exclusive", f"--image={BUSYBOX}"]
    job = cluster.sbatch(USER, f"#!/bin/sh\ntouch {marker}\nsleep 120\n", args)
    directory = HOME / ".ssh" / f"job-{job}-{os.getpid()}"
    try:
        _wait_running(cluster, job, marker)
        # the way users start IDE sessions: a step of the running job, from the login node
        step = ["srun", f"--jobid={job}", "--overlap", "-N1", "-n1", "-w", "node1"]
        site_env = {"SHIFTER_SSHD_CONFIG": site.config}  # the lab keeps udiRoot.conf elsewhere
        done = cluster.client([*step, SHIFTER, f"--ssh-config={directory}"], user=USER,
                              env=site_env, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["node1", "node2"]
        assert f"wrote {directory}/config" in done.stderr
        for name in ("config", "id_ed25519", "id_ed25519-cert.pub", "known_hosts"):
            info = (directory / name).stat()
            assert stat.S_IMODE(info.st_mode) == 0o600, name
            assert info.st_uid == os.stat(HOME).st_uid, name
        config = directory / "config"
        for node in ("node1", f"job{job}-node2"):
            code, out, err = _ssh(cluster, config, node, "hostname; id -un; cat /etc/os-release")
            assert code == 0, err
            host, login, *release = out.splitlines()
            assert (host, login) == (node.removeprefix(f"job{job}-"), USER)
            assert any("BusyBox test root" in line for line in release), out
        # VS Code Remote-SSH: -T with a remote command reading stdin, uname, forwarding
        code, out, err = _ssh(cluster, config, "-T", "node2", "uname -s; cat", stdin="over stdin")
        assert (code, out.splitlines()) == (0, ["Linux", "over stdin"]), err
        port = next(line.split()[1] for line in config.read_text().splitlines()
                    if line.strip().startswith("Port "))  # fmt: skip
        _code, out, err = _ssh(cluster, config, "-W", f"127.0.0.1:{port}", "node1", stdin="")
        assert out.startswith("SSH-2.0-"), (out, err)  # a direct-tcpip channel, as -L and -D
        # strict host-key checking holds: a known_hosts that trusts another CA refuses
        original = (directory / "known_hosts").read_text()
        head = original.split()[:2]  # @cert-authority node1,node2
        (directory / "known_hosts").write_text(" ".join([*head, _other_ca()]) + "\n")
        code, _out, err = _ssh(cluster, config, "node1", "true")
        assert code == 255 and "Host key verification failed" in err, err
        (directory / "known_hosts").write_text(original)
        # another user, on a node of the job: refused, nothing written
        theirs = f"/home/{OTHER}/outside-{os.getpid()}"  # /home is shared, /tmp is not
        env = {"SHIFTER_SSHD_CONFIG": site.config}
        done = cluster.run("node1", [SHIFTER, f"--ssh-config={theirs}", f"--jobid={job}"],
                           user=OTHER, env=env, check=False)  # fmt: skip
        assert done.returncode == 1
        assert "the container belongs to another user" in done.stderr, done.stderr
        assert not Path(theirs).exists()
        # the owner, outside any step, names the job
        done = cluster.run("node2", [SHIFTER, f"--ssh-config={directory}-2", f"--jobid={job}"],
                           user=USER, env=env, check=False)  # fmt: skip
        assert done.returncode == 0 and done.stdout.split() == ["node1", "node2"], done.stderr
    finally:
        cluster.client(["scancel", str(job)], check=False)
        cluster.wait(job, timeout=60)
    settled(cluster)
    # after the job: the material admits nobody, and no new config for it is written
    code, _out, err = _ssh(cluster, directory / "config", "node1", "true")
    assert code == 255, err
    done = cluster.run("node1", [SHIFTER, f"--ssh-config={directory}-3", f"--jobid={job}"],
                       user=USER, env={"SHIFTER_SSHD_CONFIG": site.config},
                       check=False)  # fmt: skip
    assert done.returncode == 1 and f"no prepared container for job {job}" in done.stderr
    assert not Path(f"{directory}-3").exists()


def test_a_job_without_an_sshd_is_refused(cluster: Cluster, site: Site) -> None:
    """A shared job has a container but no sshd: nothing to reach, nothing written."""
    directory = HOME / ".ssh" / f"job-shared-{os.getpid()}"
    script = f"#!/bin/sh\n{SHIFTER} --ssh-config={directory}\necho exit=$?\n"
    job = cluster.sbatch(USER, script, ["-N1", "-w", "node3", "--oversubscribe",
                                        f"--image={BUSYBOX}"])  # fmt: skip
    assert cluster.wait(job, timeout=120) == "COMPLETED"
    output = cluster.output(job)
    assert "this job has no container sshd" in output and "exit=1" in output, output
    assert not directory.exists()
    settled(cluster)
