"""The Twilio Media Streams dialect (PROTOCOL.md section 3)."""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probe.errors import ProtocolError
from probe.protocol import (
    CLOSE_POLICY,
    CLOSE_UNSUPPORTED,
    TWILIO_AUDIO,
    Audio,
    AudioFormat,
    Clear,
    IngressStart,
    Mark,
    ProtocolViolation,
    Started,
    Stopped,
    TwilioReceiver,
    TwilioResponder,
    TwilioReturnReceiver,
    TwilioSender,
    parse_traceparent,
)

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
STREAM = "MZ18ad3ab5a668481ce02b83e7395059f0"
CALL = "CA2ac6a7f8a6e3ab2d4b1a5f19e8e60b7c"
ACCOUNT = "AC25e16e9a716a4a1786a7c83f58e30482"


def sender(**kwargs: Any) -> TwilioSender:
    return TwilioSender(
        STREAM, CALL, "b7f1c2d0", parse_traceparent(TP), account_sid=ACCOUNT, **kwargs
    )


def test_sender_events_match_twilio_shapes() -> None:
    tx = sender(tracestate="vendor=value")
    assert json.loads(tx.connected()) == {
        "event": "connected",
        "protocol": "Call",
        "version": "1.0.0",
    }
    assert json.loads(tx.start()) == {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "accountSid": ACCOUNT,
            "streamSid": STREAM,
            "callSid": CALL,
            "tracks": ["inbound"],
            "customParameters": {
                "session": "b7f1c2d0",
                "traceparent": TP,
                "tracestate": "vendor=value",
            },
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
        "streamSid": STREAM,
    }
    m1 = json.loads(tx.media(b"\xff" * 160))
    assert m1 == {
        "event": "media",
        "sequenceNumber": "2",
        "media": {
            "track": "inbound",
            "chunk": "1",
            "timestamp": "0",
            "payload": base64.b64encode(b"\xff" * 160).decode(),
        },
        "streamSid": STREAM,
    }
    m2 = json.loads(tx.media(b"\x7f" * 160))
    assert (m2["sequenceNumber"], m2["media"]["chunk"], m2["media"]["timestamp"]) == (
        "3",
        "2",
        "20",
    )
    assert json.loads(tx.mark("marker-1")) == {
        "event": "mark",
        "sequenceNumber": "4",
        "streamSid": STREAM,
        "mark": {"name": "marker-1"},
    }
    m3 = json.loads(tx.media(b"\x00" * 80))
    assert (m3["sequenceNumber"], m3["media"]["chunk"], m3["media"]["timestamp"]) == (
        "5",
        "3",
        "40",
    )
    m4 = json.loads(tx.media(b"\x00" * 160))
    assert m4["media"]["timestamp"] == "50"
    assert tx.samples_sent == 560
    assert json.loads(tx.stop()) == {
        "event": "stop",
        "sequenceNumber": "7",
        "stop": {"accountSid": ACCOUNT, "callSid": CALL},
        "streamSid": STREAM,
    }


def test_sender_enforces_order() -> None:
    tx = sender()
    with pytest.raises(ProtocolError, match="cannot send start"):
        tx.start()
    with pytest.raises(ProtocolError, match="cannot send media"):
        tx.media(b"x")
    tx.connected()
    with pytest.raises(ProtocolError, match="cannot send connected"):
        tx.connected()
    tx.start()
    tx.stop()
    with pytest.raises(ProtocolError, match="cannot send media"):
        tx.media(b"x")


def test_sender_validates() -> None:
    with pytest.raises(ProtocolError, match="session"):
        TwilioSender(STREAM, CALL, "bad session", parse_traceparent(TP))
    with pytest.raises(ProtocolError, match="stream_sid"):
        TwilioSender("", CALL, "s", parse_traceparent(TP))
    with pytest.raises(ProtocolError, match="reserved"):
        sender(meta={"session": "x"})


def test_sender_to_receiver_round_trip() -> None:
    tx = sender(tracestate="v=1", sink="ws://10.0.0.7:8766/sink", meta={"scenario": "echo"})
    rx = TwilioReceiver()
    events: list[object] = []
    events += rx.receive_text(tx.connected())
    events += rx.receive_text(tx.start())
    events += rx.receive_text(tx.media(b"\x01\x02\x03"))
    events += rx.receive_text(tx.mark("m1"))
    events += rx.receive_text(tx.media(b"\x04"))
    events += rx.receive_text(tx.stop())
    assert events == [
        Started(
            IngressStart(
                session="b7f1c2d0",
                traceparent=parse_traceparent(TP),
                audio=AudioFormat("mulaw", 8000, 1),
                tracestate="v=1",
                sink="ws://10.0.0.7:8766/sink",
                meta={"scenario": "echo"},
            )
        ),
        Audio(b"\x01\x02\x03"),
        Mark("m1"),
        Audio(b"\x04"),
        Stopped(),
    ]
    assert (rx.stream_sid, rx.call_sid, rx.account_sid) == (STREAM, CALL, ACCOUNT)
    assert rx.start is not None and rx.start.audio == TWILIO_AUDIO
    assert rx.receive_text(tx_media_after_stop()) == []


def tx_media_after_stop() -> str:
    return json.dumps({"event": "media", "streamSid": STREAM, "media": {"payload": "AA=="}})


def _real_start(**params: str) -> dict[str, Any]:
    # Shaped like Twilio's documented start message.
    return {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "accountSid": ACCOUNT,
            "streamSid": STREAM,
            "callSid": CALL,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": params,
        },
        "streamSid": STREAM,
    }


def test_receiver_ignores_dtmf_unknown_and_outbound_track() -> None:
    rx = TwilioReceiver()
    rx.receive_text(json.dumps(_real_start(session="s", traceparent=TP)))
    dtmf = {
        "event": "dtmf",
        "streamSid": STREAM,
        "sequenceNumber": "5",
        "dtmf": {"track": "inbound_track", "digit": "1"},
    }
    assert rx.receive_text(json.dumps(dtmf)) == []
    assert rx.receive_text('{"event":"brand-new","x":1}') == []
    outbound = {
        "event": "media",
        "streamSid": STREAM,
        "media": {"track": "outbound", "chunk": "1", "timestamp": "0", "payload": "AAE="},
    }
    assert rx.receive_text(json.dumps(outbound)) == []
    no_track = {"event": "media", "streamSid": STREAM, "media": {"payload": "AAE="}}
    assert rx.receive_text(json.dumps(no_track)) == [Audio(b"\x00\x01")]


def test_receiver_extra_custom_parameters_become_meta() -> None:
    [ev] = TwilioReceiver().receive_text(
        json.dumps(_real_start(session="s", traceparent=TP, FirstName="Jane"))
    )
    assert isinstance(ev, Started) and dict(ev.msg.meta) == {"FirstName": "Jane"}


def test_media_before_start_is_violation() -> None:
    rx = TwilioReceiver()
    rx.receive_text('{"event":"connected","protocol":"Call","version":"1.0.0"}')
    with pytest.raises(ProtocolViolation, match="before the start") as info:
        rx.receive_text(tx_media_after_stop())
    assert info.value.close_code == CLOSE_POLICY
    with pytest.raises(ProtocolViolation):  # stays failed
        rx.receive_text(json.dumps(_real_start(session="s", traceparent=TP)))


def _start_without(path: str) -> dict[str, Any]:
    obj = _real_start(session="s", traceparent=TP)
    *parents, last = path.split(".")
    node = obj
    for p in parents:
        node = node[p]
    del node[last]
    return obj


@pytest.mark.parametrize(
    "path",
    [
        "event",
        "start",
        "start.streamSid",
        "start.callSid",
        "start.accountSid",
        "start.mediaFormat",
        "start.mediaFormat.encoding",
        "start.customParameters",
        "start.customParameters.session",
        "start.customParameters.traceparent",
    ],
)
def test_missing_start_keys_are_named(path: str) -> None:
    with pytest.raises(ProtocolViolation) as info:
        TwilioReceiver().receive_text(json.dumps(_start_without(path)))
    assert path.split(".")[-1] in str(info.value)
    assert path in str(info.value) or path == "event"


@pytest.mark.parametrize(
    ("change", "key", "code"),
    [
        (
            ("mediaFormat", "encoding", "audio/x-alaw"),
            "start.mediaFormat.encoding",
            CLOSE_UNSUPPORTED,
        ),
        (("mediaFormat", "sampleRate", 16000), "start.mediaFormat.sampleRate", CLOSE_UNSUPPORTED),
        (("mediaFormat", "channels", 2), "start.mediaFormat.channels", CLOSE_UNSUPPORTED),
        (
            ("customParameters", "session", "no spaces"),
            "start.customParameters.session",
            CLOSE_POLICY,
        ),
        (
            ("customParameters", "traceparent", "x"),
            "start.customParameters.traceparent",
            CLOSE_POLICY,
        ),
        (("customParameters", "sink", "http://x/"), "start.customParameters.sink", CLOSE_POLICY),
        (("customParameters", "other", 5), "start.customParameters.other", CLOSE_POLICY),
    ],
)
def test_invalid_start_values_are_named(
    change: tuple[str, str, object], key: str, code: int
) -> None:
    obj = _real_start(session="s", traceparent=TP)
    obj["start"][change[0]][change[1]] = change[2]
    with pytest.raises(ProtocolViolation) as info:
        TwilioReceiver().receive_text(json.dumps(obj))
    assert key in str(info.value)
    assert info.value.close_code == code


def test_receiver_rejects_mismatches_and_binary() -> None:
    rx = TwilioReceiver()
    rx.receive_text(json.dumps(_real_start(session="s", traceparent=TP)))
    with pytest.raises(ProtocolViolation, match="a second start"):
        rx.receive_text(json.dumps(_real_start(session="s", traceparent=TP)))
    rx = TwilioReceiver()
    rx.receive_text(json.dumps(_real_start(session="s", traceparent=TP)))
    with pytest.raises(ProtocolViolation, match="streamSid"):
        rx.receive_text('{"event":"media","streamSid":"MZother","media":{"payload":"AA=="}}')
    rx = TwilioReceiver()
    rx.receive_text(json.dumps(_real_start(session="s", traceparent=TP)))
    with pytest.raises(ProtocolViolation, match="media.payload"):
        rx.receive_text(
            json.dumps({"event": "media", "streamSid": STREAM, "media": {"payload": "not base64!"}})
        )
    with pytest.raises(ProtocolViolation, match="binary") as info:
        TwilioReceiver().receive_binary(b"\x00")
    assert info.value.close_code == CLOSE_UNSUPPORTED
    with pytest.raises(ProtocolViolation, match="JSON"):
        TwilioReceiver().receive_text("nope")


def test_responder_and_return_receiver() -> None:
    out = TwilioResponder(STREAM)
    assert json.loads(out.media(b"\x01\x02")) == {
        "event": "media",
        "streamSid": STREAM,
        "media": {"payload": "AQI="},
    }
    assert json.loads(out.mark("reply-1")) == {
        "event": "mark",
        "streamSid": STREAM,
        "mark": {"name": "reply-1"},
    }
    assert json.loads(out.clear()) == {"event": "clear", "streamSid": STREAM}
    rx = TwilioReturnReceiver(STREAM)
    assert rx.audio_format == AudioFormat("mulaw", 8000)
    assert rx.receive_text(out.media(b"\x01\x02")) == [Audio(b"\x01\x02")]
    assert rx.receive_text(out.mark("reply-1")) == [Mark("reply-1")]
    assert rx.receive_text(out.clear()) == [Clear()]
    assert rx.receive_text(f'{{"event":"transcript","streamSid":"{STREAM}"}}') == []


def test_return_receiver_rejects_other_stream_and_binary() -> None:
    with pytest.raises(ProtocolViolation, match="streamSid"):
        TwilioReturnReceiver(STREAM).receive_text(TwilioResponder("MZother").media(b"\x00"))
    with pytest.raises(ProtocolViolation, match="streamSid"):
        TwilioReturnReceiver(STREAM).receive_text('{"event":"clear"}')
    with pytest.raises(ProtocolViolation, match="mark.name"):
        TwilioReturnReceiver(STREAM).receive_text(
            json.dumps({"event": "mark", "streamSid": STREAM, "mark": {}})
        )
    with pytest.raises(ProtocolViolation) as info:
        TwilioReturnReceiver(STREAM).receive_binary(b"\x00")
    assert info.value.close_code == CLOSE_UNSUPPORTED


@given(st.lists(st.binary(max_size=400), max_size=20))
def test_sender_counters(payloads: list[bytes]) -> None:
    tx = sender()
    tx.connected()
    assert json.loads(tx.start())["sequenceNumber"] == "1"
    sent = 0
    rx = TwilioReturnReceiver(STREAM)
    for i, payload in enumerate(payloads, start=1):
        event = json.loads(tx.media(payload))
        assert event["sequenceNumber"] == str(i + 1)
        assert event["media"]["chunk"] == str(i)
        assert event["media"]["timestamp"] == str(sent * 1000 // 8000)
        assert base64.b64decode(event["media"]["payload"]) == payload
        sent += len(payload)
        # The same media shape is accepted on the other side too.
        assert rx.receive_text(json.dumps(event)) == ([Audio(payload)] if payload else [])
    assert json.loads(tx.stop())["sequenceNumber"] == str(len(payloads) + 2)


@given(st.text() | st.binary())
def test_arbitrary_input_only_raises_protocol_error(data: str | bytes) -> None:
    for rx in (TwilioReceiver(), TwilioReturnReceiver(STREAM)):
        with contextlib.suppress(ProtocolError):
            rx.receive_text(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=12,
)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "event": st.sampled_from(["start", "media", "mark", "stop", "clear"]) | json_values,
            "streamSid": st.just(STREAM) | json_values,
            "start": json_values,
            "media": st.fixed_dictionaries(
                {}, optional={"payload": st.just("AA==") | json_values, "track": json_values}
            )
            | json_values,
            "mark": json_values,
        },
    ),
    st.booleans(),
)
def test_arbitrary_events_only_raise_protocol_error(obj: dict[str, Any], started: bool) -> None:
    rx = TwilioReceiver()
    if started:
        rx.receive_text(json.dumps(_real_start(session="s", traceparent=TP)))
    for r in (rx, TwilioReturnReceiver(STREAM)):
        try:
            r.receive_text(json.dumps(obj))
        except ProtocolError as exc:
            assert isinstance(exc, ProtocolViolation)
