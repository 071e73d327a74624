"""The shards of one configuration (`dataset.shard=i/n`) summarize as one row, equal to the unsharded run."""
from __future__ import annotations

import shutil

import pandas as pd
import pytest

from sadr.evaluation.paired import compare_runs
from sadr.evaluation.summary import paired_with_baselines, read_metrics, summarize, write_summary
from sadr.report.build import write_report
from sadr.report.data import load_runs, series_of, tradeoff_table
from sadr.results import METRICS_FILE, RunDirectory
from sadr.runner import run_experiment
from tests.runs import composed, tiny_dir, tiny_overrides  # noqa: F401 (tiny_dir is a fixture)

GAMMAS = ("0", "0.5")


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):  # noqa: F811
    """Both cases unsharded and as shards 1/2 and 2/2, each without and with SADR."""
    root = tmp_path_factory.mktemp("shards")
    for gamma in GAMMAS:
        extra = [f"sadr.lambda={gamma}", "sadr.heads=all"]
        run_experiment(composed(tiny_overrides(tiny_dir, root / "whole" / gamma, *extra)))
        for shard in (1, 2):
            run_experiment(composed(tiny_overrides(tiny_dir, root / "sharded" / f"{gamma}_{shard}", *extra,
                                                   f"dataset.shard={shard}/2")))
    return root


def _metrics(table: pd.DataFrame) -> pd.DataFrame:
    columns = [c for c in table.columns if c in ("state", "sadr.lambda", "n_cases", "n_obs")
               or c.split(" ")[0] in ("ES", "PS", "NS", "DNS")]
    table = table[columns].copy()
    table.loc[table.state == "unedited", "sadr.lambda"] = None  # the unedited model has no γ
    return table.sort_values(["state", "sadr.lambda"]).reset_index(drop=True)


def test_shards_merge_into_the_row_of_the_unsharded_run(runs):
    whole, sharded = summarize(runs / "whole"), summarize(runs / "sharded")
    assert list(sharded["shards"]) == ["2/2", "2/2", "2/2"]  # unedited once, then one row per γ
    assert set(sharded["run"][sharded.state == "edited"]) == {"0_1,0_2", "0.5_1,0.5_2"}
    pd.testing.assert_frame_equal(_metrics(sharded), _metrics(whole))


def test_paired_table_pairs_merged_shards_like_the_unsharded_runs(runs):
    write_summary(runs / "sharded", "prompt")
    paired = pd.read_csv(runs / "sharded" / "paired.csv")
    expected = compare_runs(runs / "whole" / "0", runs / "whole" / "0.5")
    assert list(paired["base_run"].unique()) == ["0_1,0_2"] and list(paired["run"].unique()) == ["0.5_1,0.5_2"]
    pd.testing.assert_frame_equal(paired[expected.columns].reset_index(drop=True), expected, check_dtype=False)


def test_missing_and_unfinished_shards_are_named(runs, tmp_path):
    root = tmp_path / "partial"
    shutil.copytree(runs / "sharded" / "0_1", root / "0_1")
    shutil.copytree(runs / "sharded" / "0.5_1", root / "0.5_1")
    shutil.copytree(runs / "sharded" / "0.5_2", root / "0.5_2")
    (root / "0.5_2" / "metrics.csv").unlink()  # as if killed before the end
    (root / "0.5_2" / "run.log").write_text("killed\n")
    table = summarize(root)
    edited = table[table.state == "edited"].set_index("sadr.lambda")["shards"]
    assert (edited[0.0], edited[0.5]) == ("1/2; missing 2", "1/2; unfinished 2")
    text = write_summary(root, "prompt")
    assert f"{root / '0.5_2'}  log: {root / '0.5_2' / 'run.log'}" in text


def test_a_configuration_whose_shards_are_not_all_finished_is_left_unpaired_with_the_reason(runs, tmp_path):
    root = tmp_path / "running"
    for name in ("0_1", "0_2", "0.5_1", "0.5_2"):
        shutil.copytree(runs / "sharded" / name, root / name)
    (root / "0.5_2" / "metrics.csv").unlink()  # still running: γ = 0.5 has one shard's records, γ = 0 both
    text = write_summary(root, "prompt")
    assert "not paired with a γ = 0 run:\n  0.5_1 against 0_1,0_2: the runs edited different records" in text
    assert not (root / "paired.csv").exists() and (root / "summary.csv").is_file()


def test_a_sharded_configuration_pairs_with_an_unsharded_baseline(runs, tmp_path):
    root = tmp_path / "mixed"
    shutil.copytree(runs / "whole" / "0", root / "0")
    for shard in ("0.5_1", "0.5_2"):
        shutil.copytree(runs / "sharded" / shard, root / shard)
    paired, unpaired = paired_with_baselines(root)
    assert unpaired == [] and set(paired.base_run) == {"0"} and set(paired.run) == {"0.5_1,0.5_2"}
    expected = compare_runs(runs / "whole" / "0", runs / "whole" / "0.5")
    pd.testing.assert_frame_equal(paired[expected.columns].reset_index(drop=True), expected, check_dtype=False)
    assert [line.label for line in series_of(load_runs(root))] == ["rome"]  # one line in the report too


def test_the_report_merges_shards_as_summarize_does(runs, monkeypatch):
    """Each shard's rows are read once (at paper scale, GBs of attention blobs each): a configuration's metrics and its
    drift come from the same read."""
    reads, iter_rows = [], RunDirectory.iter_rows
    monkeypatch.setattr(RunDirectory, "iter_rows", lambda self: reads.append(self.path.name) or iter_rows(self))
    sharded = {run.settings["sadr.lambda"]: run for run in load_runs(runs / "sharded")}
    assert sorted(reads) == ["0.5_1", "0.5_2", "0_1", "0_2"]
    whole = {run.settings["sadr.lambda"]: run for run in load_runs(runs / "whole")}
    assert sorted(sharded) == sorted(whole) == [0.0, 0.5]
    assert sharded[0.5].name == "0.5_1,0.5_2" and sorted(sharded[0.5].environments) == ["0.5_1", "0.5_2"]
    lines = series_of(list(sharded.values()))
    assert [line.label for line in lines] == ["rome"]  # one line, not one per shard
    columns = ["lambda", "metric", "mean", "ci95", "n"]
    pd.testing.assert_frame_equal(tradeoff_table(lines)[columns], tradeoff_table(series_of(list(whole.values())))[columns])


def test_the_report_s_metrics_of_a_shard_are_made_from_every_row_it_read(tiny_dir, tmp_path):  # noqa: F811
    """A sharded configuration's metrics in the report come from all the rows of the one read of each shard, so they
    equal the metrics.csv that the runner wrote from the same rows: here a single shard (1/1) of both cases, where
    the other tests' shards hold one row each."""
    run_experiment(composed(tiny_overrides(tiny_dir, tmp_path / "root" / "only", "dataset.shard=1/1")))
    (run,) = load_runs(tmp_path / "root")
    assert run.cases.count == 2
    written = read_metrics(tmp_path / "root" / "only" / METRICS_FILE)
    # not components, whose empty cells read back from the file as NaN
    columns = ["state", "metric", "label", "quantity", "protocol", "mean", "ci95", "n"]
    pd.testing.assert_frame_equal(run.metrics[columns], written[columns])


def test_a_shard_run_twice_is_an_error(runs, tmp_path):
    root = tmp_path / "twice"
    shutil.copytree(runs / "sharded" / "0_1", root / "a")
    shutil.copytree(runs / "sharded" / "0_1", root / "b")
    with pytest.raises(ValueError, match=r"each i once"):
        summarize(root)


def test_the_report_lists_an_unpaired_configuration_with_the_reason_and_counts_every_shards_cases(runs, tmp_path):
    """γ = 0.5 has finished one shard of two (1 case), γ = 0 both (2 cases): the report cannot pair them, says why,
    and its runs table counts the cases of every finished shard."""
    root = tmp_path / "running"
    for name in ("0_1", "0_2", "0.5_1", "0.5_2"):
        shutil.copytree(runs / "sharded" / name, root / name)
    (root / "0.5_2" / "metrics.csv").unlink()
    write_report(root, tmp_path / "report")
    html = (tmp_path / "report" / "report.html").read_text()
    assert "γ &gt; 0 runs not paired with a γ = 0 run" in html
    assert "0.5_1 against 0_1,0_2: the runs edited different records" in html
    assert not (tmp_path / "report" / "paired.csv").exists()
    cases = pd.read_csv(tmp_path / "report" / "runs.csv").set_index("run")["cases"].to_dict()
    assert cases == {"0_1,0_2": 2, "0.5_1": 1}


def test_two_sweeps_of_the_same_sharded_settings_are_a_configuration_each(runs, tmp_path):
    """Shards 1/2 and 2/2 run twice, each time into a sweep folder of its own: one row per sweep, each with both
    shards, and the same metrics (the same cases, edited the same way). Within one folder a shard made twice is an
    error (test_a_shard_run_twice_is_an_error)."""
    root = tmp_path / "two_sweeps"
    for sweep in ("first", "second"):
        for shard in ("0_1", "0_2"):
            shutil.copytree(runs / "sharded" / shard, root / sweep / shard)
    table = summarize(root)
    edited = table[table.state == "edited"]
    assert sorted(edited["run"]) == ["first/0_1,first/0_2", "second/0_1,second/0_2"]
    assert list(edited["shards"]) == ["2/2", "2/2"] and list(edited["n_cases"]) == [2, 2]
    metrics = [c for c in edited.columns if c.split(" ")[0] in ("ES", "PS", "NS", "DNS")]
    assert edited[metrics].iloc[0].equals(edited[metrics].iloc[1])
    shutil.copytree(runs / "sharded" / "0_1", root / "first" / "again")
    with pytest.raises(ValueError, match=r"each i once; .*summarize each sweep's folder on its own"):
        summarize(root)


def test_shards_of_one_folder_split_in_different_counts_are_an_error(runs, tmp_path):
    """Shard 1/2 and a shard 2/3 are no configuration's shards: each i once, but two different n."""
    root = tmp_path / "mixed"
    for shard in ("0_1", "0_2"):
        shutil.copytree(runs / "sharded" / shard, root / shard)
    config = root / "0_2" / "config.yaml"
    text = config.read_text()
    assert text.count("shard: 2/2") == 1
    config.write_text(text.replace("shard: 2/2", "shard: 2/3"))
    with pytest.raises(ValueError, match=r"the shards of one configuration must be i/n with one n and each i once; "
                                         r"found .*0_1 \(1/2\), .*0_2 \(2/3\)"):
        summarize(root)
