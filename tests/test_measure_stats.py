from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from probe.errors import ConfigError
from probe.measure.stats import SUMMARY_KEYS, LatencyStats, summarize_ms


def test_empty() -> None:
    s = LatencyStats()
    assert s.count == 0
    assert s.quantile(0.5) is None
    summary = s.summary_ms()
    assert set(summary) == set(SUMMARY_KEYS)
    assert summary["count"] == 0
    assert all(summary[k] is None for k in SUMMARY_KEYS if k != "count")
    assert summarize_ms([]) == summary


def test_summary_ms_values() -> None:
    values = [i / 1000.0 for i in range(1, 1001)]  # 1..1000 ms
    s = LatencyStats()
    s.extend(values[:500])
    for v in values[500:]:
        s.add(v)
    summary = s.summary_ms()
    assert summary["count"] == 1000
    assert summary["max"] == 1000.0
    assert summary["mean"] == 500.5
    assert summary["p50"] == pytest.approx(float(np.quantile(values, 0.5)) * 1000, abs=1e-3)
    assert summary["p999"] == pytest.approx(float(np.quantile(values, 0.999)) * 1000, abs=1e-3)
    assert summarize_ms(values) == summary
    assert s.quantile(1.0) == 1.0


def test_rounding_to_microseconds() -> None:
    assert summarize_ms([0.0123456789])["p50"] == 12.346


def test_quantile_range_checked() -> None:
    with pytest.raises(ConfigError):
        LatencyStats([1.0]).quantile(1.5)


def test_merge_and_round_trip() -> None:
    a = LatencyStats([0.1, 0.2])
    b = LatencyStats.from_list([0.3])
    a.merge(b)
    assert a.to_list() == [0.1, 0.2, 0.3]
    a.merge(a)
    assert a.count == 6
    assert LatencyStats.from_list(a.to_list()).to_list() == a.to_list()


@given(st.lists(st.floats(min_value=-1.0, max_value=100.0), max_size=300))
def test_growth_keeps_every_value(values: list[float]) -> None:
    s = LatencyStats()
    for v in values:
        s.add(v)
    assert s.to_list() == values
    assert len(s) == len(values)


def test_microsecond_counts_agree_with_numpy_on_values_rounded_to_the_microsecond() -> None:
    import numpy as np

    from probe.measure.stats import MicrosecondCounts, summarize_ms

    rng = np.random.default_rng(3)
    values = 0.120 + rng.gamma(2.0, 0.004, 200_000)
    c = MicrosecondCounts(values)
    rounded = np.round(values * 1e6) / 1e6
    for q in (0.0, 0.5, 0.9, 0.99, 0.999, 1.0):
        assert abs((c.quantile(q) or 0) - float(np.quantile(rounded, q))) < 1e-9
    assert c.summary_ms() == summarize_ms(rounded)
    # Memory follows the span the values cover, not their count: 4 bytes per microsecond of
    # the blocks of 1024 us they fall in.
    span_us = (values.max() - values.min()) * 1e6
    assert c.nbytes <= 4 * 1024 * (span_us // 1024 + 2)
    before = c.nbytes
    lo, hi = np.quantile(values, [0.01, 0.99])  # where every block is already in use
    c.extend(np.clip(0.120 + rng.gamma(2.0, 0.004, 200_000), lo, hi))
    assert c.nbytes == before and c.count == 400_000
    empty = MicrosecondCounts()
    assert empty.summary_ms()["count"] == 0 and empty.quantile(0.5) is None
