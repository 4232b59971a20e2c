"""Benchmark terraphim-proxy against a zero-delay upstream stand-in.

One run starts two child processes on 127.0.0.1: the upstream stand-in (this file in --serve-upstream mode), which
answers both the Anthropic Messages API (POST /v1/messages) and OpenAI chat completions (POST /chat/completions), and
the proxy (terraphim_proxy.py) with two providers at the stand-in: "anthropic" (type anthropic, the default route) and
"bench-openai" (type openai, reached by an explicit "bench-openai,gpt-4o" model). The load generator in this process
sends Anthropic requests over three paths (see bench_paths):

    direct        client -> stand-in /v1/messages (no proxy; the baseline of every ratio)
    pass-through  client -> proxy -> stand-in /v1/messages
    openai        client -> proxy (Anthropic -> OpenAI translation) -> stand-in /chat/completions

interleaved A/B/C within each round over several rounds, and reports the medians over the rounds.

    python bench.py                 # default run, about 2 minutes on 2 cores
    python bench.py --quick         # about 20 s, for development
    python bench.py --json out.json # also write the results as JSON
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

HERE = Path(__file__).resolve().parent
PROXY_SCRIPT = HERE / "terraphim_proxy.py"
CLAUDE_CODE_FIXTURE = HERE / "fixtures" / "claude-code" / "01_print_main_turn1.json"
HOST = "127.0.0.1"
READY_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

REQUEST_HEADERS = {
    "content-type": "application/json",
    "anthropic-version": "2023-06-01",
    "x-api-key": "bench-client-key",
}


def run_event_loop(main: Awaitable[Any]) -> Any:
    """asyncio.run, on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)  # type: ignore[arg-type]
    return uvloop.run(main)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Upstream stand-in: a zero-delay Anthropic Messages API
# ---------------------------------------------------------------------------

STANDIN_MODEL = "claude-bench"
STANDIN_USAGE = {"input_tokens": 12, "output_tokens": 1}


def sse_frame(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def standin_message() -> bytes:
    message = {
        "id": "msg_bench",
        "type": "message",
        "role": "assistant",
        "model": STANDIN_MODEL,
        "content": [{"type": "text", "text": "Hello from the bench upstream."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {**STANDIN_USAGE, "output_tokens": 8},
    }
    return json.dumps(message, separators=(",", ":")).encode()


def standin_stream(chunks: int) -> list[bytes]:
    """The SSE frames of one streamed answer with `chunks` text deltas, framed as Anthropic frames them."""
    start = {
        "id": "msg_bench",
        "type": "message",
        "role": "assistant",
        "model": STANDIN_MODEL,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": STANDIN_USAGE,
    }
    deltas = [
        sse_frame(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"word{i} "}},
        )
        for i in range(chunks)
    ]
    return [
        sse_frame("message_start", {"type": "message_start", "message": start}),
        sse_frame("ping", {"type": "ping"}),
        sse_frame(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        *deltas,
        sse_frame("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse_frame(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": chunks},
            },
        ),
        sse_frame("message_stop", {"type": "message_stop"}),
    ]


STANDIN_OPENAI_MODEL = "gpt-4o"
STANDIN_OPENAI_USAGE = {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20}
STANDIN_CREATED = 1_700_000_000


def openai_frame(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def standin_completion() -> bytes:
    completion = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": STANDIN_CREATED,
        "model": STANDIN_OPENAI_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                "finish_reason": "stop",
            }
        ],
        "usage": STANDIN_OPENAI_USAGE,
    }
    return json.dumps(completion, separators=(",", ":")).encode()


def standin_completion_stream(chunks: int, include_usage: bool) -> list[bytes]:
    """The SSE frames of one streamed chat completion with `chunks` content deltas, framed as OpenAI frames them."""

    def chunk(choices: list[dict], **extra: Any) -> bytes:
        head = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": STANDIN_CREATED}
        return openai_frame({**head, "model": STANDIN_OPENAI_MODEL, "choices": choices, **extra})

    def delta(content: dict, finish_reason: str | None = None) -> list[dict]:
        return [{"index": 0, "delta": content, "finish_reason": finish_reason}]

    frames = [
        chunk(delta({"role": "assistant", "content": ""})),
        *(chunk(delta({"content": f"word{i} "})) for i in range(chunks)),
        chunk(delta({}, "stop")),
    ]
    if include_usage:  # what stream_options.include_usage asks for: one last chunk with usage and no choices
        frames.append(chunk([], usage={**STANDIN_OPENAI_USAGE, "completion_tokens": chunks}))
    return [*frames, openai_frame("[DONE]")]


def standin_app(chunks: int) -> web.Application:
    message = standin_message()
    frames = standin_stream(chunks)
    completion = standin_completion()
    completion_frames = {usage: standin_completion_stream(chunks, usage) for usage in (False, True)}
    sse_headers = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}

    async def stream_frames(request: web.Request, frames: list[bytes], headers: dict[str, str]) -> web.StreamResponse:
        response = web.StreamResponse(headers={**sse_headers, **headers})
        await response.prepare(request)
        for frame in frames:
            await response.write(frame)
        await response.write_eof()
        return response

    async def messages(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        if body.get("stream") is not True:
            return web.Response(body=message, content_type="application/json", headers={"request-id": "req_bench"})
        return await stream_frames(request, frames, {"request-id": "req_bench"})

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        headers = {"x-request-id": "req_bench"}
        if body.get("stream") is not True:
            return web.Response(body=completion, content_type="application/json", headers=headers)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await stream_frames(request, completion_frames[include_usage], headers)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/chat/completions", chat_completions)
    app.router.add_get("/health", health)
    return app


async def serve_standin(port: int, chunks: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    runner = web.AppRunner(standin_app(chunks), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, port, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


# ---------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def output_tail(self, limit: int = 2000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-limit:].strip() or "(no output)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if bench.py dies without its cleanup running (Linux only)."""
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def stop_child(child: Child) -> None:
    """Terminate, then kill if it does not exit in time."""
    if child.process.poll() is None:
        child.process.terminate()
        try:
            child.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait(STOP_TIMEOUT_S)


@contextlib.contextmanager
def running_child(name: str, argv: list[str], workdir: Path) -> Iterator[Child]:
    """Start a child process with its output in workdir/<name>.log; stop it however the block ends."""
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=HERE,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    child = Child(name, process, log_path)
    try:
        yield child
    finally:
        stop_child(child)


def wait_ready(child: Child, health_url: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll GET health_url until it answers 200; fail early if the child exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.process.returncode}:\n{child.output_tail()}")
        with contextlib.suppress(OSError), urllib.request.urlopen(health_url, timeout=1.0) as response:
            if response.status == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{child.name} not ready after {timeout_s:.0f} s ({health_url}):\n{child.output_tail()}")


OPENAI_PROVIDER = "bench-openai"
OPENAI_ROUTE = f"{OPENAI_PROVIDER},{STANDIN_OPENAI_MODEL}"


def proxy_config(upstream_url: str, port: int) -> str:
    """A config with two providers at the stand-in: the default route goes to `anthropic` (pass-through),
    and requests whose model is OPENAI_ROUTE go to OPENAI_PROVIDER (type openai, /chat/completions)."""
    return f"""\
[proxy]
host = "{HOST}"
port = {port}
log_level = "warning"

[router]
default = "anthropic,claude-sonnet-4-5"

[[providers]]
name = "anthropic"
type = "anthropic"
api_base_url = "{upstream_url}"
api_key = "bench-upstream-key"
models = ["claude-sonnet-4-5"]

[[providers]]
name = "{OPENAI_PROVIDER}"
type = "openai"
api_base_url = "{upstream_url}"
api_key = "bench-upstream-key"
models = ["{STANDIN_OPENAI_MODEL}"]
"""


def start_standin(stack: contextlib.ExitStack, workdir: Path, chunks: int) -> tuple[Child, str]:
    port = free_port()
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve-upstream", str(port), "--chunks", str(chunks)]
    child = stack.enter_context(running_child("upstream", argv, workdir))
    url = f"http://{HOST}:{port}"
    wait_ready(child, f"{url}/health")
    return child, url


def start_proxy(stack: contextlib.ExitStack, workdir: Path, name: str, upstream_url: str) -> tuple[Child, str]:
    port = free_port()
    config_path = workdir / f"{name}.toml"
    config_path.write_text(proxy_config(upstream_url, port))
    argv = [
        sys.executable,
        str(PROXY_SCRIPT),
        "--config",
        str(config_path),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    child = stack.enter_context(running_child(name, argv, workdir))
    url = f"http://{HOST}:{port}"
    wait_ready(child, f"{url}/health")
    return child, url


# ---------------------------------------------------------------------------
# /proc readings
# ---------------------------------------------------------------------------


def cpu_ms(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    after_name = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(after_name[11]), int(after_name[12])
    return (utime + stime) * 1000 / CLOCK_TICKS


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (peak resident set) of a process, from /proc/<pid>/status."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


# ---------------------------------------------------------------------------
# Paths, bodies and cases
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchPath:
    """A base URL that takes Anthropic requests; pid is the process whose CPU is reported, if any; model, if set,
    replaces the body's model (an explicit `provider,model` route through the proxy)."""

    name: str
    base_url: str
    pid: int | None = None
    model: str | None = None

    @property
    def messages_url(self) -> str:
        return f"{self.base_url}/v1/messages"


@dataclass(frozen=True)
class Case:
    body: str
    stream: bool
    concurrency: int

    @property
    def name(self) -> str:
        return f"{self.body} {'stream' if self.stream else 'json'} c{self.concurrency}"


def small_body() -> dict:
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 256,
        "messages": [{"role": "user", "content": "Say hello in five words."}],
    }


def claude_code_body() -> dict:
    return json.loads(CLAUDE_CODE_FIXTURE.read_text())["body"]


BODIES: dict[str, Callable[[], dict]] = {"small": small_body, "claude-code": claude_code_body}


Payloads = dict[tuple[str | None, str, bool], bytes]


def encode_payloads(models: set[str | None]) -> Payloads:
    """Each body serialised once per model override and stream setting, so the load generator sends ready bytes."""
    payloads = {}
    for name, make in BODIES.items():
        body = make()
        for model in models:
            override = {"model": model} if model else {}
            for stream in (False, True):
                data = {**body, **override, "stream": stream}
                payloads[model, name, stream] = json.dumps(data, separators=(",", ":")).encode()
    return payloads


def all_cases(concurrencies: tuple[int, ...]) -> list[Case]:
    return [Case(body, stream, c) for body in BODIES for stream in (False, True) for c in concurrencies]


# ---------------------------------------------------------------------------
# Load generator
# ---------------------------------------------------------------------------


class BadResponse(Exception):
    pass


@dataclass(frozen=True)
class Measurement:
    """One path, one case, one round; or the medians over the rounds. Times in ms."""

    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    ttfb_p50_ms: float | None
    ttfb_p99_ms: float | None
    rps: float
    cpu_ms_per_req: float | None


async def timed_request(session: aiohttp.ClientSession, url: str, payload: bytes, stream: bool) -> tuple[float, float]:
    """One request; returns (seconds to the first body byte, seconds to the last)."""
    start = time.perf_counter()
    async with session.post(url, data=payload, headers=REQUEST_HEADERS) as response:
        if not stream:
            body = await response.read()
            first = last = time.perf_counter()
            if response.status != 200:
                raise BadResponse(f"HTTP {response.status}: {body[:200]!r}")
            return first - start, last - start
        first = 0.0
        tail = b""
        async for chunk in response.content.iter_any():
            if not first:
                first = time.perf_counter()
            tail = (tail + chunk)[-256:]
        last = time.perf_counter()
    if response.status != 200 or b"event: message_stop" not in tail:
        raise BadResponse(f"HTTP {response.status}, stream ended with {tail[-120:]!r}")
    return first - start, last - start


def percentile(sorted_values: list[float], q: int) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[q - 1]


async def run_load(
    session: aiohttp.ClientSession, path: BenchPath, case: Case, payload: bytes, requests: int
) -> Measurement:
    """Warm the pool with one request per connection, then send `requests` requests from `concurrency` workers."""
    url = path.messages_url
    await asyncio.gather(*(timed_request(session, url, payload, case.stream) for _ in range(case.concurrency)))
    jobs = iter(range(requests))
    firsts: list[float] = []
    lasts: list[float] = []
    errors: list[str] = []

    async def worker() -> None:
        for _ in jobs:  # shared by all workers: each job is taken once
            try:
                first, last = await timed_request(session, url, payload, case.stream)
            except (aiohttp.ClientError, asyncio.TimeoutError, BadResponse) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            firsts.append(first)
            lasts.append(last)

    cpu_before = cpu_ms(path.pid) if path.pid else 0.0
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(case.concurrency)))
    elapsed = time.perf_counter() - started
    cpu_used = cpu_ms(path.pid) - cpu_before if path.pid else None
    if errors:
        print(f"  {path.name} {case.name}: {len(errors)} errors, first: {errors[0]}", file=sys.stderr)
    if not lasts:
        raise RuntimeError(f"{path.name} {case.name}: every request failed")
    firsts.sort()
    lasts.sort()
    return Measurement(
        requests=requests,
        errors=len(errors),
        p50_ms=percentile(lasts, 50) * 1000,
        p99_ms=percentile(lasts, 99) * 1000,
        ttfb_p50_ms=percentile(firsts, 50) * 1000 if case.stream else None,
        ttfb_p99_ms=percentile(firsts, 99) * 1000 if case.stream else None,
        rps=len(lasts) / elapsed,
        cpu_ms_per_req=cpu_used / requests if cpu_used is not None else None,
    )


Results = dict[Case, dict[str, list[Measurement]]]


async def measure_all(paths: list[BenchPath], cases: list[Case], rounds: int, requests: int) -> Results:
    """Every case, round by round, every path in turn (A/B/C, A/B/C, ...), over one shared keep-alive pool."""
    payloads = encode_payloads({path.model for path in paths})
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=max(c.concurrency for c in cases))
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    results: Results = {}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, skip_auto_headers=("User-Agent",)) as s:
        for index, case in enumerate(cases, 1):
            print(f"[{index}/{len(cases)}] {case.name}", file=sys.stderr, flush=True)
            per_path: dict[str, list[Measurement]] = {path.name: [] for path in paths}
            for _ in range(rounds):
                for path in paths:
                    payload = payloads[path.model, case.body, case.stream]
                    measurement = await run_load(s, path, case, payload, requests)
                    per_path[path.name].append(measurement)
            results[case] = per_path
    return results


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def median_measurement(rounds: list[Measurement]) -> Measurement:
    """The median of each field over the rounds; requests and errors are totals."""
    values: dict[str, Any] = {}
    for field in fields(Measurement):
        column = [getattr(m, field.name) for m in rounds]
        if field.name in ("requests", "errors"):
            values[field.name] = sum(column)
        elif None in column:
            values[field.name] = None
        else:
            values[field.name] = statistics.median(column)
    return Measurement(**values)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def comparison(path: Measurement, base: Measurement) -> dict[str, float | None]:
    return {
        "p50_ratio": ratio(path.p50_ms, base.p50_ms),
        "p99_ratio": ratio(path.p99_ms, base.p99_ms),
        "rps_ratio": ratio(path.rps, base.rps),
        "added_ms": path.p50_ms - base.p50_ms,
    }


COLUMNS = (
    ("case", 22),
    ("path", 12),
    ("p50 ms", 8),
    ("p99 ms", 8),
    ("ttfb50", 8),
    ("ttfb99", 8),
    ("req/s", 8),
    ("cpu ms/req", 11),
    ("added ms", 9),
    ("err", 4),
)


LEFT_ALIGNED = frozenset({"case", "path"})


def table_row(*cells: str) -> str:
    """Fixed-width cells under COLUMNS; missing trailing cells are blank."""
    parts = []
    for (title, width), cell in zip(COLUMNS, cells, strict=False):
        parts.append(f"{cell:<{width}}" if title in LEFT_ALIGNED else f"{cell:>{width}}")
    return " ".join(parts).rstrip()


def number(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def format_table(paths: list[BenchPath], results: Results) -> str:
    base = paths[0].name
    header = table_row(*(title for title, _ in COLUMNS))
    lines = [header, "-" * len(header)]
    for case, per_path in results.items():
        base_m = median_measurement(per_path[base])
        for i, path in enumerate(paths):
            m = median_measurement(per_path[path.name])
            added = number(comparison(m, base_m)["added_ms"]) if path.name != base else ""
            lines.append(
                table_row(
                    case.name if i == 0 else "",
                    path.name,
                    number(m.p50_ms),
                    number(m.p99_ms),
                    number(m.ttfb_p50_ms),
                    number(m.ttfb_p99_ms),
                    number(m.rps, 0),
                    number(m.cpu_ms_per_req),
                    added,
                    str(m.errors),
                )
            )
            if path.name != base:
                c = comparison(m, base_m)
                ratios = (number(c[key], suffix="x") for key in ("p50_ratio", "p99_ratio"))
                lines.append(table_row("", "ratio", *ratios, "", "", number(c["rps_ratio"], suffix="x")))
    return "\n".join(lines)


def results_json(settings: dict, paths: list[BenchPath], results: Results, rss: dict[str, float | None]) -> dict:
    base = paths[0].name
    cases = []
    for case, per_path in results.items():
        base_m = median_measurement(per_path[base])
        entry: dict[str, Any] = {"case": case.name, **asdict(case), "paths": {}}
        for path in paths:
            m = median_measurement(per_path[path.name])
            entry["paths"][path.name] = {
                "summary": asdict(m),
                "rounds": [asdict(r) for r in per_path[path.name]],
                **({"vs_" + base: comparison(m, base_m)} if path.name != base else {}),
            }
        cases.append(entry)
    return {
        "settings": settings,
        "paths": [asdict(p) for p in paths],
        "peak_rss_mb": rss,
        "cases": cases,
    }


# ---------------------------------------------------------------------------
# CLI and main
# ---------------------------------------------------------------------------

DEFAULT_REQUESTS = 1000
QUICK_REQUESTS = 200
DEFAULT_ROUNDS = 3
QUICK_ROUNDS = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark terraphim-proxy (Anthropic pass-through and OpenAI translation) "
        "against a zero-delay upstream stand-in."
    )
    parser.add_argument("--quick", action="store_true", help="a short development run (about 20 s)")
    parser.add_argument(
        "--rounds",
        type=int,
        help=f"A/B/C rounds per case; medians are reported (default {DEFAULT_ROUNDS}, quick {QUICK_ROUNDS})",
    )
    parser.add_argument(
        "--requests",
        type=int,
        help=f"requests per path, case and round (default {DEFAULT_REQUESTS}, quick {QUICK_REQUESTS})",
    )
    parser.add_argument(
        "--concurrency", default="1,32", help="comma-separated concurrency levels (default 1,32)", metavar="LIST"
    )
    parser.add_argument("--chunks", type=int, default=20, help="text deltas per streamed answer (default 20)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.concurrency = tuple(int(c) for c in args.concurrency.split(","))
    except ValueError:
        parser.error(f"--concurrency: expected comma-separated integers, got '{args.concurrency}'")
    numbers = [("--rounds", args.rounds), ("--requests", args.requests), ("--chunks", args.chunks)]
    for flag, value in [*numbers, *(("--concurrency", c) for c in args.concurrency)]:
        if value is not None and value < 1:
            parser.error(f"{flag}: must be at least 1, got {value}")
    return args


def bench_paths(upstream_url: str, proxy_url: str, proxy_pid: int) -> list[BenchPath]:
    """The measured paths; the first is the baseline of every ratio."""
    return [
        BenchPath("direct", upstream_url),
        BenchPath("pass-through", proxy_url, proxy_pid),
        BenchPath("openai", proxy_url, proxy_pid, model=OPENAI_ROUTE),
    ]


def run_bench(args: argparse.Namespace) -> int:
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    requests = args.requests or (QUICK_REQUESTS if args.quick else DEFAULT_REQUESTS)
    cases = all_cases(args.concurrency)
    with tempfile.TemporaryDirectory(prefix="terraphim-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        _, upstream_url = start_standin(stack, workdir, args.chunks)
        proxy, proxy_url = start_proxy(stack, workdir, "proxy", upstream_url)
        paths = bench_paths(upstream_url, proxy_url, proxy.pid)
        results = run_event_loop(measure_all(paths, cases, rounds, requests))
        rss = {proxy.name: peak_rss_mb(proxy.pid)}
        errors = sum(m.errors for per_path in results.values() for ms in per_path.values() for m in ms)
        if errors:
            print(f"{errors} failed requests; proxy output:\n{proxy.output_tail()}", file=sys.stderr)
    settings = {
        "rounds": rounds,
        "requests": requests,
        "chunks": args.chunks,
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "cpus": os.cpu_count(),
    }
    print()
    print(
        f"terraphim-proxy bench: {rounds} rounds, requests per measurement {requests}, {args.chunks} stream chunks, "
        f"Python {settings['python']}, aiohttp {settings['aiohttp']}, {settings['cpus']} CPUs"
    )
    print("Medians over rounds. p50/p99 = time to last byte; ttfb = time to first byte (streams); ms.")
    print(format_table(paths, results))
    for name, mb in rss.items():
        print(f"{name} peak RSS (VmHWM): {number(mb, 1)} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(results_json(settings, paths, results, rss), indent=2) + "\n")
        print(f"results written to {args.json}")
    return 1 if errors else 0


def interrupt(signum: int, frame: Any) -> None:
    """SIGTERM unwinds like Ctrl-C, so the child processes are stopped on the way out."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_upstream is not None:
        run_event_loop(serve_standin(args.serve_upstream, args.chunks))
        return 0
    signal.signal(signal.SIGTERM, interrupt)
    try:
        return run_bench(args)
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
