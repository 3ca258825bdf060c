"""Compact number formats (``gradlore.quant``): the 8-bit code books and their look-up, blockwise quantization
error bounds against bitsandbytes as an oracle, packed int4 round trips against q-galore-torch as an oracle,
and the bytes an int4 basis really costs in an optimizer's state."""

from __future__ import annotations

import pytest
import torch

import gradlore
from gradlore.optim.state import state_bytes, state_bytes_by_kind
from gradlore.quant import (
    code_book,
    code_values,
    dequantize_blockwise,
    dequantize_int4,
    quantize_blockwise,
    quantize_int4,
)

LUT_SLACK = 2.0**-10  # the look-up table's buckets: the nearest code up to 2^-11 of the value, both ways


def _heavy_tailed(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) * torch.rand(n, generator=gen) ** 6  # many tiny values, as moments have


@pytest.mark.parametrize("kind", ["dynamic", "linear"])
@pytest.mark.parametrize("signed", [True, False])
def test_code_books(kind, signed):
    values = code_values(kind, signed)
    assert len(values) == (255 if signed else 256) and values == sorted(values) and len(set(values)) == len(values)
    assert 0.0 in values and values[-1] == 1.0 and values[0] == (-1.0 if signed else 0.0)
    if kind == "dynamic":  # the dynamic tree reaches 1e-6 (signed) / 1e-7 (unsigned) and has 64/128 top levels
        assert min(v for v in values if v > 0) == pytest.approx(1e-6 if signed else 1e-7)
        assert sum(v > 0.1 for v in values) == (64 if signed else 128)


@pytest.mark.parametrize("kind", ["dynamic", "linear"])
@pytest.mark.parametrize("signed", [True, False])
def test_lookup_is_the_nearest_code(kind, signed):
    book = code_book(kind, signed)
    y = _heavy_tailed(200_000).clamp(-1, 1)
    y = y if signed else y.abs()
    exact = torch.bucketize(y, (book.values[1:] + book.values[:-1]) / 2)
    if not signed:  # Adam's second moment: a positive value keeps the smallest positive code rather than zero
        exact = torch.where(y > 0, exact.clamp_min(1), exact)
    ours = book.nearest(y).long()
    err_exact = (book.values[exact] - y).abs()
    err_ours = (book.values[ours] - y).abs()
    assert (ours == exact).float().mean() > 0.995
    assert bool((err_ours <= err_exact + LUT_SLACK * y.abs() + 1e-12).all())
    if not signed:  # a positive second moment never decodes to zero
        assert not bool(((ours == 0) & (y > 0)).any())


@pytest.mark.parametrize("kind", ["dynamic", "linear"])
@pytest.mark.parametrize("block", [64, 256, 100])
def test_blockwise_round_trip_error_bound(kind, block):
    x = _heavy_tailed(10_007) * 3  # not a multiple of the block: a partial last block
    book = code_book(kind, True)
    codes, absmax = quantize_blockwise(x, book, block)
    assert codes.dtype == torch.uint8 and codes.shape == (10_007,) and absmax.shape == (-(-10_007 // block),)
    back = dequantize_blockwise(codes, absmax, book, block)
    half_gap = (book.values[1:] - book.values[:-1]).max() / 2  # the worst rounding, relative to a block's absmax
    scale = absmax.repeat_interleave(block)[:10_007]
    assert bool(((back - x).abs() <= scale * (half_gap + LUT_SLACK) + 1e-12).all())
    assert torch.equal(absmax, torch.stack([b.abs().max() for b in x.split(block)]))
    # each block's largest magnitude is exact (it maps to ±1)
    for b, a in zip(back.split(block), absmax):
        assert b.abs().max() == a


def test_blockwise_matches_bitsandbytes():
    """Oracle: bitsandbytes' blockwise quantization with its own dynamic code book. Same absmax; the same codes
    for 99% of the values above 1e-3 of their block's absmax (its CPU path is not exactly round-to-nearest near
    midpoints, and keeps a coarser code for tiny values); never a smaller error than ours, beyond the slack."""
    import bitsandbytes.functional as bnb_functional
    code = bnb_functional.create_dynamic_map(signed=True)
    x = _heavy_tailed(65_536, seed=3)
    theirs, qstate = bnb_functional.quantize_blockwise(x, code=code, blocksize=256)
    book = code_book("dynamic", True)  # a book of ours, then the same look-up over bitsandbytes' values
    from gradlore.quant import CodeBook

    keys = torch.arange(1 << 20, dtype=torch.int64)
    mids = ((keys << 12) | (1 << 11)).to(torch.int32).view(torch.float32).nan_to_num(0.0).clamp(-1, 1)
    their_book = CodeBook(code.float(), torch.bucketize(mids, (code[1:] + code[:-1]) / 2).to(torch.uint8))
    ours, absmax = quantize_blockwise(x, their_book, 256)
    torch.testing.assert_close(absmax, qstate.absmax.float())
    normed = (x / absmax.repeat_interleave(256)).abs()
    big = normed > 1e-3
    assert (ours[big] == theirs[big]).float().mean() > 0.99
    err_ours = (dequantize_blockwise(ours, absmax, their_book, 256) - x).abs()
    err_theirs = (bnb_functional.dequantize_blockwise(theirs, qstate) - x).abs()
    assert bool((err_ours <= err_theirs + LUT_SLACK * x.abs() + 1e-9).all())
    assert len(book.values) == 255  # ours keeps ±1 exactly and one code for zero


@pytest.mark.parametrize("n,group", [(512 * 64, 256), (1001, 128), (7, 4)])
def test_int4_round_trip_bound(n, group):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    packed, scale, zero = quantize_int4(x, group)
    assert packed.dtype == zero.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    assert scale.numel() == zero.numel() == -(-n // group) and int(zero.max()) <= 15
    back = dequantize_int4(packed, scale, zero, n, group)
    bound = scale.repeat_interleave(group)[:n] / 2
    assert bool(((back - x).abs() <= bound * (1 + 1e-5) + 1e-7).all())
    # 16 levels per group: the error is a real int4 error, not zero
    assert float((back - x).abs().max()) > 0.01


def test_int4_matches_q_galore():
    """Oracle: q-galore-torch's own group quantizer (4 bits, groups of 256) on a real SVD basis."""
    import q_galore_torch.q_galore_projector as projector_module
    g = torch.randn(256, 384, generator=torch.Generator().manual_seed(5))
    basis = torch.linalg.svd(g, full_matrices=False)[0][:, :64].contiguous()  # (256, 64)
    ref = projector_module.GaLoreProjector(rank=64)
    codes, scales, zeros, _ = ref._quantize(basis, q_group_size=256, n_bit=4)
    packed, scale, zero = quantize_int4(basis, 256)
    unpacked = torch.stack([packed & 15, packed >> 4], dim=1).view(-1)
    assert torch.equal(unpacked, codes.view(-1))
    torch.testing.assert_close(scale, scales.view(-1), rtol=1e-6, atol=0)
    assert torch.equal(zero.float(), zeros.view(-1))


def test_int4_basis_costs_its_real_bytes():
    """Q-GaLore's projector: an (s, r) basis is s·r/2 bytes of codes plus 5 bytes per group of 256."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(512, 256))
    groups = {"rank": 64, "projector": "svd-int4", "state": "fp32"}
    opt = gradlore.LowRankAdamW([{"params": [w], **groups}])
    w.grad = torch.randn(512, 256)
    opt.step()
    state = opt.state[w]
    s, r = 256, 64  # the shorter side is projected
    assert state["proj.codes"].numel() == s * r // 2 and state["proj.codes"].dtype == torch.uint8
    by_kind = state_bytes_by_kind(opt)
    assert sum(by_kind["projector"].values()) == s * r // 2 + (s * r // 256) * (4 + 1)
    assert sum(sum(v.values()) for v in by_kind.values()) == state_bytes(opt)
    fp32 = gradlore.LowRankAdamW([{"params": [w], **groups, "projector": "svd"}])
    fp32.step()
    assert sum(state_bytes_by_kind(fp32)["projector"].values()) == 4 * s * r  # 7.8x the int4 basis


def test_int4_group_of_one_sign_round_trips_within_half_a_step():
    """A group whose values share one sign (a tiny basis) still has its zero point among the codes."""
    for x in (torch.tensor([-0.7988, -0.6016]), torch.tensor([0.25, 0.5, 0.75, 1.0])):
        packed, scale, zero = quantize_int4(x, 256)
        y = dequantize_int4(packed, scale, zero, x.numel(), 256)
        assert (y - x).abs().max() <= scale.max() / 2 * (1 + 1e-6)
