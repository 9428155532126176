"""The API tests' fixtures the CLI tests share: certificates, and a subreaper for killed
servers' orphans."""

from __future__ import annotations

from ..api.conftest import pki, subreaper

__all__ = ["pki", "subreaper"]
