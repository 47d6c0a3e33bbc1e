"""``srun --mpi=pmix shifter app`` against ``srun --mpi=pmix app`` on the host, side by side.

Run as root: ``python -m benchmarks.bench_srun [rounds]``. On the lab cluster, in one
batch job per size (6 ranks: 2 per node; 48 ranks: 16 per node), the same program
(``lab/mpi_pingpong.c``, built in the Debian + Open MPI image and, from the same
source, on the host) runs in turn inside the container and on the host, round by
round. Prints the medians of the step's wall time and of the 8 MiB round trip
between two ranks of one node, with the container/host ratios.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lab.images import PROGRAMS
from lab.site import OPENMPI, make_site

SCRIPT = """#!/bin/sh
for round in $(seq {rounds}); do
  for where in container host; do
    if [ $where = container ]; then run="shifter /usr/local/bin/mpi_pingpong"
    else run="{host_binary}"; fi
    start=$(date +%s%N)
    srun --mpi=pmix {layout} $run 8388608 10 | sed "s/^/$where /"
    end=$(date +%s%N)
    echo "step $where $(( (end - start) / 1000 ))"
  done
done
"""


def _host_binary(directory: Path) -> str:
    """mpi_pingpong for the host, from the source the image's was built from."""
    binary = directory / "mpi_pingpong"
    subprocess.run(["mpicc.openmpi", "-O2", "-o", str(binary), str(PROGRAMS["mpi_pingpong"])],
                   check=True)  # fmt: skip
    return str(binary)


def _report(label: str, output: str) -> None:
    steps: dict[str, list[float]] = {}
    trips: dict[str, list[float]] = {}
    for where, micros in re.findall(r"^step (\w+) (\d+)$", output, re.M):
        steps.setdefault(where, []).append(int(micros) / 1e3)
    pair = r"^(\w+) pair \d+\((node\d)\) \d+\((node\d)\) 8388608 bytes ok (\d+)$"
    for where, first, second, micros in re.findall(pair, output, re.M):
        if first == second:
            trips.setdefault(where, []).append(int(micros))
    if not steps.get("container") or not trips.get("container"):
        raise SystemExit(f"{label}: no results:\n{output[-2000:]}")
    print(f"\n{label}: medians over {len(steps['container'])} rounds")
    for name, values, unit in (("srun step", steps, "ms"), ("8 MiB round trip", trips, "us")):
        inside, host = statistics.median(values["container"]), statistics.median(values["host"])
        print(f"  {name:<18} container {inside:10.1f} {unit}   host {host:10.1f} {unit}   "
              f"ratio {inside / host:.3f}")  # fmt: skip


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    work = Path(tempfile.mkdtemp(prefix="bench-srun-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    site = make_site(with_mpich=False)
    try:
        host_binary = _host_binary(work)
        with site.cluster(nodes=3) as cluster:
            for label, layout in (("6 ranks (2 per node)", "-n6"),
                                  ("48 ranks (16 per node)", "--overcommit -n48")):  # fmt: skip
                script = SCRIPT.format(rounds=rounds, host_binary=host_binary, layout=layout)
                args = ["-N3", "--exclusive", f"--image={OPENMPI}"]
                job = cluster.sbatch("sstest1", script, args)
                state = cluster.wait(job, timeout=60 + rounds * 120)
                if state != "COMPLETED":
                    raise SystemExit(f"{label}: job {state}:\n{cluster.output(job)[-2000:]}")
                _report(label, cluster.output(job))
    finally:
        site.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
