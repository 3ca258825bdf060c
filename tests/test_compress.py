"""Unit tests of WeLore's parts: the factored layer, spectra and their cache, the global-threshold allocation,
perplexity windows. Float64, non-square weights in both orientations with rank below both sides."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from gradlore.compress.allocate import allocate, normalized_scores
from gradlore.compress.eval import perplexity, windows
from gradlore.compress.lowrank_linear import LowRankLinear, dense_weight, svd_factors
from gradlore.compress.spectrum import collect_activation_stats, find_targets, spectra_cached
from gradlore.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHAPES = [(48, 32), (32, 48)]


def _lowrank_matrix(m: int, n: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, n, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------------------- factored layer
@pytest.mark.parametrize("shape", SHAPES)
def test_full_rank_factorisation_reproduces_dense_layer_with_bias(shape):
    out_f, in_f = shape
    dense = nn.Linear(in_f, out_f, bias=True, dtype=torch.float64)
    with torch.no_grad():
        dense.bias.normal_()
    layer = LowRankLinear.from_dense(dense, rank=min(shape))
    x = torch.randn(5, 7, in_f, dtype=torch.float64)
    assert layer.weight_a.dtype == torch.float64 and layer.bias is not None
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.to_dense(), dense.weight, rtol=1e-10, atol=1e-10)


def test_conv1d_is_read_in_linear_convention():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(nf=24, nx=40).double()  # weight (in=40, out=24)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    assert dense_weight(conv).shape == (24, 40)
    layer = LowRankLinear.from_dense(conv, rank=24)
    x = torch.randn(3, 40, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_truncation_error_equals_tail_singular_values(shape):
    w = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sigma = torch.linalg.svdvals(w)
    for r in (1, 8, 20):
        a, b = svd_factors(w, r)
        assert a.shape == (r, shape[1]) and b.shape == (shape[0], r)
        err = w - b @ a
        torch.testing.assert_close(torch.linalg.matrix_norm(err), sigma[r:].square().sum().sqrt())
        torch.testing.assert_close(torch.linalg.matrix_norm(err, ord=2), sigma[r])
        # both factors carry √S: equal Frobenius norms
        torch.testing.assert_close(a.norm(), b.norm())


def test_lowrank_weight_is_recovered_exactly_at_its_rank():
    w = _lowrank_matrix(48, 32, 8)
    a, b = svd_factors(w, 8)
    torch.testing.assert_close(b @ a, w, rtol=1e-9, atol=1e-9)


# -------------------------------------------------------------------------------------------- allocation
def _spectra(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (m, n) in enumerate(shapes):
        k = min(m, n)
        decay = 0.02 + 0.3 * torch.rand(1, generator=g).item()  # each matrix decays at its own rate
        out[f"layer{i}"] = torch.exp(-decay * torch.arange(k, dtype=torch.float64)) + 0.01 * torch.rand(k, generator=g, dtype=torch.float64)
    return {k: v.sort(descending=True).values for k, v in out.items()}


ALLOC_SHAPES = [(64, 64), (48, 96), (96, 48), (32, 64), (128, 32), (64, 64)]


@pytest.mark.parametrize("method", ["welore", "uniform"])
def test_allocation_meets_budget_within_one_rank_and_is_monotone(method):
    spectra = _spectra(ALLOC_SHAPES)
    shapes = {f"layer{i}": s for i, s in enumerate(ALLOC_SHAPES)}
    total = sum(m * n for m, n in ALLOC_SHAPES)
    per_layer = sum(m + n for m, n in ALLOC_SHAPES) / total  # one rank in every layer
    one_step = max(m + n for m, n in ALLOC_SHAPES) / total  # one rank of the widest matrix
    previous = None
    for budget in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7):
        al = allocate(spectra, shapes, remove=budget, method=method)
        assert al.removed_fraction >= budget - 1e-12
        assert al.removed_fraction - budget <= per_layer + 1e-12, (budget, al.removed_fraction)
        if method == "welore":  # distinct singular values: the threshold moves one rank of one matrix at a time
            assert al.removed_fraction - budget <= one_step + 1e-12, (budget, al.removed_fraction)
        # accounting is consistent with the ranks
        cost = sum(al.ranks[n] * (m + k) if al.lrc[n] else m * k for n, (m, k) in shapes.items())
        assert cost == al.params_after
        if previous is not None:  # more removed => no rank grows
            assert all(al.ranks[n] <= previous.ranks[n] for n in shapes)
            assert al.threshold >= previous.threshold
        previous = al


def test_welore_is_nonuniform_and_uniform_is_uniform():
    spectra = _spectra(ALLOC_SHAPES)
    shapes = {f"layer{i}": s for i, s in enumerate(ALLOC_SHAPES)}
    w = allocate(spectra, shapes, remove=0.3, method="welore")
    u = allocate(spectra, shapes, remove=0.3, method="uniform")
    per_matrix_u = [1 - u.ranks[n] * (m + k) / (m * k) for n, (m, k) in shapes.items()]
    assert max(per_matrix_u) - min(per_matrix_u) < 0.05  # every matrix loses about the same share
    per_matrix_w = [1 - (w.ranks[n] * (m + k) if w.lrc[n] else m * k) / (m * k) for n, (m, k) in shapes.items()]
    assert max(per_matrix_w) - min(per_matrix_w) > 0.2  # fast-decaying spectra lose more
    # the matrix whose normalised spectrum decays fastest is compressed hardest
    decay = {n: float(normalized_scores(s)[min(shapes[n]) // 4]) for n, s in spectra.items()}
    fastest = min(decay, key=decay.get)
    assert w.lrc[fastest]


def test_rank_reduction_budget_and_min_ratio():
    spectra = _spectra(ALLOC_SHAPES)
    shapes = {f"layer{i}": s for i, s in enumerate(ALLOC_SHAPES)}
    al = allocate(spectra, shapes, rank_reduction=0.5)
    assert 0.5 <= al.rank_reduction <= 0.5 + max(min(s) for s in ALLOC_SHAPES) / sum(min(s) for s in ALLOC_SHAPES)
    strict = allocate(spectra, shapes, remove=0.2, min_ratio=0.3)
    for n, (m, k) in shapes.items():
        if strict.lrc[n]:  # every LRC saves at least 30% of its own parameters
            assert strict.ranks[n] * (m + k) < 0.7 * m * k
        else:
            assert strict.ranks[n] == min(m, k)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_budget_outside_open_interval_is_a_user_error(bad):
    shapes = {"a": (8, 8)}
    with pytest.raises(UserError, match="between 0 and 1"):
        allocate({"a": torch.ones(8)}, shapes, remove=bad)


def test_unreachable_budget_is_a_user_error():
    with pytest.raises(UserError, match="unreachable"):
        allocate(_spectra([(64, 64)]), {"layer0": (64, 64)}, remove=0.99)


# ------------------------------------------------------------------------------------- targets & caching
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.block = nn.ModuleDict({"up": nn.Linear(16, 40), "down": nn.Linear(40, 16)})
        self.head = nn.Linear(16, 50, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids):  # noqa: ANN001, ANN201
        h = self.embed(input_ids)
        return self.head(self.block["down"](torch.relu(self.block["up"](h))))


def test_targets_default_exclude_head_and_bad_names_list_candidates():
    model = _Tiny()
    assert list(find_targets(model)) == ["block.up", "block.down"]
    assert "head" in find_targets(model, include_head=True)
    assert list(find_targets(model, ["down"])) == ["block.down"]
    with pytest.raises(UserError, match="candidates: .*down.*up"):
        find_targets(model, ["q_proj"])
    no_linear = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(UserError, match="no linear layers"):
        find_targets(no_linear)


def test_spectrum_cache_is_reused_and_a_foreign_cache_is_detected(tmp_path):
    torch.manual_seed(0)
    a, b = _Tiny(), _Tiny()
    ma, mb = find_targets(a), find_targets(b)
    s1, path = spectra_cached(ma, cache_dir=tmp_path)
    assert path is not None and path.exists()
    for n, m in ma.items():
        torch.testing.assert_close(s1[n], torch.linalg.svdvals(m.weight.float()))
    mtime = path.stat().st_mtime_ns
    s2, path2 = spectra_cached(ma, cache_dir=tmp_path)  # second call reads the file
    assert path2 == path and path.stat().st_mtime_ns == mtime
    assert all(torch.equal(s1[n], s2[n]) for n in s1)
    before = path.read_bytes()
    with pytest.raises(UserError, match="different model"):
        spectra_cached(mb, cache_file=path)
    assert path.read_bytes() == before  # nothing overwritten


def test_whitened_truncation_minimises_output_error():
    torch.manual_seed(0)
    model = _Tiny().double()
    mods = find_targets(model)
    # correlated, anisotropic inputs make the data-aware basis differ from the weight's own
    ids = torch.randint(0, 50, (4, 32))
    model.embed.weight.data = model.embed.weight.data @ torch.diag(torch.logspace(0, -2, 16, dtype=torch.float64))
    stats = collect_activation_stats(model, mods, ids)
    stats.damping = 1e-10  # the pure whitening optimum (the default ridge trades a little of it for robustness)
    x = model.embed(ids).reshape(-1, 16).detach()  # inputs of block.up
    w = model.block["up"].weight.detach()
    from gradlore.compress.welore import _factorize

    for r in (2, 4, 8):
        free = _factorize(model.block["up"], "block.up", r, None, None)
        aware = _factorize(model.block["up"], "block.up", r, "whiten", stats)
        err_free = (x @ (w - free.to_dense().double()).T).norm()
        err_aware = (x @ (w - aware.to_dense().double()).T).norm()
        assert err_aware <= err_free * (1 + 1e-4), (r, err_aware, err_free)
    assert stats.tokens == ids.numel()


# ----------------------------------------------------------------------------------------------- perplexity
class _Uniform(nn.Module):
    """Predicts every token with probability 1/V: perplexity must be exactly V."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):  # noqa: ANN001, ANN201
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab) + self.dummy})()


@pytest.mark.parametrize("context,stride", [(16, 16), (16, 4), (10, 7)])
def test_perplexity_windows_and_token_count(context, stride):
    ids = torch.randint(0, 30, (103,))
    res = perplexity(_Uniform(30), ids, context=context, stride=stride, batch_size=3)
    assert math.isclose(res.perplexity, 30.0, rel_tol=1e-6)
    wins = windows(103, context, stride)
    assert res.tokens_scored == sum(e - b - max(f, 1) for b, e, f in wins)
    if stride < context:
        assert res.tokens_scored == 102  # every token but the first is scored exactly once
    else:
        assert res.tokens_scored == 103 - len(wins)
    scored = [b + i for b, e, f in wins for i in range(max(f, 1), e - b)]
    assert len(scored) == len(set(scored))
    with pytest.raises(UserError, match="stride"):
        windows(100, 16, 32)
