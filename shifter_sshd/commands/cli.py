"""``shifter-sshd``: the admin and workload-manager command.

Each subcommand imports its module only when it runs: the prolog and epilog are on
every job's start path and must not pay for the image store or the key code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..errors import EXIT_NODE, EXIT_OK, EXIT_USAGE, ShifterError

if TYPE_CHECKING:
    from ..config.udiroot import Config

Handler = Callable[[argparse.Namespace], int]


def _config(args: argparse.Namespace) -> Config:
    from .. import log
    from ..config import udiroot as config

    loaded = config.load(args.config)
    for warning in loaded.warnings:
        log.warning(warning)
    return loaded


def cmd_config_check(args: argparse.Namespace) -> int:
    """Parse, print the effective configuration, and check every path it names."""
    from ..config import udiroot as config
    from ..ops import doctor

    loaded = _config(argparse.Namespace(config=args.path or args.config))
    sys.stdout.write(config.describe(loaded))
    problems = [f for f in doctor.config_paths(loaded) if f.problem]
    if problems:
        sys.stderr.write(doctor.report(problems, as_json=False) + "\n")
        return EXIT_NODE
    return EXIT_OK


def _slurm_conf(given: str | None) -> str:
    """slurm.conf for doctor and status: given, else $SLURM_CONF, else Slurm's default."""
    import os

    for path in (given, os.environ.get("SLURM_CONF"), "/etc/slurm/slurm.conf"):
        if path and (given or os.path.exists(path)):
            return path
    return ""


def cmd_doctor(args: argparse.Namespace) -> int:
    from ..config import udiroot as config_mod
    from ..ops import doctor
    from ..ops.findings import Finding

    try:
        loaded = config_mod.load(args.config)
    except ShifterError as err:
        found = [Finding("config", str(err).removeprefix("shifter-sshd: "), True)]
    else:
        found = doctor.run(loaded, _slurm_conf(args.slurm_conf) or None)
    print(doctor.report(found, args.json))
    return EXIT_NODE if any(f.problem for f in found) else EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from ..ops import status

    print(status.report(status.containers(_config(args), _slurm_conf(args.slurm_conf)),
                        args.json))  # fmt: skip
    return EXIT_OK


def cmd_image_import(args: argparse.Namespace) -> int:
    from ..image import store as image

    config = _config(args)
    store = image.Store.from_config(config)
    meta = image.parse_metadata_args(args.env, args.entrypoint, args.workdir)
    from ..image import oci

    if oci.is_image_archive(args.source):  # OCI layout, docker save: its own config
        from ..image import pull

        record = pull.import_archive(config, args.source, args.name, meta)
    else:
        record = store.import_image(args.source, args.name, meta)
    print(record.id)
    return EXIT_OK


def cmd_image_list(args: argparse.Namespace) -> int:
    from ..image import store as image

    store = image.Store.from_config(_config(args))
    for name, record in store.list():
        print(f"{name}\t{record.id}\t{record.size}\t{record.created}")
        if args.long:
            meta = record.metadata
            details = {"digest": record.digest, "workdir": meta.workdir or "",
                       "command": " ".join(meta.command) or meta.entrypoint or "",
                       "user": meta.user or ""}  # fmt: skip
            for key, value in [*details.items(), *(("label " + k, v) for k, v in meta.labels)]:
                if value:
                    print(f"    {key}: {value}")
    return EXIT_OK


def cmd_image_pull(args: argparse.Namespace) -> int:
    from ..image import pull

    record, downloaded = pull.pull(_config(args), args.name)
    if not downloaded:
        print(f"{args.name}: up to date", file=sys.stderr)
    print(record.id)
    return EXIT_OK


def cmd_image_gc(args: argparse.Namespace) -> int:
    from ..image import store as image
    from ..lifecycle.state import StateStore

    config = _config(args)
    store = StateStore(config.state_path)
    in_use = {s.image_id for job in store.job_ids() if (s := store.load(job)) and s.image_id}
    for image_id in image.Store.from_config(config).gc(in_use):
        print(f"removed {image_id}")
    return EXIT_OK


def cmd_image_lookup(args: argparse.Namespace) -> int:
    from ..image import store as image

    store = image.Store.from_config(_config(args))
    print(store.lookup(args.name).id)
    return EXIT_OK


def cmd_request(args: argparse.Namespace) -> int:
    """What the SPANK plugin runs at submission: the prolog's own checks, then the id."""
    from ..container import environment, volumes
    from ..image import store as image

    config = _config(args)
    try:
        record = image.Store.from_config(config).lookup(args.image)
    except ShifterError as err:  # the user typed --image: say so
        raise ShifterError("--image", err.what, err.value, err.kind) from None
    volumes.parse_volumes(args.volume or "", config.max_volumes)
    environment.modules(config, [m for m in (args.module or "").replace(",", " ").split() if m])
    print(record.id)
    return EXIT_OK


def cmd_image_remove(args: argparse.Namespace) -> int:
    from ..image import store as image

    store = image.Store.from_config(_config(args))
    store.remove(args.name)
    return EXIT_OK


def cmd_prolog(args: argparse.Namespace) -> int:
    from ..lifecycle import prolog

    return prolog.main(args.config)


def cmd_epilog(args: argparse.Namespace) -> int:
    from ..lifecycle import epilog

    return epilog.main(args.config)


def cmd_adopt(args: argparse.Namespace) -> int:
    """The SPANK plugin, in the job's extern step: put the job's processes into it."""
    from .. import log
    from ..lifecycle import jobstep
    from ..lifecycle.state import StateStore
    from ..slurm import stepd as slurmstepd

    if not args.job.isdigit():
        raise ShifterError("adopt", "malformed job id", args.job, "usage")
    config = _config(args)
    store = StateStore(config.state_path)
    state = store.load(args.job)
    if state is None or not config.sshd_job_containment:
        return EXIT_OK  # no container here: nothing to adopt
    try:
        jobstep.adopt(args.job, state)
    except slurmstepd.StepdError as err:
        message = f"shifter-sshd: adopt: job {args.job}: cannot put the sshd into the job: {err}"
        log.error(message)
        store.write_error(args.job, message, state.uid)  # the job's tasks say it too
        return EXIT_NODE
    return EXIT_OK


def cmd_udiimage_build(args: argparse.Namespace) -> int:
    from ..config.udiroot import Config
    from ..lifecycle.state import StateStore
    from ..ssh import bundle as udiimage

    try:
        config = _config(args)
    except ShifterError:
        if not args.dest:
            raise
        config = Config()  # building somewhere given, before udiRoot.conf exists
    dest = args.dest or config.opt_udi_image
    store = StateStore(config.state_path)
    in_use = [s.bundle for job in store.job_ids() if (s := store.load(job)) and s.bundle]
    version = udiimage.build(dest, in_use)
    print(f"{dest} -> {version}")
    return EXIT_OK


def cmd_secret_init(args: argparse.Namespace) -> int:
    from ..ssh import keys

    path = args.path or _config(args).ssh_key_secret
    keys.init_secret(path, force=args.force)
    print(path)
    return EXIT_OK


def cmd_spank_build(args: argparse.Namespace) -> int:
    from ..slurm import spank

    output = spank.build(args.output, args.include or spank.INCLUDE)
    print(output)
    return EXIT_OK


def cmd_cdi_generate(args: argparse.Namespace) -> int:
    from ..gpu import cdigen

    text = cdigen.render(cdigen.generate(kind=args.kind), args.format)
    if not args.output:
        sys.stdout.write(text)
        return EXIT_OK
    directory, name = os.path.split(os.path.abspath(args.output))
    partial = os.path.join(directory, f".{name}.partial")
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(partial, 0o644)
    os.replace(partial, args.output)  # CDI readers never see half a spec
    print(args.output)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shifter-sshd", description=__doc__)
    parser.add_argument("--config", help="udiRoot.conf (default: $SHIFTER_SSHD_CONFIG, "
                        "else /etc/shifter/udiRoot.conf)")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)

    cfg = sub.add_parser("config", help="udiRoot.conf").add_subparsers(dest="sub", required=True)
    check = cfg.add_parser("check", help="validate, print the effective configuration, and "
                           "check the paths it names")  # fmt: skip
    check.add_argument("path", nargs="?")
    check.set_defaults(func=cmd_config_check)

    doc = sub.add_parser("doctor", help="check this node: config, paths, kernel, bundle, port, "
                         "installation, slurm.conf")  # fmt: skip
    doc.add_argument("--slurm-conf", default=None, help="default: $SLURM_CONF, else "
                     "/etc/slurm/slurm.conf if it exists")  # fmt: skip
    doc.add_argument("--json", action="store_true")
    doc.set_defaults(func=cmd_doctor)
    sta = sub.add_parser("status", help="the containers on this node")
    sta.add_argument("--slurm-conf", default=None)
    sta.add_argument("--json", action="store_true")
    sta.set_defaults(func=cmd_status)

    img = sub.add_parser("image", help="the image store").add_subparsers(dest="sub", required=True)
    imp = img.add_parser("import", help="import a directory, tar archive, squashfs file, OCI "
                         "layout or docker save archive")  # fmt: skip
    imp.add_argument("source")
    imp.add_argument("name", help="type:tag, e.g. docker:ubuntu:22.04")
    imp.add_argument("--env", action="append", default=[], help="NAME=value (repeatable)")
    imp.add_argument("--entrypoint", default=None)
    imp.add_argument("--workdir", default=None)
    imp.set_defaults(func=cmd_image_import)
    lst = img.add_parser("list", help="list images")
    lst.add_argument("--long", action="store_true", help="digest, workdir, command, user, labels")
    lst.set_defaults(func=cmd_image_list)
    pul = img.add_parser("pull", help="pull an image from a registry (docker:NAME[:TAG])")
    pul.add_argument("name")
    pul.set_defaults(func=cmd_image_pull)
    img.add_parser("gc", help="remove image data no name and no container here uses"
                   ).set_defaults(func=cmd_image_gc)  # fmt: skip
    look = img.add_parser("lookup", help="print an image's id")
    look.add_argument("name")
    look.set_defaults(func=cmd_image_lookup)
    rem = img.add_parser("remove", help="remove an image name (and its data if unused)")
    rem.add_argument("name")
    rem.set_defaults(func=cmd_image_remove)

    req = sub.add_parser("request", help="check a job's --image/--volume/--module as the "
                         "prolog will (the SPANK plugin runs this at submission)")  # fmt: skip
    req.add_argument("--image", required=True)
    req.add_argument("--volume", default=None)
    req.add_argument("--module", default=None)
    req.set_defaults(func=cmd_request)

    ado = sub.add_parser("adopt", help="put a job's sshd into its extern step (the SPANK "
                         "plugin runs this in the extern step)")  # fmt: skip
    ado.add_argument("job")
    ado.set_defaults(func=cmd_adopt)

    sub.add_parser("prolog", help="Slurm Prolog: build this node's container for the job"
                   ).set_defaults(func=cmd_prolog)  # fmt: skip
    sub.add_parser("epilog", help="Slurm Epilog: tear this node's container down"
                   ).set_defaults(func=cmd_epilog)  # fmt: skip

    udi = sub.add_parser("udiimage", help="the OpenSSH bundle").add_subparsers(
        dest="sub", required=True
    )
    bld = udi.add_parser("build", help="build the relocatable OpenSSH bundle")
    bld.add_argument("--dest", default=None, help="default: optUdiImage")
    bld.set_defaults(func=cmd_udiimage_build)

    sec = sub.add_parser("secret", help="the site secret").add_subparsers(dest="sub", required=True)
    ini = sec.add_parser("init", help="write a new site secret at sshKeySecret")
    ini.add_argument("--path", default=None)
    ini.add_argument("--force", action="store_true", help="replace an existing secret")
    ini.set_defaults(func=cmd_secret_init)

    cdi = sub.add_parser("cdi", help="CDI specs for GPUs").add_subparsers(dest="sub", required=True)
    gen = cdi.add_parser("generate", help="a CDI spec from this node's NVIDIA driver (for "
                         "sites without nvidia-ctk)")  # fmt: skip
    gen.add_argument("--output", default=None, help="e.g. /etc/cdi/nvidia.yaml (default: stdout)")
    gen.add_argument("--format", choices=("yaml", "json"), default="yaml")
    gen.add_argument("--kind", default="nvidia.com/gpu")
    gen.set_defaults(func=cmd_cdi_generate)

    spk = sub.add_parser("spank", help="the SPANK plugin").add_subparsers(dest="sub", required=True)
    sbl = spk.add_parser("build", help="compile the SPANK plugin against Slurm's headers")
    sbl.add_argument("--output", default=None)
    sbl.add_argument("--include", default=None, help="the directory holding slurm/spank.h "
                     "of the Slurm it will run under (default /usr/include)")  # fmt: skip
    sbl.set_defaults(func=cmd_spank_build)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Handler = args.func
    try:
        return func(args)
    except ShifterError as err:
        from .. import log

        log.error(str(err))
        return err.exit_code
    except KeyboardInterrupt:
        return EXIT_USAGE
    except BrokenPipeError:
        return EXIT_NODE


if __name__ == "__main__":
    sys.exit(main())
