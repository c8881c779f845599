"""Isolation: a row's output never depends on which adapters share its batch (hypothesis over layouts)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import padded_batch

ADAPTERS = [None, "all4", "attn8_rs", "mlp16_l1", "regex_pat"]
PROMPTS = 5
MAX_LORAS = 3  # fewer slots than adapters: consecutive examples force slot swaps
TOL = 1e-4  # on logits of order 1; the adapters differ from each other by more than 100x this


@pytest.fixture(scope="module")
def setup(llama_kit):
    model = llama_kit.wrapped(max_loras=MAX_LORAS)
    prompts, _ = padded_batch(PROMPTS, [6] * PROMPTS, seed=11)
    alone = {}  # (prompt, adapter) → logits of that prompt run alone, in a batch of one
    with torch.no_grad():
        for p in range(PROMPTS):
            for name in ADAPTERS:
                alone[p, name] = model(prompts[p:p + 1], adapter_names=[name]).logits[0]
    return model, prompts, alone


layouts = st.lists(st.tuples(st.integers(0, PROMPTS - 1), st.sampled_from(ADAPTERS)), min_size=1, max_size=8).filter(
    lambda rows: len({n for _, n in rows if n is not None}) <= MAX_LORAS
)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=layouts)
def test_each_row_matches_running_alone(setup, rows):
    model, prompts, alone = setup
    ids = prompts[[p for p, _ in rows]]
    with torch.no_grad():
        logits = model(ids, adapter_names=[n for _, n in rows]).logits
    for i, (p, name) in enumerate(rows):
        # fp32 rounding: a mixed batch may take other kernel shapes than a row alone (per-token batched
        # products instead of one matmul per adapter), which round differently by about an ulp per layer
        torch.testing.assert_close(logits[i], alone[p, name], atol=TOL, rtol=TOL, msg=f"row {i}: {name}")


def test_adapters_really_differ(setup):
    """Guard against a vacuous isolation test: every adapter changes the output."""
    _, _, alone = setup
    for a in ADAPTERS:
        for b in ADAPTERS:
            if a != b:
                assert (alone[0, a] - alone[0, b]).abs().max() > 100 * TOL
