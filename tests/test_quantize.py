"""bf16 and weight-only int8 inference: both matmul paths (native kernel, ATen) against a
dequantized reference, whole models against fp32 ones holding the dequantized weights, the
tied embedding, perplexity of a trained model, and `gptkit sample --weights`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config
from test_train import fake_data, tiny

from gptkit import kernels
from gptkit.checkpoint import load_model
from gptkit.cli import main
from gptkit.errors import GptkitError
from gptkit.generate import generate
from gptkit.model import GPT
from gptkit.quantize import (
    WeightOnlyEmbedding,
    WeightOnlyLinear,
    quantize_model,
    quantize_rows,
    weight_bytes_per_token,
)
from gptkit.train import evaluate_full, train


def test_rows_quantize_within_half_a_step():
    """Guards the per-channel scheme: every entry within scale/2, each row's max exact."""
    w = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different size
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert (q.abs().amax(dim=1) == 127).all()


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("width", [96, 36])
def test_weight_only_linear_matches_the_dequantized_matmul(fmt, bias, native, width, monkeypatch):
    """Guards WeightOnlyLinear on both paths against x @ dequantized W^T: the native kernel
    (few rows: fp32 activations for bf16, so tight; int8 rounds them to 16-bit fixed point,
    within 2^-16 of each row's largest) and ATen (many rows, or no kernel: bf16-rounded
    activations, so looser). Width 36 is no multiple of 16: ATen's int8 kernel crashed on
    such rows, so they take the dequantized weight."""
    if native and kernels.gemv_op() is None:
        pytest.skip("native kernels unavailable here")
    if not native:
        monkeypatch.setattr(kernels, "gemv_op", lambda: None)
    linear = torch.nn.Linear(width, 40, bias=bias)
    qlinear = WeightOnlyLinear.from_linear(linear, fmt)
    for shape in [(1, 1, width), (2, 3, width), (3, 5, width)]:  # 1, 6 and 15 rows
        x = torch.randn(shape)
        expected = torch.nn.functional.linear(x, qlinear.dequantized(), linear.bias)
        got = qlinear(x)
        assert got.shape == (*shape[:-1], 40) and got.dtype == torch.float32
        exact = native and x[..., 0].numel() <= kernels.MAX_ROWS
        tol = (1e-5 if fmt == "bf16" else 1e-4) if exact else 2e-2
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
        assert torch.corrcoef(torch.stack([got.flatten(), expected.flatten()]))[0, 1] > 0.9999


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_quantized_decoding_equals_fp32_model_with_the_dequantized_weights(fmt):
    """Guards the whole quantized model on the decode path (prefill + one-token steps): its
    logits equal an fp32 model holding the dequantized weights, and greedy tokens match."""
    if kernels.gemv_op() is None:
        pytest.skip("native kernels unavailable here")
    config = tiny_config("gpt2", vocab_size=256, d_model=64, context_length=48)
    quantized = quantize_model(GPT(config).eval(), fmt)
    reference = GPT(config).eval()  # fp32, given the weights the small ones stand for
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, WeightOnlyLinear):
                target = reference.get_submodule(name)
                target.weight.copy_(module.dequantized())
                if module.bias is not None:
                    target.bias.copy_(module.bias)
            elif isinstance(module, torch.nn.LayerNorm | torch.nn.Embedding) and name != "wte":
                reference.get_submodule(name).load_state_dict(module.state_dict())
    idx = torch.randint(0, 256, (1, 6))  # 6 prompt rows: the kernel path from the start
    expected = generate(reference, idx, 30, temperature=0)
    assert torch.equal(generate(quantized, idx, 30, temperature=0), expected)
    with torch.no_grad():
        torch.testing.assert_close(quantized(idx), reference(idx), rtol=1e-4, atol=1e-4)


def test_int8_model_keeps_the_embedding_tied_and_its_bytes_quartered():
    """Guards quantize_model: every matrix int8, wte and lm_head one int8 matrix, 4x fewer
    bytes read per token, logits close to fp32's."""
    model = GPT(tiny_config("gpt2", vocab_size=256, d_model=64)).eval()
    idx = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = model(idx)
    fp32_bytes = weight_bytes_per_token(model)
    quantize_model(model, "int8")
    assert isinstance(model.wte, WeightOnlyEmbedding)
    assert isinstance(model.lm_head, WeightOnlyLinear)
    assert model.wte.weight is model.lm_head.weight and model.wte.weight.dtype == torch.int8
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert weight_bytes_per_token(model) < 0.3 * fp32_bytes
    with torch.no_grad():
        got = model(idx)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert generate(model, idx, 5, temperature=0).shape == (2, 17)


def test_bf16_model_halves_its_bytes_and_keeps_fp32_activations():
    """Guards quantize_model(..., "bf16"): weight-only, tied, half the bytes, fp32 out."""
    model = GPT(tiny_config("gpt2", vocab_size=256, d_model=64)).eval()
    fp32_bytes = weight_bytes_per_token(model)
    quantize_model(model, "bf16")
    assert model.wte.weight is model.lm_head.weight and model.wte.weight.dtype == torch.bfloat16
    assert 0.45 * fp32_bytes < weight_bytes_per_token(model) < 0.55 * fp32_bytes
    with torch.no_grad():
        assert model(torch.randint(0, 256, (1, 4))).dtype == torch.float32


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_matrices_are_blocked_for_the_native_kernel(fmt):
    """Guards the blocked layout's use: where the kernel builds, matrices of a width that is
    a multiple of 32 are stored blocked (others row-major), `matrix()` gives back exactly the
    row-major matrix, and the tied embedding looks its rows up in the blocked head."""
    if kernels.gemv_op() is None:
        pytest.skip("native kernels unavailable here")
    model = GPT(tiny_config("gpt2", vocab_size=61, d_model=64)).eval()  # 61: a padded group
    rows = {name: _small(module.weight, fmt) for name, module in _linears(model)}
    quantize_model(model, fmt)
    for name, module in _linears(model):
        assert module.weight.dim() == (4 if module.in_features % 32 == 0 else 2), name
        assert torch.equal(module.matrix(), rows[name]), name
    assert model.lm_head.weight.dim() == 4 and model.lm_head.out_features == 61
    ids = torch.tensor([[0, 5, 60]])
    torch.testing.assert_close(model.wte(ids), model.lm_head.dequantized()[ids])


def _linears(model: GPT) -> list[tuple[str, torch.nn.Module]]:
    linear = (torch.nn.Linear, WeightOnlyLinear)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, linear)]


def _small(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    return quantize_rows(weight)[0] if fmt == "int8" else weight.detach().to(torch.bfloat16)


@pytest.mark.slow
def test_int8_perplexity_within_one_percent_of_fp32(tmp_path):
    """Guards the quality of int8: a trained model's val perplexity moves by < 1%."""
    data = fake_data(tmp_path / "data")
    run = train(
        tiny(data, tmp_path / "run", max_steps=60, eval_every=0, n_layer=2, d_model=64),
        progress=False,
    )
    val = np.fromfile(data / "val.bin", dtype=np.uint16)
    fp32 = load_model(run)
    ppl = {}
    for weights in ("fp32", "bf16", "int8"):
        model = quantize_model(load_model(run), weights)
        ppl[weights] = np.exp(evaluate_full(model, val, 8, 16))
    assert ppl["fp32"] < 0.5 * fp32.config.vocab_size  # it learned something
    assert abs(ppl["int8"] / ppl["fp32"] - 1) < 0.01, ppl
    assert abs(ppl["bf16"] / ppl["fp32"] - 1) < 0.01, ppl


def test_sample_command_with_quantized_weights(tmp_path, capsys):
    """Guards `gptkit sample --weights` and `--kv-cache`: each choice generates; a bad one
    is refused."""
    data = fake_data(tmp_path / "data")
    run = train(tiny(data, tmp_path / "run", max_steps=2, eval_every=0), progress=False)
    args = ["sample", str(run), "--prompt", "abc", "--max-new-tokens", "5", "--seed", "1"]
    for weights in ("bf16", "int8"):
        assert main([*args, "--weights", weights]) == 0
        assert capsys.readouterr().out.startswith("abc")
    assert main([*args, "--weights", "int8", "--kv-cache", "bf16"]) == 0
    assert capsys.readouterr().out.startswith("abc")
    for bad in (["--weights", "int4"], ["--kv-cache", "int8"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["sample", str(run), *bad])
        assert exit_info.value.code == 2
    with pytest.raises(GptkitError):
        quantize_model(GPT(tiny_config()), "int4")


@pytest.mark.parametrize("first", ["bf16", "int8"])
@pytest.mark.parametrize("second", ["fp32", "bf16", "int8"])
def test_a_quantized_model_is_not_quantized_again(first, second):
    """Guards quantize_model on its own output: it widened the bf16 buffers or re-blocked
    the int8 ones (a broken model, or silently still int8 for "fp32"). Refused up front,
    the model left as it was."""
    model = quantize_model(GPT(tiny_config("gpt2")).eval(), first)
    idx = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        before = model(idx)
    with pytest.raises(GptkitError, match="quantized already"):
        quantize_model(model, second)
    with torch.no_grad():
        assert torch.equal(model(idx), before)
