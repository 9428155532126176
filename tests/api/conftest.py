"""A real jobworkerd on 127.0.0.1 with certificates made for the test, and real clients."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from jobworker.api._auth import CertPool
from jobworker.api._proto import jobworker_pb2 as pb
from jobworker.api._proto import jobworker_pb2_grpc as pb_grpc
from jobworker.api._tls import TlsFiles
from jobworker.api.client import connect
from jobworker.api.server import Server, ServerConfig
from jobworker.certs import Issued, issue_client, load, make_dev_pki, save
from jobworker.identity import Role
from jobworker.runtime import JobEndedError, State

from ..conftest import make_config

USERS = {"admin": Role.ADMIN, "alice": Role.USER, "bob": Role.USER}


@dataclass
class Pki:
    dir: Path
    ca: Issued = field(init=False)

    def __post_init__(self) -> None:
        self.ca = load(self.dir / "ca")

    def files(self, user: str) -> TlsFiles:
        return TlsFiles(self.dir / "ca.pem", self.dir / f"{user}.pem", self.dir / f"{user}.key")

    def issue(self, name: str, **kw: Any) -> str:
        """Issue one more client certificate signed by the test CA; return its file name."""
        save(issue_client(self.ca, kw.pop("cn", name), **kw), self.dir / name)
        return name


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    make_dev_pki(tmp_path / "pki", USERS)
    return Pki(tmp_path / "pki")


@dataclass
class Running:
    server: Server
    pki: Pki

    @property
    def port(self) -> int:
        return self.server.ports[0]

    @contextlib.asynccontextmanager
    async def client(
        self, user: str = "alice", *, target_name: str | None = None
    ) -> AsyncIterator[pb_grpc.JobServiceStub]:
        async with connect(
            f"127.0.0.1:{self.port}", self.pki.files(user), server_name=target_name
        ) as ch:
            yield pb_grpc.JobServiceStub(ch)


async def start_server(tmp_path: Path, pki: Pki, **kw: Any) -> Server:
    runtime_kw = kw.pop("runtime", {})
    config = ServerConfig(
        tls=TlsFiles(pki.dir / "ca.pem", pki.dir / "server.pem", pki.dir / "server.key"),
        runtime=make_config(tmp_path / "state", **runtime_kw),
        listen=("127.0.0.1:0",),
        **kw,
    )
    return await Server.start(config)


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, pki: Pki, **kw: Any) -> AsyncIterator[Running]:
    async with asyncio.timeout(60):
        server = await start_server(tmp_path, pki, **kw)
    try:
        yield Running(server, pki)
    finally:
        async with asyncio.timeout(60):
            for status in await server.runtime.jobs():
                if status.state is State.RUNNING:
                    # It may end by itself meanwhile: then there is nothing to stop.
                    with contextlib.suppress(JobEndedError):
                        await server.runtime.stop(status.id, grace=0)
            await server.stop(grace=0)


@pytest_asyncio.fixture
async def api(tmp_path: Path, pki: Pki) -> AsyncIterator[Running]:
    async with serving(tmp_path, pki) as running:
        yield running


def cert_pool(
    tmp_path: Path, *, allowed: list[str] | None = None, revoked: list[str] | None = None
) -> CertPool:
    allow_path = None
    if allowed is not None:
        allow_path = tmp_path / "allow.txt"
        allow_path.write_text("\n".join(allowed) + "\n")
    revoked_path = tmp_path / "revoked.txt"
    revoked_path.write_text("# revoked\n" + "\n".join(revoked or []) + "\n")
    return CertPool(allow_path, revoked_path)


async def end_stdin(client: pb_grpc.JobServiceStub, job_id: str) -> None:
    """Attach to the job, send EOF on its stdin, and read on until it has ended."""
    call = client.Attach(timeout=30)
    await call.write(pb.AttachRequest(start=pb.AttachStart(id=job_id, stdin=True)))
    await call.write(pb.AttachRequest(close_stdin=True))
    await call.done_writing()
    async for _ in call:
        pass


async def code_of(call: Any) -> grpc.StatusCode:
    """The status a call (unary, or a stream read to its end) finished with."""
    try:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Orphans of a killed server (its launcher) re-parent to us, not to a PID 1 that may
    not reap them; reap what is left afterwards."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
