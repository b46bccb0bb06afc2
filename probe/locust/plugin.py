"""Locust event wiring: the engine per process, worker-to-master Hops statistics, the Hops tab.

Importing :mod:`probe.locust` registers these listeners on ``locust.events``:

- ``init``: on every process that runs users (a worker, or a local run) start a
  :class:`~probe.locust.engine.ProbeEngine` (its own sink: a port that is taken ends the process
  with one sentence and exit code 2); with OTel or ``PROBE_METRICS_LISTEN`` configured, add the
  telemetry observer; on the process with the web UI, add the **Hops** tab, its CSV download,
  ``/hops/json``, and the tab's picture (``/hops/chart.svg``, :mod:`~probe.locust.hopchart`);
- ``report_to_master`` / ``worker_report``: workers ship new latency values and their totals;
  the master merges them (:class:`~probe.locust.hopstats.HopsStats`);
- ``test_stop``: let markers in flight settle (bounded) so the last report counts them;
- ``reset_stats``: clear the Hops statistics too;
- ``quitting``: write ``<--csv prefix>_hops.csv`` when ``--csv`` was given; close everything.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from locust import events
from locust.runners import STATE_MISSING, MasterRunner, WorkerRunner

from probe.config import EngineConfig
from probe.errors import ConfigError
from probe.locust.engine import ProbeEngine
from probe.locust.hopchart import chart_svg, with_page_script
from probe.locust.hopstats import COLUMNS, HopsStats, OwnP95Series, Totals
from probe.locust.report import LocustReporter
from probe.measure.observe import RunObserver

log = logging.getLogger(__name__)

__all__ = ["engine_of", "hops_stats_of", "totals_of"]

REPORT_KEY = "probe_hops"
_ENGINE = "_probe_engine"
_STATS = "_probe_hops"
_TELEMETRY = "_probe_telemetry"
_BASELINE = "_probe_baseline"
# At test stop, markers still in flight get at most this long to arrive before the last report.
SETTLE_AT_STOP_S = 3.0


def engine_of(environment: Any) -> ProbeEngine:
    """The probe engine of this process (started at Locust's ``init``)."""
    engine = getattr(environment, _ENGINE, None)
    if engine is None:
        raise ConfigError("The probe engine is not running: import probe.locust in the locustfile.")
    return engine  # type: ignore[no-any-return]


def hops_stats_of(environment: Any) -> HopsStats:
    stats = getattr(environment, _STATS, None)
    if stats is None:
        stats = HopsStats()
        setattr(environment, _STATS, stats)
    return stats


def totals_of(engine: ProbeEngine, baseline: Totals | None = None) -> Totals:
    """The engine's marker and session totals (minus ``baseline``, taken at a stats reset)."""
    markers: dict[str, dict[str, int]] = {}
    for hop, c in engine.registry.hop_counts().items():
        base = baseline.markers.get(hop, {}) if baseline else {}
        markers[hop] = {
            "sent": c.sent - base.get("sent", 0),
            "detected": c.detected - base.get("detected", 0),
            "missed": c.missed - base.get("missed", 0),
            "unmeasured": c.unmeasured - base.get("unmeasured", 0),
            "pending": c.pending,
        }
    sc = engine.registry.session_counts()
    b = baseline.sessions if baseline else {}
    sessions = {
        "started": sc.started - b.get("started", 0),
        "completed": sc.completed - b.get("completed", 0),
        "failed": sc.failed - b.get("failed", 0),
        "active": sc.open,
        "late_starts": engine.late_starts - b.get("late_starts", 0),
        "overloaded": int(engine.overloaded),
    }
    return Totals(markers, sessions)


def _telemetry(environment: Any, hop_order: tuple[str, ...]) -> Any:
    wanted = any(k.startswith("OTEL_EXPORTER_OTLP") for k in os.environ) or bool(
        os.environ.get("OTEL_TRACES_EXPORTER") or os.environ.get("PROBE_METRICS_LISTEN")
    )
    if not wanted:
        return None
    try:
        from probe.telemetry.setup import start_telemetry
    except ImportError:
        log.warning("telemetry is configured but probe.telemetry.setup is not available")
        return None
    scenario = os.path.basename(str(getattr(environment, "locustfile", "") or "locust"))
    return start_telemetry(
        service="probe-locust",
        target=environment.host or "",
        scenario=scenario,
        metrics_listen=os.environ.get("PROBE_METRICS_LISTEN"),
        hop_order=hop_order,
        registry=None,
        serve=True,
    )


# Locust's report_to_master / worker_report / reset_stats events do not carry the environment;
# every environment that fired init is remembered here (one per process in practice).
_ENVIRONMENTS: list[Any] = []


def _remember(environment: Any, **_kw: Any) -> None:
    _ENVIRONMENTS.append(environment)


def _environments() -> list[Any]:
    return list(_ENVIRONMENTS)


def _start_engine(environment: Any, cfg: EngineConfig) -> ProbeEngine:
    """The engine of a process that runs users, with its Locust reporter and telemetry."""
    stats = hops_stats_of(environment)
    observers: list[RunObserver] = [
        LocustReporter(environment.events, stats, marker_timeout_s=cfg.marker_timeout_s)
    ]
    tel = _telemetry(environment, tuple(cfg.hop_order))
    if tel is not None:
        setattr(environment, _TELEMETRY, tel)
        observers.append(tel.observer)
    engine = ProbeEngine(cfg, observers=observers)
    engine.start()
    return engine


def _on_init(environment: Any, **_kw: Any) -> None:
    runner = environment.runner
    stats = hops_stats_of(environment)
    stats.for_master = isinstance(runner, WorkerRunner)
    try:
        # Every process checks the PROBE_* variables, so a bad one ends the master too.
        cfg = EngineConfig.from_env(os.environ)
        stats.hop_order = list(cfg.hop_order)
        engine = None if isinstance(runner, MasterRunner) else _start_engine(environment, cfg)
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        sys.stderr.flush()
        # Exit code 2 (configuration), without a traceback, before any user starts.
        os._exit(2)
    if engine is not None:
        setattr(environment, _ENGINE, engine)
        log.info("probe sink for this process: %s", engine.sink_url)
    if environment.web_ui is not None:
        _extend_web_ui(environment)


def _on_report_to_master(client_id: str, data: dict[str, Any], **_kw: Any) -> None:
    # The environment is not passed to this event; the worker's is the one with an engine.
    for environment in _environments():
        engine = getattr(environment, _ENGINE, None)
        if engine is not None and isinstance(environment.runner, WorkerRunner):
            stats = hops_stats_of(environment)
            data[REPORT_KEY] = stats.take_report(
                totals_of(engine, getattr(environment, _BASELINE, None))
            )


def _on_worker_report(client_id: str, data: dict[str, Any], **_kw: Any) -> None:
    report = data.get(REPORT_KEY)
    if report is None:
        return
    for environment in _environments():
        if isinstance(environment.runner, MasterRunner):
            hops_stats_of(environment).merge_report(client_id, report)


def _on_test_start(environment: Any, **_kw: Any) -> None:
    if getattr(environment, _ENGINE, None) is None:
        return
    # Load, resample and encode each user class's carrier now: the first load takes tens of ms
    # in long C calls, which would show up as send lag of the sessions already running.
    from probe.session.frames import shared_carrier

    for cls in environment.user_classes or ():
        keys = ("fixture", "sample_rate", "session_s", "encoding", "level_db")
        fixture, rate, dur, enc, level = (getattr(cls, k, None) for k in keys)
        if getattr(cls, "dialect", None) == "twilio":
            rate, enc = 8000, "mulaw"  # as SourceConfig makes it
        if (
            isinstance(fixture, str)
            and isinstance(rate, int)
            and isinstance(dur, float | int)
            and isinstance(enc, str)
            and isinstance(level, float | int)
        ):
            try:
                shared_carrier(fixture, rate, float(dur), enc, float(level))
            except Exception as exc:  # a bad fixture is reported by the sessions themselves
                log.warning("cannot load fixture %s: %s", fixture, exc)


def _on_test_stop(environment: Any, **_kw: Any) -> None:
    engine = getattr(environment, _ENGINE, None)
    if engine is not None:
        engine.settle(min(SETTLE_AT_STOP_S, engine.cfg.marker_timeout_s), give_up=False)
        engine.observers.flush()


def _on_reset_stats(**_kw: Any) -> None:
    for environment in _environments():
        hops_stats_of(environment).reset()
        engine = getattr(environment, _ENGINE, None)
        if engine is not None:
            setattr(environment, _BASELINE, totals_of(engine))


def _on_quitting(environment: Any, **_kw: Any) -> None:
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if prefix and not isinstance(environment.runner, WorkerRunner):
        path = f"{prefix}_hops.csv"
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(hops_csv(environment))
        except OSError as exc:
            log.error("cannot write %s: %s", path, exc.strerror or exc)
    engine = getattr(environment, _ENGINE, None)
    if engine is not None:
        engine.close()
    tel = getattr(environment, _TELEMETRY, None)
    if tel is not None:
        tel.close()


def _refresh(environment: Any) -> HopsStats:
    """The Hops statistics as the UI shows them: on a local run, this process's totals now."""
    stats = hops_stats_of(environment)
    engine = getattr(environment, _ENGINE, None)
    if engine is not None:
        stats.set_totals("local", totals_of(engine, getattr(environment, _BASELINE, None)))
    return stats


def hops_rows(environment: Any) -> list[dict[str, Any]]:
    """The Hops table rows (with the number of workers lost, on a master)."""
    rows = _refresh(environment).rows()
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        lost = sum(1 for c in runner.clients.values() if c.state == STATE_MISSING)
        rows[-1]["note"] += f", workers reporting {len(hops_stats_of(environment).totals)}"
        if lost:
            rows[-1]["note"] += f", workers lost {lost}"
    return rows


def hops_csv(environment: Any) -> str:
    return hops_stats_of(environment).csv(hops_rows(environment))


def hops_json(environment: Any) -> dict[str, Any]:
    stats = _refresh(environment)
    return {
        "rows": hops_rows(environment),
        "sources": {k: v.as_dict() for k, v in stats.totals.items()},
        "at": time.time(),
    }


def _extend_web_ui(environment: Any) -> None:
    import json

    from flask import Response, jsonify, request

    web_ui = environment.web_ui
    hops_stats_of(environment).series = OwnP95Series()
    web_ui.template_args["extended_tabs"] = [{"title": "Hops", "key": "hops"}]
    web_ui.template_args["extended_tables"] = [
        {"key": "hops", "structure": [{"key": k, "title": t} for k, t in COLUMNS]}
    ]
    web_ui.template_args["extended_csv_files"] = [
        {"href": "./hops/csv", "title": "Download hops CSV (exact per-hop latencies)"}
    ]

    @web_ui.app.after_request  # type: ignore[untyped-decorator,unused-ignore]
    def _extend_responses(response: Any) -> Any:
        if request.endpoint == "locust.index" and response.status_code == 200:
            response.set_data(with_page_script(response.get_data(as_text=True)))
        elif request.path.rstrip("/").endswith("/stats/requests") and response.is_json:
            body = response.get_json()
            body["extended_stats"] = [{"key": "hops", "data": hops_rows(environment)}]
            response.set_data(json.dumps(body))
        return response

    @web_ui.app.route("/hops/csv")  # type: ignore[untyped-decorator,unused-ignore]
    @web_ui.auth_required_if_enabled  # type: ignore[untyped-decorator,unused-ignore]
    def _hops_csv() -> Any:
        return Response(
            hops_csv(environment),
            mimetype="text/csv",
            headers={"Content-Disposition": f"attachment;filename=hops_{int(time.time())}.csv"},
        )

    @web_ui.app.route("/hops/json")  # type: ignore[untyped-decorator,unused-ignore]
    @web_ui.auth_required_if_enabled  # type: ignore[untyped-decorator,unused-ignore]
    def _hops_json() -> Any:
        return jsonify(hops_json(environment))

    @web_ui.app.route("/hops/chart.svg")  # type: ignore[untyped-decorator,unused-ignore]
    @web_ui.auth_required_if_enabled  # type: ignore[untyped-decorator,unused-ignore]
    def _hops_chart() -> Any:
        return Response(
            chart_svg(_refresh(environment)),
            mimetype="image/svg+xml",
            headers={"Cache-Control": "no-store"},
        )


def _listen(event: str, handler: Callable[..., None]) -> None:
    getattr(events, event).add_listener(handler)


_listen("init", _remember)
_listen("init", _on_init)
_listen("report_to_master", _on_report_to_master)
_listen("worker_report", _on_worker_report)
_listen("test_start", _on_test_start)
_listen("test_stop", _on_test_stop)
_listen("reset_stats", _on_reset_stats)
_listen("quitting", _on_quitting)
