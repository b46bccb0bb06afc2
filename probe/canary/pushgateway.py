"""Push a canary's result to a Prometheus Pushgateway, grouped by job and target.

The push is ``pushadd`` (HTTP POST): it replaces the metrics of the same names in the group and
leaves the others, so ``probe_last_success_timestamp_seconds`` (pushed only when the run passed)
keeps the time of the last pass through failing runs. The group is ``job`` and ``target`` (the
target URL template, ``{session}`` unexpanded): never a per-run id, so the Pushgateway holds one
group per canary, not one per run. A Pushgateway that is down or slow never fails the canary:
:func:`push` returns a warning sentence instead of raising.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, pushadd_to_gateway

__all__ = ["DEFAULT_JOB", "push"]

DEFAULT_JOB = "probe_canary"


def push(
    gateway: str,
    registry: CollectorRegistry,
    *,
    job: str,
    target: str,
    timeout_s: float = 5.0,
) -> str | None:
    """Push ``registry`` to ``gateway``; None when it worked, else one sentence saying why not."""
    try:
        pushadd_to_gateway(
            gateway, job=job, registry=registry, grouping_key={"target": target}, timeout=timeout_s
        )
    except Exception as exc:  # any failure to push is a warning, never the canary's verdict
        reason = getattr(exc, "reason", None) or exc
        return f"could not push to the Pushgateway at {gateway}: {reason}"
    return None
