"""The OpenAI completions protocol: request limits and checks, tokens to response text.

Everything here runs on the server's event loop and does no model work: a request is
parsed and checked against the named limits (`MAX_*`) before anything is queued, and
`Choice` turns one sequence's tokens into text pieces (held-back partial UTF-8 characters
and possible stop-string prefixes, cut at a stop string) and OpenAI's logprobs object.
Optional values are defaulted with `is None`, so `temperature=0` means greedy.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from gptkit.batching import PromptLogprobs, SamplingParams, Token
from gptkit.generate import Tokenizer

MAX_BODY_BYTES = 1 << 20  # 1 MiB of JSON is far more than any prompt that fits the context
MAX_PROMPTS = 32  # prompts in one request (a list of strings or of token-id lists)
MAX_N = 16  # choices per prompt
MAX_STOP = 4  # stop strings, as OpenAI
MAX_STOP_CHARS = 256  # length of one stop string
MAX_LOGPROBS = 5  # top alternatives per token, as OpenAI
MAX_SEED = 2**63 - 1 - MAX_N  # choice i is seeded seed + i, within manual_seed's range
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


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool | None = None


class CompletionRequest(BaseModel):
    """The fields of OpenAI's /v1/completions we honour, and those we refuse unless they
    hold their default (`refuse_unsupported`); others are ignored. Strict types."""

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
    # OpenAI's, not implemented: accepted only with their defaults
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    suffix: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream_options: StreamOptions | None = None


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
    except RecursionError:  # e.g. 100,000 nested brackets: fits the size limit
        raise APIError(400, "the body's JSON is nested too deeply", code="invalid_json") from None


def parse(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        if not err["loc"]:  # the body itself, e.g. a list where an object belongs
            raise APIError(400, err["msg"], code="invalid_type") from None
        # The request's field, not the union member tried last (`prompt`, not `prompt.str`)
        param = str(err["loc"][0])
        raise APIError(400, f"{param}: {err['msg']}", param=param, code="invalid_type") from None


def check_range(name: str, value: float, lo: float, hi: float) -> None:
    """Refuse a value outside [lo, hi]; written so that NaN (JSON may hold it), which fails
    every comparison, is refused too."""
    if not lo <= value <= hi:
        raise APIError(400, f"{name} must be in [{lo}, {hi}], got {value}", param=name)


# OpenAI fields gptkit does not implement, with the values that ask for nothing (accepted):
# any other is refused, not ignored, so a client never silently gets other behaviour.
UNSUPPORTED_DEFAULTS = {
    "logit_bias": ({}, None),
    "best_of": (1, None),
    "suffix": ("", None),
    "presence_penalty": (0, None),
    "frequency_penalty": (0, None),
}


def refuse_unsupported(req: CompletionRequest) -> None:
    """400 for an OpenAI field gptkit does not implement, given with a non-default value."""
    for name, defaults in UNSUPPORTED_DEFAULTS.items():
        if getattr(req, name) not in defaults:
            raise APIError(400, f"gptkit does not support {name}", param=name)
    if req.stream_options is not None and req.stream_options.include_usage:
        raise APIError(
            400, "gptkit does not support stream_options.include_usage", param="stream_options"
        )


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
    if max_tokens < 0:  # one too large is the context check's (context_length_exceeded)
        raise APIError(400, f"max_tokens must be >= 0, got {max_tokens}", param="max_tokens")
    check_range("temperature", temperature, 0.0, 2.0)
    if req.top_p is not None:  # 0 keeps only the most probable token, as OpenAI allows
        check_range("top_p", req.top_p, 0.0, 1.0)
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
    prompt_logprobs = bool(req.echo) and req.logprobs is not None
    return SamplingParams(
        max_tokens, temperature, req.top_k, top_p, req.logprobs, req.seed, prompt_logprobs
    )


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
        self.error = ""  # why the choice finished with "error"
        self.prefix_pending = bool(prefix)  # streaming: the echoed prompt not sent yet
        self.prompt_tokens: list[Token] = []  # echo with logprobs: the prompt, scored
        self.prompt_sent = False

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

    def finish(self, reason: str, message: str = "") -> None:
        if self.finish_reason is None:
            self.finish_reason, self.error = reason, message
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
        """The text and tokens not handed out yet (with their text offsets).

        A token goes out with the text it starts in: one that starts in held-back text may
        still be dropped by a stop string (`add`), so it waits until that text is final.
        """
        end = max(self._safe_len(), self.sent)
        text, self.sent = self.text[self.sent : end], end
        final = self.finish_reason is not None  # then every token left goes out
        n = self.tokens_sent
        while n < len(self.tokens) and (final or self.offsets[n] - len(self.prefix) < end):
            n += 1
        tokens = self.tokens[self.tokens_sent : n]
        offsets = self.offsets[self.tokens_sent : n]
        self.tokens_sent = n
        return text, tokens, offsets

    def set_prompt(self, event: PromptLogprobs) -> None:
        self.prompt_tokens = event.tokens

    def logprobs(self, tokens: list[Token], offsets: list[int]) -> dict[str, Any]:
        """OpenAI's logprobs object; the scored prompt (echo) leads the first one."""
        decode = self.tokenizer.decode
        if self.prompt_tokens and not self.prompt_sent:
            self.prompt_sent = True
            ids = [t.id for t in self.prompt_tokens]
            starts = [len(decode(ids[:i])) for i in range(len(ids))]
            tokens, offsets = [*self.prompt_tokens, *tokens], [*starts, *offsets]
        return {
            "tokens": [decode([t.id]) for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [
                None if t.top is None else {decode([i]): lp for i, lp in t.top} for t in tokens
            ],
            "text_offset": offsets,
        }
