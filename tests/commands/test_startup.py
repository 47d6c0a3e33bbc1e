"""What the job-start commands import before they do anything: shifter runs in every
task of every job, the prolog and epilog on every node at every job start. Each
standard module costs them 0.1-9 ms; none may come in unnoticed (the epilog's own
list is in tests/config/test_quickconf.py)."""

from __future__ import annotations

import os
import subprocess

from lab import VENV

# Measured when the package was split into subpackages: nothing may be added.
SHIFTER = {"__future__"}
PROLOG = {
    "__future__", "_ast", "_collections", "_ctypes", "_functools", "_json", "_opcode",
    "_operator", "_sre", "_struct", "_weakrefset", "ast", "collections", "collections.abc",
    "contextlib", "copy", "copyreg", "ctypes", "ctypes._endian", "dataclasses", "dis", "enum",
    "errno", "fcntl", "fnmatch", "functools", "grp", "importlib", "importlib._bootstrap",
    "importlib._bootstrap_external", "importlib.machinery", "inspect", "itertools", "json",
    "json.decoder", "json.encoder", "json.scanner", "keyword", "linecache", "mmap", "opcode",
    "operator", "pwd", "re", "re._casefix", "re._compiler", "re._constants", "re._parser",
    "reprlib", "struct", "syslog", "token", "tokenize", "types", "warnings", "weakref",
}  # fmt: skip


def _imported(modules: str) -> set[str]:
    """The modules outside our package that importing ``modules`` loads, as the
    installed commands start (isolated, the same interpreter)."""
    code = (f"import sys\nbefore = set(sys.modules)\nimport {modules}\n"
            "print(' '.join(sorted(set(sys.modules) - before)))")  # fmt: skip
    done = subprocess.run([os.path.join(VENV, "bin", "python"), "-I", "-c", code],
                          capture_output=True, text=True, check=True, cwd="/")  # fmt: skip
    return {m for m in done.stdout.split() if not m.startswith("shifter_sshd")}


def test_shifter_starts_with_nothing_but_our_own_modules() -> None:
    assert _imported("shifter_sshd.commands.shifter") - SHIFTER == set()


def test_the_prolog_imports_no_more_than_it_did() -> None:
    loaded = _imported("shifter_sshd.commands.entry, shifter_sshd.lifecycle.prolog")
    assert loaded - PROLOG == set()
    assert "json" in loaded  # the check sees the prolog's imports at all
