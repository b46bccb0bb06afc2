"""Closed-loop probe users against any system that speaks PROTOCOL.md (the reference pipeline).

    probe pipeline --listen 127.0.0.1:8765 --hops "a:20ms,b:35ms:mulaw8k,c:120ms" &
    PROBE_HOP_ORDER=a,b,c,return locust -f scenarios/locust_reference.py --host ws://127.0.0.1:8765/

Each user streams 10 s sessions of 16 kHz speech with a marker every 0.5 s, one after another.
``PROBE_SESSION_S`` changes the session length.
"""

from __future__ import annotations

from probe.locust import AudioProbeUser


class SpeechUser(AudioProbeUser):
    session_s = 10.0  # PROBE_SESSION_S overrides it, like every PROBE_* run option
