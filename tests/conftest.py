from __future__ import annotations

import os
import signal

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def sigterm_at(monkeypatch):
    """``arm(n, name)``: the n-th training call of ``gradlore.train.trainer.<name>`` sends this process SIGTERM
    (the trainer then checkpoints and stops, as when a job is preempted). Returns ``disarm``."""
    from gradlore.train import trainer

    def arm(n: int, name: str = "forward_loss"):
        real, calls = getattr(trainer, name), [0]

        def wrapped(model, *args, **kwargs):
            if model.training:
                calls[0] += 1
                if calls[0] == n:
                    os.kill(os.getpid(), signal.SIGTERM)
            return real(model, *args, **kwargs)

        monkeypatch.setattr(trainer, name, wrapped)
        return lambda: monkeypatch.setattr(trainer, name, real)

    return arm
