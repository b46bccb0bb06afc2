"""TLS: a wss:// target checked against --ca, and a wss:// sink (--sink-tls-cert/--sink-tls-key)."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import BackgroundPipeline, free_port
from websockets.asyncio.server import ServerConnection, serve

from probe.aio.runner import RunConfig, run_probe
from probe.aio.source import SourceConfig
from probe.tls import server_context

if shutil.which("openssl") is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("openssl is needed for the TLS tests (apt-get install openssl)")
    pytest.skip("openssl is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (and localhost) and its key."""
    d = tmp_path_factory.mktemp("tls")
    crt, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True,
    )
    return str(crt), str(key)


class EchoServer:
    """A wss:// system under test that sends every binary frame straight back."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.port = free_port()

    async def _echo(self, ws: ServerConnection) -> None:
        async for msg in ws:
            if isinstance(msg, bytes):
                await ws.send(msg)
            elif '"stop"' in msg:
                break

    async def serve_for(self, coro: Any) -> Any:
        async with serve(self._echo, "127.0.0.1", self.port, ssl=self.ctx):
            return await coro


def _run_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "probe.cli", *argv], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_a_wss_target_is_checked_against_the_ca_given(cert: tuple[str, str],
                                                        tmp_path: Path) -> None:
    crt, key = cert
    echo = EchoServer(server_context(crt, key))
    url = f"wss://127.0.0.1:{echo.port}/"

    async def go(ca: str | None) -> dict[str, Any]:
        src = SourceConfig(target=url, duration_s=2.0, drain_s=0.5, ca_file=ca)
        cfg = RunConfig(source=src, use_sink=False, marker_timeout_s=2.0)
        return await echo.serve_for(run_probe(cfg))

    trusted = asyncio.run(go(crt))
    ret = next(h for h in trusted["hops"] if h["name"] == "return")
    assert ret["markers"]["detected"] == ret["markers"]["sent"] > 0
    # Without the CA the self-signed target is refused: a failed session that says why.
    untrusted = asyncio.run(go(None))
    assert untrusted["sessions"]["failed"] == 1
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted["sessions"]["errors"][0]["error"]


@pytest.mark.parametrize("sink_process", [True, False])
def test_a_wss_sink_takes_the_hops_forks(cert: tuple[str, str], sink_process: bool,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    crt, key = cert
    # The reference pipeline (in this process) trusts the sink's certificate the way any
    # Python client does: SSL_CERT_FILE for the default context.
    monkeypatch.setenv("SSL_CERT_FILE", crt)
    pipe = BackgroundPipeline("a:20ms")
    try:
        src = SourceConfig(target=pipe.url, duration_s=2.0, drain_s=0.5)
        cfg = RunConfig(source=src, marker_timeout_s=2.0, hop_order=["a", "return"],
                        sink_process=sink_process, sink_tls=(crt, key))
        report = asyncio.run(run_probe(cfg))
    finally:
        pipe.close()
    a = next(h for h in report["hops"] if h["name"] == "a")
    assert a["markers"]["detected"] == a["markers"]["sent"] > 0, report["hops"]
    assert not a["errors"]


def test_tls_files_that_cannot_be_used_are_one_sentence_before_the_run(
    cert: tuple[str, str], tmp_path: Path
) -> None:
    crt, key = cert
    target = ["--target", "ws://127.0.0.1:9/"]
    res = _run_cli("run", *target, "--sink-tls-cert", crt)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--sink-tls-cert and --sink-tls-key go together" in res.stderr
    res = _run_cli("run", *target, "--sink-tls-cert", crt, "--sink-tls-key", crt)
    assert res.returncode == 2 and "cannot load the certificate and key" in res.stderr
    res = _run_cli("run", *target, "--ca", str(tmp_path / "nope.pem"))
    assert res.returncode == 2 and "--ca" in res.stderr and "Traceback" not in res.stderr
