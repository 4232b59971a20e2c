"""Upstream stand-ins shared by test_proxy.py and bench.py: real aiohttp servers on 127.0.0.1 that record every
request and answer it in an upstream API's wire format, from a per-test script."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import itertools
import json
import os
import re
import secrets
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

# The proxy records usage in the user's state directory by default: the tests' proxies use a directory of
# their own (a test that checks the database sets proxy.usage_db itself).
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="terraphim-test-state-")

# ---------------------------------------------------------------------------
# Scaffolding: a real server on 127.0.0.1 that records every request
# ---------------------------------------------------------------------------


def wire_format_of(path: str) -> str:
    """Which upstream API a request path belongs to: anthropic, openai, responses, ollama or gemini."""
    if path.endswith("/chat/completions"):
        return "openai"
    if path.endswith("/responses"):
        return "responses"
    if path.endswith("/api/chat"):
        return "ollama"
    if ":generateContent" in path or ":streamGenerateContent" in path:
        return "gemini"
    return "anthropic"


@dataclass
class Received:
    """One request a stand-in got, read in whichever of the four wire formats it came."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any  # the JSON body; None when there was none or it was not JSON
    at: float = field(default_factory=time.monotonic)  # arrival
    raw: bytes = b""  # the body's bytes as they arrived

    @property
    def kind(self) -> str:
        return wire_format_of(self.path)

    @property
    def model(self) -> str:
        if self.kind == "gemini":
            return self.path.rsplit("/", 1)[-1].split(":", 1)[0]
        return self.body.get("model", "") if isinstance(self.body, dict) else ""

    @property
    def stream(self) -> bool:
        if self.kind == "gemini":
            return "streamGenerateContent" in self.path
        return isinstance(self.body, dict) and self.body.get("stream") is True

    @property
    def key(self) -> str:
        """The provider key the proxy sent, whatever header the format uses."""
        if "x-api-key" in self.headers:
            return self.headers["x-api-key"]
        if "x-goog-api-key" in self.headers:
            return self.headers["x-goog-api-key"]
        return self.headers.get("authorization", "").removeprefix("Bearer ")


async def serve_app(
    app: web.Application, port: int = 0, backlog: int = 128, tls: ssl.SSLContext | None = None, **options: Any
) -> tuple[web.AppRunner, str]:
    """Serve `app` on 127.0.0.1 (on a free port unless told one; over TLS with `tls`); returns its runner (to
    clean up) and base URL."""
    runner = web.AppRunner(app, **options)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=backlog, ssl_context=tls).start()
    return runner, f"{'https' if tls else 'http'}://127.0.0.1:{runner.addresses[0][1]}"


Script = Callable[["StandInServer", Received, web.Request], Awaitable[web.StreamResponse]]


class StandInServer:
    """Records every request in `received` and the proxy-side port it came from in `ports`, then answers with the
    test's `script` when one is set, else as its wire format does (`handle`). A connection the proxy drops cancels
    the handler: that sets `gone` (at `gone_at`), which is how tests see that the proxy closed an upstream request.
    With `record` off (bench.py's long runs) it keeps nothing of the requests.
    """

    def __init__(self, script: Script | None = None, *, record: bool = True, tls: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.record = record
        self.tls = tls
        self.received: list[Received] = []
        self.ports: list[int] = []
        self.release = asyncio.Event()  # lets a held answer go on
        self.held = asyncio.Event()  # an answer reached its hold point
        self.arrived = asyncio.Event()  # set by every request
        self.gone = asyncio.Event()  # the proxy dropped a connection while the stand-in was serving it
        self.gone_at = 0.0
        self.fault_at = 0.0  # when a script broke an answer on purpose
        self.runner: web.AppRunner | None = None
        self.url = ""

    @property
    def last(self) -> Received:
        assert self.received, "the stand-in received no request"
        return self.received[-1]

    def models(self) -> list[str]:
        return [received.model for received in self.received]

    async def start(self, port: int = 0, backlog: int = 128) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        # handler_cancellation: a connection the proxy drops cancels the handler (the stand-ins notice it)
        options = {"handler_cancellation": True, "access_log": None, "shutdown_timeout": 0.2}
        self.runner, self.url = await serve_app(app, port, backlog, self.tls, **options)

    async def stop(self) -> None:
        self.release.set()
        if self.runner:
            await self.runner.cleanup()

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        headers = {key.lower(): value for key, value in request.headers.items()}
        received = Received(request.method, request.path, dict(request.query), headers, body, raw=raw)
        if self.record:
            self.received.append(received)
            assert request.transport is not None
            self.ports.append(request.transport.get_extra_info("peername")[1])
        self.arrived.set()
        try:
            if self.script is not None:
                return await self.script(self, received, request)
            return await self.handle(request, received)
        except (asyncio.CancelledError, ConnectionResetError):
            self.gone_at = time.monotonic()
            self.gone.set()
            raise

    async def handle(self, request: web.Request, received: Received) -> web.StreamResponse:
        raise NotImplementedError

    async def write_parts(
        self,
        request: web.Request,
        content_type: str,
        parts: list[bytes],
        *,
        hold_at: int | None = None,
        then: str = "eof",
        status: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> web.StreamResponse:
        """Stream `parts`, one write each; before part `hold_at` (which may be the end) set `held` and wait for
        `release`; then end ("eof"), close the connection without ending the body ("cut"), or stay silent ("hang")."""
        response = web.StreamResponse(status=status, headers={"content-type": content_type, **(headers or {})})
        await response.prepare(request)
        for index in range(len(parts) + 1):
            if index == hold_at:
                self.held.set()
                await self.release.wait()
            if index < len(parts):
                await response.write(parts[index])  # aiohttp sets TCP_NODELAY: each write leaves as its own segment
        self.fault_at = time.monotonic()  # a "cut" or a "hang" starts now
        if then == "cut":
            assert request.transport is not None
            request.transport.close()
            await until_cancelled()
        if then == "hang":
            await until_cancelled()
        await response.write_eof()
        return response


async def until_cancelled() -> None:
    """Wait until cancelled (a stand-in's handler is cancelled when the proxy drops the connection)."""
    await asyncio.Event().wait()


SSE_HEADERS = {"cache-control": "no-cache"}
SSE_TYPE = "text/event-stream; charset=utf-8"


Server = TypeVar("Server", bound=StandInServer)


@contextlib.asynccontextmanager
async def running(server: Server) -> AsyncIterator[Server]:
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# ---------------------------------------------------------------------------
# Anthropic Messages
# ---------------------------------------------------------------------------


def sse(event: str, **fields: Any) -> bytes:
    """One SSE frame as Anthropic frames it: the event name, and data whose type repeats it."""
    return f"event: {event}\ndata: {json.dumps({'type': event, **fields})}\n\n".encode()


def sse_data(payload: Any) -> bytes:
    """One `data:` frame (OpenAI, Gemini); bytes are sent as they are, anything else as JSON."""
    return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"


def pieces(text: str, size: int = 10) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def anthropic_message(
    model: str, content: list[dict], stop_reason: str | None = "end_turn", output_tokens: int = 7
) -> dict:
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
    model: str,
    content: list[dict],
    stop_reason: str = "end_turn",
    *,
    finish: bool = True,
    size: int = 10,
    usage: dict | None = None,
) -> list[bytes]:
    """The SSE frames of a streamed message; finish=False cuts the stream before message_delta. `usage`: what
    message_start and message_delta report (output tokens at the end), instead of the stand-in's figures."""
    start = anthropic_message(model, [], None, output_tokens=1)
    if usage is not None:
        start["usage"] = {**usage, "output_tokens": 1}
    frames = [sse("message_start", message=start), sse("ping")]
    for index, block in enumerate(content):
        opening, deltas = block_events(block, size)
        frames.append(sse("content_block_start", index=index, content_block=opening))
        frames += [sse("content_block_delta", index=index, delta=delta) for delta in deltas]
        frames.append(sse("content_block_stop", index=index))
    if finish:
        stop = {"stop_reason": stop_reason, "stop_sequence": None}
        output = {"output_tokens": 9 if usage is None else usage["output_tokens"]}
        frames += [sse("message_delta", delta=stop, usage=output), sse("message_stop")]
    return frames


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


def answer_message(received: Received, content: list[dict], stop_reason: str = "end_turn") -> Reply:
    """Answer a Messages request as Anthropic would: streamed when it asked for a stream."""
    model = received.body["model"]
    if received.body.get("stream"):
        return Reply(frames=stream_frames(model, content, stop_reason))
    return Reply(json=anthropic_message(model, content, stop_reason))


STANDIN_COUNT = 4242
STANDIN_TEXT = "Hello from the stand-in."


def default_answer(received: Received) -> Reply:
    if received.method == "POST" and received.path == "/v1/messages/count_tokens":
        return Reply(json={"input_tokens": STANDIN_COUNT})
    if received.method == "POST" and received.path == "/v1/messages":
        return answer_message(received, [{"type": "text", "text": STANDIN_TEXT}])
    return anthropic_error(404, "not_found_error", f"no route {received.method} {received.path}")


class StandIn(StandInServer):
    """A local Anthropic Messages API that answers from a script."""

    def __init__(self) -> None:
        super().__init__()
        self.answer: Callable[[Received], Reply] = default_answer

    def reply_with(self, reply: Reply) -> None:
        self.answer = lambda received: reply

    async def handle(self, request: web.Request, received: Received) -> web.StreamResponse:
        reply = self.answer(received)
        headers = {"request-id": f"req_standin_{len(self.received):04d}", **reply.headers}
        if reply.frames:
            sse_headers = {**SSE_HEADERS, **headers}
            return await self.write_parts(
                request, SSE_TYPE, reply.frames, hold_at=reply.hold_at, status=reply.status, headers=sse_headers
            )
        if reply.raw is not None:
            return web.Response(status=reply.status, body=reply.raw, content_type=reply.content_type, headers=headers)
        return web.json_response(reply.json, status=reply.status, headers=headers)


# ---------------------------------------------------------------------------
# OpenAI chat completions
# ---------------------------------------------------------------------------


def openai_chunk(delta: dict | None = None, finish: str | None = None, *, usage: dict | None = None) -> dict:
    """One chat.completion.chunk; without delta and finish it is the usage-only chunk (choices: [])."""
    choices = []
    if delta is not None or finish is not None:
        choices = [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}]
    return {
        "id": "chatcmpl-standin",
        "object": "chat.completion.chunk",
        "created": OPENAI_CREATED,
        "system_fingerprint": "fp_standin",
        "choices": choices,
        "usage": usage,
    }


def openai_call(index: int, call_id: str | None = None, name: str | None = None, args: str | None = None) -> dict:
    """One delta.tool_calls entry; only the first fragment of a call carries id, type and name."""
    fragment: dict = {"index": index, "function": {}}
    if call_id:
        fragment.update(id=call_id, type="function")
    if name:
        fragment["function"]["name"] = name
    if args is not None:
        fragment["function"]["arguments"] = args
    return fragment


def openai_tools_delta(*calls: dict) -> dict:
    return {"tool_calls": list(calls)}


def openai_completion(message: dict, finish: str | None = "stop", usage: dict | None = None) -> dict:
    return {
        "id": "chatcmpl-standin",
        "object": "chat.completion",
        "created": OPENAI_CREATED,
        "system_fingerprint": "fp_standin",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "refusal": None, **message},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": usage,
    }


def openai_fold(chunks: list[dict]) -> dict:
    """The non-streaming completion equivalent to a well-formed chunk stream (calls keyed by index)."""
    message: dict = {}
    calls: dict[int, dict] = {}
    finish, usage = None, None
    for chunk in chunks:
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            finish = choice.get("finish_reason") or finish
            for key, value in choice["delta"].items():
                if key in ("content", "reasoning_content", "reasoning", "refusal") and value:
                    message[key] = message.get(key, "") + value
            for fragment in choice["delta"].get("tool_calls") or []:
                call = calls.setdefault(fragment["index"], {"type": "function", "function": {"arguments": ""}})
                if fragment.get("id"):
                    call["id"] = fragment["id"]
                function = fragment.get("function") or {}
                if function.get("name"):
                    call["function"]["name"] = function["name"]
                call["function"]["arguments"] += function.get("arguments") or ""
    if calls:
        message["tool_calls"] = [calls[index] for index in sorted(calls)]
    return openai_completion(message, finish, usage)


def openai_text_chunks(text: str, usage: dict | None = None) -> list[dict]:
    return [
        openai_chunk({"role": "assistant", "content": "", "refusal": None}),
        openai_chunk({"content": text}),
        openai_chunk({}, "stop"),
        openai_chunk(usage=usage or {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}),
    ]


def openai_frame(chunk: dict | str, model: str, newline: str = "\n", prefix: str = "data: ") -> bytes:
    """One SSE frame as the API writes it (model filled in from the request)."""
    data = chunk if isinstance(chunk, str) else json.dumps({**chunk, "model": model}, ensure_ascii=False)
    return f"{prefix}{data}{newline}{newline}".encode()


def openai_sse(chunks: list[dict], model: str, done: bool = True, newline: str = "\n", prefix: str = "data: ") -> list:
    frames = [openai_frame(chunk, model, newline, prefix) for chunk in chunks]
    return frames + ([openai_frame("[DONE]", model, newline, prefix)] if done else [])


def openai_error_body(message: str, error_type: str, code: str | int | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


@dataclass
class OpenAIReply:
    """One scripted answer: a JSON body, chunks sent as SSE, or raw bytes (one write per item)."""

    status: int = 200
    json: Any = None
    chunks: list[dict] | None = None
    done: bool = True  # end the chunk stream with `data: [DONE]`
    raw: list[bytes] | None = None
    hold_at: int | None = None  # wait for `release` before write number hold_at
    headers: dict[str, str] = field(default_factory=dict)


def openai_reply_for(received: Received, chunks: list[dict]) -> OpenAIReply:
    """Answer as the API would: the chunks when the request streams, else the equivalent completion."""
    if received.body.get("stream"):
        return OpenAIReply(chunks=chunks)
    return OpenAIReply(json=openai_fold(chunks))


def openai_error(status: int, message: str, error_type: str, code: Any = None, **headers: str) -> OpenAIReply:
    return OpenAIReply(status, openai_error_body(message, error_type, code), headers=headers)


def openai_answer_text(text: str) -> Callable[[Received], OpenAIReply]:
    return lambda received: openai_reply_for(received, openai_text_chunks(text))


class OpenAIStandIn(StandInServer):
    """A local chat-completions API that answers from a script; its `POST /v1/messages` answers a plain Anthropic
    message, where a conversation moves from an OpenAI-family provider to Anthropic."""

    def __init__(self) -> None:
        super().__init__()
        self.answer: Callable[[Received], OpenAIReply] = openai_answer_text("ok")

    def reply_with(self, reply: OpenAIReply) -> None:
        self.answer = lambda received: reply

    @property
    def chat(self) -> list[Received]:
        return [r for r in self.received if r.path == "/chat/completions"]

    @property
    def last(self) -> Received:
        assert self.chat, "the stand-in received no chat completion request"
        return self.chat[-1]

    async def handle(self, request: web.Request, received: Received) -> web.StreamResponse:
        if (request.method, request.path) == ("POST", "/v1/messages"):
            text = [{"type": "text", "text": "anthropic here"}]
            return web.json_response(anthropic_message(received.body.get("model", ""), text, output_tokens=2))
        if (request.method, request.path) != ("POST", "/chat/completions"):
            body = openai_error_body(f"Unknown request URL: {request.method} {request.path}", "invalid_request_error")
            return web.json_response(body, status=404)
        reply = self.answer(received)
        out_headers = {"x-request-id": f"req_standin_{len(self.received)}", **reply.headers}
        if reply.chunks is None and reply.raw is None:
            data = reply.json
            if reply.status == 200:
                data = {**data, "model": received.body["model"]}
            return web.json_response(data, status=reply.status, headers=out_headers)
        writes = (
            reply.raw if reply.raw is not None else openai_sse(reply.chunks or [], received.body["model"], reply.done)
        )
        sse_headers = {**SSE_HEADERS, **out_headers}
        return await self.write_parts(
            request, SSE_TYPE, writes, hold_at=reply.hold_at, status=reply.status, headers=sse_headers
        )


OPENAI_CREATED = 1_700_000_000


# ---------------------------------------------------------------------------
# Ollama /api/chat and Gemini generateContent
# ---------------------------------------------------------------------------


GEMINI_KEY = "AIzaSy-terraphim-test-key"
OLLAMA_MODEL = "qwen3:8b"
GEMINI_MODEL = "gemini-2.5-pro"
GEMINI3_MODEL = "gemini-3-pro-preview"  # its stand-in insists on thought signatures, as Gemini 3 does
OLLAMA_KNOWN_MODELS = frozenset({OLLAMA_MODEL})
GEMINI_FLASH_MODEL = "gemini-2.5-flash"
GEMINI_LITE_MODEL = "gemini-2.5-flash-lite"
GEMINI2_MODEL = "gemini-2.0-flash"  # takes only the `parameters` subset
GEMINI_KNOWN_MODELS = frozenset({GEMINI_MODEL, GEMINI3_MODEL, GEMINI_FLASH_MODEL, GEMINI_LITE_MODEL, GEMINI2_MODEL})
GEMINI_THINKING_RANGES = {GEMINI_MODEL: (128, 32768), GEMINI_FLASH_MODEL: (0, 24576), GEMINI_LITE_MODEL: (512, 24576)}
PIECE_SIZE = 8  # characters of text per streamed line or frame


@dataclass(frozen=True)
class ScriptedCall:
    name: str
    args: dict
    call_id: str = ""  # Gemini functionCall.id (Gemini 3 sends one; Ollama never does)
    signature: str = ""  # Gemini thoughtSignature on this part


@dataclass(frozen=True)
class ScriptedUsage:
    prompt: int = 812
    output: int = 57
    cached: int = 0
    thoughts: int = 0
    tool_prompt: int = 0


@dataclass(frozen=True)
class ScriptedTurn:
    text: str = ""
    thinking: str = ""
    calls: tuple[ScriptedCall, ...] = ()
    finish: str = "stop"  # "stop" or "length", else a raw Gemini finishReason
    text_signature: str = ""  # Gemini thoughtSignature on the first text part
    blocked: str = ""  # Gemini promptFeedback.blockReason: no candidates at all
    usage: ScriptedUsage = field(default_factory=ScriptedUsage)


def ollama_gemini_json(data: Any, indent: int | None = None) -> bytes:
    """UTF-8 JSON as both servers send it (raw non-ASCII characters, not \\u escapes)."""
    return json.dumps(data, ensure_ascii=False, indent=indent).encode()


OLLAMA_JSON = "application/json; charset=utf-8"
OLLAMA_NDJSON = "application/x-ndjson"
GEMINI_JSON = "application/json; charset=UTF-8"
GEMINI_SSE = "text/event-stream"
OLLAMA_DONE = {"stop": "stop", "length": "length"}
GEMINI_FINISH = {"stop": "STOP", "length": "MAX_TOKENS"}


def ollama_line(model: str, message: dict, done: bool = False) -> dict:
    return {
        "model": model,
        "created_at": "2026-01-05T10:00:00.123456Z",
        "message": {"role": "assistant", "content": "", **message},
        "done": done,
    }


def ollama_final(turn: ScriptedTurn, model: str, message: dict | None = None) -> dict:
    counts = {"prompt_eval_count": turn.usage.prompt, "prompt_eval_duration": 3456789}
    counts |= {"eval_count": turn.usage.output, "eval_duration": 5678901}
    return {
        **ollama_line(model, message or {}, done=True),
        "done_reason": OLLAMA_DONE[turn.finish],
        "total_duration": 912345678,
        "load_duration": 1234567,
        **counts,
    }


def ollama_calls(turn: ScriptedTurn) -> list[dict]:
    return [{"function": {"name": call.name, "arguments": call.args}} for call in turn.calls]


def ollama_lines(turn: ScriptedTurn, model: str, size: int = PIECE_SIZE) -> list[dict]:
    """Thinking and text in pieces, every tool call in one line (as Ollama sends them), then `done`."""
    lines = [ollama_line(model, {"thinking": piece}) for piece in pieces(turn.thinking, size)]
    lines += [ollama_line(model, {"content": piece}) for piece in pieces(turn.text, size)]
    if turn.calls:
        lines.append(ollama_line(model, {"tool_calls": ollama_calls(turn)}))
    return [*lines, ollama_final(turn, model)]


def ollama_whole(turn: ScriptedTurn, model: str) -> dict:
    message: dict = {"content": turn.text}
    if turn.thinking:
        message["thinking"] = turn.thinking
    if turn.calls:
        message["tool_calls"] = ollama_calls(turn)
    return ollama_final(turn, model, message)


def gemini_parts(turn: ScriptedTurn, split: bool, size: int = PIECE_SIZE) -> list[dict]:
    cut = functools.partial(pieces, size=size) if split else (lambda text: [text] if text else [])
    parts = [{"text": piece, "thought": True} for piece in cut(turn.thinking)]
    texts = [{"text": piece} for piece in cut(turn.text)]
    if texts and turn.text_signature:
        texts[0]["thoughtSignature"] = turn.text_signature
    parts += texts
    for call in turn.calls:
        function_call = {"name": call.name, "args": call.args} | ({"id": call.call_id} if call.call_id else {})
        parts.append({"functionCall": function_call} | ({"thoughtSignature": call.signature} if call.signature else {}))
    return parts


def gemini_usage_metadata(usage: ScriptedUsage, final: bool) -> dict:
    details = {"promptTokensDetails": [{"modality": "TEXT", "tokenCount": usage.prompt}]}
    if not final:
        return {"promptTokenCount": usage.prompt, "totalTokenCount": usage.prompt, **details}
    optional = {
        "cachedContentTokenCount": usage.cached,
        "thoughtsTokenCount": usage.thoughts,
        "toolUsePromptTokenCount": usage.tool_prompt,
    }
    total = usage.prompt + usage.output + usage.thoughts + usage.tool_prompt
    return {
        "promptTokenCount": usage.prompt,
        "candidatesTokenCount": usage.output,
        "totalTokenCount": total,
        **{key: value for key, value in optional.items() if value},
        **details,
    }


def gemini_response(model: str, candidate: dict | None, usage: dict) -> dict:
    head = {"candidates": [candidate]} if candidate else {}
    return {**head, "usageMetadata": usage, "modelVersion": model, "responseId": "mO8aaZ-3BqKvz7IP5pmx0Qc"}


def gemini_candidate(parts: list[dict], finish: str | None = None) -> dict:
    candidate: dict = {"content": {"parts": parts, "role": "model"}} if parts else {}
    if finish:
        candidate["finishReason"] = finish
    if finish and finish not in GEMINI_FINISH.values():
        candidate["safetyRatings"] = [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}]
    return {**candidate, "index": 0}


def gemini_blocked(turn: ScriptedTurn, model: str) -> dict:
    feedback = {"blockReason": turn.blocked, "safetyRatings": [{"category": "HARM_CATEGORY_HARASSMENT"}]}
    return {"promptFeedback": feedback, **gemini_response(model, None, gemini_usage_metadata(turn.usage, True))}


def gemini_chunks(turn: ScriptedTurn, model: str, size: int = PIECE_SIZE) -> list[dict]:
    """One part per chunk (function calls whole), then a chunk with the finishReason and the full usage."""
    if turn.blocked:
        return [gemini_blocked(turn, model)]
    early = gemini_usage_metadata(turn.usage, final=False)
    chunks = [gemini_response(model, gemini_candidate([part]), early) for part in gemini_parts(turn, True, size)]
    finish = GEMINI_FINISH.get(turn.finish, turn.finish)
    last_parts = [{"text": ""}] if finish in GEMINI_FINISH.values() else []
    final = gemini_response(model, gemini_candidate(last_parts, finish), gemini_usage_metadata(turn.usage, True))
    return [*chunks, final]


def gemini_whole(turn: ScriptedTurn, model: str) -> dict:
    if turn.blocked:
        return gemini_blocked(turn, model)
    finish = GEMINI_FINISH.get(turn.finish, turn.finish)
    candidate = gemini_candidate(gemini_parts(turn, split=False), finish)
    return gemini_response(model, candidate, gemini_usage_metadata(turn.usage, True))


def ollama_event(data: dict) -> bytes:
    return ollama_gemini_json(data) + b"\n"


def gemini_event(data: dict) -> bytes:
    return b"data: " + ollama_gemini_json(data) + b"\r\n\r\n"


@dataclass
class OllamaGeminiReply:
    """A scripted answer: a whole body, or a streamed one (`segments`; None marks a pause until `release`)."""

    status: int = 200
    body: bytes = b""
    content_type: str = OLLAMA_JSON
    segments: list[bytes | None] | None = None
    reset: bool = False  # drop the connection at the end instead of finishing the body


def split_point(event: bytes) -> int:
    """Where to pause inside an event: inside its first multi-byte character, else before its last byte."""
    high = next((i for i, byte in enumerate(event) if byte >= 0x80), None)
    return high + 1 if high is not None else len(event) - 1


def stream_reply(events: list[bytes], content_type: str, reset: bool = False) -> OllamaGeminiReply:
    """The events as one streamed body that pauses in the middle of the second event."""
    data = b"".join(events)
    segments: list[bytes | None] = [data]
    if len(events) >= 2:
        at = len(events[0]) + split_point(events[1])
        segments = [data[:at], None, data[at:]]
    return OllamaGeminiReply(content_type=content_type, segments=segments, reset=reset)


GEMINI_PATH = re.compile(r"/v1beta/models/([^/:]+):(generateContent|streamGenerateContent)")


def gemini_target(path: str) -> tuple[str, str]:
    match = GEMINI_PATH.fullmatch(path)
    assert match, path
    return match.group(1), match.group(2)


def ollama_gemini_events(provider: str, received: Received, turn: ScriptedTurn) -> list[bytes]:
    if provider == "ollama":
        return [ollama_event(line) for line in ollama_lines(turn, received.body["model"])]
    return [gemini_event(chunk) for chunk in gemini_chunks(turn, gemini_target(received.path)[0])]


def ollama_gemini_error_event(provider: str, message: str) -> bytes:
    if provider == "ollama":
        return ollama_event({"error": message})
    return gemini_event({"error": {"code": 503, "message": message, "status": "UNAVAILABLE"}})


def is_stream(provider: str, received: Received) -> bool:
    if provider == "ollama":
        return received.body.get("stream", True) is not False  # Ollama streams unless told not to
    return gemini_target(received.path)[1] == "streamGenerateContent"


def ollama_gemini_reply(provider: str, received: Received, turn: ScriptedTurn, cut: str = "") -> OllamaGeminiReply:
    """Answer `turn` in the provider's wire format; `cut` breaks it (see STREAM_CUTS)."""
    if not is_stream(provider, received):
        if provider == "ollama":
            return OllamaGeminiReply(
                body=ollama_gemini_json(ollama_whole(turn, received.body["model"])), reset=cut == "reset"
            )
        body = ollama_gemini_json(gemini_whole(turn, gemini_target(received.path)[0]), indent=2)
        return OllamaGeminiReply(body=body, content_type=GEMINI_JSON, reset=cut == "reset")
    events = ollama_gemini_events(provider, received, turn)
    if provider == "gemini" and received.query.get("alt") != "sse":  # without alt=sse: one JSON array
        chunks = [json.loads(event[6:]) for event in events]
        return OllamaGeminiReply(body=ollama_gemini_json(chunks, indent=2), content_type=GEMINI_JSON)
    error = ollama_gemini_error_event(provider, "upstream went away: unexpected EOF")
    events = {
        "": events,
        "eof": events[:-1],
        "reset": events[:-1],
        "empty": [],
        "error": [*events[:-1], error],
        "error-first": [error],
    }[cut]
    return stream_reply(events, OLLAMA_NDJSON if provider == "ollama" else GEMINI_SSE, reset=cut == "reset")


def ollama_error(status: int, message: str) -> OllamaGeminiReply:
    return OllamaGeminiReply(status, ollama_gemini_json({"error": message}))


def gemini_error(status: int, message: str, code: str) -> OllamaGeminiReply:
    body = ollama_gemini_json({"error": {"code": status, "message": message, "status": code}}, indent=2)
    return OllamaGeminiReply(status, body, GEMINI_JSON)


def ollama_check(received: Received) -> OllamaGeminiReply | None:
    """What Ollama refuses: unknown paths and models, string tool arguments, bad base64 images."""
    if (received.method, received.path) != ("POST", "/api/chat"):
        return OllamaGeminiReply(404, b"404 page not found", "text/plain")
    body = received.body
    if not isinstance(body, dict) or not body.get("model"):
        return ollama_error(400, "model is required")
    if body["model"] not in OLLAMA_KNOWN_MODELS:
        return ollama_error(404, f'model "{body["model"]}" not found, try pulling it first')
    for message in body.get("messages") or ():
        if message.get("role") not in ("system", "user", "assistant", "tool"):
            return ollama_error(400, f"invalid role: {message.get('role')}")
        for call in message.get("tool_calls") or ():
            if not isinstance(call.get("function", {}).get("arguments"), dict):
                return ollama_error(
                    400,
                    "json: cannot unmarshal string into Go struct field ToolCallFunction.messages.tool_calls."
                    "function.arguments of type api.ToolCallFunctionArguments",
                )
        for image in message.get("images") or ():
            try:
                base64.b64decode(image, validate=True)
            except ValueError:
                return ollama_error(400, "illegal base64 data at input byte 0")
    return None


GEMINI_SCHEMA_ALLOWED = frozenset(  # the list of the keys Gemini's `parameters` accepts
    {"type", "format", "description", "nullable", "enum", "items", "properties", "required", "minItems"}
    | {"maxItems", "minLength", "maxLength", "minProperties", "maxProperties", "minimum", "maximum", "pattern"}
    | {"anyOf", "title"}
)


GEMINI_TYPES = frozenset({"STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY", "OBJECT"})


def gemini_camel(name: str) -> str:
    """Protobuf JSON accepts a field's snake_case name as well as its camelCase one (google-genai sends the former)."""
    return re.sub(r"_([a-z])", lambda match: match.group(1).upper(), name)


def gemini_schema_problems(schema: Any, at: str) -> list[str]:
    """Why Gemini would reject a `parameters` schema (in its own words), recursively; [] when it is fine."""
    if not isinstance(schema, dict):
        return [f"Invalid value at '{at}': a schema must be an object"]
    problems = [
        f"Invalid JSON payload received. Unknown name \"{key}\" at '{at}': Cannot find field."
        for key in schema
        if gemini_camel(key) not in GEMINI_SCHEMA_ALLOWED
    ]
    schema = {gemini_camel(key): value for key, value in schema.items()}
    kind = schema.get("type")
    if kind is None and "anyOf" not in schema:
        problems.append(f"* GenerateContentRequest.{at}.type: must be specified")
    elif kind is not None and (not isinstance(kind, str) or kind.upper() not in GEMINI_TYPES):
        problems.append(f"Invalid value at '{at}.type': {kind!r}")
    properties = schema.get("properties")
    if properties is not None:
        if not isinstance(properties, dict) or not properties:
            problems.append(f"* GenerateContentRequest.{at}.properties: should be non-empty for OBJECT type")
        else:
            for name, sub in properties.items():
                problems += gemini_schema_problems(sub, f"{at}.properties[{name}]")
    for i, name in enumerate(schema.get("required") or ()):
        if name not in (properties or {}):
            problems.append(f"* GenerateContentRequest.{at}.required[{i}]: property is not defined")
    enum = schema.get("enum")
    if enum is not None and not (isinstance(enum, list) and all(isinstance(value, str) for value in enum)):
        problems.append(f"Invalid value at '{at}.enum': only strings are allowed")
    if "items" in schema:
        problems += gemini_schema_problems(schema["items"], f"{at}.items")
    for i, variant in enumerate(schema.get("anyOf") or ()):
        problems += gemini_schema_problems(variant, f"{at}.any_of[{i}]")
    return problems


def gemini_request_problem(body: Any, model: str) -> str | None:
    """The first reason Gemini would answer 400 INVALID_ARGUMENT, or None."""
    contents = body.get("contents") if isinstance(body, dict) else None
    if not contents:
        return "* GenerateContentRequest.contents: contents is not specified"
    for i, content in enumerate(contents):
        if content.get("role") not in ("user", "model"):
            return "Please use a valid role: user, model."
        if not content.get("parts"):
            return f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty."
    for t, tool in enumerate(body.get("tools") or ()):
        for d, declaration in enumerate(tool.get("functionDeclarations") or tool.get("function_declarations") or ()):
            declaration = {gemini_camel(key): value for key, value in declaration.items()}
            if "parameters" in declaration and "parametersJsonSchema" in declaration:
                return (
                    f"* GenerateContentRequest.tools[{t}].function_declarations[{d}]: parameters and "
                    "parameters_json_schema are mutually exclusive"
                )
            if "parametersJsonSchema" in declaration and not isinstance(declaration["parametersJsonSchema"], dict):
                return f"Invalid value at 'tools[{t}].function_declarations[{d}].parameters_json_schema'"
            if "parameters" in declaration:
                problems = gemini_schema_problems(
                    declaration["parameters"], f"tools[{t}].function_declarations[{d}].parameters"
                )
                if problems:
                    return problems[0]
    problem = gemini_thinking_problem((body.get("generationConfig") or {}).get("thinkingConfig") or {}, model)
    if problem:
        return problem
    if len((body.get("generationConfig") or {}).get("stopSequences") or ()) > 5:
        return "* GenerateContentRequest.generation_config.stop_sequences: at most 5 stop sequences are allowed"
    for previous, content in itertools.pairwise(contents):
        calls = sum("functionCall" in part for part in previous["parts"]) if previous["role"] == "model" else 0
        responses = sum("functionResponse" in part for part in content["parts"])
        if responses and responses != calls:
            return (
                "Please ensure that the number of function response parts is equal to the number of function "
                "call parts of the function call turn."
            )
    if model.startswith("gemini-3"):  # the current turn: everything after the last user text
        starts = [i + 1 for i, c in enumerate(contents) if c["role"] == "user" and any("text" in p for p in c["parts"])]
        for content in contents[max(starts, default=0) :]:
            calls = [part for part in content["parts"] if "functionCall" in part]
            if content["role"] == "model" and calls and "thoughtSignature" not in calls[0]:
                return (
                    "Function call is missing a thought_signature in functionCall parts. This is required for "
                    f"tools to work correctly. Additional data, function call `default_api:"
                    f"{calls[0]['functionCall']['name']}`. Please refer to "
                    "https://ai.google.dev/gemini-api/docs/thought-signatures for more details."
                )
    return None


def gemini_thinking_problem(config: dict, model: str) -> str | None:
    """Why Gemini would reject a thinkingConfig for this model, or None."""
    budget, level = config.get("thinkingBudget"), config.get("thinkingLevel")
    if budget is not None and level is not None:
        return "You can only set one of thinking budget and thinking level."
    if level is not None and not model.startswith("gemini-3"):
        return "Thinking level is not supported for this model."
    low, high = GEMINI_THINKING_RANGES.get(model, (-1, 1 << 31))
    if budget is not None and budget != -1 and not (low <= budget <= high or (budget == 0 and low == 512)):
        return f"The thinking budget {budget} is invalid. Please choose a value between {low} and {high}."
    return None


def gemini_check(received: Received) -> OllamaGeminiReply | None:
    """What Gemini refuses: a wrong key, an unknown model, and the request problems above."""
    match = GEMINI_PATH.fullmatch(received.path)
    if received.method != "POST" or not match:
        page = b"<!DOCTYPE html><html lang=en><title>Error 404 (Not Found)!!1</title></html>"
        return OllamaGeminiReply(404, page, "text/html; charset=UTF-8")
    if received.headers.get("x-goog-api-key") != GEMINI_KEY:
        return gemini_error(400, "API key not valid. Please pass a valid API key.", "INVALID_ARGUMENT")
    model, method = match.groups()
    if model not in GEMINI_KNOWN_MODELS:
        text = f"models/{model} is not found for API version v1beta, or is not supported for {method}."
        return gemini_error(404, text + " Call ListModels to see the list of available models.", "NOT_FOUND")
    problem = gemini_request_problem(received.body, model)
    return gemini_error(400, problem, "INVALID_ARGUMENT") if problem else None


STRICT_CHECKS: dict[str, Callable[[Received], OllamaGeminiReply | None]] = {
    "ollama": ollama_check,
    "gemini": gemini_check,
}


class OllamaGeminiStandIn(StandInServer):
    """A local Ollama or Gemini API: validates each request and answers from a script."""

    def __init__(self, provider: str) -> None:
        super().__init__()
        self.provider = provider
        self.answer: Callable[[Received], OllamaGeminiReply] = lambda received: ollama_gemini_reply(
            provider, received, ScriptedTurn(text="ok")
        )
        self.pause = True  # pause streams mid-event until `release` (clients that cannot release set it False)

    def answer_turn(self, turn: ScriptedTurn, cut: str = "") -> None:
        self.answer = lambda received: ollama_gemini_reply(self.provider, received, turn, cut)

    async def handle(self, request: web.Request, received: Received) -> web.StreamResponse:
        reply = STRICT_CHECKS[self.provider](received) or self.answer(received)
        if reply.segments is None and not reply.reset:
            return web.Response(status=reply.status, body=reply.body, headers={"content-type": reply.content_type})
        self.release.clear()
        response = web.StreamResponse(status=reply.status, headers={"content-type": reply.content_type})
        segments = reply.segments
        if segments is None:  # a whole body cut short: its full length announced, half of it sent
            response.content_length = len(reply.body)
            segments = [reply.body[: len(reply.body) // 2]]
        await response.prepare(request)
        for segment in segments:
            if segment is None:
                if self.pause:
                    await self.release.wait()
            else:
                await response.write(segment)
        if reply.reset:
            assert request.transport is not None
            request.transport.close()
        else:
            await response.write_eof()
        return response


# ---------------------------------------------------------------------------
# Any of the four formats, from a script: the answer a real API gives, or a fault
# ---------------------------------------------------------------------------


ANTHROPIC_ERROR_TYPES = {  # the error type Anthropic's API sends with each status
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
SCRIPTED_TEXT = "Hello from the reliability stand-in."


STREAM_TYPES = {
    "anthropic": "text/event-stream",
    "openai": "text/event-stream",
    "responses": "text/event-stream",
    "gemini": "text/event-stream",
    "ollama": "application/x-ndjson",
}


def text_stream_parts(
    kind: str, model: str, text: str = SCRIPTED_TEXT, size: int = 8, include_usage: bool = False
) -> list[bytes]:
    """A streamed answer in `kind`'s format, `size` characters of text per delta, one write per delta; the first
    write already carries the first piece. `include_usage`: an OpenAI stream ends with a usage chunk, as
    stream_options asks."""
    count = len(pieces(text, size))
    if kind == "anthropic":
        frames = stream_frames(model, [{"type": "text", "text": text}], size=size)
        return [b"".join(frames[:4]), *frames[4 : 3 + count], b"".join(frames[3 + count :])]
    if kind == "openai":
        chunks = [
            openai_chunk({"role": "assistant", "content": piece} if i == 0 else {"content": piece})
            for i, piece in enumerate(pieces(text, size))
        ]
        ending = [openai_chunk({}, "stop")]
        if include_usage:
            ending.append(
                openai_chunk(usage={"prompt_tokens": 5, "completion_tokens": count, "total_tokens": count + 5})
            )
        frames = openai_sse([*chunks, *ending], model)
        return [*frames[:count], b"".join(frames[count:])]
    if kind == "responses":
        return responses_events(model, responses_output(ResponsesTurn(text)), size)
    turn = ScriptedTurn(text=text)
    if kind == "gemini":
        return [gemini_event(chunk) for chunk in gemini_chunks(turn, model, size)]
    return [ollama_event(line) for line in ollama_lines(turn, model, size)]


def text_answer(kind: str, model: str, text: str = SCRIPTED_TEXT) -> dict:
    """A whole (non-streamed) answer in `kind`'s format."""
    if kind == "anthropic":
        return anthropic_message(model, [{"type": "text", "text": text}], output_tokens=3)
    if kind == "openai":
        usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        return {**openai_completion({"content": text}, "stop", usage), "model": model}
    if kind == "responses":
        return responses_object(model, responses_output(ResponsesTurn(text)))
    if kind == "gemini":
        return gemini_whole(ScriptedTurn(text=text), model)
    return ollama_whole(ScriptedTurn(text=text), model)


def error_json_of(kind: str, status: int, text: str) -> dict:
    """An error body as each provider writes it."""
    if kind == "anthropic":
        return anthropic_error(status, ANTHROPIC_ERROR_TYPES.get(status, "api_error"), text).json
    if kind == "openai":
        return openai_error_body(text, "server_error")
    if kind == "gemini":
        return {"error": {"code": status, "message": text, "status": "UNAVAILABLE"}}
    return {"error": text}


async def answer_ok(up: StandInServer, seen: Received, request: web.Request) -> web.StreamResponse:
    """Answer as the real API would: a stream when one was asked for, else a whole answer."""
    if seen.stream:
        return await up.write_parts(request, STREAM_TYPES[seen.kind], text_stream_parts(seen.kind, seen.model))
    return web.json_response(text_answer(seen.kind, seen.model))


def answer_status(status: int, headers: Mapping[str, str] | None = None, text: str = "upstream says no") -> Script:
    async def script(up: StandInServer, seen: Received, request: web.Request) -> web.StreamResponse:
        return web.json_response(error_json_of(seen.kind, status, text), status=status, headers=headers)

    return script


def script_sequence(*scripts: Script) -> Script:
    """The i-th request gets scripts[i]; the last script answers every later one."""

    async def script(up: StandInServer, seen: Received, request: web.Request) -> web.StreamResponse:
        return await scripts[min(len(up.received), len(scripts)) - 1](up, seen, request)

    return script


# ---------------------------------------------------------------------------
# Anthropic Messages and OpenAI chat completions on one server, scripted per upstream model
# ---------------------------------------------------------------------------


SCRIPTED_USAGE = {
    "input_tokens": 10,
    "cache_read_input_tokens": 3,
    "cache_creation_input_tokens": 2,
    "output_tokens": 7,
}


@dataclass
class ScriptedAnswer:
    """One scripted answer, written in the wire format of whichever API was called."""

    text: str = STANDIN_TEXT
    tools: list[tuple[str, str, dict]] = field(default_factory=list)  # (id, name, input) per call
    usage: dict = field(default_factory=lambda: dict(SCRIPTED_USAGE))
    status: int = 200
    error_type: str = "api_error"
    failure: str = ""  # streams only: "cut" ends the stream after the first text; "error" sends an error there
    hold: bool = False  # streams only: pause after the first text until `release` is set


def two_pieces(text: str) -> list[str]:
    """Text in two deltas, so a failure can come between them."""
    return pieces(text, max(1, -(-len(text) // 2)))


def scripted_content(answer: ScriptedAnswer) -> list[dict]:
    content: list[dict] = [{"type": "text", "text": answer.text}] if answer.text else []
    return content + [{"type": "tool_use", "id": i, "name": name, "input": args} for i, name, args in answer.tools]


def scripted_stop_reason(answer: ScriptedAnswer) -> str:
    return "tool_use" if answer.tools else "end_turn"


def scripted_anthropic_message(model: str, answer: ScriptedAnswer) -> dict:
    return {**anthropic_message(model, scripted_content(answer), scripted_stop_reason(answer)), "usage": answer.usage}


def scripted_anthropic_stream(model: str, answer: ScriptedAnswer) -> tuple[list[bytes], list[bytes]]:
    """The SSE frames before the failure point (just after the first text delta) and after it."""
    size = max(1, -(-len(answer.text) // 2))
    frames = stream_frames(model, scripted_content(answer), scripted_stop_reason(answer), size=size, usage=answer.usage)
    cut = next((i + 1 for i, frame in enumerate(frames) if b'"text_delta"' in frame), len(frames))
    return frames[:cut], frames[cut:]


def scripted_openai_usage(usage: dict) -> dict:
    prompt = usage["input_tokens"] + usage["cache_read_input_tokens"] + usage["cache_creation_input_tokens"]
    return {
        "prompt_tokens": prompt,
        "completion_tokens": usage["output_tokens"],
        "total_tokens": prompt + usage["output_tokens"],
        "prompt_tokens_details": {"cached_tokens": usage["cache_read_input_tokens"]},
    }


def scripted_openai_chunks(answer: ScriptedAnswer) -> list[dict]:
    """The chunks of the answer, text in two deltas and each call's arguments in two."""
    text = two_pieces(answer.text) if answer.text else []
    chunks = [openai_chunk({"role": "assistant", "content": ""})] + [openai_chunk({"content": p}) for p in text]
    for index, (tool_id, name, tool_input) in enumerate(answer.tools):
        chunks.append(openai_chunk(openai_tools_delta(openai_call(index, tool_id, name, ""))))
        for piece in two_pieces(json.dumps(tool_input)):
            chunks.append(openai_chunk(openai_tools_delta(openai_call(index, args=piece))))
    finish = "tool_calls" if answer.tools else "stop"
    return [*chunks, openai_chunk({}, finish), openai_chunk(usage=scripted_openai_usage(answer.usage))]


def scripted_openai_completion(model: str, answer: ScriptedAnswer) -> dict:
    return {**openai_fold(scripted_openai_chunks(answer)), "model": model}


def scripted_openai_stream(model: str, answer: ScriptedAnswer, include_usage: bool) -> tuple[list[bytes], list[bytes]]:
    """The SSE frames before the failure point (just after the first text delta) and after it; the usage chunk
    only when stream_options asked for it."""
    chunks = scripted_openai_chunks(answer)
    frames = openai_sse(chunks if include_usage else chunks[:-1], model)
    cut = 2 if answer.text else 1  # the role chunk, then the first text delta
    return frames[:cut], frames[cut:]


class ModelScriptedUpstream(StandInServer):
    """A local upstream speaking Anthropic Messages and OpenAI chat completions; scripted per upstream model."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: dict[str, list[ScriptedAnswer]] = {}

    def queue(self, model: str, *answers: ScriptedAnswer) -> None:
        """Answers for the next requests for `model`, in order; then the default answer."""
        self.scripts[model] = list(answers)

    async def handle(self, request: web.Request, received: Received) -> web.StreamResponse:
        body = received.body
        model = (body or {}).get("model", "")
        queue = self.scripts.get(model) or []
        answer = queue.pop(0) if queue else ScriptedAnswer()
        if request.method == "POST" and request.path == "/v1/messages":
            if answer.status != 200:
                error = anthropic_error(answer.status, answer.error_type, f"scripted {answer.status}").json
                return web.json_response(error, status=answer.status)
            if not body.get("stream"):
                return web.json_response(scripted_anthropic_message(model, answer))
            head, tail = scripted_anthropic_stream(model, answer)
            error = sse("error", error={"type": "overloaded_error", "message": "scripted mid-stream failure"})
            return await self.stream(request, answer, head, tail, error)
        if request.method == "POST" and request.path.endswith("/chat/completions"):
            if answer.status != 200:
                error = openai_error_body(f"scripted {answer.status}", answer.error_type)
                return web.json_response(error, status=answer.status)
            if not body.get("stream"):
                return web.json_response(scripted_openai_completion(model, answer))
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            head, tail = scripted_openai_stream(model, answer, include_usage)
            error = sse_data({"error": {"message": "scripted mid-stream failure", "type": "server_error"}})
            return await self.stream(request, answer, head, tail, error)
        return web.json_response({"error": {"message": f"no route {request.path}"}}, status=404)

    async def stream(
        self, request: web.Request, answer: ScriptedAnswer, head: list[bytes], tail: list[bytes], error: bytes
    ) -> web.StreamResponse:
        rest = {"error": [error], "cut": []}.get(answer.failure, tail)
        hold_at = len(head) if answer.hold else None
        return await self.write_parts(request, SSE_TYPE, [*head, *rest], hold_at=hold_at, headers=SSE_HEADERS)


# ---------------------------------------------------------------------------
# OpenAI Responses API
# ---------------------------------------------------------------------------

RESPONSES_FIELDS = frozenset(
    {
        "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "reasoning",
        "max_output_tokens", "temperature", "top_p", "text", "store", "include", "stream", "prompt_cache_key",
        "metadata", "user", "truncation", "client_metadata", "service_tier",
    }
)  # fmt: skip


@dataclass
class ResponsesTurn:
    """One scripted Responses answer: reasoning (a summary), text, and function calls (call_id, name, arguments)."""

    text: str = "ok"
    calls: list[tuple[str, str, dict]] = field(default_factory=list)
    reasoning: str = ""


def responses_error(status: int, message: str, code: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return web.json_response(body, status=status)


def responses_output(turn: ResponsesTurn, encrypted: str = "enc-0") -> list[dict]:
    """A turn's Responses output items: reasoning (with `encrypted`), a message, function calls."""
    out: list[dict] = []
    if turn.reasoning:
        summary = [{"type": "summary_text", "text": turn.reasoning}]
        out.append({"id": f"rs_{len(out)}", "type": "reasoning", "summary": summary, "encrypted_content": encrypted})
    if turn.text:
        part = {"type": "output_text", "text": turn.text, "annotations": []}
        message = {"id": f"msg_{len(out)}", "type": "message", "status": "completed", "role": "assistant"}
        out.append({**message, "content": [part]})
    for call_id, name, arguments in turn.calls:
        call = {"id": f"fc_{len(out)}", "type": "function_call", "status": "completed", "call_id": call_id}
        out.append({**call, "name": name, "arguments": json.dumps(arguments)})
    return out


def responses_object(model: str, output: list[dict], status: str = "completed") -> dict:
    """A Responses object as the API writes it."""
    usage = {
        "input_tokens": 30,
        "input_tokens_details": {"cached_tokens": 10},
        "output_tokens": 12,
        "output_tokens_details": {"reasoning_tokens": 4},
        "total_tokens": 42,
    }
    head = {"id": "resp_standin", "object": "response", "created_at": 1_700_000_000, "status": status}
    return {**head, "model": model, "output": output, "usage": usage if status != "in_progress" else None}


def responses_item_frames(item: dict, index: int, size: int) -> list[tuple[str, dict]]:
    """The events that stream one output item, deltas of `size` characters."""
    ids = {"item_id": item["id"], "output_index": index}
    if item["type"] == "reasoning":
        text = item["summary"][0]["text"]
        frames = [("response.output_item.added", {"output_index": index, "item": {**item, "summary": []}})]
        part = {"type": "summary_text", "text": ""}
        frames.append(("response.reasoning_summary_part.added", {**ids, "summary_index": 0, "part": part}))
        for piece in pieces(text, size):
            frames.append(("response.reasoning_summary_text.delta", {**ids, "summary_index": 0, "delta": piece}))
        frames.append(("response.reasoning_summary_text.done", {**ids, "summary_index": 0, "text": text}))
    elif item["type"] == "message":
        text = item["content"][0]["text"]
        added = {**item, "status": "in_progress", "content": []}
        frames = [("response.output_item.added", {"output_index": index, "item": added})]
        part = {"type": "output_text", "text": "", "annotations": []}
        frames.append(("response.content_part.added", {**ids, "content_index": 0, "part": part}))
        for piece in pieces(text, size):
            frames.append(("response.output_text.delta", {**ids, "content_index": 0, "delta": piece, "logprobs": []}))
        frames.append(("response.output_text.done", {**ids, "content_index": 0, "text": text, "logprobs": []}))
    else:
        added = {**item, "status": "in_progress", "arguments": ""}
        frames = [("response.output_item.added", {"output_index": index, "item": added})]
        for piece in pieces(item["arguments"], size):
            frames.append(("response.function_call_arguments.delta", {**ids, "delta": piece}))
        frames.append(("response.function_call_arguments.done", {**ids, "arguments": item["arguments"]}))
    return [*frames, ("response.output_item.done", {"output_index": index, "item": item})]


def responses_events(model: str, output: list[dict], size: int = 8) -> list[bytes]:
    """The numbered SSE events that stream `output`, one write per event."""
    frames = [("response.created", {"response": responses_object(model, [], "in_progress")})]
    for index, item in enumerate(output):
        frames += responses_item_frames(item, index, size)
    frames.append(("response.completed", {"response": responses_object(model, output)}))
    return [
        f"event: {name}\ndata: {json.dumps({'type': name, 'sequence_number': n, **data})}\n\n".encode()
        for n, (name, data) in enumerate(frames)
    ]


class ResponsesStandIn(StandInServer):
    """A local OpenAI Responses API (POST /v1/responses) that checks what the real one checks: no unknown
    parameters, every function_call_output answers a function_call of the input, and every reasoning item comes
    back with an encrypted_content this server issued. Answers from a script, as JSON or numbered SSE events."""

    def __init__(self) -> None:
        super().__init__()
        self.answer: Callable[[Received], ResponsesTurn] = lambda received: ResponsesTurn()
        self.issued: set[str] = set()
        self.failures: list[int] = []  # statuses to answer the next requests with, as the API writes them

    @property
    def last(self) -> Received:
        calls = [r for r in self.received if r.path.endswith("/responses")]
        assert calls, "the stand-in received no Responses request"
        return calls[-1]

    def problem(self, body: Any) -> web.Response | None:
        if not isinstance(body, dict):
            return responses_error(400, "We could not parse the JSON body of your request.", "invalid_json")
        for key in body:
            if key not in RESPONSES_FIELDS:
                return responses_error(400, f"Unknown parameter: '{key}'.", "unknown_parameter", key)
        calls: set[str] = set()
        for item in body.get("input") if isinstance(body.get("input"), list) else ():
            kind = item.get("type")
            if kind == "function_call":
                calls.add(item.get("call_id"))
            elif kind == "function_call_output" and item.get("call_id") not in calls:
                message = f"No tool call found for function call output with call_id {item.get('call_id')}."
                return responses_error(400, message, "invalid_function_call_output", "input")
            elif kind == "reasoning" and item.get("encrypted_content") not in self.issued:
                message = f"The encrypted content for item {item.get('id')} could not be verified."
                return responses_error(400, message, "invalid_encrypted_content", "input")
        return None

    def items(self, turn: ResponsesTurn) -> list[dict]:
        """The turn's output items; its reasoning's encrypted_content is one this server issued."""
        encrypted = f"enc-{len(self.issued)}-{secrets.token_hex(6)}"
        if turn.reasoning:
            self.issued.add(encrypted)
        return responses_output(turn, encrypted)

    async def handle(self, request: web.Request, received: Received) -> web.StreamResponse:
        if (request.method, request.path.rsplit("/", 1)[-1]) != ("POST", "responses"):
            return responses_error(404, f"Unknown request URL: {request.method} {request.path}", "unknown_url")
        refused = self.problem(received.body)
        if refused is not None:
            return refused
        if self.failures:
            status = self.failures.pop(0)
            return web.json_response(openai_error_body("The server had an error.", "server_error"), status=status)
        output = self.items(self.answer(received))
        model = received.body.get("model", "")
        if not received.body.get("stream"):
            return web.json_response(responses_object(model, output))
        return await self.write_parts(request, SSE_TYPE, responses_events(model, output), headers=SSE_HEADERS)
