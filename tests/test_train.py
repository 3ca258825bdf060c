"""End-to-end training on real text (tiny LLaMA, the packaged tiny-shakespeare head): learning, golden curve,
exact resume after SIGKILL / SIGTERM, what --resume may change, non-finite steps, corrupt checkpoints and
configs, layer-wise mode, fine-tuning, CLI errors.

Regenerate the golden curve after an intended behaviour change with
``python tests/test_train.py --regen`` (and say why in the commit).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADLORE_CACHE", tempfile.mkdtemp(prefix="gradlore-cache-"))

from gradlore.cli import main as cli_main  # noqa: E402
from gradlore.data.corpora import resolve_corpus  # noqa: E402
from gradlore.train import trainer  # noqa: E402
from gradlore.train.presets import resolve  # noqa: E402
from gradlore.train.rundir import read_losses  # noqa: E402
from gradlore.train.trainer import run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = resolve_corpus("tiny-shakespeare")  # carried by the package: no download, no ../shared
GOLDEN = Path(__file__).resolve().parent / "golden" / "train_tiny_dct.json"


def tiny(*overrides: str, data: Path = SHAKESPEARE):
    return resolve("tiny", [f"data.path={data}", *overrides])


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return read_losses(run_dir / "metrics.jsonl")[0]


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "shakespeare_head.txt"
    path.write_text(SHAKESPEARE.read_text()[:80_000])
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    """The tiny preset exactly as shipped (DCT, 30 steps) on tiny-shakespeare."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    return out, run(tiny(), out)


def test_tiny_run_learns_and_writes_outputs(tiny_run) -> None:
    out, summary = tiny_run
    assert summary["status"] == "completed" and summary["steps"] == 30
    for name in ("config.json", "metrics.jsonl", "loss.png", "summary.json", "data.json",
                 "checkpoints/checkpoint.pt", "final/config.json", "tokenizer"):
        assert (out / name).exists(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    train, val = read_losses(out / "metrics.jsonl")
    assert [s for s, _ in train] == list(range(1, 31))
    first, last = sum(v for _, v in train[:5]) / 5, sum(v for _, v in train[-5:]) / 5
    assert last < first - 0.5, (first, last)  # ln(512) = 6.24 at the start
    assert [s for s, _ in val] == [10, 20, 30] and val[-1][1] < val[0][1] - 0.2
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("loss", "lr", "tokens", "tokens_per_s", "opt_state_bytes", "peak_rss_bytes"):
        assert key in record and record[key] > 0, key
    assert record["tokens"] == 4 * 64
    assert summary["final_val_ppl"] == pytest.approx(math.exp(summary["final_val_loss"]))
    assert json.loads((out / "config.json").read_text())["optim"]["name"] == "dct-galore"


def test_golden_loss_curve(tiny_run) -> None:
    out, _ = tiny_run
    golden = json.loads(GOLDEN.read_text())
    train, val = read_losses(out / "metrics.jsonl")
    assert [v for _, v in train] == pytest.approx(golden["train_loss"], rel=1e-4)
    assert [v for _, v in val] == pytest.approx(golden["val_loss"], rel=1e-4)


def test_resume_after_sigkill_is_bit_exact(tmp_path: Path, small_text: Path) -> None:
    args = ["--preset", "tiny", "--data", str(small_text), "--steps", "200", "--optimizer", "dct",
            "--set", "train.ckpt_every=10", "--set", "train.eval_every=50", "--set", "optim.update_proj_gap=7"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "gradlore.cli", "train", *args, "--out", str(killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    metrics = killed / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(line)["step"] >= 25 for line in metrics.read_text().splitlines()
                                    if line.endswith("}")):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    reached = max(s for s, _ in losses(killed))
    assert 25 <= reached < 200
    resumed = subprocess.run([sys.executable, "-m", "gradlore.cli", "train", "--out", str(killed), "--resume"],
                             env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed" in resumed.stderr
    reference = tmp_path / "reference"
    assert cli_main(["train", *args, "--out", str(reference)]) == 0
    got, want = losses(killed), losses(reference)
    assert [s for s, _ in got] == list(range(1, 201))
    assert got == want  # exact float equality, every step


def test_sigterm_checkpoints_and_resume_matches(tiny_run, tmp_path: Path, sigterm_at) -> None:
    disarm = sigterm_at(7)
    out = tmp_path / "run"
    summary = run(tiny(), out)
    assert summary["status"] == "interrupted" and summary["steps"] == 7
    disarm()
    summary = run(tiny(), out, resume=True)
    assert summary["status"] == "completed"
    assert losses(out) == losses(tiny_run[0])


def test_non_finite_steps_are_skipped_then_stop(tmp_path: Path, small_text: Path, monkeypatch) -> None:
    real = trainer.forward_loss
    calls = {"n": 0}
    bad = {3} | set(range(14, 100))  # one isolated bad step, then divergence from step 14

    def forward(model, batch):
        loss = real(model, batch)
        if model.training:
            calls["n"] += 1
            if calls["n"] in bad:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(trainer, "forward_loss", forward)
    out = tmp_path / "run"
    summary = run(tiny("train.max_bad_steps=3", "train.ckpt_every=5", data=small_text), out)
    assert summary["status"] == "diverged" and summary["steps"] == 16
    assert summary["skipped_steps"] == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "skip"] == [3, 14, 15, 16]
    assert all(math.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    from gradlore.train.checkpoint import load_checkpoint

    payload, path = load_checkpoint(out)
    assert payload["step"] == 10 and path.name == "checkpoint.pt"  # the last good one, intact
    assert all(torch.isfinite(v).all() for v in payload["model"].values())


def test_corrupt_newest_checkpoint_falls_back(tmp_path: Path, small_text: Path, capsys) -> None:
    out = tmp_path / "run"
    run(tiny("train.steps=20", data=small_text), out)  # checkpoints at 10 (prev) and 20 (newest)
    newest = out / "checkpoints" / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    summary = run(tiny("train.steps=20", data=small_text), out, resume=True)
    err = capsys.readouterr().err
    assert str(newest) in err and "corrupt or truncated" in err
    assert "at step 10" in err and summary["steps"] == 20


def test_layerwise_with_accumulation_matches_ordinary_updates(tmp_path: Path, small_text: Path) -> None:
    common = ["optim.grad_clip=0", "train.grad_accum=2", "train.steps=6", "train.eval_every=6", "train.batch_size=2"]
    a = run(tiny(*common, data=small_text), tmp_path / "plain")
    b = run(tiny(*common, "optim.layerwise=true", data=small_text), tmp_path / "layerwise")
    assert a["status"] == b["status"] == "completed"
    la, lb = [v for _, v in losses(tmp_path / "plain")], [v for _, v in losses(tmp_path / "layerwise")]
    assert lb == pytest.approx(la, rel=1e-5)


def test_bf16_autocast_and_adamw_and_extended_resume(tmp_path: Path, small_text: Path) -> None:
    out = tmp_path / "bf16"
    summary = run(tiny("train.bf16=true", "optim.name=adamw", "train.steps=4", "train.eval_every=2",
                       "train.ckpt_every=2", data=small_text), out)
    assert summary["status"] == "completed" and math.isfinite(summary["final_val_loss"])
    assert all(math.isfinite(v) for _, v in losses(out))
    # Resume a finished run with more steps: it continues from step 4 to 6.
    summary = run(tiny("train.bf16=true", "optim.name=adamw", "train.steps=6", "train.eval_every=2",
                       "train.ckpt_every=2", data=small_text), out, resume=True)
    assert [s for s, _ in losses(out)] == list(range(1, 7)) and summary["steps"] == 6


def test_finetune_from_a_run_folder(tiny_run, tmp_path: Path, small_text: Path) -> None:
    final = tiny_run[0] / "final"
    out = tmp_path / "ft"
    code = cli_main(["train", "--init", str(final), "--data", str(small_text), "--steps", "3", "--optimizer",
                     "adamw", "--lr", "1e-4", "--preset", "tiny", "--out", str(out)])
    assert code == 0
    first = losses(out)[0][1]
    assert first < tiny_run[1]["final_val_loss"] + 0.5  # starts from the trained weights, not from ln(V)
    assert json.loads((out / "data.json").read_text())["vocab_size"] == 512


@pytest.mark.parametrize("case", ["missing", "empty", "block", "model", "optimizer", "set", "preset", "exists"])
def test_cli_bad_inputs_exit_2_and_write_nothing(case: str, tmp_path: Path, small_text: Path, capsys) -> None:
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    base = ["train", "--preset", "tiny", "--data", str(small_text), "--out", str(out)]
    argv, message = {
        "missing": (["train", "--preset", "tiny", "--data", str(tmp_path / "nope"), "--out", str(out)], "not found"),
        "empty": (["train", "--preset", "tiny", "--data", str(empty), "--out", str(out)], "is empty"),
        "block": ([*base, "--set", "data.block_size=50000"], "longer than the corpus"),
        "model": ([*base, "--model", "llama_7t"], "unknown model size"),
        "optimizer": ([*base, "--optimizer", "gallore"], "unknown optimizer"),
        "set": ([*base, "--set", "optim.rnak=3"], "unknown config field"),
        "preset": (["train", "--preset", "nope", "--out", str(out)], "unknown config preset"),
        "exists": ([*base], "already exists"),
    }[case]
    if case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("user data")
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Fix" in err, err
    if case == "exists":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()


def _regen() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tiny"
        run(tiny(), out)
        train, val = read_losses(out / "metrics.jsonl")
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({
        "what": "gradlore train --preset tiny (DCT, 30 steps, 1 thread) on the packaged tiny-shakespeare head",
        "torch": torch.__version__, "train_loss": [v for _, v in train], "val_loss": [v for _, v in val],
    }, indent=1) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    if "--regen" in sys.argv:
        _regen()


def test_resume_applies_a_new_lr_and_schedule_and_records_it(tmp_path: Path, small_text: Path) -> None:
    out = tmp_path / "run"
    base = ["train", "--preset", "tiny", "--data", str(small_text), "--out", str(out)]
    assert cli_main([*base, "--steps", "10"]) == 0
    assert cli_main(["train", "--out", str(out), "--resume", "--steps", "20", "--lr", "1e-3"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    resume = [r for r in records if r["kind"] == "resume"]
    assert resume == [{"kind": "resume", "step": 10, "changed": {"optim.lr": [3e-3, 1e-3], "train.steps": [10, 20]}}]
    lr = {r["step"]: r["lr"] for r in records if r["kind"] == "train"}
    from gradlore.train.schedule import WarmupCosine

    f = WarmupCosine(2, 20, 0.1)  # 10% warmup of the new 20 steps, cosine to 10%
    assert [lr[s] for s in range(11, 21)] == pytest.approx([1e-3 * f(t) for t in range(10, 20)], rel=1e-12)
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == 1e-3


@pytest.mark.parametrize("flags,message", [
    (["--optimizer", "adamw"], "optim.name: 'dct-galore' in the run, 'adamw' now"),
    (["--rank", "8"], "optim.rank: 16 in the run, 8 now"),
    (["--set", "data.block_size=32"], "data.block_size: 64 in the run, 32 now"),
    (["--preset", "default"], "the preset cannot change"),
])
def test_resume_refuses_what_would_change_the_run(flags: list[str], message: str, tmp_path: Path,
                                                   small_text: Path, capsys) -> None:
    out = tmp_path / "run"
    assert cli_main(["train", "--preset", "tiny", "--data", str(small_text), "--out", str(out), "--steps", "4"]) == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert cli_main(["train", "--out", str(out), "--resume", "--steps", "8", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Fix" in err, err
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing written


def test_corrupt_run_config_and_both_checkpoints(tmp_path: Path, small_text: Path, capsys) -> None:
    out = tmp_path / "run"
    assert cli_main(["train", "--preset", "tiny", "--data", str(small_text), "--out", str(out), "--steps", "20"]) == 0
    config = out / "config.json"
    good = config.read_text()
    config.write_text(good[: len(good) // 2])
    assert cli_main(["train", "--out", str(out), "--resume"]) == 2
    assert "is not a readable gradlore run config" in capsys.readouterr().err
    config.write_text(good)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (out / "checkpoints" / name).write_bytes(b"not a checkpoint")
    assert cli_main(["train", "--out", str(out), "--resume", "--steps", "30"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt is corrupt or truncated" in err and "trying the previous one" in err
    assert "checkpoint.prev.pt is corrupt or truncated" in err and "no other is left" in err
    assert "no usable checkpoint" in err


def test_finetune_and_analyze_are_runs_of_the_one_trainer(tiny_run, tmp_path: Path, small_text: Path) -> None:
    # full fine-tuning of a trained dense model through `gradlore finetune`
    out = tmp_path / "ft"
    assert cli_main(["finetune", "--model", str(tiny_run[0] / "final"), "--data", str(small_text), "--full",
                     "--steps", "3", "--block-size", "32", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_params"] == summary["params"] and (out / "final" / "config.json").exists()
    # LRC-only on a dense model is refused with the fix
    with pytest.raises(Exception, match="no low-rank components"):
        run(resolve("finetune", [f"model.init={tiny_run[0] / 'final'}", f"data.path={small_text}"]), tmp_path / "x")
    # analysis = training + the gradient-rank hook, with its plot and table
    out = tmp_path / "an"
    assert cli_main(["analyze", "--data", str(small_text), "--model", "tiny", "--steps", "6", "--every", "2",
                     "--batch-size", "2", "--block-size", "32", "--set", "data.vocab_size=400", "--out", str(out)]) == 0
    stats = [json.loads(line) for line in (out / "gradient_stats.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in stats}) == [0, 2, 4]
    assert (out / "gradient_rank.png").exists() and "layer type" in (out / "gradient_rank.md").read_text()


@pytest.mark.parametrize("accum", [1, 2])
def test_layerwise_resume_after_sigterm_is_bit_exact(accum: int, tmp_path: Path, small_text: Path,
                                                     sigterm_at) -> None:
    """Layer-wise updates resume exactly, with and without accumulation: the LR schedule keeps reaching the
    per-parameter optimizers after load_state_dict replaced the group dicts their hooks read."""
    sets = ["optim.layerwise=true", "optim.grad_clip=0", f"train.grad_accum={accum}", "train.steps=20",
            "train.ckpt_every=100", "optim.update_proj_gap=4"]
    reference = run(tiny(*sets, data=small_text), tmp_path / "reference")
    disarm = sigterm_at(13 * accum)
    out = tmp_path / "run"
    assert run(tiny(*sets, data=small_text), out)["steps"] == 13
    disarm()
    assert run(tiny(*sets, data=small_text), out, resume=True)["status"] == reference["status"] == "completed"
    assert losses(out) == losses(tmp_path / "reference")
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["kind"] == "train"]
    assert len(set(lrs)) > 10  # the schedule moved the LR at every step, across the resume
