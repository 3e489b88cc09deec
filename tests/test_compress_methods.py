"""The compression math on small tensors, against hand-computed results and the papers' numbers."""

import math
import statistics

import numpy as np
import pytest
import torch

from deltatune.compress.base import fields_bytes
from deltatune.compress.bitdelta import BitDeltaParams, decode_bitdelta, encode_bitdelta
from deltatune.compress.compeft import CompeftParams, decode_compeft, encode_compeft
from deltatune.compress.delta_come import DeltaComeParams, allocate_bits, decode_delta_come, encode_delta_come
from deltatune.compress.methods import get_codec, validate_params
from deltatune.compress.packing import pack_bits, pack_uint, packed_size, unpack_bits, unpack_uint

SMALL = [[0.5, -2.0, 0.1], [1.0, -0.3, 0.05]]


def rel_err(a, b):
    return float((a - b).norm() / a.norm())


# --- packing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1001])
def test_bit_packing_round_trip_is_exact(n):
    bits = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 8)
    assert torch.equal(unpack_bits(packed, n), bits)


def test_bit_packing_layout_by_hand():
    # little bit order: element i is bit i of its byte
    assert pack_bits(torch.tensor([True, False, True, False])).tolist() == [0b0101]
    assert pack_uint(torch.tensor([3, 1]), 2).tolist() == [0b0111]  # 3 -> bits 1,1; 1 -> bits 1,0


@pytest.mark.parametrize("bits", range(1, 9))
def test_uint_packing_round_trip_is_exact(bits):
    codes = torch.randint(0, 2**bits, (1013,), generator=torch.Generator().manual_seed(bits))
    packed = pack_uint(codes, bits)
    assert packed.numel() == packed_size(1013, bits) == math.ceil(1013 * bits / 8)
    assert torch.equal(unpack_uint(packed, 1013, bits), codes.to(torch.int32))


def test_uint_packing_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="out of range"):
        pack_uint(torch.tensor([4]), 2)


# --- ComPEFT --------------------------------------------------------------------------------------


def test_compeft_by_hand_std_scale():
    delta = torch.tensor(SMALL)
    fields = encode_compeft(delta, CompeftParams(density=2 / 6, scale="std", alpha=2.0))
    s = 2.0 * statistics.stdev(v for row in SMALL for v in row)  # alpha * std of the original delta
    expected = torch.tensor([[0.0, -s, 0.0], [s, 0.0, 0.0]])  # the two largest: -2.0 and 1.0
    torch.testing.assert_close(decode_compeft(fields, (2, 3)), expected)
    # positions as a 6-bit mask (bits 1 and 3), signs of the kept entries in index order (-, +)
    assert fields["mask"].tolist() == [0b1010] and fields["signs"].tolist() == [0b10]
    assert fields_bytes(fields) == 4 + 1 + 1  # fp32 scale + 1 byte of signs + 1 byte of mask


def test_compeft_mean_kept_scale_by_hand():
    fields = encode_compeft(torch.tensor(SMALL), CompeftParams(density=0.5, scale="mean_kept"))
    s = (2.0 + 1.0 + 0.5) / 3  # kept: -2.0, 1.0, 0.5
    expected = torch.tensor([[s, -s, 0.0], [s, 0.0, 0.0]])
    torch.testing.assert_close(decode_compeft(fields, (2, 3)), expected)


def test_compeft_sparse_tensors_store_indices_and_keep_the_top_k():
    delta = torch.randn(40, 25, generator=torch.Generator().manual_seed(0))
    fields = encode_compeft(delta, CompeftParams(density=0.01, scale="mean_kept"))
    assert "indices" in fields and "mask" not in fields  # 10 int32 indices (40 B) < 125 B of mask
    out = decode_compeft(fields, (40, 25))
    top = np.argsort(-np.abs(delta.numpy().ravel()))[:10]
    assert sorted(torch.nonzero(out.reshape(-1)).reshape(-1).tolist()) == sorted(top.tolist())
    assert torch.equal(torch.sign(out.reshape(-1)[top]), torch.sign(delta.reshape(-1)[top]))


def test_compeft_never_keeps_zero_entries():
    delta = torch.tensor([[0.0, 3.0], [0.0, 0.0]])
    out = decode_compeft(encode_compeft(delta, CompeftParams(density=1.0, scale="mean_kept")), (2, 2))
    assert torch.equal(out, delta)


# --- BitDelta -------------------------------------------------------------------------------------


def test_bitdelta_sign_and_scale_by_hand():
    delta = torch.tensor([[0.5, -1.5], [0.0, -0.2]])
    fields = encode_bitdelta(delta, BitDeltaParams())
    scale = (0.5 + 1.5 + 0.0 + 0.2) / 4  # mean |Δ|; zero gets sign +1
    torch.testing.assert_close(
        decode_bitdelta(fields, (2, 2)), scale * torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    )
    assert fields["signs"].tolist() == [0b0101] and fields_bytes(fields) == 1 + 4


def test_bitdelta_scale_is_least_squares_optimal_for_its_signs():
    delta = torch.randn(30, 20, generator=torch.Generator().manual_seed(2))
    best = decode_bitdelta(encode_bitdelta(delta, BitDeltaParams()), (30, 20))
    for factor in (0.9, 1.1):
        assert (delta - best).norm() < (delta - factor * best).norm()


# --- Delta-CoMe -----------------------------------------------------------------------------------


def test_delta_come_default_allocation_matches_the_papers_run_script():
    # 8-bit x 2, 3-bit x 32, 2-bit x 968 for a 4096 x 4096 delta at 1 bit per entry (1/16 of fp16)
    plan = allocate_bits(4096, 4096, DeltaComeParams())
    assert [plan.count(b) for b in (8, 3, 2)] == [2, 32, 968] and len(plan) == 1002


def test_delta_come_allocation_respects_budget_and_rank():
    # a component of b bits costs b * (64 + 96) bits; the budget is budget_bits * 64 * 96 bits
    groups = [(8, 2), (4, 4)]
    by_rank = allocate_bits(64, 96, DeltaComeParams(groups=groups, budget_bits=2.0, rank=10))
    assert by_rank == [8, 8, 4, 4, 4, 4, 2, 2, 2, 2]  # 76.8 bit-components affordable; rank binds
    by_budget = allocate_bits(64, 96, DeltaComeParams(groups=groups, budget_bits=0.5))
    assert by_budget == [8, 8, 2]  # 19.2 affordable: 16 for the 8-bit pair, no 4-bit fits, one 2-bit


def _decaying_delta(rows=96, cols=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, rows, generator=g))
    s = torch.tensor([0.9**i for i in range(rows)])
    return (u * s) @ v.T


def test_delta_come_error_decreases_with_the_bit_budget():
    delta = _decaying_delta()
    errors = []
    for budget in (0.25, 0.5, 1.0, 2.0, 4.0):
        fields = encode_delta_come(delta, DeltaComeParams(budget_bits=budget, group_size=32))
        errors.append(rel_err(delta, decode_delta_come(fields, (96, 160))))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors


def test_delta_come_all_8_bit_full_rank_is_nearly_exact():
    delta = _decaying_delta()
    params = DeltaComeParams(groups=[(8, 96)], fill_bits=0, budget_bits=None, group_size=32)
    fields = encode_delta_come(delta, params)
    assert fields["bits"].tolist() == [8] and fields["g0.s"].numel() == 96
    assert rel_err(delta, decode_delta_come(fields, (96, 160))) < 1e-2  # 2-bit: ~0.3


def test_delta_come_spends_nothing_beyond_the_rank_of_the_delta():
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(64, 4, generator=g) @ torch.randn(4, 80, generator=g)
    fields = encode_delta_come(delta, DeltaComeParams(budget_bits=8.0))
    assert sum(fields[f"g{i}.s"].numel() for i in range(len(fields["bits"]))) == 4


# --- registry -------------------------------------------------------------------------------------


def test_unknown_method_and_bad_params_are_named():
    with pytest.raises(ValueError, match="unknown compression method 'zip'.*compeft"):
        get_codec("zip")
    with pytest.raises(ValueError, match="'compeft'.*densty"):
        validate_params(get_codec("compeft"), {"densty": 0.1})
    with pytest.raises(ValueError, match="density"):
        validate_params(get_codec("compeft"), {"density": 1.5})
