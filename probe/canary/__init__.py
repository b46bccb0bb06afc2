"""Canaries: one short probe judged by thresholds, and the ways its verdict leaves the process.

- `thresholds`: the threshold grammar, the judge and the compact table (sans-I/O).
- `scenario`: TOML scenario files, validated with errors that name the key (pure but for reading).
- `metrics`: the run as a fresh Prometheus registry (sans-I/O).
- `pushgateway`: push that registry, grouped by job and target; failures are warnings.
- `junit`, `html`: the verdict as JUnit XML and as a self-contained HTML page (sans-I/O).
- `exporter`: ``/probe?target=&scenario=`` for Prometheus to schedule, blackbox style.
"""

from __future__ import annotations
