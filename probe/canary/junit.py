"""The canary's verdict as JUnit XML, for CI systems (one test case per threshold). Sans-I/O:
:func:`junit_xml` returns the document; the CLI writes it."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any

from probe.canary.thresholds import Verdict, format_verdict

__all__ = ["junit_xml"]


def junit_xml(report: Mapping[str, Any], verdict: Verdict, *, suite: str) -> str:
    """One ``<testsuite>`` named ``suite`` holding one ``<testcase>`` per check; a breached
    check carries a ``<failure>`` with its detail. The run's table goes in ``<system-out>``."""
    failures = len(verdict.breaches)
    duration = f"{float(report.get('duration_s', 0.0)):.3f}"
    root = ET.Element(
        "testsuites",
        name="probe canary",
        tests=str(len(verdict.checks)),
        failures=str(failures),
        errors="0",
        time=duration,
    )
    ts = ET.SubElement(
        root,
        "testsuite",
        name=suite,
        tests=str(len(verdict.checks)),
        failures=str(failures),
        errors="0",
        skipped="0",
        time=duration,
        timestamp=str(report.get("started_at", "")),
    )
    props = ET.SubElement(ts, "properties")
    ET.SubElement(props, "property", name="target", value=str(report.get("target", "")))
    for c in verdict.checks:
        case = ET.SubElement(
            ts, "testcase", classname=f"canary.{suite}", name=c.threshold, time="0"
        )
        if not c.ok:
            failure = ET.SubElement(case, "failure", message=c.detail, type="ThresholdBreached")
            failure.text = f"{c.threshold}: {c.detail}"
    ET.SubElement(ts, "system-out").text = format_verdict(report, verdict)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
