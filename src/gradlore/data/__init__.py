"""Text -> tokens for training: sources (files, folders, JSONL, Hugging Face datasets, a corpora registry),
tokenizers (pretrained or a byte-level BPE trained on the corpus and cached), corpus-scale encoding into a
cached, memory-mapped token file, packing into blocks with a held-out validation split, a resumable batch
order, and streamed datasets that resume without re-tokenizing."""

from gradlore.cache import cache_dir
from gradlore.data.blocks import BlockSampler, PreparedData, prepare_data
from gradlore.data.config import DataConfig
from gradlore.data.corpora import CORPORA, DEFAULT_CORPUS, resolve_corpus
from gradlore.data.stream import StreamSampler
from gradlore.data.text import read_text_file
from gradlore.data.tokenizer import corpus_digest, load_tokenizer, train_bpe
from gradlore.data.tokens import encode_corpus

__all__ = ["BlockSampler", "CORPORA", "DEFAULT_CORPUS", "DataConfig", "PreparedData", "StreamSampler",
           "cache_dir", "corpus_digest", "encode_corpus", "load_tokenizer", "prepare_data", "read_text_file",
           "resolve_corpus", "train_bpe"]
