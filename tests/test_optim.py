"""gptkit.optim.step against torch's own AdamW step: the same bits, and torch's step
wherever the direct kernel call could differ (hooks, missing gradients, other options)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from gptkit import optim


def _pair(**options) -> tuple[list[nn.Module], list[torch.optim.AdamW]]:
    """Two identical small models, each with an AdamW of two groups (decay / no decay)."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3)) for _ in "ab"]
    models[1].load_state_dict(models[0].state_dict())
    opts = []
    for m in models:
        decay = [p for p in m.parameters() if p.dim() >= 2]
        other = [p for p in m.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}]
        opts.append(torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.99), **options))
    return models, opts


def _grads(model: nn.Module, k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def _assert_same(a: nn.Module, b: nn.Module, oa: torch.optim.Optimizer, ob: torch.optim.Optimizer):
    """Parameters equal, and the optimizer state of every parameter that has one."""
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
        assert (p in oa.state) == (q in ob.state)
        for key in oa.state.get(p, ()):
            assert torch.equal(oa.state[p][key], ob.state[q][key])


def test_step_is_torchs_fused_adamw_bit_for_bit():
    """Guards the direct kernel call (arguments, groups, lr changed between steps) and the
    shared step counters: 8 steps give the same parameters and state as AdamW.step."""
    (a, b), (oa, ob) = _pair(fused=True)
    for k in range(8):
        for m, o in ((a, oa), (b, ob)):
            o.param_groups[0]["lr"] = o.param_groups[1]["lr"] = 1e-2 / (k + 1)
            _grads(m, k)
        oa.step()
        optim.step(ob)
        optim.zero_grad(ob)
        assert all(p.grad is None for p in b.parameters())
        _assert_same(a, b, oa, ob)
    # From the second step on, each group's counters are views of one tensor.
    for group in ob.param_groups:
        steps = [ob.state[p]["step"] for p in group["params"]]
        assert steps[0]._base is not None and all(s._base is steps[0]._base for s in steps)
        assert [float(s) for s in steps] == [8.0] * len(steps)


def test_state_dict_round_trip_keeps_the_counters():
    """Guards checkpoints: state saved after direct steps loads into a fresh optimizer (the
    counters rebuilt as views) and both go on identically."""
    (a, b), (oa, ob) = _pair(fused=True)
    for k in range(3):
        _grads(b, k)
        optim.step(ob)
    buffer = io.BytesIO()
    torch.save(ob.state_dict(), buffer)
    buffer.seek(0)
    a.load_state_dict(b.state_dict())
    oa.load_state_dict(torch.load(buffer))
    for k in range(3, 6):
        for m, o in ((a, oa), (b, ob)):
            _grads(m, k)
            optim.step(o)
        _assert_same(a, b, oa, ob)
    assert float(oa.state[next(a.parameters())]["step"]) == 6.0


@pytest.mark.parametrize("case", ["hook", "missing grad", "not fused", "amsgrad"])
def test_falls_back_to_optimizer_step(case):
    """Guards each condition of _fused_groups: a step hook still runs (once), a parameter
    without a gradient is skipped as torch skips it, and other options get torch's step."""
    options = {"fused": True}
    if case == "not fused":
        options = {"foreach": False}
    elif case == "amsgrad":
        options["amsgrad"] = True
    (a, b), (oa, ob) = _pair(**options)
    calls: list[int] = []
    if case == "hook":
        ob.register_step_pre_hook(lambda *args: calls.append(1))
    for k in range(4):
        for m in (a, b):
            _grads(m, k)
            if case == "missing grad":
                m[2].bias.grad = None
        oa.step()
        optim.step(ob)
        _assert_same(a, b, oa, ob)
    assert calls == ([1] * 4 if case == "hook" else [])
    # torch's own step never makes the counters views.
    assert all(ob.state[p]["step"]._base is None for p in b.parameters() if p in ob.state)
