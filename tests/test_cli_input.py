"""Every subcommand's numeric, URL and file options: a bad value is one sentence on stderr and
exit code 2 before anything starts, never a traceback; audio files at odd rates are used."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from probe.cli import main

ROOT = Path(__file__).resolve().parents[1]
T = "--target=ws://127.0.0.1:1/"


@pytest.fixture(scope="module")
def wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("in") / "in.wav"
    sf.write(p, np.zeros(16000, np.float32), 16000, subtype="PCM_16")
    return p


NOT_NUMBERS = ("nan", "inf", "-inf", "1e400", "abc")
# (subcommand and its other arguments, flag, values its range excludes beyond NOT_NUMBERS)
FLAGS: list[tuple[tuple[str, ...], str, tuple[str, ...]]] = [
    (("mark", "{wav}", "{out}", "--payload", "0badf00d"), "--every", ("0", "-1", "0.2")),
    (("mark", "{wav}", "{out}", "--payload", "0badf00d"), "--level", ("1", "-60")),
    (("detect", "{wav}"), "--max-delay", ("0", "-1", "601")),
    (("detect", "{wav}", "--expect", "{wav}"), "--max-delay", ("0",)),
    (("demo",), "--sessions", ("0", "-1", "1.5")),
    (("demo",), "--duration", ("0", "-1", "0.5")),
    (("exporter", "--listen", "127.0.0.1:0"), "--max-probes", ("0", "-1", "1001")),
    (("exporter", "--listen", "127.0.0.1:0"), "--queue-timeout", ("-1", "3601")),
    (("exporter", "--listen", "127.0.0.1:0"), "--sessions", ("0", "-1")),
    (("exporter", "--listen", "127.0.0.1:0"), "--duration", ("0", "-1")),
    (("exporter", "--listen", "127.0.0.1:0"), "--marker-timeout", ("0", "-1")),
    (("run", T), "--frame-ms", ("0", "-1")),
    (("run", T), "--duration", ("0", "-1")),
    (("run", T), "--rate", ("0", "11025", "44100")),
    (("canary", T), "--duration", ("0", "-1")),
    (("canary", T), "--marker-timeout", ("0", "-1")),
]


@pytest.mark.parametrize(
    "args, flag, value",
    [(a, f, v) for a, f, bad in FLAGS for v in (*NOT_NUMBERS, *bad)],
)
def test_a_bad_number_is_one_sentence_and_exit_2(
    args: tuple[str, ...], flag: str, value: str, wav: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [a.format(wav=wav, out=tmp_path / "out.wav") for a in args] + [f"{flag}={value}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"probe: {flag} must be ") and err.endswith(f"got {value!r}.\n"), err
    assert err.count("\n") == 1
    assert not (tmp_path / "out.wav").exists()


URLS = ("ws://[::1", "ws://[::1]:x/", "ws://", "ws://h:99999/", "ws://h:0/", "ws:// h/")


@pytest.mark.parametrize("url", URLS)
@pytest.mark.parametrize("where", [("run", "--target"), ("canary", "--target"),
                                   ("run", T, "--sink-url")])
def test_a_malformed_url_is_one_sentence_and_exit_2(
    where: tuple[str, ...], url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*where[:-1], f"{where[-1]}={url}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"probe: {where[-1]} must be a ws:// or wss:// URL naming a host")
    assert err.count("\n") == 1


@pytest.mark.parametrize("listen", ["[::1", "x", "1.2.3.4:99999", "h:-1"])
@pytest.mark.parametrize("args", [("pipeline", "--listen"), ("exporter", "--listen"),
                                  ("pipeline", "--listen=127.0.0.1:0", "--metrics-listen"),
                                  ("run", T, "--metrics-listen")])
def test_a_malformed_listen_address_is_one_sentence_and_exit_2(
    args: tuple[str, ...], listen: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*args[:-1], f"{args[-1]}={listen}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"probe: {args[-1]} must be HOST:PORT") and err.count("\n") == 1


@pytest.mark.parametrize("spec", ["a:nanms", "a:infms", "a:-1ms", "a:20ms~nanms",
                                  "a:20ms:gain=nan", "a:20ms:loss=200", "a:20ms:rate=0",
                                  "a:20ms:stall@nan", "a:50ms->2s@infs", "a:1e400ms"])
def test_a_bad_hop_spec_is_one_sentence_and_exit_2(
    spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pipeline", "--listen=127.0.0.1:0", f"--hops={spec}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("probe: ") and err.count("\n") == 1


@pytest.mark.parametrize("out", ["/dev/null", "marked", "marked.xyz", "marked.mp3"])
def test_mark_refuses_an_output_whose_extension_names_no_sound_format(
    out: str, wav: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = out if out.startswith("/") else str(tmp_path / out)
    assert main(["mark", str(wav), target, "--payload", "0badf00d"]) == 2
    err = capsys.readouterr().err
    assert "extension names its format" in err and err.count("\n") == 1


def test_the_reported_tracebacks_are_sentences_in_a_real_process(wav: Path) -> None:
    """The inputs issue 13 found tracebacks for, through the installed entry point."""
    for argv in (["run", "--target", "ws://[::1", "--duration", "1"],
                 ["run", T, "--duration", "nan"], ["run", T, "--duration=inf"],
                 ["run", T, "--frame-ms", "0"], ["run", T, "--duration=-1"],
                 ["mark", str(wav), "/dev/null", "--payload", "0badf00d"]):
        res = subprocess.run([sys.executable, "-m", "probe.cli", *argv], capture_output=True,
                             text=True, cwd=ROOT, timeout=60)
        assert res.returncode == 2, (argv, res.stderr)
        assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr


@pytest.mark.parametrize("rate", [11025, 22050, 44100])
def test_odd_rate_files_are_marked_at_their_rate_and_found(
    rate: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from probe.audio.fixtures import load_fixture

    x, _ = load_fixture("speech_en_us", rate=rate)
    src, out = tmp_path / "in.wav", tmp_path / "out.wav"
    sf.write(src, x[: 4 * rate], rate, subtype="PCM_16")
    assert main(["mark", str(src), str(out), "--payload", "0badf00d"]) == 0
    placed = [int(line.split("\t")[0]) for line in capsys.readouterr().out.splitlines()]
    assert sf.info(str(out)).samplerate == rate and len(placed) >= 6
    assert main(["detect", str(out)]) == 0
    found = [float(line.split("\t")[0]) for line in capsys.readouterr().out.splitlines()]
    assert len(found) == len(placed)
    assert all(abs(f - p) <= 1 for f, p in zip(sorted(found), placed, strict=True))


def test_files_outside_8_to_48_khz_are_refused(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    for rate in (6000, 96000):
        p = tmp_path / f"r{rate}.wav"
        sf.write(p, np.zeros(rate, np.float32), rate, subtype="PCM_16")
        assert main(["detect", str(p)]) == 2
        err = capsys.readouterr().err
        assert f"sampled at {rate} Hz; use a rate from 8000 to 48000 Hz" in err
