"""``shifter [--image=NAME] [--volume=SPEC] CMD [ARGS...]``: run CMD in this job's container.

The prolog has already built the job's container root on this node and published
``<statePath>/<job>.container``; ``shifter`` only enters it, as the calling user and
without any privilege (it is not setuid): a new user namespace that maps the
caller's own uid and gid onto themselves, ``chroot`` into the root (the namespace
grants CAP_SYS_CHROOT, and every capability vanishes at ``execve`` because the uid
is not 0 there), then ``execve``. Where a site disables unprivileged user
namespaces it says so on stderr and enters through the job's sshd on this node.

Inside, CMD sees the same uid and gid. ``/proc/self/setgroups`` must be ``deny`` in
an unprivileged namespace, so ``id`` shows supplementary groups and files of unmapped
owners (root) as ``nogroup``/``nobody``; the kernel still checks access with the
real credentials, so group permissions work exactly as on the host.

Working directory: the caller's (``$PWD`` or ``getcwd``) when that path exists
inside the container, else the image's workdir, else ``$HOME``, else ``/``.
Environment: the container's (image, site, modules, as the job's ssh sessions
get it) plus the job's variables from the caller: ``SLURM_*``, ``SLURMD_*``,
``SHIFTER_*`` (the container's own ``SHIFTER_*`` win), ``PMI_*``, ``PMIX_*``,
``TERM``, ``USER``, ``LOGNAME``, ``HOME``, ``LANG``, ``LC_*``; not ``DISPLAY``.
CMD is looked up with the container's ``PATH`` inside the container.

Script interpreter (the kernel passes everything after the interpreter as ONE
argument, and GNU env 9.1 does not split it without ``-S``):

- ``#!/usr/bin/env -S shifter /bin/bash`` works (shifter on PATH);
- ``#!/opt/shifter-sshd/venv/bin/shifter /bin/bash`` works (absolute path; extra
  words such as ``--image=X /bin/bash -e`` are split by shifter, which checks the
  script's own first line to be sure the kernel joined them);
- ``#!/usr/bin/env shifter /bin/bash`` cannot work: env looks for a program named
  ``shifter /bin/bash`` and fails before shifter runs.

A script that is not visible at the same path inside the container is handed over
as ``/proc/self/fd/N`` (through the sshd: copied into the container's /tmp and
unlinked once opened).

``shifter --ssh-config=DIR [--jobid=N] [--proxy-jump=HOST]`` runs no command: it
writes what an ssh client on a login node or an IDE needs to reach this job's
container on each of its nodes (commands/outside.py), and prints the nodes.

Exit status: CMD's own; 1 when shifter itself fails (usage, no job, no container,
another user's job, a mismatched ``--image``/``--volume``, no way in); 126 when CMD
exists but cannot be executed; 127 when CMD is not found in the image. Through
the sshd fallback, 255 means ssh itself failed.
"""

from __future__ import annotations

import os
import sys

from ..errors import ShifterError
from ..lifecycle import record
from ..lifecycle.record import Container

# typing costs ~9 ms to import, a third of shifter's start; mypy knows this name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

EXIT_ERROR = 1
NO_JOB = "no Slurm job here (SLURM_JOB_ID is not set); run shifter inside an allocation"
JOB_PREFIXES = ("SLURM_", "SLURMD_", "SHIFTER_", "PMI_", "PMIX_", "LC_")
JOB_NAMES = frozenset({"TERM", "USER", "LOGNAME", "HOME", "LANG"})
USAGE = (
    "usage: shifter [--image=NAME] [--volume=SPEC] [--module=NAMES] [--] CMD [ARGS...]\n"
    "       shifter --ssh-config=DIR [--jobid=N] [--proxy-jump=HOST]\n"
)


# --- the command line -----------------------------------------------------------------


def split_shebang(args: list[str]) -> list[str]:
    """Undo the kernel's joining of ``#!/path/shifter --image=X /bin/bash``'s words.

    Only when the next argument is a script whose first line is exactly that
    shebang: an argument with spaces typed on purpose is left alone.
    """
    if len(args) < 2 or not any(c.isspace() for c in args[0]):
        return args
    from .enter import first_line  # the script's first line: only for a joined shebang

    line = first_line(args[1])
    words = line[2:].strip().split(None, 1) if line.startswith("#!") else []
    if len(words) == 2 and words[1].strip() == args[0].strip():
        return [*args[0].split(), *args[1:]]
    return args


def parse_args(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """Options before CMD; everything from CMD on belongs to CMD."""
    options: dict[str, str] = {}
    index = 0
    while index < len(args) and args[index].startswith("-"):
        arg = args[index]
        index += 1
        if arg == "--":
            break
        if arg in ("-h", "--help"):
            sys.stdout.write(USAGE + (__doc__ or ""))
            raise SystemExit(0)
        name, sep, value = arg.partition("=")
        if name not in ("--image", "--volume", "--module", "--ssh-config", "--jobid",
                        "--proxy-jump"):  # fmt: skip
            raise ShifterError("usage", "unknown option", arg)
        if not sep:
            if index >= len(args):
                raise ShifterError("usage", "option needs a value", name)
            value, index = args[index], index + 1
        options[name[2:]] = value
    return options, args[index:]


# --- the job and its container --------------------------------------------------------


def state_path(config_path: str) -> str:
    """statePath from udiRoot.conf, the one key shifter needs (config/quick.py says why)."""
    from ..config import quick as quickconf

    text = quickconf.read_text(config_path)
    found = None if text is None else quickconf.values(text, ("statePath",))
    state = None if found is None else quickconf.path_value(found, "statePath")
    if state is None:
        from ..config import udiroot as config

        return config.load(config_path).state_path
    return state


def load_container(environ: Mapping[str, str]) -> Container:
    """This job's published container, or the reason there is none."""
    job_id = environ.get("SLURM_JOB_ID", "")
    if not job_id:
        raise ShifterError(NO_JOB, "salloc/sbatch --image=...")
    if not job_id.isdigit():
        raise ShifterError("job", "malformed SLURM_JOB_ID", job_id)
    directory = state_path(environ.get("SHIFTER_SSHD_CONFIG") or "/etc/shifter/udiRoot.conf")
    return record.load(directory, job_id)


def check_request(container: Container, options: dict[str, str], uid: int) -> None:
    """The container is the caller's, and is what they asked for."""
    if container.uid != uid:
        raise ShifterError(f"job {container.job_id}", f"the container belongs to uid "
                           f"{container.uid}, not to you", uid)  # fmt: skip
    image = options.get("image")
    if image is not None and image not in _image_names(container):
        raise ShifterError("--image", f"this job's image is {container.label}; another "
                           "image needs its own job (for now)", image)  # fmt: skip
    volume = options.get("volume")
    if volume is not None and _volumes(volume) != _volumes(container.volumes):
        raise ShifterError("--volume", f"this job's volumes are '{container.volumes}'; "
                           "others need their own job (for now)", volume)  # fmt: skip
    module = options.get("module")
    if module is not None and set(module_names(module)) != set(container.modules):
        raise ShifterError("--module", f"this job's modules are "
                           f"'{','.join(container.modules)}'; others need their own job "
                           "(for now)", module)  # fmt: skip


def module_names(text: str) -> tuple[str, ...]:
    """``--module=a,b`` or ``--module='a b'``: the names, as the SPANK option takes them."""
    return tuple(text.replace(",", " ").split())


def _image_names(container: Container) -> set[str]:
    """Every way of naming the job's image: name, name without its type, id."""
    names = {container.image, container.image_id}
    kind, sep, rest = container.image.partition(":")
    if sep and kind in ("docker", "custom", "local"):
        names.add(rest)
    return {name for name in names if name}


def _volumes(text: str) -> list[tuple[str, ...]]:
    """A --volume value in a form where spelling differences do not matter."""
    specs = [s.strip() for s in text.split(";") if s.strip()]
    return sorted(tuple(os.path.normpath(p) if p.startswith("/") else p
                        for p in spec.split(":")) for spec in specs)  # fmt: skip


def job_environment(container_env: Mapping[str, str], caller: Mapping[str, str]) -> dict[str, str]:
    """The container's environment plus the job's variables, so MPI sees the job."""
    env = dict(container_env)
    for name, value in caller.items():
        wanted = name in JOB_NAMES or name.startswith(JOB_PREFIXES)
        if wanted and not (name.startswith("SHIFTER_") and name in container_env):
            env[name] = value
    return env


def main(argv: list[str] | None = None) -> int:
    """The console script: print errors as ``shifter: where: what: value``."""
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except ShifterError as err:
        sys.stderr.write(f"shifter: {str(err).removeprefix('shifter-sshd: ')}\n")
        return EXIT_ERROR
    except OSError as err:  # something this module did not foresee; still no traceback
        sys.stderr.write(f"shifter: {err}\n")
        return EXIT_ERROR


def run(args: list[str]) -> int:
    options, command = parse_args(split_shebang(args))
    if "ssh-config" in options or "jobid" in options or "proxy-jump" in options:
        return ssh_config(options, command)
    if "image" in options and not os.environ.get("SLURM_JOB_ID"):
        return standalone(options, command)
    try:
        container = load_container(os.environ)
    except record.NoContainer:
        if "image" not in options:
            raise
        return standalone(options, command)  # a job that asked for no container
    check_request(container, options, os.getuid())
    if not command:  # the image's own command, as Shifter's --entrypoint
        if not container.command:
            raise ShifterError("usage", "no command given, and the image has none",
                               USAGE.splitlines()[0])  # fmt: skip
        command = list(container.command)
    from . import enter

    plan = enter.plan(container, command, job_environment(container.env, os.environ))
    return enter.enter(plan, force_ssh=os.environ.get(enter.FORCE_SSH) == "1")


def ssh_config(options: dict[str, str], command: list[str]) -> int:
    """``--ssh-config DIR``: the job's ssh material and a config for it, then the hosts
    (one per line on stdout; commands/outside.py says what and why)."""
    directory = options.get("ssh-config")
    if directory is None or command or {"image", "volume", "module"} & options.keys():
        raise ShifterError("usage", "--jobid and --proxy-jump go with --ssh-config=DIR, "
                           "alone", USAGE.splitlines()[1].strip())  # fmt: skip
    environ = dict(os.environ)
    if "jobid" in options:
        environ["SLURM_JOB_ID"] = options["jobid"]
    container = load_container(environ)
    check_request(container, {}, os.getuid())  # the caller's job, as for a command
    import pwd

    from . import outside

    user = pwd.getpwuid(os.getuid()).pw_name
    material = outside.gather(container, user, options.get("proxy-jump"))
    hosts = outside.write(material, directory)
    config = os.path.join(os.path.abspath(directory), "config")
    sys.stderr.write(f"shifter: job {container.job_id}: wrote {config} (valid until the job "
                     f"ends): ssh -F {config} {hosts[0]}\n")  # fmt: skip
    sys.stdout.write("".join(f"{host}\n" for host in hosts))
    return 0


def standalone(options: dict[str, str], command: list[str]) -> int:
    """``--image`` with no job, or in a job without a container: one of the caller's
    own, without root (lifecycle/standalone.py), with the job path's environment rule.

    It ends with ``os._exit``: nothing of ours needs finalizing (every mount goes with
    our namespaces), and the interpreter's teardown is a tenth of the whole start."""
    from ..config import udiroot as config
    from ..lifecycle import standalone as own

    site = config.load(os.environ.get("SHIFTER_SSHD_CONFIG") or "/etc/shifter/udiRoot.conf")
    request = own.prepare(site, options["image"], options.get("volume", ""),
                          module_names(options.get("module", "")), command, os.environ)  # fmt: skip
    code = own.run(request, job_environment(request.env, os.environ))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
