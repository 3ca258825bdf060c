"""Config dataclasses, presets, --set overrides, the LR schedule and atomic checkpoints (no training)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from gradlore.errors import UserError
from gradlore.optim.parts import SLOTS
from gradlore.train import checkpoint as ck
from gradlore.train.config import RunConfig, apply_override, field_names
from gradlore.train.presets import PRESETS, preset, resolve
from gradlore.train.schedule import WarmupCosine, warmup_cosine


def test_overrides_parse_by_field_type() -> None:
    cfg = resolve("tiny", ["optim.rank=64", "optim.lr=1e-3", "train.bf16=true", "optim.scale=none",
                           "optim.update_proj_gap=25", 'optim.overrides={"residual": "fira"}', "data.path=x.txt"])
    assert cfg.optim.rank == 64 and isinstance(cfg.optim.rank, int)
    assert cfg.optim.lr == 1e-3 and cfg.train.bf16 is True and cfg.optim.scale is None
    assert cfg.optim.update_proj_gap == 25 and cfg.optim.overrides == {"residual": "fira"}
    assert cfg.data.path == "x.txt"


@pytest.mark.parametrize("assignment,match", [
    ("optim.rnak=64", "unknown config field 'optim.rnak'. Did you mean 'optim.rank'"),
    ("nosuch.x=1", "unknown config field"),
    ("optim.rank=sixty", "expected an int"),
    ("train.bf16=maybe", "expected a bool"),
    ("optim.lr=fast", "expected a float"),
    ("optim.rank", "SECTION.FIELD=VALUE"),
    ("optim.overrides=[1]", "expected a dict"),
])
def test_bad_overrides_are_user_errors(assignment: str, match: str) -> None:
    with pytest.raises(UserError, match=match):
        apply_override(preset("tiny"), assignment)


@pytest.mark.parametrize("assignment,match", [
    ("model.size=llama_7t", "unknown model size"),
    ("optim.name=sgdx", "unknown optimizer 'sgdx'"),
    ("optim.name=gallore", "Did you mean 'galore'"),
    ('optim.overrides={"fira_gama": 1.05}', "unknown key 'fira_gama'. Did you mean 'fira_gamma'"),
    ('optim.overrides={"dct_norm": "L1"}', "dct_norm='L1' is not allowed.*Did you mean 'l1'"),
    ("model.trainable=lcr", "Did you mean 'lrc'"),
    ("optim.rank=0", "optim.rank=0 must be > 0"),
    ("analysis.every=-1", "analysis.every=-1 must be >= 0"),
    ("train.steps=-1", "must be > 0"),
    ("data.val_fraction=1.5", "val_fraction"),
    ("optim.layerwise=true", "clipping"),
    ("schedule.warmup_steps=30", "warmup_steps"),
])
def test_validation_names_the_field(assignment: str, match: str) -> None:
    with pytest.raises(UserError, match=match):
        resolve("tiny", [assignment])


def test_presets_are_valid_and_roundtrip() -> None:
    with pytest.raises(UserError, match="unknown config preset"):
        preset("huge")
    for name in PRESETS:
        cfg = preset(name).validate()
        assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert preset("default").model.size == "small" and preset("default").optim.name == "dct-galore"
    assert preset("galore_60m").model.size == "llama_60m" and preset("galore_60m").train.bf16


def test_warmup_cosine_schedule() -> None:
    f = WarmupCosine(warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(t) for t in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # monotone decay after warmup
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = warmup_cosine(opt, 10, 110, 0.1)
    for _ in range(60):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * 0.55)
    state = sched.state_dict()
    torch.save(state, "/dev/null")  # plain values only
    assert math.isclose(state["lr_lambdas"][0]["min_ratio"], 0.1)


def _payload(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((3,), float(step))}, "optimizer": {}, "scheduler": {},
            "rng": ck.rng_state(), "data": {"epoch": 0, "position": step}, "counters": {"tokens": step}}


def test_checkpoint_atomic_keep_previous_and_fallback(tmp_path: Path, capsys) -> None:
    ck.save_checkpoint(tmp_path, _payload(1))
    ck.save_checkpoint(tmp_path, _payload(2))
    folder = ck.checkpoint_dir(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]
    payload, path = ck.load_checkpoint(tmp_path)
    assert payload["step"] == 2 and path.name == "checkpoint.pt"
    # Truncate the newest: a warning naming it, then the previous one is used.
    newest = folder / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    payload, path = ck.load_checkpoint(tmp_path)
    assert payload["step"] == 1 and path.name == "checkpoint.prev.pt"
    assert str(newest) in capsys.readouterr().err
    (folder / "checkpoint.prev.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="no usable checkpoint.*checkpoint.pt.*checkpoint.prev.pt"):
        ck.load_checkpoint(tmp_path)


def test_rng_state_roundtrip() -> None:
    import random

    import numpy as np

    torch.manual_seed(3)
    state = ck.rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    ck.set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


@pytest.mark.parametrize("field", field_names(RunConfig()))
def test_every_config_field_names_a_typo(field: str) -> None:
    """A typo in any --set field is an error that suggests the field meant."""
    section, name = field.split(".")
    typo = f"{section}.{name[:-1] + name[-1] * 2}"
    with pytest.raises(UserError, match=rf"unknown config field '{typo}'\. Did you mean .*'{field}'"):
        apply_override(preset("tiny"), f"{typo}=1")


def _group_option_keys() -> list[str]:
    keys = {k for registry in SLOTS.values() for name in registry for k in registry.options(name)}
    return sorted(keys)


@pytest.mark.parametrize("key", _group_option_keys())
def test_every_group_option_typo_in_set_overrides_is_named(key: str) -> None:
    typo = key[:-1] + key[-1] * 2
    with pytest.raises(UserError, match=rf"unknown key '{typo}'\. Did you mean .*'{key}'"):
        resolve("tiny", [f'optim.overrides={{"{typo}": 1}}'])
