"""A request inside the engine (`EngineSequence`): what the scheduler knows of it, the request as
plugins left it, and what generating it needs; the engine is its only owner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import torch

from .adapters import Hold
from .detokenize import OutputText
from .outputs import EngineRequest, LoRARequest, RequestMetrics
from .sampling import SamplingParams
from .scheduler import Request


@dataclass(eq=False)
class EngineSequence:
    """A request inside the engine: the scheduler's view of it, the request as plugins left it
    (`info`), and what generating it needs."""

    request: Request  # what the scheduler knows of it
    info: EngineRequest
    lora_request: Optional[LoRARequest]  # the adapter it runs with, as resolved
    generator: Optional[torch.Generator]
    text: OutputText
    metrics: RequestMetrics
    output_ids: List[int] = field(default_factory=list)
    logprobs: Optional[List[Dict[int, float]]] = None  # per output token, with SamplingParams(logprobs=k)
    prompt_logprobs: Optional[List[Dict[int, float]]] = None  # per prompt token after the first, once scored
    sent_tokens: int = 0  # tokens already reported
    hold: Optional[Hold] = None  # its adapter's content in a slot, while it holds one
    finish_reason: Optional[str] = None
    stop_reason: Union[str, int, None] = None
    error: Optional[Exception] = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def adapter(self) -> Optional[str]:
        return self.request.adapter

    @property
    def slot(self) -> int:
        """The slot its adapter's content is held in; -1 for the base model."""
        return -1 if self.hold is None else self.hold.slots[self.request.adapter]

    @property
    def prompt_ids(self) -> List[int]:
        return self.info.prompt_token_ids

    @property
    def params(self) -> SamplingParams:
        return self.info.sampling_params

    @property
    def scores_only(self) -> bool:
        """It generates nothing (max_new_tokens=0): its last prompt token is only a target."""
        return self.params.max_new_tokens == 0

    @property
    def forward_ids(self) -> List[int]:
        """What its prefill runs: prompt + tokens so far (a preempted request resumes where it stopped)."""
        return self.prompt_ids[:-1] if self.scores_only else self.prompt_ids + self.output_ids
