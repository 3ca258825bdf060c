"""Text -> tokens for training: sources (files, folders, JSONL, Hugging Face datasets, a corpora registry),
tokenizers (pretrained or a byte-level BPE trained on the corpus and cached), packing into blocks with a
held-out validation split, and a resumable batch order."""

from gradlore.data.blocks import BlockSampler, DataSpec, PreparedData, StreamSampler, prepare_data
from gradlore.data.corpora import CORPORA, DEFAULT_CORPUS, cache_dir, resolve_corpus
from gradlore.data.tokenizer import load_tokenizer, train_bpe

__all__ = ["BlockSampler", "CORPORA", "DEFAULT_CORPUS", "DataSpec", "PreparedData", "StreamSampler",
           "cache_dir", "load_tokenizer", "prepare_data", "resolve_corpus", "train_bpe"]
