from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from probe.audio.framing import Reframer, frame_samples, split_frames
from probe.errors import ConfigError


def test_frame_samples() -> None:
    assert frame_samples(16000, 20) == 320
    assert frame_samples(8000, 20) == 160
    assert frame_samples(44100, 10) == 441
    with pytest.raises(ConfigError, match="whole, positive number"):
        frame_samples(44100, 1)
    with pytest.raises(ConfigError):
        frame_samples(16000, 0)


def test_split_frames_keeps_partial() -> None:
    frames = split_frames(np.arange(10, dtype=np.float32), 4)
    assert [len(f) for f in frames] == [4, 4, 2]
    assert frames[2].tolist() == [8, 9]
    assert split_frames(np.zeros(0, np.float32), 4) == []
    with pytest.raises(ConfigError):
        split_frames(np.zeros(3), 0)


def test_reframer_basic() -> None:
    r = Reframer(4)
    assert r.push(np.arange(3, dtype=np.float32)) == []
    out = r.push(np.arange(3, 9, dtype=np.float32))
    assert [f.tolist() for f in out] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert r.pending == 1
    rest = r.flush()
    assert rest is not None and rest.tolist() == [8]
    assert r.flush() is None


@given(st.lists(st.integers(0, 50), max_size=30), st.integers(1, 17))
def test_reframer_preserves_stream(sizes: list[int], n: int) -> None:
    x = np.arange(sum(sizes), dtype=np.float32)
    r = Reframer(n)
    frames: list[np.ndarray] = []
    pos = 0
    for s in sizes:
        frames += r.push(x[pos : pos + s])
        pos += s
    assert all(len(f) == n for f in frames)
    rest = r.flush()
    parts = [*frames, rest] if rest is not None else frames
    joined = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    np.testing.assert_array_equal(joined, x)
