"""A WeLore-compressed causal LM (arXiv 2407.11239) for ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``.

gradlore copies this file into every ``gradlore compress`` folder as ``modeling_welore.py`` (with the
compressed model's own architecture in ``BASE_MODEL_TYPE``); ``config.json`` points ``auto_map`` here. It needs
only torch and transformers, not gradlore. The model is the base architecture with every layer listed in
``config.welore_layers`` swapped for its factored form (ranks as recorded, never re-derived):

    linear     y = (x Aᵀ) Bᵀ + b          A = weight_a (r, in), B = weight_b (out, r)
    embedding  e = B[ids] A               B = weight_b (vocab, r), A = weight_a (r, d), times the
                                          original module's ``embed_scale`` where it has one
    tied head  y = x Aᵀ Bᵀ                the embedding's own two factors

The folder's ``model_type`` is ``gradlore_welore``, so loading it without ``trust_remote_code=True`` fails
loudly instead of building the dense model with missing weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

BASE_MODEL_TYPE = "llama"  # gradlore writes the compressed model's architecture here

BaseConfig = CONFIG_MAPPING[BASE_MODEL_TYPE]
BaseForCausalLM = MODEL_FOR_CAUSAL_LM_MAPPING[BaseConfig]


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.weight_a = nn.Parameter(torch.empty(rank, in_features, dtype=dtype))  # (r, in)
        self.weight_b = nn.Parameter(torch.empty(out_features, rank, dtype=dtype))  # (out, r)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight_a), self.weight_b, self.bias)  # (..., in) -> (..., r) -> (..., out)


class LowRankEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, dtype: torch.dtype,
                 embed_scale: torch.Tensor | float | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.weight_a = nn.Parameter(torch.empty(rank, embedding_dim, dtype=dtype))  # (r, d)
        self.weight_b = nn.Parameter(torch.empty(num_embeddings, rank, dtype=dtype))  # (V, r)
        self.embed_scale = embed_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = F.linear(F.embedding(ids, self.weight_b), self.weight_a.t())  # (...,) -> (..., r) -> (..., d)
        return out if self.embed_scale is None else out * self.embed_scale


class WeLoreConfig(BaseConfig):
    model_type = "gradlore_welore"


class WeLoreForCausalLM(BaseForCausalLM):
    config_class = WeLoreConfig

    def post_init(self) -> None:
        """Swap the factored layers in before transformers records which weights are tied."""
        layers = getattr(self.config, "welore_layers", None) or {}
        tied: dict[str, str] = {}
        for name, spec in sorted(layers.items(), key=lambda kv: kv[1].get("kind") != "embedding"):
            old = self.get_submodule(name)
            dtype = next(old.parameters()).dtype
            if spec["kind"] == "embedding":
                new = LowRankEmbedding(spec["num_embeddings"], spec["embedding_dim"], spec["rank"], dtype,
                                       getattr(old, "embed_scale", None))
            else:
                new = LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], spec["bias"], dtype)
                if spec.get("tied_to"):
                    source = self.get_submodule(spec["tied_to"])
                    new.weight_a, new.weight_b = source.weight_a, source.weight_b  # the same Parameters
                    tied.update({f"{name}.weight_a": f"{spec['tied_to']}.weight_a",
                                 f"{name}.weight_b": f"{spec['tied_to']}.weight_b"})
            parent, _, child = name.rpartition(".")
            setattr(self.get_submodule(parent) if parent else self, child, new)
        if any(spec["kind"] == "embedding" for spec in layers.values()):
            self._tied_weights_keys = tied  # the dense weights named in the class's mapping are gone
        super().post_init()
