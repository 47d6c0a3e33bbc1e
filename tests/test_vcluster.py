"""The virtual cluster and the SPANK plugin on real Slurm 22.05: root, no mocks.

One 3-node cluster serves the module (it comes up in about a second); the tests
that tear clusters down start their own. The Prolog and Epilog here are a small
script standing in for the real prolog: it records the environment slurmd gives
it and plays the prolog's side of the user-error contract, so the plugin's side
is tested on its own.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from lab import VENV, slurmroots
from lab.images import busybox_tree
from lab.labstate import LAB_ROOT, cleanup_stale
from lab.machine import lab_links
from lab.vcluster import SHIFTER_PRIVATE_DIRS, Cluster
from shifter_sshd.slurm import spank

pytestmark = pytest.mark.cluster  # make test runs these on every Slurm version

SHIFTER_SSHD = os.path.join(VENV, "bin", "shifter-sshd")
STATE = "/run/shifter-sshd"
IMAGE = "docker:busybox:test"
USER = "sstest1"

# Stand-in Prolog and Epilog: no PATH from slurmd, so absolute paths only.
PROLOG = f"""#!/bin/sh
/usr/bin/env > "{STATE}/env.$SLURM_SCRIPT_CONTEXT.$SLURM_JOB_ID"
case "$SLURM_SCRIPT_CONTEXT:$SPANK_SHIFTER_VOLUME" in
prolog_slurmd:/vanished:*)
    echo "shifter-sshd: --volume: source does not exist: /vanished" \\
        > "{STATE}/$SLURM_JOB_ID.error";;
esac
exit 0
"""

SHOW_ENV = """#!/bin/sh
echo "batch: $SHIFTER_IMAGE $SHIFTER_IMAGE_ID $SHIFTER_VOLUME $SHIFTER_MODULE"
srun -N3 sh -c 'echo "$(hostname): $SHIFTER_IMAGE $SHIFTER_IMAGE_ID"'
"""


@dataclass(frozen=True)
class Site:
    """A shifter-sshd site: udiRoot.conf, an image store with busybox, the plugin."""

    directory: str
    config: str
    image_id: str
    plugin: str
    prolog: str

    @property
    def plugstack(self) -> str:
        return (
            f"required {self.plugin} shifter_sshd={SHIFTER_SSHD} config={self.config} "
            f"state_path={STATE}"
        )


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    if not os.access(SHIFTER_SSHD, os.X_OK):
        pytest.fail(f"{SHIFTER_SSHD} is missing: run make setup")
    directory = tempfile.mkdtemp(prefix="shifter-sshd-vctest-", dir="/var/tmp")
    os.chmod(directory, 0o755)  # the test users' sbatch reads the config and images
    try:
        config = os.path.join(directory, "udiRoot.conf")
        with open(config, "w") as f:
            f.write(
                f"imagePath={directory}/images\nstatePath={STATE}\n"
                "module_mpich_siteEnv=SITE_MPI=mpich\n"
            )
        tree = busybox_tree(os.path.join(directory, "tree"))
        done = subprocess.run(
            [SHIFTER_SSHD, "--config", config, "image", "import", str(tree), IMAGE],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        subprocess.run(["chmod", "-R", "a+rX", directory], check=True)
        prolog = os.path.join(directory, "prolog.sh")
        with open(prolog, "w") as f:
            f.write(PROLOG)
        os.chmod(prolog, 0o755)
        plugin = spank.build(os.path.join(directory, "shifter_sshd_spank.so"),
                             slurmroots.include_dir(slurmroots.selected()))  # fmt: skip
        yield Site(directory, config, done.stdout.strip(), plugin, prolog)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(site: Site) -> Iterator[Cluster]:
    with Cluster(
        nodes=3,
        prolog=site.prolog,
        epilog=site.prolog,
        plugstack=[site.plugstack],
        private_dirs=SHIFTER_PRIVATE_DIRS,
    ) as up:
        yield up


def script_env(cluster: Cluster, node: str, context: str, job: int) -> dict[str, str]:
    """The environment the stand-in Prolog or Epilog recorded on a node."""
    text = cluster.run(node, ["cat", f"{STATE}/env.{context}_slurmd.{job}"]).stdout
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def assert_all_idle(cluster: Cluster) -> None:
    assert cluster.sinfo_states() == {node: "idle" for node in cluster.nodes}


def test_cluster_is_up_with_separate_nodes(cluster: Cluster) -> None:
    assert cluster.up_seconds < 10
    assert_all_idle(cluster)
    for node in cluster.nodes:
        assert cluster.run(node, ["hostname"]).stdout.strip() == node
    cluster.run("node1", ["touch", f"{STATE}/only-on-node1"])
    assert cluster.run("node2", ["ls", STATE]).stdout.split().count("only-on-node1") == 0
    hosts = cluster.run("node3", ["getent", "hosts", "node1"]).stdout
    assert hosts.split()[0] == cluster.layout.addr("node1")


def test_exclusive_batch_job_runs_on_every_node(cluster: Cluster) -> None:
    job = cluster.sbatch(USER, "#!/bin/sh\nsrun hostname\n", ["-N3", "--exclusive"])
    assert cluster.wait(job) == "COMPLETED", cluster.output(job)
    assert sorted(cluster.output(job).split()) == ["node1", "node2", "node3"]
    assert cluster.job(job)["UserId"].startswith(USER)


def test_prolog_and_epilog_see_the_pinned_image(cluster: Cluster, site: Site) -> None:
    volume = "/tmp:/data:ro;/home:/h"
    args = ["-N3", "--exclusive", f"--image={IMAGE}", f"--volume={volume}", "--module=mpich"]
    job = cluster.sbatch(USER, SHOW_ENV, args)
    assert cluster.wait(job) == "COMPLETED", cluster.output(job)
    for node in cluster.nodes:
        for context in ("prolog", "epilog"):
            env = script_env(cluster, node, context, job)
            assert env["SPANK_SHIFTER_IMAGE"] == IMAGE
            assert env["SPANK_SHIFTER_IMAGE_ID"] == site.image_id
            assert env["SPANK_SHIFTER_VOLUME"] == volume
            assert env["SPANK_SHIFTER_MODULE"] == "mpich"
    lines = cluster.output(job).splitlines()
    assert f"batch: {IMAGE} {site.image_id} {volume} mpich" in lines
    for node in cluster.nodes:
        assert f"{node}: {IMAGE} {site.image_id}" in lines


def test_unknown_image_fails_sbatch_at_once(cluster: Cluster) -> None:
    started = time.monotonic()
    done = cluster.submit(USER, "#!/bin/sh\ntrue\n", ["-N3", "--image=docker:nosuch:1"])
    assert done.returncode != 0
    assert "shifter-sshd: --image: no such image: docker:nosuch:1" in done.stderr
    assert time.monotonic() - started < 5
    assert_all_idle(cluster)


@pytest.mark.parametrize(
    ("volume", "message"),
    [
        ("/data", "shifter-sshd: --volume: expected source:destination[:flags]: /data"),
        ("/a:b", "shifter-sshd: --volume: paths must be absolute: b"),
        ("/a:/b;/c:/d:rx", "shifter-sshd: --volume: unknown flag (allowed: ro, rw): rx"),
        ("/a://etc", "shifter-sshd: --volume: destination may not cover /etc: /etc"),
        (
            "/a:/data;/b:/data/x",
            "shifter-sshd: --volume: destination lies inside another volume (/data): /data/x",
        ),
    ],
)
def test_malformed_volume_fails_sbatch_at_once(cluster: Cluster, volume: str, message: str) -> None:
    done = cluster.submit(
        USER, "#!/bin/sh\ntrue\n", ["-N3", f"--image={IMAGE}", f"--volume={volume}"]
    )
    assert done.returncode != 0
    assert message in done.stderr
    assert_all_idle(cluster)


def test_prolog_user_error_fails_the_job_not_the_node(cluster: Cluster) -> None:
    args = ["-N3", "--exclusive", f"--image={IMAGE}", "--volume=/vanished:/data"]
    job = cluster.sbatch(USER, "#!/bin/sh\necho should not run\n", args)
    assert cluster.wait(job) == "FAILED"
    output = cluster.output(job)
    assert "shifter-sshd: --volume: source does not exist: /vanished" in output
    assert "should not run" not in output
    assert_all_idle(cluster)


def test_job_without_image_is_left_alone(cluster: Cluster) -> None:
    job = cluster.sbatch(USER, "#!/bin/sh\nenv\n", ["-N1"])
    assert cluster.wait(job) == "COMPLETED"
    assert "SHIFTER_IMAGE" not in cluster.output(job)
    node = cluster.job(job)["NodeList"]
    assert "SPANK_SHIFTER_IMAGE" not in script_env(cluster, node, "prolog", job)


def test_salloc_and_srun_carry_the_image(cluster: Cluster, site: Site) -> None:
    done = cluster.salloc(
        USER,
        ["-N3", f"--image={IMAGE}"],
        ["srun", "sh", "-c", 'echo "$(hostname) $SHIFTER_IMAGE_ID"'],
    )
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == sorted(
        [*cluster.nodes, site.image_id, site.image_id, site.image_id]
    )
    done = cluster.client(
        ["srun", "-N2", f"--image={IMAGE}", "printenv", "SHIFTER_IMAGE"], user=USER
    )
    assert done.stdout.split() == [IMAGE, IMAGE]


def lab_traces(root: str, index: int) -> list[str]:
    """Everything on the host that still belongs to the cluster at ``root``."""
    traces = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if root.encode() in f.read():
                    traces.append(f"process {entry}")
        except OSError:
            continue
    with open("/proc/self/mountinfo") as f:
        traces += [f"mount {line}" for line in f if root in line or "lab-private" in line]
    traces += [f"link {n}" for n in lab_links() if n.startswith(f"sslab{index}")]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    traces += [f"netns {n}" for n in netns.split() if n.startswith("sslab")]
    # Job cgroups in this cluster's own job-id range; the slurm_nodeN directories above
    # them are shared with any cluster side by side (same node names).
    first = index * 100_000 + 1
    for path in glob.glob("/sys/fs/cgroup/*/slurm_node*/uid_*/job_*"):
        if first <= int(path.rsplit("_", 1)[1]) < first + 100_000:
            traces.append(f"cgroup {path}")
    if os.path.exists(root):
        traces.append(f"directory {root}")
    return traces


def test_down_leaves_nothing_even_with_a_running_job() -> None:
    cluster = Cluster(nodes=2, private_dirs=SHIFTER_PRIVATE_DIRS).up()
    root, index = cluster.root, cluster.index
    job = cluster.sbatch(USER, "#!/bin/sh\nsrun sleep 300\n", ["-N2"])
    deadline = time.monotonic() + 10
    while cluster.job(job)["JobState"] != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lab_traces(root, index)  # the check does see a live cluster
    cluster.down()
    assert lab_traces(root, index) == []


def test_killed_owner_is_cleaned_up_by_cleanup_stale() -> None:
    code = (
        "from lab.vcluster import Cluster\nc = Cluster(nodes=1).up()\nprint(c.root, flush=True)\n"
    )
    code += "import time\ntime.sleep(300)\n"
    owner = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert owner.stdout is not None
    root = owner.stdout.readline().strip()
    assert root.startswith(LAB_ROOT)
    index = int(os.path.basename(root).removeprefix("vc"))
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    removed = cleanup_stale()
    assert root in removed
    deadline = time.monotonic() + 5
    while lab_traces(root, index) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lab_traces(root, index) == []
