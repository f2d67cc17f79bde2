"""The model: causality, attention paths, positions, norms, tying, the KV cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from gptkit.model import (
    GPT,
    KVCache,
    causal_mask,
    gelu_tanh_sigmoid,
    reference_attention,
    sinusoidal_positions,
)

FAMILIES = ["seed", "gpt2"]


def _randomise_norms(model: GPT) -> None:
    """Give every layer norm a non-trivial gain and bias, so tests can see them."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)


@pytest.mark.parametrize("family", FAMILIES)
def test_causality(family: str) -> None:
    """Guards attention leaking the future: changing token t+1 changes no logit at <= t."""
    model = GPT(tiny_config(family)).eval()
    idx = torch.randint(0, 61, (2, 20))
    base = model(idx)
    for t in (0, 7, 18):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 61
        out = model(changed)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1])
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_attention_equals_reference(family: str) -> None:
    """Guards the fused SDPA path computing something other than softmax(QK^T/sqrt(d))V."""
    model = GPT(tiny_config(family)).eval()
    idx = torch.randint(0, 61, (3, 32))
    fast = model(idx)
    model.set_reference_attention(True)
    ref = model(idx)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_inference_on_cuda_leaves_cudnn_attention_out(monkeypatch) -> None:
    """Guards model._attention_backends: on CUDA without autograd (decoding) cuDNN's
    attention must not be a candidate (it built a plan per new key length: 13.5 tokens/s
    for gpt2 on an H200); training on CUDA, and anything on a CPU, keeps every kernel."""
    from gptkit import model as model_module

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with torch.no_grad(), model_module._attention_backends(cuda):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored
    for device, grad in ((cuda, True), (cpu, False), (cpu, True)):
        with torch.set_grad_enabled(grad), model_module._attention_backends(device):
            assert torch.backends.cuda.cudnn_sdp_enabled()
    # Every forward pass of the model goes through it, with its tokens' device.
    seen = []
    real = model_module._attention_backends
    monkeypatch.setattr(
        model_module, "_attention_backends", lambda d: seen.append(d.type) or real(d)
    )
    model = GPT(tiny_config("gpt2")).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 5))
    with torch.no_grad():
        model(idx)
        model.next_logits(idx, KVCache(model.config, 2, 8))
    assert seen == ["cpu", "cpu"]


def test_reference_attention_is_the_formula() -> None:
    """Guards the reference itself: one head, written with loops over positions."""
    q, k, v = torch.randn(3, 1, 1, 5, 4).double().unbind(0)
    out = reference_attention(q, k, v)
    for t in range(5):
        scores = torch.tensor([q[0, 0, t] @ k[0, 0, s] / math.sqrt(4) for s in range(t + 1)])
        weights = torch.softmax(scores, dim=0)
        assert abs(weights.sum().item() - 1) < 1e-12
        expected = sum(weights[s] * v[0, 0, s] for s in range(t + 1))
        torch.testing.assert_close(out[0, 0, t], expected)


def test_causal_mask_with_offset() -> None:
    """Guards a chunk appended to a cache seeing the wrong keys (top-left-aligned mask)."""
    mask = causal_mask(2, 5)  # queries at positions 3 and 4
    assert mask.tolist() == [[True] * 4 + [False], [True] * 5]


def test_sinusoidal_values_against_formula() -> None:
    """Guards swapped sin/cos, a wrong wavelength base or exponent in the position vectors."""
    d = 16
    pe = sinusoidal_positions(50, d)
    for pos in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_seed_model_adds_sinusoids_to_embeddings() -> None:
    """Guards the seed variant learning, dropping or scaling its position vectors."""
    model = GPT(tiny_config("seed")).eval()
    assert not hasattr(model, "wpe") and "pe" not in model.state_dict()
    seen = {}
    model.h[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    idx = torch.randint(0, 61, (1, 10))
    model(idx)
    expected = model.wte.weight[idx[0]] * math.sqrt(32) + sinusoidal_positions(32, 32)[:10]
    torch.testing.assert_close(seen["x"][0], expected)


def test_post_ln_normalises_each_position() -> None:
    """Guards the spec's post-LN: each sub-layer output, before gain and bias, has mean 0, var 1."""
    model = GPT(tiny_config("seed")).eval()
    _randomise_norms(model)
    outputs = []
    for block in model.h:
        for ln in (block.ln_1, block.ln_2):
            ln.register_forward_hook(lambda m, a, out: outputs.append((m, out)))
    model(torch.randint(0, 61, (2, 12)))
    assert len(outputs) == 4
    for ln, out in outputs:
        z = (out - ln.bias) / ln.weight  # undo gain and bias
        torch.testing.assert_close(z.mean(-1), torch.zeros(z.shape[:-1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            z.var(-1, unbiased=False), torch.ones(z.shape[:-1]), atol=1e-3, rtol=0
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_block_wiring(family: str) -> None:
    """Guards the residual/norm order: post-LN is LN(x + f(x)), pre-LN is x + f(LN(x))."""
    model = GPT(tiny_config(family)).eval()
    _randomise_norms(model)
    block, x = model.h[0], torch.randn(2, 6, 32)
    a, m = block.attn, block.mlp
    if family == "seed":
        h = block.ln_1(x + a(x))
        expected = block.ln_2(h + m(h))
    else:
        h = x + a(block.ln_1(x))
        expected = h + m(block.ln_2(h))
    torch.testing.assert_close(block(x), expected)


def test_seed_output_weight_is_the_embedding() -> None:
    """Guards weight tying breaking into a copy: the unembedding is the embedding tensor itself."""
    model = GPT(tiny_config("seed"))
    assert model.lm_head.weight is model.wte.weight
    idx = torch.randint(0, 61, (1, 5))
    x = {}
    model.lm_head.register_forward_pre_hook(lambda m, args: x.update(h=args[0]))
    logits = model(idx)
    torch.testing.assert_close(logits, x["h"] @ model.wte.weight.T)


def test_families_have_their_layers() -> None:
    """Guards a family silently gaining or losing a layer (out projection, final LN, wpe)."""
    seed, gpt2 = GPT(tiny_config("seed")), GPT(tiny_config("gpt2"))
    assert seed.h[0].attn.c_proj is None and seed.ln_f is None
    assert gpt2.h[0].attn.c_proj is not None and gpt2.ln_f is not None
    assert gpt2.wpe.weight.shape == (32, 32)


def test_leaky_relu_and_gelu_rectifiers() -> None:
    """Guards the wrong rectifier (or slope) in the feed-forward layer."""
    for activation, fn in [
        ("leaky_relu", lambda h: F.leaky_relu(h, 0.2)),
        ("relu", F.relu),
        ("gelu", lambda h: F.gelu(h, approximate="tanh")),
    ]:
        mlp = GPT(tiny_config("seed", activation=activation, leaky_slope=0.2)).h[0].mlp
        x = torch.randn(2, 3, 32)
        torch.testing.assert_close(mlp(x), mlp.c_proj(fn(mlp.c_fc(x))))


def test_gelu_sigmoid_spelling_equals_tanh_gelu() -> None:
    """Guards the compiled path's GELU: x * sigmoid(2u) must be GPT-2's tanh GELU, with grads."""
    x = torch.linspace(-12, 12, 20001, dtype=torch.float64, requires_grad=True)
    ref = F.gelu(x, approximate="tanh")
    ours = gelu_tanh_sigmoid(x)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-12, rtol=1e-12)


def test_residual_init_is_scaled() -> None:
    """Guards GPT-2's init: residual projections use std 0.02 / sqrt(2 * n_layer)."""
    model = GPT(tiny_config("gpt2", d_model=256, n_head=4, n_layer=8))
    assert model.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    expected = 0.02 / math.sqrt(16)
    assert model.h[0].mlp.c_proj.weight.std().item() == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_chunks_equal_full_forward(family: str) -> None:
    """Guards cached keys at wrong positions or a mis-advanced cache (prefill, chunk, single)."""
    model = GPT(tiny_config(family)).eval()
    idx = torch.randint(0, 61, (2, 24))
    full = model(idx)
    cache = KVCache(model.config, batch_size=2)
    parts = [model(idx[:, :10], cache), model(idx[:, 10:17], cache)]
    parts += [model(idx[:, t : t + 1], cache) for t in range(17, 24)]
    assert cache.pos == 24
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_context_overflow_is_an_error() -> None:
    """Guards silent truncation or an index error past the context length."""
    model = GPT(tiny_config("gpt2"))
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, 33, dtype=torch.long))
    cache = KVCache(model.config, batch_size=1, max_len=8)
    model(torch.zeros(1, 8, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="full"):
        model(torch.zeros(1, 1, dtype=torch.long), cache)


@pytest.mark.slow
def test_compiled_model_equals_eager() -> None:
    """Guards the compile-only spellings (GELU as sigmoid): compiled logits and grads = eager."""
    model = GPT(tiny_config("gpt2"))
    idx = torch.randint(0, 61, (2, 16))
    eager = model(idx)
    (g_eager,) = torch.autograd.grad(eager.square().mean(), model.h[0].mlp.c_fc.weight)
    compiled = torch.compile(model)(idx)
    (g_comp,) = torch.autograd.grad(compiled.square().mean(), model.h[0].mlp.c_fc.weight)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_comp, g_eager, atol=1e-5, rtol=1e-5)
