"""The prolog's extra cost as the job's node list grows to 10,000 nodes.

Every node's prolog turns SLURM_NODELIST and SLURM_JOB_CPUS_PER_NODE into the
allocation, writes four host lists (hostsfile.FILES) and renders known_hosts and
ssh_config naming every host of the job. All of that grows with the job; this
measures it for N = 10 ... 10,000 with lists compressed the way Slurm writes them
(``nid[00001-10000]``, ``64(x10000)``), every size in the same run, interleaved
round by round, median of the rounds. What slurmctld is asked does not grow with
N (one job, ``slurm.query``): ``benchmarks.bench_query`` measures that on the lab.

Run from the repository root: ``python -m benchmarks.bench_scale [--rounds N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from shifter_sshd.container import hostsfile
from shifter_sshd.slurm import hostlist
from shifter_sshd.slurm import query as slurm
from shifter_sshd.ssh import config as sshconfig

SIZES = (10, 100, 1_000, 10_000)
CPUS = 64
PORT = 1204
CA_LINE = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI" + "A" * 43 + " job-ca"


def node_list(n: int) -> str:
    return f"nid[00001-{n:05d}]"


def steps(n: int) -> list[tuple[str, Callable[[], object]]]:
    """The prolog's N-dependent work, each step on its own (inputs precomputed)."""
    nodes, cpus = node_list(n), f"{CPUS}(x{n})"
    allocation = hostsfile.slots(nodes, cpus, "nid00001")
    hosts = [node for node, _tasks in allocation]
    client = sshconfig.SshClientSettings(hosts=hosts, port=PORT, user="sstest1")
    found: list[tuple[str, Callable[[], object]]] = [
        ("expand node list", lambda: hostlist.expand_nodelist(nodes)),
        ("allocation (slots)", lambda: hostsfile.slots(nodes, cpus, "nid00001")),
        ("tasks per node", lambda: slurm.distribute([CPUS] * n, n * CPUS)),
    ]
    for path, render in hostsfile.FILES.items():
        found.append((path, lambda render=render: render(allocation)))  # type: ignore[misc]
    found.append(("known_hosts", lambda: sshconfig.render_known_hosts(CA_LINE, hosts, PORT)))
    found.append(("ssh_config", lambda: sshconfig.render_ssh_config(client)))
    return found


def output_bytes(n: int) -> dict[str, int]:
    """Size of each file the prolog writes, for the report."""
    allocation = hostsfile.slots(node_list(n), f"{CPUS}(x{n})", "nid00001")
    hosts = [node for node, _tasks in allocation]
    sizes = {path: len(render(allocation)) for path, render in hostsfile.FILES.items()}
    sizes["known_hosts"] = len(sshconfig.render_known_hosts(CA_LINE, hosts, PORT))
    client = sshconfig.SshClientSettings(hosts=hosts, port=PORT, user="sstest1")
    sizes["ssh_config"] = len(sshconfig.render_ssh_config(client))
    return sizes


def time_once(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    sizes_steps = {n: steps(n) for n in SIZES}
    for n in SIZES:  # warm up: imports, jinja2 template compilation, regex caches
        for _name, function in sizes_steps[n]:
            function()
    samples: dict[int, dict[str, list[float]]] = {n: {} for n in SIZES}
    for _round in range(args.rounds):
        for n in SIZES:
            for name, function in sizes_steps[n]:
                samples[n].setdefault(name, []).append(time_once(function))

    names = [name for name, _f in sizes_steps[SIZES[0]]]
    medians = {n: {k: statistics.median(v) for k, v in samples[n].items()} for n in SIZES}
    # "allocation" already includes "expand node list": the total counts the prolog's
    # calls once each (slots, tasks per node, four host lists, known_hosts, ssh_config).
    counted = [name for name in names if name != "expand node list"]
    totals = {n: sum(medians[n][k] for k in counted) for n in SIZES}

    print(f"prolog work that grows with the job, median of {args.rounds} rounds (ms)")
    print(f"{'step':24}" + "".join(f"{n:>12,}" for n in SIZES))
    for name in names:
        print(f"{name:24}" + "".join(f"{medians[n][name] * 1e3:12.3f}" for n in SIZES))
    print(f"{'total':24}" + "".join(f"{totals[n] * 1e3:12.3f}" for n in SIZES))
    print(f"{'per node (us)':24}" + "".join(f"{totals[n] / n * 1e6:12.2f}" for n in SIZES))
    print(f"total(10,000) / total(1,000) = {totals[10_000] / totals[1_000]:.2f} (linear: 10)")
    for n in (1_000, 10_000):
        worst = max(counted, key=lambda k: medians[n][k] / medians[n // 10][k])
        ratio = medians[n][worst] / medians[n // 10][worst]
        print(f"steepest step {n // 10:,} -> {n:,}: {worst} x{ratio:.1f}")
    sizes = output_bytes(10_000)
    print("bytes written at 10,000 nodes: " + ", ".join(f"{k} {v:,}" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
