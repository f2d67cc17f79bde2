"""Continuous batching: one scheduler thread decodes every active sequence together.

Each sequence owns a row (slot) of a `SlotKVCache`; the live rows are kept packed at
[0, B), so a decode step is one forward pass over idx (B, 1). Between steps the scheduler
drops sequences that finished or were cancelled (a client left: its slot is free before
the next step) and admits waiting ones: each is prefilled alone, exactly as
`gptkit.generate.stream` prefills, then joins the batch.

Determinism: a sequence samples with its own `torch.Generator` through the same
`sample_next` on its own (1, V) row of logits, so it consumes its generator exactly as
`gptkit sample` does for one prompt. `max_batch=1` turns batching off (the baseline).

Failures stay with their sequence: an exception while admitting or sampling one sequence
finishes only it, with `Finished("error")`; only a failed batched forward pass (shared by
every active sequence) finishes them all.

The server hands `Sequence`s to `Scheduler.submit` from the event loop and receives
`Token` / `Finished` events through each sequence's `emit` callback, which must be
thread-safe (the server wraps `loop.call_soon_threadsafe`).

    >>> sched = Scheduler(model, eot_id=tok.eot_id, max_batch=32, max_queue=256)
    >>> sched.start(); sched.submit([Sequence([1, 2, 3], SamplingParams(16), emit=print)])
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gptkit.generate import sample_next
from gptkit.model import GPT, KVCache, SlotKVCache


class QueueFull(Exception):
    """The waiting queue cannot take these sequences now (the server answers 429)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    logprobs: int | None = None  # how many top alternatives to report per token (0..5)
    seed: int | None = None
    prompt_logprobs: bool = False  # also report the prompt's tokens (echo with logprobs)


@dataclass(frozen=True)
class Token:
    """One generated token; logprobs are of the model's unfiltered distribution."""

    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # (id, logprob), most likely first (`scored`)


@dataclass(frozen=True)
class PromptLogprobs:
    """The prompt's own tokens scored by the model (the first has no logprob)."""

    tokens: list[Token]


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (end-of-text), "length" (max_tokens) or "error"
    message: str = ""


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Token | PromptLogprobs | Finished], None]
    generator: torch.Generator | None = None
    cancelled: bool = False  # set by the server (client gone, stop string hit)
    generated: int = 0
    last_token: int = -1
    submitted_at: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled = True


def scored(logits: torch.Tensor, token: int, k: int) -> Token:
    """`token` with its log-probability and the k most likely alternatives, from logits (V,).

    The alternatives always include `token` itself, last when it is not among the k (as
    OpenAI: "up to logprobs + 1 elements"; with k = 0, just the token).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (V,)
    top = torch.topk(logprobs, k)
    ids = top.indices.tolist()
    alternatives = list(zip(ids, top.values.tolist(), strict=True))
    logprob = float(logprobs[token])
    if token not in ids:
        alternatives.append((token, logprob))
    return Token(token, logprob, alternatives)


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, buckets: list[float]) -> None:
        self.buckets = sorted(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, help_text: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        total = 0
        for le, n in zip([*map(str, self.buckets), "+Inf"], self.counts, strict=True):
            total += n
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return [*out, f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class Stats:
    """What /metrics reports about the scheduler; updated under its lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokens_generated = 0
        self.steps = 0
        self.batch_size = Histogram([1, 2, 4, 8, 16, 32, 64, 128])
        self.ttft = Histogram([0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10])


class Scheduler:
    """The decoding thread. `submit` from any thread; events go out through `emit`."""

    def __init__(
        self,
        model: GPT,
        eot_id: int | None,
        max_batch: int,
        max_queue: int,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.model, self.eot_id = model.eval(), eot_id
        self.max_batch, self.max_queue = max_batch, max_queue
        param = next(model.parameters())
        # The KV caches' dtype: the parameters' unless asked (bf16 halves what they read).
        self.device, self.dtype = param.device, kv_dtype or param.dtype
        self.cache = SlotKVCache(model.config, max_batch, device=self.device, dtype=self.dtype)
        self.active: list[Sequence] = []  # row r of the cache belongs to active[r]
        self.waiting: deque[Sequence] = deque()
        self.admitting = 0  # taken from `waiting`, not yet in `active`
        self.cond = threading.Condition()
        self.stats = Stats()
        self._stop = False
        self._thread: threading.Thread | None = None

    # --- called from the server ---------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gptkit-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue all of `seqs` or none (QueueFull): a request's choices run together.

        Every sequence passes through `waiting`, so the free slots count too: with
        max_queue 0 an idle server still takes max_batch sequences.
        """
        with self.cond:
            free = self.max_batch - len(self.active) - self.admitting
            if len(self.waiting) + len(seqs) > self.max_queue + free:
                raise QueueFull(f"{len(self.waiting)} sequences already waiting")
            self.waiting.extend(seqs)
            self.cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def n_active(self) -> int:
        return len(self.active)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- the scheduler thread -----------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self._stop and not self.waiting and not self.active:
                    self.cond.wait()
                if self._stop:
                    return
                new = []
                while self.waiting and len(self.active) + len(new) < self.max_batch:
                    new.append(self.waiting.popleft())
                self.admitting = len(new)
            try:
                with torch.inference_mode():
                    for seq in new:
                        try:
                            self._admit(seq)
                        except Exception as e:  # this sequence's prefill or sampling only
                            self._fail(seq, e)
                        self.admitting -= 1
                    self._drop_finished()
                    if self.active:
                        self._decode_step()
                        self._drop_finished()
            except Exception as e:  # the shared forward pass: every active sequence failed
                for seq in self.active:
                    self._fail(seq, e)
                self.active.clear()
                self.admitting = 0

    @staticmethod
    def _fail(seq: Sequence, e: Exception) -> None:
        """Finish one sequence with an error; the server and the other sequences go on."""
        seq.emit(Finished("error", f"{type(e).__name__}: {e}"))
        seq.cancel()

    def _admit(self, seq: Sequence) -> None:
        """1. prefill one sequence alone, sample its first token, give it a slot."""
        p = seq.params
        if seq.cancelled:
            return
        if p.max_tokens == 0 and not p.prompt_logprobs:
            seq.emit(Finished("length"))
            seq.cancel()
            return
        ids = torch.tensor([seq.prompt_ids], dtype=torch.long, device=self.device)  # (1, T)
        prefill = KVCache(
            self.model.config, 1, ids.shape[1], self.device, self.dtype, ring_buffers=False
        )
        h = self.model.hidden_states(ids, prefill)  # (1, T, C)
        if p.prompt_logprobs and p.logprobs is not None:
            seq.emit(self._prompt_logprobs(seq, h[0]))
        if p.max_tokens == 0:  # scoring the prompt only (echo, logprobs, max_tokens 0)
            seq.emit(Finished("length"))
            seq.cancel()
            return
        logits = self.model.lm_head(h[:, -1])  # (1, V): only the last position is unembedded
        self._sample(seq, logits)
        with self.stats.lock:
            self.stats.ttft.observe(time.perf_counter() - seq.submitted_at)
        if not seq.cancelled:
            self.cache.load(len(self.active), prefill)
            self.active.append(seq)

    def _prompt_logprobs(self, seq: Sequence, h: torch.Tensor) -> PromptLogprobs:
        """The prompt's tokens scored from its hidden states h (T, C)."""
        scores = self.model.lm_head(h[:-1])  # (T - 1, V): position t predicts t + 1
        k, ids = seq.params.logprobs, seq.prompt_ids
        rest = [scored(scores[t], ids[t + 1], k) for t in range(len(scores))]
        return PromptLogprobs([Token(ids[0]), *rest])

    def _decode_step(self) -> None:
        """2. one forward pass for every active row, each at its own position."""
        B = len(self.active)
        idx = torch.tensor([[s.last_token] for s in self.active], device=self.device)  # (B, 1)
        logits = self.model.next_logits(idx, self.cache)  # (B, V)
        with self.stats.lock:
            self.stats.batch_size.observe(B)
            self.stats.steps += 1
        for r, seq in enumerate(self.active):
            try:
                self._sample(seq, logits[r : r + 1])
            except Exception as e:  # one row's sampling: the others go on
                self._fail(seq, e)

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Draw the next token of one sequence from its (1, V) logits; emit it or finish."""
        p = seq.params
        token = int(sample_next(logits, p.temperature, p.top_k, p.top_p, seq.generator)[0])
        if token == self.eot_id:  # end-of-text is not part of the text (as `stream_text`)
            seq.emit(Finished("stop"))
            seq.cancel()
            return
        event = Token(token) if p.logprobs is None else scored(logits[0], token, p.logprobs)
        seq.generated += 1
        seq.last_token = token
        with self.stats.lock:
            self.stats.tokens_generated += 1
        seq.emit(event)
        if seq.generated >= p.max_tokens:
            seq.emit(Finished("length"))
            seq.cancel()
        elif len(seq.prompt_ids) + seq.generated >= self.cache.max_len:
            seq.emit(Finished("length"))  # the server checks this up front; never slide here
            seq.cancel()

    def _drop_finished(self) -> None:
        """3. free the slots of finished or cancelled sequences, keeping rows packed."""
        for r in range(len(self.active) - 1, -1, -1):
            if self.active[r].cancelled:
                last = len(self.active) - 1
                if r != last:
                    self.cache.move(last, r)
                    self.active[r] = self.active[last]
                self.active.pop()
