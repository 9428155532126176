"""Fan-out (issue 18), against OpenSSH fan-out measured in the same run.

(x) `jobctl --fleet NAME run -- true` to 20 jobworkerd servers on this host, vs
    parallel-ssh (Debian's pssh) and `xargs -P 20 ssh` to 20 sshd instances on loopback;
    fresh connections on both sides (no keeper, no ControlMaster); the faster ssh fan-out is
    the anchor. Also how each grows from 1 to 5 to 20 hosts.

Run alone: `.venv/bin/python bench/fleet.py` (as root; ./dev bench installs pssh and sshd).
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from api import start_jobworkerd
from jobworker.certs import make_dev_pki
from table import Row, scratch

HOSTS = (1, 5, 20)
RUNS = 7
SSHD = "/usr/sbin/sshd"
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    import socket  # noqa: PLC0415 - only here

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def _jobworkerds(work: Path, pki: Path, n: int) -> Iterator[list[int]]:
    """``n`` real jobworkerd processes, each with its own name, state dir and cgroup
    subtree; their ports. SIGTERM afterwards, and their (few) jobs are long over."""
    procs: list[subprocess.Popen[str]] = []
    ports: list[int] = []
    try:
        for i in range(n):
            home = work / f"server-{i}"
            home.mkdir()
            proc, port = start_jobworkerd(
                home,
                pki,
                f'[server]\nname = "bench-{i}"\nlabels = {{ bench = "fleet" }}\n'
                f'[cgroups]\nsubtree = "jobworker-bench-fleet-{os.getpid()}-{i}"\n',
            )
            procs.append(proc)
            ports.append(port)
        yield ports
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait()


@contextlib.contextmanager
def _sshds(work: Path, n: int) -> Iterator[tuple[list[int], list[str]]]:
    """``n`` sshd instances on loopback; their ports, and the ssh options of a client that
    connects afresh each time."""
    keys = work / "ssh"
    keys.mkdir(mode=0o700)
    for name in ("host", "client"):
        subprocess.run(
            ["/usr/bin/ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)],
            check=True,
        )
    (keys / "authorized_keys").write_text((keys / "client.pub").read_text())
    os.makedirs("/run/sshd", exist_ok=True)
    ports = _free_ports(n)
    procs = []
    for i, port in enumerate(ports):
        config = keys / f"sshd_config_{i}"
        config.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {keys / 'host'}\n"
            f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            f"PidFile {keys / f'sshd_{i}.pid'}\nStrictModes no\nLogLevel ERROR\n"
            "MaxStartups 100\n"
        )
        procs.append(subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)]))
    options = [
        "-o",
        f"IdentityFile={keys / 'client'}",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        f"UserKnownHostsFile={keys / 'known'}",
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
    ]
    try:
        for port in ports:
            deadline = time.monotonic() + 30
            probe = ["/usr/bin/ssh", *options, "-p", str(port), "root@127.0.0.1", "true"]
            while subprocess.run(probe, check=False).returncode != 0:
                if time.monotonic() > deadline:
                    raise RuntimeError("the benchmark's sshd did not come up")
                time.sleep(0.1)
        yield ports, options
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()


def _time(argv: list[str], env: dict[str, str] | None = None, stdin: str | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, input=stdin, text=True, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _median(argv: list[str], env: dict[str, str] | None = None, stdin: str | None = None) -> float:
    return statistics.median(_time(argv, env, stdin) for _ in range(RUNS))


def measure() -> list[Row]:
    if not (os.path.exists(SSHD) and os.path.exists("/usr/bin/parallel-ssh")):
        raise SystemExit("bench/fleet.py needs sshd and pssh (./dev bench installs them)")
    with scratch("jobworker-bench-fleet-") as work:
        pki = make_dev_pki(work / "pki")
        most = max(HOSTS)
        with _jobworkerds(work, pki, most) as ours_ports, _sshds(work, most) as (ssh_ports, opts):
            home = work / "home"
            config = home / ".config" / "jobworker" / "config.toml"
            config.parent.mkdir(parents=True)
            files = f'ca = "{pki}/ca.pem"\ncert = "{pki}/alice.pem"\nkey = "{pki}/alice.key"\n'
            fleets = []
            for n in HOSTS:
                listed = ", ".join(f'"127.0.0.1:{p}"' for p in ours_ports[:n])
                fleets.append(f"[fleets.f{n}]\nservers = [{listed}]\n{files}")
            config.write_text("".join(fleets))
            env = {
                "PATH": os.environ["PATH"],
                "HOME": str(home),
                "XDG_CONFIG_HOME": str(home / ".config"),
            }
            ours, pssh, xargs = {}, {}, {}
            for n in HOSTS:
                ours[n] = _median(
                    [str(BIN / "jobctl"), "--fleet", f"f{n}", "run", "--no-prefix", "--", "true"],
                    env,
                )
                hosts = work / f"hosts-{n}"
                hosts.write_text("".join(f"root@127.0.0.1:{p}\n" for p in ssh_ports[:n]))
                pssh_opts = [a for o in opts[1::2] for a in ("-O", o)]
                pssh[n] = _median(
                    ["/usr/bin/parallel-ssh", "-h", str(hosts), "-p", str(n), *pssh_opts, "true"]
                )
                xargs[n] = _median(
                    [
                        "/usr/bin/xargs",
                        "-P",
                        str(n),
                        "-I",
                        "{}",
                        "/usr/bin/ssh",
                        *opts,
                        "-p",
                        "{}",
                        "root@127.0.0.1",
                        "true",
                    ],
                    stdin="".join(f"{p}\n" for p in ssh_ports[:n]),
                )
    anchor = {n: min(pssh[n], xargs[n]) for n in HOSTS}
    growth = " / ".join(f"{ours[n] * 1e3:.0f}" for n in HOSTS)
    return [
        Row(
            f"(x) fan-out of `true` to {most} servers, fresh connections: `jobctl --fleet run` "
            "vs the faster of parallel-ssh and `xargs -P ssh`",
            f"{ours[most] * 1e3:.0f} ms",
            f"{anchor[most] * 1e3:.0f} ms (pssh {pssh[most] * 1e3:.0f}, xargs "
            f"{xargs[most] * 1e3:.0f})",
            f"{anchor[most] / ours[most]:.1f}x faster",
            "faster than ssh",
            ours[most] < anchor[most],
        ),
        Row(
            "(x') the same at " + " / ".join(map(str, HOSTS)) + " servers (ms)",
            growth,
            " / ".join(f"{anchor[n] * 1e3:.0f}" for n in HOSTS),
            " / ".join(f"{anchor[n] / ours[n]:.1f}x" for n in HOSTS),
            "-",
            True,
        ),
    ]


if __name__ == "__main__":
    for row in measure():
        print(f"{row.name}: ours {row.ours}, anchor {row.anchor}, {row.ratio}")
