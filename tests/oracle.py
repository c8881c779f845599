"""A base model, PEFT adapter directories for it, and PEFT alone as the oracle: shared by the tests of
kinds of base (quantized) and kinds of adapter (MoE experts), whose base models are built differently."""

from __future__ import annotations

from typing import Callable

import torch

import multilora_plugin
from multilora_plugin import LLM, LoRARequest, SamplingParams


class Case:
    """`fresh()` builds the base model anew (a deep copy, or a quantized load); `paths`: {name: dir}."""

    def __init__(self, fresh: Callable, paths: dict) -> None:
        self.fresh, self.paths = fresh, paths
        self._peft: dict = {}

    def alone(self, name):
        """PEFT with adapter `name` alone (None: the base model), built once."""
        if name not in self._peft:
            from peft import PeftModel

            base = self.fresh().eval()
            self._peft[name] = base if name is None else PeftModel.from_pretrained(base, self.paths[name]).eval()
        return self._peft[name]

    def wrapped(self, max_loras: int = 4, **kwargs):
        model = multilora_plugin.wrap(self.fresh(), max_loras=max_loras, **kwargs)
        for name, path in self.paths.items():
            model.register_adapter(name, path)
        return model

    def logits(self, name, ids: torch.Tensor) -> torch.Tensor:
        model = self.alone(name)
        with torch.no_grad():
            return model(input_ids=ids.to(model.device)).logits.cpu()

    def greedy(self, name, prompt, new_tokens: int) -> list:
        ids = torch.tensor([list(prompt)])
        with torch.no_grad():
            out = self.alone(name).generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                            max_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None)
        return out[0, len(prompt):].tolist()

    # the checks every kind must pass ----------------------------------------------------------------
    def check_mixed_forward(self, rows: list, atol: float = 1e-4, **wrap_kwargs) -> None:
        """One forward, one adapter (or None) per row: each row equals PEFT alone on the same input."""
        ids = torch.randint(4, 120, (len(rows), 7), generator=torch.Generator().manual_seed(len(rows)))
        model = self.wrapped(max_loras=len({r for r in rows if r}), **wrap_kwargs)
        with torch.no_grad():
            got = model(input_ids=ids.to(model.device), adapter_names=rows).logits.float().cpu()
        for i, name in enumerate(rows):
            want = self.logits(name, ids)[i].float()
            base = self.logits(None, ids)[i].float()
            assert (got[i] - want).abs().max().item() <= atol, (i, name)
            if name is not None:
                assert (want - base).abs().max().item() > 10 * atol, f"adapter {name} should change the output"

    def check_peft_model(self, names: list, rows: list) -> None:
        """`wrap(peft_model)` of a PeftModel holding the adapters `names`: each row of a mixed forward
        equals PEFT alone with its adapter."""
        from peft import PeftModel

        first, *rest = names
        peft_model = PeftModel.from_pretrained(self.fresh(), self.paths[first], adapter_name=first)
        for name in rest:
            peft_model.load_adapter(self.paths[name], adapter_name=name)
        model = multilora_plugin.wrap(peft_model, max_loras=len(names))
        ids = torch.randint(4, 120, (len(rows), 6), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            got = model(input_ids=ids, adapter_names=rows).logits
        for i, name in enumerate(rows):
            assert (got[i] - self.logits(name, ids)[i]).abs().max().item() <= 1e-4, name

    def check_generate(self, rows: list, prompts: list, new_tokens: int = 5) -> None:
        """`generate` of a left-padded mixed batch gives each row PEFT's greedy tokens alone."""
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts])
        mask = (torch.arange(width) >= torch.tensor([width - len(p) for p in prompts]).unsqueeze(1)).long()
        model = self.wrapped(max_loras=len({r for r in rows if r}))
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=rows, max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)
        for i, (name, prompt) in enumerate(zip(rows, prompts)):
            assert out[i, width:].tolist() == self.greedy(name, prompt, new_tokens), (i, name)

    def check_generate_batch(self, names: list, prompts: list, max_loras: int, new_tokens: int = 5) -> None:
        """transformers' continuous batching (`generate_batch`, paged KV, packed rows) over more adapters
        than slots: every request equals PEFT alone."""
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        model = self.wrapped(max_loras=max_loras)
        config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        out = model.generate_batch(prompts, generation_config=config, adapter_names=names, progress_bar=False,
                                   continuous_batching_config=ContinuousBatchingConfig(
                                       num_blocks=32, max_batch_tokens=16, page_size=16))
        got = [r.generated_tokens for r in sorted(out.values(), key=lambda r: int(r.request_id.split("_")[-1]))]
        assert got == [self.greedy(n, p, new_tokens) for n, p in zip(names, prompts)]

    def check_http(self, names: list, prompt: str = "a story about the city", new_tokens: int = 6) -> None:
        """`multilora serve`'s app with fewer slots than adapters, through the TGI client: each
        adapter's greedy tokens equal PEFT alone (the tiny tokenizer of a 128-token vocabulary)."""
        from huggingface_hub import InferenceClient

        from multilora_plugin import toy
        from multilora_plugin.integrations.local import running_server
        from multilora_plugin.integrations.server import create_app

        tokenizer = toy.tiny_tokenizer(128)
        engine = multilora_plugin.Engine(self.wrapped(max_loras=2), tokenizer, load_entrypoints=False)
        with running_server(create_app(engine, served_model_name="tiny")) as url:
            client = InferenceClient(base_url=url)
            for name in names:
                out = client.text_generation(prompt, adapter_id=name, max_new_tokens=new_tokens, details=True)
                want = self.greedy(name, tokenizer.encode(prompt), new_tokens)
                want = want[: want.index(3) + 1] if 3 in want else want  # cut at </s>
                assert [t.id for t in out.details.tokens] == want, name
        engine.close()

    def check_llm(self, requests: list, max_loras: int, new_tokens: int = 5) -> None:
        """`LLM.generate` over more adapters than slots: every request equals PEFT alone."""
        llm = LLM(multilora_plugin.wrap(self.fresh(), max_loras=max_loras), load_entrypoints=False, max_num_seqs=4)
        lora = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(self.paths.items())}
        outs = llm.generate([{"prompt_token_ids": list(p)} for p, _ in requests],
                            SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True),
                            lora_request=[lora.get(name) for _, name in requests], use_tqdm=False)
        for (prompt, name), out in zip(requests, outs):
            assert out.outputs[0].token_ids == self.greedy(name, prompt, new_tokens), name
