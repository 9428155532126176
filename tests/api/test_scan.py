"""An external TLS scanner against the running server: only TLS 1.3 is offered."""

from __future__ import annotations

import asyncio
import re
import shutil

from .conftest import Running


async def test_sslscan_sees_only_tls13(api: Running) -> None:
    sslscan = shutil.which("sslscan")
    assert sslscan is not None, "sslscan is missing; ./dev installs it (apt-get install sslscan)"
    proc = await asyncio.create_subprocess_exec(
        sslscan,
        "--no-colour",
        "--no-ciphersuites",
        "--no-heartbleed",
        "--no-groups",
        f"127.0.0.1:{api.port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    report = out.decode()
    assert proc.returncode == 0, err.decode()
    enabled = dict(
        re.findall(r"^(SSLv[23]|TLSv1\.[0-3])\s+(enabled|disabled)", report, re.MULTILINE)
    )
    assert enabled == {
        "SSLv2": "disabled",
        "SSLv3": "disabled",
        "TLSv1.0": "disabled",
        "TLSv1.1": "disabled",
        "TLSv1.2": "disabled",
        "TLSv1.3": "enabled",
    }, report
