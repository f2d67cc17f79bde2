"""The training loop: schedule, optimizer groups, learning, exact resume, signals, errors.

Runs use tiny models (1-2 layers, width 32, context 16) on fake prepared directories
written here with numpy and json in `gptkit prepare`'s format, so each takes well under
a second of compute.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gptkit import train as train_mod
from gptkit.checkpoint import load_model, load_train_state
from gptkit.config import GPTConfig, TrainConfig
from gptkit.errors import GptkitError
from gptkit.model import GPT
from gptkit.train import decay_groups, evaluate_full, lr_at, setup, train

REPO = Path(__file__).resolve().parents[1]


def fake_data(
    path: Path, n_train: int = 4000, n_val: int = 800, vocab_size: int = 24, seed: int = 0
) -> Path:
    """A prepared directory (char tokenizer) holding a learnable stream: a noisy cycle."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val
    ids = (np.arange(n) % (vocab_size - 1)).astype(np.int64)
    noise = rng.random(n) < 0.1
    ids[noise] = rng.integers(0, vocab_size - 1, noise.sum())
    path.mkdir(parents=True, exist_ok=True)
    ids.astype(np.uint16)[:n_train].tofile(path / "train.bin")
    ids.astype(np.uint16)[n_train:].tofile(path / "val.bin")
    chars = [chr(ord("a") + i) for i in range(vocab_size - 1)]
    (path / "tokenizer.json").write_text(json.dumps({"kind": "char", "version": 1, "chars": chars}))
    meta = {
        "version": 1,
        "tokenizer": "char",
        "vocab_size": vocab_size,
        "eot_id": vocab_size - 1,
        "dtype": "uint16",
        "train_tokens": n_train,
        "val_tokens": n_val,
        "documents": 1,
        "sources": ["fake"],
        "bytes": n,
    }
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def tiny(data: Path, out: Path, **overrides) -> TrainConfig:
    base = dict(
        data=str(data),
        out=str(out),
        preset="gpt2",
        n_layer=1,
        n_head=2,
        d_model=32,
        context_length=16,
        batch_size=4,
        max_steps=10,
        warmup_steps=2,
        lr=3e-3,
        min_lr=3e-4,
        eval_every=5,
        eval_steps=2,
        save_every=1000,
        log_every=1,
        seed=0,
    )
    return TrainConfig(**{**base, **overrides})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train_loss"]) for r in metrics(run) if "train_loss" in r]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return fake_data(tmp_path / "data")


# --------------------------------------------------------------------------- pure pieces


def test_lr_schedule_warmup_then_cosine():
    """Guards the schedule: 0 -> lr linearly over warm-up, cosine to min_lr, then flat."""
    cfg = TrainConfig(data="d", lr=1e-3, min_lr=1e-4, warmup_steps=100, max_steps=1100)
    assert lr_at(0, cfg) == 0.0
    assert lr_at(50, cfg) == pytest.approx(5e-4)
    assert lr_at(100, cfg) == pytest.approx(1e-3)
    assert lr_at(600, cfg) == pytest.approx(5.5e-4)  # half-way down the cosine
    assert lr_at(1100, cfg) == pytest.approx(1e-4)
    assert lr_at(5000, cfg) == pytest.approx(1e-4)
    values = [lr_at(s, cfg) for s in range(100, 1101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    no_warmup = TrainConfig(data="d", warmup_steps=0, max_steps=10)
    assert lr_at(0, no_warmup) == pytest.approx(no_warmup.lr)


@pytest.mark.parametrize("tie", [True, False])
def test_weight_decay_only_on_matrices(tie):
    """Guards decay groups: embeddings and weight matrices decay; biases and norm gains never."""
    model = GPT(
        GPTConfig.from_preset(
            "gpt2",
            vocab_size=20,
            n_layer=2,
            n_head=2,
            d_model=16,
            context_length=8,
            tie_embeddings=tie,
        )
    )
    decay, no_decay = decay_groups(model)
    assert "wte.weight" in decay and "wpe.weight" in decay
    assert "h.0.attn.c_attn.weight" in decay and "h.1.mlp.c_proj.weight" in decay
    assert ("lm_head.weight" in decay) is not tie  # a tied head is wte, listed once
    assert "h.0.ln_1.weight" in no_decay and "ln_f.bias" in no_decay
    assert all(n.endswith(".bias") or ".ln_" in n or n.startswith("ln_f") for n in no_decay)
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    opt = train_mod.configure_optimizer(
        model, TrainConfig(data="d", weight_decay=0.1), torch.device("cpu")
    )
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("multiple", [1, 8, 64])
def test_padded_logits_are_the_models_logits_and_gradients(tie, multiple):
    """Guards train.padded_logits (the compiled loss's unembedding over a vocabulary padded
    to a multiple of 64): the logits, the loss and every parameter's gradient, tied head or
    not, are those of `model(x)` (20 rows padded to 24 or 64, or not at all)."""
    torch.manual_seed(0)
    config = GPTConfig.from_preset(
        "gpt2", vocab_size=20, n_layer=1, n_head=2, d_model=16, context_length=8,
        tie_embeddings=tie,
    )  # fmt: skip
    model = GPT(config)
    x, y = torch.randint(0, 20, (2, 3, 8))
    grads = []
    for logits_of in (model, lambda idx: train_mod.padded_logits(model, idx, multiple)):
        logits = logits_of(x)
        assert logits.shape == (3, 8, 20)
        train_mod.lm_loss(logits, y).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad()
        grads[-1]["logits"] = logits.detach()
    plain, padded = grads
    assert plain.keys() == padded.keys()
    for name in plain:
        torch.testing.assert_close(padded[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp32_training_on_cuda_multiplies_in_tf32(data, tmp_path, monkeypatch):
    """Guards `setup` on CUDA: --dtype float32 (the default) must not leave the products on
    the CUDA cores (an H100: ~67 TFLOP/s fp32 against ~495 TF32 dense, datasheet)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    setup(tiny(data, tmp_path / "run", device="cuda"))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_evaluate_full_is_the_token_weighted_mean(data):
    """Guards the whole-split evaluation: every target once, batches weighted by their size."""
    model = GPT(
        GPTConfig.from_preset(
            "gpt2", vocab_size=24, n_layer=1, n_head=2, d_model=16, context_length=16
        )
    ).eval()
    tokens = np.fromfile(data / "val.bin", dtype=np.uint16)[:103]  # 6 full windows + 6 extra
    ids = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        expected = torch.cat(
            [
                torch.nn.functional.cross_entropy(
                    model(ids[s : s + 16][None])[0], ids[s + 1 : s + 17], reduction="none"
                )
                for s in range(0, 96, 16)
            ]
            + [
                torch.nn.functional.cross_entropy(
                    model(ids[96:102][None])[0], ids[97:103], reduction="none"
                )
            ]
        ).mean()
    got = evaluate_full(model, tokens, batch_size=4, context_length=16)
    assert got == pytest.approx(expected.item(), rel=1e-5)
    model.train()
    evaluate_full(model, tokens, batch_size=4, context_length=16)
    assert model.training  # a mid-training evaluation hands the model back in train mode


# --------------------------------------------------------------------------- learning


def test_overfits_one_fixed_batch(tmp_path):
    """Guards the step as a whole (loss, backward, clip, AdamW, schedule): a model that can't
    memorise one batch has a broken gradient path."""
    # A train split of exactly T + 1 tokens has one window: every batch is the same.
    data = fake_data(tmp_path / "one", n_train=17, n_val=400, seed=3)
    cfg = tiny(
        data,
        tmp_path / "run",
        max_steps=300,
        warmup_steps=10,
        lr=1e-2,
        min_lr=1e-3,
        weight_decay=0.0,
        eval_every=0,
        log_every=50,
    )
    losses = [loss for _, loss in train_losses(train(cfg, progress=False))]
    assert losses[-1] < 0.05, losses


def test_run_dir_files_and_metrics(data, tmp_path):
    """Guards the run-directory contract (DESIGN.md §3) and the metrics.jsonl keys."""
    run = train(
        tiny(data, tmp_path / "run", max_steps=12, eval_every=5, log_every=4), progress=False
    )
    names = {p.name for p in run.iterdir()}
    assert names == {
        "config.json",
        "train_config.json",
        "tokenizer.json",
        "model.safetensors",
        "train_state.pt",
        "metrics.jsonl",
        "loss.png",
    }
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "tokenizer.json").read_text()) == json.loads(
        (data / "tokenizer.json").read_text()
    )
    assert (
        TrainConfig.from_dict(json.loads((run / "train_config.json").read_text())).max_steps == 12
    )
    assert GPTConfig.from_dict(json.loads((run / "config.json").read_text())).vocab_size == 24
    lines = metrics(run)
    train_lines = [r for r in lines if "train_loss" in r]
    assert [r["step"] for r in train_lines] == [4, 8, 12]
    for r in train_lines:
        assert {"step", "train_loss", "lr", "tokens_per_sec", "elapsed"} <= set(r)
        assert r["tokens_per_sec"] > 0
        assert "mfu" not in r  # a CPU has no known peak
    assert [r["step"] for r in lines if "val_loss" in r] == [5, 10, 12]
    assert load_train_state(run)["step"] == 12
    assert train_losses(run)[-1][1] < math.log(24)  # learned something


def test_the_log_reports_mfu_against_a_known_gpus_peak(data, tmp_path, monkeypatch):
    """Guards the MFU in metrics.jsonl: the model's training FLOPs per token (gptkit.plan)
    times the logged tokens/s over all the run's GPUs' dense bf16 peak."""
    assert train_mod.peak_flops(torch.device("cpu"), 1) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert train_mod.peak_flops(torch.device("cuda"), 4) == pytest.approx(4 * 756.5e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40")
    assert train_mod.peak_flops(torch.device("cuda"), 1) is None  # unknown card: no MFU

    monkeypatch.setattr(train_mod, "peak_flops", lambda device, world: 1e9)  # on this CPU
    run = train(tiny(data, tmp_path / "run", max_steps=8, log_every=4), progress=False)
    config = GPTConfig.from_dict(json.loads((run / "config.json").read_text()))
    per_token = train_mod.plan.flops_per_token(config)
    train_lines = [r for r in metrics(run) if "train_loss" in r]
    assert len(train_lines) == 2
    for r in train_lines:
        assert r["mfu"] == pytest.approx(per_token * r["tokens_per_sec"] / 1e9)


def test_grad_accumulation_matches_a_big_batch(data, tmp_path, monkeypatch):
    """Guards the accumulation arithmetic (loss / grad_accum): 2 x B/2 == 1 x B, dropout 0,
    for the logged losses and for the gradients themselves (AdamW barely sees a gradient's
    scale, so losses alone would not show a missing division)."""
    big = train(tiny(data, tmp_path / "big", batch_size=8, grad_accum=1), progress=False)
    acc = train(tiny(data, tmp_path / "acc", batch_size=4, grad_accum=2), progress=False)
    a, b = train_losses(big), train_losses(acc)
    assert [s for s, _ in a] == [s for s, _ in b]
    np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=1e-4)
    unclipped = dict(grad_clip=0.0)  # clipping would hide a gradient's scale too
    big_grads = first_step_gradients(
        tiny(data, tmp_path / "g1", batch_size=8, **unclipped), monkeypatch
    )
    acc_grads = first_step_gradients(
        tiny(data, tmp_path / "g2", batch_size=4, grad_accum=2, **unclipped), monkeypatch
    )
    for g1, g2 in zip(big_grads, acc_grads, strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-7)


def first_step_gradients(cfg: TrainConfig, monkeypatch) -> list[torch.Tensor]:
    """The gradients the optimizer is handed at the first step of `cfg`'s run."""
    run, seen = setup(cfg), []
    monkeypatch.setattr(
        train_mod.optim,
        "step",
        lambda opt: seen.extend(p.grad.clone() for p in run.model.parameters()),
    )
    train_mod.train_step(run, 1e-3)
    return seen


def test_gradients_are_clipped_to_grad_clip(data, tmp_path, monkeypatch):
    """Guards --grad-clip: the optimizer sees a global gradient norm of at most the clip."""
    unclipped = first_step_gradients(tiny(data, tmp_path / "a", grad_clip=0), monkeypatch)
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in unclipped])) > 0.1
    clipped = first_step_gradients(tiny(data, tmp_path / "b", grad_clip=1e-3), monkeypatch)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in clipped]))
    assert norm == pytest.approx(1e-3, rel=1e-4)


def test_each_step_trains_at_the_schedules_rate(data, tmp_path):
    """Guards the step/schedule pairing: step s (1-based) trains with lr_at(s), so the first
    step of a warm-up is not wasted at rate 0."""
    cfg = tiny(data, tmp_path / "run", max_steps=8, warmup_steps=4)
    logged = [(r["step"], r["lr"]) for r in metrics(train(cfg, progress=False)) if "lr" in r]
    assert logged == [(s, lr_at(s, cfg)) for s in range(1, 9)]
    assert logged[0][1] > 0


def test_bfloat16_autocast_trains_with_fp32_parameters(data, tmp_path):
    """Guards --dtype bfloat16: autocast runs the step, parameters and checkpoint stay fp32."""
    run = train(tiny(data, tmp_path / "run", dtype="bfloat16", max_steps=4), progress=False)
    assert all(math.isfinite(v) for _, v in train_losses(run))
    state = load_train_state(run)
    assert all(t.dtype == torch.float32 for t in state["model"].values())


# --------------------------------------------------------------------------- resume


def stop_after(monkeypatch, n: int) -> None:
    """Make the run receive SIGTERM during its n-th step (as `kill` would)."""
    real, calls = train_mod.train_step, []

    def step(run, lr):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(run, lr)

    monkeypatch.setattr(train_mod, "train_step", step)


def test_resume_is_bit_identical_with_dropout(data, tmp_path, monkeypatch, capsys):
    """Guards exact resume: 40 straight steps == 20 + SIGTERM + resume + 20, loss for loss,
    with dropout on (torch RNG restored), evaluations in between (own generator), and the
    data generator restored (same batches)."""
    kw = dict(
        preset="seed-tiny",
        n_layer=2,
        dropout=0.1,
        max_steps=40,
        warmup_steps=5,
        eval_every=10,
        save_every=7,
    )
    straight = train(tiny(data, tmp_path / "straight", **kw), progress=False)
    with monkeypatch.context() as m:
        stop_after(m, 20)
        train(tiny(data, tmp_path / "split", **kw), progress=False)
    assert "--resume" in capsys.readouterr().err
    assert load_train_state(tmp_path / "split")["step"] == 20
    torch.manual_seed(12345)  # a different global RNG state: resume must restore its own
    split = train(tiny(data, tmp_path / "split", resume=True, **kw), progress=False)
    a, b = train_losses(straight), train_losses(split)
    assert [s for s, _ in b] == list(range(1, 41))  # no duplicated or missing steps
    assert a == b  # bit-identical floats
    val_a = [r["val_loss"] for r in metrics(straight) if "val_loss" in r]
    val_b = [r["val_loss"] for r in metrics(split) if "val_loss" in r]
    assert val_a == val_b
    wa, wb = load_model(straight).state_dict(), load_model(split).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # The counters go on too: tokens seen, and training time (it never restarts from 0).
    tokens = [[r["tokens"] for r in metrics(run) if "tokens" in r] for run in (straight, split)]
    assert tokens[0] == tokens[1]
    assert load_train_state(split)["tokens_seen"] == load_train_state(straight)["tokens_seen"]
    times = [r["elapsed"] for r in metrics(split) if "train_loss" in r]
    assert all(b >= a for a, b in itertools.pairwise(times))


def test_resume_cuts_metrics_back_to_the_checkpoint(data, tmp_path):
    """Guards metrics.jsonl consistency: lines after the resumed step (and a torn line from a
    kill) are dropped, so the file never holds two histories of a step."""
    run = train(tiny(data, tmp_path / "run", max_steps=6), progress=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 7, "train_loss": 9.0}) + "\n" + '{"step": 8, "tra')
    train(tiny(data, run, max_steps=9, resume=True), progress=False)
    steps = [s for s, _ in train_losses(run)]
    assert steps == list(range(1, 10))
    assert all(v != 9.0 for _, v in train_losses(run))


def test_max_time_stops_and_saves(data, tmp_path, capsys):
    """Guards --max-time: the run stops after the budget, with a checkpoint to resume."""
    run = train(tiny(data, tmp_path / "run", max_steps=10_000, max_time=0.2), progress=False)
    step = load_train_state(run)["step"]
    assert 1 <= step < 10_000
    assert "--resume" in capsys.readouterr().err


def test_resume_command_reproduces_the_options(data, tmp_path):
    """Guards the printed resume hint: fed back to the CLI parser it must give the same
    TrainConfig (with --resume), or the resumed run silently trains with other options."""
    import shlex

    from gptkit.cli import build_parser
    from gptkit.rundir import resume_command

    cfg = tiny(data, tmp_path / "my run", compile=True, max_time=30.0, dtype="bfloat16")
    command = resume_command(cfg)
    args = vars(build_parser().parse_args(shlex.split(command)[1:]))
    args = {k: v for k, v in args.items() if k not in ("_fn", "command")}
    assert TrainConfig(**args) == dataclasses.replace(cfg, resume=True)


def test_a_signal_after_the_stop_decision_waits_for_the_next_step(data, tmp_path, monkeypatch):
    """Guards the stop vote: ranks decide from one snapshot of the signal flag, taken before
    they vote. A signal that lands later in the step (here while step 3 is logged; under
    torchrun, during the vote itself) must not stop this rank alone at step 3: it would
    enter the checkpoint's collectives while the others start step 4, and gloo aborts."""
    import os

    from gptkit.metrics import MetricsLog

    real_write = MetricsLog.write

    def write(self, record):
        real_write(self, record)
        if record.get("step") == 3 and "train_loss" in record:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsLog, "write", write)
    run = train_mod.train_until_stopped(
        tiny(data, tmp_path / "run", max_steps=100, log_every=1, eval_every=0), progress=False
    )[0]
    assert load_train_state(run)["step"] == 4


def test_resume_command_under_torchrun_keeps_the_process_count(data, tmp_path, monkeypatch):
    """Guards the hint printed by a stopped torchrun run: --batch-size is per process, so
    the single-process command it used to print resumed on half the global batch."""
    import shlex

    from gptkit.cli import build_parser
    from gptkit.rundir import resume_command

    cfg = tiny(data, tmp_path / "run")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    command = resume_command(cfg, world_size=2)
    assert command.startswith("torchrun --nproc-per-node 2 -m gptkit train ")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resume_command(cfg, world_size=8).startswith(
        "torchrun --nnodes 2 --nproc-per-node 4 -m gptkit train "
    )
    args = vars(build_parser().parse_args(shlex.split(command)[5:]))
    args = {k: v for k, v in args.items() if k not in ("_fn", "command")}
    assert TrainConfig(**args) == dataclasses.replace(cfg, resume=True)


def test_resume_compares_the_global_batch(data, tmp_path):
    """Guards the resume notice across process counts: the global batch is --batch-size x
    --grad-accum x processes. The same --batch-size on fewer processes changes it (the old
    notice said nothing); a new split of the same global batch is said to keep it."""
    from gptkit.rundir import changed_options

    saved = tiny(data, tmp_path / "run", batch_size=4).to_dict()
    same = tiny(data, tmp_path / "run", batch_size=4)
    assert changed_options(saved, same, saved_world=2, world_size=2) == []
    halved = changed_options(saved, same, saved_world=2, world_size=1)
    assert halved == [
        "global batch 8 -> 4 sequences (--batch-size x --grad-accum x processes: "
        "4 x 1 x 2 -> 4 x 1 x 1)"
    ]
    resplit = tiny(data, tmp_path / "run", batch_size=2, grad_accum=2)
    assert changed_options(saved, resplit, saved_world=2, world_size=2) == [
        "--batch-size 4 -> 2",
        "--grad-accum 1 -> 2",
        "global batch unchanged (8 sequences)",
    ]
    doubled = tiny(data, tmp_path / "run", batch_size=8)
    assert changed_options(saved, doubled, saved_world=2, world_size=1) == [
        "--batch-size 4 -> 8",
        "global batch unchanged (8 sequences)",
    ]
    assert changed_options(saved, resplit) == ["--batch-size 4 -> 2", "--grad-accum 1 -> 2"]
    run = train(tiny(data, tmp_path / "run", max_steps=1), progress=False)
    assert load_train_state(run)["world_size"] == 1


def test_signal_handlers_are_restored(data, tmp_path):
    """Guards handler hygiene: train() must not leave its SIGINT/SIGTERM handlers installed."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    train(tiny(data, tmp_path / "run", max_steps=2), progress=False)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# --------------------------------------------------------------------------- NaN


def test_nan_loss_stops_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch):
    """Guards divergence handling: a NaN loss is a GptkitError naming the step, and the last
    good checkpoint is neither overwritten nor touched."""
    run = train(tiny(data, tmp_path / "run", max_steps=10), progress=False)
    before = {
        n: ((run / n).read_bytes(), (run / n).stat().st_mtime_ns)
        for n in ("model.safetensors", "train_state.pt")
    }
    real = train_mod.lm_loss
    monkeypatch.setattr(train_mod, "lm_loss", lambda logits, y: real(logits, y) * float("nan"))
    with pytest.raises(
        GptkitError, match=r"loss became nan at step 11; last good checkpoint at step 10"
    ):
        train(tiny(data, run, max_steps=20, save_every=1, resume=True), progress=False)
    after = {n: ((run / n).read_bytes(), (run / n).stat().st_mtime_ns) for n in before}
    assert after == before


def test_huge_learning_rate_diverges_cleanly(data, tmp_path):
    """Guards the real path to NaN (not a patched loss): lr 1e30 blows up into a GptkitError."""
    with pytest.raises(GptkitError, match="loss became"):
        train(
            tiny(
                data,
                tmp_path / "run",
                lr=1e30,
                min_lr=0.0,
                warmup_steps=0,
                max_steps=50,
                grad_clip=0.0,
                save_every=1,
            ),
            progress=False,
        )
    if (tmp_path / "run" / "train_state.pt").exists():  # any checkpoint kept is a finite one
        weights = load_train_state(tmp_path / "run")["model"].values()
        assert all(torch.isfinite(w).all() for w in weights)


# --------------------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(max_steps=0), "--max-steps must be >= 1"),
        (dict(batch_size=0), "--batch-size must be >= 1"),
        (dict(grad_accum=0), "--grad-accum must be >= 1"),
        (dict(lr=-1.0), "--lr must be"),
        (dict(min_lr=1.0, lr=1e-3), "--min-lr <= --lr"),
        (dict(beta2=1.0), "--beta2 must be in"),
        (dict(device="tpu9"), "device"),
        (dict(preset="gpt-9"), "unknown preset"),
        (dict(n_head=3), "divisible"),
        (dict(context_length=5000), "fewer than context_length"),
        (dict(max_time=0.0), "--max-time"),
        (dict(seed=2**70), r"--seed must be in \[0, 2\*\*63\)"),
        (dict(seed=-1), "--seed must be in"),
    ],
)
def test_bad_options_are_one_line_errors(data, tmp_path, overrides, message):
    """Guards option validation: each mistake is a one-line GptkitError, not a traceback."""
    with pytest.raises(GptkitError, match=message) as e:
        train(tiny(data, tmp_path / "run", **overrides), progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_missing_or_unprepared_data(tmp_path):
    """Guards --data checks: a missing or half-prepared directory says to run prepare."""
    with pytest.raises(GptkitError, match="gptkit prepare"):
        train(tiny(tmp_path / "nowhere", tmp_path / "run"), progress=False)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train.bin").write_bytes(b"\0\0" * 100)
    with pytest.raises(GptkitError, match="gptkit prepare"):
        train(tiny(tmp_path / "half", tmp_path / "run"), progress=False)


def test_val_split_too_short_for_evaluation(tmp_path):
    """Guards evaluation on a tiny val split: a clear error suggesting --eval-every 0."""
    data = fake_data(tmp_path / "d", n_val=10)
    with pytest.raises(GptkitError, match="--eval-every 0"):
        train(tiny(data, tmp_path / "run"), progress=False)
    train(tiny(data, tmp_path / "run", eval_every=0, max_steps=2), progress=False)


def test_fresh_run_never_overwrites_a_checkpoint(data, tmp_path):
    """Guards against silent loss of a trained model: a new run into a used --out fails."""
    run = train(tiny(data, tmp_path / "run", max_steps=3), progress=False)
    before = (run / "model.safetensors").read_bytes()
    with pytest.raises(GptkitError, match="--resume.*another --out"):
        train(tiny(data, run, max_steps=3), progress=False)
    assert (run / "model.safetensors").read_bytes() == before


def test_a_kill_during_the_first_save_leaves_a_run_that_resumes(data, tmp_path, monkeypatch):
    """Guards the checkpoint's write order: the self-sufficient train_state.pt goes first,
    so a run stopped before its weights file is written still resumes (weights first left a
    directory that neither --resume nor a new run would take)."""
    run = tmp_path / "run"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill -9 would stop it, at the same point

    with monkeypatch.context() as m:
        m.setattr(train_mod.ckpt, "save_weights", killed)
        with pytest.raises(KeyboardInterrupt):
            train(tiny(data, run, max_steps=3, save_every=2), progress=False)
    assert load_train_state(run)["step"] == 2 and not (run / "model.safetensors").exists()
    train(tiny(data, run, max_steps=3, save_every=2, resume=True), progress=False)
    assert load_train_state(run)["step"] == 3 and load_model(run) is not None


def test_a_new_run_is_refused_over_a_model_directory(data, tmp_path):
    """Guards a converted or exported model directory used as --out by mistake: its weights
    are never trained over, and the message does not send the user to --resume."""
    from gptkit.checkpoint import save_model

    save_model(tmp_path / "model", GPT(GPTConfig.from_preset("seed-tiny", vocab_size=24)))
    before = (tmp_path / "model" / "model.safetensors").read_bytes()
    with pytest.raises(GptkitError, match="holds model weights but no train_state.pt") as e:
        train(tiny(data, tmp_path / "model"), progress=False)
    assert "--init-from" in str(e.value)
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == before


def test_resume_reports_only_the_options_that_changed(data, tmp_path, capsys):
    """Guards the 'changed options' line: model flags left out on --resume (the checkpoint
    keeps its model) are not changes; a training option that differs is."""
    run = train(tiny(data, tmp_path / "run", max_steps=3), progress=False)
    capsys.readouterr()
    model_flags_dropped = dict(preset=None, n_layer=None, n_head=None, d_model=None)
    resumed = tiny(
        data, run, max_steps=5, resume=True, context_length=None, lr=2e-3, **model_flags_dropped
    )
    train(resumed, progress=False)
    err = capsys.readouterr().err
    assert "changed options: --lr 0.003 -> 0.002, --max-steps 3 -> 5\n" in err
    assert not any(f"--{flag}" in err for flag in ("preset", "n-layer", "d-model", "context"))
    with pytest.raises(GptkitError, match="--preset seed-tiny differs from the run's"):
        train(dataclasses.replace(resumed, max_steps=6, preset="seed-tiny"), progress=False)


def test_resume_errors(data, tmp_path):
    """Guards --resume checks: nothing to resume; other tokenizer; data whose tokenizer.json
    is not the one its tokens were made with; other context length; already finished."""
    with pytest.raises(GptkitError, match="nothing to resume in"):
        train(tiny(data, tmp_path / "empty", resume=True), progress=False)
    run = train(tiny(data, tmp_path / "run", max_steps=3), progress=False)
    other_vocab = fake_data(tmp_path / "v30", vocab_size=30)
    with pytest.raises(GptkitError, match="tokenizer"):
        train(tiny(other_vocab, run, max_steps=6, resume=True), progress=False)
    same_tok = fake_data(tmp_path / "v30b", vocab_size=30)
    (same_tok / "tokenizer.json").write_bytes((data / "tokenizer.json").read_bytes())
    with pytest.raises(
        GptkitError, match=r"\(char, 24 tokens\) is not the tokenizer .* \(char, 30\)"
    ):
        train(tiny(same_tok, run, max_steps=6, resume=True), progress=False)
    with pytest.raises(GptkitError, match="--context-length 8 differs"):
        train(tiny(data, run, max_steps=6, context_length=8, resume=True), progress=False)
    with pytest.raises(GptkitError, match="already at step 3"):
        train(tiny(data, run, max_steps=3, resume=True), progress=False)


# --------------------------------------------------------------------------- processes


def spawn(cfg: TrainConfig) -> subprocess.Popen:
    code = (
        "import json, sys\n"
        "from gptkit.config import TrainConfig\n"
        "from gptkit.train import train\n"
        "train(TrainConfig(**json.loads(sys.argv[1])), progress=False)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(cfg.to_dict())],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # see conftest._one_thread
    )


def train_losses_so_far(run: Path) -> list[tuple[int, float]]:
    """Like train_losses, but for a file being written: skips a torn last line."""
    from gptkit.metrics import read_metrics

    return [
        (r["step"], r["train_loss"])
        for r in read_metrics(run / "metrics.jsonl")
        if "train_loss" in r
    ]


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.communicate()[1]}")
        if any(s >= step for s, _ in train_losses_so_far(run)):
            return
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s")


def test_sigterm_saves_and_says_how_to_resume(data, tmp_path):
    """Guards graceful stop: SIGTERM finishes the step, saves, prints the resume command, and
    exits 0; the saved run then resumes."""
    run = tmp_path / "run"
    proc = spawn(tiny(data, run, max_steps=100_000, eval_every=0))
    wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "SIGTERM" in err and f"--out {run}" in err and "--resume" in err
    step = load_train_state(run)["step"]
    assert step >= 3
    assert max(s for s, _ in train_losses(run)) == step
    train(tiny(data, run, max_steps=step + 2, eval_every=0, resume=True), progress=False)
    assert load_train_state(run)["step"] == step + 2


@pytest.mark.slow
def test_kill_9_at_random_moments_leaves_a_loadable_checkpoint(data, tmp_path):
    """Guards atomicity under SIGKILL: with a checkpoint every step, killing the process at
    random instants always leaves model.safetensors and train_state.pt loadable, and the
    run resumes."""
    rng = np.random.default_rng(0)
    run = tmp_path / "run"
    cfg = tiny(data, run, max_steps=100_000, save_every=1, eval_every=0)
    for attempt in range(3):
        proc = spawn(
            cfg
            if attempt == 0
            else tiny(data, run, max_steps=100_000, save_every=1, eval_every=0, resume=True)
        )
        wait_for_step(run, 2 + attempt * 3, proc)
        time.sleep(float(rng.uniform(0.0, 0.5)))
        proc.kill()
        proc.wait()
        model = load_model(run)
        state = load_train_state(run)
        assert state["step"] >= 1 and set(model.state_dict()) >= set(state["model"])
    step = load_train_state(run)["step"]
    train(
        tiny(data, run, max_steps=step + 1, save_every=1, eval_every=0, resume=True), progress=False
    )
    assert load_train_state(run)["step"] == step + 1
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]  # leftovers cleaned


def test_the_cli_exits_128_plus_the_signal_that_stopped_it(data, tmp_path):
    """Guards `gptkit train` under a job scheduler: a run stopped by SIGTERM saves, says how
    to resume and exits 143 (128 + 15), not 0, so the job is not taken for finished."""
    run = tmp_path / "run"
    cfg = tiny(data, run, max_steps=100_000, eval_every=0)
    argv = ["--data", cfg.data, "--out", str(run), "--preset", "gpt2", "--n-layer", "1"]
    argv += ["--n-head", "2", "--d-model", "32", "--context-length", "16", "--batch-size", "4"]
    argv += ["--max-steps", "100000", "--eval-every", "0", "--log-every", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptkit", "train", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    wait_for_step(run, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "--resume" in err and "run saved" not in out
    assert load_train_state(run)["step"] >= 2


@pytest.mark.slow
def test_compiled_model_trains_and_saves_plain_names(data, tmp_path):
    """Guards --compile: torch.compile's wrapper must not leak `_orig_mod.` into checkpoints."""
    run = train(tiny(data, tmp_path / "run", compile=True, max_steps=3), progress=False)
    assert all(not k.startswith("_orig_mod") for k in load_train_state(run)["model"])
    load_model(run)


@pytest.mark.slow
def test_compiled_loss_matches_the_eager_loop(data, tmp_path):
    """Guards train.batch_loss: with --compile in one process the loss is compiled with the
    model, one graph from ids to the loss; its per-step losses (and the validation loss,
    in eval mode) must be the eager loop's."""
    kw = dict(max_steps=4, log_every=1, eval_every=2)
    eager = train(tiny(data, tmp_path / "eager", **kw), progress=False)
    compiled = train(tiny(data, tmp_path / "compiled", compile=True, **kw), progress=False)
    got, want = train_losses(compiled), train_losses(eager)
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5)
    val = [[r["val_loss"] for r in metrics(run) if "val_loss" in r] for run in (compiled, eager)]
    assert len(val[0]) == 2 and val[0] == pytest.approx(val[1], rel=1e-5)
