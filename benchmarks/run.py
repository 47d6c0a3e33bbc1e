"""``make bench``: every benchmark in turn, each printing its own ratios.

The soaks (200 cycles, several minutes each) run with ``python -m benchmarks.soak`` and
``python -m benchmarks.soak_liveness`` (the job owner stopping and killing her processes).
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = ("bench_keys", "bench_prolog", "bench_sshd", "bench_hardening", "bench_scale",
              "bench_mpirun", "bench_standalone")  # fmt: skip


def main() -> int:
    failed = 0
    for name in BENCHMARKS:
        print(f"\n===== benchmarks.{name}", flush=True)
        failed += (
            subprocess.run([sys.executable, "-m", f"benchmarks.{name}"], check=False).returncode
            != 0
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
