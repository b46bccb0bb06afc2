"""Open model: sessions start at a fixed rate whatever the target does (no coordinated omission).

    PROBE_SESSION_RATE=5 locust -f scenarios/locust_open.py --host ws://127.0.0.1:8765/ -u 1

Each user starts ``PROBE_SESSION_RATE`` sessions a second (default 1), so ``-u N`` gives N times
that; latency is measured from each frame's intended send time, sessions that could not start in
time are failures of ``session`` / ``start``. ``PROBE_SESSION_S`` sets the session length.
"""

from __future__ import annotations

from probe.locust import OpenAudioProbeUser


class OpenSpeechUser(OpenAudioProbeUser):
    session_s = 10.0  # PROBE_SESSION_S overrides it, like every PROBE_* run option
