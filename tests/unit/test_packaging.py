"""The systemd unit and the container image that docs/operations.md tells operators to use."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "packaging" / "jobworkerd.service"
JOBWORKERD = str(Path(sys.executable).parent / "jobworkerd")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
DOCKER = shutil.which("docker") or "docker"


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="no systemd-analyze here")
def test_unit_file_verifies_clean(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at this checkout's jobworkerd.
    unit = tmp_path / "jobworkerd.service"
    unit.write_text(UNIT.read_text().replace("/opt/jobworker/bin/jobworkerd", JOBWORKERD))
    result = subprocess.run(
        [str(SYSTEMD_ANALYZE), "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # It exits 0 even for unknown keys and bad values, and only warns: any output is a defect.
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


def test_unit_keeps_jobs_alive_and_delegates_cgroups() -> None:
    settings = _unit_settings()
    assert settings["KillMode"] == ["process"]
    assert settings["Delegate"] == ["yes"]
    assert settings["RestrictNamespaces"] == ["cgroup ipc mnt net pid uts"]
    for breaks_jobworker in ("ProtectControlGroups", "ProtectKernelTunables", "PrivateUsers"):
        assert breaks_jobworker not in settings
    for command in (*settings["ExecStartPre"], *settings["ExecStart"]):
        argv = command.split()
        assert argv[0] == "/opt/jobworker/bin/jobworkerd"
        # The flags the unit passes exist (argparse would exit 2 on an unknown one).
        flags = [a for a in argv[1:] if a.startswith("--")]
        help_text = subprocess.run(
            [JOBWORKERD, "--help"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        assert all(flag in help_text for flag in flags)


def test_dockerfile_copies_what_exists_and_runs_jobworkerd() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    for sources in re.findall(r"^COPY (.+) \S+$", dockerfile, re.MULTILINE):
        for source in sources.split():
            assert (REPO / source).exists(), source
    entry = re.search(r"^ENTRYPOINT (.+)$", dockerfile, re.MULTILINE)
    assert entry is not None
    assert '"jobworkerd", "--config", "/etc/jobworker/config.toml"' in entry.group(1)


def _docker_works() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run([DOCKER, "info"], capture_output=True, timeout=60, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _docker_works(), reason="no reachable docker daemon to build with")
def test_container_image_builds_and_runs() -> None:
    tag = f"jobworkerd-test:{uuid.uuid4().hex[:8]}"
    try:
        subprocess.run([DOCKER, "build", "-q", "-t", tag, str(REPO)], check=True, timeout=1200)
        result = subprocess.run(
            [DOCKER, "run", "--rm", "--entrypoint", "jobworkerd", tag, "--print-default-config"],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        assert result.stdout == (REPO / "docs" / "config.toml").read_text()
    finally:
        subprocess.run([DOCKER, "rmi", "-f", tag], capture_output=True, timeout=300, check=False)


# ------------------------------------------------------------------ many hosts
K8S = REPO / "packaging" / "kubernetes" / "jobworkerd.yaml"
NOMAD = REPO / "packaging" / "nomad" / "jobworkerd.nomad.hcl"
OPERATIONS = (REPO / "docs" / "operations.md").read_text()


def _flags_exist(args: list[str]) -> None:
    help_text = subprocess.run(
        [JOBWORKERD, "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    for flag in (a for a in args if a.startswith("--")):
        assert flag in help_text, flag


def test_kubernetes_manifest_parses_and_is_what_the_guide_says() -> None:
    import yaml  # noqa: PLC0415 - only this test reads YAML

    docs = {d["kind"]: d for d in yaml.safe_load_all(K8S.read_text())}
    service, daemonset = docs["Service"], docs["DaemonSet"]
    assert service["spec"]["clusterIP"] == "None"  # headless: DNS gives every pod
    (port,) = service["spec"]["ports"]
    meta = service["metadata"]
    srv = f"_{port['name']}._{port['protocol'].lower()}.{meta['name']}.{meta['namespace']}"
    assert f"{srv}.svc.cluster.local" in OPERATIONS
    assert f"{srv}.svc.cluster.local" in K8S.read_text()
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["subdomain"] == meta["name"]
    (container,) = pod["containers"]
    assert container["securityContext"] == {"privileged": True}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["state"] == "/var/lib/jobworker"
    assert volumes["state"]["hostPath"]["path"] == "/var/lib/jobworker"
    assert container["ports"][0]["containerPort"] == port["port"]
    _flags_exist(container["args"])
    config = docs["ConfigMap"]["data"]["config.toml"]
    assert tomllib.loads(config)["tls"]["ca"].startswith(mounts["tls"])


def _unquote(value: object) -> object:
    """python-hcl2 keeps a string's quotes."""
    return value.strip('"') if isinstance(value, str) else value


def test_nomad_job_parses_and_is_what_the_guide_says() -> None:
    import hcl2  # noqa: PLC0415 - only this test reads HCL

    with NOMAD.open() as f:
        raw = hcl2.load(f)
    (job,) = raw["job"]
    ((name, body),) = job.items()
    assert _unquote(body["type"]) == "system"
    (group,) = body["group"]
    ((_, group_body),) = group.items()
    (service,) = group_body["service"]
    srv = f"_{_unquote(service['name'])}._tcp.service.consul"
    assert srv in OPERATIONS
    assert srv in NOMAD.read_text()
    (task,) = group_body["task"]
    ((_, task_body),) = task.items()
    (config,) = task_body["config"]
    assert config["privileged"] is True
    volumes = [_unquote(v) for v in config["volumes"]]
    assert "/var/lib/jobworker:/var/lib/jobworker" in volumes
    _flags_exist([str(_unquote(a)) for a in config["args"]])
    assert _unquote(name) == "jobworkerd"
