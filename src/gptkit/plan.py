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

Memory per device, for AdamW with fp32 master weights (the way gptkit trains):
weights 4 B/param, gradients 4 B, Adam moments 8 B; under bf16 autocast a bf16 copy of
the weights (2 B) lives during forward and backward. DDP replicates all of it; FSDP
divides it by the number of devices and adds the gathered parameters and gradients of the
units in flight (the root: embeddings, head, final norm; plus two blocks: the current and
the prefetched one). Activations are the tensors autograd saves for backward in gptkit's
model (counted op by op; with fused attention nothing of size T x T is kept):
per layer and token, ln inputs 2 d in fp32, then in the compute dtype the ln outputs 2 d,
q, k, v 3 d, the attention output d, the MLP hidden 2 x 4d; plus the head's logits and
log-probabilities. Activation checkpointing keeps only each block's input and recomputes
one block at a time.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Literal

from gptkit.config import GPTConfig
from gptkit.errors import GptkitError

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


def block_params(config: GPTConfig) -> int:
    """Parameters of one transformer block (the difference a layer more makes)."""
    one, two = (dataclasses.replace(config, n_layer=n).num_parameters() for n in (1, 2))
    return two - one


def activation_bytes(
    config: GPTConfig, micro_batch: int, dtype: Dtype, checkpointing: bool = False
) -> dict[str, float]:
    """Bytes autograd keeps for backward for one micro-batch: {'blocks', 'head'}.

    Counted from gptkit's model op by op (see the module docstring); the head includes the
    logits tensor the training step holds until backward.
    """
    B, T, C = micro_batch, config.context_length, config.d_model
    F, H, V = config.ffn_dim, config.n_head, config.vocab_size
    a = 2 if dtype == "bfloat16" else 4  # bytes of an activation in the compute dtype
    # ln inputs (fp32 residual stream) 2C; ln outputs 2C (pre) or c_attn input + c_fc input
    # (post); q, k, v 3C; attention output C (fused attention returns it in (B, T, H, D)
    # memory order, so the head merge before c_proj is a view, not a copy); MLP 2F for the
    # GELU (its input and output), F for the (leaky) ReLU, which keeps only its output.
    mlp = 2 * F if config.activation == "gelu" else F
    per_layer = B * T * (2 * C * 4 + 6 * C * a + mlp * a)
    per_layer += B * T * (2 * 2 * 4 + H * 4)  # ln means and rstds, attention logsumexp
    if config.dropout > 0:
        per_layer += B * T * C * (2 + 1)  # bool masks: attention and MLP residual, plus one
    if checkpointing:
        blocks = config.n_layer * B * T * C * 4 + per_layer  # inputs + one block recomputed
    else:
        blocks = config.n_layer * per_layer
    head = B * T * (8 + 8)  # ids and targets (int64)
    head += B * T * C * (4 * int(config.final_norm) + a)  # ln_f input, lm_head input
    head += B * T * V * (a + 4)  # logits, fp32 log-probabilities
    return {"blocks": float(blocks), "head": float(head)}


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
    memory: dict[str, float]  # bytes per device, by part

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


def memory_per_device(
    config: GPTConfig,
    gpus: int,
    strategy: Strategy,
    micro_batch: int,
    dtype: Dtype,
    checkpointing: bool,
) -> dict[str, float]:
    """Bytes per device by part: weights, gradients, optimizer, activations (+ FSDP buffers)."""
    n = config.num_parameters()
    shard = gpus if strategy == "fsdp" else 1
    memory = {
        "weights (fp32)": 4 * n / shard,
        "gradients (fp32)": 4 * n / shard,
        "AdamW moments (fp32)": 8 * n / shard,
    }
    p = 2 if dtype == "bfloat16" else 4
    if strategy == "fsdp":
        root = n - config.n_layer * block_params(config)
        # Gathered weights (compute dtype) and unreduced fp32 gradients of the units in flight.
        memory["gathered units (FSDP)"] = (root + 2 * block_params(config)) * (p + 4)
    elif dtype == "bfloat16":
        memory["bf16 weight copies"] = 2 * n
    act = activation_bytes(config, micro_batch, dtype, checkpointing)
    memory["activations"] = act["blocks"] + act["head"]
    return memory


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
) -> Plan:
    """The plan for training `config` on `gpus` devices; `tokens` None means 20 per parameter
    (Hoffmann et al. 2022, compute-optimal)."""
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
    memory = memory_per_device(config, gpus, strategy, micro_batch, dtype, activation_checkpointing)
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
        memory,
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
        f"x {c.context_length} tokens per device, {plan.dtype}{ac}",
        "",
        f"parameters        {_si(plan.params)} ({plan.params:,})",
        f"training tokens   {_si(plan.tokens)}{tokens_note}",
        f"training FLOPs    {plan.flops:.3g} = 6NT {matmul:.3g} + attention {attn:.3g}",
        "memory per device",
    ]
    for part, size in plan.memory.items():
        lines.append(f"  {part:<22} {size / GB:10.2f} GB")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(
        f"  {'total':<22} {plan.memory_total / GB:10.2f} GB of {plan.memory_usable / GB:.1f} "
        f"GB usable ({RESERVED:.0%} reserved): {verdict}"
    )
    if not plan.fits:
        hints = []
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
