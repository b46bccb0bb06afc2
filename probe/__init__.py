"""probe: active per-hop latency measurement for real-time audio services."""

from __future__ import annotations

import os

# libsoxr runs its resampler on OpenMP threads that spin while idle; with hundreds of short
# streams per process that doubles CPU for nothing. One thread per call is what we want. This
# must be set before soxr is first imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

__version__ = "0.1.0"
