"""``make bench``: every benchmark in turn, each printing its own ratios.

The soak (200 cycles, several minutes) runs with ``python -m benchmarks.soak``.
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = ("bench_keys", "bench_prolog", "bench_sshd", "bench_hardening", "bench_scale",
              "bench_mpirun")  # fmt: skip


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
