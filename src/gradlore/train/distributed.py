"""Multi-process training on PyTorch's own engine: ``torchrun`` + DDP or FSDP2 (``fully_shard``).

    torchrun --nproc_per_node N -m gradlore.cli train ... --parallel ddp|fsdp2      (train.parallel)

- Process group: gloo on CPU, nccl on CUDA (rank r uses cuda:LOCAL_RANK), from torchrun's environment.
- Data: ``train.batch_size`` stays the *global* micro-batch B of the single-process run; rank r reads rows
  [r·B/N, (r+1)·B/N) of every batch, so the global batch and the data order are the single-process ones.
  Each rank's loss is the mean over its B/N sequences (packed blocks: equal token counts), and DDP/FSDP2
  average the gradients over ranks, so the step is the single-process step up to the order of float sums.
- DDP (``DistributedDataParallel``): every rank holds the whole model and optimizer; a refresh of the
  projections is computed by one owner rank per weight and broadcast (``train.owner_refresh``).
- FSDP2: ``fully_shard`` on each transformer block (the model's ``_no_split_modules``) and on the root;
  each projected weight is split along its long side (``long_side_placement``) so that its rank holds whole
  columns of the oriented gradient and the optimizer never gathers it (``gradlore.optim.distributed``).
  Layer-wise updates run in FSDP2's post-accumulate-grad hooks, which fire on the sharded gradient after
  the reduce-scatter has averaged it.
- Rank 0 owns the run folder (config, logs, plots, progress bar, final model); checkpoints are written by
  every rank through ``torch.distributed.checkpoint`` (``gradlore.train.dist_checkpoint``).

The single-process ``Parallel`` below is the identity: the trainer calls the same methods either way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from gradlore.compress.lowrank_linear import is_factored
from gradlore.errors import UserError
from gradlore.optim.build import PEERS, OptimConfig
from gradlore.optim.distributed import Comm, attach, long_side_placement
from gradlore.optim.groups import param_groups, parse_targets
from gradlore.optim.lowrank_adamw import projects

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launch_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's environment, or None when not launched by it."""
    present = [k for k in TORCHRUN_ENV if k in os.environ]
    if not present:
        return None
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise UserError(f"the environment has {', '.join(present)} but not {', '.join(missing)}: not a torchrun "
                        "launch. Fix: start with torchrun --nproc_per_node N -m gradlore.cli train ...")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


class Parallel:
    """One process: every method is the identity, so the single-process run is unchanged bit for bit."""

    mode, rank, world, main, distributed = "none", 0, 1, True, False
    device: torch.device | None = None  # None: train.device decides

    def barrier(self) -> None:
        pass

    @contextmanager
    def main_first(self) -> Iterator[None]:
        yield

    def share(self, sampler: Any) -> Any:
        return sampler

    def wrap(self, model: nn.Module, optim: OptimConfig) -> nn.Module:
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def no_sync(self, model: nn.Module, final: bool) -> Any:
        return nullcontext()

    def all_finite(self, loss: Tensor) -> bool:
        return bool(torch.isfinite(loss))

    def clip_grad_norm(self, params: list[Tensor], clip: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")))

    def mean(self, value: float) -> float:
        return value

    def any(self, flag: bool) -> bool:
        return flag

    def close(self) -> None:
        pass


class RankShare:
    """Rank r's rows [r·b, (r+1)·b) of each global batch from a sampler that reads whole batches (streams)."""

    def __init__(self, sampler: Any, part: slice) -> None:
        self.sampler, self.part = sampler, part

    def next_batch(self) -> Tensor:
        return self.sampler.next_batch()[self.part]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class SilentLog:
    """The metrics log of ranks other than 0."""

    def write(self, record: dict, prefix: str) -> None:
        pass

    def close(self) -> None:
        pass


def check_parallel(cfg: Any, world: int) -> None:
    """Refuse what cannot run on ``world`` processes, naming the fix (before any collective, on every rank)."""
    mode, t = cfg.train.parallel, cfg.train
    if t.batch_size % world:
        raise UserError(f"train.batch_size={t.batch_size} is the global micro-batch, split evenly over the {world} "
                        f"processes, and {world} does not divide it. Fix: --batch-size {world * max(1, t.batch_size // world)} "
                        "(a multiple of the process count) or another --nproc_per_node.")
    if mode == "ddp" and cfg.optim.layerwise:
        raise UserError("layer-wise updates under DDP would step each weight on its local gradient, before DDP has "
                        "averaged it. Fix: --parallel fsdp2 (its hooks fire after the averaging) or "
                        "--set optim.layerwise=false.")
    if mode == "fsdp2" and cfg.optim.name in PEERS:
        raise UserError(f"{cfg.optim.name} cannot step FSDP2's sharded (DTensor) parameters. Fix: --parallel ddp, "
                        "or a gradlore optimizer.")
    if cfg.analysis.every:
        raise UserError("gradient-rank recording (analysis.every) reads whole gradients in one process. Fix: record "
                        "in a single-process run (drop --parallel) or --set analysis.every=0.")


def setup_parallel(cfg: Any) -> Parallel:
    """The run's ``Parallel``: the identity for ``train.parallel=none``, else a process group from torchrun's
    environment (checked first: a misconfigured launch is a UserError naming the fix)."""
    mode, env = cfg.train.parallel, launch_env()
    if mode == "none":
        if env is not None and env[1] > 1:
            raise UserError(f"launched by torchrun with {env[1]} processes but train.parallel=none: each would train "
                            "the same model into the same folder. Fix: --parallel ddp or --parallel fsdp2, or "
                            "launch one process.")
        return Parallel()
    if env is None:
        raise UserError(f"--parallel {mode} runs one process per device under torchrun, which sets RANK, WORLD_SIZE, "
                        f"LOCAL_RANK, MASTER_ADDR and MASTER_PORT; they are not set here. Fix: torchrun "
                        f"--nproc_per_node N -m gradlore.cli train ... --parallel {mode} (or drop --parallel).")
    check_parallel(cfg, env[1])
    return Distributed(cfg, *env)


class Distributed(Parallel):
    """N processes under torchrun: DDP or FSDP2, gloo on CPU and nccl on CUDA."""

    distributed = True

    def __init__(self, cfg: Any, rank: int, world: int, local_rank: int) -> None:
        self.mode, self.rank, self.world, self.main = cfg.train.parallel, rank, world, rank == 0
        cuda = cfg.train.device.startswith("cuda") or (cfg.train.device == "auto" and torch.cuda.is_available())
        if cuda and not torch.cuda.is_available():
            raise UserError(f"train.device={cfg.train.device} but CUDA is not available. Fix: --set train.device=cpu.")
        self.device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        self.created = not dist.is_initialized()
        if self.created:
            dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                                    **({"device_id": self.device} if cuda else {}))
        if dist.get_world_size() != world:
            raise UserError(f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE={world}.")
        self.mesh = None
        if self.mode == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(self.device.type, (world,))
        self.comm = Comm(self.mesh.get_group() if self.mesh is not None else None, cfg.train.owner_refresh)

    def _tensor(self, value: float) -> Tensor:
        return torch.tensor([value], dtype=torch.float64 if self.device.type == "cpu" else torch.float32,
                            device=self.device)

    def barrier(self) -> None:
        dist.barrier(**({"device_ids": [self.device.index]} if self.device.type == "cuda" else {}))

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (filling caches: tokenizer, token file), then the others (cache hits).
        If rank 0 fails it still releases the others, which then fail on the same input."""
        if not self.main:
            self.barrier()
        try:
            yield
        finally:
            if self.main:
                self.barrier()

    def share(self, sampler: Any) -> Any:
        b = sampler.batch_size // self.world
        part = slice(self.rank * b, (self.rank + 1) * b)
        if hasattr(sampler, "part"):  # reads only its own rows
            sampler.part = part
            return sampler
        return RankShare(sampler, part)

    def wrap(self, model: nn.Module, optim: OptimConfig) -> nn.Module:
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # broadcast_buffers=False: a language model has no running statistics to keep in step.
            return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                           broadcast_buffers=False)
        if is_factored(model):
            raise UserError("--parallel fsdp2 cannot save a WeLore-compressed model's factors yet. Fix: --parallel ddp.")
        return shard_model(model, projected_params(model, optim), self.mesh)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model) if self.mode == "ddp" else model

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        attach(optimizer, self.comm)

    def no_sync(self, model: nn.Module, final: bool) -> Any:
        """No gradient reduction on the micro-batches before the last of a step (gradient accumulation)."""
        if self.mode == "ddp":
            return nullcontext() if final else model.no_sync()
        model.set_requires_gradient_sync(final)
        return nullcontext()

    def all_finite(self, loss: Tensor) -> bool:
        """Whether the loss is finite on every rank: all skip a bad micro-batch together."""
        flag = self._tensor(0.0 if bool(torch.isfinite(loss)) else 1.0)
        dist.all_reduce(flag)
        return float(flag) == 0.0

    def clip_grad_norm(self, params: list[Tensor], clip: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # FSDP2: the global norm

    def mean(self, value: float) -> float:
        t = self._tensor(value)
        dist.all_reduce(t)
        return float(t) / self.world

    def any(self, flag: bool) -> bool:
        t = self._tensor(1.0 if flag else 0.0)
        dist.all_reduce(t)
        return float(t) > 0

    def save_model(self, model: nn.Module, folder: Path) -> None:
        """The final model as a Hugging Face folder, written by rank 0 (FSDP2: gathered first, on every rank)."""
        if self.mode == "ddp":
            if self.main:
                model.module.save_pretrained(str(folder))
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.main:
            model.save_pretrained(str(folder), state_dict=full)

    def close(self) -> None:
        if self.created and dist.is_initialized():
            dist.destroy_process_group()


def projected_params(model: nn.Module, optim: OptimConfig) -> list[tuple[str, nn.Parameter]]:
    """(name, weight) of every weight the optimizer will project (none for AdamW and the peers)."""
    if optim.name == "adamw" or optim.name in PEERS:
        return []
    groups = param_groups(model, method=optim.name, rank=optim.rank, target_modules=parse_targets(optim.target_modules),
                          **optim.group_overrides())
    return [(name, p) for g in groups if "rank" in g for name, p in zip(g["param_names"], g["params"])
            if projects(g, p)]


def shard_model(model: nn.Module, projected: list[tuple[str, nn.Parameter]], mesh: Any = None) -> nn.Module:
    """FSDP2 over ``mesh``: one ``fully_shard`` per transformer block (the model's ``_no_split_modules``,
    as Hugging Face declares them) and one on the root; projected weights split along their long side."""
    from torch.distributed.fsdp import fully_shard

    world = mesh.size() if mesh is not None else dist.get_world_size()
    place = long_side_placement(projected, world)
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, shard_placement_fn=place)
    # reshard_after_forward: parameters stay sharded between steps (evaluation, checkpoints, the optimizer)
    fully_shard(model, mesh=mesh, shard_placement_fn=place, reshard_after_forward=True)
    return model

