"""Which forks a run's sink admits: those that present the run's capability (sans-I/O).

PROTOCOL.md section 2 has hops fork to the ``sink`` URL exactly as given, path included, and lets
the probe put a per-run capability there and refuse, with close code 1008, forks that do not
present it. The probe does: every sink URL it hands out ends in a path segment that is an
unguessable capability (:func:`new_capability`, 144 random bits), or the operator's
``--sink-secret`` for hops configured statically with a fixed URL. A fork whose request path does
not end in it is refused and counted by reason (:data:`NO_CAPABILITY`, :data:`WRONG_CAPABILITY`),
never as a hop.

What this does not stop: anyone who can read the ``start`` message (an on-path relay on a
``ws://`` ingress, or any hop of the pipeline itself) learns the capability of that run. TLS on the
ingress (``wss://``) hides it from the network; hops are trusted by construction.
"""

from __future__ import annotations

import hmac
import re
import secrets
from urllib.parse import urlsplit, urlunsplit

from probe.errors import ConfigError

__all__ = [
    "MAX_FORKS",
    "NO_CAPABILITY",
    "TOO_MANY_FORKS",
    "WRONG_CAPABILITY",
    "Admission",
    "check_secret",
    "new_capability",
    "with_capability",
]

NO_CAPABILITY = "no capability in the sink URL"
WRONG_CAPABILITY = "wrong capability in the sink URL"
# Forks a sink holds at once by default (--max-forks): far above what a run's sessions times its
# hops need (1000 sessions at once through 5 hops is 5000), low enough that a flood of
# connections cannot take every file descriptor and the memory of their detection streams.
MAX_FORKS = 10_000
TOO_MANY_FORKS = "too many forks at once (--max-forks)"
_SECRET = re.compile(r"[A-Za-z0-9_-]{16,128}")


def new_capability() -> str:
    """A fresh per-run capability: 24 URL-safe characters (144 random bits)."""
    return secrets.token_urlsafe(18)


def check_secret(value: str, label: str) -> str:
    """A ``--sink-secret`` as given, or ConfigError with one sentence naming ``label``."""
    if not _SECRET.fullmatch(value):
        raise ConfigError(
            f"{label} must be 16 to 128 characters of A-Z, a-z, 0-9, '_' and '-' (it becomes "
            "the last path segment of the sink URL)."
        )
    return value


def with_capability(url: str, capability: str) -> str:
    """``url`` with ``capability`` appended as its last path segment (query kept)."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/") + "/" + capability
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))


class Admission:
    """The rule of one sink: admit a fork whose request path ends in ``capability`` (None:
    admit every fork, for a sink run without one)."""

    def __init__(self, capability: str | None) -> None:
        self.capability = capability

    def refuse(self, request_path: str) -> str | None:
        """Why a fork with this request path (and query) is refused, or None to admit it."""
        if self.capability is None:
            return None
        path = urlsplit(request_path).path.rstrip("/")
        last = path.rsplit("/", 1)[-1]
        if hmac.compare_digest(last.encode("utf-8"), self.capability.encode("utf-8")):
            return None
        return NO_CAPABILITY if last in ("", "sink") else WRONG_CAPABILITY
