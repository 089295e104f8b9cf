"""Turn latency of the whole product: how long after a caller stops speaking the agent's voice starts.

    python load_tests/bench_turns.py [--calls 3] [--concurrency 1] [--turns 5]
        [--stt-final-ms 150] [--llm-first-token-ms 250] [--tts-first-byte-ms 100] [--endpointing-ms 300]

Everything runs in this process on loopback: the real app (``create_app``, embedded redis-server, a SQLite
ledger in a temporary folder) on the production providers, that is the real Deepgram and OpenAI SDKs,
against the providers' simulators set to the latencies above; callers are softphones (signed webhook,
signed Media Streams upgrade, 20 ms frames in real time, marks echoed as the agent's audio plays) saying
espeak-ng speech through a booking conversation that runs tools (availability, booking).

The simulators' engines are stand-ins by default, so each provider costs what it is told to and nothing
more: the Deepgram simulator "recognises" an utterance by its audio (the bench knows what each caller
says), and speaks a tone as long as the text would take. ``--engines offline`` uses pocketsphinx and
espeak-ng inside the simulator instead (their decode and synthesis then add to the STT and TTS times).

Measured per turn: the caller's voice-to-voice latency (softphone: the last frame of speech to the first
frame of the answer), the floor (endpointing + STT final + LLM first token + TTS first byte; a turn whose
answer needs a tool also waits for a second LLM first token and the tool), and the server's breakdown
from ``voice_server.turn_timing`` (read in-process: ``CallSession.turn_timings`` and ``TURN_HISTOGRAMS``).
Because caller and server share the process and its monotonic clock, the STT part (speech end to the
end-of-turn transcript at the session) is measured too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import math
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from integrations.simulators.loopback import loopback_socket
from integrations.simulators.scripted_speech import VAD_THRESHOLD_DBFS, ScriptRecogniser, trim_to_voice

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
DEEPGRAM_KEY = "bench-deepgram-key"
OPENAI_KEY = "sk-bench-0123456789"
BUSINESS_NUMBER = "+12125550100"
# Monday 30 November 2026, 07:00 in New York (the example clinic opens at 08:30): "tomorrow" is a Tuesday.
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
DAYS = ("tomorrow", "wednesday", "thursday", "friday")
HOURS = ("nine", "ten", "eleven", "two p m", "three p m")
NAMES = ("alice", "bob", "carol", "dave", "erin")


def conversation(number: int) -> list[str]:
    """What caller ``number`` says: intent, a time (availability tool), a name, yes (booking tool), bye.
    Each call asks for its own slot, so no call finds its time taken."""
    slot = number % (len(DAYS) * len(HOURS))
    when = f"{DAYS[slot // len(HOURS)]} at {HOURS[slot % len(HOURS)]}"
    return [
        "I would like to book a checkup",
        when,
        f"my name is {NAMES[number % len(NAMES)]}",
        "yes",
        "no thank you goodbye",
    ]


# -- the simulators' stand-in engines ----------------------------------------------------------------


def tone_voice(text: str) -> bytes:
    """``synthesize(text) -> mulaw``: a mid-level tone, 25 ms per character (a quick talker: the replies'
    length changes no latency, only how long the bench takes)."""
    return bytes([0x30]) * (len(text) * 200)


# -- serving ------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(app: Any, sock: socket.socket | None = None, **config: Any) -> AsyncIterator[str]:
    """``app`` on a real uvicorn on loopback (``sock``, or a free port); yields its base URL."""
    import uvicorn

    if sock is None:
        sock = loopback_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, ws="websockets-sansio", **config))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # uvicorn exposes a flag, not an event
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


# -- the run --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    calls: int
    concurrency: int
    turns: int
    stt_final_ms: int
    llm_first_token_ms: int
    tts_first_byte_ms: int
    endpointing_ms: int
    llm_tokens_per_second: float | None
    engines: str
    time_limit: float
    verbose: bool

    @property
    def floor(self) -> float:
        return (self.endpointing_ms + self.stt_final_ms + self.llm_first_token_ms + self.tts_first_byte_ms) / 1000


@dataclass
class TurnResult:
    said: str
    latency: float  # client voice-to-voice
    speech_ended: float
    heard_at: float  # the first frame at the softphone
    timing: Any  # voice_server.turn_timing.TurnTiming with speech_ended_at


@dataclass
class Run:
    turns: list[TurnResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    calls_done: int = 0
    model_seconds: list[float] = field(default_factory=list)  # the simulator's "model" deciding, per request
    loop_lags: list[float] = field(default_factory=list)  # lateness of a 5 ms timer on the shared event loop


async def one_call(number: int, base: str, app: Any, utterances: dict[str, bytes], options: Options, run: Run) -> None:
    from voice_server.softphone import Softphone
    from voice_server.turn_timing import observe_speech_end

    caller = f"+1646555{number:04d}"
    lines = conversation(number)[: options.turns]
    async with Softphone.dial(base, auth_token=AUTH_TOKEN, caller=caller, called=BUSINESS_NUMBER) as phone:
        await phone.wait_for_reply(within=20, quiet=0.6)  # the greeting
        [session] = [s for s in app.state.components.sessions if s.info.call_sid == phone.call_sid]
        for text in lines:
            await phone.say(utterances[text])
            try:
                reply = await phone.wait_for_reply(within=20, quiet=0.6)
            except TimeoutError:
                run.failures.append(f"call {number}: no answer to {text!r}")
                break
            if reply.latency is None:
                run.failures.append(f"call {number}: the answer to {text!r} began before the caller finished")
                continue
            speech_ended = reply.started - reply.latency
            timing = next((t for t in session.turn_timings if t.end_of_turn_at >= speech_ended), None)
            if timing is None or timing.first_frame_at is None:
                run.failures.append(f"call {number}: no timed turn for {text!r}")
                continue
            timing = observe_speech_end(timing, speech_ended)
            run.turns.append(TurnResult(text, reply.latency, speech_ended, reply.started, timing))
            if phone.closed.is_set():
                break
        if not phone.closed.is_set():
            await phone.hang_up()
    run.calls_done += 1


async def bench(options: Options, run: Run) -> None:
    from booking.business import EXAMPLE_BUSINESS_FILE, load_business
    from integrations.espeak import Espeak
    from integrations.simulators.deepgram import DeepgramSimConfig, create_deepgram_simulator, default_simulator
    from integrations.simulators.dialog_policy import dialog_policy
    from integrations.simulators.openai import OpenAISimConfig, PolicyReply, create_openai_simulator
    from voice_server.app import create_app
    from voice_server.settings import Settings

    business = load_business(EXAMPLE_BUSINESS_FILE)

    def clock() -> datetime:
        return NOW

    voice = Espeak(wpm=190)
    texts = sorted({line for n in range(options.calls) for line in conversation(n)[: options.turns]})
    audio = await asyncio.gather(*(asyncio.to_thread(voice.synthesize_mulaw, text) for text in texts))
    utterances = {text: trim_to_voice(mulaw) for text, mulaw in zip(texts, audio, strict=True)}

    deepgram_config = DeepgramSimConfig(
        api_key=DEEPGRAM_KEY,
        stt_final_delay_ms=options.stt_final_ms,
        tts_first_byte_ms=options.tts_first_byte_ms,
        vad_threshold_dbfs=VAD_THRESHOLD_DBFS,
    )
    if options.engines == "offline":
        deepgram = default_simulator(deepgram_config)
    else:
        deepgram = create_deepgram_simulator(
            deepgram_config, transcribe=ScriptRecogniser(utterances), synthesize=tone_voice
        )
    policy = dialog_policy(business, clock)
    # The dialog's first decision initialises its parsers (over 100 ms): a cost of the simulator's stand-in
    # model, not of any provider, so it is paid before the calls.
    warm = policy([{"role": "user", "content": "I would like to book a checkup tomorrow at ten"}], [])
    if inspect.isawaitable(warm):
        await warm

    async def timed_policy(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> PolicyReply:
        # The dialog answers before the simulator waits its first-token time: its cost adds to that time.
        began = time.perf_counter()
        answer = policy(messages, tools)
        reply = await answer if inspect.isawaitable(answer) else answer
        run.model_seconds.append(time.perf_counter() - began)
        return reply

    openai = create_openai_simulator(
        OpenAISimConfig(
            api_key=OPENAI_KEY,
            first_token_ms=options.llm_first_token_ms,
            tokens_per_second=options.llm_tokens_per_second,
        ),
        timed_policy,
    )
    with tempfile.TemporaryDirectory(prefix="voicebook-bench-turns-") as folder:
        async with serving(deepgram, lifespan="off") as deepgram_url, serving(openai, lifespan="off") as openai_url:
            sock = loopback_socket()
            base = f"http://127.0.0.1:{sock.getsockname()[1]}"
            settings = Settings(
                data_dir=Path(folder),
                public_url=base,
                twilio_auth_token=AUTH_TOKEN,
                log_level="WARNING",
                silence_seconds=30.0,
                stt_provider="deepgram",
                tts_provider="deepgram",
                agent_provider="openai",
                deepgram_api_key=DEEPGRAM_KEY,
                deepgram_base_url=deepgram_url,
                deepgram_endpointing_ms=options.endpointing_ms,
                openai_api_key=OPENAI_KEY,
                openai_base_url=openai_url + "/v1",
            )
            app = create_app(settings, clock=clock)
            async with serving(app, sock, lifespan="on"):
                gate = asyncio.Semaphore(options.concurrency)

                async def call(number: int) -> None:
                    async with gate:
                        try:
                            await one_call(number, base, app, utterances, options, run)
                        except Exception as error:  # one broken call is reported, the others go on
                            run.failures.append(f"call {number}: {type(error).__name__}: {error}")

                async def watch_loop() -> None:
                    # Callers, simulators and server share this loop: its lag bounds how clean a figure is.
                    loop = asyncio.get_running_loop()
                    while True:
                        began = loop.time()
                        await asyncio.sleep(0.005)
                        run.loop_lags.append(loop.time() - began - 0.005)

                watcher = asyncio.create_task(watch_loop())
                try:
                    await asyncio.gather(*(call(n) for n in range(options.calls)))
                finally:
                    watcher.cancel()
                    await asyncio.gather(watcher, return_exceptions=True)


# -- the report ----------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (exact for small samples: p99 of 15 turns is the slowest one)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def ms(value: float | None) -> str:
    return "   n/a" if value is None else f"{value * 1000:6.1f}"


def report(options: Options, run: Run, elapsed: float) -> list[str]:
    from voice_server.turn_timing import TURN_HISTOGRAMS

    lines: list[str] = []
    turns = run.turns
    lines.append(
        f"bench_turns: {run.calls_done}/{options.calls} calls, {len(turns)} turns, concurrency {options.concurrency}, "
        f"{elapsed:.0f} s; simulators: endpointing {options.endpointing_ms} ms, STT final +{options.stt_final_ms} ms, "
        f"LLM first token {options.llm_first_token_ms} ms"
        f"{f' at {options.llm_tokens_per_second:g} tok/s' if options.llm_tokens_per_second else ''}, "
        f"TTS first byte {options.tts_first_byte_ms} ms; engines: {options.engines}"
    )
    if not turns:
        lines.append("no turns measured")
        return lines
    floor = options.floor
    # A tool before the first frame costs a second model round and the tool itself: unavoidable today.
    direct = [t for t in turns if t.timing.tool_wait == 0.0]
    tooled = [t for t in turns if t.timing.tool_wait > 0.0]

    def row(name: str, values: Sequence[float]) -> str:
        if not values:
            return f"  {name:<38} (none)"
        return (
            f"  {name:<38} p50 {ms(percentile(values, 50))}  p95 {ms(percentile(values, 95))}  "
            f"p99 {ms(percentile(values, 99))} ms  (n={len(values)})"
        )

    lines.append(f"floor = endpointing + STT final + LLM first token + TTS first byte = {floor * 1000:.0f} ms")
    lines.append("client voice-to-voice (last frame of speech -> first frame of the answer):")
    lines.append(row("all turns", [t.latency for t in turns]))
    lines.append(row("turns answered without a tool", [t.latency for t in direct]))
    lines.append(row("turns answered after a tool", [t.latency for t in tooled]))
    lines.append("voice-to-voice minus floor (targets: p50 <= 50 ms, p99 <= 100 ms):")
    lines.append(row("turns answered without a tool", [t.latency - floor for t in direct]))
    tool_floor = [floor + options.llm_first_token_ms / 1000 + t.timing.tool_wait for t in tooled]
    lines.append(
        row("after a tool (floor + LLM + tool)", [t.latency - f for t, f in zip(tooled, tool_floor, strict=True)])
    )
    lines.append("where a turn's time went (per turn, exact):")
    lines.append(row("STT: speech end -> end of turn", [t.timing.stt_final for t in turns]))
    lines.append(row("server: end of turn -> first frame", [t.timing.voice_to_voice_server for t in turns]))
    lines.append(row("  waiting on the agent", [t.timing.agent_wait for t in turns]))
    lines.append(row("  waiting on tools", [t.timing.tool_wait for t in tooled]))
    lines.append(row("  waiting on TTS", [t.timing.tts_wait for t in turns]))
    lines.append(row("  server overhead", [t.timing.server_overhead for t in turns]))
    lines.append(row("delivery: first frame sent -> heard", [t.heard_at - t.timing.first_frame_at for t in turns]))
    lines.append(row("agent first token (simulated: LLM)", [t.timing.agent_first_token for t in turns]))
    lines.append(row("  of which the simulator's dialog model", run.model_seconds))
    lines.append(row("event loop lag (callers, simulators, server)", run.loop_lags))
    lines.append("TURN_HISTOGRAMS (bucket estimates, as /metrics would give them):")
    for histogram in TURN_HISTOGRAMS.values():
        lines.append(
            f"  {histogram.name:<44} p50 {ms(histogram.quantile(0.5))}  p99 {ms(histogram.quantile(0.99))} ms  "
            f"(count {histogram.count}, mean {ms(histogram.sum / histogram.count if histogram.count else None)} ms)"
        )
    overhead_p99 = percentile([t.timing.server_overhead for t in turns], 99)
    direct_gap = [t.latency - floor for t in direct]
    verdicts = [f"server overhead p99 {overhead_p99 * 1000:.1f} ms (target <= 5 ms)"]
    if direct_gap:
        verdicts.append(
            f"v2v - floor p50 {percentile(direct_gap, 50) * 1000:.0f} ms (<= 50), "
            f"p99 {percentile(direct_gap, 99) * 1000:.0f} ms (<= 100) on turns without a tool"
        )
    lines.append("summary: " + "; ".join(verdicts))
    if options.verbose:
        lines.append("per turn: v2v | STT | server | agent wait | tool wait | TTS wait | overhead (ms) | caller said")
        for t in turns:
            timing = t.timing
            lines.append(
                f"  {ms(t.latency)} | {ms(timing.stt_final)} | {ms(timing.voice_to_voice_server)} | "
                f"{ms(timing.agent_wait)} | {ms(timing.tool_wait)} | {ms(timing.tts_wait)} | "
                f"{ms(timing.server_overhead)} | {t.said}"
            )
    for failure in run.failures:
        lines.append(f"problem: {failure}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=1, help="calls at once (1: one after another)")
    parser.add_argument("--turns", type=int, default=5, help="caller turns per call (at most 5)")
    parser.add_argument("--stt-final-ms", type=int, default=150)
    parser.add_argument("--llm-first-token-ms", type=int, default=250)
    parser.add_argument("--tts-first-byte-ms", type=int, default=100)
    parser.add_argument("--endpointing-ms", type=int, default=300)
    parser.add_argument(
        "--llm-tokens-per-second",
        type=float,
        default=None,
        help="the model's token rate after the first (default: no limit)",
    )
    parser.add_argument("--engines", choices=("stand-in", "offline"), default="stand-in")
    parser.add_argument("--time-limit", type=float, default=110.0, help="seconds before the run stops and reports")
    parser.add_argument("--verbose", action="store_true", help="print every turn")
    args = parser.parse_args()
    options = Options(
        calls=max(1, args.calls),
        concurrency=max(1, args.concurrency),
        turns=min(max(1, args.turns), 5),
        stt_final_ms=args.stt_final_ms,
        llm_first_token_ms=args.llm_first_token_ms,
        tts_first_byte_ms=args.tts_first_byte_ms,
        endpointing_ms=args.endpointing_ms,
        llm_tokens_per_second=args.llm_tokens_per_second,
        engines=args.engines,
        time_limit=args.time_limit,
        verbose=args.verbose,
    )
    from voice_server.logging import configure_logging

    configure_logging("WARNING", "console")
    run = Run()
    began = time.monotonic()

    async def bounded() -> None:
        try:
            async with asyncio.timeout(options.time_limit):
                await bench(options, run)
        except TimeoutError:
            run.failures.append(f"stopped at the {options.time_limit:.0f} s time limit")

    asyncio.run(bounded())
    for line in report(options, run, time.monotonic() - began):
        print(line)
    if run.failures or not run.turns:
        sys.exit(1)


if __name__ == "__main__":
    main()
