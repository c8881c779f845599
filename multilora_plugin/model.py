"""`wrap()` and `MultiLoRAModel`: a Hugging Face model that serves many LoRA adapters in one batch."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from peft import PeftMixedModel, PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .adapters import (
    AdapterCache,
    AdapterSource,
    AdapterState,
    AdapterWeights,
    CacheStats,
    ModelModules,
    read_adapter,
    read_source,
    requested_adapter,
)
from .config import MultiLoRAConfig
from .errors import InvalidRequestError, WrapError
from .kernels import select_backend
from .embedding import MultiLoRAEmbedding
from .experts import MultiLoRAExperts, is_fused_experts, projection_names
from .layers import LINEAR_TYPES, MultiLoRALinear, linear_shape, swap_modules
from .router import MultiLoRARouter, find_routers
from .saved import SUFFIX, MultiLoRASaved, copied_modules, per_token, saved_parameters
from .mapping import BatchMapping, ForwardContext, PackedMapping, expand_rows
from .adapters.slots import human_bytes
from .slot_memory import SlotMemory, default_budget

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: str
    state: AdapterState
    version: int  # 1, +1 for each `load_adapter(..., replace=True)`
    content_id: Optional[int]  # the id of the weights in memory (never reused in the process); None while not in memory
    rank: int  # the largest rank its config gives a module
    alpha: float  # `lora_alpha` of the config (per-module patterns may differ)
    num_bytes: Optional[int]  # CPU memory held by its weights; None while not in memory
    target_modules: Optional[tuple]  # the wrapped modules it changes; None while not in memory


def compute_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype activations run in: that of the first floating-point parameter (as transformers'
    `model.dtype`), which a quantized base's norms and embeddings keep."""
    return next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), None)


def _target_shape(target: nn.Module) -> tuple:
    """(in, out) of a linear layer or router; (num_experts, in, out) of one experts projection."""
    if isinstance(target, MultiLoRALinear):
        return linear_shape(target.base_layer)
    if isinstance(target, MultiLoRARouter):
        return target.in_features, target.out_features
    if isinstance(target, MultiLoRAEmbedding):
        return target.num_embeddings, target.embedding_dim
    return target.num_experts, target.in_features, target.out_features


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
        if isinstance(model, (PeftModel, PeftMixedModel, BaseTuner)) or any(
                isinstance(m, BaseTunerLayer) for m in model.modules()):  # a PeftModel or its patched base
            raise WrapError(
                f"expected a plain transformers model, but got a PEFT model ({type(model).__name__}); "
                "pass the peft.PeftModel itself to `multilora_plugin.wrap()`, which serves its LoRA adapters"
            )
        if any(isinstance(m, (MultiLoRALinear, MultiLoRAExperts, MultiLoRARouter, MultiLoRAEmbedding, MultiLoRASaved))
               for m in model.modules()):
            raise WrapError("this model is already wrapped: call `unwrap()` on its MultiLoRAModel first")
        super().__init__()
        self.hf_model = model
        self.multilora_config = config
        self._context = ForwardContext()
        first = next(model.parameters(), None)
        self._backend = select_backend(config.backend, first.device if first is not None else "cpu")
        dtype = compute_dtype(model)
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self._output_embedding = next((n for n, m in model.named_modules() if out is not None and m is out), None)

        routers = find_routers(model)
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        embedding_name = next((n for n, m in model.named_modules() if embedding is not None and m is embedding), None)
        copies = copied_modules(model, config.modules_to_save, embedding_name, self._output_embedding)
        refused = [n for n, m in copies.items() if not per_token(m)]
        if refused:
            raise WrapError(f"`modules_to_save` should name linear layers, embeddings or norms, whose copies "
                            f"work token by token, but {refused[0]!r} is a {type(copies[refused[0]]).__name__}")
        slots = (config.num_slots, self._context, self._backend)

        def make(name: str, layer: nn.Module) -> Optional[nn.Module]:
            """The one place where kinds of layer are chosen: linear layers, fused MoE experts, routers, the
            input embedding."""
            if not config.targets(name, name == self._output_embedding):
                return None
            if isinstance(layer, LINEAR_TYPES):
                return MultiLoRALinear(layer, *slots, compute_dtype=dtype)
            if is_fused_experts(layer):
                return MultiLoRAExperts(layer, *slots, compute_dtype=dtype)
            if name in routers:
                return MultiLoRARouter(layer, *slots, compute_dtype=dtype)
            if layer is embedding and isinstance(layer, nn.Embedding):
                return MultiLoRAEmbedding(layer, *slots, compute_dtype=dtype)
            return None

        self._layers = swap_modules(model, make)
        if not self._layers:
            raise WrapError(f"no nn.Linear or Conv1D module matched target_modules={config.target_modules!r}")
        if isinstance(self._layers.get(self._output_embedding), MultiLoRALinear):
            self._layers[self._output_embedding].head = True
        # the modules whose per-adapter copies are served wrap whatever is there now (a LoRA layer or not)
        self._saved = {}
        for name, original in copies.items():
            self._saved[name] = MultiLoRASaved(model.get_submodule(name), original, config.num_slots, self._context,
                                               head=name == self._output_embedding)
            model.set_submodule(name, self._saved[name])
        # what slots are written into: {target name: layer}, an experts module's projections by parameter
        # name, a module's copies by its name + ".modules_to_save"
        self._targets = {}
        for name, layer in self._layers.items():
            if isinstance(layer, MultiLoRAExperts):
                self._targets.update({f"{name}.{p}": lora for p, lora in layer.lora.items()})
            else:
                self._targets[name] = layer
        self._targets.update({f"{name}{SUFFIX}": layer for name, layer in self._saved.items()})
        self._modules_info = ModelModules(
            wrapped={n: _target_shape(t) for n, t in self._targets.items() if not isinstance(t, MultiLoRASaved)},
            all_names=frozenset(n for n, _ in model.named_modules()),
            output_embedding=self._output_embedding,
            max_lora_rank=config.max_lora_rank,
            dtype=dtype,
            experts={n: projection_names(m.base_layer) for n, m in self._layers.items()
                     if isinstance(m, MultiLoRAExperts)},
            pattern_keys={n: f"{n}.weight" for n, m in self._layers.items() if isinstance(m, MultiLoRARouter)},
            embeddings=frozenset(n for n, m in self._layers.items() if isinstance(m, MultiLoRAEmbedding)),
            tied_embeddings=out is not None and embedding is not None and out.weight is embedding.weight,
            saved={name: saved_parameters(original) for name, original in copies.items()},
            input_embedding=embedding_name,
        )
        device = first.device if first is not None else torch.device("cpu")
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        budget = config.lora_memory if config.lora_memory is not None else default_budget(device)
        logger.info("slot memory: %s for adapters in slots (%s), at most %d of them", human_bytes(budget),
                    "lora_memory" if config.lora_memory is not None else f"default on {device.type}",
                    config.num_slots)
        self._slot_memory = SlotMemory(budget, self._targets)
        self._cache = AdapterCache(
            num_slots=config.num_slots,
            max_cpu_loras=config.max_cpu_loras,
            read=self._read_weights,
            write=self._write_slots,
            capacity=budget,
            size=self._slot_memory.size,
            memory=lambda: {"reserved": self._slot_memory.reserved(),
                            "fragmentation": self._slot_memory.fragmentation()},
        )
        self._last_mapping: Optional[BatchMapping] = None
        # source → a PEFT state dict or None (read the adapter's directory); an engine sets it to its
        # plugins' `multilora_load_adapter_weights`
        self.weights_provider = None
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
        """Names of the modules that were swapped for multi-LoRA layers (linear, experts, routers)."""
        return tuple(self._layers)

    @property
    def saved_modules(self) -> tuple:
        """Names of the modules whose per-adapter copies (`modules_to_save`) can be served."""
        return tuple(self._saved)

    # adapters ---------------------------------------------------------------------------------------
    @property
    def adapter_cache(self) -> AdapterCache:
        """The tiered cache behind the adapter methods (for engines: `acquire` / `release` / `prefetch`)."""
        return self._cache

    @property
    def adapters(self) -> dict:
        """{name: AdapterInfo} for every registered adapter, in registration order."""
        return {name: self._info(name) for name in self._cache.names()}

    def _info(self, name: str) -> AdapterInfo:
        source, weights, state, content_id = self._cache.describe(name)
        return AdapterInfo(
            name=name, path=source.path, state=state, version=source.version, content_id=content_id,
            rank=source.rank, alpha=source.config.lora_alpha,
            num_bytes=None if weights is None else weights.num_bytes,
            target_modules=None if weights is None else tuple(weights.modules),
        )

    def register_adapter(self, name: str, path: "str | os.PathLike") -> AdapterInfo:
        """Make a PEFT LoRA adapter directory servable under `name`, reading only its config.

        Its weights are read (and fully validated) when a batch or `prefetch` first needs it.
        """
        self._cache.register(read_source(name, path, self.multilora_config.max_lora_rank))
        return self._info(name)

    def load_adapter(self, name: str, path: "str | os.PathLike", *, replace: bool = False) -> AdapterInfo:
        """Register a PEFT LoRA adapter directory under `name` and read its weights into CPU memory now.

        Nothing changes unless the whole adapter is valid for this model. It takes a slot only when a
        batch first uses it. With `replace=True` an adapter of that name gets the new weights (a new
        version): calls and requests already running finish on the old weights, later ones use the
        new ones. An unloaded name can be loaded again at once, even while a call still uses it.
        """
        if not isinstance(replace, bool):
            raise InvalidRequestError(f"`replace` should be a bool, but got {replace!r}")
        source = read_source(name, path, self.multilora_config.max_lora_rank)
        self._cache.register(source, self._read_weights(source), replace=replace)
        return self._info(name)

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter: its slot and its CPU copy are freed (once no running batch uses it).
        The name can be registered again at once."""
        self._cache.unregister(name)

    def evict_adapter(self, name: str) -> bool:
        """Free an adapter's memory (slot and CPU copy) but keep it registered; it is read from
        disk again when next used. False (nothing changes) while a running batch uses it or it is
        pinned."""
        return self._cache.evict(name)

    def prefetch(self, names: Sequence[str]) -> dict:
        """Read adapters disk → CPU in the background; returns {name: concurrent.futures.Future}."""
        return self._cache.prefetch(names)

    def pin_adapter(self, name: str) -> int:
        """Keep an adapter in a slot until `unpin_adapter`; returns the slot."""
        return self._cache.pin(name)

    def unpin_adapter(self, name: str) -> None:
        self._cache.unpin(name)

    def adapter_state(self, name: str) -> AdapterState:
        """COLD, LOADING, CPU, ACTIVE or EVICTING."""
        return self._cache.state(name)

    def memory_stats(self) -> CacheStats:
        """Bytes per tier (slot memory used, free and its fragmentation; CPU) and cache counters (hits,
        misses, loads, evictions, slot swaps)."""
        return self._cache.stats()

    def slot_contents(self) -> tuple:
        """Slot i → the adapter name in it, or `EMPTY`."""
        return self._cache.contents()

    def _read_weights(self, source: AdapterSource) -> AdapterWeights:
        provider = self.weights_provider
        tensors = provider(source) if provider is not None else None
        weights = read_adapter(source.name, source.path, self._modules_info, source.config, tensors)
        return weights.pin_memory() if self._copy_stream is not None else weights

    def _write_slots(self, writes: Sequence[tuple]) -> None:
        """[(slot, AdapterWeights or None)] → slot buffers; on CUDA, on a side stream ordered after the
        forwards already queued (which may read the old contents) and before the next one."""
        stream = self._copy_stream
        if stream is not None:
            current = torch.cuda.current_stream(stream.device)
            stream.wait_stream(current)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            self._slot_memory.write(writes, non_blocking=stream is not None)
        if stream is not None:
            current.wait_stream(stream)

    def _activate(self, adapter_names: Sequence, batch: Optional[int]) -> tuple:
        """Check a batch's adapter names and hold their current contents in slots.

        Returns (row slots, the `Hold` to release)."""
        if isinstance(adapter_names, (str, bytes)) or not isinstance(adapter_names, Sequence):
            raise InvalidRequestError(
                f"`adapter_names` should be a list with one name (or None) per row, but got {adapter_names!r}"
            )
        if batch is not None and len(adapter_names) != batch:
            raise InvalidRequestError(
                f"`adapter_names` should have one entry per input row ({batch}), but has {len(adapter_names)}"
            )
        rows = [requested_adapter(name) for name in adapter_names]
        hold = self._cache.acquire(n for n in rows if n is not None)
        return tuple(-1 if n is None else hold.slots[n] for n in rows), hold

    # forward and generate ---------------------------------------------------------------------------
    def _mapping(self, row_slots: tuple) -> Optional[BatchMapping]:
        if all(s < 0 for s in row_slots):
            return None
        last = self._last_mapping
        if last is None or last.row_slots != row_slots:  # decode steps reuse one mapping
            last = self._last_mapping = BatchMapping(row_slots, self.multilora_config.num_slots)
        return last

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        names = kwargs.pop("adapter_names", None)
        mapping = kwargs.pop("lora_mapping", None)
        batch = _batch_size(args, kwargs)
        if mapping is not None:  # an engine's: built from the slots its requests hold
            if names is not None:
                raise InvalidRequestError("give either `adapter_names` or `lora_mapping`, not both")
            mapping = self._check_mapping(mapping, batch)
        elif names is not None:
            rows, self._context.held = self._activate(names, batch)
            mapping = self._mapping(rows)
        elif self._context.generate_rows is not None and batch is not None:
            mapping = self._mapping(expand_rows(self._context.generate_rows, batch))
        self._cache.sync()  # slot changes made since the last forward land now, not during this one
        self._context.mapping = mapping if mapping is not None and mapping.has_lora else None
        return args, kwargs

    def _check_mapping(self, mapping: BatchMapping, batch: Optional[int]) -> BatchMapping:
        num_slots = self.multilora_config.num_slots
        if not isinstance(mapping, (BatchMapping, PackedMapping)) or mapping.num_slots != num_slots:
            raise InvalidRequestError(f"`lora_mapping` should be a BatchMapping or PackedMapping over this model's "
                                      f"{num_slots} slots, but got {mapping!r}")
        if batch is not None and mapping.num_rows != batch:
            raise InvalidRequestError(f"`lora_mapping` should map each of the {batch} input rows, "
                                      f"but maps {mapping.num_rows}")
        return mapping

    def _after_forward(self, module: nn.Module, args: tuple, output):
        self._context.mapping = None
        held, self._context.held = self._context.held, None
        if held is not None:
            self._cache.release(held)

    def forward(self, *args, adapter_names: Optional[Sequence] = None, lora_mapping: Optional[BatchMapping] = None,
                **kwargs):
        """The model's forward. `adapter_names`: one name (or None) per row, held for this call.
        `lora_mapping`: row → slot, from an engine whose requests hold their adapters already."""
        return self.hf_model(*args, adapter_names=adapter_names, lora_mapping=lora_mapping, **kwargs)

    def generate(self, *args, adapter_names: Optional[Sequence] = None, **kwargs):
        """`transformers` generate with one adapter per input row; beams and returned sequences of a
        row use that row's adapter, whose weights at the start stay in its slot until generate returns."""
        if adapter_names is None:
            return self.hf_model.generate(*args, **kwargs)
        self._context.generate_rows, held = self._activate(adapter_names, _batch_size(args, kwargs))
        try:
            return self.hf_model.generate(*args, **kwargs)
        finally:
            self._context.generate_rows = None
            self._cache.release(held)

    # transformers' continuous batching -------------------------------------------------------------
    def generate_batch(self, inputs, generation_config=None, continuous_batching_config=None, *,
                       adapter_names: Optional[Sequence] = None, **kwargs):
        """transformers' `generate_batch` (continuous batching, paged KV cache) with one adapter name
        per input (None: the base model); see `transformers_cb`."""
        from . import transformers_cb

        return transformers_cb.generate_batch(self, inputs, generation_config, continuous_batching_config,
                                              adapter_names=adapter_names, **kwargs)

    def init_continuous_batching(self, generation_config=None, continuous_batching_config=None,
                                 workload_hints=None, **kwargs):
        """transformers' continuous-batching manager, whose `add_request(..., adapter_name=...)` and
        `add_requests(..., adapter_names=...)` name adapters; see `transformers_cb`."""
        from . import transformers_cb

        return transformers_cb.init_continuous_batching(self, generation_config, continuous_batching_config,
                                                        workload_hints, **kwargs)

    # unwrap -----------------------------------------------------------------------------------------
    def unwrap(self) -> nn.Module:
        """Put the original linear modules back, drop every adapter and return the plain model."""
        model = self.hf_model
        for handle in self._hooks:
            handle.remove()
        for name, layer in [*self._saved.items(), *self._layers.items()]:  # copies wrap the LoRA layers
            model.set_submodule(name, layer.base_layer)
        self._layers, self._targets, self._saved = {}, {}, {}
        self._cache.close()
        for name in self._cache.names():
            self._cache.unregister(name)
        self._hooks = []
        return model
