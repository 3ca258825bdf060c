"""``gradlore train --optimizer lora``: LoRA through the real peft library, in the one training loop (resume, final/)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("GRADLORE_CACHE", tempfile.mkdtemp(prefix="gradlore-cache-"))

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from gradlore.cli import main as cli_main  # noqa: E402
from gradlore.data.corpora import resolve_corpus  # noqa: E402
from gradlore.errors import UserError  # noqa: E402
from gradlore.optim.lora import add_lora, lora_targets  # noqa: E402
from gradlore.train.presets import resolve  # noqa: E402
from gradlore.train.rundir import read_losses  # noqa: E402
from gradlore.train.trainer import Trainer, run  # noqa: E402

SETS = ["optim.name=lora", "optim.rank=4", "optim.lr=1e-2", "train.steps=24", "train.eval_every=12", "train.ckpt_every=100"]


def tiny(*overrides: str):
    return resolve("tiny", [f"data.path={resolve_corpus('tiny-shakespeare')}", *SETS, *overrides])


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return read_losses(run_dir / "metrics.jsonl")[0]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "lora"
    return out, run(tiny(), out)


def test_lora_trains_only_the_adapters_through_the_driver(lora_run, tmp_path):
    out, summary = lora_run
    assert summary["status"] == "completed"
    built = Trainer(tiny(), tmp_path / "inspect")  # the same model and optimizer the run had
    lora = {n: p for n, p in built.model.named_parameters() if p.requires_grad}
    assert lora and all(".lora_A." in n or ".lora_B." in n for n in lora)
    assert len(lora) == 2 * 2 * 7  # A and B on q k v o gate up down, in both layers (all-linear: no head)
    # d = 64, MLP 172: r·(in + out) per layer
    assert summary["trainable_params"] == sum(p.numel() for p in lora.values()) == 2 * 4 * (
        4 * (64 + 64) + 2 * (64 + 172) + (172 + 64))
    opt_params = {id(p) for g in built.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in lora.values()}
    assert isinstance(built.optimizer, torch.optim.AdamW)
    train = [loss for _, loss in losses(out)]
    assert sum(train[-3:]) / 3 < sum(train[:3]) / 3 - 0.1, train


def test_final_is_the_merged_model_and_adapter_is_peft(lora_run):
    """final/ loads as a plain model (no peft) whose weights are W + (α/r)·B·A; adapter/ is peft's folder."""
    out, _ = lora_run
    payload = torch.load(out / "checkpoints" / "checkpoint.pt", weights_only=True)
    state = payload["model"]
    merged = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    name = "model.layers.1.mlp.down_proj"
    base = state[f"base_model.model.{name}.base_layer.weight"]
    a = adapter[f"base_model.model.{name}.lora_A.weight"]  # (r, in)
    b = adapter[f"base_model.model.{name}.lora_B.weight"]  # (out, r)
    assert b.abs().sum() > 0  # B starts at zero: it trained
    torch.testing.assert_close(merged.get_submodule(name).weight, base + (8 / 4) * b @ a)
    # The frozen weights did not move.
    fresh = Trainer(tiny(), out.parent / "fresh").model
    torch.testing.assert_close(fresh.get_submodule(f"base_model.model.{name}.base_layer").weight, base)


def test_lora_run_resumes_exactly(lora_run, tmp_path, sigterm_at):
    disarm = sigterm_at(7)
    out = tmp_path / "run"
    assert run(tiny(), out)["status"] == "interrupted"
    disarm()
    assert run(tiny(), out, resume=True)["status"] == "completed"
    assert losses(out) == losses(lora_run[0])
    assert (out / "final" / "model.safetensors").exists() and (out / "adapter" / "adapter_config.json").exists()


def test_lora_cli_flags_and_bad_options(tmp_path, capsys):
    assert cli_main(["train", "--preset", "tiny", "--optimizer", "lora", "--rank", "2", "--target-modules",
                     "q_proj,v_proj", "--steps", "2", "--data", "tiny-shakespeare", "--out", str(tmp_path / "r"),
                     "--set", "train.eval_every=2", "--set", 'optim.overrides={"lora_alpha": 4}']) == 0
    config = json.loads((tmp_path / "r" / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
    assert config["lora_alpha"] == 4
    assert "adapter:" in capsys.readouterr().out
    assert cli_main(["train", "--preset", "tiny", "--optimizer", "lora", "--data", "tiny-shakespeare", "--out",
                     str(tmp_path / "bad"), "--set", 'optim.overrides={"lora_alpah": 4}']) == 2
    assert "Did you mean 'lora_alpha'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_lora_targets_follow_gradlore_rules():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4))
    assert lora_targets(model, "re:mlp") == [f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]
    assert "lm_head" not in lora_targets(model, "all-linear")
    with pytest.raises(UserError, match="matches no linear layer"):
        add_lora(model, 4, "attention")
