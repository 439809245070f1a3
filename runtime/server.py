"""`onnxlm serve`: an OpenAI-compatible HTTP API (FastAPI on uvicorn) over the continuous-batching engine.

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (the model's chat template), /health, /metrics
(Prometheus text). Requests and responses follow OpenAI's wire format, streaming as server-sent events. The
engine thread owns the ORT session; a request's tokens reach its handler through a queue, and turning them into
text (UTF-8-safe pieces, stop strings) runs in the threadpool, so the event loop never blocks on the model and the
engine never waits on a client. A client that disconnects cancels its request; a full queue is 429 with
Retry-After; a malformed request, a prompt past the context or an unknown model is 400 / 404 with OpenAI's error
JSON. Nothing here logs prompt text.
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Iterator
from typing import Literal

from pydantic import BaseModel, Field

from onnxlm.errors import OnnxlmError, first_line
from onnxlm.runtime.engine import Engine, EngineConfig, QueueFull, Stats
from onnxlm.runtime.tokenizer import cut_at_stop_strings

RETRY_AFTER_S = 1
END = object()  # the queue's last item: the request finished


class Generation:
    """One request's tokens as text: fed by the engine thread, read by a threadpool thread."""

    def __init__(self, engine: Engine, tokenizer, eos: tuple[int, ...], prompt_ids: list[int], max_tokens: int,
                 sampling, stops: list[str]):
        self.engine, self.tokenizer, self.eos, self.stops = engine, tokenizer, eos, stops
        self.tokens: queue.SimpleQueue = queue.SimpleQueue()
        self.finish_reason = "length"
        self.prompt_tokens, self.completion_tokens = len(prompt_ids), 0
        self.done = False  # every token the engine sent was read
        self.request = engine.submit(prompt_ids, max_tokens, sampling, self._on_token, stop_ids=eos)

    def _on_token(self, request, token) -> None:  # the engine thread
        if token is not None:
            self.tokens.put(token)
        if request.finished:
            self.tokens.put(END)

    def _ids(self) -> Iterator[int]:
        while (token := self.tokens.get()) is not END:
            self.completion_tokens += 1
            if token in self.eos:
                self.finish_reason = "stop"
                break
            yield token
        self.done = True

    def pieces(self) -> Iterator[str]:
        """Text pieces until EOS, max_tokens or a stop string (which ends the request early)."""
        text = cut_at_stop_strings(self.tokenizer.stream(self._ids()), self.stops)
        yield from text
        if not self.done:  # a stop string ended the text: free the slot now
            self.finish_reason = "stop"
            self.engine.cancel(self.request)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class Common(BaseModel):
    """The fields of a completion and a chat completion request that onnxlm reads (others are ignored)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)  # not supported: only the default
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)
    stream_options: dict | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says


class CompletionBody(Common):
    prompt: str | list[int]
    max_tokens: int | None = Field(16, ge=1)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(Common):
    messages: list[Message] = Field(min_length=1)


class Reply:
    """OpenAI's response shapes for one request: a completion or a chat completion, whole or as SSE chunks."""

    def __init__(self, model: str, chat: bool, stream: bool):
        self.model, self.chat, self.stream = model, chat, stream
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def choice(self, text: str | None, finish: str | None, first: bool = False) -> dict:
        if not self.chat:
            return {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}
        if self.stream:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    def envelope(self, choices: list, **extra) -> dict:
        kind = ("chat.completion.chunk" if self.stream else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def sse(self, choices: list, **extra) -> str:
        import json

        return f"data: {json.dumps(self.envelope(choices, **extra))}\n\n"


class PrometheusStats(Stats):
    """The engine's counters, plus TTFT and inter-token latency histograms, in one Prometheus registry."""

    __hash__ = object.__hash__  # a registry keys its collectors by identity; Stats is an (unhashable) dataclass

    def __init__(self):
        from prometheus_client import CollectorRegistry, Histogram

        super().__init__()
        self.registry = CollectorRegistry()
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.ttft_hist = Histogram("onnxlm_time_to_first_token_seconds", "TTFT per request", buckets=buckets,
                                   registry=self.registry)
        self.itl_hist = Histogram("onnxlm_inter_token_latency_seconds", "time between a request's tokens",
                                  buckets=buckets, registry=self.registry)
        self.engine: Engine | None = None  # set once the engine exists
        self.registry.register(self)

    def ttft(self, seconds: float) -> None:
        self.ttft_hist.observe(seconds)

    def itl(self, seconds: float) -> None:
        self.itl_hist.observe(seconds)

    def collect(self):  # prometheus_client's collector protocol: read at each scrape
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for name, doc, value in (("requests", "requests received", self.requests),
                                 ("requests_finished", "requests finished", self.finished),
                                 ("requests_cancelled", "requests cancelled by their client", self.cancelled),
                                 ("prompt_tokens", "prompt tokens received", self.prompt_tokens),
                                 ("generated_tokens", "tokens generated", self.generated_tokens)):
            yield CounterMetricFamily(f"onnxlm_{name}", doc, value=value)
        engine = self.engine
        if engine is None:  # registration asks before the engine exists
            return
        yield GaugeMetricFamily("onnxlm_queue_depth", "requests waiting for a slot", value=engine.queue_depth())
        yield GaugeMetricFamily("onnxlm_kv_slots_in_use", "KV cache slots decoding or prefilling",
                                value=engine.slots_in_use())
        yield GaugeMetricFamily("onnxlm_kv_slots", "KV cache slots", value=engine.config.slots)
        cache = engine.batch.prefix_cache
        if cache is not None:
            yield CounterMetricFamily("onnxlm_prefix_cache_hit_tokens", "prompt tokens restored", value=cache.hits)
            yield GaugeMetricFamily("onnxlm_prefix_cache_bytes", "bytes of cached K/V", value=cache.bytes)


def create_app(artifact, config: EngineConfig | None = None, model_name: str | None = None):
    """The FastAPI app serving `artifact` (an onnxlm.api.Artifact). Its engine thread starts here (a graph it
    cannot batch is an OnnxlmError now, not at the first request) and drains when the app shuts down."""
    import contextlib

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

    name = model_name or artifact.directory.name
    eos = tuple(artifact.info.eos_token_ids)
    stats = PrometheusStats()
    engine = stats.engine = Engine(artifact.session, config, stop_ids=eos, stats=stats)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await run_in_threadpool(engine.stop)  # SIGTERM: uvicorn stops intake, waits for responses; then drain

    app = FastAPI(title="onnxlm", lifespan=lifespan)
    app.state.engine = engine

    def error(status: int, message: str, kind: str, headers: dict | None = None, code: str | None = None):
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc):
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or "body"
        return error(400, f"{where}: {first.get('msg', 'invalid')}", "invalid_request_error")

    def sampling_of(body: Common):
        """The artifact's default decoding with the request's settings on top; temperature 0 is greedy."""
        if body.temperature == 0:
            return None
        overrides = {k: v for k, v in (("temperature", body.temperature), ("top_p", body.top_p),
                                      ("seed", body.seed)) if v is not None}
        return artifact.default_decoding(**overrides).sampling

    def start(body: Common, prompt_ids: list[int], default_max: int) -> Generation | JSONResponse:
        if body.model != name:
            return error(404, f"the model '{body.model}' does not exist: this server has '{name}'",
                         "invalid_request_error", code="model_not_found")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        max_tokens = body.max_tokens or max(1, min(default_max, engine.capacity - len(prompt_ids)))
        try:
            return Generation(engine, artifact.tokenizer, () if body.ignore_eos else eos, prompt_ids, max_tokens,
                              sampling_of(body), stops)
        except QueueFull as exc:
            return error(429, str(exc), "rate_limit_exceeded", {"Retry-After": str(RETRY_AFTER_S)})
        except OnnxlmError as exc:
            return error(400, str(exc), "invalid_request_error")

    async def run(body: Common, prompt_ids: list[int], default_max: int, chat: bool):
        gen = start(body, prompt_ids, default_max)
        if isinstance(gen, JSONResponse):
            return gen
        reply = Reply(name, chat, body.stream)
        if not body.stream:
            try:
                text = await run_in_threadpool(lambda: "".join(gen.pieces()))
            finally:
                gen.engine.cancel(gen.request)  # a no-op once finished
            return JSONResponse(reply.envelope([reply.choice(text, gen.finish_reason)], usage=gen.usage()))

        async def events():
            try:
                if chat:
                    yield reply.sse([reply.choice(None, None, first=True)])
                async for piece in iterate_in_threadpool(gen.pieces()):
                    yield reply.sse([reply.choice(piece, None)])
                yield reply.sse([reply.choice(None if chat else "", gen.finish_reason)])
                if (body.stream_options or {}).get("include_usage"):
                    yield reply.sse([], usage=gen.usage())
                yield "data: [DONE]\n\n"
            finally:  # a client that went away closes this generator: free its slot
                gen.engine.cancel(gen.request)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        if not engine.accepting:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "onnxlm"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        try:
            ids = body.prompt if isinstance(body.prompt, list) else artifact.tokenizer.encode(body.prompt)
        except OnnxlmError as exc:
            return error(400, str(exc), "invalid_request_error")
        if any(not 0 <= t < artifact.info.vocab_size for t in ids):
            return error(400, "prompt: a token id is outside the vocabulary", "invalid_request_error")
        return await run(body, ids, 16, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        try:
            ids = artifact.prompt_ids([m.model_dump() for m in body.messages])
        except OnnxlmError as exc:
            return error(400, str(exc), "invalid_request_error")
        except Exception as exc:  # a template that fails on these messages (jinja raises its own errors)
            return error(400, f"the chat template cannot render these messages: {first_line(exc)}",
                         "invalid_request_error")
        return await run(body, ids, 1 << 30, chat=True)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(stats.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(directory, host: str = "127.0.0.1", port: int = 8000, config: EngineConfig | None = None,
          threads: int | None = None, model_name: str | None = None, log_level: str = "info") -> None:
    """Load the artifact and serve it until SIGINT / SIGTERM (which finish the requests in flight)."""
    import uvicorn

    from onnxlm.api import load

    artifact = load(directory, threads=threads)
    uvicorn.run(create_app(artifact, config, model_name), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=60)

