"""The continuous-batching engine: `Engine` (one step at a time) and `LLM` (the offline facade).

Each `Engine.step()`:

    1. the Scheduler decides: requests to admit (prefill), to keep (decode), to preempt, to fail;
       the adapters of queued requests go to the cache for prefetch (disk → CPU, in the background)
    2. admitted requests hold their adapter in a slot (`adapter_cache.acquire`) until they finish,
       are preempted or aborted; an adapter that cannot be read fails only its requests
    3. one decode forward for the running batch, one prefill forward for the admitted requests
       (prompt + tokens already produced, so a preempted request resumes where it stopped)
    4. each request samples its next token with its own parameters and seed, detokenizes it
       incrementally and checks EOS, stop tokens, stop strings and its length
    5. finished rows are filtered out of the batch, the prefilled ones concatenated in, and rows are
       kept grouped by slot (base-model rows last) so the kernels see contiguous segments

It returns one `RequestOutput` per request that moved: cumulative `text` / `token_ids` and the
`delta_text` / `delta_token_ids` since the last one (for streaming). `text` only ever grows: while a
request runs, the last characters that could still be the start of a stop string are held back.

Plugins (docs/hooks.md) see every request as it arrives (and may route or reject it), resolve
adapter names nobody registered, provide adapter weights, and observe each scheduled batch, adapter
load and eviction, finished request and step.

The engine is driven by one thread (`step()`); `add_request` and `abort_request` may be called
from others.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch

from .adapters import AdapterEvent, AdapterState
from .batch import Batch
from .errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    CapacityError,
    ConfigError,
    InvalidRequestError,
    MultiLoRAError,
    PluginError,
)
from .hooks import AdapterDirectory, AdapterRegistry, EngineStatistics, Plugins
from .sampling import SamplingParams, logprobs, sample
from .scheduler import Request, Scheduler, SchedulerConfig

FINISH_REASONS = ("length", "stop", "abort", "error")


@dataclass(frozen=True)
class LoRARequest:
    """An adapter for a request, as in vLLM: registered from `lora_path` under `lora_name` the first
    time a request names it; later requests may leave `lora_path` empty."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise InvalidRequestError(f"`lora_name` should be a non-empty string, but got {self.lora_name!r}")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise InvalidRequestError(f"`lora_int_id` should be an int >= 1, but got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, (str, os.PathLike)):
            raise InvalidRequestError(f"`lora_path` should be a path, but got {self.lora_path!r}")
        object.__setattr__(self, "lora_path", os.fspath(self.lora_path))


@dataclass
class CompletionOutput:
    index: int
    text: str  # the text so far (grows only)
    token_ids: List[int]  # every token generated so far
    finish_reason: Optional[str] = None  # None while running, else one of FINISH_REASONS
    stop_reason: Union[str, int, None] = None  # the stop string or stop token id that ended it
    delta_text: str = ""  # added to `text` since this request's previous output
    delta_token_ids: List[int] = field(default_factory=list)
    # with SamplingParams(logprobs=k): per token, {token id: log-probability}, the chosen token first
    logprobs: Optional[List[Dict[int, float]]] = None
    cumulative_logprob: Optional[float] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    num_preemptions: int = 0
    inter_token_s: List[float] = field(default_factory=list, repr=False)  # gaps between its tokens


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    outputs: List[CompletionOutput]
    finished: bool
    lora_request: Optional[LoRARequest] = None
    metrics: Optional[RequestMetrics] = None
    error: Optional[Exception] = None  # why it failed (finish_reason "error")


@dataclass
class EngineRequest:
    """A request as plugins see it. `multilora_request_received` may change `adapter` (an adapter name,
    None for the base model), `priority` and `metadata`."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    sampling_params: SamplingParams
    adapter: Optional[str]
    priority: int = 0
    metadata: Dict[str, Any] = field(default_factory=dict)  # the host's fields (tenant, task, ...)
    lora_request: Optional[LoRARequest] = None


@dataclass(frozen=True)
class StepStats:
    """One step's numbers, for `multilora_step_finished`."""

    step: int
    duration_s: float
    num_prefill: int  # requests prefilled (admitted or resumed)
    num_decode: int  # requests decoded
    generated_tokens: int
    finished: int  # requests that ended in this step (any reason)
    running: int
    waiting: int


@dataclass(frozen=True)
class EngineStats:
    steps: int
    running: int
    waiting: int
    active_adapters: tuple  # adapters of running requests
    slot_contents: tuple  # slot i → adapter name or EMPTY
    adapter_swaps: int  # scheduler: an adapter replaced another in a full set of slots
    slot_swaps: int  # cache: slot buffers rewritten with another adapter
    preemptions: int
    gpu_hits: int  # cache lookups answered from a slot
    gpu_misses: int
    cpu_hits: int  # slot misses answered from CPU memory
    cpu_misses: int  # read from disk
    finished: int  # by length or stop
    aborted: int
    failed: int
    generated_tokens: int
    tokens_per_s: float  # generated tokens over the time spent in steps
    mean_ttft_s: float  # arrival → first token, over finished requests (the recent 10,000)
    p99_ttft_s: float
    mean_itl_s: float  # between consecutive tokens of one request, finished requests (the recent 100,000)
    p99_itl_s: float

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Detokenizer:
    """Incremental decoding: the text that each new token adds to `decode(prompt + output)`.

    Decodes a short window (the tokens of the previous piece and the new ones) and emits the text
    past the previous piece, holding back while the window ends in an incomplete character."""

    CONTEXT = 5  # prompt tokens decoded with the first output tokens (leading spaces, merges)

    def __init__(self, tokenizer, prompt_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-self.CONTEXT:])
        self.prefix = 0  # window start
        self.read = len(self.ids)  # tokens before `read` were already turned into text

    def add(self, token: int) -> str:
        self.ids.append(token)
        if self.tokenizer is None:
            return ""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


@dataclass(eq=False)
class _Sequence(Request):
    """A request inside the engine: the scheduler's view, the request as plugins left it (`info`),
    and what generating it needs."""

    info: Optional[EngineRequest] = None
    lora_request: Optional[LoRARequest] = None  # the adapter it runs with, as resolved
    generator: Optional[torch.Generator] = None
    output_ids: List[int] = field(default_factory=list)
    logprobs: Optional[List[Dict[int, float]]] = None  # per output token, with SamplingParams(logprobs=k)
    text: str = ""  # decoded output, stop strings cut
    sent_text: int = 0  # characters of `text` already reported
    sent_tokens: int = 0  # tokens already reported
    detokenizer: Optional[_Detokenizer] = None
    slot: Optional[int] = None  # the adapter's slot while this request holds it (None: holds nothing)
    finish_reason: Optional[str] = None
    stop_reason: Union[str, int, None] = None
    error: Optional[Exception] = None
    metrics: Optional[RequestMetrics] = None

    @property
    def prompt(self) -> Optional[str]:
        return self.info.prompt

    @property
    def prompt_ids(self) -> List[int]:
        return self.info.prompt_token_ids

    @property
    def params(self) -> SamplingParams:
        return self.info.sampling_params


class Engine:
    """Continuous batching over a wrapped model. See the module docstring.

    `engine_args` are `SchedulerConfig` fields (`max_num_seqs`, `max_num_batched_tokens`,
    `max_total_tokens`, `policy`, `max_wait_steps`, `max_prefetch`) and `max_model_len` (prompt +
    output tokens per request; default: the model's `max_position_embeddings`). `max_loras` is the
    wrapped model's own.

    Plugins: those of the entry-point group `multilora_plugin` (unless `load_entrypoints=False`),
    then `plugins`; `adapter_dir` adds the built-in `AdapterDirectory` plugin for that directory.
    """

    def __init__(self, model, tokenizer=None, *, plugins: Iterable[Any] = (), load_entrypoints: bool = True,
                 adapter_dir: "str | os.PathLike | None" = None, **engine_args: Any) -> None:
        from .wrap import MultiLoRAModel

        if not isinstance(model, MultiLoRAModel):
            raise ConfigError(f"expected a model returned by multilora_plugin.wrap(...), but got {type(model).__name__}")
        Batch.check_model(model)
        max_model_len = engine_args.pop("max_model_len", None)
        if "max_loras" in engine_args:
            raise ConfigError("`max_loras` belongs to the wrapped model: pass it to multilora_plugin.wrap(...)")
        allowed = {f.name for f in fields(SchedulerConfig)} - {"max_loras"}
        unknown = sorted(set(engine_args) - allowed)
        if unknown:
            raise ConfigError(f"unknown engine arguments {unknown}; expected some of {sorted(allowed | {'max_model_len'})}")
        self.model = model
        self.tokenizer = tokenizer
        self.cache = model.adapter_cache
        self.scheduler = Scheduler(SchedulerConfig(max_loras=model.multilora_config.max_loras, **engine_args),
                                   adapter_exists=self.cache.__contains__)
        config = model.config
        self.max_model_len = max_model_len or getattr(config, "max_position_embeddings", None) \
            or getattr(config, "n_positions", None)
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ConfigError(f"`max_model_len` should be an int >= 2, but got {self.max_model_len!r}")
        self.vocab_size = getattr(config, "vocab_size", None)
        self.eos_token_ids = self._eos_ids(model, tokenizer)
        self._device = model.device
        self._lock = threading.RLock()
        self._requests: Dict[str, _Sequence] = {}  # unfinished, by id
        self._rows: List[_Sequence] = []  # the running batch's rows, in order
        self._batch: Optional[Batch] = None
        self._pending: List[RequestOutput] = []  # outputs of aborts, reported by the next step
        self._ended: Dict[str, _Sequence] = {}  # requests that ended since the last step reported them
        self.plugins = Plugins(plugins, load_entrypoints=load_entrypoints)
        if adapter_dir is not None:
            self.plugins.register(AdapterDirectory(adapter_dir), name="adapter_dir")
        self.statistics = EngineStatistics()
        self.plugins.register(self.statistics, name="statistics")
        model.weights_provider = self.plugins.load_adapter_weights
        self.cache.listeners.append(self._on_adapter_event)
        self.plugins.notify("multilora_register_adapters", registry=AdapterRegistry(model))

    def close(self) -> None:
        """Detach from the model (its adapter events and weights provider); aborts what is left."""
        self.abort_request(self.unfinished_request_ids())
        if self._on_adapter_event in self.cache.listeners:
            self.cache.listeners.remove(self._on_adapter_event)
        if getattr(self.model, "weights_provider", None) == self.plugins.load_adapter_weights:
            self.model.weights_provider = None

    _TIERS = {AdapterState.CPU: ("cpu",), AdapterState.ACTIVE: ("cpu", "gpu"), AdapterState.EVICTING: ("cpu", "gpu")}

    def _on_adapter_event(self, event: AdapterEvent) -> None:
        """Cache state changes → `multilora_adapter_loaded` / `multilora_adapter_evicted`, per tier."""
        old, new = self._TIERS.get(event.old, ()), self._TIERS.get(event.new, ())
        for tier in ("gpu", "cpu"):
            if tier in old and tier not in new:
                self.plugins.notify("multilora_adapter_evicted", name=event.name, tier=tier)
        for tier in ("cpu", "gpu"):
            if tier in new and tier not in old:
                self.plugins.notify("multilora_adapter_loaded", name=event.name, tier=tier,
                                    slot=event.slot if tier == "gpu" else None)

    @staticmethod
    def _eos_ids(model, tokenizer) -> frozenset:
        ids = set()
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
        ids.add(getattr(tokenizer, "eos_token_id", None))
        return frozenset(i for i in ids if isinstance(i, int))

    # requests -------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Union[str, Sequence[int], None] = None,
                    sampling_params: Optional[SamplingParams] = None, lora_request=None, priority: int = 0,
                    *, prompt_token_ids: Optional[Sequence[int]] = None,
                    metadata: Optional[Mapping[str, Any]] = None) -> None:
        """Queue a request. `prompt` is a string (needs a tokenizer) or token ids (or both: the text in
        `prompt`, its ids, as the host tokenized them, in `prompt_token_ids`); `lora_request` a
        `LoRARequest`, an adapter name, or None for the base model; `metadata` the host's own fields,
        for plugins that route requests.

        Raises a `MultiLoRAError` for a request that cannot run (the engine is unchanged):
        `InvalidRequestError` (empty prompt, bad ids or values, too long), `AdapterNotFoundError`,
        `AdapterExistsError` (the name is registered from another path), `AdapterLoadError`;
        `RequestRejected` or `PluginError` from a plugin.
        """
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError(f"`request_id` should be a non-empty string, but got {request_id!r}")
        params = self._params(sampling_params)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidRequestError(f"`priority` should be an int, but got {priority!r}")
        text, ids = self._tokens(request_id, prompt, prompt_token_ids)
        if self.max_model_len is not None and len(ids) + params.max_new_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"request {request_id!r}: prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                f"should fit the model's {self.max_model_len} positions"
            )
        if metadata is not None and not isinstance(metadata, Mapping):
            raise InvalidRequestError(f"`metadata` should be a mapping, but got {type(metadata).__name__}")
        lora = self._lora(lora_request)
        info = EngineRequest(request_id=request_id, prompt=text, prompt_token_ids=ids, sampling_params=params,
                             adapter=None if lora is None else lora.lora_name, priority=priority,
                             metadata=dict(metadata or {}), lora_request=lora)
        self.plugins.request_received(info)
        with self._lock:
            if request_id in self._requests:
                raise InvalidRequestError(f"a request with id {request_id!r} is already queued or running")
            lora = self._resolve(info)
            seq = _Sequence(
                request_id=request_id, adapter=None if lora is None else lora.lora_name,
                num_prompt_tokens=len(ids), max_new_tokens=params.max_new_tokens, priority=info.priority,
                info=info, lora_request=lora, generator=params.generator(self._device),
                detokenizer=_Detokenizer(self.tokenizer, ids), metrics=RequestMetrics(arrival_time=time.perf_counter()),
            )
            self.scheduler.add(seq)
            self._requests[request_id] = seq

    def abort_request(self, request_id: Union[str, Sequence[str]]) -> None:
        """Stop requests (waiting or running): their slot references and KV rows are freed now, and
        the next `step()` reports them with finish_reason "abort". Unknown ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        with self._lock, torch.inference_mode():
            for rid in ids:
                seq = self._requests.get(rid)
                if seq is None:
                    continue
                self.scheduler.abort(rid)
                if seq in self._rows:
                    self._remove_rows([seq])
                self._release(seq)
                self._pending.append(self._end(seq, "abort"))

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return bool(self._requests or self._pending)

    def unfinished_request_ids(self) -> List[str]:
        with self._lock:
            return list(self._requests)

    def get_num_unfinished_requests(self) -> int:
        with self._lock:
            return len(self._requests)

    def _params(self, params) -> SamplingParams:
        if params is None:
            return SamplingParams()
        if isinstance(params, dict):
            try:
                return SamplingParams(**params)
            except TypeError as exc:
                raise InvalidRequestError(f"bad sampling parameters {params!r}: {exc}") from None
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"`sampling_params` should be a SamplingParams, but got {type(params).__name__}")
        return params

    def _tokens(self, request_id: str, prompt, prompt_token_ids) -> tuple:
        text = None
        if prompt is not None and prompt_token_ids is not None:  # the host tokenized it: ids rule, text kept
            if not isinstance(prompt, str):
                raise InvalidRequestError(f"request {request_id!r}: with `prompt_token_ids`, `prompt` should be "
                                          f"the text they encode, but got {type(prompt).__name__}")
            text, prompt = prompt, None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError(f"request {request_id!r}: a text prompt needs an engine with a tokenizer; "
                                          "pass prompt_token_ids instead")
            text, ids = prompt, self.tokenizer.encode(prompt, add_special_tokens=True) if prompt else []
        else:
            ids = prompt_token_ids if prompt_token_ids is not None else prompt
            if ids is None or isinstance(ids, (bytes, dict)) or not isinstance(ids, (Sequence, torch.Tensor)):
                raise InvalidRequestError(f"request {request_id!r}: the prompt should be a string or a list of "
                                          f"token ids, but got {type(ids).__name__}")
            ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or t < 0
                   or (self.vocab_size is not None and t >= self.vocab_size)]
            if bad:
                raise InvalidRequestError(f"request {request_id!r}: token ids should be ints in "
                                          f"0..{(self.vocab_size or 0) - 1}, but got {bad[:5]}")
        if not ids:
            raise InvalidRequestError(f"request {request_id!r}: the prompt is empty (it should have at least one token)")
        return text, ids

    @staticmethod
    def _lora(lora_request) -> Optional[LoRARequest]:
        if lora_request is None or isinstance(lora_request, LoRARequest):
            return lora_request
        if isinstance(lora_request, str) and lora_request:
            return LoRARequest(lora_request, 1)
        raise InvalidRequestError(f"`lora_request` should be a LoRARequest, an adapter name or None, "
                                  f"but got {lora_request!r}")

    def _resolve(self, info: EngineRequest) -> Optional[LoRARequest]:
        """The request's adapter (as plugins left it), registered on first use from the request's
        `lora_path` or from a plugin's `multilora_resolve_adapter`."""
        name = info.adapter
        if name is None:
            return None
        if not isinstance(name, str) or not name:
            raise PluginError(f"request {info.request_id!r}: a plugin set its adapter to {name!r}; "
                              "expected an adapter name or None")
        lora = info.lora_request if info.lora_request is not None and info.lora_request.lora_name == name else None
        path = lora.lora_path if lora is not None else ""
        if name not in self.cache:
            path = path or self.plugins.resolve_adapter(name) or ""
            if not path:
                raise AdapterNotFoundError(self._not_registered(name) + "; give its lora_path to register it")
            self.model.register_adapter(name, path)
        elif path and os.path.realpath(path) != os.path.realpath(self.cache.source(name).path):
            raise AdapterExistsError(
                f"adapter {name!r} is registered from {self.cache.source(name).path!r}, but this request gives "
                f"{path!r}; unload it first or use another lora_name"
            )
        return lora or LoRARequest(name, 1, self.cache.source(name).path)

    def _not_registered(self, name: str) -> str:
        try:
            self.cache.state(name)
        except AdapterNotFoundError as exc:
            return str(exc)
        return f"adapter {name!r} is not registered"

    # one step -------------------------------------------------------------------------------------
    def step(self) -> List[RequestOutput]:
        """Run one step; returns an output for every request that produced a token or ended."""
        with self._lock, torch.inference_mode():
            started = time.perf_counter()
            outputs, self._pending = self._pending, []
            plan = self.scheduler.schedule()
            self.plugins.notify("multilora_batch_scheduled", scheduler_output=plan)
            for seq, exc in plan.failed:
                outputs.append(self._fail(seq, exc))
            self._prefetch(plan.adapters_to_prefetch)
            if plan.preempted:
                self._remove_rows([s for s in plan.preempted if s in self._rows])
                for seq in plan.preempted:
                    self._release(seq)
                    seq.metrics.num_preemptions += 1
            admitted = self._hold(plan.prefill, outputs)
            logits, new, decoded = [], None, len(self._rows)
            if self._batch is not None:
                decode_logits = self._decode(outputs)
                if decode_logits is not None:
                    logits.append(decode_logits)
            if admitted:
                new, admitted, prefill_logits = self._prefill(admitted, outputs)
                if new is not None:
                    logits.append(prefill_logits)
            rows = self._rows + admitted
            if rows:
                now = time.perf_counter()
                history = [s.prompt_ids + s.output_ids if s.params.processors else () for s in rows]
                logits = torch.cat(logits)
                tokens = sample(logits, [(s.params, h, s.generator) for s, h in zip(rows, history)])
                self._logprobs(rows, logits, tokens)
                for seq, token in zip(rows, tokens):
                    self._append(seq, token, now)
                    outputs.append(self._output(seq))
                    if seq.finish_reason is not None:
                        self.scheduler.finish(seq.request_id)
                        self._release(seq)
                        self._retire(seq)
                self._rebatch(new, admitted)
            ended, self._ended = self._ended, {}
            for out in outputs:
                if out.finished and out.request_id in ended:
                    self.plugins.notify("multilora_request_finished", request=ended[out.request_id].info, output=out)
            sched = self.scheduler.stats()
            self.plugins.notify("multilora_step_finished", stats=StepStats(
                step=plan.step, duration_s=time.perf_counter() - started, num_prefill=len(admitted),
                num_decode=decoded, generated_tokens=len(rows),
                finished=len(ended), running=sched.running, waiting=sched.waiting,
            ))
            return outputs

    def _prefetch(self, names: Sequence[str]) -> None:
        for name in names:
            try:
                self.cache.prefetch([name])
            except MultiLoRAError:  # unloaded meanwhile: its requests fail at the next schedule
                pass

    def _hold(self, admitted: List[_Sequence], outputs: List[RequestOutput]) -> List[_Sequence]:
        """Hold each admitted request's adapter in a slot. A request whose adapter cannot be read
        fails alone; one that cannot get a slot now (pinned slots) goes back to waiting."""
        held, bad = [], {}
        for seq in admitted:
            if seq.adapter is None:
                held.append(seq)
                continue
            exc = bad.get(seq.adapter)
            if exc is None:
                try:
                    seq.slot = self.cache.acquire([seq.adapter])[seq.adapter]
                    held.append(seq)
                    continue
                except CapacityError:
                    self.scheduler.preempt(seq.request_id)
                    continue
                except MultiLoRAError as error:
                    exc = bad[seq.adapter] = error
            self.scheduler.finish(seq.request_id)
            outputs.append(self._fail(seq, exc))
        return held

    def _release(self, seq: _Sequence) -> None:
        if seq.slot is not None:
            self.cache.release([seq.adapter])
            seq.slot = None

    def _decode(self, outputs: List[RequestOutput]) -> Optional[torch.Tensor]:
        try:
            return self._batch.decode(self.model, [s.output_ids[-1] for s in self._rows])
        except Exception as exc:  # noqa: BLE001 - no single row is to blame: the running rows fail, the engine goes on
            failed, self._rows, self._batch = self._rows, [], None
            for seq in failed:
                self.scheduler.finish(seq.request_id)
                self._release(seq)
                outputs.append(self._fail(seq, exc))
            _raise_if_bug(exc)
            return None

    def _prefill(self, admitted: List[_Sequence], outputs: List[RequestOutput]) -> tuple:
        """Prefill prompt + tokens so far. If the batch fails, each request is tried alone and only
        those that fail alone are failed. Returns (batch, its requests, logits)."""
        names = [s.adapter for s in admitted]
        try:
            batch, logits = Batch.prefill(self.model, [s.prompt_ids + s.output_ids for s in admitted], names)
            return batch, admitted, logits
        except Exception as exc:  # noqa: BLE001 - find the culprit below
            if len(admitted) == 1:
                seq = admitted[0]
                self.scheduler.finish(seq.request_id)
                self._release(seq)
                outputs.append(self._fail(seq, exc))
                _raise_if_bug(exc)
                return None, [], None
        parts = [self._prefill([seq], outputs) for seq in admitted]
        parts = [p for p in parts if p[0] is not None]
        if not parts:
            return None, [], None
        return (Batch.concatenate([p[0] for p in parts]), [p[1][0] for p in parts],
                torch.cat([p[2] for p in parts]))

    @staticmethod
    def _logprobs(rows: List[_Sequence], logits: torch.Tensor, tokens: List[int]) -> None:
        want = [i for i, s in enumerate(rows) if s.params.logprobs is not None]
        if not want:
            return
        index = torch.as_tensor(want, device=logits.device)
        found = logprobs(logits.index_select(0, index), [tokens[i] for i in want],
                         [rows[i].params.logprobs for i in want])
        for i, entry in zip(want, found):
            if rows[i].logprobs is None:
                rows[i].logprobs = []
            rows[i].logprobs.append(entry)

    def _append(self, seq: _Sequence, token: int, now: float) -> None:
        seq.output_ids.append(token)
        self.scheduler.record_tokens(seq.request_id, 1)
        metrics = seq.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        else:
            metrics.inter_token_s.append(now - metrics.last_token_time)
        metrics.last_token_time = now
        params = seq.params
        before = len(seq.text)
        seq.text += seq.detokenizer.add(token)
        if token in self.eos_token_ids and not params.ignore_eos:
            seq.finish_reason = "stop"
        elif token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif params.stop and self._cut_stop(seq, before):
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= params.max_new_tokens:
            seq.finish_reason = "length"
        elif self.max_model_len is not None and seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"

    @staticmethod
    def _cut_stop(seq: _Sequence, before: int) -> bool:
        """Cut `seq.text` at the first stop string that the new text completed."""
        longest = max(len(s) for s in seq.params.stop)
        start = max(0, before - longest + 1)
        hits = [(seq.text.find(s, start), s) for s in seq.params.stop]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if not hits:
            return False
        pos, stop = min(hits)
        seq.text, seq.stop_reason = seq.text[:pos], stop
        return True

    def _output(self, seq: _Sequence) -> RequestOutput:
        """The request's output now, with what is new since the last one."""
        visible = len(seq.text)
        if seq.finish_reason is None and seq.params.stop:  # may still be the start of a stop string
            visible = max(seq.sent_text, visible - max(len(s) for s in seq.params.stop) + 1)
        completion = CompletionOutput(
            index=0, text=seq.text[:visible], token_ids=list(seq.output_ids), finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason, delta_text=seq.text[seq.sent_text:visible],
            delta_token_ids=seq.output_ids[seq.sent_tokens:],
        )
        if seq.params.logprobs is not None:
            completion.logprobs = list(seq.logprobs or ())
            completion.cumulative_logprob = sum(entry[t] for entry, t in zip(completion.logprobs, seq.output_ids))
        seq.sent_text, seq.sent_tokens = visible, len(seq.output_ids)
        return RequestOutput(
            request_id=seq.request_id, prompt=seq.prompt, prompt_token_ids=list(seq.prompt_ids),
            outputs=[completion], finished=seq.finish_reason is not None, lora_request=seq.lora_request,
            metrics=seq.metrics, error=seq.error,
        )

    def _end(self, seq: _Sequence, reason: str, error: Optional[Exception] = None) -> RequestOutput:
        seq.finish_reason, seq.error = reason, error
        self._retire(seq)
        return self._output(seq)

    def _fail(self, seq: _Sequence, error: Exception) -> RequestOutput:
        return self._end(seq, "error", error)

    def _retire(self, seq: _Sequence) -> None:
        self._requests.pop(seq.request_id, None)
        seq.metrics.finished_time = time.perf_counter()
        self._ended[seq.request_id] = seq

    # the running batch ----------------------------------------------------------------------------
    def _remove_rows(self, gone: Sequence[_Sequence]) -> None:
        keep = [i for i, s in enumerate(self._rows) if s not in gone]
        self._batch = self._batch.filter(keep) if self._batch is not None else None
        self._rows = [self._rows[i] for i in keep]

    def _rebatch(self, new: Optional[Batch], admitted: List[_Sequence]) -> None:
        """Drop finished rows, add the prefilled ones, keep rows grouped by slot (base rows last)."""
        old = self._rows
        keep = [i for i, s in enumerate(old) if s.finish_reason is None]
        batch = self._batch.filter(keep) if self._batch is not None and len(keep) < len(old) else self._batch
        rows = [old[i] for i in keep]
        if new is not None:
            stay = [i for i, s in enumerate(admitted) if s.finish_reason is None]
            new = new.filter(stay) if len(stay) < len(admitted) else new
            batch = Batch.concatenate([batch, new]) if batch is not None else new
            rows += [admitted[i] for i in stay]
        base = self.model.multilora_config.max_loras
        order = sorted(range(len(rows)), key=lambda i: (base if rows[i].slot is None else rows[i].slot, i))
        if batch is not None and order != list(range(len(rows))):
            batch = batch.filter(order)
            rows = [rows[i] for i in order]
        self._batch, self._rows = batch, rows

    # stats ----------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        with self._lock:
            sched = self.scheduler.stats()
            cache = self.cache.stats()
            return EngineStats(
                steps=sched.steps, running=sched.running, waiting=sched.waiting,
                active_adapters=sched.active_adapters, slot_contents=self.cache.contents(),
                adapter_swaps=sched.adapter_swaps, slot_swaps=cache.slot_swaps, preemptions=sched.preemptions,
                gpu_hits=cache.gpu_hits, gpu_misses=cache.gpu_misses, cpu_hits=cache.cpu_hits,
                cpu_misses=cache.cpu_misses, **self.statistics.snapshot(),
            )


def _raise_if_bug(exc: Exception) -> None:
    """Errors of the engine's own making are not swallowed by the per-request isolation."""
    if isinstance(exc, (AssertionError, NameError, AttributeError, UnboundLocalError)):
        raise exc


class LLM:
    """The offline facade, as in vLLM: `LLM(model, tokenizer).generate(prompts, params, lora_request)`.

    `model` is a wrapped model (`multilora_plugin.wrap(...)`); `engine_args` go to `Engine`.
    """

    def __init__(self, model, tokenizer=None, **engine_args: Any) -> None:
        self.engine = Engine(model, tokenizer, **engine_args)
        self._ids = itertools.count()

    def generate(self, prompts, sampling_params=None, lora_request=None, use_tqdm: bool = True,
                 priority: Optional[Sequence[int]] = None) -> List[RequestOutput]:
        """Generate for every prompt; outputs in input order.

        prompts: a string, token ids, or a list of them (a dict {"prompt": ...} or
                 {"prompt_token_ids": [...]} per prompt works too)
        sampling_params: one SamplingParams for all prompts or one per prompt (None: defaults)
        lora_request: one LoRARequest for all prompts, or a list with one (or None) per prompt
        A prompt that cannot run gets a finished output with finish_reason "error" and `error` set;
        the others still run.
        """
        prompts = self._prompts(prompts)
        n = len(prompts)
        params = self._per_prompt(sampling_params, n, "sampling_params")
        loras = self._per_prompt(lora_request, n, "lora_request")
        priorities = self._per_prompt(priority, n, "priority") if priority is not None else [0] * n
        engine = self.engine
        ids, results = [], {}
        for prompt, p, lora, prio in zip(prompts, params, loras, priorities):
            rid = f"llm-{next(self._ids)}"
            ids.append(rid)
            try:
                engine.add_request(rid, sampling_params=p, lora_request=lora, priority=prio, **prompt)
            except MultiLoRAError as exc:
                results[rid] = _refused(rid, prompt, exc)
        progress = None
        if use_tqdm:
            from tqdm.auto import tqdm

            progress = tqdm(total=n, desc="generate", unit="req", initial=len(results))
        try:
            while len(results) < n:
                for out in engine.step():
                    if out.finished and out.request_id in ids and out.request_id not in results:
                        results[out.request_id] = out
                        if progress is not None:
                            progress.update(1)
                if not engine.has_unfinished_requests() and len(results) < n:
                    raise RuntimeError("the engine stopped with requests unanswered")  # pragma: no cover
        except BaseException:
            engine.abort_request([rid for rid in ids if rid not in results])
            raise
        finally:
            if progress is not None:
                progress.close()
        return [results[rid] for rid in ids]

    @staticmethod
    def _prompts(prompts) -> List[dict]:
        def one(p) -> dict:
            if isinstance(p, dict):
                return {k: p[k] for k in ("prompt", "prompt_token_ids") if k in p}
            return {"prompt": p}

        if isinstance(prompts, (str, dict)) or (isinstance(prompts, Sequence) and prompts
                                                and all(isinstance(t, int) for t in prompts)):
            return [one(prompts)]
        if not isinstance(prompts, Sequence) or isinstance(prompts, bytes):
            raise InvalidRequestError(f"`prompts` should be a string, token ids or a list of them, "
                                      f"but got {type(prompts).__name__}")
        return [one(p) for p in prompts]

    @staticmethod
    def _per_prompt(value, n: int, name: str) -> list:
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise InvalidRequestError(f"`{name}` should have one entry per prompt ({n}), but has {len(value)}")
            return list(value)
        return [value] * n


def _refused(request_id: str, prompt: dict, exc: MultiLoRAError) -> RequestOutput:
    text = prompt.get("prompt")
    ids = prompt.get("prompt_token_ids") or (text if isinstance(text, (list, tuple)) else [])
    return RequestOutput(
        request_id=request_id, prompt=text if isinstance(text, str) else None,
        prompt_token_ids=[t for t in ids if isinstance(t, int)],
        outputs=[CompletionOutput(index=0, text="", token_ids=[], finish_reason="error")],
        finished=True, error=exc, metrics=RequestMetrics(arrival_time=time.perf_counter()),
    )
