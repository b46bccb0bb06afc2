"""The event loop the probe's asyncio processes run on: uvloop where it is installed.

The sink child receives one WebSocket frame per hop for every frame a session sends, and the
reference pipeline relays and forks every frame: per frame, asyncio's pure-Python event loop
costs more than the protocol work. uvloop (libuv, in C) runs the same code; measured side by side
on 100 paced streams of 20 ms frames, a websockets server spent 12.9 us of CPU per frame on
uvloop against 24.9 us on the default loop (``benchmarks/locust_capacity.py`` shows the effect
on the whole chain). Without uvloop (another platform), or with ``PROBE_UVLOOP=0`` in the
environment, the default loop runs everything the same.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["loop_factory", "run"]

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop constructor, or None (asyncio's default) when uvloop is not installed or
    ``PROBE_UVLOOP=0``."""
    if os.environ.get("PROBE_UVLOOP", "1").strip() == "0":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on :func:`loop_factory`'s loop."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
