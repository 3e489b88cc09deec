"""Packed attention equals the masked SDPA reference: same loss, same gradients."""

import torch

from deltatune import attention
from deltatune.deltas import add_delta, named_delta_parameters
from deltatune.models import tiny_llama
from deltatune.train.loop import CausalLMLoss


def _batch():
    gen = torch.Generator().manual_seed(0)
    lengths = [[5, 30, 2, 11, 16], [40, 3, 21]]  # rows of 64: samples of very different lengths + padding
    ids, pos = torch.randint(0, 49152, (2, 64), generator=gen), torch.zeros(2, 64, dtype=torch.long)
    for row, lens in enumerate(lengths):
        start = 0
        for n in lens:
            pos[row, start : start + n] = torch.arange(n)
            start += n
        pos[row, start:] = torch.arange(64 - start)  # the padding is its own "sample"
    labels = ids.clone()
    labels[pos == 0] = -100
    return ids, pos, labels


def _loss_and_grads(packed: bool, monkeypatch=None):
    model = add_delta(tiny_llama(seed=0, num_attention_heads=4, num_key_value_heads=2), "lora", lora_r=4)
    with torch.no_grad():
        for p in named_delta_parameters(model).values():
            p.normal_(0, 0.1)
    if packed:
        assert attention.use_packed_attention(model)

        def no_fallback(*args, **kwargs):
            raise AssertionError("the packed path must not fall back to masked SDPA")

        monkeypatch.setattr(attention, "sdpa_attention_forward", no_fallback)
    loss = CausalLMLoss(model, chunk_tokens=32)(*_batch())
    loss.backward()
    return loss, {n: p.grad for n, p in named_delta_parameters(model).items()}


def test_packed_attention_matches_masked_sdpa(monkeypatch):
    ref_loss, ref_grads = _loss_and_grads(packed=False)
    loss, grads = _loss_and_grads(packed=True, monkeypatch=monkeypatch)
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4)


def test_layout_buckets_cover_every_token_once():
    _, pos, _ = _batch()
    layout = attention.packed_layout(pos)
    covered = torch.cat([index[valid] for index, valid in layout.buckets])
    assert sorted(covered.tolist()) == list(range(pos.numel()))
    for _index, valid in layout.buckets:  # lengths inside a bucket are within 2x of its longest
        lens = valid.sum(1)
        assert int(lens.min()) * 2 >= int(lens.max())


def test_generation_path_is_plain_sdpa():
    model = tiny_llama(seed=0).eval()
    ids = torch.randint(0, 49152, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    ref = model(ids, attention_mask=mask).logits
    attention.use_packed_attention(model)
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, ref, atol=1e-5, rtol=0)
