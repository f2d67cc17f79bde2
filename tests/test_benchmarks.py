"""The benchmark scripts of this issue run end to end on CPU at a tiny size."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

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


def test_cross_entropy_benchmark_runs_tiny(tmp_path, capsys):
    """Guards benchmarks/cross_entropy.py (the loss alone, inductor's against the Triton
    kernels', which on this CPU run in Triton's interpreter): every way computes the loss
    and gradient of the fp32 reference and leaves the padding's gradient zero."""
    pytest.importorskip("triton")
    cross_entropy = load_script("cross_entropy")
    out = tmp_path / "ce.json"
    result = cross_entropy.main(["--tiny", "--rows", "16", "--rounds", "1", "--json", str(out)])
    ways = result["ways"]
    assert len(ways) == 1 + len(cross_entropy.CONFIGS) and "inductor" in ways
    assert result["width"] == 5056 and result["vocab"] == 5000
    for way in ways.values():
        assert way["loss_error"] < 1e-4 and way["grad_max_error"] < 1e-3
        assert way["padding_grad_zero"] and way["median_ms"] > 0
    assert json.loads(out.read_text())["ways"].keys() == ways.keys()
    assert "triton block 4096 warps 8" in capsys.readouterr().out


def test_gpu_train_names_the_losss_kernels():
    """The profile's "loss" kind: gpu_kernels' kernels and inductor's cross-entropy."""
    kind = load_script("gpu_train").kernel_kind
    assert kind("cross_entropy_backward_kernel") == "loss"
    assert kind("triton_red_fused__log_softmax__to_copy_nll_loss_forward_0") == "loss"
    assert kind("triton_per_fused_native_layer_norm_3") == "inductor"


def test_gpu_peaks_are_known_for_h100_and_h200():
    """Guards the peak lookup the MFU figure divides by."""
    gpu_train = load_script("gpu_train")
    assert gpu_train.gpu_of_device("NVIDIA H100 80GB HBM3").bf16_tflops == pytest.approx(989.4)
    assert gpu_train.gpu_of_device("NVIDIA H200").bf16_tflops == pytest.approx(989.4)


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
    on the cache dtype it names, and the table reports each."""
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
    assert set(json.loads(out.read_text())) >= {"fp32@8", "int8@20"}
    assert len(re.findall(r"\d\.\d\dx$", capsys.readouterr().out, re.MULTILINE)) == 4


def test_prefill_benchmark_runs_tiny(tmp_path):
    """Guards benchmarks/prefill.py: every kind of weights runs every prompt length."""
    prefill = load_script("prefill")
    out = tmp_path / "prefill.json"
    result = prefill.main(
        ["--preset", "seed-tiny", "--lengths", "4,60", "--repeats", "1"] + ["--json", str(out)]
    )
    for T in ("4", "60"):  # 60 rows: past the kernel's 48, the slab path
        assert set(result[T]["ms"]) == {"fp32", "bf16", "int8"}
        assert all(ms > 0 for ms in result[T]["ms"].values())
    assert set(json.loads(out.read_text())) >= {"4", "60"}


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
