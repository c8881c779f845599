"""`wrap()` and `MultiLoRAModel`: a Hugging Face model that serves many LoRA adapters in one batch."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from .adapters import AdapterWeights, ModelModules, SlotTable, read_adapter
from .config import MultiLoRAConfig, TargetModules
from .errors import AdapterExistsError, AdapterNotFoundError, InvalidRequestError, WrapError
from .kernels import select_backend
from .layers import MultiLoRALinear, linear_shape, swap_linears
from .mapping import BatchMapping, ForwardContext, expand_rows

BASE_MODEL = "__base__"  # PEFT's name for "no adapter"; None means the same


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: str
    rank: int  # the largest rank over the adapter's modules
    alpha: float  # `lora_alpha` of the config (per-module patterns may differ)
    target_modules: tuple  # the wrapped modules the adapter changes
    num_bytes: int  # CPU memory held by its weights


def wrap(
    model: nn.Module,
    *,
    max_loras: int = 4,
    max_lora_rank: int = 16,
    target_modules: TargetModules = "all-linear",
    backend: str = "auto",
) -> "MultiLoRAModel":
    """Patch `model`'s linear layers into slot-indexed multi-LoRA layers and return the facade.

    The model is changed in place (`MultiLoRAModel.unwrap()` restores it). See `MultiLoRAConfig`.
    """
    config = MultiLoRAConfig(
        max_loras=max_loras, max_lora_rank=max_lora_rank, target_modules=target_modules, backend=backend
    )
    return MultiLoRAModel(model, config)


def _batch_size(args: tuple, kwargs: dict) -> Optional[int]:
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    return None


class MultiLoRAModel(nn.Module):
    """A wrapped Hugging Face model. Behaves like it (attributes fall through) and adds adapters.

    `forward(..., adapter_names=[...])` and `generate(..., adapter_names=[...])` take one adapter name
    per input row (None or "__base__" for the base model), as PEFT does.
    """

    def __init__(self, model: nn.Module, config: MultiLoRAConfig) -> None:
        if isinstance(model, MultiLoRAModel):
            raise WrapError("expected an unwrapped transformers model, but got a MultiLoRAModel (already wrapped)")
        if not isinstance(model, nn.Module):
            raise WrapError(f"expected a torch nn.Module (a transformers model), but got {type(model).__name__}")
        if type(model).__name__.startswith("Peft") or hasattr(model, "peft_config"):
            raise WrapError(
                "expected a plain transformers model, but got a PEFT model; wrap `peft_model.get_base_model()` "
                "after `unload()` and load its adapters with `load_adapter`"
            )
        if any(isinstance(m, MultiLoRALinear) for m in model.modules()):
            raise WrapError("this model is already wrapped: call `unwrap()` on its MultiLoRAModel first")
        super().__init__()
        self.hf_model = model
        self.multilora_config = config
        self._context = ForwardContext()
        first = next(model.parameters(), None)
        self._backend = select_backend(config.backend, first.device if first is not None else "cpu")
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self._output_embedding = next((n for n, m in model.named_modules() if out is not None and m is out), None)

        def make(name: str, layer: nn.Module) -> Optional[MultiLoRALinear]:
            if not config.targets(name, name == self._output_embedding):
                return None
            return MultiLoRALinear(layer, config.max_loras, config.max_lora_rank, self._context, self._backend)

        self._layers = swap_linears(model, make)
        if not self._layers:
            raise WrapError(f"no nn.Linear or Conv1D module matched target_modules={config.target_modules!r}")
        self._modules_info = ModelModules(
            wrapped={n: linear_shape(m.base_layer) for n, m in self._layers.items()},
            all_names=frozenset(n for n, _ in model.named_modules()),
            output_embedding=self._output_embedding,
            max_lora_rank=config.max_lora_rank,
        )
        self._slots = SlotTable(config.max_loras)
        self._adapters: dict = {}
        self._last_mapping: Optional[BatchMapping] = None
        self._hooks = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, always_call=True),
        ]

    # attribute fall-through: a wrapped model still answers `config`, `device`, `generation_config`, ...
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "hf_model":
                raise
            return getattr(self.hf_model, name)

    def get_base_model(self) -> nn.Module:
        return self.hf_model

    @property
    def patched_modules(self) -> tuple:
        """Names of the modules that were swapped for `MultiLoRALinear`."""
        return tuple(self._layers)

    # adapters ---------------------------------------------------------------------------------------
    @property
    def adapters(self) -> dict:
        """{name: AdapterInfo} for every loaded adapter."""
        return {name: self._info(weights) for name, weights in self._adapters.items()}

    @staticmethod
    def _info(w: AdapterWeights) -> AdapterInfo:
        return AdapterInfo(w.name, w.path, w.rank, w.config.lora_alpha, tuple(w.modules), w.num_bytes)

    def load_adapter(self, name: str, path: "str | os.PathLike") -> AdapterInfo:
        """Read a PEFT LoRA adapter directory into CPU memory under `name`.

        Nothing changes unless the whole adapter is valid for this model. It takes a slot only when a
        batch first uses it.
        """
        if not isinstance(name, str) or not name or name == BASE_MODEL:
            raise InvalidRequestError(f"an adapter name should be a non-empty str other than {BASE_MODEL!r}, got {name!r}")
        if name in self._adapters:
            raise AdapterExistsError(
                f"an adapter named {name!r} is already loaded (from {self._adapters[name].path!r}); "
                "unload it first or pick another name"
            )
        if not os.path.isdir(path) and os.path.isdir(name):
            raise InvalidRequestError(
                f"`load_adapter(name, path)` takes the name first, but got the directory {name!r} as the name "
                f"and {os.fspath(path)!r} as the path (PEFT's order is the other way round)"
            )
        weights = read_adapter(name, path, self._modules_info)
        self._adapters[name] = weights
        return self._info(weights)

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter: its slot is emptied and its CPU copy released."""
        if name not in self._adapters:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded; loaded adapters: {sorted(self._adapters)}")
        slot = self._slots.release(name)
        if slot is not None:
            self._write_slot(slot, None)
        del self._adapters[name]

    def slot_contents(self) -> tuple:
        """Slot i → the adapter name in it, or `EMPTY`."""
        return self._slots.contents()

    def _write_slot(self, slot: int, weights: Optional[AdapterWeights]) -> None:
        for name, layer in self._layers.items():
            w = weights.modules.get(name) if weights is not None else None
            layer.write_slot(slot, None if w is None else w.a, None if w is None else w.b)

    def _activate(self, adapter_names: Sequence, batch: Optional[int]) -> tuple:
        """Row slots for a batch of `batch` rows (None: unknown): names → slots, writing adapters that
        are not resident yet."""
        if isinstance(adapter_names, (str, bytes)) or not isinstance(adapter_names, Sequence):
            raise InvalidRequestError(
                f"`adapter_names` should be a list with one name (or None) per row, but got {adapter_names!r}"
            )
        if batch is not None and len(adapter_names) != batch:
            raise InvalidRequestError(
                f"`adapter_names` should have one entry per input row ({batch}), but has {len(adapter_names)}"
            )
        rows = []
        for name in adapter_names:
            if name is not None and not isinstance(name, str):
                raise InvalidRequestError(f"adapter names should be str or None, but got {name!r}")
            rows.append(None if name in (None, BASE_MODEL) else name)
        needed = list(dict.fromkeys(n for n in rows if n is not None))
        for name in needed:
            if name not in self._adapters:
                raise AdapterNotFoundError(
                    f"adapter {name!r} is not loaded; loaded adapters: {sorted(self._adapters)}"
                )
        slots, placed = self._slots.acquire(needed)
        for slot, name in placed:
            self._write_slot(slot, self._adapters[name])
        return tuple(-1 if n is None else slots[n] for n in rows)

    # forward and generate ---------------------------------------------------------------------------
    def _mapping(self, row_slots: Optional[tuple]) -> Optional[BatchMapping]:
        if row_slots is None or all(s < 0 for s in row_slots):
            return None
        last = self._last_mapping
        if last is None or last.row_slots != row_slots:  # decode steps reuse one mapping
            last = self._last_mapping = BatchMapping(row_slots, self.multilora_config.max_loras)
        return last

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        names = kwargs.pop("adapter_names", None)
        batch = _batch_size(args, kwargs)
        if names is not None:
            rows = self._activate(names, batch)
        elif self._context.generate_rows is not None and batch is not None:
            rows = expand_rows(self._context.generate_rows, batch)
        else:
            rows = None
        self._context.mapping = self._mapping(rows)
        return args, kwargs

    def _after_forward(self, module: nn.Module, args: tuple, output):
        self._context.mapping = None

    def forward(self, *args, adapter_names: Optional[Sequence] = None, **kwargs):
        return self.hf_model(*args, adapter_names=adapter_names, **kwargs)

    def generate(self, *args, adapter_names: Optional[Sequence] = None, **kwargs):
        """`transformers` generate with one adapter per input row; beams and returned sequences of a
        row use that row's adapter."""
        if adapter_names is None:
            return self.hf_model.generate(*args, **kwargs)
        self._context.generate_rows = self._activate(adapter_names, _batch_size(args, kwargs))
        try:
            return self.hf_model.generate(*args, **kwargs)
        finally:
            self._context.generate_rows = None

    # unwrap -----------------------------------------------------------------------------------------
    def unwrap(self) -> nn.Module:
        """Put the original linear modules back, drop every adapter and return the plain model."""
        model = self.hf_model
        for handle in self._hooks:
            handle.remove()
        for name, layer in self._layers.items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base_layer)
        self._layers = {}
        self._adapters.clear()
        self._hooks = []
        return model
