"""Training throughput and MFU of the `gpt2` preset (124M) on one GPU, plus decode speed.

bf16 autocast, fused attention (SDPA), torch.compile (the model and its loss as one graph,
as `gptkit train --compile` does in one process, the unembedding over the vocabulary padded
to a multiple of `--vocab-multiple`; `--loss-kernel triton`: its cross-entropy in
gptkit.gpu_kernels' Triton kernels instead of inductor's), fused AdamW, gradient clipping, and
the largest micro-batch (power of two, at most 64) that `gptkit.plan` expects to fit in
80% of the card. Data are random token ids: this measures the model and the optimizer,
not a data loader. MFU = (6 N + 12 L d T) FLOPs per token x tokens/s / dense bf16 peak
(the script knows H100/H200/A100 and others from gptkit.plan.GPUS; --peak-tflops
overrides), and beside it the card's own bf16 matrix-product rate measured in the same run.
Decoding: greedy, KV cache, bf16 weights, batch 1 and 64; on CUDA also with every step
replayed as a CUDA graph (`generate(..., cuda_graph=True)`), and for how many tokens
its greedy output is the eager one.

    python benchmarks/gpu_train.py                     # on a GPU, ~2-3 minutes
    python benchmarks/gpu_train.py --tiny --no-compile # tiny model on CPU, seconds
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from typing import Any

import torch

from gptkit.config import GPTConfig
from gptkit.distributed import DistEnv
from gptkit.generate import generate
from gptkit.model import GPT
from gptkit.plan import flops_per_token, gpu_of_device, memory_per_device
from gptkit.train import VOCAB_MULTIPLE, batch_loss


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny gpt2-family model (CPU test)")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: fill the card")
    p.add_argument("--steps", type=int, default=None, help="timed training steps")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (compilation)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak")
    p.add_argument(
        "--vocab-multiple", type=int, default=VOCAB_MULTIPLE,
        help="the compiled loss's unembedding pads the vocabulary to a multiple of this",
    )  # fmt: skip
    p.add_argument(
        "--loss-kernel", choices=["inductor", "triton"], default="inductor",
        help="the compiled loss's cross-entropy: inductor's code or gptkit.gpu_kernels'",
    )  # fmt: skip
    p.add_argument(
        "--coordinate-descent", action="store_true",
        help="inductor tunes each generated kernel's block sizes (a longer compile)",
    )  # fmt: skip
    p.add_argument(
        "--profile-steps", type=int, default=0,
        help="then profile this many steps: ms per step by kind of kernel, the top kernels",
    )  # fmt: skip
    p.add_argument("--decode-batches", default="1,64", help="batch sizes for decoding ('': none)")
    p.add_argument("--decode-tokens", type=int, default=None, help="new tokens per decode")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON here")
    return p.parse_args(argv)


def model_config(tiny: bool) -> GPTConfig:
    if tiny:
        return GPTConfig.from_preset(
            "gpt2", vocab_size=512, context_length=64, n_layer=2, n_head=2, d_model=64
        )
    return GPTConfig.from_preset("gpt2")


def peak_tflops(device: torch.device, given: float | None) -> tuple[str, float | None]:
    """(device name, dense bf16 TFLOP/s) from --peak-tflops or the known-GPU table."""
    if device.type != "cuda":
        return platform.processor() or "cpu", given
    name = torch.cuda.get_device_name(device)
    if given is not None:
        return name, given
    gpu = gpu_of_device(name)
    return name, None if gpu is None else gpu.bf16_tflops


def fill_batch(config: GPTConfig, device: torch.device) -> int:
    """Largest power-of-two micro-batch <= 64 whose planned memory is <= 80% of the card."""
    if device.type != "cuda":
        return 4
    free = torch.cuda.get_device_properties(device).total_memory * 0.8
    batch = 1
    while batch < 64:
        need = sum(memory_per_device(config, 1, "ddp", 2 * batch, "bfloat16", False).values())
        if need > free:
            break
        batch *= 2
    return batch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """The card's own bf16 matrix-product rate (n x n x n, random data, 2 n^3 FLOPs each):
    a measured ceiling beside the datasheet's peak (main runs it on CUDA only)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def bench_training(
    model: GPT,
    batch: int,
    steps: int,
    warmup: int,
    compile: bool,
    device: torch.device,
    vocab_multiple: int = VOCAB_MULTIPLE,
    profile_steps: int = 0,
    loss_kernel: str = "inductor",
) -> dict[str, Any]:
    config = model.config
    T = config.context_length
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True
    )
    # What `gptkit train --compile` does in one process: the loss compiled with the model.
    loss_of = batch_loss(model, compile, device, DistEnv(), vocab_multiple, loss_kernel)
    g = torch.Generator(device="cpu").manual_seed(0)
    data = torch.randint(0, config.vocab_size, (8, batch, T + 1), generator=g).to(device)

    def step(i: int) -> torch.Tensor:
        x, y = data[i % 8, :, :-1], data[i % 8, :, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    start = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync(device)
    warm_s = time.perf_counter() - start
    start = time.perf_counter()
    losses = [step(i) for i in range(steps)]
    sync(device)
    seconds = time.perf_counter() - start
    tokens_per_s = batch * T * steps / seconds
    kernels = profile(lambda: [step(i) for i in range(profile_steps)], device, profile_steps)
    return {
        "kernels_ms_per_step": kernels,
        "batch": batch,
        "context": T,
        "steps": steps,
        "warmup_seconds": warm_s,
        "step_ms": 1000 * seconds / steps,
        "tokens_per_s": tokens_per_s,
        "tflops": flops_per_token(config) * tokens_per_s / 1e12,
        "final_loss": float(losses[-1]),
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9
        if device.type == "cuda"
        else None,
    }


# Kernel names -> where a step's time goes (cuBLAS / cuDNN / inductor / optimizer).
KERNEL_KINDS = {
    "matmul": ("gemm", "nvjet", "cutlass", "xmma", "mkl", "addmm", "aten::mm", "aten::bmm"),
    "attention": ("flash", "fmha", "attention", "cudnn"),
    "adamw": ("adam", "multi_tensor"),
    "loss": ("cross_entropy", "log_softmax", "nll_loss"),  # gpu_kernels' or inductor's
    "inductor": ("triton", "cpp_fused", "graph_"),
}


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((k for k, keys in KERNEL_KINDS.items() if any(s in lowered for s in keys)), "other")


def profile(run: Any, device: torch.device, steps: int, top: int = 25) -> dict[str, Any] | None:
    """Run `run()` (`steps` training steps) under torch.profiler: ms per step by kind of
    kernel and of the `top` kernels, device time on CUDA (self CPU time elsewhere)."""
    if steps <= 0:
        return None
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profiler(activities=activities) as prof:
        run()
        sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr) > 0]
    if device.type == "cuda":  # the kernels themselves, not the host ops that launched them
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    ms = {e.key: getattr(e, attr) / 1000 / steps for e in events}
    kinds: dict[str, float] = {}
    for name, t in ms.items():
        kind = kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + t
    return {"total": sum(ms.values()), "kinds": kinds, "top": dict(list(ms.items())[:top])}


def bench_decode(
    model: GPT, batch: int, new_tokens: int, device: torch.device, cuda_graph: bool = False
) -> tuple[float, torch.Tensor]:
    """(greedy decoding tokens/s of all rows, the tokens) after one untimed warm-up run.
    With `cuda_graph` every step replays a CUDA graph (captured anew in the timed run).
    The timed call includes the 16-token prompt's prefill (about 1% at 128 new tokens;
    benchmarks/cpu_inference.py leaves it out)."""
    g = torch.Generator(device="cpu").manual_seed(batch)
    idx = torch.randint(0, model.config.vocab_size, (batch, 16), generator=g).to(device)
    generate(model, idx, 4, temperature=0, cuda_graph=cuda_graph)
    sync(device)
    start = time.perf_counter()
    out = generate(model, idx, new_tokens, temperature=0, cuda_graph=cuda_graph)
    sync(device)
    return batch * (out.shape[1] - 16) / (time.perf_counter() - start), out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.coordinate_descent:
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    config = model_config(args.tiny)
    name, peak = peak_tflops(device, args.peak_tflops)
    torch.manual_seed(0)
    model = GPT(config).to(device)
    batch = args.batch_size or fill_batch(config, device)
    steps = args.steps or (3 if args.tiny else 50)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 10)
    result: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "params": config.num_parameters(),
        "peak_tflops": peak,
    }
    measured = matmul_tflops(device) if device.type == "cuda" else None
    result["matmul_tflops"] = measured
    result["vocab_multiple"] = args.vocab_multiple
    result["coordinate_descent"] = args.coordinate_descent
    result["loss_kernel"] = args.loss_kernel
    result["train"] = train = bench_training(
        model, batch, steps, warmup, args.compile, device, args.vocab_multiple,
        args.profile_steps, args.loss_kernel,
    )  # fmt: skip
    train["mfu"] = None if peak is None else train["tflops"] / peak
    train["of_measured_matmul"] = None if measured is None else train["tflops"] / measured
    # The whole model in bf16 (activations and KV cache too): what a GPU decodes fastest.
    decode_model = copy.deepcopy(model).to(torch.bfloat16).eval()
    new_tokens = args.decode_tokens or (8 if args.tiny else 128)
    result["decode_tokens_per_s"], result["decode_graph_tokens_per_s"] = {}, {}
    for b in (int(s) for s in args.decode_batches.split(",") if s):
        result["decode_tokens_per_s"][b], eager = bench_decode(decode_model, b, new_tokens, device)
        if device.type == "cuda":  # the same decoding, each step a replayed CUDA graph
            speed, graphed = bench_decode(decode_model, b, new_tokens, device, cuda_graph=True)
            # Greedy bf16 tokens may part where two logits round alike: how long they agree.
            differs = (graphed != eager).any(dim=0).nonzero()
            same = int(differs[0]) - 16 if len(differs) else graphed.shape[1] - 16
            result["decode_graph_tokens_per_s"][b] = {"tokens_per_s": speed, "same_tokens": same}
    mfu = "n/a (unknown peak)" if train["mfu"] is None else f"{train['mfu']:.1%}"
    how = "eager"
    if args.compile:
        how = f"compiled, the unembedding padded to a multiple of {args.vocab_multiple}"
        how += ", coordinate-descent tuning" if args.coordinate_descent else ""
        how += ", gpu_kernels' cross-entropy" if args.loss_kernel == "triton" else ""
    print(f"{name}, torch {torch.__version__}, {config.num_parameters() / 1e6:.1f}M params")
    if measured is not None:
        print(
            f"bf16 matmul 8192^3: {measured:.0f} TFLOP/s measured"
            f" (training reached {train['of_measured_matmul']:.1%} of it)"
        )
    print(
        f"train: batch {batch} x {config.context_length}, {train['step_ms']:.1f} ms/step, "
        f"{train['tokens_per_s']:,.0f} tokens/s, {train['tflops']:.1f} TFLOP/s, MFU {mfu} "
        f"({how}; warm-up {train['warmup_seconds']:.0f} s)"
    )
    if train["kernels_ms_per_step"] is not None:
        kernels = train["kernels_ms_per_step"]
        kinds = ", ".join(f"{k} {t:.1f}" for k, t in sorted(kernels["kinds"].items()))
        print(f"profile, ms per step: {kernels['total']:.1f} in all: {kinds}")
        for name, t in kernels["top"].items():
            print(f"  {t:7.2f}  {kernel_kind(name):9s} {name[:110]}")
    for b, speed in result["decode_tokens_per_s"].items():
        print(f"decode: batch {b}, {speed:,.1f} tokens/s (bf16 weights, greedy, KV cache)")
        if b in result["decode_graph_tokens_per_s"]:
            graph = result["decode_graph_tokens_per_s"][b]
            print(f"        CUDA graph steps: {graph['tokens_per_s']:,.1f} tokens/s, the eager "
                  f"tokens for the first {graph['same_tokens']} of {new_tokens}")  # fmt: skip
    if args.json:
        from gptkit.fileio import atomic_write_json

        atomic_write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
