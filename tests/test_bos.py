"""Beginning-of-sequence tokens follow the tokenizer's convention in evaluation, calibration and training, the
same for dense and compressed models; our byte-level BPE (no BOS) packs and evaluates as before (issue 12)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gradlore.cli import main as cli_main  # noqa: E402
from gradlore.compress.eval import perplexity, tokenize  # noqa: E402
from gradlore.compress.welore import _calibration_blocks, compress, save_compressed  # noqa: E402
from gradlore.data import DataConfig, prepare_data, resolve_corpus, train_bpe  # noqa: E402
from gradlore.data.tokenizer import describe_bos, load_tokenizer, sequence_bos  # noqa: E402
from gradlore.data.tokens import encode_corpus  # noqa: E402
from gradlore.errors import UserError  # noqa: E402

TEXT = resolve_corpus("tiny-shakespeare").read_text()[:20_000]
BOS = 2  # <bos> in the Gemma-style vocabulary below


def gemma_tokenizer(folder: Path) -> Path:
    """transformers' GemmaTokenizer (adds <bos>, like Gemma's) over a byte-fallback vocabulary, built offline."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": BOS, "<unk>": 3, "<mask>": 4, "▁": 5}
    vocab |= {f"<0x{i:02X}>": 6 + i for i in range(256)}
    GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gemma_tok(tmp_path_factory) -> Path:
    return gemma_tokenizer(tmp_path_factory.mktemp("gemma-tok"))


def test_each_adapter_reports_its_tokenizers_convention(gemma_tok, tmp_path):
    hf = load_tokenizer(str(gemma_tok))
    assert hf.bos_id == BOS and hf.tok("abc")["input_ids"][0] == BOS  # what transformers itself adds
    assert load_tokenizer(str(gemma_tok / "tokenizer.json")).bos_id == BOS  # its post-processor says the same
    assert sequence_bos(hf, "auto") == BOS and sequence_bos(hf, "never") is None
    assert "<bos> (id 2)" in describe_bos(hf, BOS) and "convention" in describe_bos(hf, BOS)
    bpe = train_bpe([TEXT], 300)  # ours: no BOS, so nothing changes for gradlore's own pretraining
    assert bpe.bos_id is None and sequence_bos(bpe) is None
    bpe.save(tmp_path / "bpe")
    assert load_tokenizer(str(tmp_path / "bpe")).bos_id is None  # and its saved folder neither
    with pytest.raises(UserError, match="no beginning-of-sequence token"):
        sequence_bos(bpe, "always")
    with pytest.raises(UserError, match="not one of auto, always, never"):
        sequence_bos(bpe, "yes")


class _Recorder(nn.Module):
    """Uniform predictions over V tokens (perplexity exactly V); records every window it reads."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.seen = vocab, []
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):  # noqa: ANN001, ANN201
        self.seen.extend(input_ids.clone())
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab) + self.dummy})()


@pytest.mark.parametrize("context,stride", [(16, None), (16, 16), (16, 5), (9, 8)])
def test_every_window_starts_with_bos_and_every_token_is_scored_once(context, stride):
    ids = torch.randint(10, 30, (103,))
    model = _Recorder(30)
    res = perplexity(model, ids, context=context, stride=stride, batch_size=3, bos=BOS)
    assert math.isclose(res.perplexity, 30.0, rel_tol=1e-6)
    assert res.tokens_scored == ids.numel()  # the first text token is predicted from BOS
    assert res.bos == BOS and res.stride == min(stride or context, context - 1)
    assert all(int(w[0]) == BOS and len(w) <= context and int((w == BOS).sum()) == 1 for w in model.seen)
    text = torch.cat([w[1:] for w in model.seen])
    assert set(text.tolist()) <= set(ids.tolist()) and int(model.seen[0][1]) == int(ids[0])
    plain = perplexity(_Recorder(30), ids, context=context, stride=stride, batch_size=3)  # no BOS: as before,
    assert plain.tokens_scored == ids.numel() - (1 if (stride or context) < context else plain.windows)  # 1st unscored
    assert plain.bos is None


def test_training_blocks_and_validation_start_with_bos(gemma_tok, tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    cfg = DataConfig(path=str(path), tokenizer=str(gemma_tok), block_size=32)
    data = prepare_data(cfg, batch_size=4, seed=0)
    stream = torch.from_numpy(encode_corpus([TEXT], data.tokenizer).astype("int64"))  # the packed stream
    batch = data.train.next_batch()
    assert batch.shape == (4, 32) and bool((batch[:, 0] == BOS).all()) and bool((data.val[:, 0] == BOS).all())
    blocks31 = stream[: len(stream) // 31 * 31].view(-1, 31)  # the stream cut into block_size − 1 tokens
    assert all(any(torch.equal(row[1:], b) for b in blocks31) for row in batch)
    assert data.info["bos"] == BOS and "<bos>" in data.info["bos_note"]
    never = prepare_data(DataConfig(path=str(path), tokenizer=str(gemma_tok), block_size=32, bos="never"), 4, 0)
    row = never.train.next_batch()[0]
    blocks32 = stream[: len(stream) // 32 * 32].view(-1, 32)
    assert any(torch.equal(row, b) for b in blocks32) and never.info["bos"] is None
    with pytest.raises(UserError, match="data.bos"):
        DataConfig(bos="sometimes").validate()


def test_streamed_blocks_start_with_bos(gemma_tok, tmp_path):
    pytest.importorskip("datasets")
    jsonl = tmp_path / "stream.jsonl"
    jsonl.write_text("".join(json.dumps({"text": TEXT[i:i + 300]}) + "\n" for i in range(0, 12_000, 300)))
    cfg = DataConfig(path="hf:json", data_files=str(jsonl), streaming=True, block_size=32, val_blocks=2,
                     tokenizer=str(gemma_tok))
    data = prepare_data(cfg, batch_size=3, seed=0)
    b1, b2 = data.train.next_batch(), data.train.next_batch()
    assert data.val.shape == (2, 32) and bool((data.val[:, 0] == BOS).all())
    assert b1.shape == (3, 32) and bool((torch.cat([b1, b2])[:, 0] == BOS).all())
    text = torch.cat([data.val[:, 1:].reshape(-1), b1[:, 1:].reshape(-1), b2[:, 1:].reshape(-1)])
    ids = []
    for i in range(0, 12_000, 300):
        ids += data.tokenizer.encode_batch([TEXT[i:i + 300]])[0] + [data.tokenizer.eos_id]
    assert torch.equal(text, torch.tensor(ids[: text.numel()]))  # consecutive stream tokens behind each BOS


def tiny_gemma3(vocab: int):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                           sliding_window=16, tie_word_embeddings=True)
    return Gemma3ForCausalLM(cfg).eval()


def test_calibration_and_eval_of_dense_and_compressed_use_the_same_bos(gemma_tok, tmp_path, capsys):
    tok = load_tokenizer(str(gemma_tok))
    blocks = _calibration_blocks(TEXT, tok, 256, 32)
    assert blocks.shape == (8, 32) and bool((blocks[:, 0] == BOS).all()) and int((blocks == BOS).sum()) == 8
    assert torch.equal(blocks[0, 1:], tokenize(tok, TEXT, 31))
    assert not bool((_calibration_blocks(TEXT, tok, 256, 32, bos="never")[:, 0] == BOS).all())

    torch.manual_seed(0)
    model = tiny_gemma3(tok.vocab_size)
    dense = tmp_path / "dense"
    model.save_pretrained(dense)
    tok.save(dense)
    data = tmp_path / "eval.txt"
    data.write_text(TEXT[:3000])
    compress(model, remove=0.3, data_aware="whiten", calibration=TEXT, tokenizer=tok, calibration_tokens=512,
             calibration_context=32, cache_dir=tmp_path / "cache")
    comp = save_compressed(model, tmp_path / "comp", tokenizer=tok)
    found = {}
    for name, folder in (("dense", dense), ("compressed", comp)):
        assert cli_main(["eval", "--model", str(folder), "--data", str(data), "--context", "32", "--max-tokens",
                         "200", "--json"]) == 0
        out = capsys.readouterr().out
        assert "BOS <bos> (id 2) at the start of every sequence (the tokenizer's convention)" in out
        found[name] = json.loads(out[out.index("{"):])
        assert found[name]["bos"] == BOS and found[name]["tokens_scored"] == 200 and found[name]["stride"] == 31
    ids = tokenize(tok, TEXT[:3000], 200)
    assert found["dense"]["perplexity"] == pytest.approx(perplexity(load_dense(dense), ids, 32, bos=BOS).perplexity)
    assert cli_main(["eval", "--model", str(dense), "--data", str(data), "--context", "32", "--max-tokens", "200",
                     "--bos", "never", "--json"]) == 0
    out = capsys.readouterr().out
    assert "no BOS token (bos=never)" in out and json.loads(out[out.index("{"):])["tokens_scored"] == 200 - 7


def load_dense(folder: Path) -> nn.Module:
    from gradlore.models import load_model

    return load_model(folder)
