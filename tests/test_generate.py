"""Sampling filters, the decoding loop (cache, sliding window, end-of-text), text streaming."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gptkit.generate as gen
from gptkit.config import GPTConfig
from gptkit.errors import GptkitError
from gptkit.generate import (
    generate,
    sample_next,
    stream,
    stream_text,
    top_k_filter,
    top_p_filter,
    validate_sampling,
)
from gptkit.model import GPT, KVCache, SlotKVCache

FAMILIES = ["seed", "gpt2"]


def _lively_model(family: str, **overrides) -> GPT:
    """A tiny random GPT whose greedy output does not collapse into repeating one token.

    With GPT-2's N(0, 0.02) initialisation greedy decoding settles on a single token
    within a few steps, and two decoders that both repeat it agree trivially. Unit-scale
    weights keep the output varied, so agreement over hundreds of tokens means something.
    """
    model = GPT(tiny_config(family, vocab_size=97, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0)
        if model.config.embed_scale:  # keep the scaled embedding at unit scale too
            model.wte.weight.div_(model.config.d_model**0.5)
    return model


# ---------------------------------------------------------------------------------------
# The decoding loop with real (tiny) models


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_cached_equals_uncached_200_tokens(family: str) -> None:
    """Guards the KV-cache path (positions, cache writes, prefill) drifting from full recompute."""
    model = _lively_model(family, context_length=224)
    idx = torch.randint(0, 97, (2, 7))
    cached = generate(model, idx, 200, temperature=0)
    plain = generate(model, idx, 200, temperature=0, use_cache=False)
    assert cached.shape == (2, 207)
    assert torch.equal(cached, plain)
    assert len(set(cached[0, -100:].tolist())) >= 10  # the comparison is not trivial


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_cached_equals_uncached_past_the_context(family: str) -> None:
    """Guards the sliding window: past the context, cached decoding must match the reference."""
    model = _lively_model(family, context_length=16)
    idx = torch.randint(0, 97, (2, 5))
    cached = generate(model, idx, 60, temperature=0)
    plain = generate(model, idx, 60, temperature=0, use_cache=False)
    assert cached.shape == (2, 65)
    assert torch.equal(cached, plain)
    assert len(set(cached[0, -30:].tolist())) >= 5


def test_sampled_cached_equals_uncached_past_the_context() -> None:
    """Guards cache/window bugs that greedy decoding hides: same seed, same samples."""
    model = _lively_model("gpt2", context_length=16)
    idx = torch.randint(0, 97, (3, 4))
    cached = generate(model, idx, 50, generator=torch.Generator().manual_seed(3))
    plain = generate(model, idx, 50, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_logits_match_full_recompute_every_step(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards numerical drift of the cached path: every step's logits within 1e-5 (fp32)."""
    model = GPT(tiny_config(family, vocab_size=97, context_length=24)).eval()
    seen: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    real = gen._last_logits

    def recording(model, idx, kv_cache):
        logits = real(model, idx, kv_cache)
        seen[kv_cache is not None].append(logits.clone())
        return logits

    monkeypatch.setattr(gen, "_last_logits", recording)
    idx = torch.randint(0, 97, (2, 6))
    generate(model, idx, 40, temperature=0)  # 6 + 40 > 24: the window slides too
    generate(model, idx, 40, temperature=0, use_cache=False)
    assert len(seen[True]) == len(seen[False]) == 40
    for step, (cached, plain) in enumerate(zip(seen[True], seen[False], strict=True)):
        torch.testing.assert_close(cached, plain, atol=1e-5, rtol=0, msg=f"step {step}")


def test_only_the_last_position_is_unembedded() -> None:
    """Guards prefill and window rebuilds computing (B, T, V) logits to use one row."""
    model = GPT(tiny_config("gpt2", context_length=16))
    shapes = []
    model.lm_head.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    generate(model, torch.randint(0, 61, (2, 12)), 10)  # prefill 12, then slides past 16
    assert shapes == [(2, 61)] * 10


def test_prompt_longer_than_context_keeps_its_last_tokens() -> None:
    """Guards a crash (or the wrong window) on prompts longer than the context length."""
    model = _lively_model("gpt2", context_length=16)
    long = torch.randint(0, 97, (2, 40))
    for use_cache in (True, False):
        out = generate(model, long, 10, temperature=0, use_cache=use_cache)
        cut = generate(model, long[:, -16:], 10, temperature=0, use_cache=use_cache)
        assert out.shape == (2, 50)
        assert torch.equal(out[:, :40], long)
        assert torch.equal(out[:, 40:], cut[:, 16:])


def test_top_k_1_generation_equals_greedy() -> None:
    """Guards top-k keeping more than one token (or the wrong one) when k is 1."""
    model = _lively_model("seed")
    idx = torch.randint(0, 97, (2, 5))
    greedy = generate(model, idx, 20, temperature=0)
    top1 = generate(model, idx, 20, temperature=0.7, top_k=1, generator=torch.Generator())
    assert torch.equal(greedy, top1)


def test_seeded_generation_is_reproducible_and_seed_dependent() -> None:
    """Guards sampling that ignores the generator (irreproducible, or the same for all seeds)."""
    model = _lively_model("gpt2")
    idx = torch.randint(0, 97, (2, 3))

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return generate(model, idx, 25, top_k=50, top_p=0.95, generator=g)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_kv_cache_follows_the_model_dtype() -> None:
    """Guards an fp32 cache under a bf16 model (attention would refuse mixed dtypes)."""
    model = GPT(tiny_config("gpt2")).to(torch.bfloat16)
    out = generate(model, torch.randint(0, 61, (2, 4)), 6, temperature=0)
    assert out.shape == (2, 10)


@pytest.mark.parametrize("ring_buffers", [False, True])
def test_bf16_kv_cache_stores_rounded_keys_and_hands_back_fp32(ring_buffers: bool) -> None:
    """Guards the eager path of a bf16 cache under a fp32 model (dense layers, and GPT-3's
    banded ones in ring buffers): attention gets fp32 keys and values, each the bf16
    rounding of what the full fp32 pass computes; the logits follow the fp32 cache's."""
    cfg = tiny_config("gpt2", attention="alternating", attn_band=3, vocab_size=97)
    model = _lively_model("gpt2", attention="alternating", attn_band=3)
    model.native_decode = False
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    logits = {}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            cache = KVCache(model.config, 2, dtype=dtype, ring_buffers=ring_buffers)
            assert cache.dtype == dtype and bool(cache.ringed) == ring_buffers
            model(idx[:, :4], cache)
            logits[dtype] = torch.cat([model(idx[:, t : t + 1], cache) for t in range(4, 12)], 1)
        # What a bf16 cache should hold: the fp32 keys of the first layer, rounded.
        cache = KVCache(model.config, 2, dtype=torch.bfloat16, ring_buffers=ring_buffers)
        model(idx, cache)
        x = model.wte(idx) + model.wpe(torch.arange(12))
        keys = model.h[0].attn.c_attn(model.h[0].ln_1(x)).split(cfg.d_model, dim=2)[1]
        keys = keys.view(2, 12, cfg.n_head, cfg.head_dim).transpose(1, 2)
        assert torch.equal(cache.k[0, :, :, :12], keys.to(torch.bfloat16))  # layer 0: dense
    assert logits[torch.bfloat16].dtype == torch.float32
    gap = (logits[torch.bfloat16] - logits[torch.float32]).abs().max()
    assert 0 < gap < 0.05 * logits[torch.float32].abs().max()  # measured: 1.8%


def test_generate_with_a_bf16_kv_cache(monkeypatch) -> None:
    """Guards `kv_dtype` reaching the cache (and a non-float one being refused)."""
    model = _lively_model("gpt2", context_length=64)
    idx = torch.randint(0, 97, (2, 5))
    made = []

    def spy(*args, real=gen.KVCache, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(gen, "KVCache", spy)
    out = generate(model, idx, 40, temperature=0, kv_dtype=torch.bfloat16)
    assert [c.dtype for c in made] == [torch.bfloat16]
    plain = generate(model, idx, 40, temperature=0)
    assert out.shape == plain.shape and torch.equal(out[:, :10], plain[:, :10])
    with pytest.raises(GptkitError, match="floating-point"):
        stream(model, idx, 3, kv_dtype=torch.int8)


def _decoders(monkeypatch: pytest.MonkeyPatch, capture: bool) -> list:
    """Make every generation decode through `_GraphDecoder` (uncaptured: its static steps
    run eagerly, the path a CUDA graph records); returns the decoders made."""
    made = []

    def graph_decoder(model, rows, max_len, dtype, cuda_graph):
        made.append(gen._GraphDecoder(model, rows, max_len, dtype, capture=capture))
        return made[-1]

    monkeypatch.setattr(gen, "_decoder", graph_decoder)
    return made


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", ["dense", "alternating"])
def test_static_decode_steps_match_the_kv_cache(
    family: str, attention: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards the step a CUDA graph captures (`_GraphDecoder`: a SlotKVCache in static
    mode, every step attending over all positions, those past the length masked): sampled
    tokens equal the KVCache path's, every step's logits within 1e-5 of their scale, through the
    window sliding past the context, with dense and banded layers."""
    kw = dict(attention="alternating", attn_band=3) if attention == "alternating" else {}
    model = _lively_model(family, context_length=16, **kw)
    model.native_decode = False  # the eager modules both ways (the CPU op skips masks)
    idx = torch.randint(0, 97, (3, 4))
    seen: dict[str, list[torch.Tensor]] = {"cache": [], "static": []}
    real = gen._last_logits

    def recording(model, idx, kv_cache):
        logits = real(model, idx, kv_cache)
        static = getattr(kv_cache, "static", False) or isinstance(kv_cache, KVCache)
        if idx.shape[1] == 1 and static:  # decode steps (prefills are the same code)
            seen["static" if isinstance(kv_cache, SlotKVCache) else "cache"].append(logits)
        return logits

    monkeypatch.setattr(gen, "_last_logits", recording)
    want = generate(model, idx, 50, generator=torch.Generator().manual_seed(3))
    made = _decoders(monkeypatch, capture=False)
    got = generate(model, idx, 50, generator=torch.Generator().manual_seed(3))
    assert len(made) == 1 and not made[0].cache.static  # static only inside a step
    assert torch.equal(got, want)
    assert len(set(got[0, -20:].tolist())) >= 5
    assert len(seen["static"]) == len(seen["cache"]) == 16 - 4  # then the window slides
    for step, (a, b) in enumerate(zip(seen["static"], seen["cache"], strict=True)):
        atol = 1e-5 * b.abs().max().item()  # logits up to ~20 here; measured <= 1.5e-6 of it
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=f"step {step}")


def test_decoding_picks_a_cuda_graph_only_where_one_can_stand_for_the_step() -> None:
    """Guards `_decoder`: a CPU model, `cuda_graph=False` and a hooked model decode through
    the eager KVCache (a replayed graph would skip the CPU's native op, or the hooks)."""
    model = GPT(tiny_config("gpt2"))
    assert isinstance(gen._decoder(model, 1, 8, torch.float32, True), gen._CacheDecoder)
    if torch.cuda.is_available():
        model = model.cuda()
        assert isinstance(gen._decoder(model, 1, 8, torch.float32, True), gen._GraphDecoder)
        assert isinstance(gen._decoder(model, 1, 8, torch.float32, False), gen._CacheDecoder)
        model.h[0].register_forward_hook(lambda *args: None)
        assert isinstance(gen._decoder(model, 1, 8, torch.float32, True), gen._CacheDecoder)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_decoder_steps_equal_the_cache_decoders(device: str, dtype: torch.dtype) -> None:
    """Guards `_GraphDecoder` step by step: fed the same tokens, every step's logits are
    the KVCache decoder's (to 1e-5 of their scale in fp32, 2% in bf16, whose logits are
    rounded to 8 bits). On CUDA the steps replay the captured graph (inputs copied in,
    lengths advanced on the card, the output read after each replay), and greedy
    generation in fp32 gives the eager tokens; on a CPU they run uncaptured."""
    model = _lively_model("gpt2", context_length=32).to(device, dtype)
    idx = torch.randint(0, 97, (3, 4), device=device)
    feed = torch.randint(0, 97, (3, 20), device=device)
    with torch.inference_mode():
        graph = gen._GraphDecoder(model, 3, 24, dtype, capture=device == "cuda")
        eager = gen._CacheDecoder(model, 3, 24, dtype)
        steps = [(graph.prefill(idx).float().clone(), eager.prefill(idx).float())]
        for t in range(20):
            ids = feed[:, t : t + 1]
            steps.append((graph.step(ids).float().clone(), eager.step(ids).float()))
        assert graph.full and eager.full and (graph.graph is not None) == (device == "cuda")
    for t, (a, b) in enumerate(steps):
        atol = (1e-5 if dtype == torch.float32 else 2e-2) * b.abs().max().item()
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=f"step {t}")
    if device == "cuda" and dtype == torch.float32:
        graphed = generate(model, idx, 40, temperature=0, cuda_graph=True)
        assert torch.equal(graphed, generate(model, idx, 40, temperature=0))


def test_model_mode_is_restored() -> None:
    """Guards generation leaving a training model in eval mode (or the reverse)."""
    model = GPT(tiny_config("seed")).train()
    generate(model, torch.zeros(1, 2, dtype=torch.long), 3)
    assert model.training
    tokens = stream(model, torch.zeros(1, 2, dtype=torch.long), 10)
    next(tokens)
    assert not model.training  # sampling runs in eval mode (no dropout)
    tokens.close()
    assert model.training
    model.eval()
    generate(model, torch.zeros(1, 2, dtype=torch.long), 3)
    assert not model.training


def test_zero_new_tokens_returns_the_prompt() -> None:
    """Guards max_new_tokens=0 running the model or failing."""
    model = GPT(tiny_config("seed"))
    idx = torch.randint(0, 61, (2, 5))
    assert torch.equal(generate(model, idx, 0), idx)


# ---------------------------------------------------------------------------------------
# A scripted model: rows follow fixed token sequences, for end-of-text and streaming


class ScriptedModel(nn.Module):
    """Looks like a GPT to `stream`, but predicts `script[b, i]` as the i-th new token.

    The position of each prediction comes from the cache (or from the window length
    without one), exactly as for a real model, so it also works with use_cache=False
    as long as nothing slides. Its "hidden states" are already logits.
    """

    def __init__(self, script: list[list[int]], prompt_len: int, vocab_size: int) -> None:
        super().__init__()
        self.config = GPTConfig(
            vocab_size=vocab_size, context_length=64, n_layer=1, n_head=1, d_model=4
        )
        self.script, self.prompt_len = torch.tensor(script), prompt_len
        self.dummy = nn.Parameter(torch.zeros(1))  # device and dtype for the cache
        self.lm_head = nn.Identity()

    def hidden_states(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T = idx.shape
        start = 0 if kv_cache is None else kv_cache.pos
        logits = torch.zeros(B, T, self.config.vocab_size)
        for t in range(T):
            i = start + t + 1 - self.prompt_len  # index of the token this position predicts
            if 0 <= i < self.script.shape[1]:
                logits[torch.arange(B), t, self.script[:, i]] = 10.0
        if kv_cache is not None:
            kv_cache.advance(T)
        return logits

    def next_logits(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        return self.hidden_states(idx, kv_cache)[:, -1]  # what generation samples from


EOT = 9


@pytest.mark.parametrize("use_cache", [True, False])
def test_rows_stop_at_end_of_text_independently(use_cache: bool) -> None:
    """Guards one row's end-of-text stopping the batch, or a finished row going on."""
    model = ScriptedModel([[5, 6, EOT, 7, 8, 1, 2], [1, 2, 3, 4, EOT, 5, 6]], 2, 10)
    idx = torch.tensor([[0, 0], [0, 0]])
    steps = list(stream(model, idx, 7, temperature=0, eot_id=EOT, use_cache=use_cache))
    assert torch.stack(steps, dim=1).tolist() == [[5, 6, EOT, EOT, EOT], [1, 2, 3, 4, EOT]]
    out = generate(model, idx, 7, temperature=0, eot_id=EOT, use_cache=use_cache)
    assert out[:, 2:].tolist() == [[5, 6, EOT, EOT, EOT], [1, 2, 3, 4, EOT]]
    no_eot = generate(model, idx, 7, temperature=0, use_cache=use_cache)
    assert no_eot.shape == (2, 9)  # without eot_id every step is produced


class CharTokenizer:
    """Characters of a fixed alphabet; the last id is end-of-text."""

    def __init__(self, alphabet: str) -> None:
        self.alphabet = alphabet
        self.vocab_size = len(alphabet) + 1
        self.eot_id = len(alphabet)

    def encode(self, text: str) -> list[int]:
        return [self.alphabet.index(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join("" if i == self.eot_id else self.alphabet[i] for i in ids)


class ByteTokenizer:
    """Byte-level: ids 0-255 are bytes, 256 is end-of-text. Like GPT-2's BPE, a token
    sequence can stop in the middle of a UTF-8 character."""

    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def test_stream_text_holds_back_split_characters() -> None:
    """Guards streaming half a UTF-8 character to the user as U+FFFD."""
    text = "héllo wörld ✓ 🙂!"
    script = [list(text.encode("utf-8")) + [ByteTokenizer.eot_id]]
    model = ScriptedModel(script, prompt_len=2, vocab_size=257)
    pieces = list(stream_text(model, ByteTokenizer(), "ab", 100, temperature=0))
    assert "".join(pieces) == text
    assert len(pieces) == len(text)  # one piece per character, none early, none late
    assert not any("\ufffd" in piece for piece in pieces)


def test_stream_text_flushes_an_unfinished_character_at_the_end() -> None:
    """Guards losing the held-back bytes when generation ends mid-character."""
    script = [list("ok ✓".encode())[:-1]]  # the check mark's last byte never comes
    model = ScriptedModel(script, prompt_len=1, vocab_size=257)
    pieces = list(stream_text(model, ByteTokenizer(), "a", len(script[0]), temperature=0))
    assert pieces[:-1] == ["o", "k", " "]
    assert "".join(pieces) == ByteTokenizer().decode(script[0])  # ends in U+FFFD


@pytest.mark.parametrize("tokenizer", [CharTokenizer("abcdefgh ,.\n"), ByteTokenizer()])
def test_stream_text_reassembles_to_the_decoded_tokens(tokenizer) -> None:
    """Guards streamed pieces that drop, repeat or reorder text relative to decode(tokens)."""
    model = GPT(tiny_config("gpt2", vocab_size=tokenizer.vocab_size)).eval()
    with torch.no_grad():
        model.wte.weight.normal_(0.0, 1.0)  # varied output, so bytes split characters
    prompt = "ab"
    pieces = list(stream_text(model, tokenizer, prompt, 80, seed=7))
    idx = torch.tensor([tokenizer.encode(prompt)])
    g = torch.Generator().manual_seed(7)
    out = generate(model, idx, 80, eot_id=tokenizer.eot_id, generator=g)[0, idx.shape[1] :]
    new = out.tolist()
    if tokenizer.eot_id in new:
        new = new[: new.index(tokenizer.eot_id)]
    assert "".join(pieces) == tokenizer.decode(new)
    assert all(piece and not piece.endswith("\ufffd") for piece in pieces[:-1])


def test_stream_text_seed_and_generator() -> None:
    """Guards samples that ignore the seed/generator, and ambiguous seed + generator."""
    model = GPT(tiny_config("gpt2", vocab_size=13)).eval()
    tok = CharTokenizer("abcdefgh ,.\n")

    def text(**kw) -> str:
        return "".join(stream_text(model, tok, "ab", 30, **kw))

    assert text(seed=3) == text(seed=3)
    assert text(seed=3) == text(generator=torch.Generator().manual_seed(3))
    shared = torch.Generator().manual_seed(3)
    assert text(generator=shared) != text(generator=shared)  # the draws continue
    with pytest.raises(GptkitError):
        stream_text(model, tok, "ab", 5, seed=1, generator=torch.Generator())


def test_stream_text_empty_prompt_starts_from_end_of_text() -> None:
    """Guards an empty prompt crashing the model with a (1, 0) input."""
    model = GPT(tiny_config("seed", vocab_size=13)).eval()
    pieces = list(stream_text(model, CharTokenizer("abcdefgh ,.\n"), "", 5, seed=0))
    assert isinstance("".join(pieces), str)


# ---------------------------------------------------------------------------------------
# Pure sampling functions


def test_temperature_zero_is_argmax_with_ties_to_the_lowest_id() -> None:
    """Guards temperature 0 dividing by zero or sampling, and nondeterministic tie-breaks."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, -3.0, 0.0]])
    assert sample_next(logits, temperature=0).tolist() == [1, 0, 3]
    assert torch.equal(sample_next(logits, 0), torch.argmax(logits, dim=-1))
    for dtype in (torch.float64, torch.bfloat16):  # numpy's path, then torch's
        picked = sample_next(logits.to(dtype), 0)
        assert picked.dtype == torch.long and picked.tolist() == [1, 0, 3]


def test_top_k_1_sampling_equals_argmax() -> None:
    """Guards top_k=1 letting a second token through (ties included)."""
    logits = torch.randint(0, 4, (64, 12)).float()  # many ties
    g = torch.Generator().manual_seed(0)
    picked = sample_next(logits, temperature=1.3, top_k=1, generator=g)
    assert torch.equal(picked, torch.argmax(logits, dim=-1))


@pytest.fixture(params=["numpy", "torch"])
def top_k_path(request, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which of top_k_ids' two implementations runs on fp32 CPU logits: numpy's (the
    default there), or torch's (what bf16, fp16 and CUDA logits always take)."""
    if request.param == "torch":
        monkeypatch.setattr(gen, "_top_k_rows", lambda rows, k: None)
    return request.param


@pytest.mark.parametrize("k", [1, 2, 5, 12, 20])
def test_top_k_keeps_exactly_k(k: int, top_k_path: str) -> None:
    """Guards top-k keeping more than k tokens on ties, or dropping one of the k largest."""
    logits = torch.randint(0, 5, (32, 12)).float()  # many ties
    kept = torch.isfinite(top_k_filter(logits, k))
    assert (kept.sum(-1) == min(k, 12)).all()
    if k < 12:
        lowest_kept = logits.masked_fill(~kept, float("inf")).amin(-1)
        highest_dropped = logits.masked_fill(kept, float("-inf")).amax(-1)
        assert (lowest_kept >= highest_dropped).all()
    assert torch.equal(top_k_filter(logits, k)[kept], logits[kept])  # survivors unchanged


def test_top_k_ties_go_to_the_lowest_ids(top_k_path: str) -> None:
    """Guards a nondeterministic choice among equal logits at the k-th place."""
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[False, True, True, False, False]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_top_k_ties_go_to_the_lowest_ids_in_half_precision(dtype: torch.dtype) -> None:
    """Guards the tie repair of top_k_ids' torch path, the one bf16 and fp16 logits take
    (also on a CPU): the places left at the k-th value go to the lowest tied ids, also
    with larger values above them and several rows."""
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0], [3.0, 1.0, 5.0, 3.0, 3.0]], dtype=dtype)
    assert gen.top_k_ids(logits, 2).tolist() == [[1, 2], [0, 2]]
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [
        [False, True, True, False, False],
        [True, False, True, False, False],
    ]
    assert gen.top_k_ids(logits, 3).tolist() == [[1, 2, 3], [0, 2, 3]]


def _kept(logits: torch.Tensor, p: float) -> list[int]:
    return torch.isfinite(top_p_filter(logits, p)).nonzero()[:, -1].tolist()


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    """Guards top-p dropping the token that crosses p, or keeping one past it."""
    logits = torch.tensor([0.1, 0.4, 0.2, 0.3]).log()[None]  # ranked: 1, 3, 2, 0
    assert _kept(logits, 0.3) == [1]
    assert _kept(logits, 0.4 + 1e-3) == [1, 3]
    assert _kept(logits, 0.65) == [1, 3]
    assert _kept(logits, 0.75) == [1, 2, 3]
    assert _kept(logits, 0.95) == [0, 1, 2, 3]
    assert _kept(logits, 1.0) == [0, 1, 2, 3]


@pytest.mark.parametrize("vocab", [6, 4096])  # the full sort, and the candidates' path
def test_top_p_boundary_where_a_prefix_sums_exactly_to_p(vocab: int) -> None:
    """Guards an off-by-one at the boundary: a prefix with mass exactly p is the whole set.

    Four equal logits and -inf elsewhere give probabilities of exactly 1/4 in float32; ties
    are ranked by id, so p = 0.5 keeps ids 0 and 2 (the two lowest of the four) and no
    more. A vocabulary of 4096 takes the TOP_P_CANDIDATES shortcut, which decides the
    boundary on its own ranking of the candidates.
    """
    assert vocab == 6 or vocab > 2 * gen.TOP_P_CANDIDATES  # else no shortcut to test
    logits = torch.full((1, vocab), float("-inf"))
    logits[0, [0, 2, 3, 5]] = 0.0
    assert _kept(logits, 0.5) == [0, 2]
    assert _kept(logits, 0.25) == [0]
    assert _kept(logits, 0.75) == [0, 2, 3]
    assert _kept(logits, 0.5 + 1e-6) == [0, 2, 3]
    assert _kept(logits, 1.0) == [0, 2, 3, 5]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-8, 8), min_size=1, max_size=30),
    st.floats(0.01, 1.0),
)
def test_top_p_property(values: list[float], p: float) -> None:
    """Guards top-p on arbitrary distributions: the kept set reaches p and is minimal."""
    logits = torch.tensor([values])
    probs = torch.softmax(logits, dim=-1)[0]
    kept = torch.isfinite(top_p_filter(logits, p))[0]
    mass = probs[kept].sum().item()
    assert mass >= p - 1e-5 or kept.all()
    # Minimal: without its least probable member the set no longer reaches p.
    least = probs.masked_fill(~kept, float("inf")).min().item()
    assert mass - least < p + 1e-5
    # A prefix of the ranking: every kept token is at least as probable as every dropped one.
    if not kept.all():
        assert least >= probs[~kept].max().item()


@pytest.mark.parametrize("vocab", [6, 50257])  # the full sort, and the candidates' path
@pytest.mark.parametrize("p", [0.0, 1e-300, 1e-9])
def test_top_p_keeps_the_top_token_whatever_p(vocab: int, p: float) -> None:
    """Guards top-p keeping nothing (then nothing can be sampled) for p = 0 or a p that
    rounds to 0 against float32 masses: the most probable token is always kept."""
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    kept = torch.isfinite(top_p_filter(logits, p))
    assert kept.sum(-1).tolist() == [1, 1, 1]
    assert kept.nonzero()[:, -1].tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [1e-40, 1e-50, 1e-300])
def test_tiny_temperatures_are_greedy(temperature: float) -> None:
    """Guards logits / temperature overflowing to inf (softmax NaN, "cannot sample"): a
    tiny positive temperature samples the argmax, with top-k and top-p too."""
    logits = torch.randn(8, 97, generator=torch.Generator().manual_seed(0)) * 5
    g = torch.Generator().manual_seed(0)
    for top_k, top_p in [(None, None), (10, None), (None, 0.5), (10, 0.9)]:
        picked = sample_next(logits, temperature, top_k, top_p, g)
        assert picked.tolist() == logits.argmax(-1).tolist()


def test_filters_chain_in_documented_order() -> None:
    """Guards top-p being applied before top-k (it would renormalise over other tokens)."""
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).log_softmax(-1)
    g = torch.Generator().manual_seed(0)
    # top-k 3 first: masses over {0, 1, 2} are .665, .245, .090; top-p .9 keeps {0, 1}.
    picks = {int(sample_next(logits, 1.0, top_k=3, top_p=0.9, generator=g)) for _ in range(300)}
    assert picks == {0, 1}


def test_sampling_follows_the_distribution() -> None:
    """Guards sampling from the wrong probabilities (e.g. temperature applied twice)."""
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = (probs.log() * 2.0).expand(20000, 3)  # temperature 2 undoes the factor of 2
    picks = sample_next(logits, 2.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(picks, minlength=3).float() / 20000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def _sorted_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The plain reference: a stable sort of the whole row, its first k kept."""
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order[..., :k], True)
    return logits.masked_fill(~keep, float("-inf"))


def _sorted_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """The plain reference: rank the whole row, keep while the mass before is below p."""
    probs = torch.softmax(logits.float(), dim=-1)
    ranked, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = torch.cumsum(ranked, dim=-1)
    before = torch.cat([torch.zeros_like(before[..., :1]), before[..., :-1]], dim=-1)
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, before < p)
    return logits.masked_fill(~keep, float("-inf"))


@pytest.mark.parametrize("seed", range(6))
def test_fast_filters_equal_the_full_sort_on_a_real_vocabulary(seed: int) -> None:
    """Guards top_k_ids' tie repair and top_p_filter's candidate shortcut (both used only
    where V is large) against sorting all 50,257 entries: peaked and flat rows, many ties
    (rounded logits) and few, nuclei inside and beyond the 1024 candidates."""
    g = torch.Generator().manual_seed(seed)
    scale = [0.3, 2.0, 8.0, 30.0, 8.0, 30.0][seed]
    logits = torch.randn(3, 50257, generator=g) * scale
    if seed >= 4:
        logits = (logits * 2).round() / 2  # thousands of ties at every value
    shortcut = 0
    for p in (0.05, 0.5, 0.9, 0.99):
        got = top_p_filter(logits, p)
        assert torch.equal(got, _sorted_top_p(logits, p)), p
        shortcut += int(torch.isfinite(got).sum(-1).max() < gen.TOP_P_CANDIDATES)
    for k in (1, 7, 200, 5000):
        assert torch.equal(top_k_filter(logits, k), _sorted_top_k(logits, k)), k
    if scale >= 8.0:
        assert shortcut > 0  # the candidate path ran


def test_top_k_sampling_on_ties_draws_only_the_lowest_ids(top_k_path: str) -> None:
    """Guards sample_next's top-k path (it draws among the k survivors and maps back):
    with 10 tokens tied for first place, top_k=3 draws ids 100, 200 and 300 equally."""
    logits = torch.zeros(4000, 1000)
    logits[:, [100, 200, 300, 400, 500, 600, 700, 800, 900, 999]] = 5.0
    picks = sample_next(logits, 1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(picks, minlength=1000)
    assert set(picks.unique().tolist()) == {100, 200, 300}
    assert counts[[100, 200, 300]].min() > 1200  # about 1333 each


def test_draw_follows_probabilities_and_never_picks_a_zero() -> None:
    """Guards the inverse-CDF draw: frequencies match, a zero-probability token (first,
    inside, last) is never drawn, and an unnormalised row works as its normalised self."""
    probs = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.0, 4.0, 0.0]).expand(40000, 7)
    picks = gen.draw(probs, torch.Generator().manual_seed(1))
    freq = torch.bincount(picks, minlength=7).float() / 40000
    torch.testing.assert_close(freq, probs[0] / 8.0, atol=0.01, rtol=0)
    assert freq[[0, 2, 4, 6]].sum() == 0
    for bad in (torch.tensor([[0.5, float("nan")]]), torch.zeros(1, 3)):
        with pytest.raises(ValueError, match="cannot sample"):
            gen.draw(bad)


def test_draw_at_the_ends_of_the_uniform_skips_zero_probability_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Guards the inverse-CDF search's side: u = 0 must pick the first token with a
    positive probability (a leading zero's running sum equals u, and the first index
    *exceeding* u is wanted), and the largest u below 1 the last one (not a trailing
    zero, nor an index past the row)."""
    probs = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 1.0, 2.0, 0.0]])
    for u, want in [(0.0, [1, 1]), (1.0 - 2.0**-53, [3, 2])]:

        def rand(*shape, dtype=None, device=None, generator=None, u=u):
            return torch.full(shape, u, dtype=dtype, device=device)

        monkeypatch.setattr(gen.torch, "rand", rand)
        assert gen.draw(probs).tolist() == want, u


# ---------------------------------------------------------------------------------------
# Validation


BAD_SETTINGS = [
    dict(max_new_tokens=-1),
    dict(max_new_tokens=2.5),  # torch.empty's TypeError otherwise
    dict(temperature=-0.5),
    dict(top_k=0),
    dict(top_k=-3),
    dict(top_p=0.0),
    dict(top_p=-0.1),
    dict(top_p=1.01),
    dict(temperature=float("nan")),
    dict(temperature=float("inf")),
    dict(top_p=float("nan")),
    dict(top_p=float("inf")),
]


@pytest.mark.parametrize("bad", BAD_SETTINGS)
def test_bad_sampling_settings_raise_gptkit_error(bad: dict) -> None:
    """Guards silent acceptance of settings that cannot sample (and raw tracebacks)."""
    args = dict(max_new_tokens=5, temperature=1.0, top_k=None, top_p=None) | bad
    with pytest.raises(GptkitError) as info:
        validate_sampling(**args)
    assert "\n" not in str(info.value)
    model = GPT(tiny_config("seed"))
    idx = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(GptkitError):
        generate(model, idx, **args)
    with pytest.raises(GptkitError):
        stream(model, idx, **args)  # raised at the call, not at the first token
    with pytest.raises(GptkitError):
        stream_text(model, CharTokenizer("abc"), "ab", **args)


def test_an_end_of_text_id_outside_the_vocabulary_is_refused() -> None:
    """Guards eot_id typos: an id the model can never produce would let no row stop."""
    model = GPT(tiny_config("seed"))
    idx = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(GptkitError, match="eot_id 61 is outside the vocabulary"):
        generate(model, idx, 3, eot_id=model.config.vocab_size)
    assert generate(model, idx, 3, eot_id=model.config.vocab_size - 1).shape[1] <= 5


def test_edge_settings_are_valid() -> None:
    """Guards `x or default` style checks rejecting legitimate edge values."""
    validate_sampling(0, 0.0, 1, 1.0)
    validate_sampling(10, 0.0, None, None)
    model = GPT(tiny_config("seed"))
    out = generate(model, torch.zeros(1, 2, dtype=torch.long), 3, top_k=10_000, top_p=1.0)
    assert out.shape == (1, 5)


@pytest.mark.parametrize(
    "idx",
    [
        torch.zeros(1, 0, dtype=torch.long),
        torch.zeros(0, 3, dtype=torch.long),
        torch.zeros(4, dtype=torch.long),
        torch.zeros(1, 3),
        torch.tensor([[1, 61]]),
        torch.tensor([[-1, 2]]),
    ],
)
def test_bad_prompts_raise_gptkit_error(idx: torch.Tensor) -> None:
    """Guards empty, misshapen, float or out-of-vocabulary prompts reaching the model."""
    with pytest.raises(GptkitError):
        stream(GPT(tiny_config("seed")), idx, 3)


def test_gptkit_generate_stays_callable_once_its_module_is_imported() -> None:
    """Guards the README's `gptkit.generate(model, idx, ...)`: importing the module of the
    same name (as `gptkit.explain` does) binds it on the package in the function's place."""
    import gptkit
    import gptkit.explain  # noqa: F401  imports gptkit.generate, the module

    model = GPT(tiny_config("seed"))
    idx = torch.zeros(1, 2, dtype=torch.long)
    out = gptkit.generate(model, idx, max_new_tokens=3, temperature=0)
    assert torch.equal(out, generate(model, idx, max_new_tokens=3, temperature=0))
