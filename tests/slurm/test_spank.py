"""``shifter-sshd spank build``: real gcc against the installed Slurm headers.

What the plugin does in sbatch, salloc, srun and slurmstepd is tested on the
virtual cluster in test_vcluster.py; this is the build command's own contract.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lab import VENV
from shifter_sshd.errors import ShifterError
from shifter_sshd.slurm import spank

HOOKS = ("slurm_spank_init", "slurm_spank_init_post_opt", "slurm_spank_user_init",
         "slurm_spank_task_init")  # fmt: skip


def exported(library: str) -> set[str]:
    done = subprocess.run(["nm", "-D", "--defined-only", library], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return {line.split()[-1] for line in done.stdout.splitlines()}


def test_build_compiles_a_plugin_slurm_can_load(tmp_path: Path) -> None:
    output = spank.build(str(tmp_path / "lib" / "plugin.so"))
    assert output == str(tmp_path / "lib" / "plugin.so")
    assert os.stat(output).st_mode & 0o777 == 0o755
    symbols = exported(output)
    assert set(HOOKS) <= symbols
    assert "plugin_name" in symbols and "plugin_version" in symbols
    assert os.listdir(tmp_path / "lib") == ["plugin.so"]  # no partial file left


def test_build_compiles_without_warnings(tmp_path: Path) -> None:
    done = subprocess.run(
        ["gcc", *spank.CFLAGS, "-o", str(tmp_path / "p.so"), spank.SOURCE],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0
    assert done.stderr == ""


def test_gcc_failure_quotes_gcc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("int slurm_spank_init(void) { return undeclared_thing; }\n")
    monkeypatch.setattr(spank, "SOURCE", str(broken))
    with pytest.raises(ShifterError) as err:
        spank.build(str(tmp_path / "plugin.so"))
    text = str(err.value)
    assert text.startswith("shifter-sshd: spank build: gcc failed (exit 1): ")
    assert "undeclared_thing" in text
    assert not (tmp_path / "plugin.so").exists()


def test_unusable_output_directory_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ShifterError) as err:
        spank.build(str(blocker / "plugin.so"))
    assert str(err.value) == (
        f"shifter-sshd: spank build: cannot create the directory (File exists): {blocker}"
    )


def test_cli_prints_the_output_path(tmp_path: Path) -> None:
    output = tmp_path / "cli.so"
    done = subprocess.run(
        [os.path.join(VENV, "bin", "shifter-sshd"), "spank", "build", "--output", str(output)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{output}\n"
    assert output.exists()
