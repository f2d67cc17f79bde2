"""Training cost on paper: parameters, FLOPs, memory per device and time, before any run.

    >>> p = estimate(GPTConfig.from_preset("gpt3-175b"), gpus=1024, gpu="h100",
    ...              tokens=300e9, mfu=0.4, strategy="fsdp", activation_checkpointing=True)
    >>> f"{p.flops:.3g}", p.fits, round(p.days, 1)
    ('3.23e+23', True, 9.2)

FLOPs (Chowdhery et al. 2022, PaLM, appendix B): per token, 6 N for the weight matmuls
(forward 2 N, backward 4 N) plus 12 L d T for the attention scores and their weighted sum,
where N counts the parameters that take part in a matmul (the unembedding included,
position tables not: they are looked up) and T is the context length. The model FLOPs
utilisation (MFU) is the share of the devices' dense bf16 peak spent on those FLOPs.
Work that activation checkpointing repeats is not model FLOPs (PaLM's MFU, not its HFU):
time at a given MFU is the same with or without it, and the training log's MFU counts the
same way. Checkpointing makes a given MFU harder to reach, by the forward it recomputes.

Memory per device is the peak of a training step, for AdamW with fp32 master weights
(the way gptkit trains): weights 4 B/param and Adam moments 8 B, held throughout; fp32
gradients 4 B, held from backward to the optimizer step (`zero_grad` frees them) or, under
DDP on several devices, throughout in its all-reduce buckets. FSDP divides weights,
gradients and moments by the number of devices and adds the gathered parameters and
gradients of the units in flight (the root: embeddings, head, final norm; plus two blocks:
the current and the prefetched one). bf16 autocast adds a bf16 copy of each weight
(2 B), saved by its product until backward, except under FSDP on a GPU, which gathers
the weights in bf16. Activations are what autograd saves for backward in gptkit's
model, counted op by op: per layer and token, the ln inputs 2 d in fp32, then in the
compute dtype the ln outputs 2 d, q, k, v 3 d, the attention output d (fused attention
keeps nothing of size T x T, except a banded layer's T x T mask), the MLP hidden 2 x 4d
(GELU) or 4d (ReLU); the head keeps its logits for the loss.

A step peaks at one of a few moments, so each is counted and the largest is the estimate:
the start of backward (every activation, plus the logits' gradient), the top block's
backward (activations, a few hidden-sized gradients, the first gradients) and the end of
backward (all the gradients, no activations). Activation checkpointing keeps only each
block's input and recomputes one block at a time; its peak is at the top block (nearly
all the inputs) or the first (nearly all the gradients). What the loss and the MLP's
backward hold depends on the kernels (`PATHS`). On the dev CPU the estimate is within
-6% .. +6% of the peak a real step allocates (tests/test_plan.py); on an H200, within 0.3%
of gpt2's two measured peaks.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Literal

from gptkit.config import GPTConfig
from gptkit.errors import GptkitError
from gptkit.kernels import CROSS_ENTROPY_MIN_CLASSES

Strategy = Literal["ddp", "fsdp"]
Dtype = Literal["bfloat16", "float32"]
GB = 1e9
RESERVED = 0.10  # share of device memory kept for the CUDA context, NCCL and fragmentation
RECOMPUTE = 1 / 3  # activation checkpointing repeats the forward: +2N of 6N per token
DTYPES = ("bfloat16", "float32")


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense (no 2:4 sparsity), as in the vendor's data sheet
    memory_gb: float


# Vendor data sheets (SXM / OAM parts unless named).
GPUS: dict[str, GPU] = {
    "h100": GPU("NVIDIA H100 SXM", 989.4, 80),
    "h100-pcie": GPU("NVIDIA H100 PCIe", 756.5, 80),
    "h100-nvl": GPU("NVIDIA H100 NVL", 835.5, 94),
    "h200": GPU("NVIDIA H200 SXM", 989.4, 141),
    "h200-nvl": GPU("NVIDIA H200 NVL", 835.5, 141),
    "gh200": GPU("NVIDIA GH200 (96 GB)", 989.4, 96),
    "b200": GPU("NVIDIA B200", 2250.0, 180),
    "a100": GPU("NVIDIA A100 SXM 80GB", 312.0, 80),
    "a100-40gb": GPU("NVIDIA A100 40GB", 312.0, 40),
    "l40s": GPU("NVIDIA L40S", 362.1, 48),
    "l4": GPU("NVIDIA L4", 121.0, 24),
    "mi300x": GPU("AMD Instinct MI300X", 1307.4, 192),
}


def gpu_by_name(name: str) -> GPU:
    if name not in GPUS:
        raise GptkitError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[name]


def gpu_of_device(device_name: str) -> GPU | None:
    """The table's entry for a name as CUDA reports it ("NVIDIA H100 80GB HBM3", "NVIDIA
    A100-SXM4-40GB"), or None for a card the table does not hold."""
    words = device_name.lower().replace("-", " ").split()
    for short in ("gh200", "h200", "h100", "b200", "a100", "l40s", "l4", "mi300x"):
        if short in words:
            if short in ("h100", "h200") and "nvl" in words:  # lower clocks than SXM
                return GPUS[f"{short}-nvl"]
            return GPUS["h100-pcie" if short == "h100" and "pcie" in words else short]
    return None


# --------------------------------------------------------------------------- FLOPs


def matmul_params(config: GPTConfig) -> int:
    """Parameters used in a matmul per token: all but the looked-up tables (the head stays)."""
    n = config.num_parameters()
    if config.positional == "learned":
        n -= config.context_length * config.d_model
    if not config.tie_embeddings:  # an untied wte is only looked up
        n -= config.vocab_size * config.d_model
    return n


def attention_flops_per_token(config: GPTConfig) -> float:
    """Training FLOPs of QK^T and AV per token: 3 x (2 matmuls x 2 L T d), full T x T."""
    return 12 * config.n_layer * config.d_model * config.context_length


def flops_per_token(config: GPTConfig) -> float:
    """Training FLOPs per token, products and attention: what MFU counts."""
    return 6 * matmul_params(config) + attention_flops_per_token(config)


def training_flops(config: GPTConfig, tokens: float) -> tuple[float, float]:
    """(6 N T, attention FLOPs) for training on `tokens` tokens."""
    return 6 * matmul_params(config) * tokens, attention_flops_per_token(config) * tokens


# --------------------------------------------------------------------------- memory

# The kernels a step runs decide what its transient tensors take. "compiled": torch.compile
# on a GPU (`gptkit train --compile`); "eager": ATen's kernels (a GPU without --compile);
# "cpu": gptkit's own CPU kernels where they apply (`gptkit.kernels`), ATen elsewhere.
PATHS = ("compiled", "eager", "cpu")


def logit_bytes(path: str, dtype: Dtype, vocab_size: int) -> int:
    """Bytes per logit (micro-batch x context x vocabulary) the loss holds at the start of
    backward: the logits as it keeps them and the gradient its backward writes.

    On an H200, gpt2 in bf16 at 64 x 1024 peaked at 43.7 GB compiled and at 63.4 GB with
    the loss outside the graph: 6.1 and 12.1 bytes per logit over the rest of this model
    (benchmarks/RESULTS.md, session 12).
    """
    a = 2 if dtype == "bfloat16" else 4
    if path == "compiled":  # inductor's fused loss: the logits, their gradient in fp32
        return a + 4
    if path == "cpu" and vocab_size >= CROSS_ENTROPY_MIN_CLASSES:  # `train.token_losses`
        return 2 * a  # the native kernel: the logits and their gradient
    return 12  # ATen's: fp32 log-probabilities, their gradient and the logits'


def mlp_backward_bytes(path: str, dtype: Dtype, activation: str) -> int:
    """Bytes per hidden unit the MLP's backward holds beyond what it frees (measured on a
    CPU, 1 to 16 sequences, fp32 and bf16: tests/test_plan.py). ATen's in-place (leaky)
    ReLU on c_fc's output, a view, has autograd copy the whole gradient around it: about
    four hidden-sized gradients; the CPU's fused fp32 kernel, two; the GELU frees its
    saved input as it goes: about one. A compiled step is counted as ATen's (not measured
    apart)."""
    a = 2 if dtype == "bfloat16" else 4
    if activation == "gelu":
        return a
    if path == "cpu" and dtype == "float32":  # `kernels.bias_leaky_relu`
        return 2 * a
    return 4 * a


def block_params(config: GPTConfig) -> int:
    """Parameters of one transformer block (the difference a layer more makes)."""
    one, two = (dataclasses.replace(config, n_layer=n).num_parameters() for n in (1, 2))
    return two - one


def layer_activation_bytes(
    config: GPTConfig, micro_batch: int, dtype: Dtype, path: str = "compiled"
) -> float:
    """Bytes one block saves for backward, counted from gptkit's model op by op."""
    B, T, C = micro_batch, config.context_length, config.d_model
    F, H = config.ffn_dim, config.n_head
    a = 2 if dtype == "bfloat16" else 4  # bytes of an activation in the compute dtype
    # ln inputs (fp32 residual stream) 2C; ln outputs 2C (pre) or c_attn input + c_fc input
    # (post); q, k, v 3C; attention output C (fused attention returns it in (B, T, H, D)
    # memory order, so the head merge before c_proj is a view, not a copy); MLP 2F for the
    # GELU (its input and output), F for the (leaky) ReLU, which keeps only its output.
    mlp = 2 * F if config.activation == "gelu" else F
    per_layer = B * T * (2 * C * 4 + 6 * C * a + mlp * a)
    per_layer += B * T * (2 * 2 * 4 + H * 4)  # ln means and rstds, attention logsumexp
    if config.dropout > 0 and path == "cpu":
        # ATen's CPU dropout keeps its scaled noise in the input's dtype, and attention
        # with dropout takes the math path: probabilities, noise and their product, T x T
        # each, in fp32 (autocast runs the softmax in fp32).
        per_layer += B * T * C * 2 * a + B * H * T * T * 3 * 4
    elif config.dropout > 0:  # boolean masks; flash attention regenerates its own
        per_layer += B * T * C * 2
    return float(per_layer)


def activation_bytes(
    config: GPTConfig,
    micro_batch: int,
    dtype: Dtype,
    checkpointing: bool = False,
    path: str = "compiled",
) -> dict[str, float]:
    """Bytes of one micro-batch held at the start of backward: {'blocks', 'head'}.

    'blocks' is what the blocks saved for backward (with checkpointing, their inputs);
    'head' the token ids and targets, the final norm's and the unembedding's inputs, and
    the logits as the loss holds them with the gradient its backward writes (`logit_bytes`).
    """
    B, T, C, V = micro_batch, config.context_length, config.d_model, config.vocab_size
    a = 2 if dtype == "bfloat16" else 4
    if checkpointing:
        blocks = config.n_layer * B * T * C * 4.0  # each block's fp32 input
    else:
        blocks = config.n_layer * layer_activation_bytes(config, micro_batch, dtype, path)
        # A banded layer's (T, T) boolean mask, saved by the attention (not per sequence).
        banded = [config.attn_band_of(i) for i in range(config.n_layer)]
        blocks += sum(T * T for b in banded if b is not None and b < T)
    head = B * T * (8 + 8)  # ids and targets (int64)
    if config.dropout > 0:  # the embeddings' dropout (fp32 noise on a CPU, else a mask)
        head += B * T * C * (4 if path == "cpu" else 1)
    head += B * T * C * (4 * int(config.final_norm) + a)  # ln_f input, lm_head input
    head += B * T * V * logit_bytes(path, dtype, V)
    return {"blocks": float(blocks), "head": float(head)}


def memory_phases(
    config: GPTConfig,
    gpus: int,
    strategy: Strategy,
    micro_batch: int,
    dtype: Dtype,
    checkpointing: bool,
    path: str = "compiled",
) -> dict[str, dict[str, float]]:
    """Bytes per device by part at each moment of a training step that can be its peak
    (the module docstring): {moment: {part: bytes}}.

    Backward frees activations as it writes gradients, so neither is counted at full size
    on top of the other: adding all the gradients to all the activations overstated a
    small model's peak by 12-21%, and by 26-33% with checkpointing.
    """
    n, L = config.num_parameters(), config.n_layer
    B, T, C, V = micro_batch, config.context_length, config.d_model, config.vocab_size
    a = 2 if dtype == "bfloat16" else 4
    block = block_params(config)
    shard = gpus if strategy == "fsdp" else 1
    held = {"weights (fp32)": 4 * n / shard, "AdamW moments (fp32)": 8 * n / shard}
    grad_bytes = 4 * n / shard
    if strategy == "ddp" and gpus > 1:
        held["gradients (fp32, DDP)"] = grad_bytes
        grad_bytes = 0.0
    copies = block_copies = 0.0
    # FSDP on a GPU gathers the weights in the compute dtype, and those are the compute
    # copies; on a CPU (gloo has no bf16 path) it gathers fp32 and autocast copies them.
    gathered_in_bf16 = strategy == "fsdp" and path != "cpu"
    if strategy == "fsdp":
        # Gathered weights and unreduced fp32 gradients of the units in flight: the root
        # (embeddings, head, final norm) and two blocks, the current and the prefetched one.
        gathered = a if gathered_in_bf16 else 4
        held["gathered units (FSDP)"] = (n - L * block + 2 * block) * (gathered + 4)
    if dtype == "bfloat16" and not gathered_in_bf16:
        # Autocast's bf16 copies of the weights, saved by each product until its backward.
        copies, block_copies = 2.0 * matmul_params(config), 2.0 * block
    act = activation_bytes(config, micro_batch, dtype, checkpointing, path)
    head_copies = copies - L * block_copies  # the unembedding's
    top_grads = grad_bytes * (n - (L - 1) * block) / n  # the head's and the top block's
    hidden = B * T * config.ffn_dim * mlp_backward_bytes(path, dtype, config.activation)
    start = {
        **held,
        "bf16 weight copies": head_copies if checkpointing else copies,
        "activations": act["blocks"],
        "logits and loss": act["head"],
    }
    if not checkpointing:
        # The embedding's gradient from the lookup. Tied, it is added to the head's: in
        # place under autocast (that one comes from a bf16 copy's backward, a fresh fp32
        # tensor), into a new sum in fp32 (it is the product's transposed output).
        tied_fp32 = config.tie_embeddings and dtype == "float32"
        embedding = V * C * 4 * (2 if tied_fp32 else 1)
        phases = {
            "start of backward": start,
            "backward, top block": {
                **held,
                "bf16 weight copies": copies,
                "activations": act["blocks"],
                "MLP backward": hidden,
                "gradients (fp32)": top_grads,
            },
            "end of backward": {
                **held,
                "gradients (fp32)": grad_bytes,
                "embedding gradient": embedding,
            },
        }
    else:
        recompute = {
            "bf16 weight copies": block_copies,
            "recomputed block": layer_activation_bytes(config, micro_batch, dtype, path),
            "MLP backward": hidden,
        }
        phases = {
            "start of backward": start,
            "backward, top block": {
                **held,
                **recompute,
                "block inputs": L * B * T * C * 4.0,
                "gradients (fp32)": top_grads,
            },
            "backward, first block": {
                **held,
                **recompute,
                "block inputs": B * T * C * 4.0,
                "gradients (fp32)": grad_bytes,
            },
        }
    return {name: {k: v for k, v in parts.items() if v} for name, parts in phases.items()}


def peak_phase(phases: dict[str, dict[str, float]]) -> str:
    """The moment of the step that holds the most."""
    return max(phases, key=lambda name: sum(phases[name].values()))


def memory_per_device(
    config: GPTConfig,
    gpus: int,
    strategy: Strategy,
    micro_batch: int,
    dtype: Dtype,
    checkpointing: bool,
    path: str = "compiled",
) -> dict[str, float]:
    """Bytes per device by part at the step's peak (`memory_phases`' largest)."""
    phases = memory_phases(config, gpus, strategy, micro_batch, dtype, checkpointing, path)
    return phases[peak_phase(phases)]


@dataclass(frozen=True)
class Plan:
    config: GPTConfig
    gpu: GPU
    gpus: int
    tokens: float
    mfu: float
    strategy: Strategy
    micro_batch: int
    activation_checkpointing: bool
    dtype: Dtype
    path: str  # the kernels the step runs (PATHS)
    phases: dict[str, dict[str, float]]  # bytes per device by part, at each candidate peak

    @property
    def peak(self) -> str:
        return peak_phase(self.phases)

    @property
    def memory(self) -> dict[str, float]:
        return self.phases[self.peak]

    @property
    def params(self) -> int:
        return self.config.num_parameters()

    @property
    def flops(self) -> float:
        return sum(training_flops(self.config, self.tokens))

    @property
    def memory_total(self) -> float:
        return sum(self.memory.values())

    @property
    def memory_usable(self) -> float:
        return self.gpu.memory_gb * GB * (1 - RESERVED)

    @property
    def fits(self) -> bool:
        return self.memory_total <= self.memory_usable

    @property
    def seconds(self) -> float:
        """Wall time at `mfu` of the devices' peak (model FLOPs: recomputation not counted)."""
        return self.flops / (self.gpus * self.gpu.bf16_tflops * 1e12 * self.mfu)

    @property
    def days(self) -> float:
        return self.seconds / 86400

    @property
    def gpu_hours(self) -> float:
        return self.seconds * self.gpus / 3600


def estimate(
    config: GPTConfig,
    gpus: int,
    gpu: str = "h100",
    tokens: float | None = None,
    mfu: float = 0.4,
    strategy: Strategy = "ddp",
    micro_batch: int = 1,
    activation_checkpointing: bool = False,
    dtype: Dtype = "bfloat16",
    path: str = "compiled",
) -> Plan:
    """The plan for training `config` on `gpus` devices; `tokens` None means 20 per parameter
    (Hoffmann et al. 2022, compute-optimal). `path` is the kernels the step runs, one of `PATHS`."""
    if not (isinstance(gpus, int) and gpus >= 1):
        raise GptkitError(f"--gpus must be a whole number >= 1, got {gpus}")
    if not 0 < mfu <= 1:  # NaN fails too
        raise GptkitError(f"--mfu must be in (0, 1], got {mfu}")
    if not (isinstance(micro_batch, int) and micro_batch >= 1):
        raise GptkitError(f"--micro-batch must be a whole number >= 1, got {micro_batch}")
    if strategy not in ("ddp", "fsdp"):
        raise GptkitError(f"--strategy must be ddp or fsdp, got {strategy!r}")
    if dtype not in DTYPES:
        raise GptkitError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if tokens is None:
        tokens = 20.0 * config.num_parameters()
    if not (math.isfinite(tokens) and tokens >= 1):  # 1e-5 parses, but is no training
        raise GptkitError(f"--tokens must be at least 1, got {tokens:g}")
    if path not in PATHS:
        raise GptkitError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    phases = memory_phases(
        config, gpus, strategy, micro_batch, dtype, activation_checkpointing, path
    )
    plan = Plan(
        config,
        gpu_by_name(gpu),
        gpus,
        tokens,
        mfu,
        strategy,
        micro_batch,
        activation_checkpointing,
        dtype,
        path,
        phases,
    )
    if not all(map(math.isfinite, (plan.flops, plan.seconds, plan.memory_total))):
        raise GptkitError("the plan's figures overflow: use a smaller --tokens or a larger --mfu")
    return plan


_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_count(text: str) -> float:
    """'300e9', '300B', '1.4T', '2.5M' -> a number."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", text)
    if not m:
        raise GptkitError(f"cannot read {text!r} as a token count (e.g. 300e9, 300B, 1.4T)")
    return float(m.group(1)) * _SUFFIX[m.group(2).upper()]


# --------------------------------------------------------------------------- report


def _si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{prefix}{unit}"
    return f"{x:.0f}{unit}"


def duration_text(seconds: float) -> str:
    """A duration as people say it: days, hours, minutes or seconds."""
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} hours"
    if seconds >= 60:
        return f"{seconds / 60:.1f} minutes"
    return f"{seconds:.2g} seconds"  # a tiny run is not "0.0 minutes"


def _gpu_hours(hours: float) -> str:
    # Whole hours for real runs; two significant digits for small ones, never "0".
    return f"{hours:,.0f}" if hours >= 10 else f"{hours:.2g}"


def report(plan: Plan, preset: str, tokens_given: bool) -> str:
    c, g = plan.config, plan.gpu
    matmul, attn = training_flops(c, plan.tokens)
    tokens_note = "" if tokens_given else " (20 per parameter, compute-optimal)"
    ac = ", activation checkpointing" if plan.activation_checkpointing else ""
    lines = [
        f"{preset}: {c.n_layer} layers, d_model {c.d_model}, {c.n_head} heads, "
        f"context {c.context_length}",
        f"on {plan.gpus} x {g.name} ({g.bf16_tflops:g} TFLOP/s bf16 dense, "
        f"{g.memory_gb:g} GB), {plan.strategy.upper()}, micro-batch {plan.micro_batch} "
        f"x {c.context_length} tokens per device, {plan.dtype}, {plan.path}{ac}",
        "",
        f"parameters        {_si(plan.params)} ({plan.params:,})",
        f"training tokens   {_si(plan.tokens)}{tokens_note}",
        f"training FLOPs    {plan.flops:.3g} = 6NT {matmul:.3g} + attention {attn:.3g}",
        f"memory per device at the step's peak ({plan.peak})",
    ]
    for part, size in plan.memory.items():
        lines.append(f"  {part:<22} {size / GB:10.2f} GB")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(
        f"  {'total':<22} {plan.memory_total / GB:10.2f} GB of {plan.memory_usable / GB:.1f} "
        f"GB usable ({RESERVED:.0%} reserved): {verdict}"
    )
    others = [f"{name} {sum(parts.values()) / GB:.2f} GB" for name, parts in plan.phases.items()]
    others.remove(f"{plan.peak} {plan.memory_total / GB:.2f} GB")
    lines.append(f"  (other moments: {'; '.join(others)})")
    if not plan.fits:
        hints = ["training with --compile"] if plan.path == "eager" else []
        if plan.strategy == "ddp":
            hints.append("--strategy fsdp")
        if not plan.activation_checkpointing:
            hints.append("--activation-checkpointing")
        if plan.micro_batch > 1:
            hints.append("a smaller --micro-batch")
        # More devices shrink only the sharded parts (not activations or gathered units).
        sharded = sum(v for k, v in plan.memory.items() if k.endswith("(fp32)"))
        if plan.strategy == "fsdp" and sharded > plan.memory_total - plan.memory_usable:
            hints.append("more --gpus")
        hints.append("a GPU with more memory")
        lines.append(f"  try: {', '.join(hints)}")
    lines.append(
        f"time at {plan.mfu * 100:.3g}% MFU   {duration_text(plan.seconds)} wall, "
        f"{_gpu_hours(plan.gpu_hours)} GPU-hours"
    )
    if plan.activation_checkpointing:
        lines.append(
            f"  (MFU counts model FLOPs; checkpointing adds {RECOMPUTE:.0%} recomputed work)"
        )
    return "\n".join(lines)
