"""Shared pieces of `gradlore bench welore` (arXiv 2407.11239): texts, evaluation sets, perplexity, results file.

Evaluation reads the first ``--eval-tokens`` tokens of WikiText-2 raw test and of the packaged tiny-shakespeare;
calibration and fine-tuning read disjoint slices (see `gradlore.bench.welore`). Results accumulate in one
JSON file that several phases (processes) update key by key.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from gradlore.cache import cache_dir
from gradlore.compress.eval import perplexity, read_text, tokenize
from gradlore.data.corpora import resolve_corpus
from gradlore.errors import UserError

DEFAULT_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"
METHODS = ("welore", "uniform", "loss")
CALIB_CHARS = 160_000  # calibration reads the first --calib-tokens tokens of this head; fine-tuning the rest
CALIB_SOURCES = ("pydoc", "wikitext2-tail", "shakespeare-tail")
FT_SOURCES = ("pydoc", "wikitext2-tail")  # fine-tuning text: after CALIB_CHARS, or WikiText-2 test from 300,000 on
FT_KINDS = ("lrc", "full", "lora")  # lora: the dense model through `--optimizer lora` (peft), when it exists


def _wiki(args: argparse.Namespace) -> Path:
    path = Path(args.eval_data) if args.eval_data else DEFAULT_DATA / "wikitext2-raw-test.txt"
    if not path.exists():
        raise UserError(f"evaluation text {path} not found; pass --eval-data FILE (WikiText-2 raw test).")
    return path


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def calib_text(args: argparse.Namespace) -> str:
    if args.calib == "pydoc":
        return pydoc_text()[:CALIB_CHARS]
    if args.calib == "wikitext2-tail":
        return _wiki(args).read_text(encoding="utf-8")[200_000:]
    return resolve_corpus("tiny-shakespeare").read_text(encoding="utf-8")[100_000:]


def eval_sets(args: argparse.Namespace, tok: Any) -> dict[str, torch.Tensor]:
    """Corpus name -> the first --eval-tokens ids (no special tokens; `perplexity` adds the BOS if any)."""
    n = args.eval_tokens
    texts = {"wikitext2": read_text(_wiki(args), max_chars=n * 16),
             "shakespeare": resolve_corpus("tiny-shakespeare").read_text(encoding="utf-8")[: n * 16]}
    return {name: tokenize(tok, text, n) for name, text in texts.items()}


def ppls(model: torch.nn.Module, sets: dict[str, torch.Tensor], args: argparse.Namespace, bos: int | None
         ) -> dict[str, float]:
    return {name: perplexity(model, ids, args.context, args.stride, batch_size=args.batch_size, bos=bos).perplexity
            for name, ids in sets.items()}


def _load(results_path: Path) -> dict[str, Any]:
    return json.loads(results_path.read_text()) if results_path.exists() else {}


def _save(results_path: Path, results: dict[str, Any], *keys: str) -> None:
    """Write ``keys`` of ``results`` into the file, keeping what other (concurrent) phases wrote there."""
    current = _load(results_path)
    current.update({k: results[k] for k in keys})
    results_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = results_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(current, indent=1))
    tmp.replace(results_path)


def _ckpt_dir(label: str, budget: float) -> Path:
    return cache_dir() / "bench" / f"smollm2-welore-{label}-{int(round(budget * 100))}"


def method_key(args: argparse.Namespace, method: str) -> str:
    """A run's method label: "loss" carries its sensitivity tokens when not the default 4,096."""
    return method if method != "loss" or args.sens_tokens == 4096 else f"loss@s{args.sens_tokens // 1024}k"


def _left(args: argparse.Namespace) -> float:
    return args.deadline - time.monotonic()
