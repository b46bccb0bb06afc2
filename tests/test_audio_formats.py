from __future__ import annotations

import io

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from probe.audio import formats
from probe.audio.formats import ENCODINGS, Encoding, bytes_per_sample, decode, encode
from probe.errors import ConfigError, ProtocolError

ALL_INT16 = np.arange(-32768, 32768, dtype=np.int16)
ALL_CODES = np.arange(256, dtype=np.uint8)


def _data_span(raw: bytes) -> tuple[int, int]:
    """Offset and size of a WAV file's data chunk."""
    pos = 12
    while pos < len(raw):
        cid, size = raw[pos : pos + 4], int.from_bytes(raw[pos + 4 : pos + 8], "little")
        if cid == b"data":
            return pos + 8, size
        pos += 8 + size + (size & 1)
    raise AssertionError("no data chunk")


def _sf_encode(x: npt.NDArray[np.int16], subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, 8000, subtype=subtype, format="WAV")
    raw = buf.getvalue()
    start, size = _data_span(raw)
    return raw[start : start + size]


def _sf_decode(codes: npt.NDArray[np.uint8], subtype: str) -> npt.NDArray[np.int16]:
    # let libsndfile write the header, then put every code in the data chunk
    buf = io.BytesIO()
    sf.write(buf, np.zeros(len(codes), np.int16), 8000, subtype=subtype, format="WAV")
    raw = buf.getvalue()
    start, size = _data_span(raw)
    assert size == len(codes)
    patched = raw[:start] + codes.tobytes() + raw[start + size :]
    out, _ = sf.read(io.BytesIO(patched), dtype="int16")
    return np.asarray(out, dtype=np.int16)


def test_encodings_and_widths() -> None:
    assert ENCODINGS == ("pcm_s16le", "pcm_f32le", "mulaw", "alaw")
    assert [bytes_per_sample(e) for e in ENCODINGS] == [2, 4, 1, 1]


def test_unknown_encoding_is_config_error() -> None:
    with pytest.raises(ConfigError, match="Unknown audio encoding 'opus'"):
        bytes_per_sample("opus")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        encode(np.zeros(4, np.float32), "pcm_s24le")  # type: ignore[arg-type]


@pytest.mark.parametrize(("subtype", "fn"), [("ULAW", formats.int16_to_mulaw),
                                             ("ALAW", formats.int16_to_alaw)])
def test_g711_encoder_byte_exact_with_libsndfile(subtype: str, fn: object) -> None:
    assert callable(fn)
    assert fn(ALL_INT16).tobytes() == _sf_encode(ALL_INT16, subtype)


@pytest.mark.parametrize(("subtype", "fn"), [("ULAW", formats.mulaw_to_int16),
                                             ("ALAW", formats.alaw_to_int16)])
def test_g711_decoder_agrees_with_libsndfile(subtype: str, fn: object) -> None:
    assert callable(fn)
    np.testing.assert_array_equal(fn(ALL_CODES), _sf_decode(ALL_CODES, subtype))


def test_g711_bytes_path_matches_soundfile_float_read() -> None:
    x = ALL_INT16[::7]
    for enc, subtype in (("mulaw", "ULAW"), ("alaw", "ALAW")):
        data = _sf_encode(x, subtype)
        buf = io.BytesIO()
        sf.write(buf, x, 8000, subtype=subtype, format="WAV")
        buf.seek(0)
        ref, _ = sf.read(buf, dtype="float32")
        np.testing.assert_array_equal(decode(data, enc), ref)  # type: ignore[arg-type]


def test_mulaw_negative_zero_decodes_to_zero() -> None:
    assert formats.mulaw_to_int16(np.array([0x7F, 0xFF], np.uint8)).tolist() == [0, 0]
    assert decode(b"\x7f", "mulaw")[0] == 0.0


def test_g711_codes_are_monotonic_and_odd_symmetric() -> None:
    for table in (formats.MULAW_TO_INT16, formats.ALAW_TO_INT16):
        pos = np.sort(table[table > 0])
        assert (table[table != 0] == 0).sum() == 0
        assert np.array_equal(np.sort(-table[table < 0]), pos)


@pytest.mark.parametrize(
    ("enc", "bound"),
    [("pcm_f32le", 0.0), ("pcm_s16le", 1.5 / 32768 + 1e-6), ("mulaw", 0.0), ("alaw", 0.0)],
)
def test_round_trip_error(enc: Encoding, bound: float) -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, 20000).astype(np.float32)
    y = decode(encode(x, enc), enc)
    assert y.dtype == np.float32 and y.shape == x.shape
    err = np.abs(y - x)
    if enc in ("mulaw", "alaw"):
        # G.711 is logarithmic: error relative to the level, about 1/32 of it at worst
        assert np.all(err <= np.abs(x) / 30 + 3e-3)
        assert 20 * np.log10(np.std(x) / np.std(y - x)) > 35
    else:
        # pcm16: half a step of rounding plus libsndfile's 32767-in / 32768-out scaling
        assert err.max() <= bound


def test_pcm16_rounding_and_scale() -> None:
    x = np.array([0.0, 1.0, -1.0, 0.4 / 32767, 0.6 / 32767, 1.49 / 32767, -1.51 / 32767])
    pcm = np.frombuffer(encode(x, "pcm_s16le"), "<i2").tolist()
    assert pcm == [0, 32767, -32767, 0, 1, 1, -2]


def test_clip_and_nan() -> None:
    x = np.array([2.0, -3.0, np.nan, np.inf, -np.inf], np.float32)
    for enc in ENCODINGS:
        y = decode(encode(x, enc), enc)
        assert abs(y[2]) < 1e-3  # A-law has no zero code: its smallest level is 8/32768
        assert y[0] > 0.9 and y[3] > 0.9
        assert y[1] < -0.9 and y[4] < -0.9
        assert np.all(np.abs(y) <= 1.0)


def test_partial_trailing_sample_is_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="not a whole number of 2-byte pcm_s16le"):
        decode(b"\x00\x01\x02", "pcm_s16le")
    with pytest.raises(ProtocolError, match="4-byte pcm_f32le"):
        decode(b"\x00" * 6, "pcm_f32le")
    assert decode(b"", "pcm_s16le").size == 0


def test_multichannel_input_refused() -> None:
    with pytest.raises(ConfigError, match="mono"):
        encode(np.zeros((4, 2), np.float32), "pcm_s16le")


@given(hnp.arrays(np.float32, st.integers(0, 64), elements=st.floats(-1, 1, width=32)),
       st.sampled_from(ENCODINGS))
def test_encode_length_and_decode_range(x: npt.NDArray[np.float32], enc: Encoding) -> None:
    data = encode(x, enc)
    assert len(data) == len(x) * bytes_per_sample(enc)
    y = decode(data, enc)
    assert len(y) == len(x) and np.all(np.abs(y) <= 1.0)
