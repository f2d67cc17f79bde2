"""Native CPU kernels, compiled on first use: the decode step, and for training causal
attention and bias + GELU.

On a CPU, decoding one token at batch 1 streams every weight from memory once, so its
speed is bandwidth / bytes per token. ATen reaches that rate for fp32 weights (MKL) but
not for bf16 or int8 ones on CPUs without native bf16 instructions (it converted too
slowly: about 60% of fp32's bandwidth, measured on the dev machine's Xeon), and eager
PyTorch adds 5-8 ms per gpt2 token of small ops around the products. `csrc/decode.cpp`
holds two ops:

- `gemv`: the matrix-vector product for fp32, bf16 and int8 weights; each weight is
  widened in registers while prefetches keep the memory system busy (int8: against the
  input in 16-bit fixed point, with exact integer sums). bf16 and int8 matrices may come
  in a blocked layout, groups of 4 rows stored as one sequential stream
  (`gptkit.quantize.block_rows`).
- `decode_step`: a whole decode step for one new token per row, token ids to logits
  (embeddings, every block's layer norms, products, KV-cache writes, attention,
  activations and residuals, the final norm, the unembedding) in one call;
  `gptkit.model.GPT.forward` and `next_logits` use it for CPU decode steps;
  `decode_profile` says where its time went (the products against everything else).

    >>> op = gemv_op()                       # None where the kernels cannot be built
    >>> y = op(x, w_int8, scale, bias)       # x (M, K) fp32, w (N, K) -> (M, N) fp32

Four more serve training on a CPU, forward and backward, with autograd registered:
`csrc/attention.cpp` is causal self-attention (`causal_attention`: q, k, v read in place
from the fused projection, no transposes; forward + backward 1.4-1.5x ATen's flash kernel
for the short sequences of a CPU-sized model), `csrc/activation.cpp` the feed-forward's
activation with the bias of the product before it (`bias_gelu`, GPT-2's GELU, and
`bias_leaky_relu`, the spec's leaky ReLU: one pass each way, the bias gradient included),
`csrc/embedding.cpp` the embedding lookup (`embedding`: a backward pass without the atomic
adds inductor would write), `csrc/cross_entropy.cpp` the loss over the logits
(`cross_entropy_rows`: float32 or bf16 logits read in place, one task per row, the
gradient in the logits' dtype; `train.token_losses` takes it eagerly).

The sources are compiled once per machine with torch.utils.cpp_extension (g++, ninja and
the Python headers; about 15 s) for the CPU's vector ISA, AVX-512 (with VNNI where the
CPU has it) or AVX2+FMA, and cached in `~/.cache/gptkit/kernels/` (`$GPTKIT_KERNEL_CACHE`),
one folder per ISA and torch installation. Anywhere it cannot be built (another architecture,
no compiler) `gemv_op` says so in one line on stderr and returns None, and callers use
ATen.
`GPTKIT_NATIVE_KERNELS=0` turns the kernels off.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

SOURCES = [
    Path(__file__).parent / "csrc" / name
    for name in (
        "decode.cpp",
        "attention.cpp",
        "activation.cpp",
        "embedding.cpp",
        "cross_entropy.cpp",
    )
]
# Compiler flags per ATen CPU capability (`torch.backends.cpu.get_cpu_capability()`).
# CPU_CAPABILITY picks the matching implementation of ATen's Vectorized<float> headers.
# AVX512_VNNI is AVX512 plus VNNI's int16 multiply-accumulate for the int8 products (one
# instruction for the two of a plain AVX-512 build: 18.6 -> 22.4 G int8 weights/s streaming
# a 50304 x 768 matrix on the dev machine's Xeon).
_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"]
ISA_FLAGS = {
    "AVX512_VNNI": [*_AVX512, "-mavx512vnni", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX512": [*_AVX512, "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}
# Rows (sequences) a native decode step takes: a server's default batch. Inside it, fp32
# products of more than 8 rows go to MKL's sgemm, bf16 / int8 ones of more than 48 to
# slabs of widened weights and sgemm (csrc/decode.cpp); a larger batch runs eagerly.
MAX_ROWS = 32
# Where the OS cannot lock files (no fcntl), a cpp_extension lock file this old is stale
# (see `build_lock`).
STALE_LOCK_SECONDS = 300

Gemv = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor
]


# Attention's head width must be a whole number of vectors (16 floats for AVX-512, 8 for
# AVX2); 16 serves both.
ATTENTION_HEAD_MULTIPLE = 16
# The fewest classes `train.token_losses` takes `cross_entropy_rows` for: the custom op and its
# Python autograd cost ~50 us a call, which small vocabularies do not earn back (768 rows,
# forward + backward on the dev CPU: 65 classes 154 us against ATen's 98; 256 classes 304
# against 363; 1,024: 862 against 1,873).
CROSS_ENTROPY_MIN_CLASSES = 256
# The longest sequence routed to `causal_attention`: each thread keeps two T x T score
# buffers, and past this ATen's flash kernel, which streams key blocks, is as fast.
ATTENTION_MAX_T = 256


def native_isa() -> str:
    """This CPU's best build: ATen's CPU capability, refined to AVX512_VNNI where it has VNNI."""
    cap = torch.backends.cpu.get_cpu_capability()
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()  # cpuinfo's CPU flags
    if cap == "AVX512" and capabilities.get("avx512_vnni", False):
        return "AVX512_VNNI"
    return cap


def runnable_isas() -> list[str]:
    """The ISAs of ISA_FLAGS this CPU runs: its own and every one listed after it there
    (ISA_FLAGS goes from the widest to the narrowest)."""
    order = list(ISA_FLAGS)
    isa = native_isa()
    return order[order.index(isa) :] if isa in order else []


def enabled() -> bool:
    """False when the environment turns native kernels off (GPTKIT_NATIVE_KERNELS=0)."""
    return os.environ.get("GPTKIT_NATIVE_KERNELS", "1") not in ("0", "false", "no", "off")


def gemv_op(isa: str | None = None) -> Gemv | None:
    """The compiled `gemv(x, w, scale, bias)` for `isa` (default: this CPU's), or None.

    `isa` is a key of ISA_FLAGS; tests build every one the machine runs.
    """
    ops = library(isa)
    return None if ops is None else ops.gemv


def decode_step_op(isa: str | None = None) -> Callable[..., torch.Tensor] | None:
    """The compiled `decode_step(...)` for `isa` (default: this CPU's), or None."""
    ops = library(isa)
    return None if ops is None else ops.decode_step


def decode_profile(reset: bool = False, isa: str | None = None) -> dict[str, float] | None:
    """Where `decode_step`'s time went since the last reset, or None without the kernels.

    {"steps": calls, "products": s, "attention": s, "other": s}: seconds summed over the
    calls, split into the matrix-vector products (their time scales with the bytes of the
    weights), attention over the KV cache with its writes, and the rest of the op
    (embeddings, norms, activations, residual adds, checks). `reset` zeroes the totals.
    """
    ops = library(isa)
    if ops is None:
        return None
    steps, products, attention, other = ops.decode_profile(reset)
    return {"steps": steps, "products": products, "attention": attention, "other": other}


@functools.cache
def library(isa: str | None = None) -> Any:
    """The op namespace (`torch.ops.gptkit_cpu_<isa>`) built from csrc/decode.cpp, or None."""
    isa = isa or native_isa()
    if not enabled() or isa not in ISA_FLAGS:
        return None
    from torch.utils import cpp_extension

    name = f"gptkit_cpu_{isa.lower()}"
    build_dir = build_directory(name)
    if not any(build_dir.glob("*.so")):
        print("gptkit: building the native CPU kernel (once per machine)...", file=sys.stderr)
    try:
        with build_lock(build_dir), _environment_ninja():
            cpp_extension.load(
                name,
                [str(source) for source in SOURCES],
                build_directory=str(build_dir),
                extra_cflags=["-O3", "-fopenmp", f"-DGPTKIT_NS={name}", *ISA_FLAGS[isa]],
                extra_ldflags=["-fopenmp"],  # libgomp: the one torch has loaded already
                is_python_module=False,
            )
    except Exception as e:  # no compiler, no ninja, no headers: ATen still works
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"gptkit: native CPU kernels unavailable ({reason}); using ATen", file=sys.stderr)
        return None
    return getattr(torch.ops, name)


@contextlib.contextmanager
def _environment_ninja() -> Iterator[None]:
    """Run the ninja installed beside this Python (gptkit's `ninja` dependency) whatever PATH
    says. cpp_extension runs the first `ninja` on PATH, and two ninja versions keep build
    logs the other does not trust: a system ninja and the venv's, taking turns as the venv
    was activated or not, rebuilt the kernel from scratch each time (~50 s here)."""
    here = Path(sys.executable).parent
    if not (here / "ninja").is_file():
        yield
        return
    path = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join([str(here), path]) if path else str(here)
    try:
        yield
    finally:
        if path is None:
            del os.environ["PATH"]
        else:
            os.environ["PATH"] = path


@contextlib.contextmanager
def build_lock(build_dir: Path) -> Iterator[None]:
    """Hold `build_dir` for one process's build or load, clearing what a killed one left.

    cpp_extension serialises builds with a `lock` file in the directory and waits for it
    to go, forever; a process killed inside `load` (Ctrl-C while the kernel compiles, and
    it takes the lock even when nothing needs compiling) leaves it behind, and every later
    run hung. So gptkit processes first take an OS lock on `build.flock`, which the OS
    drops when its holder dies: holding it, any `lock` file is a dead process's.
    """
    lock = build_dir / "lock"
    try:
        import fcntl
    except ImportError:  # no POSIX file locks: only a lock file this old is known stale
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink(missing_ok=True)
        yield
        return
    with open(build_dir / "build.flock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # waits while another process builds
        try:
            lock.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_directory(name: str) -> Path:
    """Where the kernel `name` is built and cached (created if missing): one folder per
    torch installation, not only per torch version. Two environments with the same torch
    compile against different header paths, so sharing a folder made each rebuild the
    kernel whenever the other had used it (~45 s here), relinking the library under a
    process that had it loaded."""
    default = Path.home() / ".cache" / "gptkit" / "kernels"
    root = Path(os.environ.get("GPTKIT_KERNEL_CACHE", default))
    version = torch.__version__.replace("+", "_")
    install = str(Path(torch.__file__).resolve().parent).encode()
    where = hashlib.sha256(install).hexdigest()[:10]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    path = root / f"{name}-torch{version}-{py}-{where}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@torch.compiler.assume_constant_result
def training_namespace() -> str | None:
    """The op namespace of this CPU's build, its training ops (attention, bias + activation,
    embedding, cross-entropy) registered with autograd, or None where the kernels are
    unavailable. A constant to torch.compile, which then calls the ops inside its graph."""
    return _training_namespace()


@functools.cache
def _training_namespace() -> str | None:
    ops = library()
    if ops is None:
        return None
    _register_attention(ops.name)
    _register_bias_gelu(ops.name)
    _register_bias_leaky_relu(ops.name)
    _register_embedding(ops.name)
    _register_cross_entropy(ops.name)
    return ops.name


def causal_attention(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(D), causal) v for every head, differentiable.

    qkv (B, T, 3C) float32 on the CPU, [q | k | v] along the last dimension, the output of
    the fused projection; C / n_head a multiple of ATTENTION_HEAD_MULTIPLE. Returns
    (B, T, C), the heads concatenated.
    """
    return _training_ops().attention_forward(qkv, n_head)[0]


def bias_gelu(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh GELU of h + bias, differentiable in both: h (..., N) and bias (N,)
    float32 on the CPU (h: a product without its bias). Returns h's shape."""
    return _training_ops().bias_gelu_forward(h, bias)


def bias_leaky_relu(h: torch.Tensor, bias: torch.Tensor, slope: float) -> torch.Tensor:
    """The leaky ReLU of h + bias (slope on the negative side, >= 0; 0 is ReLU),
    differentiable in both: h (..., N) and bias (N,) float32 on the CPU (h: a product
    without its bias). Returns h's shape. Its backward pass reads the output's sign, so
    it keeps nothing but the output."""
    return _training_ops().bias_leaky_relu_forward(h, bias, slope)


def embedding(weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """weight[idx], as nn.Embedding computes it, differentiable in `weight`: weight (N, D)
    float32 on the CPU, idx int64 of any shape. Its backward pass adds the gradient's rows
    into the table with plain vector adds, where inductor's own would use atomics
    (csrc/embedding.cpp says why)."""
    return _training_ops().embedding_forward(weight, idx)


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row's cross-entropy (N,) fp32 of logits (N, V) float32 or bfloat16 on the CPU
    against targets (N,) int64, differentiable in the logits: `F.cross_entropy(logits
    .float(), targets, reduction="none")` without the fp32 copy and the log-softmax written
    out between (its gradient comes in the logits' dtype; csrc/cross_entropy.cpp)."""
    return _training_ops().cross_entropy_forward(logits, targets)[0]


def _training_ops() -> Any:
    ns = training_namespace()
    if ns is None:
        raise RuntimeError("the native training kernels are unavailable")
    return getattr(torch.ops, ns)


def _register_attention(ns: str) -> None:
    """Shapes for torch.compile's tracing and the backward pass, for ops built in C++."""
    forward, backward = f"{ns}::attention_forward", f"{ns}::attention_backward"

    @torch.library.register_fake(forward)
    def _(qkv: torch.Tensor, n_head: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C3 = qkv.shape
        return qkv.new_empty(B, T, C3 // 3), qkv.new_empty(B, n_head, T)

    @torch.library.register_fake(backward)
    def _(dy: torch.Tensor, qkv: torch.Tensor, y: torch.Tensor, lse: torch.Tensor, n_head: int):
        return torch.empty_like(qkv)

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        qkv, n_head = inputs
        y, lse = output
        ctx.save_for_backward(qkv, y, lse)
        ctx.n_head = n_head

    def grad(ctx: Any, dy: torch.Tensor, dlse: torch.Tensor | None) -> tuple[Any, None]:
        # lse is an internal result (nothing downstream differentiates it), so dlse is unused.
        qkv, y, lse = ctx.saved_tensors
        op = getattr(torch.ops, ns).attention_backward
        return op(dy.contiguous(), qkv, y, lse, ctx.n_head), None

    torch.library.register_autograd(forward, grad, setup_context=setup_context)


def _register_bias_gelu(ns: str) -> None:
    """Shapes for torch.compile's tracing and the backward pass of bias_gelu_forward."""
    forward, backward = f"{ns}::bias_gelu_forward", f"{ns}::bias_gelu_backward"

    @torch.library.register_fake(forward)
    def _(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(h)

    @torch.library.register_fake(backward)
    def _(dy: torch.Tensor, h: torch.Tensor, bias: torch.Tensor):
        return torch.empty_like(h), torch.empty_like(bias)

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(*inputs)

    def grad(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, bias = ctx.saved_tensors
        return getattr(torch.ops, ns).bias_gelu_backward(dy.contiguous(), h, bias)

    torch.library.register_autograd(forward, grad, setup_context=setup_context)


def _register_bias_leaky_relu(ns: str) -> None:
    """Shapes for torch.compile's tracing and the backward pass of bias_leaky_relu_forward."""
    forward, backward = f"{ns}::bias_leaky_relu_forward", f"{ns}::bias_leaky_relu_backward"

    @torch.library.register_fake(forward)
    def _(h: torch.Tensor, bias: torch.Tensor, slope: float) -> torch.Tensor:
        return torch.empty_like(h)

    @torch.library.register_fake(backward)
    def _(dy: torch.Tensor, y: torch.Tensor, slope: float):
        return torch.empty_like(y), y.new_empty(y.shape[-1])

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(output)
        ctx.slope = inputs[2]

    def grad(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        (y,) = ctx.saved_tensors
        dh, db = getattr(torch.ops, ns).bias_leaky_relu_backward(dy.contiguous(), y, ctx.slope)
        return dh, db, None

    torch.library.register_autograd(forward, grad, setup_context=setup_context)


def _register_embedding(ns: str) -> None:
    """Shapes for torch.compile's tracing and the backward pass of embedding_forward."""
    forward, backward = f"{ns}::embedding_forward", f"{ns}::embedding_backward"

    @torch.library.register_fake(forward)
    def _(weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return weight.new_empty(*idx.shape, weight.shape[1])

    @torch.library.register_fake(backward)
    def _(grad: torch.Tensor, idx: torch.Tensor, num_rows: int) -> torch.Tensor:
        return grad.new_empty(num_rows, grad.shape[-1])

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        weight, idx = inputs
        ctx.save_for_backward(idx)
        ctx.num_rows = weight.shape[0]

    def grad(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, None]:
        (idx,) = ctx.saved_tensors
        op = getattr(torch.ops, ns).embedding_backward
        return op(dy.contiguous(), idx, ctx.num_rows), None

    torch.library.register_autograd(forward, grad, setup_context=setup_context)


def _register_cross_entropy(ns: str) -> None:
    """Shapes for torch.compile's tracing and the backward pass of cross_entropy_forward."""
    forward, backward = f"{ns}::cross_entropy_forward", f"{ns}::cross_entropy_backward"

    @torch.library.register_fake(forward)
    def _(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = logits.new_empty(logits.shape[0], dtype=torch.float32)
        return rows, torch.empty_like(rows)

    @torch.library.register_fake(backward)
    def _(grad: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor):
        return torch.empty_like(logits)

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        logits, targets = inputs
        ctx.save_for_backward(logits, targets, output[1])
        ctx.mark_non_differentiable(output[1])  # the log-sum-exp is for the backward only

    def grad(ctx: Any, dloss: torch.Tensor, dlse: torch.Tensor | None) -> tuple[Any, None]:
        logits, targets, lse = ctx.saved_tensors
        op = getattr(torch.ops, ns).cross_entropy_backward
        return op(dloss.contiguous(), logits, targets, lse), None

    torch.library.register_autograd(forward, grad, setup_context=setup_context)
