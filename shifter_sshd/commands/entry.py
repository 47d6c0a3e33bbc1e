"""The commands slurm.conf runs: ``shifter-sshd-prolog`` and ``shifter-sshd-epilog``.

The same as ``shifter-sshd prolog|epilog``, without argparse's import cost on every
job's start path; slurm.conf's Prolog= and Epilog= take a program without arguments,
so a site points them at a two-line script running these with ``--config``.
"""

from __future__ import annotations

import os
import sys

from ..errors import EXIT_NODE, EXIT_OK

TYPE_CHECKING = False  # collections.abc's import costs the epilog ~0.7 ms
if TYPE_CHECKING:
    from collections.abc import Callable


def _run(name: str, main: Callable[[str | None], int], doc: str | None) -> int:
    args = sys.argv[1:]
    if args and args[0] in ("-h", "--help"):
        sys.stdout.write(doc or "")
        return EXIT_OK
    if len(args) == 2 and args[0] == "--config":
        return main(args[1])
    if args:
        sys.stderr.write(f"usage: shifter-sshd-{name} [--config PATH]\n")
        return EXIT_NODE
    return main(None)


def _exit(code: int) -> int:
    """End the process at once: the interpreter's own teardown (freeing every module,
    1.3 ms of a 10 ms epilog) serves nothing here. Nothing registers atexit work."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def prolog() -> int:
    from ..lifecycle import prolog as module

    return _exit(_run("prolog", module.main, module.__doc__))


def epilog() -> int:
    from ..lifecycle import epilog as module

    return _exit(_run("epilog", module.main, module.__doc__))
