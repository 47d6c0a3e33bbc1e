"""GPU jobs on the 3-node lab cluster: 4 fake GPUs per node (lab.fakegpu) as gres, a CDI
spec for them, and jobs asking for --gres=gpu:N or --gpus-per-node=N. Every node's
container, every ssh session and every mpirun rank sees exactly its node's GPUs."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cluster import USER, leftovers, run_job, settled

from lab import fakegpu
from lab.site import BUSYBOX, OPENMPI, Site
from lab.vcluster import Cluster

pytestmark = pytest.mark.cluster  # make test runs these on every Slurm version

GPUS_PER_NODE = 2
# What the batch step, an ssh session and each rank print: host, the host indexes of
# the GPUs nvidia-smi lists, the environment, and which /dev/nvidiaN (0-3) it can
# open. Written to $HOME, which the container shares with the host.
PROBE = """#!/bin/sh
gpus=$(nvidia-smi -L | sed 's/.*-//; s/)//' | tr '\\n' ' ')
opened=$(for i in 0 1 2 3; do head -c1 /dev/nvidia$i >/dev/null 2>&1 && printf "$i "; done)
echo "probe $(hostname) [$gpus] CVD=$CUDA_VISIBLE_DEVICES NVD=$NVIDIA_VISIBLE_DEVICES [$opened]"
"""
JOB = """
echo "allocated $SLURM_JOB_GPUS"
probe=$HOME/gpuprobe.$SLURM_JOB_ID.sh
cat > $probe <<'EOF'
{probe}EOF
chmod +x $probe
{run}
rm -f $probe
"""
OVER_SSH = 'shifter /bin/sh -c "$probe; ssh node2 $probe; mpirun -np 6 --map-by ppr:2:node $probe"'


@pytest.fixture(scope="module")
def gpu_cluster(site: Site) -> Iterator[Cluster]:
    top = Path(site.directory, "fakegpu")
    specs = fakegpu.build(top, gpus=GPUS_PER_NODE)
    with open(site.config, "a") as config:
        config.write(f"cdiSpecDirs={specs}\n")
    files = f"{top}/dev/nvidia[0-{GPUS_PER_NODE - 1}]"
    with site.cluster(nodes=3, gpus=GPUS_PER_NODE, gpu_files=files) as up:
        yield up


def _probes(output: str) -> dict[str, list[tuple[str, str, str, str]]]:
    """host -> [(nvidia-smi's indexes, CVD, NVD, opened)] for each probe line."""
    found: dict[str, list[tuple[str, str, str, str]]] = {}
    pattern = r"^probe (node\d) \[([\d ]*)\] CVD=(\S*) NVD=(\S*) \[([\d ]*)\]$"
    for host, gpus, cvd, nvd, opened in re.findall(pattern, output, re.M):
        found.setdefault(host, []).append((gpus.strip(), cvd, nvd, opened.strip()))
    return found


@pytest.mark.parametrize("request_args", [["--gres=gpu:2"], ["--gpus-per-node=2"]])
def test_every_rank_over_ssh_sees_its_nodes_gpus(
    gpu_cluster: Cluster, request_args: list[str]
) -> None:
    """An exclusive 3-node job: the batch step, an ssh session to node2 and six mpirun
    ranks launched through the container sshds each see the node's two GPUs."""
    script = JOB.format(probe=PROBE, run=OVER_SSH)
    args = ["-N3", "--exclusive", f"--image={OPENMPI}", *request_args]
    state, output = run_job(gpu_cluster, script, args)
    assert state == "COMPLETED", output
    assert "allocated 0,1" in output, output
    probes = _probes(output)
    assert sorted(probes) == ["node1", "node2", "node3"], output
    counts = {host: len(seen) for host, seen in probes.items()}
    assert counts == {"node1": 3, "node2": 3, "node3": 2}, output  # batch, ssh, 6 ranks
    for host, seen in probes.items():
        assert set(seen) == {("0 1", "0,1", "0,1", "0 1")}, (host, seen, output)


def test_jobs_sharing_a_node_each_see_their_own_gpu(gpu_cluster: Cluster) -> None:
    """Two jobs of one GPU each, on node1 at once (no sshd: the node is shared): each
    container holds its own GPU only, and the other's cannot be opened."""
    run = "srun -n1 shifter $probe\nsleep 3"
    args = ["-N1", "-n1", "--mem=200M", "-w", "node1", "--gres=gpu:1", f"--image={OPENMPI}"]
    jobs = [gpu_cluster.sbatch(USER, "#!/bin/sh\n" + JOB.format(probe=PROBE, run=run), args)
            for _ in range(2)]  # fmt: skip
    seen = []
    for job in jobs:
        assert gpu_cluster.wait(job, timeout=120) == "COMPLETED", gpu_cluster.output(job)
        output = gpu_cluster.output(job)
        allocated = re.search(r"^allocated (\d)$", output, re.M)
        probes = _probes(output)["node1"]
        assert allocated and probes == [(allocated[1], "0", allocated[1], allocated[1])], output
        seen.append(allocated[1])
    assert sorted(seen) == ["0", "1"]  # at once on one node: different GPUs
    assert settled(gpu_cluster) == {}


def test_jobs_without_gpus_see_none(gpu_cluster: Cluster) -> None:
    """A job that shares its node and asked for no GPU (an --exclusive job owns the
    node's GPUs: Slurm gives it every one)."""
    script = "shifter /bin/sh -c 'ls /dev | grep -c nvidia; echo CVD=$CUDA_VISIBLE_DEVICES.'\n"
    args = ["-N1", "-n1", "--mem=200M", f"--image={BUSYBOX}"]
    state, output = run_job(gpu_cluster, script, args)
    assert state == "COMPLETED", output
    assert re.search(r"^0$", output, re.M) and "CVD=." in output, output
    assert leftovers(gpu_cluster) == {}
