"""bf16 and weight-only int8 inference: the kernels against a dequantized reference, the
tied embedding, perplexity of a trained model, and `gptkit sample --weights`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config
from test_train import fake_data, tiny

from gptkit.checkpoint import load_model
from gptkit.cli import main
from gptkit.errors import GptkitError
from gptkit.generate import generate
from gptkit.model import GPT
from gptkit.quantize import (
    Int8Embedding,
    Int8Linear,
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


@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_matches_the_dequantized_matmul(bias):
    """Guards Int8Linear (ATen int8 kernel, bf16 activations) against x @ dequantized W^T."""
    linear = torch.nn.Linear(96, 40, bias=bias)
    qlinear = Int8Linear.from_linear(linear)
    x = torch.randn(3, 5, 96)
    expected = torch.nn.functional.linear(x, qlinear.dequantized(), linear.bias)
    got = qlinear(x)
    assert got.shape == (3, 5, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    assert torch.corrcoef(torch.stack([got.flatten(), expected.flatten()]))[0, 1] > 0.9999


def test_int8_model_keeps_the_embedding_tied_and_its_bytes_quartered():
    """Guards quantize_model: every matrix int8, wte and lm_head one int8 matrix, 4x fewer
    bytes read per token, logits close to fp32's."""
    model = GPT(tiny_config("gpt2", vocab_size=256, d_model=64)).eval()
    idx = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = model(idx)
    fp32_bytes = weight_bytes_per_token(model)
    quantize_model(model, "int8")
    assert isinstance(model.wte, Int8Embedding) and isinstance(model.lm_head, Int8Linear)
    assert model.wte.weight is model.lm_head.weight
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert weight_bytes_per_token(model) < 0.3 * fp32_bytes
    with torch.no_grad():
        got = model(idx)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert generate(model, idx, 5, temperature=0).shape == (2, 17)


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
    """Guards `gptkit sample --weights`: each choice generates; a bad one is refused."""
    data = fake_data(tmp_path / "data")
    run = train(tiny(data, tmp_path / "run", max_steps=2, eval_every=0), progress=False)
    for weights in ("bf16", "int8"):
        args = ["sample", str(run), "--prompt", "abc", "--max-new-tokens", "5", "--seed", "1"]
        assert main([*args, "--weights", weights]) == 0
        assert capsys.readouterr().out.startswith("abc")
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", str(run), "--weights", "int4"])
    assert exit_info.value.code == 2
    with pytest.raises(GptkitError):
        quantize_model(GPT(tiny_config()), "int4")
