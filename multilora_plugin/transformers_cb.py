"""Mixed LoRA adapters inside transformers' own continuous batching (`generate_batch`, the CB manager).

    model = multilora_plugin.wrap(hf_model, max_loras=4)
    out = model.generate_batch(inputs, generation_config=..., adapter_names=["sql", None, "chat"])
    manager = model.init_continuous_batching(generation_config=...)
    manager.start()
    request_id = manager.add_request(input_ids, adapter_name="sql", streaming=True)
    for result in manager.request_id_iter(request_id): ...

transformers packs every request's query tokens into one `[1, T]` row (request i owns tokens
`cu_seq_lens_q[i] : cu_seq_lens_q[i + 1]`), which is the segment layout the patched layers already
take. Three pieces make it serve adapters:

* `LoRAScheduler`, a subclass of transformers' FIFO scheduler: waiting requests are admitted by this
  package's own `Scheduler` (the same policies, `max_loras` bound and anti-starvation rule as our
  engine), then transformers' own token and KV-cache budgets decide what runs. Each running request
  holds its adapter's content in a slot (`AdapterCache.acquire`) until it finishes, is cancelled or is
  preempted; adapters of queued requests are read ahead. A request whose adapter cannot be read fails
  alone. After scheduling a batch it builds that batch's `PackedMapping` (slot and query length of
  each request, in packed order).
* `LoRABatchingManager`, transformers' `ContinuousBatchingManager` whose `add_request` /
  `add_requests` take `adapter_name` / `adapter_names` (None: the base model).
* `_CBModel`, the model the manager drives: it hands each forward the mapping of the batch the
  scheduler just made (`lora_mapping=`).

Seams of transformers this relies on (young, and moving between 5.x releases; hence the version
check): `SCHEDULER_MAPPING` and `ContinuousBatchingConfig.scheduler_type` to install the scheduler;
the scheduler's `add_waiting_request`, `schedule_batch`, `finish_request`, `clear_cancelled_requests`
and `_process_candidates`; the manager's `output_router` to fail a request; the forward receiving
`cu_seq_lens_q` right after `schedule_batch` in the same thread. Settings that would mix adapters up
are forced off: prefix sharing (`allow_block_sharing`, which matches KV blocks by tokens alone),
async batching and CUDA graphs (the mapping is built in Python for every step; asking for graphs is
an error).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Any, Dict, List, Optional, Sequence

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching import scheduler as cb_scheduler
from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager
from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus

from .adapters import not_registered, requested_adapter
from .errors import AdapterNotFoundError, CapacityError, ConfigError, InvalidRequestError, MultiLoRAError
from .mapping import PackedMapping
from .scheduler import Request, Scheduler, SchedulerConfig

SUPPORTED = (Version("5.24"), Version("5.40"))  # transformers releases tested, the upper one excluded
_UNBOUNDED = 1 << 40  # token budgets are transformers' to enforce; our scheduler only gates adapters
_CHILD = "__child#"  # transformers' suffix of the ids of forked requests (num_return_sequences)


def check_transformers_version(version: str = transformers.__version__) -> None:
    low, high = SUPPORTED
    if not low <= Version(Version(version).base_version) < high:
        raise ConfigError(f"mixed adapters in transformers' continuous batching are tested with transformers "
                          f">={low},<{high}, but transformers {version} is installed")


def init_continuous_batching(model, generation_config: Optional[GenerationConfig] = None,
                             continuous_batching_config: Optional[ContinuousBatchingConfig] = None,
                             workload_hints=None, *, policy: str = "adapter_affinity",
                             max_wait_steps: int = 64) -> "LoRABatchingManager":
    """A transformers continuous-batching manager for a wrapped model, whose requests name adapters
    (see the module docstring). `policy` and `max_wait_steps` as in `SchedulerConfig`."""
    check_transformers_version()
    config = _checked_config(continuous_batching_config)
    generation_config = generation_config if generation_config is not None else model.generation_config
    if generation_config is None:
        raise ConfigError("a GenerationConfig should be given or set on the model, but neither is")
    if generation_config.eos_token_id is None:  # as transformers: no EOS
        generation_config.eos_token_id = -1
    session = _Session(model, SchedulerConfig(
        max_loras=model.multilora_config.num_slots, max_num_seqs=_UNBOUNDED, max_num_batched_tokens=_UNBOUNDED,
        max_total_tokens=_UNBOUNDED, policy=policy, max_wait_steps=max_wait_steps))
    config.scheduler_type = session.scheduler_name
    return LoRABatchingManager(session, generation_config, config, workload_hints)


@torch.no_grad()
def generate_batch(model, inputs: Sequence[Sequence[int]], generation_config: Optional[GenerationConfig] = None,
                   continuous_batching_config: Optional[ContinuousBatchingConfig] = None,
                   adapter_names: Optional[Sequence[Optional[str]]] = None, record_timestamps: bool = False,
                   progress_bar: bool = False, **kwargs: Any) -> Dict[str, GenerationOutput]:
    """transformers' `generate_batch` with one adapter name per input (None: the base model).
    Returns {request id: GenerationOutput} in input order, forked sequences after their parent, as
    transformers does. An unknown adapter raises `AdapterNotFoundError` before anything runs; a
    request whose adapter cannot be read comes back with `error` set."""
    inputs = [list(ids) for ids in inputs]
    if not inputs:
        return {}
    names = _adapter_names(adapter_names, len(inputs))
    max_new_tokens = kwargs.pop("max_new_tokens", None)
    if kwargs.pop("persistent_manager", False):
        raise ConfigError("generate_batch with adapters keeps no manager for later (`persistent_manager`); hold one "
                          "with init_continuous_batching instead")
    kwargs.pop("warmup", None)  # it captures CUDA graphs, which are off with adapters: nothing to warm up
    if kwargs:
        raise InvalidRequestError(f"generate_batch takes no keyword arguments {sorted(kwargs)}")
    manager = init_continuous_batching(model, generation_config, continuous_batching_config)
    for name in names:
        manager.session.check_adapter(name)
    sequences = manager.num_return_sequences
    from tqdm.auto import tqdm

    results: Dict[str, GenerationOutput] = {}
    manager.start()
    try:
        request_ids = manager.add_requests(inputs, max_new_tokens=max_new_tokens, record_timestamps=record_timestamps,
                                           adapter_names=names)
        with tqdm(total=len(inputs) * sequences, disable=not progress_bar, desc="generate_batch", unit="req") as bar:
            while len(results) < len(inputs) * sequences:
                result = manager.get_result(timeout=1)
                if result is not None and result.is_finished():
                    results[result.request_id] = result
                    bar.update(1)
                elif result is None and not manager.is_running():
                    break  # the generation thread ended (its error is logged by transformers)
    finally:
        manager.stop(block=True, timeout=30)
        manager.destroy()
    ordered = {}
    for request_id in request_ids:
        for child in [f"{request_id}{_CHILD}{i}" for i in range(sequences - 1)] + [request_id]:
            if child in results:
                ordered[child] = results[child]
    return ordered


class LoRABatchingManager(ContinuousBatchingManager):
    """transformers' `ContinuousBatchingManager` for a wrapped model: `add_request(...,
    adapter_name=...)` and `add_requests(..., adapter_names=[...])` name each request's adapter.
    Everything else (start, stop, get_result, request_id_iter, register_result_handler,
    cancel_request) is transformers'."""

    def __init__(self, session: "_Session", generation_config: GenerationConfig,
                 continuous_batching_config: ContinuousBatchingConfig, workload_hints=None) -> None:
        self.session = session
        super().__init__(model=_CBModel(session), generation_config=generation_config,
                         continuous_batching_config=continuous_batching_config, workload_hints=workload_hints)
        session.manager = self

    def add_request(self, input_ids: List[int], request_id: Optional[str] = None,
                    max_new_tokens: Optional[int] = None, streaming: bool = False, record_timestamps: bool = False,
                    eos_token_id=None, adapter_name: Optional[str] = None, **logit_processor_kwargs: Any):
        """transformers' `add_request`, with the adapter the request runs with (None: the base model).
        Raises `AdapterNotFoundError` for an adapter the model does not know."""
        name = self.session.check_adapter(adapter_name)
        if request_id is None:
            with self._request_lock:
                request_id = f"req_{self._request_counter}"
                self._request_counter += 1
        if _CHILD in request_id:
            raise InvalidRequestError(f"request ids should not contain {_CHILD!r} (transformers' mark of forked "
                                      f"requests), but got {request_id!r}")
        self.session.pending[request_id] = name
        added = super().add_request(input_ids, request_id=request_id, max_new_tokens=max_new_tokens,
                                    streaming=streaming, record_timestamps=record_timestamps,
                                    eos_token_id=eos_token_id, **logit_processor_kwargs)
        if added is None:  # dropped by transformers (not accepting requests)
            self.session.pending.pop(request_id, None)
        return added

    def add_requests(self, inputs: List[List[int]], max_new_tokens: Optional[int] = None, streaming: bool = False,
                     record_timestamps: bool = False, adapter_names: Optional[Sequence[Optional[str]]] = None,
                     **logit_processor_kwargs: Any) -> List[str]:
        """transformers' `add_requests`, with one adapter name per input (None: the base model)."""
        names = _adapter_names(adapter_names, len(inputs))
        for name in names:
            self.session.check_adapter(name)
        eos_token_id = self.generation_config.eos_token_id  # as transformers: generation config, model, none
        eos_token_id = self.model.config.eos_token_id if eos_token_id is None else eos_token_id
        eos_token_id = -1 if eos_token_id is None else eos_token_id
        with self._request_lock:
            request_ids = [f"req_{i}" for i in range(self._request_counter, self._request_counter + len(inputs))]
            self._request_counter += len(inputs)
        for request_id, input_ids, name in zip(request_ids, inputs, names):
            self.add_request(input_ids, request_id=request_id, max_new_tokens=max_new_tokens, streaming=streaming,
                             record_timestamps=record_timestamps, eos_token_id=eos_token_id, adapter_name=name,
                             **logit_processor_kwargs)
        return request_ids

    def destroy(self) -> None:
        super().destroy()
        self.session.close()


class _CBModel(nn.Module):
    """The model the manager drives: the wrapped model, whose every forward gets the `PackedMapping`
    of the batch the scheduler just made. Attributes transformers reads (config, device, dtype,
    generation_config, ...) fall through to the wrapped model."""

    def __init__(self, session: "_Session") -> None:
        super().__init__()
        self.wrapped = session.model
        self.session = session
        self._cached_continuous_batching_manager = None  # never the unwrapped model's

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "wrapped":
                raise
            return getattr(self.wrapped, name)

    def forward(self, **kwargs: Any):
        mapping = self.session.mapping
        if mapping is not None and "logits_to_keep" not in kwargs:  # the LM head sees every token
            mapping = dataclasses.replace(mapping, head_slots=None)
        return self.wrapped(lora_mapping=mapping, **kwargs)


class _Session:
    """What one manager's scheduler and model share: the wrapped model and its adapter cache, the
    adapters of requests not yet seen by the scheduler, the mapping of the batch being run, and the
    name the scheduler is registered under."""

    _names = itertools.count()

    def __init__(self, model, gate_config: SchedulerConfig) -> None:
        self.model = model
        self.cache = model.adapter_cache
        self.num_slots = model.multilora_config.num_slots
        self.gate_config = gate_config
        self.pending: Dict[str, Optional[str]] = {}  # request id → adapter, until the scheduler takes it
        self.mapping: Optional[PackedMapping] = None  # of the batch the scheduler made last
        self.errors: Dict[str, Exception] = {}  # request id → the typed error it failed with (transformers keeps words)
        self.manager: Optional[LoRABatchingManager] = None
        self.scheduler_name = f"multilora-{next(self._names)}"
        cb_scheduler.SCHEDULER_MAPPING[self.scheduler_name] = type(
            "LoRAScheduler", (LoRAScheduler,), {"session": self})

    def check_adapter(self, name: Optional[str]) -> Optional[str]:
        name = requested_adapter(name)
        if name is not None and name not in self.cache:
            raise AdapterNotFoundError(not_registered(name, self.cache.names()))
        return name

    def close(self) -> None:
        cb_scheduler.SCHEDULER_MAPPING.pop(self.scheduler_name, None)


class LoRAScheduler(cb_scheduler.FIFOScheduler):
    """transformers' FIFO scheduler (running requests first, then new ones), whose new requests are
    admitted by this package's `Scheduler` and hold their adapter in a slot while they run. A
    subclass bound to its manager's `_Session` is registered per manager."""

    session: _Session

    def reset(self) -> None:
        super().reset()
        self.gate = Scheduler(self.session.gate_config, adapter_exists=self.session.cache.__contains__,
                              residency=self.session.cache.residency)
        self.adapters: Dict[str, Optional[str]] = {}  # request id → adapter, while the request lives
        self.holds: Dict[str, Any] = {}  # request id → the `Hold` on its adapter's slot, while it runs
        self.ended: set = set()  # finished since the last schedule (or preempted, when re-added at once)
        self.seen_tokens: Dict[str, int] = {}  # generated tokens already counted for fair_share

    # transformers' calls ------------------------------------------------------------------------------
    def add_waiting_request(self, state) -> None:
        request_id = state.request_id
        if request_id in self.ended:  # preempted: finish_request, then back to waiting under the same id
            self.ended.discard(request_id)
            try:
                self.gate.preempt(request_id)
            except InvalidRequestError:  # a forked sequence, new to the gate
                self.gate.add(self._request(state))
        else:
            self.gate.add(self._request(state))  # raises for an adapter unloaded meanwhile: fails it alone
        super().add_waiting_request(state)

    def finish_request(self, request_id: str) -> None:
        super().finish_request(request_id)
        self._release(request_id)
        self.ended.add(request_id)

    def clear_cancelled_requests(self) -> list:
        cancelled = super().clear_cancelled_requests()
        for state in cancelled:
            self._forget(state.request_id)
        return cancelled

    def schedule_batch(self, token_budget: int, cache_budget: int):
        for state in self.active_requests.values():
            self._adapter(state)  # forked sequences enter active_requests directly
        for request_id in self.ended:
            self._forget(request_id)
        self.ended.clear()
        self._count_tokens()
        admitted = self._admit() if not self.block_new_requests else []
        for state in list(self.active_requests.values()):  # forked sequences hold their adapter too
            if state.request_id not in self.holds and self._adapter(state) is not None:
                self._hold(state)
        running = list(self.active_requests.values())
        candidates = ([s for s in running if s.status == RequestStatus.DECODING]
                      + [s for s in running if s.status == RequestStatus.PREFILLING] + admitted)
        removed: set = set()
        scheduled, allocation_failed, fast_path, num_q, max_kv = self._process_candidates(
            candidates, token_budget, cache_budget, removed)
        self._cleanup_waiting_queue(removed)
        for state in admitted:
            if state.request_id not in self.active_requests:  # transformers' budgets had no room: it waits again
                self._release(state.request_id)
                self.gate.defer(state.request_id)
        if not scheduled and allocation_failed:
            return None, fast_path, 0, 0
        self.session.mapping = PackedMapping(tuple(self._slot(f.state) for f in scheduled),
                                             tuple(f.query_length for f in scheduled), self.session.num_slots,
                                             head_slots=tuple(self._slot(f.state) for f in scheduled
                                                              if f.has_new_token))
        return scheduled, fast_path, num_q, max_kv

    # adapters ----------------------------------------------------------------------------------------
    def _admit(self) -> list:
        """The waiting requests our scheduler admits now, each holding its adapter, in its order."""
        plan = self.gate.schedule()
        for request, error in plan.failed:
            self._fail(self.waiting_requests.get(request.request_id), error)
        for name in plan.adapters_to_prefetch:
            try:
                self.session.cache.prefetch([name])
            except MultiLoRAError:  # unloaded meanwhile: its requests fail at the next schedule
                pass
        admitted = []
        for request in plan.prefill:
            state = self.waiting_requests.get(request.request_id)
            if state is None:  # cancelled meanwhile
                self.gate.abort(request.request_id)
            elif self._hold(state):
                admitted.append(state)
        return admitted

    def _hold(self, state) -> bool:
        """Hold the request's adapter in a slot. One that cannot get a slot now waits again; one whose
        adapter cannot be read fails alone."""
        name = self._adapter(state)
        if name is None:
            return True
        try:
            self.holds[state.request_id] = self.session.cache.acquire([name])
            return True
        except CapacityError:  # every slot pinned or held: try again at a later step
            if state.request_id in self.waiting_requests:
                self.gate.defer(state.request_id)
                return False
            self._fail(state, CapacityError(f"no slot for adapter {name!r} of request {state.request_id!r}"))
            return False
        except MultiLoRAError as error:
            self._fail(state, error)
            return False

    def _release(self, request_id: str) -> None:
        hold = self.holds.pop(request_id, None)
        if hold is not None:
            self.session.cache.release(hold)

    def _forget(self, request_id: str) -> None:
        self._release(request_id)
        self.gate.abort(request_id)
        self.adapters.pop(request_id, None)
        self.seen_tokens.pop(request_id, None)

    def _adapter(self, state) -> Optional[str]:
        request_id = state.request_id
        if request_id not in self.adapters:
            parent = request_id.split(_CHILD)[0]
            self.adapters[request_id] = (self.session.pending.pop(request_id) if request_id in self.session.pending
                                         else self.adapters.get(parent))
        return self.adapters[request_id]

    def _slot(self, state) -> int:
        name = self._adapter(state)
        return -1 if name is None else self.holds[state.request_id].slots[name]

    def _request(self, state) -> Request:
        return Request(request_id=state.request_id, adapter=self._adapter(state),
                       num_prompt_tokens=max(len(state.initial_tokens), 1),
                       max_new_tokens=state.max_new_tokens or _UNBOUNDED)

    def _count_tokens(self) -> None:
        """Tokens generated since the last step, for the fair_share policy's service counters."""
        running = {r.request_id for r in self.gate.running}
        for request_id, state in self.active_requests.items():
            done = len(state.generated_tokens)
            new = done - self.seen_tokens.get(request_id, 0)
            self.seen_tokens[request_id] = done
            if new > 0 and request_id in running:
                self.gate.record_tokens(request_id, new)

    def _fail(self, state, error: Exception) -> None:
        """End one request with `error` (delivered as transformers delivers a failed request)."""
        if state is None:
            return
        request_id = state.request_id
        self.waiting_requests.pop(request_id, None)
        if request_id in self.waiting_requests_order:
            self.waiting_requests_order.remove(request_id)
        if self.active_requests.pop(request_id, None) is not None:
            self.cache.free_blocks(request_id)
        self._forget(request_id)
        state.generated_tokens = list(state.generated_tokens)
        self.session.errors[request_id] = error
        self.session.manager.output_router.fail_and_deliver(state, error)


def _checked_config(config: Optional[ContinuousBatchingConfig]) -> ContinuousBatchingConfig:
    config = copy.deepcopy(config) if config is not None else ContinuousBatchingConfig()
    if config.use_cuda_graph not in (None, False, (False, False)):
        raise ConfigError("CUDA graphs are not supported with mixed adapters yet (each step's adapter mapping is "
                          "built in Python, which a graph replay would skip); leave `use_cuda_graph` unset or False")
    if config.scheduler_type not in (None, "fifo"):
        raise ConfigError(f"mixed adapters bring their own scheduler (FIFO with adapter-aware admission), so "
                          f"`scheduler_type` should be unset or 'fifo', but got {config.scheduler_type!r}")
    config.use_cuda_graph = False
    config.use_async_batching = False
    config.allow_block_sharing = False  # KV blocks are matched by tokens alone: another adapter's would be reused
    return config


def _adapter_names(adapter_names: Optional[Sequence[Optional[str]]], count: int) -> list:
    if adapter_names is None:
        return [None] * count
    if isinstance(adapter_names, (str, bytes)) or len(adapter_names) != count:
        raise InvalidRequestError(f"`adapter_names` should be a list with one name (or None) per input ({count}), "
                                  f"but got {adapter_names!r}")
    return list(adapter_names)
