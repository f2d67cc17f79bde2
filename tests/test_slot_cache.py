"""SlotKVCache: rows at different lengths decoded in one forward pass (continuous batching)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from gptkit.model import GPT, KVCache, SlotKVCache


def _prefill(model: GPT, ids: list[int], max_len: int) -> tuple[KVCache, torch.Tensor]:
    cache = KVCache(model.config, 1, max_len, ring_buffers=False)
    logits = model(torch.tensor([ids]), cache)[:, -1]  # (1, V)
    return cache, logits


# Where a decode step through a SlotKVCache runs: the native op (where the kernels are
# built), the eager modules' masked scaled_dot_product_attention, the written-out reference.
DECODE_PATHS = [(True, False), (False, False), (False, True)]
PATH_IDS = ["native", "sdpa", "reference"]


@pytest.mark.parametrize("family", ["seed", "gpt2", "banded"])
@pytest.mark.parametrize(("native_decode", "reference"), DECODE_PATHS, ids=PATH_IDS)
def test_batched_rows_at_different_lengths_match_each_row_alone(family, native_decode, reference):
    """Guards per-row positions, cache writes and key masks: a row decoded next to longer
    or shorter rows must get exactly the logits it gets alone (stale keys of a previous,
    longer occupant must stay masked; a banded layer's keys past its band too), on each
    decode path."""
    if family == "banded":  # GPT-3's alternating layers, a band shorter than the rows
        model = GPT(tiny_config("gpt2", attention="alternating", attn_band=4)).eval()
    else:
        model = GPT(tiny_config(family)).eval()
    model.set_reference_attention(reference)
    model.native_decode = native_decode
    C = model.config.context_length
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15, 16]]
    slots = SlotKVCache(model.config, n_slots=6, max_len=C)
    # Dirty every slot first, so leftovers from a longer earlier sequence are present.
    slots.k.normal_()
    slots.v.normal_()
    slots.lengths.fill_(C - 2)
    singles, next_tok = [], []
    with torch.inference_mode():
        for r, ids in enumerate(prompts):
            cache, logits = _prefill(model, ids, C)
            slots.load(r, cache)
            singles.append(cache)
            next_tok.append(int(logits.argmax()))
        for _ in range(6):
            idx = torch.tensor(next_tok)[:, None]  # (B, 1)
            batched = model(idx, slots)[:, -1]  # (B, V)
            for r in range(len(prompts)):
                alone = model(idx[r : r + 1], singles[r])[:, -1]
                torch.testing.assert_close(batched[r : r + 1], alone, atol=1e-5, rtol=1e-5)
            next_tok = batched.argmax(-1).tolist()
    assert slots.lengths[: len(prompts)].tolist() == [len(p) + 6 for p in prompts]


@pytest.mark.parametrize("native_decode", [True, False], ids=["native", "sdpa"])
def test_move_keeps_a_row_decoding_identically(native_decode):
    """Guards the row compaction the scheduler does when a sequence finishes: a row
    moved to another slot must continue exactly as before (the stale keys of the moved
    row's longer neighbour masked out), on the native op and on the eager modules."""
    model = GPT(tiny_config()).eval()
    model.native_decode = native_decode
    slots = SlotKVCache(model.config, n_slots=3)
    with torch.inference_mode():
        cache_a, _ = _prefill(model, [1, 2, 3, 4], 32)
        cache_b, _ = _prefill(model, [5, 6], 32)
        slots.load(0, cache_a)
        slots.load(2, cache_b)
        slots.move(2, 1)  # b now at row 1, next to a
        out = model(torch.tensor([[7], [8]]), slots)[:, -1]
        alone = model(torch.tensor([[8]]), cache_b)[:, -1]
    torch.testing.assert_close(out[1:], alone, atol=1e-5, rtol=1e-5)


def test_ring_buffered_cache_cannot_fill_a_slot():
    """Guards a silent mix-up: a ring buffer holds other positions than a slot expects."""
    model = GPT(tiny_config("gpt2", attention="alternating", attn_band=4)).eval()
    cache = KVCache(model.config, 1, 16)
    with pytest.raises(ValueError, match="ring"):
        SlotKVCache(model.config, n_slots=2).load(0, cache)


def test_slot_cache_refuses_to_overflow():
    """Guards silent writes past a slot's end: a full slot is an error, not corruption."""
    model = GPT(tiny_config(context_length=8)).eval()
    slots = SlotKVCache(model.config, n_slots=1, max_len=4)
    slots.lengths[0] = 4
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.tensor([[1]]), slots)
