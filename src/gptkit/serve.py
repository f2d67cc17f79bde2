"""An OpenAI-compatible HTTP server for a gptkit model (FastAPI + uvicorn).

    gptkit serve runs/demo --port 8000 [--api-key KEY] [--max-batch 32] [--max-queue 256]

Endpoints: GET /v1/models, POST /v1/completions (streaming with server-sent events),
POST /v1/tokenize, GET /health, GET /metrics (Prometheus text), GET / (the playground).
Decoding runs in `gptkit.batching.Scheduler`'s thread, never on the event loop; the
loop only validates requests, turns tokens into text and writes responses.

Requests are validated before any model work against the named limits below; a bad
request gets OpenAI's error shape, {"error": {"message", "type", "param", "code"}}.

    >>> app = create_app(model, tokenizer, "demo")   # then uvicorn.run(app)
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from gptkit.batching import Finished, QueueFull, SamplingParams, Scheduler, Sequence, Token
from gptkit.generate import Tokenizer
from gptkit.model import GPT

MAX_BODY_BYTES = 1 << 20  # 1 MiB of JSON is far more than any prompt that fits the context
MAX_PROMPTS = 32  # prompts in one request (a list of strings or of token-id lists)
MAX_N = 16  # choices per prompt
MAX_STOP = 4  # stop strings, as OpenAI
MAX_STOP_CHARS = 256  # length of one stop string
MAX_LOGPROBS = 5  # top alternatives per token, as OpenAI
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range
RETRY_AFTER_S = 1  # what a 429 tells the client to wait
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class APIError(Exception):
    """A request the server refuses: HTTP status plus OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or {400: "invalid_request", 401: "invalid_api_key"}.get(status, "")

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 429: "rate_limit_error", 500: "server_error"}
        body = {
            "error": {
                "message": self.message,
                "type": kind.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code or None,
            }
        }
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 429 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


class CompletionRequest(BaseModel):
    """The fields of OpenAI's /v1/completions we honour (others are ignored); strict types."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]] = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # an extension (vLLM has it too)
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    logprobs: int | None = None
    echo: bool | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    prompt: str


# --- request checking ------------------------------------------------------------------------


async def read_json(request: Request) -> Any:
    """The body as JSON, refusing oversized bodies before reading (or while reading) them."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes", code="body_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None


def parse(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise APIError(400, f"{param}: {err['msg']}", param=param, code="invalid_type") from None


def check_range(name: str, value: float, lo: float, hi: float, lo_open: bool = False) -> None:
    if value < lo or value > hi or (lo_open and value == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise APIError(400, f"{name} must be in {bound}, got {value}", param=name)


def prompt_ids(req: CompletionRequest, tokenizer: Tokenizer, vocab: int) -> list[list[int]]:
    """The request's prompts as token-id lists (an empty prompt starts from end-of-text)."""
    p = req.prompt
    if isinstance(p, list) and not p:
        raise APIError(400, "prompt must not be an empty list", param="prompt")
    if isinstance(p, str) or isinstance(p[0], str):
        texts = [p] if isinstance(p, str) else p
        if len(texts) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts per request", param="prompt")
        if sum(map(len, texts)) > MAX_BODY_BYTES:
            raise APIError(400, "prompt too long", param="prompt")
        try:
            prompts = [tokenizer.encode(t) for t in texts]
        except Exception as e:  # e.g. a character outside a char tokenizer's vocabulary
            raise APIError(400, f"prompt cannot be tokenized: {e}", param="prompt") from None
    else:
        prompts = [p] if isinstance(p[0], int) else p
        if len(prompts) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts per request", param="prompt")
        for ids in prompts:
            if any(not 0 <= i < vocab for i in ids):
                raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
    out = []
    for ids in prompts:
        if not ids:
            if tokenizer.eot_id is None:
                raise APIError(400, "empty prompt and no end-of-text token", param="prompt")
            ids = [tokenizer.eot_id]  # as `stream_text`: GPT-2 was trained this way
        out.append(list(ids))
    return out


def sampling_params(req: CompletionRequest, longest_prompt: int, context: int) -> SamplingParams:
    """Defaults applied with `is None` (temperature 0 is greedy), then every range checked."""
    max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    temperature = 1.0 if req.temperature is None else req.temperature
    check_range("max_tokens", max_tokens, 0, context)
    check_range("temperature", temperature, 0.0, 2.0)
    if req.top_p is not None:
        check_range("top_p", req.top_p, 0.0, 1.0, lo_open=True)
    if req.top_k is not None:
        check_range("top_k", req.top_k, 1, 2**31 - 1)
    if req.n is not None:
        check_range("n", req.n, 1, MAX_N)
    if req.logprobs is not None:
        check_range("logprobs", req.logprobs, 0, MAX_LOGPROBS)
    if req.seed is not None:
        check_range("seed", req.seed, 0, MAX_SEED)
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > MAX_STOP or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise APIError(
            400, f"stop: at most {MAX_STOP} non-empty strings of <= {MAX_STOP_CHARS}", "stop"
        )
    if longest_prompt + max_tokens > context:
        raise APIError(
            400,
            f"this model's context is {context} tokens; the prompt has {longest_prompt} and "
            f"max_tokens asks for {max_tokens} more",
            param="max_tokens",
            code="context_length_exceeded",
        )
    top_p = None if req.top_p is None or req.top_p >= 1.0 else req.top_p
    return SamplingParams(max_tokens, temperature, req.top_k, top_p, req.logprobs, req.seed)


# --- turning tokens into text ----------------------------------------------------------------


class Choice:
    """One choice's text as its tokens arrive: held-back bytes, stop strings, logprobs."""

    def __init__(self, index: int, tokenizer: Tokenizer, prefix: str, stops: list[str]) -> None:
        self.index, self.tokenizer, self.prefix, self.stops = index, tokenizer, prefix, stops
        self.ids: list[int] = []
        self.text = ""  # the decoded new text, as far as it is final
        self.sent = 0  # characters of `text` already handed out
        self.decoded_len = 0  # len(decode(ids)) before the last token, for text_offset
        self.tokens: list[Token] = []
        self.offsets: list[int] = []
        self.tokens_sent = 0
        self.finish_reason: str | None = None
        self.prefix_pending = bool(prefix)  # streaming: the echoed prompt not sent yet

    def add(self, token: Token) -> bool:
        """Take one token; True when a stop string ended the choice."""
        self.offsets.append(len(self.prefix) + self.decoded_len)
        self.ids.append(token.id)
        self.tokens.append(token)
        full = self.tokenizer.decode(self.ids)
        self.decoded_len = len(full)
        self.text = full.rstrip("\ufffd")  # an incomplete UTF-8 character waits for the rest
        cut = min((i for s in self.stops if (i := self.text.find(s)) >= 0), default=None)
        if cut is not None:
            self.text = self.text[:cut]
            while self.tokens and self.offsets[-1] - len(self.prefix) >= cut:
                self.tokens.pop()  # tokens wholly after the stop string are not reported
                self.offsets.pop()
            self.finish_reason = "stop"
            return True
        return False

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            if reason != "error":
                self.text = self.tokenizer.decode(self.ids)  # flush a held-back tail
                self.text = self._cut_at_stop(self.text)

    def _cut_at_stop(self, text: str) -> str:
        cut = min((i for s in self.stops if (i := text.find(s)) >= 0), default=len(text))
        return text[:cut]

    def _safe_len(self) -> int:
        """How much of `text` can go out: hold back a tail that may begin a stop string."""
        if self.finish_reason is not None:
            return len(self.text)
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return len(self.text) - hold

    def delta(self) -> tuple[str, list[Token], list[int]]:
        """The text and tokens not handed out yet (with their text offsets)."""
        end = max(self._safe_len(), self.sent)
        text, self.sent = self.text[self.sent : end], end
        tokens = self.tokens[self.tokens_sent :]
        offsets = self.offsets[self.tokens_sent :]
        self.tokens_sent = len(self.tokens)
        return text, tokens, offsets

    def logprobs(self, tokens: list[Token], offsets: list[int]) -> dict[str, Any]:
        decode = self.tokenizer.decode
        return {
            "tokens": [decode([t.id]) for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{decode([i]): lp for i, lp in t.top or []} for t in tokens],
            "text_offset": offsets,
        }


# --- the app ---------------------------------------------------------------------------------


def create_app(
    model: GPT,
    tokenizer: Tokenizer,
    model_name: str,
    api_key: str | None = None,
    max_batch: int = 32,
    max_queue: int = 256,
) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the scheduler thread."""
    scheduler = Scheduler(model, tokenizer.eot_id, max_batch, max_queue)
    context, vocab = model.config.context_length, model.config.vocab_size
    created = int(time.time())
    requests_by_status: dict[int, int] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
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
        if request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')")

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        if request.url.path == "/v1/completions":
            count(e.status)
        return e.response()

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(e).__name__}", code="server_error").response()

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> str:
        return (files("gptkit") / "playground.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = scheduler.alive
        return JSONResponse({"status": "ok" if ok else "down"}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "gptkit"}
        return {"object": "list", "data": [{**card, "max_model_len": context}]}

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
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"model {req.model!r} not found", "model", "model_not_found")
        prompts = prompt_ids(req, tokenizer, vocab)
        params = sampling_params(req, max(map(len, prompts)), context)
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported", param="echo")
        n = 1 if req.n is None else req.n
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        seqs, choices = [], []
        for p, ids in enumerate(prompts):
            prefix = tokenizer.decode(ids) if req.echo else ""
            for j in range(n):
                index = p * n + j
                seed = torch.seed() if params.seed is None else params.seed + j
                gen = torch.Generator(device=scheduler.device).manual_seed(seed)

                def emit(ev: Token | Finished, index: int = index) -> None:
                    loop.call_soon_threadsafe(events.put_nowait, (index, ev))

                seqs.append(Sequence(ids, params, emit, gen))
                choices.append(Choice(index, tokenizer, prefix, stops))
        try:
            scheduler.submit(seqs)
        except QueueFull:
            raise APIError(429, "the server is busy; retry shortly", code="queue_full") from None
        count(200)
        meta = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
        }
        usage = {
            "prompt_tokens": sum(len(ids) for ids in prompts) * n,
            "completion_tokens": 0,
        }
        run = Run(seqs, choices, events, want_logprobs=req.logprobs is not None)
        if req.stream:
            return StreamingResponse(
                run.sse(meta), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        await run.wait(request)
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

    def _handle(self, index: int, ev: Token | Finished) -> Choice | None:
        choice = self.choices[index]
        if choice.finish_reason is not None:
            return None  # a late event after a stop string
        if isinstance(ev, Token):
            if choice.add(ev):
                self.seqs[index].cancel()
                self.open -= 1
        else:
            choice.finish(ev.reason)
            self.open -= 1
        return choice

    async def wait(self, request: Request) -> None:
        """Collect every choice; give up (and free the slots) if the client leaves."""
        try:
            while self.open > 0:
                try:
                    index, ev = await asyncio.wait_for(self.events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                self._handle(index, ev)
        finally:
            self.cancel()

    async def sse(self, meta: dict[str, Any]) -> AsyncIterator[str]:
        """Server-sent events: one chunk per choice update, then `data: [DONE]`."""
        try:
            while self.open > 0:
                index, ev = await self.events.get()
                choice = self._handle(index, ev)
                if choice is None:
                    continue
                text, tokens, offsets = choice.delta()
                if not text and not tokens and choice.finish_reason is None:
                    continue
                logprobs = choice.logprobs(tokens, offsets) if self.want_logprobs else None
                if choice.prefix_pending:  # echo: the prompt comes first
                    text, choice.prefix_pending = choice.prefix + text, False
                item = {
                    "text": text,
                    "index": index,
                    "logprobs": logprobs,
                    "finish_reason": choice.finish_reason,
                }
                yield f"data: {json.dumps({**meta, 'choices': [item]})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()  # also when the client disconnected mid-stream


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
) -> None:
    """Load a model directory and serve it until interrupted."""
    from pathlib import Path

    import uvicorn

    from gptkit.checkpoint import load

    model, tokenizer = load(path, device=device)
    app = create_app(model, tokenizer, Path(path).resolve().name, api_key, max_batch, max_queue)
    uvicorn.run(app, host=host, port=port, log_level="warning")
