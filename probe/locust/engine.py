"""The probe machinery of one Locust worker process: registry, sink child process, pump.

One :class:`ProbeEngine` per process that runs users (a worker, or a local run). It owns

- the :class:`SessionRegistry` every session of the process reports to, with an
  :class:`~probe.measure.observe.Observers` fan-out (own latency joined live) to the Locust
  reporter, the exact Hops statistics and, when configured, telemetry;
- the process's sink in a child process (:class:`~probe.locust.sinkproc.GeventSinkProcess`), whose
  URL goes in every ``start`` so a marker comes back to the worker that sent it, and which also
  detects the markers of every session's return direction: no detection runs in this process,
  which only paces and reads the sessions' sockets;
- the pump greenlet that declares markers missed once they are older than the marker timeout.

Configuration comes from the environment at the edge (:meth:`EngineConfig.from_env`). The child
stamps arrivals with the wall clock, so the engine's clock must be ``time.time`` too.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import gevent

from probe.errors import ConfigError
from probe.hostport import parse_host_port
from probe.locust.sinkproc import GeventSinkProcess
from probe.measure.observe import Observers, RunObserver
from probe.measure.registry import SessionRegistry

__all__ = ["EngineConfig", "ProbeEngine", "parse_listen"]


def parse_listen(text: str, what: str) -> tuple[str, int]:
    """``PROBE_SINK_LISTEN`` by the one rule of :mod:`probe.hostport`."""
    return parse_host_port(text, what)


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Where the sink listens and what it advertises; how markers settle."""

    sink_host: str = "127.0.0.1"
    sink_port: int = 0
    # The URL hops should fork to, when it differs from the bound one (another host, NAT, k8s).
    sink_url: str | None = None
    # The host name or address other hosts reach this worker by; the bound port is added.
    advertise_host: str | None = None
    use_sink: bool = True
    marker_timeout_s: float = 10.0
    hop_order: Sequence[str] = field(default_factory=tuple)
    # OS niceness of the sink child's detection thread. Detection works on frames already
    # stamped, so under CPU contention it yields to the paced sessions, the child's socket reads
    # and the target (benchmarks/locust_capacity.py, 40 streams on 2 shared cores, 4 runs each:
    # send lag p99 4.0-8.3 ms at 10 against 7.5-16.8 ms at 0).
    detect_nice: int = 10

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EngineConfig:
        """``PROBE_SINK_LISTEN`` (HOST:PORT, default 127.0.0.1:0, or 0.0.0.0:0 when
        ``PROBE_SINK_HOST`` is set), ``PROBE_SINK_HOST``, ``PROBE_SINK_URL``, ``PROBE_NO_SINK``,
        ``PROBE_MARKER_TIMEOUT`` (s), ``PROBE_HOP_ORDER`` (a,b,c), ``PROBE_DETECT_NICE``
        (0-19, default 10)."""
        env = os.environ if env is None else env
        advertise = env.get("PROBE_SINK_HOST") or None
        listen = env.get("PROBE_SINK_LISTEN") or ("0.0.0.0:0" if advertise else "127.0.0.1:0")
        host, port = parse_listen(listen, "PROBE_SINK_LISTEN")
        url = env.get("PROBE_SINK_URL") or None
        if url is not None and not url.startswith(("ws://", "wss://")):
            raise ConfigError(f"PROBE_SINK_URL must be a ws:// or wss:// URL, got {url!r}.")
        raw_timeout = env.get("PROBE_MARKER_TIMEOUT", "10")
        try:
            timeout = float(raw_timeout)
        except ValueError:
            timeout = -1.0
        if not timeout > 0:
            raise ConfigError(
                f"PROBE_MARKER_TIMEOUT must be positive seconds, got {raw_timeout!r}."
            )
        order = tuple(h.strip() for h in env.get("PROBE_HOP_ORDER", "").split(",") if h.strip())
        raw_nice = env.get("PROBE_DETECT_NICE", "10").strip() or "10"
        if not raw_nice.isdigit() or int(raw_nice) > 19:
            raise ConfigError(f"PROBE_DETECT_NICE must be an integer 0-19, got {raw_nice!r}.")
        return cls(
            sink_host=host,
            sink_port=port,
            sink_url=url,
            advertise_host=advertise,
            use_sink=env.get("PROBE_NO_SINK", "") in ("", "0", "false"),
            marker_timeout_s=timeout,
            hop_order=order,
            detect_nice=int(raw_nice),
        )


class ProbeEngine:
    """Registry, sink child process and pump of one process (module docstring)."""

    def __init__(
        self,
        cfg: EngineConfig,
        *,
        observers: Sequence[RunObserver] = (),
        clock: Callable[[], float] = time.time,
        pump_interval_s: float = 0.5,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        # No locks: every call comes from the gevent hub (the sink child runs no thread here).
        self.observers = Observers(observers, hop_order=cfg.hop_order)
        self.registry = SessionRegistry(
            clock=clock,
            marker_timeout=cfg.marker_timeout_s,
            expected_hops=(),
            observer=self.observers,
            # A load test runs for hours: the Hops tab and telemetry hear every measurement as
            # it happens; the registry keeps counts only, so memory stays flat.
            history=False,
        )
        self.sink = GeventSinkProcess(self.registry, detect_nice=cfg.detect_nice)
        # Informed detection in the sink child: it hears of every marker sent.
        self.registry.add_send_listener(self.sink.expect)
        self.sink_url: str | None = None
        self.late_starts = 0
        self._pump_interval = pump_interval_s
        self._pump: Any = None
        self._closed = False

    def start(self) -> None:
        """Start the sink child (ConfigError with one sentence if its port is taken) and the
        pump. Without a sink (``use_sink`` false) the child still detects the return audio."""
        port = self.cfg.sink_port if self.cfg.use_sink else -1
        bound = self.sink.start(self.cfg.sink_host, port)
        if self.cfg.use_sink:
            if self.cfg.sink_url:
                self.sink_url = self.cfg.sink_url
            elif self.cfg.advertise_host:
                shown = self.cfg.advertise_host
                shown = f"[{shown}]" if ":" in shown and not shown.startswith("[") else shown
                self.sink_url = f"ws://{shown}:{self.sink.port}/sink"
            else:
                self.sink_url = bound
        self._pump = gevent.spawn(self._pump_loop)

    def pump(self) -> None:
        """Declare markers older than the marker timeout missed (on the hub). Detections need
        no pumping: the sink's reader greenlet applies them as they arrive."""
        self.registry.expire()

    def _pump_loop(self) -> None:
        while not self._closed:
            gevent.sleep(self._pump_interval)
            self.registry.expire()

    def settle(self, timeout_s: float | None = None, *, give_up: bool = True) -> None:
        """Wait (cooperatively) until every marker owed is detected or missed; after
        ``timeout_s`` the rest are declared missed (or, without ``give_up``, left pending)."""
        limit = self.cfg.marker_timeout_s + 1.0 if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            self.sink.drain(max(0.0, deadline - time.monotonic()))
            self.pump()
            if sum(c.pending for c in self.registry.hop_counts().values()) == 0:
                return
            gevent.sleep(0.1)
        if give_up:
            self.registry.settle_all()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pump is not None:
            self._pump.kill(block=False)
        self.sink.stop()
