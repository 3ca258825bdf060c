"""SVD-free projection with a fixed DCT basis (arXiv 2505.17967), and its identity-basis twin.

    Q (s, s): orthonormal DCT-II basis, Q[:, k] = k-th cosine; Qᵀ G = dct(G, axis=0, norm="ortho")
    refresh:  C = Qᵀ G (s, l);  score_k = ‖C[k, :]‖₁;  idx = top-r(score);  R = C[idx]   (r, l)
    steady:   R = Q[:, idx]ᵀ G  (r, l);   up(D) = Q[:, idx] D  (s, l)

The basis depends only on s, so one matrix per distinct size is built once and shared by every
layer of that size; each layer's state is its r integer indices. The full transform Qᵀ G can be
taken by a matmul (O(s² l)), by FFT with Makhoul's reordering in torch (O(s l log s), any device),
or on CPU by scipy.fft.dct (pocketfft's real DCT, the fastest there); ``method="auto"`` takes scipy on
CPU and, on other devices, the matmul below ``FFT_MIN_SIZE`` rows and the FFT above, from
measurements (BENCHMARKS.md). ``columns`` is the same selection
with the identity basis (keep the r rows of G with the largest norm; FRUGAL's column subspace).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradlore.projectors.base import ProjectorBase

# One basis per (size, dtype, device), shared by all layers and optimizers: derived data, not state.
_BASES: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}

# From this many rows on, the FFT route beats one matmul with the (s, s) basis on a 2-core CPU
# (measured: 1.6x faster at 2048x2048, a tie at 1024, 3x slower at 512x1376; BENCHMARKS.md).
FFT_MIN_SIZE = 2048


def dct_basis(s: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """Orthonormal DCT-II basis Q (s, s): column k is the k-th cosine, so Qᵀx = dct(x, norm='ortho')."""
    device = torch.device(device)
    key = (s, dtype, device)
    if key not in _BASES:
        n = torch.arange(s, dtype=torch.float64)
        k = n[:, None]
        d = torch.cos(math.pi * (2 * n[None, :] + 1) * k / (2 * s)) * math.sqrt(2.0 / s)  # (k, n)
        d[0] /= math.sqrt(2.0)
        _BASES[key] = d.mT.contiguous().to(dtype=dtype, device=device)  # Q = Dᵀ: columns are basis vectors
    return _BASES[key]


def shared_bytes(sizes: set[int] | None = None) -> int:
    """Bytes held by the shared DCT bases (of the given sizes), counted once whatever the number of layers."""
    return sum(b.untyped_storage().nbytes() for (s, _, _), b in _BASES.items() if sizes is None or s in sizes)


def dct_fft(x: Tensor) -> Tensor:
    """Orthonormal DCT-II along dim 0 of x (s, l) by one FFT (Makhoul 1980): O(s l log s)."""
    s = x.shape[0]
    v = torch.cat([x[0::2], x[1::2].flip(0)], dim=0)  # even samples, then odd ones reversed
    spec = torch.fft.fft(v.to(torch.float64 if x.dtype == torch.float64 else torch.float32), dim=0)
    theta = torch.arange(s, device=x.device, dtype=spec.real.dtype) * (math.pi / (2 * s))
    out = spec.real * torch.cos(theta)[:, None] + spec.imag * torch.sin(theta)[:, None]  # Re(V e^{-iθ})
    out *= math.sqrt(2.0 / s)
    out[0] /= math.sqrt(2.0)
    return out.to(x.dtype)


def dct_scipy(x: Tensor) -> Tensor:
    """Orthonormal DCT-II along dim 0 of a CPU tensor by scipy (pocketfft), threaded like torch."""
    import scipy.fft

    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    out = scipy.fft.dct(work.numpy(), type=2, norm="ortho", axis=0, workers=torch.get_num_threads())
    return torch.from_numpy(out).to(x.dtype)


class SelectProjector(ProjectorBase):
    """Keep the r basis directions best aligned with the gradient; store only their indices."""

    def __init__(self, basis: str = "dct", norm: str = "l1", method: str = "auto") -> None:
        self.basis, self.norm, self.method = basis, norm, method

    def _coefficients(self, g: Tensor) -> Tensor:
        """Qᵀ G for every basis direction: (s, l)."""
        if self.basis == "identity":
            return g
        method = self.method
        if method == "auto":
            method = "scipy" if g.device.type == "cpu" else "fft" if g.shape[0] >= FFT_MIN_SIZE else "matmul"
        if method == "scipy":
            return dct_scipy(g)
        if method == "fft":
            return dct_fft(g)
        return dct_basis(g.shape[0], g.dtype, g.device).mT @ g

    def refresh(self, g, rank, state, *, transposed, name, seed):
        coeffs = self._coefficients(g)  # (s, l)
        scores = coeffs.abs().sum(1) if self.norm == "l1" else coeffs.square().sum(1)
        idx = torch.topk(scores.float(), rank, sorted=False).indices.sort().values
        state["proj.indices"] = idx
        return coeffs.index_select(0, idx)  # (r, l): reuse the product for this step's projection

    def down(self, g: Tensor, state: dict) -> Tensor:
        idx = state["proj.indices"]
        if self.basis == "identity":
            return g.index_select(0, idx)
        q = dct_basis(g.shape[0], g.dtype, g.device).index_select(1, idx)  # (s, r)
        return q.mT @ g

    def up_add_(self, out: Tensor, x: Tensor, state: dict, alpha: float) -> None:
        idx = state["proj.indices"]
        if self.basis == "identity":
            out.index_add_(0, idx, x, alpha=alpha)
        else:
            q = dct_basis(out.shape[0], x.dtype, x.device).index_select(1, idx)  # (s, r)
            out.addmm_(q, x, alpha=alpha)
