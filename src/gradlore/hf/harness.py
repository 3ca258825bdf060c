"""``gradlore eval --tasks``: lm-evaluation-harness (EleutherAI) on a dense or WeLore-compressed model, through its Python API.

The model is loaded by gradlore (``gradlore.models.load_model``: a dense folder, a compressed one, or an alias
such as ``smollm2``) and handed to the harness as an already-built ``HFLM``, with the tokenizer saved beside it.
A multiple-choice task scores each choice c of a question q by its log-likelihood under the model,

    score(c) = Σ_t log p(c_t | q, c_<t)       acc = mean[argmax_c score(c) == answer]
    acc_norm: the same with score(c) / len(c in bytes)

so the figures are those ``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`` prints for
the same folder (compressed folders load there through their remote code, :mod:`gradlore.compress.remote`).
Standard tasks (``arc_easy``, ``hellaswag``, ...) download their datasets from the Hugging Face hub once;
``--include-path DIR`` adds task YAML files of your own (e.g. over a local JSONL file) that need no network.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from gradlore.errors import UserError, did_you_mean
from gradlore.models import load_model, resolve_model_path


def hf_tokenizer(model_path: Path, tokenizer: str | None = None) -> Any:
    """The transformers tokenizer saved with the model (or at ``tokenizer``)."""
    from transformers import AutoTokenizer

    where = tokenizer or str(model_path)
    try:
        return AutoTokenizer.from_pretrained(where)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError for folders without one
        raise UserError(f"no Hugging Face tokenizer in {where} ({str(exc)[:200]}). Fix: --tokenizer DIR (a folder with "
                        "tokenizer.json / tokenizer_config.json).") from exc


def run_tasks(model_name: str, tasks: list[str], *, include_path: str | None = None, num_fewshot: int | None = None,
              limit: float | None = None, batch_size: int = 4, tokenizer: str | None = None,
              device: str = "cpu") -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on the model; returns its ``results`` (per task: metric -> value)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise UserError("--tasks is empty. Fix: e.g. --tasks arc_easy,hellaswag.")
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include-path {include_path} is not a folder of task YAML files.")
    manager = None
    if include_path is not None:  # indexing lm-eval's own ~200 task folders takes seconds: skip it when not needed
        manager = TaskManager(include_path=include_path, include_defaults=False)
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)}.{did_you_mean(unknown[0], manager.all_tasks)} "
                        "Fix: a name from `lm_eval ls tasks`, or a task YAML of your own in --include-path DIR.")
    model = load_model(model_name, device=device)
    tok = hf_tokenizer(resolve_model_path(model_name), tokenizer)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=device)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=num_fewshot,
                                      limit=limit, log_samples=False)
    except (ConnectionError, OSError) as exc:
        raise UserError(f"lm-eval could not load the data of {', '.join(tasks)} ({str(exc)[:300]}). The standard tasks "
                        "download their datasets from the Hugging Face hub. Fix: run once with network access (the "
                        "datasets cache keeps them), or evaluate a local task: --include-path DIR.") from exc
    return {"results": out["results"], "n_samples": out.get("n-samples", {}),
            "versions": {k: v for k, v in out.get("versions", {}).items()}}


def format_results(results: dict[str, Any]) -> str:
    """One line per task and metric: value ± standard error."""
    lines = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if key in ("alias", "name", "sample_len") or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            err = metrics.get(f"{metric}_stderr,{filt}")
            err_text = f" ± {err:.4f}" if isinstance(err, float) else ""
            lines.append(f"{task:<24} {metric:<10} {value:.4f}{err_text}")
    return "\n".join(lines)
