"""The offline facade, as in vLLM: `LLM(model, tokenizer).generate(prompts, params, lora_request)`."""

from __future__ import annotations

import itertools
from typing import Any, List, Optional, Sequence

from .engine import Engine
from .errors import InvalidRequestError, MultiLoRAError
from .outputs import RequestOutput, refused


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
                results[rid] = refused(rid, prompt, exc)
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

