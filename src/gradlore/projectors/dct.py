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

On shards (FSDP2 with each weight split along its long side l, so a rank holds whole columns G_k of G):
each score is a sum over columns, score_i = Σ_k Σ_{j∈k} |(Qᵀ G_k)_ij| (L1; squares for L2), so every rank
scores its own columns and one all-reduce of the s scores (s·4 bytes) gives all ranks the same top-r
indices, equal to the single-process ones up to the order of that sum. The gradient is never gathered.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.fft
import torch
from torch import Tensor

from gradlore.projectors.base import Context, ProjectorBase

# From this many rows on, the FFT route beats one matmul with the (s, s) basis on a 2-core CPU
# (measured: 1.6x faster at 2048x2048, a tie at 1024, 3x slower at 512x1376; BENCHMARKS.md).
FFT_MIN_SIZE = 2048


class BasisCache:
    """The DCT bases, one per (size, dtype, device), shared by every layer and optimizer: derived data, not state.

    Owned here; ``nbytes`` tells what it holds (``gradlore.optim.state_bytes`` charges it once) and ``clear``
    frees it (a benchmark that measures one optimizer at a time clears it between them).
    """

    def __init__(self) -> None:
        self._bases: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}

    def get(self, s: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
        """Orthonormal DCT-II basis Q (s, s): column k is the k-th cosine, so Qᵀx = dct(x, norm='ortho')."""
        key = (s, dtype, torch.device(device))
        if key not in self._bases:
            n = torch.arange(s, dtype=torch.float64)
            k = n[:, None]
            d = torch.cos(math.pi * (2 * n[None, :] + 1) * k / (2 * s)) * math.sqrt(2.0 / s)  # (k, n)
            d[0] /= math.sqrt(2.0)
            self._bases[key] = d.mT.contiguous().to(dtype=dtype, device=key[2])  # Q = Dᵀ: columns are cosines
        return self._bases[key]

    def nbytes(self, sizes: set[int] | None = None) -> int:
        """Bytes held by the bases (of the given sizes only), each counted once."""
        return sum(b.untyped_storage().nbytes() for (s, _, _), b in self._bases.items() if sizes is None or s in sizes)

    def clear(self) -> None:
        self._bases.clear()

    def __len__(self) -> int:
        return len(self._bases)


DCT_BASES = BasisCache()


def dct_basis(s: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """Orthonormal DCT-II basis Q (s, s) from the shared cache."""
    return DCT_BASES.get(s, dtype, device)


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
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    out = scipy.fft.dct(work.numpy(), type=2, norm="ortho", axis=0, workers=torch.get_num_threads())
    return torch.from_numpy(out).to(x.dtype)


def stable_order(old: Tensor, new: Tensor, s: int) -> Tensor:
    """The indices ``new`` (ascending, in [0, s)) placed so that each one also in ``old`` keeps its position
    there; the others take the positions of ``old``'s dropped indices, both in ascending order. E.g. old
    [1, 3, 5, 7], new [3, 4, 7, 9] -> [4, 3, 9, 7]. Deterministic.

    On the CPU it runs in numpy, whose per-operation overhead on these (r,) vectors is a tenth of torch's (it is
    paid for every weight at every step); elsewhere in torch, with no host sync (no boolean indexing)."""
    if old.device.type == "cpu":
        o, n = old.numpy(), new.numpy()
        in_new, in_old = np.zeros(s, dtype=bool), np.zeros(s, dtype=bool)  # membership tables
        in_new[n], in_old[o] = True, True
        out = o.copy()
        out[~in_new[o]] = n[~in_old[n]]  # dropped positions, in order, get the arriving indices, in order
        return torch.from_numpy(out)
    return _stable_order_device(old, new, s)


def _stable_order_device(old: Tensor, new: Tensor, s: int) -> Tensor:
    """``stable_order`` by sync-free torch ops: compaction by stable sorts of the membership flags."""
    in_new = torch.zeros(s, dtype=torch.bool, device=old.device).index_fill_(0, new, True)
    in_old = torch.zeros(s, dtype=torch.bool, device=old.device).index_fill_(0, old, True)
    stays = in_new.index_select(0, old)  # (r,) positions whose index survives
    slots = torch.argsort(stays.to(torch.uint8), stable=True)  # dropped positions first, ascending
    comers = torch.argsort(in_old.index_select(0, new).to(torch.uint8), stable=True)  # arriving indices first
    return old.scatter(0, slots, torch.where(stays[slots], old[slots], new[comers]))


class SelectProjector(ProjectorBase):
    """Keep the r basis directions best aligned with the gradient; store only their indices."""

    selects_indices = True
    refreshes_on_shards = True

    def __init__(self, dct_norm: str = "l1") -> None:
        self.norm = dct_norm

    def coefficients(self, g: Tensor) -> Tensor:
        """Qᵀ G for every basis direction: (s, l)."""
        raise NotImplementedError

    def columns(self, idx: Tensor, s: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        """Q[:, idx] (s, r), or None for the identity basis (rows are selected directly)."""
        raise NotImplementedError

    def score(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """Qᵀ G (s, l) and each basis direction's score (s,), float32: sums over the columns of g."""
        coeffs = self.coefficients(g)  # (s, l)
        return coeffs, (coeffs.abs().sum(1) if self.norm == "l1" else coeffs.square().sum(1)).float()

    def select(self, coeffs: Tensor, scores: Tensor, rank: int, state: dict, stable_slots: bool = False) -> Tensor:
        """Keep the top-r directions; returns their rows of Qᵀ G (r, l), this step's projection.

        The indices are ascending; with ``stable_slots`` an index that was selected before keeps its position
        (``stable_order``), so moment rows that follow their index never have to move.
        """
        idx = torch.topk(scores, rank, sorted=False).indices.sort().values  # (r,) ascending
        old = state.get("proj.indices")
        if stable_slots and old is not None and old.shape == idx.shape:
            idx = stable_order(old, idx, scores.numel())
        state["proj.indices"] = idx
        return coeffs.index_select(0, idx)  # (r, l): reuse the product for this step's projection

    def refresh(self, g: Tensor, rank: int, state: dict, ctx: Context) -> Tensor:
        coeffs, scores = self.score(g)
        if ctx.comm is not None:  # g holds this rank's columns: add the other ranks' partial scores
            ctx.comm.all_reduce_(scores)
        return self.select(coeffs, scores, rank, state, ctx.stable_slots)

    def down(self, g: Tensor, state: dict) -> Tensor:
        q = self.columns(state["proj.indices"], g.shape[0], g.dtype, g.device)
        return g.index_select(0, state["proj.indices"]) if q is None else q.mT @ g

    def up_add_(self, out: Tensor, x: Tensor, state: dict, alpha: float) -> None:
        q = self.columns(state["proj.indices"], out.shape[0], x.dtype, x.device)
        if q is None:
            out.index_add_(0, state["proj.indices"], x, alpha=alpha)
        else:
            out.addmm_(q, x, alpha=alpha)  # (s, r) @ (r, l), added in place


class DCTProjector(SelectProjector):
    """The SVD-free projector: top-r columns of the orthonormal DCT-II basis."""

    def __init__(self, dct_norm: str = "l1", dct_method: str = "auto") -> None:
        super().__init__(dct_norm)
        self.method = dct_method

    def coefficients(self, g: Tensor) -> Tensor:
        method = self.method
        if method == "auto":
            method = "scipy" if g.device.type == "cpu" else "fft" if g.shape[0] >= FFT_MIN_SIZE else "matmul"
        if method == "scipy":
            return dct_scipy(g)
        if method == "fft":
            return dct_fft(g)
        return dct_basis(g.shape[0], g.dtype, g.device).mT @ g

    def columns(self, idx: Tensor, s: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return dct_basis(s, dtype, device).index_select(1, idx)  # (s, r)


class ColumnsProjector(SelectProjector):
    """The identity basis: keep the r rows of G with the largest norm (FRUGAL's column subspace)."""

    def coefficients(self, g: Tensor) -> Tensor:
        return g

    def columns(self, idx: Tensor, s: int, dtype: torch.dtype, device: torch.device) -> None:
        return None
