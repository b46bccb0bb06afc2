"""Sample formats on the wire: 16-bit PCM, 32-bit float, G.711 mu-law and A-law.

Samples inside the probe are float32 mono in nominal [-1, 1]. Scaling follows libsndfile:
float to int16 multiplies by 32767, int16 to float divides by 32768. The G.711 coders are
byte-exact with libsndfile's (what `soundfile` writes for subtypes ULAW and ALAW).
"""

from __future__ import annotations

from functools import cache
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from probe.errors import ConfigError, ProtocolError

Encoding = Literal["pcm_s16le", "pcm_f32le", "mulaw", "alaw"]
ENCODINGS: tuple[Encoding, ...] = get_args(Encoding)

F32 = npt.NDArray[np.float32]
I16 = npt.NDArray[np.int16]
U8 = npt.NDArray[np.uint8]

_BYTES = {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1, "alaw": 1}


def _check(enc: str) -> Encoding:
    if enc not in _BYTES:
        raise ConfigError(f"Unknown audio encoding {enc!r}; use one of {', '.join(ENCODINGS)}.")
    return enc  # type: ignore[return-value]


def bytes_per_sample(enc: Encoding) -> int:
    """Bytes one mono sample takes in encoding `enc`."""
    return _BYTES[_check(enc)]


def _as_float(samples: npt.ArrayLike) -> F32:
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 1:
        raise ConfigError(f"Audio to encode must be mono (1-D), got shape {x.shape}.")
    return np.clip(np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)


def float_to_int16(samples: npt.ArrayLike) -> I16:
    """Float samples (clipped to [-1, 1], NaN as 0) to int16, rounded to nearest."""
    scaled: F32 = _as_float(samples) * np.float32(32767.0)
    return np.rint(scaled).astype(np.int16)


def int16_to_float(samples: npt.ArrayLike) -> F32:
    """Int16 samples to float32 in [-1, 1)."""
    return (np.asarray(samples, dtype=np.int16).astype(np.float32) / np.float32(32768.0))


# --- G.711 ------------------------------------------------------------------------------------
# Encoders take the magnitude by truncating division (|x| // 4 for mu-law's 14 bits,
# |x| // 16 for A-law's 12-bit table index) exactly as libsndfile does, so files agree byte
# for byte; the segment search is the classic Sun g711.c algorithm.

_ULAW_BIAS = 0x21  # 0x84 >> 2, the bias on the 14-bit scale
_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_ALAW_SEG_END = np.array([0xF, 0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF])


def _mu_law_code(mag14: npt.NDArray[np.int32]) -> U8:
    """Mu-law code (positive sign) for a 14-bit magnitude."""
    # past the top segment the code saturates at segment 7, mantissa 15
    v = np.minimum(mag14 + _ULAW_BIAS, 0x1FFF)
    seg = np.searchsorted(_ULAW_SEG_END, v).astype(np.int32)
    mant = (v >> (seg + 1)) & 0x0F
    return (0xFF ^ ((seg << 4) | mant)).astype(np.uint8)


def _a_law_code(mag12: npt.NDArray[np.int32]) -> U8:
    """A-law code (positive sign) for a 12-bit magnitude (|x| // 16)."""
    m = np.minimum(mag12, 0x7FF)
    seg = np.searchsorted(_ALAW_SEG_END, m).astype(np.int32)
    mant = np.where(seg == 0, m, m >> np.maximum(seg - 1, 0)) & 0x0F
    return (((seg << 4) | mant) ^ 0xD5).astype(np.uint8)


def int16_to_mulaw(samples: npt.ArrayLike) -> U8:
    """Int16 samples to G.711 mu-law codes."""
    x = np.asarray(samples, dtype=np.int16).astype(np.int32)
    mag = np.minimum(np.abs(x) // 4, 8191)
    code = _mu_law_code(mag)
    return np.where(x >= 0, code, code & 0x7F).astype(np.uint8)


def int16_to_alaw(samples: npt.ArrayLike) -> U8:
    """Int16 samples to G.711 A-law codes."""
    x = np.asarray(samples, dtype=np.int16).astype(np.int32)
    code = _a_law_code(np.abs(x) // 16)
    return np.where(x >= 0, code, code & 0x7F).astype(np.uint8)


def _mulaw_table() -> I16:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def _alaw_table() -> I16:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(seg == 0, t + 8, (t + 0x108) << np.maximum(seg - 1, 0))
    return np.where(a & 0x80, t, -t).astype(np.int16)


MULAW_TO_INT16: I16 = _mulaw_table()
ALAW_TO_INT16: I16 = _alaw_table()


def mulaw_to_int16(codes: npt.ArrayLike) -> I16:
    """G.711 mu-law codes to int16 (negative zero 0x7F decodes to 0)."""
    return MULAW_TO_INT16[np.asarray(codes, dtype=np.uint8)]


def alaw_to_int16(codes: npt.ArrayLike) -> I16:
    """G.711 A-law codes to int16."""
    return ALAW_TO_INT16[np.asarray(codes, dtype=np.uint8)]


# --- bytes ------------------------------------------------------------------------------------


def encode(samples: npt.ArrayLike, enc: Encoding) -> bytes:
    """Float mono samples to wire bytes; out-of-range values clip, NaN becomes silence."""
    enc = _check(enc)
    if enc == "pcm_f32le":
        return _as_float(samples).astype("<f4").tobytes()
    pcm = float_to_int16(samples)
    if enc == "pcm_s16le":
        return pcm.astype("<i2").tobytes()
    if enc == "mulaw":
        return int16_to_mulaw(pcm).tobytes()
    return int16_to_alaw(pcm).tobytes()


def decode(data: bytes, enc: Encoding) -> F32:
    """Wire bytes to float32 mono samples; a trailing partial sample is a ProtocolError."""
    enc = _check(enc)
    width = _BYTES[enc]
    if len(data) % width:
        raise ProtocolError(
            f"Audio payload of {len(data)} bytes is not a whole number of {width}-byte "
            f"{enc} samples."
        )
    if enc == "pcm_f32le":
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    if enc == "pcm_s16le":
        return int16_to_float(np.frombuffer(data, dtype="<i2"))
    codes = np.frombuffer(data, dtype=np.uint8)
    table = MULAW_TO_INT16 if enc == "mulaw" else ALAW_TO_INT16
    return int16_to_float(table[codes])


# --- conversions by table ----------------------------------------------------------------------
# A hop that only delays audio (or changes one integer encoding into another at the same rate)
# would decode each chunk to float and encode it back. Between the integer encodings that is a
# fixed map of each sample's code, so it is tabulated once, from `decode` and `encode`
# themselves, and applied with one lookup. (pcm16 to pcm16 is not quite the identity: decoding
# divides by 32768 and encoding multiplies by 32767, so samples above half scale lose one step.)

TABLE_ENCODINGS: tuple[Encoding, ...] = ("pcm_s16le", "mulaw", "alaw")


@cache
def _table(src: Encoding, dst: Encoding) -> npt.NDArray[np.uint8 | np.uint16] | bytes:
    every = np.arange(65536, dtype="<u2").tobytes() if src == "pcm_s16le" else bytes(range(256))
    out = encode(decode(every, src), dst)
    if src != "pcm_s16le" and dst != "pcm_s16le":
        return out  # one byte to one byte: bytes.translate
    return np.frombuffer(out, dtype="<u2" if dst == "pcm_s16le" else np.uint8)


def transcode(data: bytes, src: Encoding, dst: Encoding) -> bytes:
    """Exactly ``encode(decode(data, src), dst)``, without the float samples in between, for
    `src` and `dst` in `TABLE_ENCODINGS` (a trailing partial sample is a ProtocolError)."""
    if src not in TABLE_ENCODINGS or dst not in TABLE_ENCODINGS:
        raise ConfigError(f"No table from {src!r} to {dst!r}; both must be one of "
                          f"{', '.join(TABLE_ENCODINGS)}.")
    table = _table(src, dst)
    if isinstance(table, bytes):
        return data.translate(table)
    if src == "pcm_s16le":
        if len(data) % 2:
            raise ProtocolError(
                f"Audio payload of {len(data)} bytes is not a whole number of 2-byte "
                f"{src} samples."
            )
        codes = np.frombuffer(data, dtype="<u2")
    else:
        codes = np.frombuffer(data, dtype=np.uint8)
    out: bytes = table[codes].tobytes()
    return out
