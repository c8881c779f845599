"""`wrap()`: the entry point. A plain transformers model is patched in place into a `MultiLoRAModel`;
a `peft.PeftModel` of LoRA adapters is taken apart and its adapters served under their names."""

from __future__ import annotations

from typing import Optional, Union

from peft import PeftModel
from torch import nn

from .config import MultiLoRAConfig, TargetModules
from .model import MultiLoRAModel
from .peft_model import wrap_peft_model


def wrap(
    model: nn.Module,
    *,
    lora_memory: Optional[Union[int, str]] = None,
    max_loras: Optional[int] = None,
    max_lora_rank: Optional[int] = None,
    max_cpu_loras: Optional[int] = None,
    target_modules: TargetModules = "all-linear",
    backend: str = "auto",
    modules_to_save: Optional[TargetModules] = "auto",
) -> "MultiLoRAModel":
    """Patch `model`'s linear layers into slot-indexed multi-LoRA layers and return the facade.

    The model is changed in place (`MultiLoRAModel.unwrap()` restores it). See `MultiLoRAConfig`:
    `lora_memory` bounds the slot tier in bytes ("2GiB"), `max_loras` in adapters.
    A `peft.PeftModel` of LoRA adapters is taken apart (see `peft_model.wrap_peft_model`):
    its base model is wrapped and every adapter is served under its PEFT name.
    """
    config = MultiLoRAConfig(
        lora_memory=lora_memory, max_loras=max_loras, max_lora_rank=max_lora_rank, max_cpu_loras=max_cpu_loras,
        target_modules=target_modules, backend=backend, modules_to_save=modules_to_save,
    )
    if isinstance(model, PeftModel):
        return wrap_peft_model(model, config)
    return MultiLoRAModel(model, config)
