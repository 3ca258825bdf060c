"""WeLore: one-shot non-uniform low-rank compression of a pretrained causal LM (arXiv 2407.11239).

    1. σ(W_i) for every targeted weight, float32, cached on disk           (spectrum.py)
    2. one global threshold τ on the min-max normalised σ, by bisection,
       so that the budget (share of targeted parameters removed, or ERR) is met          (allocate.py)
    3. W_i ≈ B_i A_i,  B_i = U_r √S_r, A_i = √S_r V_rᵀ  for the low-rank components (LRC),
       the rest (N-LRC) stay dense                                          (lowrank_linear.py)

Data-aware variant (ASVD arXiv 2312.05821 / SVD-LLM arXiv 2403.07378): step 1 and 3 use W·T with T from a
calibration text's input activations, W ≈ B A T⁻¹, under the same global-threshold allocation.

`compress(model, remove=0.2)` edits the model in place and returns a `CompressionReport`;
`save_compressed(model, dir)` writes ``model.safetensors`` + ``welore.json`` (every layer's rank; the ranks
are never re-derived on load) + the HF config and tokenizer; `load_compressed(dir)` rebuilds it in one call.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradlore.cache import cache_dir as default_cache_dir
from gradlore.compress.allocate import METHODS, Allocation, allocate
from gradlore.compress.eval import read_text, tokenize
from gradlore.compress.lowrank_linear import (
    LowRankEmbedding,
    LowRankLinear,
    dense_weight,
    embedding_scale,
    svd_factors,
)
from gradlore.compress.remote import base_config, write_remote_code
from gradlore.compress.sensitivity import check_loss_method, collect_sensitivity
from gradlore.compress.spectrum import (
    DATA_AWARE_MODES,
    ActivationStats,
    collect_activation_stats,
    find_targets,
    shapes_of,
    spectra_cached,
    spectrum_key,
    weighted_matrix,
)
from gradlore.data.stream import with_bos
from gradlore.data.tokenizer import TextTokenizer, sequence_bos
from gradlore.errors import UserError

FORMAT = "gradlore-welore-1"
CONFIG_NAME = "welore.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class CompressionReport:
    """What was done, in both budget measures, with whole-model parameter counts."""

    method: str
    data_aware: str | None
    target: dict[str, float]
    threshold: float
    removed_fraction: float  # of the targeted layers' parameters
    rank_reduction: float  # WeLore's effective rank reduction over targeted layers
    targeted_params_before: int
    targeted_params_after: int
    model_params_before: int
    model_params_after: int
    n_targets: int
    n_lrc: int
    layers: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        mode = f"{self.method}" + (f" + data-aware ({self.data_aware})" if self.data_aware else " (data-free)")
        return "\n".join(
            [
                f"method: {mode}; budget {self.target}; global threshold τ = {self.threshold:.4f}",
                f"targeted layers: {self.n_targets} ({self.n_lrc} low-rank, {self.n_targets - self.n_lrc} dense)",
                f"targeted params: {self.targeted_params_before:,} -> {self.targeted_params_after:,} "
                f"(removed {self.removed_fraction:.2%}); effective rank reduction {self.rank_reduction:.2%}",
                f"model params:    {self.model_params_before:,} -> {self.model_params_after:,} "
                f"({1 - self.model_params_after / self.model_params_before:.2%} smaller)",
            ]
        )


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() skips tied duplicates


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def text_blocks(tokenizer: TextTokenizer, text: str, n_tokens: int, context: int, bos: int | None = None
                ) -> torch.Tensor:
    """(n_tokens // context, context) blocks of ids from the head of ``text``; with ``bos`` each block is BOS
    followed by context − 1 text tokens (as the model reads its evaluation windows and training blocks)."""
    span = context - (bos is not None)
    n = n_tokens // context
    ids = tokenize(tokenizer, text, n * span)
    n = min(n, len(ids) // span) if span > 0 else 0
    if n == 0:
        raise UserError(f"calibration text has {len(ids)} tokens, fewer than one block of {context}; give more text.")
    return with_bos(ids[: n * span].reshape(n, span), bos)


def _calibration_blocks(
    calibration: str | Path | torch.Tensor, tokenizer: TextTokenizer | None, n_tokens: int, context: int,
    bos: str = "auto",
) -> torch.Tensor:
    if isinstance(calibration, torch.Tensor):
        return calibration.long().reshape(-1, calibration.shape[-1])
    if tokenizer is None:
        raise UserError("calibration text needs a tokenizer: pass tokenizer=..., or token ids (n, L).")
    if isinstance(calibration, Path) or (isinstance(calibration, str) and len(calibration) < 4096 and Path(calibration).is_file()):
        calibration = read_text(calibration)
    return text_blocks(tokenizer, str(calibration), n_tokens, context, sequence_bos(tokenizer, bos))


@torch.no_grad()
def _factorize(
    module: nn.Module,
    name: str,
    rank: int,
    mode: str | None,
    stats: ActivationStats | None,
    svd_cache: dict[tuple[str, ...], tuple[torch.Tensor, ...]] | None = None,
    key: tuple[str, str, str] = ("", "", ""),
) -> LowRankLinear | LowRankEmbedding:
    """Rank-r factored layer; data-aware: W ≈ B (A' T⁻¹) with B A' the SVD truncation of W T.

    ``svd_cache`` entries are keyed by (`spectrum_key`, name): an SVD is reused only for the same W·T.
    """
    w = dense_weight(module).detach()
    wt = weighted_matrix(module, name, mode, stats)  # W or W·T, float32 (out, in)
    usv = None
    if svd_cache is not None:
        entry = (*key, name)
        if entry not in svd_cache:
            svd_cache[entry] = torch.linalg.svd(wt, full_matrices=False)
        usv = svd_cache[entry]
    a, b = svd_factors(wt, rank, usv)  # (r, in), (out, r)
    if isinstance(module, nn.Embedding):  # always data-free (see weighted_matrix)
        return LowRankEmbedding.from_factors(a, b, w.dtype, embed_scale=embedding_scale(module))
    if mode is not None:
        kind, t = stats.transform(name, mode)
        if kind == "diag":
            a = a / t[None, :]
        else:  # a L⁻¹:  Lᵀ Xᵀ = aᵀ with L lower-triangular
            a = torch.linalg.solve_triangular(t.T, a.double().T, upper=True).T.float()
    return LowRankLinear.from_factors(a, b, module.bias, w.dtype)


def compress(
    model: nn.Module,
    remove: float | None = None,
    *,
    rank_reduction: float | None = None,
    method: str = "welore",
    targets: str | list[str] | None = None,
    min_ratio: float = 0.0,
    data_aware: str | None = None,
    calibration: str | Path | torch.Tensor | None = None,
    tokenizer: TextTokenizer | None = None,
    calibration_tokens: int = 16384,
    calibration_context: int = 512,
    bos: str = "auto",
    damping: float | None = None,
    sensitivity_tokens: int = 4096,
    activation_stats: ActivationStats | None = None,
    include_head: bool = False,
    include_embeddings: bool = False,
    cache_dir: str | Path | None = None,
    spectrum_cache: str | Path | None = None,
    svd_cache: dict[tuple[str, ...], tuple[torch.Tensor, ...]] | None = None,
) -> CompressionReport:
    """Compress ``model`` in place to the budget and return the report.

    Budget: ``remove`` = fraction of the targeted layers' parameters removed, or ``rank_reduction`` =
    WeLore's effective rank reduction; exactly one, in (0, 1). ``method``: "welore" (one global threshold on
    normalised singular values), "uniform" (every matrix loses the same share) or "loss" (data-aware whiten
    only: minimise the summed sensitivity-weighted output error, allocate.py; the sensitivities come from one
    forward+backward pass over the first ``sensitivity_tokens`` calibration tokens, or from
    ``activation_stats.sensitivity``). ``data_aware``: None,
    "whiten" (SVD of W·chol(XᵀX)) or "asvd" (SVD of W·diag(mean|x|)^½), with ``calibration`` text / path /
    token ids (n, L) (used as given), or precomputed ``activation_stats``; calibration text is cut into blocks
    that start with the tokenizer's BOS when it adds one (``bos``: auto, always, never); ``damping`` (whiten) adds damping·mean(diag XᵀX/N)·I
    to the Gram, leaning towards the data-free SVD when the calibration text differs from the target text.
    Spectra are cached under ``cache_dir`` (default $GRADLORE_CACHE/spectra) or in the explicit file
    ``spectrum_cache``, keyed by the weights, the statistics and the ridge. ``svd_cache``: a dict the caller
    keeps to reuse full SVDs across calls (other budgets); its entries carry the same key, so an SVD of
    other weights, statistics or ridge is never reused.
    """
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if data_aware is not None and data_aware not in DATA_AWARE_MODES:
        raise UserError(f"unknown data-aware mode {data_aware!r}; choose one of {', '.join(DATA_AWARE_MODES)}.")
    for label, value in (("remove", remove), ("rank_reduction", rank_reduction)):
        if value is not None and not (isinstance(value, (int, float)) and 0.0 < float(value) < 1.0):
            raise UserError(f"budget {label}={value!r} must lie strictly between 0 and 1 (e.g. 0.2 for 20%).")
    if (remove is None) == (rank_reduction is None):
        raise UserError("give exactly one budget: remove=FRACTION (of targeted parameters) or rank_reduction=FRACTION.")
    if getattr(model, "_gradlore_welore", None):
        raise UserError("this model is already compressed; start again from the dense model.")

    if method == "loss":
        check_loss_method(data_aware, include_embeddings, sensitivity_tokens)
    modules = find_targets(model, targets, include_head=include_head, include_embeddings=include_embeddings)
    shapes = shapes_of(modules)
    stats = activation_stats
    blocks = None
    if data_aware is not None and stats is None:
        if calibration is None:
            raise UserError(f"data_aware={data_aware!r} needs calibration text (--calibration FILE).")
        blocks = _calibration_blocks(calibration, tokenizer, calibration_tokens, calibration_context, bos)
        stats = collect_activation_stats(model, modules, blocks)
    if method == "loss" and not set(modules) <= set(stats.sensitivity):
        stats.sensitivity = collect_sensitivity(model, modules, blocks, sensitivity_tokens)
    if stats is not None and damping is not None:
        if not damping >= 0:
            raise UserError(f"damping={damping} must be >= 0 (a share of the Gram's mean diagonal, e.g. 0.1).")
        stats = replace(stats, damping=float(damping))  # the caller's stats keep their own ridge

    cdir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = spectrum_key(modules, data_aware, stats)  # after the ridge is set: it is part of the key
    spectra, _ = spectra_cached(
        modules, data_aware, stats, cache_dir=cdir, cache_file=Path(spectrum_cache) if spectrum_cache else None,
        key=key,
    )
    alloc: Allocation = allocate(
        spectra, shapes, remove=remove, rank_reduction=rank_reduction, method=method, min_ratio=min_ratio,
        weights=stats.sensitivity if method == "loss" else None,
    )

    params_before = count_params(model)
    layers = []
    for name, module in modules.items():
        m, n = shapes[name]
        sigma = spectra[name].double()
        r = alloc.ranks[name]
        tail = float((sigma[r:] ** 2).sum() / (sigma**2).sum().clamp_min(1e-30)) ** 0.5
        layers.append(
            {"name": name, "shape": [m, n], "rank": r, "full_rank": min(m, n), "lrc": alloc.lrc[name],
             "relative_tail": round(tail, 6)}  # ‖W·T − (W·T)_r‖_F / ‖W·T‖_F
        )
        if alloc.lrc[name]:
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            tied = isinstance(module, nn.Embedding) and head is not None and head.weight is module.weight
            new = _factorize(module, name, r, data_aware, stats, svd_cache, key)
            _set_module(model, name, new)
            if tied:  # the head keeps sharing the (now factored) embedding
                head_name = next(n for n, m in model.named_modules() if m is head)
                _set_module(model, head_name, new.tied_head(head.bias))
    report = CompressionReport(
        method=method,
        data_aware=data_aware,
        target=alloc.target,
        threshold=alloc.threshold,
        removed_fraction=alloc.removed_fraction,
        rank_reduction=alloc.rank_reduction,
        targeted_params_before=alloc.params_before,
        targeted_params_after=alloc.params_after,
        model_params_before=params_before,
        model_params_after=count_params(model),
        n_targets=len(modules),
        n_lrc=alloc.n_lrc,
        layers=layers,
    )
    model._gradlore_welore = report.to_dict()  # read by save_compressed
    return report


# ------------------------------------------------------------------------------------------ save / load
def lowrank_layers(model: nn.Module) -> dict[str, LowRankLinear | LowRankEmbedding]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (LowRankLinear, LowRankEmbedding))}


def _layer_record(name: str, m: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Any]:
    if isinstance(m, LowRankEmbedding):
        rec = {"kind": "embedding", "rank": m.rank, "num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim}
        return rec | ({} if m.embed_scale is None else {"embed_scale": float(m.embed_scale)})
    tied = next((n for n, e in layers.items() if isinstance(e, LowRankEmbedding) and e.weight_a is m.weight_a), None)
    return {"kind": "linear", "rank": m.rank, "in_features": m.in_features, "out_features": m.out_features,
            "bias": m.bias is not None, "tied_to": tied}


def prepare_out_dir(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"output {out} exists and is not empty; choose another --out or pass --overwrite.")
    return out


def save_compressed(model: nn.Module, out: str | Path, tokenizer: TextTokenizer | None = None,
                    overwrite: bool = False) -> Path:
    """Write safetensors weights + welore.json (ranks) + HF config (+ tokenizer). Atomic: a temp dir is renamed."""
    from safetensors.torch import save_model

    out = prepare_out_dir(out, overwrite)
    lr_layers = lowrank_layers(model)
    dtype = next(model.parameters()).dtype
    meta = {
        "format": FORMAT,
        "model_type": getattr(model.config, "model_type", None),
        "architectures": [type(model).__name__],
        "dtype": str(dtype).removeprefix("torch."),
        "layers": {n: _layer_record(n, m, lr_layers) for n, m in lr_layers.items()},
        "report": getattr(model, "_gradlore_welore", None),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        model.config.save_pretrained(tmp)
        # One metadata key: safetensors writes them from a hash map, so two keys come out in a random order and
        # two identical compressions would differ in their bytes. welore.json records our FORMAT.
        save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=1))
        write_remote_code(tmp, meta["layers"], meta["architectures"])  # AutoModelForCausalLM + trust_remote_code
        if tokenizer is not None:
            tokenizer.save(tmp)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_compressed_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).exists()


def load_compressed(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by `save_compressed`: dense skeleton from the HF config, LRC layers at the
    recorded ranks, then the saved weights. Anything inconsistent raises a UserError naming the fix."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    from transformers import AutoModelForCausalLM

    path = Path(path)
    hint = "re-create it with `gradlore compress ... --out DIR --overwrite`"
    if not (path / CONFIG_NAME).exists():
        raise UserError(f"{path} is not a compressed checkpoint (no {CONFIG_NAME}); {hint} or load it as a dense model.")
    try:
        meta = json.loads((path / CONFIG_NAME).read_text())
        layers = meta["layers"]
        dtype = getattr(torch, meta["dtype"])
        if meta.get("format") != FORMAT:
            raise ValueError(f"unknown format {meta.get('format')!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"compressed checkpoint {path} is corrupt: {CONFIG_NAME} unreadable ({exc}); {hint}.") from exc
    try:
        config = base_config(path)  # the dense architecture (config.json names the remote-code model type)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"compressed checkpoint {path} is corrupt: config.json unreadable ({exc}); {hint}.") from exc
    if not (path / WEIGHTS_NAME).exists():
        raise UserError(f"compressed checkpoint {path} is corrupt: {WEIGHTS_NAME} missing; {hint}.")
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Embeddings first, so that a tied head can take their factors.
    for name, spec in sorted(layers.items(), key=lambda kv: kv[1].get("kind") != "embedding"):
        try:
            old = model.get_submodule(name)
            w = dense_weight(old)
            if spec.get("kind") == "embedding":
                shape = (spec["num_embeddings"], spec["embedding_dim"])
                new = LowRankEmbedding(shape[0], shape[1], int(spec["rank"]), dtype=dtype, device=w.device,
                                       embed_scale=spec.get("embed_scale"))
            else:
                shape = (spec["out_features"], spec["in_features"])
                if spec.get("tied_to"):
                    new = model.get_submodule(spec["tied_to"]).tied_head(old.bias if spec["bias"] else None)
                else:
                    new = LowRankLinear(shape[1], shape[0], int(spec["rank"]), bias=bool(spec["bias"]), dtype=dtype,
                                        device=w.device)
            if tuple(w.shape) != shape or new.rank != int(spec["rank"]):
                raise ValueError(f"shape {tuple(w.shape)} != recorded {shape}")
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(f"compressed checkpoint {path} is corrupt: layer {name!r} ({exc}); {hint}.") from exc
        _set_module(model, name, new)
    try:
        load_model(model, str(path / WEIGHTS_NAME), strict=True, device=str(device))
    except (SafetensorError, RuntimeError, OSError, ValueError) as exc:
        raise UserError(f"compressed checkpoint {path} is corrupt: {WEIGHTS_NAME} does not match ({str(exc)[:300]}); {hint}.") from exc
    model._gradlore_welore = meta.get("report")
    model.eval()
    return model
