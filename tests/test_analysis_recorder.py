"""GradientRecorder and `gradlore analyze` end to end on a tiny LLaMA trained on real text (seconds)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gradlore.analysis.plot import by_type, summarize  # noqa: E402
from gradlore.analysis.recorder import GradientRecorder, layer_type, read_records, select_weights  # noqa: E402
from gradlore.cli import main as cli_main  # noqa: E402
from gradlore.data.corpora import resolve_corpus  # noqa: E402
from gradlore.errors import UserError  # noqa: E402
from gradlore.train.presets import resolve  # noqa: E402
from gradlore.train.rundir import read_losses  # noqa: E402
from gradlore.train.trainer import run  # noqa: E402

SHAKESPEARE = resolve_corpus("tiny-shakespeare")  # carried by the package
TYPES = ["q", "k", "v", "o", "gate", "up", "down"]

TINY = ["model.size=tiny", "train.steps=12", "analysis.every=4", "analysis.rank=4", "analysis.top_k=6",
        "optim.lr=1e-2", "schedule.warmup_steps=2", "train.batch_size=4", "data.block_size=32",
        "data.vocab_size=300", "train.eval_every=12", "train.progress=false"]


def test_layer_type_names() -> None:
    assert layer_type("model.layers.3.self_attn.q_proj.weight") == "q"
    assert layer_type("model.layers.0.mlp.down_proj.weight") == "down"
    assert layer_type("transformer.h.1.attn.c_attn.weight") == "c_attn"


@pytest.mark.parametrize("layerwise", [False, True], ids=["plain", "layerwise"])
def test_analyze_end_to_end_on_real_text(tmp_path: Path, layerwise: bool) -> None:
    """`gradlore analyze` is a training run with the gradient-rank hook; in layer-wise mode the recorder's own
    hooks see each gradient before the optimizer frees it, and record the same statistics."""
    sets = [*TINY, f"optim.layerwise={str(layerwise).lower()}", "optim.grad_clip=0", f"data.path={SHAKESPEARE}"]
    run(resolve("analyze", sets), tmp_path / "run")
    recs = read_records(tmp_path / "run")
    # 2 blocks × 7 weights, recorded at steps 0, 4, 8
    assert len(recs) == 3 * 14
    assert sorted({r["step"] for r in recs}) == [0, 4, 8]
    assert sorted({r["type"] for r in recs}) == sorted(TYPES)
    for r in recs:
        d = min(r["shape"])
        assert 1.0 - 1e-4 <= r["stable_rank"] <= d + 1e-4
        assert 1 <= r["energy_rank_90"] <= d
        assert r["top_sv"] == sorted(r["top_sv"], reverse=True) and len(r["top_sv"]) == 6
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        assert 1.0 - 1e-4 <= r["weight_stable_rank"] <= d + 1e-4
        if r["step"] == 0:
            assert r["subspace_cos"] is None
        else:
            assert 0.0 <= r["subspace_cos"] <= 1.0 + 1e-6
    # a real run learns: loss well below ln(vocab) by the end
    losses = [v for _, v in read_losses(tmp_path / "run" / "metrics.jsonl")[0]]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    rows = summarize(recs)
    assert [row["type"] for row in rows] == TYPES
    assert (tmp_path / "run" / "gradient_rank.png").stat().st_size > 10_000
    assert "| q |" in (tmp_path / "run" / "gradient_rank.md").read_text()

    # re-analyse the recording through the command line
    assert cli_main(["analyze", "--from", str(tmp_path / "run" / "gradient_stats.jsonl"),
                     "--out", str(tmp_path / "replot")]) == 0
    assert (tmp_path / "replot" / "gradient_rank.png").is_file()


def test_recorder_with_a_gradlore_optimizer() -> None:
    """The recorder reads gradients before a projected optimizer step (gradlore's GaLore preset)."""
    import gradlore

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh(), torch.nn.Linear(24, 8))
    opt = gradlore.LowRankAdamW(
        gradlore.param_groups(model, method="galore", rank=4, update_proj_gap=2), lr=1e-2
    )
    rec = GradientRecorder(model, every=1, rank=4)
    x = torch.randn(32, 16)
    for step in range(3):
        model(x).square().mean().backward()
        rec.record(step)
        opt.step()
        opt.zero_grad()
    assert len(rec.records) == 3 * 2
    assert all(r["subspace_cos"] is not None for r in rec.records[2:])


def test_hook_mode_matches_explicit_record() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.ReLU(), torch.nn.Linear(20, 6))
    x = torch.randn(16, 12)
    explicit = GradientRecorder(model, every=2, rank=3, weights=False)
    hooked = GradientRecorder(model, every=2, rank=3, weights=False).attach()
    for step in range(4):
        # two micro-batches: only the final backward of a due step is recorded by the hooks
        for micro in range(2):
            hooked.begin_step(step, final=micro == 1)
            model(x[micro * 8 : (micro + 1) * 8]).square().mean().backward()
        explicit.record(step)
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        model.zero_grad()
    hooked.close()
    assert len(explicit.records) == len(hooked.records) == 2 * 2
    for a, b in zip(
        explicit.records, sorted(hooked.records, key=lambda r: (r["step"], r["name"])), strict=True
    ):
        assert a["name"] == b["name"] and a["step"] == b["step"]
        assert a["stable_rank"] == pytest.approx(b["stable_rank"], rel=1e-5)
    assert by_type(explicit.records, "stable_rank")


def test_user_errors(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(UserError, match="candidates"):
        select_weights(model, ["q_proj"])
    with pytest.raises(UserError, match="every"):
        GradientRecorder(model, every=0)
    bad = tmp_path / "x.jsonl"
    bad.write_text(json.dumps({"step": 0, "loss": 1.0}) + "\n")
    with pytest.raises(UserError, match="no gradient statistics"):
        read_records(bad)
    assert cli_main(["analyze", "--from", str(tmp_path / "nothing.jsonl")]) == 2
    assert cli_main(["analyze", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()
