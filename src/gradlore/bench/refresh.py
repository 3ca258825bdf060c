"""``gradlore bench refresh``: what per-step column selection costs (issue 9).

The SVD-free method as published re-selects its DCT columns at every step (arXiv 2505.17967). A refresh of a
weight with oriented gradient G (s, l), s ≤ l, rank r:

    C = Qᵀ G                 (s, l)   a fast DCT-II: scipy's pocketfft on CPU, Makhoul's FFT elsewhere, O(s l log s)
    score_k = ‖C[k, :]‖₁     (s,)     idx = top-r(score), sorted
    R = C[idx]               (r, l)   this step's projection: the refresh *replaces* the steady R = Q_idxᵀ G (2 r s l flops)
    remap                             each moment row follows its index: the projector keeps a surviving
                                      index in its row, so only the rows of new indices are zeroed

Measured here: the optimizer step of a model's projected weights (every attention and MLP weight, GaLore's
ranks: 128 at ``llama_60m``, 512 at ``llama_1b``) with the ``dct`` preset at ``update_proj_gap=1`` (a refresh
every step; rows bias-corrected by the tensor's count in the fused kernel, the default, and by their own age,
``remap_bias="row"``) against the
same preset at gap 200 (no refresh inside the timed window: the GaLore-style steady step); the share is
t(gap 1) / t(gap 200) - 1. Two gradient sets alternate, so the selection really changes every step and the
remap zeroes rows. The settings' optimizers step in turn (one step each, again and again), so a slow spell of
the machine hits all of them alike; medians over the timed steps. With
``--embeddings`` the embedding and output head (plain fused AdamW) are in the step too, i.e. the whole
optimizer step of the model. Per distinct shape it also times the stages of one refresh.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from gradlore.models import SIZES
from gradlore.optim.lowrank_adamw import LowRankAdamW
from gradlore.optim.presets import dct
from gradlore.projectors import Context, dct_basis
from gradlore.projectors.dct import DCTProjector

RANKS = {"llama_60m": 128, "llama_130m": 256, "llama_350m": 256, "llama_1b": 512}


def weight_shapes(size: str, layers: int | None) -> list[tuple[int, int]]:
    """(out, in) of every attention and MLP weight of ``layers`` blocks (default: all of them)."""
    s = SIZES[size]
    block = [(s.hidden, s.hidden)] * 4 + [(s.intermediate, s.hidden)] * 2 + [(s.hidden, s.intermediate)]
    return block * (s.layers if layers is None else layers)


SETTINGS = {  # label -> the dct preset's keys changed
    "dct, gap 200 (steady step, no refresh)": {"update_proj_gap": 200},
    "dct, gap 1 (refresh + remap every step; the tensor's count, fused kernel)": {},
    "dct, gap 1, remap_bias='row' (rows corrected by age, foreach)": {"remap_bias": "row"},
}


def _time_steps(params: list[torch.Tensor], n_projected: int, grads: list[list[torch.Tensor]], settings: list[dict],
                rank: int, steps: int, warmup: int) -> list[list[float]]:
    """Step times of fresh optimizers, one per setting (the first ``n_projected`` params with ``dct`` + its keys, the
    rest AdamW), stepped in turn: A, B, C, A, B, C, … so that the machine's slow spells hit every setting alike.
    The optimizers share the parameters (their values do not change the work); each sees the gradient sets in turn."""
    projected, plain = params[:n_projected], params[n_projected:]
    opts = [LowRankAdamW([{"params": projected, **dct(rank, **keys)}] + ([{"params": plain}] if plain else []),
                         lr=1e-4) for keys in settings]
    times: list[list[float]] = [[] for _ in settings]
    for t in range(warmup + steps):
        for opt, ts in zip(opts, times):
            for p, g in zip(params, grads[t % len(grads)]):
                p.grad = g
            t0 = time.perf_counter()
            opt.step()
            if t >= warmup:
                ts.append(time.perf_counter() - t0)
    return times


def stage_times(shape: tuple[int, int], rank: int, repeat: int = 5) -> dict[str, float]:
    """Medians (s) of the stages of one refresh and of the steady projection it replaces, for one weight."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(*shape, generator=gen)
    g = g.mT if shape[0] >= shape[1] else g  # the oriented (s, l) view, as the optimizer sees it
    proj = DCTProjector()
    state: dict = {}
    proj.refresh(g, rank, state, Context("w", shape[0] >= shape[1], 0))
    idx = state["proj.indices"]
    q = dct_basis(g.shape[0])
    out: dict[str, list[float]] = {"transform": [], "score+top-r": [], "refresh (all)": [], "steady Q_idxᵀG": []}
    for _ in range(repeat):
        t0 = time.perf_counter()
        c = proj.coefficients(g)
        t1 = time.perf_counter()
        top = torch.topk(c.abs().sum(1), rank, sorted=False).indices.sort().values
        c.index_select(0, top)
        t2 = time.perf_counter()
        proj.refresh(g, rank, state, Context("w", shape[0] >= shape[1], 0))
        t3 = time.perf_counter()
        q.index_select(1, idx).mT @ g
        t4 = time.perf_counter()
        for key, dt in zip(out, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            out[key].append(dt)
    return {k: statistics.median(v) for k, v in out.items()}


def run_train(args: argparse.Namespace, rank: int) -> int:
    """Whole training steps (forward, backward, optimizer step) of the model at gap 1 vs gap 200, in turn (the
    two optimizers share the model's weights; the order alternates). The forward and backward are the same work for
    both, so the optimizer's extra time over the gap-200 step is the refresh's cost, given as a share of the step."""
    from gradlore.models import build_llama
    from gradlore.optim.groups import param_groups

    torch.manual_seed(args.seed)
    model = build_llama(args.model, args.vocab, args.seq)
    gen = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(args.vocab, (args.batch, args.seq), generator=gen) for _ in range(2)]
    labels = list(SETTINGS)[:2]  # gap 200 and the default gap 1
    opts = [LowRankAdamW(param_groups(model, "dct", rank, **keys), lr=1e-4) for keys in list(SETTINGS.values())[:2]]
    n = sum(p.numel() for p in model.parameters())
    print(f"bench refresh --train: {args.model} ({n / 1e6:.1f}M parameters, rank {rank} on attention and MLP), "
          f"batch {args.batch}×{args.seq} tokens, {args.threads} threads, {args.steps} steps per setting", flush=True)
    times: dict[str, list[tuple[float, float]]] = {label: [] for label in labels}  # (forward+backward, optimizer)
    for t in range(args.warmup + args.steps):
        order = list(zip(labels, opts))
        for label, opt in order if t % 2 else order[::-1]:  # alternate who goes first: neither always follows the other
            ids = batches[t % 2]
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            t1 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t2 = time.perf_counter()
            if t >= args.warmup:
                times[label].append((t1 - t0, t2 - t1))
    base = times[labels[0]]
    print("\n| setting | training step, median ms | forward + backward | optimizer step | training step vs gap 200 "
          "(paired) | optimizer step vs gap 200 (paired) |\n|---|---|---|---|---|---|")
    for label, ts in times.items():
        whole = statistics.median(f + o for f, o in ts)
        paired = statistics.median((f + o) / (bf + bo) for (f, o), (bf, bo) in zip(ts, base))
        paired_opt = statistics.median(o / bo for (_, o), (_, bo) in zip(ts, base))
        print(f"| {label} | {whole * 1e3:.0f} | {statistics.median(f for f, _ in ts) * 1e3:.0f} | "
              f"{statistics.median(o for _, o in ts) * 1e3:.1f} | {100 * (paired - 1):+.1f}% | {100 * (paired_opt - 1):+.1f}% |")
    extra = statistics.median(o - bo for (_, o), (_, bo) in zip(times[labels[1]], base))
    print(f"\nThe refresh's extra time, {extra * 1e3:.1f} ms (paired median), is "
          f"{100 * extra / statistics.median(f + o for f, o in base):.1f}% of a gap-200 training step.")
    return 0


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    rank = args.rank or RANKS.get(args.model, 128)
    if args.train:
        return run_train(args, rank)
    shapes = weight_shapes(args.model, args.layers)
    gen = torch.Generator().manual_seed(args.seed)
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen) * 0.02) for s in shapes]
    if args.embeddings:
        h = SIZES[args.model].hidden
        params += [torch.nn.Parameter(torch.randn(args.vocab, h, generator=gen) * 0.02) for _ in range(2)]
    grads = [[torch.randn(p.shape, generator=gen) * 1e-3 for p in params] for _ in range(2)]
    n = sum(p.numel() for p in params)
    print(f"bench refresh: {args.model}, {len(shapes)} projected weights (rank {rank})"
          + (f" + embedding and head ({args.vocab}×{SIZES[args.model].hidden}, AdamW)" if args.embeddings else "")
          + f", {n / 1e6:.1f}M parameters, {args.threads} threads, {args.rounds} rounds × {args.steps} steps",
          flush=True)
    timed: dict[str, list[float]] = {label: [] for label in SETTINGS}
    for _ in range(args.rounds):
        for label, ts in zip(SETTINGS, _time_steps(params, len(shapes), grads, list(SETTINGS.values()), rank,
                                                   args.steps, args.warmup)):
            timed[label] += ts
    base_ts = next(iter(timed.values()))
    base = statistics.median(base_ts)
    print("\n| setting | optimizer step, median ms | min ms | vs gap 200 (medians) | vs gap 200 (paired: median of "
          "t / t_gap200, step by step) |\n|---|---|---|---|---|")
    for label, ts in timed.items():
        med = statistics.median(ts)
        paired = statistics.median(t / b for t, b in zip(ts, base_ts))  # the steps of one turn ran back to back
        print(f"| {label} | {med * 1e3:.1f} | {min(ts) * 1e3:.1f} | {100 * (med / base - 1):+.1f}% | "
              f"{100 * (paired - 1):+.1f}% |")
    print("\nStages of one refresh, per distinct shape (median ms):\n\n| shape (out×in) | transform Qᵀ G | score + "
          "top-r + gather | whole refresh | steady Q_idxᵀ G it replaces |\n|---|---|---|---|---|")
    for shape in dict.fromkeys(shapes):
        st = stage_times(shape, rank)
        print(f"| {shape[0]}×{shape[1]} | " + " | ".join(f"{v * 1e3:.2f}" for v in st.values()) + " |")
    return 0


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default="llama_60m", help="model size whose weight shapes are used")
    p.add_argument("--layers", type=int, default=None, help="blocks to include (default: all)")
    p.add_argument("--rank", type=int, default=0, help="rank (default: GaLore's for the size)")
    p.add_argument("--embeddings", action="store_true", help="add the embedding and head (AdamW) to the step")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--train", action="store_true",
                   help="time whole training steps of the model (forward, backward, optimizer) instead")
    p.add_argument("--batch", type=int, default=1, help="--train: sequences per step")
    p.add_argument("--seq", type=int, default=256, help="--train: tokens per sequence")
    p.add_argument("--steps", type=int, default=10, help="timed steps per setting and round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argparse.ArgumentParser(prog="gradlore bench refresh", description=__doc__))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
