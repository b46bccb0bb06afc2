"""Test audio: find the bundled fixtures and load WAV files as float32 mono, checked; the speech
fixtures' scripts (their sentences and where each lies in the file)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile as sf

from probe.audio.resample import resample
from probe.errors import ConfigError

F32 = npt.NDArray[np.float32]
MIN_RATE, MAX_RATE = 8000, 48000
SPEECH_FIXTURES: tuple[str, ...] = (
    "speech_en_us",
    "speech_en_gb",
    "speech_en_scotland",
    "speech_en_f3",
    "speech_en_us_m5",
    "speech_en_klatt",
)


SCRIPTS_FILE = "scripts.json"


@dataclass(frozen=True)
class Sentence:
    """One sentence of a fixture's script: its text and its span in the file, in seconds.

    `start_s` is the sentence's first sample with |x| >= 1e-3 and `end_s` one past its last such
    sample, both at the file's own rate (16 kHz), so `round(start_s * 16000)` is a sample index.
    """

    text: str
    start_s: float
    end_s: float


def fixtures_dir() -> Path:
    """The fixture folder: $PROBE_FIXTURES, else the repository's audio_fixtures/."""
    env = os.environ.get("PROBE_FIXTURES")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "audio_fixtures"


def list_fixtures() -> list[str]:
    """Names (file stems) of the WAV fixtures available, sorted."""
    d = fixtures_dir()
    return sorted(p.stem for p in d.glob("*.wav")) if d.is_dir() else []


def load_wav(
    path: str | os.PathLike[str], *, rate: int | None = None, min_seconds: float = 0.0
) -> tuple[F32, int]:
    """Read a mono audio file as float32; resample to `rate` if given. Returns (samples, rate)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Audio file {p} does not exist.")
    try:
        data, file_rate = sf.read(p, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError) as e:
        raise ConfigError(f"Audio file {p} could not be read as audio ({e}).") from None
    _check(p, data.shape[1], file_rate, len(data), min_seconds)
    x: F32 = np.ascontiguousarray(data[:, 0])
    if rate is not None and rate != file_rate:
        if not MIN_RATE <= rate <= MAX_RATE:
            raise ConfigError(f"Sample rate {rate} Hz is outside {MIN_RATE} to {MAX_RATE} Hz.")
        return resample(x, file_rate, rate), rate
    return x, int(file_rate)


def _check(p: Path, channels: int, file_rate: int, frames: int, min_seconds: float) -> None:
    if channels != 1:
        raise ConfigError(
            f"Audio file {p} has {channels} channels; the probe needs mono, "
            f"so mix it down first (e.g. sox in.wav -c 1 out.wav)."
        )
    if not MIN_RATE <= file_rate <= MAX_RATE:
        raise ConfigError(
            f"Audio file {p} is sampled at {file_rate} Hz; use a rate from "
            f"{MIN_RATE} to {MAX_RATE} Hz."
        )
    if frames <= 0:
        raise ConfigError(f"Audio file {p} contains no samples.")
    seconds = frames / file_rate
    if seconds < min_seconds:
        raise ConfigError(
            f"Audio file {p} lasts {seconds:.2f} s, shorter than the {min_seconds:g} s needed."
        )


def open_audio(path: str | os.PathLike[str], *, min_seconds: float = 0.0) -> sf.SoundFile:
    """A mono audio file opened for reading in blocks (``read(frames)``, ``seek``), checked as
    :func:`load_wav` checks it, without reading its samples: for files too long to hold."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Audio file {p} does not exist.")
    try:
        f = sf.SoundFile(p)
    except (sf.SoundFileError, RuntimeError, OSError) as e:
        raise ConfigError(f"Audio file {p} could not be read as audio ({e}).") from None
    try:
        _check(p, f.channels, f.samplerate, f.frames, min_seconds)
    except ConfigError:
        f.close()
        raise
    return f


def load_fixture(
    name_or_path: str | os.PathLike[str], *, rate: int | None = None, min_seconds: float = 0.0
) -> tuple[F32, int]:
    """Load a fixture by name (e.g. "speech_en_us") or any audio file by path."""
    s = os.fspath(name_or_path)
    if os.sep in s or "/" in s or Path(s).suffix:
        return load_wav(s, rate=rate, min_seconds=min_seconds)
    p = fixtures_dir() / f"{s}.wav"
    if not p.is_file():
        known = ", ".join(list_fixtures()) or f"none found in {fixtures_dir()}"
        raise ConfigError(f"No audio fixture named {s!r}; known fixtures: {known}.")
    return load_wav(p, rate=rate, min_seconds=min_seconds)


def fixture_script(name: str | os.PathLike[str]) -> tuple[Sentence, ...] | None:
    """The sentences of the speech fixture `name`, from the fixture folder's scripts.json; None
    for a fixture without a script (music, noise, silence) and for any file given by path."""
    s = os.fspath(name)
    if os.sep in s or "/" in s or Path(s).suffix:
        return None
    p = fixtures_dir() / SCRIPTS_FILE
    if not p.is_file():
        return None
    try:
        entry = json.loads(p.read_text(encoding="utf-8")).get(s)
        if entry is None:
            return None
        sentences = tuple(
            Sentence(str(d["text"]), float(d["start_s"]), float(d["end_s"]))
            for d in entry["sentences"]
        )
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as e:
        raise ConfigError(f"The fixture scripts in {p} cannot be read ({e!r}).") from None
    for sentence in sentences:
        if not (math.isfinite(sentence.end_s) and 0.0 <= sentence.start_s < sentence.end_s):
            raise ConfigError(
                f"The script of fixture {s} in {p} has a bad span for {sentence.text!r}."
            )
    return sentences
