"""`gradlore analyze`: train a small LLaMA on a text file while recording gradient-rank statistics, then plot.

Paper: arXiv 2407.11239 ("From GaLore to WeLore"): during training the gradients of some layer types
become low-rank (stable rank ‖G‖_F²/‖G‖₂² falls towards 1) and their weights follow, while others stay
high-rank; GaLore (arXiv 2403.03507) also relies on the top-r gradient subspace drifting slowly
(cos of principal angles between records near 1). This command lets a user see both on their own run:

    gradlore analyze --data ../shared/data/tinyshakespeare.txt --steps 300 --every 10 --out runs/analyze
    gradlore analyze --from runs/analyze/gradient_stats.jsonl      # re-plot / summarise an existing run

The loop is deliberately compact and self-contained (HF `LlamaForCausalLM`, a byte-level BPE trained with
`tokenizers` on the text itself, random contiguous blocks, AdamW or any gradlore preset), so the analysis
does not depend on the full training driver. Outputs in --out: `gradient_stats.jsonl` (one line per
(step, weight)), `train_log.jsonl` (loss), `gradient_rank.png`, `summary.md`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from gradlore.analysis.plot import format_summary, plot_records, summarize
from gradlore.analysis.recorder import GradientRecorder, read_records
from gradlore.errors import UserError


@dataclass
class AnalyzeConfig:
    data: str
    out: str = "runs/analyze"
    steps: int = 300
    every: int = 10
    rank: int = 8  # subspace rank for the drift cosine
    top_k: int = 8
    optimizer: str = "adamw"  # "adamw" or a gradlore preset name
    opt_rank: int = 32  # rank of the gradlore optimizer's projection
    lr: float = 1e-3
    warmup: int = 20
    batch_size: int = 16
    seq_len: int = 128
    hidden: int = 128
    intermediate: int | None = None  # default: LLaMA's ≈ 8/3·hidden rounded to 8
    layers: int = 4
    heads: int = 4
    vocab_size: int = 2048
    max_chars: int | None = None
    target_modules: str = "all-linear"
    weights: bool = True
    seed: int = 0
    threads: int | None = None

    def validate(self) -> None:
        path = Path(self.data)
        if not path.is_file():
            raise UserError(
                f"--data {self.data}: no such file; pass a UTF-8 text file (e.g. tinyshakespeare.txt)"
            )
        for name in (
            "steps",
            "every",
            "rank",
            "batch_size",
            "seq_len",
            "hidden",
            "layers",
            "heads",
            "vocab_size",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.hidden % self.heads:
            raise UserError(
                f"--hidden {self.hidden} must be divisible by --heads {self.heads}; change one of them"
            )
        if self.vocab_size < 260:
            raise UserError(
                f"--vocab-size {self.vocab_size} is below the 256 byte symbols plus specials; use ≥ 260"
            )
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")


def _targets(spec: str) -> str | list[str]:
    """'all-linear' | 're:PATTERN' (regex) | 'q_proj,v_proj' (name fragments)."""
    if spec == "all-linear":
        return spec
    if spec.startswith("re:"):
        return spec[3:]
    return [s.strip() for s in spec.split(",") if s.strip()]


def tokenize_file(path: str, vocab_size: int, max_chars: int | None = None) -> tuple[torch.Tensor, int]:
    """Train a byte-level BPE on the file's text and encode it: (token ids (N,), vocabulary size)."""
    from tokenizers import ByteLevelBPETokenizer

    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if max_chars:
        text = text[:max_chars]
    # ~8k-character chunks cut at line ends: the tokenizers library batches them over threads
    chunks, start = [], 0
    while start < len(text):
        end = text.find("\n", start + 8192)
        end = len(text) if end < 0 else end + 1
        chunks.append(text[start:end])
        start = end
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(chunks, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)  # fmt: skip
    ids = [i for enc in tok.encode_batch(chunks) for i in enc.ids]
    return torch.tensor(ids, dtype=torch.long), tok.get_vocab_size()


def build_model(cfg: AnalyzeConfig, vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    inter = cfg.intermediate or int(math.ceil(cfg.hidden * 8 / 3 / 8) * 8)
    config = LlamaConfig(
        hidden_size=cfg.hidden,
        intermediate_size=inter,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        num_hidden_layers=cfg.layers,
        vocab_size=vocab,
        max_position_embeddings=cfg.seq_len,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def build_optimizer(cfg: AnalyzeConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    try:
        import gradlore
        from gradlore.presets import PRESETS
    except ImportError as exc:
        raise UserError(f"--optimizer {cfg.optimizer} needs gradlore's optimizer, which failed to import ({exc}); "
                        "use --optimizer adamw") from exc  # fmt: skip
    if cfg.optimizer not in PRESETS:
        raise UserError(
            f"--optimizer {cfg.optimizer!r} is unknown; choose 'adamw' or one of {sorted(PRESETS)}"
        )
    groups = gradlore.param_groups(
        model, method=cfg.optimizer, rank=cfg.opt_rank, target_modules="all-linear"
    )
    return gradlore.LowRankAdamW(groups, lr=cfg.lr)


def train_and_record(cfg: AnalyzeConfig, log=print) -> dict[str, Any]:
    """Run the short training with a GradientRecorder; write JSONL, plot and summary into cfg.out."""
    from transformers import get_cosine_schedule_with_warmup

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stats_path, log_path = out / "gradient_stats.jsonl", out / "train_log.jsonl"
    for p in (stats_path, log_path):
        p.unlink(missing_ok=True)  # a fresh run replaces its own outputs, never appends to an old run

    t0 = time.perf_counter()
    ids, vocab = tokenize_file(cfg.data, cfg.vocab_size, cfg.max_chars)  # (N,)
    n_val = max(len(ids) // 20, cfg.seq_len + 2)
    train_ids, val_ids = ids[:-n_val], ids[-n_val:]
    if len(train_ids) < 2 * (cfg.seq_len + 1):
        raise UserError(
            f"--data {cfg.data} has only {len(ids)} tokens; give a longer text or a smaller --seq-len"
        )
    log(f"# tokenized {len(ids):,} tokens (vocab {vocab}) in {time.perf_counter() - t0:.1f}s")

    model = build_model(cfg, vocab)
    opt = build_optimizer(cfg, model)
    sched = get_cosine_schedule_with_warmup(opt, min(cfg.warmup, cfg.steps // 10), cfg.steps)
    recorder = GradientRecorder(model, every=cfg.every, rank=cfg.rank, target_modules=_targets(cfg.target_modules),
                                path=stats_path, top_k=cfg.top_k, weights=cfg.weights)  # fmt: skip
    gen = torch.Generator().manual_seed(cfg.seed)

    def batch(src: torch.Tensor) -> torch.Tensor:
        starts = torch.randint(0, len(src) - cfg.seq_len, (cfg.batch_size,), generator=gen)
        return torch.stack([src[s : s + cfg.seq_len] for s in starts.tolist()])  # (B, T)

    @torch.no_grad()
    def val_loss(n: int = 4) -> float:
        model.eval()
        total = 0.0
        for _ in range(n):
            x = batch(val_ids)  # (B, T); HF shifts the labels internally
            total += float(model(input_ids=x, labels=x).loss)
        model.train()
        return total / n

    val_first = val_loss()
    model.train()
    losses: list[float] = []
    t_train = time.perf_counter()
    with recorder, log_path.open("w", encoding="utf-8") as flog:
        for step in range(cfg.steps):
            x = batch(train_ids)  # (B, T)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            recorder.record(step)  # final gradients, before the update
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            flog.write(json.dumps({"step": step, "loss": losses[-1], "lr": sched.get_last_lr()[0]}) + "\n")
            if step % max(cfg.steps // 10, 1) == 0 or step == cfg.steps - 1:
                log(f"step {step:5d}  loss {losses[-1]:.3f}  ({time.perf_counter() - t_train:.0f}s)")
    val_last = val_loss()
    tail = max(1, min(10, cfg.steps // 5))  # steps averaged for the final train loss
    records = recorder.records
    rows = summarize(records)
    plot_records(
        records, out / "gradient_rank.png", title=f"{Path(cfg.data).name}: {cfg.optimizer}, {cfg.steps} steps"
    )
    result = {
        "config": asdict(cfg),
        "tokens": len(ids),
        "vocab": vocab,
        "params": sum(p.numel() for p in model.parameters()),
        "loss_first": losses[0],
        "loss_last": sum(losses[-tail:]) / tail,
        "val_loss_first": val_first,
        "val_loss_last": val_last,
        "seconds": time.perf_counter() - t0,
        "summary": rows,
    }
    text = (
        f"{result['params']:,} parameters, {len(ids):,} tokens, {cfg.steps} steps × {cfg.batch_size}×{cfg.seq_len}; "
        f"train loss {losses[0]:.3f} → {result['loss_last']:.3f} (mean of last {tail}), "
        f"held-out loss {val_first:.3f} → {val_last:.3f}; {result['seconds']:.0f}s\n\n" + format_summary(rows)
    )
    (out / "summary.md").write_text(text + "\n", encoding="utf-8")
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    result["text"] = text
    return result


def run(args: argparse.Namespace) -> int:
    if args.from_path:
        records = read_records(args.from_path)
        src = Path(args.from_path)
        out = Path(args.out) if args.out else (src if src.is_dir() else src.parent)
        png = plot_records(records, out / "gradient_rank.png", title=src.name)
        print(format_summary(summarize(records)))
        print(f"\nplot: {png}")
        return 0
    if not args.data:
        raise UserError("give --data FILE (a text to train on) or --from JSONL (an existing recording)")
    cfg = AnalyzeConfig(
        data=args.data, out=args.out or "runs/analyze", steps=args.steps, every=args.every, rank=args.rank,
        top_k=args.top_k, optimizer=args.optimizer, opt_rank=args.opt_rank, lr=args.lr, warmup=args.warmup,
        batch_size=args.batch_size, seq_len=args.seq_len, hidden=args.hidden, intermediate=args.intermediate,
        layers=args.layers, heads=args.heads, vocab_size=args.vocab_size, max_chars=args.max_chars,
        target_modules=args.target_modules, weights=not args.no_weights, seed=args.seed, threads=args.threads,
    )  # fmt: skip
    result = train_and_record(cfg)
    print()
    print(result["text"])
    print(f"\noutputs in {cfg.out}: gradient_stats.jsonl, train_log.jsonl, gradient_rank.png, summary.md")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `gradlore analyze`."""
    d = AnalyzeConfig(data="")
    p = sub.add_parser(
        "analyze",
        help="record gradient stable rank / subspace drift per layer type during a short training, and plot",
        description=__doc__.split("\n\n")[0],
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="text file to train a small LLaMA on while recording")
    src.add_argument("--from", dest="from_path", help="existing gradient_stats.jsonl (or its folder) to plot")
    p.add_argument("--out", default=None, help="output folder (default runs/analyze, or the --from folder)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--every", type=int, default=d.every, help="record every K steps")
    p.add_argument("--rank", type=int, default=d.rank, help="subspace rank r for the drift cosine")
    p.add_argument("--top-k", type=int, default=d.top_k, help="leading singular values stored")
    p.add_argument("--optimizer", default=d.optimizer, help="'adamw' or a gradlore preset (galore, dct, ...)")
    p.add_argument("--opt-rank", type=int, default=d.opt_rank, help="projection rank of a gradlore optimizer")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--max-chars", type=int, default=None, help="use only the first N characters of --data")
    p.add_argument("--target-modules", default=d.target_modules,
                   help="'all-linear', comma-separated name fragments (q_proj,v_proj) or re:REGEX")  # fmt: skip
    p.add_argument("--no-weights", action="store_true", help="do not record the weights' stable rank")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=run)
    return p
