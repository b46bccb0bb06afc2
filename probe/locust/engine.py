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

Configuration comes from the environment at the edge (:meth:`probe.config.EngineConfig.from_env`,
the same rules as every run option). The child
stamps arrivals with the wall clock, so the engine's clock must be ``time.time`` too.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import gevent

from probe.config import EngineConfig
from probe.cpushare import CpuShare
from probe.heap import TRIM_EVERY_S, trim
from probe.locust.sinkproc import GeventSinkProcess
from probe.measure.admission import new_capability, with_capability
from probe.measure.health import Bounds, GeneratorHealth, bounds_for
from probe.measure.observe import Observers, RunObserver
from probe.measure.registry import SessionRegistry

__all__ = ["EngineConfig", "ProbeEngine"]

log = logging.getLogger(__name__)



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
            key=secrets.token_bytes(16),  # marker tokens not guessable from session ids
            health=GeneratorHealth(
                bounds_for(
                    cfg.marker_timeout_s,
                    Bounds(
                        send_lag_s=cfg.overload_lag_ms / 1000.0,
                        detection_delay_s=cfg.overload_delay_s,
                        cpu_share=cfg.overload_cpu,
                    ),
                )
            ),
        )
        # Forks must present this as the sink URL's last path segment (PROTOCOL.md section 2).
        self.capability = cfg.sink_secret or new_capability()
        self.sink = GeventSinkProcess(
            self.registry, detect_nice=cfg.detect_nice, capability=self.capability,
            tls=cfg.sink_tls, max_forks=cfg.max_forks,
        )
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
                self.sink_url = with_capability(self.cfg.sink_url, self.capability)
            elif self.cfg.advertise_host:
                shown = self.cfg.advertise_host
                shown = f"[{shown}]" if ":" in shown and not shown.startswith("[") else shown
                scheme = "wss" if self.cfg.sink_tls else "ws"
                self.sink_url = with_capability(
                    f"{scheme}://{shown}:{self.sink.port}/sink", self.capability
                )
            else:
                self.sink_url = bound
        self._pump = gevent.spawn(self._pump_loop)

    def pump(self) -> None:
        """Declare markers older than the marker timeout missed (on the hub). Detections need
        no pumping: the sink's reader greenlet applies them as they arrive."""
        self.registry.expire()

    @property
    def overloaded(self) -> bool:
        """Whether this process (or its sink child) cannot keep up right now."""
        health = self.registry.health
        return health is not None and health.overloaded

    def _pump_loop(self) -> None:
        meter = CpuShare()
        trimmed = time.monotonic()
        was = False
        while not self._closed:
            gevent.sleep(self._pump_interval)
            if meter.elapsed() >= 1.0:
                self.registry.record_cpu("worker", meter.read())
            if time.monotonic() - trimmed >= TRIM_EVERY_S:
                trim()
                trimmed = time.monotonic()
            self.registry.expire()
            now = self.overloaded
            if now and not was:
                log.warning(
                    "probe: WARNING: this Locust process is overloaded (%s): its latencies "
                    "measure the probe, not the target; markers owed meanwhile are unmeasured",
                    ", ".join(self._signals()) or "no detail",
                )
            elif was and not now:
                log.warning("probe: this Locust process keeps up again")
            was = now

    def _signals(self) -> list[str]:
        gen = self.registry.generator() or {}
        periods = gen.get("periods") or [{}]
        return [str(e["signal"]) for e in periods[-1].get("evidence", [])]

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
