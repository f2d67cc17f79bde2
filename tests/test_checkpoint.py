"""Checkpoint files: save/load round trips, tied weights, atomic writes, corrupt files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import tiny_config

from gptkit import checkpoint as ckpt
from gptkit.checkpoint import (
    capture_rng,
    load,
    load_model,
    load_train_state,
    restore_rng,
    save_model,
    save_train_state,
)
from gptkit.errors import GptkitError
from gptkit.model import GPT


def saved(tmp_path: Path, family: str = "gpt2", **overrides) -> tuple[GPT, Path]:
    model = GPT(tiny_config(family, **overrides))
    save_model(tmp_path / "m", model)
    return model, tmp_path / "m"


@pytest.mark.parametrize("family", ["seed", "gpt2"])
def test_round_trip_gives_identical_logits(tmp_path, family):
    """Guards save/load: every tensor (and the config) comes back, so logits are identical."""
    model, path = saved(tmp_path, family)
    loaded = load_model(path)
    assert loaded.config == model.config
    assert not loaded.training
    idx = torch.randint(0, model.config.vocab_size, (2, 12))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(idx), loaded(idx))


def test_tied_weights_are_stored_once_and_tied_after_load(tmp_path):
    """Guards weight tying on disk: lm_head.weight is not duplicated, and loading re-ties it
    (training the loaded model must update one shared tensor)."""
    model, path = saved(tmp_path)
    keys = safetensors.torch.load_file(path / "model.safetensors").keys()
    assert "lm_head.weight" not in keys and "wte.weight" in keys
    loaded = load_model(path)
    assert loaded.lm_head.weight is loaded.wte.weight
    assert loaded.num_parameters() == model.num_parameters()


def test_untied_head_is_stored(tmp_path):
    """Guards tie_embeddings=False: the separate head must be saved and restored."""
    model, path = saved(tmp_path, tie_embeddings=False)
    assert "lm_head.weight" in safetensors.torch.load_file(path / "model.safetensors")
    loaded = load_model(path)
    assert loaded.lm_head.weight is not loaded.wte.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_weights_are_fp32_unless_asked_and_load_casts(tmp_path):
    """Guards the storage dtype: fp32 by default whatever the model's dtype; load_model's
    dtype casts the loaded model."""
    model = GPT(tiny_config()).to(torch.bfloat16)
    save_model(tmp_path / "m", model)
    tensors = safetensors.torch.load_file(tmp_path / "m" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert load_model(tmp_path / "m", dtype=torch.bfloat16).wte.weight.dtype == torch.bfloat16


def test_compiled_wrapper_saves_plain_names(tmp_path):
    """Guards torch.compile's `_orig_mod.` prefix: it must never reach the file."""
    model = GPT(tiny_config())

    class Wrapper(torch.nn.Module):  # what torch.compile returns, without compiling
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    save_model(tmp_path / "m", Wrapper(model))
    assert all(not k.startswith("_orig_mod") for k in load_model(tmp_path / "m").state_dict())


def test_load_returns_model_and_tokenizer(tmp_path):
    """Guards gptkit.load: a run directory gives (model in eval mode, its tokenizer)."""
    from gptkit.tokenizer import build_tokenizer

    tok = build_tokenizer("char", ["hello world"])
    _, path = saved(tmp_path, vocab_size=tok.vocab_size)
    tok.save(path)
    model, tokenizer = load(path)
    assert not model.training
    assert tokenizer.decode(tokenizer.encode("hello")) == "hello"
    import gptkit
    from gptkit.hf import load as load_any

    assert gptkit.load is load_any  # which hands gptkit directories to checkpoint.load
    assert gptkit.load(path)[0].config == model.config


def test_failed_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    """Guards atomicity: a save that dies half-way (disk full, kill) must leave the previous
    checkpoint loadable and unchanged, with no temporary files left over."""
    old, path = saved(tmp_path)
    before = (path / "model.safetensors").read_bytes()

    def torn_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)  # half a file, then the failure
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", torn_write)
    with pytest.raises(GptkitError, match="No space"):
        save_model(path, GPT(tiny_config()))
    assert (path / "model.safetensors").read_bytes() == before
    assert not list(path.glob(".*.tmp"))
    idx = torch.randint(0, 61, (1, 8))
    with torch.no_grad():
        assert torch.equal(load_model(path)(idx), old.eval()(idx))


def test_kill_between_weights_and_config_renames_still_loads(tmp_path):
    """Guards the two-file gap: new weights beside an old config.json (a kill between the
    renames) load with the config saved inside the weights file."""
    _, path = saved(tmp_path, "seed")
    old_config = (path / "config.json").read_bytes()
    new = GPT(tiny_config("gpt2"))
    save_model(path, new)
    (path / "config.json").write_bytes(old_config)  # as if killed before the second rename
    idx = torch.randint(0, 61, (1, 8))
    with torch.no_grad():
        assert torch.equal(load_model(path)(idx), new.eval()(idx))


def test_failed_train_state_write_keeps_the_old_state(tmp_path, monkeypatch):
    """Guards atomicity of train_state.pt: a torch.save that raises mid-way changes nothing."""
    save_train_state(tmp_path, full_state(step=3, model={"w": torch.ones(2)}))

    def torn_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 torn")
        raise RuntimeError("killed")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(RuntimeError, match="killed"):
        save_train_state(tmp_path, full_state(step=4, model={}))
    monkeypatch.undo()
    assert load_train_state(tmp_path)["step"] == 3
    assert not list(tmp_path.glob(".*.tmp"))


def test_train_state_round_trip_with_weights_only(tmp_path):
    """Guards resume data: RNG states and tensors survive torch.load(weights_only=True)."""
    import random

    import numpy as np

    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    state = full_state(step=7, model={"w": torch.arange(3.0)}, rng=capture_rng(), best=None)
    save_train_state(tmp_path, state)
    expected = (torch.rand(3).tolist(), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    loaded = load_train_state(tmp_path)
    restore_rng(loaded["rng"])
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == expected
    assert loaded["step"] == 7 and loaded["best"] is None


def full_state(**values) -> dict:
    """A training state holding every key resuming reads (placeholders unless given)."""
    return {k: 0 for k in ckpt.TRAIN_STATE_KEYS} | {"version": ckpt.TRAIN_STATE_VERSION} | values


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_config=None), "is not a gptkit training state"),  # a key missing
        (dict(version=99), "has version 99; this gptkit reads 1"),
    ],
)
def test_foreign_train_states_are_refused(tmp_path, change, message):
    """Guards --resume on a state another program or version wrote: one line, not a
    KeyError in the middle of setting the run up."""
    state = full_state() | change
    torch.save({k: v for k, v in state.items() if v is not None}, tmp_path / "train_state.pt")
    with pytest.raises(GptkitError, match=message):
        load_train_state(tmp_path)


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path):
    """Guards model directories whose tokenizer.json was replaced (another `prepare` or
    `convert` into them): ids past the model's vocabulary would fail mid-generation."""
    from gptkit.tokenizer import build_tokenizer

    _, path = saved(tmp_path, vocab_size=5)
    build_tokenizer("char", ["hello world"]).save(path)  # 9 tokens
    with pytest.raises(GptkitError, match="has 9 tokens but the model only 5"):
        load(path)


def test_train_state_refuses_pickled_objects(tmp_path):
    """Guards weights_only loading: a file with arbitrary Python objects is refused cleanly."""
    torch.save({"step": 1, "model": {}, "evil": Path("x")}, tmp_path / "train_state.pt")
    with pytest.raises(GptkitError, match="cannot read training state"):
        load_train_state(tmp_path)


def test_missing_train_state_says_nothing_to_resume(tmp_path):
    """Guards the --resume message for a directory without a checkpoint."""
    with pytest.raises(GptkitError, match="nothing to resume in"):
        load_train_state(tmp_path)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bad_json(path: Path) -> None:
    path.write_text("{not json")


def _drop_tensor(path: Path) -> None:
    t = safetensors.torch.load_file(path)
    t.pop("h.0.ln_1.weight")
    safetensors.torch.save_file(t, path)


def _extra_tensor(path: Path) -> None:
    t = safetensors.torch.load_file(path)
    t["h.9.mystery"] = torch.zeros(2)
    safetensors.torch.save_file(t, path)


def _reshape_tensor(path: Path) -> None:
    t = safetensors.torch.load_file(path)
    t["wte.weight"] = torch.zeros(3, 3)
    safetensors.torch.save_file(t, path)


def _bad_config_value(path: Path) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), "n_head": 5}))


@pytest.mark.parametrize(
    "file, damage, message",
    [
        ("model.safetensors", _truncate, "corrupt or truncated"),
        ("model.safetensors", Path.unlink, "weights not found"),
        ("config.json", _bad_json, "cannot read model config"),
        ("config.json", Path.unlink, "model config not found"),
        ("config.json", _bad_config_value, "invalid model config"),
        ("model.safetensors", _drop_tensor, "missing h.0.ln_1.weight"),
        ("model.safetensors", _extra_tensor, "unexpected h.9.mystery"),
        ("model.safetensors", _reshape_tensor, r"mis-shaped wte.weight \(3, 3\)"),
    ],
)
def test_damaged_model_dirs_are_one_line_errors(tmp_path, file, damage, message):
    """Guards load errors: each broken file is a GptkitError naming it, never a traceback."""
    _, path = saved(tmp_path)
    damage(path / file)
    with pytest.raises(GptkitError, match=message) as e:
        load_model(path)
    assert str(path / file) in str(e.value) and "\n" not in str(e.value)


def test_missing_model_directory(tmp_path):
    """Guards a mistyped path: a clear GptkitError, not FileNotFoundError."""
    with pytest.raises(GptkitError, match="model directory not found"):
        load_model(tmp_path / "nope")


def test_weights_for_save_are_independent_copies(tmp_path):
    """Guards the saved state against later training: tensors are copies, not views."""
    model = GPT(tiny_config())
    weights = ckpt.weights_for_save(model)
    with torch.no_grad():
        model.wte.weight.add_(1.0)
    assert not torch.equal(weights["wte.weight"], model.wte.weight)
