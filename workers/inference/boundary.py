"""The trust boundary: what a request may steer, checked before the worker acts on it.

A request is data from an outsider. Two of its fields name things the worker touches: the
topic a reply is written to, and the model version that serves it (which also becomes part of
object keys and of the monitor's window keys). Both are checked here, against settings and
what the backend says, never trusted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipeline.backends.signature import ModelSignature

_TOPIC_CHARS = "[A-Za-z0-9._-]+"
MAX_TOPIC_LENGTH = 249
"""Kafka's own limit on a topic name."""


class ReplyPolicy:
    """Which topics a request's ``reply_to`` may name (an allow-list of patterns)."""

    def __init__(self, patterns: Sequence[str], namespace: str) -> None:
        self.patterns = tuple(p.replace("{namespace}", namespace) for p in patterns)
        self._regexes = [_pattern_regex(p) for p in self.patterns]

    def allows(self, topic: str | None) -> bool:
        if not topic or len(topic) > MAX_TOPIC_LENGTH:
            return False
        return any(regex.fullmatch(topic) for regex in self._regexes)


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """``*`` matches one or more topic characters; everything else matches itself."""
    return re.compile(_TOPIC_CHARS.join(re.escape(part) for part in pattern.split("*")))


@dataclass(frozen=True)
class VersionVerdict:
    allowed: bool
    detail: str = ""


class VersionPolicy:
    """Whether a pinned ``model_version`` may be served.

    A version the backend lists is allowed; one it does not list is refused. Where the
    backend has not said which versions it has, the routing table's versions and a strict
    pattern decide, and the backend's own answer stays the last word.
    """

    def __init__(
        self,
        pattern: str,
        signature_of: Callable[[str], ModelSignature | None],
        routed_versions: Callable[[str], set[str]],
    ) -> None:
        self._pattern = re.compile(pattern)
        self._signature_of = signature_of
        self._routed_versions = routed_versions

    def judge(self, model: str, version: str) -> VersionVerdict:
        shown = version if len(version) <= 64 else version[:61] + "..."
        signature = self._signature_of(model)
        if signature is not None and signature.versions is not None:
            if version in signature.versions:
                return VersionVerdict(True)
            return VersionVerdict(
                False,
                f"version {shown!r} of {model!r} is not served "
                f"(served: {', '.join(sorted(signature.versions))})",
            )
        if version in self._routed_versions(model):
            return VersionVerdict(True)
        if self._pattern.fullmatch(version):
            return VersionVerdict(True)
        return VersionVerdict(False, f"version {shown!r} is not a valid version name")
