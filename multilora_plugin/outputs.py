"""What the engine takes and gives back: `LoRARequest`, request outputs, and the engine's numbers.

Names and fields follow vLLM (`LoRARequest`, `RequestOutput`, `CompletionOutput`), so hosts written
for it read these unchanged.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Union

from .errors import InvalidRequestError, MultiLoRAError
from .sampling import SamplingParams

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

    def token_at(self, now: float) -> None:
        """A token of the request arrived at `now` (time.perf_counter())."""
        if self.first_token_time is None:
            self.first_token_time = now
        else:
            self.inter_token_s.append(now - self.last_token_time)
        self.last_token_time = now


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
    # with SamplingParams(prompt_logprobs=k): per prompt token, {token id: log-probability given the
    # tokens before it}, the prompt's token first, then the top k; None for the first token
    prompt_logprobs: Optional[List[Optional[Dict[int, float]]]] = None


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
    adapter_swaps: int  # cache: an adapter pushed out of a slot for another (or evicted)
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



def refused(request_id: str, prompt: dict, exc: MultiLoRAError) -> RequestOutput:
    """The finished output of a request that could not be queued (`finish_reason="error"`)."""
    text = prompt.get("prompt")
    ids = prompt.get("prompt_token_ids") or (text if isinstance(text, (list, tuple)) else [])
    return RequestOutput(
        request_id=request_id, prompt=text if isinstance(text, str) else None,
        prompt_token_ids=[t for t in ids if isinstance(t, int)],
        outputs=[CompletionOutput(index=0, text="", token_ids=[], finish_reason="error")],
        finished=True, error=exc, metrics=RequestMetrics(arrival_time=time.perf_counter()),
    )
