"""Scheduler: the issue's cases as explicit tables, each policy, preemption, failures, and a property
test that no request starves under any policy."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig

from multilora_plugin import EMPTY
from multilora_plugin.adapters import AdapterCache, AdapterSource, AdapterWeights, ModuleWeights
from multilora_plugin.errors import AdapterNotFoundError, CapacityError, ConfigError, InvalidRequestError
from multilora_plugin.scheduler import POLICIES, Request, Scheduler, SchedulerConfig

ADAPTERS = ("A", "B", "C", "D", "E", "code", "math", "busy", "quiet")


def req(rid, adapter, prompt=4, new=3, priority=0):
    return Request(rid, adapter, num_prompt_tokens=prompt, max_new_tokens=new, priority=priority)


def with_cache(config: SchedulerConfig, **kwargs):
    """A scheduler over a real adapter cache (in-memory weights, no slot buffers), as the engine
    builds it: the scheduler reads the cache's residency view and keeps no copy of its own."""
    weights = AdapterWeights("x", "/x", LoraConfig(r=1), {"m": ModuleWeights(torch.zeros(1, 1), torch.zeros(1, 1))})
    cache = AdapterCache(num_slots=config.max_loras, max_cpu_loras=8, read=lambda src: weights,
                         write=lambda writes: None)
    for name in ADAPTERS:
        cache.register(AdapterSource(name, f"/adapters/{name}", LoraConfig(r=1)))
    sched = Scheduler(config, adapter_exists=cache.__contains__, residency=cache.residency, **kwargs)
    sched.cache, sched.holds = cache, {}  # the holds: request id → its cache Hold
    return sched


def run_step(sched: Scheduler):
    """One engine step as the engine runs it: admitted requests hold their adapter in the cache (one
    that cannot get a slot goes back to waiting), every running request makes one token, done ones
    finish and release their hold."""
    cache, holds = getattr(sched, "cache", None), getattr(sched, "holds", {})
    out = sched.schedule()
    for r in out.preempted:
        if r.request_id in holds:
            cache.release(holds.pop(r.request_id))
    for r in list(out.prefill):
        if cache is not None and r.adapter is not None:
            try:
                holds[r.request_id] = cache.acquire([r.adapter])
            except CapacityError:
                sched.preempt(r.request_id)
    for r in sched.running:
        sched.record_tokens(r.request_id)
        if r.num_output_tokens >= r.max_new_tokens:
            sched.finish(r.request_id)
            if r.request_id in holds:
                cache.release(holds.pop(r.request_id))
    return out


def resident(sched) -> set:
    return {n for n in sched.cache.contents() if n is not EMPTY}


def ids(requests):
    """Request ids in arrival order (policies may admit in another order within a step)."""
    return [r.request_id for r in sorted(requests, key=lambda r: r.arrival)]


def test_scheduler_module_does_not_import_torch():
    tree = ast.parse(pathlib.Path("multilora_plugin/scheduler.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"torch", "transformers", "peft", "numpy"}


def test_empty_scheduler_schedules_nothing():
    sched = Scheduler()
    out = sched.schedule()
    assert out.is_empty and out.adapters_to_prefetch == [] and not sched.has_unfinished()


# max_loras=2: req1→A, req2→B, req3→A, req4→C, req5→B arriving together (the case)
FIRST_BATCH = {
    "adapter_affinity": ["req1", "req2", "req3", "req5"],
    "fair_share": ["req1", "req2", "req3", "req5"],
    "priority": ["req1", "req2", "req3", "req5"],
    "fcfs": ["req1", "req2", "req3"],  # strict order: req4 (C) blocks the queue
}


@pytest.mark.parametrize("policy", POLICIES)
def test_first_batch_with_two_slots(policy):
    sched = with_cache(SchedulerConfig(max_loras=2, policy=policy))
    for rid, adapter in [("req1", "A"), ("req2", "B"), ("req3", "A"), ("req4", "C"), ("req5", "B")]:
        sched.add(req(rid, adapter))
    out = run_step(sched)
    assert ids(out.prefill) == FIRST_BATCH[policy]
    assert sched.cache.contents() == ("A", "B") and out.adapters_to_prefetch == ["C"]


def test_req4_runs_once_a_drains():
    sched = with_cache(SchedulerConfig(max_loras=2))
    for rid, adapter, new in [("req1", "A", 2), ("req2", "B", 5), ("req3", "A", 2), ("req4", "C", 2),
                              ("req5", "B", 5)]:
        sched.add(req(rid, adapter, new=new))
    contents = []
    steps = []
    for _ in range(3):
        steps.append(run_step(sched))
        contents.append(sched.cache.contents())
    assert [ids(s.prefill) for s in steps] == [["req1", "req2", "req3", "req5"], [], ["req4"]]
    assert contents == [("A", "B"), ("A", "B"), ("C", "B")]  # A drained, then C took its slot
    assert ids(steps[2].decode) == ["req2", "req5"]


def test_base_model_requests_take_no_slot():
    sched = with_cache(SchedulerConfig(max_loras=1))
    for i, adapter in enumerate(["A", None, None, "B", None]):
        sched.add(req(f"r{i}", adapter))
    out = run_step(sched)
    assert ids(out.prefill) == ["r0", "r1", "r2", "r4"] and sched.cache.contents() == ("A",)


# max_loras=1, 8 per batch: code, code, math, math, code, base, base (the case)
ARRIVALS = [("code", 3), ("code", 3), ("math", 3), ("math", 3), ("code", 3), (None, 3), (None, 3)]
RUNS = {  # policy → request ids admitted at each step where any was admitted; adapter swaps
    "adapter_affinity": ([["r0", "r1", "r4", "r5", "r6"], ["r2", "r3"]], 1),
    "fair_share": ([["r0", "r1", "r4", "r5", "r6"], ["r2", "r3"]], 1),
    "priority": ([["r0", "r1", "r4", "r5", "r6"], ["r2", "r3"]], 1),
    "fcfs": ([["r0", "r1"], ["r2", "r3"], ["r4", "r5", "r6"]], 2),
}


@pytest.mark.parametrize("policy", POLICIES)
def test_same_adapter_runs_coalesce(policy):
    sched = with_cache(SchedulerConfig(max_loras=1, max_num_seqs=8, policy=policy))
    for i, (adapter, new) in enumerate(ARRIVALS):
        sched.add(req(f"r{i}", adapter, new=new))
    admitted = []
    while sched.has_unfinished():
        out = run_step(sched)
        if out.prefill:
            admitted.append(ids(out.prefill))
    runs, swaps = RUNS[policy]
    assert admitted == runs
    stats = sched.cache.stats()
    assert stats.gpu_evictions == swaps and stats.gpu_misses == swaps + 1  # placements: one per run


def test_unknown_adapter_fails_alone():
    known = {"A"}
    sched = Scheduler(SchedulerConfig(), adapter_exists=known.__contains__)
    with pytest.raises(AdapterNotFoundError, match="'ghost', which is not registered and could not be resolved"):
        sched.add(req("bad", "ghost"))
    sched.add(req("ok", "A"))
    sched.add(req("later", "A"))
    known.discard("A")  # unloaded while its requests wait
    sched.add(req("base", None))
    out = sched.schedule()
    assert [(r.request_id, type(e)) for r, e in out.failed] == [("ok", AdapterNotFoundError),
                                                                 ("later", AdapterNotFoundError)]
    assert ids(out.prefill) == ["base"]


@pytest.mark.parametrize("request_kwargs,words", [
    (dict(prompt=0), "the prompt should have at least one token, but has 0"),
    (dict(new=-1), "`max_new_tokens` should be >= 0, but got -1"),
    (dict(prompt=10, new=30), "prompt (10) + max_new_tokens (30) should fit max_total_tokens=32"),
])
def test_requests_that_can_never_run_are_refused(request_kwargs, words):
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=16, max_total_tokens=32))
    with pytest.raises(InvalidRequestError) as info:
        sched.add(req("x", "A", **request_kwargs))
    assert words in str(info.value) and not sched.has_unfinished()


def test_a_prompt_longer_than_the_prefill_budget_is_admitted_alone():
    """Its prefill runs in chunks within the budget: it takes a step's whole budget, nobody else's."""
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=16, max_total_tokens=64))
    sched.add(req("short", "A", prompt=4))
    sched.add(req("long", "A", prompt=20))
    sched.add(req("after", "A", prompt=4))
    assert ids(sched.schedule().prefill) == ["short", "after"]  # "long" does not fit what "short" left
    assert ids(sched.schedule().prefill) == ["long"]


def test_duplicate_id_and_bad_config():
    sched = Scheduler()
    sched.add(req("x", None))
    with pytest.raises(InvalidRequestError, match="already queued or running"):
        sched.add(req("x", None))
    with pytest.raises(ConfigError, match="`policy` should be one of"):
        SchedulerConfig(policy="lifo")
    with pytest.raises(ConfigError, match="`max_loras` should be an int >= 1, but got 0"):
        SchedulerConfig(max_loras=0)


def test_prefill_token_budget_spreads_admission():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=10))
    for i in range(4):
        sched.add(req(f"r{i}", None, prompt=4, new=5))
    assert [ids(run_step(sched).prefill) for _ in range(2)] == [["r0", "r1"], ["r2", "r3"]]


def test_preemption_by_recompute_keeps_produced_tokens():
    # KV budget 20: two requests of prompt 4 grow until they no longer fit; the most recent one yields
    sched = Scheduler(SchedulerConfig(max_total_tokens=20))
    sched.add(req("old", None, prompt=4, new=12))
    sched.add(req("new", None, prompt=4, new=12))
    history = [run_step(sched) for _ in range(8)]
    assert ids(history[0].prefill) == ["old", "new"]
    preempted_at = next(i for i, o in enumerate(history) if o.preempted)
    victim = history[preempted_at].preempted[0]
    assert victim.request_id == "new" and victim.num_output_tokens == preempted_at
    assert sched.stats().preemptions == 1
    resumed = []
    while sched.has_unfinished():
        out = sched.schedule()
        resumed += [r.num_tokens for r in out.prefill if r is victim]  # what it prefills when resumed
        for r in out.running:
            sched.record_tokens(r.request_id)
            if r.num_output_tokens >= r.max_new_tokens:
                sched.finish(r.request_id)
    assert resumed == [4 + preempted_at]  # prefilled again with the tokens it had produced
    assert victim.num_output_tokens == 12


def test_priority_policy_and_preemption_order():
    sched = Scheduler(SchedulerConfig(policy="priority", max_num_seqs=2))
    sched.add(req("low", None, priority=5))
    sched.add(req("high", None, priority=0))
    sched.add(req("mid", None, priority=1))
    assert ids(sched.schedule().prefill) == ["high", "mid"]


def test_fair_share_lets_a_quiet_adapter_through():
    """A busy adapter with a long queue does not crowd out a quiet one under fair_share."""
    sched = Scheduler(SchedulerConfig(max_loras=1, max_num_seqs=2, policy="fair_share"))  # no cache
    for i in range(6):
        sched.add(req(f"busy{i}", "busy", new=2))
    run_step(sched)
    sched.add(req("quiet0", "quiet", new=2))
    order = []
    while sched.has_unfinished():
        order += ids(run_step(sched).prefill)
    assert order.index("quiet0") < order.index("busy4")


def test_anti_starvation_bound_lets_an_adapter_take_its_turn():
    """A steady stream for A would keep B out forever under adapter_affinity; after max_wait_steps
    newer A requests stop passing B, A drains and B gets the slot."""
    sched = with_cache(SchedulerConfig(max_loras=1, max_num_seqs=4, max_wait_steps=5))
    sched.add(req("a0", "A", new=3))
    sched.add(req("b0", "B", new=3))
    admitted_at = {}
    for step in range(40):
        sched.add(req(f"a{step + 1}", "A", new=3))
        for r in run_step(sched).prefill:
            admitted_at[r.request_id] = step
        if "b0" in admitted_at:
            break
    assert 5 <= admitted_at["b0"] <= 5 + 3 + 1


def test_an_overdue_request_reserves_what_it_needs_and_the_rest_keeps_running():
    """max_loras=2, A (long) and B (short) running, C overdue: B, the first to drain, is closed to
    newcomers; a newer A request and a base-model request still join; C gets B's slot."""
    sched = with_cache(SchedulerConfig(max_loras=2, max_num_seqs=8, max_wait_steps=2))
    sched.add(req("a0", "A", new=12))
    sched.add(req("b0", "B", new=6))
    run_step(sched)
    sched.add(req("c0", "C", new=2))
    run_step(sched)
    run_step(sched)  # c0 has now waited max_wait_steps; b0 has 3 tokens left, a0 9
    sched.add(req("b1", "B"))
    sched.add(req("a1", "A"))
    sched.add(req("base", None))
    out = run_step(sched)
    assert ids(out.prefill) == ["a1", "base"] and "b0" in ids(out.decode)
    assert run_step(sched).prefill == [] and run_step(sched).prefill == []  # b0 drains; b1 may not join it
    out = run_step(sched)
    assert ids(out.prefill) == ["c0"] and resident(sched) == {"A", "C"}
    assert sched.waiting[0].request_id == "b1"


@settings(max_examples=120, deadline=None, derandomize=True)
@given(
    policy=st.sampled_from(POLICIES),
    max_loras=st.integers(1, 3),
    arrivals=st.lists(st.tuples(st.integers(0, 12), st.sampled_from(["A", "B", "C", "D", None]),
                                st.integers(1, 6), st.integers(1, 5), st.integers(0, 2)), min_size=1, max_size=25),
    kv=st.sampled_from([24, 64, 10_000]),
)
def test_no_request_starves(policy, max_loras, arrivals, kv):
    """For any arrivals: once a request has waited max_wait_steps, it is admitted within one drain of
    the batch per older waiting request; and everything finishes."""
    wait, longest = 4, 6 + 5  # max_wait_steps; the most tokens a request can hold
    sched = with_cache(SchedulerConfig(max_loras=max_loras, max_num_seqs=3, max_num_batched_tokens=12,
                                       max_total_tokens=kv, policy=policy, max_wait_steps=wait))
    arrivals = sorted(enumerate(arrivals), key=lambda a: a[1][0])
    pending = list(arrivals)
    starving_since, admitted = {}, {}
    step = 0
    while pending or sched.has_unfinished():
        while pending and pending[0][1][0] <= step:
            i, (_, adapter, prompt, new, prio) = pending.pop(0)
            sched.add(req(f"r{i}", adapter, prompt=prompt, new=new, priority=prio))
        waiting = sched.waiting
        for r in waiting:
            if step - r.arrival_step >= wait and r.request_id not in starving_since:
                older = sum(o.arrival < r.arrival for o in waiting)
                starving_since[r.request_id] = (step, older)
        for r in run_step(sched).prefill:
            admitted.setdefault(r.request_id, step)
        step += 1
        assert step < 2000, "the schedule does not finish"
    for rid, (since, older) in starving_since.items():
        if rid in admitted:
            assert admitted[rid] - since <= (older + 1) * (longest + 1), (rid, since, older, admitted[rid])
    assert set(admitted) == {f"r{i}" for i, _ in arrivals}
