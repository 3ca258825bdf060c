"""Fine-tune SmolLM2-135M through ``transformers.Trainer`` with every method, side by side, each in its own process.

    gradlore bench finetune --runs adamw:5e-5,lora:1e-3,dct:1e-4      # method:lr pairs; finished runs are reused
    gradlore bench finetune --report                                  # the table of what has run

Methods (all through the Hugging Face Trainer, the same data, batches, schedule and token budget):
- ``adamw``: every weight, ``torch.optim.AdamW`` (through ``gradlore.hf.OptimizerFactory(method="adamw")``);
- ``lora``: LoRA (arXiv 2106.09685) through peft on every linear layer but the head, rank ``--lora-rank``
  (default: the rank whose adapters hold as many numbers as the projected methods' rank-r moments, below);
- ``galore``, ``dct`` (the GaLore-style ``dct-galore`` preset), ``fira``: gradlore presets at rank ``--rank`` on every linear layer but the head (the
  tied embedding trains with plain AdamW), through ``gradlore.hf.OptimizerFactory``;
- ``dct-step``: the published SVD-free recipe (preset ``dct``: columns re-selected every step, moments that
  follow them, scale 1), whatever ``--gap`` says;
- ``dct-layerwise``: ``dct`` updating each weight inside backward (gradients freed at once);
- ``welore-lrc``: WeLore (arXiv 2407.11239) data-aware compression at ``--welore-remove``, then only the
  low-rank factors train (AdamW);
- ``base``: no training (the starting perplexity).

Variants (flags; a run made with one is recorded under its own key, ``dct@0.0003+frozen-emb``, so it never
replaces the default run):
- ``--freeze-embedding``: the input embedding (and the output head tied to it) is frozen, as LoRA leaves it:
  no gradient, no optimizer state (not for ``lora`` and ``welore-lrc``, which train neither already);
- ``--plain-lr-ratio R``: the projected methods train their unprojected parameters (embedding, tied head,
  norms) at ``lr × R`` (``OptimizerFactory(plain_lr_ratio=R)``);
- ``--gradient-checkpointing``: ``TrainingArguments(activation_checkpointing=True)`` (transformers' name for
  gradient checkpointing): each decoder layer's activations are recomputed in backward, so gradients and
  optimizer state, not activations, set the peak. The same optimization (same losses up to rounding); the
  table reports it as a separate memory setting, with the targets judged within it.

Data: a real text (default ``../shared/data/tinyshakespeare.txt``): the first 90% is the training side (the
first ``steps × batch × accumulation`` blocks of ``--seq`` tokens are used, each once), the last 10% is held
out; validation perplexity is over its first ``--val-tokens`` tokens in disjoint windows of ``--seq``
(``gradlore.compress.eval.perplexity``). Figures per run: validation perplexity, trainable parameters,
optimizer state bytes (``gradlore.state_bytes``), peak RSS of the worker process over model loading and
training (``ru_maxrss`` read right after training; the evaluation pass that follows, batch 4 × 1 full
vocabulary of logits, is reported apart in results.json as ``peak_rss_bytes``), and training tokens/s
(Trainer ``train_runtime``, first step included).
Results accumulate in ``--out``/results.json; a table (best LR per method, then every run) in ``table.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gradlore.cache import cache_dir
from gradlore.errors import UserError

DEFAULT_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "tinyshakespeare.txt"
METHODS = ("base", "adamw", "lora", "galore", "dct", "dct-step", "fira", "dct-layerwise", "welore-lrc")
GRADLORE = ("galore", "dct", "dct-step", "fira", "dct-layerwise", "welore-lrc")
PROJECTED = ("galore", "dct", "dct-step", "fira", "dct-layerwise")
VARIANTS = {"freeze_embedding": False, "plain_lr_ratio": 1.0, "gradient_checkpointing": False}  # flag: default
MIB = 2**20


# ------------------------------------------------------------------------------------------------ worker
def _blocks(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """(train blocks (n, seq), held-out validation ids (val_tokens,)) of the SmolLM2 tokenization of the text."""
    from gradlore.data.tokenizer import load_tokenizer
    from gradlore.models import smollm2

    text = Path(args.data).read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    tok = load_tokenizer(str(smollm2()))
    train_ids, val_ids = (torch.tensor(tok.encode_batch([t])[0], dtype=torch.long) for t in (text[:cut], text[cut:]))
    n = args.steps * args.batch_size * args.accum
    if train_ids.numel() < n * args.seq or val_ids.numel() < args.val_tokens:
        raise UserError(f"{args.data} is too short for {n} blocks of {args.seq} tokens and {args.val_tokens} held-out.")
    return train_ids[: n * args.seq].view(n, args.seq), val_ids[: args.val_tokens]


def _welore_dir(args: argparse.Namespace) -> Path:
    return cache_dir() / "bench" / f"smollm2-welore-whiten-{int(round(args.welore_remove * 100))}"


def prepare_welore(args: argparse.Namespace) -> Path:
    """The data-aware WeLore model (calibrated on CPython's pydoc prose, as ``gradlore bench welore``), once."""
    out = _welore_dir(args)
    if (out / "welore.json").exists():
        return out
    from gradlore.bench.welore import pydoc_text
    from gradlore.compress.welore import compress, save_compressed
    from gradlore.data.tokenizer import load_tokenizer
    from gradlore.models import load_model, smollm2

    model, tok = load_model("smollm2"), load_tokenizer(str(smollm2()))
    compress(model, remove=args.welore_remove, data_aware="whiten", calibration=pydoc_text()[:160_000],
             tokenizer=tok, damping=0.1)
    return save_compressed(model, out, tokenizer=tok)


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def _model_and_options(method: str, args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model to train and the factory's keyword arguments."""
    from gradlore.compress.lowrank_linear import mark_trainable
    from gradlore.models import load_model
    from gradlore.optim.lora import add_lora

    model = load_model(_welore_dir(args) if method == "welore-lrc" else "smollm2")
    model.config.use_cache = False
    model.train()
    if variants(method, args).get("freeze_embedding"):
        freeze_embedding(model)
    if method == "welore-lrc":
        mark_trainable(model, "lrc")
        return model, {"method": "adamw"}
    if method == "lora":
        return add_lora(model, args.lora_rank, "all-linear"), {"method": "adamw"}
    if method == "adamw":
        return model, {"method": "adamw"}
    name, layerwise = method.removesuffix("-layerwise"), method.endswith("-layerwise")
    extra = {"plain_lr_ratio": args.plain_lr_ratio} if "plain_lr_ratio" in variants(method, args) else {}
    if name == "dct-step":  # the published recipe: its own gap (1), remap, scale 1
        return model, {"method": "dct", "rank": args.rank, "layerwise": layerwise, **extra}
    name = {"dct": "dct-galore"}.get(name, name)  # GaLore-style DCT at --gap
    return model, {"method": name, "rank": args.rank, "update_proj_gap": args.gap, "layerwise": layerwise, **extra}


def freeze_embedding(model: torch.nn.Module) -> None:
    """Freeze the input embedding; a head tied to it is the same parameter, so it is frozen too."""
    model.get_input_embeddings().weight.requires_grad_(False)


def variants(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """The variant flags set away from their defaults that change this method's run."""
    applies = {"freeze_embedding": method not in ("base", "lora", "welore-lrc"),
               "plain_lr_ratio": method in PROJECTED, "gradient_checkpointing": method != "base"}
    return {k: getattr(args, k) for k, default in VARIANTS.items() if applies[k] and getattr(args, k) != default}


def run_key(method: str, lr: float, args: argparse.Namespace) -> str:
    tags = {"freeze_embedding": lambda v: "frozen-emb", "plain_lr_ratio": lambda v: f"plain-lr-x{v:g}",
            "gradient_checkpointing": lambda v: "gc"}
    seed = f"+s{args.seed}" if args.seed else ""  # seed 0 keeps the keys recorded before seeds were run
    return f"{method}@{lr:g}" + "".join(f"+{tags[k](v)}" for k, v in variants(method, args).items()) + seed


def training_arguments(method: str, lr: float, args: argparse.Namespace) -> Any:
    """The run's ``TrainingArguments`` (the same for every method but the variant flags)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(args.out / "trainer" / run_key(method, lr, args)), max_steps=args.steps, learning_rate=lr,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.accum,
        lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 10), weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=args.seed, disable_tqdm=True,
        dataloader_num_workers=0, activation_checkpointing=bool(variants(method, args).get("gradient_checkpointing")))


def worker(method: str, lr: float, args: argparse.Namespace) -> dict[str, Any]:
    """One run in this process; returns its figures."""
    from transformers import Trainer
    from transformers.utils import logging as hf_logging

    from gradlore.compress.eval import perplexity
    from gradlore.hf.optimizer import OptimizerFactory
    from gradlore.optim.state import state_bytes
    from gradlore.train.rundir import peak_rss_bytes

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    train, val = _blocks(args)
    model, options = _model_and_options(method if method != "base" else "adamw", args)
    result: dict[str, Any] = {"method": method, "lr": lr, "params": sum(p.numel() for p in model.parameters())}
    losses: list[float] = []
    if method != "base":
        trainer = Trainer(model=model, args=training_arguments(method, lr, args), train_dataset=_Blocks(train),
                          optimizer_cls_and_kwargs=(OptimizerFactory, options))
        result["rss_before_train_bytes"] = peak_rss_bytes()
        out = trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        result.update(trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                      opt_state_bytes=state_bytes(opt), train_seconds=out.metrics["train_runtime"],
                      tokens=train.numel(), tokens_per_s=train.numel() / out.metrics["train_runtime"],
                      first_loss=losses[0], last_loss=losses[-1], rss_after_train_bytes=peak_rss_bytes())
    t0 = time.perf_counter()
    res = perplexity(model, val, context=args.seq, stride=args.seq, batch_size=args.batch_size)
    result.update(val_ppl=res.perplexity, val_nll=res.nll, val_tokens_scored=res.tokens_scored,
                  eval_seconds=time.perf_counter() - t0, peak_rss_bytes=peak_rss_bytes(), losses=losses)
    return result


# ------------------------------------------------------------------------------------------ orchestration
def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _save(path: Path, key: str, value: dict[str, Any]) -> None:
    results = _load(path)
    results[key] = value
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def _setting(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """What makes runs comparable: a result recorded under another setting is not reused. Variant flags enter
    only where set and relevant (so results recorded before they existed stay valid)."""
    return {k: getattr(args, k) for k in ("data", "steps", "batch_size", "accum", "seq", "val_tokens", "rank",
                                           "lora_rank", "gap", "seed", "welore_remove")} | {
        "data": str(args.data)} | variants(method, args)


def worker_command(method: str, lr: float, args: argparse.Namespace) -> list[str]:
    """The command line of one run's worker process (the setting as flags, booleans as bare flags)."""
    cmd = [sys.executable, "-m", "gradlore.bench.finetune", "--worker", f"{method}:{lr}", "--out", str(args.out),
           "--threads", str(args.threads)]
    for k, v in _setting(args, method).items():
        flag = f"--{k.replace('_', '-')}"
        cmd += [flag] if v is True else [f"{flag}={v}"]
    return cmd


def _runs(spec: str) -> list[tuple[str, float]]:
    out = []
    for item in spec.split(","):
        method, _, lr = item.strip().partition(":")
        if method not in METHODS:
            raise UserError(f"unknown method {method!r}; choose from {', '.join(METHODS)}.")
        out.append((method, float(lr) if lr else 0.0))
    return out


def lora_rank_for(rank: int) -> int:
    """LoRA rank whose adapters hold as many numbers as rank-r projected moments on SmolLM2's linear layers.

    Per layer, a projected weight (m, n) keeps r·max(m, n) numbers per moment; LoRA keeps r_L·(m + n).
    SmolLM2: q, o 576×576; k, v 192×576; gate, up 1536×576; down 576×1536.
    """
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    return round(rank * sum(max(s) for s in shapes) / sum(sum(s) for s in shapes))


def _best(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    best: dict[str, dict[str, Any]] = {}
    for r in runs:
        if r["method"] not in best or r["val_ppl"] < best[r["method"]]["val_ppl"]:
            best[r["method"]] = r
    return best


def _label(r: dict[str, Any]) -> str:
    setting, tags = r.get("setting", {}), []
    if setting.get("freeze_embedding"):
        tags.append("embedding frozen")
    if "plain_lr_ratio" in setting:
        tags.append(f"plain LR ×{setting['plain_lr_ratio']:g}")
    if setting.get("seed"):  # a repeat of a sweep run on another seed (seed 0 rows stay as recorded)
        tags.append(f"seed {setting['seed']}")
    return r["method"] + (f" ({', '.join(tags)})" if tags else "")


def table(results: dict[str, Any]) -> str:
    """Per memory setting (default, gradient checkpointing): best LR of each method, every run, the targets."""
    runs = [r for k, r in results.items() if not k.startswith("_")]

    def row(r: dict[str, Any]) -> str:
        if r["method"] == "base":
            return f"| base (no training) | – | {r['val_ppl']:.2f} | 0 | – | – | – |"
        return (f"| {_label(r)} | {r['lr']:g} | {r['val_ppl']:.2f} | {r['trainable_params']:,} | "
                f"{r['opt_state_bytes'] / MIB:,.1f} | {train_peak(r) / MIB:,.0f} | {r['tokens_per_s']:.0f} |")

    head = ("| method | lr | val ppl | trainable params | optimizer state MiB | peak RSS MiB (load + train) | "
            "train tokens/s |\n|---|---|---|---|---|---|---|")
    lines: list[str] = []
    for gc in (False, True):
        section = [r for r in runs if bool(r.get("setting", {}).get("gradient_checkpointing")) == gc]
        if not section:
            continue
        best = _best(section)
        plain = _best([r for r in section if not set(r.get("setting", {})) & {"freeze_embedding", "plain_lr_ratio"}])
        order = [m for m in METHODS if m in best]
        title = "With gradient checkpointing" if gc else "Default (activations kept)"
        lines += [f"### {title}", "", "Best learning rate of each method:", "", head, *(row(best[m]) for m in order),
                  "", "Every run:", "", head,
                  *(row(r) for r in sorted(section, key=lambda r: (METHODS.index(r["method"]), _label(r), r["lr"]))),
                  "", *targets(best, plain), ""]
    return "\n".join(lines).rstrip()


def train_peak(r: dict[str, Any]) -> int:
    return r["rss_after_train_bytes"]


def targets(best: dict[str, dict[str, Any]], plain: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """Target 1 over every gradlore run (variants included); target 2 between the runs without optimizer
    variants (``plain``: full AdamW against layer-wise DCT training the same parameters)."""
    plain = best if plain is None else plain
    out = []
    if "lora" in best:
        lora = best["lora"]
        limit = 1.25 * train_peak(lora)
        ok = [f"{_label(best[m])} @ {best[m]['lr']:g} ({best[m]['val_ppl']:.2f}, "
              f"{train_peak(best[m]) / MIB:,.0f} MiB)" for m in GRADLORE if m in best
              and best[m]["val_ppl"] <= lora["val_ppl"] and train_peak(best[m]) <= limit]
        out.append(f"Target 1 (a gradlore method with val ppl <= LoRA's {lora['val_ppl']:.2f} at peak RSS <= "
                   f"{limit / MIB:,.0f} MiB = LoRA + 25%): {'met by ' + ', '.join(ok) if ok else 'missed'}.")
    if "adamw" in plain and "dct-layerwise" in plain:
        adamw, lw = plain["adamw"], plain["dct-layerwise"]
        grads = 4 * adamw["trainable_params"]
        gap = train_peak(adamw) - train_peak(lw)
        out.append(f"Target 2 (layer-wise DCT's peak RSS below AdamW's by >= the full gradients, {grads / MIB:,.0f} "
                   f"MiB): {'met' if gap >= grads else 'missed'} ({gap / MIB:,.0f} MiB below).")
    return out


def run(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    args.data = Path(args.data)
    if args.lora_rank is None:
        args.lora_rank = lora_rank_for(args.rank)
    results_path = args.out / "results.json"
    if args.worker:  # one run, in this (fresh) process
        method, lr = _runs(args.worker)[0]
        result = worker(method, lr, args) | {"setting": _setting(args, method)}
        _save(results_path, run_key(method, lr, args), result)
        return 0
    if not args.report:
        if not args.data.exists():
            raise UserError(f"training text {args.data} not found; pass --data FILE.")
        for method, lr in _runs(args.runs):
            key = run_key(method, lr, args)
            done = _load(results_path).get(key)
            if done and done.get("setting") == _setting(args, method) and not args.redo:
                print(f"{key}: reused (val ppl {done['val_ppl']:.2f})", flush=True)
                continue
            if method == "welore-lrc":
                prepare_welore(args)
            cmd = worker_command(method, lr, args)
            t0 = time.perf_counter()
            print(f"{key}: running ...", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"run {key} failed")
            r = _load(results_path)[key]
            print(f"{key}: val ppl {r['val_ppl']:.2f}, peak RSS {r['peak_rss_bytes'] / MIB:,.0f} MiB "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    text = table(_load(results_path))
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return 0


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--runs", default="base:0,adamw:3e-5,lora:1e-3,galore:3e-4,dct:3e-4,fira:3e-4,dct-layerwise:3e-4,"
                                     "welore-lrc:3e-4",
                   help="comma-separated METHOD:LR pairs; methods: " + ", ".join(METHODS))
    p.add_argument("--data", default=str(DEFAULT_DATA), help="training/validation text (default: tinyshakespeare)")
    p.add_argument("--out", type=Path, default=Path("bench_results/finetune"))
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--val-tokens", type=int, default=8192)
    p.add_argument("--rank", type=int, default=128, help="rank of the projected methods")
    p.add_argument("--lora-rank", type=int, default=None, help="default: matched to --rank (see lora_rank_for)")
    p.add_argument("--gap", type=int, default=200, help="update_proj_gap of the projected methods")
    p.add_argument("--welore-remove", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--freeze-embedding", action="store_true",
                   help="freeze the input embedding (and a head tied to it), as LoRA leaves it")
    p.add_argument("--plain-lr-ratio", type=float, default=1.0,
                   help="projected methods: LR of the unprojected parameters (embedding, norms) = lr × this")
    p.add_argument("--gradient-checkpointing", "--activation-checkpointing", dest="gradient_checkpointing",
                   action="store_true", help="TrainingArguments(activation_checkpointing=True): recompute activations")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--redo", action="store_true", help="run again what results.json already holds")
    p.add_argument("--report", action="store_true", help="only print the table")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(argparse.ArgumentParser(prog="python -m gradlore.bench.finetune")).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
