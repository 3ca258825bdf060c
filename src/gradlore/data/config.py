"""What the data pipeline reads: the ``data`` section of a run's config (``--set data.FIELD=VALUE``)."""

from __future__ import annotations

from dataclasses import dataclass

from gradlore.data.tokenizer import BOS_CHOICES
from gradlore.errors import UserError, did_you_mean, require_positive


@dataclass
class DataConfig:
    path: str = "shakespeare"        # file, folder, JSONL, corpus name, or hf:NAME[:CONFIG]
    tokenizer: str = "bpe"           # "bpe" (train on the corpus, cached) or a folder / .model / .json
    vocab_size: int = 4096           # BPE vocabulary when tokenizer == "bpe"
    block_size: int = 256            # tokens per training sequence
    val_fraction: float = 0.05       # tail of a local corpus held out for validation
    val_blocks: int = 64             # validation blocks taken from a stream or a val split
    text_field: str = "text"         # JSONL / dataset field that holds the text
    split: str = "train"             # dataset split to train on (hf: only)
    val_split: str = ""              # dataset split to validate on (hf: only; "" = hold out the stream head)
    streaming: bool = False          # stream an hf: dataset instead of downloading it whole
    data_files: str = ""             # passed to datasets.load_dataset (e.g. hf:json with a local file)
    bpe_train_docs: int = 20000      # documents of a stream used to train the BPE
    bos: str = "auto"                # BOS at each block's start: auto (the tokenizer's convention) | always | never

    def validate(self) -> None:
        require_positive(self, "data", "vocab_size", "block_size", "val_blocks", "bpe_train_docs")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"data.val_fraction={self.val_fraction} must be in (0, 1). Fix: e.g. 0.05.")
        if self.bos not in BOS_CHOICES:
            raise UserError(f"data.bos={self.bos!r} is not one of {', '.join(BOS_CHOICES)}.{did_you_mean(self.bos, BOS_CHOICES)} "
                            "Fix: auto (the tokenizer's convention), always or never.")
        if self.streaming and not self.path.startswith("hf:"):
            raise UserError("data.streaming=true needs an hf:DATASET path. Fix: drop data.streaming.")

