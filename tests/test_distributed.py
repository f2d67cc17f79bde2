"""Data-parallel training on this CPU: 2 processes on gloo, launched by torchrun.

One chain of runs shares a single-process reference of 8 steps with a global batch of 8:
DDP (2 x 4) trains steps 1-4 from scratch, FSDP (2 x 4) resumes that checkpoint for steps
5-6, and a single process (1 x 8) resumes the FSDP checkpoint for steps 7-8. Every step's
loss must match the reference's. The schedule is flat after warm-up (min_lr == lr), so
raising --max-steps on resume does not change the learning rates.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from test_train import fake_data, metrics, tiny, train_losses

from gptkit.checkpoint import load_model, load_train_state
from gptkit.data import sample_batch
from gptkit.distributed import DistEnv, checkpoint_blocks, seed_rank
from gptkit.train import train

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_args(cfg) -> list[str]:
    """`gptkit train` flags that reproduce TrainConfig `cfg`."""
    args = []
    for name, value in cfg.to_dict().items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args += [flag] if value else []
        elif value is not None:
            args += [flag, str(value)]
    return args


def torchrun(
    cfg, nproc: int = 2, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    cmd += ["--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    cmd += ["-m", "gptkit", "train", *cli_args(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def val_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in metrics(run) if "val_loss" in r}


def assert_losses_match(got: list[tuple[int, float]], ref: dict[int, float], tol: float):
    assert got, "no losses logged"
    for step, loss in got:
        assert abs(loss - ref[step]) <= tol, (step, loss, ref[step])


def test_sample_batch_ranks_split_the_global_batch(tmp_path):
    """Guards data sharding: ranks read disjoint rows that together are one process's batch."""
    tokens = torch.arange(1000).numpy()
    whole = sample_batch(tokens, 6, 8, torch.Generator().manual_seed(3))[0]
    parts = [
        sample_batch(tokens, 2, 8, torch.Generator().manual_seed(3), "cpu", r, 3)[0]
        for r in range(3)
    ]
    assert torch.equal(torch.cat(parts), whole)


def test_activation_checkpointing_gives_the_same_steps(tmp_path):
    """Guards activation checkpointing: recomputing blocks in backward changes no number."""
    data = fake_data(tmp_path / "data")
    plain = train(tiny(data, tmp_path / "plain", max_steps=4, n_layer=2), progress=False)
    ac = tiny(data, tmp_path / "ac", max_steps=4, n_layer=2, activation_checkpointing=True)
    got = train_losses(train(ac, progress=False))
    assert_losses_match(got, dict(train_losses(plain)), 1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_checkpointed_blocks_match_plain_gradients(dropout):
    """Guards checkpoint_blocks itself: same output and same parameter gradients. With
    dropout in train mode the recomputation in backward must draw the forward's masks
    again (the RNG state saved and restored), or the gradients belong to other masks."""
    from conftest import tiny_config

    from gptkit.model import GPT

    model = GPT(tiny_config("gpt2", dropout=dropout)).train()
    idx = torch.randint(0, 61, (2, 16))
    torch.manual_seed(1)
    out = model(idx)
    out.square().mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    if dropout:  # the masks matter: another seed gives another output
        torch.manual_seed(2)
        assert not torch.equal(model(idx), out)
    model.zero_grad()
    checkpoint_blocks(model)
    torch.manual_seed(1)
    torch.testing.assert_close(model(idx), out, rtol=0, atol=0)
    torch.manual_seed(1)
    model(idx).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=0, atol=1e-7, msg=n)
    assert set(model.state_dict()) == set(ref) | {"lm_head.weight"}


def _draws(n: int = 8) -> list[float]:
    return torch.rand(n).tolist()


def test_seed_rank_gives_other_ranks_their_own_dropout_streams():
    """Guards distributed.seed_rank: rank 0 keeps a single process's torch RNG stream
    (untouched), every other rank gets a stream of its own (equal streams would drop the
    same units on every rank), and that stream is a function of (seed, rank, step) alone,
    so a resumed rank re-derives it whatever state it restored."""
    torch.manual_seed(7)
    single = _draws()
    torch.manual_seed(7)
    seed_rank(7, DistEnv(rank=0, world_size=3), step=5)
    assert _draws() == single

    def stream(rank: int, step: int, before: int = 7) -> list[float]:
        torch.manual_seed(before)
        seed_rank(7, DistEnv(rank=rank, world_size=3), step=step)
        return _draws()

    streams = [single, stream(1, 5), stream(2, 5)]
    assert len({tuple(s) for s in streams}) == 3
    assert stream(1, 5, before=123) == streams[1]  # whatever the state it replaced
    assert stream(1, 6) != streams[1]  # from the step: a resume does not replay old masks


def test_every_step_reseeds_the_other_ranks_from_its_step(tmp_path, monkeypatch):
    """Guards resume under torchrun with dropout: ranks > 0 must be reseeded at every step
    from (seed, rank, step). Seeded once at setup, an uninterrupted rank 1 kept drawing
    from its step-0 stream while a resumed one started from step k: different masks."""
    from gptkit import distributed

    calls = []
    monkeypatch.setattr(distributed, "seed_rank", lambda seed, env, step: calls.append(step))
    run = tmp_path / "run"
    train(tiny(fake_data(tmp_path / "data"), run, max_steps=3, eval_every=0), progress=False)
    assert calls == [0, 1, 2]
    train(tiny(tmp_path / "data", run, max_steps=5, eval_every=0, resume=True), progress=False)
    assert calls == [0, 1, 2, 3, 4]


def test_ddp_matches_one_process_and_its_checkpoint_resumes_in_one(tmp_path):
    """Guards DDP under torchrun: per-step losses equal one process with the same global
    batch (1e-5), both accumulating gradients over 2 micro-batches (DDP synchronises once,
    after the last); the tokens counted across both processes; one log; and a 2-process
    checkpoint that one process resumes exactly."""
    data = fake_data(tmp_path / "data")
    common = dict(lr=3e-3, min_lr=3e-3, warmup_steps=2, eval_every=2, device="cpu", grad_accum=2)
    ref_run = train(tiny(data, tmp_path / "ref", batch_size=4, max_steps=4, **common), False)
    ref, ref_val = dict(train_losses(ref_run)), val_losses(ref_run)
    run = tmp_path / "run"
    ddp = torchrun(tiny(data, run, batch_size=2, max_steps=2, **common))
    assert ddp.stdout.count("run saved in") == 1
    assert_losses_match(train_losses(run), ref, 1e-5)
    assert abs(val_losses(run)[2] - ref_val[2]) <= 1e-5
    tokens = {r["step"]: r["tokens"] for r in metrics(ref_run) if "tokens" in r}
    assert [(r["step"], r["tokens"]) for r in metrics(run) if "tokens" in r] == [
        (step, tokens[step]) for step in (1, 2)
    ]
    train(tiny(data, run, batch_size=4, max_steps=4, resume=True, **common), progress=False)
    assert [s for s, _ in train_losses(run)] == [1, 2, 3, 4]
    assert_losses_match(train_losses(run), ref, 1e-5)


@pytest.mark.slow
def test_ddp_fsdp_and_single_process_runs_match_and_share_checkpoints(tmp_path):
    """Guards torchrun training: DDP equal to one process with the same global batch (1e-5),
    FSDP too (1e-4), and checkpoints loading across 2-process DDP/FSDP and 1-process runs."""
    data = fake_data(tmp_path / "data")
    common = dict(n_layer=2, lr=3e-3, min_lr=3e-3, warmup_steps=2, eval_every=2, device="cpu")
    ref_run = train(tiny(data, tmp_path / "ref", batch_size=8, max_steps=8, **common), False)
    ref, ref_val = dict(train_losses(ref_run)), val_losses(ref_run)

    # 1. DDP from scratch, steps 1-4; rank 0 alone logs and writes.
    run = tmp_path / "run"
    ddp = torchrun(tiny(data, run, batch_size=4, max_steps=4, **common))
    assert ddp.stdout.count("run saved in") == 1
    assert [s for s, _ in train_losses(run)] == [1, 2, 3, 4]
    assert_losses_match(train_losses(run), ref, 1e-5)
    for step, loss in val_losses(run).items():
        assert abs(loss - ref_val[step]) <= 1e-5
    assert load_train_state(run)["step"] == 4

    # 2. FSDP resumes the DDP checkpoint, steps 5-6.
    torchrun(tiny(data, run, batch_size=4, max_steps=6, fsdp=True, resume=True, **common))
    assert [s for s, _ in train_losses(run)] == [1, 2, 3, 4, 5, 6]
    assert_losses_match(train_losses(run)[4:], ref, 1e-4)
    state = load_train_state(run)
    assert set(state["optimizer"]["state"]) == set(range(len(list(load_model(run).parameters()))))

    # 3. One process resumes the FSDP checkpoint, steps 7-8, with the same global batch.
    train(tiny(data, run, batch_size=8, max_steps=8, resume=True, **common), progress=False)
    assert_losses_match(train_losses(run)[6:], ref, 1e-4)
    final, reference = load_model(run), load_model(ref_run)
    for (name, p), q in zip(final.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-4, msg=name)


def test_fsdp_without_torchrun_is_a_one_line_error(tmp_path):
    """Guards --fsdp in a plain process: a clear error, not a hang or a traceback."""
    data = fake_data(tmp_path / "data")
    result = subprocess.run(
        [sys.executable, "-m", "gptkit", "train", *cli_args(tiny(data, tmp_path / "r"))]
        + ["--fsdp"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "gptkit: error: --fsdp shards across processes: launch with torchrun"
    ]


def test_processes_wait_for_a_stalled_one_only_dist_timeout(tmp_path, monkeypatch):
    """Guards --dist-timeout reaching the process group: without a timeout a stalled
    process held the others for gloo's default 30 minutes."""
    import torch.distributed as dist

    from gptkit import distributed
    from gptkit import train as train_module

    joined = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: joined.update(kwargs))
    assert distributed.init("cpu", 42.0)[0].enabled
    assert joined["backend"] == "gloo" and joined["timeout"] == timedelta(seconds=42)

    def init(device, timeout_s):  # what `gptkit train` passes on
        raise SystemExit(timeout_s)

    monkeypatch.setattr(distributed, "init", init)
    cfg = tiny(fake_data(tmp_path / "data"), tmp_path / "run", dist_timeout=90.0)
    with pytest.raises(SystemExit, match="90.0"):
        train_module.train(cfg, progress=False)


def test_torchrun_prints_a_users_mistake_once(tmp_path):
    """Guards the error line under torchrun: each process met the same bad option and each
    printed it, one line per process."""
    result = torchrun(tiny(fake_data(tmp_path / "data"), tmp_path / "r", lr=-1), check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("gptkit: error")]
    assert errors == ["gptkit: error: --lr must be a finite number >= 0, got -1.0"]


@pytest.mark.slow
def test_ddp_with_compile_and_activation_checkpointing(tmp_path):
    """Guards the torch.compile path under DDP with activation checkpointing."""
    data = fake_data(tmp_path / "data")
    common = dict(lr=3e-3, min_lr=3e-3, warmup_steps=2, eval_every=0, device="cpu")
    ref = dict(train_losses(train(tiny(data, tmp_path / "ref", batch_size=8, **common), False)))
    run = tmp_path / "run"
    cfg = tiny(data, run, batch_size=4, compile=True, activation_checkpointing=True, **common)
    torchrun(cfg, timeout=1200)  # inductor compiles C++ in each process
    assert_losses_match(train_losses(run), ref, 1e-4)
