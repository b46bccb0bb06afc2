"""The sink child process driven from a gevent hub (as in a Locust worker), in a real
monkey-patched interpreter: forks and return audio are detected in the child and land in the
parent's registry; drain, stop and start errors behave."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import SLOW

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
from gevent import monkey
monkey.patch_all()
import json, os, socket, time
from websockets.sync.client import connect
from probe.errors import ConfigError
from probe.session.frames import SessionFrames, shared_carrier
from probe.locust.sinkproc import GeventSinkProcess
from probe.measure.registry import SessionRegistry
from probe.protocol import AudioFormat
from probe.watermark.embed import marker_positions

out = {}
reg = SessionRegistry(clock=time.time, marker_timeout=60.0)
sink = GeventSinkProcess(reg, detect_nice=7)
url = sink.start("127.0.0.1", 0)
out["url"] = url
reg.open_session("s1")
shared = shared_carrier("speech_en_scotland", 16000, 4.0, "pcm_s16le", -20.0)
pos = marker_positions(len(shared.samples), 16000, every_s=0.5)
frames = SessionFrames(shared, 320, pos, [reg.payload_for("s1", i) for i in range(len(pos))])
out["markers"] = len(frames.placements)
reg.hop_connected("return", "s1")
t0 = time.time() - 5.0
for p in frames.placements:
    reg.record_send("s1", p.index, t0 + p.sample / 16000)
pcm = [frames.frame(n) for n in range(frames.n_frames)]

# The return direction: frames stamped 50 ms after they were sent.
stream = sink.open_stream("return", AudioFormat("pcm_s16le", 16000, 1), "s1")
for n, data in enumerate(pcm):
    stream.feed(data, t0 + 0.050 + n * 320 / 16000)
stream.close()

# A hop's fork, received by the child's own sink.
with connect(url) as ws:
    ws.send(json.dumps({"type": "start", "hop": "asr", "session": "s1",
                        "audio": {"encoding": "pcm_s16le", "sample_rate": 16000,
                                  "channels": 1}}))
    for data in pcm:
        ws.send(data)
    ws.send(json.dumps({"type": "stop"}))
deadline = time.monotonic() + 30
while reg.hop_counts().get("asr") is None or reg.hop_counts()["asr"].pending:
    out["drained"] = sink.drain(10.0)
    if time.monotonic() > deadline:
        break
    time.sleep(0.05)
counts = reg.hop_counts()
tasks = f"/proc/{sink.proc.pid}/task"
out["nice"] = sorted(
    int(open(f"{tasks}/{t}/stat").read().rsplit(")", 1)[1].split()[16]) for t in os.listdir(tasks)
)
out["detected"] = {h: c.detected for h, c in counts.items()}
out["return_latency"] = sorted(m.latency_s for m in reg.measurements() if m.hop == "return")
sink.stop()
out["returncode"] = sink.proc.returncode

# Detection only: no sink listening.
bare = GeventSinkProcess(SessionRegistry(clock=time.time))
out["bare_url"] = bare.start("127.0.0.1", -1)
bare.stop()

# A port that is taken: one sentence.
with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        GeventSinkProcess(SessionRegistry(clock=time.time)).start("127.0.0.1", port)
        out["taken"] = None
    except ConfigError as exc:
        out["taken"] = [port, str(exc)]
print(json.dumps(out))
'''


def test_gevent_parent_gets_fork_and_return_detections_from_the_child() -> None:
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
        timeout=90 * SLOW,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["url"].startswith("ws://127.0.0.1:") and out["url"].endswith("/sink")
    n = out["markers"]
    assert n >= 6
    assert out["drained"] is True
    assert out["detected"]["asr"] == n
    assert out["detected"]["return"] == n
    # Return arrivals were stamped 50 ms after the send: sample-exact detection.
    assert all(abs(x - 0.050) < 0.001 for x in out["return_latency"]), out["return_latency"]
    assert out["returncode"] == 0
    # Only the child's detection thread runs below normal priority.
    assert out["nice"].count(7) == 1 and out["nice"].count(0) >= 2, out["nice"]
    assert out["bare_url"] == ""
    port, message = out["taken"]
    want = f"The probe sink cannot listen on 127.0.0.1:{port}: the port is already in use."
    assert message == want
    assert "Traceback" not in res.stderr
