"""Properties of each projector over non-square shapes in both orientations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch

from gradlore.projectors import PROJECTORS, Context, dct_basis, orient
from gradlore.projectors.dct import dct_fft

SHAPES = [(48, 32), (32, 48)]
RANK = 8


def gradient(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 2, 7, 32, 48])
def test_dct_basis_equals_scipy(n):
    q = dct_basis(n, torch.float64)
    ref = scipy.fft.dct(np.eye(n), norm="ortho", axis=0)  # column j = dct(e_j) = D[:, j]
    np.testing.assert_allclose(q.mT.numpy(), ref, atol=1e-12)
    torch.testing.assert_close(q.mT @ q, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [(32, 48), (48, 32), (7, 5), (64, 3)])
def test_dct_fft_equals_scipy(shape):
    x = gradient(shape)
    ref = scipy.fft.dct(x.numpy(), norm="ortho", axis=0)
    np.testing.assert_allclose(dct_fft(x).numpy(), ref, atol=1e-10)
    np.testing.assert_allclose(dct_fft(x.mT.contiguous().mT).numpy(), ref, atol=1e-10)  # strided input


@pytest.mark.parametrize("shape", SHAPES)
def test_svd_keeps_top_r_energy(shape):
    g = orient(gradient(shape))
    state: dict = {}
    proj = PROJECTORS.build("svd", {})
    proj.refresh(g, RANK, state, Context("w", shape[0] >= shape[1], 0))
    sigma = torch.linalg.svdvals(g)
    kept = proj.down(g, state).square().sum()
    torch.testing.assert_close(kept, sigma[:RANK].square().sum(), rtol=1e-5, atol=0)
    assert state["proj.basis"].is_contiguous() and state["proj.basis"].untyped_storage().nbytes() == 32 * RANK * 8


@pytest.mark.parametrize("shape", SHAPES)
def test_dct_picks_the_best_aligned_columns(shape):
    g = orient(gradient(shape))
    # plant energy on three DCT directions: they must be among the chosen
    q = dct_basis(32, torch.float64)
    g = g * 0.01 + 5 * q[:, [3, 17, 30]] @ torch.randn(3, g.shape[1], dtype=torch.float64)
    state: dict = {}
    proj = PROJECTORS.build("dct", {})
    proj.refresh(g, RANK, state, Context("w", False, 0))
    idx = state["proj.indices"]
    assert idx.dtype == torch.int64 and idx.shape == (RANK,)
    assert {3, 17, 30} <= set(idx.tolist())
    scores = (q.mT @ g).abs().sum(1)
    assert set(idx.tolist()) == set(torch.topk(scores, RANK).indices.tolist())
    for method in ("fft", "scipy", "matmul"):
        other: dict = {}
        r = PROJECTORS.build("dct", {"dct_method": method}).refresh(g, RANK, other, Context("w", False, 0))
        assert torch.equal(other["proj.indices"], idx), method
        torch.testing.assert_close(r, (q.mT @ g)[idx], rtol=1e-10, atol=1e-10)


def test_random_projector_is_seeded():
    g = orient(gradient((48, 32)))
    a, b, c = {}, {}, {}
    for st, seed in ((a, 1), (b, 1), (c, 2)):
        PROJECTORS.build("random", {}).refresh(g, RANK, st, Context("w", True, seed))
    assert torch.equal(a["proj.basis"], b["proj.basis"]) and not torch.equal(a["proj.basis"], c["proj.basis"])
