"""udiRoot.conf: Shifter's format, every key, and a message for every mistake."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from support import CLI

from shifter_sshd import config
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


def test_defaults() -> None:
    parsed = config.parse("", "empty.conf")
    assert parsed.udi_mount == "/var/udiMount"
    assert parsed.enable_sshd is True
    assert parsed.sshd_port == 1204
    assert parsed.ssh_key_secret == "/etc/shifter/ssh_key_secret"
    assert parsed.etc_path is None
    assert parsed.max_group_count == 31


def test_repeatable_keys_accumulate_and_comments_go() -> None:
    parsed = config.parse("siteFs=/a:/a # first\nsiteFs=/b:/b ; /c:/c:ro\n", "x")
    assert [m.dest for m in parsed.site_fs] == ["/a", "/b", "/c"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("udiMont=/x\n", "bad.conf:1: unknown key (did you mean udiMount?): udiMont"),
        ("\n\nimagepath=/x\n", "bad.conf:3: unknown key (did you mean imagePath?): imagepath"),
        ("frobnicate=1\n", "bad.conf:1: unknown key: frobnicate"),
        ("just words\n", "bad.conf:1: expected key=value: just words"),
        ("udiMount=relative\n", "udiMount must be an absolute path: relative"),
        ("udiMount=/\n", "udiMount is too close to / to be used as a mount area: /"),
        ("udiMount=/var/a\nloopMount=/var/a\n", "udiMount and loopMount must differ: /var/a"),
        ("sshdPort=0\n", "bad.conf:1: sshdPort must be between 1 and 65535: 0"),
        ("sshdPort=22x\n", "sshdPort must be an integer: 22x"),
        ("maxGroupCount=-1\n", "maxGroupCount must be between 0 and 65536: -1"),
        ("enableSshd=maybe\n", "enableSshd must be 0 or 1: maybe"),
        ("mountUdiRootWritable=2\n", "mountUdiRootWritable must be 0 or 1: 2"),
        ("rootfsType=xfs\n", "rootfsType must be one of tmpfs, ramfs: xfs"),
        ("defaultImageType=oci\n", "defaultImageType must be one of docker, custom, local: oci"),
        ("siteFs=/a\n", "siteFs: expected source:destination[:flags]: /a"),
        ("siteFs=/a:b\n", "siteFs: paths must be absolute: b"),
        ("siteFs=/a:/b:rw,nosuid\n", "siteFs: unknown flag (allowed: ro, rw, rec): nosuid"),
        ("siteFs=/a/../etc:/b\n", "siteFs: paths may not contain '..': /a/../etc"),
        ("siteEnv=NOEQUALS\n", "siteEnv entries must be NAME=value: NOEQUALS"),
        ("siteEnv=1BAD=x\n", "siteEnv entries must be NAME=value: 1BAD=x"),
        ("siteEnvUnset=A-B\n", "siteEnvUnset entries must be variable names: A-B"),
        ("usersToImport=bad:name\n", "usersToImport has an invalid name: bad:name"),
        ("sshdPort=1204\nsshdPort=22\n", "bad.conf:2: sshdPort given twice (first at line 1): 22"),
        ("killGrace=forever\n", "killGrace must be a number of seconds: forever"),
        (
            "module_x_frob=1\n",
            "unknown module key (known: enabled, siteEnv, siteEnvAppend, "
            "siteEnvPrepend, siteEnvUnset, siteFs): frob",
        ),
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
    done = subprocess.run([CLI, "config", "check", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
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
    reference = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    for key in list(config.KEYS) + [f"module_<name>_{k}" for k in config.MODULE_KEYS]:
        assert f"`{key}`" in reference, key
