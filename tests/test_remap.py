"""The SVD-free method as its authors run it (issue 9): moments that follow their basis index (``remap``), the
per-row bias correction, the ``dct`` preset, and oracles: an independent float64 construction of the authors'
rotation R = Q_prevᵀ Q_crt, a per-index Adam written from the definition, and the authors' own ``DCTAdamW``
(``ista-daslab-optimizers``, Makhoul mode, no refresh)."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import math
import sys
import types

import pytest
import scipy.fft
import torch

import gradlore
from gradlore.errors import UserError
from gradlore.optim.build import OptimConfig
from gradlore.optim.moments import Remap
from gradlore.projectors.dct import _stable_order_device, stable_order

SHAPES = [(48, 32), (32, 48)]  # both orientations, rank below both sides
BETAS, EPS = (0.9, 0.999), 1e-8


def _grads(shape: tuple[int, int], n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(n)]


def _run(shape, group: dict, grads: list[torch.Tensor], lr: float = 1e-2, wd: float = 0.0) -> torch.Tensor:
    w = torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    opt = gradlore.LowRankAdamW([{"params": [w], **group}], lr=lr, weight_decay=wd)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return w.detach()


def _basis(s: int) -> torch.Tensor:
    """Orthonormal DCT-II Q (s, s) in float64, columns = cosines, from scipy (independent of gradlore's)."""
    return torch.from_numpy(scipy.fft.dct(torch.eye(s, dtype=torch.float64).numpy(), norm="ortho", axis=0)).mT


def _oriented(shape) -> bool:
    return shape[0] >= shape[1]  # work on Gᵀ so the shorter side comes first


# ---------------------------------------------------------------------------------------------------------
# remap itself
# ---------------------------------------------------------------------------------------------------------
def test_stable_order_keeps_survivors_in_place_and_fills_dropped_positions_in_order():
    assert stable_order(torch.tensor([1, 3, 5, 7]), torch.tensor([3, 4, 7, 9]), 10).tolist() == [4, 3, 9, 7]
    assert stable_order(torch.tensor([9, 2, 5]), torch.tensor([2, 5, 9]), 10).tolist() == [9, 2, 5]  # same set
    assert stable_order(torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), 6).tolist() == [3, 4, 5]  # all new
    gen = torch.Generator().manual_seed(0)
    old = torch.randperm(50, generator=gen)[:12]  # any order, as after earlier refreshes
    for _ in range(20):
        new = torch.randperm(50, generator=gen)[:12].sort().values
        out = stable_order(old, new, 50)
        assert sorted(out.tolist()) == new.tolist()  # the same set
        stays = torch.isin(old, new)
        assert torch.equal(out[stays], old[stays])  # a survivor keeps its position
        comers = out[~stays]
        assert bool((comers[1:] > comers[:-1]).all()) and not bool(torch.isin(comers, old).any())
        assert torch.equal(_stable_order_device(old, new, 50), out)  # the sync-free path of accelerators agrees
        old = out


def test_remap_keeps_rows_with_their_index_and_zeroes_new_ones():
    m = torch.arange(1.0, 5.0)[:, None] * torch.ones(4, 3)  # row i holds i+1
    before = {"proj.indices": torch.tensor([1, 3, 5, 7])}
    # the projector placed the new set {3, 4, 7, 9}: 3 and 7 stay in their rows, 4 and 9 take the rows of 1 and 5
    state = {"proj.indices": stable_order(before["proj.indices"], torch.tensor([3, 4, 7, 9]), 10),
             "exp_avg": m.clone(), "exp_avg_sq": 10 * m.clone(), "remap.age": torch.tensor([5.0, 6.0, 7.0, 8.0])}
    exp_avg = state["exp_avg"]
    Remap("row").refreshed(state, before, projector=None)
    assert state["proj.indices"].tolist() == [4, 3, 9, 7]
    assert state["exp_avg"][:, 0].tolist() == [0.0, 2.0, 0.0, 4.0]  # index 3 keeps value 2, index 7 value 4
    assert state["exp_avg_sq"][:, 0].tolist() == [0.0, 20.0, 0.0, 40.0]
    assert state["remap.age"].tolist() == [0.0, 6.0, 0.0, 8.0]
    assert state["exp_avg"] is exp_avg  # in place: the same tensors stay in the state


def test_remap_is_refused_for_projectors_that_do_not_select_indices():
    w = torch.nn.Parameter(torch.zeros(16, 12))
    for projector in ("svd", "random", "identity"):
        with pytest.raises(UserError, match=rf"projector='{projector}' does not select basis indices"):
            gradlore.LowRankAdamW([{"params": [w], "rank": 4, "projector": projector, "on_refresh": "remap"}])
    with pytest.raises(UserError, match="remap_bias='Row' is not allowed.*Did you mean 'row'"):
        gradlore.LowRankAdamW([{"params": [w], "rank": 4, "projector": "dct", "on_refresh": "remap",
                                "remap_bias": "Row"}])


def _rotation_reference(shape, grads, rank, lr, wd):
    """The paper's equations, written independently in float64: every step select the top-r DCT columns by
    ℓ1 alignment, rotate the moments by R = Q_prevᵀ Q_crt (m ← Rᵀm, v ← |Rᵀv| in the (r, l) frame), one global
    step count for the bias correction, W ← W(1 - lr·wd) - lr·Q_crt·D."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t_ = _oriented(shape)
    s = min(shape)
    q = _basis(s)
    m = v = prev = None
    for t, g in enumerate(grads, start=1):
        go = g.mT if t_ else g  # (s, l)
        idx = torch.topk((q.mT @ go).abs().sum(1), rank).indices  # any order: R takes care of it
        qc = q[:, idx]  # (s, r)
        r = qc.mT @ go  # (r, l)
        if m is None:
            m, v = torch.zeros_like(r), torch.zeros_like(r)
        else:
            rot = q[:, prev].mT @ qc  # (r, r)
            m, v = rot.mT @ m, (rot.mT @ v).abs()
        prev = idx
        m = BETAS[0] * m + (1 - BETAS[0]) * r
        v = BETAS[1] * v + (1 - BETAS[1]) * r * r
        d = (m / (1 - BETAS[0] ** t)) / ((v / (1 - BETAS[1] ** t)).sqrt() + EPS)
        w = w * (1 - lr * wd)
        upd = qc @ d  # (s, l)
        w = w - lr * (upd.mT if t_ else upd)
    return w


@pytest.mark.parametrize("shape", SHAPES)
def test_remap_global_is_the_authors_rotation_of_the_moments(shape):
    grads = _grads(shape, 12, seed=1)
    group = gradlore.presets.dct(rank=8, remap_bias="global")
    ours = _run(shape, group, grads, lr=1e-2, wd=0.1)
    ref = _rotation_reference(shape, grads, 8, 1e-2, 0.1)
    torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-11)
    keep = _run(shape, gradlore.presets.dct(rank=8, on_refresh="keep"), grads, lr=1e-2, wd=0.1)
    assert (keep - ref).abs().max() > 1e-3  # the test can fail: keeping rows by position is another method


def _per_index_reference(shape, grads, rank, lr, projector):
    """Adam per basis index, from the definition: an index keeps (m, v, age) while it stays selected; an index
    that leaves is forgotten; a selected index starts at zero with age 0 and is bias-corrected by its age."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t_ = _oriented(shape)
    s = min(shape)
    q = _basis(s) if projector == "dct" else torch.eye(s, dtype=torch.float64)
    moments: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
    for g in grads:
        go = g.mT if t_ else g
        coeffs = q.mT @ go  # (s, l)
        idx = torch.topk(coeffs.abs().sum(1), rank).indices.tolist()
        moments = {k: moments[k] for k in idx if k in moments}
        upd = torch.zeros_like(go)
        for k in idx:
            m, v, a = moments.get(k, (torch.zeros(go.shape[1], dtype=go.dtype),) * 2 + (0,))
            c = coeffs[k]
            m, v, a = BETAS[0] * m + (1 - BETAS[0]) * c, BETAS[1] * v + (1 - BETAS[1]) * c * c, a + 1
            moments[k] = (m, v, a)
            d = (m / (1 - BETAS[0] ** a)) / ((v / (1 - BETAS[1] ** a)).sqrt() + EPS)
            upd += q[:, k : k + 1] * d[None, :]
        w = w - lr * (upd.mT if t_ else upd)
    return w


@pytest.mark.parametrize("projector", ["dct", "columns"])
@pytest.mark.parametrize("shape", SHAPES)
def test_remap_row_is_adam_per_basis_index_with_its_own_age(shape, projector):
    grads = _grads(shape, 12, seed=2)
    ours = _run(shape, gradlore.presets.dct(rank=8, projector=projector, remap_bias="row"), grads)
    ref = _per_index_reference(shape, grads, 8, 1e-2, projector)
    torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-11)
    glob = _run(shape, gradlore.presets.dct(rank=8, projector=projector, remap_bias="global"), grads)
    assert (glob - ref).abs().max() > 1e-3  # the global count gives young rows larger steps


def test_remap_row_without_turnover_equals_the_fused_kernel():
    """A row that is never replaced is corrected by its age = the tensor's count: the same as the fused path."""
    shape, g = (48, 32), _grads((48, 32), 1, seed=3)[0]
    grads = [g * (1 + 0.1 * k) for k in range(8)]  # one direction: the selection never changes
    row = _run(shape, gradlore.presets.dct(rank=8, remap_bias="row"), grads)
    glob = _run(shape, gradlore.presets.dct(rank=8, remap_bias="global"), grads)
    torch.testing.assert_close(row, glob, rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------------------
def test_dct_preset_is_the_published_method_and_the_galore_style_variant_keeps_its_name():
    assert gradlore.presets.dct(rank=64) == {
        "rank": 64, "projector": "dct", "dct_norm": "l1", "update_proj_gap": 1, "scale": 1.0,
        "residual": "discard", "on_refresh": "remap", "remap_bias": "global"}
    assert gradlore.presets.dct_galore(rank=64) == {
        "rank": 64, "projector": "dct", "dct_norm": "l1", "update_proj_gap": 200, "scale": 0.25,
        "residual": "discard"}
    assert "remap_bias" not in gradlore.presets.dct(rank=8, on_refresh="keep")  # the replaced part's option goes
    cfg = OptimConfig(name="dct")  # update_proj_gap and scale unset: the preset's own
    assert {k: v for k, v in gradlore.presets.dct(cfg.rank, **cfg.group_overrides()).items()
            if k in ("update_proj_gap", "scale")} == {"update_proj_gap": 1, "scale": 1.0}


# ---------------------------------------------------------------------------------------------------------
# the authors' DCTAdamW as an oracle
# ---------------------------------------------------------------------------------------------------------
PKG = "ista_daslab_optimizers"


def _authors_dct_adamw() -> type:
    """``DCTAdamW`` without running the package's ``__init__``, which imports every optimizer of the package and
    with them wandb, timm, gpustat and the CUDA kernels. The module that defines DCTAdamW needs only torch and
    numpy: a bare package object stands in for the package while that module and its siblings are imported,
    and ``sys.modules`` is restored afterwards."""
    spec = importlib.util.find_spec(PKG)
    if spec is None:
        pytest.skip(f"{PKG} is not installed (scripts/setup.sh installs it)")
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == PKG or k.startswith(PKG + ".")}
    stand_in = types.ModuleType(PKG)
    stand_in.__path__ = list(spec.submodule_search_locations)
    sys.modules[PKG] = stand_in
    try:
        return importlib.import_module(f"{PKG}.fft_low_rank.dct_adamw").DCTAdamW
    finally:
        for k in [k for k in sys.modules if k == PKG or k.startswith(PKG + ".")]:
            del sys.modules[k]
        sys.modules.update(saved)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)  # 32→48 and 48→32: both orientations, rank 8 below both sides
    return torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Tanh(), torch.nn.Linear(48, 32)).double()


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    gen = torch.Generator().manual_seed(7)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 32, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    return losses


def test_dct_matches_the_authors_dct_adamw_in_makhoul_mode_without_refresh():
    """DCTAdamW(sim_type="makhoul") selects the top-r orthonormal DCT-II columns by ℓ1 once (update_proj_gap
    beyond the run, so no re-selection), then runs Adam in that subspace with α = 1, weight decay before the
    update and one global step count: our ``dct`` preset with the same gap. Not used: its default
    ``sim_type="matmul"`` (a DCT-III basis) and ``rotate_subspace=True`` (torch.matmul(w, R, out=w) multiplies
    into its own input, which gives wrong values on CPU)."""
    dct_adamw = _authors_dct_adamw()
    steps, lr, wd = 15, 1e-2, 0.1
    theirs_model = _model()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per parameter
        theirs = dct_adamw(theirs_model.parameters(), lr=lr, weight_decay=wd, rank=8, proj="dct",
                           update_proj_gap=10**6, rotate_subspace=False, sim_type="makhoul", betas=BETAS, eps=EPS)
        theirs_losses = _train(theirs_model, theirs, steps)
    ours_model = _model()
    weights = [ours_model[0].weight, ours_model[2].weight]
    groups = [{"params": [ours_model[0].bias, ours_model[2].bias]},
              {"params": weights, **gradlore.presets.dct(rank=8, update_proj_gap=10**6)}]
    ours = gradlore.LowRankAdamW(groups, lr=lr, weight_decay=wd, betas=BETAS, eps=EPS)
    ours_losses = _train(ours_model, ours, steps)
    # Their basis and FFT twiddles are built in float32 (then cast), so agreement is to ~1e-7 relative.
    for a, b in zip(ours_model.parameters(), theirs_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
    assert ours_losses == pytest.approx(theirs_losses, rel=1e-6)
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(ours_model.parameters(), _model().parameters()))
    assert moved > 0.05  # 15 steps of lr 1e-2 moved the weights far beyond the tolerance
    assert math.isfinite(ours_losses[-1]) and ours_losses[-1] < ours_losses[0]


def _authors_rotating(monkeypatch, steps: int = 15, **options) -> torch.nn.Module:
    """The model after ``steps`` steps of DCTAdamW re-selecting every step with ``rotate_subspace=True``, with its
    rotation made out of place and an exact float64 basis (see the test below)."""
    dct_adamw = _authors_dct_adamw()
    module_globals = dct_adamw.__init__.__globals__
    monkeypatch.setattr(module_globals["FFTLowRankProjector"], "rotate_subspace",
                        lambda self, rot, w: w.copy_(w @ rot if self.is_right_proj else rot @ w))
    monkeypatch.setitem(module_globals, "dct3_matrix", lambda n, dtype, device: _basis(n).mT.to(dtype))  # rows: cosines
    model = _model()
    with contextlib.redirect_stdout(io.StringIO()):
        opt = dct_adamw(model.parameters(), lr=1e-2, weight_decay=0.1, rank=8, proj="dct", update_proj_gap=1,
                        rotate_subspace=True, sim_type="makhoul", betas=BETAS, eps=EPS, **options)
        _train(model, opt, steps)
    return model


def _ours_dct(steps: int = 15, **keys) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model after ``steps`` steps of our ``dct`` preset (with ``keys``) at the same LR and weight decay."""
    model = _model()
    groups = [{"params": [model[0].bias, model[2].bias]},
              {"params": [model[0].weight, model[2].weight], **gradlore.presets.dct(rank=8, **keys)}]
    opt = gradlore.LowRankAdamW(groups, lr=1e-2, weight_decay=0.1)
    _train(model, opt, steps)
    return model, opt


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((x - y).detach().abs().max()) for x, y in zip(a.parameters(), b.parameters()))


def test_remap_global_matches_the_authors_rotation_once_its_two_cpu_quirks_are_removed(monkeypatch):
    """DCTAdamW with ``rotate_subspace=True`` and ``update_proj_gap=1`` is the published method with the authors'
    global step count. Two things keep it from running right on CPU: ``torch.matmul(w, R, out=w)`` multiplies
    into its own input (wrong values), and its basis is built in float32, so R = Q_prevᵀQ_crt leaks ~1e-8
    of every old row into the new ones (visible where v is tiny). With the product made out of place and an
    exact float64 basis, it equals ``remap_bias="global"``; ``"row"`` is another (deliberately different) method."""
    theirs = _authors_rotating(monkeypatch)
    assert _max_diff(_ours_dct(remap_bias="global")[0], theirs) < 1e-7  # its Makhoul twiddles are complex64
    assert _max_diff(_ours_dct(remap_bias="row")[0], theirs) > 1e-3


def test_error_feedback_matches_the_authors_dct_adamw_with_use_ef(monkeypatch):
    """DCTAdamW(use_ef=True) keeps what the projection dropped, Ξ = G' - P·Pᵀ·G', and adds it to the next
    gradient, G' = G + Ξ, before it selects columns: our ``residual="ef"`` (same two CPU quirks removed as above)."""
    theirs = _authors_rotating(monkeypatch, use_ef=True)
    ours, opt = _ours_dct(residual="ef")
    assert _max_diff(ours, theirs) < 1e-7
    buf = opt.state[ours[0].weight]["ef.buffer"]  # (s, l) = (32, 48): the oriented frame
    assert buf.shape == (32, 48) and buf.dtype == torch.float64 and float(buf.abs().max()) > 0
    assert _max_diff(_ours_dct(residual="discard")[0], theirs) > 1e-3  # the feedback matters: the test can fail


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_error_feedback_keeps_the_buffer_within_its_code_step_and_tracks_float32_feedback(bits):
    """``ef_bits`` 8 / 4: after one step Ξ̂ (decoded codes) is Ξ of the float32 feedback to within half a code step
    of its block (8-bit dynamic code: ≤ 0.9/128 + 2^-11 of the block's absmax; int4: ≤ half the group's scale), the state
    is the codes and their scales only, and 15 steps land closer to float32 feedback than no feedback does (per-step
    selection turns any rounding into other columns, so not very close: 0.21 / 0.43 of the distance here)."""
    from gradlore.optim.residual import EF_GROUP
    from gradlore.quant import code_book, dequantize_blockwise, dequantize_int4

    full_model, full = _ours_dct(steps=1, residual="ef")
    model, opt = _ours_dct(steps=1, residual="ef", ef_bits=bits)
    assert torch.equal(model[0].weight, full_model[0].weight)  # Ξ starts at zero: step 1 is the same step
    for w, fw in ((model[0].weight, full_model[0].weight), (model[2].weight, full_model[2].weight)):
        state, xi = opt.state[w], full.state[fw]["ef.buffer"].reshape(-1).float()
        assert "ef.buffer" not in state and state["ef.codes"].dtype == torch.uint8
        n = xi.numel()
        blocks = xi.view(-1, EF_GROUP) if n % EF_GROUP == 0 else None
        if bits == 8:
            assert state["ef.codes"].numel() == n
            got = dequantize_blockwise(state["ef.codes"], state["ef.absmax"], code_book("dynamic", True), EF_GROUP)
            # half the widest gap of the code book, plus the look-up table's 2^-11 (relative) near midpoints
            bound = state["ef.absmax"].repeat_interleave(EF_GROUP)[:n] * (0.9 / 128 + 2**-11)
            if blocks is not None:
                torch.testing.assert_close(state["ef.absmax"], blocks.abs().amax(1))
        else:
            assert state["ef.codes"].numel() == (n + 1) // 2
            got = dequantize_int4(state["ef.codes"], state["ef.scale"], state["ef.zero"], n, EF_GROUP)
            bound = state["ef.scale"].repeat_interleave(EF_GROUP)[:n] * 0.5 * (1 + 1e-5)
        assert float(xi.abs().max()) > 0
        assert ((got - xi).abs() <= bound).all()
    ours = _ours_dct(residual="ef", ef_bits=bits)[0]
    reference, dropped = _ours_dct(residual="ef")[0], _ours_dct(residual="discard")[0]
    assert _max_diff(ours, reference) < 0.6 * _max_diff(dropped, reference)
