"""``python -m shifter_sshd.commands.launchers``: the installed commands' first lines,
made safe and fast.

pip writes each console script as ``#!<venv>/bin/python`` plus a few lines. Run
once after every install (``make setup`` does), this rewrites them:

- every command starts Python isolated (``-I``): a user's PYTHONHOME, PYTHONPATH or
  user site-packages (after ``module load python``, or conda) can neither break
  ``shifter`` and the plugin's submission check nor slip code into them;
- the commands on every job's path (``shifter-sshd-prolog`` and
  ``shifter-sshd-epilog`` on every node, ``shifter`` in every task) also skip the site
  module (``-S``; this venv's site-packages is put on the path by name instead): a
  millisecond of each job's start and end, a tenth of the epilog of a container
  job, 3 ms of a ``shifter --image`` start.

Each script is replaced by rename, so a prolog starting meanwhile runs the old one or
the new one, never half of one.
"""

from __future__ import annotations

import os
import sys
import sysconfig

ISOLATED = ("shifterimg", "shifter-sshd")
ON_EVERY_JOB = {  # command -> what it runs
    "shifter": "from shifter_sshd.commands.shifter import main\nsys.exit(main())\n",
    "shifter-sshd-prolog": "from shifter_sshd.commands.entry import prolog\nprolog()\n",
    "shifter-sshd-epilog": "from shifter_sshd.commands.entry import epilog\nepilog()\n",
}


def _replace(path: str, text: str) -> None:
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(partial, 0o755)  # noqa: S103 - commands every user and slurmd run
    os.replace(partial, path)


def rewrite(bin_dir: str, python: str, site_packages: str) -> list[str]:
    """Rewrite the scripts found in ``bin_dir``; the ones rewritten."""
    done = []
    for name in ISOLATED:
        path = os.path.join(bin_dir, name)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as handle:
            _first, _sep, body = handle.read().partition("\n")
        _replace(path, f"#!{python} -I\n{body}")
        done.append(name)
    for name, body in ON_EVERY_JOB.items():
        path = os.path.join(bin_dir, name)
        if not os.path.exists(path):
            continue
        _replace(path, f"#!{python} -IS\nimport sys\nsys.path.append({site_packages!r})\n{body}")
        done.append(name)
    return done


def main() -> int:
    bin_dir = os.path.dirname(sys.executable)
    python = os.path.join(bin_dir, "python")
    site_packages = sysconfig.get_path("purelib")
    for name in rewrite(bin_dir, python, site_packages):
        print(os.path.join(bin_dir, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
