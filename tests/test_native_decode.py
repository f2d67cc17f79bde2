"""The native decode step (`decode_step`, src/gptkit/csrc/decode.cpp) against the eager
blocks it replaces: the same logits, step after step, for every architecture switch the
op reads (post-/pre-LN, activations, output projection or none, biases or none, banded
layers), every weight format, both ISA builds, both cache kinds, fp32 and bf16 caches;
and the eager path wherever the native one must not run (hooks, training, autograd,
reference attention)."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from conftest import tiny_config

from gptkit import kernels
from gptkit.model import GPT, KVCache, SlotKVCache
from gptkit.quantize import quantize_model

pytestmark = pytest.mark.skipif(
    kernels.decode_step_op() is None, reason="the native CPU kernels cannot be built here"
)

CONFIGS = {
    # the spec: post-LN, leaky ReLU, no attention output projection, sinusoidal positions
    "seed": tiny_config("seed", d_model=64, n_head=2),
    # GPT-2: pre-LN, GELU, output projection, biases; head_dim 8 is shorter than a vector
    "gpt2": tiny_config("gpt2"),
    "relu-nobias-untied": tiny_config(
        "gpt2", activation="relu", bias=False, d_model=48, n_head=3, tie_embeddings=False
    ),
    # GPT-3's alternating dense and banded layers, with a band the steps run past
    "banded": tiny_config("gpt2", attention="alternating", attn_band=5),
    # a width that is no whole number of vectors: the norms' and products' scalar tails
    "odd-width": tiny_config("seed", d_model=36, n_head=3),
}


@pytest.fixture
def native_calls(monkeypatch) -> list[int]:
    """Counts calls of the native op (one per decode step that took it)."""
    return _spy(monkeypatch, kernels.decode_step_op())


def _spy(monkeypatch, op) -> list[int]:
    calls: list[int] = []

    def counted(*args):
        calls.append(1)
        return op(*args)

    monkeypatch.setattr(kernels, "decode_step_op", lambda: counted)
    return calls


def _model(name: str, weights: str = "fp32") -> GPT:
    model = GPT(CONFIGS[name]).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that every tensor matters
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return quantize_model(model, weights)


def _stepped_logits(
    model: GPT, idx: torch.Tensor, prompt: int, cache: KVCache, native: bool
) -> torch.Tensor:
    """Logits (B, steps, V) of feeding idx[:, prompt:] one token at a time after a prefill."""
    model.native_decode = native
    with torch.inference_mode():
        model(idx[:, :prompt], cache)
        steps = [model(idx[:, t : t + 1], cache) for t in range(prompt, idx.shape[1])]
    return torch.cat(steps, dim=1)


def _assert_same_steps(model: GPT, idx: torch.Tensor, prompt: int, make_cache) -> None:
    native = _stepped_logits(model, idx, prompt, make_cache(), native=True)
    eager = _stepped_logits(copy.deepcopy(model), idx, prompt, make_cache(), native=False)
    # int8 products round their input rows to 16-bit fixed point: the two paths' fp32
    # roundings (of a layer norm, say) can put an entry on either side of a step, 2^-16 of
    # the row's largest value.
    int8 = any(b.dtype == torch.int8 for b in model.buffers())
    tol = 1e-4 if int8 else 1e-5
    torch.testing.assert_close(native, eager, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("weights", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("batch", [1, 3, 21])
def test_native_steps_equal_the_eager_blocks(name, weights, batch, native_calls):
    """Guards every line of the fused block: norms, cache writes, attention (and its band),
    activation, residuals, biases, scales; and the products' paths by batch (rows of x
    together, a remainder of rows, sgemm for fp32 past 8 rows). A wrong one moves the
    logits far past the tolerance."""
    model = _model(name, weights)
    cfg = model.config
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length))
    make_cache = lambda: KVCache(cfg, batch, ring_buffers=False)  # noqa: E731
    _assert_same_steps(model, idx, 5, make_cache)
    assert len(native_calls) == cfg.context_length - 5


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_bf16_cache_steps_equal_the_eager_blocks(name, weights, native_calls):
    """Guards the op's bf16 KV cache: keys and values stored rounded to nearest (ties to
    even) as torch's conversion rounds them, read back as such by attention. Truncating
    instead would change about half the stored entries; reading the bf16 bits wrongly, or
    attending over unrounded copies of the new keys, would move the logits."""
    model = _model(name, weights)
    cfg = model.config
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.context_length))
    caches = {
        path: KVCache(cfg, 3, ring_buffers=False, dtype=dtype)
        for path, dtype in [("native", torch.bfloat16), ("eager", torch.bfloat16), ("fp32", None)]
    }
    native = _stepped_logits(model, idx, 5, caches["native"], native=True)
    assert len(native_calls) == cfg.context_length - 5
    eager = _stepped_logits(copy.deepcopy(model), idx, 5, caches["eager"], native=False)
    fp32 = _stepped_logits(copy.deepcopy(model), idx, 5, caches["fp32"], native=False)
    tol = 1e-4 if weights == "int8" else 1e-5
    torch.testing.assert_close(native, eager, atol=tol, rtol=tol)
    if weights == "fp32":  # the rounding moves the logits far more than the paths differ
        assert (native - fp32).abs().max() > 10 * (native - eager).abs().max()
    for which in ("k", "v"):
        got, want = getattr(caches["native"], which), getattr(caches["eager"], which)
        assert got.dtype == torch.bfloat16
        # The two paths' fp32 roundings can put a value on either side of a bf16 tie.
        assert (got != want).float().mean() < 0.01
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=tol)


@pytest.mark.parametrize("isa", list(kernels.ISA_FLAGS))
@pytest.mark.parametrize("threads", [1, 2])
def test_each_isa_build_and_thread_split(isa, threads, monkeypatch):
    """Guards the AVX2 build (ATen's Vectorized exp and tanh differ per ISA) and the split
    of attention heads over threads."""
    if isa not in kernels.runnable_isas():
        pytest.skip(f"this CPU cannot run the {isa} build")
    calls = _spy(monkeypatch, kernels.library(isa).decode_step)
    torch.set_num_threads(threads)  # conftest restores it
    model = _model("gpt2")
    idx = torch.randint(0, model.config.vocab_size, (2, 20))
    _assert_same_steps(model, idx, 4, lambda: KVCache(model.config, 2))
    assert len(calls) == 16


@pytest.mark.parametrize("name", ["gpt2", "banded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_cache_rows_at_different_lengths(name, dtype, native_calls):
    """Guards the server's path: each row writes and attends at its own position."""
    model = _model(name)
    cfg = model.config
    lengths = [3, 9, 6]
    prompts = [torch.randint(0, cfg.vocab_size, (1, n)) for n in lengths]
    steps = torch.randint(0, cfg.vocab_size, (len(lengths), 12))

    def run(native: bool) -> torch.Tensor:
        m = copy.deepcopy(model)
        m.native_decode = native
        slots = SlotKVCache(cfg, 4, dtype=dtype)
        with torch.inference_mode():
            for row, prompt in enumerate(prompts):
                single = KVCache(cfg, 1, ring_buffers=False, dtype=dtype)
                m(prompt, single)
                slots.load(row, single)
            return torch.cat([m(steps[:, t : t + 1], slots) for t in range(12)], dim=1)

    torch.testing.assert_close(run(True), run(False), atol=1e-5, rtol=1e-5)
    assert len(native_calls) == 12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
def test_ring_buffered_cache_steps_equal_the_eager_blocks(dtype, batch, native_calls):
    """Guards GPT-3's banded layers kept in ring buffers of `band` slots (what `generate`
    makes once a text outgrows the band): the op writes position p at slot p % band and
    attends over the band's slots, which wrap around many times here."""
    model = _model("banded")
    cfg = model.config
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length))
    make_cache = lambda: KVCache(cfg, batch, dtype=dtype)  # noqa: E731
    assert make_cache().ringed and cfg.context_length > 4 * cfg.attn_band
    _assert_same_steps(model, idx, 3, make_cache)
    assert len(native_calls) == cfg.context_length - 3


def test_hooks_training_autograd_and_reference_attention_stay_eager(native_calls):
    """Guards the conditions: the native op skips the blocks' modules, so wherever one of
    them must run (a hook, dropout in training, autograd, explain's reference attention)
    the step must be eager."""
    model = _model("gpt2")
    cfg = model.config
    idx = torch.randint(0, cfg.vocab_size, (1, 3))

    def step() -> None:  # a prefill of two tokens, then one decode step
        cache = KVCache(cfg, 1)
        model(idx[:, :2], cache)
        model(idx[:, 2:], cache)

    seen = []
    handle = model.h[1].mlp.c_fc.register_forward_hook(lambda *a: seen.append(1))
    with torch.inference_mode():
        step()
    handle.remove()
    assert seen == [1, 1] and native_calls == []
    # A hook registered for every module (torch.nn.modules.module's global hooks) as well.
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda *a: seen.append(2))
    with torch.inference_mode():
        step()
    handle.remove()
    assert seen.count(2) > 0 and native_calls == []
    with torch.no_grad():  # the same step without a hook does go native
        step()
    assert len(native_calls) == 1
    model.train()
    with torch.no_grad():
        step()
    model.eval()
    step()  # autograd on
    model.set_reference_attention(True)
    with torch.no_grad():
        step()
    model.set_reference_attention(False)
    with torch.no_grad():  # more rows than the kernel takes
        cache = KVCache(cfg, kernels.MAX_ROWS + 1)
        model(torch.zeros(kernels.MAX_ROWS + 1, 2, dtype=torch.long), cache)  # prefill
        model(torch.zeros(kernels.MAX_ROWS + 1, 1, dtype=torch.long), cache)
    assert len(native_calls) == 1


def test_a_full_cache_and_int32_ids_behave_as_on_the_eager_path(native_calls):
    """Guards the native step's own checks: the eager path's error for a full cache, and
    int32 ids (which the op does not take) decoded eagerly instead of failing."""
    model = _model("gpt2")
    cfg = model.config
    with torch.inference_mode():
        cache = KVCache(cfg, 1, max_len=3)
        model(torch.zeros(1, 3, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="KV cache of 3 positions is full"):
            model(torch.zeros(1, 1, dtype=torch.long), cache)
        cache = KVCache(cfg, 1)
        model(torch.zeros(1, 2, dtype=torch.int32), cache)
        out = model(torch.zeros(1, 1, dtype=torch.int32), cache)
    assert out.shape == (1, 1, cfg.vocab_size) and native_calls == []


@torch.no_grad()
def test_bad_arguments_get_messages():
    op = kernels.decode_step_op()
    model = _model("gpt2")
    cfg = model.config
    cache = KVCache(cfg, 1)
    weights = [t for block in model.h for t in block.native_tensors()]
    good = dict(
        idx=torch.zeros(1, dtype=torch.long), wte=model.wte.weight, wte_scale=None,
        embed_scale=1.0, positions=model.wpe.weight, k_cache=cache.k, v_cache=cache.v,
        ring_k=cache.ring_k, ring_v=cache.ring_v, slots=[0, 1],
        pos=torch.zeros(1, dtype=torch.long), bands=[0, 0], n_head=cfg.n_head,
        post_norm=False, activation=0, slope=0.0, eps=1e-5, weights=weights,
        lnf_w=model.ln_f.weight, lnf_b=model.ln_f.bias, head=model.lm_head.weight,
        head_scale=None,
    )  # fmt: skip

    def call(**changes):
        return op(*{**good, **changes}.values())

    assert call().shape == (1, cfg.vocab_size)
    ring = torch.zeros(1, 1, cfg.n_head, 4, cfg.head_dim)  # one ring buffer of 4 slots
    bad = [
        ("2 layers need 32 weights, got 31", dict(weights=weights[:-1])),
        ("outside the cache", dict(pos=torch.tensor([cfg.context_length]))),
        ("token id 61 outside", dict(idx=torch.tensor([cfg.vocab_size]))),
        ("heads do not divide", dict(n_head=5)),
        ("one cache slot per layer", dict(bands=[0, 0, 0], weights=weights + weights[:16])),
        ("all of one dtype", dict(ring_k=cache.ring_k.bfloat16(), ring_v=cache.ring_v.bfloat16())),
        ("KV cache must be", dict(k_cache=cache.k[:, :, :, :, :4], v_cache=cache.v[..., :4])),
        ("slot is out of range", dict(slots=[0, 2])),
        ("slot is out of range", dict(slots=[0, -1])),  # no ring buffers
        ("band must fit its ring buffer of 4", dict(slots=[0, -1], ring_k=ring, ring_v=ring)),
        ("qkv must have", dict(weights=weights[:4] + weights[10:13] + weights[7:])),
    ]
    for message, changes in bad:
        with pytest.raises(RuntimeError, match=message):
            call(**changes)


def test_decode_profile_accounts_for_the_steps(monkeypatch):
    """Guards `decode_profile`: one step counted per call, every phase timed, the phases
    inside the op's own time, and reset zeroing them (cpu_inference.py reads it)."""
    op, spent = kernels.decode_step_op(), []

    def timed(*args):
        start = time.perf_counter()
        out = op(*args)
        spent.append(time.perf_counter() - start)
        return out

    monkeypatch.setattr(kernels, "decode_step_op", lambda: timed)
    model = _model("gpt2")
    idx = torch.randint(0, model.config.vocab_size, (2, 20))
    kernels.decode_profile(reset=True)
    _stepped_logits(model, idx, 4, KVCache(model.config, 2), native=True)
    profile = kernels.decode_profile(reset=True)
    assert profile["steps"] == len(spent) == 16
    phases = [profile[name] for name in ("products", "attention", "other")]
    assert all(seconds > 0 for seconds in phases)
    assert 0.25 * sum(spent) < sum(phases) <= sum(spent)
    assert kernels.decode_profile() == {"steps": 0, "products": 0, "attention": 0, "other": 0}
