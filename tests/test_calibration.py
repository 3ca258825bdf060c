"""Calibration statistics for data-aware WeLore: exact (a plain per-layer reference, bit for bit), repeatable in
two processes, and a spectrum cache that can never disagree with the factorization (issue 12)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from gradlore.compress.lowrank_linear import LowRankLinear  # noqa: E402
from gradlore.compress.spectrum import collect_activation_stats, find_targets  # noqa: E402
from gradlore.compress.welore import compress, load_compressed  # noqa: E402
from gradlore.data.corpora import resolve_corpus  # noqa: E402
from gradlore.data.tokenizer import train_bpe  # noqa: E402

SHAKESPEARE = resolve_corpus("tiny-shakespeare")
SRC = Path(__file__).resolve().parents[1] / "src"


def same_shape_llama(layers: int = 3) -> LlamaForCausalLM:
    """Every targeted layer reads a (B, L, 48) input: q/k/v/o and gate/up/down all share one input shape, so a
    memo keyed by (address, shape) can hand one layer another layer's freed input."""
    cfg = LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def plain_stats(model: nn.Module, modules: dict[str, nn.Module], blocks: torch.Tensor, batch_size: int = 4
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Reference: each layer accumulates XᵀX and Σ|x| of its own input in its own forward pre-hook."""
    gram: dict[str, torch.Tensor] = {}
    abs_sum: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple) -> None:
            flat = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
            g, a = (flat.T @ flat).double(), flat.abs().sum(0).double()
            gram[name] = gram[name] + g if name in gram else g
            abs_sum[name] = abs_sum[name] + a if name in abs_sum else a
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        for i in range(0, len(blocks), batch_size):
            model(input_ids=blocks[i: i + batch_size])
    finally:
        for h in handles:
            h.remove()
    return gram, abs_sum


def test_activation_stats_equal_a_plain_per_layer_reference_bit_for_bit():
    torch.manual_seed(0)
    model = same_shape_llama()
    modules = find_targets(model)
    assert len({tuple(m.weight.shape) for m in modules.values()}) == 1  # one input shape everywhere
    blocks = torch.randint(0, 300, (10, 32))  # 3 batches, the last one smaller
    stats = collect_activation_stats(model, modules, blocks, batch_size=4)
    gram, abs_sum = plain_stats(model, modules, blocks, batch_size=4)
    assert set(stats.gram) == set(gram) == set(modules)
    wrong = [n for n in modules if not (torch.equal(stats.gram[n], gram[n]) and torch.equal(stats.abs_sum[n], abs_sum[n]))]
    assert not wrong, f"{len(wrong)} of {len(modules)} Grams differ from the plain reference: {wrong[:4]}"
    assert stats.tokens == blocks.numel()
    plain = collect_activation_stats(model, modules, blocks, batch_size=4, share_inputs=False)
    assert all(torch.equal(plain.gram[n], gram[n]) for n in modules)
    # q/k/v read one tensor and gate/up another: their Grams are equal; o and down read their own inputs
    layer = "model.layers.1"
    assert torch.equal(stats.gram[f"{layer}.self_attn.q_proj"], stats.gram[f"{layer}.self_attn.v_proj"])
    assert torch.equal(stats.gram[f"{layer}.mlp.gate_proj"], stats.gram[f"{layer}.mlp.up_proj"])
    assert not torch.equal(stats.gram[f"{layer}.self_attn.q_proj"], stats.gram[f"{layer}.self_attn.o_proj"])
    assert not torch.equal(stats.gram[f"{layer}.mlp.up_proj"], stats.gram[f"{layer}.mlp.down_proj"])


def test_an_input_changed_in_place_between_two_layers_is_not_shared():
    """Same tensor object, new contents (its version counter moved): the second layer gets its own product."""

    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, input_ids):  # noqa: ANN001, ANN201
            h = self.embed(input_ids)
            y = self.a(h)
            h.mul_(3.0)
            return y + self.b(h)

    torch.manual_seed(0)
    model = InPlace()
    modules = {"a": model.a, "b": model.b}
    blocks = torch.randint(0, 20, (4, 6))
    stats = collect_activation_stats(model, modules, blocks)
    gram, _ = plain_stats(model, modules, blocks)
    assert torch.equal(stats.gram["b"], gram["b"]) and torch.equal(stats.gram["a"], gram["a"])
    torch.testing.assert_close(stats.gram["b"], 9 * stats.gram["a"], rtol=1e-5, atol=0)  # not the stale product


def test_damping_change_reaches_factorization_and_cache_key(tmp_path):
    """The spectrum cache is keyed by the statistics and the ridge; a second ridge on the same stats object must
    give that ridge's spectra *and* factors (no stale whitening transform)."""
    torch.manual_seed(0)
    model = same_shape_llama(layers=2)
    blocks = torch.randint(0, 300, (8, 32))
    stats = collect_activation_stats(model, find_targets(model), blocks)
    results = {}
    for damping in (1e-4, 10.0, 1e-4):
        m = same_shape_llama(layers=2)
        m.load_state_dict(model.state_dict())
        svd_cache: dict = {}
        rep = compress(m, remove=0.3, data_aware="whiten", activation_stats=stats, damping=damping,
                       cache_dir=tmp_path, svd_cache=svd_cache)
        fresh = same_shape_llama(layers=2)
        fresh.load_state_dict(model.state_dict())
        ref = compress(fresh, remove=0.3, data_aware="whiten", activation_stats=collect_activation_stats(
            fresh, find_targets(fresh), blocks), damping=damping, cache_dir=tmp_path / f"fresh{damping}")
        assert [l_["rank"] for l_ in rep.layers] == [l_["rank"] for l_ in ref.layers]
        x = blocks[:2]
        torch.testing.assert_close(m(input_ids=x).logits, fresh(input_ids=x).logits, rtol=0, atol=1e-5)
        results[damping] = [l_["rank"] for l_ in rep.layers]
    assert len(list((tmp_path / "spectra").glob("*.safetensors"))) == 2  # one file per ridge, reused the 3rd time


def test_precomputed_stats_of_another_model_do_not_hit_the_cache(tmp_path):
    """Same targeted weights and calibration ids but different upstream weights (here the norms) give other
    activations: the data-aware spectra must be recomputed, not read from the first model's cache file."""
    torch.manual_seed(0)
    a = same_shape_llama(layers=2)
    b = same_shape_llama(layers=2)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        for n, p in b.named_parameters():
            if "norm" in n:
                p.mul_(torch.linspace(0.2, 3.0, p.numel()))
    blocks = torch.randint(0, 300, (8, 32))
    compress(a, remove=0.3, data_aware="whiten", calibration=blocks, cache_dir=tmp_path)
    compress(b, remove=0.3, data_aware="whiten", calibration=blocks, cache_dir=tmp_path)
    assert len(list((tmp_path / "spectra").glob("*whiten*.safetensors"))) == 2


@pytest.mark.parametrize("method", ["welore", "loss"])
def test_two_processes_choose_the_same_ranks_and_outputs(tmp_path, method):
    """`gradlore compress --data-aware whiten` in two fresh processes (separate caches): identical files, with
    WeLore's allocation and with the loss-based one (whose sensitivities come from a backward pass)."""
    torch.manual_seed(0)
    model = same_shape_llama(layers=3)
    folder = tmp_path / "dense"
    model.save_pretrained(folder)
    train_bpe([SHAKESPEARE.read_text()[:50_000]], 300).save(folder)
    env = dict(os.environ, PYTHONPATH=str(SRC), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    outs = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        env["GRADLORE_CACHE"] = str(tmp_path / f"cache{i}")
        cmd = [sys.executable, "-m", "gradlore.cli", "compress", "--model", str(folder), "--remove", "0.3",
               "--data-aware", "whiten", "--calibration", str(SHAKESPEARE), "--calibration-tokens", "2048",
               "--calibration-context", "64", "--method", method, "--out", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(out)
    meta = [json.loads((o / "welore.json").read_text()) for o in outs]
    assert meta[0]["layers"] == meta[1]["layers"]
    assert [r["rank"] for r in meta[0]["report"]["layers"]] == [r["rank"] for r in meta[1]["report"]["layers"]]
    assert (outs[0] / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()
    assert sum(isinstance(m, LowRankLinear) for m in load_compressed(outs[0]).modules()) == meta[0]["report"]["n_lrc"] > 0
