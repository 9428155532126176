"""The committed generated gRPC code matches the proto and the pinned generator."""

from __future__ import annotations

import asyncio
import filecmp
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "src" / "jobworker" / "api" / "_proto"


async def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        str(ROOT / "tools" / "gen-proto"),
        str(tmp_path),
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(p.name for p in COMMITTED.iterdir() if p.suffix in {".py", ".pyi"})
    stale = [n for n in names if not filecmp.cmp(tmp_path / n, COMMITTED / n, shallow=False)]
    assert stale == [], f"stale generated code: {stale}; run tools/gen-proto and commit"


async def test_api_reference_is_current(tmp_path: Path) -> None:
    out = tmp_path / "api.md"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "tools" / "gen_api_doc.py"),
        str(out),
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    assert out.read_text() == (ROOT / "docs" / "api.md").read_text(), (
        "docs/api.md is stale; run .venv/bin/python tools/gen_api_doc.py and commit"
    )
