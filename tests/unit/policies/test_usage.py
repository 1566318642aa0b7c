"""Token estimates, usage from JSON and SSE, include_usage injection and stripping, cost."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import TypeVar

import orjson
import pytest

from sidecar.config.model import Accounting, Price
from sidecar.policies import usage as usage_mod
from sidecar.policies.usage import (
    MEDIA_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    StreamUsageScanner,
    Usage,
    UsageChunkStripper,
    add_include_usage,
    cost_usd,
    estimate_tokens,
    usage_from_json,
)

T = TypeVar("T")
ACC = Accounting(chars_per_token=4.0, default_max_tokens=1000)


def body(obj: object) -> bytes:
    return orjson.dumps(obj)


def sse(*payloads: object, eol: bytes = b"\n") -> list[bytes]:
    """One SSE record per payload (dicts as JSON, bytes as-is)."""
    records = []
    for payload in payloads:
        data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        records.append(b"data: " + data + eol + eol)
    return records


def feed_split(feed: Callable[[bytes], T], data: bytes, size: int) -> list[T]:
    return [feed(data[i : i + size]) for i in range(0, len(data), size)]


# -- estimate_tokens -----------------------------------------------------------------------


def test_estimate_openai_chat_string_and_parts() -> None:
    request = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "x" * 40},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "y" * 40},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64," + "A" * 9999},
                    },
                ],
            },
        ],
    }
    model, prompt, completion = estimate_tokens(body(request), ACC)
    assert model == "gpt-4o-mini"
    assert prompt == 20 + MEDIA_TOKENS + 2 * MESSAGE_OVERHEAD_TOKENS
    assert completion == 1000  # the configured default


def test_estimate_counts_tool_calls_and_tool_definitions() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    request = {
        "model": "m",
        "messages": [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "ab", "arguments": "cd"},
                    }
                ],
            },
        ],
        "tools": tools,
        "max_tokens": 10,
    }
    _, prompt, completion = estimate_tokens(body(request), ACC)
    chars = len("ab") + len("cd") + len(orjson.dumps(tools))
    assert prompt == MESSAGE_OVERHEAD_TOKENS + math.ceil(chars / 4)
    assert completion == 10


def test_estimate_completion_reservation_keys_and_choices() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert estimate_tokens(body({**base, "max_completion_tokens": 7, "max_tokens": 9}), ACC)[2] == 7
    assert estimate_tokens(body({**base, "max_tokens": 9}), ACC)[2] == 9
    assert estimate_tokens(body({**base, "max_tokens": 0}), ACC)[2] == 0
    assert estimate_tokens(body({**base, "max_tokens": "9"}), ACC)[2] == 1000  # bad: default
    assert estimate_tokens(body({**base, "max_tokens": 10, "n": 3}), ACC)[2] == 30
    assert estimate_tokens(body({**base, "max_tokens": 1, "n": 10**6}), ACC)[2] == 128


def test_estimate_completions_prompt_text_and_token_ids() -> None:
    assert estimate_tokens(body({"model": "m", "prompt": "z" * 41, "max_tokens": 5}), ACC) == (
        "m",
        11,
        5,
    )
    ids = {"model": "m", "prompt": [[1, 2, 3], [4, 5]], "max_tokens": 5, "best_of": 2}
    assert estimate_tokens(body(ids), ACC) == ("m", 5, 10)


def test_estimate_responses_api() -> None:
    text = {"model": "gpt-4.1", "input": "q" * 80, "max_output_tokens": 50}
    assert estimate_tokens(body(text), ACC) == ("gpt-4.1", 20, 50)
    items = {
        "model": "gpt-4.1",
        "instructions": "i" * 8,
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "t" * 8}]},
            {"type": "input_image", "image_url": "https://example.com/a.png"},
            {"type": "function_call_output", "call_id": "c" * 400, "output": "o" * 8},
        ],
    }
    model, prompt, completion = estimate_tokens(body(items), ACC)
    assert prompt == 3 * MESSAGE_OVERHEAD_TOKENS + MEDIA_TOKENS + 24 // 4  # ids, roles skipped
    assert completion == 1000


def test_estimate_embeddings_reserve_no_completion() -> None:
    by_path = {"model": "text-embedding-3-small", "input": ["a" * 8, "b" * 8]}
    assert estimate_tokens(body(by_path), ACC, path="/v1/embeddings") == (
        "text-embedding-3-small",
        4,
        0,
    )
    assert estimate_tokens(body(by_path), ACC)[2] == 0  # the model name says so
    by_field = {"model": "custom", "input": "abcd", "dimensions": 256}
    assert estimate_tokens(body(by_field), ACC)[2] == 0
    responses = {"model": "custom", "input": "abcd"}
    assert estimate_tokens(body(responses), ACC, path="/v1/responses")[2] == 1000


def test_estimate_anthropic_messages() -> None:
    request = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 256,
        "system": [{"type": "text", "text": "s" * 20, "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "u" * 20},
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "base64", "data": "B" * 5000}},
                    {"type": "document", "source": {"type": "text", "data": "d" * 20}},
                    {"type": "tool_result", "tool_use_id": "x" * 100, "content": "r" * 20},
                    {"type": "thinking", "thinking": "k" * 20, "signature": "S" * 500},
                ],
            },
        ],
    }
    model, prompt, completion = estimate_tokens(body(request), ACC)
    assert model == "claude-sonnet-4-5"
    assert prompt == 2 * MESSAGE_OVERHEAD_TOKENS + MEDIA_TOKENS + 5 * 20 // 4
    assert completion == 256


def test_estimate_non_llm_bodies_reserve_nothing() -> None:
    assert estimate_tokens(b"", ACC) == (None, 0, 0)
    assert estimate_tokens(b"--boundary\r\nContent-Disposition: form-data", ACC) == (None, 0, 0)
    assert estimate_tokens(b"[1, 2, 3]", ACC) == (None, 0, 0)
    assert estimate_tokens(b'{"model": "m", "purpose": "batch"}', ACC) == ("m", 0, 0)
    assert estimate_tokens(b'{"model": 5, "prompt": "abcd"}', ACC) == (None, 1, 1000)


def test_estimate_uses_a_tokenizer_when_one_knows_the_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def tokenizer_for(model: str) -> Callable[[str], int] | None:
        return (lambda text: 1) if model == "known" else None

    monkeypatch.setattr(usage_mod, "_tokenizer_for", tokenizer_for)
    request = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 1}
    assert estimate_tokens(body({**request, "model": "known"}), ACC)[1] == 1 + 4
    assert estimate_tokens(body({**request, "model": "other"}), ACC)[1] == 100 + 4

    def broken(text: str) -> int:
        raise RuntimeError("boom")

    monkeypatch.setattr(usage_mod, "_tokenizer_for", lambda model: broken)
    assert estimate_tokens(body({**request, "model": "known"}), ACC)[1] == 100 + 4


def test_estimate_deeply_nested_input_does_not_raise() -> None:
    nested = b'{"model":"m","messages":' + b"[" * 1000 + b'"abcd"' + b"]" * 1000 + b"}"
    assert estimate_tokens(nested, ACC) == ("m", 1, 1000)


# -- usage_from_json -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (  # OpenAI chat / completions
            {"object": "chat.completion", "usage": {"prompt_tokens": 11, "completion_tokens": 7}},
            Usage(11, 7),
        ),
        (  # OpenAI embeddings
            {"object": "list", "usage": {"prompt_tokens": 8, "total_tokens": 8}},
            Usage(8, 0),
        ),
        (  # OpenAI Responses: cached tokens are inside input_tokens already
            {
                "object": "response",
                "usage": {
                    "input_tokens": 20,
                    "input_tokens_details": {"cached_tokens": 10},
                    "output_tokens": 5,
                    "total_tokens": 25,
                },
            },
            Usage(20, 5),
        ),
        (  # Anthropic: cache writes and reads are prompt tokens too
            {
                "type": "message",
                "usage": {
                    "input_tokens": 3,
                    "cache_creation_input_tokens": 100,
                    "cache_read_input_tokens": 50,
                    "output_tokens": 9,
                },
            },
            Usage(153, 9),
        ),
    ],
)
def test_usage_from_json_shapes(response: object, expected: Usage) -> None:
    assert usage_from_json(body(response)) == expected
    assert expected.total == expected.prompt_tokens + expected.completion_tokens


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"null",
        b'{"usage": null}',
        b'{"usage": {"foo": 1}}',
        b"[1]",
        b'{"usage": "x"}',
        b"\xff\xfe",
    ],
)
def test_usage_from_json_without_usage(raw: bytes) -> None:
    assert usage_from_json(raw) is None


def test_usage_from_json_ignores_bad_numbers() -> None:
    raw = body({"usage": {"prompt_tokens": True, "completion_tokens": -3}})
    assert usage_from_json(raw) == Usage(0, 0)


# -- StreamUsageScanner --------------------------------------------------------------------


def chat_chunk(content: str) -> dict[str, object]:
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
        "usage": None,
    }


USAGE_CHUNK = {
    "id": "c",
    "object": "chat.completion.chunk",
    "choices": [],
    "usage": {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46},
}


def openai_stream(eol: bytes = b"\n") -> bytes:
    return b"".join(sse(chat_chunk("Hel"), chat_chunk("lo"), USAGE_CHUNK, b"[DONE]", eol=eol))


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 10_000])
def test_scanner_openai_include_usage_split_anywhere(eol: bytes, size: int) -> None:
    scanner = StreamUsageScanner()
    feed_split(scanner.feed, openai_stream(eol), size)
    assert scanner.usage == Usage(12, 34)


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
def test_scanner_one_record_per_chunk_skips_null_usage_and_reads_the_count(eol: bytes) -> None:
    # One event per chunk, as upstreams write them: chunks with "usage": null are skipped
    # whole, the usage record is read, whichever serialisation of null the upstream uses.
    null_spaced = b'data: {"choices": [{"delta": {"content": "x"}}], "usage": null}' + eol * 2
    records = [*sse(chat_chunk("Hel"), chat_chunk("lo"), eol=eol), null_spaced]
    records += sse(USAGE_CHUNK, b"[DONE]", eol=eol)
    scanner = StreamUsageScanner()
    for record in records:
        scanner.feed(record)
    scanner.close()
    assert scanner.usage == Usage(12, 34)


def test_scanner_without_usage_reports_none() -> None:
    scanner = StreamUsageScanner()
    scanner.feed(b"".join(sse(chat_chunk("a"), b"[DONE]")))
    scanner.close()
    assert scanner.usage is None


def test_scanner_responses_api_completed_event() -> None:
    stream = (
        b"event: response.created\n"
        + sse({"type": "response.created", "response": {"id": "r", "usage": None}})[0]
        + b"event: response.output_text.delta\n"
        + sse({"type": "response.output_text.delta", "delta": "usage"})[0]
        + b"event: response.completed\n"
        + sse(
            {
                "type": "response.completed",
                "response": {"id": "r", "usage": {"input_tokens": 9, "output_tokens": 4}},
            }
        )[0]
    )
    scanner = StreamUsageScanner()
    feed_split(scanner.feed, stream, 5)
    assert scanner.usage == Usage(9, 4)


def test_scanner_anthropic_message_start_and_cumulative_delta() -> None:
    start = {
        "type": "message_start",
        "message": {
            "id": "msg",
            "usage": {
                "input_tokens": 10,
                "cache_creation_input_tokens": 5,
                "cache_read_input_tokens": 20,
                "output_tokens": 1,
            },
        },
    }
    records = [
        b"event: message_start\n" + sse(start)[0],
        b"event: ping\n" + sse({"type": "ping"})[0],
        b"event: content_block_delta\n"
        + sse({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hi"}})[0],
        b"event: message_delta\n"
        + sse({"type": "message_delta", "delta": {}, "usage": {"output_tokens": 15}})[0],
        b"event: message_delta\n"
        + sse({"type": "message_delta", "delta": {}, "usage": {"output_tokens": 42}})[0],
        b"event: message_stop\n" + sse({"type": "message_stop"})[0],
    ]
    scanner = StreamUsageScanner()
    feed_split(scanner.feed, b"".join(records), 3)
    assert scanner.usage == Usage(35, 42)
    late = {
        "type": "message_delta",
        "usage": {"input_tokens": 11, "cache_read_input_tokens": 20, "output_tokens": 50},
    }
    scanner.feed(sse(late)[0])
    assert scanner.usage == Usage(31, 50)


def test_scanner_multiline_data_and_missing_final_blank_line() -> None:
    scanner = StreamUsageScanner()
    scanner.feed(b': comment\ndata: {"choices": [],\ndata:"usage": {"prompt_tokens": 1,')
    scanner.feed(b' "completion_tokens": 2}}')
    assert scanner.usage is None
    scanner.close()
    assert scanner.usage == Usage(1, 2)


# -- add_include_usage ---------------------------------------------------------------------


def test_add_include_usage_to_a_stream_without_it() -> None:
    request = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hé"}], "stream": True}
    rewritten = add_include_usage(body(request))
    assert rewritten is not None
    assert orjson.loads(rewritten) == {**request, "stream_options": {"include_usage": True}}
    keep = {**request, "stream_options": {"include_obfuscation": False}}
    rewritten = add_include_usage(body(keep), path="/v1/chat/completions")
    assert rewritten is not None
    assert orjson.loads(rewritten)["stream_options"] == {
        "include_obfuscation": False,
        "include_usage": True,
    }
    raw = b' \n{"prompt": "x", "stream": true, "seed": 123456789012345678901234}'
    assert add_include_usage(raw) == (
        b' \n{"stream_options":{"include_usage":true},"prompt": "x", "stream": true, '
        b'"seed": 123456789012345678901234}'
    )  # spliced: every other byte kept, even a number orjson would not round-trip
    off = {**request, "stream_options": {"include_usage": False}}
    assert orjson.loads(add_include_usage(body(off)) or b"")["stream_options"] == {
        "include_usage": True
    }


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (
            body(
                {
                    "model": "m",
                    "messages": [],
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
            ),
            None,
        ),  # noqa: E501
        (body({"model": "m", "messages": []}), None),
        (body({"model": "m", "messages": [], "stream": "yes"}), None),
        (body({"model": "m", "input": "x", "stream": True}), None),
        (body({"model": "m", "messages": [], "stream": True}), "/v1/messages"),
        (body({"model": "m", "messages": [], "stream": True, "stream_options": 3}), None),
        (b"not json", None),
        (b"", None),
    ],
)
def test_add_include_usage_leaves_other_requests_alone(raw: bytes, path: str | None) -> None:
    assert add_include_usage(raw, path=path) is None


# -- UsageChunkStripper --------------------------------------------------------------------


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("size", [1, 2, 5, 13, 10_000])
def test_stripper_removes_only_the_usage_record(eol: bytes, size: int) -> None:
    keepalive = b": keep-alive" + eol + eol
    before = sse(chat_chunk("Hel"), chat_chunk("lo"), eol=eol)
    after = sse(b"[DONE]", eol=eol)
    stream = b"".join([keepalive, *before, *sse(USAGE_CHUNK, eol=eol), *after])
    stripper = UsageChunkStripper()
    out = b"".join(feed_split(stripper.feed, stream, size)) + stripper.close()
    assert out == b"".join([keepalive, *before, *after])


def test_stripper_keeps_pacing_and_holds_only_the_incomplete_record() -> None:
    first, second = sse(chat_chunk("a"), chat_chunk("b"))
    stripper = UsageChunkStripper()
    assert stripper.feed(first) == first
    assert stripper.feed(second[:10]) == b""
    assert stripper.feed(second[10:] + b"data: [DO") == second  # emitted once complete
    assert stripper.feed(b"NE]\n\n") == b"data: [DONE]\n\n"
    assert stripper.close() == b""


def test_stripper_passes_a_usage_chunk_with_choices_and_a_usage_null() -> None:
    records = sse(
        {"choices": [{"delta": {}}], "usage": {"prompt_tokens": 1}},
        {"choices": [], "usage": None},
        {"choices": [], "prompt_filter_results": []},
    )
    stripper = UsageChunkStripper()
    assert stripper.feed(b"".join(records)) == b"".join(records)


def test_stripper_close_flushes_an_unterminated_tail_unchanged() -> None:
    stripper = UsageChunkStripper()
    assert stripper.feed(b"data: partial") == b""
    assert stripper.close() == b"data: partial"


def test_stripper_passes_oversized_records_through(monkeypatch: pytest.MonkeyPatch) -> None:
    usage_record = sse(USAGE_CHUNK)[0]
    big = b"data: " + b"x" * 200 + b"\n" + b"data: more\n\n"
    monkeypatch.setattr(usage_mod, "MAX_RECORD_BYTES", len(usage_record) + 10)
    stream = big + usage_record
    stripper = UsageChunkStripper()
    out = b"".join(feed_split(stripper.feed, stream, 50)) + stripper.close()
    assert out == big


# -- cost_usd ------------------------------------------------------------------------------


PRICES = {
    "gpt-4o": Price(input_per_mtok=2.5, output_per_mtok=10),
    "gpt-4o-mini": Price(input_per_mtok=0.15, output_per_mtok=0.60),
}


def test_cost_exact_then_longest_prefix() -> None:
    used = Usage(1_000_000, 500_000)
    assert cost_usd("gpt-4o-mini", used, PRICES) == pytest.approx(0.45)
    assert cost_usd("gpt-4o-mini-2024-07-18", used, PRICES) == pytest.approx(0.45)
    assert cost_usd("gpt-4o-2024-08-06", used, PRICES) == pytest.approx(7.5)
    assert cost_usd("claude-3", used, PRICES) is None
    assert cost_usd(None, used, PRICES) is None
    fallback = {**PRICES, "": Price(input_per_mtok=1, output_per_mtok=1)}
    assert cost_usd("claude-3", used, fallback) == pytest.approx(1.5)


# -- garbage never raises ------------------------------------------------------------------


def test_garbage_input_never_raises() -> None:
    rng = random.Random(1234)
    samples = [rng.randbytes(rng.randrange(0, 300)) for _ in range(300)]
    fragments = [b"data:", b"{", b"}", b'"usage"', b'"choices":[]', b"\r", b"\n", b"[", b"1e999"]
    samples += [b"".join(rng.choice(fragments) for _ in range(40)) for _ in range(300)]
    samples += [
        b'{"messages": 5, "input": {"type": 3}, "prompt": [true, null, 1.5], "n": -1}',
        b'{"messages": [{"content": [{"type": "document", "source": "x"}]}]}',
        b'{"usage": {"input_tokens": "many"}, "type": "message_delta"}',
        b'{"model": "m", "messages": [], "tools": [1], "max_tokens": 1e400}',
    ]
    scanner, stripper = StreamUsageScanner(), UsageChunkStripper()
    for sample in samples:
        estimate_tokens(sample, ACC)
        usage_from_json(sample)
        add_include_usage(sample)
        scanner.feed(sample)
        stripper.feed(sample)
    scanner.close()
    stripper.close()


def test_requested_model_reads_only_json_bodies_within_the_cap():
    from sidecar.policies.usage import MODEL_SCAN_BYTES, requested_model

    assert requested_model(b'{"model": "gpt-4o", "messages": []}') == "gpt-4o"
    assert requested_model(b'{"messages": []}') is None
    assert requested_model(b'{"model": 3}') is None
    assert requested_model(b"not json") is None
    assert requested_model(b"{broken") is None
    big = b'{"model": "m", "pad": "' + b"x" * MODEL_SCAN_BYTES + b'"}'
    assert requested_model(big) is None
