"""What the tests share: the timeout factor, loopback ports, and a reference pipeline on its own
event loop thread (so code under test can call asyncio.run beside it). Test modules import these
(``from conftest import ...``; pytest puts this directory on the path)."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import threading
import time

from probe.pipeline import ReferencePipeline

# Bounds on waits scale by this on slow machines (PROBE_TEST_TIMEOUT_FACTOR=3).
SLOW = float(os.environ.get("PROBE_TEST_TIMEOUT_FACTOR", "1"))


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            lo, hi = (int(v) for v in f.read().split())
            return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A loopback port nothing listens on, chosen below the kernel's ephemeral range: a port the
    kernel handed out for port 0 and took back could be handed again to any process binding
    port 0 (a sink child, a pipeline) before the test's server binds it."""
    lo, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, lo - 12000), lo)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # the low range is crowded: take what the kernel gives
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    """Wait until something accepts connections on loopback ``port`` (scaled by SLOW)."""
    deadline = time.monotonic() + timeout * SLOW
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.1)


class BackgroundPipeline:
    """A ReferencePipeline served from a daemon thread's event loop; ``url`` ends with '/'."""

    def __init__(self, hops: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.pipeline = ReferencePipeline(hops)
        self.url = asyncio.run_coroutine_threadsafe(
            self.pipeline.start("127.0.0.1", 0), self.loop
        ).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.pipeline.stop(), self.loop).result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
