"""The marker (format v2): its layout, waveforms and payload coding, shared by the embedder and
the detectors.

A marker is 240 ms of band-limited (333-3375 Hz) pseudo-noise made of ten 24 ms segments::

    [ S | D1 D2 D3 D4 D5 D6 D7 D8 | S ]

``S`` is a fixed sync segment; it opens and closes the marker, so the blind detector can find the
marker with one correlation and measure how much a jitter buffer stretched it. The eight data
segments carry a 56-bit word: a 32-bit payload and a 24-bit check (the low 24 bits of its
CRC-32), so a corrupted payload passes the check with probability 2**-24 and is otherwise
dropped, never reported.

Identity by construction (what v2 changed from v1):

- The word is scrambled by a four-round Feistel permutation before it is cut into eight 7-bit
  symbols, so two payloads that differ in any bit (the neighbouring marker of the same session,
  the same marker number of another session) differ in every symbol with probability 127/128.
  In v1 the first three symbols were the session token's bits alone, shared by all markers of a
  session.
- Each data segment ``Dk`` is one of 64 independent pseudo-noise codewords of its own position,
  times +1 or -1 (7 bits). In v1 every codeword was a circular shift of one base segment, so a
  wrong marker's segment matched the expected one at some other lag; independent codewords
  match nothing but themselves at any lag.

So the data part of a marker (everything but the two shared syncs) is keyed by its whole payload,
and an informed detector that correlates only the data part cannot be fooled by another session's
or a neighbouring marker (:mod:`probe.watermark.informed`).

Every waveform is a sum of the same harmonics of 1/24 ms with fixed pseudo-random phases, so the
marker is the same continuous-time signal at every sample rate whose 24 ms is a whole number of
samples (8, 16, 24, 32, 44.1 is not, 48 kHz are): the embedder can write it at the stream's rate
and the detector can work at 8 kHz.
"""

from __future__ import annotations

import hashlib
import zlib
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from probe.errors import ConfigError

Float32Array = npt.NDArray[np.float32]

DETECT_RATE = 8000
SEGMENT_S = 0.024
SEGMENTS = 10
DATA_SEGMENTS = 8
MARKER_S = SEGMENT_S * SEGMENTS
CODEWORDS = 64
BITS_PER_SEGMENT = 7
MARKER_FORMAT = 2
PAYLOAD_BITS = 32
CHECK_BITS = DATA_SEGMENTS * BITS_PER_SEGMENT - PAYLOAD_BITS
PAYLOAD_BYTES = PAYLOAD_BITS // 8
BAND_HZ = (333.0, 3375.0)
# The marker's level under the speech's active level. Informed detection's margin is the
# marker's energy against what shares its band (speech, noise, codec error), so the level sets
# how much a path can take. Measured (benchmarks/informed_matrix.py, 6 voices x 10 s; pink noise
# at the speech's level, Opus 6k VoIP, G.723.1): at -20 dB pink 36 %, G.723.1 94 %; at -17 dB
# pink 98 %, G.723.1 100 %; at -14 dB both 100 % (and every row of 6 voices x 30 s but Opus 6k
# and the WSOLA rows), with blind decoding of Opus 16k from 73 % to 94 %. -14 dB is a noise bed
# 14 dB under the speech, inside the marker's 240 ms; reply mode puts markers only in speech.
DEFAULT_LEVEL_DB = -14.0
DEFAULT_EVERY_S = 0.5
SUPPORTED_RATES = (8000, 16000, 24000, 32000, 48000)
# Fades at the marker's two ends keep it from clicking; 1 ms costs under 1 % of its energy.
FADE_S = 0.001

_SYNC_SEED = 0x5EED5
_CODEBOOK_SEED = 0xC0DE2
_FEISTEL_ROUNDS = 4
_HALF_BITS = (DATA_SEGMENTS * BITS_PER_SEGMENT) // 2


def segment_samples(rate: int) -> int:
    """Samples in one 24 ms segment at ``rate``; refuses rates where that is not whole."""
    n = SEGMENT_S * rate
    if rate not in SUPPORTED_RATES or abs(n - round(n)) > 1e-9:
        raise ConfigError(
            f"sample rate {rate} Hz is not supported by the marker; "
            f"use one of {', '.join(str(r) for r in SUPPORTED_RATES)} Hz"
        )
    return int(round(n))


def marker_samples(rate: int) -> int:
    """Length of a whole marker at ``rate``."""
    return segment_samples(rate) * SEGMENTS


def _band_bins() -> npt.NDArray[np.int64]:
    n8 = segment_samples(DETECT_RATE)
    k = np.arange(n8 // 2 + 1)
    freqs = k / SEGMENT_S
    return k[(freqs >= BAND_HZ[0]) & (freqs <= BAND_HZ[1])]


def _harmonic_rows(phases: npt.NDArray[np.float64], rate: int) -> Float32Array:
    """Unit-RMS periodic segments at ``rate`` from one row of harmonic phases each."""
    n = segment_samples(rate)
    bins = _band_bins()
    spectrum = np.zeros((phases.shape[0], n // 2 + 1), dtype=np.complex128)
    spectrum[:, bins] = np.exp(2j * np.pi * phases)
    x = np.fft.irfft(spectrum, n, axis=1)
    x /= np.sqrt(np.mean(x**2, axis=1, keepdims=True))
    out = x.astype(np.float32)
    out.setflags(write=False)
    return out


@lru_cache(maxsize=8)
def sync_segment(rate: int) -> Float32Array:
    """The fixed segment that opens and closes every marker."""
    phases = np.random.default_rng(_SYNC_SEED).random((1, len(_band_bins())))
    row: Float32Array = _harmonic_rows(phases, rate)[0]
    return row


@lru_cache(maxsize=8)
def codebook(rate: int) -> Float32Array:
    """The data codewords, shape (DATA_SEGMENTS, CODEWORDS, segment): independent unit-RMS
    pseudo-noise segments, a set of its own for each data position."""
    rng = np.random.default_rng(_CODEBOOK_SEED)
    phases = rng.random((DATA_SEGMENTS * CODEWORDS, len(_band_bins())))
    rows = _harmonic_rows(phases, rate)
    out = rows.reshape(DATA_SEGMENTS, CODEWORDS, -1)
    out.setflags(write=False)
    return out


def check_bits(payload: bytes) -> int:
    """The 24-bit check carried with ``payload``."""
    return zlib.crc32(payload) & ((1 << CHECK_BITS) - 1)


def _round(i: int, half: int) -> int:
    digest = hashlib.blake2b(
        half.to_bytes(4, "big"), digest_size=4, person=b"probe-marker-v2", salt=bytes([i] * 16)
    ).digest()
    return int.from_bytes(digest, "big") & ((1 << _HALF_BITS) - 1)


def scramble(word: int) -> int:
    """The Feistel permutation of 56-bit words that spreads every payload bit over all symbols."""
    mask = (1 << _HALF_BITS) - 1
    left, right = word >> _HALF_BITS, word & mask
    for i in range(_FEISTEL_ROUNDS):
        left, right = right, left ^ _round(i, right)
    return (left << _HALF_BITS) | right


def unscramble(word: int) -> int:
    """Inverse of :func:`scramble`."""
    mask = (1 << _HALF_BITS) - 1
    left, right = word >> _HALF_BITS, word & mask
    for i in reversed(range(_FEISTEL_ROUNDS)):
        left, right = right ^ _round(i, left), left
    return (left << _HALF_BITS) | right


def payload_to_symbols(payload: bytes) -> list[int]:
    """Payload and check, scrambled, as eight 7-bit symbols (first segment first)."""
    if len(payload) != PAYLOAD_BYTES:
        raise ConfigError(f"a marker payload is {PAYLOAD_BYTES} bytes, got {len(payload)}")
    word = scramble((int.from_bytes(payload, "big") << CHECK_BITS) | check_bits(payload))
    mask = (1 << BITS_PER_SEGMENT) - 1
    return [
        (word >> (BITS_PER_SEGMENT * (DATA_SEGMENTS - 1 - i))) & mask for i in range(DATA_SEGMENTS)
    ]


def symbols_to_payload(symbols: list[int]) -> bytes | None:
    """The payload the symbols carry, or None when the check does not match."""
    word = 0
    for s in symbols:
        word = (word << BITS_PER_SEGMENT) | (s & ((1 << BITS_PER_SEGMENT) - 1))
    word = unscramble(word)
    payload = (word >> CHECK_BITS).to_bytes(PAYLOAD_BYTES, "big")
    if word & ((1 << CHECK_BITS) - 1) != check_bits(payload):
        return None
    return payload


def symbol_waveform(position: int, symbol: int, rate: int) -> Float32Array:
    """The data segment at ``position`` (0-7) that carries ``symbol`` (7 bits: the low six pick
    the codeword, the top bit its sign)."""
    word: Float32Array = codebook(rate)[position, symbol & (CODEWORDS - 1)]
    out: Float32Array = word * np.float32(-1.0 if symbol >> 6 else 1.0)
    return out


def marker_waveform(payload: bytes, rate: int) -> Float32Array:
    """The unit-RMS marker that carries ``payload``, at ``rate`` (8 to 48 kHz)."""
    if rate not in SUPPORTED_RATES:
        if not 8000 <= rate <= 48000:
            raise ConfigError(f"sample rate {rate} Hz is outside 8000-48000 Hz")
        # The marker is band-limited far below any of these rates' Nyquist, so resampling the
        # 48 kHz rendition gives the same continuous-time marker.
        import soxr

        wide = marker_waveform(payload, 48000)
        out: Float32Array = np.asarray(
            soxr.resample(wide, 48000, rate, quality="VHQ"), dtype=np.float32
        )
        return out[: int(round(MARKER_S * rate))]
    n = segment_samples(rate)
    sync = sync_segment(rate)
    parts = [sync]
    for pos, sym in enumerate(payload_to_symbols(payload)):
        parts.append(symbol_waveform(pos, sym, rate))
    parts.append(sync)
    wave = np.concatenate(parts).astype(np.float32)
    fade = max(1, int(FADE_S * rate))
    ramp = (0.5 - 0.5 * np.cos(np.pi * (np.arange(fade) + 0.5) / fade)).astype(np.float32)
    wave[:fade] *= ramp
    wave[-fade:] *= ramp[::-1]
    assert wave.shape[0] == n * SEGMENTS
    return wave


def parse_payload_hex(text: str) -> bytes:
    """Payload bytes from a hex string of exactly 8 digits (32 bits)."""
    cleaned = text.strip().lower().removeprefix("0x")
    try:
        raw = bytes.fromhex(cleaned)
    except ValueError:
        raw = b""
    if len(raw) != PAYLOAD_BYTES or len(cleaned) != 2 * PAYLOAD_BYTES:
        raise ConfigError(
            f"payload must be {2 * PAYLOAD_BYTES} hex digits ({PAYLOAD_BITS} bits), got {text!r}"
        )
    return raw


def session_payload(token: int, marker: int) -> bytes:
    """The standard payload layout: a 24-bit session token, then an 8-bit marker number."""
    return (((token & 0xFFFFFF) << 8) | (marker & 0xFF)).to_bytes(PAYLOAD_BYTES, "big")


def split_session_payload(payload: bytes) -> tuple[int, int]:
    """Inverse of :func:`session_payload`: (token, marker number)."""
    word = int.from_bytes(payload, "big")
    return word >> 8, word & 0xFF
