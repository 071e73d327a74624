"""benchmarks/memory_profile.py: the peak read from the allocator's events, and its --tiny mode end to end."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

SPEC = importlib.util.spec_from_file_location("memory_profile",
                                              Path(__file__).parents[1] / "benchmarks" / "memory_profile.py")
memory_profile = sys.modules.setdefault("memory_profile", importlib.util.module_from_spec(SPEC))
SPEC.loader.exec_module(memory_profile)  # puts benchmarks/ on the path
import shapes  # noqa: E402


def test_the_peak_is_the_most_held_at_once_with_what_was_alive_then(tmp_path):
    """+100 (in op a), +50 (in b, inside a), −100, +30: 150 bytes at most, after the second allocation, both alive."""
    def allocation(ts, size, address):
        return {"name": "[memory]", "ph": "i", "ts": ts, "args": {"Bytes": size, "Addr": address}}

    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": [
        {"name": "PyTorch Profiler (0)", "ph": "X", "ts": 0, "dur": 100},
        {"name": "a", "ph": "X", "ts": 1, "dur": 50}, {"name": "b", "ph": "X", "ts": 15, "dur": 10},
        allocation(10, 100, 1), allocation(20, 50, 2), allocation(30, -100, 1), allocation(60, 30, 3)]}))
    assert memory_profile.peak_of(trace, top=5) == {
        "peak_bytes": 150, "at": "a > b",
        "alive": [{"bytes": 100, "made_in": "a"}, {"bytes": 50, "made_in": "a > b"}]}


def test_tiny_memit_profiles_its_one_off_work_and_its_first_edit_and_leaves_the_editor_as_it_was(tmp_path):
    editor_class = memory_profile.EDITORS["memit"].editor
    before = {phase: editor_class.__dict__.get(phase) for phase in memory_profile.PHASES}
    peaks = memory_profile.main(["--tiny", "--editor", "memit", "--delta-steps", "2", "--workdir", str(tmp_path)])
    assert list(peaks) == ["prepare", "apply"]
    for found in peaks.values():
        assert found["peak_bytes"] > 0 and found["alive"]
        assert sum(item["bytes"] for item in found["alive"]) <= found["peak_bytes"]
    assert {phase: editor_class.__dict__.get(phase) for phase in memory_profile.PHASES} == before


@pytest.mark.parametrize("arch", ["gpt-j", "llama3-8b", "gpt-neox-20b"])
def test_narrowing_divides_every_width_and_head_count_once_and_keeps_the_depth(arch):
    """GPT-J's hidden_size is another name of its n_embd: divided once, not twice."""
    def widths(narrow):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(shapes.model_config(arch, narrow=narrow))
        config = model.config
        mlp_in = max(p.shape[0] for name, p in model.named_parameters() if "layers.0.mlp" in name or "h.0.mlp" in name)
        return (config.hidden_size, config.num_attention_heads, getattr(config, "num_key_value_heads", 1), mlp_in,
                config.num_hidden_layers)

    hidden, heads, kv_heads, mlp, depth = widths(1)
    assert widths(4) == (hidden // 4, heads // 4, max(1, kv_heads // 4), mlp // 4, depth)


FACTOR_SPEC = importlib.util.spec_from_file_location(
    "factor_memory_bench", Path(__file__).parents[1] / "benchmarks" / "factor_memory_bench.py")
factor_memory_bench = sys.modules.setdefault("factor_memory_bench", importlib.util.module_from_spec(FACTOR_SPEC))
FACTOR_SPEC.loader.exec_module(factor_memory_bench)


def test_factor_memory_is_read_against_what_the_card_held_before_and_after_factoring(monkeypatch):
    """Stand-ins for the CUDA counters: 100 bytes held before, 300 once factored (the factors: 200); peaks of 350
    while factoring and 310 / 320 while solving are 50, 10 and 20 above the held 300."""
    held, peaks = iter([100, 300, 300, 300]), iter([350, 310, 320])
    monkeypatch.setattr(factor_memory_bench, "allocated", lambda device: next(held))
    monkeypatch.setattr(factor_memory_bench, "peak_since_reset", lambda device: next(peaks))
    result = factor_memory_bench.measure(64, torch.float64, torch.device("cpu"))
    assert {key: value for key, value in result.items() if not key.endswith("_s")} == {
        "held": 200, "factoring_above_held": 50, "solve1_above_held": 10, "solve8_above_held": 20}


def test_factor_memory_tiny_runs_every_width_and_precision_on_the_cpu():
    report = factor_memory_bench.main(["--tiny"])
    assert [line.split("|")[1:3] for line in report.splitlines()[4:]] == [
        [" tiny-256 (256) ", " float64 "], [" tiny-256 (256) ", " float32 "],
        [" tiny-384 (384) ", " float64 "], [" tiny-384 (384) ", " float32 "]]
