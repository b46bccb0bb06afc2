"""Locust load runs with probe sessions (issue 5).

``from probe.locust import AudioProbeUser`` in a locustfile, subclass it, and run
``locust -f scenarios/locust_reference.py --host ws://...``. Taking the user classes imports
Locust (which monkey-patches the standard library for gevent) and registers the event listeners of
:mod:`probe.locust.plugin`; the package itself imports nothing heavy.

- `session`: one session with gevent, paced on an absolute schedule;
- `wsconn`: its WebSocket client (websockets' sans-I/O protocol on a gevent socket);
- `sinkproc`: the worker's own fork sink and all its marker detection in a child process
  (:mod:`probe.aio.sinkproc`), talked to from greenlets;
- `engine`: registry, sink child process and pump of one process;
- `report`: Locust request events; `hopstats`: exact per-hop statistics across workers;
- `hopchart`: the Hops tab's picture (SVG);
- `user`: the closed-loop and open-model users; `plugin`: the event wiring and the Hops tab.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AudioProbeUser", "OpenAudioProbeUser"]


def __getattr__(name: str) -> Any:
    # Lazy: the sans-I/O parts (hopstats) import without Locust, so without its monkey patching.
    if name in __all__:
        from probe.locust import user

        return getattr(user, name)
    raise AttributeError(f"module 'probe.locust' has no attribute {name!r}")
