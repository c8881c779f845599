"""The HTTP server's routes over transformers' continuous batching (`multilora serve --engine transformers`).

    backend = TransformersBackend(wrap(hf_model, max_loras=4), tokenizer)
    app = create_app(backend)          # the same routes, bodies and errors as over this package's Engine

Requests go to a `LoRABatchingManager` (`transformers_cb`) as streaming requests with
their adapter; its outputs (cumulative token ids, one per step) arrive on the event loop through
transformers' result handlers and become this package's `RequestOutput`s: incremental text, stop
strings and stop tokens (cut here; the request is then cancelled in transformers), finish reasons,
the chosen tokens' log-probabilities, and the timings the metrics observe.

transformers' continuous batching decodes every request with one generation config, so this backend
serves greedy decoding: a request that asks for sampling (`temperature` > 0), a repetition penalty
or more than the chosen token's log-probability gets a 400 that says so. Use the default engine for
those.
"""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any, Dict, List, Optional

from prometheus_client import CollectorRegistry, generate_latest
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.requests import RequestStatus

from ..async_engine import RequestStream, open_stream
from ..detokenize import OutputText
from ..errors import ConfigError, InvalidRequestError, MultiLoRAError, OverloadedError
from ..intake import eos_token_ids
from ..model import MultiLoRAModel
from ..outputs import CompletionOutput, EngineRequest, RequestMetrics, RequestOutput
from ..sampling import SamplingParams
from .metrics import MetricSpec, RequestSeries, Sample, SampleCollector, adapter_cache_samples
from .protocol import describe_model, model_name


class TransformersBackend:
    """A backend of the HTTP server (see `integrations.server`) whose requests run in transformers'
    continuous batching on a wrapped model. `continuous_batching_config`: transformers' (the paged
    cache and the batches); without one, a cache for `max_num_seqs` requests of `max_model_len`
    tokens (default: the model's positions) in 16-token pages, and `max_batch_tokens` per forward."""

    def __init__(self, model, tokenizer, *, continuous_batching_config: Optional[ContinuousBatchingConfig] = None,
                 max_concurrent_requests: int = 256, max_model_len: Optional[int] = None,
                 max_num_seqs: int = 64, max_batch_tokens: int = 512) -> None:
        if not isinstance(model, MultiLoRAModel):
            raise ConfigError(f"expected a model returned by multilora_plugin.wrap(...), but got {type(model).__name__}")
        self.model, self.tokenizer = model, tokenizer
        config = model.config
        self.max_model_len = max_model_len or getattr(config, "max_position_embeddings", None) \
            or getattr(config, "n_positions", None)
        self.max_concurrent_requests = max_concurrent_requests
        self.default_model_name = model_name(model)
        self._description = describe_model(model)
        self._eos = sorted(eos_token_ids(model, tokenizer))
        if continuous_batching_config is not None:
            cb_config = copy.deepcopy(continuous_batching_config)
        else:  # sized for max_num_seqs requests of max_model_len tokens (transformers' own default takes 60% of memory)
            page = 16
            cb_config = ContinuousBatchingConfig(
                page_size=page, max_batch_tokens=max_batch_tokens, max_requests_per_batch=max_num_seqs,
                num_blocks=max_num_seqs * -(-(self.max_model_len or 2048) // page))
        cb_config.return_logprobs = True  # TGI details and streams report each token's log-probability
        generation = GenerationConfig(do_sample=False, eos_token_id=self._eos or None,
                                      pad_token_id=getattr(config, "pad_token_id", None))
        self.manager = model.init_continuous_batching(generation_config=generation,
                                                      continuous_batching_config=cb_config)
        self._streams: Dict[str, RequestStream] = {}
        self._requests: Dict[str, _Request] = {}
        self.registry = CollectorRegistry()
        self.requests = RequestSeries(self.registry)
        self.registry.register(SampleCollector(self._samples))

    # the backend's interface (integrations.backend) ------------------------------------------------
    metrics_elsewhere = None

    async def start(self) -> None:
        self.manager.start()

    async def stop(self) -> None:
        for stream in list(self._streams.values()):
            stream.put(OverloadedError("the server is shutting down"))
        self._streams.clear()
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Stop transformers' generation thread and release the manager; idempotent."""
        if self.manager.is_running():
            self.manager.stop(block=True, timeout=30)
        self.manager.destroy()

    async def unhealthy(self) -> Optional[str]:
        return None if self.manager.is_running() else "transformers' continuous-batching thread is not running"

    def adapters(self) -> Dict[str, str]:
        return self.model.adapter_cache.paths()

    def describe(self) -> dict:
        return dict(self._description)

    async def load_adapter(self, name: str, path: str, replace: bool = False) -> None:
        await asyncio.to_thread(self.model.load_adapter, name, path, replace=replace)

    async def unload_adapter(self, name: str) -> None:
        await asyncio.to_thread(self.model.unload_adapter, name)

    async def render_metrics(self) -> bytes:
        return generate_latest(self.registry)

    async def submit(self, request_id: str, text: Optional[str], ids: List[int], params: SamplingParams,
                     adapter: Optional[str], metadata: Dict[str, Any], stream: bool = True) -> RequestStream:
        self.manager.session.check_adapter(adapter)  # an unknown adapter is a 404 before anything else
        _check_greedy(params)
        if not ids:
            raise InvalidRequestError(f"request {request_id!r}: the prompt should have at least one token")
        if self.max_model_len is not None and len(ids) + params.max_new_tokens > self.max_model_len:
            raise InvalidRequestError(f"request {request_id!r}: prompt ({len(ids)} tokens) + max_new_tokens "
                                      f"({params.max_new_tokens}) should fit the model's {self.max_model_len} positions")
        handle = open_stream(self._streams, request_id, self, self.max_concurrent_requests)
        self._requests[request_id] = _Request(request_id, text, ids, params, adapter, self.tokenizer)
        eos = [] if params.ignore_eos else self._eos + [t for t in params.stop_token_ids if t not in self._eos]
        try:
            self.manager.register_result_handler(request_id, self._on_result)
            added = self.manager.add_request(ids, request_id=request_id, max_new_tokens=params.max_new_tokens,
                                             streaming=True, eos_token_id=eos or -1, adapter_name=adapter)
            if added is None:
                raise OverloadedError("transformers' continuous batching is not accepting requests now")
        except BaseException:
            self._drop(request_id)
            raise
        return handle

    def abort(self, request_id: str) -> None:
        """A stream whose reader left: cancel the request in transformers (which reports nothing for
        it) and end the stream here."""
        request = self._requests.get(request_id)
        if request is None:
            return
        self.manager.cancel_request(request_id)
        self._end(request, request.output(finish_reason="abort"))

    # results ------------------------------------------------------------------------------------------
    def _on_result(self, result) -> None:
        """One output of transformers for a request (on the event loop): its new tokens."""
        request = self._requests.get(result.request_id)
        if request is None:
            return
        if result.status == RequestStatus.FAILED:
            error = self.manager.session.errors.pop(result.request_id, None)
            error = error if error is not None else _Failed(f"request {result.request_id} failed: {result.error}")
            self._end(request, request.output(finish_reason="error", error=error))
            return
        output = request.advance(result.generated_tokens, result.logprobs, result.is_finished())
        if output is None:
            return
        if output.finished:
            if not result.is_finished():  # ended here (a stop string or token): transformers stops it too
                self.manager.cancel_request(result.request_id)
            self._end(request, output)
        else:
            self._streams[result.request_id].put(output)

    def _end(self, request: "_Request", output: RequestOutput) -> None:
        stream = self._streams.get(request.request_id)
        if stream is not None:
            stream.put(output)
        self.requests.observe(request.info, output)
        self._drop(request.request_id)

    def _drop(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._requests.pop(request_id, None)
        with self.manager.output_router._lock:  # a cancelled request's handler is never cleaned up by transformers
            self.manager.output_router.result_handlers.pop(request_id, None)

    def _samples(self):
        yield Sample(MetricSpec("gauge", "multilora_requests_in_flight", "Requests the server holds (queued or "
                                "running)."), (((), len(self._streams)),))
        yield from adapter_cache_samples(self.model)


class _Request:
    """One request's progress: its text (detokenized as tokens come, stop strings cut), the tokens
    and log-probabilities already reported, and its timings."""

    def __init__(self, request_id: str, text: Optional[str], ids: List[int], params: SamplingParams,
                 adapter: Optional[str], tokenizer) -> None:
        self.request_id, self.prompt, self.prompt_ids, self.params = request_id, text, list(ids), params
        self.info = EngineRequest(request_id=request_id, prompt=text, prompt_token_ids=self.prompt_ids,
                                  sampling_params=params, adapter=adapter)
        self.text = OutputText(tokenizer, ids, params.stop)
        self.token_ids: List[int] = []
        self.logprobs: List[Dict[int, float]] = []
        self.sent = 0
        self.finish_reason: Optional[str] = None
        self.stop_reason = None
        self.metrics = RequestMetrics(arrival_time=time.perf_counter())

    def advance(self, generated: List[int], logprobs: Optional[List[float]], done: bool) -> Optional[RequestOutput]:
        """Take the tokens transformers generated since the last output; None when none is new."""
        now = time.perf_counter()
        new = generated[len(self.token_ids):]
        for i, token in enumerate(new, start=len(self.token_ids)):
            self.token_ids.append(token)
            if logprobs and i < len(logprobs):
                self.logprobs.append({token: float(logprobs[i])})
            self.metrics.token_at(now)
            self.text.add(token)
            if token in self.params.stop_token_ids:
                self.finish_reason, self.stop_reason = "stop", token
            elif (stop := self.text.cut_stop()) is not None:
                self.finish_reason, self.stop_reason = "stop", stop
            if self.finish_reason is not None:
                break
        if self.finish_reason is None and done:
            self.finish_reason = "length" if len(self.token_ids) >= self.params.max_new_tokens else "stop"
        if not new and self.finish_reason is None:
            return None
        return self.output(self.finish_reason)

    def output(self, finish_reason: Optional[str], error: Optional[Exception] = None) -> RequestOutput:
        finished = finish_reason is not None
        text, delta = self.text.report(finished)
        completion = CompletionOutput(index=0, text=text, token_ids=list(self.token_ids),
                                      finish_reason=finish_reason, stop_reason=self.stop_reason, delta_text=delta,
                                      delta_token_ids=self.token_ids[self.sent:])
        if self.params.logprobs is not None:
            completion.logprobs = list(self.logprobs)
            completion.cumulative_logprob = sum(next(iter(e.values())) for e in self.logprobs)
        self.sent = len(self.token_ids)
        if finished:
            self.metrics.finished_time = time.perf_counter()
        return RequestOutput(request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_ids,
                             outputs=[completion], finished=finished, metrics=self.metrics, error=error)


class _Failed(MultiLoRAError, RuntimeError):
    """transformers failed a request and said why only in words (HTTP 500)."""


def _check_greedy(params: SamplingParams) -> None:
    asked = [name for name, on in (("sampling (temperature > 0)", params.temperature > 0),
                                   ("repetition_penalty", params.repetition_penalty != 1.0),
                                   ("alternative tokens' log-probabilities", (params.logprobs or 0) > 0),
                                   ("the prompt's log-probabilities (echo with logprobs)", params.prompt_logprobs is not None),
                                   ("no new token (max_tokens 0)", params.max_new_tokens == 0))
             if on]
    if asked:
        raise InvalidRequestError(f"the transformers engine serves greedy decoding only (its continuous batching "
                                  f"decodes every request with one generation config), but this request asks for "
                                  f"{', '.join(asked)}; send temperature 0, or serve with the default engine")
