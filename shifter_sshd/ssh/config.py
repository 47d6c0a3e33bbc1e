"""sshd_config, ssh_config and known_hosts for one job's container, from jinja2 templates.

The templates live in the repository's ``udiImage/`` directory, and
``udiimage.build`` copies them into every bundle at ``<bundle>/share/templates``.
Rendering looks in the bundle given (the host path of the udiImage, so the prolog
renders with the templates that were built together with the binaries) and falls
back to the source directory: the checkout's ``udiImage/`` or, for an installed
package, ``<sys.prefix>/share/shifter-sshd/udiImage``. One rule, no copies kept in
the Python package.

Autoescape is off (this is not HTML), so every value is validated in Python before
it reaches a template: nothing can carry a newline, a quote or a space that would
start a new directive or smuggle in an extra argument. ``SetEnv`` values are the
only free text and are quoted the way sshd's ``argv_split`` reads them.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from ..errors import node_error

# Where the bundle is inside every container, and the per-job etc bound over its etc/.
UDI = "/opt/udiImage"
ETC = f"{UDI}/etc"
SSHD_CONFIG = f"{ETC}/sshd_config"
SSH_CONFIG = f"{ETC}/ssh_config"
KNOWN_HOSTS = f"{ETC}/ssh_known_hosts"
HOST_KEY = f"{ETC}/ssh_host_ed25519_key"
HOST_CERT = f"{ETC}/ssh_host_ed25519_key-cert.pub"
USER_CA = f"{ETC}/ssh_user_ca.pub"
# The job user's identity inside the container: the key the prolog issues for it.
USER_KEY = "/var/shifter/ssh/id_ed25519"
USER_CERT = "/var/shifter/ssh/id_ed25519-cert.pub"

# Algorithms for which ssh-audit 3.9 reports no failure and no warning
# (tests/ssh/test_sshd.py runs it).
KEX = ("sntrup761x25519-sha512@openssh.com",)
CIPHERS = (
    "chacha20-poly1305@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-gcm@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
)
MACS = ("hmac-sha2-512-etm@openssh.com", "hmac-sha2-256-etm@openssh.com")
HOST_KEY_ALGORITHMS = ("ssh-ed25519-cert-v01@openssh.com", "ssh-ed25519")
CLIENT_HOST_KEY_ALGORITHMS = ("ssh-ed25519-cert-v01@openssh.com",)
USER_KEY_ALGORITHMS = ("ssh-ed25519-cert-v01@openssh.com",)
# The client must accept the plain key type too, or it skips the private key that
# goes with the certificate and cannot sign; sshd still accepts certificates only.
CLIENT_USER_KEY_ALGORITHMS = ("ssh-ed25519-cert-v01@openssh.com", "ssh-ed25519")
CA_ALGORITHMS = ("ssh-ed25519",)

TEMPLATES = ("sshd_config.j2", "ssh_config.j2")
LOG_LEVELS = frozenset({"QUIET", "FATAL", "ERROR", "INFO", "VERBOSE", "DEBUG", "DEBUG1"})

_HOST = re.compile(r"[A-Za-z0-9:][A-Za-z0-9._:-]{0,252}")
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}\$?")
_PATH = re.compile(r"/[A-Za-z0-9._/+@,:=-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_STARTUPS = re.compile(r"[0-9]{1,6}(:[0-9]{1,3}:[0-9]{1,6})?")
_CA_LINE = re.compile(r"(ssh-ed25519) ([A-Za-z0-9+/]+={0,2})(?: [ -~]*)?")


@dataclass(frozen=True)
class SshdSettings:
    """One job's sshd. Paths are as seen inside the container."""

    user: str
    port: int
    environment: Mapping[str, str] = field(default_factory=dict)  # SetEnv, in order
    listen_address: str | None = None
    host_key: str = HOST_KEY
    host_certificate: str = HOST_CERT
    trusted_user_ca_keys: str = USER_CA
    pid_file: str = "none"
    udi_image: str = UDI
    max_startups: str = "1024:30:4096"
    max_sessions: int = 1024
    login_grace_time: int = 30
    log_level: str = "INFO"
    allow_tcp_forwarding: str = "yes"  # sshdAllowTcpForwarding


@dataclass(frozen=True)
class SshClientSettings:
    """The container's ssh towards the allocation's hosts (names as users type them)."""

    hosts: Sequence[str]
    port: int
    user: str | None = None  # guards against a user's "Host * / User other"
    identity_file: str = USER_KEY
    certificate_file: str = USER_CERT
    known_hosts: str = KNOWN_HOSTS
    connection_attempts: int = 5
    connect_timeout: int = 5
    include_user_config: bool = True


# --- validation: each returns the value to render or raises ShifterError -----------


def _match(where: str, what: str, pattern: re.Pattern[str], value: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise node_error(where, f"invalid {what}", repr(value))
    return value


def _int(where: str, what: str, value: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise node_error(where, f"{what} must be an integer from {low} to {high}", value)
    return value


def _hosts(where: str, hosts: Sequence[str]) -> list[str]:
    if isinstance(hosts, str) or not hosts:
        raise node_error(where, "need a non-empty list of host names", repr(hosts))
    unique = dict.fromkeys(_match(where, "host name", _HOST, host) for host in hosts)
    return list(unique)


def quote_setenv(name: str, value: str) -> str:
    """One ``SetEnv`` argument, quoted so that sshd's argv_split yields NAME=value."""
    _match("sshd_config", "environment variable name", _ENV_NAME, name)
    if not isinstance(value, str) or _ENV_BAD.search(value):
        raise node_error("sshd_config", f"control character in value of {name}", repr(value))
    escaped = f"{name}={value}".replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _algorithms() -> dict[str, str]:
    return {
        "kex": ",".join(KEX),
        "ciphers": ",".join(CIPHERS),
        "macs": ",".join(MACS),
        "ca_algorithms": ",".join(CA_ALGORITHMS),
    }


def _sshd_values(s: SshdSettings) -> dict[str, object]:
    where = "sshd_config"
    if s.pid_file != "none":
        _match(where, "PidFile", _PATH, s.pid_file)
    if s.log_level not in LOG_LEVELS:
        raise node_error(where, "invalid LogLevel", repr(s.log_level))
    if s.allow_tcp_forwarding not in ("yes", "no", "local", "remote"):
        raise node_error(where, "invalid AllowTcpForwarding", repr(s.allow_tcp_forwarding))
    values: dict[str, object] = {
        "port": _int(where, "Port", s.port, 1, 65535),
        "listen_address": s.listen_address
        and _match(where, "ListenAddress", _HOST, s.listen_address),
        "pid_file": s.pid_file,
        "log_level": s.log_level,
        "allow_tcp_forwarding": s.allow_tcp_forwarding,
        "user": _match(where, "AllowUsers user name", _USER, s.user),
        "udi_image": _match(where, "udiImage path", _PATH, s.udi_image),
        "max_startups": _match(where, "MaxStartups", _STARTUPS, s.max_startups),
        "max_sessions": _int(where, "MaxSessions", s.max_sessions, 1, 65535),
        "login_grace_time": _int(where, "LoginGraceTime", s.login_grace_time, 1, 3600),
        "setenv": " ".join(quote_setenv(k, v) for k, v in s.environment.items()),
        "host_key_algorithms": ",".join(HOST_KEY_ALGORITHMS),
        "user_key_algorithms": ",".join(USER_KEY_ALGORITHMS),
    }
    for key in ("host_key", "host_certificate", "trusted_user_ca_keys"):
        values[key] = _match(where, key, _PATH, getattr(s, key))
    return values | _algorithms()


def _client_values(s: SshClientSettings) -> dict[str, object]:
    where = "ssh_config"
    values: dict[str, object] = {
        "hosts": ",".join(_hosts(where, s.hosts)),
        "port": _int(where, "Port", s.port, 1, 65535),
        "user": s.user and _match(where, "User", _USER, s.user),
        "connection_attempts": _int(where, "ConnectionAttempts", s.connection_attempts, 1, 600),
        "connect_timeout": _int(where, "ConnectTimeout", s.connect_timeout, 1, 600),
        "include_user_config": bool(s.include_user_config),
        "host_key_algorithms": ",".join(CLIENT_HOST_KEY_ALGORITHMS),
        "user_key_algorithms": ",".join(CLIENT_USER_KEY_ALGORITHMS),
    }
    for key in ("identity_file", "certificate_file", "known_hosts"):
        values[key] = _match(where, key, _PATH, getattr(s, key))
    return values | _algorithms()


# --- templates ----------------------------------------------------------------------


def source_dir() -> Path:
    """The udiImage sources (templates, ssh-wrapper.c): the checkout's, else installed."""
    candidates = (
        Path(__file__).resolve().parents[2] / "udiImage",
        Path(sys.prefix) / "share" / "shifter-sshd" / "udiImage",
    )
    for candidate in candidates:
        if all((candidate / name).is_file() for name in (*TEMPLATES, "ssh-wrapper.c")):
            return candidate
    raise node_error("udiImage sources", "not found", " or ".join(map(str, candidates)))


def template_dir(bundle: str | None = None) -> Path:
    """The bundle's own templates when it has them, else the source directory's."""
    if bundle is not None:
        built = Path(bundle) / "share" / "templates"
        if all((built / name).is_file() for name in TEMPLATES):
            return built
    return source_dir()


@functools.lru_cache(maxsize=8)
def _environment(directory: str) -> jinja2.Environment:
    # Config files, not HTML: values are validated instead of escaped.
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(directory),
        autoescape=False,  # noqa: S701
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _render(name: str, values: Mapping[str, object], bundle: str | None) -> str:
    directory = str(template_dir(bundle))
    try:
        return _environment(directory).get_template(name).render(values)
    except jinja2.TemplateError as err:
        raise node_error(f"{directory}/{name}", "cannot render template", err) from None


def render_sshd_config(settings: SshdSettings, bundle: str | None = None) -> str:
    """The job's sshd_config (for ``sshd -f /opt/udiImage/etc/sshd_config``)."""
    return _render("sshd_config.j2", _sshd_values(settings), bundle)


def render_ssh_config(settings: SshClientSettings, bundle: str | None = None) -> str:
    """The container's ssh_config, read by the bundled ssh through its -F wrapper."""
    return _render("ssh_config.j2", _client_values(settings), bundle)


def render_known_hosts(ca_public_line: str, hosts: Sequence[str], port: int) -> str:
    """One ``@cert-authority`` line trusting the job CA for the allocation's hosts.

    ssh looks a host up as ``[host]:port`` when the port is not 22, so such entries
    are written that way; the comment of the CA line is dropped.
    """
    where = "known_hosts"
    match = _CA_LINE.fullmatch(ca_public_line.strip()) if isinstance(ca_public_line, str) else None
    if match is None:
        raise node_error(where, "CA public key is not one ssh-ed25519 line", repr(ca_public_line))
    _int(where, "port", port, 1, 65535)
    names = _hosts(where, hosts)
    patterns = names if port == 22 else [f"[{name}]:{port}" for name in names]
    return f"@cert-authority {','.join(patterns)} {match.group(1)} {match.group(2)}\n"
