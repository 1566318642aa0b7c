"""A fake LLM upstream (OpenAI and Anthropic shapes) for tests, benchmarks and the demo.

One server serves every test: `x-fake-*` request headers pick failures, latency, pacing and
mid-stream resets per request, while `FakeUpstreamSettings` (mutable at runtime) injects
random errors and latency on every LLM endpoint. Routes match on the path suffix, so any
prefix (`/v1`, `/openai/v1`) works.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import random
import re
import signal
import ssl
import struct
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
from aiohttp import web
from multidict import CIMultiDictProxy

Json = dict[str, Any]
Records = Iterator[tuple[bytes, bool]]  # SSE records; True marks a paced, counted chunk

_REPLY = "This is a fake reply from the fake upstream.".split()
_ECHO = re.compile(r"(?:^|/)echo(?:/|$)")
_STATUS = re.compile(r"(?:^|/)status/(\d{3})/?$")
_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    529: "overloaded_error",
}


@dataclass
class FakeUpstreamSettings:
    """Server-wide behaviour; mutate the fields at runtime to switch failures on and off."""

    error_rate: float = 0.0  # fraction of LLM requests answered with error_status
    error_status: int = 500
    latency_ms: float = 0.0  # delay before the response head
    seed: int | None = None  # seeds the error_rate draws
    model: str = "fake-model"  # used when the request names none


@dataclass(frozen=True)
class RecordedRequest:
    """One request as received, so tests can assert what the proxy forwarded."""

    method: str
    path: str  # raw path with query, as sent
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        """Decode the body as JSON; raises if it is not JSON."""
        return orjson.loads(self.body)


@dataclass(frozen=True)
class _Controls:
    """The `x-fake-*` request headers, parsed once per request."""

    status: int | None
    latency_ms: float | None
    chunks: int | None
    interval_ms: float
    reset_after: int | None
    body_bytes: int | None
    stall_ms: float
    headers: dict[str, str]  # Retry-After and x-ratelimit-* to echo on the response

    @classmethod
    def parse(cls, headers: CIMultiDictProxy[str]) -> _Controls:
        """Read the control headers; a malformed number is answered with 400."""

        def num(name: str) -> float | None:
            try:
                raw = headers.get(f"x-fake-{name}")
                return None if raw is None else float(raw)
            except ValueError:
                raise web.HTTPBadRequest(text=f"x-fake-{name} is not a number") from None

        def whole(name: str) -> int | None:
            return None if (value := num(name)) is None else int(value)

        prefix = "x-fake-ratelimit-"
        echo = {"x-" + k.lower()[7:]: v for k, v in headers.items() if k.lower().startswith(prefix)}
        if (retry_after := headers.get("x-fake-retry-after")) is not None:
            echo["Retry-After"] = retry_after
        return cls(
            status=whole("status"),
            latency_ms=num("latency-ms"),
            chunks=whole("chunks"),
            interval_ms=num("chunk-interval-ms") or 0.0,
            reset_after=whole("reset-after-chunks"),
            body_bytes=whole("body-bytes"),
            stall_ms=num("stall-ms") or 0.0,
            headers=echo,
        )


class _Route(NamedTuple):
    suffix: str
    method: str
    build: Callable[[Json, str, list[str]], Json]
    stream: Callable[[Json, str, list[str]], Records] | None = None


class FakeUpstream:
    """Holds settings (mutable at runtime, so the demo can switch failures on/off) and counters."""

    max_recorded = 1000

    def __init__(self, settings: FakeUpstreamSettings | None = None) -> None:
        self.settings = settings or FakeUpstreamSettings()
        self.requests_seen = 0
        self.last_request: RecordedRequest | None = None
        self.recorded: list[RecordedRequest] = []
        self.open_streams = 0
        self.closed_by_peer: list[float] = []  # loop.time() when a stream saw its client go
        self.url: str | None = None
        self._rng = random.Random(self.settings.seed)
        self._runner: web.AppRunner | None = None

    def __repr__(self) -> str:
        return (
            f"<FakeUpstream {self.url or 'not started'} seen={self.requests_seen} "
            f"open_streams={self.open_streams} {self.settings}>"
        )

    def app(self) -> web.Application:
        """Build the aiohttp app: one catch-all route, so any path prefix works."""
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None
    ) -> str:
        """Listen on host:port (0 picks a free port); return the base URL, also kept in `url`."""
        self._runner = web.AppRunner(self.app(), shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, ssl_context=ssl_context).start()
        bound = self._runner.addresses[0][1]
        self.url = f"{'https' if ssl_context else 'http'}://{f'[{host}]' if ':' in host else host}"
        self.url += f":{bound}"
        return self.url

    async def stop(self) -> None:
        """Close the listener; handlers still running are cancelled after a 1 s grace."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        """Record the request, then dispatch on the path suffix."""
        body = await request.read()
        self.requests_seen += 1
        self.last_request = RecordedRequest(request.method, request.raw_path, request.headers, body)
        self.recorded.append(self.last_request)
        del self.recorded[: -self.max_recorded]
        path = request.path.rstrip("/")
        if _ECHO.search(path):
            return _echo(request, body)
        if match := _STATUS.search(path):
            code = int(match[1])
            return web.json_response({"status": code}, status=code if 200 <= code < 600 else 400)
        for route in _ROUTES:
            if path.endswith(route.suffix):
                if request.method != route.method:
                    return _error(405, route.suffix == "/messages", {})
                return await self._llm(request, body, route)
        return _error(404, False, {}, f"no fake route for {path}")

    async def _llm(self, request: web.Request, body: bytes, route: _Route) -> web.StreamResponse:
        """Apply latency and injected errors, then answer as JSON or as an SSE stream."""
        ctl = _Controls.parse(request.headers)
        anthropic = route.suffix == "/messages"
        settings = self.settings
        latency_ms = settings.latency_ms if ctl.latency_ms is None else ctl.latency_ms
        if latency_ms > 0:
            await asyncio.sleep(latency_ms / 1000)
        status = ctl.status
        if status is None and settings.error_rate > 0 and self._rng.random() < settings.error_rate:
            status = settings.error_status
        if status is not None:
            return _error(status, anthropic, ctl.headers)
        try:
            req = orjson.loads(body or b"{}")
        except orjson.JSONDecodeError:
            req = None
        if not isinstance(req, dict):
            return _error(400, anthropic, ctl.headers, "request body is not a JSON object")
        words = _words(ctl.chunks)
        model = str(req.get("model") or settings.model)
        if route.stream is not None and req.get("stream") is True:
            return await self._stream(request, ctl, route.stream(req, model, words))
        return await _send_json(request, ctl, route.build(req, model, words))

    async def _stream(
        self, request: web.Request, ctl: _Controls, records: Iterable[tuple[bytes, bool]]
    ) -> web.StreamResponse:
        """Write SSE records, pacing and counting chunks; note a client that goes away."""
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **ctl.headers}
        resp = web.StreamResponse(headers=headers)
        self.open_streams += 1
        try:
            await resp.prepare(request)
            await _pause(request, ctl.stall_ms)
            sent = 0
            for record, is_chunk in records:
                if is_chunk:
                    if sent == ctl.reset_after:
                        break
                    if sent:
                        await _pause(request, ctl.interval_ms)
                    sent += 1
                await resp.write(record)
            if ctl.reset_after is not None and request.transport is not None:
                request.transport.abort()  # no chunked terminator: the client sees a cut body
        except ConnectionError:
            self.closed_by_peer.append(asyncio.get_running_loop().time())
        finally:
            self.open_streams -= 1
        return resp  # aiohttp's write_eof on a closed transport raises ConnectionError, ignored


async def _pause(request: web.Request, ms: float) -> None:
    """Sleep `ms`, raising ConnectionResetError as soon as the client goes away.

    Polling the transport is how a paced or stalled stream notices a disconnect between writes.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ms / 1000
    while True:
        if request.transport is None or request.transport.is_closing():
            raise ConnectionResetError("client went away")
        if (remaining := deadline - loop.time()) <= 0:
            return
        await asyncio.sleep(min(remaining, 0.02))


async def _send_json(request: web.Request, ctl: _Controls, payload: Json) -> web.StreamResponse:
    """Send a JSON body, padded to `x-fake-body-bytes`, after `x-fake-stall-ms` if asked."""
    body = orjson.dumps(payload) if ctl.body_bytes is None else _padded(payload, ctl.body_bytes)
    headers = {"Content-Type": "application/json", **ctl.headers}
    if not ctl.stall_ms:
        return web.Response(body=body, headers=headers)
    resp = web.StreamResponse(headers=headers)
    resp.content_length = len(body)
    try:
        await resp.prepare(request)  # a StreamResponse sends its head at once
        await _pause(request, ctl.stall_ms)
        await resp.write(body)
    except ConnectionError:
        pass
    return resp


def _padded(payload: Json, size: int) -> bytes:
    """Exactly `size` bytes: the payload plus a `padding` field, or bare filler if too small."""
    base = len(orjson.dumps(payload | {"padding": ""}))
    if size < base:
        return b"x" * size
    return orjson.dumps(payload | {"padding": "x" * (size - base)})


def _error(status: int, anthropic: bool, headers: dict[str, str], msg: str = "") -> web.Response:
    """An error in the API's own shape (Anthropic's for /messages, else OpenAI's)."""
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    err: Json = {"type": kind, "message": msg or f"fake upstream error {status}"}
    body = {"type": "error", "error": err} if anthropic else {"error": err | {"param": None}}
    return web.json_response(body, status=status, headers=headers, dumps=_dumps)


def _echo(request: web.Request, body: bytes) -> web.Response:
    """Describe the request as received, for header and body passthrough tests."""
    headers = request.headers
    described: Json = {"method": request.method, "path": request.path, "raw_path": request.raw_path}
    described |= {
        "query": request.query_string,
        "headers": {k.lower(): ", ".join(headers.getall(k)) for k in headers},
        "header_list": [[k, v] for k, v in headers.items()],
        "body_length": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    return web.json_response(described, dumps=_dumps)


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def _words(count: int | None) -> list[str]:
    """The reply's words: the canned sentence, or `count` words cycled from it."""
    return list(_REPLY) if count is None else [_REPLY[i % len(_REPLY)] for i in range(count)]


def _tokens(value: object) -> int:
    """Prompt tokens: characters of text // 4 (min 1), whatever the shape (str, parts, messages)."""

    def chars(value: object) -> int:
        if isinstance(value, str):
            return len(value)
        if isinstance(value, list):
            return sum(chars(item) for item in value)
        if isinstance(value, dict):
            return chars(value.get("content", value.get("text", "")))
        return 0

    return max(1, chars(value) // 4)


def _usage(prompt: int, completion: int, names: tuple[str, str] = ("prompt", "completion")) -> Json:
    usage = {f"{names[0]}_tokens": prompt, f"{names[1]}_tokens": completion}
    return usage | {"total_tokens": prompt + completion}


def _pieces(words: list[str]) -> list[str]:
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def _id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def _sse(obj: Json, event: str | None = None) -> bytes:
    head = b"" if event is None else b"event: " + event.encode() + b"\n"
    return head + b"data: " + orjson.dumps(obj) + b"\n\n"


def _chat_head(model: str, kind: str) -> Json:
    return {"id": _id("chatcmpl-"), "object": kind, "created": int(time.time()), "model": model}


def _chat_completion(req: Json, model: str, words: list[str]) -> Json:
    message = {"role": "assistant", "content": " ".join(words)}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    usage = _usage(_tokens(req.get("messages")), len(words))
    return _chat_head(model, "chat.completion") | {"choices": [choice], "usage": usage}


def _chat_stream(req: Json, model: str, words: list[str]) -> Records:
    head = _chat_head(model, "chat.completion.chunk")
    for i, piece in enumerate(_pieces(words)):
        delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
        done = "stop" if i == len(words) - 1 else None
        yield _sse(head | {"choices": [{"index": 0, "delta": delta, "finish_reason": done}]}), True
    options = req.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        usage = _usage(_tokens(req.get("messages")), len(words))
        yield _sse(head | {"choices": [], "usage": usage}), False
    yield b"data: [DONE]\n\n", False


def _message(req: Json, model: str, words: list[str]) -> Json:
    message: Json = {"id": _id("msg_"), "type": "message", "role": "assistant", "model": model}
    message["content"] = [{"type": "text", "text": " ".join(words)}]
    message |= {"stop_reason": "end_turn", "stop_sequence": None}
    message["usage"] = {"input_tokens": _tokens(req.get("messages")), "output_tokens": len(words)}
    return message


def _message_stream(req: Json, model: str, words: list[str]) -> Records:
    message = _message(req, model, words) | {"content": [], "stop_reason": None}
    message["usage"] = message["usage"] | {"output_tokens": 0}
    yield _sse({"type": "message_start", "message": message}, "message_start"), False
    block = {"type": "text", "text": ""}
    start = {"type": "content_block_start", "index": 0, "content_block": block}
    yield _sse(start, "content_block_start"), False
    for piece in _pieces(words):
        delta = {"type": "text_delta", "text": piece}
        event = {"type": "content_block_delta", "index": 0, "delta": delta}
        yield _sse(event, "content_block_delta"), True
    yield _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"), False
    end = {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}}
    yield _sse(end | {"usage": {"output_tokens": len(words)}}, "message_delta"), False
    yield _sse({"type": "message_stop"}, "message_stop"), False


def _embeddings(req: Json, model: str, words: list[str]) -> Json:
    raw = req.get("input", "")
    inputs = raw if isinstance(raw, list) and not any(isinstance(i, int) for i in raw) else [raw]
    data = []
    for index, item in enumerate(inputs):
        vector = [(b - 128) / 128 for b in hashlib.sha256(orjson.dumps(item)).digest()[:8]]
        embedding: Any = vector
        if req.get("encoding_format") == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    usage = {"prompt_tokens": _tokens(inputs), "total_tokens": _tokens(inputs)}
    return {"object": "list", "data": data, "model": model, "usage": usage}


def _response(req: Json, model: str, words: list[str]) -> Json:
    content = [{"type": "output_text", "text": " ".join(words), "annotations": []}]
    item = {"type": "message", "id": _id("msg_"), "role": "assistant", "status": "completed"}
    usage = _usage(_tokens(req.get("input")), len(words), ("input", "output"))
    response = {"id": _id("resp_"), "object": "response", "created_at": int(time.time())}
    response |= {"status": "completed", "model": model, "output": [item | {"content": content}]}
    return response | {"tool_choice": "auto", "tools": [], "usage": usage}


def _models(req: Json, model: str, words: list[str]) -> Json:
    entry = {"id": model, "object": "model", "created": 0, "owned_by": "llm-sidecar"}
    return {"object": "list", "data": [entry]}


_ROUTES = (
    _Route("/chat/completions", "POST", _chat_completion, _chat_stream),
    _Route("/messages", "POST", _message, _message_stream),
    _Route("/embeddings", "POST", _embeddings),
    _Route("/responses", "POST", _response),
    _Route("/models", "GET", _models),
)


def main(argv: list[str] | None = None) -> int:
    """`llm-sidecar fake-upstream`: serve until SIGINT/SIGTERM, printing the base URL first."""
    parser = argparse.ArgumentParser(prog="llm-sidecar fake-upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--error-status", type=int, default=500)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--model", default="fake-model")
    args = parser.parse_args(argv)
    fake = FakeUpstream(
        FakeUpstreamSettings(
            args.error_rate, args.error_status, args.latency_ms, args.seed, args.model
        )
    )
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(fake, args.host, args.port))
    return 0


async def _serve(fake: FakeUpstream, host: str, port: int) -> None:
    """Run `fake` until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(await fake.start(host, port), flush=True)
    try:
        await stop.wait()
    finally:
        await fake.stop()


if __name__ == "__main__":
    raise SystemExit(main())
