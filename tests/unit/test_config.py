"""jobworkerd's configuration file: defaults, overrides, every invalid case and its message."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jobworker.api._config import (
    SCHEMA,
    ConfigError,
    ServerConfig,
    check_files,
    default_config_text,
    host_limits,
    load_config,
)
from jobworker.certs import make_dev_pki
from jobworker.identity import Role
from jobworker.runtime import NOBODY, Bind, IOLimit, Limits, RunAs

JOBWORKERD = str(Path(sys.executable).parent / "jobworkerd")
REPO = Path(__file__).resolve().parents[2]
TLS = '[tls]\nca = "ca.pem"\ncert = "server.pem"\nkey = "server.key"\n'


def _load(tmp_path: Path, text: str, **flags: object) -> ServerConfig:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_config(path, flags)


def _problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    return info.value.problems


def test_defaults(tmp_path: Path) -> None:
    config = load_config(None, {"ca": "ca.pem", "cert": "s.pem", "key": "s.key"}, cwd=tmp_path)
    assert config.listen == ("127.0.0.1:50051",)
    assert config.tls.ca == tmp_path / "ca.pem"
    assert config.runtime.state_dir == Path("/var/lib/jobworker")
    assert config.runtime.retention_seconds == 7 * 86400
    assert config.runtime.retention_bytes == 10 << 30
    assert config.runtime.output_limit == 1 << 30
    assert config.runtime.run_as is None  # a uid of its own per job
    assert config.runtime.uid_range == (1_900_000_000, 1_900_065_535)
    assert config.runtime.sandbox
    # The shipped defaults and maxima: the host's share (docs/security.md), not none.
    assert (config.runtime.default_limits, config.runtime.max_limits) == host_limits()
    assert config.limits.max_active_jobs_per_user == 100
    assert config.limits.max_streams_per_user == 64
    assert config.max_message_bytes == 4 << 20
    assert config.log_format == "text"
    assert config.metrics_listen is None
    assert config.pool.allowlist is None


def test_a_configured_maximum_caps_the_host_share_default(tmp_path: Path) -> None:
    """What the config leaves unset comes from the host, but never above a configured
    maximum (the host's quarter of memory would otherwise be refused as a default)."""
    host_default, host_max = host_limits()
    config = _load(tmp_path, TLS + '[limits.max]\nmemory = "64M"\ncpus = 0.25\n')
    assert config.runtime.max_limits == Limits(
        cpus=0.25, memory_bytes=64 << 20, pids=host_max.pids, tmp_bytes=host_max.tmp_bytes
    )
    assert config.runtime.default_limits == Limits(
        cpus=0.25, memory_bytes=64 << 20, pids=host_default.pids
    )


def test_every_key_is_read(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        """
[server]
listen = ["127.0.0.1:7000", "[::1]:7000"]
state_dir = "state"
log_format = "json"
max_message_size = "8M"
shutdown_grace = "2.5s"
[tls]
ca = "/etc/pki/ca.pem"
cert = "server.pem"
key = "server.key"
client_allowlist = "allow.txt"
client_revoked = "revoked.txt"
[limits.default]
cpus = 0.5
cpu_weight = 50
memory = "256M"
pids = 64
tmp_size = "128M"
io = [{ device = "8:0", read_bps = "10M", write_iops = 100 }]
[limits.max]
cpus = 2
memory = "1G"
pids = 1000
tmp_size = "1G"
[quotas]
max_jobs_per_user = 5
max_streams_per_user = 6
max_output_per_job = 1048576
[retention]
max_age = "12h"
max_size = "500M"
[run_as]
default = "1234:1235"
allow_root = true
[run_as.owners]
alice = "nobody"
root-jobs = "0:0"
[network]
host_network_users = ["admin"]
[metrics]
listen = "127.0.0.1:9464"
[cgroups]
enabled = false
subtree = "jobworker-test"
parent = "/jobs.slice"
[namespaces]
enabled = false
[sandbox]
enabled = false
uid_range = "2000000000-2000000999"
paths = { "*" = ["/srv/data:ro"], alice = ["/srv/alice:rw"] }
hide = ["/srv/secret"]
seccomp_optional = ["ci"]
[images]
alpine = "/var/lib/jobworker/images/alpine"
""",
    )
    assert config.listen == ("127.0.0.1:7000", "[::1]:7000")
    assert config.runtime.state_dir == tmp_path / "state"
    assert config.log_format == "json"
    assert config.max_message_bytes == 8 << 20
    assert config.shutdown_grace == 2.5
    assert config.tls.ca == Path("/etc/pki/ca.pem")
    assert config.tls.cert == tmp_path / "server.pem"
    assert config.pool.allowlist == tmp_path / "allow.txt"
    assert config.pool.revoked == tmp_path / "revoked.txt"
    assert config.runtime.default_limits == Limits(
        cpus=0.5,
        cpu_weight=50,
        memory_bytes=256 << 20,
        pids=64,
        io=(IOLimit(device="8:0", read_bps=10 << 20, write_iops=100),),
        tmp_bytes=128 << 20,
    )
    assert config.runtime.max_limits == Limits(
        cpus=2, memory_bytes=1 << 30, pids=1000, tmp_bytes=1 << 30
    )
    assert config.limits.max_active_jobs_per_user == 5
    assert config.limits.max_streams_per_user == 6
    assert config.runtime.output_limit == 1 << 20
    assert config.runtime.retention_seconds == 12 * 3600
    assert config.runtime.retention_bytes == 500 << 20
    assert config.runtime.run_as == RunAs(1234, 1235)
    assert config.runtime.allow_root
    assert config.runtime.owner_run_as == {"alice": NOBODY, "root-jobs": RunAs(0, 0)}
    assert config.runtime.host_network_owners == frozenset({"admin"})
    assert config.metrics_listen == "127.0.0.1:9464"
    assert not config.runtime.cgroups
    assert config.runtime.cgroup_subtree == "jobworker-test"
    assert config.runtime.cgroup_parent == "/jobs.slice"
    assert not config.runtime.namespaces
    assert not config.runtime.sandbox
    assert config.runtime.uid_range == (2_000_000_000, 2_000_000_999)
    assert config.runtime.binds_for("alice") == (
        Bind("/srv/data", writable=False),
        Bind("/srv/alice", writable=True),
    )
    assert config.runtime.binds_for("bob") == (Bind("/srv/data", writable=False),)
    assert "/srv/secret" in config.runtime.hide_paths
    assert "/etc/pki" in config.runtime.hide_paths  # the TLS files' directory
    assert config.runtime.seccomp_optional_owners == frozenset({"ci"})
    assert config.runtime.images == {"alpine": "/var/lib/jobworker/images/alpine"}


def test_flags_override_the_file(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        TLS + '[server]\nlisten = ["127.0.0.1:1"]\nlog_format = "json"\n',
        listen=["127.0.0.1:2"],
        log_format="text",
        ca="/x/ca.pem",
        metrics_listen="127.0.0.1:3",
        state_dir=None,
    )
    assert config.listen == ("127.0.0.1:2",)
    assert config.log_format == "text"
    assert config.tls.ca == Path("/x/ca.pem")
    assert config.tls.key == tmp_path / "server.key"
    assert config.metrics_listen == "127.0.0.1:3"


def test_the_servers_name_and_labels_from_the_file_and_from_flags(tmp_path: Path) -> None:
    config = _load(tmp_path, TLS + '[server]\nname = "web-1"\nlabels = { role = "web" }\n')
    assert (config.identity.name, dict(config.identity.labels)) == ("web-1", {"role": "web"})
    config = _load(tmp_path, TLS, name="db-2", label=["role=db", "zone=b"])
    assert (config.identity.name, dict(config.identity.labels)) == (
        "db-2",
        {"role": "db", "zone": "b"},
    )
    assert _load(tmp_path, TLS).identity.name == socket.gethostname()
    with pytest.raises(ConfigError) as refused:
        _load(tmp_path, TLS, label=["role"])
    assert refused.value.problems == ["--label: 'role' is not KEY=VALUE, e.g. role=web"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server\n", "not valid TOML: "),
        ("[servr]\n", "unknown section [servr]; did you mean 'server'? known sections: "),
        ("server = 1\n", "server must be a table ([server]), not a value"),
        ("[server]\nlisten_on = []\n", "unknown key server.listen_on; did you mean 'listen'?"),
        ("[server]\nlisten = []\n", 'server.listen: expected a non-empty list such as ["127'),
        ('[server]\nlisten = "127.0.0.1:1"\n', "server.listen: expected a non-empty list"),
        ('[server]\nlisten = ["localhost"]\n', "server.listen: 'localhost' is not HOST:PORT"),
        ('[server]\nlisten = ["h:99999"]\n', "server.listen: 'h:99999' is not HOST:PORT"),
        ('[server]\nstate_dir = ""\n', "server.state_dir: expected a non-empty string, got ''"),
        ('[server]\nlog_format = "xml"\n', "server.log_format: expected one of 'text', 'json'"),
        ('[server]\nmax_message_size = "4X"\n', "server.max_message_size: size '4X' is not"),
        ("[server]\nmax_message_size = -1\n", "server.max_message_size: expected a size of at"),
        ("[server]\nmax_message_size = true\n", "server.max_message_size: expected a size such"),
        ('[server]\nshutdown_grace = "soon"\n', "server.shutdown_grace: duration 'soon' is not"),
        ('[server]\nname = "web 1"\n', "server.name: server name 'web 1' is not valid: use 1-63"),
        (
            '[server]\nlabels = { role = "we b" }\n',
            "server.labels: label 'role' has a bad value 'we b'",
        ),
        ('[server]\nlabels = { "-x" = "a" }\n', "server.labels: label key '-x' is not valid"),
        ('[server]\nlabels = "role=web"\n', "server.labels: expected a table such as { role"),
        ("[server]\nshutdown_grace = [1]\n", "server.shutdown_grace: expected a duration such"),
        ("[limits.default]\ncpus = 0\n", "limits.default.cpus: expected a positive number"),
        ("[limits.default]\ncpu_weight = 0\n", "limits.default.cpu_weight: expected a whole"),
        ("[limits.default]\ncpu_weight = 20000\n", "limits.default: cpu_weight must be between"),
        ("[limits.default]\nmemory = 1024\n", "limits.default: memory limit must be at least"),
        ("[limits.max]\npids = 1.5\n", "limits.max.pids: expected a whole number of at least 1"),
        ("[limits.max]\nio = []\n", "unknown key limits.max.io; keys of [limits.max]: "),
        ("[limits.min]\n", "unknown section [limits.min]; use [limits.default] or [limits.max]"),
        ("[limits]\ndefault = 1\n", "limits.default must be a table ([limits.default])"),
        ('[limits.default]\nio = "8:0"\n', "limits.default.io: expected a list of tables"),
        ('[limits.default]\nio = [{ dev = "8:0" }]\n', "unknown key 'dev' in an io entry"),
        ('[limits.default]\nio = [{ device = "sda" }]\n', "IO device 'sda' is not MAJ:MIN"),
        (
            '[limits.default]\nmemory = "2G"\n[limits.max]\nmemory = "1G"\n',
            "limits.default: memory limit 2Gi (2147483648 bytes) is above the server maximum",
        ),
        ("[quotas]\nmax_jobs_per_user = 0\n", "quotas.max_jobs_per_user: expected a whole number"),
        ("[quotas]\nmax_streams_per_user = true\n", "quotas.max_streams_per_user: expected a"),
        ('[quotas]\nmax_output_per_job = "1Q"\n', "quotas.max_output_per_job: size '1Q' is not"),
        ("[retention]\nmax_age = -5\n", "retention.max_age: expected a duration such as"),
        ('[retention]\nmax_size = "lots"\n', "retention.max_size: size 'lots' is not a size"),
        ('[run_as]\ndefault = "no-such-user-here"\n', "there is no local user 'no-such-user-h"),
        ('[run_as]\ndefault = "1:x"\n', "run_as.default: '1:x' is not \"UID:GID\""),
        ('[run_as]\ndefault = "0:0"\n', "run_as: run-as user for default is root (uid or gid"),
        ('[run_as]\nallow_root = "yes"\n', "run_as.allow_root: expected true or false, got 'yes'"),
        ("[run_as]\nowners = []\n", 'run_as.owners: expected a table of owner = "local user"'),
        ('[run_as.owners]\nbob = "?"\n', "run_as.owners: owner 'bob': there is no local user"),
        ('[cgroups]\nsubtree = "a/b"\n', "cgroups.subtree: expected a single directory name"),
        ('[cgroups]\nparent = "jobs"\n', "cgroups.parent: expected a path in the cgroup2 mount"),
        ('[cgroups]\nenabled = "no"\n', "cgroups.enabled: expected true or false"),
        ("[namespaces]\nenabled = 0\n", "namespaces.enabled: expected true or false"),
        ('[sandbox]\nuid_range = "5-1"\n', "uid range 5-1 must lie within"),
        ('[sandbox]\nuid_range = "1-x"\n', "sandbox.uid_range: expected a range such as"),
        ('[sandbox]\nuid_range = "60000-70000"\n', "holds existing accounts (nobody"),
        ('[sandbox]\npaths = { a = ["/x:rx"] }\n', "'/x:rx' is not PATH:ro or PATH:rw"),
        ('[sandbox]\npaths = { a = ["x:ro"] }\n', "'x' must be an absolute path"),
        ("[sandbox]\nhide = [1]\n", "sandbox.hide: expected a list of absolute paths"),
        ('[images]\nalpine = "rel"\n', '[images]: expected a table of name = "/absolute/dir"'),
        ("[network]\nhost_network_users = [1]\n", "network.host_network_users: expected a list"),
        ('[metrics]\nlisten = "9464"\n', "metrics.listen: '9464' is not HOST:PORT"),
        ("[tls]\nca = 5\n", "tls.ca: expected a non-empty string, got 5"),
    ],
)
def test_invalid_values_are_explained(tmp_path: Path, text: str, message: str) -> None:
    body = text if text.startswith("[tls]") or "[server\n" in text else text + TLS
    problems = _problems(tmp_path, body)
    assert any(message in p for p in problems), problems
    assert all("\n" not in p for p in problems)


def test_missing_tls_settings_name_the_flag(tmp_path: Path) -> None:
    assert _problems(tmp_path, "") == [
        "tls.ca is not set; set it in the config file or give --ca FILE",
        "tls.cert is not set; set it in the config file or give --cert FILE",
        "tls.key is not set; set it in the config file or give --key FILE",
    ]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    problems = _problems(tmp_path, TLS + "[server]\nlog_format = 1\nfoo = 2\n[quotas]\nx = 1\n")
    assert len(problems) == 3


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it: No such file or directory"):
        load_config(tmp_path / "missing.toml")


def test_check_files_names_each_unusable_file(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    (tmp_path / "revoked.txt").write_text("not-a-fingerprint\n")
    config = _load(
        tmp_path,
        TLS + 'client_revoked = "revoked.txt"\n[server]\nstate_dir = "state/jobs"\n',
    )
    problems = check_files(config)
    assert problems[:3] == [
        f"tls.{name}: cannot read {tmp_path / file}; check the path and its permissions"
        for name, file in (("ca", "ca.pem"), ("cert", "server.pem"), ("key", "server.key"))
    ]
    assert "'not-a-fingerprint' is not a SHA-256 fingerprint" in problems[3]
    assert problems[4] == f"server.state_dir: {tmp_path / 'state'} is not a directory"


def test_reference_file_is_current_and_parses_to_the_defaults(tmp_path: Path) -> None:
    reference = (REPO / "docs" / "config.toml").read_text()
    assert reference == default_config_text(), "regenerate: jobworkerd --print-default-config"
    for section, keys in SCHEMA.items():
        assert f"[{section}]" in reference
        for name in keys if section != "images" else ():
            assert f"{name} =" in reference
    flags = {"ca": "/a", "cert": "/b", "key": "/c"}
    assert _load(tmp_path, reference, **flags) == load_config(None, flags)


def _dev_pki(tmp_path: Path) -> None:
    """ca.pem, server.pem, server.key and client files in ``tmp_path``."""
    make_dev_pki(tmp_path, {"alice": Role.USER})


def test_check_config_command(tmp_path: Path) -> None:
    _dev_pki(tmp_path)
    good = tmp_path / "good.toml"
    good.write_text(TLS + f'[server]\nstate_dir = "{tmp_path}/state"\n')
    result = subprocess.run(
        [JOBWORKERD, "--check-config", "--config", str(good)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{good}: OK\n", "")
    bad = tmp_path / "bad.toml"
    bad.write_text(TLS + '[server]\nlisten = ["nowhere"]\n[quotas]\nmax_jobs = 3\n')
    result = subprocess.run(
        [JOBWORKERD, "--check-config", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        (
            f"{bad}: server.listen: 'nowhere' is not HOST:PORT; write e.g. 127.0.0.1:50051 or "
            "[::1]:50051"
        ),
        (
            f"{bad}: unknown key quotas.max_jobs; did you mean 'max_jobs_per_user'? keys of "
            "[quotas]: max_jobs_per_user, max_streams_per_user, max_output_per_job, "
            "output_read_buffer"
        ),
    ]


def _check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "check.toml"
    config.write_text(text)
    return subprocess.run(
        [JOBWORKERD, "--check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_loads_the_tls_material_as_the_server_will(tmp_path: Path) -> None:
    """What used to pass --check-config and then fail at start: each gets its own line."""
    _dev_pki(tmp_path)
    other = tmp_path / "other"
    make_dev_pki(other, {"bob": Role.USER})
    (tmp_path / "not-pem.pem").write_text("hello\n")
    cases = {
        # A key that is not the certificate's (the start failed with "port in use").
        '[tls]\nca = "ca.pem"\ncert = "server.pem"\nkey = "alice.key"\n': ("is not the key of"),
        # A client certificate in the server's place.
        '[tls]\nca = "ca.pem"\ncert = "alice.pem"\nkey = "alice.key"\n': (
            "is not a server certificate"
        ),
        # A CA file that is not PEM.
        '[tls]\nca = "not-pem.pem"\ncert = "server.pem"\nkey = "server.key"\n': (
            "holds no PEM certificate"
        ),
        # A server certificate from another CA.
        '[tls]\nca = "ca.pem"\ncert = "other/server.pem"\nkey = "other/server.key"\n': (
            "is not signed by the CA"
        ),
    }
    for text, problem in cases.items():
        result = _check(tmp_path, text + f'[server]\nstate_dir = "{tmp_path}/state"\n')
        assert result.returncode == 1, text
        assert problem in result.stderr, (text, result.stderr)
        assert "Traceback" not in result.stderr


def test_check_config_without_any_file_is_not_ok(tmp_path: Path) -> None:
    if Path("/etc/jobworker/config.toml").exists():
        pytest.skip("this host has a jobworkerd configuration of its own")
    result = subprocess.run(
        [JOBWORKERD, "--check-config", "--ca", "a", "--cert", "b", "--key", "c"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "no configuration file at /etc/jobworker/config.toml" in result.stderr
