"""``gradlore bench``: side-by-side benchmarks against torch AdamW and the peer packages.

Sub-commands, one line each: ``optim`` (optimizer step time and retained state), ``pretrain`` (small LLaMA
pretraining with every optimizer, LR-swept, over seeds), ``refresh`` (the cost of per-step DCT column
selection), ``welore`` (compression of a real model), ``tokenize`` (corpus-scale tokenization and the token
cache), ``distributed`` (refresh cost on several processes), ``finetune`` (SmolLM2 through the Hugging Face
Trainer with every method, LoRA included), ``memory`` (peak memory of real training processes).
"""

from __future__ import annotations

import argparse

from gradlore.bench import distributed, finetune, memory, optim, pretrain, refresh, tokenize, welore

BENCHES = {
    "optim": (optim, "optimizer step time and state memory against the peers"),
    "pretrain": (pretrain, "pretrain a small LLaMA with every optimizer, LR-swept, over seeds"),
    "refresh": (refresh, "what re-selecting the DCT columns every step costs (dct at gap 1 vs gap 200)"),
    "welore": (welore, "WeLore vs uniform compression of SmolLM2, fine-tuning, speed"),
    "tokenize": (tokenize, "tokens/s encoding a large corpus, and the cached second start"),
    "distributed": (distributed, "refresh time and bytes with DDP / FSDP2 processes (DCT on shards vs SVD)"),
    "finetune": (finetune, "fine-tune SmolLM2 through transformers.Trainer: AdamW, LoRA (peft), GaLore, DCT, Fira, "
                           "layer-wise DCT, WeLore LRC-only"),
    "memory": (memory, "peak RSS of real training runs: AdamW, peers, the memory parts one by one; 1B; quality"),
}


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (" + ", ".join(BENCHES) + ")", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_sub = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    for name, (module, help_text) in BENCHES.items():
        q = bench_sub.add_parser(name, help=help_text, description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.build_parser(q)
        q.set_defaults(func=module.run)
