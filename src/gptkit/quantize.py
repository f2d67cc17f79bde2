"""Smaller weights for faster CPU decoding: bf16, and weight-only int8 with per-channel scales.

Decoding one token at batch 1 reads every weight once and does 2 FLOPs per weight, so on a
CPU its speed is set by memory bandwidth: halving the bytes per weight (bf16) or quartering
them (int8) raises the ceiling in proportion.

    >>> model = quantize_model(load_model("runs/demo"), "int8")
    >>> generate(model, idx, 100)

int8 (weight-only, symmetric, per output channel): each row w of a weight matrix is stored
as round(w / s) in [-127, 127] with s = max|w| / 127, so the largest entry of every row is
exact and the others are off by at most s / 2. Activations stay fp32; `Int8Linear` is a
drop-in `nn.Linear` replacement that multiplies by the int8 matrix and scales the result
(ATen's fused `_weight_int8pack_mm` on CPU, fed bf16 activations and scales for its
vectorized path; a dequantize-then-matmul elsewhere). A tied
unembedding stays tied: `Int8Embedding` looks rows up in the head's int8 matrix and scales.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from gptkit.errors import GptkitError

Weights = Literal["fp32", "bf16", "int8"]


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 (out, in) and fp32 scales (out,) with w ~= q * scale[:, None]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,); an all-zero row stays 0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, in) @ (q * scale[:, None]).T -> (M, out) in x's dtype."""
    if x.device.type == "cpu":
        # ATen's int8 kernel converts in registers (no dequantized copy of the matrix), and
        # its vectorized path takes bf16 activations (fp32 ones ran ~10x slower, measured on
        # the dev machine's Xeon); the activations are small, so the casts cost little.
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), q, scale)
        return y.to(x.dtype)
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)


class Int8Linear(nn.Module):
    """`nn.Linear` with an int8 weight (out, in) and fp32 per-output-channel scales (out,)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # int8 (out, in)
        self.register_buffer("scale", scale)  # fp32 (out,)
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scale = quantize_rows(linear.weight)
        return cls(q, scale, linear.bias)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight these int8 values and scales stand for (the reference)."""
        return self.weight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)."""
        scale = self.scale_bf16 if x.device.type == "cpu" else self.scale
        y = _int8_matmul(x.reshape(-1, self.in_features), self.weight, scale)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(nn.Module):
    """Row lookup in an int8 matrix (vocab, C) with per-row scales; may share the head's."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight)  # int8 (V, C)
        self.register_buffer("scale", scale)  # fp32 (V,)
        self.dtype = dtype

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> (B, T, C)."""
        return (self.weight[idx].to(torch.float32) * self.scale[idx, None]).to(self.dtype)


def quantize_model(model: nn.Module, weights: Weights | str) -> nn.Module:
    """`model` with its weights in fp32, bf16 or int8 (in place; returned for chaining).

    int8 replaces every `nn.Linear` of the blocks and the unembedding by `Int8Linear`, and
    the token embedding by an `Int8Embedding` (sharing the head's int8 matrix when tied).
    Layer norms and the position table stay fp32 (a few KB; they are read once per token).
    """
    if weights == "fp32":
        return model.float()
    if weights == "bf16":
        return model.to(torch.bfloat16)
    if weights != "int8":
        raise GptkitError(f"unknown weights {weights!r}; use fp32, bf16 or int8")
    model.float()
    tied = model.lm_head.weight is model.wte.weight
    for block in model.h:
        for parent in list(block.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, child_name, Int8Linear.from_linear(child))
    head = Int8Linear.from_linear(model.lm_head)
    model.lm_head = head
    if tied:
        model.wte = Int8Embedding(head.weight, head.scale, torch.float32)
    else:
        q, scale = quantize_rows(model.wte.weight)
        model.wte = Int8Embedding(q, scale, torch.float32)
    return model


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every matrix (the head included) and norm.

    Embedding tables are left out: a step reads one row of each.
    """
    total = 0
    for module in model.modules():
        if isinstance(module, (nn.Embedding, Int8Embedding)):
            continue
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            total += t.numel() * t.element_size()
    return total - sum(b.nbytes for n, b in model.named_buffers() if n == "pe")
