"""probe.locust.wsconn, the gevent WebSocket client of the Locust sessions, against a peer that
misbehaves on purpose (tests/wsconn_peer.py) and against a websockets server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from probe.locust.wsconn import GeventClient, open_client
from probe.tls import connect_ssl

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    if shutil.which("openssl") is None:
        if os.environ.get("CI") == "true":
            raise RuntimeError("openssl is needed for the TLS test (apt-get install openssl)")
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    crt, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True,
    )
    return str(crt), str(key)


@pytest.fixture(scope="module")
def peer(cert: tuple[str, str]) -> Iterator[tuple[str, str]]:
    """The misbehaving peer's ws:// and wss:// base URLs."""
    proc = subprocess.Popen([sys.executable, str(HERE / "wsconn_peer.py"), *cert],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        plain, secure = int(proc.stdout.readline()), int(proc.stdout.readline())
        yield f"ws://127.0.0.1:{plain}", f"wss://127.0.0.1:{secure}"
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def url(peer: tuple[str, str]) -> str:
    return peer[0]


def _open(url: str, path: str, **kw: float) -> GeventClient:
    return open_client(url + path, clock=time.time, open_timeout=kw.get("open_timeout", 5.0),
                       close_timeout=kw.get("close_timeout", 2.0))


def _collect(ws: GeventClient) -> tuple[list[bytes | str], list[float], ConnectionClosed]:
    got: list[bytes | str] = []
    stamps: list[float] = []

    def on(message: bytes | str, at: float) -> None:
        got.append(message)
        stamps.append(at)

    with gevent.Timeout(10):
        closed = ws.receive(on)
    return got, stamps, closed


def test_a_message_sent_with_the_handshake_response_is_delivered_then_echoes(url: str) -> None:
    ws = _open(url, "/early")
    got: list[bytes | str] = []
    reader = gevent.spawn(ws.receive, lambda m, at: got.append(m))
    ws.send(b"\x00\x01")
    ws.send("text")
    with gevent.Timeout(5):
        while len(got) < 3:
            gevent.sleep(0.01)
    assert got == [b"early", b"\x00\x01", "text"]
    ws.close(1000)
    closed = reader.get(timeout=5)
    assert closed.rcvd is not None and closed.rcvd.code == 1000


def test_fragments_are_joined_and_the_close_code_and_reason_reported(url: str) -> None:
    ws = _open(url, "/frag")
    got, stamps, closed = _collect(ws)
    assert got == ["hello w\u00f6rld", b"\x01\x02\x03"]
    assert all(abs(t - time.time()) < 10 for t in stamps)
    assert closed.rcvd is not None
    assert (closed.rcvd.code, closed.rcvd.reason) == (4001, "bye")
    with pytest.raises(ConnectionClosed):
        ws.send(b"late")
    ws.close()


def test_a_text_message_that_is_not_utf8_fails_the_connection_with_1007(url: str) -> None:
    ws = _open(url, "/badutf8")
    got, _, closed = _collect(ws)
    assert got == []
    assert closed.sent is not None and closed.sent.code == 1007
    ws.close()


def test_a_rejected_handshake_raises_invalid_status(url: str) -> None:
    with pytest.raises(InvalidStatus) as info:
        _open(url, "/reject")
    assert info.value.response.status_code == 403


def test_a_handshake_never_answered_times_out(url: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        _open(url, "/silent", open_timeout=0.5)
    assert time.monotonic() - t0 < 3


def test_nothing_listening_is_an_oserror() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(OSError):
        open_client(f"ws://127.0.0.1:{port}/", clock=time.time, open_timeout=2.0)


def test_close_is_bounded_when_the_peer_never_ends_the_connection(url: str) -> None:
    for reading in (False, True):
        ws = _open(url, "/linger", close_timeout=0.5)
        reader = gevent.spawn(ws.receive, lambda m, at: None) if reading else None
        gevent.sleep(0.05)
        t0 = time.monotonic()
        ws.close(1000)
        assert time.monotonic() - t0 < 2.0
        if reader is not None:
            closed = reader.get(timeout=3)
            assert closed.rcvd is not None and closed.rcvd.code == 1000


def test_messages_arrive_in_order_and_stamped_at_read(url: str) -> None:
    ws = _open(url, "/echo")
    got: list[tuple[bytes | str, float]] = []
    reader = gevent.spawn(ws.receive, lambda m, at: got.append((m, at)))
    sent = [bytes([i]) * 640 for i in range(50)]
    for m in sent:
        ws.send(m)
    with gevent.Timeout(5):
        while len(got) < len(sent):
            gevent.sleep(0.01)
    assert [m for m, _ in got] == sent
    stamps = [at for _, at in got]
    assert stamps == sorted(stamps)
    ws.close(1000)
    reader.get(timeout=5)


def test_wss_is_checked_against_the_ca_given(peer: tuple[str, str], cert: tuple[str, str]) -> None:
    secure = peer[1] + "/echo"
    ws = open_client(secure, clock=time.time, open_timeout=5.0,
                     ssl_context=connect_ssl(secure, cert[0]))
    got: list[bytes | str] = []
    reader = gevent.spawn(ws.receive, lambda m, at: got.append(m))
    ws.send(b"over tls")
    with gevent.Timeout(5):
        while not got:
            gevent.sleep(0.01)
    assert got == [b"over tls"]
    ws.close(1000)
    reader.get(timeout=5)
    # Without the CA the self-signed certificate is refused.
    import ssl

    with pytest.raises(ssl.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        open_client(secure, clock=time.time, open_timeout=5.0,
                    ssl_context=connect_ssl(secure, None))


def test_close_after_the_reader_was_killed_reads_the_reply_itself(url: str) -> None:
    # What a Locust user stopped mid-session does: its receiving greenlet is killed, then the
    # connection closed; the closing handshake completes at once, not after close_timeout.
    ws = _open(url, "/echo", close_timeout=3.0)
    reader = gevent.spawn(ws.receive, lambda m, at: None)
    ws.send(b"x" * 640)
    gevent.sleep(0.1)
    reader.kill(block=True, timeout=1.0)
    t0 = time.monotonic()
    ws.close(1000)
    assert time.monotonic() - t0 < 1.0
    assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1000
