"""Job names, labels and label selectors, in the syntax Kubernetes users already know.

Shared by the runtime (which validates a job's name and labels when it is created), the API
(which parses a listing's selector) and jobctl (which checks them before sending). Written by
hand: the rules are a few regular expressions, and no maintained Python library carries
Kubernetes' selector grammar without the whole client.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "LabelError",
    "Requirement",
    "Selector",
    "check_labels",
    "check_name",
    "parse_selector",
]

MAX_LABELS = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# A label key's name part, and a value: 63 characters at most, alphanumeric at both ends.
_SEGMENT = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


class LabelError(ValueError):
    """A name, label or selector is malformed; the message says which and how to fix it."""


def check_name(name: str) -> str:
    """``name`` if it can name a job.

    Raises:
        LabelError: it is not 1-63 letters, digits, '_', '.' or '-' starting with a letter
            or digit, or it is shaped like a job id (which would then be ambiguous).
    """
    if not _NAME.fullmatch(name):
        raise LabelError(
            f"name {_shown(name)} is not valid: use 1-63 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    try:
        uuid.UUID(name)
    except ValueError:
        return name
    raise LabelError(f"name {_shown(name)} looks like a job id; choose another")


def _check_key(key: str) -> None:
    prefix, slash, name = key.rpartition("/")
    if slash and not (
        0 < len(prefix) <= 253 and all(_DNS_LABEL.fullmatch(p) for p in prefix.split("."))
    ):
        raise LabelError(
            f"label key {_shown(key)} has a bad prefix: it must be a DNS subdomain, "
            "e.g. example.com/tier"
        )
    if not name or not _SEGMENT.fullmatch(name):
        raise LabelError(
            f"label key {_shown(key)} is not valid: use 1-63 letters, digits, '-', '_' or "
            "'.', starting and ending with a letter or digit (optionally after 'prefix/')"
        )


def _check_value(key: str, value: str) -> None:
    if not _SEGMENT.fullmatch(value):
        raise LabelError(
            f"label {_shown(key)} has a bad value {_shown(value)}: use at most 63 letters, "
            "digits, '-', '_' or '.', starting and ending with a letter or digit"
        )


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """``labels`` as a plain dict, if every key and value is valid.

    Raises:
        LabelError: too many labels, or a key or value is malformed (named in the message).
    """
    if len(labels) > MAX_LABELS:
        raise LabelError(f"{len(labels)} labels is too many; at most {MAX_LABELS}")
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise LabelError("label keys and values must be strings")
        _check_key(key)
        _check_value(key, value)
    return dict(labels)


@dataclass(frozen=True, slots=True)
class Requirement:
    """One clause of a selector: ``key``, an operator, and the values it compares with.

    ``op`` is "in" (k=v, k==v, k in (...)), "notin" (k!=v, k notin (...)), "exists" (k)
    or "!exists" (!k). As in Kubernetes, "notin" also holds for a job without the key.
    """

    key: str
    op: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        value = labels.get(self.key)
        if self.op == "in":
            return value in self.values
        return value not in self.values


@dataclass(frozen=True, slots=True)
class Selector:
    """Every requirement must hold; an empty selector matches every job."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def __bool__(self) -> bool:
        return bool(self.requirements)


_CLAUSE = re.compile(
    r"\s*(?:"
    r"(?P<not>!)\s*(?P<nkey>[^\s,=!()]+)"
    r"|(?P<skey>[^\s,=!()]+)\s+(?P<setop>in|notin)\s*\((?P<set>[^()]*)\)"
    r"|(?P<key>[^\s,=!()]+)\s*(?:(?P<op>==|=|!=)\s*(?P<value>[^\s,=!()]*))?"
    r")\s*(?:,|$)"
)


def parse_selector(text: str) -> Selector:
    """The selector ``text`` spells (Kubernetes' equality and set syntax).

    Raises:
        LabelError: it does not parse, or names a malformed key or value.
    """
    requirements = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        match = _CLAUSE.match(text, pos)
        if match is None or match.end() == pos:
            raise LabelError(
                f"selector {_shown(text)} does not parse near {_shown(text[pos : pos + 20])}; "
                "write e.g. app=web,tier!=db or 'env in (a,b)'"
            )
        pos = match.end()
        if match["nkey"]:
            _check_key(match["nkey"])
            requirements.append(Requirement(match["nkey"], "!exists"))
        elif match["skey"]:
            values = frozenset(v.strip() for v in match["set"].split(",") if v.strip())
            _check_key(match["skey"])
            for value in values:
                _check_value(match["skey"], value)
            requirements.append(Requirement(match["skey"], match["setop"], values))
        else:
            key = match["key"]
            _check_key(key)
            if match["op"] is None:
                requirements.append(Requirement(key, "exists"))
                continue
            _check_value(key, match["value"])
            op = "notin" if match["op"] == "!=" else "in"
            requirements.append(Requirement(key, op, frozenset({match["value"]})))
    return Selector(tuple(requirements))


def _shown(text: str) -> str:
    """``text`` quoted for an error message, cut short and with no control characters."""
    cut = text if len(text) <= 80 else text[:80] + "..."
    return repr(cut)
