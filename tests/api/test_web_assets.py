"""The web console's shipped files: vendored libraries as published, every asset a page names
present, and colours readable (WCAG AA contrast)."""

from __future__ import annotations

import hashlib
import re

import pytest

from jobworker.api import _webpage
from jobworker.api._proto import jobworker_pb2 as pb
from jobworker.api._web import STATIC

VENDOR = STATIC / "vendor"


def test_vendored_files_are_the_published_ones() -> None:
    table = (VENDOR / "README.md").read_text()
    pinned = dict(re.findall(r"^\| (\S+) \|[^|]*\| ([0-9a-f]{64}) \|$", table, re.MULTILINE))
    shipped = {p.name for p in VENDOR.iterdir() if p.name != "README.md"}
    assert set(pinned) == shipped
    for name, digest in pinned.items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, name


def test_every_asset_a_page_names_is_shipped() -> None:
    chrome = _webpage.Chrome("host", "alice", "user", "token")
    job = pb.Job(id="0" * 8 + "-0000-4000-8000-" + "0" * 12, owner="alice", argv=["true"])
    pages = [
        _webpage.jobs_page(chrome, ""),
        _webpage.job_page(chrome, job, 5.0),
        _webpage.start_page(chrome, {}),
        _webpage.error_page(404, "no such job"),
    ]
    named = {m for page in pages for m in re.findall(r'(?:src|href)="/static/([^"]+)"', page)}
    assert named
    for asset in named:
        assert (STATIC / asset).is_file(), asset
    for page in pages:
        assert "<script>" not in page
        assert " style=" not in page
        assert not re.search(r"<[^>]*\son\w+=", page), "an inline event handler"


def _luminance(colour: str) -> float:
    channels = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def _contrast(a: str, b: str) -> float:
    light, dark = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


CSS = (STATIC / "console.css").read_text()
VARS = dict(re.findall(r"--([\w-]+): (#[0-9a-f]{6})", CSS))
# Every ANSI foreground class, shown on the output's background.
ANSI = re.findall(r"\.f\d+ \{ color: (#[0-9a-f]{6}); \}", CSS)
PAIRS = [
    ("text", VARS["fg"], VARS["bg"]),
    ("muted text", VARS["muted"], VARS["bg"]),
    ("muted text in the header", VARS["muted"], "#f6f8fa"),
    ("links and running", VARS["accent"], VARS["bg"]),
    ("exited", VARS["ok"], VARS["bg"]),
    ("created", VARS["warn"], VARS["bg"]),
    ("failed and problems", VARS["danger"], VARS["bg"]),
    ("a danger button", "#ffffff", VARS["danger"]),
    ("a disabled danger button", "#5a1410", "#e8b4b0"),
    ("output", VARS["code-fg"], VARS["code-bg"]),
    ("stderr", "#ffa198", VARS["code-bg"]),
    ("jobworker's notes", "#d2a8ff", VARS["code-bg"]),
    ("the legend's notes", "#6f42c1", VARS["bg"]),
] + [(f"ANSI colour {c}", c, VARS["code-bg"]) for c in ANSI]


@pytest.mark.parametrize(("what", "fg", "bg"), PAIRS, ids=[p[0] for p in PAIRS])
def test_colours_meet_wcag_aa(what: str, fg: str, bg: str) -> None:
    assert len(ANSI) == 16
    assert _contrast(fg, bg) >= 4.5, f"{what}: {fg} on {bg} is {_contrast(fg, bg):.2f}:1"
