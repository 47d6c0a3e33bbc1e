"""``shifter-sshd prolog``: build this node's container for the job, step by step.

Exit status (docs/integration.md): 0 when the container is ready, when the job
asked for none, and when the user's request cannot be served (unknown image, bad
volume: logged, left in ``statePath/<job>.error`` for the SPANK plugin to show the
user); 1 only when the node itself is broken, because Slurm drains the node on any
non-zero prolog. A failed prolog undoes what it did before it exits.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import faults, log, users
from ..config.udiroot import Config, Module, SiteMount
from ..container import devfs, environment, etc, hostsfile, rootfs, volumes
from ..container.rootfs import Tree
from ..errors import EXIT_NODE, EXIT_OK, Kind, ShifterError, node_error, user_error
from ..gpu import plan as gpus
from ..image import store as image
from ..kernel import areas
from ..slurm import job as job_mod
from . import record, teardown
from .state import JobState, StateStore, new_state

TYPE_CHECKING = False  # importing typing costs every prolog ~3 ms; mypy knows this name
if TYPE_CHECKING:
    from ..ssh import keys


@dataclass
class Setup:
    """Everything the steps share; each step fills in what later steps need."""

    config: Config
    job: job_mod.Job
    store: StateStore
    state: JobState
    tree: Tree = field(default_factory=Tree)
    image: image.Record | None = None
    user: users.User | None = None
    volumes: list[SiteMount] = field(default_factory=list)
    modules: list[Module] = field(default_factory=list)
    allocation: list[tuple[str, int]] = field(default_factory=list)
    key_set: keys.NodeKeySet | None = None
    gpus: gpus.Plan | None = None  # the job's GPUs on this node, from CDI
    env: dict[str, str] = field(default_factory=dict)  # the container's environment
    exclusive: bool | None = None  # from slurm.query; None: not run by slurmd
    end_time: int | None = None
    job_env: dict[str, str] = field(default_factory=dict)
    job_dirs: list[int] = field(default_factory=list)  # udiMount/<job>, loopMount/<job>
    timings: list[tuple[str, float]] = field(default_factory=list)

    def close(self) -> None:
        self.tree.close()
        for fd in self.job_dirs:
            os.close(fd)
        self.job_dirs.clear()


def step_image(s: Setup) -> None:
    store = image.Store.from_config(s.config)
    if s.job.image_id:  # pinned at submission: run what was submitted
        s.image = store.get(s.job.image_id, name=s.job.image)
    else:
        s.image = store.lookup(s.job.image or "")
    s.state.image_id = s.image.id


def step_user(s: Setup) -> None:
    s.user = users.lookup(s.job.uid, s.job.user, s.config.max_group_count)
    s.state.user, s.state.uid = s.user.name, s.user.uid


def step_request(s: Setup) -> None:
    """Everything the user asked for is checked before anything is mounted."""
    s.volumes = volumes.parse_volumes(s.job.volumes, s.config.max_volumes)
    s.modules = environment.modules(s.config, s.job.modules)
    assert s.image is not None
    s.env = environment.container_env(s.config, s.image.metadata.env, s.modules)
    s.gpus = gpus.plan(s.config, s.job_env, s.job.modules)
    s.env.update(s.gpus.env if s.gpus else {})
    for name, value in s.env.items():
        if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in value):
            raise user_error("image", f"control character in the value of {name}", repr(value))
    job = s.job
    s.allocation = hostsfile.slots(job.node_list, job.cpus_per_node, job.node_name)
    _ask_slurm(s)


def _ask_slurm(s: Setup) -> None:
    """Tasks per node, end time and exclusivity: slurmctld knows, the environment not.

    One query for this job (``slurm.query``). When slurmctld cannot answer, the job
    fails (its error says why; the node stays in service): every node of a job works
    from the same facts or none.
    """
    if not s.job_env.get("SLURM_CONF"):
        log.debug("prolog: no SLURM_CONF (not run by slurmd?): using the job environment only")
        return
    from ..slurm import query as slurm

    try:
        details = slurm.query(s.job_env)
    except ShifterError as err:
        log.error(f"{err} (job {s.job.job_id})")
        raise user_error("slurm", "slurmctld could not tell this job's details; the job "
                         "cannot start (resubmit it)", err.value) from None  # fmt: skip
    s.exclusive, s.end_time = details.exclusive, details.end_time
    if details.tasks_per_node and len(details.tasks_per_node) == len(s.allocation):
        nodes = [node for node, _cpus in s.allocation]
        s.allocation = list(zip(nodes, details.tasks_per_node, strict=True))
    if s.exclusive is False:
        log.info(f"prolog: job {s.job.job_id} shares its nodes: no container sshd")


def step_leftovers(s: Setup) -> None:
    """A prolog run again for the same job (requeue, retry) starts from nothing, and
    containers of jobs that no longer run on this node go (``leftovers``)."""
    from . import leftovers

    slurm_conf = s.job_env.get("SLURM_CONF", "")
    dead = leftovers.dead(s.config, s.store, s.job.job_id, s.exclusive, slurm_conf)
    for job_id in [s.job.job_id, *dead]:
        root, _scratch = areas.job_dirs(s.config, job_id)
        if job_id != s.job.job_id:
            log.info(f"prolog: job {s.job.job_id}: job {job_id} no longer runs here: "
                     "removing its container")  # fmt: skip
        elif s.store.load(job_id) is None and not os.path.exists(root):
            continue
        else:
            log.info(f"prolog: job {job_id}: removing an earlier container of this job")
        if not teardown.teardown(s.config, s.store, job_id):
            raise node_error("prolog", "cannot remove an earlier container", root)


def step_mount_points(s: Setup) -> None:
    """The job's directories in the two root-owned areas, held by descriptor."""
    for area in (s.config.udi_mount, s.config.loop_mount):
        area_fd = areas.open_area(area)
        try:
            s.job_dirs.append(rootfs.job_dir(area_fd, s.job.job_id))
        finally:
            os.close(area_fd)
    s.store.save(s.state)


def step_scratch(s: Setup) -> None:
    s.state.scratch_mount_id = rootfs.mount_scratch(s.tree, s.job_dirs[1])
    s.store.save(s.state)


def step_root(s: Setup) -> None:
    assert s.user is not None
    s.state.root_mount_id = rootfs.mount_root(s.tree, s.config, s.job_dirs[0], s.user.uid)
    s.store.save(s.state)


def step_image_mount(s: Setup) -> None:
    assert s.image is not None
    s.state.loop_device = rootfs.mount_image(s.tree, s.image.path)
    s.store.save(s.state)


def step_image_tree(s: Setup) -> None:
    rootfs.bind_image_tree(s.tree, s.config.max_image_mounts)


def step_overlays(s: Setup) -> None:
    rootfs.mount_overlays(s.tree)


def step_etc(s: Setup) -> None:
    assert s.user is not None
    with s.tree.container() as container:
        shell = etc.login_shell(container, s.user)
    etc.populate(s.tree, s.config, s.user, shell)


def step_system(s: Setup) -> None:
    devices = devfs.host_devices(s.config.host_devices) + (s.gpus.nodes if s.gpus else [])
    rootfs.mount_system(s.tree, devices, s.gpus.dev_modes if s.gpus else {})


def step_gpus(s: Setup) -> None:
    if s.gpus:
        gpus.apply(s.tree, s.gpus)
        log.info(f"prolog: job {s.job.job_id}: GPUs {','.join(s.gpus.indexes)} in the container")


def step_udiimage(s: Setup) -> None:
    s.state.bundle = rootfs.mount_udiimage(s.tree, s.config)


def step_site_fs(s: Setup) -> None:
    site_fs = [*s.config.site_fs, *(m for module in s.modules for m in module.site_fs)]
    conf = s.job_env.get("SLURM_CONF", "")
    if conf:
        from ..slurm import conf as slurmconf

        site_fs += slurmconf.spool_mounts(conf, s.job.node_name)
    volumes.mount_site_fs(s.tree, site_fs)


def step_user_volumes(s: Setup) -> None:
    assert s.user is not None
    volumes.mount_user_volumes(s.tree, s.user, s.volumes, s.config.volume_timeout)


def step_hostsfile(s: Setup) -> None:
    hostsfile.write(s.tree.var, s.allocation)


def _sshd_wanted(s: Setup) -> bool:
    """Shifter's rule: only jobs that have their nodes to themselves get an sshd."""
    return s.config.enable_sshd and s.exclusive is not False


def step_ssh_keys(s: Setup) -> None:
    if _sshd_wanted(s):
        from ..slurm import conf as slurmconf
        from ..ssh import files as sshfiles

        assert s.user is not None
        slurmconf.check_containment(s.job_env.get("SLURM_CONF", ""),
                                    s.config.sshd_job_containment, s.job.job_id)  # fmt: skip
        s.key_set = sshfiles.derive(s.config, s.job, s.user, s.end_time)


def step_ssh_files(s: Setup) -> None:
    if s.key_set is None:
        return
    from ..ssh import files as sshfiles

    assert s.user is not None
    hosts = [node for node, _tasks in s.allocation]
    tasks = [count for _node, count in s.allocation]
    session_env = {**s.env, **environment.job_variables(s.job_env, tasks)}
    etc_dir = sshfiles.write_etc(s.tree, s.config, s.user, s.key_set, hosts, session_env)
    try:
        sshfiles.install(s.tree, etc_dir, s.user, s.key_set)
    finally:
        os.close(etc_dir)


def step_sshd(s: Setup) -> None:
    if s.key_set is None:
        return
    from ..kernel import processes
    from ..ssh import files as sshfiles
    from ..ssh import sshd

    assert s.user is not None
    sshd.free_port(s.config.sshd_port, s.exclusive is True, s.job.job_id)
    timeout = s.config.sshd_start_timeout  # one deadline for the exec and the banner
    until = time.monotonic() + timeout
    pid = sshd.start(s.tree.root, s.user, sshfiles.SSHD_LOG, timeout)
    s.state.sshd_pid, s.state.sshd_start_time = pid, processes.start_time(pid) or 0
    s.store.save(s.state)
    sshd.wait_ready(pid, s.config.sshd_port, s.tree.ssh, until - time.monotonic(), timeout)


def step_userns(s: Setup) -> None:
    """The user namespace every ``shifter`` of the job on this node joins (container/userns.py)."""
    from ..container import userns
    from ..kernel import userproc

    assert s.user is not None
    timeout = s.config.userns_timeout
    try:
        s.state.userns_pid, s.state.userns_start_time = userns.start(s.user, timeout)
    except userproc.Timeout:
        raise user_error("userns", f"the user namespace holder did not start within {timeout:g} "
                         "s (usernsTimeout): stopped or traced by the job's owner",
                         s.user.name) from None  # fmt: skip
    if not s.state.userns_pid:
        log.warning(f"prolog: job {s.job.job_id}: no user namespace for shifter (unprivileged "
                    "user namespaces are off?): shifter will go through the sshd")  # fmt: skip
    s.store.save(s.state)
    if s.config.sshd_job_containment and s.job_env.get("SLURM_CONF"):
        from . import jobstep

        jobstep.adopt_if_in_job(s.job.job_id, s.state)


def step_finish(s: Setup) -> None:
    rootfs.finish(s.tree, s.config)
    s.state.complete = True
    s.store.save(s.state)


def step_publish(s: Setup) -> None:
    """Tell the user's ``shifter`` command where the container is and what it holds."""
    assert s.image is not None and s.user is not None
    meta = s.image.metadata
    s.store.publish(s.job.job_id, record.fields(
        job_id=s.job.job_id, root=s.state.root, uid=s.user.uid,
        image=s.job.image or "", image_id=s.image.id,
        volumes=s.job.volumes, modules=list(s.job.modules), env=s.env,
        workdir=meta.workdir, entrypoint=meta.entrypoint, command=list(meta.command),
        sshd_port=s.config.sshd_port if s.key_set is not None else 0,
        userns=(s.state.userns_pid, s.state.userns_start_time),
    ), s.user.uid)  # fmt: skip


STEPS: list[tuple[str, Callable[[Setup], None]]] = [
    ("image", step_image),
    ("user", step_user),
    ("request", step_request),
    ("leftovers", step_leftovers),
    ("mount points", step_mount_points),
    ("scratch", step_scratch),
    ("root", step_root),
    ("image mount", step_image_mount),
    ("image tree", step_image_tree),
    ("overlays", step_overlays),
    ("etc", step_etc),
    ("system", step_system),
    ("gpus", step_gpus),
    ("udiImage", step_udiimage),
    ("siteFs", step_site_fs),
    ("user volumes", step_user_volumes),
    ("hostsfile", step_hostsfile),
    ("ssh keys", step_ssh_keys),
    ("ssh files", step_ssh_files),
    ("sshd", step_sshd),
    ("userns", step_userns),
    ("finish", step_finish),
    ("publish", step_publish),
]


def run_steps(s: Setup) -> None:
    """Each step in turn. An OSError no step turned into a user's error is the node's,
    except EBADF: a bug of ours (an internal error, which drains nothing if the
    rollback leaves the node clean)."""
    for name, step in STEPS:
        faults.inject(name)
        started = time.perf_counter()
        try:
            step(s)
        except OSError as err:
            if err.errno == 9:  # EBADF: our own descriptor bookkeeping, never the node's
                raise RuntimeError(f"step {name}: {err!r}") from err
            raise node_error("prolog", f"step {name} failed ({err.strerror})",
                             err.filename) from None  # fmt: skip
        s.timings.append((name, time.perf_counter() - started))


def build(config: Config, job: job_mod.Job, env: dict[str, str] | None = None) -> Setup:
    """Build the container; on any failure undo everything, then re-raise."""
    store = StateStore(config.state_path)
    root, scratch = areas.job_dirs(config, job.job_id)
    setup = Setup(config, job, store, new_state(job.job_id, root, scratch),
                  job_env=dict(env or {}))  # fmt: skip
    try:
        run_steps(setup)
    except BaseException:
        setup.close()
        if store.load(job.job_id) is not None and not teardown.teardown(config, store, job.job_id):
            log.error(f"prolog: job {job.job_id}: rollback left mounts behind")
            raise node_error("prolog", "rollback after a failure left mounts", root) from None
        raise
    setup.close()
    return setup


def main(config_path: str | None = None, env: dict[str, str] | None = None) -> int:
    from ..config import udiroot as config_mod

    os.environ.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")  # slurmd gives none
    environ = dict(os.environ) if env is None else env
    if not any(environ.get(f"SPANK_SHIFTER_{name}") for name in ("IMAGE", "IMAGE_ID")):
        return EXIT_OK  # not a container job: nothing to read, nothing to break
    try:
        config = config_mod.load(config_path)
        job = job_mod.from_env(environ)
    except ShifterError as err:
        log.error(str(err))
        return EXIT_NODE
    started = time.perf_counter()
    try:
        setup = build(config, job, environ)
    except ShifterError as err:
        return _failed(config, job, err)
    except Exception as err:  # a bug must not drain the node if rollback left it clean
        log.internal_error(f"shifter-sshd: prolog: job {job.job_id}: internal error: {err!r}")
        StateStore(config.state_path).write_error(job.job_id, f"internal error: {err!r}", job.uid)
        return EXIT_OK
    _report(setup, time.perf_counter() - started)
    return EXIT_OK


def _failed(config: Config, job: job_mod.Job, err: ShifterError) -> int:
    log.error(f"{err} (job {job.job_id})")
    if err.kind == Kind.USER:
        StateStore(config.state_path).write_error(job.job_id, str(err), job.uid)
        return EXIT_OK
    return EXIT_NODE


def _report(setup: Setup, total: float) -> None:
    log.info(f"prolog: job {setup.job.job_id}: container ready at {setup.state.root} "
             f"({total * 1000:.1f} ms)")  # fmt: skip
    if os.environ.get("SHIFTER_SSHD_TIMING"):
        for name, seconds in setup.timings:
            sys.stderr.write(f"timing {name} {seconds * 1000:.3f}\n")
