"""TLS for the probe's own connections: a CA bundle for ``wss://`` targets, a certificate for a
``wss://`` sink. Each problem with the files is one sentence (ConfigError), found before a run.

Without ``--ca`` a ``wss://`` target is checked against the system's trust store (Python's
default context, which also honours ``SSL_CERT_FILE``); with it, against that bundle alone.
"""

from __future__ import annotations

import ssl
from functools import lru_cache

from probe.errors import ConfigError

__all__ = ["client_context", "connect_ssl", "server_context"]


@lru_cache(maxsize=8)
def client_context(ca_file: str | None) -> ssl.SSLContext | None:
    """The context for ``wss://`` connections that trust ``ca_file`` (None: the default)."""
    if ca_file is None:
        return None
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"--ca {ca_file}: cannot load a CA bundle from it ({why}).") from exc


def connect_ssl(url: str, ca_file: str | None) -> ssl.SSLContext | None:
    """The ``ssl`` argument of a websockets ``connect`` to ``url``: None for ``ws://``; for
    ``wss://`` the context of ``ca_file``, or the default one."""
    if not url.startswith("wss:"):
        return None
    return client_context(ca_file) or _default_context()


@lru_cache(maxsize=1)
def _default_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The context of a ``wss://`` server with this certificate chain and private key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(
            f"--sink-tls-cert {cert_file} / --sink-tls-key {key_file}: cannot load the "
            f"certificate and key ({why})."
        ) from exc
    return ctx
