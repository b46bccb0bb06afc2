"""The sans-I/O core of one hop: audio bytes with arrival times in, timed emissions out.

A `HopCore` owns what a hop does to audio (resample, G.711, gain, noise, loss) and when it lets
it go; the I/O shell (`server.py`) only waits until each emission's `due` time and moves bytes.

Timing rule. Every output chunk is due at

    max(previous due, input time of its first sample + delay in force, time its input arrived)

- The *input time* of an output sample is the arrival time of the input chunk that holds the
  sample it stands for, plus that sample's offset in the chunk over the input rate (PROTOCOL.md
  4). Resamplers here are index-aligned (output k is input time k / out_rate), so the mapping is
  exact; a transform that holds output back therefore costs nothing while the delay exceeds its
  hold-back (see `resample.py`: about 3 ms), and shows as extra latency only beyond that.
- Arrival times are *ideal* times on the session's clock: the shell feeds hop i+1 with hop i's
  `due`, not with the moment its timer fired, so scheduler lateness never accumulates and hop i's
  output time is the ingress arrival time plus the delays of hops 0..i.
- `max(previous due, ...)` keeps chunks in FIFO order when jitter would reorder them.
- The delay in force is chosen by the input time relative to the session start `t0`, so
  `50ms->2s@3s` applies 2 s to audio that arrived 3 s or more into the session.

Jitter, loss and noise are drawn from generators seeded by the `seed` string, so a session is
reproducible.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from probe.audio.formats import TABLE_ENCODINGS, bytes_per_sample, decode, encode, transcode
from probe.audio.framing import Reframer
from probe.pipeline.resample import LowLatencyResampler
from probe.pipeline.spec import HopSpec
from probe.protocol import AudioFormat

__all__ = ["LOSS_FRAME", "Emission", "HopCore", "output_format", "passes_through"]

F32 = npt.NDArray[np.float32]
LOSS_FRAME = 0.020  # seconds: the packet that `loss=PCT` drops


def output_format(spec: HopSpec, in_format: AudioFormat) -> AudioFormat:
    """The audio format `spec` emits when fed `in_format`."""
    if spec.codec is not None:
        return AudioFormat(spec.codec, 8000, 1)
    return AudioFormat("pcm_s16le", spec.rate or in_format.sample_rate, 1)


def passes_through(spec: HopSpec | None, in_format: AudioFormat,
                   out_format: AudioFormat) -> bool:
    """True if a hop's output samples are a fixed map of its input samples, one for one: the
    same rate and channels out as in, integer encodings (pcm16, mu-law, A-law) on both sides, no
    gain, noise or loss. `HopCore` then keeps to the bytes and applies that map by table."""
    return (in_format.sample_rate == out_format.sample_rate
            and in_format.channels == out_format.channels
            and in_format.encoding in TABLE_ENCODINGS and out_format.encoding in TABLE_ENCODINGS
            and (spec is None or (spec.gain_db is None and spec.noise_snr_db is None
                                  and not spec.loss_pct)))


@dataclass(frozen=True, slots=True)
class Emission:
    """A chunk the hop emits at clock time `due`: `data` in its output format.

    `index` is the output sample number of its first sample, `input_time` that sample's input
    time (so `due - input_time` is the latency this hop added to it).
    """

    due: float
    data: bytes
    index: int
    input_time: float


def _np_rng(seed: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big"))


class HopCore:
    """One hop of one session: `push` input as it arrives, `finish` at the end.

    `spec=None` is a zero-delay, transform-free hop (used for the return direction), which only
    converts `in_format` to `out_format`. `frame_samples` cuts the output into chunks of exactly
    that many samples (the last padded with silence), as Twilio's 20 ms media events need.

    A hop that `passes_through` works on the bytes (no resampler, no float samples): the same
    emissions, byte for byte, at a fraction of the CPU.
    """

    def __init__(
        self,
        in_format: AudioFormat,
        out_format: AudioFormat,
        *,
        t0: float,
        seed: str,
        spec: HopSpec | None = None,
        frame_samples: int | None = None,
    ) -> None:
        self.in_format = in_format
        self.out_format = out_format
        self.spec = spec
        self.t0 = t0
        self._resampler = LowLatencyResampler(in_format.sample_rate, out_format.sample_rate)
        self._reframer = None if frame_samples is None else Reframer(frame_samples)
        self._frame_samples = frame_samples
        self._width = bytes_per_sample(in_format.encoding)
        self._out_width = bytes_per_sample(out_format.encoding)
        self.passthrough = passes_through(spec, in_format, out_format)
        self._held = b""  # pass-through with frame_samples: bytes of the partial frame
        self._chunks: deque[tuple[int, float]] = deque()
        self._in_index = 0
        self._out_index = 0
        self._last_due = -math.inf
        self._stalled = False
        self._finished = False
        self._jitter_rng = random.Random(f"{seed}/jitter")
        self._loss_rng = random.Random(f"{seed}/loss")
        self._noise_rng = _np_rng(f"{seed}/noise")
        self._loss_slot = max(1, round(out_format.sample_rate * LOSS_FRAME))
        self._loss_decided: dict[int, bool] = {}
        self._loss_next = 0
        self._power = 0.0
        self._count = 0
        self._gain = (
            None if spec is None or spec.gain_db is None
            else np.float32(10.0 ** (spec.gain_db / 20.0))
        )

    @property
    def stalled(self) -> bool:
        """True once a `stall@S` hop has stopped emitting."""
        return self._stalled

    @property
    def holdback(self) -> float:
        """Seconds of audio the resampler holds back."""
        return self._resampler.holdback

    def push(self, data: bytes, t_in: float) -> list[Emission]:
        """Feed one input chunk (in `in_format`) that arrived at clock time `t_in`."""
        if self.passthrough:
            return self._push_bytes(data, t_in)
        x = decode(data, self.in_format.encoding)
        if not len(x):
            return []
        self._chunks.append((self._in_index, t_in))
        self._in_index += len(x)
        return self._emit(self._resampler.process(x), t_in, last=False)

    def finish(self, t_end: float) -> list[Emission]:
        """End of input at `t_end`: flush what the resampler and reframer still hold."""
        if self._finished:
            return []
        self._finished = True
        if self.passthrough:
            return self._finish_bytes(t_end)
        return self._emit(self._resampler.process(np.zeros(0, np.float32), last=True), t_end,
                          last=True)

    # --- internals -----------------------------------------------------------------------------

    def _push_bytes(self, data: bytes, t_in: float) -> list[Emission]:
        width = self._width
        if len(data) % width:
            decode(data, self.in_format.encoding)  # raises the ProtocolError
        n = len(data) // width
        if not n:
            return []
        self._chunks.append((self._in_index, t_in))
        self._in_index += n
        # the table maps each sample on its own, so it may come before the framing
        out = transcode(data, self.in_format.encoding, self.out_format.encoding)
        if self._frame_samples is None:
            return self._emit_bytes([out], t_in)
        buf = self._held + out if self._held else out
        size = self._frame_samples * self._out_width
        whole = len(buf) - len(buf) % size
        self._held = buf[whole:]
        return self._emit_bytes([buf[i:i + size] for i in range(0, whole, size)], t_in)

    def _finish_bytes(self, t_end: float) -> list[Emission]:
        if not self._held or self._frame_samples is None:
            return []
        rest, self._held = self._held, b""
        pad = self._frame_samples - len(rest) // self._out_width
        return self._emit_bytes([rest + encode(np.zeros(pad, np.float32),
                                               self.out_format.encoding)], t_end)

    def _emit_bytes(self, frames: list[bytes], t_avail: float) -> list[Emission]:
        out: list[Emission] = []
        for frame in frames:
            index = self._out_index
            timing = self._due(len(frame) // self._out_width, t_avail)
            if timing is not None:
                out.append(Emission(timing[0], frame, index, timing[1]))
        return out

    def _emit(self, y: F32, t_avail: float, *, last: bool) -> list[Emission]:
        if self._reframer is None:
            frames = [y] if len(y) else []
        else:
            frames = self._reframer.push(y)
            rest = self._reframer.flush() if last else None
            if rest is not None:
                frames.append(np.concatenate(
                    [rest, np.zeros(self._reframer.n - len(rest), np.float32)]
                ))
        out: list[Emission] = []
        for frame in frames:
            emission = self._one(frame, t_avail)
            if emission is not None:
                out.append(emission)
        return out

    def _one(self, frame: F32, t_avail: float) -> Emission | None:
        index = self._out_index
        timing = self._due(len(frame), t_avail)
        if timing is None:
            return None
        return Emission(timing[0], encode(self._transform(frame, index), self.out_format.encoding),
                        index, timing[1])

    def _due(self, n: int, t_avail: float) -> tuple[float, float] | None:
        """Take the next `n` output samples: when they are due and the input time of the first,
        or None if the hop stalled."""
        index = self._out_index
        self._out_index += n
        t_first = self._input_time(index * self.in_format.sample_rate / self.out_format.sample_rate)
        due = max(self._last_due, t_first + self._delay(t_first), t_avail)
        spec = self.spec
        if spec is not None and spec.stall_at is not None and due >= self.t0 + spec.stall_at:
            self._stalled = True
        if self._stalled:
            return None
        self._last_due = due
        return due, t_first

    def _input_time(self, pos: float) -> float:
        chunks = self._chunks
        while len(chunks) > 1 and chunks[1][0] <= pos:
            chunks.popleft()
        start, t = chunks[0]
        return t + (pos - start) / self.in_format.sample_rate

    def _delay(self, t_first: float) -> float:
        if self.spec is None:
            return 0.0
        delay, jitter = self.spec.delay_at(t_first - self.t0)
        if jitter:
            delay += self._jitter_rng.uniform(-jitter, jitter)
        return max(0.0, delay)

    def _transform(self, frame: F32, index: int) -> F32:
        spec = self.spec
        if spec is None:
            return frame
        y = frame
        if self._gain is not None:
            y = y * self._gain
        if spec.noise_snr_db is not None:
            self._power += float(np.dot(y, y))
            self._count += len(y)
            rms = math.sqrt(self._power / self._count) * 10.0 ** (-spec.noise_snr_db / 20.0)
            y = y + (self._noise_rng.standard_normal(len(y)) * rms).astype(np.float32)
        if spec.loss_pct:
            y = self._lose(y, index, spec.loss_pct / 100.0)
        return y

    def _lose(self, y: F32, index: int, p: float) -> F32:
        slot = self._loss_slot
        first, last = index // slot, (index + len(y) - 1) // slot
        while self._loss_next <= last:
            self._loss_decided[self._loss_next] = self._loss_rng.random() < p
            self._loss_next += 1
        y = y.copy()
        for s in range(first, last + 1):
            if self._loss_decided[s]:
                y[max(s * slot - index, 0):min((s + 1) * slot - index, len(y))] = 0.0
        for s in [k for k in self._loss_decided if k < last]:
            del self._loss_decided[s]
        return y
