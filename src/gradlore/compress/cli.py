"""`gradlore compress | eval | finetune`: WeLore compression (arXiv 2407.11239), perplexity, LRC fine-tuning.

    gradlore compress --model smollm2 --remove 0.2 --method welore --out runs/smol-w20
    gradlore compress --model DIR --remove 0.1 --data-aware whiten --calibration shakespeare.txt --out DIR2
    gradlore eval     --model runs/smol-w20 --data wikitext2-raw-test.txt --context 512 --stride 512
    gradlore finetune --model runs/smol-w20 --data shakespeare.txt --steps 100 --out runs/smol-w20-ft
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from gradlore.errors import UserError


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a fraction such as 0.2") from None
    return value


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=1, default=str))


# --------------------------------------------------------------------------------------------- compress
def run_compress(args: argparse.Namespace) -> int:
    from gradlore.compress.welore import (
        compress,
        load_model,
        load_tokenizer,
        prepare_out_dir,
        save_compressed,
    )

    prepare_out_dir(args.out, args.overwrite)  # refuse early, before any work
    if args.remove is None and args.rank_reduction is None:
        raise UserError("give a budget: --remove FRACTION (share of targeted parameters) or --rank-reduction FRACTION.")
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer or args.model, required=args.data_aware is not None and args.calibration is not None)
    calibration = None
    if args.data_aware:
        if not args.calibration:
            raise UserError("--data-aware needs --calibration FILE (text different from your evaluation data).")
        from gradlore.compress.eval import read_text

        calibration = read_text(args.calibration, max_chars=args.calibration_tokens * 16)
    t0 = time.perf_counter()
    report = compress(
        model,
        remove=args.remove,
        rank_reduction=args.rank_reduction,
        method=args.method,
        targets=args.targets,
        min_ratio=args.min_ratio,
        data_aware=args.data_aware,
        calibration=calibration,
        tokenizer=tokenizer,
        calibration_tokens=args.calibration_tokens,
        calibration_context=args.calibration_context,
        damping=args.damping,
        include_head=args.include_head,
        include_embeddings=args.include_embeddings,
        cache_dir=args.cache_dir,
        spectrum_cache=args.spectrum_cache,
    )
    out = save_compressed(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
    print(report.summary())
    print(f"saved to {out} ({time.perf_counter() - t0:.1f} s)")
    if args.json:
        _print_json({k: v for k, v in report.to_dict().items() if k != "layers"} | {"out": str(out)})
    return 0


# ------------------------------------------------------------------------------------------------- eval
def run_eval(args: argparse.Namespace) -> int:
    import torch

    from gradlore.compress.eval import perplexity, read_text, tokenize
    from gradlore.compress.welore import count_params, load_model, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    max_chars = args.max_tokens * 16 if args.max_tokens else None
    ids = tokenize(tokenizer, read_text(args.data, max_chars=max_chars), args.max_tokens)
    res = perplexity(model, ids, context=args.context, stride=args.stride, batch_size=args.batch_size)
    print(
        f"{args.model}: perplexity {res.perplexity:.3f} on {res.tokens_scored:,} tokens of {args.data} "
        f"(context {res.context}, stride {res.stride}, {res.windows} windows, {count_params(model):,} params, "
        f"{res.seconds:.1f} s)"
    )
    if args.json:
        _print_json(res.to_dict() | {"model": str(args.model), "data": str(args.data), "params": count_params(model)})
    return 0


# --------------------------------------------------------------------------------------------- finetune
def run_finetune(args: argparse.Namespace) -> int:
    import torch

    from gradlore.compress.eval import read_text, tokenize
    from gradlore.compress.finetune import finetune
    from gradlore.compress.welore import (
        is_compressed_dir,
        load_model,
        load_tokenizer,
        prepare_out_dir,
        save_compressed,
    )

    if args.out:
        prepare_out_dir(args.out, args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    need = args.steps * args.batch_size * args.seq_len
    ids = tokenize(tokenizer, read_text(args.data, max_chars=need * 8), need)
    res = finetune(
        model, ids, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        weight_decay=args.weight_decay, method=args.optimizer, rank=args.rank, full=args.full,
        train_norms=args.train_norms, grad_clip=args.grad_clip or None, seed=args.seed, log_every=args.log_every,
    )
    mib = 1 << 20
    print(
        f"{res.mode} fine-tuning with {res.optimizer}: {res.steps} steps, {res.tokens:,} tokens; "
        f"loss {res.first_loss:.3f} -> {res.last_loss:.3f}\n"
        f"trainable params {res.trainable_params:,} of {res.total_params:,}; optimizer state "
        f"{res.optimizer_state_bytes / mib:.1f} MiB; grads {res.grad_bytes / mib:.1f} MiB; "
        f"peak memory {res.peak_memory_bytes / mib:.0f} MiB; {res.tokens_per_s:.0f} tokens/s"
    )
    if args.out:
        if is_compressed_dir(Path(str(args.model))) or any(True for _ in _lowrank(model)):
            save_compressed(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
        else:
            model.save_pretrained(args.out)
            tokenizer.save_pretrained(args.out)
        print(f"saved to {args.out}")
    if args.json:
        _print_json({k: v for k, v in res.to_dict().items() if k != "losses"})
    return 0


def _lowrank(model):  # noqa: ANN001, ANN202
    from gradlore.compress.lowrank_linear import LowRankLinear

    return (m for m in model.modules() if isinstance(m, LowRankLinear))


# ------------------------------------------------------------------------------------------ registration
def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `compress`, `eval` and `finetune` on gradlore's sub-command parser."""
    p = sub.add_parser("compress", help="WeLore low-rank compression of a causal LM",
                       description="One-shot WeLore compression (arXiv 2407.11239) of a Hugging Face causal LM.")
    p.add_argument("--model", required=True, help="model folder (save_pretrained) or alias: smollm2")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--remove", type=_budget, help="fraction of the targeted layers' parameters to remove, in (0, 1)")
    budget.add_argument("--rank-reduction", type=_budget, help="WeLore's effective rank reduction, in (0, 1)")
    p.add_argument("--method", choices=("welore", "uniform"), default="welore")
    p.add_argument("--out", required=True, help="output folder (must be new or empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--targets", default=None,
                   help="comma-separated layer names (suffixes, e.g. q_proj,v_proj or re:<regex>); default all linear layers but the head")
    p.add_argument("--include-head", action="store_true", help="also compress the (untied) output head")
    p.add_argument("--include-embeddings", action="store_true",
                   help="also compress the input embedding (data-free; a tied head shares its factors)")
    p.add_argument("--min-ratio", type=float, default=0.0,
                   help="a matrix becomes low-rank only if factoring saves at least this share of its parameters")
    p.add_argument("--data-aware", choices=("whiten", "asvd"), default=None,
                   help="scale the SVD by input activations of --calibration text (whiten: SVD-LLM, asvd: ASVD)")
    p.add_argument("--calibration", help="calibration text (file, folder, JSONL, corpus name or hf:NAME)")
    p.add_argument("--calibration-tokens", type=int, default=16384)
    p.add_argument("--calibration-context", type=int, default=512)
    p.add_argument("--damping", type=float, default=None,
                   help="whiten: ridge added to the activation Gram, as a share of its mean diagonal (default 0.1)")
    p.add_argument("--tokenizer", help="tokenizer folder if not saved with the model")
    p.add_argument("--cache-dir", help="spectrum cache root (default $GRADLORE_CACHE or ~/.cache/gradlore)")
    p.add_argument("--spectrum-cache", help="explicit spectrum cache file (checked against the model)")
    p.add_argument("--json", action="store_true", help="also print the report as JSON")
    p.set_defaults(func=run_compress)

    p = sub.add_parser("eval", help="perplexity of a dense or compressed model on a text",
                       description="Sliding-window perplexity with a stated context length and stride.")
    p.add_argument("--model", required=True, help="dense or compressed model folder, or alias: smollm2")
    p.add_argument("--data", required=True, help="text file, folder, JSONL, corpus name or hf:NAME[:CONFIG]")
    p.add_argument("--context", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--stride", type=int, default=None, help="distance between window starts (default = context)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tokenizer", help="tokenizer folder if not saved with the model")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_eval)

    p = sub.add_parser("finetune", help="fine-tune only the low-rank components (or --full)",
                       description="Train the LRC factors of a compressed model (WeLore), or the whole dense model with --full.")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="training text (use a corpus different from the evaluation one)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--optimizer", default="adamw", help="adamw or a gradlore preset (galore, dct, fira, frugal, ...)")
    p.add_argument("--rank", type=int, default=128, help="projection rank for gradlore presets")
    p.add_argument("--full", action="store_true", help="train every parameter (the dense baseline)")
    p.add_argument("--train-norms", action="store_true", help="also train the normalisation layers")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global-norm clip (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--out", help="save the fine-tuned model here")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--tokenizer")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_finetune)
