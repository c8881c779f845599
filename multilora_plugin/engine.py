"""The continuous-batching engine: `Engine`, stepped by one thread.

Each `Engine.step()`:

    1. the Scheduler decides: requests to admit (prefill), to keep (decode), to preempt, to fail;
       the adapters of queued requests go to the cache for prefetch (disk → CPU, in the background)
    2. each admitted request holds its adapter's current content in a slot (`adapter_cache.acquire`)
       until it finishes, is preempted or aborted, so it runs on the same weights to the end, whatever
       is loaded, replaced or unloaded meanwhile; an adapter that cannot be read fails only its requests
    3. one decode forward for the running batch, one prefill forward for the admitted requests
       (prompt + tokens already produced, so a preempted request resumes where it stopped); each
       forward gets the `BatchMapping` built from the slots its rows hold (`lora_mapping=`): the model
       resolves no names and takes no holds of its own for engine steps
    4. each request samples its next token with its own parameters and seed, detokenizes it
       incrementally and checks EOS, stop tokens, stop strings and its length
    5. finished rows are filtered out of the batch and the prefilled ones concatenated in; rows stay in
       arrival order (the mapping, not the KV cache, groups tokens by slot for the kernels)

It returns one `RequestOutput` per request that moved: cumulative `text` / `token_ids` and the
`delta_text` / `delta_token_ids` since the last one (for streaming).

Plugins (docs/hooks.md) see every request as it arrives (and may route or reject it), resolve
adapter names nobody registered, provide adapter weights, and observe each scheduled batch, adapter
load and eviction, finished request and step.

The engine is driven by one thread (`step()`); `add_request` and `abort_request` may be called
from others.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import fields
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch

from . import intake
from .batch import Batch
from .detokenize import OutputText
from .errors import CapacityError, ConfigError, InvalidRequestError, MultiLoRAError
from .hooks import AdapterDirectory, AdapterRegistry, EngineStatistics, Plugins
from .mapping import BatchMapping
from .model import MultiLoRAModel
from .outputs import (
    CompletionOutput,
    EngineRequest,
    EngineStats,
    RequestMetrics,
    RequestOutput,
    StepStats,
)
from .sampling import SamplingParams, logprobs, sample
from .scheduler import Request, Scheduler, SchedulerConfig
from .sequence import EngineSequence


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
        self.num_slots = model.multilora_config.num_slots
        self.scheduler = Scheduler(SchedulerConfig(max_loras=self.num_slots, **engine_args),
                                   adapter_exists=self.cache.__contains__, residency=self.cache.residency)
        config = model.config
        self.max_model_len = max_model_len or getattr(config, "max_position_embeddings", None) \
            or getattr(config, "n_positions", None)
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ConfigError(f"`max_model_len` should be an int >= 2, but got {self.max_model_len!r}")
        self.vocab_size = getattr(config, "vocab_size", None)
        self.eos_token_ids = intake.eos_token_ids(model, tokenizer)
        self._device = model.device
        self._lock = threading.RLock()
        self._requests: Dict[str, EngineSequence] = {}  # unfinished, by id
        self._rows: List[EngineSequence] = []  # the running batch's rows, in order
        self._batch: Optional[Batch] = None
        self._row_mapping: Optional[BatchMapping] = None  # the slots of `_rows`, reused while they stay
        self._pending: List[RequestOutput] = []  # outputs of aborts, reported by the next step
        self._ended: Dict[str, EngineSequence] = {}  # requests that ended since the last step reported them
        self.plugins = Plugins(plugins, load_entrypoints=load_entrypoints)
        if adapter_dir is not None:
            self.plugins.register(AdapterDirectory(adapter_dir), name="adapter_dir")
        self.statistics = EngineStatistics()
        self.plugins.register(self.statistics, name="statistics")
        model.weights_provider = self.plugins.load_adapter_weights
        self.cache.listeners.append(self.plugins.adapter_event)
        self.plugins.notify("multilora_register_adapters", registry=AdapterRegistry(model))

    def close(self) -> None:
        """Detach from the model (its adapter events and weights provider); aborts what is left."""
        self.abort_request(self.unfinished_request_ids())
        if self.plugins.adapter_event in self.cache.listeners:
            self.cache.listeners.remove(self.plugins.adapter_event)
        if getattr(self.model, "weights_provider", None) == self.plugins.load_adapter_weights:
            self.model.weights_provider = None

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
        params = intake.sampling_params(sampling_params)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidRequestError(f"`priority` should be an int, but got {priority!r}")
        text, ids = intake.prompt_tokens(request_id, prompt, prompt_token_ids, self.tokenizer, self.vocab_size)
        intake.check_length(request_id, len(ids), params, self.max_model_len)
        if metadata is not None and not isinstance(metadata, Mapping):
            raise InvalidRequestError(f"`metadata` should be a mapping, but got {type(metadata).__name__}")
        lora = intake.lora_request(lora_request)
        info = EngineRequest(request_id=request_id, prompt=text, prompt_token_ids=ids, sampling_params=params,
                             adapter=None if lora is None else lora.lora_name, priority=priority,
                             metadata=dict(metadata or {}), lora_request=lora)
        self.plugins.request_received(info)
        with self._lock:
            if request_id in self._requests:
                raise InvalidRequestError(f"a request with id {request_id!r} is already queued or running")
            lora = intake.resolve_adapter(info, self.model, self.plugins.resolve_adapter)
            request = Request(request_id=request_id, adapter=None if lora is None else lora.lora_name,
                              num_prompt_tokens=len(ids), max_new_tokens=params.max_new_tokens,
                              priority=info.priority)
            seq = EngineSequence(request=request, info=info, lora_request=lora, generator=params.generator(self._device),
                            text=OutputText(self.tokenizer, ids, params.stop),
                            metrics=RequestMetrics(arrival_time=time.perf_counter()))
            self.scheduler.add(request)
            self._requests[request_id] = seq

    def abort_request(self, request_id: Union[str, Sequence[str]]) -> None:
        """Stop requests (waiting or running): their slot holds and KV rows are freed now, and the
        next `step()` reports them with finish_reason "abort". Unknown ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        with self._lock, torch.inference_mode():
            for rid in ids:
                seq = self._requests.get(rid)
                if seq is None:
                    continue
                if seq in self._rows:
                    self._remove_rows([seq])
                self._pending.append(self._finish(seq, "abort"))

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return bool(self._requests or self._pending)

    def unfinished_request_ids(self) -> List[str]:
        with self._lock:
            return list(self._requests)

    def get_num_unfinished_requests(self) -> int:
        with self._lock:
            return len(self._requests)

    # one step -------------------------------------------------------------------------------------
    def step(self) -> List[RequestOutput]:
        """Run one step; returns an output for every request that produced a token or ended."""
        with self._lock, torch.inference_mode():
            started = time.perf_counter()
            outputs, self._pending = self._pending, []
            plan = self.scheduler.schedule()
            self.plugins.notify("multilora_batch_scheduled", scheduler_output=plan)
            for request, exc in plan.failed:
                outputs.append(self._finish(self._requests[request.request_id], "error", exc))
            self._prefetch(plan.adapters_to_prefetch)
            preempted = [self._requests[r.request_id] for r in plan.preempted]
            if preempted:
                self._remove_rows(preempted)
                for seq in preempted:
                    self._let_go(seq)
                    seq.metrics.num_preemptions += 1
            admitted = self._hold([self._requests[r.request_id] for r in plan.prefill], outputs)
            logits, new, decoded = [], None, len(self._rows)
            if self._batch is not None:
                decode_logits = self._decode(outputs)
                if decode_logits is not None:
                    logits.append(decode_logits)
            if admitted:
                new, admitted, prefill_logits = self._prefill(admitted, outputs)
                new, admitted, prefill_logits = self._end_scored(new, admitted, prefill_logits, outputs)
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
                    reason = seq.finish_reason
                    outputs.append(self._output(seq) if reason is None else self._finish(seq, reason))
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

    def _hold(self, admitted: List[EngineSequence], outputs: List[RequestOutput]) -> List[EngineSequence]:
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
                    seq.hold = self.cache.acquire([seq.adapter])
                    held.append(seq)
                    continue
                except CapacityError:
                    self.scheduler.preempt(seq.request_id)
                    continue
                except MultiLoRAError as error:
                    exc = bad[seq.adapter] = error
            outputs.append(self._finish(seq, "error", exc))
        return held

    def _let_go(self, seq: EngineSequence) -> None:
        """Release the request's hold on its adapter's slot, if it has one."""
        hold, seq.hold = seq.hold, None
        if hold is not None:
            self.cache.release(hold)

    def _decode(self, outputs: List[RequestOutput]) -> Optional[torch.Tensor]:
        slots = tuple(s.slot for s in self._rows)
        if self._row_mapping is None or self._row_mapping.row_slots != slots:
            self._row_mapping = BatchMapping(slots, self.num_slots)
        try:
            return self._batch.decode(self.model, [s.output_ids[-1] for s in self._rows], self._row_mapping)
        except Exception as exc:  # noqa: BLE001 - no single row is to blame: the running rows fail, the engine goes on
            failed, self._rows, self._batch = self._rows, [], None
            for seq in failed:
                outputs.append(self._finish(seq, "error", exc))
            _raise_if_bug(exc)
            return None

    def _prefill(self, admitted: List[EngineSequence], outputs: List[RequestOutput]) -> tuple:
        """Prefill each request's `forward_ids`, in chunks within the prefill budget, scoring the prompts
        that ask for it on the way. If the batch fails, each request is tried alone and only those that
        fail alone are failed. Returns (batch, its requests, logits)."""
        mapping = BatchMapping(tuple(s.slot for s in admitted), self.num_slots)
        scored = [i for i, s in enumerate(admitted) if s.params.prompt_logprobs is not None and s.prompt_logprobs is None]
        found: Dict[int, list] = {i: [] for i in scored}

        def consume(row: int, first: int, row_logits: torch.Tensor) -> None:
            prompt = admitted[row].prompt_ids
            n = min(len(row_logits), len(prompt) - 1 - first)  # positions whose next token is in the prompt
            if n > 0:
                found[row] += logprobs(row_logits[:n], prompt[first + 1:first + 1 + n],
                                       [admitted[row].params.prompt_logprobs] * n)

        try:
            batch, logits = Batch.prefill(self.model, [s.forward_ids for s in admitted], mapping,
                                          max_tokens=self.scheduler.config.max_num_batched_tokens,
                                          every_position=scored, consume=consume)
            for i in scored:
                admitted[i].prompt_logprobs = found[i]
            return batch, admitted, logits
        except Exception as exc:  # noqa: BLE001 - find the culprit below
            if len(admitted) == 1:
                outputs.append(self._finish(admitted[0], "error", exc))
                _raise_if_bug(exc)
                return None, [], None
        parts = [self._prefill([seq], outputs) for seq in admitted]
        parts = [p for p in parts if p[0] is not None]
        if not parts:
            return None, [], None
        return (Batch.concatenate([p[0] for p in parts]), [p[1][0] for p in parts],
                torch.cat([p[2] for p in parts]))

    def _end_scored(self, batch: Optional[Batch], admitted: List[EngineSequence], logits, outputs) -> tuple:
        """Requests that only score their prompt end at their prefill; the others go on."""
        if batch is None or not any(s.scores_only for s in admitted):
            return batch, admitted, logits
        for seq in admitted:
            if seq.scores_only:
                outputs.append(self._finish(seq, "length"))
        stay = [i for i, s in enumerate(admitted) if not s.scores_only]
        if not stay:
            return None, [], None
        return batch.filter(stay), [admitted[i] for i in stay], logits[stay]

    @staticmethod
    def _logprobs(rows: List[EngineSequence], logits: torch.Tensor, tokens: List[int]) -> None:
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

    def _append(self, seq: EngineSequence, token: int, now: float) -> None:
        seq.output_ids.append(token)
        self.scheduler.record_tokens(seq.request_id, 1)
        seq.metrics.token_at(now)
        params = seq.params
        seq.text.add(token)
        if token in self.eos_token_ids and not params.ignore_eos:
            seq.finish_reason = "stop"
        elif token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif (stop := seq.text.cut_stop()) is not None:
            seq.finish_reason, seq.stop_reason = "stop", stop
        elif len(seq.output_ids) >= params.max_new_tokens:
            seq.finish_reason = "length"
        elif self.max_model_len is not None and seq.request.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"

    def _output(self, seq: EngineSequence) -> RequestOutput:
        """The request's output now, with what is new since the last one."""
        text, delta = seq.text.report(seq.finish_reason is not None)
        completion = CompletionOutput(
            index=0, text=text, token_ids=list(seq.output_ids), finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason, delta_text=delta, delta_token_ids=seq.output_ids[seq.sent_tokens:],
        )
        if seq.params.logprobs is not None:
            completion.logprobs = list(seq.logprobs or ())
            completion.cumulative_logprob = sum(entry[t] for entry, t in zip(completion.logprobs, seq.output_ids))
        seq.sent_tokens = len(seq.output_ids)
        scored = None if seq.prompt_logprobs is None else [None, *seq.prompt_logprobs]
        return RequestOutput(
            request_id=seq.request_id, prompt=seq.info.prompt, prompt_token_ids=list(seq.prompt_ids),
            outputs=[completion], finished=seq.finish_reason is not None, lora_request=seq.lora_request,
            metrics=seq.metrics, error=seq.error, prompt_logprobs=scored,
        )

    def _finish(self, seq: EngineSequence, reason: str, error: Optional[Exception] = None) -> RequestOutput:
        """End a request (done, aborted or failed): out of the scheduler, its hold released; returns
        its last output. Its KV rows are the caller's to drop."""
        seq.finish_reason, seq.error = reason, error
        self.scheduler.abort(seq.request_id)  # wherever it is; a no-op for one the scheduler dropped
        self._let_go(seq)
        self._requests.pop(seq.request_id, None)
        seq.metrics.finished_time = time.perf_counter()
        self._ended[seq.request_id] = seq
        return self._output(seq)

    # the running batch ----------------------------------------------------------------------------
    def _remove_rows(self, gone: Sequence[EngineSequence]) -> None:
        keep = [i for i, s in enumerate(self._rows) if s not in gone]
        self._batch = self._batch.filter(keep) if self._batch is not None else None
        self._rows = [self._rows[i] for i in keep]

    def _rebatch(self, new: Optional[Batch], admitted: List[EngineSequence]) -> None:
        """Drop finished rows and add the prefilled ones that go on."""
        keep = [i for i, s in enumerate(self._rows) if s.finish_reason is None]
        batch = self._batch.filter(keep) if self._batch is not None and len(keep) < len(self._rows) else self._batch
        rows = [self._rows[i] for i in keep]
        if new is not None:
            stay = [i for i, s in enumerate(admitted) if s.finish_reason is None]
            new = new.filter(stay) if len(stay) < len(admitted) else new
            batch = Batch.concatenate([batch, new]) if batch is not None else new
            rows += [admitted[i] for i in stay]
        self._batch, self._rows = batch, rows

    # stats ----------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        with self._lock:
            sched = self.scheduler.stats()
            cache = self.cache.stats()
            return EngineStats(
                steps=sched.steps, running=sched.running, waiting=sched.waiting,
                active_adapters=sched.active_adapters, slot_contents=self.cache.contents(),
                adapter_swaps=cache.gpu_evictions, slot_swaps=cache.slot_swaps, preemptions=sched.preemptions,
                gpu_hits=cache.gpu_hits, gpu_misses=cache.gpu_misses, cpu_hits=cache.cpu_hits,
                cpu_misses=cache.cpu_misses, **self.statistics.snapshot(),
            )


def _raise_if_bug(exc: Exception) -> None:
    """Errors of the engine's own making are not swallowed by the per-request isolation."""
    if isinstance(exc, (AssertionError, NameError, AttributeError, UnboundLocalError)):
        raise exc
