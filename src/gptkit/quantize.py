"""Smaller weights for faster CPU decoding: bf16, and weight-only int8 with per-channel scales.

Decoding one token at batch 1 reads every weight once and does 2 FLOPs per weight, so on a
CPU its speed is set by memory bandwidth: halving the bytes per weight (bf16) or quartering
them (int8) raises the ceiling in proportion.

    >>> model = quantize_model(load_model("runs/demo"), "int8")
    >>> generate(model, idx, 100)

Both are weight-only: the matrices are stored small, activations, layer norms, positions and
the KV cache stay fp32. `WeightOnlyLinear` is the drop-in `nn.Linear` for either. For the
few rows of a decode step on a CPU it calls gptkit's native kernel (`gptkit.kernels`: bf16
weights widened to fp32 in registers with fp32 accumulation; int8 weights widened to int16
and multiplied with the input row in 16-bit fixed point, within 2^-16 of its largest
entry, summed exactly in integers), which streams bf16 and int8 weights close to the
memory bandwidth where ATen's kernels did not. int8 and blocked (below) weights take it for
more rows too (a prompt, a large batch: up to 48 rows 8 per pass, faster than ATen's
kernels there; past 48, where the product is compute-bound, the kernel widens the weights
to fp32 a slab of 512 rows at a time and multiplies them with MKL's sgemm, ~1.1x fp32's
time).
Other bf16 weights with more rows, a GPU, or a machine where the kernel cannot be built use
ATen: a bf16 matmul of bf16-rounded activations, or `_weight_int8pack_mm` (where the input
width is a multiple of 16: with any other width ATen's kernel reads past the rows and
crashes, so those layers multiply by the dequantized weight instead).

int8 (symmetric, per output channel): each row w of a weight matrix is stored as
round(w / s) in [-127, 127] with s = max|w| / 127, so the largest entry of every row is
exact and the others are off by at most s / 2. A tied unembedding stays tied:
`WeightOnlyEmbedding` looks rows up in the head's matrix and scales them.

Where the native kernel runs (a CPU that builds it) and the input width is a multiple of
32, a matrix is stored in the kernel's blocked layout (`block_rows`): rows in groups of 4,
each group as chunks of 4 rows x 32 columns, so that the four rows the kernel reads
together come from one sequential stream (a token's int8 products 1.17x faster than from
row-major rows, bf16's 1.07-1.11x). A blocked bf16 matrix carries scales of ones, which
give the kernel its row count. `WeightOnlyLinear.matrix()` gives the plain (out, in)
matrix back.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from gptkit import kernels
from gptkit.errors import GptkitError

Weights = Literal["fp32", "bf16", "int8"]


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 (out, in) and fp32 scales (out,) with w ~= q * scale[:, None]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,); an all-zero row stays 0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


# The native kernel's blocked int8 layout (csrc/decode.cpp): groups of BLOCK_ROWS rows,
# each stored as in_features / BLOCK_COLS chunks of BLOCK_ROWS x BLOCK_COLS values.
BLOCK_ROWS, BLOCK_COLS = 4, 32


def block_rows(q: torch.Tensor) -> torch.Tensor:
    """int8 (N, K), K a multiple of BLOCK_COLS -> the blocked (ceil(N / 4), K / 32, 4, 32),
    the last group padded with zero rows."""
    n, k = q.shape
    groups = -(-n // BLOCK_ROWS)
    padded = q.new_zeros(groups * BLOCK_ROWS, k)
    padded[:n] = q
    return padded.view(groups, BLOCK_ROWS, k // BLOCK_COLS, BLOCK_COLS).transpose(1, 2).contiguous()


def unblock_rows(w: torch.Tensor, n: int) -> torch.Tensor:
    """The first n rows of a blocked matrix as a row-major (n, K) one (a copy)."""
    groups, chunks = w.shape[:2]
    return w.transpose(1, 2).reshape(groups * BLOCK_ROWS, chunks * BLOCK_COLS)[:n]


def _blocked_rows(w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (any shape) of a blocked matrix: (*ids.shape, K)."""
    rows = w[ids // BLOCK_ROWS, :, ids % BLOCK_ROWS]  # (*ids.shape, K / 32, 32)
    return rows.reshape(*ids.shape, -1)


def _small_matrix(
    weight: torch.Tensor, fmt: str, blocked: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A float weight in format `fmt` ("bf16" | "int8"): (matrix, per-row scales or None).

    `blocked` stores it in the native kernel's layout where its width allows; a blocked
    matrix always has scales (ones for bf16): their length is its row count.
    """
    if fmt == "int8":
        w, scale = quantize_rows(weight)
    else:
        w, scale = weight.detach().to(torch.bfloat16).clone(), None
    if blocked and w.device.type == "cpu" and w.shape[1] % BLOCK_COLS == 0:
        scale = torch.ones(w.shape[0], device=w.device) if scale is None else scale
        w = block_rows(w)
    return w, scale


# `_weight_int8pack_mm` (torch 2.13, CPU) handles input widths that are multiples of this
# only: others segfault or return garbage (measured: widths 8, 24, 33, 36 and 40 fail; 16,
# 32, 48, 64, 80 and 112 hold).
INT8PACK_WIDTH = 16


def _aten_matmul(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x (M, in) fp32 @ (w * scale).T -> (M, out) fp32 with ATen's kernels (no fp32 copy of w)."""
    if w.dtype == torch.bfloat16:
        y = F.linear(x.to(torch.bfloat16), w).to(x.dtype)
        return y if scale is None else y * scale.to(x.dtype)
    if x.device.type == "cpu" and w.shape[1] % INT8PACK_WIDTH == 0:
        # ATen's int8 kernel converts in registers; its vectorized path takes bf16
        # activations and scales (fp32 activations ran ~10x slower on the dev machine).
        xb, sb = x.to(torch.bfloat16).contiguous(), scale.to(torch.bfloat16)
        return torch.ops.aten._weight_int8pack_mm(xb, w, sb).to(x.dtype)
    return F.linear(x, w.to(x.dtype)) * scale.to(x.dtype)


class WeightOnlyLinear(nn.Module):
    """`nn.Linear` with a bf16 or int8 weight (out, in), int8 with fp32 row scales (out,)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None):
        super().__init__()
        if weight.dim() == 4:  # the native kernel's blocked layout
            self.out_features, self.in_features = scale.numel(), weight.shape[1] * BLOCK_COLS
        else:
            self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # bf16 or int8 (out, in), or blocked
        self.register_buffer("scale", scale)  # fp32 (out,): int8's, or a blocked bf16's ones
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str) -> WeightOnlyLinear:
        """`linear` in format `fmt`, blocked where the native kernel will read it."""
        blocked = linear.weight.device.type == "cpu" and kernels.gemv_op() is not None
        return cls(*_small_matrix(linear.weight, fmt, blocked), linear.bias)

    def matrix(self) -> torch.Tensor:
        """The weight as an (out, in) matrix: itself, or unblocked (a copy)."""
        if self.weight.dim() == 4:
            return unblock_rows(self.weight, self.out_features)
        return self.weight

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight these values (and scales) stand for: the reference."""
        w = self.matrix().float()
        return w if self.scale is None else w * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out), in x's dtype."""
        rows = x.numel() // self.in_features
        # The native kernel takes a decode step's few rows; int8 and blocked weights take it
        # for any number of rows (up to 48: 8 rows per pass, on gpt2's head 1.26-1.28x
        # ATen's `_weight_int8pack_mm`, blocked bf16 1.04-1.75x ATen's bf16 matmul, which
        # would first have to unblock the matrix; more: slabs of widened rows and sgemm).
        if x.device.type == "cpu" and x.dtype == torch.float32:
            gemv = kernels.gemv_op()  # None where it cannot be built
            native = (
                rows <= kernels.MAX_ROWS
                or self.weight.dtype == torch.int8
                or self.weight.dim() == 4
            )
            if gemv is not None and native:
                y = gemv(x.reshape(rows, self.in_features), self.weight, self.scale, self.bias)
                return y.view(*x.shape[:-1], self.out_features)
        y = _aten_matmul(x.reshape(rows, self.in_features).float(), self.matrix(), self.scale)
        y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        dtype = str(self.weight.dtype).removeprefix("torch.")
        blocked = ", blocked" if self.weight.dim() == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {dtype}{blocked}"


class WeightOnlyEmbedding(nn.Module):
    """Row lookup in a bf16 or int8 matrix (vocab, C), scaled per row; may share the head's."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)  # bf16 or int8 (V, C)
        self.register_buffer("scale", scale)  # fp32 (V,) or None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> fp32 (B, T, C)."""
        w = self.weight  # a tied head's matrix may be blocked
        rows = (_blocked_rows(w, idx) if w.dim() == 4 else w[idx]).float()
        return rows if self.scale is None else rows * self.scale[idx, None]


def quantize_model(model: nn.Module, weights: Weights | str) -> nn.Module:
    """`model` with its weights in fp32, bf16 or int8 (in place; returned for chaining).

    bf16 and int8 replace every `nn.Linear` of the blocks and the unembedding by a
    `WeightOnlyLinear`, and the token embedding by a `WeightOnlyEmbedding` (sharing the
    head's matrix when tied). Layer norms and the position table stay fp32 (a few KB,
    read once per token).
    """
    if weights not in ("fp32", "bf16", "int8"):
        raise GptkitError(f"unknown weights {weights!r}; use fp32, bf16 or int8")
    # Its blocked matrices are no nn.Linear weights to quantize again, and model.float()
    # would widen their bf16 buffers: refuse before touching anything.
    if any(isinstance(m, (WeightOnlyLinear, WeightOnlyEmbedding)) for m in model.modules()):
        raise GptkitError("the model's weights are quantized already; quantize an fp32 model")
    model.float()
    if weights == "fp32":
        return model
    tied = model.lm_head.weight is model.wte.weight
    for block in model.h:
        for parent in list(block.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, child_name, WeightOnlyLinear.from_linear(child, weights))
    head = WeightOnlyLinear.from_linear(model.lm_head, weights)
    model.lm_head = head
    if tied:
        model.wte = WeightOnlyEmbedding(head.weight, head.scale)
    else:
        model.wte = WeightOnlyEmbedding(*_small_matrix(model.wte.weight, weights))
    return model


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every matrix (the head included) and norm.

    Embedding tables are left out: a step reads one row of each.
    """
    total = 0
    for module in model.modules():
        if isinstance(module, (nn.Embedding, WeightOnlyEmbedding)):
            continue
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            total += t.numel() * t.element_size()
    return total - sum(b.nbytes for n, b in model.named_buffers() if n == "pe")
