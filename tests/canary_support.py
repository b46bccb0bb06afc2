"""Helpers shared by the canary and exporter tests: free ports and a reference pipeline on its own
event loop thread (so code under test can call asyncio.run beside it)."""

from __future__ import annotations

import asyncio
import socket
import threading

from probe.pipeline import ReferencePipeline


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
