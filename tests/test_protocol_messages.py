"""Start / stop messages of PROTOCOL.md sections 1 and 2."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probe.errors import ProtocolError
from probe.protocol import (
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_UNSUPPORTED,
    AudioFormat,
    ForkStart,
    IngressStart,
    ProtocolViolation,
    ReturnStart,
    Stop,
    TraceContext,
    Unknown,
    parse_message,
    parse_traceparent,
    to_json,
)

# Verbatim from PROTOCOL.md 1.1.
INGRESS_EXAMPLE = """{"type": "start",
 "session": "b7f1c2d0e4a94f0f9a51c3d2e1f00a11",
 "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
 "tracestate": "vendor=value",
 "audio": {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1},
 "sink": "ws://10.0.0.7:8766/sink",
 "meta": {"scenario": "echo"}}"""

# Verbatim from PROTOCOL.md 2.1.
FORK_EXAMPLE = """{"type": "start", "hop": "resampler", \
"session": "b7f1c2d0e4a94f0f9a51c3d2e1f00a11",
 "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-b9c7c989f97918e1-01",
 "audio": {"encoding": "pcm_s16le", "sample_rate": 8000, "channels": 1}}"""

STOP_EXAMPLE = '{"type": "stop"}'

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def ingress(**changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(INGRESS_EXAMPLE)
    for key, value in changes.items():
        if value is ...:
            obj.pop(key, None)
        else:
            obj[key] = value
    return obj


def fork(**changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(FORK_EXAMPLE)
    for key, value in changes.items():
        if value is ...:
            obj.pop(key, None)
        else:
            obj[key] = value
    return obj


def test_close_codes() -> None:
    assert (CLOSE_NORMAL, CLOSE_UNSUPPORTED, CLOSE_POLICY) == (1000, 1003, 1008)


def test_ingress_example_parses() -> None:
    msg = parse_message(INGRESS_EXAMPLE, role="ingress")
    assert msg == IngressStart(
        session="b7f1c2d0e4a94f0f9a51c3d2e1f00a11",
        traceparent=TraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 1),
        audio=AudioFormat("pcm_s16le", 16000, 1),
        tracestate="vendor=value",
        sink="ws://10.0.0.7:8766/sink",
        meta={"scenario": "echo"},
    )


def test_ingress_example_parses_from_bytes() -> None:
    assert parse_message(INGRESS_EXAMPLE.encode(), role="ingress") == parse_message(
        INGRESS_EXAMPLE, role="ingress"
    )


def test_fork_example_parses() -> None:
    msg = parse_message(FORK_EXAMPLE, role="fork")
    assert msg == ForkStart(
        hop="resampler",
        audio=AudioFormat("pcm_s16le", 8000, 1),
        session="b7f1c2d0e4a94f0f9a51c3d2e1f00a11",
        traceparent=parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-b9c7c989f97918e1-01"),
    )


def test_stop_example_parses() -> None:
    for role in ("ingress", "fork", "return"):
        assert parse_message(STOP_EXAMPLE, role=role) == Stop()


def test_return_start_parses() -> None:
    text = (
        '{"type": "start", "audio": {"encoding": "pcm_s16le", "sample_rate": 24000, "channels": 1}}'
    )
    assert parse_message(text, role="return") == ReturnStart(AudioFormat("pcm_s16le", 24000))


def test_fork_without_session_or_traceparent() -> None:
    msg = parse_message(json.dumps(fork(session=..., traceparent=...)), role="fork")
    assert isinstance(msg, ForkStart)
    assert msg.session is None and msg.traceparent is None


def test_fork_tracestate_without_traceparent_is_dropped() -> None:
    msg = parse_message(json.dumps(fork(traceparent=..., tracestate="a=b")), role="fork")
    assert isinstance(msg, ForkStart) and msg.tracestate is None


def test_optional_keys_may_be_null_or_absent() -> None:
    msg = parse_message(json.dumps(ingress(tracestate=None, sink=None, meta=None)), role="ingress")
    assert isinstance(msg, IngressStart)
    assert (msg.tracestate, msg.sink, dict(msg.meta)) == (None, None, {})
    assert msg == parse_message(
        json.dumps(ingress(tracestate=..., sink=..., meta=...)), role="ingress"
    )


def test_unknown_keys_are_ignored() -> None:
    obj = ingress(future_key={"x": [1, 2]})
    obj["audio"]["bit_depth"] = 16
    assert parse_message(json.dumps(obj), role="ingress") == parse_message(
        INGRESS_EXAMPLE, role="ingress"
    )


def test_unknown_type_is_not_an_error() -> None:
    msg = parse_message('{"type": "ping", "n": 1}', role="ingress")
    assert msg == Unknown("ping", {"type": "ping", "n": 1})
    assert json.loads(to_json(msg)) == {"type": "ping", "n": 1}


def test_non_mono_parses_but_require_mono_refuses_with_1003() -> None:
    obj = ingress()
    obj["audio"]["channels"] = 2
    msg = parse_message(json.dumps(obj), role="ingress")
    assert isinstance(msg, IngressStart) and msg.audio.channels == 2
    with pytest.raises(ProtocolViolation, match="audio.channels must be 1") as info:
        msg.audio.require_mono()
    assert info.value.close_code == CLOSE_UNSUPPORTED
    assert len(info.value.reason.encode()) <= 123
    assert AudioFormat("mulaw", 8000).require_mono() == AudioFormat("mulaw", 8000, 1)


def test_audio_format_widths() -> None:
    assert AudioFormat("pcm_s16le", 16000, 2).frame_width == 4
    assert AudioFormat("pcm_f32le", 16000).sample_width == 4
    assert AudioFormat("alaw", 8000).sample_width == 1


# --- round trips --------------------------------------------------------------------------------


def test_to_json_is_compact_and_round_trips() -> None:
    msg = parse_message(INGRESS_EXAMPLE, role="ingress")
    text = to_json(msg)
    assert " " not in text
    assert json.loads(text) == json.loads(INGRESS_EXAMPLE)
    assert parse_message(text, role="ingress") == msg


def test_to_json_omits_absent_optional_keys() -> None:
    msg = IngressStart("s1", parse_traceparent(TP), AudioFormat("mulaw", 8000))
    assert json.loads(to_json(msg)) == {
        "type": "start",
        "session": "s1",
        "traceparent": TP,
        "audio": {"encoding": "mulaw", "sample_rate": 8000, "channels": 1},
    }
    fmsg = ForkStart("tts", AudioFormat("pcm_f32le", 24000))
    assert to_json(fmsg) == (
        '{"type":"start","hop":"tts",'
        '"audio":{"encoding":"pcm_f32le","sample_rate":24000,"channels":1}}'
    )
    assert to_json(Stop()) == '{"type":"stop"}'


def test_fork_round_trip() -> None:
    msg = parse_message(FORK_EXAMPLE, role="fork")
    assert parse_message(to_json(msg), role="fork") == msg
    assert json.loads(to_json(msg)) == json.loads(FORK_EXAMPLE)


def test_messages_are_frozen_and_hashable() -> None:
    msg = parse_message(INGRESS_EXAMPLE, role="ingress")
    assert isinstance(msg, IngressStart)
    with pytest.raises(AttributeError):
        msg.session = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        msg.meta["scenario"] = "x"  # type: ignore[index]
    hash(msg)


def test_meta_is_copied() -> None:
    meta = {"a": "1"}
    msg = IngressStart("s", parse_traceparent(TP), AudioFormat("mulaw", 8000), meta=meta)
    meta["a"] = "2"
    assert msg.meta == {"a": "1"}


sessions = st.text("abcXYZ019._:-", min_size=1, max_size=128)
hops = st.text("abcXYZ019._-", min_size=1, max_size=64)
formats = st.builds(
    AudioFormat,
    st.sampled_from(["pcm_s16le", "pcm_f32le", "mulaw", "alaw"]),
    st.integers(8000, 48000),
    st.integers(1, 8),
)
contexts = st.builds(
    TraceContext,
    st.text("0123456789abcdef", min_size=32, max_size=32).filter(lambda s: s != "0" * 32),
    st.text("0123456789abcdef", min_size=16, max_size=16).filter(lambda s: s != "0" * 16),
    st.integers(0, 255),
)


@given(
    sessions,
    contexts,
    formats,
    st.none() | st.text(max_size=512),
    st.none() | st.sampled_from(["ws://h/s", "wss://h.example:443/a?b=c", "ws://[::1]:8766/"]),
    st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=4),
)
def test_ingress_round_trip_property(
    session: str,
    ctx: TraceContext,
    audio: AudioFormat,
    tracestate: str | None,
    sink: str | None,
    meta: dict[str, str],
) -> None:
    msg = IngressStart(session, ctx, audio, tracestate=tracestate, sink=sink, meta=meta)
    assert parse_message(to_json(msg), role="ingress") == msg


@given(hops, formats, st.none() | sessions, st.none() | contexts, st.none() | st.text(max_size=20))
def test_fork_round_trip_property(
    hop: str,
    audio: AudioFormat,
    session: str | None,
    ctx: TraceContext | None,
    tracestate: str | None,
) -> None:
    if ctx is None:
        tracestate = None
    msg = ForkStart(hop, audio, session=session, traceparent=ctx, tracestate=tracestate)
    assert parse_message(to_json(msg), role="fork") == msg


# --- invalid input: ProtocolError naming the key -----------------------------------------------


def _audio(**changes: Any) -> dict[str, Any]:
    audio: dict[str, Any] = {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1}
    for key, value in changes.items():
        if value is ...:
            audio.pop(key)
        else:
            audio[key] = value
    return audio


INVALID_INGRESS = [
    # (changes to the example, key the message must name, close code)
    ({"session": ...}, "session", CLOSE_POLICY),
    ({"session": ""}, "session", CLOSE_POLICY),
    ({"session": "a" * 129}, "session", CLOSE_POLICY),
    ({"session": "has space"}, "session", CLOSE_POLICY),
    ({"session": "new\nline"}, "session", CLOSE_POLICY),
    ({"session": 12}, "session", CLOSE_POLICY),
    ({"traceparent": ...}, "traceparent", CLOSE_POLICY),
    ({"traceparent": "00-abc"}, "traceparent", CLOSE_POLICY),
    ({"traceparent": TP.upper()}, "traceparent", CLOSE_POLICY),
    ({"traceparent": 1}, "traceparent", CLOSE_POLICY),
    ({"tracestate": 5}, "tracestate", CLOSE_POLICY),
    ({"tracestate": "x" * 513}, "tracestate", CLOSE_POLICY),
    ({"audio": ...}, "audio", CLOSE_POLICY),
    ({"audio": "pcm_s16le"}, "audio", CLOSE_POLICY),
    ({"audio": _audio(encoding=...)}, "audio.encoding", CLOSE_POLICY),
    ({"audio": _audio(encoding="opus")}, "audio.encoding", CLOSE_UNSUPPORTED),
    ({"audio": _audio(encoding=1)}, "audio.encoding", CLOSE_POLICY),
    ({"audio": _audio(sample_rate=...)}, "audio.sample_rate", CLOSE_POLICY),
    ({"audio": _audio(sample_rate=96000)}, "audio.sample_rate", CLOSE_UNSUPPORTED),
    ({"audio": _audio(sample_rate=7999)}, "audio.sample_rate", CLOSE_UNSUPPORTED),
    ({"audio": _audio(sample_rate=16000.0)}, "audio.sample_rate", CLOSE_POLICY),
    ({"audio": _audio(sample_rate="16000")}, "audio.sample_rate", CLOSE_POLICY),
    ({"audio": _audio(sample_rate=True)}, "audio.sample_rate", CLOSE_POLICY),
    ({"audio": _audio(channels=...)}, "audio.channels", CLOSE_POLICY),
    ({"audio": _audio(channels=0)}, "audio.channels", CLOSE_UNSUPPORTED),
    ({"audio": _audio(channels="1")}, "audio.channels", CLOSE_POLICY),
    ({"sink": "http://10.0.0.7/sink"}, "sink", CLOSE_POLICY),
    ({"sink": "ws://"}, "sink", CLOSE_POLICY),
    ({"sink": "ws://host:99999/"}, "sink", CLOSE_POLICY),
    ({"sink": "ws://host/#frag"}, "sink", CLOSE_POLICY),
    ({"sink": "ws://host/a b"}, "sink", CLOSE_POLICY),
    ({"sink": "ws://[::1/"}, "sink", CLOSE_POLICY),
    ({"sink": ["ws://host/"]}, "sink", CLOSE_POLICY),
    ({"meta": "scenario=echo"}, "meta", CLOSE_POLICY),
    ({"meta": {"scenario": 1}}, "meta.scenario", CLOSE_POLICY),
    ({"meta": {"scenario": None}}, "meta.scenario", CLOSE_POLICY),
]


@pytest.mark.parametrize(("changes", "key", "code"), INVALID_INGRESS)
def test_invalid_ingress_start_names_the_key(changes: dict[str, Any], key: str, code: int) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_message(json.dumps(ingress(**changes)), role="ingress")
    err = info.value
    assert isinstance(err, ProtocolViolation)
    assert key in str(err)
    assert err.close_code == code
    assert str(err).endswith(".")
    assert "\n" not in str(err)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"hop": ...}, "hop"),
        ({"hop": ""}, "hop"),
        ({"hop": "a:b"}, "hop"),
        ({"hop": "a" * 65}, "hop"),
        ({"session": "bad session"}, "session"),
        ({"traceparent": "garbage"}, "traceparent"),
        ({"audio": ...}, "audio"),
        ({"audio": _audio(encoding="flac")}, "audio.encoding"),
    ],
)
def test_invalid_fork_start_names_the_key(changes: dict[str, Any], key: str) -> None:
    with pytest.raises(ProtocolError, match=key.replace(".", r"\.")):
        parse_message(json.dumps(fork(**changes)), role="fork")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "not valid JSON"),
        ("not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('"start"', "JSON object"),
        ("null", "JSON object"),
        ('{"type": "stop"', "not valid JSON"),
        ('{"type": NaN}', "not valid JSON"),
        ("{}", "'type'"),
        ('{"session": "s"}', "'type'"),
        ('{"type": 1}', "'type'"),
        ('{"type": null}', "'type'"),
        ("[" * 100_000, "not valid JSON"),
    ],
)
def test_malformed_messages(text: str, fragment: str) -> None:
    with pytest.raises(ProtocolError, match=fragment) as info:
        parse_message(text, role="ingress")
    assert isinstance(info.value, ProtocolViolation)
    assert info.value.close_code == CLOSE_POLICY


def test_invalid_utf8_bytes() -> None:
    with pytest.raises(ProtocolError, match="UTF-8"):
        parse_message(b'{"type": "stop"\xff}', role="fork")


def test_reason_fits_a_close_frame() -> None:
    err = ProtocolViolation("é" * 200)
    assert len(err.reason.encode("utf-8")) <= 123
    assert err.reason.endswith("...")
    assert ProtocolViolation("short.").reason == "short."


def test_constructors_validate() -> None:
    with pytest.raises(ProtocolError, match="session"):
        IngressStart("bad session", parse_traceparent(TP), AudioFormat("mulaw", 8000))
    with pytest.raises(ProtocolError, match="audio.encoding"):
        AudioFormat("opus", 8000)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="tracestate"):
        ForkStart("hop", AudioFormat("mulaw", 8000), tracestate="a=b")
    with pytest.raises(ProtocolError, match="sink"):
        IngressStart("s", parse_traceparent(TP), AudioFormat("mulaw", 8000), sink="ftp://x/")


# --- property: arbitrary input never raises anything but ProtocolError -------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
keys = st.sampled_from(
    ["type", "session", "traceparent", "tracestate", "audio", "sink", "meta", "hop", "x"]
)
audio_like = st.fixed_dictionaries(
    {},
    optional={
        "encoding": st.sampled_from(["pcm_s16le", "mulaw", "opus"]) | json_values,
        "sample_rate": st.integers(0, 100_000) | json_values,
        "channels": st.integers(-1, 3) | json_values,
    },
)
message_like = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["start", "stop", "other"]) | json_values,
        "session": sessions | json_values,
        "hop": hops | json_values,
        "traceparent": st.just(TP) | contexts.map(str) | json_values,
        "tracestate": json_values,
        "audio": audio_like | json_values,
        "sink": st.sampled_from(["ws://h/", "wss://h:1/x", "http://h/"]) | json_values,
        "meta": st.dictionaries(st.text(max_size=5), st.text(max_size=5)) | json_values,
    },
)


def _only_protocol_errors(text: str | bytes) -> None:
    for role in ("ingress", "fork", "return"):
        try:
            msg = parse_message(text, role=role)
        except ProtocolError as exc:
            assert isinstance(exc, ProtocolViolation)
            assert str(exc)
        else:
            to_json(msg)


@given(st.text())
def test_arbitrary_text_only_raises_protocol_error(text: str) -> None:
    _only_protocol_errors(text)


@given(st.binary())
def test_arbitrary_bytes_only_raises_protocol_error(data: bytes) -> None:
    _only_protocol_errors(data)


@given(json_values | message_like)
def test_arbitrary_json_only_raises_protocol_error(value: object) -> None:
    _only_protocol_errors(json.dumps(value))


@given(message_like, keys)
def test_arbitrary_start_only_raises_protocol_error(obj: dict[str, Any], _key: str) -> None:
    obj["type"] = "start"
    _only_protocol_errors(json.dumps(obj))
