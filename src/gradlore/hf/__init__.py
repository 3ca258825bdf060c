"""The Hugging Face ecosystem: gradlore optimizers in ``transformers.Trainer`` and ``accelerate`` loops.

    Trainer(model, args, train_dataset=...,
            optimizer_cls_and_kwargs=(gradlore.hf.OptimizerFactory,
                                      {"method": "dct", "rank": 128, "target_modules": "all-linear"}))

See :mod:`gradlore.hf.optimizer` for what the Trainer hands over and how layer-wise mode follows its
gradient accumulation. LoRA (through peft) is in :mod:`gradlore.optim.lora`; compressed folders that
``AutoModelForCausalLM`` loads in :mod:`gradlore.compress.remote`; lm-evaluation-harness in
:mod:`gradlore.hf.harness`.
"""

from gradlore.hf.optimizer import AcceleratorSync, OptimizerFactory, create_optimizer

__all__ = ["AcceleratorSync", "OptimizerFactory", "create_optimizer"]
