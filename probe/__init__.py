"""probe: active per-hop latency measurement for real-time audio services."""

from __future__ import annotations

__version__ = "0.1.0"
