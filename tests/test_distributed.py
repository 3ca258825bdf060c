"""Multi-process training (``--parallel ddp|fsdp2``): 2 processes on CPU with gloo, spawned by the tests.

- The optimizer on shards equals the single-process optimizer given the same gradients, for every projector
  and residual, in every layout (columns split along the long side, the rows fallback, DDP's whole weights),
  with and without owner-rank refresh; the DCT/columns indices chosen on shards are the single-process ones,
  and the bytes each refresh communicates are the benchmark's formula (``gradlore.bench.distributed``).
- DDP and FSDP2 training of a tiny LLaMA (refreshes inside) gives the single-process losses with the same
  global batch. Tolerance: 1e-5 relative per step. The runs differ only in the order of float sums (each
  rank's mean over its half of the batch, then the average over ranks; partial DCT scores added across
  ranks); in float32 that moves a loss by ~1e-7 relative over these steps (observed), far below 1e-5, and
  any real error (a rank training on the wrong rows, an unaveraged gradient, a different subspace) moves it
  by > 1e-3.
- Resume continues exactly (same world size) and reshards onto another world size; bad launches are
  UserErrors that name the fix, raised before any process group exists.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADLORE_CACHE", tempfile.mkdtemp(prefix="gradlore-cache-"))

import gradlore  # noqa: E402
from gradlore.bench.distributed import refresh_bytes  # noqa: E402
from gradlore.cli import main as cli_main  # noqa: E402
from gradlore.errors import UserError  # noqa: E402
from gradlore.optim.distributed import Comm, attach, long_side_placement  # noqa: E402
from gradlore.train import trainer  # noqa: E402
from gradlore.train.dist_checkpoint import check_format  # noqa: E402
from gradlore.train.distributed import setup_parallel  # noqa: E402
from gradlore.train.presets import resolve  # noqa: E402
from gradlore.train.rundir import read_losses  # noqa: E402
from gradlore.train.trainer import run  # noqa: E402

RTOL = 1e-5
SHAPES = {"tall": (48, 32), "wide": (32, 48), "odd": (32, 45), "tall_odd": (45, 32)}  # odd: the rows fallback
GROUPS = {
    "dct": {"projector": "dct"},
    "dct-l2": {"projector": "dct", "dct_norm": "l2"},
    "columns": {"projector": "columns"},
    "svd-owner": {"projector": "svd"},
    "svd-gather": {"projector": "svd", "owner": False},
    "dct-fira": {"projector": "dct", "residual": "fira"},
    "svd-fira": {"projector": "svd", "residual": "fira", "scale": 1.0},
    "random-sign-reset": {"projector": "random", "residual": "sign", "on_refresh": "reset"},
    "svd-lazy": {"projector": "svd", "refresh": "lazy", "lazy_threshold": 0.0, "lazy_window": 1},
}


# ------------------------------------------------------------------------------------------ spawning
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, *args, world: int = 2, timeout: float = 240.0) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes joined by a gloo group; fail on a hang."""
    ctx = mp.start_processes(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.time() + timeout
    while not ctx.join(timeout=1.0):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{fn.__name__} did not finish in {timeout:.0f} s (a collective out of step?)")


# ------------------------------------------------------------------------ the optimizer on shards
def _params(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=gen, dtype=dtype) for name, shape in SHAPES.items()}


def _grads(step: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)  # the same averaged gradient on every rank
    return {name: torch.randn(shape, generator=gen, dtype=dtype) for name, shape in SHAPES.items()}


def _optimizer(params: dict, options: dict) -> gradlore.LowRankAdamW:
    options = {k: v for k, v in options.items() if k != "owner"}
    group = {"params": list(params.values()), "param_names": list(params), "rank": 8, "update_proj_gap": 3,
             **options}
    return gradlore.LowRankAdamW([group], lr=1e-2, weight_decay=0.1)


def _reference(options: dict, steps: int, dtype: torch.dtype) -> tuple[list[dict], list[dict], int]:
    """The single-process trajectory: weights and DCT/columns indices after each step, and the refresh count."""
    params = {k: torch.nn.Parameter(v) for k, v in _params(dtype).items()}
    opt = _optimizer(params, options)
    weights, indices, refreshes, last = [], [], 0, None
    for step in range(steps):
        for k, p in params.items():
            p.grad = _grads(step, dtype)[k]
        opt.step()
        weights.append({k: p.detach().clone() for k, p in params.items()})
        indices.append({k: opt.state[p]["proj.indices"].tolist() for k, p in params.items()
                        if "proj.indices" in opt.state[p]})
        nxt = int(opt.state[params["tall"]]["refresh.next"])
        refreshes, last = refreshes + (nxt != last), nxt
    return weights, indices, refreshes


def _optimizer_checks(rank: int, world: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    dtype, steps = torch.float64, 7  # refreshes at steps 0, 3, 6
    results = {}
    for name, options in GROUPS.items():
        weights, indices, refreshes = _reference(options, steps, dtype)
        results[name] = {"refreshes": refreshes}
        for layout in ("fsdp2", "ddp"):
            if layout == "fsdp2":  # each weight split along its long side where FSDP2 can ("odd": rows)
                full = _params(dtype)
                place = long_side_placement(list(full.items()), world)
                params = {k: torch.nn.Parameter(distribute_tensor(v, mesh, [place(v) or Shard(0)]))
                          for k, v in full.items()}
            else:  # DDP: whole weights, the same averaged gradient on every rank
                params = {k: torch.nn.Parameter(v) for k, v in _params(dtype).items()}
            opt = _optimizer(params, options)
            comm = Comm(mesh.get_group() if layout == "fsdp2" else None, owner_refresh=options.get("owner", True))
            attach(opt, comm)
            diff, same_indices = 0.0, True
            for step in range(steps):
                for k, p in params.items():
                    g = _grads(step, dtype)[k]
                    p.grad = distribute_tensor(g, mesh, p.placements) if layout == "fsdp2" else g
                opt.step()
                for k, p in params.items():
                    got = p.full_tensor() if layout == "fsdp2" else p.detach()
                    diff = max(diff, float((got.detach() - weights[step][k]).abs().max()))
                    if k in indices[step]:
                        same_indices &= opt.state[p]["proj.indices"].tolist() == indices[step][k]
            results[name][layout] = {"diff": diff, "same_indices": same_indices, "bytes": dict(comm.bytes)}
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def test_optimizer_on_shards_matches_single_process(two_processes: Path) -> None:
    results = json.loads((two_processes / "optim.json").read_text())
    for name, r in results.items():
        options, n_refresh = GROUPS[name], r["refreshes"]
        for layout in ("fsdp2", "ddp"):
            got = r[layout]
            assert got["diff"] < 1e-10, (name, layout, got["diff"])  # float64: only the order of sums differs
            assert got["same_indices"], (name, layout)
            want: dict[str, int] = {}
            for shape in SHAPES.values():
                for key, n in refresh_bytes(shape, 8, options["projector"], 2, layout, options.get("owner", True),
                                            itemsize=8).items():
                    want[key] = want.get(key, 0) + n * (n_refresh if key.startswith("refresh") else 7)
            if options.get("residual") == "fira" and layout == "fsdp2":  # ‖S ⊙ φ‖: a scalar all-reduce per step
                cols = sum(1 for m, n in SHAPES.values() if m >= n or n % 2 == 0)
                want["step.all_reduce"] = cols * 7 * 2 * 8
            measured = {k: v for k, v in got["bytes"].items() if v and k != "refresh.meta"}
            assert measured == {k: v for k, v in want.items() if v}, (name, layout)
            assert got["bytes"].get("refresh.meta", 0) < 1000 * n_refresh * len(SHAPES)  # shapes of what owners send
    # a DCT refresh on shards moves s scores per weight; SVD's gather moves the gradient
    dct, svd = results["dct"]["fsdp2"]["bytes"], results["svd-gather"]["fsdp2"]["bytes"]
    assert dct["refresh.all_reduce"] * 10 < svd["refresh.all_gather"]


# ------------------------------------------------------------------------------------------ training
def tiny(*overrides: str):
    return resolve("tiny", ["train.steps=8", "optim.update_proj_gap=3", "train.eval_every=100",
                            "train.ckpt_every=100", "train.save_final_model=false", *overrides])


CASES = {  # name: (overrides of the single-process reference, mode)
    "dct-ddp": (("train.grad_accum=2",), "ddp"),
    "dct-fsdp2": (("train.save_final_model=true",), "fsdp2"),
    "galore-fsdp2": (("optim.name=galore",), "fsdp2"),
    "adamw-fsdp2": (("optim.name=adamw",), "fsdp2"),
    "layerwise-fsdp2": (("optim.layerwise=true", "optim.grad_clip=0", "train.grad_accum=2"), "fsdp2"),
}


def _train_runs(rank: int, folder: str) -> None:
    for name, (overrides, mode) in CASES.items():
        run(tiny(*overrides, f"train.parallel={mode}"), Path(folder) / name)
    real, calls = trainer.forward_loss, {"n": 0}

    def nan_once_on_rank_1(model, batch):  # the third training micro-batch of rank 1 only
        loss = real(model, batch)
        calls["n"] += model.training
        return loss * float("nan") if model.training and calls["n"] == 3 and rank == 1 else loss

    trainer.forward_loss = nan_once_on_rank_1
    try:
        for mode in ("ddp", "fsdp2"):
            calls["n"] = 0
            run(tiny(f"train.parallel={mode}"), Path(folder) / f"nan-{mode}")
    finally:
        trainer.forward_loss = real


def losses(run_dir: Path) -> list[float]:
    return [v for _, v in read_losses(run_dir / "metrics.jsonl")[0]]


def test_ddp_and_fsdp2_train_like_one_process(two_processes: Path, tmp_path: Path) -> None:
    runs = two_processes
    for name, (overrides, _) in CASES.items():
        reference = run(tiny(*overrides), tmp_path / f"{name}-single")
        got, want = losses(runs / name), losses(tmp_path / f"{name}-single")
        assert len(got) == len(want) == 8, name
        assert got == pytest.approx(want, rel=RTOL), name
        assert got != pytest.approx(want, rel=1e-9) or name == "adamw-fsdp2", name  # really two processes
        summary = json.loads((runs / name / "summary.json").read_text())
        assert summary["final_val_loss"] == pytest.approx(reference["final_val_loss"], rel=RTOL)
        assert summary["paths"]["checkpoint"].endswith("dcp")
    # a non-finite loss on one rank: every rank skips that step (no hang), then training goes on alike
    nan_ddp, nan_fsdp2 = (json.loads((runs / f"nan-{m}" / "summary.json").read_text()) for m in ("ddp", "fsdp2"))
    assert nan_ddp["status"] == nan_fsdp2["status"] == "completed"
    assert nan_ddp["skipped_steps"] == nan_fsdp2["skipped_steps"] == 1
    assert losses(runs / "nan-ddp") == pytest.approx(losses(runs / "nan-fsdp2"), rel=RTOL)
    assert len(losses(runs / "nan-ddp")) == 7
    # rank 0 owns the folder: one metrics log, no per-rank leftovers; the final model loads as a plain model
    assert sorted(p.name for p in (runs / "dct-fsdp2").iterdir()) == sorted(
        ["checkpoints", "config.json", "data.json", "final", "loss.png", "metrics.jsonl", "summary.json",
         "tensorboard", "tokenizer"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(runs / "dct-fsdp2" / "final")
    single = AutoModelForCausalLM.from_pretrained(tmp_path / "dct-fsdp2-single" / "final")
    for (n, a), (_, b) in zip(model.named_parameters(), single.named_parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), n


CONSTANT = ("schedule.min_lr_ratio=1.0", "schedule.warmup_steps=0")  # then the step count leaves the LR alone


RESUMED = {"fsdp2": ("train.parallel=fsdp2",), "ddp": ("train.parallel=ddp",),  # DCT
           "adamw": ("train.parallel=fsdp2", "optim.name=adamw")}  # torch's AdamW: DTensor moments


def _resume_runs(rank: int, folder: str) -> None:
    for name, overrides in RESUMED.items():
        run(tiny(*CONSTANT, *overrides), Path(folder) / f"{name}-full")
        run(tiny(*CONSTANT, *overrides, "train.steps=5"), Path(folder) / f"{name}-part")
        if rank == 0 and name != "adamw":
            shutil.copytree(Path(folder) / f"{name}-part", Path(folder) / f"{name}-reshard")
        dist.barrier()
        run(tiny(*CONSTANT, *overrides), Path(folder) / f"{name}-part", resume=True)
    run(tiny(*CONSTANT, "train.parallel=fsdp2"), Path(folder) / "ddp-reshard", resume=True)  # DDP -> FSDP2


def _worker(rank: int, world: int, folder: str) -> None:
    _optimizer_checks(rank, world, f"{folder}/optim.json")
    _train_runs(rank, folder)
    _resume_runs(rank, folder)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """Everything that needs 2 processes, in one spawn (starting a process costs seconds): the optimizer
    checks, the training runs of CASES and the resumed runs."""
    folder = tmp_path_factory.mktemp("two")
    spawn(_worker, str(folder))
    return folder


def test_resume_is_exact_and_reshards(two_processes: Path, monkeypatch) -> None:
    runs = two_processes
    for name in RESUMED:
        assert losses(runs / f"{name}-part") == losses(runs / f"{name}-full"), name  # bit for bit
    # the DCP checkpoint: a projected weight's moments split along l, its DCT indices stored once
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(runs / "fsdp2-part" / "checkpoints" / "dcp")).read_metadata().state_dict_metadata
    down = "model.layers.0.mlp.down_proj.weight"  # (64, 172): long side 172 is dim 1
    assert [tuple(c.sizes) for c in md[f"optim/{down}/exp_avg"].chunks] == [(16, 86), (16, 86)]
    assert len(md[f"optim/{down}/proj.indices"].chunks) == 1
    assert [tuple(c.sizes) for c in md[f"model/{down}"].chunks] == [(64, 86), (64, 86)]
    # 2 processes -> 1 (this one, as torchrun would start it): resharded, and the run goes on as it would
    # have, up to the order of float sums
    for key, value in {**TORCHRUN, "WORLD_SIZE": "1", "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)
    run(tiny(*CONSTANT, "train.parallel=fsdp2"), runs / "fsdp2-reshard", resume=True)
    assert not dist.is_initialized()
    for name in ("fsdp2-reshard", "ddp-reshard"):  # the second: a DDP checkpoint resumed by FSDP2
        mode = name.split("-")[0]
        assert losses(runs / name)[:5] == losses(runs / f"{mode}-full")[:5], name
        assert losses(runs / name) == pytest.approx(losses(runs / f"{mode}-full"), rel=RTOL), name


# ------------------------------------------------------------------------------------------ bad launches
TORCHRUN = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}


def test_parallel_without_torchrun_is_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert cli_main(["train", "--preset", "tiny", "--parallel", "ddp", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "torchrun --nproc_per_node N -m gradlore.cli train" in err and "--parallel ddp" in err
    assert not out.exists() and not dist.is_initialized()


@pytest.mark.parametrize("overrides, env, message", [
    (["train.parallel=fsdp2", "train.batch_size=3"], TORCHRUN, "2 does not divide it"),
    (["train.parallel=none"], TORCHRUN, "train.parallel=none"),
    (["train.parallel=ddp", "optim.layerwise=true", "optim.grad_clip=0"], TORCHRUN, "--parallel fsdp2"),
    (["train.parallel=fsdp2", "optim.name=galore-torch"], TORCHRUN, "DTensor"),
    (["train.parallel=ddp"], {"RANK": "0", "WORLD_SIZE": "2"}, "not a torchrun launch"),
], ids=["batch", "none", "layerwise-ddp", "peer-fsdp2", "partial-env"])
def test_bad_launches_are_named_before_any_process_group(monkeypatch, overrides, env, message) -> None:
    for key in TORCHRUN:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match="Fix: ") as err:
        setup_parallel(resolve("tiny", overrides))
    assert message in str(err.value)
    assert not dist.is_initialized()


def test_parallel_values_and_checkpoint_formats(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="Did you mean 'fsdp2'"):
        resolve("tiny", ["train.parallel=fdsp2"]).validate()
    (tmp_path / "single" / "checkpoints").mkdir(parents=True)
    (tmp_path / "single" / "checkpoints" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(UserError, match="--parallel none"):
        check_format(tmp_path / "single", True, "fsdp2")
    (tmp_path / "multi" / "checkpoints" / "dcp").mkdir(parents=True)
    with pytest.raises(UserError, match="torchrun --nproc_per_node N"):
        check_format(tmp_path / "multi", False, "none")
    check_format(tmp_path / "multi", True, "ddp")  # any world size, either mode: resharded
