"""gradlore: low-rank gradient projection optimizers and WeLore compression for LLMs.

    >>> import gradlore
    >>> groups = gradlore.param_groups(model, method="dct", rank=128, target_modules="all-linear")
    >>> opt = gradlore.LowRankAdamW(groups, lr=1e-3, weight_decay=0.0)

See README.md for the command line (`gradlore train | compress | finetune | eval | analyze | bench`).
"""

from __future__ import annotations

from gradlore import hf  # gradlore.hf.OptimizerFactory: the Hugging Face Trainer's optimizer factory
from gradlore.compress.welore import compress, load_compressed  # binds the functions over the subpackage
from gradlore.errors import UserError
from gradlore.optim import presets
from gradlore.optim.groups import param_groups
from gradlore.optim.layerwise import layerwise
from gradlore.optim.lowrank_adamw import LowRankAdamW
from gradlore.optim.state import state_bytes

__version__ = "0.1.0"
__all__ = [
    "LowRankAdamW",
    "UserError",
    "compress",
    "hf",
    "layerwise",
    "load_compressed",
    "param_groups",
    "presets",
    "state_bytes",
]

