"""Training driver: typed config + presets, LLaMA models, the resumable loop, checkpoints (``gradlore train``)."""

from gradlore.train.config import PRESETS, RunConfig, preset, resolve

__all__ = ["PRESETS", "RunConfig", "preset", "resolve", "run"]


def __getattr__(name: str):
    if name == "run":  # the loop pulls in transformers; import it on demand
        from gradlore.train.loop import run

        return run
    raise AttributeError(name)
