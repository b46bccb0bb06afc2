"""Frame-order rules of the ingress, fork and return receivers."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probe.errors import ProtocolError
from probe.protocol import (
    CLOSE_POLICY,
    CLOSE_UNSUPPORTED,
    Audio,
    AudioFormat,
    ForkReceiver,
    ForkStart,
    IngressReceiver,
    IngressStart,
    ProtocolViolation,
    ReturnReceiver,
    ReturnStart,
    Started,
    Stopped,
)
from probe.protocol.streams import ProtocolViolation as StreamsProtocolViolation

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
AUDIO16 = {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1}


def start(session: str = "s1", audio: dict[str, object] | None = None, **extra: object) -> str:
    obj: dict[str, object] = {
        "type": "start",
        "session": session,
        "traceparent": TP,
        "audio": audio or AUDIO16,
    }
    obj.update(extra)
    return json.dumps(obj)


def fork_start(hop: str = "asr", audio: dict[str, object] | None = None, **extra: object) -> str:
    obj: dict[str, object] = {"type": "start", "hop": hop, "audio": audio or AUDIO16}
    obj.update(extra)
    return json.dumps(obj)


STOP = '{"type":"stop"}'


def test_violation_is_exported_from_streams() -> None:
    assert StreamsProtocolViolation is ProtocolViolation
    assert issubclass(ProtocolViolation, ProtocolError)


def test_ingress_happy_path() -> None:
    rx = IngressReceiver()
    assert rx.start is None and rx.audio_format is None
    [ev] = rx.receive_text(start())
    assert isinstance(ev, Started) and isinstance(ev.msg, IngressStart)
    assert ev.msg.session == "s1"
    assert rx.audio_format == AudioFormat("pcm_s16le", 16000)
    assert rx.receive_binary(b"\x01\x02") == [Audio(b"\x01\x02")]
    assert rx.receive_binary(b"") == []
    assert rx.receive_text('{"type":"keepalive"}') == []
    assert rx.receive_binary(b"\x03\x04") == [Audio(b"\x03\x04")]
    assert rx.receive_text(STOP) == [Stopped()]
    assert rx.stopped


def test_everything_after_stop_is_ignored() -> None:
    rx = IngressReceiver()
    rx.receive_text(start())
    assert rx.receive_text(STOP) == [Stopped()]
    assert rx.receive_binary(b"late audio") == []
    assert rx.receive_text(STOP) == []
    assert rx.receive_text("not even json") == []
    assert rx.receive_text(start()) == []


def test_binary_first_is_policy_violation() -> None:
    rx = IngressReceiver()
    with pytest.raises(ProtocolViolation, match="before the ingress start") as info:
        rx.receive_binary(b"\x00\x00")
    assert info.value.close_code == CLOSE_POLICY
    # The receiver stays failed.
    with pytest.raises(ProtocolViolation):
        rx.receive_text(start())


@pytest.mark.parametrize("first", ["hello", "", "[1]", '{"no": "type"}'])
def test_non_json_first_message_is_policy_violation(first: str) -> None:
    rx = IngressReceiver()
    with pytest.raises(ProtocolViolation) as info:
        rx.receive_text(first)
    assert info.value.close_code == CLOSE_POLICY


def test_stop_first_is_policy_violation() -> None:
    with pytest.raises(ProtocolViolation, match="stop arrived before") as info:
        IngressReceiver().receive_text(STOP)
    assert info.value.close_code == CLOSE_POLICY


def test_unknown_message_before_start_is_ignored() -> None:
    rx = IngressReceiver()
    assert rx.receive_text('{"type":"hello","v":2}') == []
    assert len(rx.receive_text(start())) == 1


def test_bad_start_names_key_and_code() -> None:
    with pytest.raises(ProtocolViolation, match="session") as info:
        IngressReceiver().receive_text(start(session="bad session"))
    assert info.value.close_code == CLOSE_POLICY
    with pytest.raises(ProtocolViolation, match="traceparent") as info:
        IngressReceiver().receive_text(start(traceparent="00-zz"))
    assert info.value.close_code == CLOSE_POLICY


@pytest.mark.parametrize(
    ("audio", "key"),
    [
        ({"encoding": "opus", "sample_rate": 48000, "channels": 1}, "audio.encoding"),
        ({"encoding": "pcm_s16le", "sample_rate": 96000, "channels": 1}, "audio.sample_rate"),
        ({"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 2}, "audio.channels"),
    ],
)
def test_unsupported_audio_is_1003(audio: dict[str, object], key: str) -> None:
    with pytest.raises(ProtocolViolation, match=key) as info:
        IngressReceiver().receive_text(start(audio=audio))
    assert info.value.close_code == CLOSE_UNSUPPORTED
    assert len(info.value.reason.encode()) <= 123


def test_stereo_accepted_when_not_mono_only() -> None:
    rx = IngressReceiver(mono_only=False)
    [ev] = rx.receive_text(start(audio={**AUDIO16, "channels": 2}))
    assert isinstance(ev, Started) and ev.msg.audio.channels == 2


def test_second_start_is_format_change() -> None:
    rx = IngressReceiver()
    rx.receive_text(start())
    rx.receive_binary(b"ab")
    [ev] = rx.receive_text(start(audio={"encoding": "mulaw", "sample_rate": 8000, "channels": 1}))
    assert isinstance(ev, Started)
    assert rx.audio_format == AudioFormat("mulaw", 8000)


def test_second_start_cannot_change_session() -> None:
    rx = IngressReceiver()
    rx.receive_text(start())
    with pytest.raises(ProtocolViolation, match="session changed") as info:
        rx.receive_text(start(session="s2"))
    assert info.value.close_code == CLOSE_POLICY


def test_fork_happy_path_without_session() -> None:
    rx = ForkReceiver()
    [ev] = rx.receive_text(fork_start())
    assert isinstance(ev, Started) and ev.msg == ForkStart("asr", AudioFormat("pcm_s16le", 16000))
    assert rx.receive_binary(b"xy") == [Audio(b"xy")]
    assert rx.receive_text(STOP) == [Stopped()]
    assert rx.receive_binary(b"zz") == []


def test_fork_rules() -> None:
    with pytest.raises(ProtocolViolation, match="before the fork start"):
        ForkReceiver().receive_binary(b"x")
    with pytest.raises(ProtocolViolation, match="hop"):
        ForkReceiver().receive_text(fork_start(hop="bad hop"))
    rx = ForkReceiver()
    rx.receive_text(fork_start(session="s1"))
    with pytest.raises(ProtocolViolation, match="hop changed"):
        rx.receive_text(fork_start(hop="tts", session="s1"))
    rx = ForkReceiver()
    rx.receive_text(fork_start(session="s1"))
    with pytest.raises(ProtocolViolation, match="session changed"):
        rx.receive_text(fork_start(session="s2"))


def test_fork_ingress_start_is_not_a_fork_start() -> None:
    with pytest.raises(ProtocolViolation, match="'hop'"):
        ForkReceiver().receive_text(start())


# --- return direction --------------------------------------------------------------------------


def test_return_uses_ingress_format_until_system_start() -> None:
    ingress_fmt = AudioFormat("pcm_s16le", 16000)
    rx = ReturnReceiver(ingress_fmt)
    assert rx.audio_format == ingress_fmt
    assert rx.receive_binary(b"\x00\x01") == [Audio(b"\x00\x01")]
    assert rx.receive_text("hello, not json") == []
    assert rx.receive_text('{"type":"transcript","text":"hi"}') == []
    assert rx.receive_text('{"type":"start"}') == []  # no audio: nothing to change
    changed = {"encoding": "pcm_s16le", "sample_rate": 24000, "channels": 1}
    [ev] = rx.receive_text(json.dumps({"type": "start", "audio": changed}))
    assert ev == Started(ReturnStart(AudioFormat("pcm_s16le", 24000)))
    assert rx.audio_format == AudioFormat("pcm_s16le", 24000)
    # A second start is another format change.
    [ev] = rx.receive_text(
        json.dumps({"type": "start", "session": "s", "audio": {**changed, "sample_rate": 8000}})
    )
    assert isinstance(ev, Started) and rx.audio_format.sample_rate == 8000
    assert rx.receive_binary(b"\x02") == [Audio(b"\x02")]
    assert rx.receive_text(STOP) == [Stopped()]
    assert rx.receive_binary(b"\x03") == []
    assert rx.receive_text(STOP) == []


def test_return_system_start_before_any_audio() -> None:
    rx = ReturnReceiver(AudioFormat("mulaw", 8000))
    [ev] = rx.receive_text(
        '{"type":"start","audio":{"encoding":"pcm_f32le","sample_rate":22050,"channels":1}}'
    )
    assert isinstance(ev, Started)
    assert rx.audio_format == AudioFormat("pcm_f32le", 22050)


def test_return_unusable_format_raises_1003() -> None:
    rx = ReturnReceiver(AudioFormat("mulaw", 8000))
    with pytest.raises(ProtocolViolation, match="audio.encoding") as info:
        rx.receive_text(
            '{"type":"start","audio":{"encoding":"opus","sample_rate":48000,"channels":1}}'
        )
    assert info.value.close_code == CLOSE_UNSUPPORTED
    with pytest.raises(ProtocolViolation):
        rx.receive_binary(b"x")


# --- properties ----------------------------------------------------------------------------------

frames = st.lists(
    st.one_of(
        st.binary(max_size=8).map(lambda b: ("bin", b)),
        st.sampled_from(
            [
                start(),
                start(session="s2"),
                start(audio={**AUDIO16, "channels": 2}),
                fork_start(),
                fork_start(hop="tts"),
                STOP,
                '{"type":"mystery"}',
                "garbage",
                '{"type":"start","audio":{"encoding":"mulaw","sample_rate":8000,"channels":1}}',
            ]
        ).map(lambda t: ("text", t))
        | st.text(max_size=30).map(lambda t: ("text", t)),
    ),
    max_size=12,
)


@given(frames)
def test_receivers_only_raise_violations_and_stop_once(seq: list[tuple[str, object]]) -> None:
    for make in (IngressReceiver, ForkReceiver, lambda: ReturnReceiver(AudioFormat("mulaw", 8000))):
        rx = make()
        events: list[object] = []
        try:
            for kind, payload in seq:
                if kind == "bin":
                    assert isinstance(payload, bytes)
                    events += rx.receive_binary(payload)
                else:
                    assert isinstance(payload, str)
                    events += rx.receive_text(payload)
        except ProtocolViolation as exc:
            assert exc.close_code in (CLOSE_POLICY, CLOSE_UNSUPPORTED)
        stops = [i for i, e in enumerate(events) if isinstance(e, Stopped)]
        assert len(stops) <= 1
        if stops:
            assert stops[0] == len(events) - 1
        if not isinstance(rx, ReturnReceiver) and events:
            assert isinstance(events[0], Started)
