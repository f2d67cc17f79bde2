"""An OpenAI-compatible HTTP server for a gptkit model (FastAPI + uvicorn).

    gptkit serve runs/demo --port 8000 [--api-key KEY] [--max-batch 32] [--max-queue 256]

Endpoints: GET /v1/models and /v1/models/{id}, POST /v1/completions (streaming with
server-sent events), POST /v1/tokenize, GET /health, GET /metrics (Prometheus text),
GET / (the playground).
Decoding runs in `gptkit.batching.Scheduler`'s thread, never on the event loop; the
loop only validates requests, turns tokens into text and writes responses.

Requests are validated before any model work against the named limits in
`gptkit.completions`; a bad request gets OpenAI's error shape,
{"error": {"message", "type", "param", "code"}}.

    >>> app = create_app(model, tokenizer, "demo")   # then uvicorn.run(app)
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from gptkit.batching import Finished, PromptLogprobs, QueueFull, Scheduler, Sequence, Token
from gptkit.completions import (
    APIError,
    Choice,
    CompletionRequest,
    TokenizeRequest,
    parse,
    prompt_ids,
    read_json,
    refuse_unsupported,
    sampling_params,
)
from gptkit.generate import Tokenizer
from gptkit.model import GPT

# --- the app ---------------------------------------------------------------------------------


def create_app(
    model: GPT,
    tokenizer: Tokenizer,
    model_name: str,
    api_key: str | None = None,
    max_batch: int = 32,
    max_queue: int = 256,
    kv_dtype: torch.dtype | None = None,
) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the scheduler thread. `kv_dtype`:
    what the KV cache stores (default: the parameters' dtype)."""
    scheduler = Scheduler(model, tokenizer.eot_id, max_batch, max_queue, kv_dtype)
    context, vocab = model.config.context_length, model.config.vocab_size
    created = int(time.time())
    mailbox: Mailbox | None = None
    requests_by_status: dict[int, int] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal mailbox
        mailbox = Mailbox(asyncio.get_running_loop())
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="gptkit", lifespan=lifespan)
    app.state.scheduler = scheduler

    def count(status: int) -> None:
        requests_by_status[status] = requests_by_status.get(status, 0) + 1

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        # The scheme is case-insensitive (RFC 7235). Headers arrive decoded as latin-1, so
        # encoding back gives the bytes sent; compare_digest takes as long for any wrong key.
        sent = key.strip().encode("latin-1")
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent, api_key.encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')")

    def error_response(
        request: Request, e: APIError, headers: dict[str, str] | None = None
    ) -> JSONResponse:
        """OpenAI's error shape; the errors of /v1/completions are counted for /metrics."""
        if request.url.path == "/v1/completions":
            count(e.status)
        response = e.response()
        response.headers.update(headers or {})  # e.g. 405's Allow
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(request, e)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        """Unknown routes (404) and methods (405) in OpenAI's error shape, not Starlette's."""
        error = APIError(e.status_code, f"{e.detail}: {request.method} {request.url.path}")
        return error_response(request, error, e.headers)

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception) -> JSONResponse:
        error = APIError(500, f"internal error: {type(e).__name__}", code="server_error")
        return error_response(request, error)

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> str:
        return (files("gptkit") / "playground.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = scheduler.alive
        return JSONResponse({"status": "ok" if ok else "down"}, status_code=200 if ok else 503)

    card = {
        "id": model_name,
        "object": "model",
        "created": created,
        "owned_by": "gptkit",
        "max_model_len": context,
    }

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model_card(request: Request, model_id: str) -> dict[str, Any]:
        """What `client.models.retrieve` asks for."""
        check_key(request)
        if model_id != model_name:
            raise APIError(404, f"model {model_id!r} not found", "model", "model_not_found")
        return card

    @app.post("/v1/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        check_key(request)
        req = parse(TokenizeRequest, await read_json(request))
        ids = prompt_ids(CompletionRequest(prompt=req.prompt), tokenizer, vocab)[0]
        if not req.prompt:
            ids = []
        return {"tokens": ids, "count": len(ids), "max_model_len": context}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        return render_metrics(scheduler, requests_by_status)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        check_key(request)
        req = parse(CompletionRequest, await read_json(request))
        refuse_unsupported(req)
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"model {req.model!r} not found", "model", "model_not_found")
        prompts = prompt_ids(req, tokenizer, vocab)
        params = sampling_params(req, max(map(len, prompts)), context)
        n = 1 if req.n is None else req.n
        most = scheduler.max_queue + scheduler.max_batch
        if len(prompts) * n > most:  # a 429 would be retried in vain
            raise APIError(
                400,
                f"{len(prompts)} prompts x n={n} sequences; this server holds at most {most}",
                param="n",
            )
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        events: asyncio.Queue = asyncio.Queue()
        seqs, choices = [], []
        for p, ids in enumerate(prompts):
            prefix = tokenizer.decode(ids) if req.echo else ""
            for j in range(n):
                index = p * n + j
                seed = torch.seed() if params.seed is None else params.seed + j
                gen = torch.Generator(device=scheduler.device).manual_seed(seed)

                def emit(ev: Token | PromptLogprobs | Finished, index: int = index) -> None:
                    mailbox.put(events, (index, ev))

                seqs.append(Sequence(ids, params, emit, gen))
                choices.append(Choice(index, tokenizer, prefix, stops))
        try:
            scheduler.submit(seqs)
        except QueueFull:
            raise APIError(429, "the server is busy; retry shortly", code="queue_full") from None
        meta = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
        }
        usage = {
            "prompt_tokens": sum(len(ids) for ids in prompts),  # once per prompt, as OpenAI
            "completion_tokens": 0,
        }
        run = Run(seqs, choices, events, want_logprobs=req.logprobs is not None)
        if req.stream:
            count(200)  # the status goes out with the first chunk; errors come later
            return EventStream(run, meta)
        await run.wait(request)
        if failed := [c for c in choices if c.finish_reason == "error"]:
            raise APIError(500, f"generation failed: {failed[0].error}", code="server_error")
        count(200)
        usage["completion_tokens"] = sum(len(c.ids) for c in choices)
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        body = [
            {
                "text": c.prefix + c.text,
                "index": c.index,
                "logprobs": c.logprobs(c.tokens, c.offsets) if run.want_logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ]
        return {**meta, "choices": body, "usage": usage}

    return app


class EventStream(StreamingResponse):
    """The SSE response of a `Run`; its sequences are cancelled however the response ends.

    A client that leaves is noticed on the next write (or by Starlette's disconnect
    listener), which ends this response before the generator itself is closed: cancel
    here, so the scheduler frees the slots at its next step, not when the GC runs.
    """

    def __init__(self, run: Run, meta: dict[str, Any]) -> None:
        super().__init__(
            run.sse(meta), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self.run = run

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.cancel()


DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is there


class Mailbox:
    """Hands events from the scheduler thread to the event loop, one wake-up per batch.

    `loop.call_soon_threadsafe` per token would wake the loop (a self-pipe write) once per
    sequence per step; here everything put during one step goes over in one callback.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.items: list[tuple[asyncio.Queue, Any]] = []
        self.scheduled = False

    def put(self, queue: asyncio.Queue, item: Any) -> None:
        """Called from any thread."""
        with self.lock:
            self.items.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, item in items:
            queue.put_nowait(item)


class Run:
    """One request's sequences in flight: routes their events into their `Choice`s."""

    def __init__(
        self,
        seqs: list[Sequence],
        choices: list[Choice],
        events: asyncio.Queue,
        want_logprobs: bool,
    ) -> None:
        self.seqs, self.choices, self.events = seqs, choices, events
        self.want_logprobs = want_logprobs
        self.open = len(seqs)

    def cancel(self) -> None:
        for seq in self.seqs:
            seq.cancel()  # the scheduler frees their slots before its next step

    def _handle(self, index: int, ev: Token | PromptLogprobs | Finished) -> Choice | None:
        """Feed one event to its choice; the choice when it may have something to send."""
        choice = self.choices[index]
        if choice.finish_reason is not None:
            return None  # a late event after a stop string
        if isinstance(ev, PromptLogprobs):
            choice.set_prompt(ev)  # goes out with the choice's first chunk
            return None
        if isinstance(ev, Token):
            if choice.add(ev):
                self.seqs[index].cancel()
                self.open -= 1
        else:
            choice.finish(ev.reason, ev.message)
            self.open -= 1
        return choice

    async def wait(self, request: Request) -> None:
        """Collect every choice; give up (and free the slots) if the client leaves."""
        checked = time.monotonic()
        try:
            while self.open > 0:
                try:
                    index, ev = await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S)
                    self._handle(index, ev)
                except asyncio.TimeoutError:
                    pass
                if time.monotonic() - checked >= DISCONNECT_POLL_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
        finally:
            self.cancel()

    async def sse(self, meta: dict[str, Any]) -> AsyncIterator[str]:
        """Server-sent events: one chunk per choice update, then `data: [DONE]`.

        Events that queued up while the client (or the loop) lagged go out as one chunk
        per choice: the same text and tokens, fewer writes.
        """
        try:
            while self.open > 0:
                batch = [await self.events.get()]
                while not self.events.empty():
                    batch.append(self.events.get_nowait())
                updated = {}  # index -> choice, in order of first update
                for index, ev in batch:
                    if (choice := self._handle(index, ev)) is not None:
                        updated.setdefault(index, choice)
                for choice in updated.values():
                    if (chunk := self._chunk(choice)) is not None:
                        yield f"data: {json.dumps({**meta, 'choices': [chunk]})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()  # also when the client disconnected mid-stream

    def _chunk(self, choice: Choice) -> dict[str, Any] | None:
        """What a choice has to send now, or None."""
        text, tokens, offsets = choice.delta()
        if not text and not tokens and choice.finish_reason is None:
            return None
        logprobs = choice.logprobs(tokens, offsets) if self.want_logprobs else None
        if choice.prefix_pending:  # echo: the prompt comes first
            text, choice.prefix_pending = choice.prefix + text, False
        return {
            "text": text,
            "index": choice.index,
            "logprobs": logprobs,
            "finish_reason": choice.finish_reason,
        }


def render_metrics(scheduler: Scheduler, requests_by_status: dict[int, int]) -> str:
    """Prometheus text exposition format."""
    s = scheduler.stats
    lines = [
        "# HELP gptkit_requests_total Completion requests, by HTTP status.",
        "# TYPE gptkit_requests_total counter",
        *(f'gptkit_requests_total{{status="{k}"}} {v}' for k, v in requests_by_status.items()),
        "# HELP gptkit_queue_depth Sequences waiting for a slot.",
        "# TYPE gptkit_queue_depth gauge",
        f"gptkit_queue_depth {scheduler.queue_depth}",
        "# HELP gptkit_active_sequences Sequences holding a slot.",
        "# TYPE gptkit_active_sequences gauge",
        f"gptkit_active_sequences {scheduler.n_active}",
    ]
    with s.lock:
        lines += [
            "# HELP gptkit_tokens_generated_total Tokens sampled.",
            "# TYPE gptkit_tokens_generated_total counter",
            f"gptkit_tokens_generated_total {s.tokens_generated}",
            *s.batch_size.lines("gptkit_batch_size", "Sequences per decode step."),
            *s.ttft.lines(
                "gptkit_time_to_first_token_seconds", "From queueing to the first token."
            ),
        ]
    return "\n".join(lines) + "\n"


def serve(
    path: str,
    host: str,
    port: int,
    api_key: str | None,
    max_batch: int,
    max_queue: int,
    device: str = "cpu",
    weights: str = "fp32",
    kv_cache: str = "fp32",
) -> None:
    """Load a model directory (weights fp32, bf16 or int8) and serve it until interrupted;
    the KV cache holds fp32 or bf16 (`kv_cache`)."""
    from pathlib import Path

    import uvicorn

    from gptkit.checkpoint import load
    from gptkit.model import KV_CACHE_DTYPES
    from gptkit.quantize import quantize_model

    model, tokenizer = load(path, device=device)
    model = quantize_model(model, weights)
    name, kv_dtype = Path(path).resolve().name, KV_CACHE_DTYPES[kv_cache]
    app = create_app(model, tokenizer, name, api_key, max_batch, max_queue, kv_dtype)
    uvicorn.run(app, host=host, port=port, log_level="warning")
