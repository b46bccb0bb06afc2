"""A Locust session's frames over the shared carrier are byte for byte the marked, encoded audio."""

from __future__ import annotations

import pytest

from probe.audio.formats import encode
from probe.session.frames import SessionFrames, shared_carrier
from probe.session.frames import carrier as _carrier
from probe.watermark.design import MARKER_S
from probe.watermark.embed import embed, marker_positions


@pytest.mark.parametrize(
    ("rate", "encoding", "frame_len", "every_s"),
    [
        (16000, "pcm_s16le", 320, 0.5),
        # Markers back to back share frames; frames that do not divide the session.
        (16000, "pcm_s16le", 333, MARKER_S),
        (8000, "mulaw", 160, 0.3),
        (16000, "pcm_f32le", 480, 0.75),
    ],
)
def test_frames_equal_the_whole_session_marked_and_encoded(
    rate: int, encoding: str, frame_len: int, every_s: float
) -> None:
    duration, level = 4.0, -20.0
    shared = shared_carrier("speech_en_us", rate, duration, encoding, level)  # type: ignore[arg-type]
    carrier, ref = _carrier("speech_en_us", rate, duration)
    positions = marker_positions(len(carrier), rate, every_s=every_s)
    payloads = [bytes([i, 7, 7, 255 - i]) for i in range(len(positions))]
    marked, placements = embed(
        carrier, rate, lambda i: payloads[i], level_db=level, reference_rms=ref,
        positions=positions,
    )
    want = encode(marked, encoding)  # type: ignore[arg-type]

    frames = SessionFrames(shared, frame_len, positions, payloads)
    got = []
    for n in range(frames.n_frames):
        got.append(frames.frame(n))
        frames.prepare(n + 1)
    assert b"".join(got) == want
    assert frames.n_frames == -(-len(carrier) // frame_len)
    assert [(p.index, p.sample, p.payload) for p in frames.placements] == [
        (p.index, p.sample, p.payload) for p in placements
    ]
    # Marked frames really differ from the shared carrier (the markers are there).
    step = frame_len * shared.width
    first = positions[0] // frame_len
    assert got[first + 1] != shared.pcm[(first + 1) * step : (first + 2) * step]


def test_without_prepare_each_group_is_made_when_its_frame_is_asked() -> None:
    shared = shared_carrier("speech_en_us", 16000, 2.0, "pcm_s16le", -20.0)
    positions = marker_positions(len(shared.samples), 16000, every_s=0.5)
    payloads = [bytes([i, 1, 2, 3]) for i in range(len(positions))]
    a = SessionFrames(shared, 320, positions, payloads)
    b = SessionFrames(shared, 320, positions, payloads)
    lazy = [a.frame(n) for n in range(a.n_frames)]
    ahead = []
    for n in range(b.n_frames):
        b.prepare(n)
        ahead.append(b.frame(n))
    assert lazy == ahead
