"""End-to-end WeLore on tiny random Hugging Face models: compress, save/load, bad input, LRC fine-tuning, CLI."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from gradlore.cli import main as cli_main  # noqa: E402
from gradlore.compress.lowrank_linear import LowRankLinear, is_factored  # noqa: E402
from gradlore.compress.welore import compress, load_compressed, save_compressed  # noqa: E402
from gradlore.data.corpora import resolve_corpus  # noqa: E402
from gradlore.errors import UserError  # noqa: E402
from gradlore.train.presets import resolve  # noqa: E402
from gradlore.train.rundir import read_losses  # noqa: E402
from gradlore.train.trainer import run  # noqa: E402

SHAKESPEARE = resolve_corpus("tiny-shakespeare")  # carried by the package
VOCAB = 320  # byte ids (< 256) and the test BPE (256 bytes + merges + specials) both fit


def tiny_llama(tied: bool = True) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                      max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_qwen2() -> Qwen2ForCausalLM:  # q/k/v carry biases; GQA; tied embeddings
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                      max_position_embeddings=128)
    return Qwen2ForCausalLM(cfg).eval()


def tiny_mistral() -> MistralForCausalLM:  # untied head
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                        max_position_embeddings=128, sliding_window=None)
    return MistralForCausalLM(cfg).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "qwen2": tiny_qwen2, "mistral": tiny_mistral}


def shakespeare_ids(n: int) -> torch.Tensor:
    """Real text as byte ids (vocab 256): enough structure for a loss to fall."""
    text = SHAKESPEARE.read_bytes()[: n]
    return torch.tensor(list(text), dtype=torch.long)


@pytest.mark.parametrize("family", list(MODELS))
def test_compress_save_load_roundtrip_is_exact(family, tmp_path):
    torch.manual_seed(0)
    model = MODELS[family]()
    x = torch.randint(0, VOCAB, (2, 24))
    dense_logits = model(input_ids=x).logits
    report = compress(model, remove=0.25, cache_dir=tmp_path / "cache")
    assert report.removed_fraction >= 0.25
    assert report.n_lrc >= 1 and report.targeted_params_after < report.targeted_params_before
    assert report.model_params_before - report.model_params_after == (
        report.targeted_params_before - report.targeted_params_after)
    assert 0 < report.rank_reduction < 1
    lrcs = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert len(lrcs) == report.n_lrc
    assert "lm_head" not in lrcs and not any("wte" in n for n in lrcs)
    logits = model(input_ids=x).logits
    assert not torch.equal(logits, dense_logits)

    out = save_compressed(model, tmp_path / "out")
    meta = json.loads((out / "welore.json").read_text())
    assert {n: v["rank"] for n, v in meta["layers"].items()} == {n: m.rank for n, m in lrcs.items()}
    loaded = load_compressed(out)
    assert torch.equal(loaded(input_ids=x).logits, logits)
    ranks = {n: m.rank for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)}
    assert ranks == {n: m.rank for n, m in lrcs.items()}


def test_load_uses_recorded_ranks_not_thresholds(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama()
    compress(model, remove=0.3, cache_dir=tmp_path)
    out = save_compressed(model, tmp_path / "out")
    meta = json.loads((out / "welore.json").read_text())
    meta["report"]["threshold"] = 0.999  # would give rank 1 everywhere if ranks were re-derived
    (out / "welore.json").write_text(json.dumps(meta))
    loaded = load_compressed(out)
    x = torch.randint(0, VOCAB, (1, 16))
    assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)


def test_corrupt_checkpoints_are_user_errors(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama()
    compress(model, remove=0.3, cache_dir=tmp_path)
    out = save_compressed(model, tmp_path / "out")
    weights = (out / "model.safetensors").read_bytes()
    meta = (out / "welore.json").read_text()

    (out / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # truncated download
    with pytest.raises(UserError, match="corrupt"):
        load_compressed(out)
    (out / "model.safetensors").write_bytes(weights)

    bad = json.loads(meta)
    name = next(iter(bad["layers"]))
    bad["layers"][name]["rank"] += 1  # ranks disagree with the tensors
    (out / "welore.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="corrupt"):
        load_compressed(out)

    (out / "welore.json").write_text(meta[:40])
    with pytest.raises(UserError, match="corrupt"):
        load_compressed(out)

    (out / "welore.json").write_text(meta)
    (out / "model.safetensors").unlink()
    with pytest.raises(UserError, match="missing"):
        load_compressed(out)


def test_existing_output_is_never_overwritten(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama()
    compress(model, remove=0.2, cache_dir=tmp_path)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="--overwrite"):
        save_compressed(model, target)
    assert (target / "keep.txt").read_text() == "precious"
    save_compressed(model, target, overwrite=True)
    assert (target / "welore.json").exists() and not (target / "keep.txt").exists()


def test_bad_compress_inputs(tmp_path):
    model = tiny_llama()
    with pytest.raises(UserError, match="between 0 and 1"):
        compress(model, remove=1.2, cache_dir=tmp_path)
    with pytest.raises(UserError, match="exactly one budget"):
        compress(model, cache_dir=tmp_path)
    with pytest.raises(UserError, match="candidates: .*down_proj.*q_proj"):
        compress(model, remove=0.2, targets=["c_attn"], cache_dir=tmp_path)
    with pytest.raises(UserError, match="calibration"):
        compress(model, remove=0.2, data_aware="whiten", cache_dir=tmp_path)
    with pytest.raises(UserError, match="tie_word_embeddings"):
        compress(model, remove=0.2, include_head=True, cache_dir=tmp_path)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())  # nothing changed


def test_foreign_spectrum_cache_is_rejected(tmp_path):
    torch.manual_seed(0)
    a, b = tiny_llama(), tiny_llama()
    cache = tmp_path / "spectra.safetensors"
    compress(a, remove=0.2, spectrum_cache=cache)
    with pytest.raises(UserError, match="different model"):
        compress(b, remove=0.2, spectrum_cache=cache)


def test_welore_beats_uniform_on_lowrank_structured_model(tmp_path):
    """Layers of very different intrinsic rank: the global threshold spends the budget where it is cheap."""
    torch.manual_seed(0)
    model = tiny_llama(tied=False)
    with torch.no_grad():
        linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        for i, mod in enumerate(linears):
            out_f, in_f = mod.weight.shape
            r = 4 if i % 2 == 0 else min(out_f, in_f)  # half the layers are (nearly) rank 4
            mod.weight.copy_((torch.randn(out_f, r) @ torch.randn(r, in_f)) / (r * in_f) ** 0.5
                             + 1e-4 * torch.randn(out_f, in_f))
    x = shakespeare_ids(4 * 48).reshape(4, 48)
    ref = model(input_ids=x).logits.detach()
    errs = {}
    for method in ("welore", "uniform"):
        m = tiny_llama(tied=False)
        m.load_state_dict(model.state_dict())
        compress(m, remove=0.3, method=method, cache_dir=tmp_path)
        with torch.no_grad():
            errs[method] = float((m(input_ids=x).logits - ref).norm() / ref.norm())
    assert errs["welore"] < 0.1 * errs["uniform"], errs


def test_data_aware_compression_runs_with_calibration_text(tmp_path):
    torch.manual_seed(0)
    model = tiny_gpt2()
    calib = shakespeare_ids(8 * 64).reshape(8, 64)
    rep = compress(model, remove=0.2, data_aware="whiten", calibration=calib, cache_dir=tmp_path)
    assert rep.data_aware == "whiten" and rep.n_lrc >= 1
    rep2 = compress(tiny_gpt2(), remove=0.2, method="uniform", data_aware="asvd", calibration=calib, cache_dir=tmp_path)
    assert rep2.n_lrc == rep2.n_targets


def finetune(model: torch.nn.Module, tmp_path: Path, *sets: str, trainable: str = "lrc", steps: int = 3,
             name: str = "run") -> tuple[dict, Path]:
    """Fine-tune ``model`` with the one training loop (``gradlore finetune``'s preset): (summary, run folder)."""
    folder = tmp_path / f"{name}-model"
    if is_factored(model):
        save_compressed(model, folder)
    else:
        model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    out = tmp_path / name
    cfg = resolve("finetune", [f"model.init={folder}", f"data.path={SHAKESPEARE}", f"model.trainable={trainable}",
                               "data.block_size=64", "train.batch_size=4", f"train.steps={steps}",
                               "train.progress=false", "train.threads=1", *sets])
    return run(cfg, out), out


def test_lrc_only_finetune_trains_factors_and_freezes_the_rest(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama()
    compress(model, remove=0.3, cache_dir=tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res, out = finetune(model, tmp_path, "optim.lr=3e-3", steps=30)
    lrc_params = {f"{n}.{w}" for n, m in model.named_modules() if isinstance(m, LowRankLinear) for w in ("weight_a", "weight_b")}
    assert res["trainable_params"] == sum(before[n].numel() for n in lrc_params)
    after = dict(load_compressed(out / "final").named_parameters())
    for name in before:
        if name in lrc_params:
            assert not torch.equal(after[name], before[name]), name
        else:  # N-LRC weights, embeddings (tied head), norms, LRC biases: untouched
            assert torch.equal(after[name], before[name]), name
    losses = [v for _, v in read_losses(out / "metrics.jsonl")[0]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert res["opt_state_bytes"] == 2 * 4 * res["trainable_params"] + 4 * len(lrc_params)  # exp_avg, exp_avg_sq, step
    assert res["tokens_per_s"] > 0 and res["peak_rss_bytes"] > 0


def test_full_finetune_baseline_and_norms_option(tmp_path):
    torch.manual_seed(0)
    dense = tiny_llama()
    res, _ = finetune(dense, tmp_path, trainable="all", steps=2, name="full")
    assert res["trainable_params"] == sum(p.numel() for p in dense.parameters())
    with pytest.raises(UserError, match="compress it first"):
        finetune(tiny_llama(), tmp_path, steps=1, name="dense-lrc")
    m = tiny_llama()
    compress(m, remove=0.3, cache_dir=tmp_path)
    res, _ = finetune(m, tmp_path, trainable="lrc+norms", steps=1, name="norms")
    norms = sum(p.numel() for n, p in m.named_parameters() if "norm" in n)
    factors = sum(p.numel() for n, p in m.named_parameters() if "weight_a" in n or "weight_b" in n)
    assert res["trainable_params"] == norms + factors


# ---------------------------------------------------------------------------------------------- the CLI
def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SHAKESPEARE.read_text()[:50_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def _cli(argv: list[str]) -> int:
    """The command line as a user runs it; errors are printed to stdout for the assertions below."""
    code = cli_main(argv)
    return code


def test_cli_compress_eval_finetune(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GRADLORE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    dense = tmp_path / "dense"
    tiny_llama().save_pretrained(dense)
    _tokenizer().save_pretrained(dense)
    wiki = tmp_path / "pydoc.txt"  # evaluation text disjoint from the calibration text
    from pydoc_data.topics import topics

    wiki.write_text("\n\n".join(topics[k] for k in sorted(topics))[:20_000])
    wiki = str(wiki)
    shakes = str(SHAKESPEARE)
    comp = tmp_path / "comp"
    assert _cli(["compress", "--model", str(dense), "--remove", "0.2", "--method", "welore", "--out", str(comp),
                 "--data-aware", "whiten", "--calibration", shakes, "--calibration-tokens", "1024",
                 "--calibration-context", "64"]) == 0
    out = capsys.readouterr().out
    assert "removed" in out and "effective rank reduction" in out and "model params" in out
    assert (comp / "welore.json").exists() and (comp / "tokenizer.json").exists()
    # refuses to overwrite, exit status 2
    assert _cli(["compress", "--model", str(dense), "--remove", "0.2", "--out", str(comp)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _cli(["compress", "--model", str(dense), "--remove", "1.5", "--out", str(tmp_path / "x")]) == 2
    for model in (dense, comp):
        assert _cli(["eval", "--model", str(model), "--data", wiki, "--context", "64", "--stride", "32",
                     "--max-tokens", "512", "--json"]) == 0
        printed = capsys.readouterr().out
        res = json.loads(printed[printed.index("{"):])
        assert res["tokens_scored"] == 511 and res["context"] == 64 and res["stride"] == 32
        assert res["perplexity"] > 1
    for bad, message in ((["--stride", "0"], "--stride 0 must lie in [1, --context=64]"),
                         (["--context", "4096"], "--context 4096 is longer than"),
                         (["--data", sys.executable], "binary")):
        argv = ["eval", "--model", str(dense), "--data", wiki, "--context", "64", "--max-tokens", "256", *bad]
        assert _cli(argv) == 2
        assert message in capsys.readouterr().err
    ft = tmp_path / "ft"
    assert _cli(["finetune", "--model", str(comp), "--data", shakes, "--steps", "3", "--batch-size", "2",
                 "--block-size", "32", "--out", str(ft)]) == 0
    assert "trainable:" in capsys.readouterr().out
    assert load_compressed(ft / "final") is not None


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral"])
def test_embedding_compression_keeps_tied_head_shared(family, tmp_path):
    torch.manual_seed(0)
    model = MODELS[family]()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    x = torch.randint(0, VOCAB, (2, 16))
    rep = compress(model, remove=0.5, include_embeddings=True, cache_dir=tmp_path)
    emb = model.get_input_embeddings()
    assert rep.layers[0]["name"] == next(n for n, m in model.named_modules() if m is emb)
    from gradlore.compress.lowrank_linear import LowRankEmbedding

    assert isinstance(emb, LowRankEmbedding), rep.layers[0]
    head = model.get_output_embeddings()
    if tied:
        assert head.weight_a is emb.weight_a and head.weight_b is emb.weight_b
    else:
        assert isinstance(head, torch.nn.Linear)  # an untied head is only factored with include_head
    logits = model(input_ids=x).logits
    loaded = load_compressed(save_compressed(model, tmp_path / "out"))
    assert torch.equal(loaded(input_ids=x).logits, logits)
    if tied:
        assert loaded.get_output_embeddings().weight_b is loaded.get_input_embeddings().weight_b
    res, _ = finetune(loaded, tmp_path, "optim.lr=1e-3", steps=2)
    assert res["trainable_params"] == sum(p.numel() for n, p in loaded.named_parameters() if "weight_" in n)


def test_lrc_finetune_with_a_gradlore_optimizer_keeps_smaller_state(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama()
    compress(model, remove=0.3, cache_dir=tmp_path)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "weight_" not in n}
    res, out = finetune(model, tmp_path, "optim.name=galore", "optim.rank=8", steps=3)
    assert res["optimizer"] == "galore"
    assert 0 < res["opt_state_bytes"] < 2 * 4 * res["trainable_params"]  # projected moments are smaller than AdamW's
    after = dict(load_compressed(out / "final").named_parameters())
    assert all(torch.equal(after[n], p) for n, p in frozen.items())


def test_top_level_api_is_callable_every_time(tmp_path):
    import gradlore

    for _ in range(2):  # the second access finds the subpackage bound on `gradlore`; it must still compress
        rep = gradlore.compress(tiny_llama(), remove=0.2, cache_dir=tmp_path)
        assert rep.removed_fraction >= 0.2
    assert gradlore.load_compressed is load_compressed


def tiny_gemma3():
    """Gemma-3: tied embedding scaled by √hidden inside its module (Gemma3TextScaledWordEmbedding), q/k norms."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                           sliding_window=16, tie_word_embeddings=True)
    return Gemma3ForCausalLM(cfg).eval()


def test_scaled_embedding_keeps_its_scale_at_full_rank_and_through_save_load(tmp_path):
    from gradlore.compress.lowrank_linear import LowRankEmbedding
    from gradlore.compress.welore import _factorize, _set_module

    torch.manual_seed(0)
    model = tiny_gemma3()
    emb = model.get_input_embeddings()
    assert float(emb.embed_scale) == pytest.approx(64**0.5)
    x = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        dense = model(input_ids=x).logits
    # full rank: the factored embedding (and the tied head sharing its factors) reproduce the dense model
    new = _factorize(emb, "model.embed_tokens", 64, None, None)
    _set_module(model, "model.embed_tokens", new)
    _set_module(model, "lm_head", new.tied_head())
    with torch.no_grad():
        full = model(input_ids=x).logits
        torch.testing.assert_close(full, dense, rtol=1e-4, atol=1e-4 * float(dense.abs().max()))
        new.embed_scale = None  # what the replacement did before: the factor is lost and the logits with it
        assert not torch.allclose(model(input_ids=x).logits, dense, rtol=1e-2, atol=1e-2 * float(dense.abs().max()))

    torch.manual_seed(0)
    model = tiny_gemma3()
    rep = compress(model, remove=0.5, include_embeddings=True, cache_dir=tmp_path)
    emb = model.get_input_embeddings()
    assert isinstance(emb, LowRankEmbedding) and float(emb.embed_scale) == pytest.approx(8.0), rep.layers[0]
    with torch.no_grad():
        logits = model(input_ids=x).logits
    out = save_compressed(model, tmp_path / "out")
    assert json.loads((out / "welore.json").read_text())["layers"]["model.embed_tokens"]["embed_scale"] == 8.0
    loaded = load_compressed(out)
    assert float(loaded.get_input_embeddings().embed_scale) == 8.0
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, logits)


def test_a_module_doing_more_than_its_replacement_is_refused(tmp_path):
    class Shifted(torch.nn.Embedding):
        def forward(self, ids):  # noqa: ANN001, ANN201
            return super().forward(ids) + 1.0

    class Clamped(torch.nn.Linear):
        def forward(self, x):  # noqa: ANN001, ANN201
            return super().forward(x).clamp(-0.01, 0.01)

    torch.manual_seed(0)
    model = tiny_llama(tied=False)
    old = model.model.embed_tokens
    model.model.embed_tokens = Shifted(old.num_embeddings, old.embedding_dim)
    with pytest.raises(UserError, match="embed_tokens.*Shifted.*drop --include-embeddings"):
        compress(model, remove=0.3, include_embeddings=True, cache_dir=tmp_path)
    compress(model, remove=0.3, cache_dir=tmp_path)  # without the embedding: fine
    model = tiny_llama(tied=False)
    q = model.model.layers[0].self_attn.q_proj
    clamped = Clamped(q.in_features, q.out_features, bias=False)
    model.model.layers[0].self_attn.q_proj = clamped
    with pytest.raises(UserError, match=r"layers\.0\.self_attn\.q_proj.*Clamped"):
        compress(model, remove=0.3, cache_dir=tmp_path)
    assert model.model.layers[0].self_attn.q_proj is clamped  # nothing replaced
