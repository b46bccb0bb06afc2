from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from probe.audio.fixtures import (
    SPEECH_FIXTURES,
    Sentence,
    fixture_script,
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


# --- scripts ---------------------------------------------------------------------------------

LOUD = 1e-3
MIN_PAUSE = 0.2  # the pause that parts sentences in make_fixtures.py


def _make_fixtures() -> Any:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "audio_fixtures" / "make_fixtures.py"
    spec = importlib.util.spec_from_file_location("make_fixtures", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", SPEECH_FIXTURES)
def test_speech_fixture_scripts(name: str) -> None:
    script = fixture_script(name)
    assert script is not None
    x, rate = load_fixture(name)
    assert rate == 16000
    mf = _make_fixtures()
    text = mf.SPEECH[name][2]
    assert " ".join(s.text for s in script) == text
    assert len(script) == text.count(".") + text.count("?") + text.count("!") >= 2
    loud = np.abs(x.astype(np.float64)) >= LOUD
    previous_end = 0
    for sentence in script:
        assert isinstance(sentence, Sentence)
        a, b = round(sentence.start_s * rate), round(sentence.end_s * rate)
        assert a / rate == sentence.start_s and b / rate == sentence.end_s  # sample-accurate
        assert 0 <= previous_end <= a < b <= len(x)
        assert loud[a] and loud[b - 1], sentence.text  # loud at both ends...
        assert loud[a:b].mean() > 0.5  # ...and mostly loud inside
        # silent around: nothing loud between sentences, and the pause parts them
        assert not loud[previous_end:a].any()
        if previous_end:
            assert (a - previous_end) / rate >= MIN_PAUSE
        previous_end = b
    assert not loud[previous_end:].any()


def test_scripts_json_is_what_make_fixtures_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mf = _make_fixtures()
    monkeypatch.setattr(mf, "OUT", fixtures_dir())
    monkeypatch.setattr(mf, "SCRIPTS", tmp_path / "scripts.json")
    mf.write_scripts()
    written = (tmp_path / "scripts.json").read_text()
    assert written == (fixtures_dir() / "scripts.json").read_text()
    assert set(json.loads(written)) == set(SPEECH_FIXTURES)


def test_sentence_spans_count_is_checked() -> None:
    mf = _make_fixtures()
    x = np.zeros(16000)
    x[1000:3000] = 0.1
    x[8000:9000] = 0.1
    assert mf.sentence_spans(x, 2) == [(1000, 3000), (8000, 9000)]
    with pytest.raises(ValueError, match="found 2 sentences parted by pauses, expected 3"):
        mf.sentence_spans(x, 3)


def test_no_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("music", "pink_noise", "babble", "silence", "nope"):
        assert fixture_script(name) is None
    assert fixture_script(fixtures_dir() / "speech_en_us.wav") is None  # a file by path
    _write(tmp_path / "mine.wav", np.zeros(1600))
    monkeypatch.setenv("PROBE_FIXTURES", str(tmp_path))
    assert fixture_script("mine") is None  # a folder without scripts.json
    assert fixture_script("speech_en_us") is None


def test_broken_scripts_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROBE_FIXTURES", str(tmp_path))
    (tmp_path / "scripts.json").write_text('{"a": {"sentences": [{"text": "x"}]}}')
    with pytest.raises(ConfigError, match="cannot be read") as e:
        fixture_script("a")
    _one_sentence(e)
    (tmp_path / "scripts.json").write_text(
        '{"a": {"sentences": [{"text": "x", "start_s": 2, "end_s": 1}]}}'
    )
    with pytest.raises(ConfigError, match="bad span") as e:
        fixture_script("a")
    _one_sentence(e)
