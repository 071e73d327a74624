"""benchmarks/editing_bench.py: it builds its editors as the runner does, and reads the statistics a run cached."""
import importlib.util
import logging
import sys
from pathlib import Path

from sadr.runner import Experiment
from tests.runs import composed, tiny_dir, tiny_overrides  # noqa: F401 (tiny_dir is a fixture)

SPEC = importlib.util.spec_from_file_location("editing_bench",
                                              Path(__file__).parents[1] / "benchmarks" / "editing_bench.py")
bench = sys.modules.setdefault("editing_bench", importlib.util.module_from_spec(SPEC))
SPEC.loader.exec_module(bench)


def test_the_benchmark_edits_with_the_runner_s_editor_and_the_statistics_a_run_cached(tiny_dir, tmp_path, caplog):
    """The benchmark failed at its first editor once `build_editor` took the regularizers, unnoticed: no test ran it.
    Here it edits and scores a case with ROME and ROME + SADR, under the runner's key, so the C a run cached is read,
    not computed again."""
    overrides = tiny_overrides(tiny_dir, tmp_path / "run", "dataset.limit=1", f"cache_dir={tmp_path / 'cache'}")
    experiment = Experiment(composed(overrides))
    experiment.run()
    with caplog.at_level(logging.INFO, logger="sadr.editors.covariance"):
        rows = [row for gamma in (0.0, 0.01) for row in bench.bench_editor(
            "rome", [*overrides, f"sadr.lambda={gamma}"], experiment.loaded, experiment.computed_by,
            experiment.dataset.cases, batch=False, cold_stats=False)]
    assert "computing key statistics" not in caplog.text
    assert [row["edits per apply"] for row in rows] == [1, 1]
    assert all(row["δ-optimisation (s/edit)"] > 0 and 0 <= row["ES"] <= 100 for row in rows)
