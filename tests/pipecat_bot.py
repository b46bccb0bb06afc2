"""A real Pipecat voice bot for the tests: Twilio Media Streams over FastAPI, taps from
probe.integrations.pipecat. It runs in Pipecat's own environment (PROBE_PIPECAT_PYTHON), with
the repository on PYTHONPATH, and prints ``PORT <n>`` when it listens.

    python tests/pipecat_bot.py [--port 0]     # then ws://127.0.0.1:PORT/echo/8000, /reply/16000,
                                               # /barge/8000

The URL's path picks the stage and the pipeline's sample rate. Each connection is one pipeline,
as Pipecat's Twilio examples build it:
``parse_telephony_websocket`` reads ``connected`` and ``start``, a ``TwilioFrameSerializer``
(8 kHz mu-law <-> pcm16 at the path's rate) and ``FastAPIWebsocketTransport`` carry the media, and

    transport.input() -> tap bot.in (input frames) -> stage -> tap bot.out -> transport.output()

``echo`` turns each input audio frame into an output audio frame (the same samples); ``reply``
hears an utterance end (HANGOVER silent 20 ms frames after sound) and REPLY_DELAY later answers
with a 0.6 s tone as TTS audio frames, pushed at once as a TTS service does (the output transport
paces them). ``barge`` is a bot with Pipecat's own interruptions, as its examples build one:

    ... tap bot.in -> VADProcessor(Silero) -> UserTurnProcessor -> Talker -> tap bot.out ...

Silero VAD (the model ships in the wheel; defaults: confidence 0.7, start 0.2 s, stop 0.2 s,
min volume 0.6) tells the ``UserTurnProcessor`` the user started or stopped speaking; its
strategies start a turn on VAD (``enable_interruptions=True``, Pipecat's default) and end it
STOP_TIMEOUT after VAD heard the speech stop (no speech-to-text here). A turn's start broadcasts
``UserStartedSpeakingFrame`` and an ``InterruptionFrame``: the output transport drops the audio it
has queued and the ``TwilioFrameSerializer`` sends a Twilio ``clear``. ``Talker`` answers each
turn's end (``UserStoppedSpeakingFrame``) with TALK_S of tone pushed at once, as a TTS service
does, and drops a reply not yet pushed when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import socket
import struct
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import uvicorn  # noqa: E402
from fastapi import FastAPI, WebSocket  # noqa: E402
from loguru import logger  # noqa: E402
from pipecat.audio.vad.silero import SileroVADAnalyzer  # noqa: E402
from pipecat.frames.frames import (  # noqa: E402
    InputAudioRawFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    TTSAudioRawFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker  # noqa: E402
from pipecat.processors.audio.vad_processor import VADProcessor  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.runner.utils import parse_telephony_websocket  # noqa: E402
from pipecat.serializers.twilio import TwilioFrameSerializer  # noqa: E402
from pipecat.transports.websocket.fastapi import (  # noqa: E402
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)
from pipecat.turns.user_start import VADUserTurnStartStrategy  # noqa: E402
from pipecat.turns.user_stop import SpeechTimeoutUserTurnStopStrategy  # noqa: E402
from pipecat.turns.user_turn_processor import UserTurnProcessor  # noqa: E402
from pipecat.turns.user_turn_strategies import UserTurnStrategies  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

from probe.integrations.pipecat import ProbeTapProcessor  # noqa: E402

REPLY_DELAY = 0.3
HANGOVER = 25
LOUD = 64  # int16: above the resampler's tail after speech, far below speech
TALK_S = 2.0  # the barge stage's reply
STOP_TIMEOUT = 0.6  # Pipecat's default user_speech_timeout


class Echo(FrameProcessor):
    """Input audio out again, sample for sample."""

    async def process_frame(self, frame: Any, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            await self.push_frame(
                OutputAudioRawFrame(
                    audio=frame.audio,
                    sample_rate=frame.sample_rate,
                    num_channels=frame.num_channels,
                )
            )
            return
        await self.push_frame(frame, direction)


def _tone(rate: int, seconds: float = 0.6) -> list[bytes]:
    n = int(seconds * rate)
    samples = [int(8000 * math.sin(2 * math.pi * 440 * i / rate)) for i in range(n)]
    step = rate // 50
    chunks = (samples[i : i + step] for i in range(0, n, step))
    return [struct.pack(f"<{len(c)}h", *c) for c in chunks]


class Replier(FrameProcessor):
    """Answers each utterance with a tone, in its own voice."""

    def __init__(self, rate: int) -> None:
        super().__init__()
        self._rate = rate
        self._tone = _tone(rate)
        self._speaking = False
        self._silent = 0

    async def process_frame(self, frame: Any, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            pcm = frame.audio
            n = len(pcm) // 2
            loud = n > 0 and max(abs(v) for v in struct.unpack(f"<{n}h", pcm[: 2 * n])) > LOUD
            self._silent = 0 if loud else self._silent + 1
            self._speaking = self._speaking or loud
            if self._speaking and self._silent >= HANGOVER:
                self._speaking = False
                self.create_task(self._reply())
            return
        await self.push_frame(frame, direction)

    async def _reply(self) -> None:
        await asyncio.sleep(REPLY_DELAY)
        for chunk in self._tone:
            await self.push_frame(
                TTSAudioRawFrame(audio=chunk, sample_rate=self._rate, num_channels=1)
            )


class Talker(FrameProcessor):
    """Answers each user turn with TALK_S of tone, all pushed at once; an interruption drops a
    reply not yet pushed (what was pushed is the output transport's to drop)."""

    def __init__(self, rate: int) -> None:
        super().__init__()
        self._rate = rate
        self._tone = _tone(rate, TALK_S)
        self._task: asyncio.Task[None] | None = None

    async def process_frame(self, frame: Any, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            return
        if isinstance(frame, InterruptionFrame) and self._task is not None:
            await self.cancel_task(self._task)
            self._task = None
        elif isinstance(frame, UserStoppedSpeakingFrame) and direction == FrameDirection.DOWNSTREAM:
            self._task = self.create_task(self._reply())
        await self.push_frame(frame, direction)

    async def _reply(self) -> None:
        for chunk in self._tone:
            await self.push_frame(
                TTSAudioRawFrame(audio=chunk, sample_rate=self._rate, num_channels=1)
            )
        self._task = None


def _stage(mode: str, rate: int) -> list[FrameProcessor]:
    if mode == "echo":
        return [Echo()]
    if mode == "reply":
        return [Replier(rate)]
    turns = UserTurnStrategies(
        start=[VADUserTurnStartStrategy()],
        stop=[
            SpeechTimeoutUserTurnStopStrategy(
                user_speech_timeout=STOP_TIMEOUT, wait_for_transcript=False
            )
        ],
    )
    return [
        VADProcessor(vad_analyzer=SileroVADAnalyzer()),
        UserTurnProcessor(user_turn_strategies=turns),
        Talker(rate),
    ]


def make_app() -> FastAPI:
    app = FastAPI()

    @app.websocket("/{mode}/{rate}")
    async def twilio(websocket: WebSocket, mode: str, rate: int) -> None:
        if mode not in ("echo", "reply", "barge"):
            await websocket.close(1008, "the path is /echo/RATE, /reply/RATE or /barge/RATE")
            return
        await websocket.accept()
        _, call_data = await parse_telephony_websocket(websocket)
        serializer = TwilioFrameSerializer(
            stream_sid=call_data.stream_id,
            call_sid=call_data.call_id,
            params=TwilioFrameSerializer.InputParams(auto_hang_up=False),
        )
        transport = FastAPIWebsocketTransport(
            websocket=websocket,
            params=FastAPIWebsocketParams(
                audio_in_enabled=True,
                audio_out_enabled=True,
                add_wav_header=False,
                serializer=serializer,
            ),
        )
        pipeline = Pipeline(
            [
                transport.input(),
                ProbeTapProcessor(hop="bot.in", frames="input", context=call_data),
                *_stage(mode, rate),
                ProbeTapProcessor(hop="bot.out", context=call_data),
                transport.output(),
            ]
        )
        worker = PipelineWorker(
            pipeline,
            params=PipelineParams(audio_in_sample_rate=rate, audio_out_sample_rate=rate),
            idle_timeout_secs=None,
        )

        @transport.event_handler("on_client_disconnected")
        async def _gone(transport: Any, client: Any) -> None:
            await worker.cancel()

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        await runner.run()

    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts: no race on PORT
    config = uvicorn.Config(make_app(), log_level="warning")
    server = uvicorn.Server(config)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
