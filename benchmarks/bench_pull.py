"""``image pull`` against the tools by hand: skopeo copy, then tar2sqfs of the tree.

Run as root: ``python -m benchmarks.bench_pull [rounds]`` (default 5). The Debian +
Open MPI image (about 135 MB compressed, one layer) is served by a local
docker-registry (lab.registry). Each round, in turn: ``shifter-sshd image pull``
into an empty store, and ``skopeo copy`` to an OCI directory followed by
``tar2sqfs`` (every core) of the layer, which for a one-layer image is the
flattened tree. Prints medians and the ratio; the goal is at most 1.5x.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab import VENV, images, registry

CLI = os.path.join(VENV, "bin", "shifter-sshd")


def _by_hand(work: Path, source: str) -> None:
    layout = work / "layout"
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", source,
                    f"oci:{layout}:image"], check=True)  # fmt: skip
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    layer = blobs / manifest["layers"][0]["digest"][7:]
    gunzip = subprocess.Popen(["gzip", "-dc", str(layer)], stdout=subprocess.PIPE)
    subprocess.run(["tar2sqfs", "--quiet", "--no-skip", "--compressor", "zstd", "--force",
                    "--num-jobs", str(os.cpu_count() or 1), str(work / "image.sqsh")],
                   stdin=gunzip.stdout, check=True)  # fmt: skip
    if gunzip.wait() != 0:
        raise SystemExit("gzip failed")


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    work = Path(tempfile.mkdtemp(prefix="bench-pull-", dir="/var/tmp"))
    layout = registry.squashfs_layout(images.debian_squashfs("openmpi"), {})
    served = registry.Registry(work / "registry").start()
    try:
        served.push(layout, "lab/debian-openmpi", "latest")
        name = f"docker:{served.address}/lab/debian-openmpi:latest"
        size = sum(p.stat().st_size for p in (layout / "blobs" / "sha256").iterdir())
        rows: dict[str, list[float]] = {"image pull": [], "skopeo copy + tar2sqfs": []}
        for number in range(rounds + 1):  # round 0 warms the caches up
            store = work / f"store{number}"
            store.mkdir()
            config = store / "udiRoot.conf"
            config.write_text(f"imagePath={store}/images\ninsecureRegistries={served.address}\n")
            started = time.perf_counter()
            subprocess.run([CLI, "--config", str(config), "image", "pull", name], check=True,
                           capture_output=True)  # fmt: skip
            pulled = time.perf_counter() - started
            started = time.perf_counter()
            _by_hand(store, f"docker://{served.address}/lab/debian-openmpi:latest")
            by_hand = time.perf_counter() - started
            shutil.rmtree(store)
            if number:
                rows["image pull"].append(pulled)
                rows["skopeo copy + tar2sqfs"].append(by_hand)
        medians = {key: statistics.median(values) for key, values in rows.items()}
        print(f"\nDebian + Open MPI ({size >> 20} MiB in the registry), {rounds} rounds, "
              f"{os.cpu_count()} cores, medians:")  # fmt: skip
        for key, value in medians.items():
            print(f"  {key:<26} {value:.2f} s")
        ratio = medians["image pull"] / medians["skopeo copy + tar2sqfs"]
        print(f"  {'ratio':<26} {ratio:.2f}x (goal: <= 1.5x)")
    finally:
        served.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
