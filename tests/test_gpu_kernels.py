"""The Triton cross-entropy (gptkit.gpu_kernels) against F.cross_entropy.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1 before triton is imported); with one, compiled on the card. Skipped where the
`triton` package is missing.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gptkit import distributed
from gptkit.config import GPTConfig
from gptkit.model import GPT
from gptkit.train import VOCAB_MULTIPLE, batch_loss, lm_loss, padded_unembedding

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


@pytest.fixture(scope="module")
def kernels():
    """gptkit.gpu_kernels; without a GPU its kernels are interpreted (see conftest.py)."""
    module = importlib.import_module("gptkit.gpu_kernels")
    kernel = type(module.cross_entropy_forward_kernel).__name__
    assert CUDA or kernel == "InterpretedFunction", "TRITON_INTERPRET was not set in time"
    return module


def _reference(logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    return F.cross_entropy(logits[..., :vocab].float().flatten(0, -2), targets.flatten())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("vocab", "width"),
    [(300, 300), (300, 320), (9000, 9024), (9001, 9001)],  # 1 block, 3 blocks of 4096
)
def test_cross_entropy_equals_torchs_loss_and_gradient(kernels, dtype, vocab, width):
    """Guards the forward's online log-sum-exp (the maximum found in a later block than the
    first, so the running sum must be rescaled), the target's logit, the mean, and the
    backward's softmax minus one-hot; columns past the vocabulary are ignored and get a
    zero gradient. Logits of scale 30 make a wrong rescaling show."""
    torch.manual_seed(0)
    rows = 7
    logits = torch.randn(rows, width, device=DEVICE) * 30
    logits[:, vocab - 50 : vocab] += 60  # the row's maximum sits in the last block
    logits[:, vocab:] = 1e4  # padding the loss must not read
    logits = logits.to(dtype).reshape(1, rows, width).requires_grad_()
    targets = torch.randint(0, vocab, (1, rows), device=DEVICE)
    targets[0, 0], targets[0, 1] = 0, vocab - 1  # the first and the last class

    got = kernels.cross_entropy(logits, targets, vocab)
    (got * 3).backward()
    grad, logits.grad = logits.grad, None
    want = _reference(logits, targets, vocab)
    (want * 3).backward()

    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert torch.all(grad[..., vocab:] == 0)
    # fp32: a few ulps of exp; bf16: one rounding of the same fp32 gradient
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-6)
    torch.testing.assert_close(grad[..., :vocab], logits.grad[..., :vocab], **tol)
    assert grad.abs().max() > 0.1  # the comparison is not of zeros


def test_a_target_outside_the_vocabulary_makes_the_loss_nan(kernels):
    """Guards the target's read: an id past the vocabulary (or negative) gives a NaN loss,
    which the training loop reports, instead of reading another row or past the buffer."""
    logits = torch.randn(3, 64, device=DEVICE)
    for bad in (40, 64, -1):
        targets = torch.tensor([1, bad, 2], device=DEVICE)
        assert torch.isnan(kernels.cross_entropy(logits, targets, 40))
    assert torch.isfinite(
        kernels.cross_entropy(logits, torch.tensor([1, 39, 2], device=DEVICE), 40)
    )


def test_cross_entropy_rejects_a_vocabulary_wider_than_the_logits(kernels):
    with pytest.raises(ValueError, match="wider"):
        kernels.cross_entropy(torch.zeros(2, 8, device=DEVICE), torch.zeros(2, dtype=int), 9)


def _model() -> GPT:
    torch.manual_seed(0)
    config = GPTConfig.from_preset(
        "gpt2", vocab_size=203, n_layer=1, n_head=2, d_model=16, context_length=8
    )
    return GPT(config).to(DEVICE)


def _grads(model: GPT, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    return grads


def test_the_padded_unembeddings_triton_loss_is_the_models_loss_and_gradients(kernels):
    """Guards the ops' autograd registration and `cross_entropy` over padded logits as
    `batch_loss(loss_kernel="triton")` calls it: the loss and every parameter's gradient
    through the unembedding padded from 203 rows to 256 equal `lm_loss(model(x), y)`.
    (torch.compile's tracing of the kernels needs a GPU: the test after next.)"""
    model = _model()
    tokens = torch.randint(0, 203, (3, 9), device=DEVICE)
    x, y = tokens[:, :-1], tokens[:, 1:]  # as training slices them: y is not contiguous
    want = lm_loss(model(x), y)
    want_grads = _grads(model, want)
    logits = padded_unembedding(model, x, VOCAB_MULTIPLE)
    assert logits.shape == (3, 8, 256)
    got = kernels.cross_entropy(logits, y, 203)
    got_grads = _grads(model, got)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_batch_loss_takes_the_triton_loss_only_where_it_runs():
    model, env = _model(), distributed.DistEnv()
    for compile in (True, False):
        with pytest.raises(ValueError, match="runs on a CUDA device, not cpu"):
            batch_loss(model, compile, torch.device("cpu"), env, loss_kernel="triton")
    with pytest.raises(ValueError, match="not 'fused'"):
        batch_loss(model, True, torch.device("cpu"), env, loss_kernel="fused")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("compile", [True, False])
def test_the_triton_loss_equals_the_eager_loss_on_the_card(kernels, compile):
    """Guards `batch_loss(loss_kernel="triton")` as `gptkit train [--compile]` would run
    it: compiled, inductor builds the graph with the user kernels in it (over the padded
    logits); eager, the kernels take the model's bf16 logits. Under bf16 autocast the loss
    and gradients are the eager `lm_loss`'s within bf16 rounding (a gradient missing its
    one-hot or its scale would be off by its whole size)."""
    model, env = _model(), distributed.DistEnv()
    tokens = torch.randint(0, 203, (3, 9), device=DEVICE)
    x, y = tokens[:, :-1], tokens[:, 1:]
    results = []
    for loss_of in (
        lambda x, y: lm_loss(model(x), y),
        batch_loss(model, compile, DEVICE, env, loss_kernel="triton"),
    ):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_of(x, y)
        results.append((loss.detach(), _grads(model, loss)))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    for name, g in want_grads.items():  # bf16 rounds each element: compare whole tensors
        error = (got_grads[name] - g).norm() / g.norm()
        assert error < 5e-2, f"{name}: relative error {error:.3g}"


# Compiles gptkit.gpu_kernels' kernels for sm_90 and prints their PTX as JSON; run in a
# process of its own, as this one has them interpreted. argv: columns divisible by 16 (0/1).
_COMPILE = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gptkit import gpu_kernels

padded = sys.argv[1] == "1"
args = {  # name: (type, divisible by 16 at gpt2's shapes)
    "grad_ptr": ("*bf16", True), "grad_loss_ptr": ("*fp32", True), "logits_ptr": ("*bf16", True),
    "targets_ptr": ("*i64", True), "loss_ptr": ("*fp32", True), "lse_ptr": ("*fp32", True),
    "row_stride": ("i32", padded), "vocab": ("i32", False), "width": ("i32", padded),
}
ptx = {}
hopper, options = GPUTarget("cuda", 90, 32), {"num_warps": gpu_kernels.NUM_WARPS}
for name in ("cross_entropy_forward_kernel", "cross_entropy_backward_kernel"):
    kernel = getattr(gpu_kernels, name)
    names = kernel.arg_names
    signature = {n: args[n][0] if n in args else "constexpr" for n in names}
    aligned = [i for i, n in enumerate(names) if n in args and args[n][1]]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    source = ASTSource(kernel, signature, constexprs={"BLOCK": gpu_kernels.BLOCK}, attrs=attrs)
    ptx[name] = triton.compile(source, target=hopper, options=options).asm["ptx"]
print(json.dumps(ptx))
"""


@pytest.mark.skipif(CUDA, reason="the card compiles and runs them in the tests above")
@pytest.mark.parametrize("padded", [True, False])
def test_kernels_compile_for_an_h100_with_16_byte_accesses(padded):
    """Guards what the interpreter cannot see: both kernels compile for sm_90 (Triton's own
    ptxas, no GPU needed), and over gpt2's padded rows (50,304 columns, so the JIT marks
    the width and the row stride divisible by 16) every logit load and gradient store is
    16 bytes wide, not one 2-byte access per column (what a mask at the vocabulary's odd
    length gave). Unpadded (50,257 columns) they still compile, with narrow accesses."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE, str(int(padded))],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ptx = json.loads(done.stdout)
    forward, backward = ptx["cross_entropy_forward_kernel"], ptx["cross_entropy_backward_kernel"]
    for code in (forward, backward):
        assert "ld.local" not in code and "st.local" not in code  # no register spills
        assert ("ld.global.v4.b32" in code) == padded
    assert ("st.global.v4.b32" in backward) == padded
    assert padded or "ld.global.b16" in forward


# torch.compile's tracing of the loss, forward and backward, with Triton pointed at an
# sm_90 target: torch reads each kernel's Triton IR to learn what it writes, which needs a
# target but no GPU. The captured graphs are printed; running them would need the card.
_TRACE = """
import torch, triton
import torch._functorch.config
from torch._dynamo.backends.common import aot_autograd
from triton.backends.compiler import GPUTarget
from gptkit.config import GPTConfig
from gptkit.distributed import DistEnv
from gptkit.model import GPT
from gptkit.train import batch_loss

class Hopper:  # all torch asks of Triton's driver while tracing
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

triton.runtime.driver.set_active(Hopper())
torch._functorch.config.force_non_lazy_backward_lowering = True  # trace the backward now
graphs = []

def capture(gm, example_inputs):
    graphs.append(gm.code)
    return gm.forward

# batch_loss as `gptkit train --compile` builds it on a card, its graphs captured, not run
backend = aot_autograd(fw_compiler=capture, bw_compiler=capture)
real_compile = torch.compile
torch.compile = lambda fn, options: real_compile(fn, backend=backend, fullgraph=True)
config = GPTConfig.from_preset("gpt2", vocab_size=203, n_layer=1, n_head=2, d_model=16)
loss = batch_loss(GPT(config), True, torch.device("cuda"), DistEnv(), loss_kernel="triton")
tokens = torch.randint(0, 203, (3, 9))
try:
    loss(tokens[:, :-1], tokens[:, 1:])
except AttributeError:  # the forward launching its kernel on the stand-in target
    pass
print("\\n=====\\n".join(graphs))
"""


@pytest.mark.skipif(CUDA, reason="the card compiles and runs them in the tests above")
def test_torch_compile_traces_the_loss_and_its_backward_into_one_graph_each():
    """Guards the ops as torch.compile sees them in `batch_loss(loss_kernel="triton")`:
    one graph each way (fullgraph, no break), the forward kernel's loss and log-sum-exp
    outputs in the forward, the backward kernel writing the gradient in the backward, no
    other cross-entropy."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", _TRACE], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    forward, backward = done.stdout.split("\n=====\n")
    assert "triton_kernel_wrapper_functional" in forward and "'lse_ptr'" in forward
    assert "triton_kernel_wrapper_functional" in backward and "'grad_ptr'" in backward
    for graph in (forward, backward):
        assert "log_softmax" not in graph and "nll_loss" not in graph
