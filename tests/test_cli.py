"""The `multilora` command: the demo runs end to end and checks itself against PEFT."""

from __future__ import annotations

import pytest

from multilora_plugin import MultiLoRAModel, cli


def test_demo_matches_peft(capsys):
    assert cli.main(["demo", "--new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.count("  matches PEFT") == len(cli.DEMO_ROWS) + 10  # the batch, then 10 engine requests
    assert "continuous batching: 10 requests over 4 adapters + base, max_loras=2" in out
    assert "every output matches PEFT" in out
    for name in cli.DEMO_ADAPTERS:
        assert f"loaded adapter {name!r}" in out


def test_demo_reports_a_mismatch(monkeypatch, capsys):
    """The demo's check can fail: serve every row with the base model and the adapter rows differ."""
    real_generate = MultiLoRAModel.generate

    def base_only(self, *args, adapter_names=None, **kwargs):
        return real_generate(self, *args, adapter_names=[None] * len(adapter_names), **kwargs)

    monkeypatch.setattr(MultiLoRAModel, "generate", base_only)
    assert cli.main(["demo", "--new-tokens", "6"]) == 1
    out = capsys.readouterr().out
    adapter_rows = sum(name is not None for name, _ in cli.DEMO_ROWS)
    assert out.count("DIFFERS FROM PEFT") == adapter_rows
    assert f"{adapter_rows} output(s) differ from PEFT" in out


def test_a_command_is_required():
    with pytest.raises(SystemExit):
        cli.main([])
