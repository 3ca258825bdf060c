"""param_groups target selection on real HF LLaMA modules, and layer-wise updates inside backward."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import gradlore
from gradlore.errors import UserError


def tiny_llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("tied", [True, False])
def test_all_linear_excludes_head_and_embeddings(tied):
    model = tiny_llama(tied)
    groups = gradlore.param_groups(model, method="galore", rank=4)
    projected = groups[-1]["param_names"]
    assert len(projected) == 2 * 7  # q k v o gate up down per layer
    assert not any("lm_head" in n or "embed" in n or "norm" in n for n in projected)
    regular = groups[0]["param_names"]
    assert "model.embed_tokens.weight" in regular
    assert ("lm_head.weight" in regular) == (not tied)


def test_fragments_and_regex():
    model = tiny_llama(True)
    frag = gradlore.param_groups(model, method="fira", rank=4, target_modules=["self_attn"])
    assert len(frag[-1]["param_names"]) == 8 and frag[-1]["residual"] == "fira"
    rx = gradlore.param_groups(model, method="dct", rank=4, target_modules=r"mlp\.(gate|up)_proj$")
    assert len(rx[-1]["param_names"]) == 4 and rx[-1]["projector"] == "dct"
    assert len(gradlore.param_groups(model, method="adamw")) == 1


def test_no_match_lists_candidates():
    with pytest.raises(UserError, match=r"matches no linear layer.*model.layers.0.self_attn.q_proj"):
        gradlore.param_groups(tiny_llama(True), method="galore", rank=4, target_modules=["attention"])
    with pytest.raises(UserError, match="unknown method 'galor'"):
        gradlore.param_groups(tiny_llama(True), method="galor", rank=4)


def _batches(n, accum=1):
    gen = torch.Generator().manual_seed(5)
    return [[torch.randint(0, 64, (2, 12), generator=gen) for _ in range(accum)] for _ in range(n)]


def _train_standard(model, opt, sched, batches):
    for micro in batches:
        for ids in micro:
            (model(input_ids=ids, labels=ids).loss / len(micro)).backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def _train_layerwise(model, opt, sched, batches):
    for micro in batches:
        for k, ids in enumerate(micro):
            opt.accumulate = k < len(micro) - 1
            (model(input_ids=ids, labels=ids).loss / len(micro)).backward()
        opt.step()
        sched.step()
        opt.zero_grad()


@pytest.mark.parametrize("accum", [1, 3])
def test_layerwise_equals_standard_with_accumulation_and_schedule(accum):
    batches = _batches(5, accum)
    runs = []
    for layerwise in (False, True):
        model = tiny_llama(False).double()
        groups = gradlore.param_groups(model, method="galore", rank=4, update_proj_gap=2)
        opt = gradlore.layerwise(groups, lr=1e-2) if layerwise else gradlore.LowRankAdamW(groups, lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        (_train_layerwise if layerwise else _train_standard)(model, opt, sched, batches)
        runs.append(model)
        if layerwise:
            assert all(p.grad is None for p in model.parameters())  # freed inside backward
    for a, b in zip(runs[0].parameters(), runs[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_layerwise_state_dict_round_trip():
    model = tiny_llama(True)
    opt = gradlore.layerwise(gradlore.param_groups(model, method="dct", rank=4), lr=1e-2)
    _train_layerwise(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), _batches(2))
    sd = opt.state_dict()
    model2 = tiny_llama(True)
    model2.load_state_dict(model.state_dict())
    opt2 = gradlore.layerwise(gradlore.param_groups(model2, method="dct", rank=4), lr=1e-2)
    opt2.load_state_dict(sd)
    q = model2.model.layers[0].self_attn.q_proj.weight
    assert opt2.state[q]["proj.indices"].dtype == torch.int64
    assert opt2._inner[q].state[q] is opt2.state[q]
