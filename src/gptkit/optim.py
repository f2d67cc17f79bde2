"""One optimizer step of torch's fused AdamW, without `Optimizer.step`'s Python around it.

For a small model `Optimizer.step` costs about as much as the update itself. Timed on
the 2-core dev machine for the Shakespeare benchmark's model (52 tensors, 810k
parameters, two groups), torch.profiler: the fused kernels 0.96 ms per step,
`AdamW.step`'s own Python 0.71 ms (hook and profiler wrappers, each group's tensors
gathered and regrouped by device and dtype), and the 52 step counters incremented one
`add_` at a time, 0.28 ms.

`step(optimizer)` calls the same kernel (`torch._fused_adamw_`) with the same arguments
where nothing could differ from `optimizer.step()`: a torch AdamW built with `fused=True`,
no amsgrad, maximize, capturable or differentiable, a float learning rate, no step hooks,
and in every group every parameter with a dense plain-tensor gradient on one device and
dtype and its state already created (`optimizer.step()` creates it on the first step).
A group's step counters become views of one tensor, so one `add_` advances them all; the
optimizer's state dict saves and loads them as before. Everything else goes through
`optimizer.step()`.

    >>> from gptkit import optim
    >>> optim.step(optimizer)       # instead of optimizer.step()
    >>> optim.zero_grad(optimizer)  # instead of optimizer.zero_grad(set_to_none=True)
"""

from __future__ import annotations

import torch
from torch.optim import optimizer as torch_optimizer

_PLAIN_OPTIONS = {"amsgrad": False, "maximize": False, "capturable": False, "differentiable": False}


def step(optimizer: torch.optim.Optimizer) -> None:
    """optimizer.step(), through `_fused_adamw_` directly where that is the same update."""
    groups = _fused_groups(optimizer)
    if groups is None:
        optimizer.step()
        return
    with torch.no_grad():
        for group, params, grads in groups:
            state = [optimizer.state[p] for p in params]
            _counters(state).add_(1)
            beta1, beta2 = group["betas"]
            torch._fused_adamw_(
                params,
                grads,
                [s["exp_avg"] for s in state],
                [s["exp_avg_sq"] for s in state],
                [],
                [s["step"] for s in state],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                amsgrad=False,
                maximize=False,
            )


def zero_grad(optimizer: torch.optim.Optimizer) -> None:
    """optimizer.zero_grad(set_to_none=True) without its profiler wrapper (0.17 ms for
    52 tensors, against ~0.01 for the loop)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def _fused_groups(
    optimizer: torch.optim.Optimizer,
) -> list[tuple[dict, list[torch.Tensor], list[torch.Tensor]]] | None:
    """(group, params, grads) for each non-empty group, or None where `optimizer.step()`
    must run instead."""
    if (
        type(optimizer) is not torch.optim.AdamW
        or not hasattr(torch, "_fused_adamw_")
        or optimizer._optimizer_step_pre_hooks
        or optimizer._optimizer_step_post_hooks
        or getattr(torch_optimizer, "_global_optimizer_pre_hooks", None)
        or getattr(torch_optimizer, "_global_optimizer_post_hooks", None)
    ):
        return None
    groups = []
    kind = None  # the (device, dtype) every tensor must share
    for group in optimizer.param_groups:
        if not group["params"]:
            continue
        if not group.get("fused") or any(group.get(k) != v for k, v in _PLAIN_OPTIONS.items()):
            return None
        if not all(isinstance(v, float) for v in (group["lr"], *group["betas"])):
            return None
        params, grads = group["params"], []
        for p in params:
            g, s = p.grad, optimizer.state.get(p)
            if g is None or type(g) is not torch.Tensor or g.is_sparse:
                return None
            if not s or "step" not in s or "exp_avg" not in s:
                return None
            kind = kind or (p.device, p.dtype)
            if (p.device, p.dtype) != kind or (g.device, g.dtype) != kind:
                return None
            grads.append(g)
        groups.append((group, params, grads))
    return groups or None


def _counters(state: list[dict]) -> torch.Tensor:
    """One tensor whose elements are the group's step counters (`state[i]["step"]` is
    element i). Made on the first call and again whenever the state was replaced, for
    instance by `load_state_dict`."""
    steps = [s["step"] for s in state]
    base = steps[0]._base
    if (
        base is None
        or base.shape != (len(steps),)
        or any(
            t._base is not base or t.storage_offset() != base.storage_offset() + i * base.stride(0)
            for i, t in enumerate(steps)
        )
    ):
        base = torch.stack([t.detach() for t in steps])
        for i, s in enumerate(state):
            s["step"] = base[i]
    return base
