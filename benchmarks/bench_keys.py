"""One node's whole derived key set against Shifter's per-node ssh-keygen runs.

Shifter's prolog ran ``ssh-keygen -q -N '' -t {dsa,ecdsa,rsa,ed25519}`` on every node
of every job; we derive an Ed25519 CA, user and host key and sign two certificates.
Both are measured in the same run, interleaved round by round, so that the ratio
compares like with like on this machine.

Run from the repository root: ``python -m benchmarks.bench_keys [--rounds N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from shifter_sshd.ssh import keys

SHIFTER_TYPES = ("dsa", "ecdsa", "rsa", "ed25519")
KEYSETS_PER_ROUND = 50


def one_key_set(secret: bytes, restart: int) -> float:
    """Seconds for one node's key set; the restart count varies so nothing is cached."""
    now = int(time.time())
    after, before = keys.validity(now, now + 3600, 300, 86400)
    start = time.perf_counter()
    keys.node_key_set(
        secret, "bench", 4242, restart, 2901, "sstest1", "nid00001",
        ["nid00001.bench", "10.0.0.1"], after, before,
    )  # fmt: skip
    return time.perf_counter() - start


def keygen(directory: str, key_type: str) -> float | None:
    """Seconds for one ``ssh-keygen`` as Shifter ran it, or None if it is refused."""
    path = os.path.join(directory, f"ssh_host_{key_type}_key")
    for old in (path, path + ".pub"):
        if os.path.exists(old):
            os.unlink(old)
    start = time.perf_counter()
    done = subprocess.run(
        ["ssh-keygen", "-q", "-N", "", "-t", key_type, "-f", path], capture_output=True
    )
    elapsed = time.perf_counter() - start
    return elapsed if done.returncode == 0 else None


def accepted_types(directory: str) -> list[str]:
    """The types this ssh-keygen still generates (OpenSSH drops dsa at some point)."""
    return [t for t in SHIFTER_TYPES if keygen(directory, t) is not None]


def cold_start() -> float:
    """Seconds for a fresh interpreter to import the module and derive one key set,
    as the prolog does once per job; the interpreter's own start is not counted."""
    code = (
        "import time; t = time.perf_counter()\n"
        "from shifter_sshd.ssh import keys\n"
        "keys.node_key_set(bytes(64), 'c', 1, 0, 'u', 'n', ['n'], 1, 2)\n"
        "print(time.perf_counter() - t)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout)


def import_only() -> float:
    """Seconds for a fresh interpreter to import the module alone (cryptography is lazy)."""
    code = (
        "import time; t = time.perf_counter()\n"
        "import shifter_sshd.ssh.keys\n"
        "print(time.perf_counter() - t)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:9.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="rounds of ssh-keygen (default 9)")
    rounds = parser.parse_args().rounds
    secret = os.urandom(keys.SECRET_BYTES)
    one_key_set(secret, 0)  # the first call pays for importing cryptography
    derived: list[float] = []
    per_type: dict[str, list[float]] = {}
    totals: list[float] = []
    with tempfile.TemporaryDirectory() as directory:
        types = accepted_types(directory)
        for round_ in range(rounds):
            derived += [one_key_set(secret, round_ * KEYSETS_PER_ROUND + i + 1)
                        for i in range(KEYSETS_PER_ROUND)]  # fmt: skip
            times = {t: keygen(directory, t) or 0.0 for t in types}
            for key_type, seconds in times.items():
                per_type.setdefault(key_type, []).append(seconds)
            totals.append(sum(times.values()))
    report(derived, per_type, totals, types)


def report(
    derived: list[float], per_type: dict[str, list[float]], totals: list[float], types: list[str]
) -> None:
    ours, theirs = statistics.median(derived), statistics.median(totals)
    print(f"one node's key set (CA, user and host key, 2 certificates), {len(derived)} runs:")
    print(f"  median {ms(ours)}   (target under 5 ms)")
    print(f"  import only, fresh interpreter         {ms(import_only())}")
    print(f"  import + first key set, fresh interp.  {ms(cold_start())}")
    refused = [t for t in SHIFTER_TYPES if t not in types]
    print(f"Shifter's ssh-keygen -q -N '' -t {{{','.join(types)}}}, {len(totals)} rounds:")
    if refused:
        print(f"  ({', '.join(refused)} refused by this ssh-keygen; timed the others)")
    for key_type in types:
        print(f"  {key_type:8} median {ms(statistics.median(per_type[key_type]))}")
    print(f"  all {len(types)}    median {ms(theirs)}")
    print(f"ratio: ssh-keygen / derived = {theirs / ours:,.0f}x")


if __name__ == "__main__":
    main()
