"""Data-parallel training across processes: DDP and FSDP2, through PyTorch's own engine.

`torchrun` starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK (plus
MASTER_ADDR/MASTER_PORT); `init` reads them and joins the process group (NCCL on CUDA,
gloo on CPU). Without them, training is a single process and nothing here does anything.

    torchrun --nproc-per-node 8 -m gptkit train --data data/owt --preset gpt2 --batch-size 16
    torchrun --nproc-per-node 8 -m gptkit train ... --fsdp   # shard params, grads, AdamW state

Conventions (train.py relies on them):

- `--batch-size` is per process. Every rank draws the offsets of the *global* batch
  (batch_size x world_size windows) from one generator seeded alike on all ranks and keeps
  its own slice, so ranks never read the same window and the run sees exactly the batches
  of a single process with `--batch-size batch_size x world_size`. Gradients are averaged
  across ranks, so the two runs take the same steps.
- Checkpoints hold full, unsharded fp32 state in the single-process format (plain state
  dicts, the optimizer keyed by parameter index), written by rank 0 only. Any run loads
  any checkpoint: 1 process, N processes, DDP or FSDP.
- Only rank 0 logs, prints and writes files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from gptkit.errors import GptkitError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job. The defaults are a single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False  # a process group is up (torchrun launched us)
    # A gloo group for the per-step stop/time-out votes, so that they never wait on the GPU.
    cpu_group: Any = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device_name: str, timeout_s: float = 600.0) -> tuple[DistEnv, torch.device]:
    """Join the process group when torchrun started us; the device this rank trains on.

    `device_name` is TrainConfig.device: under torchrun, `auto` and `cuda` mean this rank's
    own GPU (cuda:LOCAL_RANK); `cpu` forces gloo on CPU. `timeout_s` bounds how long a
    collective waits for a process that stalled (gloo's own default is 30 minutes, NCCL's
    10); the job then fails and can be resumed from its last checkpoint.
    """
    if not launched_by_torchrun():
        return DistEnv(), _single_device(device_name)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise GptkitError(f"device {device_name!r} requested but CUDA is not available here")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, device_id=_device_id(device), timeout=timeout)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if use_cuda else None
    return DistEnv(rank, world, local_rank, enabled=True, cpu_group=cpu_group), device


def _device_id(device: torch.device) -> torch.device | None:
    # Binding the group to the GPU lets NCCL set up eagerly; gloo takes no device.
    return device if device.type == "cuda" else None


def _single_device(name: str) -> torch.device:
    from gptkit.train import resolve_device

    return resolve_device(name)


def shutdown(env: DistEnv, finished: bool = False) -> None:
    """Leave the process group. `finished`: every rank got here normally, so wait for the
    others first: a rank that tore its group down while rank 0 was still saving aborted
    once in gloo's teardown ("terminate called without an active exception")."""
    if env.enabled and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------- wrapping


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing: each block keeps only its input and recomputes the rest
    during backward (about one block's activations live instead of all of them).

    Sets an instance-level `forward` on each block, so parameter names, state dicts and
    the FSDP hooks (which run in `__call__`, outside the checkpointed region) are unchanged.
    """
    for block in model.h:
        inner = block.forward

        def forward(x: torch.Tensor, kv_cache: Any = None, layer: int = 0, _f: Any = inner):
            if kv_cache is not None or not torch.is_grad_enabled():
                return _f(x, kv_cache, layer)  # inference: nothing to save
            return checkpoint(_f, x, kv_cache, layer, use_reentrant=False)

        block.forward = forward


def wrap(model: nn.Module, env: DistEnv, fsdp: bool, dtype: str) -> nn.Module:
    """The module the training loop calls: DDP(model), or `model` itself sharded by FSDP2.

    FSDP2 shards in place: each block is one unit (gathered just before its forward and
    freed after), the root holds the embeddings, the tied head and the final norm.
    """
    if fsdp:
        if not env.enabled:
            raise GptkitError("--fsdp shards across processes: launch with torchrun")
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        device = next(model.parameters()).device
        mp = MixedPrecisionPolicy()
        if dtype == "bfloat16" and device.type == "cuda":
            # Gather and compute in bf16, reduce gradients in fp32 (gloo has no bf16 path).
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.h:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    if not env.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    # Gradients as views into the all-reduce buckets: no second copy of every gradient.
    return DDP(model, device_ids=ids, gradient_as_bucket_view=True)


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def grad_sync(forward: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter for micro-batches before the last one
    of a step: the gradients accumulate locally and are synchronised once."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    module = getattr(forward, "_orig_mod", forward)  # behind torch.compile
    if enabled:
        yield
    elif isinstance(module, DDP):
        with module.no_sync():
            yield
    elif is_fsdp(module):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


# --------------------------------------------------------------------------- collectives


def mean(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The mean of `t` over ranks (every rank gets it); `t` itself in a single process."""
    if not env.enabled:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / env.world_size


def any_rank(flags: list[bool], env: DistEnv) -> list[bool]:
    """flags[i] is True on every rank when it is True on any (stop, time out, bad weights).

    Ranks must agree before acting: one that leaves the loop alone would leave the others
    waiting forever in their next collective.
    """
    if not env.enabled:
        return flags
    t = torch.tensor([int(f) for f in flags])  # CPU: gloo (the cpu_group under NCCL)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=env.cpu_group)
    return [bool(v) for v in t.tolist()]


def weights_finite(model: nn.Module, env: DistEnv) -> bool:
    """All weights finite on every rank (each checks its own shard under FSDP)."""
    local = [getattr(p, "_local_tensor", p) for p in model.parameters()]  # DTensor -> shard
    bad = not all(torch.isfinite(t).all() for t in local)
    return not any_rank([bad], env)[0]


def seed_rank(seed: int, env: DistEnv, step: int) -> None:
    """Give ranks other than 0 their own torch RNG stream (dropout masks) for a step.

    Rank 0 keeps the stream of a single-process run; on resume every rank restored rank
    0's saved state, so the others derive theirs from the step, at every step (seeded once,
    a resumed rank's stream would differ from the one it had when not interrupted).
    """
    if env.rank > 0:
        torch.manual_seed(seed + 1_000_003 * env.rank + step)


class NoMetrics:
    """Stands in for MetricsLog on ranks other than 0: they log nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- checkpoints


def full_weights(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Unsharded fp32 CPU weights as `checkpoint.weights_for_save` gives them.

    Collective under FSDP (every rank must call it); only rank 0 gets the tensors, the
    others get None.
    """
    from gptkit import checkpoint as ckpt

    if not is_fsdp(model):
        return ckpt.weights_for_save(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if dist.get_rank() != 0:
        return None
    if model.config.tie_embeddings:
        state.pop(ckpt.TIED_KEY, None)
    return {k: v.detach().float().contiguous() for k, v in state.items()}


def _param_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order: index i of `optimizer.state_dict()`."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any] | None:
    """`optimizer.state_dict()` of the unsharded run (keys are parameter indices).

    Collective under FSDP; rank 0 gets it, the others None. Without FSDP every rank holds
    the same full state already.
    """
    if not is_fsdp(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    if dist.get_rank() != 0:
        return None
    index = {name: i for i, name in enumerate(_param_order(model, optimizer))}
    return {
        "state": {index[n]: s for n, s in by_name["state"].items()},
        "param_groups": [
            {**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]
        ],
    }


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a full `optimizer.state_dict()` (as saved by any run) into this run's optimizer."""
    if not is_fsdp(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_order(model, optimizer)
    by_name = {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [
            {**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]
        ],
    }
    # Every rank read the file, so each shards its own copy (no broadcast from rank 0).
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, optimizer, by_name, options=options)
