"""LowRankAdamW reduced to trusted optimizers, against the peers' packages, and its state contract."""

from __future__ import annotations

import warnings

import pytest
import torch

import gradlore
from gradlore.errors import UserError
from gradlore.optim import state_bytes
from gradlore.optim.adam import adam_directions
from gradlore.optim.residual import FiraScale
from gradlore.projectors import PROJECTORS, Context

SHAPES = [(48, 32), (32, 48)]  # both orientations, rank below both sides


def grads(shape, n, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    # A gradient with a dominant low-rank part, as in LLM training, plus noise.
    out = []
    for _ in range(n):
        low = torch.randn(shape[0], 4, generator=gen, dtype=dtype) @ torch.randn(4, shape[1], generator=gen, dtype=dtype)
        out.append(low + 0.1 * torch.randn(*shape, generator=gen, dtype=dtype))
    return out


def run(opt_factory, shape, steps=10, dtype=torch.float64, seed=0):
    w = torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=dtype))
    opt = opt_factory([w])
    for g in grads(shape, steps, seed, dtype):
        w.grad = g.clone()
        opt.step()
    return w.detach()


def test_unprojected_groups_are_adamw():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(48, 32, dtype=torch.float64)), torch.nn.Parameter(torch.randn(7, dtype=torch.float64))
    a2, b2 = [torch.nn.Parameter(t.detach().clone()) for t in (a, b)]
    ours = gradlore.LowRankAdamW([{"params": [a], "rank": 8}, {"params": [b], "lr": 3e-2}], lr=1e-2, weight_decay=0.05)
    ref = torch.optim.AdamW([{"params": [b2], "lr": 3e-2}], lr=1e-2, weight_decay=0.05)
    for g1, g2 in zip(grads((48, 32), 6), grads((7, 1), 6, seed=3)):
        a.grad, b.grad, b2.grad = g1, g2[:, 0].clone(), g2[:, 0].clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(b.detach(), b2.detach(), rtol=1e-13, atol=1e-13)
    assert not torch.equal(a.detach(), a2.detach())  # the projected weight did move


def test_all_columns_projection_is_adamw_update():
    """With every column selected the projected Adam update is AdamW's, through the projector path."""
    g = grads((32, 48), 1)[0]
    for name in ("columns", "dct"):
        proj = PROJECTORS.build(name, {})
        state = {}
        r = proj.refresh(g, 32, state, Context("w", False, 0))
        if r is None:
            r = proj.down(g, state)
        m, v, step = torch.zeros_like(r), torch.zeros_like(r), torch.zeros(())
        d = adam_directions([r], [m], [v], [step], beta1=0.9, beta2=0.999, eps=1e-8)[0]
        update = proj.up(d, state, 32)
        # AdamW's first step is g / (|g| + eps) elementwise (bias corrections cancel)
        if name == "columns":
            torch.testing.assert_close(update, g / (g.abs() + 1e-8), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(proj.up(proj.down(g, state), state, 32), g, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_frugal_rank_zero_is_signsgd(shape):
    lr, wd = 1e-2, 0.1
    w0 = torch.randn(*shape, dtype=torch.float64)
    w = torch.nn.Parameter(w0.clone())
    opt = gradlore.LowRankAdamW([{"params": [w], **gradlore.presets.frugal(rank=0)}], lr=lr, weight_decay=wd)
    ref = w0.clone()
    for g in grads(shape, 5):
        w.grad = g
        opt.step()
        ref = ref * (1 - lr * wd) - lr * torch.sign(g)
    torch.testing.assert_close(w.detach(), ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("shape", SHAPES)
def test_galore_preset_matches_galore_torch(shape):
    galore_torch = pytest.importorskip("galore_torch")
    group = dict(rank=8, update_proj_gap=3, scale=0.25, proj_type="std")
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-15, weight_decay=0.0)  # eps sits differently (see adam.py)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = run(lambda p: galore_torch.GaLoreAdamW([{"params": p, **group}], no_deprecation_warning=True, **kw),
                  shape, steps=10)
    ours = run(lambda p: gradlore.LowRankAdamW([{"params": p, **gradlore.presets.galore(**group)}], **kw), shape, 10)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("shape", SHAPES)
def test_fira_at_scale_one_matches_fira_package(shape):
    fira = pytest.importorskip("fira")
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-15, weight_decay=0.0)  # eps sits differently (see adam.py)
    ref = run(lambda p: fira.FiraAdamW([{"params": p, "rank": 8, "update_proj_gap": 3, "alpha": 1.0,
                                         "proj_type": "std"}], no_deprecation_warning=True, **kw),
              shape, steps=10)
    ours = run(lambda p: gradlore.LowRankAdamW([{"params": p, **gradlore.presets.fira(rank=8, update_proj_gap=3,
                                                                                       alpha=1.0)}], **kw), shape, 10)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-11)


def test_fira_term_is_scaled_residual_and_limiter_caps_growth():
    g = grads((32, 48), 1)[0]
    proj = PROJECTORS.build("svd", {})
    state: dict = {"step": torch.tensor(1.0)}
    proj.refresh(g, 8, state, Context("w", False, 0))
    r = proj.down(g, state)
    fira = FiraScale(1.01)

    def term(fix):  # what the optimizer applies: P·low + G ⊙ col
        return proj.up(fix.low, state, 32) + g * fix.col[None, :]

    c = (1 - 0.999) ** 0.5 / (1 - 0.9)
    d = 0.5 * r + 0.01
    first = term(fira(g, r, d, state, proj, (0.9, 0.999)))
    phi = (d.norm(dim=0) / c) / (r.norm(dim=0) + 1e-8)
    dense = c * (g - proj.up(r, state, 32)) * phi[None, :]  # Fira's definition, computed densely
    torch.testing.assert_close(first, dense, rtol=1e-10, atol=1e-12)
    prev = float(state["fira.prev_norm"])
    assert first.norm() / c == pytest.approx(prev, rel=1e-9)
    second = term(fira(g, r, 10 * d, state, proj, (0.9, 0.999)))  # Adam direction 10x larger: capped at γ
    assert second.norm() / c == pytest.approx(1.01 * prev, rel=1e-8)  # Fira's +1e-8 in the ratio
    third = term(fira(g, r, 10 * d, state, proj, (0.9, 0.999)))  # still 10x the last kept norm: capped again
    assert third.norm() / c == pytest.approx(1.01**2 * prev, rel=1e-8)
    fourth = term(fira(g, r, 0.5 * d, state, proj, (0.9, 0.999)))  # shrinking is never limited
    assert fourth.norm() / c == pytest.approx(0.5 * prev, rel=1e-9)


def test_state_dtypes_survive_load():
    w = torch.nn.Parameter(torch.randn(48, 32, dtype=torch.bfloat16))
    opt = gradlore.LowRankAdamW([{"params": [w], **gradlore.presets.dct_fira(rank=8)}])
    w.grad = torch.randn_like(w)
    opt.step()
    sd = opt.state_dict()
    assert sd["state"][0]["proj.indices"].dtype == torch.int64
    assert sd["state"][0]["fira.prev_norm"].dtype == torch.float32
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = gradlore.LowRankAdamW([{"params": [w2], **gradlore.presets.dct_fira(rank=8)}])
    opt2.load_state_dict(sd)
    st = opt2.state[w2]
    assert st["proj.indices"].dtype == torch.int64 and torch.equal(st["proj.indices"], sd["state"][0]["proj.indices"])
    assert st["fira.prev_norm"].dtype == torch.float32


@pytest.mark.parametrize("preset", ["dct", "dct_galore"])
def test_dct_state_holds_indices_only(preset):
    w = torch.nn.Parameter(torch.randn(64, 96))
    opt = gradlore.LowRankAdamW([{"params": [w], **getattr(gradlore.presets, preset)(rank=8)}])
    w.grad = torch.randn_like(w)
    opt.step()
    st = opt.state[w]
    ages = set()  # the published recipe counts one step per tensor (remap_bias="row" would add remap.age)
    assert set(st) == {"step", "exp_avg", "exp_avg_sq", "refresh.t", "refresh.next", "proj.indices"} | ages
    assert st["proj.indices"].shape == (8,)
    nominal = 2 * 8 * 96 * 4 + 8 * 8 + 4 + 8 + 8 + 4 * 8 * len(ages)
    assert state_bytes(opt, include_shared=False) == nominal


@pytest.mark.parametrize("bad", [0, -1, 2.5, "8", True])
def test_bad_rank_is_a_clear_error(bad):
    w = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(UserError, match=r"rank=.* must be a positive integer"):
        gradlore.LowRankAdamW([{"params": [w], "rank": bad}])


def test_unknown_parts_list_the_valid_ones():
    w = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(UserError, match="projector='pca' is not allowed; choose one of 'svd', 'svd-int4', 'dct'"):
        gradlore.LowRankAdamW([{"params": [w], "rank": 2, "projector": "pca"}])
    with pytest.raises(UserError, match="residual='x' is not allowed; choose one of 'discard', 'fira', 'sign'"):
        gradlore.LowRankAdamW([{"params": [w], "rank": 2, "residual": "x"}])


def test_too_large_rank_and_non_matrix_train_as_adamw_with_one_warning():
    a = torch.nn.Parameter(torch.randn(8, 6, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    with pytest.warns(UserWarning, match="train as plain AdamW: a, b") as rec:
        opt = gradlore.LowRankAdamW([{"params": [a, b], "param_names": ["a", "b"], "rank": 6}], lr=1e-2)
    assert len(rec) == 1
    a2 = torch.nn.Parameter(a.detach().clone())
    ref = torch.optim.AdamW([a2], lr=1e-2, weight_decay=0.0)
    for g in grads((8, 6), 4):
        a.grad, a2.grad, b.grad = g, g.clone(), g[0, :6].clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(a.detach(), a2.detach(), rtol=1e-13, atol=1e-13)


def test_galore_style_group_works_unchanged():
    w = torch.nn.Parameter(torch.randn(48, 32))
    opt = gradlore.LowRankAdamW([{"params": [w], "rank": 8, "update_proj_gap": 200, "scale": 0.25,
                                  "proj_type": "std"}], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    w.grad = torch.randn_like(w)
    opt.step()
    sched.step()
    assert opt.state[w]["exp_avg"].shape == (8, 48)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_failed_svd_keeps_previous_basis():
    w = torch.nn.Parameter(torch.randn(48, 32))
    opt = gradlore.LowRankAdamW([{"params": [w], "param_names": ["layer.w"], "rank": 8, "update_proj_gap": 1}])
    w.grad = torch.randn_like(w)
    opt.step()
    basis = opt.state[w]["proj.basis"].clone()
    w.grad = torch.full_like(w, float("nan"))
    with pytest.warns(RuntimeWarning, match="layer.w"):
        opt.step()
    assert torch.equal(opt.state[w]["proj.basis"], basis)


@pytest.mark.parametrize("projector", ["svd", "dct"])
def test_lazy_refresh_doubles_the_gap_only_for_a_stable_subspace(projector):
    def gap_after(stable: bool) -> int:
        w = torch.nn.Parameter(torch.zeros(48, 32, dtype=torch.float64))
        opt = gradlore.LowRankAdamW([{"params": [w], "rank": 8, "projector": projector, "update_proj_gap": 2,
                                      "refresh": "lazy", "lazy_window": 2}], lr=1e-3)
        fixed = grads((48, 32), 1)[0]
        for g in grads((48, 32), 7, seed=9):
            w.grad = fixed.clone() if stable else torch.randn_like(g)
            opt.step()
        return int(opt.state[w]["refresh.gap"])

    assert gap_after(stable=True) == 4  # refreshes at 0, 2, 4 agree -> gap doubles
    assert gap_after(stable=False) == 2


def test_state_bytes_counts_views_in_full_and_walks_objects():
    class Holder:
        def __init__(self, t):
            self.matrix = t

    whole = torch.zeros(100, 10)  # 4000 bytes
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    opt.state[opt.param_groups[0]["params"][0]] = {"proj": Holder(whole[:2]), "again": [whole[5:]]}
    assert state_bytes(opt, include_shared=False) == 4000
