"""`wrap()` for a `peft.PeftModel`: serve every LoRA adapter it holds under its PEFT adapter name.

    peft_model = PeftModel.from_pretrained(base, "adapters/sql", adapter_name="sql")
    peft_model.load_adapter("adapters/chat", adapter_name="chat")
    model = multilora_plugin.wrap(peft_model, max_loras=2)   # peft_model must not be used afterwards
    out = model.generate(input_ids, attention_mask=mask, adapter_names=["sql", "chat"])

Each adapter is written by PEFT's own `save_pretrained` into a temporary directory that lives as
long as the returned model, so an adapter evicted from CPU memory can be read back from it. Every
adapter is checked, exactly as `load_adapter` will check it, before the PeftModel is changed: a
refused adapter leaves it as it was. Only then does PEFT's `unload()` put the original linear
modules back (nothing is merged) and the plain model is wrapped like any other.
"""

from __future__ import annotations

import os
import tempfile

from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import nn

from .adapters import ModelModules, read_adapter, read_source
from .adapters.checkpoint import CONFIG_NAME
from .config import MultiLoRAConfig
from .errors import IncompatibleAdapterError, MultiLoRAError, WrapError
from .experts import is_fused_experts, projection_names, projection_shape
from .layers import LINEAR_TYPES, linear_shape
from .model import MultiLoRAModel
from .router import routers_of
from .saved import copied_modules, saved_parameters


def wrap_peft_model(peft_model: PeftModel, config: MultiLoRAConfig) -> MultiLoRAModel:
    """Wrap the base model of `peft_model` and serve each of its LoRA adapters under its name.

    The PeftModel is taken apart in place, as `wrap()` patches a plain model in place: afterwards its
    modules belong to the returned model and it must not be used. The first `max_cpu_loras` adapters
    (in PEFT's order) are read into CPU memory now; the others are registered and read on first use.

    Raises `IncompatibleAdapterError` for an adapter that is not LoRA or that `load_adapter` would
    refuse (unsupported feature, rank above `max_lora_rank`, a module that is not wrapped) and
    `WrapError` for merged adapters; in both cases the PeftModel is left unchanged.
    """
    if not isinstance(peft_model, PeftModel):
        raise WrapError(f"expected a peft.PeftModel, but got {type(peft_model).__name__}")
    configs = dict(peft_model.peft_config)
    if not configs:
        raise WrapError("expected a PeftModel with at least one adapter, but its `peft_config` is empty")
    for name, adapter_config in configs.items():
        if not isinstance(adapter_config, LoraConfig):
            found = getattr(adapter_config.peft_type, "value", adapter_config.peft_type)
            raise IncompatibleAdapterError(
                f"PEFT adapter {name!r}: expected a LoRA adapter (peft_type 'LORA'), but it is {found!r}; "
                "only LoRA adapters can be served"
            )
    if any(isinstance(m, BaseTunerLayer) and m.merged for m in peft_model.modules()):
        raise WrapError(
            "expected a PeftModel whose adapters are not merged into the base weights, but some are "
            "(`unload()` would keep them there); call `peft_model.unmerge_adapter()` first"
        )
    adapters_dir = tempfile.TemporaryDirectory(prefix="multilora_peft_")
    try:
        paths = _save_adapters(peft_model, list(configs), adapters_dir.name)
        modules = _modules_after_unload(peft_model, config)
        for name, path in paths.items():
            try:
                source = read_source(name, path, config.max_lora_rank)
                read_adapter(name, path, modules, source.config)
            except MultiLoRAError as exc:
                raise type(exc)(f"PEFT adapter {name!r} cannot be served (the PeftModel is unchanged): {exc}") from exc
        _restore_saved_modules(peft_model)
        model = MultiLoRAModel(peft_model.unload(), config)
        for i, (name, path) in enumerate(paths.items()):
            if i < config.max_cpu_loras:
                model.load_adapter(name, path)
            else:
                model.register_adapter(name, path)
    except BaseException:
        adapters_dir.cleanup()
        raise
    # evicted adapters are read back from here; it is deleted when the model is garbage-collected
    model._peft_adapters_dir = adapters_dir
    return model


def _save_adapters(peft_model: PeftModel, names: list, root: str) -> dict:
    """Write each adapter as a PEFT adapter directory with PEFT's `save_pretrained`; {name: path}.

    Each goes to a directory of its own, as PEFT puts every adapter but "default" in a subdirectory
    named after it. Embedding base weights are not saved: LoRA leaves them unchanged.
    """
    paths = {}
    for i, name in enumerate(names):
        out = os.path.join(root, str(i))
        peft_model.save_pretrained(out, selected_adapters=[name], save_embedding_layers=False)
        paths[name] = out if os.path.isfile(os.path.join(out, CONFIG_NAME)) else os.path.join(out, name)
    return paths


def _restore_saved_modules(peft_model: PeftModel) -> None:
    """Put each module that adapters hold copies of (`modules_to_save`) back in place of PEFT's
    wrapper: `unload()` would leave the active adapter's copy there instead."""
    base = peft_model.get_base_model()
    for name, module in list(base.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            base.set_submodule(name, module.original_module)


def _peft_base(module: nn.Module) -> nn.Module:
    """The module a PEFT layer or wrapper stands for (what `unload()` puts back)."""
    if isinstance(module, BaseTunerLayer):
        return module.get_base_layer()
    if isinstance(module, AuxiliaryTrainingWrapper):
        return _peft_base(module.original_module)
    return module


def _modules_after_unload(peft_model: PeftModel, config: MultiLoRAConfig) -> ModelModules:
    """What `MultiLoRAModel(peft_model.unload(), config)` will check adapters against, found without
    changing the PeftModel: each PEFT layer stands for the base layer that `unload()` puts back, and
    the modules that `config` targets (linear layers, fused MoE experts, routers) are the ones
    `swap_modules` will patch."""
    base = peft_model.get_base_model()
    out = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    output_embedding = next((n for n, m in base.named_modules() if out is not None and m is out), None)
    embedding = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    embedding_name = next((n for n, m in base.named_modules() if embedding is not None and m is embedding), None)
    embedding = None if embedding is None else _peft_base(embedding)
    names, wrapped, experts, pattern_keys, embeddings = {""}, {}, {}, {}, set()

    def visit(module: nn.Module, prefix: str) -> None:
        children = [(n, _peft_base(c)) for n, c in module.named_children()]
        routers = routers_of(children)
        for child_name, child in children:
            name = f"{prefix}.{child_name}" if prefix else child_name
            names.add(name)
            targeted = config.targets(name, name == output_embedding)
            if targeted and isinstance(child, LINEAR_TYPES):
                wrapped[name] = linear_shape(child)
            elif targeted and is_fused_experts(child):
                experts[name] = projection_names(child)
                wrapped.update({f"{name}.{p}": projection_shape(child, p) for p in experts[name]})
            elif targeted and child_name in routers:
                wrapped[name] = tuple(reversed(child.weight.shape))  # [E, hidden] → (in, out)
                pattern_keys[name] = f"{name}.weight"
            elif targeted and child is embedding and isinstance(child, nn.Embedding):
                wrapped[name] = tuple(child.weight.shape)  # (vocab, dim)
                embeddings.add(name)
            else:
                visit(child, name)

    visit(base, "")
    out = None if out is None else _peft_base(out)
    tied = out is not None and embedding is not None and getattr(out, "weight", None) is embedding.weight
    copies = copied_modules(base, config.modules_to_save, embedding_name, output_embedding, resolve=_peft_base)
    return ModelModules(wrapped=wrapped, all_names=frozenset(names), output_embedding=output_embedding,
                        max_lora_rank=config.max_lora_rank, experts=experts, pattern_keys=pattern_keys,
                        embeddings=frozenset(embeddings), tied_embeddings=tied,
                        saved={n: saved_parameters(m) for n, m in copies.items()}, input_embedding=embedding_name)
