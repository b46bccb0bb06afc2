"""The ``probe`` command.

Exit codes: 0 done; 1 the work ran but failed (for commands that judge); 2 usage or
configuration error (one sentence on stderr, never a traceback), or, for ``probe canary``, a run
whose verdict is unknown because the probe itself was overloaded; 130 (SIGINT) and 143
(SIGTERM) a run (``run``, ``demo``, ``canary``) cut short by that signal, its partial report
written and marked ``interrupted``; 3 a run (``run``, ``demo``) the probe itself could not finish
(its sink child died), its partial report written and marked ``invalid``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from probe.config import (
    OPTION,
    add_run_options,
    env_options,
    flag_type,
    given_options,
    integer_rule,
    number_rule,
    parse_host_port,
)
from probe.errors import ConfigError, GeneratorFailed, Interrupted, ProbeError
from probe.outfiles import check_output

if TYPE_CHECKING:
    from probe.telemetry.setup import Telemetry

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_GENERATOR_FAILED = 3

DEMO_HOPS = "ingest:20ms,telephony:35ms:mulaw8k,model:120ms"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own usage errors: exit 2, one line
        self.print_usage(sys.stderr)
        raise ConfigError(message)


def _build_parser() -> argparse.ArgumentParser:
    from probe.telemetry.setup import add_telemetry_options

    p = _Parser(prog="probe", description="Per-hop latency of real-time audio services.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = sub.add_parser("mark", help="write markers into a WAV file")
    m.add_argument("input")
    m.add_argument("output")
    m.add_argument("--payload", required=True, help="32-bit payload, 8 hex digits")
    m.add_argument("--every", type=flag_type("--every", OPTION["every"].rule), default=None,
                   help="seconds between marker starts (at least 0.24, default 0.5)")
    m.add_argument("--level", type=flag_type("--level", OPTION["level"].rule), default=None,
                   help="dB relative to the speech (-60 to 0, default -14)")
    m.add_argument("--json", action="store_true", help="one JSON object per marker")

    d = sub.add_parser("detect", help="find markers in a recording")
    d.add_argument("input")
    d.add_argument("--json", action="store_true", help="one JSON object per detection")
    known = d.add_mutually_exclusive_group()
    known.add_argument(
        "--reference", default=None, metavar="SENT.wav",
        help="the marked audio that was sent: look for its markers (informed detection)",
    )
    known.add_argument(
        "--expect", default=None, metavar="MARKS.jsonl",
        help="the markers that were sent, as `probe mark --json` prints them",
    )
    d.add_argument(
        "--max-delay", type=flag_type("--max-delay", number_rule(above=0.0, at_most=600.0)),
        default=5.0,
        help="with --reference/--expect: longest delay to search, seconds (default 5, at most 600)",
    )

    demo = sub.add_parser("demo", help="run the reference pipeline and a probe, print the table")
    demo.add_argument("--sessions", type=flag_type("--sessions", OPTION["sessions"].rule),
                      default=4)
    demo.add_argument("--duration", type=flag_type("--duration", OPTION["duration"].rule),
                      default=6.0)
    demo.add_argument("--hops", default=DEMO_HOPS)
    demo.add_argument("--json", default="probe-report.json", help="where to write the report")
    add_telemetry_options(demo)

    r = sub.add_parser("run", help="drive a system that speaks the probe protocol")
    add_run_options(r)  # flags not given fall back to PROBE_* variables, then to the defaults
    add_telemetry_options(r)

    c = sub.add_parser("canary", help="one short probe judged by thresholds (exit 0 pass, 1 fail)")
    add_run_options(c)  # ... to the scenario, then to PROBE_* variables, then to the defaults
    _canary_options(c)
    add_telemetry_options(c)

    ex = sub.add_parser("exporter", help="serve /probe?target=&scenario= for Prometheus")
    ex.add_argument("--listen", default="127.0.0.1:9116", help="HOST:PORT")
    ex.add_argument("--scenarios", default=None, help="directory of *.toml scenarios")
    ex.add_argument("--max-probes", type=flag_type("--max-probes", integer_rule(1, 1000)),
                    default=2, help="probes allowed at once")
    ex.add_argument("--queue-timeout",
                    type=flag_type("--queue-timeout", number_rule(above=-1.0, least=0.0,
                                                                  at_most=3600.0)),
                    default=5.0, help="seconds a request waits for a free slot before HTTP 503")
    for name, default in (("sessions", 1), ("duration", 3.0), ("marker_timeout", 3.0)):
        flag = OPTION[name].flag
        ex.add_argument(flag, type=flag_type(flag, OPTION[name].rule), default=default,
                        help="default when no scenario sets it")

    pl = sub.add_parser("pipeline", help="serve the reference multi-hop pipeline")
    pl.add_argument("--listen", default="127.0.0.1:8765", help="HOST:PORT")
    pl.add_argument(
        "--hops", default=DEMO_HOPS,
        help="e.g. a:20ms,b:35ms:mulaw8k,c:120ms; the last hop may answer instead of passing "
        "the audio on: stt:150ms:text (JSON text results) or bot:500ms:reply (a voice bot); "
        "docs/commands.md",
    )
    pl.add_argument("--dialect", choices=("probe", "twilio"), default="probe")
    pl.add_argument(
        "--idle-timeout", type=flag_type("--idle-timeout", number_rule(above=0.0, at_most=86400.0)),
        default=10.0, metavar="SECONDS",
        help="close a connection that sends no start, or no frame while streaming, for this "
        "long with 1008 (default 10)",
    )
    pl.add_argument(
        "--metrics-listen",
        default=None,
        help="HOST:PORT to serve /metrics (configured delays, emission lateness per hop)",
    )

    from probe.aio.tee import add_parser as add_tee_parser

    add_tee_parser(sub)
    return p


def _canary_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("--scenario", default=None, help="a scenario .toml file (options override it)")
    c.add_argument("--threshold", action="append", default=[], metavar="THRESHOLD",
                   help="e.g. 'hop=model p95<250ms', 'markers>=99.9%%' (repeatable)")
    c.add_argument("--pushgateway", default=None, help="Pushgateway URL to push the result to")
    c.add_argument("--job", default=None, help="Pushgateway job name (default probe_canary)")
    c.add_argument("--junit", default=None, help="write JUnit XML here")
    c.add_argument("--html", default=None, help="write a self-contained HTML report here")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("PROBE_LOG_LEVEL", "WARNING").upper(),
        format="%(levelname)s %(name)s: %(message)s",
    )
    terminate = signal.getsignal(signal.SIGTERM)
    try:
        args = _build_parser().parse_args(argv)
        if args.command in ("run", "canary", "demo"):
            # Outside the run (which turns SIGTERM into a partial report): exit 143 quietly,
            # through the finally blocks (a half-written report file is removed).
            signal.signal(signal.SIGTERM, _terminated)
        handler = {
            "mark": _cmd_mark,
            "detect": _cmd_detect,
            "demo": _cmd_demo,
            "run": _cmd_run,
            "canary": _cmd_canary,
            "exporter": _cmd_exporter,
            "pipeline": _cmd_pipeline,
            "tee": _cmd_tee,
        }[args.command]
        return handler(args)
    except ConfigError as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return 128 + exc.signal_number
    except GeneratorFailed as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return EXIT_GENERATOR_FAILED
    except ProbeError as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (head, a closed pager) went away: not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        signal.signal(signal.SIGTERM, terminate)


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _cmd_mark(args: argparse.Namespace) -> int:
    from probe.offline import mark_file
    from probe.watermark.design import DEFAULT_EVERY_S, DEFAULT_LEVEL_DB, parse_payload_hex

    payload = parse_payload_hex(args.payload)
    fmt = _sound_format(args.output)
    every = DEFAULT_EVERY_S if args.every is None else args.every
    level = DEFAULT_LEVEL_DB if args.level is None else args.level
    rate, placed, peak = mark_file(
        args.input, args.output, payload, fmt, every_s=every, level_db=level
    )
    for p in placed:
        row = {"sample": p.sample, "time_s": round(p.sample / rate, 6), "payload": payload.hex()}
        print(json.dumps(row) if args.json else "\t".join(str(v) for v in row.values()))
    if peak > 1.0:
        print(f"probe: warning: the marked audio clipped (peak {peak:.2f})", file=sys.stderr)
    return EXIT_OK


def _sound_format(path: str) -> str:
    """The sound file format ``probe mark`` writes to ``path``, named by its extension (16-bit
    PCM: WAV, FLAC, AIFF, ...); ConfigError when the extension names none."""
    import soundfile as sf

    ext = Path(path).suffix.lstrip(".").upper()
    if ext != "RAW" and ext in sf.available_formats() and sf.check_format(ext, "PCM_16"):
        return ext
    raise ConfigError(
        f"probe mark writes a sound file whose extension names its format (.wav, .flac, "
        f".aiff, ...), got {path!r}."
    )


def _cmd_detect(args: argparse.Namespace) -> int:
    from probe.offline import detect_file

    if args.reference is None and args.expect is None:
        rate, found = detect_file(args.input)
        for d, how in found:
            row = {
                "sample": d.sample,
                "time_s": round(d.sample / rate, 6),
                "payload": d.payload.hex(),
                "score": round(d.score, 2),
                "by": how,
            }
            print(json.dumps(row) if args.json else "\t".join(str(v) for v in row.values()))
        return EXIT_OK
    return _detect_informed(args)


def _read_marks(path: str) -> list[Any]:
    """The sent markers listed in a `probe mark --json` file."""
    from probe.watermark.design import PAYLOAD_BYTES
    from probe.watermark.informed import Sent

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            payload = bytes.fromhex(row["payload"])
            t = float(row["time_s"])
            if len(payload) != PAYLOAD_BYTES or not math.isfinite(t) or t < 0:
                raise ValueError
        except (ValueError, TypeError, KeyError):
            raise ConfigError(
                f"{path} line {n} is not a marker as `probe mark --json` prints it "
                f'(expected {{"time_s": seconds, "payload": "{PAYLOAD_BYTES * 2} hex digits"}})'
            ) from None
        out.append(Sent(payload, t))
    if not out:
        raise ConfigError(f"{path} lists no markers")
    return out


def _detect_informed(args: argparse.Namespace) -> int:
    from probe.audio.fixtures import open_audio
    from probe.offline import follow_file, sent_in_file

    open_audio(args.input).close()  # a bad recording is named before the reference is read
    if args.reference is not None:
        sent = sent_in_file(args.reference)
        if not sent:
            raise ConfigError(f"{args.reference} carries no markers the blind decoder can find")
    else:
        sent = _read_marks(args.expect)
    rate, found = follow_file(args.input, sent, max_delay=args.max_delay)
    delays = []
    for m, d in zip(sent, found, strict=True):
        row: dict[str, Any] = {"sent_s": round(m.time, 6), "payload": m.payload.hex()}
        if d is None:
            row.update(outcome="missed", sample=None, time_s=None, delay_ms=None, score=None)
        else:
            delay_ms = (d.position / rate - m.time) * 1000.0
            delays.append(delay_ms)
            row.update(
                outcome="detected",
                sample=d.sample,
                time_s=round(d.position / rate, 6),
                delay_ms=round(delay_ms, 3),
                score=round(d.score, 2),
            )
        print(json.dumps(row) if args.json else "\t".join(
            "-" if v is None else str(v) for v in row.values()))
    summary = f"probe: found {len(delays)} of {len(sent)} markers"
    if delays:
        summary += f"; delay p50 {float(np.median(delays)):.3f} ms"
    print(summary, file=sys.stderr)
    return EXIT_OK


def _report_out(report: dict[str, Any], path: str | None) -> None:
    """Print the table and write the report; Interrupted when a stop signal cut the run short
    (after both)."""
    from probe.aio.runner import generator_failure, interruption
    from probe.measure.report import format_table, write_report

    print(format_table(report))
    if path:
        try:
            write_report(report, path)
        except OSError as exc:
            raise ConfigError(f"cannot write the report to {path}: {exc.strerror}") from exc
        print(f"report written to {path}")
    cut = interruption(report, [path] if path else [])
    if cut is not None:
        raise cut
    failed = generator_failure(report, [path] if path else [])
    if failed is not None:
        raise failed


def _cmd_run(args: argparse.Namespace) -> int:
    from probe.aio.runner import STOP_SIGNALS, default_progress, run_config, run_probe
    from probe.config import run_options

    opts = run_options({**env_options(os.environ), **given_options(args)})
    check_output("--json", opts.json)  # before the run, not after it
    cfg = run_config(opts)
    telemetry = _telemetry(args, target=opts.target, scenario="run", hop_order=cfg.hop_order)
    try:
        report = asyncio.run(
            run_probe(
                cfg, progress=default_progress(), observer=telemetry.observer,
                stop_on=STOP_SIGNALS,
            )
        )
        _report_out(report, opts.json)
    finally:
        telemetry.close()
    return EXIT_OK


def _telemetry(
    args: argparse.Namespace, *, target: str, scenario: str, hop_order: Sequence[str] | None
) -> Telemetry:
    """Traces (when ``OTEL_*`` configures them) and metrics (``--metrics-listen``) for a run."""
    from probe.telemetry.setup import start_telemetry

    telemetry = start_telemetry(
        service="probe",
        target=target,
        scenario=scenario,
        metrics_listen=args.metrics_listen,
        hop_order=hop_order,
    )
    if telemetry.metrics_url:
        print(f"probe: metrics at {telemetry.metrics_url}", file=sys.stderr, flush=True)
    return telemetry


def _cmd_demo(args: argparse.Namespace) -> int:
    from probe.aio.runner import STOP_SIGNALS, RunConfig, default_progress, run_probe
    from probe.aio.source import SourceConfig
    from probe.pipeline import ReferencePipeline, parse_hops
    from probe.telemetry.setup import start_pipeline_tracing

    hops = parse_hops(args.hops)
    check_output("--json", args.json)
    order = [h.name for h in hops] + ["return"]
    telemetry = _telemetry(args, target="demo", scenario="demo", hop_order=order)
    try:
        # The pipeline plays another system: its spans go out as their own service.
        pipeline_tracing = start_pipeline_tracing("probe-pipeline", force_service=True)
        telemetry.attach(pipeline_tracing)

        async def go() -> dict[str, Any]:
            pipeline = ReferencePipeline(
                hops,
                tracer_provider=pipeline_tracing.provider if pipeline_tracing else None,
            )
            url = await pipeline.start("127.0.0.1", 0)
            try:
                cfg = RunConfig(
                    source=SourceConfig(target=url, duration_s=args.duration),
                    sessions=args.sessions,
                    concurrency=args.sessions,
                    hop_order=order,
                    configured_ms=_configured_ms(hops),
                    marker_timeout_s=5.0,
                )
                return await run_probe(
                    cfg, progress=default_progress(), observer=telemetry.observer,
                    stop_on=STOP_SIGNALS,
                )
            finally:
                await pipeline.stop()

        print(f"reference pipeline: {args.hops}; {args.sessions} sessions of {args.duration:g} s")
        report = asyncio.run(go())
        _report_out(report, args.json)
    finally:
        telemetry.close()
    return EXIT_OK


def _configured_ms(hops: Sequence[Any]) -> dict[str, float]:
    total = 0.0
    out: dict[str, float] = {}
    for h in hops:
        total += float(h.delay) * 1000.0
        out[h.name] = round(total, 3)
    out["return"] = round(total, 3)
    return out


def _cmd_canary(args: argparse.Namespace) -> int:
    from probe.canary.command import canary

    def telemetry(target: str, scenario: str, hop_order: Sequence[str] | None) -> Telemetry:
        return _telemetry(args, target=target, scenario=scenario, hop_order=hop_order)

    ok = canary(args, os.environ, telemetry=telemetry)
    if ok is None:  # the probe was overloaded: the verdict is unknown, not a breach
        return EXIT_USAGE
    return EXIT_OK if ok else EXIT_FAILED


def _cmd_exporter(args: argparse.Namespace) -> int:
    from probe.canary.command import exporter

    exporter(args, os.environ)
    return EXIT_OK


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from probe.pipeline import run_pipeline
    from probe.telemetry.setup import start_pipeline_tracing

    host, port = parse_host_port(args.listen, "--listen")
    observer = None
    if args.metrics_listen:
        from prometheus_client import CollectorRegistry, start_http_server

        from probe.pipeline import parse_hops
        from probe.pipeline.metrics import PipelineMetrics

        mhost, mport = parse_host_port(args.metrics_listen, "--metrics-listen")
        registry = CollectorRegistry()
        observer = PipelineMetrics(parse_hops(args.hops), registry).observe
        try:
            server, _ = start_http_server(mport, addr=mhost, registry=registry)
        except OSError as exc:
            raise ConfigError(
                f"--metrics-listen cannot listen on {mhost}:{mport}: {exc.strerror}"
            ) from exc
        print(
            f"pipeline metrics on http://{mhost}:{server.server_address[1]}/metrics",
            file=sys.stderr,
        )
    tracing = start_pipeline_tracing("probe-pipeline")
    try:
        asyncio.run(
            run_pipeline(
                f"{host}:{port}",
                args.hops,
                args.dialect,
                tracer_provider=tracing.provider if tracing else None,
                observer=observer,
                idle_timeout=args.idle_timeout,
            )
        )
    finally:
        warning = tracing.close() if tracing is not None else None
        if warning:
            print(f"probe: {warning}", file=sys.stderr)
    return EXIT_OK


def _cmd_tee(args: argparse.Namespace) -> int:
    from probe.aio.tee import command

    return command(args)


if __name__ == "__main__":
    raise SystemExit(main())



