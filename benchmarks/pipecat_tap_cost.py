"""What a ProbeTapProcessor costs a Pipecat bot: CPU and latency added per audio frame.

Run in Pipecat's environment (its pins clash with the probe's; README "Instrument your own
system"), with the repository on PYTHONPATH:

    PYTHONPATH=. /opt/probe-pipecat/bin/python benchmarks/pipecat_tap_cost.py [--streams 20]
        [--seconds 5] [--rounds 3] [--rate 16000]

``--streams`` Pipecat pipelines (PipelineWorker, one WorkerRunner) each get a 20 ms
``InputAudioRawFrame`` every 20 ms, paced in real time, and pass it through one of three middles:

- ``none``: nothing between a stamping processor and a recording one;
- ``pass``: a plain FrameProcessor that pushes every frame on (what any processor costs);
- ``tap``: ``ProbeTapProcessor(frames="input")`` forking every frame over a real WebSocket to a
  sink on loopback (a child process that reads and drops, so its CPU is not counted here).

CPU is this process's (``time.process_time``: Pipecat, the middle and the tap's writer task that
sends the fork) per frame; latency is from the stamping processor's push to the recording one's
receipt (both in Pipecat's direct mode, so only the middle is between them). The three run in
turn, ``--rounds`` times, side by side in one process; the table gives medians over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loguru import logger  # noqa: E402
from pipecat.frames.frames import InputAudioRawFrame  # noqa: E402
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

from probe.integrations.pipecat import ProbeTapProcessor  # noqa: E402

_DRAIN = """
import asyncio
from websockets.asyncio.server import serve
async def drain(ws):
    async for _ in ws:
        pass
async def main():
    async with serve(drain, "127.0.0.1", 0) as server:
        print(next(iter(server.sockets)).getsockname()[1], flush=True)
        await asyncio.Future()
asyncio.run(main())
"""


class Stamp(FrameProcessor):
    """Notes when it pushes each audio frame on."""

    def __init__(self, pushed: dict[int, int]) -> None:
        super().__init__(enable_direct_mode=True)
        self.pushed = pushed

    async def process_frame(self, frame: Any, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            self.pushed[id(frame)] = time.perf_counter_ns()
        await self.push_frame(frame, direction)


class Record(FrameProcessor):
    """Notes when each audio frame reaches it: the latency of what is between."""

    def __init__(self, pushed: dict[int, int], delays: list[int]) -> None:
        super().__init__(enable_direct_mode=True)
        self.pushed = pushed
        self.delays = delays

    async def process_frame(self, frame: Any, direction: FrameDirection) -> None:
        now = time.perf_counter_ns()
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            at = self.pushed.pop(id(frame), None)
            if at is not None:
                self.delays.append(now - at)
        await self.push_frame(frame, direction)


class Pass(FrameProcessor):
    """A processor that does nothing: the baseline cost of one more stage."""

    def __init__(self) -> None:
        super().__init__(enable_direct_mode=True)

    async def process_frame(self, frame: Any, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)


async def one_round(kind: str, args: argparse.Namespace, sink: str) -> dict[str, float]:
    rate = args.rate
    pcm = bytes(2 * rate // 50)
    delays: list[int] = []
    workers = []
    taps: list[ProbeTapProcessor] = []
    for i in range(args.streams):
        pushed: dict[int, int] = {}
        middle: list[Any] = []
        if kind == "pass":
            middle = [Pass()]
        elif kind == "tap":
            tap = ProbeTapProcessor(
                hop="bench", frames="input", context={"session": f"bench{i}", "sink": sink}
            )
            taps.append(tap)
            middle = [tap]
        pipeline = Pipeline([Stamp(pushed), *middle, Record(pushed, delays)])
        workers.append(
            PipelineWorker(
                pipeline,
                params=PipelineParams(audio_in_sample_rate=rate),
                idle_timeout_secs=None,
                enable_rtvi=False,
            )
        )
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(*workers)
    run = asyncio.create_task(runner.run())
    await asyncio.sleep(0.5)  # the pipelines start
    frames = int(args.seconds * 50)
    loop = asyncio.get_running_loop()

    async def feed(worker: PipelineWorker, offset: float, t0: float) -> None:
        for n in range(frames):
            await asyncio.sleep(max(0.0, t0 + offset + n * 0.02 - loop.time()))
            await worker.queue_frame(
                InputAudioRawFrame(audio=pcm, sample_rate=rate, num_channels=1)
            )

    t0 = loop.time() + 0.05
    cpu0 = time.process_time()
    await asyncio.gather(
        *(feed(w, 0.02 * i / len(workers), t0) for i, w in enumerate(workers))
    )
    await asyncio.sleep(0.1)  # the last frames and forks go out
    cpu = time.process_time() - cpu0
    for w in workers:
        await w.cancel()
    await run
    n = len(workers) * frames
    delays.sort()
    sent = sum(t.stats.frames_sent for t in taps)
    dropped = sum(t.stats.dropped for t in taps)
    return {
        "cpu_us": cpu / n * 1e6,
        "p50_us": delays[len(delays) // 2] / 1000.0,
        "p99_us": delays[int(len(delays) * 0.99)] / 1000.0,
        "frames": n,
        "measured": len(delays),
        "forked": sent,
        "dropped": dropped,
    }


async def main(args: argparse.Namespace) -> None:
    drain = subprocess.Popen(
        [sys.executable, "-c", _DRAIN], stdout=subprocess.PIPE, text=True
    )
    try:
        assert drain.stdout is not None
        sink = f"ws://127.0.0.1:{int(drain.stdout.readline())}/sink"
        results: dict[str, list[dict[str, float]]] = {"none": [], "pass": [], "tap": []}
        for r in range(args.rounds):
            for kind in results:
                res = await one_round(kind, args, sink)
                results[kind].append(res)
                print(
                    f"round {r + 1} {kind:4}: {res['cpu_us']:6.1f} us CPU/frame, "
                    f"latency p50 {res['p50_us']:5.1f} us p99 {res['p99_us']:6.1f} us "
                    f"({res['measured']:.0f} of {res['frames']:.0f} frames; forked "
                    f"{res['forked']:.0f}, dropped {res['dropped']:.0f})",
                    flush=True,
                )
    finally:
        drain.terminate()
        drain.wait()

    def med(kind: str, key: str) -> float:
        return statistics.median(x[key] for x in results[kind])

    print()
    print(
        f"{args.streams} streams x {args.seconds:g} s of 20 ms frames at {args.rate} Hz, "
        f"{args.rounds} rounds, medians (Pipecat {pipecat_version()}, {os.cpu_count()} cores)"
    )
    print(f"{'middle':<6} {'CPU us/frame':>12} {'latency p50 us':>15} {'p99 us':>8}")
    for kind in results:
        print(
            f"{kind:<6} {med(kind, 'cpu_us'):>12.1f} {med(kind, 'p50_us'):>15.1f} "
            f"{med(kind, 'p99_us'):>8.1f}"
        )
    print(
        f"tap over pass: +{med('tap', 'cpu_us') - med('pass', 'cpu_us'):.1f} us CPU and "
        f"+{med('tap', 'p50_us') - med('pass', 'p50_us'):.1f} us latency (p50) per frame; "
        f"over none: +{med('tap', 'cpu_us') - med('none', 'cpu_us'):.1f} us CPU, "
        f"+{med('tap', 'p50_us') - med('none', 'p50_us'):.1f} us latency"
    )


def pipecat_version() -> str:
    from importlib.metadata import version

    return version("pipecat-ai")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=int, default=16000)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    # A fork's first frame can go stale while 20 forks connect at once; the table counts drops.
    logging.getLogger("probe.tap").setLevel(logging.ERROR)
    asyncio.run(main(ap.parse_args()))
