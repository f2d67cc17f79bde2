"""Sampling and autoregressive generation: filters, a token stream, text streaming.

Sampling is pure functions with an explicit `torch.Generator`. The order of operations
on the next-token logits is fixed, and stated here once:

    temperature -> top-k -> top-p -> softmax -> sample

`temperature == 0` means greedy (argmax); ties go to the lowest token id everywhere
(argmax, top-k and top-p all break ties by id), so `top_k=1` is greedy too.

`stream` is the one decoding loop: it yields the next token of every row per step.
`generate` collects it into a tensor; `stream_text` decodes it into text pieces.

    >>> g = torch.Generator().manual_seed(0)
    >>> out = generate(model, idx, max_new_tokens=50, top_k=40, top_p=0.9, generator=g)
    >>> for piece in stream_text(model, tokenizer, "Once upon", 100, seed=0):
    ...     print(piece, end="", flush=True)

Context window. Positions are absolute (learned or sinusoidal vectors are added at the
input), so every token is conditioned on at most the last `context_length` tokens, placed
at positions [0, context_length). A longer prompt keeps its last `context_length` tokens,
and generation past the context slides that window. The plain reference (`use_cache=False`)
re-runs the model on the window at every step. With the KV cache, each step within the
context costs one token; once the window slides every cached key sits at a stale position,
so the cache is rebuilt from the current window in one forward pass per new token. That is
exactly the reference's computation (cached and uncached decoding agree token for token,
also past the context) at the reference's cost: a step past the context processes
`context_length` tokens instead of one. A cheaper scheme that re-fills the cache with
half a window and then appends to it for half a window of steps would amortise that,
but it conditions tokens on a different window than the reference, so it is not used.
Only the last position is ever unembedded (`GPT.next_logits`).
"""

from __future__ import annotations

import math
import numbers
import sys
import types
from collections.abc import Generator, Iterator
from typing import Any, Protocol

import numpy as np
import torch

from gptkit.errors import GptkitError
from gptkit.model import GPT, KVCache, SlotKVCache, has_hooks


class Tokenizer(Protocol):
    """What `stream_text` needs from a tokenizer."""

    eot_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def validate_sampling(
    max_new_tokens: int,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
) -> None:
    """Raise GptkitError (one line) for a sampling setting that cannot work."""
    if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise GptkitError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    # Written so that NaN (which fails every comparison) and inf fail the check too.
    if not 0 <= temperature < math.inf:
        raise GptkitError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise GptkitError(f"top_k must be >= 1 (or unset), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:  # False for NaN too
        raise GptkitError(f"top_p must be in (0, 1] (or unset), got {top_p}")


# top-p ranks only this many of the most probable tokens first; a full sort of 50,257
# probabilities took ~5 ms on the dev machine's CPU, as long as an int8 gpt2 decode step.
TOP_P_CANDIDATES = 1024


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits of each row, set the rest to -inf.

    logits (..., V) -> (..., V). Ties at the k-th value go to the lowest token ids.
    """
    if k >= logits.shape[-1]:
        return logits
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top_k_ids(logits, k), True)
    return logits.masked_fill(~keep, float("-inf"))


def top_k_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The ids of the k largest logits of each row, ascending: (..., V) -> (..., k), k < V.

    Ties at the k-th value go to the lowest ids (`torch.topk` alone picks any of them).
    On a CPU through numpy, whose `partition` finds a row's k-th largest value in linear
    time: 70 us for 50,257 entries on the dev machine, where `torch.topk` took ~470 us and
    this function ~770 us (`gptkit sample`'s default top-k 200 then cost a tenth of an
    int8 gpt2 token).
    """
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
        ids = _top_k_rows(logits.detach().reshape(-1, logits.shape[-1]).numpy(), k)
        if ids is not None:
            return torch.from_numpy(ids).view(*logits.shape[:-1], k)
    values, ids = torch.topk(logits, k, dim=-1)
    kth = values[..., -1:]  # (..., 1)
    tied = logits == kth
    if bool((tied.sum(dim=-1) == (values == kth).sum(dim=-1)).all()):
        return ids.sort(dim=-1).values  # every tie at the k-th value is a candidate already
    # Everything above the k-th value, then the lowest tied ids for the places left.
    above = logits > kth
    room = k - above.sum(dim=-1, keepdim=True)  # >= 1
    keep = above | (tied & (torch.cumsum(tied, dim=-1) <= room))  # exactly k per row
    return keep.nonzero()[:, -1].view(*logits.shape[:-1], k)  # row-major: ids ascending


def _top_k_rows(rows: np.ndarray, k: int) -> np.ndarray | None:
    """top_k_ids for the rows of a (R, V) array: int64 (R, k); None when a row holds NaN
    (it has no place in an order: torch's path handles it)."""
    V = rows.shape[-1]
    out = np.empty((rows.shape[0], k), dtype=np.int64)
    for i, row in enumerate(rows):
        kth = np.partition(row, V - k)[V - k]  # the k-th largest value
        ids = np.flatnonzero(row >= kth)  # ascending; NaNs never compare true
        if ids.size > k:  # ties at the k-th value: the lowest ids fill the places left
            above = ids[row[ids] > kth]
            tied = ids[row[ids] == kth][: k - above.size]
            ids = np.sort(np.concatenate([above, tied]))
        if ids.size != k:
            return None
        out[i] = ids
    return out


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most probable tokens whose mass reaches p.

    logits (..., V) -> (..., V), removed entries set to -inf. Tokens are ranked by
    probability, equal ones by token id, and a token is kept when the mass of the tokens
    ranked above it (a float32 running sum) is still below p: the token that crosses p is
    kept, and when a prefix sums exactly to p nothing after it is.

    Only the TOP_P_CANDIDATES most probable tokens are ranked when the mass strictly above
    the least probable of them already reaches p in every row (then nothing below can be
    kept, and the ranking above it is the full one); otherwise the whole vocabulary is.
    The most probable token is always kept, whatever p (0 keeps just it).
    """
    if p >= 1.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)  # (..., V)
    V = probs.shape[-1]
    if V > 2 * TOP_P_CANDIDATES:
        ids = top_k_ids(probs, TOP_P_CANDIDATES)  # ascending, as the full sort ranks ties
        values = probs.gather(-1, ids)
        sorted_probs, order = torch.sort(values, dim=-1, descending=True, stable=True)
        order = ids.gather(-1, order)
        mass_before = _exclusive_cumsum(sorted_probs)
        # The mass before the first candidate tied with the least probable one.
        above = (sorted_probs > sorted_probs[..., -1:]).sum(dim=-1, keepdim=True)
        if bool((mass_before.gather(-1, above) >= p).all()):
            keep = torch.zeros_like(probs, dtype=torch.bool)
            keep.scatter_(-1, order, _nucleus(mass_before, p))
            return logits.masked_fill(~keep, float("-inf"))
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    keep_sorted = _nucleus(_exclusive_cumsum(sorted_probs), p)
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def _nucleus(mass_before: torch.Tensor, p: float) -> torch.Tensor:
    """Which ranked tokens top-p keeps, from the mass before each (..., N) -> bool (..., N).

    The first is kept even when `0 < p` fails: p = 0, or a tiny p that rounds to 0 when
    compared with float32 masses, would keep nothing, and nothing can be sampled.
    """
    keep = mass_before < p
    keep[..., 0] = True
    return keep


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    """[0, x0, x0 + x1, ...] along the last dimension: non-decreasing for x >= 0."""
    total = torch.cumsum(x, dim=-1)
    return torch.cat([torch.zeros_like(total[..., :1]), total[..., :-1]], dim=-1)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from next-token logits (B, V) -> ids (B,).

    temperature -> top-k -> top-p -> softmax -> sample; temperature 0 is argmax.
    `generator` (on the logits' device) makes the draw reproducible.
    """
    if temperature == 0:
        return greedy(logits)
    logits = logits.float()  # float32: bf16 logits lose too much in softmax
    # Shift each row's maximum to 0 first (softmax does not change): logits / 1e-40 would
    # overflow to inf and softmax give NaN, where this gives 0 for the maximum and about
    # -inf for the rest, i.e. greedy. A temperature below float32's smallest normal number is
    # raised to it, since as a float32 divisor it would round to 0 (and 0 / 0 is NaN).
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    logits = shifted / max(temperature, torch.finfo(torch.float32).tiny)
    logits, ids = filter_candidates(logits, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)  # filtered entries are exactly 0
    picked = draw(probs, generator)  # (B,)
    return picked if ids is None else ids.gather(-1, picked[:, None]).squeeze(-1)


def filter_candidates(
    logits: torch.Tensor, top_k: int | None, top_p: float | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Top-k, then top-p on the k survivors: (logits with the cut ones at -inf, their ids).

    With top-k the result covers only the k survivors, (B, k), and `ids` (B, k) maps them
    back to the vocabulary (ascending; ties rank by id); without it, (B, V) and None.
    """
    ids = None
    if top_k is not None and top_k < logits.shape[-1]:
        ids = top_k_ids(logits, top_k)
        logits = logits.gather(-1, ids)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits, ids


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The first maximum of each row (ties go to the lowest id): (B, V) -> ids (B,).

    On a CPU through numpy, whose vectorized argmax took 7 us per 50,257-entry row on the
    dev machine where torch.argmax took ~100 us (a tenth of an int8 gpt2 decode step).
    """
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(logits.detach().numpy().argmax(axis=-1))
    return torch.argmax(logits, dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs (B, V) (non-negative, any positive total), drawn with
    probability probs[i] / total: ids (B,).

    Inverse transform sampling: the first i whose float64 running sum exceeds u, with u
    uniform in [0, total). A zero-probability token is never drawn (its running sum equals
    its predecessor's), and u < total (a 53-bit uniform times total rounds below total),
    so some token always is. torch.multinomial took ~1.6 ms per 50,257-token row here.
    """
    cdf = torch.cumsum(probs.double(), dim=-1)  # (B, V)
    total = cdf[:, -1:]
    if not bool(((total > 0) & torch.isfinite(total)).all()):  # NaN logits, say
        raise ValueError("cannot sample: the probabilities hold inf or NaN, or sum to 0")
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator)
    return torch.searchsorted(cdf, u * total, right=True).squeeze(-1)  # (B,)


def _check_prompt(model: GPT, idx: torch.Tensor) -> None:
    if idx.dim() != 2 or idx.shape[0] == 0 or idx.shape[1] == 0:
        shape = tuple(idx.shape)
        raise GptkitError(f"the prompt must be a non-empty (batch, time) tensor, got {shape}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise GptkitError(f"the prompt must hold integer token ids, got {idx.dtype}")
    vocab = model.config.vocab_size
    if int(idx.min()) < 0 or int(idx.max()) >= vocab:
        raise GptkitError(f"the prompt has token ids outside the vocabulary [0, {vocab})")


def _last_logits(model: GPT, idx: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
    """Run the model on idx (B, T) and return the last position's logits (B, V).

    Only the last position is unembedded: a prefill or window rebuild of T tokens would
    otherwise compute, and hold, (B, T, V) logits to use one row of them.
    """
    return model.next_logits(idx, kv_cache)  # (B, V)


def stream(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eot_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    kv_dtype: torch.dtype | None = None,
    cuda_graph: bool = False,
) -> Generator[torch.Tensor, None, None]:
    """Yield the next token of every row, (B,) per step, for prompts idx (B, T).

    A row that produced `eot_id` is finished: afterwards it keeps emitting `eot_id` as
    padding (the batch stays rectangular). The stream ends when every row is finished
    or after `max_new_tokens` steps. The model runs in eval mode under
    `torch.inference_mode()` (entered per step, never across a `yield`); its previous
    mode is restored when the stream ends or is closed. `use_cache=False` is the plain
    reference: a full forward pass over the window per token. `kv_dtype` is what the KV
    cache stores keys and values in (default: the parameters' dtype); torch.bfloat16
    halves what each step reads from it, which dominates long generations. On CUDA,
    `cuda_graph=True` makes each cached decode step replay a CUDA graph of one step
    (`_GraphDecoder`; not for a model with forward hooks). Bad arguments raise
    GptkitError here, before the first token is asked for.
    """
    validate_sampling(max_new_tokens, temperature, top_k, top_p)
    _check_prompt(model, idx)
    if eot_id is not None and not 0 <= eot_id < model.config.vocab_size:  # it could never stop
        raise GptkitError(
            f"eot_id {eot_id} is outside the vocabulary [0, {model.config.vocab_size})"
        )
    if kv_dtype is not None and not kv_dtype.is_floating_point:
        raise GptkitError(f"the KV cache must hold floating-point values, got {kv_dtype}")
    return _stream(
        model, idx, max_new_tokens, temperature, top_k, top_p, eot_id, generator, use_cache,
        kv_dtype, cuda_graph,
    )  # fmt: skip


class _CacheDecoder:
    """Decoding through a `KVCache`: prefill a window, then one token per step."""

    def __init__(self, model: GPT, rows: int, max_len: int, dtype: torch.dtype) -> None:
        device = next(model.parameters()).device
        self.model = model
        self.cache = KVCache(model.config, rows, max_len, device=device, dtype=dtype)

    @property
    def full(self) -> bool:
        return self.cache.pos >= self.cache.max_len

    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) from position 0 -> the last position's logits (B, V)."""
        self.cache.reset()
        return _last_logits(self.model, idx, self.cache)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """The next token ids (B, 1) -> their logits (B, V)."""
        return _last_logits(self.model, ids, self.cache)


class _GraphDecoder:
    """Decoding on CUDA whose steps replay one captured CUDA graph.

    Eagerly, a gpt2 decode step launches ~150 kernels, each a few microseconds of host
    work, and at batch 1 the card waits on the host (benchmarks/RESULTS.md, session 12).
    Here the prompt fills a `SlotKVCache` eagerly; the first step then runs with the cache
    `static` (every step attends over all `max_len` positions, the ones past the length
    masked; the step's shapes never change), is captured as a CUDA graph, and every step
    replays it: the token ids copied into the graph's input, one launch, the logits read
    from its output (valid until the next step). The cache's lengths advance on the card,
    inside the graph; `pos` mirrors them here. `capture=False` runs the same static steps
    eagerly: the path the graph records, which the tests check on a CPU.
    """

    def __init__(
        self, model: GPT, rows: int, max_len: int, dtype: torch.dtype, capture: bool = True
    ) -> None:
        device = next(model.parameters()).device
        self.model, self.capture = model, capture
        self.cache = SlotKVCache(model.config, rows, max_len, device=device, dtype=dtype)
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=device)  # the graph's input
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits = torch.empty(0)  # the graph's output
        self.pos = 0

    @property
    def full(self) -> bool:
        return self.pos >= self.cache.max_len

    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        self.cache.lengths.zero_()
        self.pos = idx.shape[1]
        return _last_logits(self.model, idx, self.cache)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        if self.full:
            raise ValueError(f"KV cache of {self.cache.max_len} positions is full")
        self.ids.copy_(ids)
        if not self.capture:
            logits = self._static_step()
        else:
            if self.graph is None:
                self.graph = self._record()
            self.graph.replay()
            logits = self.logits
        self.pos += 1
        return logits

    def _static_step(self) -> torch.Tensor:
        self.cache.static = True
        try:
            return _last_logits(self.model, self.ids, self.cache)
        finally:
            self.cache.static = False

    def _record(self) -> torch.cuda.CUDAGraph:
        """Capture one static step (after two warm-up runs on a side stream, which lazily
        set up cuBLAS and the attention kernels, as capture requires). The warm-ups write
        keys at the current position, which the captured step writes again."""
        lengths = self.cache.lengths.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._static_step()
                self.cache.lengths.copy_(lengths)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._static_step()
        return graph


def _decoder(
    model: GPT, rows: int, max_len: int, dtype: torch.dtype, cuda_graph: bool
) -> _CacheDecoder | _GraphDecoder:
    """A CUDA graph where it can stand for the step: on CUDA, without forward hooks (a
    replay calls no module) or reference attention (`explain` reads its weights)."""
    if (
        cuda_graph
        and next(model.parameters()).device.type == "cuda"
        and not has_hooks(model)
        and not any(block.attn.reference for block in model.h)
    ):
        return _GraphDecoder(model, rows, max_len, dtype)
    return _CacheDecoder(model, rows, max_len, dtype)


def _stream(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eot_id: int | None,
    generator: torch.Generator | None,
    use_cache: bool,
    kv_dtype: torch.dtype | None,
    cuda_graph: bool,
) -> Generator[torch.Tensor, None, None]:
    """The decoding loop behind `stream` (arguments already validated)."""
    if max_new_tokens == 0:
        return
    C = model.config.context_length
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            idx = idx[:, -C:].to(device=param.device, dtype=torch.long)  # the last C tokens
            B, T = idx.shape  # batch, prompt time
            # Every token so far: the sliding window is read from here.
            tokens = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)
            tokens[:, :T] = idx
            finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
            decoder = None
            if use_cache:
                max_len = min(C, T + max_new_tokens)
                decoder = _decoder(model, B, max_len, kv_dtype or param.dtype, cuda_graph)
            # 1. prefill: the whole prompt in one pass (fills the cache when there is one)
            logits = _last_logits(model, idx, None) if decoder is None else decoder.prefill(idx)
        n = T  # tokens written
        for step in range(max_new_tokens):
            with torch.inference_mode():
                # 2. sample, pad the finished rows, record
                next_ids = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
                if eot_id is not None:
                    next_ids = torch.where(finished, eot_id, next_ids)
                    finished |= next_ids == eot_id
                tokens[:, n] = next_ids
                n += 1
                done = step == max_new_tokens - 1 or (eot_id is not None and bool(finished.all()))
            yield next_ids.clone()  # cloned outside inference mode: an ordinary tensor
            if done:
                return
            with torch.inference_mode():
                # 3. the next step's logits
                if decoder is None:
                    logits = _last_logits(model, tokens[:, max(0, n - C) : n], None)
                elif not decoder.full:
                    logits = decoder.step(tokens[:, n - 1 : n])  # one token
                else:  # the window slid: every cached position is stale
                    logits = decoder.prefill(tokens[:, n - C : n])
    finally:
        model.train(was_training)


def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eot_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    kv_dtype: torch.dtype | None = None,
    cuda_graph: bool = False,
) -> torch.Tensor:
    """Prompts idx (B, T) -> (B, T + n): the prompts followed by n <= max_new_tokens tokens.

    n is smaller only when every row produced `eot_id` early; rows that finished before
    the others are padded with `eot_id`. See `stream` for the arguments.
    """
    steps = stream(
        model, idx, max_new_tokens, temperature, top_k, top_p, eot_id, generator, use_cache,
        kv_dtype, cuda_graph,
    )  # fmt: skip
    new = [t.to(idx.device) for t in steps]  # n x (B,)
    if not new:
        return idx.clone()
    return torch.cat([idx, torch.stack(new, dim=1).to(idx.dtype)], dim=1)  # (B, T + n)


def stream_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    kv_dtype: torch.dtype | None = None,
) -> Iterator[str]:
    """Yield the text of one sample as it is produced, piece by piece (prompt excluded).

    Generation stops at the tokenizer's end-of-text token, which is not part of the text.
    An empty prompt starts from end-of-text, as GPT-2 was trained. Byte-level tokens can
    split a UTF-8 character, so a piece is emitted only once its text decodes cleanly: a
    trailing U+FFFD (an incomplete character) is held back until later tokens complete
    it, and flushed as-is at the end. The pieces join to `tokenizer.decode(new_ids)`.
    The whole new text is re-decoded at each step, which is exact for any tokenizer
    whose decoding of a prefix is a prefix of the decoding.

    Randomness: pass a `generator` (sharing one across calls gives different, reproducible
    samples) or a `seed` (a fresh generator seeded with it), not both; with neither, the
    global RNG is used. Bad arguments raise GptkitError at the call.
    """
    validate_sampling(max_new_tokens, temperature, top_k, top_p)
    eot_id = tokenizer.eot_id
    ids = tokenizer.encode(prompt)
    if not ids:
        if eot_id is None:
            raise GptkitError("the prompt is empty and the tokenizer has no end-of-text token")
        ids = [eot_id]
    device = next(model.parameters()).device
    if seed is not None:
        if generator is not None:
            raise GptkitError("pass a seed or a generator for sampling, not both")
        generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    tokens = stream(
        model, idx, max_new_tokens, temperature, top_k, top_p, eot_id, generator, use_cache,
        kv_dtype,
    )  # fmt: skip
    return _text_pieces(tokenizer, tokens)


def _text_pieces(
    tokenizer: Tokenizer, tokens: Generator[torch.Tensor, None, None]
) -> Iterator[str]:
    """Decode a one-row token stream into clean text pieces (see `stream_text`)."""
    new: list[int] = []
    emitted = 0  # characters of the decoded new text already yielded
    try:
        for next_ids in tokens:
            token = int(next_ids[0])
            if token == tokenizer.eot_id:
                break
            new.append(token)
            text = tokenizer.decode(new).rstrip("\ufffd")  # hold back an incomplete character
            if len(text) > emitted:
                yield text[emitted:]
                emitted = len(text)
    finally:
        tokens.close()  # restores the model's mode now, not when garbage-collected
    text = tokenizer.decode(new)
    if len(text) > emitted:
        yield text[emitted:]


class _CallableModule(types.ModuleType):
    """This module, callable as its `generate` function.

    `gptkit.generate` names the function (exported lazily by gptkit/__init__.py) and this
    module; once anything imports the module, Python binds the package's `generate` to it,
    and `gptkit.generate(model, idx, ...)` must still generate.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
