"""The one ``HOST:PORT`` rule of every listen option, environment variable and scenario key.

``HOST:PORT`` or ``[v6]:PORT`` with a port from 0 to 65535 (0: any free port); a ``ws://`` prefix
and a trailing ``/`` are tolerated (a URL pasted where an address was asked); a bare ``PORT`` or
``:PORT`` listens on loopback (127.0.0.1), never on every interface by accident. Anything else is
a :class:`~probe.errors.ConfigError` with one sentence naming the option.
"""

from __future__ import annotations

from probe.errors import ConfigError

__all__ = ["LOOPBACK", "parse_host_port"]

LOOPBACK = "127.0.0.1"


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    """``text`` as (host, port) by the module's rule; ``what`` names the option in the error."""
    raw = text.strip()
    body = raw.removeprefix("ws://").rstrip("/")
    host, sep, port = body.rpartition(":")
    if not sep:
        host, port = "", body
    if host.startswith("[") != host.endswith("]"):
        port = ""  # an unclosed IPv6 bracket is no address
    host = host.strip("[]") or LOOPBACK
    if not port.isdigit() or int(port) > 65535 or "/" in host or " " in host:
        raise ConfigError(
            f"{what} must be HOST:PORT with a port from 0 to 65535 (e.g. 127.0.0.1:8766), "
            f"got {text!r}."
        )
    return host, int(port)
