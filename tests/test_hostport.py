"""The one HOST:PORT rule of every listen option."""

from __future__ import annotations

import pytest

from probe.errors import ConfigError
from probe.hostport import parse_host_port


@pytest.mark.parametrize("text, want", [
    ("0.0.0.0:8766", ("0.0.0.0", 8766)),
    ("[::1]:0", ("::1", 0)),
    ("localhost:65535", ("localhost", 65535)),
    ("ws://127.0.0.1:9000/", ("127.0.0.1", 9000)),
    (":8766", ("127.0.0.1", 8766)),
    ("8766", ("127.0.0.1", 8766)),
    (" 10.0.0.2:80 ", ("10.0.0.2", 80)),
])
def test_accepted(text: str, want: tuple[str, int]) -> None:
    assert parse_host_port(text, "--listen") == want


@pytest.mark.parametrize("text", [
    "localhost", "host:port", "host:70000", "host:-1", "[::1:80", "", "a b:80", "http://x/y:80",
])
def test_refused_with_one_sentence_naming_the_option(text: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_host_port(text, "--sink-listen")
    msg = str(e.value)
    assert msg.startswith("--sink-listen must be HOST:PORT") and msg.count(".") >= 1
    assert "\n" not in msg
