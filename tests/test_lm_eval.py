"""lm-evaluation-harness on the engine, against lm-eval's own `hf` backend with `peft=PATH` per
adapter: local json tasks of the three request kinds (multiple_choice, generate_until,
loglikelihood_rolling), three adapters and the base model, every metric and every per-sample answer."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from multilora_plugin import toy  # noqa: E402
from multilora_plugin.errors import ConfigError  # noqa: E402
from multilora_plugin.integrations.lm_eval import MultiLoRALM, evaluate_adapters  # noqa: E402

TASKS = ["toy_choice", "toy_generate", "toy_rolling"]
ADAPTERS = ("a", "b", "c")
# max_length=16 makes the rolling documents (20-60 words) span several windows
COMMON = dict(device="cpu", dtype="float32", max_length=16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    base = toy.tiny_model("llama")
    base.save_pretrained(root / "base")
    toy.tiny_tokenizer().save_pretrained(root / "base")
    paths = {name: toy.make_adapter(base, root / name, r=4, seed=i + 1) for i, name in enumerate(ADAPTERS)}
    return str(root / "base"), paths, TaskManager(include_path=toy.make_eval_tasks(root / "tasks"))


@pytest.fixture(scope="module")
def oracle(setup):
    """lm-eval's `hf` backend, one run per adapter (PEFT's model with that adapter alone)."""
    base, paths, tasks = setup
    runs = {}
    for name in (*ADAPTERS, None):
        args = f"pretrained={base},device=cpu,dtype=float32,max_length=16" + (f",peft={paths[name]}" if name else "")
        runs[name] = simple_evaluate(model="hf", model_args=args, tasks=TASKS, task_manager=tasks, log_samples=True)
    return runs


def check_same(got: dict, want: dict) -> None:
    """Every metric equal (perplexities to float rounding), every sample's answer the same: log-likelihoods
    within 2e-3, greedy flags and generated texts identical."""
    for task in TASKS:
        for metric, value in want["results"][task].items():
            other = got["results"][task][metric]
            if isinstance(value, float) and ("perplexity" in metric or "bits_per_byte" in metric):
                assert other == pytest.approx(value, rel=1e-5), (task, metric)
            else:
                assert other == value, (task, metric)
        samples, expected = got["samples"][task], want["samples"][task]
        assert [s["doc_id"] for s in samples] == [s["doc_id"] for s in expected]
        for s, e in zip(samples, expected):
            for mine, theirs in zip(s["resps"], e["resps"]):
                if task == "toy_generate":
                    assert mine == theirs, (task, s["doc_id"])
                elif task == "toy_rolling":
                    assert mine[0] == pytest.approx(theirs[0], abs=2e-3)
                else:
                    (lp, greedy), (lp_hf, greedy_hf) = mine[0], theirs[0]
                    assert lp == pytest.approx(lp_hf, abs=2e-3) and greedy == greedy_hf


def test_the_oracle_tasks_are_not_trivial(oracle):
    """The adapters change the answers, the generations stop at the `until` strings, and the rolling
    documents span several windows: otherwise the equalities below would prove little."""
    a, base = oracle["a"], oracle[None]
    assert a["results"]["toy_rolling"]["word_perplexity,none"] != base["results"]["toy_rolling"]["word_perplexity,none"]
    texts = [s["resps"][0][0] for s in a["samples"]["toy_generate"]]
    assert texts != [s["resps"][0][0] for s in base["samples"]["toy_generate"]]
    assert any(t.strip() and len(t.split()) < 8 for t in texts)  # cut by a stop string before max_gen_toks


def test_evaluate_adapters_equals_hf_with_peft_per_adapter(setup, oracle, monkeypatch):
    """Three adapters and the base model through one engine with two slots: each result is lm-eval's
    own `hf` + `peft` result for that adapter; each kind of request runs once, for all of them."""
    from multilora_plugin.llm import LLM

    base, paths, tasks = setup
    calls = []
    real = LLM.generate

    def counting(self, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(self, prompts, *args, **kwargs)

    monkeypatch.setattr(LLM, "generate", counting)
    adapters = {"a": paths["a"], "b": paths["b"], "base": None, "c": paths["c"]}
    results = evaluate_adapters(base, adapters, TASKS, tasks, model_args=dict(max_loras=2, batch_size=6, **COMMON),
                                log_samples=True, progress=False)
    assert list(results) == list(adapters)
    for name in adapters:
        check_same(results[name], oracle[None if name == "base" else name])
    assert len(calls) == 3, calls  # loglikelihood, generate_until, rolling: each once, for the four adapters


def test_the_multilora_backend_through_simple_evaluate(setup, oracle):
    """`simple_evaluate(model="multilora", model_args="pretrained=...,adapter=PATH")`, as lm-eval's CLI
    would build it, equals `hf` with `peft=PATH`."""
    base, paths, tasks = setup
    got = simple_evaluate(model="multilora", model_args=f"pretrained={base},adapter={paths['b']},device=cpu,"
                          "dtype=float32,max_length=16,max_num_batched_tokens=64", tasks=TASKS, task_manager=tasks,
                          log_samples=True)
    check_same(got, oracle["b"])
    assert got["config"]["model"] == "multilora"


def test_bad_arguments_are_refused_with_what_to_do(setup):
    base, paths, _ = setup
    with pytest.raises(ConfigError, match="takes `adapter=PATH`, not `peft=`"):
        MultiLoRALM(pretrained=base, peft=paths["a"], **COMMON)
    with pytest.raises(ConfigError, match="at least one adapter"):
        evaluate_adapters(base, {}, TASKS)
    with pytest.raises(Exception, match="no-such-adapter"):
        MultiLoRALM(pretrained=base, adapter=os.path.join(os.path.dirname(base), "no-such-adapter"), **COMMON)


def test_multilora_eval_prints_one_table_and_writes_lm_evals_json(setup, oracle, tmp_path, capsys):
    import json

    from multilora_plugin.cli import main

    base, paths, tasks = setup
    include = os.path.join(os.path.dirname(base), "tasks")
    argv = ["eval", "--model", base, "--adapter", f"a={paths['a']}", "--adapter", f"c={paths['c']}", "--base",
            "--tasks", ",".join(TASKS), "--include-path", include, "--output-path", str(tmp_path / "out"),
            "--max-length", "16", "--device", "cpu", "--dtype", "float32", "--max-loras", "1", "--log-samples"]
    assert main(argv) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| adapter | toy_choice acc | toy_generate exact_match | toy_rolling word_perplexity")
    rows = {line.split(" | ")[0][2:]: line for line in table[1:]}
    assert sorted(rows) == ["a", "base", "c"]
    for name, want in (("a", oracle["a"]), ("c", oracle["c"]), ("base", oracle[None])):
        acc = want["results"]["toy_choice"]["acc,none"]
        assert rows[name].split(" | ")[1] == f"{acc:.4g}"
        written = json.loads((tmp_path / "out" / name / "results.json").read_text())
        assert written["results"]["toy_choice"]["acc,none"] == acc
        samples = (tmp_path / "out" / name / "samples_toy_generate.jsonl").read_text().splitlines()
        assert [json.loads(s)["resps"] for s in samples] == [s["resps"] for s in want["samples"]["toy_generate"]]


@pytest.mark.parametrize("change,words", [
    (("--model", "/no/such/model"), "the path '/no/such/model' does not exist"),
    (("--adapter", "a=/no/such/adapter"), "the path '/no/such/adapter' does not exist"),
    (("--adapter", "just-a-name"), "should be NAME=PATH"),
    (("--tasks", "toy_choice,no_such_task"), "unknown lm-eval tasks ['no_such_task']"),
])
def test_multilora_eval_names_what_is_wrong_in_one_line(setup, capsys, change, words):
    from multilora_plugin.cli import main

    base, paths, _ = setup
    args = {"--model": base, "--adapter": f"a={paths['a']}", "--tasks": "toy_choice",
            "--include-path": os.path.join(os.path.dirname(base), "tasks")}
    args[change[0]] = change[1]
    assert main(["eval", *[x for kv in args.items() for x in kv]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("multilora eval: ") and words in err[-1]


def test_local_completions_against_the_server_equals_hf_with_peft(setup, oracle):
    """lm-eval's `local-completions` backend scores with `echo` + `logprobs` on /v1/completions and
    generates through it. Its `max_length` counts differently from `hf`'s (one position kept for the
    token it asks for, one more for rolling windows): 18 gives the windows of `hf`'s 16. Generated
    texts are the server's continuations of the prompt, so they keep the space before the first word
    that `hf`, decoding the new tokens alone, drops."""
    import multilora_plugin
    from multilora_plugin.integrations.local import running_server
    from multilora_plugin.integrations.server import create_app
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, paths, tasks = setup
    model = multilora_plugin.wrap(AutoModelForCausalLM.from_pretrained(base), max_loras=2)
    for name, path in paths.items():
        model.register_adapter(name, path)
    engine = multilora_plugin.Engine(model, AutoTokenizer.from_pretrained(base), load_entrypoints=False)
    with running_server(create_app(engine, served_model_name="base")) as url:
        for name in ("c", "base"):
            args = (f"model={name},base_url={url}/v1/completions,tokenizer={base},tokenizer_backend=huggingface,"
                    "max_length=18,num_concurrent=4,max_retries=1")
            got = simple_evaluate(model="local-completions", model_args=args, tasks=TASKS, task_manager=tasks,
                                  log_samples=True)
            want = oracle[None if name == "base" else name]
            for sample in got["samples"]["toy_generate"]:
                sample["resps"] = [[text.lstrip() for text in resp] for resp in sample["resps"]]
            for sample in want["samples"]["toy_generate"]:
                assert all(text == text.lstrip() for resp in sample["resps"] for text in resp)
            check_same(got, want)
    engine.close()


def test_a_greedy_continuation_is_reported_greedy_as_hf_does(setup):
    """The toy tasks' random continuations are never greedy; the model's own greedy tokens are: the
    flag and the log-likelihood equal `hf`'s, for a continuation of one token and of several."""
    import torch
    from lm_eval.models.huggingface import HFLM

    base, paths, _ = setup
    hf = HFLM(pretrained=base, peft=paths["a"], **COMMON)
    ours = MultiLoRALM(pretrained=base, adapter=paths["a"], **COMMON)
    context = [2, 17, 40, 5, 66]
    with torch.no_grad():
        greedy = hf.model.generate(input_ids=torch.tensor([context]), max_new_tokens=4, do_sample=False,
                                   pad_token_id=0)[0, len(context):].tolist()
    requests = [(None, context, greedy[:1]), (None, context, greedy), (None, context, greedy[:2] + [greedy[2] ^ 1])]
    want = hf._loglikelihood_tokens(requests)
    got = ours._loglikelihood_tokens(requests)
    assert [g for _, g in want] == [True, True, False] == [g for _, g in got]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=2e-3)
