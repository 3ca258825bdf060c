"""Pure gradient-rank statistics (arXiv 2407.11239): known answers on constructed matrices."""

from __future__ import annotations

import math

import pytest
import torch

from gradlore.analysis import stats


def _with_singular_values(m: int, n: int, s: list[float], seed: int = 0) -> torch.Tensor:
    """U diag(s) Vᵀ with random orthonormal U (m×k), V (n×k): a matrix whose singular values are s."""
    g = torch.Generator().manual_seed(seed)
    k = len(s)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
def test_stable_rank_of_known_rank_k(shape: tuple[int, int]) -> None:
    # rank 5 with equal singular values: stable rank exactly 5, effective rank 5, energy rank 5
    g = _with_singular_values(*shape, [3.0] * 5)
    assert stats.stable_rank(g) == pytest.approx(5.0, rel=1e-5)
    assert stats.effective_rank(g) == pytest.approx(5.0, rel=1e-4)
    assert stats.energy_rank(g, 0.9) == 5
    # unequal spectrum: Σσ²/σ₁² = (16 + 4 + 1) / 16
    h = _with_singular_values(*shape, [4.0, 2.0, 1.0])
    assert stats.stable_rank(h) == pytest.approx(21 / 16, rel=1e-5)
    assert stats.top_singular_values(h, k=4)[:3] == pytest.approx([4.0, 2.0, 1.0], rel=1e-5)
    assert (
        stats.energy_rank(h, 0.75) == 1 and stats.energy_rank(h, 0.9) == 2 and stats.energy_rank(h, 1.0) == 3
    )
    p = torch.tensor([4.0, 2.0, 1.0]) / 7
    assert stats.effective_rank(h) == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-5)


def test_stable_rank_bounds_and_zero() -> None:
    g = torch.randn(40, 24, generator=torch.Generator().manual_seed(1))
    sr = stats.stable_rank(g)
    assert 1.0 <= sr <= 24
    assert stats.stable_rank(torch.zeros(5, 3)) == 0.0
    assert stats.effective_rank(torch.zeros(5, 3)) == 0.0
    with pytest.raises(ValueError):
        stats.stable_rank(torch.zeros(3))


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
def test_subspace_cosine_identical_orthogonal_and_partial(shape: tuple[int, int]) -> None:
    g = _with_singular_values(*shape, [5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1])
    u = stats.subspace_basis(g, 4)
    d = min(shape)
    assert u.shape == (d, 4)
    assert torch.allclose(u.T @ u, torch.eye(4), atol=1e-5)
    # identical subspace (even with a rotated basis): 1
    rot, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(2)))
    assert stats.subspace_cosine(u, u @ rot) == pytest.approx(1.0, abs=1e-5)
    # orthogonal subspace: 0
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(3)))
    assert stats.subspace_cosine(q[:, :4], q[:, 4:8]) == pytest.approx(0.0, abs=1e-6)
    # half shared: principal cosines (1, 1, 0, 0) -> mean 0.5
    assert stats.subspace_cosine(q[:, :4], torch.cat([q[:, :2], q[:, 10:12]], 1)) == pytest.approx(
        0.5, abs=1e-5
    )
    # the basis is on the shorter side, the same for G and Gᵀ
    assert stats.subspace_cosine(u, stats.subspace_basis(g.T, 4)) == pytest.approx(1.0, abs=1e-5)


def test_subspace_cosine_rejects_mismatched_bases() -> None:
    with pytest.raises(ValueError):
        stats.subspace_cosine(torch.eye(4)[:, :2], torch.eye(5)[:, :2])
