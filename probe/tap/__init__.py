"""Fork the audio a hop emits to the probe's sink (PROTOCOL.md section 2), from any Python
service: :class:`Tap` on asyncio, :class:`BlockingTap` from threads.

::

    from probe.tap import Tap, from_start

    ctx = from_start(first_message)              # the ingress start: session, trace, sink
    tap = Tap(hop="asr-in")                      # or Tap("ws://sink:8766/sink", hop=...)
    tap.open_context(ctx, {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1})
    tap.write(chunk)                             # never blocks, never raises
    tap.close()

The hop's audio path is never slowed: ``write`` never waits (it hands the frame to the socket
without blocking when the fork is open and keeps up, and queues it otherwise); a bounded queue,
frames that waited too long dropped (not sent late, since the sink times them at arrival),
reconnects with capped backoff, and everything counted in :attr:`Tap.stats` (with a rate-limited
warning in the ``probe.tap`` log). Depends on ``websockets`` only: no numpy, and OpenTelemetry
only if :func:`from_otel` is called.

- :mod:`probe.tap.core`: the rules (queue, ageing, backoff, warnings, the start message), sans-I/O;
- :mod:`probe.tap.context`: session, trace context, sink and format from a start, headers or OTel;
- :mod:`probe.tap.aio`, :mod:`probe.tap.blocking`: the two shells.
"""

from __future__ import annotations

from probe.tap.aio import Tap
from probe.tap.blocking import BlockingTap
from probe.tap.context import (
    MULAW_8K,
    ForkContext,
    from_headers,
    from_otel,
    from_start,
    twilio_media,
)
from probe.tap.core import (
    DEFAULT_MAX_LAG_S,
    DEFAULT_QUEUE_S,
    TapOptions,
    TapStats,
)

__all__ = [
    "DEFAULT_MAX_LAG_S",
    "DEFAULT_QUEUE_S",
    "MULAW_8K",
    "BlockingTap",
    "ForkContext",
    "Tap",
    "TapOptions",
    "TapStats",
    "from_headers",
    "from_otel",
    "from_start",
    "twilio_media",
]
