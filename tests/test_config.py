"""GPTConfig, presets and parameter counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gptkit.config import PRESETS, GPTConfig, TrainConfig
from gptkit.model import GPT

# Brown et al. 2020, Table 2.1: the rounded names of the GPT-3 sizes.
GPT3_TABLE = {
    "gpt3-small": 125e6,
    "gpt3-medium": 350e6,
    "gpt3-large": 760e6,
    "gpt3-xl": 1.3e9,
    "gpt3-2.7b": 2.7e9,
    "gpt3-6.7b": 6.7e9,
    "gpt3-13b": 13.0e9,
    "gpt3-175b": 175.0e9,
}


def closed_form(cfg: GPTConfig) -> int:
    """Parameters written out independently of GPTConfig.num_parameters (biases on)."""
    d, v, L = cfg.d_model, cfg.vocab_size, cfg.n_layer
    if cfg.attn_out_proj:  # GPT-2/3: qkv, out proj, 2 FFN matrices, 2 LNs
        per_layer = 12 * d * d + 13 * d
    else:  # the spec: no output projection (d^2 + d fewer)
        per_layer = 11 * d * d + 12 * d
    total = v * d + L * per_layer
    if cfg.positional == "learned":
        total += cfg.context_length * d
    if cfg.norm == "pre":
        total += 2 * d  # final layer norm
    return total


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_matches_closed_form(name: str) -> None:
    """Guards a layer, bias or tied matrix counted wrongly (or twice) in any preset."""
    cfg = GPTConfig.from_preset(name)
    assert cfg.num_parameters() == closed_form(cfg)


@pytest.mark.parametrize("name", ["seed-tiny", "seed-small", "gpt2", "gpt2-medium", "gpt3-small"])
def test_model_parameters_equal_config_count(name: str) -> None:
    """Guards the model building different layers than the config describes (meta device)."""
    cfg = GPTConfig.from_preset(name)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_parameters() == cfg.num_parameters()


def test_gpt2_size_is_the_released_one() -> None:
    """Guards the gpt2 preset drifting from OpenAI's 124M model (HF counts 124,439,808)."""
    assert GPTConfig.from_preset("gpt2").num_parameters() == 124_439_808


@pytest.mark.parametrize("name", list(GPT3_TABLE))
def test_gpt3_sizes_within_two_percent_of_the_paper(name: str) -> None:
    """Guards a wrong shape in the GPT-3 table (DESIGN.md: faithful counts land within ~2%)."""
    count = GPTConfig.from_preset(name).num_parameters()
    assert abs(count - GPT3_TABLE[name]) / GPT3_TABLE[name] < 0.02


def test_gpt3_175b_exact_count() -> None:
    """Guards the 175B shape: 96 layers of width 12288 give 174,604M parameters (DESIGN.md)."""
    assert round(GPTConfig.from_preset("gpt3-175b").num_parameters() / 1e6) == 174_604


def test_seed_preset_is_the_spec() -> None:
    """Guards the `seed` family losing one of the spec's choices."""
    cfg = GPTConfig.from_preset("seed")
    assert (cfg.positional, cfg.norm, cfg.activation) == ("sinusoidal", "post", "leaky_relu")
    assert cfg.tie_embeddings and not cfg.attn_out_proj and cfg.embed_scale
    assert not GPTConfig.from_preset("gpt2").embed_scale
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.head_dim) == (96, 12288, 96, 128)
    assert cfg.ffn_dim == 4 * 12288 and cfg.context_length == 2048


def test_unknown_preset_lists_known_ones() -> None:
    """Guards a fuzzy or silent fallback for a misspelt preset name."""
    with pytest.raises(ValueError, match="gpt3-175b") as info:
        GPTConfig.from_preset("gpt3-175B")
    assert "seed-tiny" in str(info.value)


def test_overrides_and_derived_values() -> None:
    """Guards derived values (head_dim, ffn_dim) going stale after an override."""
    cfg = GPTConfig.from_preset("gpt2", d_model=256, n_head=8)
    assert cfg.head_dim == 32 and cfg.ffn_dim == 1024
    assert GPTConfig.from_preset("gpt2", d_ff=100).ffn_dim == 100


def test_config_is_frozen_and_round_trips() -> None:
    """Guards mutation after construction and JSON round-trip losses."""
    cfg = GPTConfig.from_preset("seed-tiny", vocab_size=65)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_layer = 3  # type: ignore[misc]
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown GPTConfig fields"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_layers": 3})


@pytest.mark.parametrize(
    ("bad", "field"),  # the message starts with the offending field's name
    [
        (dict(d_model=100, n_head=3), "d_model .* divisible by n_head"),
        (dict(n_layer=0), "n_layer"),
        (dict(activation="swish"), "activation"),
        (dict(norm="sandwich"), "norm"),
        (dict(positional="rope"), "positional"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_invalid_configs_are_refused(bad: dict, field: str) -> None:
    """Guards impossible shapes or unknown options being accepted and failing later, and
    an error that blames another field than the offending one."""
    with pytest.raises(ValueError, match=f"^{field}"):
        GPTConfig.from_preset("gpt2", **bad)


def test_train_config_round_trip_and_overrides() -> None:
    """Guards TrainConfig JSON round trips and which model fields a run overrides."""
    tc = TrainConfig(data="d", n_layer=3, dropout=0.0)
    assert TrainConfig.from_dict(tc.to_dict()) == tc
    assert tc.model_overrides() == {"n_layer": 3, "dropout": 0.0}
