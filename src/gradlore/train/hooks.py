"""Hooks: how a job adds behaviour to the one training loop without a loop of its own.

A hook overrides any of the no-op methods below; the trainer calls them in order of registration.
``step`` is the 0-based index of the optimizer step being computed (the metrics log counts steps from 1).
``GradientRankHook`` is ``gradlore analyze``: the gradient-rank recorder of ``gradlore.analysis`` as a hook.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradlore.analysis.plot import format_summary, plot_records, summarize
from gradlore.analysis.recorder import GradientRecorder, read_records
from gradlore.optim.groups import parse_targets
from gradlore.train.rundir import truncate_log

if TYPE_CHECKING:
    from gradlore.train.trainer import Trainer

STATS_FILE = "gradient_stats.jsonl"


class Hook:
    def on_model(self, trainer: Trainer) -> None:
        """The model exists (trainable parameters chosen); the optimizer does not yet."""

    def on_start(self, trainer: Trainer) -> None:
        """Everything is built and restored; the first step is next."""

    def before_backward(self, trainer: Trainer, step: int, final: bool) -> None:
        """Before each micro-batch's backward; ``final``: the last micro-batch of the step."""

    def before_update(self, trainer: Trainer, step: int) -> None:
        """Gradients are complete and finite, not yet clipped (ordinary mode only: layer-wise has none left)."""

    def after_step(self, trainer: Trainer, step: int) -> None:
        """The optimizer step (or its skip) is done."""

    def on_eval(self, trainer: Trainer, step: int, val_loss: float) -> None:
        """A validation pass after ``step`` optimizer steps."""

    def on_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """The run stopped (completed, interrupted or diverged); ``summary`` may be extended."""


class GradientRankHook(Hook):
    """Records per-layer gradient statistics every ``analysis.every`` steps into ``gradient_stats.jsonl``,
    then plots them by layer type (``gradient_rank.png``) and writes ``gradient_rank.md``.

    In layer-wise mode the gradients are freed inside backward, so the recorder's own post-accumulate hooks
    (registered before the optimizer's) measure each gradient as soon as it is final.
    """

    def __init__(self) -> None:
        self.recorder: GradientRecorder | None = None

    def on_model(self, trainer: Trainer) -> None:
        a = trainer.cfg.analysis
        self.recorder = GradientRecorder(trainer.model, every=a.every, rank=a.rank, top_k=a.top_k, weights=a.weights,
                                         target_modules=parse_targets(a.target_modules), path=trainer.out / STATS_FILE)
        if trainer.cfg.optim.layerwise:
            self.recorder.attach()  # before the optimizer's hooks, so it sees each gradient first

    def on_start(self, trainer: Trainer) -> None:
        truncate_log(trainer.out / STATS_FILE, trainer.step)  # records a killed run made after its checkpoint

    def before_backward(self, trainer: Trainer, step: int, final: bool) -> None:
        if self.recorder is not None and self.recorder.attached:
            self.recorder.begin_step(step, final)

    def before_update(self, trainer: Trainer, step: int) -> None:
        if self.recorder is not None and not self.recorder.attached:
            self.recorder.record(step)

    def on_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        if self.recorder is None:
            return
        self.recorder.close()
        path = trainer.out / STATS_FILE
        if not path.exists() or not path.stat().st_size:
            return
        records = read_records(path)
        png = plot_records(records, trainer.out / "gradient_rank.png",
                           title=f"{Path(trainer.cfg.data.path).name}: {trainer.cfg.optim.name}, {summary['steps']} steps")
        (trainer.out / "gradient_rank.md").write_text(format_summary(summarize(records)) + "\n", encoding="utf-8")
        summary["paths"].update(gradient_stats=str(path), gradient_plot=str(png))
