"""``doctor``, ``status`` and the commands' isolation from a user's Python environment."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

from support import CLI, Node, run

from lab.users import LabUser

BUSYBOX = "docker:busybox:test"


def _doctor(config: str, *extra: str) -> tuple[int, dict[str, object]]:
    done = run([CLI, "--config", config, "doctor", "--json", *extra], dict(os.environ))
    return done.returncode, json.loads(done.stdout)


def _problems(report: dict[str, object]) -> dict[str, str]:
    findings = report["findings"]
    assert isinstance(findings, list)
    return {f["check"]: f["detail"] for f in findings if f["problem"]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_doctor_passes_a_good_node(node: Node, bundle: str, secret_file: str) -> None:
    node.write_config(enableSshd="1", optUdiImage=bundle, sshKeySecret=secret_file,
                      sshdPort=str(_free_port()))  # fmt: skip
    rc, report = _doctor(node.config)
    assert rc == 0 and report["ok"] is True, report
    assert _problems(report) == {}


def test_doctor_names_each_problem(node: Node, tmp_path: Path, secret_file: str) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(Path(secret_file).read_bytes())
    secret.chmod(0o644)  # readable by users: every job's keys could be forged
    (tmp_path / "cdi").mkdir()
    broken = "cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n- name: '0'\n  colour: red\n"
    (tmp_path / "cdi" / "nvidia.yaml").write_text(broken)
    node.write_config(enableSshd="1", optUdiImage=str(tmp_path / "no-bundle"),
                      cdiSpecDirs=str(tmp_path / "cdi"),
                      sshKeySecret=str(secret), imagePath=str(tmp_path / "no-images"),
                      siteFs=f"{tmp_path}/no-such-dir:/data", etcPath=str(tmp_path / "no-etc"),
                      usersToImport="no-such-user-xyz")  # fmt: skip
    rc, report = _doctor(node.config)
    problems = _problems(report)
    assert rc == 1 and report["ok"] is False
    assert set(problems) >= {"imagePath", "optUdiImage", "sshKeySecret", "siteFs", "etcPath",
                             "usersToImport", "cdi"}, problems  # fmt: skip
    assert "unknown field in devices[0]: colour" in problems["cdi"]
    assert "no-such-dir" in problems["siteFs"] and "no-such-user-xyz" in problems["usersToImport"]
    text = run([CLI, "--config", node.config, "doctor"], dict(os.environ))
    lines = [line for line in text.stderr.splitlines() + text.stdout.splitlines()
             if line.startswith("shifter-sshd: doctor: ")
             and ": warning: " not in line]  # fmt: skip
    assert text.returncode == 1 and len(lines) == len(problems), text.stdout + text.stderr


def test_doctor_reads_slurm_conf(node: Node, tmp_path: Path) -> None:
    conf = tmp_path / "slurm.conf"
    conf.write_text(f"PrologFlags=Alloc\nProlog={tmp_path}/missing-prolog\n")
    rc, report = _doctor(node.config, "--slurm-conf", str(conf))
    problems = [f["detail"] for f in report["findings"] if f["problem"]]  # type: ignore[attr-defined]
    assert rc == 1
    assert any("missing-prolog" in p for p in problems), problems
    assert any("Epilog" in p for p in problems), problems


def test_status_shows_a_running_container(node: Node, test_users: list[LabUser], bundle: str,
                                          secret_file: str) -> None:  # fmt: skip
    user = test_users[0]
    port = _free_port()
    name = socket.gethostname()
    node.write_config(enableSshd="1", optUdiImage=bundle, sshKeySecret=secret_file,
                      sshdPort=str(port))  # fmt: skip
    env = node.job_env("811", user.name, user.uid, user.gid, SPANK_SHIFTER_IMAGE=BUSYBOX,
                       SLURMD_NODENAME=name, SLURM_NODELIST=name)  # fmt: skip
    done = node.prolog(env)
    assert done.returncode == 0, done.stderr
    try:
        status = run([CLI, "--config", node.config, "status", "--json"], dict(os.environ))
        assert status.returncode == 0, status.stderr
        (job,) = json.loads(status.stdout)
        assert job["job_id"] == "811" and job["user"] == user.name
        assert job["image"] == BUSYBOX and job["sshd_port"] == port
        assert job["sshd_pid"] > 0 and os.path.exists(f"/proc/{job['sshd_pid']}")
        assert job["mounts"] > 0
        text = run([CLI, "--config", node.config, "status"], dict(os.environ))
        assert "811" in text.stdout and user.name in text.stdout
    finally:
        assert node.epilog("811").returncode == 0
    after = run([CLI, "--config", node.config, "status", "--json"], dict(os.environ))
    assert json.loads(after.stdout) == []
    assert node.leftovers() == []


def test_commands_ignore_the_users_python_environment(tmp_path: Path) -> None:
    """PYTHONHOME pointing nowhere, PYTHONPATH with a hostile sitecustomize: no effect."""
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "hijacked"
    (evil / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (evil / "shifter_sshd").mkdir()
    (evil / "shifter_sshd" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    env = {"PATH": os.environ["PATH"], "PYTHONHOME": str(tmp_path / "nowhere"),
           "PYTHONPATH": str(evil), "PYTHONUSERBASE": str(evil)}  # fmt: skip
    bindir = os.path.dirname(CLI)
    for script in ("shifter", "shifterimg", "shifter-sshd", "shifter-sshd-prolog",
                   "shifter-sshd-epilog"):  # fmt: skip
        with open(f"{bindir}/{script}", encoding="utf-8") as handle:
            assert handle.readline().rstrip().endswith((" -I", " -IS")), script
        done = subprocess.run([f"{bindir}/{script}", "--help"], env=env, capture_output=True,
                              text=True, timeout=30)  # fmt: skip
        assert done.returncode == 0, (script, done.stderr)
        assert "Fatal Python error" not in done.stderr
    assert not marker.exists()
