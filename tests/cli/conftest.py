"""The API tests' certificate fixture, for the CLI tests' real server."""

from __future__ import annotations

from ..api.conftest import pki

__all__ = ["pki"]
