"""End-to-end training on real text (tiny LLaMA, tiny-shakespeare): learning, golden curve, exact resume
after SIGKILL / SIGTERM, non-finite steps, corrupt checkpoints, layer-wise mode, fine-tuning, CLI errors.

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
from gradlore.train import loop  # noqa: E402
from gradlore.train.config import resolve  # noqa: E402
from gradlore.train.loop import read_losses, run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAKESPEARE = DATA / "tinyshakespeare.txt"
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
    assert json.loads((out / "config.json").read_text())["optim"]["name"] == "dct"


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


def test_sigterm_checkpoints_and_resume_matches(tiny_run, tmp_path: Path, monkeypatch) -> None:
    calls = {"n": 0}
    real = loop.forward_loss

    def forward(model, batch):
        if model.training:
            calls["n"] += 1
            if calls["n"] == 7:
                os.kill(os.getpid(), signal.SIGTERM)
        return real(model, batch)

    monkeypatch.setattr(loop, "forward_loss", forward)
    out = tmp_path / "run"
    summary = run(tiny(), out)
    assert summary["status"] == "interrupted" and summary["steps"] == 7
    monkeypatch.setattr(loop, "forward_loss", real)
    summary = run(tiny(), out, resume=True)
    assert summary["status"] == "completed"
    assert losses(out) == losses(tiny_run[0])


def test_non_finite_steps_are_skipped_then_stop(tmp_path: Path, small_text: Path, monkeypatch) -> None:
    real = loop.forward_loss
    calls = {"n": 0}
    bad = {3} | set(range(14, 100))  # one isolated bad step, then divergence from step 14

    def forward(model, batch):
        loss = real(model, batch)
        if model.training:
            calls["n"] += 1
            if calls["n"] in bad:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(loop, "forward_loss", forward)
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
        "what": "gradlore train --preset tiny --data ../shared/data/tinyshakespeare.txt (DCT, 30 steps, 1 thread)",
        "torch": torch.__version__, "train_loss": [v for _, v in train], "val_loss": [v for _, v in val],
    }, indent=1) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    if "--regen" in sys.argv:
        _regen()
