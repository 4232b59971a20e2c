"""Upstream stand-ins shared by test_proxy.py and bench.py: real aiohttp servers on 127.0.0.1 that record every
request and answer it in an upstream API's wire format, from a per-test script."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

# ---------------------------------------------------------------------------
# Scaffolding: a real server on 127.0.0.1 that records every request
# ---------------------------------------------------------------------------


def wire_format_of(path: str) -> str:
    """Which upstream API a request path belongs to: anthropic, openai, ollama or gemini."""
    if path.endswith("/chat/completions"):
        return "openai"
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


async def serve_app(app: web.Application, **options: Any) -> tuple[web.AppRunner, str]:
    """Serve `app` on 127.0.0.1 on a free port; returns its runner (to clean up) and its base URL."""
    runner = web.AppRunner(app, **options)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


Script = Callable[["StandInServer", Received, web.Request], Awaitable[web.StreamResponse]]


class StandInServer:
    """Records every request in `received` and the proxy-side port it came from in `ports`, then answers with the
    test's `script` when one is set, else as its wire format does (`handle`). A connection the proxy drops cancels
    the handler: that sets `gone` (at `gone_at`), which is how tests see that the proxy closed an upstream request.
    """

    def __init__(self, script: Script | None = None) -> None:
        self.script = script
        self.received: list[Received] = []
        self.ports: list[int] = []
        self.release = asyncio.Event()  # lets a held answer go on
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

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        # handler_cancellation: a connection the proxy drops cancels the handler (the stand-ins notice it)
        options = {"handler_cancellation": True, "access_log": None, "shutdown_timeout": 0.2}
        self.runner, self.url = await serve_app(app, **options)

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
        received = Received(request.method, request.path, dict(request.query), headers, body)
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


Server = TypeVar("Server", bound=StandInServer)


@contextlib.asynccontextmanager
async def running(server: Server) -> AsyncIterator[Server]:
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
