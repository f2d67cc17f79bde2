"""The benchmark scripts of this issue run end to end on CPU at a tiny size."""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from gptkit.config import GPTConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_train_runs_tiny_on_cpu(tmp_path, capsys):
    """Guards benchmarks/gpu_train.py: training, MFU arithmetic and decoding run end to end
    (here on CPU, tiny), so the script works when a GPU session gets its one chance."""
    gpu_train = load_script("gpu_train")
    out = tmp_path / "r.json"
    args = ["--tiny", "--no-compile", "--device", "cpu", "--steps", "2", "--warmup", "1"]
    args += ["--decode-batches", "1,2", "--decode-tokens", "3", "--peak-tflops", "0.5"]
    result = gpu_train.main([*args, "--profile-steps", "1", "--json", str(out)])
    train = result["train"]
    assert train["tokens_per_s"] > 0 and train["final_loss"] > 0
    kernels = train["kernels_ms_per_step"]
    assert kernels["total"] == pytest.approx(sum(kernels["kinds"].values()))
    assert 0 < len(kernels["top"]) <= 25
    assert train["mfu"] == pytest.approx(train["tflops"] / 0.5)
    # The MFU numerator, from its definition (PaLM): 6 N + 12 L d T per token, N without
    # the looked-up position table, over the timed steps only (warm-up left out).
    cfg = gpu_train.model_config(True)
    L, d, T = cfg.n_layer, cfg.d_model, cfg.context_length
    per_token = 6 * (cfg.num_parameters() - T * d) + 12 * L * d * T
    assert train["tokens_per_s"] == pytest.approx(
        train["batch"] * T * 2 / (train["step_ms"] * 2 / 1000)
    )
    assert train["tflops"] == pytest.approx(per_token * train["tokens_per_s"] / 1e12)
    assert gpu_train.model_config(False) == GPTConfig.from_preset("gpt2")  # the 124M model
    assert set(json.loads(out.read_text())["decode_tokens_per_s"]) == {"1", "2"}
    assert "MFU" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "vocab", "width"),
    [([], 5000, 5056), (["--vocab", "1000", "--multiple", "128"], 1000, 1024)],
)
def test_cross_entropy_benchmark_runs_tiny(tmp_path, capsys, extra, vocab, width):
    """Guards benchmarks/cross_entropy.py (the loss alone, inductor's against the Triton
    kernels', which on this CPU run in Triton's interpreter): every way computes the loss
    and gradient of the fp32 reference and leaves the padding's gradient zero; --vocab
    applies with --tiny too (it was once ignored there)."""
    pytest.importorskip("triton")
    cross_entropy = load_script("cross_entropy")
    out = tmp_path / "ce.json"
    args = ["--tiny", "--rows", "16", "--rounds", "1", *extra, "--json", str(out)]
    result = cross_entropy.main(args)
    ways = result["ways"]
    assert len(ways) == 1 + len(cross_entropy.CONFIGS) and "inductor" in ways
    assert result["width"] == width and result["vocab"] == vocab
    for way in ways.values():
        assert way["loss_error"] < 1e-4 and way["grad_max_error"] < 1e-3
        assert way["padding_grad_zero"] and way["median_ms"] > 0
        # the bytes the least loss moves: the bf16 logits read twice, the gradient written once
        assert way["gb_per_s"] == pytest.approx(3 * 16 * width * 2 / way["median_ms"] / 1e6)
    assert json.loads(out.read_text())["ways"].keys() == ways.keys()
    printed = capsys.readouterr().out
    assert "triton block 4096 warps 8" in printed and f"vocab {vocab}" in printed


def test_gpu_train_names_the_losss_kernels():
    """The profile's "loss" kind: gpu_kernels' kernels and inductor's cross-entropy."""
    kind = load_script("gpu_train").kernel_kind
    assert kind("cross_entropy_backward_kernel") == "loss"
    assert kind("triton_red_fused__log_softmax__to_copy_nll_loss_forward_0") == "loss"
    assert kind("triton_per_fused_native_layer_norm_3") == "inductor"


def test_gpu_peaks_are_known_for_h100_and_h200(monkeypatch):
    """Guards the peak lookup the MFU figure divides by: gpu_train.peak_tflops maps the name
    CUDA reports (here the test's) to the table's dense bf16 peak (ignoring the table
    leaves MFU "n/a" on every card); --peak-tflops overrides it; an unknown card has none."""
    import torch

    gpu_train = load_script("gpu_train")
    assert gpu_train.gpu_of_device("NVIDIA H100 80GB HBM3").bf16_tflops == pytest.approx(989.4)
    assert gpu_train.gpu_of_device("NVIDIA H200").bf16_tflops == pytest.approx(989.4)
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    cards = [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA A100-SXM4-40GB", 312.0)]
    for name, peak in [*cards, ("NVIDIA GeForce RTX 4090", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert gpu_train.peak_tflops(cuda, None) == (name, peak)
        assert gpu_train.peak_tflops(cuda, 500.0) == (name, 500.0)


def test_sampling_benchmark_compares_like_with_like(capsys):
    """Guards benchmarks/sampling.py: it runs, and its plain recipe draws from the same
    tokens as gptkit's filters (so the speed-up compares the same work)."""
    import torch

    from gptkit.generate import top_k_filter, top_p_filter

    sampling = load_script("sampling")
    sampling.main(["--repeats", "1", "--calls", "2"])
    assert capsys.readouterr().out.count("x |") == len(sampling.SETTINGS)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, sampling.V, generator=g) * 8
    support = torch.isfinite(top_p_filter(top_k_filter(logits, 40), 0.95))[0]
    for _ in range(50):
        token = sampling.plain_sample(logits, 1.0, 40, 0.95, g)
        assert support[token].all()


def test_training_baseline_is_the_same_model_in_plain_pytorch():
    """Guards the 1.5x comparison of train_shakespeare.py: its plain loop's model, written
    nanoGPT's way with none of gptkit's kernels, computes the same function as gptkit's
    gpt2 model from the same weights (so only the implementation differs)."""
    import torch

    from gptkit.config import GPTConfig
    from gptkit.model import GPT

    bench = load_script("train_shakespeare")
    ours = GPT(GPTConfig.from_preset("gpt2", vocab_size=65, **bench.MODEL))
    plain = bench.PlainGPT(65)
    plain.load_state_dict(ours.state_dict())
    assert plain.lm_head.weight is plain.wte.weight
    idx = torch.randint(0, 65, (3, bench.MODEL["context_length"]))
    torch.testing.assert_close(plain(idx), ours(idx), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in plain.parameters()) == ours.num_parameters()


def test_products_floor_runs_exactly_the_plain_steps_products():
    """train_shakespeare.py's `Products` (the floor it reports under both steps) issues the
    same matrix products as a real forward + backward of the plain model: the same ops on
    the same operand shapes and layouts, counted with a dispatch mode."""
    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    bench = load_script("train_shakespeare")

    class Products(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("mm", "addmm"):
                mats = args[-2:]
                self.calls.append((name, *((tuple(m.shape), m.stride()) for m in mats)))
            return func(*args, **(kwargs or {}))

    B, T = 2, bench.MODEL["context_length"]
    model = bench.PlainGPT(65)
    idx = torch.randint(0, 65, (B, T))
    with Products() as real:
        F.cross_entropy(model(idx).view(-1, 65), idx.view(-1)).backward()
    with Products() as floor:
        bench.Products(model, B * T).step(0)
    assert len(real.calls) == 3 * 17
    assert sorted(floor.calls) == sorted(real.calls)


def test_kv_cache_benchmark_runs_tiny(tmp_path, capsys):
    """Guards benchmarks/kv_cache.py: each (weights, cache) pair decodes from every position,
    on the cache dtype it names (a "bf16" cache left in fp32 would time fp32 twice: its
    bytes must be half the fp32 one's), and the table reports each."""
    kv_cache = load_script("kv_cache")
    out = tmp_path / "kv.json"
    args = ["--preset", "seed-tiny", "--positions", "8,20", "--new-tokens", "3"]
    result = kv_cache.main([*args, "--repeats", "1", "--weights", "fp32,int8", "--json", str(out)])
    for key in ("fp32@8", "fp32@20", "int8@8", "int8@20"):
        row = result[key]
        assert row["fp32"]["ms_per_token"] > 0 and row["bf16"]["ms_per_token"] > 0
        assert row["bf16_speedup"] == pytest.approx(
            row["fp32"]["ms_per_token"] / row["bf16"]["ms_per_token"]
        )
        # keys and values of every layer at position + 3 positions, 4 bytes each in fp32
        cfg, positions = GPTConfig.from_preset("seed-tiny"), int(key.split("@")[1]) + 3
        fp32_bytes = 2 * cfg.n_layer * positions * cfg.d_model * 4
        assert row["fp32"]["cache_bytes"] == fp32_bytes
        assert row["bf16"]["cache_bytes"] == fp32_bytes // 2
    assert set(json.loads(out.read_text())) >= {"fp32@8", "int8@20"}
    assert len(re.findall(r"\d\.\d\dx$", capsys.readouterr().out, re.MULTILINE)) == 4


def test_prefill_benchmark_runs_tiny(tmp_path):
    """Guards benchmarks/prefill.py: every kind of weights runs every prompt length, each
    kind's model in its own weight format (all three once fp32 would compare fp32 with
    itself): the bytes per token it reports are gptkit.quantize's for that kind."""
    from gptkit.model import GPT
    from gptkit.quantize import quantize_model, weight_bytes_per_token

    prefill = load_script("prefill")
    out = tmp_path / "prefill.json"
    result = prefill.main(
        ["--preset", "seed-tiny", "--lengths", "4,60", "--repeats", "1"] + ["--json", str(out)]
    )
    for T in ("4", "60"):  # 60 rows: past the kernel's 48, the slab path
        assert set(result[T]["ms"]) == {"fp32", "bf16", "int8"}
        assert all(ms > 0 for ms in result[T]["ms"].values())
    assert set(json.loads(out.read_text())) >= {"4", "60"}
    base = GPT(GPTConfig.from_preset("seed-tiny"))
    reported = result["bytes_per_token"]
    for w in prefill.WEIGHTS:
        assert reported[w] == weight_bytes_per_token(quantize_model(copy.deepcopy(base), w))
    assert reported["fp32"] > reported["bf16"] > reported["int8"]


@pytest.mark.slow
def test_padded_vocab_benchmark_times_each_multiple_in_its_own_process(tmp_path, capsys):
    """Guards benchmarks/padded_vocab.py: each multiple trains in child processes through
    `train.batch_loss`, the padded vocabulary is reported, and the loss is the same."""
    padded_vocab = load_script("padded_vocab")
    out = tmp_path / "r.json"
    args = ["--procs", "1", "--steps", "1", "--vocab", "100", "--batch", "1", "--context", "8"]
    result = padded_vocab.main([*args, "--json", str(out)])["results"]
    assert [result[m]["padded_vocab"] for m in (1, 64)] == [100, 128]
    assert result[1]["first_losses"] == pytest.approx(result[64]["first_losses"], rel=1e-5)
    assert result[64]["ms_per_step"] > 0 and result[1]["speedup"] == 1.0
    assert json.loads(out.read_text())["results"]["64"]["padded_vocab"] == 128
    assert "multiple  64 (vocab 128)" in capsys.readouterr().out


def test_ablation_trains_a_variant_tiny(tmp_path):
    """Guards benchmarks/ablation.py's training path (it broke once when train.Run grew a
    field): one variant trains two steps on a small corpus and reports its val losses."""
    from gptkit.data import prepare

    ablation = load_script("ablation")
    text = tmp_path / "corpus.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 200)
    data = tmp_path / "data"
    prepare([str(text)], str(data), tokenizer="char", progress=False)
    result = ablation.train_variant(data, ablation.RUNS["seed"][1], steps=2)
    losses = [loss for _, loss in result["curve"]]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    assert 0 < result["val_loss"] < 10


def fake_clock(monkeypatch, module, ticks, events: list[str] | None = None) -> None:
    """Makes `module.time.perf_counter()` return the next of `ticks` (that module only),
    appending "clock" to `events` at each read when given."""
    ticks = iter(ticks)

    def perf_counter() -> float:
        if events is not None:
            events.append("clock")
        return next(ticks)

    monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=perf_counter))


def test_gpu_train_fill_batch_takes_the_largest_power_of_two_that_fits(monkeypatch):
    """Guards gpu_train.fill_batch, CUDA only, so a wrong call of gptkit.plan there would
    crash or misjudge the batch only on the GPU: the micro-batch is the largest power of
    two <= 64 whose planned memory (one card, ddp, bf16) fits 80% of the card, and 1 when
    none does. The card's size is the test's; nothing runs on it."""
    import torch

    from gptkit.plan import memory_per_device

    gpu_train = load_script("gpu_train")
    config = gpu_train.model_config(False)

    def card(bytes_: float) -> float:  # the card whose 80% is `bytes_`
        return bytes_ / 0.8

    def need(batch: int) -> float:
        return sum(memory_per_device(config, 1, "ddp", batch, "bfloat16", False).values())

    sizes = {
        1: [card(need(1)) / 2, card(need(2)) * 0.999],
        8: [card(need(8)) * 1.001, card(need(16)) * 0.999],
        64: [card(need(64)) * 1.001, 1e15],
    }
    for batch, totals in sizes.items():
        for total in totals:
            props = SimpleNamespace(total_memory=total)
            monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d, p=props: p)
            assert gpu_train.fill_batch(config, torch.device("cuda")) == batch, total
    assert gpu_train.fill_batch(config, torch.device("cpu")) == 4


def test_gpu_train_matmul_rate_counts_two_flops_per_multiply_add(monkeypatch):
    """Guards gpu_train.matmul_tflops, the measured ceiling MFU is set beside (a halved
    FLOP count would double the reported fraction of it): an n x n x n product is 2 n^3
    FLOPs, so the rate is 2 n^3 x repeats / the timed seconds, on a clock the test controls."""
    import torch

    gpu_train = load_script("gpu_train")
    fake_clock(monkeypatch, gpu_train, [1.0, 3.0])  # the timed products take 2 s
    rate = gpu_train.matmul_tflops(torch.device("cpu"), n=16, repeats=5)
    assert rate == pytest.approx(2 * 16**3 * 5 / 2.0 / 1e12)


def test_gpu_train_tokens_per_s_leave_the_warm_up_out(monkeypatch):
    """Guards gpu_train.bench_training: tokens/s (and so TFLOP/s and MFU) divide the timed
    steps' tokens by the timed steps' time only, not by the warm-up's too (on a GPU the
    warm-up compiles, minutes); the warm-up is reported apart. On a clock the test
    controls the warm-up takes 10 s and the 2 timed steps 4 s."""
    import torch

    from gptkit.model import GPT

    gpu_train = load_script("gpu_train")
    fake_clock(monkeypatch, gpu_train, [0.0, 10.0, 11.0, 15.0])
    torch.manual_seed(0)
    model = GPT(gpu_train.model_config(True))
    T = model.config.context_length
    train = gpu_train.bench_training(model, 2, 2, 1, False, torch.device("cpu"))
    assert train["warmup_seconds"] == 10.0
    assert train["step_ms"] == pytest.approx(2000.0)
    assert train["tokens_per_s"] == pytest.approx(2 * T * 2 / 4.0)


def test_gpu_train_decode_speed_counts_every_row_after_syncing(monkeypatch):
    """Guards gpu_train.bench_decode: tokens/s count the new tokens of all `batch` rows, not
    of one, and the device is synchronised before each clock read (without it a CUDA clock
    stops while kernels still run). The clock and `sync` are the test's: each records its
    calls, and the timed decoding takes 0.5 s."""
    import torch

    from gptkit.model import GPT

    gpu_train = load_script("gpu_train")
    events: list[str] = []
    fake_clock(monkeypatch, gpu_train, [2.0, 2.5], events)
    monkeypatch.setattr(gpu_train, "sync", lambda device: events.append("sync"))
    torch.manual_seed(0)
    model = GPT(gpu_train.model_config(True)).eval()
    speed, out = gpu_train.bench_decode(model, 3, 4, torch.device("cpu"))
    assert out.shape == (3, 16 + 4)
    assert speed == pytest.approx(3 * 4 / 0.5)
    assert events == ["sync", "clock", "sync", "clock"]


def test_cpu_inference_bandwidth_is_the_bytes_of_one_read_over_the_fastest(monkeypatch):
    """Guards cpu_inference.read_bandwidth, the ceiling's denominator (a doubled figure
    once went unnoticed): one `sum` reads the tensor's bytes once, so bandwidth = bytes /
    the fastest of the timed sums, here on a clock the test controls."""
    cpu_inference = load_script("cpu_inference")
    fake_clock(monkeypatch, cpu_inference, [0.0, 3.0, 10.0, 11.0, 20.0, 22.0])  # 3, 1, 2 s
    gib = 1 / 256
    assert cpu_inference.read_bandwidth(repeats=3, gib=gib) == pytest.approx(gib * 2**30 / 1.0)


def test_cpu_inference_decode_speed_counts_the_steps_after_the_first_token(monkeypatch):
    """Guards cpu_inference.decode_speed: n new tokens are timed over the n steps after
    the first (prefill left out), and the phases add up to the time of a token."""
    from gptkit import kernels
    from gptkit.model import GPT

    cpu_inference = load_script("cpu_inference")
    fake_clock(monkeypatch, cpu_inference, itertools.count(0.0, 0.5))  # a token per 0.5 s
    model = GPT(cpu_inference.model_config(True)).eval()
    speed, phases = cpu_inference.decode_speed(model, 5)
    assert speed == pytest.approx(2.0)
    if kernels.library() is not None:  # else every phase is 0
        assert sum(phases.values()) == pytest.approx(0.5)
        assert all(phases[p] > 0 for p in ("products", "attention", "around"))


def test_cpu_inference_runs_tiny(tmp_path, capsys):
    """Guards benchmarks/cpu_inference.py end to end (a crash after the decode table once
    went unnoticed): its figures follow from the rounds it records, the ceiling being
    bandwidth / weight bytes per token, and the perplexity part runs every kind."""
    from gptkit import kernels
    from gptkit.model import GPT
    from gptkit.quantize import quantize_model, weight_bytes_per_token

    cpu_inference = load_script("cpu_inference")
    text = tmp_path / "corpus.txt"  # val (10%) must hold the tiny run's 8 windows of 33
    text.write_text("To be, or not to be, that is the question.\n" * 100)
    out = tmp_path / "cpu.json"
    args = ["--tiny", "--repeats", "2", "--new-tokens", "4", "--text", str(text)]
    result = cpu_inference.main([*args, "--json", str(out)])
    weights = cpu_inference.WEIGHTS
    rounds = {w: result[w]["rounds_gb_s_tok_s"] for w in weights}
    assert result["read_bandwidth_gb_s"] == pytest.approx(
        statistics.median(gb for w in weights for gb, _ in rounds[w])
    )
    native = kernels.library() is not None
    base = GPT(cpu_inference.model_config(True))
    for w in weights:
        r = result[w]
        assert len(rounds[w]) == 2 and all(gb > 0 and tps > 0 for gb, tps in rounds[w])
        assert r["bytes_per_token"] == weight_bytes_per_token(
            quantize_model(copy.deepcopy(base), w)
        )
        assert r["tokens_per_s"] == pytest.approx(statistics.median(t for _, t in rounds[w]))
        ceilings = [gb * 1e9 / r["bytes_per_token"] for gb, _ in rounds[w]]  # tokens/s
        assert r["of_ceiling"] == pytest.approx(
            statistics.median(tps / c for (_, tps), c in zip(rounds[w], ceilings, strict=True))
        )
        if native:
            ms = r["ms_per_token"]["products"]
            assert ms > 0 and r["products_gb_s"] == pytest.approx(r["bytes_per_token"] / ms / 1e6)
    assert result["fp32"]["bytes_per_token"] > result["bf16"]["bytes_per_token"]
    assert result["bf16"]["bytes_per_token"] > result["int8"]["bytes_per_token"]
    ppl = result["perplexity"]
    assert (ppl["windows"], ppl["window_tokens"]) == (8, 32)
    for w in weights:
        for kind in ("", "_decode", "_decode_kv_bf16"):
            assert 1 < ppl[w + kind] < 100 and math.isfinite(ppl[w + kind])
        assert ppl[w] == pytest.approx(ppl["fp32"], rel=0.02)
        assert ppl[w + "_decode_kv_bf16"] == pytest.approx(ppl[w + "_decode"], rel=0.02)
    assert (
        json.loads(out.read_text())["int8"]["bytes_per_token"] == result["int8"]["bytes_per_token"]
    )
    printed = capsys.readouterr().out
    assert "decode-path perplexity (8 x 32 characters" in printed
    assert ("ms per token:" in printed) == native


def test_decode_benchmark_runs_tiny_and_counts_each_sides_tokens(monkeypatch, tmp_path):
    """Guards benchmarks/decode.py against Hugging Face: both sides decode every case, count
    the new tokens they return (HF once made half as many unnoticed), and in float32 make
    the same tokens. On a clock the test controls, every run takes 0.5 s."""
    pytest.importorskip("transformers")
    decode = load_script("decode")
    fake_clock(monkeypatch, decode, itertools.count(0.0, 0.5))
    out = tmp_path / "decode.json"
    args = ["--tiny", "--repeats", "2", "--new-tokens", "5", "--batch-sizes", "1,3"]
    results = decode.main([*args, "--json", str(out)])
    cases = [(r["batch"], r["dtype"]) for r in results]
    assert cases == [(1, "float32"), (3, "float32"), (1, "bfloat16"), (3, "bfloat16")]
    for r in results:
        expected = [r["batch"] * 5 / 0.5] * 2  # every row's 5 new tokens, in each of 2 runs
        assert r["ours_tok_s"] == pytest.approx(expected)
        assert r["hf_tok_s"] == pytest.approx(expected)
        if r["dtype"] == "float32":
            assert r["same_tokens"]
    assert json.loads(out.read_text())["meta"]["new_tokens"] == 5


def test_serve_bench_runs_tiny():
    """Guards benchmarks/serve_bench.py end to end (two servers, streaming clients): every
    client gets its max_tokens, the throughput and TTFT figures follow from them, and the
    in-process step timing leaves the caller's torch thread count as it was."""
    import torch

    serve_bench = load_script("serve_bench")
    threads = torch.get_num_threads()
    args = ["--clients", "1", "3", "--n-layer", "1", "--d-model", "64", "--context", "64"]
    result = serve_bench.main([*args, "--max-tokens", "4"])
    assert torch.get_num_threads() == threads
    for path in ("native", "eager blocks"):
        assert set(result["steps"][path]) == {1, 3}
        assert all(ms > 0 for ms in result["steps"][path].values())
    assert set(result["load"]) == {(m, n) for m in ("batched", "unbatched") for n in (1, 3)}
    for (_, n), r in result["load"].items():
        assert r["tokens"] == 4 * n  # 1 character = 1 token; end-of-text made improbable
        assert r["tok_per_s"] == pytest.approx(r["tokens"] / r["wall_s"])
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] <= 1000 * r["wall_s"]
        assert r["server_cpu_ms_per_token"] >= 0
    load = result["load"]
    for n in (1, 3):
        ratio = load[("batched", n)]["tok_per_s"] / load[("unbatched", n)]["tok_per_s"]
        assert result["speedup"][n] == pytest.approx(ratio)


@pytest.mark.slow
def test_gpu_session_tiny_names_each_file_for_what_ran(tmp_path):
    """Guards benchmarks/gpu_session.sh's TINY dry run (part 2): each JSON file's name says
    which loss kernel, vocabulary multiple and tuning its run used (one named `_triton_`
    once held a run without Triton)."""
    script = BENCHMARKS / "gpu_session.sh"
    env = {**os.environ, "TINY": "1", "PART": "2", "OUT": str(tmp_path), "PY": sys.executable}
    run = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ran = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert set(ran) == {"train_pad64_cdt.json", "train_pad1.json"}
    for name, r in ran.items():
        assert ("_triton" in name) == (r["loss_kernel"] == "triton")
        assert ("_cdt" in name) == r["coordinate_descent"]
        assert f"_pad{r['vocab_multiple']}" in name
