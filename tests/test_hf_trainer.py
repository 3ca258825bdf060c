"""gradlore inside ``transformers.Trainer``: the factory, resume from the Trainer's own checkpoints, layer-wise
updates with gradient accumulation, and the errors that keep a wrong setup from training silently."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import gradlore
from gradlore.data.corpora import resolve_corpus
from gradlore.errors import UserError
from gradlore.optim.layerwise import LayerwiseOptimizer
from gradlore.optim.lowrank_adamw import LowRankAdamW
from gradlore.optim.presets import PRESETS

BLOCK, RANK = 32, 16


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=BLOCK,
                      tie_word_embeddings=False, use_cache=False)
    return LlamaForCausalLM(cfg)


class Blocks(torch.utils.data.Dataset):
    """Byte-level blocks of the carried corpus (vocabulary 256: no tokenizer needed)."""

    def __init__(self, n: int = 64) -> None:
        data = torch.tensor(list(Path(resolve_corpus("tiny-shakespeare")).read_bytes()[: n * BLOCK]), dtype=torch.long)
        self.blocks = data.view(n, BLOCK)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class RecordingTrainer(Trainer):
    """Records every training micro-batch's loss exactly (the logged loss is rounded and averaged)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.losses: list[float] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        self.losses.append(float(loss.detach()))
        return loss


def targs(out: Path, steps: int = 6, accum: int = 1, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=accum,
                learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=2, weight_decay=0.1, logging_steps=1,
                save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    return TrainingArguments(**{**base, **kw})


def fit(out: Path, options: dict, resume: str | None = None, route: str = "factory", **kw) -> RecordingTrainer:
    """A Trainer run; ``route="optimizers"`` builds the optimizer first, as for Trainers without the factory hook."""
    model, args = tiny_llama(), targs(out, **kw)
    if route == "factory":
        extra = {"optimizer_cls_and_kwargs": (gradlore.hf.OptimizerFactory, options)}
    else:
        opt = gradlore.hf.create_optimizer(model, args, **{k: v for k, v in options.items() if k != "accumulate"})
        if "accumulate" in options:
            opt.accumulate = options["accumulate"]
        extra = {"optimizers": (opt, None)}
    trainer = RecordingTrainer(model=model, args=args, train_dataset=Blocks(), **extra)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def inner(opt):
    return getattr(opt, "optimizer", opt)  # the Trainer wraps it in accelerate's AcceleratedOptimizer


@pytest.mark.parametrize("method", list(PRESETS))
def test_each_preset_trains_with_trainer_conventions(tmp_path, method):
    trainer = fit(tmp_path, {"method": method, "rank": RANK, "update_proj_gap": 3}, steps=5)
    opt = inner(trainer.optimizer)
    assert isinstance(opt, LowRankAdamW)
    assert trainer.losses[-1] < trainer.losses[0] - 0.3  # it learns
    names = {n: p for n, p in trainer.model.named_parameters()}
    decay = {n for g in opt.param_groups if g["weight_decay"] == 0.1 for n in g["param_names"]}
    no_decay = {n for g in opt.param_groups if g["weight_decay"] == 0.0 for n in g["param_names"]}
    assert decay | no_decay == set(names) and not decay & no_decay
    assert no_decay == {n for n in names if "norm" in n}  # the Trainer's split: no decay on norms (and biases)
    projected = [g for g in opt.param_groups if "rank" in g]
    assert len(projected) == 1 and len(projected[0]["params"]) == 14 and projected[0]["rank"] == RANK
    # The Trainer's cosine schedule drives every group from the TrainingArguments' LR.
    assert all(g["initial_lr"] == 3e-3 for g in opt.param_groups)
    assert trainer.lr_scheduler.get_last_lr()[0] < 3e-3 * 0.2


def test_adamw_through_the_factory_is_the_trainers_own_adamw(tmp_path):
    """The factory's hyper-parameters and decay split are the Trainer's: same losses as its built-in AdamW."""
    ours = fit(tmp_path / "a", {"method": "adamw"}, steps=4)
    theirs = RecordingTrainer(model=tiny_llama(), args=targs(tmp_path / "b", steps=4, optim="adamw_torch"),
                              train_dataset=Blocks())
    theirs.train()
    assert ours.losses == theirs.losses
    for (n, a), (_, b) in zip(ours.model.named_parameters(), theirs.model.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("method,layerwise", [("dct", False), ("fira", False), ("galore", True)])
def test_stop_and_resume_continues_with_identical_losses(tmp_path, method, layerwise):
    options = {"method": method, "rank": RANK, "update_proj_gap": 3, "layerwise": layerwise}
    accum = 2 if layerwise else 1
    full = fit(tmp_path, options, steps=6, accum=accum, save_strategy="steps", save_steps=3, max_grad_norm=0.0)
    ckpt = tmp_path / "checkpoint-3"
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)  # tensors only: no pickled projector objects
    keys = {k for s in state["state"].values() for k in s}
    assert {"exp_avg", "refresh.t"} <= keys and ("proj.indices" in keys) == (method == "dct")
    resumed = fit(tmp_path, options, resume=str(ckpt), steps=6, accum=accum, save_strategy="no", max_grad_norm=0.0)
    assert len(resumed.losses) == 3 * accum
    assert resumed.losses == full.losses[3 * accum:]
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), n


def test_layerwise_with_accumulation_equals_the_ordinary_optimizer(tmp_path):
    """Layer-wise steps once per accumulated batch (on the synchronised micro-batch), LR schedule included."""
    options = {"method": "dct", "rank": RANK, "update_proj_gap": 2}
    plain = fit(tmp_path / "p", options, steps=4, accum=2, max_grad_norm=0.0)
    with pytest.warns(UserWarning, match=r"clipping \(max_grad_norm=1.0\).*switched off"):
        layer = fit(tmp_path / "l", {**options, "layerwise": True}, steps=4, accum=2)  # default max_grad_norm=1
    assert isinstance(inner(layer.optimizer), LayerwiseOptimizer) and layer.args.max_grad_norm == 0
    assert layer.losses == plain.losses  # bit for bit on CPU
    for (n, a), (_, b) in zip(plain.model.named_parameters(), layer.model.named_parameters()):
        assert torch.equal(a, b), n
    # The route for older Trainers (optimizers=(opt, None)) follows the same sync state...
    old = fit(tmp_path / "o", {**options, "layerwise": True}, route="optimizers", steps=4, accum=2, max_grad_norm=0.0)
    assert old.losses == plain.losses
    # ... and stepping on every micro-batch instead (the flag left at False) would give another run.
    eager = fit(tmp_path / "e", {**options, "layerwise": True, "accumulate": False}, route="optimizers", steps=4,
                accum=2, max_grad_norm=0.0)
    assert max(abs(a - b) for a, b in zip(eager.losses, plain.losses)) > 1e-3


def test_errors_name_the_fix(tmp_path):
    model = tiny_llama()
    with pytest.raises(UserError, match="fira_gamma"):
        gradlore.hf.create_optimizer(model, lr=1e-3, method="fira", fira_gama=1.1)
    with pytest.raises(UserError, match="projects nothing"):
        gradlore.hf.create_optimizer(model, lr=1e-3, method="adamw", rank=8, update_proj_gap=5)
    with pytest.raises(UserError, match="no learning rate"):
        gradlore.hf.create_optimizer(model, method="dct")
    with pytest.raises(UserError, match="LoRA changes the model"):
        gradlore.hf.create_optimizer(model, lr=1e-3, method="lora")
    with pytest.raises(UserError, match="older than 5.2"):  # the call an older Trainer makes
        gradlore.hf.OptimizerFactory([{"params": list(model.parameters())}], method="dct")
    # FSDP1 flattens weights to 1-D: a projection would silently see none of them.
    flat = tiny_llama()
    layer = flat.model.layers[0].self_attn.q_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach().flatten())
    with pytest.raises(UserError, match="flattened to 1-D.*q_proj.weight.*FSDP2"):
        gradlore.hf.create_optimizer(flat, lr=1e-3, method="dct", rank=RANK)


def test_supported_transformers_range_is_pinned_and_installed():
    extras = (Path(__file__).parents[1] / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1]
    pins = re.findall(r'^hf = \[.*?"transformers([^"]+)"', extras, flags=re.M)
    import transformers
    from transformers.trainer_optimizer import is_optimizer_factory

    spec = SpecifierSet(pins[0])
    assert Version(transformers.__version__) in spec
    assert Version(gradlore.hf.optimizer.MIN_TRANSFORMERS + ".0") in spec
    assert Version("5.1.0") not in spec  # 5.1 calls cls(param_groups): no factory protocol
    assert is_optimizer_factory(gradlore.hf.OptimizerFactory)  # the Trainer calls it with the model


DIST_WORKER = """
import sys, warnings, torch, gradlore.hf
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from gradlore.errors import UserError
warnings.simplefilter("ignore")
rank, store = int(sys.argv[1]), sys.argv[2]
torch.distributed.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
def attempt(model, **kw):
    try:
        gradlore.hf.create_optimizer(model, lr=1e-3, method="dct", rank=8, **kw)
        return "accepted"
    except UserError as exc:
        return "refused: " + str(exc)
mlp = lambda: torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 64))
print(attempt(mlp(), layerwise=True))
for orig in (False, True):  # FSDP1: one flat 1-D parameter, or 1-D shards of the original ones
    print(attempt(FSDP(mlp(), device_id=torch.device("cpu"), use_orig_params=orig)))
torch.distributed.destroy_process_group()
"""


def test_layerwise_under_ddp_and_fsdp1_flat_parameters_are_refused(tmp_path):
    """Two real gloo processes: DDP (the post-accumulate hooks fire before its all-reduce) and FSDP1 (flat 1-D)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(gradlore.__file__).parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", DIST_WORKER, str(rank), str(tmp_path / "store")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    for out, err in [p.communicate(timeout=120) for p in procs]:
        lines = out.splitlines()
        assert len(lines) == 3, err[-2000:]
        assert lines[0].startswith("refused: layer-wise updates with 2 processes")
        assert "flattened to 1-D (_fsdp_wrapped_module._flat_param)" in lines[1]
        assert "flattened to 1-D (_fsdp_wrapped_module.0.weight" in lines[2]


def _accelerate_loop(layerwise: bool, steps: int = 3, accum: int = 2) -> tuple[list[float], LlamaForCausalLM]:
    """The documented accelerate route: create_optimizer, accelerator.prepare, accelerator.accumulate."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    model = tiny_llama()
    opt = gradlore.hf.create_optimizer(model, lr=3e-3, method="dct", rank=RANK, update_proj_gap=2, layerwise=layerwise)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    model, opt = accelerator.prepare(model, opt)
    data, losses = Blocks(), []
    for i in range(steps * accum):
        batch = data.blocks[4 * i:4 * i + 4]
        with accelerator.accumulate(model):
            loss = model(input_ids=batch, labels=batch).loss
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
        if accelerator.sync_gradients:
            sched.step()
        losses.append(loss.item())
    return losses, model


def test_accelerate_loop_layerwise_with_accumulation_equals_ordinary():
    plain, a = _accelerate_loop(layerwise=False)
    layer, b = _accelerate_loop(layerwise=True)
    assert layer == plain
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_plain_lr_ratio_moves_the_unprojected_parameters_at_the_scaled_lr(tmp_path):
    """plain_lr_ratio: embeddings, head and norms step as torch's AdamW at lr × ratio; the projected weights as
    without it; the Trainer's schedule keeps the ratio."""
    def one_step(**kw):
        model = tiny_llama()
        opt = gradlore.hf.create_optimizer(model, lr=1e-2, method="dct", rank=RANK, update_proj_gap=5, **kw)
        batch = Blocks(4)[0]["input_ids"][None]
        model(input_ids=batch, labels=batch).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        return model, grads, opt

    scaled, grads, opt = one_step(plain_lr_ratio=0.1)
    same, _, _ = one_step()
    projected = {n for g in opt.param_groups if "rank" in g for n in g["param_names"]}
    assert {g["lr"] for g in opt.param_groups} == {1e-2, 1e-2 * 0.1}
    reference = tiny_llama()
    plain = [(n, p) for n, p in reference.named_parameters() if n not in projected]
    assert {n for n, _ in plain} >= {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    for n, p in plain:
        p.grad = grads[n]
    torch.optim.AdamW([p for _, p in plain], lr=1e-3, weight_decay=0.0).step()
    got = dict(scaled.named_parameters())
    for n, p in plain:
        assert torch.allclose(got[n], p, rtol=0, atol=1e-7), n
        assert not torch.equal(got[n], dict(same.named_parameters())[n]), n  # and not as at lr
    for n, p in same.named_parameters():
        if n in projected:
            assert torch.equal(got[n], p), n
    with pytest.raises(UserError, match="must be > 0.*freeze"):
        gradlore.hf.create_optimizer(tiny_llama(), lr=1e-3, method="dct", rank=RANK, plain_lr_ratio=0.0)
    with pytest.raises(UserError, match="projects nothing"):
        gradlore.hf.create_optimizer(tiny_llama(), lr=1e-3, method="adamw", plain_lr_ratio=0.1)
    # Through the Trainer: the schedule scales every group's own initial LR (the ratio holds at every step),
    # and the LR it logs (the first group's) is TrainingArguments.learning_rate's, the projected group's.
    trainer = fit(tmp_path, {"method": "dct", "rank": RANK, "plain_lr_ratio": 0.1}, steps=4)
    groups = inner(trainer.optimizer).param_groups
    assert "rank" in groups[0] and {("rank" in g, g["initial_lr"]) for g in groups} == {(True, 3e-3), (False, 3e-3 * 0.1)}
    assert max(h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h) == 3e-3


def test_layerwise_under_gradient_checkpointing_equals_the_ordinary_optimizer(tmp_path):
    """Activation checkpointing (recompute in backward) with layer-wise updates inside that backward: the same
    run as the ordinary optimizer without checkpointing."""
    options = {"method": "dct", "rank": RANK, "update_proj_gap": 2}
    plain = fit(tmp_path / "p", options, steps=3, max_grad_norm=0.0)
    ckpt = fit(tmp_path / "c", {**options, "layerwise": True}, steps=3, max_grad_norm=0.0,
               activation_checkpointing=True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in ckpt.model.modules())
    assert isinstance(inner(ckpt.optimizer), LayerwiseOptimizer)
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-6, abs=0)
    for (n, a), (_, b) in zip(plain.model.named_parameters(), ckpt.model.named_parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), n
