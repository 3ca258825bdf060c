"""Factored linear layer for WeLore low-rank components (arXiv 2407.11239, "From GaLore to WeLore").

A dense weight W (out x in) with SVD  W = U S Vᵀ  is replaced by its rank-r truncation written as two factors

    B = U_r √S_r        (out, r)       "up"   factor
    A = √S_r V_rᵀ       (r, in)        "down" factor
    y = (x Aᵀ) Bᵀ + b   ==  x (B A)ᵀ + b

so the layer costs r·(in + out) parameters instead of in·out, and the truncation error is
‖W − B A‖_F² = Σ_{i>r} σ_i² (Eckart–Young). Splitting √S between the factors keeps both equally scaled,
which is what WeLore fine-tunes. Data-aware variants pass a different pair (A, B) of the same shapes.

GPT-2's ``Conv1D`` stores its weight transposed (in, out) and computes ``x @ W + b``; `dense_weight`
returns every supported layer's weight in the ``nn.Linear`` convention (out, in) so the rest of the code
sees one layout. An input embedding E (vocab, d) is read the same way as a tied output head (out = vocab,
in = d): `LowRankEmbedding` looks rows up in B (vocab, r) and maps them through A (r, d), and a tied head
becomes a `LowRankLinear` holding the *same* two parameters, so tying survives compression.

A replacement keeps everything the replaced module does except the factorization. Some models scale their
input embedding inside the module (Gemma: E[ids]·√d, transformers' ``*ScaledWordEmbedding`` with an
``embed_scale`` buffer), so `embedding_scale` reads that factor, `LowRankEmbedding` applies it after the
lookup (y = (B[ids] A)·s), and welore.json records it. `check_replaceable` probes a subclass of
``nn.Linear`` / ``nn.Embedding`` on a few inputs: a forward that does more than y = x Wᵀ + b (or a scaled
row lookup) is refused rather than silently changed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradlore.errors import UserError


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style ``Conv1D`` (weight stored as (in, out))."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_dense_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in), whatever its storage convention (a view, not a copy)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if is_conv1d(module):
        return module.weight.t()  # Conv1D keeps (in, out)
    if isinstance(module, nn.Embedding):
        return module.weight  # (vocab, d): rows are outputs of a tied head
    if isinstance(module, (LowRankLinear, LowRankEmbedding)):
        return module.weight_b @ module.weight_a
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def embedding_scale(module: nn.Embedding) -> torch.Tensor | None:
    """The factor an input embedding applies after its row lookup (a 0-d float32 tensor), None when none.

    Read from ``embed_scale`` (transformers' convention for scaled embeddings); `check_replaceable` then
    verifies on probe ids that the module's output really is the lookup times that factor.
    """
    scale = getattr(module, "embed_scale", None)
    if scale is None:
        return None
    return torch.as_tensor(scale).detach().to(device="cpu", dtype=torch.float32).reshape(())


@torch.no_grad()
def check_replaceable(name: str, module: nn.Module) -> None:
    """UserError unless ``module``'s forward is what its factored replacement computes (up to the weights).

    Exact ``nn.Linear`` / ``nn.Embedding`` / GPT-2 ``Conv1D`` pass as they are; a subclass is run on probe
    inputs and compared with x Wᵀ + b, or with the row lookup times `embedding_scale`.
    """
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            raise UserError(f"the input embedding {name!r} renormalises its rows (max_norm={module.max_norm}), "
                            "which a factored embedding cannot do. Fix: drop --include-embeddings.")
        if type(module) is nn.Embedding:
            return
        w = module.weight
        ids = torch.linspace(0, module.num_embeddings - 1, min(64, module.num_embeddings)).long().to(w.device)
        expect = F.embedding(ids, w)  # (n, d)
        scale = embedding_scale(module)
        if scale is not None:
            expect = expect * scale.to(device=w.device, dtype=w.dtype)
        what = f"a row lookup{' times embed_scale' if scale is not None else ''}"
    elif isinstance(module, nn.Linear) and type(module) is not nn.Linear:
        w = module.weight
        gen = torch.Generator().manual_seed(0)
        ids = torch.randn(4, module.in_features, generator=gen).to(device=w.device, dtype=w.dtype)  # (4, in)
        expect = F.linear(ids, w, module.bias)
        what = "y = x Wᵀ + b"
    else:
        return
    got = module(ids)
    if got.shape != expect.shape or not torch.allclose(got, expect, rtol=1e-5, atol=1e-6 * float(expect.abs().max())):
        raise UserError(f"layer {name!r} ({type(module).__name__}) computes more than {what}; a factored "
                        "replacement would change what it does. Fix: leave it out (--targets without it, or "
                        "drop --include-embeddings).")


class LowRankLinear(nn.Module):
    """y = x Aᵀ Bᵀ + bias, with A = weight_a (rank, in) and B = weight_b (out, rank)."""

    factor_names = ("weight_a", "weight_b")  # its 2-D weights, for optimizers that target linear layers

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank {rank} outside [1, {min(in_features, out_features)}]")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = {"dtype": dtype, "device": device}
        self.weight_a = nn.Parameter(torch.empty(rank, in_features, **kw))  # (r, in)
        self.weight_b = nn.Parameter(torch.empty(out_features, rank, **kw))  # (out, r)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        nn.init.kaiming_uniform_(self.weight_a, a=5**0.5)
        nn.init.zeros_(self.weight_b)  # a fresh layer starts at zero output; from_factors overwrites both

    @classmethod
    def from_factors(
        cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
    ) -> LowRankLinear:
        """Build from A (r, in) and B (out, r); factors are cast to ``dtype`` (the dense layer's)."""
        rank, in_features = a.shape
        out_features = b.shape[0]
        layer = cls(in_features, out_features, rank, bias=bias is not None, dtype=dtype, device=a.device)
        with torch.no_grad():
            layer.weight_a.copy_(a)
            layer.weight_b.copy_(b)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_dense(cls, module: nn.Module, rank: int) -> LowRankLinear:
        """Data-free factorisation of a dense layer (Linear or Conv1D) by a float32 SVD."""
        w = dense_weight(module).detach()
        a, b = svd_factors(w, rank)
        return cls.from_factors(a, b, module.bias, w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) -> (..., r) -> (..., out)
        return F.linear(F.linear(x, self.weight_a), self.weight_b, self.bias)

    def to_dense(self) -> torch.Tensor:
        """The represented weight B A, (out, in)."""
        return self.weight_b @ self.weight_a

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )


class LowRankEmbedding(nn.Module):
    """E ≈ B A: row lookup in B = weight_b (vocab, r), then A = weight_a (r, d), times the replaced
    embedding's ``embed_scale`` s when it had one (Gemma: s = √d): y = (B[ids] A)·s."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, embed_scale: float | torch.Tensor | None = None) -> None:
        super().__init__()
        if not 1 <= rank <= min(num_embeddings, embedding_dim):
            raise ValueError(f"rank {rank} outside [1, {min(num_embeddings, embedding_dim)}]")
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.weight_a = nn.Parameter(torch.zeros(rank, embedding_dim, dtype=dtype, device=device))  # (r, d)
        self.weight_b = nn.Parameter(torch.zeros(num_embeddings, rank, dtype=dtype, device=device))  # (V, r)
        if embed_scale is not None:  # not saved in the weights (as in transformers); welore.json records it
            scale = torch.as_tensor(embed_scale, dtype=torch.float32).detach().clone().to(device).reshape(())
            self.register_buffer("embed_scale", scale, persistent=False)
        else:
            self.embed_scale = None

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype,
                     embed_scale: torch.Tensor | None = None) -> LowRankEmbedding:
        layer = cls(b.shape[0], a.shape[1], a.shape[0], dtype=dtype, device=a.device, embed_scale=embed_scale)
        with torch.no_grad():
            layer.weight_a.copy_(a)
            layer.weight_b.copy_(b)
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # (...,) -> (..., r) -> (..., d)
        out = F.linear(F.embedding(ids, self.weight_b), self.weight_a.t())
        return out if self.embed_scale is None else out * self.embed_scale.to(out.dtype)

    def tied_head(self, bias: torch.Tensor | None = None) -> LowRankLinear:
        """The output head x Eᵀ ≈ x Aᵀ Bᵀ sharing this layer's parameters (tie_word_embeddings)."""
        head = LowRankLinear(self.embedding_dim, self.num_embeddings, self.rank, bias=bias is not None,
                             dtype=self.weight_a.dtype, device=self.weight_a.device)
        head.weight_a, head.weight_b = self.weight_a, self.weight_b  # the same Parameters
        if bias is not None:
            head.bias = bias
        return head

    def extra_repr(self) -> str:
        scale = "" if self.embed_scale is None else f", embed_scale={float(self.embed_scale):g}"
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, rank={self.rank}{scale}"


def svd_factors(
    w: torch.Tensor, rank: int, usv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors of W (out, in): A = √S_r V_rᵀ (r, in), B = U_r √S_r (out, r).

    The SVD runs in float32 (float64 for float64 input); pass ``usv`` = torch.linalg.svd(W) to reuse one.
    """
    if usv is None:
        usv = torch.linalg.svd(w.to(torch.float64 if w.dtype == torch.float64 else torch.float32), full_matrices=False)
    u, s, vh = usv  # (out, k), (k,), (k, in)
    root = s[:rank].sqrt()
    a = root[:, None] * vh[:rank]  # (r, in)
    b = u[:, :rank] * root[None, :]  # (out, r)
    return a.contiguous(), b.contiguous()


def is_norm(module: nn.Module) -> bool:
    """LayerNorm / RMSNorm of any model family (transformers names them *Norm)."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("Norm")


def is_factored(model: nn.Module) -> bool:
    return any(isinstance(m, (LowRankLinear, LowRankEmbedding)) for m in model.modules())


def mark_trainable(model: nn.Module, trainable: str = "all") -> list[str]:
    """Set requires_grad and return the trainable parameters' names.

    "all": every parameter; "lrc": only the factors of the low-rank components (WeLore's LRC-only
    fine-tuning, arXiv 2407.11239: the dense N-LRC weights, embeddings and head stay frozen);
    "lrc+norms": the factors and the normalisation layers.
    """
    if trainable == "all":
        model.requires_grad_(True)
    else:
        lrcs = [m for m in model.modules() if isinstance(m, (LowRankLinear, LowRankEmbedding))]
        if not lrcs:
            raise UserError("the model has no low-rank components to train (model.trainable="
                            f"{trainable!r}). Fix: compress it first (`gradlore compress ... --out DIR`) and fine-tune "
                            "that folder, or train every weight (`gradlore finetune --full`, model.trainable=all).")
        model.requires_grad_(False)
        for m in lrcs:
            m.weight_a.requires_grad_(True)  # (r, in)
            m.weight_b.requires_grad_(True)  # (out, r); a tied head shares its embedding's factors
        if trainable == "lrc+norms":
            for m in model.modules():
                if is_norm(m):
                    m.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]
