"""The reference pipeline: a multi-hop real-time audio system to point the probe at.

It plays the system under test of PROTOCOL.md: an ingress WebSocket server (probe or Twilio
dialect) whose audio passes through configured hops, each adding a delay (with jitter or a step)
and optionally transcoding, resampling, changing gain, adding noise, losing packets, stalling,
failing or misbehaving on its fork; each hop forks what it emits to the session's sink, and the
last hop's output comes back on the ingress connection. Its configured delays are the ground
truth the probe's measurements are checked against.

- `spec`: the `--hops` language (`parse_hops`, `HopSpec`). Pure.
- `resample`: a streaming resampler with a ~3 ms hold-back (soxr QQ + a Kaiser FIR). Pure.
- `hop`: `HopCore`, one hop of one session, sans-I/O: bytes and arrival times in, timed
  emissions out. The timing rule lives here.
- `stt`: `SpeechToTextCore`, the text hop (`name:DELAY:text...`, last hop only) of one session,
  sans-I/O: a stand-in streaming speech-to-text service that recognises only the shipped
  fixtures' script sentences; decoded samples and arrival times in, JSON text results with
  their send times out (interims every 250 ms of an utterance, DELAY after the audio they cover
  arrived; a final DELAY after the 250 ms endpoint; presets seed, deepgram, generic).
  `configured_conversation(hops)` gives the figures a run through it should measure.
- `bot`: `ReplyBot`, the reply hop (`name:DELAY:reply...`, last hop only) of one session,
  sans-I/O: a loopback voice bot fed the caller's audio and arrival times that says what to send
  when (its reply in 20 ms frames DELAY after each utterance ends, Twilio marks, and on barge-in
  silence `stop` later with a Twilio clear). `configured_reply(hops)` gives the figures a run
  through it should measure.
- `server`: the asyncio shell, `ReferencePipeline` and `run_pipeline`.
"""

from __future__ import annotations

from probe.pipeline.bot import ReplyBot, ReplyConfig, configured_reply
from probe.pipeline.hop import Emission, HopCore, output_format
from probe.pipeline.resample import LowLatencyResampler
from probe.pipeline.server import (
    CLOSE_INTERNAL,
    Dialect,
    ReferencePipeline,
    SpanRecord,
    child_context,
    run_pipeline,
)
from probe.pipeline.spec import HopSpec, TextSpec, check_hops, format_hops, parse_hops
from probe.pipeline.stt import (
    SentenceBank,
    SpeechToTextCore,
    TextResult,
    configured_conversation,
)

__all__ = [
    "CLOSE_INTERNAL",
    "Dialect",
    "Emission",
    "HopCore",
    "HopSpec",
    "LowLatencyResampler",
    "ReferencePipeline",
    "ReplyBot",
    "ReplyConfig",
    "SentenceBank",
    "SpanRecord",
    "SpeechToTextCore",
    "TextResult",
    "TextSpec",
    "check_hops",
    "child_context",
    "configured_conversation",
    "configured_reply",
    "format_hops",
    "output_format",
    "parse_hops",
    "run_pipeline",
]
