#!/usr/bin/env python
"""Informed detection benchmark: found rate, timing error and CPU of the streaming informed
detector (the live sink's) beside the blind decoder, per channel condition, and its null rows.

    python benchmarks/informed_matrix.py [--seconds S] [--hours H] [--only NAME,...] [--level DB]

Material: every speech fixture voice looped to --seconds (default 30) at 16 kHz, markers every
0.5 s at --level (default: the marker's default level), marker format v2, payload =
session_payload(token, i), a token per voice. Each condition is applied to the marked audio; the
codec's constant delay is measured on the unmarked carrier and becomes the "latency" the stream
carries. The informed detector is fed 20 ms frames with arrival = sample time + delay, and is
told each marker's send time (its true start) and a 3 s deadline, as the live sink is. The blind
decoder gets the same frames.

A marker is *found* when a detection carries its payload within 5 ms of its true position. The
stretch rows use a WSOLA written for this benchmark (``_conditions.wsola``: 20 ms frames, +-8 ms
search, like a jitter buffer's accelerate/expand) that logs its splices, so their truth is where
the marker's first segment really landed (the start each frame's mapping implies, weighted by how
much of the segment the frame carries; a splice inside it can land it twice, and each copy with
>= 20 % counts), not a linear map; their timing error is against the nearer copy. Any other
detection is *wrong*.
Null rows (any detection there is false):
- unmarked: --hours of unmarked audio (speech, music, noise, babble, silence, mixtures) with a
  random payload expected every 0.5 s, each searched in all three windows (+-2.5 ms and +-60 ms
  around a latency of 0, then the whole 3 s);
- other session: each voice's marked audio, expecting another token's markers at the same times;
- neighbour: expecting marker i+1 at marker i's send time, with a deadline before i+1 arrives.
CPU is time.process_time() of the whole feed loop (decode excluded), per stream-second.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
HERE = Path(__file__).resolve().parent
for _p in (str(HERE.parent), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import _conditions as C  # noqa: E402
import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

from probe.audio.fixtures import SPEECH_FIXTURES, load_fixture  # noqa: E402
from probe.audio.resample import resample  # noqa: E402
from probe.watermark.design import (  # noqa: E402
    DEFAULT_LEVEL_DB,
    segment_samples,
    session_payload,
)
from probe.watermark.detect import MarkerDetector, detect_all  # noqa: E402
from probe.watermark.embed import embed  # noqa: E402
from probe.watermark.informed import (  # noqa: E402
    Expected,
    InformedDetector,
    recover_missing,
)

RATE = 16000
FRAME_S = 0.02
TOL_S = 0.005
DEADLINE_S = 3.0
# Overridden by --threshold / --wide-threshold (for tuning); the detector's defaults otherwise.
THRESHOLDS: dict[str, float] = {}


def ffmpeg(x: np.ndarray, rate: int, args: list[str], ext: str, out_rate: int) -> np.ndarray:
    with tempfile.TemporaryDirectory(prefix="informed_") as d:
        src, mid, dst = Path(d, "in.wav"), Path(d, f"mid.{ext}"), Path(d, "out.wav")
        sf.write(src, np.asarray(x, np.float32), rate, subtype="FLOAT")
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(src), *args,
                        str(mid)], check=True)
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(mid), "-ar",
                        str(out_rate), "-ac", "1", "-c:a", "pcm_f32le", str(dst)], check=True)
        y, _ = sf.read(dst, dtype="float32")
    return C.fit_length(y, int(round(len(x) * out_rate / rate)))


def sox(x: np.ndarray, rate: int, effect: list[str]) -> np.ndarray:
    with tempfile.TemporaryDirectory(prefix="informed_") as d:
        src, dst = Path(d, "in.wav"), Path(d, "out.wav")
        sf.write(src, np.asarray(x, np.float32), rate, subtype="FLOAT")
        subprocess.run(["sox", "-V1", "-D", str(src), "-e", "floating-point", "-b", "32",
                        str(dst), *effect], check=True)
        y, _ = sf.read(dst, dtype="float32")
    return C.fit_length(y, len(x))


def to8k(x: np.ndarray) -> np.ndarray:
    return resample(x, RATE, 8000)


Cond = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, int]]

CONDITIONS: dict[str, Cond] = {
    "clean 16k": lambda x, r: (x, RATE),
    "mu-law 8k": lambda x, r: (C.g711(to8k(x), "mulaw"), 8000),
    "A-law 8k": lambda x, r: (C.g711(to8k(x), "alaw"), 8000),
    "48k>16k>8k>16k": lambda x, r: (C.resample_chain(resample(x, RATE, 48000),
                                                     (48000, 16000, 8000, 16000)), RATE),
    "Opus 16k": lambda x, r: (ffmpeg(x, RATE, ["-c:a", "libopus", "-b:a", "16k"], "ogg", RATE),
                              RATE),
    "Opus 12k VoIP": lambda x, r: (ffmpeg(x, RATE, ["-c:a", "libopus", "-b:a", "12k",
                                                    "-application", "voip"], "ogg", RATE), RATE),
    "Opus 10k VoIP": lambda x, r: (ffmpeg(x, RATE, ["-c:a", "libopus", "-b:a", "10k",
                                                    "-application", "voip"], "ogg", RATE), RATE),
    "Opus 6k VoIP": lambda x, r: (ffmpeg(x, RATE, ["-c:a", "libopus", "-b:a", "6k",
                                                   "-application", "voip"], "ogg", RATE), RATE),
    "MP3 24k": lambda x, r: (ffmpeg(x, RATE, ["-c:a", "libmp3lame", "-b:a", "24k"], "mp3", RATE),
                             RATE),
    "AAC 24k": lambda x, r: (ffmpeg(x, RATE, ["-c:a", "aac", "-b:a", "24k"], "m4a", RATE), RATE),
    "GSM 6.10 8k": lambda x, r: (C.gsm610(to8k(x)), 8000),
    "Speex NB 8k": lambda x, r: (ffmpeg(to8k(x), 8000, ["-c:a", "libspeex"], "ogg", 8000), 8000),
    "G.723.1 8k": lambda x, r: (ffmpeg(to8k(x), 8000, ["-c:a", "g723_1", "-b:a", "6.3k"], "wav",
                                       8000), 8000),
    "G.726 24k 8k": lambda x, r: (ffmpeg(to8k(x), 8000, ["-c:a", "g726", "-b:a", "24k"], "wav",
                                         8000), 8000),
    "denoiser afftdn": lambda x, r: (ffmpeg(x, RATE, ["-af", "afftdn=nr=20", "-c:a",
                                                      "pcm_f32le"], "wav", RATE), RATE),
    "AGC/compressor": lambda x, r: (sox(x, RATE, ["compand", "0.01,0.2", "6:-70,-60,-20",
                                                  "-5", "-90", "0.05"]), RATE),
    "pink noise 0 dB": lambda x, r: (C.mix_at_equal_level(
        x, load_fixture("pink_noise", rate=RATE)[0], RATE), RATE),
    "babble 0 dB": lambda x, r: (C.mix_at_equal_level(
        x, load_fixture("babble", rate=RATE)[0], RATE), RATE),
    "frame loss 5 %": lambda x, r: (C.frame_loss(x, RATE, 0.05, r)[0], RATE),
}
STRETCH = {"WSOLA +3 %": 1.03, "WSOLA -3 %": 0.97}


def stream(det: MarkerDetector | InformedDetector, y: np.ndarray, rate: int, delay: float,
           expected: list[Expected]) -> tuple[list, float]:
    n = int(FRAME_S * rate)
    pending = sorted(expected, key=lambda e: e.send_time)
    out = []
    k = 0
    t0 = time.process_time()
    for i in range(0, len(y), n):
        now = i / rate + delay
        if isinstance(det, InformedDetector):
            while k < len(pending) and pending[k].send_time <= now:
                det.expect(pending[k])
                k += 1
        out.extend(det.feed(y[i : i + n], now))
    out.extend(det.flush())
    return out, time.process_time() - t0


def score(dets: list, truth: dict[bytes, list[float]], rate: int
          ) -> tuple[int, int, list[float]]:
    found: dict[bytes, float] = {}
    wrong = 0
    for d in dets:
        ts = truth.get(d.payload)
        err = min(abs(d.position / rate - t) for t in ts) if ts else None
        if err is None or err > TOL_S or d.payload in found:
            wrong += 1
            continue
        found[d.payload] = err
    return len(found), wrong, [v * rate for v in found.values()]


def material(seconds: float, level_db: float = DEFAULT_LEVEL_DB
             ) -> list[tuple[str, np.ndarray, np.ndarray, list, int]]:
    out = []
    for k, name in enumerate(SPEECH_FIXTURES):
        x, _ = load_fixture(name, rate=RATE)
        x = C.loop_to(x, int(seconds * RATE))
        token = 0x1000 + 7919 * (k + 1)
        y, placements = embed(x, RATE, lambda i, t=token: session_payload(t, i),
                              level_db=level_db)
        out.append((name, x, y, placements, token))
    return out


def run_condition(name: str, mats: list, rng: np.random.Generator) -> dict:
    found = wrong = total = 0
    bfound = bwrong = 0
    dfound = dwrong = 0
    errs: list[float] = []
    cpu_i = cpu_b = audio_s = 0.0
    per_voice: dict[str, str] = {}
    for vname, x, y, placements, _token in mats:
        if name in STRETCH:
            st = C.wsola(y, RATE, STRETCH[name])
            out, rate = st.samples, RATE
            # Where each marker's first sample landed, from the stretcher's own splice log: a
            # splice can place it twice (both copies count) or fade it out (then anywhere).
            first = segment_samples(RATE)
            truth = {p.payload: [v / RATE for v in st.landings(p.sample, first)]
                     for p in placements}
            # A sped-up stream would otherwise deliver markers before they were sent: the stream
            # starts late by the most it gains, so its latency stays positive (as a real jitter
            # buffer's can only shrink to what it holds).
            delay = max(0.0, len(y) - len(out)) / RATE + 0.05
            send = {p.payload: p.sample / RATE for p in placements}
        else:
            out, rate = CONDITIONS[name](y, rng)
            ref = x if rate == RATE else to8k(x)
            plain = CONDITIONS[name](x, np.random.default_rng(0))[0] if name not in (
                "pink noise 0 dB", "babble 0 dB", "frame loss 5 %") else ref
            off = C.estimate_offset(ref, plain, rate // 20) if plain is not ref else 0
            truth = {p.payload: [p.sample / RATE + off / rate] for p in placements}
            send = {p.payload: p.sample / RATE for p in placements}
            delay = 0.0
        expected = [Expected(pl, t, t + DEADLINE_S) for pl, t in send.items()]
        dets, cpu = stream(InformedDetector(rate, **THRESHOLDS), out, rate, delay, expected)
        # Detections carry arrival times; positions are relative to the stream's start.
        f, w, e = score(dets, truth, rate)
        bd, bcpu = stream(MarkerDetector(rate), out, rate, delay, [])
        bf, bw, _ = score(bd, truth, rate)
        # probe detect (no reference): the blind pass over the file, then its series filled in.
        whole = detect_all(out, rate)
        whole += recover_missing(out, rate, whole)
        df, dw, _ = score(whole, truth, rate)
        dfound += df
        dwrong += dw
        found += f
        wrong += w
        bfound += bf
        bwrong += bw
        total += len(placements)
        errs.extend(e)
        cpu_i += cpu
        cpu_b += bcpu
        audio_s += len(out) / rate
        per_voice[vname] = f"{f}/{len(placements)}"
    err = np.array(errs) if errs else np.array([np.nan])
    return {
        "name": name, "found": found, "total": total, "wrong": wrong, "blind": bfound,
        "blind_wrong": bwrong, "detect": dfound, "detect_wrong": dwrong,
        "err_p99": float(np.percentile(err, 99)),
        "err_max": float(err.max()), "cpu_informed": 1000 * cpu_i / audio_s,
        "cpu_blind": 1000 * cpu_b / audio_s, "voices": per_voice,
    }


def null_rows(mats: list, hours: float) -> list[tuple[str, int, float]]:
    rows = []
    # other session / neighbour
    for label in ("other session", "neighbour"):
        false = 0
        secs = 0.0
        for _, _, y, placements, token in mats:
            if label == "other session":
                exp = [Expected(session_payload(token ^ 0x5A5A5A, p.index), p.sample / RATE,
                                p.sample / RATE + DEADLINE_S) for p in placements]
            else:
                exp = [Expected(session_payload(token, p.index + 1), p.sample / RATE,
                                p.sample / RATE + 0.2) for p in placements]
            dets, _ = stream(InformedDetector(RATE, **THRESHOLDS), y, RATE, 0.0, exp)
            false += len(dets)
            secs += len(y) / RATE
        rows.append((label, false, secs))
    synth = C.UnmarkedSynth(11, rate=8000)
    # A prior latency of 0: every expectation takes all three searches (tight, narrow, wide).
    det = InformedDetector(8000, latency=0.0, **THRESHOLDS)
    rng = np.random.default_rng(5)
    false = 0
    done = 0.0
    chunk = 600.0
    next_marker = 0.0
    while done < hours * 3600:
        x = synth.chunk(int(chunk * 8000))
        n = int(FRAME_S * 8000)
        for i in range(0, len(x), n):
            now = done + i / 8000
            while next_marker <= now:
                det.expect(Expected(session_payload(int(rng.integers(0, 1 << 24)),
                                                    int(rng.integers(0, 256))),
                                    next_marker, next_marker + DEADLINE_S))
                next_marker += 0.5
            false += len(det.feed(x[i : i + n], now))
        done += chunk
    false += len(det.flush())
    rows.append(("unmarked", false, done))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--hours", type=float, default=10.0)
    ap.add_argument("--only", default=None, help="comma-separated condition names")
    ap.add_argument("--tight-threshold", type=float, default=None, help="tight-search threshold")
    ap.add_argument("--threshold", type=float, default=None, help="narrow-search threshold")
    ap.add_argument("--wide-threshold", type=float, default=None, help="wide-search threshold")
    ap.add_argument("--level", type=float, default=DEFAULT_LEVEL_DB,
                    help="marker level, dB relative to the speech")
    ap.add_argument("--no-null", action="store_true", help="skip the null rows")
    args = ap.parse_args(argv)
    if args.tight_threshold is not None:
        THRESHOLDS["tight_threshold"] = args.tight_threshold
    if args.threshold is not None:
        THRESHOLDS["threshold"] = args.threshold
    if args.wide_threshold is not None:
        THRESHOLDS["wide_threshold"] = args.wide_threshold
    mats = material(args.seconds, args.level)
    rng = np.random.default_rng(1)
    names = [*CONDITIONS, *STRETCH]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    print(f"{len(mats)} voices x {args.seconds:.0f} s, markers every 0.5 s at {args.level:g} dB "
          "(format v2)")
    print(f"{'condition':18s} {'informed':>14s} {'wrong':>5s} {'err p99':>8s} {'err max':>8s} "
          f"{'blind':>11s} {'detect/wrong':>14s} {'cpu inf':>8s} {'cpu blind':>9s}  (err in "
          "output-rate samples; cpu ms per stream-second; detect: probe detect, blind and series)")
    for name in names:
        r = run_condition(name, mats, rng)
        pct = 100 * r["found"] / r["total"]
        bpct = 100 * r["blind"] / r["total"]
        dpct = 100 * r["detect"] / r["total"]
        print(f"{name:18s} {r['found']:4d}/{r['total']:<4d}{pct:5.1f}% {r['wrong']:5d} "
              f"{r['err_p99']:8.2f} {r['err_max']:8.2f} {r['blind']:4d} {bpct:5.1f}% "
              f"{r['detect']:5d} {dpct:5.1f}%/{r['detect_wrong']:<2d}"
              f"{r['cpu_informed']:8.3f} {r['cpu_blind']:9.3f}", flush=True)
        if r["found"] < r["total"]:
            print(f"{'':18s} per voice: {r['voices']}", flush=True)
    if args.no_null:
        return 0
    print("null rows (any detection is false):")
    for label, false, secs in null_rows(mats, args.hours):
        print(f"  {label:14s} {false} false detections in {secs / 3600:.2f} h", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
