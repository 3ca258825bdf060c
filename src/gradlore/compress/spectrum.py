"""Targets, singular-value spectra and activation statistics for WeLore (arXiv 2407.11239).

WeLore decides each weight's rank from its singular values σ_1 ≥ … ≥ σ_k (k = min(out, in)), computed
once in float32. The data-aware variant (beyond WeLore; ASVD arXiv 2312.05821, SVD-LLM arXiv 2403.07378)
takes the spectrum of W·T instead, with T from input activations X (tokens × in) of a calibration text:

    whiten:  G = XᵀX / N = L Lᵀ (Cholesky),  T = L         →  ‖(W − W_r) Xᵀ‖_F² / N = Σ_{i>r} σ_i(W L)²
    asvd:    T = diag(mean|x|)^α  (α = 1/2)

so truncating W·T minimises the error on the layer's *outputs* rather than on its weights.

Spectra are cached on disk (safetensors, one 1-D tensor per layer) under a fingerprint of the targeted
weights (names, shapes, dtypes and bytes) plus the calibration data, so a cache made for another model is
detected instead of silently reused.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gradlore.compress.lowrank_linear import dense_weight, is_conv1d, is_dense_linear
from gradlore.errors import UserError

SPECTRUM_FORMAT = "gradlore-spectrum-1"
DATA_AWARE_MODES = ("whiten", "asvd")


# ----------------------------------------------------------------------------------------------- targets
def find_targets(
    model: nn.Module,
    targets: str | Iterable[str] | None = None,
    include_head: bool = False,
    include_embeddings: bool = False,
) -> dict[str, nn.Module]:
    """Name -> dense linear layer (``nn.Linear`` or GPT-2 ``Conv1D``) to compress.

    ``targets``: None / "all-linear" = every linear layer except the output head; otherwise names matched
    against the end of the qualified module name ("q_proj" matches "model.layers.3.self_attn.q_proj",
    "mlp.c_proj" matches GPT-2's MLP output only), or regular expressions prefixed with "re:".
    The output head is added only with ``include_head`` (and refused when tied to the input embedding,
    where factoring it alone would add parameters), the input embedding only with ``include_embeddings``
    (a tied head then follows the factored embedding).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    candidates = {
        name: m for name, m in model.named_modules() if name and is_dense_linear(m) and m is not head
    }
    if include_head:
        if head is None or not is_dense_linear(head):
            raise UserError("--include-head: this model has no linear output head; drop the flag.")
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if emb is not None and dense_weight(head).data_ptr() == emb.weight.data_ptr():
            raise UserError(
                "the output head shares its weight with the input embedding (tie_word_embeddings); "
                "factoring it alone would add parameters. Drop --include-head."
            )
        head_name = next(n for n, m in model.named_modules() if m is head)
        candidates[head_name] = head
    extra: dict[str, nn.Module] = {}
    if include_embeddings:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if not isinstance(emb, nn.Embedding):
            raise UserError("--include-embeddings: this model has no nn.Embedding input embedding; drop the flag.")
        extra[next(n for n, m in model.named_modules() if m is emb)] = emb
    if not candidates:
        raise UserError(
            f"{type(model).__name__} has no linear layers to compress (looked for nn.Linear and GPT-2 Conv1D); "
            "WeLore needs a causal LM built from linear projections."
        )
    if targets is None or targets == "all-linear":
        return extra | dict(candidates)
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    chosen: dict[str, nn.Module] = {}
    for pattern in targets:
        if pattern.startswith("re:"):
            rx = re.compile(pattern[3:])
            hits = [n for n in candidates if rx.search(n)]
        else:
            hits = [n for n in candidates if n == pattern or n.endswith("." + pattern)]
        if not hits:
            suffixes = sorted({n.split(".")[-1] for n in candidates} | {".".join(n.split(".")[-2:]) for n in candidates})
            raise UserError(
                f"target {pattern!r} matches no linear layer of {type(model).__name__}; "
                f"candidates: {', '.join(suffixes)} (or 'all-linear', or 're:<regex>')."
            )
        chosen.update({n: candidates[n] for n in hits})
    return extra | dict(sorted(chosen.items(), key=lambda kv: list(candidates).index(kv[0])))


def shapes_of(modules: dict[str, nn.Module]) -> dict[str, tuple[int, int]]:
    """Name -> (out, in) in the nn.Linear convention."""
    return {n: tuple(dense_weight(m).shape) for n, m in modules.items()}


def fingerprint(modules: dict[str, nn.Module]) -> str:
    """Hash of the targeted weights' names, shapes, dtypes and bytes (detects a cache from another model)."""
    h = hashlib.blake2b(digest_size=16)
    for name, m in modules.items():
        w = m.weight.detach()
        h.update(f"{name}|{tuple(w.shape)}|{w.dtype}|{is_conv1d(m)};".encode())
        h.update(w.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------- activation statistics
@dataclass
class ActivationStats:
    """Per-layer input statistics from a calibration pass: Gram XᵀX (in, in) and Σ|x| (in,), over N tokens."""

    gram: dict[str, torch.Tensor] = field(default_factory=dict)  # float64 (in, in)
    abs_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # float64 (in,)
    tokens: int = 0
    digest: str = ""  # hash of the calibration token ids
    damping: float = 0.1  # whiten: G + damping·mean(diag G)·I; larger leans towards the data-free SVD (robust
    # when calibration and target text differ: on SmolLM2, 10% removed, WikiText ppl 131 at 1e-5, 104 at 0.1)
    _transforms: dict[tuple[str, str], tuple[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def transform(self, name: str, mode: str) -> tuple[str, torch.Tensor]:
        """The right factor T of W·T: ("chol", L) lower-triangular, or ("diag", d)."""
        if name not in self.gram:
            raise UserError(f"no calibration statistics for layer {name!r}; recompute them for this model.")
        if (name, mode) not in self._transforms:
            self._transforms[name, mode] = self._transform(name, mode)
        return self._transforms[name, mode]

    def _transform(self, name: str, mode: str) -> tuple[str, torch.Tensor]:
        if mode == "asvd":
            d = (self.abs_sum[name] / max(self.tokens, 1)).clamp_min(1e-6).sqrt()  # α = 1/2
            return "diag", d.float()
        g = self.gram[name] / max(self.tokens, 1)  # (in, in) float64
        damp = max(self.damping, 1e-12) * g.diagonal().mean().clamp_min(1e-12)
        eye = torch.eye(g.shape[0], dtype=g.dtype)
        for _ in range(8):  # rank-deficient Grams (few tokens, dead channels) need a little damping
            chol, info = torch.linalg.cholesky_ex(g + damp * eye)
            if int(info) == 0:
                return "chol", chol
            damp = damp * 10
        raise UserError(f"calibration Gram of {name!r} is not positive definite; use more calibration tokens.")


@torch.no_grad()
def collect_activation_stats(
    model: nn.Module, modules: dict[str, nn.Module], blocks: torch.Tensor, batch_size: int = 4
) -> ActivationStats:
    """Run ``blocks`` (n, L) token ids through the model and accumulate each layer's input statistics.

    Layers fed the same tensor (q/k/v, gate/up) share one XᵀX product per forward.
    """
    stats = ActivationStats(digest=hashlib.blake2b(blocks.numpy().tobytes(), digest_size=8).hexdigest())
    memo: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            key = (x.data_ptr(), tuple(x.shape))
            if key not in memo:
                flat = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
                memo[key] = ((flat.T @ flat).double(), flat.abs().sum(0).double())
            g, a = memo[key]
            if name in stats.gram:
                stats.gram[name] += g
                stats.abs_sum[name] += a
            else:
                stats.gram[name], stats.abs_sum[name] = g.clone(), a.clone()

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items() if not isinstance(m, nn.Embedding)]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(blocks), batch_size):
            batch = blocks[i : i + batch_size]
            memo.clear()
            model(input_ids=batch)
            stats.tokens += batch.numel()
    finally:
        memo.clear()
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


# ------------------------------------------------------------------------------------------- spectra
def weighted_matrix(module: nn.Module, name: str, mode: str | None, stats: ActivationStats | None) -> torch.Tensor:
    """W (out, in) in float32, right-multiplied by the data-aware transform T when ``mode`` is set.

    Embeddings are always data-free: their "input" is a one-hot token id, whose Gram is just token counts.
    """
    w = dense_weight(module).detach().float()
    if mode is None or isinstance(module, nn.Embedding):
        return w
    kind, t = stats.transform(name, mode)
    return w * t[None, :] if kind == "diag" else w @ t.float()


def compute_spectra(
    modules: dict[str, nn.Module],
    mode: str | None = None,
    stats: ActivationStats | None = None,
    svd_cache: dict[str, tuple[torch.Tensor, ...]] | None = None,
) -> dict[str, torch.Tensor]:
    """Name -> singular values (descending, float32) of W or W·T.

    With ``svd_cache`` (a dict the caller keeps) the full SVD (U, S, Vᵀ) is stored there, so factorising
    the same weights at other budgets costs no further SVD.
    """
    out = {}
    for n, m in modules.items():
        w = weighted_matrix(m, n, mode, stats)  # (out, in) float32
        if svd_cache is None:
            out[n] = torch.linalg.svdvals(w)
        else:
            if n not in svd_cache:
                svd_cache[n] = torch.linalg.svd(w, full_matrices=False)
            out[n] = svd_cache[n][1]
    return out


def spectra_cached(
    modules: dict[str, nn.Module],
    mode: str | None = None,
    stats: ActivationStats | None = None,
    cache_dir: Path | None = None,
    cache_file: Path | None = None,
    svd_cache: dict[str, tuple[torch.Tensor, ...]] | None = None,
) -> tuple[dict[str, torch.Tensor], Path | None]:
    """Spectra from the cache when present and valid, else computed and cached. Returns (spectra, path).

    ``cache_file`` (explicit) must belong to this model: a fingerprint mismatch is a UserError and the file
    is left untouched. Under ``cache_dir`` the file name carries the fingerprint, so models never collide.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    fp = fingerprint(modules)
    calib = ""
    if mode is not None and stats is not None:  # the spectra depend on the calibration data and damping
        calib = stats.digest + (f"-d{stats.damping:g}" if mode == "whiten" else "")
    meta = {"format": SPECTRUM_FORMAT, "fingerprint": fp, "mode": mode or "weights", "calibration": calib}
    if cache_file is None and cache_dir is not None:
        cache_file = Path(cache_dir) / "spectra" / f"{fp}-{meta['mode']}{'-' + calib if calib else ''}.safetensors"
    if cache_file is not None and Path(cache_file).exists():
        try:
            with safe_open(str(cache_file), framework="pt") as f:
                found = f.metadata() or {}
                spectra = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user problem
            raise UserError(f"spectrum cache {cache_file} is unreadable ({exc}); delete it and rerun.") from exc
        if found.get("format") != SPECTRUM_FORMAT or found.get("fingerprint") != fp:
            raise UserError(
                f"spectrum cache {cache_file} was computed for a different model or different targets "
                f"(fingerprint {found.get('fingerprint', '?')[:12]}…, this model {fp[:12]}…); "
                "pass another --spectrum-cache path or delete the file."
            )
        if found.get("mode") != meta["mode"] or found.get("calibration") != calib:
            raise UserError(
                f"spectrum cache {cache_file} holds {found.get('mode')!r} spectra "
                f"(calibration {found.get('calibration') or 'none'}), not {meta['mode']!r} "
                f"(calibration {calib or 'none'}); use a separate cache file per mode/calibration."
            )
        if set(spectra) != set(modules):
            raise UserError(f"spectrum cache {cache_file} covers other layers; delete it and rerun.")
        return spectra, Path(cache_file)
    spectra = compute_spectra(modules, mode, stats, svd_cache)
    if cache_file is not None:
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(cache_file) + ".tmp")
        save_file({k: v.contiguous() for k, v in spectra.items()}, str(tmp), metadata=meta)
        tmp.replace(cache_file)
    return spectra, (Path(cache_file) if cache_file is not None else None)

