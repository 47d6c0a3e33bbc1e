"""Errors that say where, what and which value, and whose fault they are.

Slurm drains a node whose prolog or epilog exits non-zero, so every error carries
its kind: a user's mistake must never drain a node, a broken node must.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs shifter ~9 ms at each start; mypy knows this name
if TYPE_CHECKING:
    from typing import Final


class Kind:
    """Who has to act on an error; decides the prolog's and epilog's exit code.

    Plain string constants rather than an enum.Enum: ``shifter`` imports this module
    on every task start, and enum costs it 3.6 ms.
    """

    USER: Final = "user"  # the job's owner: bad image, bad volume; the node stays in service
    NODE: Final = "node"  # the node or its admin: cannot mount, broken config; drain it
    USAGE: Final = "usage"  # a command line given by hand


# Documented exit codes (docs/integration.md). The prolog and epilog use only
# EXIT_OK and EXIT_NODE, because anything else non-zero drains the node as well.
EXIT_OK = 0
EXIT_NODE = 1
EXIT_USAGE = 2
EXIT_USER = 3  # admin and user commands only (image lookup, shifter); never the prolog


class ShifterError(Exception):
    """An error printed as ``shifter-sshd: <where>: <what>: <value>``."""

    def __init__(self, where: str, what: str, value: object = None, kind: str = Kind.NODE):
        self.where = where
        self.what = what
        self.value = value
        self.kind = kind
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"shifter-sshd: {self.where}: {self.what}"
        if self.value is not None:
            text += f": {self.value}"
        return text

    @property
    def exit_code(self) -> int:
        return {Kind.USER: EXIT_USER, Kind.NODE: EXIT_NODE, Kind.USAGE: EXIT_USAGE}[self.kind]


def user_error(where: str, what: str, value: object = None) -> ShifterError:
    return ShifterError(where, what, value, Kind.USER)


def node_error(where: str, what: str, value: object = None) -> ShifterError:
    return ShifterError(where, what, value, Kind.NODE)


def usage_error(where: str, what: str, value: object = None) -> ShifterError:
    return ShifterError(where, what, value, Kind.USAGE)


def reason(err: OSError) -> str:
    """The error's plain meaning for a user's message: our syscall wrappers put the
    call's name in ``strerror``, which means nothing to the job's owner."""
    import os

    return os.strerror(err.errno) if err.errno else str(err)
