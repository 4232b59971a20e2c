"""Benchmark terraphim-proxy against a zero-delay upstream stand-in.

One run starts child processes on 127.0.0.1: the upstream stand-in (this file in --serve-upstream mode: the tests'
stand-in from conftest.py, with its answers made once at start), which answers the Anthropic Messages API
(POST /v1/messages), OpenAI chat completions (POST /chat/completions), Ollama's native chat (POST /api/chat,
NDJSON streams) and Gemini (POST /v1beta/models/{model}:generateContent and :streamGenerateContent?alt=sse),
and the proxy (terraphim_proxy.py) with one provider of each type at the stand-in.
The load generator in this process sends Anthropic requests over these paths (see ROUTES and bench_paths):

    direct        client -> stand-in /v1/messages (no proxy; the baseline of every ratio)
    pass-through  client -> proxy -> stand-in /v1/messages (the default route)
    openai        client -> proxy (Anthropic -> OpenAI) -> stand-in /chat/completions
    ollama        client -> proxy (Anthropic -> Ollama) -> stand-in /api/chat
    gemini        client -> proxy (Anthropic -> Gemini) -> stand-in /v1beta/models/...
    responses     client -> proxy (Anthropic -> OpenAI Responses, api = "responses") -> stand-in /responses
    responses-in  client (the same requests in the Responses API's shape) -> proxy /v1/responses -> stand-in
                  /v1/messages (the Codex CLI's path, pass-through)
    NAME          client -> a peer proxy the user started (--peer NAME=URL), configured to forward to the stand-in

interleaved within each round over several rounds, and reports the medians over the rounds. Bodies: `small`,
`cc-warm` (a real Claude Code request, the same bytes every time) and `cc-cold` (that request made unique per
request in its first system block and its last user text, so no cache can help).

    python bench.py                     # default run, about 2 minutes on 2 cores
    python bench.py --quick             # about 22 s on 2 cores (QUICK_SECONDS), for development
    python bench.py --workers-compare   # the proxy with --workers 1 vs --workers 2 on the Claude Code cases
    python bench.py --soak              # many requests against a stand-in that fails on purpose; leak check
    python bench.py --sizes             # added latency and CPU for 10 KB to 1.5 MB conversations, warm and cold
    python bench.py --usage-compare     # the usage database off vs on; every request's row written
    python bench.py --redis-compare     # limits kept in the process vs shared through a local redis-server
    python bench.py --json out.json     # also write the results as JSON
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import copy
import functools
import ipaddress
import itertools
import json
import os
import platform
import random
import secrets
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from conftest import STREAM_TYPES, Received, StandInServer, text_answer, text_stream_parts

HERE = Path(__file__).resolve().parent
PROXY_SCRIPT = HERE / "terraphim_proxy.py"
CLAUDE_CODE_FIXTURE = HERE / "fixtures" / "claude-code" / "05_interactive_main_turn1.json"
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


def compact(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------
# Upstream stand-in: conftest.py's, with answers made once in each provider's wire format
# ---------------------------------------------------------------------------

STANDIN_TEXT = "Hello from the bench upstream."
STANDIN_MODELS = {
    "anthropic": "claude-bench",
    "openai": "gpt-4o",
    "ollama": "qwen-bench",
    "gemini": "gemini-bench",
    "responses": "gpt-bench-codex",
}
STANDIN_OPENAI_MODEL = STANDIN_MODELS["openai"]
STANDIN_OLLAMA_MODEL = STANDIN_MODELS["ollama"]
STANDIN_GEMINI_MODEL = STANDIN_MODELS["gemini"]
STANDIN_PATHS = {
    "anthropic": "/v1/messages",
    "openai": "/chat/completions",
    "ollama": "/api/chat",
    "responses": "/responses",
}
STANDIN_WORD = "word "


@dataclass(frozen=True)
class Canned:
    """One API's answer, whole (`body`) and streamed (`frames`, sent as they are)."""

    body: bytes
    frames: list[bytes]
    stream_type: str


def canned(kind: str, chunks: int, include_usage: bool = False) -> Canned:
    """`kind`'s answer, as conftest's stand-in writes it, with `chunks` text deltas when streamed."""
    model = STANDIN_MODELS[kind]
    frames = text_stream_parts(kind, model, STANDIN_WORD * chunks, len(STANDIN_WORD), include_usage)
    return Canned(compact(text_answer(kind, model, STANDIN_TEXT)), frames, STREAM_TYPES[kind])


# --- Faults (the soak's stand-in): a seeded RNG decides, per request, whether and how to fail.

FAULT_ERROR_RATE = 0.05  # HTTP 500 or 529 before any answer
FAULT_CUT_RATE = 0.02  # the answer ends half-way: no message_stop / [DONE] / done / finishReason
FAULT_SLOW_RATE = 0.01  # the first byte comes after SLOW_FIRST_BYTE_S
SLOW_FIRST_BYTE_S = 0.05
FAULT_BODY = compact({"type": "error", "error": {"type": "api_error", "message": "bench stand-in: injected fault"}})


@dataclass(frozen=True)
class Fault:
    status: int = 0  # answer with this HTTP error instead
    cut: bool = False  # end the answer half-way ...
    abrupt: bool = False  # ... by dropping the connection (else a clean, short end)
    slow: bool = False  # wait SLOW_FIRST_BYTE_S before the first byte

    @property
    def label(self) -> str:
        if self.status:
            return f"HTTP {self.status}"
        if self.cut:
            return "cut (connection dropped)" if self.abrupt else "cut (clean end)"
        return "slow first byte" if self.slow else "none"


NO_FAULT = Fault()


class FaultPlan:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.counts: collections.Counter[str] = collections.Counter()

    def draw(self) -> Fault:
        roll = self.rng.random()
        if roll < FAULT_ERROR_RATE:
            fault = Fault(status=self.rng.choice((500, 529)))
        elif roll < FAULT_ERROR_RATE + FAULT_CUT_RATE:
            fault = Fault(cut=True, abrupt=self.rng.random() < 0.5)
        elif roll < FAULT_ERROR_RATE + FAULT_CUT_RATE + FAULT_SLOW_RATE:
            fault = Fault(slow=True)
        else:
            return NO_FAULT
        self.counts[fault.label] += 1
        return fault


def first_half(pieces: list[bytes]) -> list[bytes]:
    """A whole body cut at half its bytes; a stream cut at half its frames."""
    if len(pieces) == 1:
        return [pieces[0][: len(pieces[0]) // 2]]
    return pieces[: len(pieces) // 2]


async def write_cut(
    request: web.Request, pieces: list[bytes], content_type: str, headers: dict[str, str], fault: Fault
) -> web.StreamResponse:
    """Half an answer: a whole body keeps its full content-length when the connection is dropped."""
    sent = first_half(pieces)
    response = web.StreamResponse(headers={"content-type": content_type, **headers})
    if len(pieces) == 1:
        response.content_length = len(pieces[0] if fault.abrupt else sent[0])
    await response.prepare(request)
    for piece in sent:
        await response.write(piece)
    if fault.abrupt and request.transport is not None:
        request.transport.abort()
        return response
    await response.write_eof()
    return response


async def write_frames(
    request: web.Request, frames: list[bytes], content_type: str, headers: dict[str, str]
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": content_type, "cache-control": "no-cache", **headers})
    await response.prepare(request)
    for frame in frames:
        await response.write(frame)
    await response.write_eof()
    return response


def standin_error(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text)


class BenchAnswers:
    """The stand-in's script: canned answers per API, and faults when seeded."""

    def __init__(self, chunks: int, fault_seed: int | None):
        self.answers = {kind: canned(kind, chunks) for kind in STANDIN_MODELS}
        self.openai_with_usage = canned("openai", chunks, include_usage=True)
        self.faults = FaultPlan(fault_seed) if fault_seed is not None else None

    async def reply(
        self, request: web.Request, stream: bool, answer: Canned, headers: dict[str, str]
    ) -> web.StreamResponse:
        fault = self.faults.draw() if self.faults else NO_FAULT
        if fault.status:
            return web.Response(status=fault.status, body=FAULT_BODY, content_type="application/json")
        if fault.slow:
            await asyncio.sleep(SLOW_FIRST_BYTE_S)
        if fault.cut:
            pieces, kind = (answer.frames, answer.stream_type) if stream else ([answer.body], "application/json")
            return await write_cut(request, pieces, kind, headers, fault)
        if stream:
            return await write_frames(request, answer.frames, answer.stream_type, headers)
        return web.Response(body=answer.body, content_type="application/json", headers=headers)

    async def __call__(self, server: StandInServer, received: Received, request: web.Request) -> web.StreamResponse:
        if (request.method, request.path) == ("GET", "/health"):
            faults = dict(self.faults.counts) if self.faults else None
            return web.json_response({"status": "ok", "faults": faults})
        kind = received.kind
        if request.method != "POST" or (kind != "gemini" and request.path != STANDIN_PATHS[kind]):
            return standin_error(404, f"no route {request.method} {request.path}")
        if kind == "gemini" and received.stream and request.query.get("alt") != "sse":
            return standin_error(400, "the stand-in streams only with alt=sse")
        body = received.body if isinstance(received.body, dict) else {}
        answer = self.answers[kind]
        if kind == "openai" and (body.get("stream_options") or {}).get("include_usage"):
            answer = self.openai_with_usage
        stream = body.get("stream", True) is not False if kind == "ollama" else received.stream  # Ollama streams
        headers = {"anthropic": {"request-id": "req_bench"}, "openai": {"x-request-id": "req_bench"}}.get(kind, {})
        return await self.reply(request, stream, answer, headers)


async def serve_standin(port: int, chunks: int, fault_seed: int | None) -> None:
    """Serve until SIGTERM or SIGINT."""
    server = StandInServer(BenchAnswers(chunks, fault_seed), record=False)
    await server.start(port, backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


# ---------------------------------------------------------------------------
# /proc readings (Linux); a proxy with --workers N is read as the sum of its worker processes
# ---------------------------------------------------------------------------


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (so index 0 is field 3, the state)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    with contextlib.suppress(OSError, IndexError, ValueError):
        return int(proc_stat(pid)[19])
    return None


def child_pids(pid: int) -> list[int]:
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                children += [int(child) for child in (task / "children").read_text().split()]
    return children


def worker_pids(pid: int) -> list[int]:
    """The processes doing the work: the children of pid when it has any (as with --workers N), else pid."""
    return child_pids(pid) or [pid]


def cpu_ms(pid: int) -> float:
    """User + system CPU time so far, summed over the worker processes."""
    total = 0
    for worker in worker_pids(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            after_name = proc_stat(worker)
            total += int(after_name[11]) + int(after_name[12])
    return total * 1000 / CLOCK_TICKS


def status_mb(pid: int, key: str) -> float | None:
    """A /proc/<pid>/status memory line (VmRSS, VmHWM), in MB, summed over the worker processes."""
    values = []
    for worker in worker_pids(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{worker}/status").read_text().splitlines():
                if line.startswith(f"{key}:"):
                    values.append(int(line.split()[1]) / 1024)
    return sum(values) if values else None


def socket_count(pid: int) -> int:
    """Open sockets, summed over the worker processes."""
    count = 0
    for worker in worker_pids(pid):
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{worker}/fd").iterdir():
                with contextlib.suppress(OSError):
                    count += os.readlink(fd).startswith("socket:")
    return count


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
    """Terminate, then kill if it does not exit in time; then kill any of its children it left behind."""
    if child.process.poll() is not None:
        return
    grandchildren = [(pid, start_time(pid)) for pid in child_pids(child.pid)]
    child.process.terminate()
    try:
        child.process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.process.kill()
        child.process.wait(STOP_TIMEOUT_S)
    for pid, started in grandchildren:
        if started is not None and start_time(pid) == started:  # the same process, not a reused pid
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


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


def read_health(url: str) -> dict | None:
    """GET a /health URL; its JSON, or None when it does not answer 200 with JSON."""
    with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(url, timeout=1.0) as response:
        if response.status == 200:
            return json.loads(response.read())
    return None


def wait_ready(child: Child, health_url: str, processes: int = 1, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll GET health_url until `processes` distinct pids have answered (every --workers process listens);
    fail early if the child exits."""
    deadline = time.monotonic() + timeout_s
    seen: set[Any] = set()
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.process.returncode}:\n{child.output_tail()}")
        health = read_health(health_url)
        if health is not None:
            seen.add(health.get("pid"))
            if len(seen) >= processes:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{child.name} not ready after {timeout_s:.0f} s ({health_url}):\n{child.output_tail()}")


@dataclass(frozen=True)
class Route:
    """A proxy provider at the stand-in; `explicit` routes are reached by a `provider,model` model."""

    provider: str
    type: str
    model: str
    base_path: str = ""  # appended to the stand-in's URL
    keyless: bool = False
    explicit: bool = True
    api: str = "chat"  # for openai providers: "responses" for the Responses API

    @property
    def request_model(self) -> str | None:
        return f"{self.provider},{self.model}" if self.explicit else None


ROUTES = {
    "pass-through": Route("anthropic", "anthropic", "claude-sonnet-4-5", explicit=False),
    "openai": Route("bench-openai", "openai", STANDIN_OPENAI_MODEL),
    "ollama": Route("bench-ollama", "ollama", STANDIN_OLLAMA_MODEL, keyless=True),
    "gemini": Route("bench-gemini", "gemini", STANDIN_GEMINI_MODEL, base_path="/v1beta"),
    "responses": Route("bench-responses", "openai", STANDIN_MODELS["responses"], api="responses"),
}
INBOUND_RESPONSES = "responses-in"  # the client speaks the Responses API to the proxy; routed pass-through
PATH_NAMES = ("direct", *ROUTES, INBOUND_RESPONSES)


def provider_toml(route: Route, upstream_url: str) -> str:
    key = "" if route.keyless else 'api_key = "bench-upstream-key"\n'
    api = f'api = "{route.api}"\n' if route.api != "chat" else ""
    return (
        f'[[providers]]\nname = "{route.provider}"\ntype = "{route.type}"\n'
        f'api_base_url = "{upstream_url}{route.base_path}"\n{key}{api}models = ["{route.model}"]\n'
    )


def proxy_config(
    upstream_url: str, port: int, settings: dict[str, int | str], cluster: dict[str, str] | None = None
) -> str:
    """One provider per route at the stand-in; the default route is pass-through. `settings` go into [proxy]; the
    usage database is off unless they name one; `cluster`, if given, is the [cluster] table."""
    extra = "".join(f"{key} = {json.dumps(value)}\n" for key, value in {"usage_db": "off", **settings}.items())
    default = ROUTES["pass-through"]
    head = (
        f'[proxy]\nhost = "{HOST}"\nport = {port}\nlog_level = "warning"\n{extra}\n'
        f'[router]\ndefault = "{default.provider},{default.model}"\n'
    )
    if cluster:
        head += "\n[cluster]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in cluster.items())
    return "\n".join([head, *(provider_toml(route, upstream_url) for route in ROUTES.values())])


def start_standin(
    stack: contextlib.ExitStack, workdir: Path, chunks: int, port: int | None = None, fault_seed: int | None = None
) -> tuple[Child, str]:
    port = port or free_port()
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve-upstream", str(port), "--chunks", str(chunks)]
    if fault_seed is not None:
        argv += ["--faults", str(fault_seed)]
    child = stack.enter_context(running_child("upstream", argv, workdir))
    url = f"http://{HOST}:{port}"
    wait_ready(child, f"{url}/health")
    print(
        f"upstream stand-in: {url} (port {port}): POST /v1/messages, /chat/completions, /api/chat, "
        "/v1beta/models/{model}:generateContent|streamGenerateContent",
        file=sys.stderr,
        flush=True,
    )
    return child, url


def start_proxy(
    stack: contextlib.ExitStack,
    workdir: Path,
    name: str,
    upstream_url: str,
    workers: int = 1,
    settings: dict[str, int | str] | None = None,
    cluster: dict[str, str] | None = None,
) -> tuple[Child, str]:
    port = free_port()
    config_path = workdir / f"{name}.toml"
    config_path.write_text(proxy_config(upstream_url, port, settings or {}, cluster))
    argv = [sys.executable, str(PROXY_SCRIPT), "--config", str(config_path), "--port", str(port)]
    argv += ["--log-level", "warning", "--workers", str(workers)]
    child = stack.enter_context(running_child(name, argv, workdir))
    url = f"http://{HOST}:{port}"
    wait_ready(child, f"{url}/health", processes=workers)
    return child, url


# ---------------------------------------------------------------------------
# Paths, bodies and cases
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchPath:
    """A base URL that takes Anthropic requests. pid: the process whose CPU and RSS are reported, if any (summed
    over its workers); model, if set, replaces the body's model (an explicit `provider,model` route); baseline: the
    path this one's ratios compare with."""

    name: str
    base_url: str
    pid: int | None = None
    model: str | None = None
    baseline: str | None = None
    dialect: str = "messages"  # or "responses": the same requests in the Responses API's shape

    @property
    def messages_url(self) -> str:
        return f"{self.base_url}/v1/{self.dialect}"


@dataclass(frozen=True)
class Case:
    body: str
    stream: bool
    concurrency: int

    @property
    def name(self) -> str:
        return f"{self.body} {'stream' if self.stream else 'json'} c{self.concurrency}"


UNIQUE_MARK = "@@bench-unique@@"


def small_body() -> dict:
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 256,
        "messages": [{"role": "user", "content": "Say hello in five words."}],
    }


def claude_code_body() -> dict:
    return json.loads(CLAUDE_CODE_FIXTURE.read_text())["body"]


def mark_last_user_text(messages: list[dict], first: bool = False) -> None:
    """Put UNIQUE_MARK in front of the last (or the first) user message's last text block."""
    message = next(m for m in (messages if first else reversed(messages)) if m.get("role") == "user")
    content = message["content"]
    if isinstance(content, str):
        message["content"] = f"{UNIQUE_MARK} {content}"
        return
    texts = [block for block in content if block.get("type") == "text"]
    if texts:
        texts[-1]["text"] = f"{UNIQUE_MARK} {texts[-1]['text']}"
    else:
        content.append({"type": "text", "text": UNIQUE_MARK})


def mark_first_system_text(body: dict) -> None:
    """Put UNIQUE_MARK in front of the first system block, so no request shares a prefix with another."""
    system = body["system"]
    if isinstance(system, str):
        body["system"] = f"{UNIQUE_MARK} {system}"
    else:
        system[0]["text"] = f"{UNIQUE_MARK} {system[0]['text']}"


def cold_claude_code_body() -> dict:
    """The Claude Code body with UNIQUE_MARK where each request gets its own text: in front of the first system
    block and of the last user message's last text block."""
    body = claude_code_body()
    mark_first_system_text(body)
    mark_last_user_text(body["messages"])
    return body


BODIES = {"small": small_body, "cc-warm": claude_code_body, "cc-cold": cold_claude_code_body}
CLAUDE_CODE_BODIES = ("cc-warm", "cc-cold")

# --sizes: Claude-Code-like conversations of about these sizes (compact JSON), warm and cold.
SIZES = {"10k": 10_000, "150k": 150_000, "600k": 600_000, "1.5m": 1_500_000}
SIZE_PATHS = ("direct", "pass-through", "openai")
SIZE_REQUESTS = 40  # per path, case and round: a 1.5 MB body takes tens of ms
QUICK_SIZE_REQUESTS = 15


def read_file_turn(n: int) -> list[dict]:
    """One turn of a coding session: the assistant reads a file, the user's tool result holds about 4 KB of it."""
    tool_id = f"toolu_bench{n:06d}"
    source = "".join(f"def step_{n}_{i}(value):\n    return value * {i} + {n}\n\n" for i in range(100))
    call = {"type": "tool_use", "id": tool_id, "name": "Read", "input": {"file_path": f"/work/src/module_{n}.py"}}
    return [
        {"role": "assistant", "content": [{"type": "text", "text": f"Reading module {n}."}, call]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": source}]},
    ]


def conversation_body(size: int, cold: bool) -> dict:
    """A Claude Code request grown with file-reading turns to about `size` bytes, then one more turn whose text is
    new on every request (warm: the same conversation plus one turn); cold also makes the first system block and
    the first user message new, so nothing of it was seen before."""
    fixture = claude_code_body()
    first_user = next(m for m in fixture["messages"] if m["role"] == "user")
    body = {"model": fixture["model"], "max_tokens": fixture["max_tokens"], "system": fixture["system"]}
    if len(compact(fixture["tools"])) * 2 < size:  # the tool list alone is about 74 KB
        body["tools"] = fixture["tools"]
    body["messages"] = [copy.deepcopy(first_user)]
    grown, turn = len(compact(body)), 0
    while grown < size:
        added = read_file_turn(turn)
        body["messages"] += added
        grown += len(compact(added))
        turn += 1
    body["messages"] += read_file_turn(turn)
    mark_last_user_text(body["messages"])
    if cold:
        mark_first_system_text(body)
        mark_last_user_text(body["messages"], first=True)
    return body


def size_bodies() -> dict[str, Callable[[], dict]]:
    return {
        f"{name} {temperature}": functools.partial(conversation_body, size, temperature == "cold")
        for name, size in SIZES.items()
        for temperature in ("warm", "cold")
    }


class Payloads:
    """Request bodies as bytes, made before the timing starts: a fixed body is the same bytes every time; a body with
    UNIQUE_MARK is serialised once, split at the mark, and joined with a new tag for each request."""

    def __init__(self, paths: Iterable[BenchPath], bodies: Mapping[str, Callable[[], dict]]):
        self.parts: dict[tuple[str | None, str, str, bool], list[bytes]] = {}
        overrides = {(path.model, path.dialect) for path in paths}
        for name, make in {"small": small_body, **bodies}.items():  # small: the preflight's
            body = make()
            for model, dialect in overrides:
                override = {"model": model} if model else {}
                for stream in (False, True):
                    shaped = {**body, **override, "stream": stream}
                    data = compact(responses_body(shaped) if dialect == "responses" else shaped)
                    self.parts[model, dialect, name, stream] = data.split(UNIQUE_MARK.encode())
        self.nonce = secrets.token_hex(4)  # new each run, so a peer's response cache cannot help either
        self.serial = itertools.count()

    def take(self, path: BenchPath, body: str, stream: bool, count: int) -> list[bytes]:
        parts = self.parts[path.model, path.dialect, body, stream]
        if len(parts) == 1:
            return [parts[0]] * count
        return [f"{self.nonce}-{next(self.serial)}".encode().join(parts) for _ in range(count)]


def responses_text(role: str, text: str) -> dict:
    kind = "output_text" if role == "assistant" else "input_text"
    return {
        "type": "message",
        "role": "developer" if role == "system" else role,
        "content": [{"type": kind, "text": text}],
    }


def responses_body(body: dict) -> dict:
    """The same request in the Responses API's shape, as the Codex CLI sends one (store false, whole input)."""
    items: list[dict] = []
    for message in body["messages"]:
        role, content = message["role"], message["content"]
        for block in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            if block["type"] == "text":
                items.append(responses_text(role, block["text"]))
            elif block["type"] == "tool_use":
                arguments = json.dumps(block["input"])
                items.append(
                    {"type": "function_call", "call_id": block["id"], "name": block["name"], "arguments": arguments}
                )
            elif block["type"] == "tool_result":
                inner = block.get("content")
                text = inner if isinstance(inner, str) else "".join(b.get("text", "") for b in inner or ())
                items.append({"type": "function_call_output", "call_id": block["tool_use_id"], "output": text})
    system = body.get("system") or ""
    instructions = system if isinstance(system, str) else "\n\n".join(block["text"] for block in system)
    tools = [
        {
            "type": "function",
            "name": tool["name"],
            "description": tool.get("description", ""),
            "parameters": tool["input_schema"],
        }
        for tool in body.get("tools") or ()
        if "input_schema" in tool
    ]
    shaped = {"model": body["model"], "input": items, "max_output_tokens": body["max_tokens"], "store": False}
    shaped |= {"instructions": instructions} if instructions else {}
    shaped |= {"tools": tools} if tools else {}
    return shaped | {"stream": body.get("stream", False)}


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
            tail = (tail + chunk)[-4096:]  # a Responses stream ends with the whole response
        last = time.perf_counter()
    if response.status != 200 or not (b"event: message_stop" in tail or b"event: response.completed" in tail):
        raise BadResponse(f"HTTP {response.status}, stream ended with {tail[-120:]!r}")
    return first - start, last - start


def percentile(sorted_values: list[float], q: int) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[q - 1]


async def run_load(session: aiohttp.ClientSession, path: BenchPath, case: Case, batch: list[bytes]) -> Measurement:
    """Warm the pool with the first `concurrency` payloads (one per connection), then send the rest from
    `concurrency` workers."""
    url = path.messages_url
    warm, timed = batch[: case.concurrency], batch[case.concurrency :]
    await asyncio.gather(*(timed_request(session, url, p, case.stream) for p in warm), return_exceptions=True)
    jobs = iter(timed)
    firsts: list[float] = []
    lasts: list[float] = []
    errors: list[str] = []

    async def worker() -> None:
        for payload in jobs:  # shared by all workers: each payload is sent once
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
        raise RuntimeError(f"{path.name} {case.name}: every request failed; first: {errors[0]}")
    firsts.sort()
    lasts.sort()
    return Measurement(
        requests=len(timed),
        errors=len(errors),
        p50_ms=percentile(lasts, 50) * 1000,
        p99_ms=percentile(lasts, 99) * 1000,
        ttfb_p50_ms=percentile(firsts, 50) * 1000 if case.stream else None,
        ttfb_p99_ms=percentile(firsts, 99) * 1000 if case.stream else None,
        rps=len(lasts) / elapsed,
        cpu_ms_per_req=cpu_used / len(timed) if cpu_used is not None else None,
    )


Results = dict[Case, dict[str, list[Measurement]]]


async def preflight(session: aiohttp.ClientSession, paths: list[BenchPath], payloads: Payloads) -> None:
    """One small request per path, so a path that cannot answer (a peer not started) fails with a clear message."""
    for path in paths:
        try:
            await timed_request(session, path.messages_url, payloads.take(path, "small", False, 1)[0], False)
        except (aiohttp.ClientError, asyncio.TimeoutError, BadResponse) as exc:
            raise RuntimeError(f"path {path.name} ({path.messages_url}): {type(exc).__name__}: {exc}") from None


async def measure_all(
    paths: list[BenchPath],
    cases: list[Case],
    rounds: int,
    requests: int,
    bodies: Mapping[str, Callable[[], dict]] = BODIES,
) -> tuple[Results, collections.Counter[str]]:
    """Every case, round by round, every path in turn (A/B/C, A/B/C, ...), over one shared keep-alive pool.
    Returns the measurements and the number of requests sent over each path."""
    payloads = Payloads(paths, bodies)
    sent: collections.Counter[str] = collections.Counter({path.name: 1 for path in paths})  # the preflight
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=max(c.concurrency for c in cases))
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    results: Results = {}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, skip_auto_headers=("User-Agent",)) as s:
        await preflight(s, paths, payloads)
        for index, case in enumerate(cases, 1):
            print(f"[{index}/{len(cases)}] {case.name}", file=sys.stderr, flush=True)
            per_path: dict[str, list[Measurement]] = {path.name: [] for path in paths}
            for _ in range(rounds):
                for path in paths:
                    batch = payloads.take(path, case.body, case.stream, case.concurrency + requests)
                    per_path[path.name].append(await run_load(s, path, case, batch))
                    sent[path.name] += len(batch)
            results[case] = per_path
    return results, sent


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def median_measurement(rounds: list[Measurement]) -> Measurement:
    """The median of each field over the rounds; requests and errors are totals."""
    values: dict[str, Any] = {}
    for item in fields(Measurement):
        column = [getattr(m, item.name) for m in rounds]
        if item.name in ("requests", "errors"):
            values[item.name] = sum(column)
        elif None in column:
            values[item.name] = None
        else:
            values[item.name] = statistics.median(column)
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
    ("path", 16),
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


def path_rows(case_name: str, path: BenchPath, m: Measurement, base: Measurement | None) -> list[str]:
    """A path's row, and under it the ratio row against its baseline, if it has one."""
    c = comparison(m, base) if base else None
    cells = [number(m.p50_ms), number(m.p99_ms), number(m.ttfb_p50_ms), number(m.ttfb_p99_ms), number(m.rps, 0)]
    cells += [number(m.cpu_ms_per_req), number(c["added_ms"]) if c else "", str(m.errors)]
    rows = [table_row(case_name, path.name, *cells)]
    if c:
        ratios = (number(c[key], suffix="x") for key in ("p50_ratio", "p99_ratio"))
        rows.append(table_row("", "ratio", *ratios, "", "", number(c["rps_ratio"], suffix="x")))
    return rows


def format_table(paths: list[BenchPath], results: Results) -> str:
    header = table_row(*(title for title, _ in COLUMNS))
    lines = [header, "-" * len(header)]
    for case, per_path in results.items():
        medians = {name: median_measurement(rounds) for name, rounds in per_path.items()}
        for i, path in enumerate(paths):
            base = medians[path.baseline] if path.baseline else None
            lines += path_rows(case.name if i == 0 else "", path, medians[path.name], base)
    return "\n".join(lines)


def results_json(settings: dict, paths: list[BenchPath], results: Results, processes: dict[str, dict]) -> dict:
    cases = []
    for case, per_path in results.items():
        medians = {name: median_measurement(rounds) for name, rounds in per_path.items()}
        entry: dict[str, Any] = {"case": case.name, **asdict(case), "paths": {}}
        for path in paths:
            m = medians[path.name]
            entry["paths"][path.name] = {
                "summary": asdict(m),
                "rounds": [asdict(r) for r in per_path[path.name]],
                **({"vs_" + path.baseline: comparison(m, medians[path.baseline])} if path.baseline else {}),
            }
        cases.append(entry)
    return {"settings": settings, "paths": [asdict(p) for p in paths], "processes": processes, "cases": cases}


def process_report(name: str, pid: int, paths: list[BenchPath], sent: collections.Counter[str]) -> dict:
    """Peak RSS of a measured process (summed over its workers) and the requests it was sent."""
    return {
        "name": name,
        "pid": pid,
        "processes": len(worker_pids(pid)),
        "requests": sum(sent[p.name] for p in paths if p.pid == pid),
        "peak_rss_mb": status_mb(pid, "VmHWM"),
    }


def process_line(report: dict) -> str:
    workers = f", sum of {report['processes']} worker processes" if report["processes"] > 1 else ""
    return (
        f"{report['name']} peak RSS (VmHWM{workers}) after {report['requests']} requests: "
        f"{number(report['peak_rss_mb'], 1)} MB"
    )


# ---------------------------------------------------------------------------
# Soak: many mixed requests against a stand-in that fails on purpose; every answer must be closed properly
# ---------------------------------------------------------------------------

SOAK_PATHS = ("pass-through", "openai")
SOAK_BODIES = ("small", "cc-cold")
SOAK_PROXY_SETTINGS = {"retries": 1, "retry_base_ms": 5}
SOAK_TIMEOUT_S = 30.0
SOAK_SETTLE_S = 1.0
RSS_GROWTH_GOAL_MB = 10.0
SOCKET_SLACK = 32  # pooled upstream connections come and go; a leak over the soak would be far more


@dataclass(frozen=True)
class Outcome:
    label: str
    lost: str | None = None  # why the request counts as lost or left unclosed


@dataclass(frozen=True)
class SoakJob:
    index: int
    path: BenchPath
    body: str
    stream: bool


def last_sse_event(body: bytes) -> str | None:
    """The event name of a stream's last frame."""
    frames = [frame for frame in body.replace(b"\r\n", b"\n").split(b"\n\n") if frame.strip()]
    for line in frames[-1].split(b"\n") if frames else ():
        if line.startswith(b"event:"):
            return line[6:].strip().decode(errors="replace")
    return None


def json_object(body: bytes) -> dict:
    with contextlib.suppress(ValueError):
        data = json.loads(body)
        if isinstance(data, dict):
            return data
    return {}


def classify(status: int, content_type: str, body: bytes) -> Outcome:
    """One of the four proper endings, or a lost answer with the reason."""
    if status != 200:
        data = json_object(body)
        error = data.get("error")
        if data.get("type") == "error" and isinstance(error, dict) and isinstance(error.get("type"), str):
            return Outcome(f"HTTP {status}, Anthropic error body")
        return Outcome(f"HTTP {status}, other body", f"HTTP {status} without an Anthropic error body: {body[:120]!r}")
    if content_type == "text/event-stream":
        event = last_sse_event(body)
        if event == "message_stop":
            return Outcome("200 stream, message_stop")
        if event == "error":
            return Outcome("200 stream, then SSE error event")
        return Outcome("200 stream, unfinished", f"stream ended after event {event!r}: {body[-120:]!r}")
    if content_type == "application/json" and json_object(body).get("type") == "message":
        return Outcome("200 JSON message")
    return Outcome(f"200 {content_type}, not a message", f"200 {content_type} body: {body[:120]!r}")


async def soak_request(session: aiohttp.ClientSession, url: str, payload: bytes) -> Outcome:
    try:
        async with session.post(url, data=payload, headers=REQUEST_HEADERS) as response:
            return classify(response.status, response.content_type, await response.read())
    except asyncio.TimeoutError:
        return Outcome("client timeout", f"no complete answer within {SOAK_TIMEOUT_S:.0f} s")
    except aiohttp.ClientError as exc:
        return Outcome(f"client error {type(exc).__name__}", f"{type(exc).__name__}: {exc}")


@dataclass
class Tally:
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    lost_labels: set[str] = field(default_factory=set)
    lost: list[str] = field(default_factory=list)

    def add(self, job: SoakJob, outcome: Outcome) -> None:
        self.outcomes[outcome.label] += 1
        if outcome.lost:
            self.lost_labels.add(outcome.label)
            kind = "stream" if job.stream else "json"
            self.lost.append(f"#{job.index} {job.path.name} {job.body} {kind}: {outcome.lost}")


def soak_jobs(paths: list[BenchPath], count: int, seed: int) -> Iterator[SoakJob]:
    rng = random.Random(seed)
    for index in range(count):
        yield SoakJob(index, rng.choice(paths), rng.choice(SOAK_BODIES), rng.random() < 0.5)


async def soak_phase(
    name: str, jobs: Iterator[SoakJob], total: int, concurrency: int, payloads: Payloads, tally: Tally
) -> float:
    """Send the jobs from `concurrency` workers over a new pool, closed at the end; returns the seconds taken."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=concurrency)
    timeout = aiohttp.ClientTimeout(total=SOAK_TIMEOUT_S)
    step = max(total // 10, 1)
    done = itertools.count(1)
    started = time.perf_counter()

    async def worker(session: aiohttp.ClientSession) -> None:
        for job in jobs:  # shared by all workers
            payload = payloads.take(job.path, job.body, job.stream, 1)[0]
            tally.add(job, await soak_request(session, job.path.messages_url, payload))
            count = next(done)
            if count % step == 0:
                print(
                    f"  {name}: {count}/{total} in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True
                )

    async with aiohttp.ClientSession(connector=connector, timeout=timeout, skip_auto_headers=("User-Agent",)) as s:
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
    return time.perf_counter() - started


@dataclass(frozen=True)
class ProxyReading:
    """The proxy's memory and sockets at one moment, with no client connection open."""

    rss_mb: float | None
    peak_rss_mb: float | None
    sockets: int
    in_flight: Any

    @classmethod
    def read(cls, pid: int, health_url: str) -> ProxyReading:
        health = read_health(health_url) or {}
        in_flight = health.get("in_flight", "not reported by /health")
        return cls(status_mb(pid, "VmRSS"), status_mb(pid, "VmHWM"), socket_count(pid), in_flight)


@dataclass
class SoakReport:
    settings: dict
    warmup: int
    requests: int
    seconds: float
    tally: Tally
    start: ProxyReading
    end: ProxyReading
    faults: dict

    @property
    def growth_mb(self) -> float | None:
        return difference(self.end.rss_mb, self.start.rss_mb)

    @property
    def socket_leak(self) -> bool:
        return self.end.sockets > self.start.sockets + SOCKET_SLACK

    @property
    def failed(self) -> bool:
        return bool(self.tally.lost) or self.socket_leak


def difference(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


async def soak(
    paths: list[BenchPath], proxy: Child, proxy_url: str, upstream_url: str, args: argparse.Namespace, settings: dict
) -> SoakReport:
    """Warm up (a tenth of the requests), read the proxy's state, run the soak, close the pool, read it again."""
    payloads = Payloads(paths, BODIES)
    requests, concurrency = args.soak_requests, args.soak_concurrency
    warmup = max(requests // 10, concurrency)
    jobs = soak_jobs(paths, warmup + requests, args.soak_seed)
    tally = Tally()
    await soak_phase("warm-up", itertools.islice(jobs, warmup), warmup, concurrency, payloads, tally)
    await asyncio.sleep(SOAK_SETTLE_S)
    start = ProxyReading.read(proxy.pid, f"{proxy_url}/health")
    seconds = await soak_phase("soak", jobs, requests, concurrency, payloads, tally)
    await asyncio.sleep(SOAK_SETTLE_S)
    end = ProxyReading.read(proxy.pid, f"{proxy_url}/health")
    faults = (read_health(f"{upstream_url}/health") or {}).get("faults") or {}
    return SoakReport(settings, warmup, requests, seconds, tally, start, end, faults)


def outcome_rank(label: str, lost: set[str]) -> tuple[int, str]:
    return (2 if label in lost else 1 if not label.startswith("200") else 0, label)


def format_soak(report: SoakReport) -> str:
    tally, start, end = report.tally, report.start, report.end
    total = report.warmup + report.requests
    lines = [f"{'outcome':<44} {'requests':>9}", "-" * 54]
    for label in sorted(tally.outcomes, key=lambda item: outcome_rank(item, tally.lost_labels)):
        mark = "  LOST" if label in tally.lost_labels else ""
        lines.append(f"{label:<44} {tally.outcomes[label]:>9}{mark}")
    lines += ["-" * 54, f"{'total':<44} {total:>9}", f"{'lost or left unclosed':<44} {len(tally.lost):>9}", ""]
    injected = ", ".join(f"{label} {n}" for label, n in sorted(report.faults.items())) or "none"
    growth, goal = report.growth_mb, RSS_GROWTH_GOAL_MB
    verdict = "-" if growth is None else "ok" if growth < goal else "OVER GOAL"
    lines += [
        f"stand-in faults injected (attempts, retries included): {injected}",
        f"proxy RSS (VmRSS): start {number(start.rss_mb, 1)} MB (after {report.warmup} warm-up requests), "
        f"end {number(end.rss_mb, 1)} MB; growth {number(growth, 1)} MB (goal < {goal:.0f} MB): {verdict}",
        f"proxy peak RSS (VmHWM) after {total} requests: {number(end.peak_rss_mb, 1)} MB",
        f"proxy sockets with no client connected: start {start.sockets}, end {end.sockets}"
        f" ({'POSSIBLE LEAK' if report.socket_leak else 'ok'}; slack {SOCKET_SLACK} for pooled upstream connections)",
        f"proxy in flight (/health): start {start.in_flight}, end {end.in_flight}",
    ]
    lines += [f"  lost: {item}" for item in tally.lost[:20]]
    if len(tally.lost) > 20:
        lines.append(f"  ... and {len(tally.lost) - 20} more")
    lines.append("result: " + ("FAILED" if report.failed else "ok, every request ended properly"))
    return "\n".join(lines)


def soak_json(report: SoakReport) -> dict:
    return {
        "settings": report.settings,
        "warmup": report.warmup,
        "requests": report.requests,
        "seconds": report.seconds,
        "outcomes": dict(report.tally.outcomes),
        "lost": report.tally.lost,
        "rss_growth_mb": report.growth_mb,
        "start": asdict(report.start),
        "end": asdict(report.end),
        "faults": report.faults,
    }


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

DEFAULT_REQUESTS = 300
QUICK_REQUESTS = 100
DEFAULT_ROUNDS = 3
QUICK_ROUNDS = 2
QUICK_SECONDS = 22  # what `--quick` took on a quiet 2-core machine (26 s with other loads); --help says it
COMPARE_CONCURRENCY = 32
COMPARE_PATHS = ("pass-through", "openai")
DEFAULT_SOAK_REQUESTS = 20_000
QUICK_SOAK_REQUESTS = 2_000


def comma_list(text: str, flag: str, parser: argparse.ArgumentParser) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        parser.error(f"{flag}: expected a comma-separated list, got '{text}'")
    return items


def name_value(text: str, flag: str, parser: argparse.ArgumentParser) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        parser.error(f"{flag}: expected NAME=VALUE, got '{text}'")
    return name.strip(), value.strip()


def is_loopback_url(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(parts.hostname).is_loopback
    return False


def parse_peers(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--peer NAME=URL and --peer-pid NAME=PID into args.peers {name: url} and args.peer_pids {name: pid}."""
    args.peers = {}
    for text in args.peer:
        name, url = name_value(text, "--peer", parser)
        if name in PATH_NAMES or name in args.peers:
            parser.error(f"--peer: the name '{name}' is taken")
        if not is_loopback_url(url):
            parser.error(f"--peer {name}: '{url}' is not an http:// URL on a loopback address")
        args.peers[name] = url.rstrip("/")
    args.peer_pids = {}
    for text in args.peer_pid:
        name, pid = name_value(text, "--peer-pid", parser)
        if name not in args.peers:
            parser.error(f"--peer-pid: no --peer named '{name}'")
        if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
            parser.error(f"--peer-pid {name}: no process {pid}")
        args.peer_pids[name] = int(pid)


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    try:
        args.concurrency = tuple(int(c) for c in (args.concurrency or ("1" if args.sizes else "1,32")).split(","))
    except ValueError:
        parser.error(f"--concurrency: expected comma-separated integers, got '{args.concurrency}'")
    if args.paths is not None:
        args.paths = comma_list(args.paths, "--paths", parser)
        unknown = [name for name in args.paths if name not in PATH_NAMES]
        if unknown:
            parser.error(f"--paths: unknown {', '.join(unknown)} (known: {', '.join(PATH_NAMES)})")
    numbers = [("--rounds", args.rounds), ("--requests", args.requests), ("--chunks", args.chunks)]
    numbers += [("--soak-requests", args.soak_requests), ("--soak-concurrency", args.soak_concurrency)]
    for flag, value in [*numbers, *(("--concurrency", c) for c in args.concurrency)]:
        if value is not None and value < 1:
            parser.error(f"{flag}: must be at least 1, got {value}")
    if args.upstream_port is not None and not 0 < args.upstream_port < 65536:
        parser.error(f"--upstream-port: not a port: {args.upstream_port}")
    parse_peers(args, parser)
    if args.peers and (args.soak or args.workers_compare):
        parser.error("--peer applies to the default run and --sizes only")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark terraphim-proxy (pass-through and translation to OpenAI, Ollama and Gemini) "
        "against a zero-delay upstream stand-in on 127.0.0.1."
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"a short development run (about {QUICK_SECONDS} s on 2 cores)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        metavar="N",
        help=f"rounds per case; medians are reported (default {DEFAULT_ROUNDS}, quick {QUICK_ROUNDS})",
    )
    parser.add_argument(
        "--requests",
        type=int,
        metavar="N",
        help=f"requests per path, case and round (default {DEFAULT_REQUESTS}, quick {QUICK_REQUESTS})",
    )
    parser.add_argument(
        "--concurrency",
        help="comma-separated concurrency levels (default 1,32; --sizes: 1)",
        metavar="LIST",
    )
    parser.add_argument(
        "--chunks", type=int, metavar="N", default=20, help="text deltas per streamed answer (default 20)"
    )
    parser.add_argument(
        "--paths",
        metavar="LIST",
        help=f"comma-separated paths to measure, the first is the baseline of the ratios (default: all of "
        f"{','.join(PATH_NAMES)}; --workers-compare: {','.join(COMPARE_PATHS)}; --soak: {','.join(SOAK_PATHS)})",
    )
    parser.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="also measure another proxy you started on 127.0.0.1 and pointed at the stand-in (POST URL/v1/messages)",
    )
    parser.add_argument(
        "--peer-pid", action="append", default=[], metavar="NAME=PID", help="report CPU and RSS of a peer's process"
    )
    parser.add_argument(
        "--upstream-port", type=int, metavar="PORT", help="the stand-in's port (default: a free one), to set up peers"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--workers-compare",
        action="store_true",
        help=f"instead: the proxy with --workers 1 and --workers 2 on the Claude Code cases at c{COMPARE_CONCURRENCY}",
    )
    mode.add_argument("--soak", action="store_true", help="instead: a soak against a failing stand-in; leak checks")
    mode.add_argument(
        "--usage-compare",
        action="store_true",
        help="instead: the proxy with its usage database off and on, side by side; then every request's row counted",
    )
    mode.add_argument(
        "--redis-compare",
        action="store_true",
        help="instead: the proxy with its limits in the process and shared through a local redis-server",
    )
    mode.add_argument(
        "--sizes",
        action="store_true",
        help=f"instead: added c1 p50 and proxy CPU per request for conversations of {', '.join(SIZES)} bytes, "
        f"warm and cold (default paths {','.join(SIZE_PATHS)}, and any --peer)",
    )
    parser.add_argument(
        "--soak-requests",
        type=int,
        metavar="N",
        help=f"soak requests after the warm-up (default {DEFAULT_SOAK_REQUESTS}, quick {QUICK_SOAK_REQUESTS})",
    )
    parser.add_argument("--soak-concurrency", type=int, metavar="N", default=200, help="soak concurrency (default 200)")
    parser.add_argument(
        "--soak-seed", type=int, metavar="N", default=1, help="seed of the soak's faults and mix (default 1)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--faults", type=int, metavar="SEED", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_args(args, parser)
    return args


# ---------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------


def base_settings(args: argparse.Namespace, rounds: int, requests: int) -> dict:
    return {
        "rounds": rounds,
        "requests": requests,
        "chunks": args.chunks,
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "cpus": os.cpu_count(),
    }


def settings_line(title: str, settings: dict) -> str:
    return (
        f"{title}: {settings['rounds']} rounds, requests per measurement {settings['requests']}, "
        f"{settings['chunks']} stream chunks, Python {settings['python']}, aiohttp {settings['aiohttp']}, "
        f"{settings['cpus']} CPUs"
    )


def report_failures(results: Results, children: list[Child]) -> int:
    errors = sum(m.errors for per_path in results.values() for ms in per_path.values() for m in ms)
    if errors:
        tails = "\n".join(f"{child.name} output:\n{child.output_tail()}" for child in children)
        print(f"{errors} failed requests\n{tails}", file=sys.stderr)
    return errors


def bench_paths(
    names: list[str],
    upstream_url: str,
    proxy: tuple[Child, str] | None,
    peers: dict[str, str],
    peer_pids: dict[str, int],
) -> list[BenchPath]:
    """The measured paths, in the order named; the first is the baseline of every ratio."""
    paths = []
    for name in names:
        if name == "direct":
            paths.append(BenchPath(name, upstream_url))
        elif name == INBOUND_RESPONSES and proxy is not None:
            paths.append(BenchPath(name, proxy[1], proxy[0].pid, dialect="responses"))
        elif proxy is not None:
            paths.append(BenchPath(name, proxy[1], proxy[0].pid, model=ROUTES[name].request_model))
    paths += [BenchPath(name, url, peer_pids.get(name)) for name, url in peers.items()]
    return [replace(path, baseline=paths[0].name if i else None) for i, path in enumerate(paths)]


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2) + "\n")
        print(f"results written to {path}")


def run_sizes(args: argparse.Namespace) -> tuple[int, int]:
    """Rounds, and requests per measurement."""
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    return rounds, args.requests or (QUICK_REQUESTS if args.quick else DEFAULT_REQUESTS)


def run_bench(args: argparse.Namespace) -> int:
    rounds, requests = run_sizes(args)
    names = args.paths or list(PATH_NAMES)
    cases, bodies = all_cases(args.concurrency), BODIES
    if args.sizes:
        names = args.paths or list(SIZE_PATHS)
        requests = args.requests or (QUICK_SIZE_REQUESTS if args.quick else SIZE_REQUESTS)
        bodies = size_bodies()
        cases = [Case(name, False, c) for name in bodies for c in args.concurrency]
    if args.peers and not args.upstream_port:
        print("note: --peer without --upstream-port: the stand-in's port is new each run", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="terraphim-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        upstream, upstream_url = start_standin(stack, workdir, args.chunks, args.upstream_port)
        proxy = start_proxy(stack, workdir, "proxy", upstream_url) if set(names) & set(ROUTES) else None
        paths = bench_paths(names, upstream_url, proxy, args.peers, args.peer_pids)
        results, sent = run_event_loop(measure_all(paths, cases, rounds, requests, bodies))
        measured = [(proxy[0].name, proxy[0].pid)] if proxy else []
        measured += [(f"peer {name}", pid) for name, pid in args.peer_pids.items()]
        processes = {name: process_report(name, pid, paths, sent) for name, pid in measured}
        errors = report_failures(results, [upstream, *([proxy[0]] if proxy else [])])
    settings = {**base_settings(args, rounds, requests), "upstream": upstream_url}
    print()
    print(settings_line("terraphim-proxy bench", settings))
    print(f"Upstream stand-in {upstream_url}. Medians over rounds. p50/p99 = time to last byte; ttfb = time to")
    print(f"first byte (streams); ms. Ratios and added ms against {paths[0].name}.")
    print(format_table(paths, results))
    for report in processes.values():
        print(process_line(report))
    write_json(args.json, results_json(settings, paths, results, processes))
    return 1 if errors else 0


def compare_paths(routes: list[str], proxies: list[tuple[Child, str]], labels: tuple[str, str]) -> list[BenchPath]:
    """For each route, one path per proxy ("<route> <label>"); the second compares with the first."""
    paths = []
    for route in routes:
        for label, (child, url) in zip(labels, proxies, strict=True):
            baseline = f"{route} {labels[0]}" if label != labels[0] else None
            paths.append(BenchPath(f"{route} {label}", url, child.pid, ROUTES[route].request_model, baseline))
    return paths


def run_workers_compare(args: argparse.Namespace) -> int:
    rounds, requests = run_sizes(args)
    routes = [name for name in args.paths or COMPARE_PATHS if name in ROUTES]
    if not routes:
        raise RuntimeError(f"--workers-compare needs a proxy path in --paths (one of {', '.join(ROUTES)})")
    cases = [Case(body, stream, COMPARE_CONCURRENCY) for body in CLAUDE_CODE_BODIES for stream in (False, True)]
    with tempfile.TemporaryDirectory(prefix="terraphim-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        upstream, upstream_url = start_standin(stack, workdir, args.chunks, args.upstream_port)
        proxies = [start_proxy(stack, workdir, f"workers{n}", upstream_url, workers=n) for n in (1, 2)]
        paths = compare_paths(routes, proxies, ("w1", "w2"))
        results, sent = run_event_loop(measure_all(paths, cases, rounds, requests))
        processes = {child.name: process_report(child.name, child.pid, paths, sent) for child, _ in proxies}
        errors = report_failures(results, [upstream, *(child for child, _ in proxies)])
    settings = {**base_settings(args, rounds, requests), "upstream": upstream_url, "mode": "workers-compare"}
    print()
    print(settings_line("terraphim-proxy --workers 1 vs --workers 2", settings))
    print("Medians over rounds; ms. Ratio rows (and added ms) = workers 2 / workers 1: req/s ratio > 1 is a gain.")
    print("cpu ms/req and RSS are summed over the worker processes.")
    print(format_table(paths, results))
    for report in processes.values():
        print(process_line(report))
    write_json(args.json, results_json(settings, paths, results, processes))
    return 1 if errors else 0


USAGE_COMPARE_PATHS = ("pass-through", "openai")


def run_usage_compare(args: argparse.Namespace) -> int:
    """The proxy with its usage database off and on, side by side, then every request's row counted."""
    rounds, requests = run_sizes(args)
    routes = [name for name in args.paths or USAGE_COMPARE_PATHS if name in ROUTES]
    cases = [
        Case(body, stream, c) for body in ("small", "cc-warm") for stream in (False, True) for c in args.concurrency
    ]
    with tempfile.TemporaryDirectory(prefix="terraphim-bench-") as tmp:
        workdir = Path(tmp)
        database = workdir / "usage.db"
        with contextlib.ExitStack() as stack:
            upstream, upstream_url = start_standin(stack, workdir, args.chunks, args.upstream_port)
            proxies = [
                start_proxy(stack, workdir, "usage-off", upstream_url),
                start_proxy(stack, workdir, "usage-on", upstream_url, settings={"usage_db": str(database)}),
            ]
            paths = compare_paths(routes, proxies, ("off", "on"))
            results, sent = run_event_loop(measure_all(paths, cases, rounds, requests))
            processes = {child.name: process_report(child.name, child.pid, paths, sent) for child, _ in proxies}
            errors = report_failures(results, [upstream, *(child for child, _ in proxies)])
        # The proxies have stopped: the store has written every row it had queued.
        with contextlib.closing(sqlite3.connect(database)) as connection:
            rows = connection.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
    expected = sum(count for name, count in sent.items() if name.endswith(" on"))
    settings = {**base_settings(args, rounds, requests), "upstream": upstream_url, "mode": "usage-compare"}
    print()
    print(settings_line("terraphim-proxy usage database off vs on", settings))
    print("Medians over rounds; ms. Ratio rows (and added ms) = on / off.")
    print(format_table(paths, results))
    for report in processes.values():
        print(process_line(report))
    print(f"usage rows written: {rows} of {expected} requests sent to the proxy with the database on")
    write_json(args.json, {**results_json(settings, paths, results, processes), "usage_rows": rows, "sent": expected})
    return 1 if errors or rows != expected else 0


REDIS_COMPARE_PATHS = ("pass-through", "openai")
# Limits that every request checks and records, high enough never to refuse one: what a team's proxy runs with.
SHARED_LIMITS = {"rate_limit_rpm": 1_000_000_000, "rate_limit_tpm": 1_000_000_000_000}


def redis_command(port: int, *words: str) -> bytes:
    """One command to a Redis on this host, its whole reply's bytes (enough for PING and INFO)."""
    request = f"*{len(words)}\r\n" + "".join(f"${len(word)}\r\n{word}\r\n" for word in words)
    with socket.create_connection((HOST, port), timeout=1) as sock:
        sock.sendall(request.encode())
        reply = sock.recv(1 << 16)
    return reply


def start_redis(stack: contextlib.ExitStack, workdir: Path) -> int:
    """A redis-server (the Debian package) on a free port, keeping nothing on disk; its port once it answers."""
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
    try:
        child = stack.enter_context(running_child("redis", argv, workdir))
    except FileNotFoundError:
        raise RuntimeError("--redis-compare needs redis-server (apt-get install redis-server)") from None
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if redis_command(port, "PING").startswith(b"+PONG"):
                return port
        if child.process.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"redis-server did not start:\n{child.output_tail()}")


def redis_calls(port: int) -> int:
    """How many scripts Redis has run: each request checks once, and records once."""
    stats = redis_command(port, "INFO", "commandstats").decode()
    return sum(int(line.split("calls=")[1].split(",")[0]) for line in stats.splitlines() if "cmdstat_evalsha" in line)


def run_redis_compare(args: argparse.Namespace) -> int:
    """The proxy with its limits in the process and shared through Redis, side by side, with the same limits."""
    rounds, requests = run_sizes(args)
    routes = [name for name in args.paths or REDIS_COMPARE_PATHS if name in ROUTES]
    cases = [
        Case(body, stream, c) for body in ("small", "cc-warm") for stream in (False, True) for c in args.concurrency
    ]
    with tempfile.TemporaryDirectory(prefix="terraphim-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        redis_port = start_redis(stack, workdir)
        upstream, upstream_url = start_standin(stack, workdir, args.chunks, args.upstream_port)
        cluster = {"redis_url": f"redis://{HOST}:{redis_port}/0"}
        proxies = [
            start_proxy(stack, workdir, "redis-off", upstream_url, settings=SHARED_LIMITS),
            start_proxy(stack, workdir, "redis-on", upstream_url, settings=SHARED_LIMITS, cluster=cluster),
        ]
        paths = compare_paths(routes, proxies, ("off", "on"))
        results, sent = run_event_loop(measure_all(paths, cases, rounds, requests))
        processes = {child.name: process_report(child.name, child.pid, paths, sent) for child, _ in proxies}
        errors = report_failures(results, [upstream, *(child for child, _ in proxies)])
        calls = redis_calls(redis_port)
    expected = sum(count for name, count in sent.items() if name.endswith(" on"))
    settings = {**base_settings(args, rounds, requests), "upstream": upstream_url, "mode": "redis-compare"}
    print()
    print(settings_line("terraphim-proxy limits in the process vs shared through Redis", settings))
    print(f"Both with {', '.join(f'{k} = {v}' for k, v in SHARED_LIMITS.items())}; medians over rounds; ms.")
    print("Ratio rows (and added ms) = on / off.")
    print(format_table(paths, results))
    for report in processes.values():
        print(process_line(report))
    print(
        f"redis scripts run: {calls} for {expected} requests (one check each; what a request spent rides with the next)"
    )
    write_json(args.json, {**results_json(settings, paths, results, processes), "redis_calls": calls})
    return 1 if errors or calls < expected else 0


def run_soak(args: argparse.Namespace) -> int:
    args.soak_requests = args.soak_requests or (QUICK_SOAK_REQUESTS if args.quick else DEFAULT_SOAK_REQUESTS)
    routes = [name for name in args.paths or SOAK_PATHS if name in ROUTES]
    if not routes:
        raise RuntimeError(f"--soak needs a proxy path in --paths (one of {', '.join(ROUTES)})")
    settings = {
        "requests": args.soak_requests,
        "concurrency": args.soak_concurrency,
        "seed": args.soak_seed,
        "paths": routes,
        "bodies": list(SOAK_BODIES),
        "proxy": SOAK_PROXY_SETTINGS,
    }
    with tempfile.TemporaryDirectory(prefix="terraphim-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        _, upstream_url = start_standin(stack, workdir, args.chunks, args.upstream_port, fault_seed=args.soak_seed)
        proxy, proxy_url = start_proxy(stack, workdir, "proxy", upstream_url, settings=SOAK_PROXY_SETTINGS)
        paths = [BenchPath(name, proxy_url, proxy.pid, ROUTES[name].request_model) for name in routes]
        report = run_event_loop(soak(paths, proxy, proxy_url, upstream_url, args, settings))
        if report.failed:
            print(f"proxy output:\n{proxy.output_tail()}", file=sys.stderr)
    print_soak_header(report)
    print(format_soak(report))
    write_json(args.json, soak_json(report))
    return 1 if report.failed else 0


def print_soak_header(report: SoakReport) -> None:
    s = report.settings
    rate = report.requests / report.seconds if report.seconds else 0.0
    print()
    print(
        f"terraphim-proxy soak: {report.warmup} warm-up + {s['requests']} requests at concurrency {s['concurrency']} "
        f"over {', '.join(s['paths'])}; json and stream; bodies {', '.join(s['bodies'])}"
    )
    print(
        f"stand-in faults (seed {s['seed']}): {FAULT_ERROR_RATE:.0%} HTTP 500/529, {FAULT_CUT_RATE:.0%} answer cut "
        f"half-way, {FAULT_SLOW_RATE:.0%} first byte after {SLOW_FIRST_BYTE_S * 1000:.0f} ms; proxy "
        + ", ".join(f"{key} = {value}" for key, value in s["proxy"].items())
    )
    print(f"soak: {report.seconds:.1f} s, {rate:.0f} req/s")


def interrupt(signum: int, frame: Any) -> None:
    """SIGTERM unwinds like Ctrl-C, so the child processes are stopped on the way out."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_upstream is not None:
        run_event_loop(serve_standin(args.serve_upstream, args.chunks, args.faults))
        return 0
    signal.signal(signal.SIGTERM, interrupt)
    modes = {
        "soak": run_soak,
        "workers_compare": run_workers_compare,
        "usage_compare": run_usage_compare,
        "redis_compare": run_redis_compare,
    }
    mode = next((run for flag, run in modes.items() if getattr(args, flag)), run_bench)
    try:
        return mode(args)
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
