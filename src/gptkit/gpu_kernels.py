"""Triton kernels for training on a GPU: the cross-entropy over the unembedding's logits.

For gpt2 at batch 64 x 1024 the logits are 65,536 rows of 50,257 entries, 6.6 GB in bf16.
On an H200 the cross-entropy inductor generated for them took 16.8 ms of a 130 ms step
(session 12's profile, benchmarks/RESULTS.md): three looped reductions over odd-length
rows, a few times what their bytes need at the card's bandwidth. `cross_entropy` here is
two kernels, one program per row of logits:

- forward: one pass over the row, an online log-sum-exp (the running maximum and the sum
  of exponentials rescaled whenever the maximum grows), minus the target's logit; it keeps
  the log-sum-exp, 4 bytes a row, for the backward;
- backward: one more pass that writes the gradient, `(softmax - onehot) x upstream`, in
  the logits' dtype, zeros in the padded columns.

So the logits are read twice and their gradient written once, the least a loss over
materialized logits can do. Rows may be wider than the vocabulary: the product of
`train.padded_unembedding`, over a vocabulary padded to a multiple of 64, is passed
whole with `vocab` the real width, so neither the slice nor its gradient's zero padding
is a copy.

The ops are `torch.library.triton_op`s, so torch.compile puts the kernels in its graph
(no graph break) and autograd knows their backward. Where there is no GPU, Triton's
interpreter (`TRITON_INTERPRET=1` before this module is imported) runs them on CPU
tensors: that is how the tests check them against `F.cross_entropy` on this machine.
Importing this module needs the `triton` package (CUDA builds of PyTorch bring it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

# Columns a program handles per iteration, and its warps: a row of 50k bf16 logits is ~13
# iterations of 8 KB loads.
BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def _load_classes(base, idx, vocab, width):
    """Logits at columns idx as fp32, -inf past the vocabulary. The load is masked by the
    row's width, a multiple of 64 when padded, so that it stays vectorized; a mask at the
    vocabulary's odd length would make it one 2-byte load per column."""
    x = tl.load(base + idx, mask=idx < width, other=float("-inf")).to(tl.float32)
    return tl.where(idx < vocab, x, float("-inf"))


@triton.jit
def cross_entropy_forward_kernel(
    logits_ptr, targets_ptr, loss_ptr, lse_ptr, row_stride, vocab, width, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK)
    top = float("-inf")  # the running maximum
    total = 0.0  # sum of exp(logit - top) so far
    for start in range(0, width, BLOCK):
        x = _load_classes(base, start + cols, vocab, width)
        new_top = tl.maximum(top, tl.max(x, axis=0))
        total = total * tl.exp(top - new_top) + tl.sum(tl.exp(x - new_top), axis=0)
        top = new_top
    lse = top + tl.log(total)
    target = tl.load(targets_ptr + row)
    in_range = (target >= 0) & (target < vocab)  # else a NaN loss, not a read out of bounds
    target_logit = tl.load(base + target, mask=in_range, other=float("nan")).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, lse - target_logit)


@triton.jit
def cross_entropy_backward_kernel(
    grad_ptr,
    grad_loss_ptr,
    logits_ptr,
    targets_ptr,
    lse_ptr,
    row_stride,
    vocab,
    width,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    grad_base = grad_ptr + row * width
    cols = tl.arange(0, BLOCK)
    upstream = tl.load(grad_loss_ptr + row).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    target = tl.load(targets_ptr + row)
    for start in range(0, width, BLOCK):
        idx = start + cols
        x = _load_classes(base, idx, vocab, width)
        p = tl.exp(x - lse)  # the softmax; 0 in the padded columns
        p = tl.where(idx == target, p - 1.0, p)
        tl.store(grad_base + idx, (p * upstream).to(grad_ptr.dtype.element_ty), mask=idx < width)


@triton_op("gptkit::cross_entropy_rows", mutates_args={})
def cross_entropy_rows(
    logits: torch.Tensor, targets: torch.Tensor, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per row, log-sum-exp per row), both fp32 (N,), of logits (N, W >= vocab) whose
    first `vocab` columns are the classes; targets (N,) in [0, vocab)."""
    rows, width = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    wrap_triton(cross_entropy_forward_kernel)[(rows,)](
        logits, targets, loss, lse, logits.stride(0), vocab, width,
        BLOCK=_block(width), num_warps=NUM_WARPS,
    )  # fmt: skip
    return loss, lse


@triton_op("gptkit::cross_entropy_rows_backward", mutates_args={})
def cross_entropy_rows_backward(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    vocab: int,
) -> torch.Tensor:
    """d(sum of grad_loss x loss per row)/d logits: (N, W) in the logits' dtype."""
    rows, width = logits.shape
    grad = torch.empty((rows, width), dtype=logits.dtype, device=logits.device)
    wrap_triton(cross_entropy_backward_kernel)[(rows,)](
        grad,
        grad_loss,
        logits,
        targets,
        lse,
        logits.stride(0),
        vocab,
        width,
        BLOCK=_block(width),
        num_warps=NUM_WARPS,
    )
    return grad


def _block(width: int) -> int:
    """BLOCK, or the row's width rounded up to a power of two where that is less (a
    character vocabulary's 65 columns need 128 lanes, not 4,096)."""
    return min(BLOCK, triton.next_power_of_2(width))


def _setup_context(ctx, inputs, output) -> None:
    logits, targets, vocab = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.mark_non_differentiable(output[1])  # the log-sum-exp is kept for the backward only
    ctx.vocab = vocab


def _backward(ctx, grad_loss, grad_lse):
    logits, targets, lse = ctx.saved_tensors
    # The mean's gradient comes expanded from one number (stride 0); the kernel reads a
    # plain vector, which torch.compile then keeps the same layout as when it traced.
    grad = cross_entropy_rows_backward(grad_loss.contiguous(), logits, targets, lse, ctx.vocab)
    return grad, None, None


cross_entropy_rows.register_autograd(_backward, setup_context=_setup_context)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    """Mean cross-entropy of logits (..., W) over their first `vocab` columns against
    targets (...): `F.cross_entropy(logits[..., :vocab].float().flatten(0, -2), targets
    .flatten())`, fp32, without materializing either the slice or fp32 logits."""
    width = logits.shape[-1]
    if vocab > width:
        raise ValueError(f"vocab {vocab} is wider than the logits' {width} columns")
    rows = logits.reshape(-1, width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    loss, _ = cross_entropy_rows(rows, targets.reshape(-1).contiguous(), vocab)
    return loss.mean()
