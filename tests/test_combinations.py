"""Combinations of features built on separate branches: compact state formats and bf16 weights (memory),
row-moving moment policies (remap), several processes. What works together is checked against a reference; what
cannot is refused with a named error and its fix."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradlore  # noqa: E402
from gradlore.cli import build_parser  # noqa: E402
from gradlore.errors import UserError  # noqa: E402
from gradlore.optim.build import OptimConfig  # noqa: E402
from gradlore.optim.lowrank_adamw import check_parallel  # noqa: E402
from gradlore.train.cli import resolve_args  # noqa: E402
from gradlore.train.presets import preset  # noqa: E402


@pytest.mark.parametrize("state", ["8bit", "factored"])
def test_remap_with_a_compact_state_format_is_refused(state):
    with pytest.raises(UserError, match=rf"on_refresh='remap'.*state='{state}'.*Fix: state='fp32'"):
        OptimConfig(name="dct", rank=8, state=state).validate()
    OptimConfig(name="dct-galore", rank=8, state=state).validate()  # keep: any format
    OptimConfig(name="dct", rank=8, state="fp32", plain_state=state).validate()  # unprojected states: any format


@pytest.mark.parametrize("field,value", [("memory.weights", "bf16"), ("optim.state", "8bit"),
                                         ("optim.plain_state", "factored")])
def test_parallel_refuses_narrow_weights_and_compact_states(field, value):
    cfg = preset("tiny")
    cfg.train.parallel = "fsdp2"
    section, name = field.split(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(UserError, match=rf"train.parallel=fsdp2: {field}={value} is not supported.*Fix:"):
        cfg.validate()


def test_the_optimizer_refuses_what_its_sharded_step_cannot_do():
    wide, narrow = torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.bfloat16))
    check_parallel({"state": "fp32", "params": [wide]}, True)
    check_parallel({"state": "8bit", "params": [narrow]}, False)  # one process: anything
    with pytest.raises(UserError, match=r"state='8bit' is not supported on several processes.*Fix:"):
        check_parallel({"state": "8bit", "params": [wide]}, True)
    with pytest.raises(UserError, match=r"torch.bfloat16 weights are not supported on several processes.*Fix:"):
        check_parallel({"state": "fp32", "params": [wide, narrow]}, True)
    with pytest.raises(UserError, match=r"residual='ef' \(error feedback\) is not supported on several.*Fix:"):
        check_parallel({"state": "fp32", "residual": "ef", "params": [wide]}, True)
    check_parallel({"state": "fp32", "residual": "ef", "params": [wide]}, False)


def test_parallel_refuses_error_feedback_before_training():
    cfg = preset("tiny")
    cfg.optim.name = "dct"
    cfg.optim.overrides = {"residual": "ef"}
    cfg.validate()  # one process: fine
    cfg.train.parallel = "ddp"
    with pytest.raises(UserError, match=r"train.parallel=ddp: optim.residual=ef .*not supported.*Fix:"):
        cfg.validate()


def _args(*argv: str):
    return build_parser().parse_args(["train", "--preset", "tiny", *argv])


def test_memory_low_keeps_remap_moments_fp32_and_every_other_state_8bit(capsys):
    cfg, _ = resolve_args(_args("--optimizer", "dct", "--memory", "low"))
    assert (cfg.optim.state, cfg.optim.plain_state) == ("fp32", "8bit")
    assert "keeps dct's projected moments in fp32" in capsys.readouterr().err
    cfg, _ = resolve_args(_args("--optimizer", "galore", "--memory", "low"))  # keep: 8-bit projected moments too
    assert (cfg.optim.state, cfg.optim.plain_state) == ("8bit", "8bit")
    with pytest.raises(UserError, match=r"on_refresh='remap'.*state='8bit'.*Fix: state='fp32'"):  # the user's own
        resolve_args(_args("--optimizer", "dct", "--memory", "low", "--set", "optim.state=8bit"))


@pytest.mark.parametrize("residual", ["discard", "ef", "ef:8", "ef:4", "fira"])
@pytest.mark.parametrize("remap_bias", ["row", "global"])
@pytest.mark.parametrize("skip_at", [1, 3])  # a step between refreshes (per-row ages) and a refresh step
def test_a_skipped_step_under_remap_changes_nothing_but_the_refresh_clock(skip_at, remap_bias, residual):
    """found_inf (layer-wise mode's non-finite gradient) with remap: weight, moments, ages, count and the residual
    rule's state (error feedback's buffer keeps itself without a copy, Fira's norm is restored) stay."""
    w = torch.nn.Parameter(torch.randn(24, 40, generator=torch.Generator().manual_seed(0)))
    opt = gradlore.LowRankAdamW([{"params": [w], "rank": 6, "projector": "dct", "on_refresh": "remap",
                                  "remap_bias": remap_bias, "update_proj_gap": 3, "scale": 1.0,
                                  "residual": residual.split(":")[0],
                                  **({"ef_bits": int(residual[3:])} if ":" in residual else {})}],
                                lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    for t in range(6):
        if t == skip_at:
            before = w.detach().clone()
            saved = {k: v.clone() for k, v in opt.state[w].items()}
            w.grad = torch.full((24, 40), float("nan"))
            opt.found_inf = torch.ones(())
            opt.step()
            assert torch.equal(w, before)
            assert saved.keys() == opt.state[w].keys()
            for k, v in opt.state[w].items():
                assert k.startswith("refresh.") or torch.equal(v, saved[k]), k
        w.grad = torch.randn(24, 40, generator=gen)
        opt.found_inf = torch.zeros(())
        opt.step()
        assert torch.isfinite(w).all()
    assert ("remap.age" in opt.state[w]) == (remap_bias == "row")
    assert {"ef": "ef.buffer", "ef:8": "ef.absmax", "ef:4": "ef.zero", "fira": "fira.prev_norm"}.get(
        residual, "step") in opt.state[w]


@pytest.mark.parametrize("bits,batches", [(32, [2]), (8, [1, 1]), (4, [1, 1])])
def test_quantized_error_feedback_steps_its_weights_one_at_a_time(monkeypatch, bits, batches):
    """With ``ef_bits`` < 32, G + Ξ̂ is a float32 temporary of the weight's size: the group's weights are stepped one
    by one so that only one such temporary lives at a time (float32 feedback keeps its one fused call)."""
    ws = [torch.nn.Parameter(torch.randn(24, 40)), torch.nn.Parameter(torch.randn(40, 24))]
    opt = gradlore.LowRankAdamW([{"params": ws, "rank": 6, "projector": "dct", "residual": "ef", "ef_bits": bits}])
    seen = []
    real = opt._projected_step
    monkeypatch.setattr(opt, "_projected_step", lambda gi, group, idx, found_inf: (seen.append(len(idx)),
                                                                                    real(gi, group, idx, found_inf)))
    for w in ws:
        w.grad = torch.randn_like(w)
    opt.step()
    assert seen == batches
