"""The whole thing on a real 3-node Slurm cluster: --image, prolog/epilog, shifter,
ssh and mpirun across nodes, as unprivileged users. One cluster for the module."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import VENV
from lab.site import BUSYBOX, MPICH, OPENMPI, SHIFTER_SSHD, STATE, Site
from lab.vcluster import Cluster

pytestmark = pytest.mark.cluster  # make test runs these on every Slurm version

DEBIAN = "Debian GNU/Linux 12 (bookworm)"
USER, OTHER = "sstest1", "sstest2"
CHECKOUT = Path(__file__).resolve().parents[1]
VENV_SITE_PACKAGES = sysconfig.get_path("purelib", vars={"base": VENV, "platbase": VENV})


def leftovers(cluster: Cluster) -> dict[str, str]:
    """Per node: container mounts, sshd or container processes, state files."""
    found = {}
    for node in cluster.nodes:
        script = (
            "grep -E ' /var/udi(Mount|LoopMount)/[0-9]' /proc/self/mountinfo; "
            f"ls -A {STATE}; pgrep -a sshd; pgrep -a -f '^shifter-sshd-userns'; "
            "for p in /proc/[0-9]*; do readlink $p/root; done | grep /var/udiMount"
        )
        out = cluster.run(node, ["sh", "-c", script], check=False).stdout.strip()
        if out:
            found[node] = out
    return found


def settled(cluster: Cluster, timeout: float = 30) -> dict[str, str]:
    """Leftovers once every node is idle again (salloc returns before the epilogs run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if set(cluster.sinfo_states().values()) == {"idle"} and not leftovers(cluster):
            break
        time.sleep(0.2)
    return leftovers(cluster)


def run_job(cluster: Cluster, script: str, args: list[str], user: str = USER) -> tuple[str, str]:
    job = cluster.sbatch(user, "#!/bin/sh\n" + script, args)
    state = cluster.wait(job, timeout=180)
    output = cluster.output(job)
    assert leftovers(cluster) == {}, output
    assert set(cluster.sinfo_states().values()) == {"idle"}
    return state, output


def test_openmpi_job_across_three_nodes(cluster: Cluster) -> None:
    script = """
shifter /bin/sh -c '
ssh node2 cat /etc/os-release
echo "node3 says: $(ssh node3 hostname)"
ssh -tt node2 tty
cat /var/hostsfile
mpirun -np 6 /usr/local/bin/mpi_hello
'
"""
    state, output = run_job(
        cluster, script, ["-N3", "--exclusive", "--ntasks-per-node=2", f"--image={OPENMPI}"]
    )
    assert state == "COMPLETED", output
    assert f'PRETTY_NAME="{DEBIAN}"' in output
    assert "node3 says: node3" in output
    assert re.search(r"^/dev/pts/\d+\s*$", output, re.M), output
    ranks = re.findall(r"^rank (\d) of 6 on (node\d): (.*)$", output, re.M)
    assert sorted(int(r) for r, _h, _p in ranks) == list(range(6)), output
    assert {host for _r, host, _p in ranks} == {"node1", "node2", "node3"}
    assert {pretty.strip() for _r, _h, pretty in ranks} == {DEBIAN}


def test_mpich_job(cluster: Cluster) -> None:
    script = "shifter mpirun -np 6 /usr/local/bin/mpi_hello\n"
    state, output = run_job(
        cluster, script, ["-N3", "--exclusive", "--ntasks-per-node=2", f"--image={MPICH}"]
    )
    assert state == "COMPLETED", output
    ranks = re.findall(r"^rank (\d) of 6 on (node\d): (.*)$", output, re.M)
    assert len(ranks) == 6, output
    assert {host for _r, host, _p in ranks} == {"node1", "node2", "node3"}
    assert {pretty.strip() for _r, _h, pretty in ranks} == {DEBIAN}


def test_busybox_image_has_no_ssh_but_ssh_works(cluster: Cluster) -> None:
    script = "shifter /bin/sh -c 'ssh node2 cat /etc/os-release; ssh node3 hostname'\n"
    state, output = run_job(cluster, script, ["-N3", "--exclusive", f"--image={BUSYBOX}"])
    assert state == "COMPLETED", output
    assert "BusyBox test root" in output
    assert "node3" in output


def test_salloc_then_srun_shifter(cluster: Cluster) -> None:
    command = ["srun", "-N3", "shifter", "cat", "/etc/os-release"]
    done = cluster.salloc(USER, ["-N3", f"--image={OPENMPI}"], command, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(f'PRETTY_NAME="{DEBIAN}"') == 3
    assert settled(cluster) == {}


def test_other_users_and_later_jobs_are_refused(cluster: Cluster, site: Site) -> None:
    """sstest2 on node3 cannot enter sstest1's containers on node1 and node2; a later
    job of sstest1 on the same nodes refuses the earlier job's certificate."""
    keep = "/home/sstest1/.job-identity"
    first = cluster.sbatch(USER, f"""#!/bin/sh
mkdir -p {keep} && cp /var/udiMount/$SLURM_JOB_ID/var/shifter/ssh/id_ed25519* {keep}/
touch identity-ready-$SLURM_JOB_ID; sleep 30
""", ["-N2", "-w", "node[1-2]", "--exclusive", f"--image={BUSYBOX}"])  # fmt: skip
    try:
        other = cluster.sbatch(OTHER, f"""#!/bin/sh
while [ ! -e identity-ready-{first} ]; do sleep 0.2; done
shifter ssh node1 echo SHOULD-NOT-GET-IN; echo "exit=$?"
""", ["-N1", "-w", "node3", "--exclusive", f"--image={BUSYBOX}"])  # fmt: skip
        assert cluster.wait(other, timeout=120) == "COMPLETED"
        output = cluster.output(other)
        assert "SHOULD-NOT-GET-IN" not in output
        assert "exit=255" in output
    finally:
        cluster.client(["scancel", str(first)], check=False)
        cluster.wait(first, timeout=60)
    state, output = run_job(cluster, f"""
R=/var/udiMount/$SLURM_JOB_ID
/usr/bin/ssh -F /dev/null -i {keep}/id_ed25519 -o CertificateFile={keep}/id_ed25519-cert.pub \
  -o UserKnownHostsFile=$R/opt/udiImage/etc/ssh_known_hosts -o StrictHostKeyChecking=yes \
  -o BatchMode=yes -p 1204 node2 echo SHOULD-NOT-GET-IN
echo "old identity exit=$?"
shifter ssh node2 echo NEW-JOB-OK
rm -rf {keep}
""", ["-N2", "-w", "node[1-2]", "--exclusive", f"--image={BUSYBOX}"])  # fmt: skip
    assert state == "COMPLETED", output
    assert "SHOULD-NOT-GET-IN" not in output
    assert "old identity exit=255" in output
    assert "NEW-JOB-OK" in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--image=docker:nosuch:1"],
            "shifter-sshd: --image: no such image: docker:nosuch:1",
        ),
        ([f"--image={BUSYBOX}", "--volume=/data"], "expected source:destination[:flags]: /data"),
    ],
)
def test_bad_submissions_fail_at_once(cluster: Cluster, args: list[str], message: str) -> None:
    done = cluster.submit(USER, "#!/bin/sh\ntrue\n", ["-N1", *args])
    assert done.returncode != 0
    assert message in done.stderr
    assert set(cluster.sinfo_states().values()) == {"idle"}


def test_image_removed_after_submission(cluster: Cluster, site: Site) -> None:
    name = "docker:busybox:short-lived"
    # other metadata, so another image id: removing the name removes the data too
    done = site.cli("image", "import", f"{site.directory}/busybox-tree", name, "--env", "ONLY=me")
    assert done.returncode == 0, done.stderr
    job = cluster.sbatch(USER, "#!/bin/sh\necho SCRIPT-RAN\n",
                         ["-N3", "--exclusive", "--hold", f"--image={name}"])  # fmt: skip
    assert site.cli("image", "remove", name).returncode == 0
    cluster.client(["scontrol", "release", str(job)])
    state = cluster.wait(job, timeout=120)
    output = cluster.output(job)
    assert state == "FAILED", output
    assert "image no longer in the store" in output
    assert "SCRIPT-RAN" not in output
    assert set(cluster.sinfo_states().values()) == {"idle"}
    assert leftovers(cluster) == {}


def test_a_dead_jobs_container_is_replaced(cluster: Cluster, site: Site) -> None:
    """A container left by a job whose epilog never ran (built here by hand, finished a
    while ago) holds the sshd port; no stepd of that job lives on the node, so the next
    job's prolog tears it down and starts its own sshd."""
    user = pwd.getpwnam(USER)
    fake = {"SLURM_JOB_ID": "999999", "SLURM_JOB_UID": str(user.pw_uid),
            "SLURM_JOB_GID": str(user.pw_gid), "SLURM_JOB_USER": USER,
            "SLURMD_NODENAME": "node1", "SLURM_NODELIST": "node1", "SLURM_CLUSTER_NAME": "lab",
            "SPANK_SHIFTER_IMAGE": BUSYBOX, "SLURM_CONF": ""}  # fmt: skip
    prolog = f"{site.directory}/prolog.sh"
    done = cluster.run("node1", [prolog], env=fake, check=False)
    assert done.returncode == 0, done.stderr
    assert "999999" in leftovers(cluster)["node1"]
    backdate = (f"import json; p = '{STATE}/999999.json'; s = json.load(open(p)); "
                "s['created'] -= 3600; json.dump(s, open(p, 'w'))")  # fmt: skip
    cluster.run("node1", ["python3", "-c", backdate])
    args = ["-N1", "-w", "node1", "--exclusive", f"--image={BUSYBOX}"]
    state, output = run_job(cluster, "shifter ssh node1 echo NEW-SSHD-OK\n", args)
    assert state == "COMPLETED", output
    assert "NEW-SSHD-OK" in output


def test_sixteen_ranks_per_node(cluster: Cluster) -> None:
    """48 ranks over the 3 containers: every launch goes through the container sshds."""
    # The virtual nodes have 2 CPUs each: ask mpirun to place 16 per node anyway.
    script = "shifter mpirun -np 48 --map-by ppr:16:node --oversubscribe /usr/local/bin/mpi_hello\n"
    args = ["-N3", "--exclusive", f"--image={OPENMPI}"]
    state, output = run_job(cluster, script, args)
    assert state == "COMPLETED", output
    ranks = re.findall(r"^rank (\d+) of 48 on (node\d): ", output, re.M)
    assert sorted(int(r) for r, _h in ranks) == list(range(48)), output
    assert {host: sum(1 for _r, h in ranks if h == host) for host in cluster.nodes} == {
        "node1": 16, "node2": 16, "node3": 16,
    }  # fmt: skip
    assert "refused" not in output.lower()


def test_shared_job_gets_a_container_but_no_sshd(cluster: Cluster) -> None:
    script = (
        "shifter /bin/sh -c 'grep PRETTY /etc/os-release; ls /opt/udiImage/etc | wc -l'\n"
        "pgrep -x sshd; echo sshd-count=$(pgrep -cx sshd)\n"
    )
    state, output = run_job(cluster, script, ["-N1", "--oversubscribe", f"--image={BUSYBOX}"])
    assert state == "COMPLETED", output
    assert "BusyBox test root" in output
    assert "sshd-count=0" in output
    assert re.search(r"^0$", output, re.M)  # no per-job ssh files either


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the lab's nodes see too (each node has its own /tmp)."""
    path = Path(tempfile.mkdtemp(prefix="shifter-sshd-test-", dir="/var/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_bundle_rebuild_and_package_reinstall_under_a_running_job(
    cluster: Cluster, site: Site, shared_dir: Path
) -> None:
    """docs/admin.md's upgrades while a job runs: ``udiimage build`` twice on a node of
    the job (its version is then neither current nor previous: only the job's state
    keeps it), and the package reinstalled in place (every file of the venv's
    shifter_sshd replaced). The job's ssh and mpirun go on working, its epilog (the
    new code) tears it down, and a later build removes the version the job used."""
    go = shared_dir / "go"
    script = f"""
shifter /bin/sh -c 'echo before: $(ssh node2 hostname)'
while [ ! -e {go} ]; do sleep 0.2; done
shifter /bin/sh -c 'echo after: $(ssh node2 hostname); mpirun -np 4 /usr/local/bin/mpi_hello'
"""
    job = cluster.sbatch(USER, "#!/bin/sh\n" + script, ["-N2", "--exclusive", f"--image={OPENMPI}"])
    try:
        _upgrade_while(cluster, site, job, go)
    finally:
        cluster.client(["scancel", str(job)], check=False)


def _upgrade_while(cluster: Cluster, site: Site, job: int, go: Path) -> None:
    deadline = time.monotonic() + 120
    while "before: node2" not in _output_so_far(cluster, job):
        assert time.monotonic() < deadline, cluster.job(job)
        time.sleep(0.2)
    bundle = Path(site.directory, "udiImage")
    used = bundle.resolve()
    # The build runs on the host (the node may run another Debian's Slurm, without the
    # OpenSSH and compiler a build takes) and reads node1's state files through node1's
    # own view of its private /run, as a build on node1 itself would.
    node1 = go.parent / "node1.conf"
    node1_state = f"/proc/{cluster.node_pid('node1')}/root{STATE}"
    lines = Path(site.config).read_text().splitlines(True)
    kept = "".join(line for line in lines if not line.startswith("statePath="))
    node1.write_text(kept + f"statePath={node1_state}\n")
    build = [SHIFTER_SSHD, "--config", str(node1), "udiimage", "build"]
    for _twice in range(2):
        done = subprocess.run(build, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
    assert bundle.resolve() != used and used.is_dir()  # kept for the running job
    module = Path(VENV_SITE_PACKAGES, "shifter_sshd", "lifecycle/teardown.py")
    inode = module.stat().st_ino
    reinstall = subprocess.run(["make", "-C", str(CHECKOUT), "setup"], capture_output=True,
                               text=True, check=False)  # fmt: skip
    assert reinstall.returncode == 0, reinstall.stderr
    assert module.stat().st_ino != inode  # really replaced
    go.touch()
    state = cluster.wait(job, timeout=180)
    output = cluster.output(job)
    assert state == "COMPLETED", output
    assert "after: node2" in output, output
    ranks = re.findall(r"^rank (\d) of 4 on (node\d): ", output, re.M)
    assert {host for _r, host in ranks} == {"node1", "node2"} and len(ranks) == 4, output
    assert settled(cluster) == {}
    assert subprocess.run(build, capture_output=True, check=False).returncode == 0
    assert not used.exists()  # no job uses it any more


def _output_so_far(cluster: Cluster, job: int) -> str:
    try:
        return cluster.output(job)
    except FileNotFoundError:
        return ""


def test_a_pulled_image_runs_mpirun(cluster: Cluster, site: Site, shared_dir: Path) -> None:
    """``image pull`` from a registry (the lab's docker-registry, seeded with the Debian +
    Open MPI image), then ``sbatch --image=`` with the pulled name: mpirun across nodes."""
    from lab import images, registry

    layout = registry.squashfs_layout(images.debian_squashfs("openmpi"), {
        "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "PULLED=yes"]})  # fmt: skip
    served = registry.Registry(shared_dir / "registry").start()
    try:
        served.push(layout, "lab/debian-openmpi", "latest")
        with open(site.config, "a") as config:
            config.write(f"insecureRegistries={served.address}\n")
        name = f"docker:{served.address}/lab/debian-openmpi:latest"
        pulled = site.cli("image", "pull", name)
        assert pulled.returncode == 0, pulled.stderr
    finally:
        served.stop()
    script = "shifter /bin/sh -c 'echo pulled=$PULLED; mpirun -np 6 /usr/local/bin/mpi_hello'\n"
    args = ["-N3", "--exclusive", "--ntasks-per-node=2", f"--image={name}"]
    state, output = run_job(cluster, script, args)
    assert state == "COMPLETED", output
    assert "pulled=yes" in output
    ranks = re.findall(r"^rank (\d) of 6 on (node\d): (.*)$", output, re.M)
    assert {host for _r, host, _p in ranks} == {"node1", "node2", "node3"} and len(ranks) == 6
    assert {pretty.strip() for _r, _h, pretty in ranks} == {DEBIAN}
