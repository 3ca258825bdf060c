"""`gradlore compress | eval`: WeLore compression (arXiv 2407.11239) and perplexity of dense or compressed models.

    gradlore compress --model smollm2 --remove 0.2 --method welore --out runs/smol-w20
    gradlore compress --model DIR --remove 0.1 --data-aware whiten --calibration tiny-shakespeare --out DIR2
    gradlore eval     --model runs/smol-w20 --data wikitext2-raw-test.txt --context 512 --stride 512

Both follow the tokenizer's beginning-of-sequence convention (``--bos auto``): a tokenizer that puts a BOS
before a text (LLaMA, Gemma) gets one at the start of every calibration block and evaluation window, the
same for the dense and the compressed model (the compressed folder carries the dense model's tokenizer).

Fine-tuning the low-rank components is a training run: ``gradlore finetune --model DIR`` (gradlore.train.cli).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from gradlore.compress.allocate import METHODS
from gradlore.compress.eval import perplexity, read_text, tokenize
from gradlore.compress.welore import compress, count_params, prepare_out_dir, save_compressed
from gradlore.data.tokenizer import BOS_CHOICES, TextTokenizer, describe_bos, load_tokenizer, sequence_bos
from gradlore.errors import UserError
from gradlore.hf.harness import format_results, run_tasks
from gradlore.models import load_model, max_positions, resolve_model_path


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a fraction such as 0.2") from None
    return value


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=1, default=str))


# --------------------------------------------------------------------------------------------- compress
def _tokenizer(args: argparse.Namespace, required: bool = True) -> TextTokenizer | None:
    """The tokenizer saved with the model (or --tokenizer); None when not required and there is none."""
    path = args.tokenizer or str(resolve_model_path(args.model))
    try:
        return load_tokenizer(path)
    except UserError:
        if required:
            raise
        return None


def run_compress(args: argparse.Namespace) -> int:
    prepare_out_dir(args.out, args.overwrite)  # refuse early, before any work
    if args.remove is None and args.rank_reduction is None:
        raise UserError("give a budget: --remove FRACTION (share of targeted parameters) or --rank-reduction FRACTION.")
    if args.data_aware and not args.calibration:
        raise UserError("--data-aware needs --calibration TEXT (a file or corpus name different from your evaluation "
                        "data, e.g. tiny-shakespeare).")
    model = load_model(args.model)
    tokenizer = _tokenizer(args, required=args.data_aware is not None)
    calibration = read_text(args.calibration, max_chars=args.calibration_tokens * 16) if args.data_aware else None
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
        bos=args.bos,
        damping=args.damping,
        sensitivity_tokens=args.sensitivity_tokens,
        include_head=args.include_head,
        include_embeddings=args.include_embeddings,
        cache_dir=args.cache_dir,
        spectrum_cache=args.spectrum_cache,
    )
    out = save_compressed(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
    print(report.summary())
    if args.data_aware:
        print(f"calibration: {args.calibration_tokens:,} tokens of {args.calibration} in blocks of "
              f"{args.calibration_context}; {describe_bos(tokenizer, sequence_bos(tokenizer, args.bos), args.bos)}")
    print(f"saved to {out} ({time.perf_counter() - t0:.1f} s)")
    if args.json:
        _print_json({k: v for k, v in report.to_dict().items() if k != "layers"} | {"out": str(out)})
    return 0


# ------------------------------------------------------------------------------------------------- eval
def run_eval(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tasks:  # lm-evaluation-harness instead of perplexity
        return run_harness(args)
    if not args.data:
        raise UserError("gradlore eval needs --data TEXT (perplexity) or --tasks NAMES (lm-evaluation-harness).")
    if args.stride is not None and not 1 <= args.stride <= args.context:
        raise UserError(f"--stride {args.stride} must lie in [1, --context={args.context}] (stride = context: disjoint "
                        "windows; smaller: more left context per token). Fix: e.g. --stride 256.")
    model = load_model(args.model)
    longest = max_positions(model)
    if longest is not None and args.context > longest:
        raise UserError(f"--context {args.context} is longer than {args.model} allows ({longest} positions). "
                        f"Fix: --context {longest} or less.")
    tokenizer = _tokenizer(args)
    bos = sequence_bos(tokenizer, args.bos)
    max_chars = args.max_tokens * 16 if args.max_tokens else None
    ids = tokenize(tokenizer, read_text(args.data, max_chars=max_chars), args.max_tokens)
    res = perplexity(model, ids, context=args.context, stride=args.stride, batch_size=args.batch_size, bos=bos)
    print(
        f"{args.model}: perplexity {res.perplexity:.3f} on {res.tokens_scored:,} tokens of {args.data} "
        f"(context {res.context}, stride {res.stride}, {res.windows} windows, {count_params(model):,} params, "
        f"{res.seconds:.1f} s)\n{describe_bos(tokenizer, bos, args.bos)}"
        + ("; each window is BOS + context − 1 text tokens, the first text token is scored too" if bos is not None else "")
    )
    if args.json:
        _print_json(res.to_dict() | {"model": str(args.model), "data": str(args.data), "params": count_params(model),
                                     "bos_choice": args.bos, "bos_note": describe_bos(tokenizer, bos, args.bos)})
    return 0


def run_harness(args: argparse.Namespace) -> int:
    results = run_tasks(args.model, [t.strip() for t in args.tasks.split(",") if t.strip()],
                        include_path=args.include_path, num_fewshot=args.num_fewshot, limit=args.limit,
                        batch_size=args.batch_size, tokenizer=args.tokenizer)
    print(f"{args.model}: lm-evaluation-harness")
    print(format_results(results))
    if args.json:
        _print_json(results | {"model": str(args.model)})
    return 0


# ------------------------------------------------------------------------------------------ registration
def add_compress(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="WeLore low-rank compression of a causal LM",
                       description="One-shot WeLore compression (arXiv 2407.11239) of a Hugging Face causal LM.")
    p.add_argument("--model", required=True, help="model folder (save_pretrained) or alias: smollm2")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--remove", type=_budget, help="fraction of the targeted layers' parameters to remove, in (0, 1)")
    budget.add_argument("--rank-reduction", type=_budget, help="WeLore's effective rank reduction, in (0, 1)")
    p.add_argument("--method", choices=METHODS, default="welore",
                   help="welore: one threshold on normalised spectra (the paper); uniform: same share per matrix; "
                        "loss: with --data-aware whiten, minimise the sensitivity-weighted output error")
    p.add_argument("--sensitivity-tokens", type=int, default=4096,
                   help="--method loss: calibration tokens of its forward+backward sensitivity pass")
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
    p.add_argument("--bos", choices=BOS_CHOICES, default="auto",
                   help="BOS at the start of each calibration block: auto (the tokenizer's convention), always, never")
    p.add_argument("--cache-dir", help="spectrum cache root (default $GRADLORE_CACHE or ~/.cache/gradlore)")
    p.add_argument("--spectrum-cache", help="explicit spectrum cache file (checked against the model)")
    p.add_argument("--json", action="store_true", help="also print the report as JSON")
    p.set_defaults(func=run_compress)


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity (--data) or lm-evaluation-harness tasks (--tasks) of a dense or "
                                    "compressed model",
                       description="Sliding-window perplexity with a stated context length and stride, or "
                                   "lm-evaluation-harness tasks (--tasks arc_easy,hellaswag; the same as `lm_eval "
                                   "--model hf --model_args pretrained=DIR,trust_remote_code=True`).")
    p.add_argument("--model", required=True, help="dense or compressed model folder, or alias: smollm2")
    p.add_argument("--data", help="text file, folder, JSONL, corpus name or hf:NAME[:CONFIG] (perplexity)")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks, e.g. arc_easy,hellaswag (instead of --data)")
    p.add_argument("--include-path", help="folder of your own lm-eval task YAML files (e.g. over a local JSONL)")
    p.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples per question")
    p.add_argument("--limit", type=float, default=None, help="lm-eval: first N examples per task (or a fraction)")
    p.add_argument("--context", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--stride", type=int, default=None, help="distance between window starts (default = context)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tokenizer", help="tokenizer folder if not saved with the model")
    p.add_argument("--bos", choices=BOS_CHOICES, default="auto",
                   help="BOS at the start of each window: auto (the tokenizer's convention), always, never")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_eval)
