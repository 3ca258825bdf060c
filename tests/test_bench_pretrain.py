"""``gradlore bench pretrain``'s protocol without training: which runs it asks for (sweep on the first seed, the
other seeds at each method's best LR, per-step methods keep their gap, variants), and its tables (mean ± s.d.
over seeds, paired differences to a reference)."""

from __future__ import annotations

import argparse
import json
import statistics

import pytest

from gradlore.bench import pretrain
from gradlore.errors import UserError


def _args(**kw) -> argparse.Namespace:
    args = pretrain.build_parser(argparse.ArgumentParser()).parse_args([])
    args.variants = dict(pretrain.VARIANTS)
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def _sets(cmd: list[str]) -> dict[str, str]:
    return dict(cmd[i + 1].split("=", 1) for i, a in enumerate(cmd) if a == "--set")


def test_per_step_methods_keep_their_gap_and_variants_become_overrides(tmp_path):
    args = _args(gap=50)
    galore = _sets(pretrain._train_args(args, "galore", 1e-2, 0, tmp_path))
    dct = pretrain._train_args(args, "dct", 1e-3, 2, tmp_path)
    columns = pretrain._train_args(args, "columns-remap", 1e-3, 0, tmp_path)
    assert galore["optim.update_proj_gap"] == "50"
    assert "optim.update_proj_gap" not in _sets(dct) and "optim.update_proj_gap" not in _sets(columns)
    assert dct[dct.index("--seed") + 1] == "2" and dct[dct.index("--optimizer") + 1] == "dct"
    assert columns[columns.index("--optimizer") + 1] == "dct"
    assert json.loads(_sets(columns)["optim.overrides"]) == {"projector": "columns"}
    dct_galore = _sets(pretrain._train_args(args, "dct-galore", 3e-3, 0, tmp_path))
    assert dct_galore["optim.update_proj_gap"] == "50"  # GaLore-style: the benchmark's interval


def test_variant_parsing_names_the_mistake():
    label, (name, overrides) = pretrain.parse_variant('dct-l2=dct {"dct_norm": "l2"}')
    assert (label, name, overrides) == ("dct-l2", "dct", {"dct_norm": "l2"})
    with pytest.raises(UserError, match="expected 'LABEL=OPTIMIZER"):
        pretrain.parse_variant("x=dct {not json}")
    with pytest.raises(UserError, match="unknown optimizer 'dtc'"):
        pretrain.parse_variant("x=dtc")


def _result(method, lr, seed, ppl):
    return {"method": method, "lr": lr, "seed": seed, "final_val_ppl": ppl, "status": "completed",
            "tokens_per_s": 1000.0, "opt_state_bytes": 2**20, "peak_rss_bytes": 2**29, "run_dir": "x"}


def test_sweep_on_the_first_seed_then_mean_sd_and_paired_differences():
    results = [_result("galore", 3e-3, 0, 120.0), _result("galore", 1e-2, 0, 110.0),
               _result("dct", 1e-3, 0, 109.0), _result("dct", 3e-3, 0, 130.0),
               _result("galore", 1e-2, 1, 100.0), _result("dct", 1e-3, 1, 102.0),
               _result("galore", 1e-2, 2, 120.0), _result("dct", 1e-3, 2, 117.6),
               _result("dct", 3e-3, 1, 90.0)]  # not the best LR on seed 0: ignored
    assert pretrain.best_lrs(results, ["galore", "dct"], 0) == {"galore": 1e-2, "dct": 1e-3}
    best, paired, sweep, runs = pretrain.tables(results, ["galore", "dct"], [0, 1, 2], "galore")
    assert [r["seed"] for r in runs["dct"]] == [0, 1, 2] and {r["lr"] for r in runs["dct"]} == {1e-3}
    mean = statistics.fmean([109.0, 102.0, 117.6])
    assert f"| dct | 0.001 | {mean:.2f} ± {statistics.stdev([109.0, 102.0, 117.6]):.2f} (n=3) |" in best
    diffs = [100 * (109 / 110 - 1), 100 * (102 / 100 - 1), 100 * (117.6 / 120 - 1)]
    assert (f"| dct | {statistics.fmean(diffs):+.2f}% ± {statistics.stdev(diffs):.2f}% (n=3) | "
            f"{diffs[0]:+.2f}% | {diffs[1]:+.2f}% | {diffs[2]:+.2f}% |") in paired
    assert "| galore | – | 120.00 | 110.00 |" in sweep and "| dct | 109.00 | 130.00 | – |" in sweep


def test_a_diverged_run_is_never_the_best_and_shows_as_diverged():
    results = [_result("dct", 1e-3, 0, 150.0), {**_result("dct", 1e-2, 0, float("nan")), "status": "diverged"}]
    assert pretrain.best_lrs(results, ["dct"], 0) == {"dct": 1e-3}
    sweep = pretrain.tables(results, ["dct"], [0], None)[2]
    assert "diverged" in sweep and "150.00" in sweep


def test_bench_refresh_times_the_step_it_claims_and_its_selection_really_changes():
    """``gradlore bench refresh``'s building blocks on small shapes: GaLore's weight shapes of a size, step times of
    gap 1 vs gap 200, and gradients that really change the selection at every step (so the remap moves rows)."""
    import torch

    from gradlore.bench import refresh
    from gradlore.models import SIZES

    s = SIZES["llama_60m"]
    assert refresh.weight_shapes("llama_60m", 1) == [(s.hidden, s.hidden)] * 4 + [(s.intermediate, s.hidden)] * 2 \
        + [(s.hidden, s.intermediate)]
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(24, 40, generator=gen)) for _ in range(2)]
    grads = [[torch.randn(24, 40, generator=gen) for _ in params] for _ in range(2)]
    times = refresh._time_steps(params, 2, grads, list(refresh.SETTINGS.values()), rank=6, steps=3, warmup=1)
    assert len(times) == len(refresh.SETTINGS) and all(len(ts) == 3 and all(t > 0 for t in ts) for ts in times)
    opt = gradlore_dct_optimizer(params)
    picks = []
    for t in range(3):
        for p, g in zip(params, grads[t % 2]):
            p.grad = g
        opt.step()
        picks.append(opt.state[params[0]]["proj.indices"].clone())
    assert not torch.equal(picks[0], picks[1]) and torch.equal(picks[0], picks[2])
    stages = refresh.stage_times((24, 40), 6, repeat=1)
    assert set(stages) == {"transform", "score+top-r", "refresh (all)", "steady Q_idxᵀG"}


def test_bench_refresh_train_times_whole_steps_of_a_real_model(capsys):
    """``--train``: forward, backward and optimizer step of a LLaMA of the size, gap 200 vs gap 1, in one table."""
    import re

    import torch

    from gradlore.bench import refresh

    threads = torch.get_num_threads()
    try:
        assert refresh.main(["--train", "--model", "tiny", "--rank", "16", "--vocab", "64", "--seq", "16", "--steps",
                             "2", "--warmup", "1", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| dct, gap")]
    assert [r.split(" |")[0] for r in rows] == ["| dct, gap 200 (steady step, no refresh)",
                                                "| dct, gap 1 (refresh + remap every step; the tensor's count, fused kernel)"]
    assert rows[0].endswith("| +0.0% | +0.0% |")
    assert re.search(r"is -?\d+\.\d% of a gap-200 training step", out)


def gradlore_dct_optimizer(params):
    import gradlore

    return gradlore.LowRankAdamW([{"params": params, **gradlore.presets.dct(rank=6)}], lr=1e-4)
