"""``gradlore train --optimizer lora``: LoRA (arXiv 2106.09685, through `peft`) as a hook of the one training loop.

- ``on_model``: the built (or loaded) model is wrapped by ``peft.get_peft_model`` with rank ``optim.rank``
  adapters on ``optim.target_modules`` (``gradlore.optim.lora``); every other weight is frozen, so the
  optimizer (AdamW) sees only the adapters. The adapters' random start is drawn after the model's, from the
  seeded generator, so a run is repeatable; a resumed run loads them from the checkpoint like any weight.
- ``on_end`` (completed runs): ``final/`` holds the **merged** model (W + α/r·B A folded into each weight), a
  plain Hugging Face folder that ``--init``, ``gradlore eval``, ``gradlore compress``, ``lm_eval`` and
  ``AutoModelForCausalLM`` load without peft and that runs at the base model's speed; the adapter alone
  (peft's own folder, a few MB, for ``PeftModel.from_pretrained`` on the base model) is kept in ``adapter/``.
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING, Any

from gradlore.compress.lowrank_linear import is_factored
from gradlore.compress.welore import save_compressed
from gradlore.optim.lora import add_lora, is_lora, merged
from gradlore.train.hooks import Hook

if TYPE_CHECKING:
    from gradlore.train.trainer import Trainer

ADAPTER_DIR = "adapter"


class LoraHook(Hook):
    def on_model(self, trainer: Trainer) -> None:
        o = trainer.cfg.optim
        trainer.model = add_lora(trainer.model, o.rank, o.target_modules, o.overrides)

    def on_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        final = trainer.out / "final"
        if summary["status"] != "completed" or not final.exists() or not is_lora(trainer.model):
            return
        # The trainer saved the PeftModel as it saves any model; replace that by the adapter and the merged model.
        adapter = trainer.out / ADAPTER_DIR
        for folder in (adapter, final):
            if folder.exists():
                shutil.rmtree(folder)
        trainer.model.save_pretrained(str(adapter))  # peft writes adapter_config.json + the adapter weights only
        model = merged(trainer.model)
        trainer.model = model
        if is_factored(model):
            save_compressed(model, final, overwrite=True)
        else:
            model.save_pretrained(str(final))
        trainer.data.tokenizer.save(final)
        summary["paths"].update(model=str(final), adapter=str(adapter))
