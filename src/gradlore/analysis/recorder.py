"""Record per-layer gradient-rank statistics during a training run, as JSONL.

Paper: "From GaLore to WeLore" (arXiv 2407.11239): gradients of some layers (and later their weights)
become low-rank during training, others do not. The recorder measures, every K steps and for every
targeted 2-D weight W (m×n) with gradient G:

    stable rank ‖G‖_F²/‖G‖₂², effective rank, 90%-energy rank, top-k σᵢ(G), ‖G‖_F,
    cos(U_t, U_{t−K}) = mean principal-angle cosine between the top-r shorter-side singular subspaces
    of G at this record and the previous one (GaLore's projection would keep exactly that subspace),
    and optionally the stable rank of W itself.

Two ways to hook it into a loop:

    rec = GradientRecorder(model, every=10, rank=8, path="runs/x/gradient_stats.jsonl")
    for step ...:
        loss.backward()            # after the last micro-batch
        rec.record(step)           # before optimizer.step() / zero_grad()
        opt.step(); opt.zero_grad()

or, when the optimizer frees gradients inside backward (layer-wise updates), `rec.attach()` first and
`rec.begin_step(step, final=...)` before each backward: a post-accumulate-grad hook per weight records its
gradient as soon as it is final. Register the recorder *before* the layer-wise optimizer so its hook runs
first.

One JSON object per (step, weight) line: keys `step, name, type, layer, shape, stable_rank, effective_rank,
energy_rank_90, top_sv, grad_norm, subspace_cos` (null at the first record), `subspace_rank`, and `weight_stable_rank` when
`weights=True`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from gradlore.analysis import stats
from gradlore.errors import UserError
from gradlore.optim.groups import select_targets

RECORD_KEYS = ("step", "name", "type", "layer", "stable_rank", "subspace_cos")


def layer_type(name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'q'; 'mlp.down_proj' -> 'down'; others: last module name."""
    parts = [p for p in name.split(".") if p not in ("weight", "bias")]
    last = parts[-1] if parts else name
    return last[: -len("_proj")] if last.endswith("_proj") else last


def layer_index(name: str) -> int | None:
    """The first integer component of a dotted name (the block index), or None."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def select_weights(
    model: nn.Module, target_modules: str | Iterable[str] = "all-linear"
) -> list[tuple[str, nn.Parameter]]:
    """(name, weight) of the targeted trainable 2-D weights, chosen as ``gradlore.param_groups`` chooses them:
    "all-linear" (every linear layer except the output head and embeddings), name fragments, or a regex."""
    names = select_targets(model, target_modules if isinstance(target_modules, str) else list(target_modules))
    weights = [(n, model.get_parameter(n)) for n in names]
    return [(n, w) for n, w in weights if w.requires_grad]


class GradientRecorder:
    """Every `every` steps, statistics of each targeted weight's gradient, appended to a JSONL file.

    Args:
        model: the model being trained.
        every: record when `step % every == 0`.
        rank: r of the subspace whose drift is measured (top-r singular vectors on the shorter side).
        target_modules: "all-linear", a list of module-name fragments, or a regex.
        path: JSONL file (appended to); None keeps records in memory only (`self.records`).
        top_k: how many leading singular values to store.
        weights: also record the stable rank of each weight matrix.
    """

    def __init__(
        self,
        model: nn.Module,
        every: int = 10,
        rank: int = 8,
        target_modules: str | Iterable[str] = "all-linear",
        path: str | Path | None = None,
        top_k: int = 8,
        weights: bool = True,
    ) -> None:
        if not isinstance(every, int) or every <= 0:
            raise UserError(f"every must be a positive integer, got {every!r}; pass e.g. every=10")
        if not isinstance(rank, int) or rank <= 0:
            raise UserError(f"rank must be a positive integer, got {rank!r}; pass e.g. rank=8")
        self.every = every
        self.rank = rank
        self.top_k = top_k
        self.weights = weights
        self.targets = select_weights(model, target_modules)
        self.records: list[dict[str, Any]] = []
        self._prev_basis: dict[str, torch.Tensor] = {}  # name -> (d, r) basis at the previous record
        self._file: IO[str] | None = None  # opened (for appending) at the first record
        self.path = Path(path) if path is not None else None
        self._hooks: list[Any] = []
        self._armed_step: int | None = None

    # -- explicit mode ----------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return step % self.every == 0

    @torch.no_grad()
    def record(self, step: int) -> list[dict[str, Any]]:
        """Measure every targeted gradient now (call after the final backward, before the optimizer step)."""
        if not self.due(step):
            return []
        out = []
        for name, w in self.targets:
            if w.grad is None:
                continue  # frozen this step or freed by a layer-wise optimizer: nothing to measure
            out.append(self._measure(step, name, w, w.grad))
        return out

    # -- hook mode --------------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def attach(self) -> GradientRecorder:
        """Record from post-accumulate-grad hooks; drive with `begin_step(step, final)` before each backward."""
        if self._hooks:
            return self
        for name, w in self.targets:
            self._hooks.append(w.register_post_accumulate_grad_hook(self._make_hook(name)))
        return self

    def begin_step(self, step: int, final: bool = True) -> None:
        """Arm the hooks for this backward when it is the last micro-batch of a recorded step."""
        self._armed_step = step if final and self.due(step) else None

    def _make_hook(self, name: str):
        def hook(w: torch.Tensor) -> None:
            if self._armed_step is not None and w.grad is not None:
                with torch.no_grad():
                    self._measure(self._armed_step, name, w, w.grad)

        return hook

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # -- shared ------------------------------------------------------------------------------------------
    def _measure(self, step: int, name: str, w: torch.Tensor, g: torch.Tensor) -> dict[str, Any]:
        g32 = g.detach().float()
        if g32.shape[0] > g32.shape[1]:
            g32 = g32.T  # (d, D), d = shorter side; singular values are unchanged
        u, s, _ = torch.linalg.svd(g32, full_matrices=False)  # u: (d, d), s: (d,)
        basis = u[:, : min(self.rank, u.shape[1])].contiguous()  # (d, r)
        prev = self._prev_basis.get(name)
        rec: dict[str, Any] = {
            "step": int(step),
            "name": name,
            "type": layer_type(name),
            "layer": layer_index(name),
            "shape": list(w.shape),
            "stable_rank": stats.stable_rank(sv=s),
            "effective_rank": stats.effective_rank(sv=s),
            "energy_rank_90": stats.energy_rank(sv=s, energy=0.9),
            "top_sv": stats.top_singular_values(sv=s, k=self.top_k),
            "grad_norm": float(s.square().sum().sqrt()),
            "subspace_cos": None if prev is None else stats.subspace_cosine(prev, basis),
            "subspace_rank": basis.shape[1],
        }
        if self.weights:
            rec["weight_stable_rank"] = stats.stable_rank(w.detach())
        self._prev_basis[name] = basis
        self.records.append(rec)
        if self.path is not None:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.path.open("a", encoding="utf-8")
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()
        return rec

    def close(self) -> None:
        self.detach()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> GradientRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Load a recorder JSONL (or a directory holding `gradient_stats.jsonl`), checking its keys."""
    p = Path(path)
    if p.is_dir():
        p = p / "gradient_stats.jsonl"
    if not p.is_file():
        raise UserError(
            f"no gradient statistics at {p}; pass the JSONL written by `gradlore analyze --data ...`"
        )
    records = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{p}:{lineno} is not JSON ({exc}); pass a JSONL file, one object per line"
                ) from exc
            if not isinstance(rec, dict) or "stable_rank" not in rec:
                continue  # other metrics (loss lines, a training driver's metrics) share the file: skip them
            missing = [k for k in RECORD_KEYS if k not in rec]
            if missing:
                raise UserError(f"{p}:{lineno} lacks {missing}; expected a gradlore GradientRecorder JSONL")
            records.append(rec)
    if not records:
        raise UserError(f"{p} holds no gradient statistics (no line with 'stable_rank'); record a run first")
    return records
