"""A job's directory: its typed records, and the only code that reads and writes them.

A job directory is self-describing, so the job outlives the server that created it:

- ``spec.json`` (:class:`SpecRecord`): what to run and how, written by the server before the
  launch; the supervisor reads it;
- ``run.json`` (:class:`RunRecord`): written by the job's supervisor once the command has
  been exec'd;
- ``output.log``: the framed output log (see ``_logformat``), appended by the supervisor;
- ``exit.json`` (:class:`ExitRecord`): the final state, written by the supervisor after the
  last output byte (by the server for a job that never got a supervisor, or whose supervisor
  vanished: "lost");
- ``final.json`` (:class:`FinalRecord`): written by the server when it sees the job end: the
  final resource usage and OOM flag (from the job's cgroup, before removing it), the disk the
  job takes, and the run and exit records, so a restart reads an ended job from two files;
- ``control.sock``: the supervisor's control socket (stop, signal) while the job runs.

Every record is validated once, where it is read (:meth:`from_json`); a record that fails
raises :class:`CorruptRecordError`, and the caller sets the directory aside.

This module is imported by the launcher, so it stays light: NamedTuples rather than
dataclasses (importing dataclasses pulls in inspect and ast, and every module the launcher
holds enlarges what each supervisor ends up copying), and no asyncio.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

__all__ = [
    "CONTROL",
    "EXIT",
    "FINAL",
    "LOG",
    "NEW_ROOT",
    "RUN",
    "SPARE_ROOT",
    "SPEC",
    "UNIFIED",
    "Bind",
    "CgroupPaths",
    "CorruptRecordError",
    "ExitRecord",
    "FinalRecord",
    "Found",
    "RunRecord",
    "SandboxRecord",
    "SpecRecord",
    "UsageRecord",
    "dir_bytes",
    "read_found",
    "read_json",
    "reserve",
    "scan",
    "set_aside",
    "start_ticks",
    "write_exit_if_missing",
    "write_record",
]

SPEC = "spec.json"
RUN = "run.json"
EXIT = "exit.json"
LOG = "output.log"
FINAL = "final.json"
CONTROL = "control.sock"
# The empty directory a sandboxed job's root is built on, in its own mount namespace.
NEW_ROOT = "root"
# The empty directory, under the state dir, where the launcher builds spare roots (each in
# a mount namespace of its own: ``_spare``).
SPARE_ROOT = "spare-root"
# The state dir's lock file (flock, held by the one server using the state dir).
LOCK_FILE = "jobworkerd.lock"
# Where directories whose records cannot be read are moved, under the state dir.
SET_ASIDE = "set-aside"
_READ_SIZE = 16384
# Room for an exit record: a few hundred bytes of JSON, with the error message.
RESERVED_BYTES = 4096
_FINAL_STATES = ("exited", "stopped", "failed")
T = TypeVar("T")


class CorruptRecordError(ValueError):
    """A record exists but is not what this release writes; the message says what is wrong."""


# ------------------------------------------------------------------ field checks
def _get(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    # The hot path of a restart (ten fields of two records for each of thousands of jobs):
    # a plain dict lookup and one isinstance, no abc checks (docs/benchmarks.md (o)).
    try:
        value = data[key]
    except KeyError:
        raise CorruptRecordError(f"{what} has no {key!r}") from None
    except TypeError:
        raise CorruptRecordError(f"{what} is not a JSON object") from None
    # bool is an int in Python; a record never means one by the other.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise CorruptRecordError(f"{what}: {key!r} is {type(value).__name__}, not the right type")
    return value


def _opt(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if data.get(key) is None:
        return None
    return _get(data, key, kind, what)


def _strings(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CorruptRecordError(f"{what} is not a list of strings")
    return tuple(value)


# A job's cgroup v2 directory in its CgroupPaths: a v2 host's one hierarchy, or the
# controller-less one of a hybrid host; every other key is a v1 controller's.
UNIFIED = "unified"


# ------------------------------------------------------------------ records
class CgroupPaths(NamedTuple):
    """A job's cgroup directories, by hierarchy ("cpu", "memory", ..., "unified"), as its
    driver created them; recorded so a restarted server finds them whatever its settings."""

    dirs: Mapping[str, str]

    @property
    def unified(self) -> str | None:
        """Its cgroup v2 directory (the one hierarchy of a v2 host, the controller-less one
        of a hybrid host), where a process of the job can be born (``_preexec.fork_in_cgroup``)."""
        return self.dirs.get(UNIFIED)

    def join_files(self, *, born_in_unified: bool) -> tuple[str, ...]:
        """What a process of the job writes "0" into, before exec, to join the job's
        cgroups (each directory once: cpu and cpuacct may share one).

        A v1 hierarchy's is its ``tasks`` file: a thread moving itself (a job's process
        is single-threaded there) is the one move the kernel makes without taking its
        global cgroup_threadgroup_rwsem for writing, which a cgroup.procs write takes and
        which can wait out an RCU grace period (docs/benchmarks.md). The v2 directory's
        is cgroup.procs (v2 moves whole processes only), unless the process was born
        there. A directory of a record that did not name its hierarchy gets cgroup.procs.
        """
        files: dict[str, str] = {}
        for kind, directory in self.dirs.items():
            if kind == UNIFIED and born_in_unified:
                continue
            v1 = kind != UNIFIED and not kind.isdigit()
            files.setdefault(directory, os.path.join(directory, "tasks" if v1 else "cgroup.procs"))
        return tuple(files.values())

    def to_json(self) -> dict[str, Any]:
        return dict(self.dirs)

    @classmethod
    def from_json(cls, data: object) -> CgroupPaths:
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v.startswith("/") for k, v in data.items()
        ):
            raise CorruptRecordError("spec.json: 'cgroup' is not a map of absolute paths")
        return cls(dict(data))


class Bind(NamedTuple):
    """A host path shown inside a job at the same path, read-only or writable."""

    path: str
    writable: bool


class SandboxRecord(NamedTuple):
    """How a job is walled in (see ``_rootfs``): its root (an image directory, or None for
    the host's root, read-only), the size of its private writable places, the host paths it
    must not see and those it is shown, whether the seccomp filter applies, and whether to
    mount a cgroup2 view of its own cgroup (cgroup v2 only)."""

    image: str | None
    image_name: str | None
    tmp_bytes: int
    hide: tuple[str, ...]
    binds: tuple[Bind, ...]
    seccomp: bool
    cgroup2: bool

    def to_json(self) -> dict[str, Any]:
        data = self._asdict()
        data["binds"] = [list(b) for b in self.binds]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SandboxRecord:
        """Raises CorruptRecordError: a field is missing or of the wrong type."""
        what = "spec.json: sandbox"
        binds = data.get("binds") or []
        if not isinstance(binds, list) or not all(
            isinstance(b, list) and len(b) == 2 and isinstance(b[0], str) for b in binds
        ):
            raise CorruptRecordError(f"{what}: binds is not a list of [path, writable]")
        return cls(
            image=_opt(data, "image", str, what),
            image_name=_opt(data, "image_name", str, what),
            tmp_bytes=_get(data, "tmp_bytes", int, what),
            hide=_strings(data.get("hide") or [], f"{what}: hide"),
            binds=tuple(Bind(str(b[0]), bool(b[1])) for b in binds),
            seccomp=_get(data, "seccomp", bool, what),
            cgroup2=bool(data.get("cgroup2", False)),
        )


class SpecRecord(NamedTuple):
    """spec.json: the job as created, and the supervisor's instructions.

    ``spec`` and ``limits`` are the JSON of the runtime's ``JobSpec`` and resolved
    ``Limits`` (validated again by the server when it builds those values); the supervisor
    needs only ``argv``, ``env`` and ``cwd`` of it, typed here."""

    id: str
    created_ns: int
    spec: Mapping[str, Any]
    limits: Mapping[str, Any]
    output_limit: int
    uid: int
    gid: int
    hostname: str
    namespaces: bool
    boot_id: str
    # Set before the launch is asked for: a server that dies from then on finds a job
    # whose supervisor may be running.
    launching: bool
    cgroup: CgroupPaths | None
    # None: not sandboxed (namespaces off, or a record of an earlier release).
    sandbox: SandboxRecord | None = None
    # The grace between SIGTERM and SIGKILL when the job's timeout stops it (None: the
    # supervisor's default, in records of an earlier release).
    stop_grace: float | None = None

    @property
    def argv(self) -> tuple[str, ...]:
        return tuple(self.spec["argv"])

    @property
    def env(self) -> dict[str, str]:
        return dict(self.spec.get("env") or {})

    @property
    def cwd(self) -> str:
        return str(self.spec.get("cwd") or "/")

    @property
    def owner(self) -> str:
        return str(self.spec["owner"])

    @property
    def host_network(self) -> bool:
        return bool(self.spec.get("host_network", False))

    @property
    def stdin_mode(self) -> str:
        """ "none" (/dev/null), "pipe" (what attached clients send) or "tty"."""
        return str(self.spec.get("stdin") or "none")

    @property
    def window(self) -> tuple[int, int]:
        """A terminal job's first size (rows, columns)."""
        rows, cols = self.spec.get("window") or (24, 80)
        return int(rows), int(cols)

    @property
    def term(self) -> str:
        return str(self.spec.get("term") or "xterm")

    @property
    def timeout_s(self) -> float | None:
        """Seconds the command may run before the supervisor stops it (None: no limit)."""
        value = self.spec.get("timeout_s")
        return float(value) if value is not None else None

    def to_json(self) -> dict[str, Any]:
        data = self._asdict()
        data["cgroup"] = self.cgroup.to_json() if self.cgroup is not None else None
        data["sandbox"] = self.sandbox.to_json() if self.sandbox is not None else None
        data["spec"] = dict(self.spec)
        data["limits"] = dict(self.limits)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SpecRecord:
        """Raises CorruptRecordError: a field is missing or of the wrong type."""
        what = "spec.json"
        spec = _get(data, "spec", dict, what)
        argv = _strings(spec.get("argv"), "spec.json: argv")
        if not argv or not argv[0]:
            raise CorruptRecordError("spec.json: argv is empty")
        env = spec.get("env") or {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise CorruptRecordError("spec.json: env is not a map of strings")
        _get(spec, "owner", str, "spec.json: spec")
        if not isinstance(spec.get("cwd", "/"), str):
            raise CorruptRecordError("spec.json: cwd is not a string")
        if not isinstance(spec.get("timeout_s") or 0, int | float):
            raise CorruptRecordError("spec.json: timeout_s is not a number")
        grace = data.get("stop_grace")
        if grace is not None and not isinstance(grace, int | float):
            raise CorruptRecordError("spec.json: stop_grace is not a number")
        cgroup = data.get("cgroup")
        if cgroup is None and data.get("cgroup_procs"):
            # Records of the release before typed records listed the procs files only.
            procs = _strings(data["cgroup_procs"], "spec.json: cgroup_procs")
            cgroup = {str(i): os.path.dirname(p) for i, p in enumerate(procs)}
        return cls(
            id=_get(data, "id", str, what),
            created_ns=_get(data, "created_ns", int, what),
            spec=spec,
            limits=_get(data, "limits", dict, what),
            output_limit=_get(data, "output_limit", int, what),
            uid=_get(data, "uid", int, what),
            gid=_get(data, "gid", int, what),
            hostname=_get(data, "hostname", str, what),
            namespaces=_get(data, "namespaces", bool, what),
            boot_id=str(data.get("boot_id") or ""),
            launching=bool(data.get("launching", False)),
            cgroup=CgroupPaths.from_json(cgroup) if cgroup else None,
            sandbox=SandboxRecord.from_json(data["sandbox"]) if data.get("sandbox") else None,
            stop_grace=grace,
        )


class RunRecord(NamedTuple):
    """run.json: where the running job is: the supervisor's pid and start time (to detect
    pid reuse), the command's host pid, and when it started."""

    supervisor_pid: int
    supervisor_start_ticks: int
    pid: int
    started_ns: int

    def to_json(self) -> dict[str, Any]:
        return self._asdict()

    def json_bytes(self) -> bytes:
        """``to_json`` as JSON text. Formatted here, not by ``json.dumps``: the supervisor
        writes it, and the json module's first use there copied 128 KiB into each idle
        supervisor (docs/benchmarks.md (d)). Four integers need no escaping."""
        return b'{"supervisor_pid":%d,"supervisor_start_ticks":%d,"pid":%d,"started_ns":%d}' % self

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunRecord:
        """Raises CorruptRecordError: a field is missing or of the wrong type."""
        return cls(*(_get(data, name, int, "run record") for name in cls._fields))


class ExitRecord(NamedTuple):
    """exit.json: how the job ended. ``state`` is "exited", "stopped" or "failed";
    ``reason`` says more in one word where there is more to say (see ``JobStatus``)."""

    state: str
    exit_code: int | None
    signal: int | None
    error: str | None
    ended_ns: int
    output_truncated: bool
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return self._asdict()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExitRecord:
        """Raises CorruptRecordError: a field is missing or of the wrong type."""
        what = "exit record"
        state = _get(data, "state", str, what)
        if state not in _FINAL_STATES:
            raise CorruptRecordError(f"{what}: state {state!r} is not a final state")
        return cls(
            state=state,
            exit_code=_opt(data, "exit_code", int, what),
            signal=_opt(data, "signal", int, what),
            error=_opt(data, "error", str, what),
            ended_ns=_get(data, "ended_ns", int, what),
            output_truncated=bool(data.get("output_truncated", False)),
            reason=_opt(data, "reason", str, what),
        )


class UsageRecord(NamedTuple):
    """Resources a job used, as recorded (the runtime's ``Usage`` without its import)."""

    cpu_seconds: float
    memory_bytes: int
    memory_peak_bytes: int | None
    io_read_bytes: int
    io_write_bytes: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UsageRecord:
        what = "usage record"
        return cls(
            cpu_seconds=float(_get(data, "cpu_seconds", (int, float), what)),
            memory_bytes=_get(data, "memory_bytes", int, what),
            memory_peak_bytes=_opt(data, "memory_peak_bytes", int, what),
            io_read_bytes=_get(data, "io_read_bytes", int, what),
            io_write_bytes=_get(data, "io_write_bytes", int, what),
        )


class FinalRecord(NamedTuple):
    """final.json: everything a restart needs of an ended job, in one file."""

    run: RunRecord | None
    exit: ExitRecord
    usage: UsageRecord | None
    oom_killed: bool
    disk_bytes: int
    # A fork failed for the job's pids limit at least once (pids.events "max").
    pids_limited: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run.to_json() if self.run is not None else None,
            "exit": self.exit.to_json(),
            "usage": self.usage._asdict() if self.usage is not None else None,
            "oom_killed": self.oom_killed,
            "disk_bytes": self.disk_bytes,
            "pids_limited": self.pids_limited,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FinalRecord:
        """Raises CorruptRecordError: a field is missing or of the wrong type."""
        run, usage = data.get("run"), data.get("usage")
        return cls(
            run=RunRecord.from_json(run) if run is not None else None,
            exit=ExitRecord.from_json(_get(data, "exit", dict, "final.json")),
            usage=UsageRecord.from_json(usage) if usage is not None else None,
            oom_killed=bool(data.get("oom_killed", False)),
            disk_bytes=int(data.get("disk_bytes", 0)),
            pids_limited=bool(data.get("pids_limited", False)),
        )


# ------------------------------------------------------------------ file I/O
def write_json_atomic(dir_fd: int, name: str, data: dict[str, Any], *, durable: bool) -> None:
    """Write ``name`` in the directory ``dir_fd`` so readers see the old file or the new one.

    ``durable`` adds an fsync, for records that must survive a power loss; the hot start path
    skips it, since a job whose host lost power is reported as lost anyway.

    Raises:
        OSError: the write failed (e.g. ENOSPC).
    """
    write_atomic(dir_fd, name, json.dumps(data, separators=(",", ":")).encode(), durable=durable)


def write_atomic(dir_fd: int, name: str, body: bytes, *, durable: bool) -> None:
    """:func:`write_json_atomic` of JSON text already made.

    Raises:
        OSError: the write failed (e.g. ENOSPC).
    """
    tmp = _tmp_name(name)
    # No O_TRUNC: a temp file set aside by reserve() keeps its blocks, so the write needs no
    # new space even on a full disk; the truncate after it only ever shrinks the file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        if os.pwrite(fd, body, 0) != len(body):
            raise OSError(errno.ENOSPC, f"short write of {name}")
        os.ftruncate(fd, len(body))
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def write_record(directory: str, name: str, data: dict[str, Any], *, durable: bool = False) -> None:
    """:func:`write_json_atomic` by path.

    Raises:
        OSError: the directory is gone or the write failed.
    """
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        write_json_atomic(dir_fd, name, data, durable=durable)
    finally:
        os.close(dir_fd)


def write_exit_if_missing(directory: str, record: ExitRecord) -> None:
    """exit.json for a job that has no supervisor to write it; durable, as the supervisor's.

    Raises:
        OSError: the write failed.
    """
    if not os.path.exists(os.path.join(directory, EXIT)):
        write_record(directory, EXIT, record.to_json(), durable=True)


def _tmp_name(name: str) -> str:
    return f".{name}.tmp"


def reserve(dir_fd: int, name: str, size: int = RESERVED_BYTES) -> None:
    """Set disk space aside now for a later :func:`write_json_atomic` of ``name``, so that
    record can still be written once output has filled the disk. Best effort: a filesystem
    without fallocate simply gets no reservation."""
    fd = os.open(_tmp_name(name), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        with contextlib.suppress(OSError):
            os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def start_ticks(pid_path: str) -> int:
    """Field 22 of /proc/PID/stat: with the pid it names a process uniquely across reuse.

    Raises:
        OSError: the process is gone.
    """
    fd = os.open(f"{pid_path}/stat", os.O_RDONLY | os.O_CLOEXEC)
    try:
        stat = os.read(fd, 4096)
    finally:
        os.close(fd)
    # The command name (field 2) may contain spaces and parentheses; split after the last ')'.
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object at ``path``, or None if the file does not exist.

    Raises:
        CorruptRecordError: the file is not a JSON object.
        OSError: it cannot be read.
    """
    # Raw fd reads, not open(): a restart reads two records per job, and the buffered file
    # object's set-up cost three times the read itself (measured: docs/benchmarks.md (o)).
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        parts = [os.read(fd, _READ_SIZE)]
        while len(parts[-1]) == _READ_SIZE:
            parts.append(os.read(fd, _READ_SIZE))
    finally:
        os.close(fd)
    try:
        data = json.loads(b"".join(parts))
    except ValueError as e:
        raise CorruptRecordError(f"{os.path.basename(path)} is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise CorruptRecordError(f"{os.path.basename(path)} is not a JSON object")
    return data


def read_exit(directory: str) -> ExitRecord | None:
    """exit.json, or None while the job has not ended.

    Raises:
        CorruptRecordError: it is not a valid exit record.
    """
    data = read_json(os.path.join(directory, EXIT))
    return ExitRecord.from_json(data) if data is not None else None


class Found(NamedTuple):
    """One job directory as found on disk, every record validated."""

    directory: str
    spec: SpecRecord
    run: RunRecord | None
    exit: ExitRecord | None
    final: FinalRecord | None


def read_found(directory: str) -> Found | None:
    """The records in ``directory``; None if it holds no spec (a create cut short before
    its spec.json was renamed into place, so no job was ever reported to anyone).

    Raises:
        CorruptRecordError: a record is not valid.
        OSError: the directory cannot be read.
    """
    data = read_json(os.path.join(directory, SPEC))
    if data is None:
        return None
    spec = SpecRecord.from_json(data)
    if spec.id != os.path.basename(directory):
        raise CorruptRecordError(f"spec.json names job {spec.id!r}, not its directory's")
    final_data = read_json(os.path.join(directory, FINAL))
    if final_data is not None and final_data.get("exit") is not None:
        # An ended job, recorded in full by the server that saw it end: two reads, not four.
        final = FinalRecord.from_json(final_data)
        return Found(directory, spec, final.run, final.exit, final)
    # Exit first: a supervisor writes run.json before exit.json, so having read exit.json
    # we cannot miss a run.json that exists.
    exit_record = read_exit(directory)
    run_data = read_json(os.path.join(directory, RUN))
    run = RunRecord.from_json(run_data) if run_data is not None else None
    return Found(directory, spec, run, exit_record, None)


def scan(
    jobs_dir: str, check: Callable[[Found], T]
) -> tuple[list[tuple[Found, T]], list[str], list[tuple[str, str]]]:
    """Every job directory under ``jobs_dir``: ((found, check(found)) for each job,
    directories without a spec, and (directory, reason) for those whose records are
    corrupt). ``check`` validates further (the server builds its typed spec there); a
    ``ValueError`` from it marks the directory corrupt too.

    Raises:
        OSError: ``jobs_dir`` cannot be listed.
    """
    found: list[tuple[Found, T]] = []
    empty: list[str] = []
    corrupt: list[tuple[str, str]] = []
    with os.scandir(jobs_dir) as entries:
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                continue
            try:
                job = read_found(entry.path)
                extra = check(job) if job is not None else None
            except (OSError, ValueError) as e:
                corrupt.append((entry.path, str(e) or type(e).__name__))
                continue
            if job is None:
                empty.append(entry.path)
            elif extra is not None:
                found.append((job, extra))
    return found, empty, corrupt


def set_aside(state_dir: str, directory: str, reason: str) -> str:
    """Move a job directory whose records cannot be used to ``<state_dir>/set-aside/``,
    with a ``REASON`` file, so the server starts without it and an operator can look.
    Returns the new path.

    Raises:
        OSError: it could not be moved.
    """
    target_dir = os.path.join(state_dir, SET_ASIDE)
    os.makedirs(target_dir, mode=0o700, exist_ok=True)
    target = os.path.join(target_dir, os.path.basename(directory))
    suffix = 0
    while os.path.exists(target):
        suffix += 1
        target = os.path.join(target_dir, f"{os.path.basename(directory)}.{suffix}")
    os.rename(directory, target)
    with contextlib.suppress(OSError):
        fd = os.open(os.path.join(target, "REASON"), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, reason.encode("utf-8", "replace") + b"\n")
        finally:
            os.close(fd)
    return target


def dir_bytes(directory: str) -> int:
    """Disk taken by a job's directory (its files are all at the top level)."""
    total = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total
