"""probe mark / probe detect over files in blocks and windows (probe.offline): the same results
as the whole-file functions, in memory that does not grow with the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from probe.audio.fixtures import load_fixture
from probe.audio.formats import decode, encode
from probe.audio.resample import resample
from probe.offline import detect_file, follow_file, mark_file
from probe.watermark.design import session_payload
from probe.watermark.detect import detect_all
from probe.watermark.embed import active_rms, embed
from probe.watermark.informed import Sent, follow_markers, recover_missing

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = bytes.fromhex("0badf00d")


def _speech(rate: int, seconds: float) -> np.ndarray:
    x, _ = load_fixture("speech_en_us", rate=rate)
    return np.tile(x, int(np.ceil(seconds * rate / len(x))))[: int(seconds * rate)]


def _noisy(y: np.ndarray, x: np.ndarray, rate: int) -> np.ndarray:
    """``y`` under pink noise at the speech's level: blind decoding misses most markers, so the
    informed searches carry the result."""
    noise, _ = load_fixture("pink_noise", rate=rate)
    noise = np.tile(noise, int(np.ceil(len(y) / len(noise))))[: len(y)]
    return (y + noise * (active_rms(x, rate) / active_rms(noise, rate))).astype(np.float32)


@pytest.mark.parametrize("rate", [16000, 44100])
def test_marking_in_blocks_writes_what_embed_writes_for_the_whole_file(
    rate: int, tmp_path: Path
) -> None:
    src, out, whole = tmp_path / "in.wav", tmp_path / "out.wav", tmp_path / "whole.wav"
    sf.write(src, _speech(rate, 20.0), rate, subtype="PCM_16")
    x, _ = sf.read(src, dtype="float32")
    _, placed, _ = mark_file(str(src), str(out), PAYLOAD, "WAV", every_s=0.7, level_db=-14.0,
                             block_s=0.37)  # blocks that split markers and level frames
    ref, ref_placed = embed(x, rate, lambda i: PAYLOAD, every_s=0.7)
    sf.write(whole, np.clip(ref, -1.0, 1.0), rate, subtype="PCM_16")
    assert placed == ref_placed
    assert np.array_equal(sf.read(out, dtype="int16")[0], sf.read(whole, dtype="int16")[0])
    # In place: the output may be the input; nothing but it is left in the directory.
    mark_file(str(src), str(src), PAYLOAD, "WAV", every_s=0.7, level_db=-14.0)
    assert np.array_equal(sf.read(src, dtype="int16")[0], sf.read(whole, dtype="int16")[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.wav", "out.wav", "whole.wav"]


def test_detecting_in_windows_finds_what_the_whole_file_functions_find(tmp_path: Path) -> None:
    rate = 16000
    x = _speech(rate, 40.0)
    marked, placed = embed(x, rate, lambda i: session_payload(0x5EC7, i))
    y = _noisy(marked, x, rate)
    rec = tmp_path / "rec.wav"
    sf.write(rec, y, rate, subtype="FLOAT")
    blind = detect_all(y, rate)
    whole = sorted([(d, "blind") for d in blind]
                   + [(d, "series") for d in recover_missing(y, rate, blind)],
                   key=lambda f: f[0].position)
    assert 2 <= len(blind) < len(placed) // 2 and len(whole) == len(placed)
    # Odd windows and blocks: many window edges, none on a whole-file boundary.
    _, got = detect_file(str(rec), block_s=0.3, window_s=7)
    assert [(d.payload, d.sample, how) for d, how in got] == [
        (d.payload, d.sample, how) for d, how in whole]
    assert max(abs(a.position - b.position) for (a, _), (b, _) in zip(got, whole, strict=True)) \
        < 1e-4


def test_a_marker_on_a_window_edge_is_listed_once(tmp_path: Path) -> None:
    """Markers every 0.5 s from 0.25 s, the recording delayed 250 ms: one sits on every window
    edge. A window read 2 samples (not 2 s) past its stretch and kept what it found inside it,
    so such a marker was searched cut short by one window and whole by the next, and could be
    kept by both (7201 rows for 7200 markers of a 1-hour file) or by neither (here 3 of 5 were
    lost). Each is now owned by where the series predicts it and searched whole."""
    rate = 16000
    x = _speech(rate, 30.0)
    marked, placed = embed(x, rate, lambda i: session_payload(0x5EC7, i))
    noise = 0.9 * (_noisy(marked, x, rate) - marked)  # ~1 dB under the speech
    shift = rate // 4  # noise alone in front: the markers start at whole half-seconds
    y = np.concatenate([noise[:shift], marked + noise]).astype(np.float32)
    rec = tmp_path / "rec.wav"
    sf.write(rec, y, rate, subtype="FLOAT")
    blind = detect_all(y, rate)
    whole = sorted(d.sample for d in [*blind, *recover_missing(y, rate, blind)])
    assert 2 <= len(blind) < len(placed) // 2 and len(whole) == len(placed)
    _, got = detect_file(str(rec), block_s=1.0, window_s=5)
    samples = [d.sample for d, _ in got]
    assert len(samples) == len(set(samples)) == len(placed)
    assert samples == whole
    assert {p.sample + shift for p in placed} == set(samples)


@pytest.mark.parametrize("series", ["session", "fixed"])
def test_following_in_windows_finds_what_follow_markers_finds(
    series: str, tmp_path: Path
) -> None:
    rate = 16000
    x = _speech(rate, 40.0)

    def payload(i: int) -> bytes:
        return session_payload(0x2468AC, i) if series == "session" else PAYLOAD

    marked, placed = embed(x, rate, payload)
    # The "system": noise, 8 kHz mu-law, 123.4 ms later.
    y8 = decode(encode(resample(_noisy(marked, x, rate), rate, 8000), "mulaw"), "mulaw")
    rec = tmp_path / "rec.wav"
    sf.write(rec, np.concatenate([np.zeros(987, np.float32), y8]), 8000, subtype="FLOAT")
    y, _ = sf.read(rec, dtype="float32")
    sent = [Sent(p.payload, p.sample / rate) for p in placed]
    whole = follow_markers(y, 8000, sent, max_delay=5.0)
    _, got = follow_file(str(rec), sent, max_delay=5.0, window_s=5)
    assert sum(d is not None for d in whole) >= 0.9 * len(sent)
    assert [None if d is None else d.sample for d in got] == [
        None if d is None else d.sample for d in whole]
    assert all(abs(a.position - b.position) < 1e-4 and a.payload == b.payload
               for a, b in zip(got, whole, strict=True) if a is not None and b is not None)


# Peak resident memory of `probe mark` / `probe detect` on 20 minutes of audio. Read whole, the
# file's samples and their whitened copies alone take several hundred MB (issue 13: 966 MB to
# detect and 1.68 GB to mark an hour); in blocks the process stays near its import size.
RSS_BOUND_MB = 200

_PEAK = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _peak_mb(*argv: str, cwd: Path) -> float:
    """Peak RSS of ``probe ARGV`` measured by a fresh parent, so no other test's child counts."""
    out = subprocess.run([sys.executable, "-c", _PEAK, sys.executable, "-m", "probe.cli", *argv],
                         capture_output=True, text=True, cwd=cwd, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    code, kib = out.stdout.split()
    assert code == "0", out.stderr
    return int(kib) / 1024


def test_a_long_file_is_marked_and_searched_in_bounded_memory(tmp_path: Path) -> None:
    rate, minutes = 16000, 20
    src = tmp_path / "noise.wav"
    rng = np.random.default_rng(13)
    with sf.SoundFile(src, "w", rate, 1, subtype="PCM_16") as f:
        for _ in range(minutes * 6):
            f.write((rng.standard_normal(10 * rate) * 0.05).astype(np.float32))
    peaks = {"mark": _peak_mb("mark", "noise.wav", "marked.wav", "--payload", "0badf00d",
                              cwd=tmp_path)}
    marks = subprocess.run([sys.executable, "-m", "probe.cli", "mark", "noise.wav", "m2.wav",
                            "--payload", "0badf00d", "--json"], capture_output=True, text=True,
                           cwd=tmp_path, check=True).stdout
    (tmp_path / "marks.jsonl").write_text(marks)
    assert len(marks.splitlines()) == minutes * 60 * 2  # every 0.5 s, from 0.25 s
    # Blind, then the series' windows (under noise most markers are found by the series).
    peaks["detect"] = _peak_mb("detect", "marked.wav", cwd=tmp_path)
    peaks["detect --expect"] = _peak_mb("detect", "marked.wav", "--expect", "marks.jsonl",
                                        cwd=tmp_path)
    assert all(mb < RSS_BOUND_MB for mb in peaks.values()), peaks
