"""GPT-3's alternating dense / locally banded attention, its KV cache, and the GPT-3 sizes."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from test_config import GPT3_TABLE, closed_form

from gptkit.config import GPTConfig
from gptkit.convert import config_to_hf
from gptkit.errors import GptkitError
from gptkit.generate import generate
from gptkit.model import GPT, KVCache, banded_causal_mask, reference_attention

BAND = 5


def alternating(family: str = "gpt2", **overrides) -> GPTConfig:
    """A tiny model of 4 layers, the odd ones banded with a window of BAND tokens."""
    base = dict(n_layer=4, attention="alternating", attn_band=BAND)
    return tiny_config(family, **{**base, **overrides})


@pytest.mark.parametrize(
    ("T", "S", "band"), [(1, 1, 1), (7, 7, 3), (4, 10, 3), (1, 9, 4), (6, 6, 9)]
)
def test_banded_mask_is_its_definition(T: int, S: int, band: int) -> None:
    """Guards an off-by-one at either edge of the band, or a misaligned offset with a cache."""
    mask = banded_causal_mask(T, S, band)
    for t in range(T):
        p = S - T + t  # the query's position among the keys
        for s in range(S):
            assert bool(mask[t, s]) == (p - band < s <= p), (t, s)


def test_banded_reference_attention_is_the_formula() -> None:
    """Guards the banded reference path: one head, written with loops over the window."""
    q, k, v = torch.randn(3, 1, 1, 9, 4).double().unbind(0)
    out = reference_attention(q, k, v, band=3)
    for t in range(9):
        keys = range(max(0, t - 2), t + 1)
        scores = torch.stack([q[0, 0, t] @ k[0, 0, s] / 2.0 for s in keys])
        expected = sum(w * v[0, 0, s] for w, s in zip(scores.softmax(0), keys, strict=True))
        torch.testing.assert_close(out[0, 0, t], expected)


def test_config_places_bands_on_odd_layers_and_validates() -> None:
    """Guards the pattern (dense first, then alternating) and nonsense bands being accepted."""
    cfg = alternating()
    assert [cfg.attn_band_of(i) for i in range(4)] == [None, BAND, None, BAND]
    assert [b.attn.band for b in GPT(cfg).h] == [None, BAND, None, BAND]
    assert all(tiny_config("gpt2").attn_band_of(i) is None for i in range(2))
    with pytest.raises(ValueError, match="attn_band"):
        alternating(attn_band=0)
    with pytest.raises(ValueError, match="attention"):
        tiny_config("gpt2", attention="sparse")


def test_gpt3_presets_alternate_and_gpt2_seed_stay_dense() -> None:
    """Guards the presets: GPT-3 uses the alternating pattern (§2.1), GPT-2 and the spec don't."""
    for name in GPT3_TABLE:
        cfg = GPTConfig.from_preset(name)
        assert (cfg.attention, cfg.attn_band) == ("alternating", 256)
    for name in ("gpt2", "gpt2-xl", "seed", "seed-tiny"):
        assert GPTConfig.from_preset(name).attention == "dense"


@pytest.mark.parametrize("family", ["seed", "gpt2"])
def test_banded_fast_path_equals_reference_forward_and_grads(family: str) -> None:
    """Guards the SDPA path masking the band differently from the explicit reference path."""
    model = GPT(alternating(family))
    idx = torch.randint(0, 61, (2, 32))
    fast = model(idx)
    fast_grads = torch.autograd.grad(fast.square().mean(), list(model.parameters()))
    model.set_reference_attention(True)
    ref = model(idx)
    ref_grads = torch.autograd.grad(ref.square().mean(), list(model.parameters()))
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    for g_fast, g_ref in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-5, rtol=1e-4)


def test_banded_layers_change_the_output() -> None:
    """Guards the band being silently ignored (alternating == dense) beyond the window."""
    dense = GPT(tiny_config("gpt2", n_layer=4)).eval()
    banded = GPT(alternating()).eval()
    banded.load_state_dict(dense.state_dict())
    idx = torch.randint(0, 61, (1, 20))
    a, b = dense(idx), banded(idx)
    torch.testing.assert_close(a[:, :BAND], b[:, :BAND])  # inside the band: identical
    assert not torch.allclose(a[:, BAND:], b[:, BAND:])


def test_banded_causality_and_locality() -> None:
    """Guards future leaks with bands, and a single banded layer seeing past its window."""
    model = GPT(alternating(n_layer=2)).eval()  # one dense layer, one banded
    idx = torch.randint(0, 61, (1, 24))
    base = model(idx)
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 61
    out = model(changed)
    assert torch.equal(out[:, :12], base[:, :12])
    assert not torch.allclose(out[:, 12:], base[:, 12:])
    # With two banded layers in a row, position 20 cannot see token 2 (20 - 2 >= 2 bands - 1).
    only_banded = GPT(alternating(n_layer=2, attn_band=BAND)).eval()
    only_banded.h[0].attn.band = BAND  # make the first layer banded too
    base = only_banded(idx)
    changed = idx.clone()
    changed[:, 2] = (changed[:, 2] + 1) % 61
    torch.testing.assert_close(only_banded(changed)[:, 20:], base[:, 20:])


@pytest.mark.parametrize("family", ["seed", "gpt2"])
def test_banded_kv_cache_equals_recompute_past_the_band(family: str) -> None:
    """Guards ring-buffer slots at wrong positions: prefill, chunks and single tokens, well
    past the band (32 positions, band 5), give the full forward's logits."""
    model = GPT(alternating(family)).eval()
    idx = torch.randint(0, 61, (2, 32))
    full = model(idx)
    cache = KVCache(model.config, batch_size=2)
    parts = [model(idx[:, :9], cache), model(idx[:, 9:12], cache), model(idx[:, 12:20], cache)]
    parts += [model(idx[:, t : t + 1], cache) for t in range(20, 32)]
    assert cache.pos == 32
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_banded_cache_reference_path_equals_recompute() -> None:
    """Guards the reference attention's offset when the ring returns fewer keys than pos."""
    model = GPT(alternating()).eval()
    model.set_reference_attention(True)
    idx = torch.randint(0, 61, (1, 20))
    full = model(idx)
    cache = KVCache(model.config, batch_size=1)
    parts = [model(idx[:, :3], cache)] + [model(idx[:, t : t + 1], cache) for t in range(3, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cached_generation_equals_recompute_for_alternating_models() -> None:
    """Guards generate's cached path diverging from full recompute once past the band."""
    model = GPT(alternating())
    prompt = torch.randint(0, 61, (2, 4))
    cached = generate(model, prompt, 24, temperature=0.0)
    plain = generate(model, prompt, 24, temperature=0.0, use_cache=False)
    assert torch.equal(cached, plain)
    assert cached.shape[1] == 28 > 4 * BAND


def test_banded_layers_cache_holds_only_the_band() -> None:
    """Guards banded layers keeping the whole context (the memory the pattern saves)."""
    cfg = alternating(context_length=32)
    cache = KVCache(cfg, batch_size=2)
    held = [cache.positions_held(i) for i in range(cfg.n_layer)]
    assert held == [32, BAND, 32, BAND]
    elements = cache.k.numel() + cache.v.numel() + cache.ring_k.numel() + cache.ring_v.numel()
    per_position = 2 * 2 * cfg.n_head * cfg.head_dim  # keys and values, batch 2
    assert elements == per_position * (32 + BAND + 32 + BAND)
    # A band at least as long as the cache needs no ring: dense storage, same semantics.
    assert KVCache(cfg, batch_size=1, max_len=BAND).ring_k.numel() == 0


@pytest.mark.parametrize("name", list(GPT3_TABLE))
def test_gpt3_presets_build_on_meta_with_their_counts(name: str) -> None:
    """Guards the GPT-3 shapes: the built model (meta device, no weights allocated) has the
    closed-form count, within 2% of Table 2.1's rounded name (DESIGN.md: never bend shapes)."""
    cfg = GPTConfig.from_preset(name)
    with torch.device("meta"):
        model = GPT(cfg)
    count = model.num_parameters()
    assert count == cfg.num_parameters() == closed_form(cfg)
    assert abs(count - GPT3_TABLE[name]) / GPT3_TABLE[name] < 0.02


def test_banded_models_are_not_exported_as_dense_gpt2() -> None:
    """Guards an alternating model exported to Hugging Face GPT-2, which would run it dense."""
    with pytest.raises(GptkitError, match="local band"):
        config_to_hf(alternating())
    config_to_hf(alternating(attn_band=32))  # a band as long as the context is dense
