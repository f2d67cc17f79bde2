"""Hugging Face GPT-2 conversion against a randomly initialised local `GPT2LMHeadModel`."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_config

from gptkit.config import GPTConfig
from gptkit.convert import config_from_hf, config_to_hf, state_dict_from_hf, state_dict_to_hf
from gptkit.errors import GptkitError
from gptkit.generate import generate
from gptkit.model import GPT

transformers = pytest.importorskip("transformers")


HF_SHAPES = [
    dict(n_layer=2, n_head=2, n_embd=64, n_positions=32, vocab_size=101),
    dict(n_layer=2, n_head=4, n_embd=96, n_positions=48, vocab_size=257, n_inner=160),
    # not GPT-2's 1e-5: every layer norm must take the config's epsilon
    dict(n_layer=2, n_head=2, n_embd=64, n_positions=32, vocab_size=101, layer_norm_epsilon=1e-1),
]


def _hf_model(shape: dict):
    """A random HF GPT-2, no network: eager attention, no dropout, eval mode."""
    hf_config = transformers.GPT2Config(
        **shape,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # non-trivial layer norms and biases, which HF initialises to 1 / 0
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if name.endswith("ln_1.weight") else 0.0, 0.1)
    return model


def _ours_from(hf_model) -> GPT:
    config = config_from_hf(hf_model.config.to_dict())
    model = GPT(config).eval()
    model.load_state_dict(state_dict_from_hf(hf_model.state_dict(), config))
    return model


@pytest.mark.parametrize("shape", HF_SHAPES)
def test_logits_match_hugging_face(shape: dict) -> None:
    """Guards a wrong mapping (untransposed Conv1D, swapped q/k/v, missing bias) on import."""
    hf = _hf_model(shape)
    ours = _ours_from(hf)
    idx = torch.randint(0, shape["vocab_size"], (3, shape["n_positions"]))
    with torch.no_grad():
        expected = hf(idx).logits
    torch.testing.assert_close(ours(idx), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", HF_SHAPES)
def test_state_dict_round_trip_is_bit_identical(shape: dict) -> None:
    """Guards export losing or altering weights: to_hf(from_hf(sd)) == sd, bit for bit."""
    hf = _hf_model(shape)
    hf_sd = hf.state_dict()
    config = config_from_hf(hf.config.to_dict())
    back = state_dict_to_hf(state_dict_from_hf(hf_sd, config), config)
    assert set(back) == set(hf_sd)
    for name, tensor in hf_sd.items():
        assert back[name].dtype == tensor.dtype
        assert torch.equal(back[name], tensor), name
    # ...and HF accepts the export as it is.
    fresh = transformers.GPT2LMHeadModel(hf.config)
    fresh.load_state_dict(back)


@pytest.mark.parametrize("shape", HF_SHAPES)
def test_greedy_generation_matches_hugging_face(shape: dict) -> None:
    """Guards imported models decoding differently from HF (positions, cache, tie-breaks)."""
    hf = _hf_model(shape)
    with torch.no_grad():  # unit-scale weights: varied output, not one repeated token
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0)
    ours = _ours_from(hf)
    idx = torch.randint(0, shape["vocab_size"], (2, 5))
    n = shape["n_positions"] - 5  # up to the full context, where HF stops
    expected = hf.generate(
        idx,
        attention_mask=torch.ones_like(idx),
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert torch.equal(generate(ours, idx, n, temperature=0), expected)
    assert len(set(expected[0, 5:].tolist())) >= 5  # not a single repeated token


def test_unprefixed_state_dict_loads() -> None:
    """Guards OpenAI-style checkpoints (GPT2Model: no `transformer.` prefix, no lm_head)."""
    hf = _hf_model(HF_SHAPES[0])
    bare = hf.transformer.state_dict()
    config = config_from_hf(hf.config.to_dict())
    ours = state_dict_from_hf(bare, config)
    assert torch.equal(ours["h.1.attn.c_attn.weight"], bare["h.1.attn.c_attn.weight"].t())
    assert ours["lm_head.weight"] is ours["wte.weight"]
    with_buffers = {**bare, "h.0.attn.bias": torch.ones(1, 1, 32, 32), "h.0.attn.masked_bias": 0}
    assert state_dict_from_hf(with_buffers, config).keys() == ours.keys()


def test_bad_state_dicts_raise_gptkit_error() -> None:
    """Guards importing a checkpoint that does not fit the config without a clear error."""
    hf = _hf_model(HF_SHAPES[0])
    sd = hf.state_dict()
    config = config_from_hf(hf.config.to_dict())
    missing = {k: v for k, v in sd.items() if "h.1.mlp.c_fc.bias" not in k}
    with pytest.raises(GptkitError, match="missing"):
        state_dict_from_hf(missing, config)
    with pytest.raises(GptkitError, match="unexpected"):
        state_dict_from_hf({**sd, "transformer.h.2.ln_1.weight": torch.ones(64)}, config)
    with pytest.raises(GptkitError, match="shape"):
        state_dict_from_hf(sd, dataclasses.replace(config, vocab_size=100))
    untied = {**sd, "lm_head.weight": torch.zeros_like(sd["lm_head.weight"])}
    with pytest.raises(GptkitError, match="untied"):
        state_dict_from_hf(untied, config)


def test_config_from_hf_maps_every_field() -> None:
    """Guards a GPT-2 config field landing in the wrong GPTConfig field (or being dropped)."""
    hf = transformers.GPT2Config(
        vocab_size=101, n_positions=48, n_embd=96, n_layer=3, n_head=4, n_inner=200,
        layer_norm_epsilon=1e-6, resid_pdrop=0.05,
    )  # fmt: skip
    assert config_from_hf(hf.to_dict()) == GPTConfig(
        vocab_size=101, context_length=48, d_model=96, n_layer=3, n_head=4, d_ff=200,
        layer_norm_eps=1e-6, dropout=0.05, positional="learned", norm="pre",
        activation="gelu", attn_out_proj=True, tie_embeddings=True, bias=True,
    )  # fmt: skip
    assert config_from_hf(transformers.GPT2Config().to_dict()) == GPTConfig.from_preset(
        "gpt2", dropout=0.1
    )


def test_config_round_trip() -> None:
    """Guards export writing a config that imports as a different model."""
    for config in (GPTConfig.from_preset("gpt2"), tiny_config("gpt2", d_ff=40, dropout=0.2)):
        hf_dict = config_to_hf(config, eot_id=7)
        assert hf_dict["eos_token_id"] == 7
        assert config_from_hf(hf_dict) == config
        transformers.GPT2Config(**hf_dict)  # transformers accepts it


@pytest.mark.parametrize(
    "override, reason",
    [
        (dict(positional="sinusoidal"), "sinusoidal"),
        (dict(norm="post"), "pre-LN"),
        (dict(activation="leaky_relu"), "activation"),
        (dict(attn_out_proj=False), "output projection"),
        (dict(tie_embeddings=False), "tied"),
        (dict(bias=False), "biases"),
        (dict(embed_scale=True), "sqrt"),
    ],
)
def test_config_to_hf_refuses_what_gpt2_cannot_represent(override: dict, reason: str) -> None:
    """Guards exporting a model HF would load as something else (silently wrong outputs)."""
    config = tiny_config("gpt2", **override)
    with pytest.raises(GptkitError, match=reason):
        config_to_hf(config)
    with pytest.raises(GptkitError):
        state_dict_to_hf(GPT(config).state_dict(), config)


def test_seed_preset_lists_every_reason() -> None:
    """Guards a refusal that names only the first of several problems."""
    with pytest.raises(GptkitError) as info:
        config_to_hf(tiny_config("seed"))
    assert all(word in str(info.value) for word in ("sinusoidal", "pre-LN", "projection"))


@pytest.mark.parametrize(
    "field, value",
    [
        ("activation_function", "gelu"),  # erf GELU: ours is the tanh approximation
        ("scale_attn_by_inverse_layer_idx", True),
        ("scale_attn_weights", False),
        ("add_cross_attention", True),
        ("tie_word_embeddings", False),
        ("model_type", "llama"),
    ],
)
def test_config_from_hf_refuses_unsupported_variants(field: str, value) -> None:
    """Guards importing a GPT-2 variant whose maths we do not implement (wrong logits)."""
    hf_dict = transformers.GPT2Config().to_dict() | {field: value}
    with pytest.raises(GptkitError, match=field):
        config_from_hf(hf_dict)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("n_head", 5, "d_model .* divisible by n_head"),  # 768 / 5
        ("n_embd", "768", "unsupported Hugging Face config"),
        ("resid_pdrop", 1.0, "dropout"),
        ("n_inner", 0, "d_ff"),
    ],
)
def test_config_from_hf_refuses_values_gptkit_cannot_build(field: str, value, message) -> None:
    """Guards `convert`, `sample`, `eval` and `train --init-from` on a damaged or odd HF
    config.json: one GptkitError naming the problem, not a ValueError traceback."""
    hf_dict = transformers.GPT2Config().to_dict() | {field: value}
    with pytest.raises(GptkitError, match=message):
        config_from_hf(hf_dict)
