"""Targets, singular-value spectra and activation statistics for WeLore (arXiv 2407.11239).

WeLore decides each weight's rank from its singular values σ_1 ≥ … ≥ σ_k (k = min(out, in)), computed
once in float32. The data-aware variant (beyond WeLore; ASVD arXiv 2312.05821, SVD-LLM arXiv 2403.07378)
takes the spectrum of W·T instead, with T from input activations X (tokens × in) of a calibration text:

    whiten:  G = XᵀX / N = L Lᵀ (Cholesky),  T = L         →  ‖(W − W_r) Xᵀ‖_F² / N = Σ_{i>r} σ_i(W L)²
    asvd:    T = diag(mean|x|)^α  (α = 1/2)

so truncating W·T minimises the error on the layer's *outputs* rather than on its weights.

Spectra are cached on disk (safetensors, one 1-D tensor per layer) under a fingerprint of the targeted
weights (names, shapes, dtypes and bytes) plus, for the data-aware variant, a hash of the activation
statistics and the ridge (`spectrum_key`), so a cache made for another model or other statistics is
detected instead of silently reused.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gradlore.compress.lowrank_linear import check_replaceable, dense_weight, is_conv1d, is_dense_linear
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
        return _replaceable(extra | dict(candidates))
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
    return _replaceable(extra | dict(sorted(chosen.items(), key=lambda kv: list(candidates).index(kv[0]))))


def _replaceable(modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    for name, m in modules.items():
        check_replaceable(name, m)
    return modules


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
    sensitivity: dict[str, float] = field(default_factory=dict)  # f_i of the "loss" allocation (sensitivity.py);
    # the spectra do not depend on it, so it is not part of content_digest
    damping: float = 0.1  # whiten: G + damping·mean(diag G)·I; larger leans towards the data-free SVD (robust
    # when calibration and target text differ)
    _transforms: dict[tuple[str, str, float], tuple[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _content: str = field(default="", repr=False)

    def content_digest(self) -> str:
        """Hash of the statistics themselves (every Gram and Σ|x|, N): what the data-aware spectra depend on.

        The calibration ids alone do not decide them: the same ids through other upstream weights (norms,
        untargeted layers) give other activations. Computed once; the statistics must not change afterwards.
        """
        if not self._content:
            h = hashlib.blake2b(digest_size=12)
            h.update(f"{self.tokens};".encode())
            for name in sorted(self.gram):
                h.update(f"{name}|{tuple(self.gram[name].shape)};".encode())
                h.update(self.gram[name].contiguous().cpu().numpy().tobytes())
                h.update(self.abs_sum[name].contiguous().cpu().numpy().tobytes())
            self._content = h.hexdigest()
        return self._content

    def key(self, mode: str) -> str:
        """What decides the transform T of ``mode``: the statistics, and for whiten the ridge."""
        return self.content_digest() + (f"-d{self.damping:g}" if mode == "whiten" else "")

    def transform(self, name: str, mode: str) -> tuple[str, torch.Tensor]:
        """The right factor T of W·T: ("chol", L) lower-triangular, or ("diag", d)."""
        if name not in self.gram:
            raise UserError(f"no calibration statistics for layer {name!r}; recompute them for this model.")
        key = (name, mode, float(self.damping) if mode == "whiten" else 0.0)  # a new ridge is a new transform
        if key not in self._transforms:
            self._transforms[key] = self._transform(name, mode)
        return self._transforms[key]

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
    model: nn.Module, modules: dict[str, nn.Module], blocks: torch.Tensor, batch_size: int = 4,
    share_inputs: bool = True,
) -> ActivationStats:
    """Run ``blocks`` (n, L) token ids through the model and accumulate each layer's input statistics.

    Layers fed the same tensor (q/k/v read one normed hidden state, gate/up another) share one XᵀX product.
    The memo is one slot that *holds* the last input tensor together with its version counter, and a layer
    reuses the product only when its input is that very object, unchanged (``x is held`` and the same
    ``x._version``). Holding the tensor keeps its storage alive, so no later input can be allocated at its
    address (keying by ``data_ptr`` let a freed input's address be reused and handed the next layer the
    previous layer's Gram); an in-place change bumps the version and is a miss. So every Gram is exactly
    what the layer's own pre-hook would accumulate, bit for bit, and costs at most one activation of memory.
    ``share_inputs=False`` computes every layer's product on its own (the plain reference; ~30% more
    products on LLaMA-style blocks).
    """
    stats = ActivationStats(digest=hashlib.blake2b(blocks.numpy().tobytes(), digest_size=8).hexdigest())
    held: list = []  # [] or [input tensor, its _version, XᵀX (in, in) float64, Σ|x| (in,) float64]

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            if not (share_inputs and held and held[0] is x and held[1] == x._version):
                flat = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
                held[:] = [x, x._version, (flat.T @ flat).double(), flat.abs().sum(0).double()]
            g, a = held[2], held[3]
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
            model(input_ids=batch)
            held.clear()  # a batch's activations are not kept alive into the next one
            stats.tokens += batch.numel()
    finally:
        held.clear()
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


def spectrum_key(modules: dict[str, nn.Module], mode: str | None = None, stats: ActivationStats | None = None
                 ) -> tuple[str, str, str]:
    """(fingerprint of the targeted weights, mode, calibration key): everything the spectra depend on.

    Data-free spectra depend on the weights only. Data-aware ones depend on the weights and on the transform
    T, i.e. on the activation statistics themselves (``ActivationStats.content_digest``: a hash of the
    Grams, not of the calibration ids, which would miss a change of the untargeted weights upstream) and,
    for whiten, the ridge. The spectrum cache file and the SVDs reused for factorization are both keyed by
    this, so the allocation and the factors always come from the same matrices W·T.
    """
    calib = stats.key(mode) if mode is not None and stats is not None else ""
    return fingerprint(modules), mode or "weights", calib


def compute_spectra(
    modules: dict[str, nn.Module], mode: str | None = None, stats: ActivationStats | None = None
) -> dict[str, torch.Tensor]:
    """Name -> singular values (descending, float32) of W or W·T (always ``svdvals``: one routine, one result)."""
    return {n: torch.linalg.svdvals(weighted_matrix(m, n, mode, stats)) for n, m in modules.items()}


def spectra_cached(
    modules: dict[str, nn.Module],
    mode: str | None = None,
    stats: ActivationStats | None = None,
    cache_dir: Path | None = None,
    cache_file: Path | None = None,
    key: tuple[str, str, str] | None = None,
) -> tuple[dict[str, torch.Tensor], Path | None]:
    """Spectra from the cache when present and valid, else computed and cached. Returns (spectra, path).

    ``cache_file`` (explicit) must belong to this model: a fingerprint mismatch is a UserError and the file
    is left untouched. Under ``cache_dir`` the file name carries the whole `spectrum_key`, so models,
    modes, calibration statistics and ridges never collide. ``key``: `spectrum_key`'s value if known.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    fp, mode_name, calib = key or spectrum_key(modules, mode, stats)
    meta = {"format": SPECTRUM_FORMAT, "fingerprint": fp, "mode": mode_name, "calibration": calib}
    if cache_file is None and cache_dir is not None:
        cache_file = Path(cache_dir) / "spectra" / f"{fp}-{mode_name}{'-' + calib if calib else ''}.safetensors"
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
        if found.get("mode") != mode_name or found.get("calibration") != calib:
            raise UserError(
                f"spectrum cache {cache_file} holds {found.get('mode')!r} spectra "
                f"(calibration {found.get('calibration') or 'none'}), not {mode_name!r} "
                f"(calibration {calib or 'none'}); use a separate cache file per mode/calibration."
            )
        if set(spectra) != set(modules):
            raise UserError(f"spectrum cache {cache_file} covers other layers; delete it and rerun.")
        return spectra, Path(cache_file)
    spectra = compute_spectra(modules, mode, stats)
    if cache_file is not None:
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{cache_file}.{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in spectra.items()}, str(tmp), metadata=meta)
        tmp.replace(cache_file)  # atomic: a concurrent run never reads half a file
    return spectra, (Path(cache_file) if cache_file is not None else None)
