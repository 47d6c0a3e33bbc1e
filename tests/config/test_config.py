"""udiRoot.conf: Shifter's format, every key, and a message for every mistake."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from support import CLI, REPO, TESTS

from shifter_sshd.config import udiroot as config
from shifter_sshd.errors import ShifterError

SHIFTER_SITE_FILE = """\
# a Shifter site's udiRoot.conf, as it is
imagePath=/images
udiMount=/var/udiMount
loopMount=/var/udiLoopMount
optUdiImage=/opt/shifter/udiImage
etcPath=/etc/shifter/shifter_etc_files
allowLocalChroot=0
autoLoadKernelModule=1
mountUdiRootWritable=1
maxGroupCount=31
modprobePath=/sbin/modprobe
insmodPath=/sbin/insmod
cpPath=/bin/cp
mvPath=/bin/mv
chmodPath=/bin/chmod
ddPath=/bin/dd
mkfsXfsPath=/sbin/mkfs.xfs
rootfsType=tmpfs
gatewayTimeout=30
kmodBasePath=/lib/modules
siteFs=/home:/home;\\
       /global:/global:rec
siteEnv=SHIFTER_RUNTIME=1 SITE=nersc
siteEnvAppend=PATH=/opt/site/bin
siteEnvPrepend=LD_LIBRARY_PATH=/opt/site/lib
siteEnvUnset=LOADEDMODULES
imageGateway=http://gateway:5000
system=testcluster
defaultImageType=docker
module_mpich_siteFs=/opt/cray:/opt/cray:ro
module_mpich_siteEnv=MPICH_DIR=/opt/cray
module_mpich_roothook=/etc/shifter/mpich.sh
"""


def test_shifter_site_file_parses_with_warnings() -> None:
    parsed = config.parse(SHIFTER_SITE_FILE, "site.conf")
    assert parsed.image_path == "/images"
    assert parsed.etc_path == "/etc/shifter/shifter_etc_files"
    assert parsed.site_fs == (
        config.SiteMount("/home", "/home"),
        config.SiteMount("/global", "/global", recursive=True),
    )
    assert parsed.site_env == (("SHIFTER_RUNTIME", "1"), ("SITE", "nersc"))
    assert parsed.site_env_unset == ("LOADEDMODULES",)
    assert parsed.system == "testcluster"
    mpich = parsed.module("mpich")
    assert mpich is not None
    assert mpich.site_fs == (config.SiteMount("/opt/cray", "/opt/cray", read_only=True),)
    assert mpich.site_env == (("MPICH_DIR", "/opt/cray"),)
    assert any("cpPath" in w for w in parsed.warnings)
    assert any("site.conf:8:" in w and "autoLoadKernelModule" in w for w in parsed.warnings)
    assert any("roothook" in w for w in parsed.warnings)


FIXTURES = TESTS / "fixtures" / "shifter"


def _render_example() -> str:
    """udiRoot.conf.example as Shifter's configure writes it (placeholders filled)."""
    values = {"ROOTFS_TYPE": "tmpfs", "PACKAGE_NAME": "shifter"}
    text = (FIXTURES / "udiRoot.conf.example.in").read_text()
    return re.sub(r"@([A-Z_]+)@", lambda m: values.get(m[1], "/usr/lib/shifter"), text)


def _render_cle6() -> str:
    """The CLE6 template with a compute node's variables from Shifter's vars/cluster.yaml."""
    import jinja2

    template = jinja2.Template((FIXTURES / "udiRoot.conf.j2").read_text())
    return str(template.render(
        shifterImagePath="/lus/peel/shifter/images", shifterRuntimePrefix="/usr",
        shifterOptUdiImagePath="/lus/peel/shifter/udiImage",
        shifterEtcPath="/local/shifter/etcFiles", shifterRootfsType="ramfs",
        shifterGateway="http://gateway:5000", shifterSystem="cluster",
        shifterPerNodeCachePath="/lus/peel/shifter/backingStore",
        shifterAllSiteFs=["/homes:/homes", "/lus/peel:/lus/peel",
                          "/var/opt/cray/dws:/var/opt/cray/dws:rec:slave",
                          "/var/opt/cray/alps:/var/opt/cray/alps:rec:slave",
                          "/var/run/munge:/var/run/munge",
                          "/etc/opt/cray/wlm_detect:/etc/opt/cray/wlm_detect"],
    ))  # fmt: skip


def _render_parser_test() -> str:
    text = (FIXTURES / "test_udiRoot.conf.in").read_text()
    return re.sub(r"@@@([A-Z_]+)@@@", lambda m: "tmpfs" if m[1] == "ROOTFSTYPE" else "/usr",
                  text)  # fmt: skip


@pytest.mark.parametrize("render", [_render_example, _render_cle6, _render_parser_test],
                         ids=["example", "cle6", "parser-test"])  # fmt: skip
def test_shifters_own_files_parse(render: Callable[[], str], tmp_path: Path) -> None:
    """Shifter's shipped example, its CLE6 template and its parser test file: no fatal
    error, and every key they set is either used or warned about with its reason."""
    text = render()
    assert "@" not in text.replace("SHIFTER_RUNTIME", "")  # every placeholder filled
    parsed = config.parse(text, "shifter.conf")
    used = {k for k in config.KEYS} | set(config.IGNORED_KEYS)
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip()
        if "=" in line and not line.lstrip().startswith("#") and not line.startswith(" "):
            assert key in used or key.startswith("module_"), key
    for key in config.IGNORED_KEYS:
        if re.search(rf"^{key}\s*=", text, re.M):
            assert any(f"{key} ignored: " in w for w in parsed.warnings), key
    path = tmp_path / "udiRoot.conf"
    path.write_text(text)
    _config_check(path)


def _config_check(path: Path) -> subprocess.CompletedProcess[str]:
    """``config check`` of a Shifter site's file: only its missing paths are errors."""
    done = subprocess.run([CLI, "config", "check", str(path)], capture_output=True, text=True)
    # Shifter's paths (/images, /etc/shifter/...) do not exist here: config check names
    # each of them, and nothing else is an error.
    errors = [line for line in done.stderr.splitlines() if ": warning: " not in line]
    assert done.returncode == (1 if errors else 0), done.stderr
    assert all(line.startswith("shifter-sshd: doctor: ") for line in errors), errors
    assert "udiMount" in done.stdout
    return done


def test_a_file_with_every_key() -> None:
    values = {"udiMount": "/var/udiMount", "loopMount": "/var/udiLoopMount",
              "rootfsType": "tmpfs", "defaultImageType": "docker",
              "mountPropagationStyle": "private", "system": "lab", "siteFs": "/home:/home",
              "siteEnv": "A=1", "siteEnvAppend": "PATH=/x", "siteEnvPrepend": "PATH=/y",
              "siteEnvUnset": "B", "usersToImport": "nobody", "defaultModules": "m",
              "killGrace": "3", "volumeTimeout": "5", "gpuInjection": "module",
              "gpuCdiDevice": "example.com/gpu=g{index}", "hostDevices": "fuse hfi1*",
              "defaultRegistry": "registry.example:5000",
              "registryMirrors": "docker.io=mirror.example:5000",
              "insecureRegistries": "localhost:5000",
              "sshdAllowTcpForwarding": "local"}  # fmt: skip
    lines = []
    for key, (field_name, _parser, _repeat) in config.KEYS.items():
        default = getattr(config.Config(), field_name)
        if key in values:
            lines.append(f"{key}={values[key]}")
        elif isinstance(default, bool):
            lines.append(f"{key}={int(default)}")
        elif isinstance(default, int | float):
            lines.append(f"{key}={default}")
        else:
            lines.append(f"{key}=/etc/shifter/{key}")
    lines += [f"{key}=x" for key in config.IGNORED_KEYS]
    lines += [f"module_m_{key}=" + ("/a:/a" if key == "siteFs" else "n" if key == "conflict"
              else "1" if key == "enabled" else "A=1" if key != "siteEnvUnset" else "A")
              for key in config.MODULE_KEYS]  # fmt: skip
    lines += ["module_n_enabled=1", "module_m_userhook=/x", "module_m_roothook=/x",
              "module_m_copyPath=/x"]  # fmt: skip
    parsed = config.parse("\n".join(lines) + "\n", "every.conf")
    assert parsed.system == "lab" and parsed.module("m") is not None
    assert parsed.sshd_allow_tcp_forwarding == "local"
    assert (parsed.gpu_injection, parsed.cdi_spec_dirs) == ("module", ("/etc/shifter/cdiSpecDirs",))
    assert parsed.host_devices == ("fuse", "hfi1*")
    assert parsed.registry_mirrors == (("docker.io", "mirror.example:5000"),)
    assert len([w for w in parsed.warnings if " ignored: " in w]) == len(config.IGNORED_KEYS) + 3


def test_defaults() -> None:
    parsed = config.parse("", "empty.conf")
    assert parsed.udi_mount == "/var/udiMount"
    assert parsed.enable_sshd is True
    assert parsed.sshd_port == 1204
    assert parsed.ssh_key_secret == "/etc/shifter/ssh_key_secret"
    assert parsed.etc_path is None
    assert parsed.max_group_count == 31


def test_repeatable_keys_accumulate() -> None:
    parsed = config.parse("siteFs=/a:/a\nsiteFs=/b:/b ; /c:/c:ro\n", "x")
    assert [m.dest for m in parsed.site_fs] == ["/a", "/b", "/c"]


def test_comments_only_at_line_start_as_shifter_reads_them() -> None:
    text = ("# a comment\n  # an indented one (Shifter would refuse it)\n"
            "siteEnv=URL=http://x/#frag NOTE=a#b\njust words\nsshdPort = 22\n")  # fmt: skip
    parsed = config.parse(text, "x")
    assert parsed.site_env == (("URL", "http://x/#frag"), ("NOTE", "a#b"))
    assert parsed.sshd_port == 22  # spaces around '=' as Shifter allows
    assert "x:4: line without '=' ignored: just words" in parsed.warnings


def test_continuations_as_shifter_joins_them() -> None:
    text = "siteEnv=A=1 \\\n# skipped inside\n  B=2\\\n\nsiteEnvUnset=C\n"
    parsed = config.parse(text, "x")
    assert parsed.site_env == (("A", "1"), ("B", "2"))  # a blank line ends it
    assert parsed.site_env_unset == ("C",)


def test_shifter_value_syntax() -> None:
    parsed = config.parse(
        "siteFs=/homes:/homes;\\\n    /var/opt/cray/alps:/var/opt/cray/alps:rec:slave;\\\n"
        "    /scratch;/ro:/ro:ro:REC;/cache:/cache:perNodeCache=size=10G,fs=xfs\n"
        "sshdPort=1204\nsshdPort=22\ndefaultImageType=id\nmountPropagationStyle=slave\n",
        "x",
    )  # fmt: skip
    assert parsed.site_fs == (
        config.SiteMount("/homes", "/homes"),
        config.SiteMount("/var/opt/cray/alps", "/var/opt/cray/alps", recursive=True,
                         extra=("slave",)),
        config.SiteMount("/scratch", "/scratch"),  # one path: the same path inside
        config.SiteMount("/ro", "/ro", read_only=True, recursive=True),
    )  # fmt: skip
    assert parsed.sshd_port == 22  # the last one counts, as in Shifter
    assert parsed.default_image_type == "id"
    warned = "\n".join(parsed.warnings)
    assert "x:5: sshdPort given again (first at line 4): the last one counts" in warned
    assert "perNodeCache volumes are not supported: /cache skipped" in warned
    assert "/var/opt/cray/alps: slave propagation not supported" in warned
    assert "mountPropagationStyle=slave" in warned


def test_module_keys_as_shifter_splits_them() -> None:
    parsed = config.parse(
        "module_mpich_siteEnv=MPICH=1\nmodule_mpich_conflict=openmpi\n"
        "module_openmpi_siteEnv=OMPI=1\nmodule_cray_mpich_userhook=/x\nmodule_x_frob=1\n",
        "x",
    )  # fmt: skip
    mpich = parsed.module("mpich")
    assert mpich is not None and mpich.conflicts == ("openmpi",)
    warned = "\n".join(parsed.warnings)
    assert "module names cannot hold '_' (Shifter reads module cray, key mpich)" in warned
    assert "unknown module key ignored" in warned and "module_x_frob" in warned


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("udiMont=/x\n", "bad.conf:1: unknown key (did you mean udiMount?): udiMont"),
        ("\n\nimagepath=/x\n", "bad.conf:3: unknown key (did you mean imagePath?): imagepath"),
        ("frobnicate=1\n", "bad.conf:1: unknown key: frobnicate"),
        ("udiMount=relative\n", "udiMount must be an absolute path: relative"),
        ("udiMount=/\n", "udiMount is too close to / to be used as a mount area: /"),
        ("udiMount=/var/a\nloopMount=/var/a\n", "udiMount and loopMount must differ: /var/a"),
        ("sshdPort=0\n", "bad.conf:1: sshdPort must be between 1 and 65535: 0"),
        ("sshdPort=22x\n", "sshdPort must be an integer: 22x"),
        ("maxGroupCount=-1\n", "maxGroupCount must be between 0 and 65536: -1"),
        ("enableSshd=maybe\n", "enableSshd must be 0 or 1: maybe"),
        ("mountUdiRootWritable=2\n", "mountUdiRootWritable must be 0 or 1: 2"),
        ("rootfsType=xfs\n", "rootfsType must be one of tmpfs, ramfs: xfs"),
        (
            "defaultImageType=oci\n",
            "defaultImageType must be one of docker, custom, local, id: oci",
        ),
        ("siteFs=/a:b\n", "siteFs: paths must be absolute: b"),
        ("siteFs=/a::ro\n", "siteFs: expected source:destination[:flags]: /a::ro"),
        (
            "siteFs=/a:/b:rw,nosuid\n",
            "siteFs: unknown flag (allowed: ro, rw, rec, slave, private, perNodeCache): nosuid",
        ),
        ("mountPropagationStyle=rslave\n", "mountPropagationStyle must be one of private, slave"),
        ("siteFs=/a/../etc:/b\n", "siteFs: paths may not contain '..': /a/../etc"),
        ("siteEnv=NOEQUALS\n", "siteEnv entries must be NAME=value: NOEQUALS"),
        ("siteEnv=1BAD=x\n", "siteEnv entries must be NAME=value: 1BAD=x"),
        ("siteEnvUnset=A-B\n", "siteEnvUnset entries must be variable names: A-B"),
        ("usersToImport=bad:name\n", "usersToImport has an invalid name: bad:name"),
        ("killGrace=forever\n", "killGrace must be a number of seconds: forever"),
        ("defaultModules=nosuch\n", "defaultModules names an undefined module: nosuch"),
        ("sshKeySecret=\n", "sshKeySecret must be an absolute path: "),
        ("system=two words\n", "system must be a single word: two words"),
    ],
)
def test_bad_config_is_named(text: str, message: str) -> None:
    with pytest.raises(ShifterError) as caught:
        config.parse(text, "bad.conf")
    assert message in str(caught.value)
    assert str(caught.value).startswith("shifter-sshd: ")


def test_continuation_keeps_the_first_line_number() -> None:
    with pytest.raises(ShifterError, match=r"bad.conf:2: siteFs: paths must be absolute"):
        config.parse("# c\nsiteFs=/a:/a;\\\n  /b:b\n", "bad.conf")


def test_config_check_cli(tmp_path: Path) -> None:
    path = tmp_path / "udiRoot.conf"
    path.write_text(SHIFTER_SITE_FILE)
    done = _config_check(path)
    assert "imagePath=/images\n" in done.stdout
    assert "siteFs=/home:/home /global:/global:rec\n" in done.stdout
    assert "siteEnv=SHIFTER_RUNTIME=1 SITE=nersc\n" in done.stdout
    assert "sshdPort=1204\n" in done.stdout
    assert "warning:" in done.stderr and "cpPath" in done.stderr
    reparsed = config.parse(done.stdout, "again")  # the output is itself a valid file
    assert reparsed.site_fs == config.parse(SHIFTER_SITE_FILE).site_fs


def test_config_path_resolution(tmp_path: Path) -> None:
    path = tmp_path / "env.conf"
    path.write_text("sshdPort=2222\n")
    env = {**os.environ, "SHIFTER_SSHD_CONFIG": str(path)}
    done = subprocess.run([CLI, "config", "check"], capture_output=True, text=True, env=env)
    assert "sshdPort=2222" in done.stdout
    env["SHIFTER_SSHD_CONFIG"] = str(tmp_path / "missing.conf")
    done = subprocess.run([CLI, "config", "check"], capture_output=True, text=True, env=env)
    assert done.returncode == 1
    assert f"shifter-sshd: config: file not found: {tmp_path}/missing.conf" in done.stderr
    done = subprocess.run([CLI, "--config", str(path), "config", "check"],
                          capture_output=True, text=True, env=env)  # fmt: skip
    assert "sshdPort=2222" in done.stdout


def test_every_key_is_documented() -> None:
    reference = (REPO / "docs" / "configuration.md").read_text()
    for key in list(config.KEYS) + [f"module_<name>_{k}" for k in config.MODULE_KEYS]:
        assert f"`{key}`" in reference, key


def test_our_own_example_parses_cleanly() -> None:
    """etc/udiRoot.conf.example, what admins start from: every key known, no warning."""
    example = REPO / "etc" / "udiRoot.conf.example"
    parsed = config.load(str(example))
    assert parsed.warnings == ()
    assert parsed.cdi_spec_dirs == ("/etc/cdi", "/var/run/cdi")
    assert parsed.default_registry == "docker.io"
