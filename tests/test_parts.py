"""One battery over every registered part, generated from the registries: a part is tested the moment it is
registered. Every projector × residual × refresh rule × moment policy with fp32 state in float32 and bfloat16,
a covering subset of them in float64, and every compact state format against every projector and moment
policy, each residual and refresh rule (``_battery``), in both orientations, must save, load with
``weights_only=True`` and continue bit-exactly (layer-wise mode too; the unprojected group uses the same state
format); the identity projector must reduce to AdamW under every other part (with fp32 moments); a combination
the parts forbid (a moment policy that follows basis indices on a projector without them, or on a compact state
format) is refused with a named error; every projector satisfies its contract
for any shape and rank (hypothesis); every registered option rejects a typo of its key and an illegal
value with a named error."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradlore
from gradlore.errors import UserError
from gradlore.optim.parts import (
    ADAMW_OPTIONS,
    GROUP_OPTIONS,
    ON_REFRESH,
    PROJECTION_OPTIONS,
    RESIDUALS,
    SLOTS,
)
from gradlore.projectors import PROJECTORS, REFRESH, Context


def _legal(projector: str, residual: str, refresh: str, on_refresh: str, state: str) -> bool:
    """A moment policy that moves rows with their basis index (remap) needs a projector that selects indices, and
    fp32 moments (rows of their own)."""
    needs = getattr(ON_REFRESH.entry(on_refresh).factory, "needs_indices", False)
    return not needs or (getattr(PROJECTORS.entry(projector).factory, "selects_indices", False) and state == "fp32")


ALL_COMBOS = list(itertools.product(*(list(registry) for registry in SLOTS.values())))
COMBOS = [c for c in ALL_COMBOS if _legal(*c)]
ILLEGAL = [c for c in ALL_COMBOS if not _legal(*c)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _battery() -> list[tuple[tuple[str, ...], torch.dtype]]:
    """(combo, dtype) pairs of the save/load/continue battery, sized for the default suite's time budget.

    fp32 state: every legal combo in float32 and bfloat16; in float64 the combos whose residual and refresh rule
    pair diagonally (residual i with refresh i mod n), so every projector × policy still meets each residual and
    each refresh rule there. A compact state format stores the moments whatever the projection does, so it runs
    against every projector and moment policy with the diagonal (residual, refresh) pairs, in float32 and
    bfloat16."""
    slots = list(SLOTS)
    residuals, refreshes = list(SLOTS["residual"]), list(SLOTS["refresh"])
    out = []
    for combo in COMBOS:
        parts = dict(zip(slots, combo))
        diagonal = residuals.index(parts["residual"]) % len(refreshes) == refreshes.index(parts["refresh"])
        if parts["state"] == "fp32":
            out += [(combo, d) for d in DTYPES if d != torch.float64 or diagonal]
        elif diagonal:
            out += [(combo, d) for d in (torch.float32, torch.bfloat16)]
    return out


def _state(state: str) -> dict:
    """The state format of every group; tiny tensors are quantized too (the default keeps them fp32)."""
    return {"state": state} if state == "fp32" else {"state": state, "quant_min_size": 1, "quant_block": 20}


def _group(*combo: str) -> dict:
    parts = dict(zip(SLOTS, combo))
    group = {"rank": 8, **parts, "update_proj_gap": 4, **_state(parts["state"])}
    if parts["refresh"] == "lazy":  # grow the gap at every refresh, so the lazy state changes inside the window
        group.update(lazy_threshold=0.0, lazy_window=1)
    return group


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)  # 32→48 and 48→32: both orientations, rank below both sides
    return torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Tanh(), torch.nn.Linear(48, 32)).to(dtype)


def _optimizer(model: torch.nn.Module, group: dict, layerwise: bool) -> torch.optim.Optimizer:
    plain = {"params": [model[0].bias, model[2].bias], "param_names": ["in.bias", "out.bias"], **_state(group["state"])}
    groups = [plain,
              {"params": [model[0].weight, model[2].weight], "param_names": ["in", "out"], **group}]
    if layerwise:
        return gradlore.layerwise(groups, lr=1e-2, weight_decay=0.01)
    return gradlore.LowRankAdamW(groups, lr=1e-2, weight_decay=0.01)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, start: int, stop: int) -> None:
    gen = torch.Generator().manual_seed(123)
    dtype = next(model.parameters()).dtype
    xs = [torch.randn(16, 32, generator=gen).to(dtype) for _ in range(stop)]
    for x in xs[start:]:
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()


@pytest.mark.parametrize("layerwise", [False, True], ids=["plain", "layerwise"])
@pytest.mark.parametrize("combo,dtype", _battery(), ids=lambda x: "-".join(x) if isinstance(x, tuple) else str(x))
def test_save_load_continue_is_bit_exact(combo, dtype, layerwise):
    """Refreshes at 0, 4 and 12 (lazy: 0, 4, 12 too, its gap growing): the continued window holds one."""
    _check_resume(_group(*combo), dtype, layerwise)


@pytest.mark.parametrize("layerwise", [False, True], ids=["plain", "layerwise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("projector,on_refresh", [("dct", "remap"), ("svd", "keep")])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_error_feedback_saves_loads_and_continues_bit_exact(bits, projector, on_refresh, dtype, layerwise):
    """``ef_bits`` 8 and 4: the codes and their scales are the state; a resumed run continues exactly."""
    _check_resume({**_group(projector, "ef", "every", on_refresh, "fp32"), "ef_bits": bits}, dtype, layerwise)


def _check_resume(group: dict, dtype: torch.dtype, layerwise: bool) -> None:
    ref_model = _model(dtype)
    ref = _optimizer(ref_model, group, layerwise)
    _train(ref_model, ref, 0, 14)

    model = _model(dtype)
    opt = _optimizer(model, group, layerwise)
    _train(model, opt, 0, 6)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # tensors and plain values only
    model2 = _model(dtype)
    model2.load_state_dict(ckpt["model"])
    opt2 = _optimizer(model2, group, layerwise)
    opt2.load_state_dict(ckpt["opt"])
    params = [p for g in opt2.param_groups for p in g["params"]]
    for pid, saved in ckpt["opt"]["state"].items():  # every saved state tensor keeps its dtype
        assert {k: v.dtype for k, v in opt2.state[params[pid]].items()} == {k: v.dtype for k, v in saved.items()}
    _train(model2, opt2, 6, 14)
    for a, b in zip(ref_model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
        assert torch.isfinite(a).all()


def test_the_battery_covers_every_policy_and_each_illegal_combination_is_refused():
    slots = list(SLOTS)
    battery = [dict(zip(slots, c)) for c, _ in _battery()]
    for fmt in SLOTS["state"]:  # every part meets every state format
        for slot in ("projector", "residual", "refresh", "on_refresh"):
            legal = {c[slots.index(slot)] for c in COMBOS if c[-1] == fmt}
            assert {b[slot] for b in battery if b["state"] == fmt} == legal, (fmt, slot)
    for p, policy in {(c[0], c[3]) for c in COMBOS}:  # every projector × policy meets every residual and refresh
        for slot in ("residual", "refresh"):
            assert {b[slot] for b in battery if (b["projector"], b["on_refresh"]) == (p, policy)} == set(SLOTS[slot])
    for p in PROJECTORS:  # and runs in every dtype
        assert {d for c, d in _battery() if c[0] == p} == set(DTYPES), p
    assert {c[3] for c in COMBOS} == set(ON_REFRESH)  # every policy runs under some projector
    assert ILLEGAL and {c[0] for c in ILLEGAL if c[-1] == "fp32"} == {
        p for p in PROJECTORS if not PROJECTORS.entry(p).factory.selects_indices}
    w = torch.nn.Parameter(torch.zeros(16, 12))
    for combo in ILLEGAL:
        if not PROJECTORS.entry(combo[0]).factory.selects_indices:
            match = (rf"on_refresh='{combo[3]}'.*projector='{combo[0]}' does not select basis indices.*Fix: use a "
                     r"projector that does \('dct', 'columns'")
        else:  # an index-selecting projector with a compact state format
            match = rf"on_refresh='{combo[3]}'.*state='{combo[4]}' keeps moments in blocks.*Fix: state='fp32'"
        with pytest.raises(UserError, match=match):
            gradlore.LowRankAdamW([{"params": [w], **_group(*combo)}])


def _adamw_run(shape: tuple[int, int], make, steps: int = 9) -> torch.Tensor:
    w = torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    opt = make([w])
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        w.grad = torch.randn(*shape, generator=gen, dtype=torch.float64)
        opt.step()
    return w.detach()


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
@pytest.mark.parametrize("combo", [c for c in COMBOS if c[0] == "identity" and c[-1] == "fp32"], ids="-".join)
def test_identity_projector_reduces_to_adamw_under_every_part(combo, shape):
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ref = _adamw_run(shape, lambda p: torch.optim.AdamW(p, foreach=False, **kw))
    ours = _adamw_run(shape, lambda p: gradlore.LowRankAdamW([{"params": p, **_group(*combo), "scale": 1.0}], **kw))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(list(PROJECTORS)), s=st.integers(2, 24), extra=st.integers(0, 24),
       rank_frac=st.floats(0.0, 0.99), transposed=st.booleans(), seed=st.integers(0, 2**31))
def test_projector_contract(name, s, extra, rank_frac, transposed, seed):
    """down = Pᵀ·, up = P·, P orthonormal (s, r), gram = PᵀP or None, state = tensors, indices sorted."""
    rank = 1 + int(rank_frac * (s - 1))  # 1 <= rank < s, or s when s = 1 (kept >= 2 above)
    rank = min(rank, s - 1)
    l = s + extra
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(s, l, generator=gen, dtype=torch.float64)
    proj = PROJECTORS.build(name, {})
    state: dict = {}
    r = proj.refresh(g, rank, state, Context("w", transposed, seed))
    if r is None:
        r = proj.down(g, state)
    p = proj.basis(state, s, rank, g.dtype, g.device)  # (s, r)
    k = p.shape[1]  # the identity keeps the whole space
    assert p.shape == (s, k) and r.shape == (k, l)
    quantized = getattr(proj, "quantizes", None)  # stores another projector's basis in fewer bits
    tol = 1e-5 if name == "svd" or quantized else 1e-10  # the SVD runs in float32 by design
    if quantized:  # within the rounding bound of the exact basis, not orthonormal
        exact_state: dict = {}
        exact = PROJECTORS.build(quantized, {})
        exact.refresh(g, rank, exact_state, Context("w", transposed, seed))
        exact_p = exact.basis(exact_state, s, rank, g.dtype, g.device)
        assert (p - exact_p).abs().max() <= state["proj.scale"].max() / 2 * (1 + 1e-5) + 1e-7
    else:
        torch.testing.assert_close(p.mT @ p, torch.eye(k, dtype=g.dtype), atol=tol, rtol=0)
    torch.testing.assert_close(r, p.mT @ g, atol=tol, rtol=tol)
    torch.testing.assert_close(proj.down(g, state), p.mT @ g, atol=tol, rtol=tol)
    x = torch.randn(k, l, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(proj.up(x, state, s), p @ x, atol=1e-12, rtol=1e-12)
    out = torch.randn(s, l, generator=gen, dtype=torch.float64)
    expected = out - 0.5 * (p @ x)
    proj.up_add_(out, x, state, -0.5)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    gram = proj.gram(state, s)
    if gram is not None:
        close = 1e-6 if quantized else 1e-12  # a quantized basis' Gram matrix is computed in float32
        torch.testing.assert_close(gram.to(p.dtype), p.mT @ p, atol=close, rtol=close)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    if proj.selects_indices:
        idx = state["proj.indices"]
        assert idx.dtype == torch.int64 and idx.shape == (rank,)
        assert bool((idx[1:] > idx[:-1]).all()) and 0 <= int(idx.min()) and int(idx.max()) < s


def _options() -> list[tuple[str, str, object]]:
    """(key, the part that declares it, its Option) for every registered option, and the optimizer's own."""
    out = [(k, "adamw", o) for k, o in ADAMW_OPTIONS.items()]
    out += [(k, "every group", o) for k, o in GROUP_OPTIONS.items()]
    out += [(k, "projection", o) for k, o in PROJECTION_OPTIONS.items()]
    for slot, registry in SLOTS.items():
        for name in registry:
            out += [(k, f"{slot}={name}", o) for k, o in registry.options(name).items()]
    return out


def _group_choosing(owner: str) -> dict:
    group = {"params": [torch.nn.Parameter(torch.zeros(16, 12))], "rank": 4}
    if "=" in owner:
        slot, name = owner.split("=")
        group[slot] = name
        if slot == "on_refresh" and not _legal("svd", "discard", "every", name, "fp32"):
            group["projector"] = "dct"  # a legal group, so only the option under test is wrong
    return group


def _bad_value(opt) -> object:
    if opt.choices is not None:
        return f"{opt.choices[0]}X"
    if opt.check is not None:
        for v in (-1, 0, 0.5, 1, -0.5, (2.0, 0.5)):
            if opt._has_kind(v) and not opt.check(v):
                return v
    return "oops"


@pytest.mark.parametrize("key,owner,opt", _options(), ids=[f"{o}:{k}" for k, o, _ in _options()])
def test_every_option_names_a_typo_and_an_illegal_value(key, owner, opt):
    if key in ("rank", "fused"):  # the key that makes a group projected; a tri-state flag with no wrong value
        pass
    typo = key[:-1] + key[-1] * 2  # 'fira_gamma' -> 'fira_gammaa'
    group = _group_choosing(owner) | {typo: opt.default}
    with pytest.raises(UserError, match=rf"unknown key '{typo}'\. Did you mean .*'{key}'"):
        gradlore.LowRankAdamW([group])
    if key == "fused":
        return  # None, True and False are all legal
    bad = _bad_value(opt)
    group = _group_choosing(owner) | {key: bad}
    with pytest.raises(UserError, match=rf"{key}="):
        gradlore.LowRankAdamW([group])


def test_an_option_of_a_part_not_chosen_is_named():
    w = torch.nn.Parameter(torch.zeros(16, 12))
    with pytest.raises(UserError, match=r"'fira_gamma' is an option of residual='fira'.*residual='discard'"):
        gradlore.LowRankAdamW([{"params": [w], "rank": 4, "fira_gamma": 1.05}])
    with pytest.raises(UserError, match=r"'update_proj_gap' is a projection option but the group has no 'rank'"):
        gradlore.LowRankAdamW([{"params": [w], "update_proj_gap": 50}])


def test_registries_are_closed_and_defaults_live_with_the_parts():
    assert set(SLOTS) == {"projector", "residual", "refresh", "on_refresh", "state"}
    assert RESIDUALS.options("fira")["fira_gamma"].default == 1.01
    assert REFRESH.options("lazy")["lazy_window"].default == 5
    w = torch.nn.Parameter(torch.zeros(16, 12))
    group = gradlore.LowRankAdamW([{"params": [w], "rank": 4, "refresh": "lazy"}]).param_groups[0]
    assert group["lazy_threshold"] == 0.4 and group["update_proj_gap"] == 200 and "fira_gamma" not in group
    with pytest.raises(UserError, match=r"refresh='lasy' is not allowed.*Did you mean 'lazy'"):
        gradlore.LowRankAdamW([{"params": [w], "rank": 4, "refresh": "lasy"}])
