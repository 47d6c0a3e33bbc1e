"""What each node's prolog costs slurmctld: one job's details against the whole queue.

Run as root: ``python -m benchmarks.bench_query [rounds]``. On the lab cluster, with
10, 1,000 and 10,000 jobs queued (held), it times the prolog's question
(``squeue -h -j <job> -O ...``, ``slurm.query``) against what earlier versions asked
(``squeue --json``, the whole queue, which Slurm 22.05 returns whatever the filter),
each from three nodes at once, as three prologs of one job would; and slurmctld's
own CPU time per question, read from /proc before and after all rounds (its clock
ticks are 10 ms). Wall times are medians of the rounds and include starting squeue
inside the node's namespaces.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from lab.vcluster import Cluster
from shifter_sshd.slurm import query as slurm

QUEUES = (10, 1_000, 10_000)


def _ctl_cpu(pid: int) -> float:
    """slurmctld's user + system CPU seconds so far."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ctl_pid(cluster: Cluster) -> int:
    done = subprocess.run(["pgrep", "-f", f"^slurmctld -D -i -f {cluster.conf}"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout.split()[0])


def _fill(cluster: Cluster, total: int) -> None:
    """Held jobs until ``total`` are queued, submitted 16 at a time."""
    queued = len(cluster.client(["squeue", "-h", "-o", "%i"]).stdout.split())

    def submit(_index: int) -> None:
        cluster.client(["sbatch", "--hold", "-N1", "-o", "/dev/null", "--wrap", "true"],
                       user="sstest1")  # fmt: skip

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(submit, range(max(0, total - queued))))


def _ask_three(cluster: Cluster, argv: list[str]) -> float:
    """The same question from node1..3 at once; seconds until all three answered."""
    env = {"SLURM_TIME_FORMAT": "%s"}
    started = time.perf_counter()
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda n: cluster.run(n, argv, env=env, timeout=300), cluster.nodes))
    return time.perf_counter() - started


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    with Cluster(nodes=3) as cluster:
        job = cluster.sbatch("sstest1", "#!/bin/sh\nsleep 3600\n", ["-N3", "--exclusive"])
        while cluster.job(job).get("JobState") != "RUNNING":
            time.sleep(0.1)
        fields = ",".join(f"{name}:|" for name in slurm.FIELDS)
        questions = {
            "squeue -j (one job)": ["squeue", "-h", "-j", str(job), "-O", fields],
            "squeue --json (queue)": ["squeue", "--json"],
        }
        ctl = _ctl_pid(cluster)
        print(f"3 nodes asking at once, {rounds} rounds, medians")
        print(f"{'queued jobs':>12} {'question':<24} {'wall ms':>9} {'ctld CPU ms/ask':>16} "
              f"{'bytes':>10}")  # fmt: skip
        for total in QUEUES:
            _fill(cluster, total)
            for name, argv in questions.items():
                size = len(cluster.run("node1", argv).stdout)
                before = _ctl_cpu(ctl)  # in clock ticks: summed over every round
                walls = [_ask_three(cluster, argv) for _round in range(rounds)]
                cpu = (_ctl_cpu(ctl) - before) / (3 * rounds)
                print(f"{total:>12,} {name:<24} {statistics.median(walls) * 1e3:>9.1f} "
                      f"{cpu * 1e3:>16.2f} {size:>10,}")  # fmt: skip
        cluster.client(["scancel", "--user=sstest1"])


if __name__ == "__main__":
    main()
