"""The training-cost planner: FLOPs against the GPT-3 paper, memory against a real step."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from gptkit.cli import main
from gptkit.config import GPTConfig
from gptkit.errors import GptkitError
from gptkit.model import GPT, MLP
from gptkit.plan import (
    GPUS,
    activation_bytes,
    block_params,
    estimate,
    gpu_of_device,
    memory_per_device,
    parse_count,
    training_flops,
)
from gptkit.train import lm_loss


def test_gpt3_175b_on_300b_tokens_costs_the_papers_flops():
    """Guards the FLOP count: Brown et al. 2020 (Table D.1) give 3.14e23 for 175B x 300B."""
    config = GPTConfig.from_preset("gpt3-175b")
    matmul, attention = training_flops(config, 300e9)
    assert matmul + attention == pytest.approx(3.14e23, rel=0.05)
    assert matmul == pytest.approx(3.14e23, rel=0.01)  # the paper's 6NT
    assert 0 < attention < 0.05 * matmul


def test_block_params_is_one_layer_of_the_closed_form():
    """Guards the FSDP unit size: L blocks + embeddings + final norm = the whole model."""
    c = GPTConfig.from_preset("gpt2")
    rest = c.vocab_size * c.d_model + c.context_length * c.d_model + 2 * c.d_model
    assert c.n_layer * block_params(c) + rest == c.num_parameters()
    assert block_params(c) == 12 * c.d_model**2 + 13 * c.d_model


def measured_training_bytes(config: GPTConfig, batch: int) -> tuple[int, int]:
    """(activation bytes, total bytes) of one fp32 AdamW step on CPU, counted from tensors:
    storages autograd saves for backward (parameters excluded) plus the logits the step
    holds, then parameters, gradients and Adam moments."""
    model = GPT(config)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randint(0, config.vocab_size, (batch, config.context_length))
    with saved_tensors_hooks(pack, lambda t: t):
        logits = model(x)
        loss = lm_loss(logits, x)
    saved.setdefault(logits.untyped_storage().data_ptr(), logits.untyped_storage().nbytes())
    optimizer = torch.optim.AdamW(model.parameters())
    loss.backward()
    optimizer.step()
    states = sum(
        t.nbytes for s in optimizer.state.values() for t in s.values() if t.dim() > 0
    )  # exp_avg, exp_avg_sq (the step counters are scalars)
    weights = sum(p.nbytes for p in model.parameters())
    grads = sum(p.grad.nbytes for p in model.parameters())
    activations = sum(saved.values())
    return activations, weights + grads + states + activations


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("family", ["gpt2", "seed-tiny"])
def test_memory_estimate_matches_what_a_training_step_allocates(family, native, monkeypatch):
    """Guards the memory model: within 10% of the tensors a real fp32 step holds (pre-LN
    GPT-2 and post-LN seed blocks), activations alone within 10% too; with the CPU's
    native bias + activation kernels and with ATen's activations (as on a GPU)."""
    if not native:
        monkeypatch.setattr(MLP, "_native_fits", lambda self, x: False)
    config = GPTConfig.from_preset(
        family, vocab_size=512, context_length=128, n_layer=4, n_head=4, d_model=128
    )
    activations, total = measured_training_bytes(config, batch=4)
    estimated = memory_per_device(config, 1, "ddp", 4, "float32", False)
    assert estimated["activations"] == pytest.approx(activations, rel=0.10)
    assert sum(estimated.values()) == pytest.approx(total, rel=0.10)


def test_sharding_and_checkpointing_reduce_memory():
    """Guards the strategy terms: FSDP divides the states, checkpointing the activations."""
    c = GPTConfig.from_preset("gpt3-xl")
    ddp = memory_per_device(c, 8, "ddp", 4, "bfloat16", False)
    fsdp = memory_per_device(c, 8, "fsdp", 4, "bfloat16", False)
    assert fsdp["AdamW moments (fp32)"] * 8 == ddp["AdamW moments (fp32)"]
    full = sum(activation_bytes(c, 4, "bfloat16").values())
    ac = sum(activation_bytes(c, 4, "bfloat16", checkpointing=True).values())
    assert ac < full / 3


def test_plan_time_and_fit():
    """Guards time = FLOPs / (gpus x peak x MFU) and the fits verdict."""
    p = estimate(GPTConfig.from_preset("gpt2"), gpus=8, gpu="h100", tokens=10e9, mfu=0.5)
    assert p.seconds == pytest.approx(p.flops / (8 * 989.4e12 * 0.5))
    assert p.gpu_hours == pytest.approx(p.seconds * 8 / 3600)
    assert p.fits
    big = estimate(GPTConfig.from_preset("gpt3-175b"), gpus=8, gpu="h100", tokens=1e9)
    assert not big.fits


def test_time_at_an_mfu_counts_model_flops_only():
    """Guards the MFU convention: the training log's MFU leaves recomputation out, so the
    time at a given MFU must not grow with activation checkpointing (it did, by 4/3)."""
    config = GPTConfig.from_preset("gpt3-175b")
    plain, ac = (
        estimate(config, 1024, tokens=300e9, strategy="fsdp", activation_checkpointing=on)
        for on in (False, True)
    )
    assert ac.seconds == pytest.approx(plain.seconds)
    assert round(ac.days, 1) == 9.2


def test_plan_module_example_holds():
    """Guards the module docstring's example (it once claimed a plan fits that does not)."""
    import doctest

    import gptkit.plan

    result = doctest.testmod(gptkit.plan)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"gpus": float("nan")},
        {"gpus": 2.5},
        {"micro_batch": float("nan")},
        {"dtype": "float16"},
        {"mfu": 1e-320},  # valid, but the time overflows to inf
        {"tokens": 1e305},
    ],
)
def test_estimate_refuses_what_the_cli_refuses(kwargs):
    """Guards the API's checks: NaN and unknown values gave nan times and fits=True."""
    args = {"gpus": 1, **kwargs}
    with pytest.raises(GptkitError):
        estimate(GPTConfig.from_preset("gpt3-175b"), **args)


def test_more_gpus_is_suggested_only_when_it_can_help(capsys):
    """Guards the hint: gathered FSDP units do not shrink with more devices."""
    args = ["plan", "gpt3-175b", "--strategy", "fsdp", "--activation-checkpointing"]
    main([*args, "--gpus", "1000000", "--gpu", "a100-40gb"])
    assert "more --gpus" not in capsys.readouterr().out
    main([*args, "--gpus", "8"])
    assert "more --gpus" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("device_name", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA H100 NVL", "h100-nvl"),
        ("NVIDIA H200 NVL", "h200-nvl"),
        ("NVIDIA GH200 480GB", "gh200"),
        ("NVIDIA A100-SXM4-40GB", "a100"),
        ("NVIDIA A100 80GB PCIe", "a100"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA L4", "l4"),
        ("AMD Instinct MI300X", "mi300x"),
        ("NVIDIA L40", None),  # not the L40S: unknown, no MFU rather than a wrong one
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_gpu_of_device_reads_the_names_cuda_reports(device_name, key):
    """Guards the peak an MFU figure divides by: each card's own entry, none for others."""
    assert gpu_of_device(device_name) == (None if key is None else GPUS[key])


@pytest.mark.parametrize(
    "text,value", [("300e9", 300e9), ("300B", 300e9), ("1.4T", 1.4e12), ("2.5m", 2.5e6)]
)
def test_parse_count(text, value):
    """Guards the --tokens formats."""
    assert parse_count(text) == pytest.approx(value)


def test_plan_command(capsys):
    """Guards `gptkit plan`: the report and its one-line errors."""
    assert main(["plan", "gpt3-175b", "--gpus", "1024", "--tokens", "300B", "--strategy",
                 "fsdp", "--activation-checkpointing"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "3.23e+23" in out and "fits" in out and "GPU-hours" in out
    assert main(["plan", "gpt2", "--gpus", "1", "--gpu", "tpu"]) == 2
    assert "unknown GPU 'tpu'" in capsys.readouterr().err
    assert main(["plan", "gpt2", "--gpus", "1", "--tokens", "lots"]) == 2
    with pytest.raises(GptkitError):
        estimate(GPTConfig.from_preset("gpt2"), gpus=0)


def test_plan_small_runs_are_not_zero(capsys):
    """Guards --tokens 1e-5 being accepted, and small runs shown as "0.0 minutes wall,
    0 GPU-hours"."""
    assert main(["plan", "gpt2", "--gpus", "1", "--tokens", "1e-5"]) == 2
    assert "--tokens must be at least 1" in capsys.readouterr().err
    for argv, expected in [
        (["--gpus", "1", "--tokens", "1M"], "2.2 seconds wall, 0.0006 GPU-hours"),
        (["--gpus", "8", "--tokens", "1B"], "4.5 minutes wall, 0.6 GPU-hours"),
    ]:
        assert main(["plan", "gpt2", *argv]) == 0
        time_line = capsys.readouterr().out.splitlines()[-1]
        assert time_line.endswith(expected), time_line
