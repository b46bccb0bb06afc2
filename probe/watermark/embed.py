"""Writing markers into audio: where they go, how loud, and the result."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from probe.errors import ConfigError
from probe.watermark.design import (
    DEFAULT_EVERY_S,
    DEFAULT_LEVEL_DB,
    MARKER_S,
    Float32Array,
    marker_waveform,
)

# Below this the carrier counts as silent and the marker is placed relative to this floor instead
# (-50 dBFS): a marker in silence must still be audible to the detector, not vanish.
_FLOOR_RMS = 10 ** (-50 / 20)


@dataclass(frozen=True, slots=True)
class Placement:
    """A marker written into a signal: its number in that signal, first sample, payload."""

    index: int
    sample: int
    payload: bytes


def active_rms(x: Float32Array, rate: int) -> float:
    """RMS over the active 20 ms frames (those within 40 dB of the loudest), like a speech level.

    It is the reference the marker level is set against, so pauses in the speech do not make the
    marker louder relative to the words.
    """
    return _active_level(_frame_energy(x, max(1, int(0.02 * rate))))


def _frame_energy(x: Float32Array, n: int) -> npt.NDArray[np.float64]:
    """Mean square of each whole ``n``-sample frame of ``x`` (a partial last frame is left out)."""
    usable = (len(x) // n) * n
    frames = np.nan_to_num(x[:usable].astype(np.float64)).reshape(-1, n)
    energy: npt.NDArray[np.float64] = np.mean(frames**2, axis=1)
    return energy


def _active_level(energy: npt.NDArray[np.float64]) -> float:
    if energy.size == 0:
        return _FLOOR_RMS
    top = float(energy.max())
    if top <= _FLOOR_RMS**2:
        return _FLOOR_RMS
    active = energy[energy >= top * 1e-4]
    return max(float(np.sqrt(active.mean())), _FLOOR_RMS)


class ActiveLevel:
    """:func:`active_rms` of a signal fed block by block (a file too long to hold): ``value()``
    is exactly what :func:`active_rms` gives for the whole signal. Keeps one number per 20 ms."""

    def __init__(self, rate: int) -> None:
        self._n = max(1, int(0.02 * rate))
        self._carry = np.zeros(0, dtype=np.float32)
        self._energy: list[npt.NDArray[np.float64]] = []

    def feed(self, block: Float32Array) -> None:
        x = np.concatenate([self._carry, block]) if self._carry.size else block
        usable = (len(x) // self._n) * self._n
        self._energy.append(_frame_energy(x[:usable], self._n))
        self._carry = np.array(x[usable:], dtype=np.float32)

    def value(self) -> float:
        return _active_level(np.concatenate(self._energy) if self._energy else np.zeros(0))


def mark_block(
    block: Float32Array,
    first: int,
    rate: int,
    placements: Sequence[Placement],
    amplitude: float,
) -> Float32Array:
    """Samples ``first`` to ``first + len(block)`` of a signal with the parts of ``placements``
    that fall there added, as :func:`embed` adds them (at ``amplitude``, see
    :func:`marker_amplitude`): the blocks of a signal marked one by one, joined, are
    :func:`embed`'s result to the bit. For files too long to hold."""
    out = np.array(block, dtype=np.float32, copy=True)
    amp = np.float32(amplitude)
    end = first + len(out)
    waves: dict[bytes, Float32Array] = {}
    for p in placements:
        wave = waves.get(p.payload)
        if wave is None:
            wave = waves[p.payload] = marker_waveform(p.payload, rate)
        lo, hi = max(p.sample, first), min(p.sample + len(wave), end)
        if hi > lo:
            out[lo - first : hi - first] += amp * wave[lo - p.sample : hi - p.sample]
    return out


def marker_positions(
    n_samples: int, rate: int, *, every_s: float = DEFAULT_EVERY_S, first_s: float = 0.25
) -> list[int]:
    """Start samples of markers every ``every_s`` seconds that fit wholly inside the signal."""
    if every_s < MARKER_S:
        raise ConfigError(
            f"markers must start at least {MARKER_S:.3f} s apart (their length), got {every_s} s"
        )
    length = int(round(MARKER_S * rate))
    out: list[int] = []
    t = first_s
    while True:
        start = int(round(t * rate))
        if start + length > n_samples:
            return out
        out.append(start)
        t += every_s


def marker_amplitude(reference_rms: float, level_db: float) -> float:
    """Scale for a unit-RMS marker ``level_db`` dB relative to ``reference_rms``."""
    return float(max(reference_rms, _FLOOR_RMS) * 10 ** (level_db / 20))


def embed(
    carrier: Float32Array,
    rate: int,
    payload_for: Callable[[int], bytes],
    *,
    every_s: float = DEFAULT_EVERY_S,
    level_db: float = DEFAULT_LEVEL_DB,
    first_s: float = 0.25,
    reference_rms: float | None = None,
    positions: Sequence[int] | None = None,
) -> tuple[Float32Array, list[Placement]]:
    """Return a marked copy of ``carrier`` and where each marker went.

    ``payload_for(i)`` gives the payload of the i-th marker. The level is relative to the
    carrier's active RMS unless ``reference_rms`` is given (a streaming source computes it once).
    """
    out = np.array(carrier, dtype=np.float32, copy=True)
    ref = active_rms(out, rate) if reference_rms is None else reference_rms
    amp = np.float32(marker_amplitude(ref, level_db))
    starts = (
        marker_positions(len(out), rate, every_s=every_s, first_s=first_s)
        if positions is None
        else list(positions)
    )
    placements: list[Placement] = []
    for i, start in enumerate(starts):
        payload = payload_for(i)
        wave = marker_waveform(payload, rate)
        end = min(len(out), start + len(wave))
        if start < 0 or end <= start:
            continue
        out[start:end] += amp * wave[: end - start]
        placements.append(Placement(index=i, sample=start, payload=payload))
    return out, placements
