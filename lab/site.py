"""A complete shifter-sshd site for the virtual cluster, as an admin would set it up.

udiRoot.conf, the image store with the test images, the OpenSSH bundle, the site
secret, the SPANK plugin, and the Prolog/Epilog wrappers slurm.conf points at
(``Prolog=`` takes no arguments, so each is a two-line script). Everything lives in
one directory that the test users can read, removed by ``close()``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from shifter_sshd.slurm import spank

from . import VENV, images, slurmroots
from .machine import BOOT_ID
from .vcluster import SHIFTER_PRIVATE_DIRS, Cluster

SHIFTER_SSHD = os.path.join(VENV, "bin", "shifter-sshd")
STATE = "/run/shifter-sshd"
BUSYBOX = "docker:busybox:lab"
OPENMPI = "docker:debian:openmpi"
MPICH = "docker:debian:mpich"


# A node's fault for the tests (faults.py), in the node's private statePath: slurmd
# gives the prolog no variable of ours, so the wrapper reads it from there.
FAULT_FILE = f"{STATE}/lab-fault"
WRAPPER = """#!/bin/sh
[ -f {fault} ] && export SHIFTER_SSHD_FAULT="$(/bin/cat {fault})"
exec {venv}/bin/shifter-sshd-{context} --config {config}
"""


@dataclass
class Site:
    directory: str
    config: str
    plugin: str = ""
    image_ids: dict[str, str] = field(default_factory=dict)

    @property
    def plugstack(self) -> str:
        return self.plugstack_for(self.plugin)

    def plugstack_for(self, plugin: str) -> str:
        return (f"required {plugin} shifter_sshd={SHIFTER_SSHD} config={self.config} "
                f"state_path={STATE}")  # fmt: skip

    def plugin_for(self, version: str) -> str:
        """The SPANK plugin built against that Slurm version's own headers."""
        root = slurmroots.root(version)
        if root is None:
            return self.plugin
        target = f"{self.directory}/shifter_sshd_spank-{version}.so"
        if not os.path.exists(target):
            spank.build(target, os.path.join(root, "usr", "include"))
        return target

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SHIFTER_SSHD, "--config", self.config, *args],
                              capture_output=True, text=True, check=False)  # fmt: skip

    def import_image(self, source: str, name: str) -> str:
        done = self.cli("image", "import", source, name)
        if done.returncode != 0:
            raise RuntimeError(f"image import {name}: {done.stderr}")
        self.image_ids[name] = done.stdout.strip()
        subprocess.run(["chmod", "-R", "a+rX", f"{self.directory}/images"], check=True)
        return self.image_ids[name]

    def cluster(self, nodes: int = 3, epilog: bool = True, gpus: int = 0, gpu_files: str = "",
                version: str | None = None, **slurm: str) -> Cluster:  # fmt: skip
        """A cluster (not yet up) running this site's prolog, epilog and plugin, on Slurm
        ``version`` ($SHIFTER_SSHD_LAB_SLURM by default); ``slurm`` passes Cluster's
        settings (proctrack, prolog_flags)."""
        chosen = slurmroots.selected(version)
        return Cluster(
            nodes=nodes,
            gpus=gpus,
            gpu_files=gpu_files,
            slurm=chosen,
            prolog=f"{self.directory}/prolog.sh",
            epilog=f"{self.directory}/epilog.sh" if epilog else None,
            plugstack=[self.plugstack_for(self.plugin_for(chosen))],
            private_dirs=SHIFTER_PRIVATE_DIRS,
            **slurm,
        )

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _write(path: str, text: str, mode: int) -> None:
    Path(path).write_text(text)
    os.chmod(path, mode)


def make_site(with_mpich: bool = True) -> Site:
    """Build the site: bundle, secret, plugin, wrappers, images. About two seconds."""
    directory = tempfile.mkdtemp(prefix="shifter-sshd-site-", dir="/var/tmp")
    os.chmod(directory, 0o755)  # users' sbatch reads the config and the image store
    config = f"{directory}/udiRoot.conf"
    site = Site(directory, config)
    try:
        _write(config, (
            f"imagePath={directory}/images\n"
            f"optUdiImage={directory}/udiImage\n"
            f"sshKeySecret={directory}/ssh_key_secret\n"
            f"statePath={STATE}\n"
            "siteEnv=SHIFTER_SITE=lab\n"
            "siteFs=/home:/home\n"
            # Each virtual node's own boot id (lab.machine), as a real node has one.
            f"siteFs={BOOT_ID}:/proc/sys/kernel/random/boot_id:ro\n"
            "killGrace=2\n"
        ), 0o644)  # fmt: skip
        for what in (["udiimage", "build"], ["secret", "init"]):
            done = site.cli(*what)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(what)}: {done.stderr}")
        for context in ("prolog", "epilog"):
            _write(f"{directory}/{context}.sh", WRAPPER.format(
                venv=VENV, context=context, config=config, fault=FAULT_FILE), 0o755)  # fmt: skip
        site.plugin = spank.build(f"{directory}/shifter_sshd_spank.so")
        tree = images.busybox_tree(f"{directory}/busybox-tree")
        site.import_image(str(tree), BUSYBOX)
        site.import_image(str(images.debian_squashfs("openmpi")), OPENMPI)
        if with_mpich:
            site.import_image(str(images.debian_squashfs("mpich")), MPICH)
    except BaseException:
        site.close()
        raise
    return site
