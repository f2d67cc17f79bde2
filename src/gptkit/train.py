"""The training loop: AdamW, warm-up + cosine schedule, evaluation, checkpoints, resume.

    >>> from gptkit.config import TrainConfig
    >>> run_dir = train(TrainConfig(data="data/shakespeare", out="runs/shk", max_steps=2000))

Writes into the run directory (DESIGN.md §3): config.json, train_config.json,
tokenizer.json, model.safetensors, train_state.pt, metrics.jsonl, loss.png.

Resume is exact: `train_state.pt` holds the weights, the optimizer, the step, the torch /
numpy / python RNG states and the data-sampling generator, so on CPU N straight steps
and k + resume + (N - k) steps give bit-identical losses. Evaluation draws from its own
generator and runs without dropout, so it never perturbs the training RNG streams.

Ctrl-C or SIGTERM finishes the current step, saves and returns; a second Ctrl-C aborts
at once (the last checkpoint stays intact: every write is atomic).

Under `torchrun` the same loop trains data-parallel (DDP, or FSDP2 with --fsdp); see
gptkit.distributed for the conventions (per-process --batch-size, rank 0 writes, checkpoints
interchangeable with single-process runs).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gptkit import checkpoint as ckpt
from gptkit import distributed, kernels, malloc, optim, plan
from gptkit.config import DEFAULT_PRESET, GPTConfig, TrainConfig
from gptkit.errors import GptkitError
from gptkit.metrics import METRICS_FILE, MetricsLog, plot_losses
from gptkit.model import GPT
from gptkit.rundir import (
    changed_options,
    check_data_fits,
    check_fresh_dir,
    check_resumable,
    check_train_config,
    open_data,
    open_init,
    resume_command,
    start_run_dir,
    with_model_origin,
)

# --------------------------------------------------------------------------- configuration


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; an unusable name is a GptkitError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GptkitError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GptkitError(f"device {name!r} requested but CUDA is not available here")
    return device


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (1-based; step 0 is the start).

    Linear warm-up from 0 at step 0 to `lr` at `warmup_steps`, then a half cosine down to
    `min_lr` at `max_steps`, constant `min_lr` after that.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- model and optimizer


def build_model(config: GPTConfig, seed: int, device: torch.device) -> GPT:
    """A freshly initialised GPT; the same seed gives the same weights on every machine."""
    torch.manual_seed(seed)
    return GPT(config).to(device)


def decay_groups(model: nn.Module) -> tuple[list[str], list[str]]:
    """(decayed, not decayed) parameter names: matrices and embeddings decay; norms, biases don't.

    Weight decay on gains and biases only pulls them towards 0 with no regularising benefit
    (nanoGPT and the GPT-3 recipe exclude them). A tied lm_head appears once, as wte.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(name)
    return decay, no_decay


def configure_optimizer(
    model: nn.Module, cfg: TrainConfig, device: torch.device
) -> torch.optim.AdamW:
    params = dict(model.named_parameters())
    decay, no_decay = decay_groups(model)
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": cfg.weight_decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
    ]
    # The fused kernel is one launch per parameter group on CUDA; on CPU it is also a few
    # percent faster than the default per-tensor loop (measured on the 2-core dev machine).
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type in ("cuda", "cpu")
    )


def compile_options(device: torch.device, env: distributed.DistEnv) -> dict[str, Any] | None:
    """inductor's options for `--compile`: on a CPU in a single process, the C++ wrapper.

    inductor calls a compiled graph's kernels from generated Python by default; its
    `cpp_wrapper` generates that caller in C++. For the Shakespeare benchmark's model on
    the 2-core dev machine: 1.048x per step (median of 100 alternating rounds), and the
    first step's compilation 49 s against 44 s with an empty cache, 3.3 s against 4.4 s
    with a warm one. Distributed runs keep the default wrapper.
    """
    if device.type == "cpu" and env.world_size == 1:
        return {"cpp_wrapper": True}
    return None


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits (B, T, V), targets (B, T) -> scalar, in fp32."""
    return token_losses(logits.reshape(-1, logits.size(-1)), targets.reshape(-1)).mean()


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row's cross-entropy, fp32 (N,), of logits (N, V) against targets (N,).

    Eagerly on a CPU, over a vocabulary of `kernels.CROSS_ENTROPY_MIN_CLASSES` or more,
    through the native kernel (`kernels.cross_entropy_rows`): no fp32 copy of bf16 logits,
    no log-softmax written out and read back. Over gpt2's 50,257 classes, 1,024 rows,
    forward + backward on the dev CPU: 140.6 ms against 269.9 (fp32), 93.2 against 334.5
    (bf16); forward alone 12.3 against 89.8 (session 14). torch.compile keeps inductor's
    fused loss.
    """
    if (
        logits.device.type == "cpu"
        and logits.dtype in (torch.float32, torch.bfloat16)
        and logits.shape[-1] >= kernels.CROSS_ENTROPY_MIN_CLASSES
        and not torch.compiler.is_compiling()
        and kernels.training_namespace() is not None
    ):
        return kernels.cross_entropy_rows(logits, targets)
    return F.cross_entropy(logits.float(), targets, reduction="none")


# The vocabulary the compiled loss's unembedding multiplies by: rounded up to this.
VOCAB_MULTIPLE = 64


def padded_logits(model: GPT, idx: torch.Tensor, multiple: int = VOCAB_MULTIPLE) -> torch.Tensor:
    """`model(idx)` with the unembedding's matrix product over a vocabulary padded with zero
    rows to a multiple of `multiple`; the extra columns are sliced off, so the logits, the
    loss and every gradient are the unpadded ones.

    gpt2's 50,257 rows make an odd-sized product and odd-length rows for the loss's
    reductions; padded to 50,304, a compiled step of a 4-layer width-128 model on the
    2-core dev CPU ran 1.19x faster in fp32, 1.04x under bf16 autocast (session 13,
    benchmarks/padded_vocab.py). Only under torch.compile, where the pad fuses into the
    weight's read and the slice into the loss: eagerly both are copies, and the same step
    ran 0.90-0.93x (benchmarks/RESULTS.md).
    """
    return padded_unembedding(model, idx, multiple)[..., : model.lm_head.weight.shape[0]]


def padded_unembedding(model: GPT, idx: torch.Tensor, multiple: int) -> torch.Tensor:
    """The final hidden states times the head's weight padded with zero rows to a multiple
    of `multiple`: (B, T, V') logits whose columns past the vocabulary are zeros."""
    weight = model.lm_head.weight  # (V, C)
    padded = F.pad(weight, (0, 0, 0, -weight.shape[0] % multiple))  # (V', C), zero rows
    return F.linear(model.hidden_states(idx), padded)  # (B, T, V')


def batch_loss(
    forward: nn.Module,
    compile: bool,
    device: torch.device,
    env: distributed.DistEnv,
    vocab_multiple: int = VOCAB_MULTIPLE,
    loss_kernel: str = "inductor",
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(x, y) -> `lm_loss(forward(x), y)`, compiled with `--compile`.

    In one process the loss is compiled with the model, one graph from token ids to the
    loss, so inductor fuses the cross-entropy into the unembedding's output instead of
    writing (B, T, V) fp32 logits and reading them back: gpt2 on an H200 trained 1.23x
    faster, its peak memory 44 GB instead of 63; on the 2-core dev CPU a 4-layer width-128
    model stepped 1.45x faster with gpt2's 50,257 tokens, 1.04x with 65 characters
    (benchmarks/RESULTS.md, session 12). Its unembedding runs over the vocabulary padded
    to `vocab_multiple` (`padded_logits`; 1 pads nothing).
    Under torchrun the module itself is compiled, as DDP and FSDP expect, and the loss in
    a graph of its own: it reads the logits once, without the fp32 copy and the separate
    log-softmax ATen's eager loss makes (a compiled 4-layer width-128 step over gpt2's
    vocabulary on the dev CPU: 1.15-1.19x in fp32, 1.83x under bf16 autocast, session 14;
    on a CPU the eager `lm_loss` has since taken the native kernel and does as well, so
    the gain is the GPU's, where eager means ATen's).

    `loss_kernel="triton"` (CUDA only) computes the cross-entropy with gptkit.gpu_kernels'
    kernels instead: inside the compiled graph over the padded logits as they are, and
    eagerly (without --compile, under torchrun) over bf16 logits without the fp32 copy
    `lm_loss` makes of them.
    """
    if loss_kernel not in ("inductor", "triton"):
        raise ValueError(f"loss_kernel is 'inductor' or 'triton', not {loss_kernel!r}")
    loss_of = lm_loss
    if loss_kernel == "triton":
        if device.type != "cuda":
            raise ValueError(f"the Triton loss runs on a CUDA device, not {device.type}")
        from gptkit.gpu_kernels import cross_entropy

        def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return cross_entropy(logits, y, logits.shape[-1])

    if not compile:
        return lambda x, y: loss_of(forward(x), y)
    options = compile_options(device, env)
    if env.enabled:  # DDP's or FSDP's module between: the loss compiled in a graph of its own
        compiled = torch.compile(forward, options=options)
        compiled_loss = torch.compile(loss_of, options=options)
        return lambda x, y: compiled_loss(compiled(x), y)
    if not isinstance(forward, GPT):
        raise TypeError(f"one process trains a GPT itself, got {type(forward).__name__}")

    def model_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if loss_kernel == "triton":  # over the padded logits as they are
            logits = padded_unembedding(forward, x, vocab_multiple)
            return cross_entropy(logits, y, forward.config.vocab_size)
        return lm_loss(padded_logits(forward, x, vocab_multiple), y)

    return torch.compile(model_loss, options=options)


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU and GPU when asked; parameters and optimizer stay fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


# --------------------------------------------------------------------------- the run's state


@dataclass
class Run:
    """What the loop carries from step to step. `model` is the plain module (saved and
    optimized); `forward` the one that is called (the same module, or DDP's wrapper);
    `loss` maps a batch (x, y) to its mean loss through `forward` (see `batch_loss`)."""

    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    model: GPT
    forward: nn.Module
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    data_gen: torch.Generator
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float | None = None
    elapsed_before: float = 0.0  # training seconds of earlier sessions of this run
    saved_step: int | None = None
    pending: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    dist: distributed.DistEnv = field(default_factory=distributed.DistEnv)


def train_state(
    run: Run,
    elapsed: float,
    weights: dict[str, torch.Tensor] | None = None,
    optimizer: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything `resume_run` needs, as tensors and primitive containers only.

    `weights` and `optimizer` are the full (unsharded) states when already gathered.
    """
    return {
        "version": ckpt.TRAIN_STATE_VERSION,
        "step": run.step,
        "tokens_seen": run.tokens_seen,
        "best_val_loss": run.best_val_loss,
        "elapsed": elapsed,
        "model_config": run.model.config.to_dict(),
        "train_config": run.cfg.to_dict(),
        "model": ckpt.weights_for_save(run.model) if weights is None else weights,
        "optimizer": run.optimizer.state_dict() if optimizer is None else optimizer,
        "rng": ckpt.capture_rng(),
        "data_rng": run.data_gen.get_state(),
        "world_size": run.dist.world_size,  # --batch-size is per process: the global batch
    }


def resume_run(run: Run, state: dict[str, Any]) -> None:
    """Put `run` back exactly where `state` was saved (weights: loaded by `setup` already)."""
    distributed.load_optimizer_state(run.model, run.optimizer, state["optimizer"])
    run.data_gen.set_state(state["data_rng"])
    ckpt.restore_rng(state["rng"])
    run.step = run.saved_step = state["step"]
    run.tokens_seen = state["tokens_seen"]
    run.best_val_loss = state["best_val_loss"]
    run.elapsed_before = state["elapsed"]


# --------------------------------------------------------------------------- setup


def setup(
    cfg: TrainConfig,
    env: distributed.DistEnv | None = None,
    device: torch.device | None = None,
) -> Run:
    """Check everything, then build a fresh run or restore the one in --out.

    `env` and `device` come from `distributed.init` under torchrun; a single process
    otherwise.
    """
    check_train_config(cfg)
    env = distributed.DistEnv() if env is None else env
    device = resolve_device(cfg.device) if device is None else device
    meta, train_tokens, val_tokens, tokenizer = open_data(cfg)
    run_dir = Path(cfg.out)
    state = init_weights = None
    if cfg.resume:
        state = ckpt.load_train_state(run_dir)
        check_resumable(cfg, run_dir, meta, tokenizer, state)
        changed = changed_options(
            state["train_config"], cfg, state.get("world_size"), env.world_size
        )
        if changed and env.is_main:
            print(f"resuming {run_dir} with changed options: {', '.join(changed)}", file=sys.stderr)
        cfg = with_model_origin(cfg, state["train_config"])
        config = GPTConfig.from_dict(state["model_config"])
    else:
        check_fresh_dir(run_dir)
        if cfg.init_from is not None:
            config, init_weights = open_init(cfg, tokenizer)
        else:
            try:
                config = GPTConfig.from_preset(
                    cfg.preset or DEFAULT_PRESET,
                    vocab_size=meta["vocab_size"],
                    **cfg.model_overrides(),
                )
            except ValueError as e:
                raise GptkitError(str(e)) from None
    check_data_fits(cfg, config.context_length, len(train_tokens), len(val_tokens))
    if env.is_main:
        start_run_dir(cfg, run_dir, config)
    if device.type == "cpu":
        malloc.keep_freed_memory()  # each step's activations reuse the last step's pages
    if device.type == "cuda":  # fp32 products on the tensor cores, as nanoGPT and litgpt train
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_model(config, cfg.seed, device)
    if state is not None:  # before sharding: FSDP then splits the loaded weights
        ckpt.load_weights(model, state["model"], run_dir / ckpt.TRAIN_STATE_FILE)
    elif init_weights is not None:
        ckpt.load_weights(model, init_weights, cfg.init_from)
    if cfg.activation_checkpointing:
        distributed.checkpoint_blocks(model)
    wrapped = distributed.wrap(model, env, cfg.fsdp, cfg.dtype)  # DDP, FSDP or model itself
    run = Run(
        cfg=cfg,
        run_dir=run_dir,
        device=device,
        model=model,
        forward=wrapped,
        loss=batch_loss(wrapped, cfg.compile, device, env),
        optimizer=configure_optimizer(model, cfg, device),
        data_gen=torch.Generator().manual_seed(cfg.seed),  # alike on all ranks (global batch)
        train_tokens=train_tokens,
        val_tokens=val_tokens,
        dist=env,
    )
    if state is not None:
        resume_run(run, state)
    return run


# --------------------------------------------------------------------------- step and evaluation


def train_step(run: Run, lr: float) -> torch.Tensor:
    """One optimizer step over `grad_accum` micro-batches; the mean loss, left on the device."""
    from gptkit.data import sample_batch

    cfg, T = run.cfg, run.model.config.context_length
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    # Ranks > 0 draw this step's dropout masks from (seed, rank, step): resumed or not, the
    # same masks (rank 0 keeps the stream its checkpoint saves).
    distributed.seed_rank(cfg.seed, run.dist, run.step)
    total = torch.zeros((), device=run.device)
    rank, world = run.dist.rank, run.dist.world_size
    for i in range(cfg.grad_accum):
        # This rank's slice of the global batch (the whole batch in a single process).
        x, y = sample_batch(
            run.train_tokens, cfg.batch_size, T, run.data_gen, run.device, rank, world
        )
        # Across ranks, gradients are averaged once, after the last micro-batch.
        with distributed.grad_sync(run.forward, i == cfg.grad_accum - 1):
            with autocast(run.device, cfg.dtype):
                loss = run.loss(x, y)
            # Summing loss / grad_accum over micro-batches gives the gradient of the mean.
            loss = loss / cfg.grad_accum
            loss.backward()
        total += loss.detach()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    optim.step(run.optimizer)
    optim.zero_grad(run.optimizer)
    run.tokens_seen += cfg.grad_accum * cfg.batch_size * T * world
    return total


@torch.no_grad()
def estimate_val_loss(run: Run) -> float:
    """Mean loss on `eval_steps` random val batches, the same batches at every evaluation.

    A generator of its own (seeded from the run's seed) keeps the training RNG untouched and
    makes successive evaluations comparable.
    """
    from gptkit.data import sample_batch

    cfg, T = run.cfg, run.model.config.context_length
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    run.forward.eval()
    losses = torch.zeros(cfg.eval_steps, device=run.device)
    for i in range(cfg.eval_steps):
        x, y = sample_batch(
            run.val_tokens, cfg.batch_size, T, gen, run.device, run.dist.rank, run.dist.world_size
        )
        with autocast(run.device, cfg.dtype):
            losses[i] = run.loss(x, y)
    run.forward.train()
    return distributed.mean(losses.mean(), run.dist).item()


@torch.no_grad()
def evaluate_full(
    model: nn.Module,
    tokens: np.ndarray,
    batch_size: int,
    context_length: int,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
) -> float:
    """Mean next-token loss over the whole split (every token but the first predicted once)."""
    from gptkit.data import eval_batches

    device = torch.device(device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in eval_batches(tokens, batch_size, context_length):
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            total += lm_loss(model(x), y).item() * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / count


def flush_losses(run: Run) -> list[float]:
    """The losses of the steps since the last call, synchronised at once; NaN/inf stops the run.

    Reading a loss forces a device sync, so the loop collects them and reads them together
    at log, eval and save points, always before anything is written.
    """
    if not run.pending:
        return []
    steps = [s for s, _ in run.pending]
    # Each rank's loss is the mean over its slice; their mean is the global batch's loss.
    values = distributed.mean(torch.stack([t for _, t in run.pending]), run.dist).tolist()
    run.pending.clear()
    for step, value in zip(steps, values, strict=True):
        if not math.isfinite(value):
            raise GptkitError(
                f"loss became {value} at step {step}; {kept_checkpoint(run)} "
                "(try a lower --lr or --grad-clip)"
            )
    return values


def kept_checkpoint(run: Run) -> str:
    if run.saved_step is None:
        return "no checkpoint was written"
    return f"last good checkpoint at step {run.saved_step} is kept in {run.run_dir}"


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(run: Run, elapsed: float) -> None:
    """train_state.pt (self-sufficient for resume), then model.safetensors, then loss.png.

    In that order a kill between the two writes leaves a run that resumes (its weights
    file at most one checkpoint behind); the other way round, a kill during the first save
    left weights without a state: a directory neither --resume nor a new run would take.
    """
    # Never replace a good checkpoint with weights that diverged: the last step's loss can
    # be finite while its update already produced inf/NaN weights.
    flush_losses(run)
    if not distributed.weights_finite(run.model, run.dist):
        raise GptkitError(
            f"weights became non-finite at step {run.step}; {kept_checkpoint(run)} "
            "(try a lower --lr or --grad-clip)"
        )
    # Full states, gathered from the shards under FSDP (all ranks take part; rank 0 writes).
    weights = distributed.full_weights(run.model)
    optimizer = distributed.full_optimizer_state(run.model, run.optimizer)
    if run.dist.is_main:
        ckpt.save_train_state(run.run_dir, train_state(run, elapsed, weights, optimizer))
        ckpt.save_weights(run.run_dir, weights, run.model.config)
        plot_losses(run.run_dir)
    run.saved_step = run.step


# --------------------------------------------------------------------------- signals


@dataclass
class StopFlag:
    signum: int | None = None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """SIGINT/SIGTERM set a flag the loop checks after each step; handlers restored on exit.

    A second Ctrl-C raises KeyboardInterrupt at once (atomic writes keep the last
    checkpoint whole). Outside the main thread signals can't be caught: no handlers then.
    """
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step and saving "
            "(Ctrl-C again to abort without saving)",
            file=sys.stderr,
        )

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Train (or resume) the run in `cfg.out`; returns the run directory.

    Under torchrun every process calls this; they train one model together.
    """
    return train_until_stopped(cfg, progress)[0]


def train_until_stopped(cfg: TrainConfig, progress: bool = True) -> tuple[Path, int | None]:
    """`train`, also saying whether a signal stopped it: (run directory, SIGINT or SIGTERM
    or None). `gptkit train` then exits 128 + the signal's number, as a killed process
    would, so that a job scheduler sees the run did not finish."""
    check_train_config(cfg)  # before joining: a bad option is not the group's to wait on
    env, device = distributed.init(cfg.device, cfg.dist_timeout)
    finished = False
    try:
        if cfg.fsdp and not env.enabled:
            raise GptkitError("--fsdp shards across processes: launch with torchrun")
        outcome = _train(cfg, progress, env, device)
        finished = True
        return outcome
    finally:
        distributed.shutdown(env, finished)


def _train(
    cfg: TrainConfig, progress: bool, env: distributed.DistEnv, device: torch.device
) -> tuple[Path, int | None]:
    run = setup(cfg, env, device)
    if env.is_main:
        metrics = MetricsLog(run.run_dir / METRICS_FILE, run.saved_step if cfg.resume else None)
    else:
        metrics = distributed.NoMetrics()  # only rank 0 writes
    try:
        with stop_on_signals() as stop:
            reason = loop(run, metrics, stop, progress and env.is_main)
    finally:
        metrics.close()
    if reason != "done" and env.is_main:
        print(
            f"{reason}: stopped at step {run.step}; checkpoint saved in {run.run_dir}\n"
            f"resume with: {resume_command(cfg, env.world_size)}",
            file=sys.stderr,
        )
    return run.run_dir, stop.signum


def peak_flops(device: torch.device, world_size: int) -> float | None:
    """Dense bf16 FLOP/s of the run's GPUs together, where gptkit.plan knows the card: the
    training log's MFU divides by it (the figure benchmarks/gpu_train.py reports)."""
    if device.type != "cuda":
        return None
    gpu = plan.gpu_of_device(torch.cuda.get_device_name(device))
    return None if gpu is None else gpu.bf16_tflops * 1e12 * world_size


def loop(run: Run, metrics: MetricsLog, stop: StopFlag, progress: bool) -> str:
    """Steps until max_steps, max_time or a signal; returns why it stopped."""
    from tqdm import tqdm

    cfg = run.cfg
    peak = peak_flops(run.device, run.dist.world_size)
    flops = plan.flops_per_token(run.model.config)
    start = time.perf_counter()
    window_start, window_tokens = start, 0
    bar = tqdm(
        total=cfg.max_steps, initial=run.step, unit="step", file=sys.stderr, disable=not progress
    )
    try:
        while True:
            # 1. one optimizer step (its loss stays on the device until the next flush)
            lr = lr_at(run.step + 1, cfg)
            tokens_before = run.tokens_seen
            run.pending.append((run.step + 1, train_step(run, lr)))
            run.step += 1
            window_tokens += run.tokens_seen - tokens_before
            bar.update(1)
            now = time.perf_counter()
            elapsed = run.elapsed_before + now - start
            done = run.step >= cfg.max_steps
            timed_out = cfg.max_time is not None and now - start >= cfg.max_time
            # Decide on a snapshot: a signal that lands after it (even during the vote
            # below) waits for the next step, so every rank acts on the same answer.
            signalled = stop.signum is not None
            if run.dist.enabled:  # all ranks stop at the same step, or none does
                timed_out, signalled = distributed.any_rank([timed_out, signalled], run.dist)
                if signalled and stop.signum is None:
                    stop.signum = signal.SIGTERM  # another rank was asked to stop
            # 2. log: the step's loss, learning rate and throughput since the last log
            if run.step % cfg.log_every == 0 or done:
                loss = flush_losses(run)[-1]
                speed = window_tokens / max(now - window_start, 1e-9)
                record = {
                    "step": run.step,
                    "train_loss": loss,
                    "lr": lr,
                    "tokens_per_sec": speed,
                    "elapsed": elapsed,
                    "tokens": run.tokens_seen,
                }
                shown = {"loss": f"{loss:.4f}", "tok_s": f"{speed:,.0f}"}
                if peak is not None:
                    record["mfu"] = flops * speed / peak
                    shown["mfu"] = f"{record['mfu']:.1%}"
                metrics.write(record)
                bar.set_postfix(shown, refresh=False)
                window_start, window_tokens = time.perf_counter(), 0
            # 3. evaluate on the validation split
            if cfg.eval_every and (run.step % cfg.eval_every == 0 or done):
                flush_losses(run)
                val = estimate_val_loss(run)
                if run.best_val_loss is None or val < run.best_val_loss:
                    run.best_val_loss = val
                metrics.write({"step": run.step, "val_loss": val, "elapsed": elapsed})
                window_start, window_tokens = time.perf_counter(), 0
            # 4. checkpoint, and stop when finished, out of time or asked to
            stopping = done or timed_out or signalled
            if stopping or (cfg.save_every and run.step % cfg.save_every == 0):
                save_checkpoint(run, elapsed)
                window_start, window_tokens = time.perf_counter(), 0
            if stopping:
                break
    finally:
        bar.close()
    if done:
        return "done"
    if stop.signum is not None:
        return signal.Signals(stop.signum).name
    return f"--max-time {cfg.max_time:g}s reached"
