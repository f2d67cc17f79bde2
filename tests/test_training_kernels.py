"""The native training ops against float64 references, for every ISA they are built for
here: causal attention (`csrc/attention.cpp`) against the explicit formula, bias + GELU
and bias + leaky ReLU (`csrc/activation.cpp`) against ATen's; and the model's routing to
them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gptkit import kernels
from gptkit.config import GPTConfig
from gptkit.model import GPT, MLP, KVCache, reference_attention

# (B, T, H, D): one position; T not a multiple of the vector width or of the 4-row tiles;
# D = 48 (one two-vector and one one-vector column block); the benchmark's own shape.
SHAPES = [
    (1, 1, 1, 16),
    (2, 5, 3, 16),
    (2, 17, 2, 32),
    (3, 33, 1, 64),
    (1, 70, 2, 48),
    (12, 64, 4, 32),
]


def _reference(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, T, 3C) -> (B, T, C) through model.reference_attention."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, dim=2))
    return reference_attention(q, k, v).transpose(1, 2).reshape(B, T, C)


def _case(B: int, T: int, H: int, D: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv in float64 with a wide range of scores, dy, and the reference gradient."""
    qkv = (torch.randn(B, T, 3 * H * D, dtype=torch.float64) * 1.5).requires_grad_()
    y = _reference(qkv, H)
    dy = torch.randn_like(y)
    y.backward(dy)
    return qkv.detach(), dy, qkv.grad


@pytest.mark.parametrize("isa", list(kernels.ISA_FLAGS))
@pytest.mark.parametrize("threads", [1, 2])
def test_attention_matches_float64_reference(isa, threads):
    """Guards the causal tiles (a key past the diagonal, or a row tile's edge), the softmax
    and its log-sum-exp, the recomputed probabilities of the backward pass, the transposed
    products dK = dS^T Q and dV = P^T dY, and the split of heads across threads."""
    if isa not in kernels.runnable_isas():
        pytest.skip(f"this CPU cannot run the {isa} build")
    ops = kernels.library(isa)
    assert ops is not None
    torch.set_num_threads(threads)  # the autouse fixture restores it
    for B, T, H, D in SHAPES:
        qkv, dy, dqkv = _case(B, T, H, D)
        y_ref = _reference(qkv, H)
        y, lse = ops.attention_forward(qkv.float(), H)
        assert y.shape == (B, T, H * D) and lse.shape == (B, H, T)
        torch.testing.assert_close(y.double(), y_ref, atol=2e-6, rtol=1e-5)
        grad = ops.attention_backward(dy.float(), qkv.float(), y, lse, H)
        torch.testing.assert_close(grad.double(), dqkv, atol=2e-5, rtol=1e-4)


def test_lse_is_the_log_sum_exp_of_the_scaled_scores():
    """Guards what the backward pass relies on:
    lse[b, h, t] = log sum_{s <= t} exp(q.k_s / sqrt(D))."""
    B, T, H, D = 2, 9, 2, 16
    qkv = torch.randn(B, T, 3 * H * D)
    _, lse = kernels.library().attention_forward(qkv, H)
    q, k, _ = (t.view(B, T, H, D).transpose(1, 2).double() for t in qkv.split(H * D, dim=2))
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), atol=1e-5, rtol=1e-6)


def test_causal_attention_is_differentiable_eager_and_compiled():
    """Guards the autograd and fake-tensor registrations: the gradient through
    `kernels.causal_attention` equals the reference's, and torch.compile traces the op into
    one graph (fullgraph) with the same results."""
    qkv64, dy, dqkv = _case(2, 24, 2, 32)
    qkv = qkv64.float().requires_grad_()
    kernels.causal_attention(qkv, 2).backward(dy.float())
    torch.testing.assert_close(qkv.grad.double(), dqkv, atol=2e-5, rtol=1e-4)

    compiled = torch.compile(lambda t: kernels.causal_attention(t, 2) * 2.0, fullgraph=True)
    qkv.grad = None
    y = compiled(qkv)
    y.backward(2.0 * dy.float())
    torch.testing.assert_close(y.double() / 2.0, _reference(qkv64, 2), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(qkv.grad.double() / 4.0, dqkv, atol=2e-5, rtol=1e-4)


def test_attention_refuses_bad_arguments_with_a_message():
    ops = kernels.library()
    with pytest.raises(RuntimeError, match="multiple of"):
        ops.attention_forward(torch.randn(1, 4, 3 * 2 * 12), 2)  # heads of 12
    with pytest.raises(RuntimeError, match="float32"):
        ops.attention_forward(torch.randn(1, 4, 3 * 32, dtype=torch.float64), 2)
    y, lse = ops.attention_forward(torch.randn(1, 4, 96), 2)
    with pytest.raises(RuntimeError, match="lse"):
        ops.attention_backward(torch.randn(1, 4, 32), torch.randn(1, 4, 96), y, lse[:, :1], 2)


def _counting(monkeypatch) -> list[int]:
    """Counts calls of kernels.causal_attention (still computing them)."""
    calls: list[int] = []
    real = kernels.causal_attention

    def counted(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
        calls.append(qkv.shape[1])
        return real(qkv, n_head)

    monkeypatch.setattr(kernels, "causal_attention", counted)
    return calls


@pytest.mark.parametrize("family", ["seed", "gpt2"])
def test_model_uses_the_kernel_and_matches_reference_attention(family, monkeypatch):
    """Guards the routing and the wiring around it (heads read in place, output projection,
    residual): a model with heads of 16 runs every layer through the kernel, and its logits
    and gradients equal those of the explicit reference path."""
    preset = "seed-tiny" if family == "seed" else "gpt2"
    cfg = GPTConfig.from_preset(
        preset, vocab_size=50, context_length=40, n_layer=2, n_head=2, d_model=32
    )
    model = GPT(cfg)
    idx = torch.randint(0, 50, (3, 40))
    calls = _counting(monkeypatch)
    logits = model(idx)
    logits.square().mean().backward()
    assert calls == [40, 40]
    grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    model.set_reference_attention(True)
    ref = model(idx)
    ref.square().mean().backward()
    assert calls == [40, 40]  # the reference path does not use it
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)


def test_model_falls_back_where_the_kernel_does_not_apply(monkeypatch):
    """Guards each condition of CausalSelfAttention._native_fits: attention dropout while
    training, a band narrower than the sequence, bf16 autocast, heads of a width that is not
    a whole number of vectors, a sequence past ATTENTION_MAX_T, and decoding with a cache."""
    calls = _counting(monkeypatch)
    base = dict(vocab_size=50, context_length=32, n_layer=1, n_head=2, d_model=32)
    idx = torch.randint(0, 50, (2, 32))

    GPT(GPTConfig.from_preset("gpt2", **base, dropout=0.1)).train()(idx)
    banded = GPT(GPTConfig.from_preset("gpt2", **base))
    banded.h[0].attn.band = 8
    banded(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        GPT(GPTConfig.from_preset("gpt2", **base))(idx)
    GPT(GPTConfig.from_preset("gpt2", **{**base, "n_head": 4}))(idx)  # heads of 8
    monkeypatch.setattr(kernels, "ATTENTION_MAX_T", 16)
    GPT(GPTConfig.from_preset("gpt2", **base))(idx)
    assert calls == []

    monkeypatch.setattr(kernels, "ATTENTION_MAX_T", 256)
    model = GPT(GPTConfig.from_preset("gpt2", **base, dropout=0.1)).eval()
    model(idx)  # dropout is off in eval mode: the kernel applies
    assert calls == [32]
    # A prompt fed into a KV cache goes through scaled_dot_product_attention.
    model(idx[:, :4], kv_cache=KVCache(model.config, batch_size=2, max_len=32))
    assert calls == [32]


def _gelu_case(M: int, N: int) -> tuple[torch.Tensor, ...]:
    """h (M, N) and b (N,) in float64 over GELU's whole range (both tails, the bend near 0),
    dy, and the reference output and gradients."""
    h = (torch.randn(M, N, dtype=torch.float64) * 3).requires_grad_()
    with torch.no_grad():
        h[0, : min(N, 6)] = torch.tensor([-200.0, -30.0, -5e-4, 0.0, 30.0, 200.0])[: min(N, 6)]
    b = torch.randn(N, dtype=torch.float64).requires_grad_()
    y = F.gelu(h + b, approximate="tanh")
    dy = torch.randn_like(y)
    y.backward(dy)
    return h.detach(), b.detach(), dy, y.detach(), h.grad, b.grad


@pytest.mark.parametrize("isa", list(kernels.ISA_FLAGS))
@pytest.mark.parametrize("threads", [1, 2])
def test_bias_gelu_matches_float64_reference(isa, threads):
    """Guards the GELU written as u sigmoid(2z) with a reciprocal estimate, its derivative,
    the vector tail (N not a multiple of the width), the clamp that keeps exp finite (no NaN
    at u = -200) and the bias gradient summed over blocks of rows (M not a multiple)."""
    if isa not in kernels.runnable_isas():
        pytest.skip(f"this CPU cannot run the {isa} build")
    ops = kernels.library(isa)
    torch.set_num_threads(threads)  # the autouse fixture restores it
    for M, N in [(1, 5), (3, 16), (70, 37), (130, 512)]:
        h, b, dy, y_ref, dh_ref, db_ref = _gelu_case(M, N)
        y = ops.bias_gelu_forward(h.float(), b.float())
        torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
        dh, db = ops.bias_gelu_backward(dy.float(), h.float(), b.float())
        torch.testing.assert_close(dh.double(), dh_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(db.double(), db_ref, atol=1e-4, rtol=1e-5)


def test_bias_gradient_does_not_depend_on_the_thread_count():
    """Guards resume exactness on another machine: the bias gradient is summed over fixed
    blocks of rows in a fixed order, so 1 and 2 threads give the same bits."""
    h, b, dy = torch.randn(300, 40), torch.randn(40), torch.randn(300, 40)
    ops = kernels.library()
    for backward in (
        lambda: ops.bias_gelu_backward(dy, h, b),
        lambda: ops.bias_leaky_relu_backward(dy, h, 0.01),
    ):
        torch.set_num_threads(1)
        one = backward()
        torch.set_num_threads(2)
        two = backward()
        assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_bias_gelu_is_differentiable_eager_and_compiled():
    """Guards the autograd and fake-tensor registrations of bias_gelu."""
    h64, b64, dy, y_ref, dh_ref, db_ref = _gelu_case(12, 48)
    for fn in (kernels.bias_gelu, torch.compile(kernels.bias_gelu, fullgraph=True)):
        h, b = h64.float().requires_grad_(), b64.float().requires_grad_()
        y = fn(h.view(3, 4, 48), b)
        y.backward(dy.float().view(3, 4, 48))
        torch.testing.assert_close(y.double().view(12, 48), y_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h.grad.double(), dh_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.grad.double(), db_ref, atol=1e-4, rtol=1e-5)


def _leaky_case(M: int, N: int) -> tuple[torch.Tensor, ...]:
    """h (M, N), b (N,) and dy in float32, with u = h + b exactly 0 in a few places (the
    derivative's one ambiguous point: ATen takes the slope there)."""
    h, b, dy = torch.randn(M, N), torch.randn(N), torch.randn(M, N)
    h[0, : min(N, 3)] = -b[: min(N, 3)]
    return h, b, dy


@pytest.mark.parametrize("isa", list(kernels.ISA_FLAGS))
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("slope", [0.01, 0.0, 0.3])
def test_bias_leaky_relu_matches_aten(isa, threads, slope):
    """Guards the leaky ReLU with its bias against ATen's on the same float32 inputs:
    the output and the input gradient bit for bit (one add, one multiply, the same
    choice at u = 0), the bias gradient up to the order of its sums; the vector tail
    (N not a multiple of the width) and rows not a multiple of the bias-sum blocks."""
    if isa not in kernels.runnable_isas():
        pytest.skip(f"this CPU cannot run the {isa} build")
    ops = kernels.library(isa)
    torch.set_num_threads(threads)  # the autouse fixture restores it
    for M, N in [(1, 5), (3, 16), (70, 37), (130, 512)]:
        h, b, dy = _leaky_case(M, N)
        hr, br = h.clone().requires_grad_(), b.clone().requires_grad_()
        ref = F.leaky_relu(hr + br, slope)
        ref.backward(dy)
        y = ops.bias_leaky_relu_forward(h, b, slope)
        assert torch.equal(y, ref)
        dh, db = ops.bias_leaky_relu_backward(dy, y, slope)
        assert torch.equal(dh, hr.grad)
        torch.testing.assert_close(db, br.grad, atol=1e-5, rtol=1e-5)


def test_bias_leaky_relu_refuses_a_negative_slope():
    """Its backward pass reads the output's sign, which a negative slope would flip."""
    ops = kernels.library()
    h, b, dy = _leaky_case(4, 8)
    with pytest.raises(RuntimeError, match="slope must be >= 0"):
        ops.bias_leaky_relu_forward(h, b, -0.1)
    with pytest.raises(RuntimeError, match="slope must be >= 0"):
        ops.bias_leaky_relu_backward(dy, h, -0.1)


def test_bias_leaky_relu_is_differentiable_eager_and_compiled():
    """Guards the autograd and fake-tensor registrations of bias_leaky_relu (the
    backward pass keeps only the output)."""
    h0, b0, dy = _leaky_case(12, 48)
    hr, br = h0.clone().requires_grad_(), b0.clone().requires_grad_()
    F.leaky_relu(hr + br, 0.01).backward(dy)
    fns = (kernels.bias_leaky_relu, torch.compile(kernels.bias_leaky_relu, fullgraph=True))
    for fn in fns:
        h, b = h0.clone().requires_grad_(), b0.clone().requires_grad_()
        y = fn(h.view(3, 4, 48), b, 0.01)
        y.backward(dy.view(3, 4, 48))
        torch.testing.assert_close(y.view(12, 48), F.leaky_relu(h0 + b0, 0.01))
        torch.testing.assert_close(h.grad, hr.grad)
        torch.testing.assert_close(b.grad, br.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "activation, slope, native",
    [("leaky_relu", 0.01, True), ("relu", 0.01, True), ("leaky_relu", -0.1, False)],
)
def test_mlp_uses_bias_leaky_relu_where_it_applies(monkeypatch, activation, slope, native):
    """Guards MLP's routing for the spec's rectifiers: the leaky ReLU (ReLU at slope 0)
    goes through the kernel with the output and gradients of Linear + ATen's; a negative
    slope, which the kernel refuses, does not."""
    calls: list[float] = []
    real = kernels.bias_leaky_relu
    monkeypatch.setattr(
        kernels, "bias_leaky_relu", lambda h, b, s: calls.append(s) or real(h, b, s)
    )
    cfg = GPTConfig.from_preset(
        "seed-tiny",
        vocab_size=50,
        n_layer=1,
        n_head=2,
        d_model=32,
        activation=activation,
        leaky_slope=slope,
    )
    mlp = MLP(cfg)
    x = torch.randn(2, 5, 32, requires_grad=True)
    out = mlp(x)
    out.square().sum().backward()
    assert calls == ([slope if activation == "leaky_relu" else 0.0] if native else [])
    grads = [x.grad.clone()] + [p.grad.clone() for p in mlp.parameters()]

    x.grad = None
    mlp.zero_grad()
    h = mlp.c_fc(x)
    h = F.leaky_relu(h, slope) if activation == "leaky_relu" else F.relu(h)
    ref = mlp.c_proj(h)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    for g, r in zip(grads, [x.grad] + [p.grad for p in mlp.parameters()], strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_mlp_uses_bias_gelu_where_it_applies(monkeypatch):
    """Guards MLP's routing: fp32 GELU with a bias goes through the kernel with the same
    output and gradients as Linear + ATen's GELU; bf16 autocast, no bias and the other
    activations do not."""
    calls: list[tuple[int, ...]] = []
    real = kernels.bias_gelu
    monkeypatch.setattr(kernels, "bias_gelu", lambda h, b: calls.append(h.shape) or real(h, b))
    cfg = GPTConfig.from_preset("gpt2", vocab_size=50, n_layer=1, n_head=2, d_model=32)
    mlp = MLP(cfg)
    x = torch.randn(2, 5, 32, requires_grad=True)
    out = mlp(x)
    out.square().sum().backward()
    assert calls == [(2, 5, 128)]
    grads = [x.grad.clone()] + [p.grad.clone() for p in mlp.parameters()]

    x.grad = None
    mlp.zero_grad()
    ref = mlp.c_proj(F.gelu(mlp.c_fc(x), approximate="tanh"))
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    for g, r in zip(grads, [x.grad] + [p.grad for p in mlp.parameters()], strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        mlp(x)
    MLP(GPTConfig.from_preset("gpt2", vocab_size=50, n_layer=1, n_head=2, d_model=32, bias=False))(
        x
    )
    MLP(GPTConfig.from_preset("seed-tiny", vocab_size=50, n_layer=1, n_head=2, d_model=32))(x)
    assert calls == [(2, 5, 128)]


def test_mlp_keeps_c_fc_hooks(monkeypatch):
    """Guards `gptkit explain` and user hooks: with a hook on c_fc, the MLP calls c_fc
    itself (the hook sees its output) instead of the fused path."""
    calls: list[int] = []
    real = kernels.bias_gelu
    monkeypatch.setattr(kernels, "bias_gelu", lambda h, b: calls.append(1) or real(h, b))
    mlp = MLP(GPTConfig.from_preset("gpt2", vocab_size=50, n_layer=1, n_head=2, d_model=32))
    seen: list[torch.Size] = []
    mlp.c_fc.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    mlp(torch.randn(2, 5, 32))
    assert seen == [(2, 5, 128)] and calls == []


@pytest.mark.parametrize("activation", ["leaky_relu", "relu"])
def test_rectifier_in_place_spares_what_a_c_fc_hook_holds(activation):
    """Guards the ATen path's in-place (leaky) ReLU: with a hook on c_fc, the output the
    hook kept still has its negative values; without one, the same result either way."""
    cfg = GPTConfig.from_preset(
        "seed-tiny", vocab_size=50, n_layer=1, n_head=2, d_model=32, activation=activation
    )
    mlp = MLP(cfg)
    mlp._native_fits = lambda x: False  # the path a GPU or bf16 autocast takes
    x = torch.randn(2, 5, 32)
    plain = mlp(x)
    kept: list[torch.Tensor] = []
    mlp.c_fc.register_forward_hook(lambda module, args, out: kept.append(out))
    hooked = mlp(x)
    assert torch.equal(kept[0], mlp.c_fc(x)) and (kept[0] < 0).any()
    torch.testing.assert_close(hooked, plain)


@pytest.mark.parametrize("isa", list(kernels.ISA_FLAGS))
@pytest.mark.parametrize("D", [128, 40, 5])
def test_embedding_matches_nn_embedding(isa, D):
    """Guards the lookup and the row sums of its backward pass against ATen's
    (repeated indices, a band of columns that is not a whole vector, fewer columns than
    one vector), and that the sums do not depend on the thread count."""
    if isa not in kernels.runnable_isas():
        pytest.skip(f"this CPU cannot run the {isa} build")
    ops = kernels.library(isa)
    weight = torch.randn(7, D)
    idx = torch.randint(0, 7, (3, 50))
    grad = torch.randn(3, 50, D)
    assert torch.equal(ops.embedding_forward(weight, idx), F.embedding(idx, weight))
    w = weight.clone().requires_grad_()
    F.embedding(idx, w).backward(grad)
    sums = []
    for threads in (1, 2):
        torch.set_num_threads(threads)  # the autouse fixture restores it
        sums.append(ops.embedding_backward(grad, idx, 7))
    torch.testing.assert_close(sums[0], w.grad, atol=1e-5, rtol=1e-5)
    assert torch.equal(sums[0], sums[1])


def test_embedding_refuses_an_index_out_of_range():
    ops = kernels.library()
    with pytest.raises(RuntimeError, match="out of range"):
        ops.embedding_forward(torch.randn(4, 16), torch.tensor([1, 4]))
    with pytest.raises(RuntimeError, match="out of range"):
        ops.embedding_backward(torch.randn(2, 16), torch.tensor([-1, 0]), 4)


def test_compiled_model_looks_embeddings_up_through_the_kernel(monkeypatch):
    """Guards model._lookup: compiled on a CPU, a gpt2-family model reads wte and wpe
    through kernels.embedding (so the backward pass avoids inductor's atomics) with the same
    loss and gradients as eager; eager, in bf16, with int32 ids or with a hook on wte, it
    calls the modules."""
    calls: list[int] = []
    real = kernels.embedding
    monkeypatch.setattr(kernels, "embedding", lambda w, i: calls.append(w.shape[0]) or real(w, i))
    cfg = GPTConfig.from_preset(
        "gpt2", vocab_size=50, context_length=16, n_layer=1, n_head=2, d_model=32
    )
    model = GPT(cfg)
    idx = torch.randint(0, 50, (2, 16))
    model(idx).square().mean().backward()
    assert calls == []  # eager: nn.Embedding
    grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    out = torch.compile(model)(idx)
    assert sorted(calls) == [16, 50]  # traced once: wpe and wte
    out.square().mean().backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)

    torch._dynamo.reset()
    calls.clear()
    bf16 = GPT(cfg).to(torch.bfloat16)  # the op takes fp32 tables and int64 ids only
    assert torch.compile(bf16)(idx).dtype == torch.bfloat16 and calls == []
    torch._dynamo.reset()
    torch.compile(model)(idx.int())
    assert calls == [16]  # wte's ids are int32; wpe's positions are int64
    calls.clear()

    torch._dynamo.reset()
    seen: list[torch.Size] = []
    model.wte.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    torch.compile(model)(idx)
    assert calls == [16] and seen == [(2, 16, 32)]


@pytest.mark.parametrize("isa", list(kernels.ISA_FLAGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_matches_float64_reference(isa, dtype):
    """Guards csrc/cross_entropy.cpp: each row's log-sum-exp (its maximum in the vectors or
    in the tail past the last whole vector), the target's logit (first and last class), and
    the backward's softmax minus one-hot times each row's upstream gradient, written in the
    logits' dtype; bf16 rows widened exactly; the same bits for 1 and 2 threads."""
    if isa not in kernels.runnable_isas():
        pytest.skip(f"this CPU cannot run the {isa} build")
    ops = kernels.library(isa)
    for V in (5, 37, 50257):  # less than a vector; vectors and a tail; gpt2's vocabulary
        logits = (torch.randn(6, V, dtype=torch.float64) * 30).to(dtype)
        logits[0, -1] = 200.0  # a row whose maximum sits in the tail
        targets = torch.randint(0, V, (6,))
        targets[1], targets[2] = 0, V - 1
        upstream = torch.randn(6)
        exact = logits.double().requires_grad_()
        loss = torch.logsumexp(exact, 1) - exact[torch.arange(6), targets]
        (loss * upstream.double()).sum().backward()

        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)  # the autouse fixture restores it
            rows, lse = ops.cross_entropy_forward(logits, targets)
            dlogits = ops.cross_entropy_backward(upstream, logits, targets, lse)
            results.append((rows, lse, dlogits))
        rows, lse, dlogits = results[0]
        assert all(torch.equal(a, b) for a, b in zip(results[0], results[1], strict=True))
        assert rows.dtype == lse.dtype == torch.float32 and dlogits.dtype == dtype
        torch.testing.assert_close(
            lse.double(), torch.logsumexp(exact.detach(), 1), rtol=1e-6, atol=1e-5
        )
        torch.testing.assert_close(rows.double(), loss.detach(), rtol=1e-6, atol=1e-4)
        want = exact.grad.to(dtype).double()  # the exact gradient, rounded as stored
        tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-8)
        torch.testing.assert_close(dlogits.double(), want, **tol)


def test_cross_entropy_refuses_a_target_out_of_range():
    ops = kernels.library()
    with pytest.raises(RuntimeError, match="out of range for 8 classes"):
        ops.cross_entropy_forward(torch.randn(2, 8), torch.tensor([1, 8]))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.cross_entropy_forward(torch.randn(2, 8, dtype=torch.float64), torch.tensor([1, 2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_loss_takes_the_kernel_eagerly_and_matches_atens(monkeypatch, dtype):
    """Guards train.lm_loss's routing: eagerly on a CPU through kernels.cross_entropy_rows, with
    F.cross_entropy's loss and gradient (mean over every row of a (B, T, V) batch); for
    a small vocabulary, under torch.compile, and with the kernels off, through ATen."""
    from gptkit.train import lm_loss

    calls: list[torch.dtype] = []
    real = kernels.cross_entropy_rows
    spy = lambda x, t: calls.append(x.dtype) or real(x, t)  # noqa: E731
    monkeypatch.setattr(kernels, "cross_entropy_rows", spy)
    V = kernels.CROSS_ENTROPY_MIN_CLASSES + 45
    logits = (torch.randn(3, 5, V) * 4).to(dtype)
    targets = torch.randint(0, V, (3, 5))
    got_in, want_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got = lm_loss(got_in, targets)
    assert calls == [dtype]
    want = F.cross_entropy(want_in.float().reshape(-1, V), targets.reshape(-1))
    (got * 2).backward()
    (want * 2).backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-6)
    torch.testing.assert_close(got_in.grad, want_in.grad, **tol)

    calls.clear()
    lm_loss(logits[..., :65], targets % 65)  # a character vocabulary: ATen is faster
    torch.compile(lm_loss)(logits, targets)  # inductor's fused loss, not the op
    monkeypatch.setattr(kernels, "training_namespace", lambda: None)
    lm_loss(logits, targets)
    assert calls == []
