"""Hugging Face GPT-2 conversion: configs and state dicts, both directions.

Pure functions over dicts and tensors; `transformers` is not imported here at all, so
conversion works without it (tests build a random `GPT2LMHeadModel` locally to check it).

Differences the mapping bridges:

- HF's GPT-2 uses `Conv1D`, whose weight is stored (in, out); `nn.Linear` stores
  (out, in). The four projection weights per layer are transposed.
- HF prefixes the body with `transformer.` (`GPT2LMHeadModel`); checkpoints saved from the
  bare `GPT2Model`, like OpenAI's released weights, have no prefix. Both are read.
- HF's attention-mask buffers (`attn.bias`, `attn.masked_bias`, present in older
  checkpoints) are not weights and are ignored.
- `lm_head.weight` is tied to `wte.weight`: both names map to one tensor.

    >>> hf_sd = hf_model.state_dict()  # a transformers GPT2LMHeadModel
    >>> config = config_from_hf(hf_model.config.to_dict())
    >>> model = GPT(config)
    >>> model.load_state_dict(state_dict_from_hf(hf_sd, config))
"""

from __future__ import annotations

from typing import Any

import torch

from gptkit.config import GPTConfig
from gptkit.errors import GptkitError

# HF activation names whose function equals one of ours exactly.
_ACTIVATIONS_FROM_HF = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}
_ACTIVATIONS_TO_HF = {"gelu": "gelu_new", "relu": "relu"}
# Conv1D layers: their HF weight is the transpose of our nn.Linear weight.
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def config_from_hf(hf_config: dict[str, Any]) -> GPTConfig:
    """A GPT-2 `config.json` (as a dict) -> GPTConfig. Refuses variants we do not implement."""
    model_type = hf_config.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise GptkitError(f"only GPT-2 checkpoints can be imported, got model_type {model_type!r}")
    act = hf_config.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS_FROM_HF:
        known = ", ".join(_ACTIVATIONS_FROM_HF)
        raise GptkitError(f"activation_function {act!r} is not supported (supported: {known})")
    # Options that change the attention maths: we always scale by 1/sqrt(D) and nothing else.
    if not hf_config.get("scale_attn_weights", True):
        raise GptkitError("GPT-2 checkpoints with scale_attn_weights=false are not supported")
    if hf_config.get("scale_attn_by_inverse_layer_idx", False):
        raise GptkitError(
            "GPT-2 checkpoints with scale_attn_by_inverse_layer_idx are not supported"
        )
    if hf_config.get("add_cross_attention", False):
        raise GptkitError("add_cross_attention=true (cross-attention) is not supported")
    if not hf_config.get("tie_word_embeddings", True):
        raise GptkitError("tie_word_embeddings=false (an untied head) is not supported")
    d_model = hf_config.get("n_embd", 768)
    n_inner = hf_config.get("n_inner")
    try:
        return GPTConfig(
            vocab_size=hf_config.get("vocab_size", 50257),
            context_length=hf_config.get("n_positions", 1024),
            n_layer=hf_config.get("n_layer", 12),
            n_head=hf_config.get("n_head", 12),
            d_model=d_model,
            # None means 4 * d_model in both worlds; keep an explicit 4 * d_model as None too.
            d_ff=None if n_inner is None or n_inner == 4 * d_model else n_inner,
            positional="learned",
            norm="pre",
            activation=_ACTIVATIONS_FROM_HF[act],
            attn_out_proj=True,
            bias=True,
            # HF has three dropout rates (embd, attn, resid); ours is one, GPT-2 sets all to 0.1.
            dropout=hf_config.get("resid_pdrop", 0.1),
            tie_embeddings=True,
            layer_norm_eps=hf_config.get("layer_norm_epsilon", 1e-5),
        )
    except (TypeError, ValueError) as e:  # e.g. n_head not dividing n_embd, a size as a string
        raise GptkitError(f"unsupported Hugging Face config: {e}") from None


def config_to_hf(config: GPTConfig, eot_id: int | None = None) -> dict[str, Any]:
    """GPTConfig -> a GPT-2 `config.json` dict (`GPT2Config(**d)` accepts it).

    `eot_id`, when given, becomes the config's bos and eos token id. Raises GptkitError
    for configs that transformers' GPT-2 cannot represent.
    """
    reasons = []
    if config.positional != "learned":
        reasons.append("it uses sinusoidal positions (GPT-2 learns a position table)")
    if config.norm != "pre":
        reasons.append("it normalises after each residual (GPT-2 is pre-LN)")
    if config.activation not in _ACTIVATIONS_TO_HF:
        reasons.append(f"its activation is {config.activation} (GPT-2 uses GELU)")
    if not config.attn_out_proj:
        reasons.append("it has no attention output projection")
    if not config.tie_embeddings:
        reasons.append("its unembedding is not tied to the embedding")
    if not config.bias:
        reasons.append("it has no biases")
    if config.embed_scale:
        reasons.append("it scales its token embeddings by sqrt(d_model)")
    if config.attention != "dense" and config.attn_band < config.context_length:
        reasons.append("its odd layers attend to a local band (GPT-2 is dense)")
    if reasons:
        raise GptkitError("cannot export to Hugging Face GPT-2: " + "; ".join(reasons))
    hf: dict[str, Any] = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_embd": config.d_model,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.d_ff,
        "activation_function": _ACTIVATIONS_TO_HF[config.activation],
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_eps,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
    }
    if eot_id is not None:
        hf["bos_token_id"] = hf["eos_token_id"] = eot_id
    return hf


def _reference_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of `GPT(config)` except the tied `lm_head.weight`.

    Read off a model built on the meta device (no memory, no maths), so the mapping can
    never drift from `model.py`'s names or layout.
    """
    from gptkit.model import GPT

    with torch.device("meta"):
        sd = GPT(config).state_dict()
    return {n: tuple(t.shape) for n, t in sd.items() if n != "lm_head.weight"}


def _is_conv1d(name: str) -> bool:
    return name.endswith(".weight") and name[: -len(".weight")].endswith(_CONV1D)


def state_dict_from_hf(
    hf_sd: dict[str, torch.Tensor], config: GPTConfig
) -> dict[str, torch.Tensor]:
    """HF GPT-2 state dict (with or without `transformer.`) -> ours, for `GPT(config)`.

    Raises GptkitError when a weight is missing, unexpected or of the wrong shape.
    """
    config_to_hf(config)  # the config must be GPT-2 shaped
    body = {}
    for name, tensor in hf_sd.items():
        if name.endswith(_IGNORED_SUFFIXES) or name == "lm_head.weight":
            continue  # mask buffers; the head is tied to wte, checked below
        body[name.removeprefix("transformer.")] = tensor
    shapes = _reference_shapes(config)
    names = list(shapes)
    missing = [n for n in names if n not in body]
    unexpected = sorted(set(body) - set(names))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise GptkitError(f"not a GPT-2 state dict matching the config: {detail}")
    out = {n: body[n].t().contiguous() if _is_conv1d(n) else body[n] for n in names}
    for n in names:
        if tuple(out[n].shape) != shapes[n]:
            raise GptkitError(f"{n} has shape {tuple(out[n].shape)}, the config needs {shapes[n]}")
    head = hf_sd.get("lm_head.weight")
    if head is not None and not torch.equal(head, out["wte.weight"]):
        raise GptkitError("lm_head.weight differs from wte.weight; untied heads are not supported")
    out["lm_head.weight"] = out["wte.weight"]  # tied: one tensor under both names
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> HF `GPT2LMHeadModel`'s (`transformer.` prefix, Conv1D layout).

    `lm_head.weight` is the same tensor as `transformer.wte.weight` (tied); drop it
    before saving with safetensors, which refuses shared tensors.
    """
    config_to_hf(config)
    names = list(_reference_shapes(config))
    missing = [n for n in names if n not in sd]
    if missing:
        raise GptkitError(f"not a GPT-2 shaped gptkit state dict: missing {missing[:3]}")
    out = {f"transformer.{n}": sd[n].t().contiguous() if _is_conv1d(n) else sd[n] for n in names}
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out
