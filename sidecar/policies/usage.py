"""LLM token accounting: estimate a request before it is sent, read the real usage after.

Pure functions and small incremental parsers over bytes; nothing here raises on bad input, so
a body that is not JSON (or not an LLM API shape) never fails a request, it is just not counted.

Estimates (see :func:`estimate_tokens`): the prompt is the text of the prompt-bearing fields
divided by ``accounting.chars_per_token`` (rounded up), or tiktoken's count when tiktoken is
installed and knows the model; plus :data:`MESSAGE_OVERHEAD_TOKENS` per message or input item,
one token per token id in a completions ``prompt``, :data:`MEDIA_TOKENS` per image, audio or
file part, and the JSON of ``tools``/``functions``/``response_format`` as text. The completion
reservation is ``max_completion_tokens``/``max_tokens``/``max_output_tokens`` (else
``accounting.default_max_tokens``), times ``n``/``best_of``; 0 for embeddings and for bodies
with no prompt. A body that is empty or not a JSON object is estimated (None, 0, 0): it is not
LLM text we can count (multipart audio, a GET), and reconciling with the real usage, when the
response reports one, charges it afterwards.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

from sidecar.config.model import Accounting, Price

MEDIA_TOKENS = 1600  # one image/audio/file part: about a 1-megapixel image on either API
MESSAGE_OVERHEAD_TOKENS = 4  # role and separators around each message
MAX_CHOICES = 128
MAX_RECORD_BYTES = 16 * 1024 * 1024  # an SSE record larger than this is passed on unparsed

_PROMPT_KEYS = ("system", "instructions", "messages", "prompt", "input")
_JSON_TEXT_KEYS = ("tools", "functions", "response_format")
_MAX_TOKEN_KEYS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_MEDIA_TYPES = frozenset(
    {"image_url", "image", "input_image", "input_audio", "audio", "file", "input_file"}
)
_SKIP_KEYS = frozenset(
    {"type", "role", "id", "call_id", "tool_call_id", "tool_use_id", "cache_control", "signature"}
)

try:
    _tiktoken: Any = importlib.import_module("tiktoken")
except ImportError:  # optional
    _tiktoken = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one exchange used: prompt (input, cache reads and writes included) and completion."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def estimate_tokens(
    body: bytes, accounting: Accounting, *, path: str | None = None
) -> tuple[str | None, int, int]:
    """(model, prompt estimate, completion reservation) of a request body; see the module doc.

    `path` (the upstream request path), when given, tells embeddings apart exactly; without it
    a body with ``input`` and no ``messages``/``prompt`` is taken for embeddings when it has
    ``encoding_format`` or ``dimensions`` or its model name contains "embed".
    """
    obj = _loads(body)
    if not isinstance(obj, dict):
        return None, 0, 0
    model = obj.get("model")
    model = model if isinstance(model, str) else None
    texts: list[str] = []
    fixed = 0
    for key in _PROMPT_KEYS:
        value = obj.get(key)
        if value is None:
            continue
        if key in ("messages", "input") and isinstance(value, list):
            fixed += MESSAGE_OVERHEAD_TOKENS * sum(1 for item in value if isinstance(item, dict))
        fixed += _collect(value, texts)
    for key in _JSON_TEXT_KEYS:
        if obj.get(key) is not None:
            texts.append(_dumps(obj[key]))
    prompt = fixed + _count(texts, model, accounting.chars_per_token)
    if not any(key in obj for key in ("messages", "prompt", "input")):
        return model, prompt, 0
    if _is_embeddings(obj, model, path):
        return model, prompt, 0
    completion = accounting.default_max_tokens
    for key in _MAX_TOKEN_KEYS:
        value = _int(obj.get(key))
        if value is not None:
            completion = value
            break
    choices = max(_int(obj.get("n")) or 1, _int(obj.get("best_of")) or 1)
    return model, prompt, completion * min(choices, MAX_CHOICES)


def usage_from_json(body: bytes) -> Usage | None:
    """The usage of a JSON response (OpenAI chat/completions/embeddings/responses, Anthropic)."""
    return usage_and_model_from_json(body)[0]


MODEL_SCAN_BYTES = 4 * 1024 * 1024  # larger request bodies are not parsed just to name the model


def requested_model(body: bytes) -> str | None:
    """The top-level ``model`` of a JSON request body (None if absent, not JSON, or too big).

    The one place a request body is read for its model: routing by model, the model rewrite,
    and the model label of metrics and logs all go through here.
    """
    if not body or body[:1] != b"{" or len(body) > MODEL_SCAN_BYTES:
        return None
    obj = _loads(body)
    model = obj.get("model") if isinstance(obj, dict) else None
    return model if isinstance(model, str) and model else None


def usage_and_model_from_json(body: bytes) -> tuple[Usage | None, str | None]:
    """The usage of a JSON response and the model it names (the one that really answered)."""
    obj = _loads(body)
    if not isinstance(obj, dict):
        return None, None
    return _usage_in(obj), _model_in(obj)


class StreamUsageScanner:
    """Reads the usage of an SSE response as it passes; feed it the upstream bytes unchanged.

    Understands the OpenAI ``include_usage`` chunk (the last chunk with a ``usage`` object),
    the Responses API's ``response.completed``, and Anthropic's ``message_start`` (input and
    cache tokens) and ``message_delta`` (cumulative output tokens). Records may be split across
    chunks anyhow; lines may end in LF, CRLF or CR. Only records mentioning "usage" are parsed.
    """

    __slots__ = ("_split", "_prompt", "_completion", "model")

    def __init__(self) -> None:
        self._split = _SseSplitter()
        self._prompt: int | None = None
        self._completion: int | None = None
        self.model: str | None = None  # named by the usage records, when they do

    @property
    def usage(self) -> Usage | None:
        """The usage seen so far (None until a usage record arrived)."""
        if self._prompt is None and self._completion is None:
            return None
        return Usage(self._prompt or 0, self._completion or 0)

    def feed(self, chunk: bytes) -> None:
        if self._split.at_boundary() and chunk.endswith(b"\n\n") and not _mentions_usage(chunk):
            # Whole records, none with a usage count: nothing to read and nothing to carry
            # over, so skip splitting it line by line (most chunks of a stream, one event each).
            return
        for _raw, payload, _ in self._split.feed(chunk):
            if payload is not None:
                self._payload(payload)

    def close(self) -> None:
        """End of stream: also read a last record that lacks its blank line."""
        _raw, payload = self._split.close()
        if payload is not None:
            self._payload(payload)

    def _payload(self, payload: bytes) -> None:
        if not _mentions_usage(payload):
            return
        obj = _loads(payload)
        if not isinstance(obj, dict):
            return
        self.model = _model_in(obj) or self.model
        kind = obj.get("type")
        if kind == "message_delta":  # Anthropic: cumulative counts; input fields optional
            usage = obj.get("usage")
            if isinstance(usage, dict):
                if _int(usage.get("output_tokens")) is not None:
                    self._completion = _int(usage.get("output_tokens"))
                if _int(usage.get("input_tokens")) is not None:
                    self._prompt = _anthropic_prompt(usage)
            return
        found = _usage_in(obj)
        if found is not None:
            self._prompt, self._completion = found.prompt_tokens, found.completion_tokens


def add_include_usage(body: bytes, *, path: str | None = None) -> bytes | None:
    """For a streamed OpenAI chat/completions request that does not ask for usage, the body
    with ``stream_options.include_usage: true``; else None (send the body unchanged).

    Call it only for OpenAI-shaped upstreams (Anthropic rejects unknown fields); `path`, when
    given, must end in ``/chat/completions`` or ``/completions``. A None result means the client
    asked for usage itself (or this is not such a request): do not strip the usage chunk then.
    Without ``stream_options`` the key is spliced in after the opening brace and every other
    byte is kept; an existing ``stream_options`` object means re-serialising the JSON (same
    keys and values, whitespace may differ). Either way the caller must update Content-Length.
    """
    if path is not None and not path.rstrip("/").endswith("/completions"):
        return None
    obj = _loads(body)
    if not isinstance(obj, dict) or obj.get("stream") is not True:
        return None
    if "messages" not in obj and "prompt" not in obj:
        return None
    options = obj.get("stream_options")
    if options is None and "stream_options" not in obj:
        brace = len(body) - len(body.lstrip())  # the object's "{": splice, keep every byte
        return body[: brace + 1] + b'"stream_options":{"include_usage":true},' + body[brace + 1 :]
    if options is not None and (not isinstance(options, dict) or options.get("include_usage")):
        return None
    obj["stream_options"] = {**(options or {}), "include_usage": True}
    try:
        return orjson.dumps(obj)
    except (TypeError, ValueError):
        return None


class UsageChunkStripper:
    """Removes the injected OpenAI usage chunk (``"choices": []`` with a ``usage`` object) from
    an SSE stream, passing every other byte unchanged.

    Each completed record is emitted by the `feed` call that completes it; only the current
    incomplete record is held back. Call :meth:`close` at the end of the stream for the rest.
    """

    __slots__ = ("_split", "_dropped")

    def __init__(self) -> None:
        self._split = _SseSplitter()
        self._dropped = False

    def feed(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        for raw, payload, is_record in self._split.feed(chunk):
            if not is_record and raw == b"\n" and self._dropped:
                continue  # the LF of a CRLF whose CR ended the dropped record
            self._dropped = is_record and _is_usage_chunk(payload)
            if not self._dropped:
                out.append(raw)
        return b"".join(out)

    def close(self) -> bytes:
        raw, payload = self._split.close()
        return b"" if _is_usage_chunk(payload) else raw


def cost_usd(model: str | None, usage: Usage, prices: Mapping[str, Price]) -> float | None:
    """Cost of `usage` at the price of `model`: exact name first, then the longest price name
    that prefixes it (so "gpt-4o-mini" prices "gpt-4o-mini-2024-07-18"; "" prices anything).
    None when unpriced. Cache reads and writes count at the input price."""
    if model is None:
        return None
    price = prices.get(model)
    if price is None:
        names = [name for name in prices if model.startswith(name)]
        if not names:
            return None
        price = prices[max(names, key=len)]
    return (
        usage.prompt_tokens * price.input_per_mtok + usage.completion_tokens * price.output_per_mtok
    ) / 1_000_000


# -- SSE record splitting ------------------------------------------------------------------

_EOL = re.compile(rb"\r\n|\r|\n")


class _SseSplitter:
    """Splits an SSE byte stream into records (up to and including the blank line) without
    altering bytes, and collects each record's ``data`` payload (lines joined with LF).

    `feed` returns (raw bytes, payload or None, is_record) pieces whose raw bytes concatenate
    to exactly the input consumed; is_record is False for bytes passed on unparsed (the LF of
    a CRLF split from its CR after a record ended, or an oversized record).
    """

    __slots__ = ("_buf", "_pos", "_data", "_cr", "_overflow", "_midline")

    def __init__(self) -> None:
        self._buf = bytearray()  # bytes of the current, incomplete record
        self._pos = 0  # start of the current line in _buf
        self._data: list[bytes] = []
        self._cr = False  # the last line ended with a CR at the end of the input
        self._overflow = False  # the current record was flushed unparsed
        self._midline = False  # ... in the middle of a line

    def at_boundary(self) -> bool:
        """Nothing held: the next byte starts a new record (no partial line or CR pending)."""
        return not self._buf and not self._cr and not self._midline and not self._overflow

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes | None, bool]]:
        out: list[tuple[bytes, bytes | None, bool]] = []
        if self._cr:
            self._cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
                if self._buf:
                    self._buf += b"\n"
                    self._pos += 1
                else:
                    out.append((b"\n", None, False))
        self._buf += chunk
        while (match := _EOL.search(self._buf, self._pos)) is not None:
            start, end = match.span()
            if end == len(self._buf) and match.group() == b"\r":
                self._cr = True
            line = bytes(self._buf[self._pos : start])
            self._pos = end
            if self._midline:
                self._midline = False
            elif line:
                if not self._overflow:
                    self._field(line)
            else:
                raw = bytes(self._buf[:end])
                del self._buf[:end]
                self._pos = 0
                payload = b"\n".join(self._data) if self._data and not self._overflow else None
                out.append((raw, payload, not self._overflow))
                self._data, self._overflow = [], False
        if len(self._buf) > MAX_RECORD_BYTES:
            self._midline = self._pos < len(self._buf)
            out.append((bytes(self._buf), None, False))
            self._buf.clear()
            self._pos = 0
            self._data, self._overflow = [], True
        return out

    def close(self) -> tuple[bytes, bytes | None]:
        """The bytes still held, and the payload of that last record if it is whole lines."""
        raw = bytes(self._buf)
        if self._pos < len(self._buf) and not self._overflow and not self._midline:
            self._field(raw[self._pos :])
        payload = b"\n".join(self._data) if self._data and not self._overflow else None
        self._buf.clear()
        self._pos = 0
        self._data = []
        return raw, payload

    def _field(self, line: bytes) -> None:
        if line.startswith(b":"):
            return
        name, _, value = line.partition(b":")
        if name == b"data":
            self._data.append(value[1:] if value.startswith(b" ") else value)


# -- helpers -------------------------------------------------------------------------------


def _mentions_usage(data: bytes) -> bool:
    """Whether `data` may hold a usage count: "usage" other than OpenAI's per-chunk
    ``"usage":null`` (every chunk of a stream that asked for usage carries one)."""
    mentions = data.count(b"usage")
    return mentions > data.count(b'"usage":null') + data.count(b'"usage": null')


def _loads(body: bytes) -> object:
    if not body:
        return None
    try:
        return orjson.loads(body)
    except (ValueError, TypeError):
        return None


def _dumps(value: object) -> str:
    try:
        return orjson.dumps(value).decode()
    except (TypeError, ValueError):
        return ""


def _int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _collect(value: object, texts: list[str]) -> int:
    """Append the text under `value` to `texts`; return its fixed token count (ids, media)."""
    fixed = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, bool):
            continue
        elif isinstance(item, int):
            fixed += 1  # a token id (completions prompt)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            if item.get("type") in _MEDIA_TYPES:
                fixed += MEDIA_TOKENS
                continue
            source = item.get("source")
            if item.get("type") == "document" and isinstance(source, dict):
                data = source.get("data")
                if source.get("type") == "text" and isinstance(data, str):
                    texts.append(data)  # a plain-text document counts as its text
                else:
                    fixed += MEDIA_TOKENS
                continue
            stack.extend(v for k, v in item.items() if k not in _SKIP_KEYS)
    return fixed


def _count(texts: list[str], model: str | None, chars_per_token: float) -> int:
    if not texts:
        return 0
    counter = _tokenizer_for(model) if model else None
    if counter is not None:
        try:
            return sum(counter(text) for text in texts)
        except Exception:  # a tokenizer failure must not fail the request
            pass
    return math.ceil(sum(len(text) for text in texts) / chars_per_token)


@lru_cache(maxsize=64)
def _tokenizer_for(model: str) -> Callable[[str], int] | None:
    """tiktoken's counter for `model`, or None (not installed, unknown model, load failed)."""
    if _tiktoken is None:
        return None
    try:
        encoding = _tiktoken.encoding_for_model(model)
    except Exception:
        return None

    def count(text: str) -> int:
        return len(encoding.encode(text, disallowed_special=()))

    return count


def _is_embeddings(obj: dict[str, Any], model: str | None, path: str | None) -> bool:
    if path is not None:
        return path.rstrip("/").endswith("/embeddings")
    if "messages" in obj or "prompt" in obj:
        return False
    return (
        "encoding_format" in obj
        or "dimensions" in obj
        or (model is not None and "embed" in model.lower())
    )


def _usage_in(obj: dict[str, Any]) -> Usage | None:
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        inner = obj.get("response") or obj.get("message")  # Responses event, Anthropic start
        usage = inner.get("usage") if isinstance(inner, dict) else None
    if not isinstance(usage, dict):
        return None
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        return Usage(_int(prompt) or 0, _int(completion) or 0)
    if "input_tokens" in usage or "output_tokens" in usage:
        return Usage(_anthropic_prompt(usage), _int(usage.get("output_tokens")) or 0)
    return None


def _model_in(obj: dict[str, Any]) -> str | None:
    model = obj.get("model")
    if not isinstance(model, str):
        inner = obj.get("response") or obj.get("message")  # Responses event, Anthropic start
        model = inner.get("model") if isinstance(inner, dict) else None
    return model if isinstance(model, str) and model else None


def _anthropic_prompt(usage: dict[str, Any]) -> int:
    """Input tokens, with Anthropic's cache writes and reads (absent on OpenAI Responses,
    whose cached tokens are already inside input_tokens)."""
    keys = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    return sum(_int(usage.get(key)) or 0 for key in keys)


def _is_usage_chunk(payload: bytes | None) -> bool:
    if payload is None or b'"usage"' not in payload or b'"choices"' not in payload:
        return False
    obj = _loads(payload)
    return isinstance(obj, dict) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict)
