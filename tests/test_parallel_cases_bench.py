"""benchmarks/parallel_cases_bench.py: how it compares the decisions of N cases side by side with N = 1."""
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SPEC = importlib.util.spec_from_file_location("parallel_cases_bench",
                                              Path(__file__).parents[1] / "benchmarks" / "parallel_cases_bench.py")
bench = sys.modules.setdefault("parallel_cases_bench", importlib.util.module_from_spec(SPEC))
SPEC.loader.exec_module(bench)


def row(values, p_good, p_bad) -> dict:
    return {"seconds": {"delta": 1.0, "eval_per_case": 0.5}, "diagnostics": {"delta_steps": 2},
            "edited": {"neighborhood": {"value": values, "p_good": p_good, "p_bad": p_bad}}}


@pytest.mark.parametrize("dtype, ties", [("float32", 0), ("bfloat16", 1)])
def test_differing_decisions_count_ties_by_the_dtype_and_report_the_largest_gap(dtype, ties):
    # N = 1: prompt 0 a near tie (gap 2e-3 relative), prompt 1 clear (gap 0.5), prompt 2 agreed on
    alone = bench.summary(1, [row([1, 0, 1], [0.500, 0.2, 0.9], [0.499, 0.4, 0.1])], 2.0, None, bench.TIE_RTOL[dtype])
    together = bench.summary(4, [row([0, 1, 1], [0.499, 0.4, 0.9], [0.500, 0.2, 0.1])], 1.0, alone, bench.TIE_RTOL[dtype])
    assert together["decisions differing (ties)"] == f"2/3 ({ties}; largest gap 5.0e-01)"
    assert together["speed-up"] == pytest.approx(2.0)


def test_the_same_decisions_report_no_gap():
    alone = bench.summary(1, [row([1, 0], [0.6, 0.2], [0.4, 0.8])], 2.0, None, 1e-5)
    together = bench.summary(4, [row([1, 0], [0.6, 0.2], [0.4, 0.8])], 1.0, alone, 1e-5)
    assert together["decisions differing (ties)"] == "0/2 (0)"


def test_tiny_samples_a_small_corpus_not_the_configs(monkeypatch):
    # gpt-j's config samples 100,000 texts for its statistics: a --tiny rehearsal on the CPU would take hours
    class Stop(Exception):
        pass

    seen = []

    def first_run(overrides):
        seen.append(overrides)
        raise Stop

    monkeypatch.setattr(bench.runner, "load_model_kept", bench.runner.load_model_kept)  # main replaces it: restored
    monkeypatch.setattr(bench, "random_loaded_model", lambda *args: SimpleNamespace(model=None))
    monkeypatch.setattr(bench, "model_fingerprint", lambda model: "random")
    monkeypatch.setattr(bench, "run", first_run)
    for extra, samples in (([], 32), (["--stats-samples", "8"], 8)):
        argv = ["parallel_cases_bench.py", "--model", "gpt-j", "--random-shape", "--tiny", *extra]
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(Stop):
            bench.main()
        assert f"model.stats.n_samples={samples}" in seen[-1]
