"""probe: active per-hop latency measurement for real-time audio services."""

from __future__ import annotations

import os

# libsoxr runs its resampler on OpenMP threads that spin while idle; with hundreds of short
# streams per process that doubles CPU for nothing. One thread per call is what we want. This
# must be set before soxr is first imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# numpy's OpenBLAS starts a worker thread per core that spins after each call (the detector's
# np.dot): measured 4.3 s of CPU in 27 s beside 10 Locust streams, and 1.7 vs 3.3 ms of CPU per
# detected stream-second. The detector's vectors are far too short to gain from BLAS threads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
