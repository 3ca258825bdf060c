"""The optimizer benchmark harness (issue 2) on tiny shapes: one row per method, honest state accounting."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gradlore.bench import optim as bench  # noqa: E402
from gradlore.optim.state import retained_bytes, state_bytes  # noqa: E402

TINY = ["--model", "tiny", "--vocab", "64", "--rank", "4", "--gap", "3", "--warmup", "1", "--tail", "1",
        "--threads", "1"]


class _Projector:  # stands in for a peer's projector object kept in optimizer state
    def __init__(self, basis: torch.Tensor) -> None:
        self.ortho_matrix = basis


def test_state_counter_charges_a_views_whole_storage() -> None:
    factor = torch.zeros(64, 32)  # 8 KiB storage
    view = factor[:4]  # nominal 512 B, keeps all 8 KiB alive
    assert retained_bytes({"p": {"proj": view}}) == factor.untyped_storage().nbytes() == 64 * 32 * 4
    # through a Python object's attribute, as galore-torch stores it; a shared storage counted once
    state = {"a": {"projector": _Projector(view)}, "b": {"m": factor[4:8], "v": torch.ones(3)}}
    assert retained_bytes(state) == 64 * 32 * 4 + 3 * 4
    # parameters and grads are excluded even when state refers to them
    p = torch.ones(10)
    assert retained_bytes({"x": p, "y": torch.ones(2)}, exclude=[p]) == 8


def test_state_counter_on_a_real_optimizer() -> None:
    w = torch.nn.Parameter(torch.randn(8, 6))
    w.grad = torch.randn(8, 6)
    opt = torch.optim.AdamW([w], foreach=False)
    opt.step()
    # two float32 moments of 48 values plus the 0-d float step tensor
    assert state_bytes(opt) == 2 * 48 * 4 + 4
    assert bench.nominal_moment_bytes(opt) == 2 * 48 * 4


def test_harness_tiny_has_a_row_per_method(capsys) -> None:
    methods = list(bench.method_table())
    assert {"adamw-forloop", "adamw-fused", "galore-torch", "fira-adamw", "gradlore-dct"} <= set(methods)
    rc = bench.main(TINY)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split("|")[1].strip() for r in rows] == methods
    assert rc == 0, out
    assert "error" not in out
    # galore-torch keeps the whole SVD factor alive: retained > nominal moments
    galore = next(r for r in rows if r.startswith("| galore-torch"))
    assert float(galore.split("|")[4]) > 0


def test_bad_gap_is_a_user_error(capsys) -> None:
    assert bench.main(TINY[:-6] + ["--gap", "1"]) == 2
    assert "--gap" in capsys.readouterr().err
