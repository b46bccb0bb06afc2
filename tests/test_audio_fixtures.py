from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from probe.audio.fixtures import (
    SPEECH_FIXTURES,
    fixtures_dir,
    list_fixtures,
    load_fixture,
    load_wav,
)
from probe.errors import ConfigError

EXPECTED = {*SPEECH_FIXTURES, "music", "pink_noise", "babble", "silence"}


def _write(path: Path, x: np.ndarray, rate: int = 16000) -> Path:
    sf.write(path, x, rate, subtype="PCM_16")
    return path


def _one_sentence(e: pytest.ExceptionInfo[ConfigError]) -> str:
    msg = str(e.value)
    assert msg.endswith(".") and "\n" not in msg
    return msg


def test_bundled_fixtures_present_and_sane() -> None:
    assert fixtures_dir().name == "audio_fixtures"
    assert set(list_fixtures()) >= EXPECTED
    for name in EXPECTED:
        x, rate = load_fixture(name)
        assert rate == 16000 and x.dtype == np.float32 and x.ndim == 1
        assert 2.0 <= len(x) / rate <= 8.0
        level = np.sqrt(np.mean(x.astype(np.float64) ** 2))
        if name == "silence":
            assert level == 0.0
        else:
            assert -30 < 20 * np.log10(level) < -15, name


def test_load_with_resampling() -> None:
    x, rate = load_fixture("speech_en_us", rate=8000)
    y, _ = load_fixture("speech_en_us")
    assert rate == 8000 and x.dtype == np.float32
    assert abs(len(x) - len(y) // 2) <= 1


def test_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "mine.wav", np.zeros(1600))
    monkeypatch.setenv("PROBE_FIXTURES", str(tmp_path))
    assert fixtures_dir() == tmp_path
    assert list_fixtures() == ["mine"]
    assert len(load_fixture("mine")[0]) == 1600


def test_load_by_path(tmp_path: Path) -> None:
    p = _write(tmp_path / "a.wav", np.full(8000, 0.25), rate=8000)
    x, rate = load_fixture(p)
    assert rate == 8000 and np.allclose(x, 0.25, atol=1e-4)


def test_unknown_fixture_name() -> None:
    with pytest.raises(ConfigError, match="No audio fixture named 'nope'") as e:
        load_fixture("nope")
    assert "speech_en_us" in _one_sentence(e)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as e:
        load_wav(tmp_path / "gone.wav")
    _one_sentence(e)


def test_unreadable_file(tmp_path: Path) -> None:
    p = tmp_path / "junk.wav"
    p.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(ConfigError, match="could not be read as audio") as e:
        load_wav(p)
    _one_sentence(e)


def test_empty_file(tmp_path: Path) -> None:
    p = _write(tmp_path / "empty.wav", np.zeros(0))
    with pytest.raises(ConfigError, match="contains no samples") as e:
        load_wav(p)
    _one_sentence(e)


def test_too_short(tmp_path: Path) -> None:
    p = _write(tmp_path / "short.wav", np.zeros(8000))
    assert len(load_wav(p, min_seconds=0.5)[0]) == 8000
    with pytest.raises(ConfigError, match=r"lasts 0.50 s, shorter than the 2 s needed") as e:
        load_wav(p, min_seconds=2)
    _one_sentence(e)


def test_multichannel_refused(tmp_path: Path) -> None:
    p = _write(tmp_path / "stereo.wav", np.zeros((1600, 2)))
    with pytest.raises(ConfigError, match="has 2 channels; the probe needs mono") as e:
        load_wav(p)
    _one_sentence(e)


@pytest.mark.parametrize("rate", [4000, 96000])
def test_rate_out_of_range(tmp_path: Path, rate: int) -> None:
    p = _write(tmp_path / "odd.wav", np.zeros(rate), rate=rate)
    with pytest.raises(ConfigError, match=f"sampled at {rate} Hz; use a rate from 8000 to 48000"):
        load_wav(p)
    with pytest.raises(ConfigError, match="outside 8000 to 48000"):
        load_fixture("silence", rate=rate)
