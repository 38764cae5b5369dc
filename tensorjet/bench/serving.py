"""Serving mode: any OpenAI-compatible server, through a small asyncio HTTP/1.1 client (no extra
dependency) that timestamps every streamed `/v1/completions` chunk as it arrives.

Engine counters come from the server's Prometheus `/metrics` where it has them (tensorjet's and
vLLM's names are recognised); they are null otherwise.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from tensorjet.bench.datasets import BenchRequest
from tensorjet.bench.driver import Send
from tensorjet.bench.gpu_monitor import Probe
from tensorjet.bench.metrics import RequestRecord, ratio, speculation_numbers

# Metric names end with one of these, after any namespace ("tensorjet_", "vllm:") and "_total".
KV_USAGE_NAMES = ("kv_cache_usage", "kv_cache_usage_ratio", "kv_cache_usage_perc", "gpu_cache_usage_perc")
PREFIX_HIT_NAMES = ("prefix_cache_hits_tokens", "prefix_cache_hits")
PREFIX_QUERY_NAMES = ("prefix_cache_queries_tokens", "prefix_cache_queries")
PREEMPTION_NAMES = ("num_preemptions", "preemptions")
DRAFT_TOKEN_NAMES = ("spec_decode_num_draft_tokens",)
ACCEPTED_TOKEN_NAMES = ("spec_decode_num_accepted_tokens",)
DRAFT_STEP_NAMES = ("spec_decode_num_drafts",)


class HTTPError(Exception):
    pass


# ---- a minimal HTTP/1.1 client -------------------------------------------------------------------
async def _post(url: str, body: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, dict[str, str]]:
    """POST on a fresh connection; return the stream positioned at the body, and the response
    headers. Raises HTTPError (with the server's message) for a status other than 200."""
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    reader, writer = await asyncio.open_connection(
        parts.hostname, parts.port or (443 if secure else 80), ssl=secure or None, limit=2**20
    )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream, application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    status_line = (await reader.readline()).decode("latin-1").split(" ", 2)
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    status = int(status_line[1]) if len(status_line) > 1 else 0
    if status != 200:
        text = b"".join([piece async for piece in _body(reader, headers)]).decode(errors="replace")
        writer.close()
        raise HTTPError(f"HTTP {status} from {url}: {text[:500]}")
    return reader, writer, headers


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The response body as it arrives, chunked transfer encoding undone."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while size := int((await reader.readline()).split(b";")[0].strip() or b"0", 16):
            yield await reader.readexactly(size)
            await reader.readexactly(2)  # the CRLF after each chunk
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while piece := await reader.read(65536):
            yield piece


async def stream_events(url: str, payload: dict) -> AsyncIterator[dict]:
    """POST `payload` and yield each server-sent event's JSON `data` until `[DONE]`."""
    reader, writer, headers = await _post(url, json.dumps(payload).encode())
    buffer = b""
    try:
        async for piece in _body(reader, headers):
            buffer += piece
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                yield json.loads(data)
    finally:
        writer.close()


# ---- the benchmark client ------------------------------------------------------------------------
def sender(base_url: str, model: str | None) -> Send:
    """Streams each request from /v1/completions with usage included; greedy with ignore_eos (the
    vLLM / TensorRT-LLM extension) so outputs have exactly output_len tokens where supported."""
    url = base_url.rstrip("/") + "/v1/completions"

    async def send(request: BenchRequest) -> RequestRecord:
        payload = {
            "prompt": request.prompt,
            "max_tokens": request.output_len,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if model is not None:
            payload["model"] = model
        record = RequestRecord(start=time.perf_counter(), end=0.0)
        usage = None
        try:
            async for event in stream_events(url, payload):
                if event.get("choices"):
                    record.chunk_times.append(time.perf_counter())
                usage = event.get("usage") or usage
        except (OSError, HTTPError, ValueError, asyncio.IncompleteReadError) as error:
            record.error = f"{type(error).__name__}: {error}"
        record.end = time.perf_counter()
        record.prompt_tokens = usage["prompt_tokens"] if usage else _known_length(request.prompt)
        record.output_tokens = usage["completion_tokens"] if usage else len(record.chunk_times)
        return record

    return send


def _known_length(prompt: str | list[int]) -> int:
    """Token count of a prompt when the server reports no usage: exact for token ids, 0 for text."""
    return len(prompt) if isinstance(prompt, list) else 0


def served_model(base_url: str) -> str | None:
    """The first model the server lists at /v1/models; None if it lists none."""
    try:
        models = json.loads(get_text(base_url.rstrip("/") + "/v1/models")).get("data") or []
    except OSError as error:
        raise ValueError(f"cannot reach the server at {base_url}: {error}") from error
    return models[0]["id"] if models else None


def get_text(url: str, timeout_s: float = 5.0) -> str:
    """A plain GET, bypassing any proxy settings (the server is usually local)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout_s) as response:
        return response.read().decode()


# ---- server metrics ------------------------------------------------------------------------------
def parse_prometheus(text: str) -> dict[str, float]:
    """Metric name (labels dropped, values of one name summed) -> value."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name_part, _, rest = line.rpartition("}") if "}" in line else line.partition(" ")
        name = name_part.split("{")[0].strip()
        try:
            values[name] = values.get(name, 0.0) + float(rest.split()[0])
        except (IndexError, ValueError):
            continue
    return values


def find_metric(metrics: dict[str, float], suffixes: tuple[str, ...]) -> float | None:
    for name, value in metrics.items():
        bare = name.rsplit(":", 1)[-1].removesuffix("_total")
        if any(bare == s or bare.endswith("_" + s) for s in suffixes):
            return value
    return None


def server_metrics(base_url: str) -> dict[str, float]:
    """The server's /metrics, or {} where it has none."""
    try:
        return parse_prometheus(get_text(base_url.rstrip("/") + "/metrics"))
    except (OSError, ValueError):
        return {}


def kv_usage_probe(base_url: str) -> Probe:
    return lambda: find_metric(server_metrics(base_url), KV_USAGE_NAMES)


def server_counters(before: dict[str, float], after: dict[str, float]) -> dict:
    """Prefix-cache hit rate, preemptions and speculation during the run, from the server's counters."""

    def delta(names: tuple[str, ...]) -> float | None:
        start, end = find_metric(before, names), find_metric(after, names)
        return None if start is None or end is None else end - start

    hits, queries, preemptions = delta(PREFIX_HIT_NAMES), delta(PREFIX_QUERY_NAMES), delta(PREEMPTION_NAMES)
    return {
        "prefix_cache_hit_rate": None if hits is None or queries is None else ratio(hits, queries),
        "num_preemptions": None if preemptions is None else int(preemptions),
        **speculation_numbers(delta(DRAFT_TOKEN_NAMES), delta(ACCEPTED_TOKEN_NAMES), delta(DRAFT_STEP_NAMES)),
    }
