"""Regenerate the test audio in this folder: `python audio_fixtures/make_fixtures.py`.

`python audio_fixtures/make_fixtures.py --scripts` only rewrites `scripts.json` (each speech
fixture's sentences with their sample-accurate spans) from the WAVs already here.

Every file is 16 kHz mono 16-bit PCM WAV and deterministic: speech comes from espeak-ng (same
voice, speed and text each run), everything else from numpy with fixed seeds. Levels are set to
about -20 dBFS (active speech level for speech, RMS for the rest). See PROVENANCE.md.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

RATE = 16000
LEVEL_DBFS = -20.0
OUT = Path(__file__).resolve().parent
F64 = npt.NDArray[np.float64]

# name: (voice, words per minute, text)
SPEECH: dict[str, tuple[str, int, str]] = {
    "speech_en_us": (
        "en-us", 165,
        "The quick brown fox jumps over the lazy dog. Please call me back after lunch. "
        "Our meeting moved to Thursday at three.",
    ),
    "speech_en_gb": (
        "en-gb", 160,
        "I would like to check the balance on my account. It was opened last spring. "
        "Could you read the last four payments to me?",
    ),
    "speech_en_scotland": (
        "en-gb-scotland", 155,
        "The train to Glasgow leaves from platform nine. It is running ten minutes late. "
        "Tickets can be bought on board.",
    ),
    "speech_en_f3": (
        "en+f3", 160,
        "Thank you for calling the help desk. Your call matters to us. "
        "Please describe the problem in a few words after the tone.",
    ),
    "speech_en_us_m5": (
        "en-us+m5", 170,
        "Set a timer for twenty minutes and remind me to water the plants. "
        "Then play some quiet music in the kitchen.",
    ),
    "speech_en_klatt": (
        "en+klatt", 150,
        "Seven green bottles stood on the wall. One of them fell and broke. "
        "Nobody heard a thing.",
    ),
}
BABBLE_FROM = list(SPEECH)
SCRIPTS = OUT / "scripts.json"
LOUD = 1e-3  # a sentence spans from its first to one past its last sample this loud
MIN_PAUSE = 0.2  # seconds below LOUD that part sentences (gaps between words are <= 0.15 s)


def espeak_version() -> str:
    """The `espeak-ng --version` line, recorded in PROVENANCE.md."""
    return subprocess.run(
        ["espeak-ng", "--version"], check=True, capture_output=True, text=True
    ).stdout.strip()


def speak(voice: str, wpm: int, text: str) -> F64:
    """Synthesize `text` with espeak-ng and return it at RATE Hz."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "out.wav"
        subprocess.run(
            ["espeak-ng", "-w", str(wav), "-v", voice, "-s", str(wpm), text], check=True
        )
        x, rate = sf.read(wav, dtype="float64", always_2d=True)
    return np.asarray(soxr.resample(x[:, 0], rate, RATE, quality="HQ"), dtype=np.float64)


def active_rms(x: F64, frame: int = RATE // 100, floor_db: float = 40.0) -> float:
    """RMS over 10 ms frames within `floor_db` of the loudest frame (a simple active level)."""
    n = len(x) // frame
    e = np.mean(x[: n * frame].reshape(n, frame) ** 2, axis=1)
    active = e[e > e.max() * 10 ** (-floor_db / 10)]
    return float(np.sqrt(active.mean()))


def to_level(x: F64, rms: float) -> F64:
    """Scale so `rms` becomes LEVEL_DBFS, backing off if the peak would clip."""
    gain = 10 ** (LEVEL_DBFS / 20) / rms
    peak = float(np.max(np.abs(x))) * gain
    if peak > 0.95:
        gain *= 0.95 / peak
    return x * gain


def music(seconds: float = 6.0, seed: int = 7) -> F64:
    """Chords, a melody with harmonics, a kick on the beat and a hi-hat off it."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    out = np.zeros_like(t)
    bpm = 120.0
    beat = 60.0 / bpm

    def note(midi: float, start: float, dur: float, amp: float, harmonics: int) -> None:
        i0, i1 = int(start * RATE), min(len(t), int((start + dur) * RATE))
        tt = t[i0:i1] - start
        f0 = 440.0 * 2 ** ((midi - 69) / 12)
        env = np.minimum(1.0, tt / 0.01) * np.exp(-tt * 2.5)
        tone = sum(
            np.sin(2 * np.pi * f0 * k * tt) / k for k in range(1, harmonics + 1)
            if f0 * k < RATE / 2
        )
        out[i0:i1] += amp * env * tone

    progression = [[60, 64, 67], [55, 59, 62], [57, 60, 64], [53, 57, 60]]  # C G Am F
    scale = [60, 62, 64, 65, 67, 69, 71, 72]
    bar = 4 * beat
    for b in range(int(seconds / bar) + 1):
        for m in progression[b % 4]:
            note(m - 12, b * bar, bar, 0.15, 6)
        for k in range(8):
            note(float(rng.choice(scale)) + 12, b * bar + k * beat / 2, beat / 2, 0.25, 4)
    for k in range(int(seconds / beat) + 1):
        i0 = int(k * beat * RATE)
        tt = t[i0 : i0 + RATE // 5] - k * beat
        out[i0 : i0 + len(tt)] += 0.8 * np.sin(2 * np.pi * (50 + 80 * np.exp(-tt * 30)) * tt) * (
            np.exp(-tt * 18)
        )
        j0 = int((k + 0.5) * beat * RATE)
        n = min(RATE // 20, len(t) - j0)
        if n > 0:
            hat = np.diff(rng.standard_normal(n + 1)) * np.exp(-np.arange(n) / (RATE * 0.01))
            out[j0 : j0 + n] += 0.15 * hat
    return out


def pink_noise(seconds: float = 4.0, seed: int = 11) -> F64:
    """Noise with a 1/f power spectrum above 20 Hz."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / RATE)
    spec /= np.sqrt(np.maximum(f, 20.0))
    return np.fft.irfft(spec, n)


def babble(voices: list[F64], seconds: float = 5.0) -> F64:
    """Several talkers at once, each looped and offset so they overlap throughout."""
    n = int(seconds * RATE)
    out = np.zeros(n)
    for k, v in enumerate(voices):
        loop = np.tile(v / active_rms(v), n // len(v) + 2)
        off = (k * RATE * 7) // 10
        out += loop[off : off + n]
    return out


def write(name: str, x: F64) -> None:
    sf.write(OUT / f"{name}.wav", x.astype(np.float32), RATE, subtype="PCM_16")
    level = 20 * np.log10(max(active_rms(x), 1e-10)) if np.any(x) else float("-inf")
    print(f"{name}.wav  {len(x) / RATE:.2f} s  active level {level:.1f} dBFS")


def sentences_of(text: str) -> list[str]:
    """`text` cut into sentences (each ends with . ? or !)."""
    return [p for p in re.split(r"(?<=[.?!])\s+", text.strip()) if p]


def sentence_spans(x: F64, count: int, rate: int = RATE) -> list[tuple[int, int]]:
    """[start, end) sample spans of the `count` sentences in `x`, parted by pauses of at least
    MIN_PAUSE below LOUD; fails unless exactly `count` sentences are found."""
    loud = np.flatnonzero(np.abs(x) >= LOUD)
    if not len(loud):
        raise ValueError("no speech found")
    cuts = np.flatnonzero(np.diff(loud) > MIN_PAUSE * rate)
    starts = [int(loud[0]), *(int(loud[i + 1]) for i in cuts)]
    ends = [*(int(loud[i]) + 1 for i in cuts), int(loud[-1]) + 1]
    if len(starts) != count:
        raise ValueError(f"found {len(starts)} sentences parted by pauses, expected {count}")
    return list(zip(starts, ends, strict=True))


def write_scripts() -> None:
    """Write scripts.json: every speech fixture's text and its sentences' spans (seconds at
    RATE), found in the WAVs in this folder (which it does not change)."""
    scripts: dict[str, object] = {}
    for name, (_voice, _wpm, text) in SPEECH.items():
        x, rate = sf.read(OUT / f"{name}.wav", dtype="float64")
        assert rate == RATE, f"{name}.wav is at {rate} Hz, not {RATE}"
        texts = sentences_of(text)
        spans = sentence_spans(x, len(texts))
        scripts[name] = {
            "text": text,
            "sentences": [
                {"text": t, "start_s": a / RATE, "end_s": b / RATE}
                for t, (a, b) in zip(texts, spans, strict=True)
            ],
        }
        print(f"{name}: " + "  ".join(f"{a / RATE:.3f}-{b / RATE:.3f}" for a, b in spans))
    SCRIPTS.write_text(json.dumps(scripts, indent=2) + "\n")


def main() -> int:
    if sys.argv[1:] == ["--scripts"]:
        write_scripts()
        return 0
    voices = []
    for name, (voice, wpm, text) in SPEECH.items():
        x = speak(voice, wpm, text)
        x = x[: 8 * RATE]
        voices.append(x)
        write(name, to_level(x, active_rms(x)))
    write("music", to_level(m := music(), float(np.sqrt(np.mean(m**2)))))
    write("pink_noise", to_level(p := pink_noise(), float(np.sqrt(np.mean(p**2)))))
    write("babble", to_level(b := babble(voices), float(np.sqrt(np.mean(b**2)))))
    write("silence", np.zeros(2 * RATE))
    write_scripts()
    print(espeak_version())
    return 0


if __name__ == "__main__":
    sys.exit(main())
