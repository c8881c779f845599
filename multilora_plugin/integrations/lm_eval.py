"""lm-evaluation-harness on the engine: the model backend `"multilora"` and `evaluate_adapters`, which
evaluates many adapters in one run with their requests mixed in the engine's batches.

`MultiLoRALM` is lm-eval's own `hf` backend (`HFLM`: its model loading, tokenization, context /
continuation split, rolling windows, stop strings and max-gen-tokens rules) whose three request kinds
run through a multilora_plugin engine instead of `model(...)` / `model.generate(...)`:

    loglikelihood            (context + continuation)[-(max_length + 1):] scored with
                             `prompt_logprobs` and `max_new_tokens=0`: the continuation's summed
                             log-probability, and whether each of its tokens is the most likely
    loglikelihood_rolling    lm-eval's disjoint rolling windows, scored the same way, summed per document
    generate_until           greedy (or sampled) up to `max_gen_toks`, stopped by the `until` strings,
                             decoded and cut as `hf` cuts it

`evaluate_adapters` runs lm-eval's `simple_evaluate` once per adapter on one engine (`SharedRuns`):
the first evaluation that asks for a kind of request computes it for every adapter still to come, in
one pass, so requests of different adapters share batches; the later evaluations read their answers.
An adapter whose requests turn out different (none do for the same tasks) gets the missing ones then.

Importing this module registers the backend: `lm_eval.simple_evaluate(model="multilora",
model_args="pretrained=BASE,adapter=PATH,max_loras=4")`, or `multilora eval` on the command line.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from dataclasses import fields
from typing import Any, Callable, Dict, List, Optional, Sequence

from lm_eval import utils as lm_utils
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from ..errors import ConfigError, InvalidRequestError
from ..llm import LLM
from ..sampling import SamplingParams
from ..scheduler import SchedulerConfig

_WRAP_ARGS = ("lora_memory", "max_loras", "max_lora_rank", "max_cpu_loras", "target_modules", "backend", "modules_to_save")
_ENGINE_ARGS = tuple(f.name for f in fields(SchedulerConfig) if f.name != "max_loras") + ("max_model_len",)


class SharedRuns:
    """One engine for the evaluations of several adapters (names registered on its model; None is the
    base model). `run(adapter, jobs)` answers `adapter`'s jobs, computing each missing job for every
    adapter in `waiting` too, all in one pass; `done(adapter)` forgets what it kept for `adapter`."""

    def __init__(self, llm: LLM, *, progress: bool = True) -> None:
        self.llm = llm
        self.progress = progress
        self.waiting: List[Optional[str]] = []  # adapters whose evaluations are still to come
        self._answers: Dict[tuple, Any] = {}  # (adapter, job key) → answer

    def run(self, adapter: Optional[str], jobs: Sequence[tuple], answer: Callable, desc: str) -> list:
        """`jobs`: (key, prompt ids, SamplingParams); `answer(job, output)` makes the answer kept."""
        todo, seen = [], set()
        for name in [adapter] + [a for a in self.waiting if a != adapter]:
            for job in jobs:
                if (name, job[0]) not in self._answers and (name, job[0]) not in seen:
                    seen.add((name, job[0]))
                    todo.append((name, job))
        if todo:
            todo.sort(key=lambda item: -len(item[1][1]))  # rows of one prefill of alike lengths pad little
            if self.progress:
                print(f"multilora: {desc}: {len(todo)} requests for {len({n for n, _ in todo})} adapter(s)",
                      file=sys.stderr)
            outputs = self.llm.generate([{"prompt_token_ids": job[1]} for _, job in todo], [job[2] for _, job in todo],
                                        [name for name, _ in todo], use_tqdm=self.progress)
            for (name, job), out in zip(todo, outputs):
                if out.error is not None:
                    raise InvalidRequestError(f"adapter {name!r}: an lm-eval request failed: {out.error}") from out.error
                self._answers[(name, job[0])] = answer(job, out)
        return [self._answers[(adapter, job[0])] for job in jobs]

    def done(self, adapter: Optional[str]) -> None:
        self.waiting = [a for a in self.waiting if a != adapter]
        for key in [k for k in self._answers if k[0] == adapter]:
            del self._answers[key]


def _score(job: tuple, out) -> tuple:
    """(log-probability of the last `n` prompt tokens, whether each is its position's most likely)."""
    n = job[3]
    entries = out.prompt_logprobs[-n:]
    tokens = job[1][-n:]
    total = sum(entry[t] for entry, t in zip(entries, tokens))
    return total, all(entry[t] >= max(entry.values()) for entry, t in zip(entries, tokens))


@register_model("multilora")
class MultiLoRALM(HFLM):
    """lm-eval's `hf` backend on a multilora_plugin engine. `model_args`: `pretrained=` (as for `hf`),
    `adapter=PATH` (one PEFT adapter; none: the base model), `wrap(...)`'s `max_loras`, ... and the
    engine's arguments (`max_num_seqs`, `max_num_batched_tokens`, ...); the rest are `hf`'s own
    (`dtype`, `device`, `max_length`, `add_bos_token`, ...). `batch_size` sets `max_num_seqs` unless
    that is given."""

    def __init__(self, pretrained, adapter: Optional[str] = None, *, device: Optional[str] = None,
                 batch_size="auto", **kwargs: Any) -> None:
        import torch

        from ..wrapping import wrap

        if "peft" in kwargs:
            raise ConfigError("the multilora backend takes `adapter=PATH`, not `peft=`: it serves the adapter "
                              "itself, on an unchanged base model")
        wrap_args = {k: kwargs.pop(k) for k in _WRAP_ARGS if k in kwargs}
        engine_args = {k: kwargs.pop(k) for k in _ENGINE_ARGS if k in kwargs}
        if isinstance(batch_size, int) or str(batch_size).isdigit():
            engine_args.setdefault("max_num_seqs", int(batch_size))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        super().__init__(pretrained=pretrained, device=device, batch_size=1, **kwargs)
        if adapter is not None:
            wrap_args.setdefault("max_loras", 1)
        model = wrap(self._model, **wrap_args)
        self.runs = SharedRuns(LLM(model, self.tokenizer, load_entrypoints=False, **engine_args))
        self.adapter: Optional[str] = None
        if adapter is not None:
            self.adapter = os.path.basename(os.path.normpath(adapter)) or "adapter"
            model.register_adapter(self.adapter, adapter)

    def for_adapter(self, name: Optional[str]) -> "MultiLoRALM":
        """The same backend (model, engine, tokenizer) evaluating adapter `name` (registered on the
        model; None: the base model)."""
        other = copy.copy(self)
        other.adapter = name
        return other

    @property
    def engine_model(self):
        return self.runs.llm.engine.model

    # lm-eval's request kinds ------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None) -> list:
        params = SamplingParams(max_new_tokens=0, prompt_logprobs=1)
        jobs = []
        for _, context, continuation in requests:
            window = (context + continuation)[-(self.max_length + 1):]
            jobs.append((("score", tuple(window), len(continuation)), window, params, len(continuation)))
        answers = self.runs.run(self.adapter, jobs, _score, "loglikelihood")
        for (key, _, _), answer in zip(requests, answers):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for window in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None,) + window)
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        jobs = []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if self.max_length - max_gen_toks <= 0:
                raise ConfigError(f"lm-eval asks for {max_gen_toks} new tokens, which leaves no room for the "
                                  f"context in the model's {self.max_length} positions")
            ids, _ = self.tok_batch_encode([context], left_truncate_len=self.max_length - max_gen_toks,
                                           truncation=self.truncation)
            ids = ids[0].tolist()
            params = SamplingParams(max_new_tokens=max_gen_toks, stop=[s for s in until if s], ignore_eos=False,
                                    **_sampling(kwargs))
            key = ("generate", context, repr(sorted(gen_kwargs.items())))
            jobs.append((key, ids, params, until))
        answers = self.runs.run(self.adapter, jobs, self._generated, "generate_until")
        for req, text in zip(requests, answers):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return answers

    def _generated(self, job: tuple, out) -> str:
        """The text as `hf` makes it: the generated tokens decoded, thinking and stop strings cut."""
        tokens = out.outputs[0].token_ids
        if isinstance(self.think_end_token, int) and self.think_end_token in tokens:
            tokens = tokens[len(tokens) - tokens[::-1].index(self.think_end_token):]
        text = self.tok_decode(tokens)
        if isinstance(self.think_end_token, int):
            text = text.lstrip()
        think = self.think_end_token if isinstance(self.think_end_token, str) else None
        return postprocess_generated_text(generation=text, stop=job[3], think_end_token=think)

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["adapter"] = self.adapter
        return info


def _sampling(kwargs: dict) -> dict:
    """SamplingParams fields for what lm-eval asks of `generate` (greedy unless do_sample)."""
    if not kwargs.pop("do_sample", False) or not kwargs.get("temperature", 1.0):
        return {"temperature": 0}
    return {k: kwargs[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty", "seed") if k in kwargs}


def evaluate_adapters(pretrained, adapters: Dict[str, Optional[str]], tasks: Sequence, task_manager=None, *,
                      model_args: Optional[dict] = None, progress: bool = True,
                      **simple_evaluate_kwargs: Any) -> Dict[str, Optional[dict]]:
    """Evaluate every adapter of `adapters` ({name: PEFT adapter path, or None for the base model}) on
    `tasks` through one engine; returns {name: lm-eval's results dict} (`samples` too with
    `log_samples`). `model_args`: `MultiLoRALM`'s (`max_loras`, `max_num_seqs`, `dtype`, ...); the
    rest go to `lm_eval.simple_evaluate` (`limit`, `num_fewshot`, `log_samples`, ...) for every adapter."""
    from lm_eval import simple_evaluate

    if not adapters:
        raise ConfigError("`adapters` should name at least one adapter ({name: path or None})")
    args = dict(model_args or {})
    args.setdefault("max_loras", max(1, min(8, sum(p is not None for p in adapters.values()))))
    lm = MultiLoRALM(pretrained=pretrained, **args)
    lm.runs.progress = progress
    served = {}
    for name, path in adapters.items():
        if path is not None:
            lm.engine_model.register_adapter(name, os.fspath(path))
        served[name] = None if path is None else name
    lm.runs.waiting = list(served.values())
    results = {}
    with _environment_once():
        for name, adapter in served.items():
            results[name] = simple_evaluate(model=lm.for_adapter(adapter), tasks=list(tasks),
                                            task_manager=task_manager, **simple_evaluate_kwargs)
            lm.runs.done(adapter)
    return results


@contextlib.contextmanager
def _environment_once():
    """lm-eval records the environment in every results dict (torch's collect_env runs pip and more:
    about half a second); in one run it is the same for every adapter, so it is collected once."""
    import lm_eval.evaluator as evaluator

    original = getattr(evaluator, "add_env_info", None)
    if original is None:  # another lm-eval layout: each evaluation collects its own
        yield
        return
    collected: dict = {}

    def once(storage: dict) -> None:
        if not collected:
            original(collected)
        storage.update(copy.deepcopy(collected))

    evaluator.add_env_info = once
    try:
        yield
    finally:
        evaluator.add_env_info = original


def results_table(results: Dict[str, Optional[dict]]) -> str:
    """One markdown table: a row per adapter, a column per task metric (lm-eval's stderr columns left out)."""
    columns: List[tuple] = []
    for res in results.values():
        for task, metrics in (res or {}).get("results", {}).items():
            for metric, value in metrics.items():
                if isinstance(value, (int, float)) and "stderr" not in metric and metric != "sample_len" \
                        and (task, metric) not in columns:
                    columns.append((task, metric))
    head = ["adapter"] + [f"{task} {metric.replace(',none', '')}" for task, metric in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, res in results.items():
        values = (res or {}).get("results", {})
        cells = [name] + [_cell(values.get(task, {}).get(metric)) for task, metric in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def write_results(results: Dict[str, Optional[dict]], out: "str | os.PathLike") -> List[str]:
    """lm-eval's results of each adapter as JSON under `out`/NAME/: results.json, and
    samples_TASK.jsonl per task when the results hold samples. Returns the files written."""
    import json

    written = []
    for name, res in results.items():
        folder = os.path.join(os.fspath(out), name)
        os.makedirs(folder, exist_ok=True)
        res = dict(res or {})
        samples = res.pop("samples", None) or {}
        path = os.path.join(folder, "results.json")
        with open(path, "w") as f:
            json.dump(res, f, indent=2, default=lm_utils.handle_non_serializable)
        written.append(path)
        for task, rows in samples.items():
            path = os.path.join(folder, f"samples_{task}.jsonl")
            with open(path, "w") as f:
                f.writelines(json.dumps(row, default=lm_utils.handle_non_serializable) + "\n" for row in rows)
            written.append(path)
    return written
