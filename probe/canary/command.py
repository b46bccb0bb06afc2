"""The I/O shells of ``probe canary`` and ``probe exporter``: options in; files, pushes, a
server out. Both take exactly ``probe run``'s options (:mod:`probe.config`): a flag wins over the
scenario's key, which wins over the ``PROBE_*`` variable, which wins over the default."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from probe.aio.runner import run_config
from probe.canary.html import render_html
from probe.canary.junit import junit_xml
from probe.canary.metrics import generator_overloaded, probe_registry
from probe.canary.pushgateway import DEFAULT_JOB, push
from probe.canary.scenario import Scenario, load_scenario, load_scenario_dir
from probe.canary.thresholds import Check, Verdict, format_verdict, judge, parse_thresholds
from probe.config import check_url, env_options, given_options, parse_host_port, run_defaults
from probe.errors import ConfigError, ProbeError
from probe.measure.observe import RunObserver
from probe.measure.report import format_table, overload_warning, write_report
from probe.outfiles import check_output

__all__ = ["canary", "exporter"]

log = logging.getLogger(__name__)


class _Telemetry(Protocol):
    @property
    def observer(self) -> RunObserver: ...

    def close(self) -> None: ...


StartTelemetry = Callable[[str, str, Sequence[str] | None], _Telemetry]


def _write(option: str, path: str, text: str, problems: list[str]) -> None:
    """Write ``text``; a failure is noted in ``problems`` so the other outputs still happen."""
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        problems.append(f"Cannot write {option} {path}: {exc.strerror or exc}.")


def _options(
    args: argparse.Namespace, environ: Mapping[str, str], scenario: Scenario | None
) -> dict[str, Any]:
    return {
        **env_options(environ),
        **(scenario.options if scenario else {}),
        **given_options(args),
    }


def canary(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    *,
    telemetry: StartTelemetry | None = None,
) -> bool | None:
    """Run ``probe canary``; True when every threshold held, False when one did not, None when
    the probe itself was overloaded (its figures measure the probe: no verdict). ConfigError for
    usage errors.
    ``environ`` supplies ``PROBE_*`` options; ``telemetry(target, scenario, hop_order)`` starts
    the run's traces and metrics."""
    from probe.aio.runner import STOP_SIGNALS, default_progress, interruption, run_probe

    scenario = load_scenario(args.scenario) if args.scenario else None
    opts = _options(args, environ, scenario)
    if not opts.get("target"):
        raise ConfigError(
            "probe canary needs a target: give --target URL, a --scenario that sets target, "
            "or PROBE_TARGET."
        )
    thresholds = [*(scenario.thresholds if scenario else ()), *parse_thresholds(args.threshold)]
    cfg = run_config(opts)
    for option, path in (
        ("--json", opts.get("json")),
        ("--junit", args.junit),
        ("--html", args.html),
    ):
        check_output(option, path)  # before the run: a report it could not write is lost
    if args.pushgateway is not None:
        check_url(args.pushgateway, "--pushgateway", ("http", "https"))
    job = args.job or DEFAULT_JOB
    if not job.strip() or "/" in job:
        raise ConfigError(f"--job must be a non-empty name without '/', got {job!r}.")
    target = str(opts["target"])
    name = scenario.name if scenario else "canary"

    report: dict[str, Any] | None = None
    failure: ProbeError | None = None
    t0 = time.monotonic()
    tel = telemetry(target, name, cfg.hop_order) if telemetry is not None else None
    try:
        observer = tel.observer if tel is not None else None
        report = asyncio.run(
            run_probe(cfg, progress=default_progress(), observer=observer, stop_on=STOP_SIGNALS)
        )
    except ConfigError:
        raise
    except ProbeError as exc:  # the run itself could not happen: a failed canary, still reported
        failure = exc
    finally:
        if tel is not None:
            tel.close()
    elapsed = time.monotonic() - t0

    problems: list[str] = []
    cut = interruption(report) if report is not None else None
    if report is None:
        verdict = Verdict((Check("run", False, None, "", f"the probe could not run: {failure}"),))
        print(f"canary: FAIL (the probe could not run: {failure})")
    elif cut is not None:
        # A partial run judges nothing: its outputs say so, and nothing is pushed.
        c = report["interrupted"]
        why = f"interrupted by {c['signal']} after {float(c['after_s']):.1f} s: no verdict"
        verdict = Verdict((Check("run", False, None, "", why),))
        print(format_table(report))
        print(f"canary: INTERRUPTED ({why})")
    else:
        verdict = judge(report, thresholds)
        print(format_verdict(report, verdict))
        warning = overload_warning(report)
        if warning:
            print(f"canary: UNKNOWN ({warning})")
    if report is not None:
        if opts.get("json"):
            try:
                write_report(report, opts["json"])
            except OSError as exc:
                problems.append(f"Cannot write --json {opts['json']}: {exc.strerror or exc}.")
        if args.html:
            page = render_html(report, verdict, title=f"probe canary: {name}")
            _write("--html", args.html, page, problems)
    if args.junit:
        shown = report or {"target": target, "duration_s": elapsed, "hops": [], "sessions": {}}
        _write("--junit", args.junit, junit_xml(shown, verdict, suite=name), problems)
    if cut is not None:
        for problem in problems:
            print(f"probe: warning: {problem}", file=sys.stderr)
        if args.pushgateway:
            print("probe: nothing pushed to the Pushgateway: an interrupted run has no verdict",
                  file=sys.stderr)
        outputs = (opts.get("json"), args.junit, args.html)
        written = [p for p in outputs if p and not any(p in q for q in problems)]
        raise interruption(report or {}, written) or cut
    if args.pushgateway:
        reg = probe_registry(
            report,
            verdict,
            duration_s=float(report["duration_s"]) if report else elapsed,
            success=verdict.ok and not generator_overloaded(report),
            last_success=(
                time.time() if verdict.ok and not generator_overloaded(report) else None
            ),
        )
        warning = push(args.pushgateway, reg, job=job, target=target)
        if warning:
            print(f"probe: warning: {warning}", file=sys.stderr)
    if problems:
        raise ConfigError(problems[0])
    if generator_overloaded(report):
        return None
    return verdict.ok


def exporter(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """Serve ``probe exporter`` until interrupted; ``environ`` supplies ``PROBE_*`` options,
    under the exporter's own flags."""
    from probe.canary.exporter import ProbeExporter, serve_exporter

    scenarios = load_scenario_dir(args.scenarios) if args.scenarios else {}
    base = {
        **run_defaults(),
        **env_options(environ),
        "sessions": args.sessions,
        "concurrency": args.sessions,
        "duration": args.duration,
        "marker_timeout": args.marker_timeout,
    }
    run_config({**base, "target": "ws://127.0.0.1:1/"})  # bad defaults fail now, not per probe
    listen = args.listen
    host, port = parse_host_port(listen, "--listen")
    exp = ProbeExporter(
        scenarios,
        run_config,
        defaults=base,
        max_probes=args.max_probes,
        queue_timeout_s=args.queue_timeout,
    )
    server = serve_exporter(exp, host, port)
    bound_host, bound_port = server.server_address[:2]
    print(
        f"probe exporter on http://{bound_host!s}:{bound_port}/probe "
        f"({len(scenarios)} scenarios, {args.max_probes} probes at once)",
        flush=True,
    )
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
