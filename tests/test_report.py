"""`sadr report` on a real sweep of the tiny model: the files it writes, and that every plotted number is the
number the run recorded (recomputed here from cases.jsonl by hand, and read back from the matplotlib artists)."""
from __future__ import annotations

import base64
import json
import math
import shutil
import warnings
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba
from omegaconf import OmegaConf
from typer.testing import CliRunner

from sadr.cli.main import app
from sadr.report import page
from sadr.report.build import FILES_LIST, MAX_STEM, ReportFolder, file_stem, write_report
from sadr.evaluation.summary import differing_keys, summarize
from sadr.evaluation.aggregate import metric_table
from sadr.evaluation.drift import ATTENTION, decode_entry
from sadr.report.data import (TRADEOFF_METRICS, Run, Series, bars_table, environments, load_runs, phase_seconds,
                              series_of, tally_cases)
from sadr.report.plots import bars_figure, drift_figure, tradeoff_figure
from sadr.results import RunDirectory
from sadr.runner import run_experiment
from tests.runs import composed, tiny_dir, tiny_overrides, written_rows  # noqa: F401 (tiny_dir is a fixture)

# folder -> (editor, γ): ROME without and with SADR (a pair), MEMIT with SADR only (a single point)
SWEEP = {"0": ("rome", 0.0), "1": ("rome", 0.01), "2": ("memit", 0.01)}


@pytest.fixture(scope="module")
def sweep(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for folder, (editor, gamma) in SWEEP.items():
        extra = [f"editor={editor}", f"sadr.lambda={gamma}"] + (["editor.layers=[1,2]"] if editor == "memit" else [])
        run_experiment(composed(tiny_overrides(tiny_dir, root / folder, *extra)))
    return root


@pytest.fixture(scope="module")
def report(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    write_report(sweep, out)
    return out


def attention(entry: dict) -> np.ndarray:
    """A subject_attention entry decoded by hand: base64 little-endian float16, one [layers, heads] block per prompt."""
    layers, heads = entry["shape"]
    return np.stack([np.frombuffer(base64.b64decode(blob), dtype="<f2").reshape(layers, heads).astype(np.float64)
                     for blob in entry["attention"]])


def attention_entry(blocks: list) -> dict:
    """[prompts][layers][heads] attention as the runner records it: base64 little-endian float16 per prompt."""
    blocks = np.asarray(blocks, dtype="<f2")
    return {"value": [], "encoding": "float16-base64", "shape": list(blocks.shape[1:]),
            "attention": [base64.b64encode(block.tobytes()).decode("ascii") for block in blocks]}


def matrix(path: Path) -> np.ndarray:
    return pd.read_csv(path, index_col="layer").to_numpy()


def test_every_file_is_written(report):
    expected = ["report.html", "tradeoff.csv", "paired.csv", "config_diff.csv", "environment.csv", "seconds.csv",
                "drift_rome_0.csv", "drift_rome_0.01.csv", "drift_memit_0.01.csv",
                "selected_heads_rome_0.01.csv", "selected_heads_memit_0.01.csv", "bars_rome.csv", "bars_memit.csv"]
    for plot in ("tradeoff", "drift_rome", "drift_memit", "bars_rome", "bars_memit"):
        assert (report / f"{plot}.png").read_bytes().startswith(b"\x89PNG")
        assert "<svg" in (report / f"{plot}.svg").read_text()[:2000]
        assert "<dc:date>" not in (report / f"{plot}.svg").read_text()  # undated: a report written again is the same
    for name in expected:
        assert (report / name).is_file(), name
    assert not (report / "selected_heads_rome_0.csv").exists()  # no SADR, no selection


def test_runs_in_long_folders_get_file_names_the_file_system_takes(sweep, tmp_path):
    for end in "ab":  # two runs of one γ: their files are told apart by folder, each 231 characters long
        shutil.copytree(sweep / "1", tmp_path / "runs" / ("x" * 230 + end))
    with warnings.catch_warnings(record=True) as caught:  # the figures' layouts take their labels (_shortened)
        warnings.simplefilter("always")
        write_report(tmp_path / "runs", tmp_path / "report")
    assert not [str(w.message) for w in caught if "constrained_layout" in str(w.message)]
    names = [path.name for path in (tmp_path / "report").iterdir()]
    assert max(len(name.encode()) for name in names) <= 255
    assert len([name for name in names if name.startswith("drift_rome_0.01_runx")]) == 2


def test_long_labels_are_shortened_in_the_middle_only_where_they_stay_distinct():
    from sadr.report.plots import _shortened

    a, b = "γ=0.01_run" + "x" * 30 + "a", "γ=0.01_run" + "x" * 30 + "b"
    assert _shortened(["unedited", a, b]) == ["unedited", "γ=0.01_runx…xxxxxxxxxxxa", "γ=0.01_runx…xxxxxxxxxxxb"]
    assert _shortened(["γ=0.01", "y" * 24]) == ["γ=0.01", "y" * 24]
    same_ends = ["γ=0.01_run" + "x" * 10 + middle + "x" * 20 for middle in ("a", "b")]
    assert _shortened(same_ends) == same_ends  # elided, the two would read the same


def test_tradeoff_numbers_are_the_rows_mean_and_ci(sweep, report):
    table = pd.read_csv(report / "tradeoff.csv", dtype={"run": str})
    assert set(table.run) == set(SWEEP) and set(table.metric) == set(TRADEOFF_METRICS)
    for _, point in table.iterrows():
        editor, gamma = SWEEP[point.run]
        assert (point.editor, point["lambda"]) == (editor, gamma)
        values = np.array([v for row in written_rows(sweep / point.run) for v in row["edited"].get(point.metric, {}).get("value", [])])
        assert point.n == len(values)
        assert point["mean"] == pytest.approx(100 * values.mean(), abs=1e-9)
        assert point.ci95 == pytest.approx(100 * 1.96 * values.std(ddof=1) / math.sqrt(len(values)), abs=1e-9)


def test_tradeoff_plot_draws_those_numbers(report):
    table = pd.read_csv(report / "tradeoff.csv", dtype={"run": str})
    figure = tradeoff_figure(table.sample(frac=1, random_state=0), TRADEOFF_METRICS)  # in any row order
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert len(panels) == len(TRADEOFF_METRICS)
    for ax, metric in zip(panels, TRADEOFF_METRICS):
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert ticks == ["0", "0.01"]
        assert ax.get_ylabel() == ("attention drift (pp)" if metric == "drift_max" else "% of prompts")
        lines = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
        assert set(lines) == {"rome", "memit"}
        for series, line in lines.items():
            points = table[(table.metric == metric) & (table.series == series)].sort_values("lambda")
            np.testing.assert_allclose(line.get_ydata(), points["mean"])
            assert [ticks[round(x)] for x in line.get_xdata()] == [f"{g:g}" for g in points["lambda"]]
        for series, container in zip(lines, ax.containers):  # one errorbar per series, in the lines' order
            points = table[(table.metric == metric) & (table.series == series)].sort_values("lambda")
            segments = container.lines[2][0].get_segments()
            for (low, high), mean, ci in zip(segments, points["mean"], points["ci95"]):
                assert (low[1], high[1]) == pytest.approx((mean - ci, mean + ci))
        assert len(lines["memit"].get_xdata()) == 1  # a single γ still shows as a point
        rome, memit = lines["rome"].get_xdata()[-1], lines["memit"].get_xdata()[0]  # both at γ = 0.01 (tick 1)
        assert rome < memit and (rome + memit) / 2 == pytest.approx(1.0)  # nudged apart, centred on their tick


def test_tradeoff_plot_hides_the_grid_s_panels_beyond_its_metrics(report):
    table = pd.read_csv(report / "tradeoff.csv", dtype={"run": str})
    figure = tradeoff_figure(table, TRADEOFF_METRICS[:4])  # a grid of 2 × 3, two cells empty
    assert len(figure.axes) == 6 and [ax.get_visible() for ax in figure.axes] == [True] * 4 + [False] * 2


def test_drift_maps_are_the_mean_increase_of_attention_on_dns_prompts(sweep, report):
    for folder, name in (("0", "drift_rome_0.csv"), ("1", "drift_rome_0.01.csv"), ("2", "drift_memit_0.01.csv")):
        increase = np.concatenate([attention(row["edited"]["subject_attention"]) - attention(row["unedited"]["subject_attention"])
                                   for row in written_rows(sweep / folder)])
        assert np.abs(increase).max() > 0  # the edit moved some head's attention, so the check is not 0 = 0
        np.testing.assert_allclose(matrix(report / name), 100 * increase.mean(axis=0), atol=1e-9)
    # one (layer, head) spelled out: the last layer's head 0, over every DNS prompt of the γ = 0 run
    by_hand = []
    for row in written_rows(sweep / "0"):
        after, before = attention(row["edited"]["subject_attention"]), attention(row["unedited"]["subject_attention"])
        by_hand += [100 * (after[p, -1, 0] - before[p, -1, 0]) for p in range(len(after))]
    assert matrix(report / "drift_rome_0.csv")[-1, 0] == pytest.approx(sum(by_hand) / len(by_hand))


def test_drift_map_weights_every_dns_prompt_alike_whatever_its_case():
    """The map is the mean over all DNS prompts, not over case means: case 0 has 1 prompt, case 1 has 3."""
    rows = [{"edited": {"subject_attention": attention_entry([[[0.5, 0.0]]])},
             "unedited": {"subject_attention": attention_entry([[[0.0, 0.0]]])}},
            {"edited": {"subject_attention": attention_entry([[[0.25, 0.5]]] * 3)},
             "unedited": {"subject_attention": attention_entry([[[0.25, 0.25]]] * 3)}}]
    # increases: [0.5, 0] once, [0, 0.25] three times -> [0.5, 0.75] / 4; case means would give [0.25, 0.125]
    np.testing.assert_allclose(tally_cases([rows]).drift, [[12.5, 18.75]])


def test_drift_map_as_loaded_is_the_mean_of_every_case_s_increases_stacked(sweep, tmp_path):
    """The report sums the map as it reads the rows; that is the mean of all prompts' increases concatenated, in
    float64, to the last bit. Cases with 1 to 7 DNS prompts (so the mean of case means would differ), and one case
    without attention, which adds nothing."""
    run = tmp_path / "runs" / "0"
    shutil.copytree(sweep / "0", run)
    recorded = written_rows(run)
    layers, heads = recorded[0]["edited"][ATTENTION]["shape"]
    rng = np.random.default_rng(0)
    rows = []
    for case_id, prompts in enumerate([1, 7, 2, 5, 3, 1, 6, 4]):
        row = json.loads(json.dumps(recorded[case_id % len(recorded)]))
        row["case_id"] = case_id
        for state in ("edited", "unedited"):
            row[state][ATTENTION] = attention_entry(rng.random((prompts, layers, heads)))
        rows.append(row)
    rows[3]["unedited"].pop(ATTENTION)
    (run / "cases.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    increases = [decode_entry(row["edited"][ATTENTION]) - decode_entry(row["unedited"][ATTENTION])
                 for row in rows if ATTENTION in row["unedited"]]
    expected = 100 * np.concatenate(increases).astype(np.float64).mean(axis=0)
    (loaded,) = load_runs(tmp_path / "runs")
    np.testing.assert_array_equal(loaded.cases.drift, expected)
    assert not np.allclose(expected, 100 * np.mean([increase.mean(axis=0) for increase in increases], axis=0))


def test_load_runs_keeps_no_rows(sweep, monkeypatch):
    """Each run's rows are reduced as they are read: when a run's rows are read, no earlier run's are still held, and
    the runs returned hold none (a sweep's rows take several GB a run at paper scale)."""
    class Rows(list):  # a list that can be referenced weakly
        pass

    read = []
    original = RunDirectory.rows

    def rows(self):
        assert all(ref() is None for ref in read), "an earlier run's rows are still held"
        out = Rows(original(self))
        read.append(weakref.ref(out))
        return out

    monkeypatch.setattr(RunDirectory, "rows", rows)
    runs = load_runs(sweep)
    assert len(read) == len(runs) == len(SWEEP)
    assert all(ref() is None for ref in read)


def test_selected_head_map_is_the_mean_count_over_the_cases_that_recorded_one():
    """Three SADR cases on 2 layers × 2 heads, one old row without counts: the map is the mean over the three,
    [[0, 3], [6, 0]] / 3 -> [[0, 1], [2, 0]] (not the sum, nor divided by every row); one case is its own map; no
    counts at all: no map."""
    rows = [{"diagnostics": {"selected_head_counts": counts}} for counts in
            ([[0, 1], [2, 0]], [[0, 2], [1, 0]], [[0, 0], [3, 0]])] + [{"diagnostics": {}}]
    np.testing.assert_allclose(tally_cases([rows]).selected_heads, [[0.0, 1.0], [2.0, 0.0]])
    np.testing.assert_allclose(tally_cases([rows[:1]]).selected_heads, [[0, 1], [2, 0]])
    assert tally_cases([rows[3:]]).selected_heads is None


def test_drift_figure_draws_those_maps_on_one_scale(report):
    drift = [("γ=0", matrix(report / "drift_rome_0.csv")), ("γ=0.01", matrix(report / "drift_rome_0.01.csv"))]
    selected = [("selected", matrix(report / "selected_heads_rome_0.01.csv"))]
    figure = drift_figure("rome", drift, selected)
    images = [ax.images[0] for ax in figure.axes if ax.images]
    assert len(images) == 3
    for image, (_, values) in zip(images, drift + selected):
        np.testing.assert_array_equal(image.get_array(), values)
    limit = max(np.abs(m).max() for _, m in drift)
    assert all((image.norm.vmin, image.norm.vmax) == pytest.approx((-limit, limit)) for image in images[:2])
    assert (images[2].norm.vmin, images[2].norm.vmax) == pytest.approx((0.0, selected[0][1].max()))  # counts: from 0


def test_drift_panel_titles_are_the_run_labels_shortened_in_the_middle():
    names = ["γ=0_run" + "x" * 30 + end for end in "ab"]
    figure = drift_figure("rome", [(name, np.zeros((2, 3))) for name in names], [])
    titles = [ax.get_title() for ax in figure.axes if ax.images]
    assert titles == ["γ=0_runxxxx…xxxxxxxxxxxa", "γ=0_runxxxx…xxxxxxxxxxxb"]


def test_selected_heads_are_the_regularizers_counts_per_edit(sweep, report):
    for folder, name in (("1", "selected_heads_rome_0.01.csv"), ("2", "selected_heads_memit_0.01.csv")):
        recorded = written_rows(sweep / folder)
        counts = np.array([row["diagnostics"]["selected_head_counts"] for row in recorded], dtype=np.float64)
        # the map and the regularizer's own total agree, and heads up to the edited layer are never selected
        assert counts.sum(axis=(1, 2)).tolist() == [row["diagnostics"]["selected_heads"] for row in recorded]
        edited_layer = max(OmegaConf.load(sweep / folder / "config.yaml").editor.layers)
        assert counts[:, edited_layer + 1 :].any() and not counts[:, : edited_layer + 1].any()
        np.testing.assert_allclose(matrix(report / name), counts.mean(axis=0))


def test_bars_are_each_runs_metrics_table(sweep, report):
    table = pd.read_csv(report / "bars_rome.csv", dtype={"run": str})
    assert list(dict.fromkeys(table.bar)) == ["unedited", "γ=0", "γ=0.01"]
    for _, bar in table.iterrows():
        metrics = pd.read_csv(sweep / bar.run / "metrics.csv")
        want = metrics[(metrics.state == bar.state) & (metrics.protocol == "prompt") & (metrics.metric == bar.metric)
                       & (metrics.quantity == bar.quantity)]
        assert bar["mean"] == pytest.approx(want["mean"].item())
    dns = table[table.metric == "distract_neighborhood"].set_index("bar")
    values = [v for row in written_rows(sweep / "0") for v in row["unedited"]["distract_neighborhood"]["value"]]
    assert dns.loc["unedited", "mean"] == pytest.approx(100 * np.mean(values))

    figure = bars_figure(table, "rome")
    names = list(dict.fromkeys(table.bar))
    for ax, metric in zip(figure.axes, dict.fromkeys(table.metric)):
        heights = {names[round(p.get_x() + p.get_width() / 2)]: p.get_height() for p in ax.patches}
        want = table[table.metric == metric].set_index("bar")["mean"].to_dict()
        assert heights == pytest.approx(want)
        colors = {names[round(p.get_x() + p.get_width() / 2)]: p.get_facecolor() for p in ax.patches}
        assert colors == {bar: to_rgba(color) for bar, color in zip(names, ["0.6", "C0", "C1"]) if bar in colors}
        ci = table[table.metric == metric].set_index("bar")["ci95"].fillna(0.0).to_dict()
        for note in ax.texts:  # each mean written just beyond its error bar's end
            bar = names[round(note.xy[0])]
            assert note.get_text() == f"{want[bar]:.3g}"
            assert note.xy[1] == pytest.approx(want[bar] + math.copysign(ci[bar], want[bar]))


def test_bars_show_score_and_avg_s_beside_the_success_rates():
    """Every metric is a bar, the harmonic-mean summaries too (SADR's Table 3 reports Avg. S beside ES … DNS). One case,
    prompt level: ES 100, PS 50, NS 100, RS 50, DNS 25 -> Score 3 / (1/100 + 1/50 + 1/100) = 75 and Avg. S
    5 / (1/100 + 1/50 + 1/100 + 1/50 + 1/25) = 50; magnitudes are no bars."""
    def entry(values, p_good, p_bad):
        return {"value": values, "p_good": p_good, "p_bad": p_bad}

    edited = {"efficacy": entry([1.0], [0.5], [0.25]), "paraphrase": entry([1.0, 0.0], [0.5, 0.25], [0.25, 0.5]),
              "neighborhood": entry([1.0, 1.0], [0.5, 0.5], [0.25, 0.25]),
              "relation": entry([0.0, 1.0], [0.25, 0.5], [0.5, 0.25]),
              "distract_neighborhood": entry([0.0, 1.0, 0.0, 0.0], [0.25, 0.5, 0.25, 0.25], [0.5, 0.25, 0.5, 0.5])}
    rows = [{"case_id": 0, "edited": edited, "unedited": edited}]
    run = Run("0", {"editor.name": "rome", "sadr.lambda": 0.0}, metric_table(rows), tally_cases([rows]), {"0": {}})
    table = bars_table(Series("rome", [run]))
    assert "magnitude" not in set(table.quantity)
    for bar in ("unedited", "γ=0"):
        summaries = table[(table.bar == bar) & (table.quantity == "harmonic_mean")].set_index("metric")["mean"]
        assert summaries.to_dict() == pytest.approx({"score": 75.0, "avg_s": 50.0})
        rates = table[(table.bar == bar) & (table.quantity == "value")].set_index("metric")["mean"]
        assert rates.to_dict() == pytest.approx({"efficacy": 100.0, "paraphrase": 50.0, "neighborhood": 100.0,
                                                 "relation": 50.0, "distract_neighborhood": 25.0})


def test_page_is_self_contained_and_holds_every_table(sweep, report):
    html = (report / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == len(list(report.glob("*.png")))
    assert "<script" not in html and "http://" not in html and "https://" not in html
    paired = pd.read_csv(report / "paired.csv", dtype={"run": str, "base_run": str})
    assert set(paired.run) == {"1"} and set(paired.base_run) == {"0"}  # MEMIT has no γ = 0 run to pair with
    assert all(f"<td>{metric}</td>" in html for metric in paired.metric)
    diff = pd.read_csv(report / "config_diff.csv", index_col="run")
    assert {"editor.name", "sadr.lambda", "editor.layers"} <= set(diff.columns)
    assert "seed" not in diff.columns and "model.name" not in diff.columns  # the same in every run
    env = json.loads((sweep / "0" / "environment.json").read_text())
    assert env["python"] in html and env["packages"]["torch"] in html and "Seconds per phase" in html


def test_phase_seconds_split_shared_edit_times_among_cases():
    def run(protocol, batch_size, seconds):
        return Run(protocol, {}, pd.DataFrame(), tally_cases([[
            {"protocol": protocol, "batch_size": batch_size, "seconds": {**s, "eval_per_case": 1.0}} for s in seconds
        ]]), {"x": {}})
    single = run("single", 1, [{"update": 2.0}, {"update": 3.0}])
    batch = run("batch", 2, [{"update": 4.0}, {"update": 4.0}])  # one edit of both cases
    sequential = run("sequential", 1, [{"update": 6.0}] * 3)  # every row holds the whole run's edit time
    table = phase_seconds([single, batch, sequential])
    assert table["update"].tolist() == [5.0, 4.0, 6.0]
    assert table["evaluation"].tolist() == [2.0, 2.0, 3.0] and table["cases"].tolist() == [2, 2, 3]
    assert table["total"].tolist() == [7.0, 6.0, 9.0]


def test_phase_seconds_add_the_shards_of_a_sequential_run():
    """Each shard of a sequential run stacks its own edits: its rows share its folder's time, and the shards add up."""
    def rows(n, update):
        return [{"protocol": "sequential", "batch_size": 1, "seconds": {"update": update, "eval_per_case": 1.0}}] * n
    run = Run("s_1,s_2", {}, pd.DataFrame(), tally_cases([rows(2, 4.0), rows(3, 9.0)]), {"s_1": {}, "s_2": {}})
    table = phase_seconds([run])
    assert table.loc["s_1,s_2", ["cases", "update", "evaluation", "total"]].tolist() == [5, 4.0 + 9.0, 5.0, 18.0]


def test_runs_of_one_environment_share_a_row():
    env = {"python": "3.11", "platform": "linux", "device_name": "cpu", "git_commit": "abc", "packages": {"torch": "2.13"}}
    runs = [Run(n, {}, pd.DataFrame(), tally_cases([[]]), {n: e})
            for n, e in (("0", env), ("1", env), ("2", {**env, "git_commit": "def"}))]
    runs.append(Run("3_1,3_2", {}, pd.DataFrame(), tally_cases([[], []]),
                    {"3_1": env, "3_2": {**env, "device_name": "gpu"}}))
    table = environments(runs)  # the shards of one configuration may have run on different machines
    assert table.runs.tolist() == ["0, 1, 3_1", "2", "3_2"] and table.torch.tolist() == ["2.13", "2.13", "2.13"]


def test_the_report_counts_the_plots_it_drew_not_those_an_earlier_report_left(sweep, tmp_path):
    (tmp_path / "bars_of_an_earlier_report.png").write_bytes(b"")
    done = CliRunner().invoke(app, ["report", str(sweep / "0"), "--out", str(tmp_path)])
    assert done.exit_code == 0, done.output
    drawn = (tmp_path / "report.html").read_text().count("<img ")
    assert drawn >= 2 and len(list(tmp_path.glob("*.png"))) == drawn + 1
    assert f" and {drawn} plots (PNG and SVG" in done.output, done.output


def test_a_report_removes_the_files_of_the_previous_report_it_does_not_write_again(sweep, tmp_path):
    """The sweep's report, then one of its γ = 0 run alone in the same folder: MEMIT's plots and tables and paired.csv
    would pass for the new report's; they go, and a file the report did not write stays."""
    (tmp_path / "notes.txt").write_text("mine")
    assert "removed" not in write_report(sweep, tmp_path)  # the first report in the folder: nothing of its own to go
    before = {path.name for path in tmp_path.iterdir()}
    assert {"bars_memit.png", "bars_memit.svg", "bars_memit.csv", "drift_memit_0.01.csv", "paired.csv"} <= before
    listed = (tmp_path / "report_files.txt").read_text().splitlines()
    assert listed == sorted(before - {"notes.txt", "report_files.txt"})
    done = CliRunner().invoke(app, ["report", str(sweep / "0"), "--out", str(tmp_path)])
    assert done.exit_code == 0, done.output
    after = {path.name for path in tmp_path.iterdir()}
    assert not {name for name in after if "memit" in name or "0.01" in name} and "paired.csv" not in after
    assert "notes.txt" in after and "bars_rome.png" in after
    listed = (tmp_path / "report_files.txt").read_text().splitlines()
    assert listed == sorted(after - {"notes.txt", "report_files.txt"})
    removed = len(before - after)
    assert done.output.rstrip().endswith(f"; removed the {removed} file(s) of the previous report that this one does "
                                         "not have"), done.output


def test_a_report_folder_removes_only_the_plain_names_its_list_holds(tmp_path):
    """report_files.txt is a file a user may edit: a blank line, a path into another folder and a name that is gone
    are passed over; a name listed and not written again is removed; one written again stays."""
    folder = tmp_path / "report"
    (folder / "sub").mkdir(parents=True)
    for name in ("stale.csv", "kept.csv", "sub/inner.csv", "mine.txt"):
        (folder / name).write_text("x")
    (tmp_path / "outside.csv").write_text("x")
    (folder / FILES_LIST).write_text("stale.csv\n\nkept.csv\n../outside.csv\nsub/inner.csv\ngone.csv\n" + str(
        tmp_path / "outside.csv") + "\n")
    report = ReportFolder(folder)
    report.csv(pd.DataFrame({"a": [1]}), "kept.csv", index=False)
    report.text("page.html", "<p>")
    assert report.finish() == ["gone.csv", "stale.csv"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([FILES_LIST, "kept.csv", "mine.txt", "page.html", "sub"])
    assert (folder / "sub" / "inner.csv").exists() and (tmp_path / "outside.csv").exists()
    assert (folder / FILES_LIST).read_text() == "kept.csv\npage.html\n"


def test_cli_reports_a_single_run(sweep, tmp_path):
    done = CliRunner().invoke(app, ["report", str(sweep / "0"), "--out", str(tmp_path)])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "report.html").is_file() and str(tmp_path / "report.html") in done.output
    table = pd.read_csv(tmp_path / "tradeoff.csv")
    assert set(table["lambda"]) == {0.0} and len(table) == len(TRADEOFF_METRICS)
    assert not (tmp_path / "paired.csv").exists()
    assert "Every run has the same config" in (tmp_path / "report.html").read_text()
    assert set(table["run"].astype(str)) == {"0"}  # the run's folder name, not "."


def test_a_report_of_runs_without_trade_off_metrics_says_so_instead_of_a_plot(sweep, tmp_path):
    run = tmp_path / "runs" / "0"
    shutil.copytree(sweep / "0", run)
    metrics = pd.read_csv(run / "metrics.csv")
    metrics[~metrics.metric.isin(TRADEOFF_METRICS)].to_csv(run / "metrics.csv", index=False)
    write_report(tmp_path / "runs", tmp_path / "report")
    assert "No run has any of the trade-off metrics" in (tmp_path / "report" / "report.html").read_text()
    assert not any((tmp_path / "report" / name).exists() for name in ("tradeoff.csv", "tradeoff.png", "tradeoff.svg"))
    assert (tmp_path / "report" / "bars_rome.png").is_file()  # the metrics it has are still drawn


def test_cli_reports_a_directory_without_runs(tmp_path):
    done = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert done.exit_code == 2
    assert done.output.strip().count("\n") == 0 and "no finished runs" in done.output
    assert not (tmp_path / "report").exists()


def test_page_links_each_figure_s_csv_files(report):
    """Every plot's data files are linked under it (the selected-heads maps too), and the CSVs carry no pandas index
    column of their own."""
    html = (report / "report.html").read_text()
    for prefix in ("tradeoff", "drift_", "selected_heads_", "bars_"):
        for path in report.glob(f"{prefix}*.csv"):
            assert f'href="{path.name}"' in html, path.name
    for stem in ("tradeoff", "drift_rome", "bars_rome"):
        assert f'href="{stem}.png"' in html and f'href="{stem}.svg"' in html
    assert pd.read_csv(report / "environment.csv").columns[0] == "runs"
    assert not any(column.startswith("Unnamed") for column in pd.read_csv(report / "tradeoff.csv").columns)


def test_file_stem_keeps_short_names_and_cuts_long_ones_with_a_hash_of_the_whole():
    assert file_stem("drift", "rome/a b", "0.01") == "drift_rome_a_b_0.01"
    assert file_stem("bars", "rome (model.name=m1)") == "bars_rome_model.name=m1"  # one "_" a run, none at the end
    exact = "x" * MAX_STEM
    assert file_stem(exact) == exact
    long_a, long_b = file_stem(exact + "a"), file_stem(exact + "b")
    assert len(long_a) == len(long_b) == MAX_STEM and long_a != long_b
    assert long_a.startswith("x" * (MAX_STEM - 11) + "_")


def test_tables_show_numbers_index_and_text_as_written():
    """Four significant digits, integers without a point (below 1e9), a dash for missing values, the named index as
    the first column (an unnamed one is not shown), and text escaped."""
    frame = pd.DataFrame({"value": [12.3456, float("nan"), 3.0, 2e9, 999999999.0, 1e9],
                          "note": ["<b>", "a", "b", "c", "d", "e"]},
                         index=pd.Index(["r1", "r2", "r3", "r4", "r5", "r6"], name="run"))
    html = page.table_html(frame)
    assert html.index("<th>run</th>") < html.index("<th>value</th>") and "<td>r1</td>" in html
    for cell in ("12.35", "–", "3", "2e+09", "999999999", "1e+09", "&lt;b&gt;"):
        assert f"<td>{cell}</td>" in html, cell
    assert "<b>" not in html
    unnamed = page.table_html(frame.reset_index(drop=True))
    assert unnamed.count("<th>") == 2 and "<td>r1</td>" not in unnamed and "<td>0</td>" not in unnamed


def test_page_sections_are_linked_and_text_escaped():
    text = page.page("t <1>", "s & u", [("drift", "A & B", [page.paragraph("x < y"),
                                                            page.figure_html("AAAA", "plot", "c < d", ["p&q.csv"])])])
    assert '<a href="#drift">A &amp; B</a>' in text and '<section id="drift">' in text
    assert "<title>t &lt;1&gt;</title>" in text and "<h1>t &lt;1&gt;</h1>" in text and "s &amp; u" in text
    assert "x &lt; y" in text and 'alt="c &lt; d"' in text and "<figcaption>c &lt; d<br>" in text
    assert all(f'href="{name}"' in text for name in ("plot.png", "plot.svg", "p&amp;q.csv"))
    assert "<1>" not in text and "c < d" not in text and "p&q" not in text


def test_drift_panels_say_which_runs_used_sadr(report):
    """Each drift panel's title names its γ and whether SADR was on (γ > 0): γ = 0 is the run without it. The
    titles are read from the SVG, where matplotlib writes each text beside its glyphs."""
    rome, memit = (report / "drift_rome.svg").read_text(), (report / "drift_memit.svg").read_text()
    assert "γ=0 (no SADR)" in rome and "γ=0.01 (SADR)" in rome and "γ=0 (SADR)" not in rome
    assert "γ=0.01 (SADR)" in memit and "no SADR" not in memit


def test_runs_table_counts_each_runs_cases(sweep, report):
    """dataset.limit=2: every run edited 2 cases, in runs.csv and seconds.csv alike."""
    for name in ("runs", "seconds"):
        table = pd.read_csv(report / f"{name}.csv", dtype={"run": str}).set_index("run")
        assert table["cases"].to_dict() == {folder: 2 for folder in SWEEP}, name
    assert all(len(written_rows(sweep / folder)) == 2 for folder in SWEEP)


def test_page_shows_the_keys_that_differ_between_runs(report):
    """The sweep's runs differ in editor, γ and layers: the page shows those keys as a table, not the same-config
    note. editor.layers is in no other table, so its header comes from the config differences."""
    html = (report / "report.html").read_text()
    assert "Config differences (only the keys that differ)" in html and "Every run has the same config" not in html
    assert "<th>editor.layers</th>" in html


def test_series_of_one_editor_are_labelled_by_the_always_shown_keys_that_tell_them_apart():
    """Two ROME groups on different models (and dataset limits), the second without and with SADR, and one MEMIT
    run: ROME's lines are told apart by model.name alone (a key of ALWAYS, so not by dataset.limit, and never by γ,
    in which runs of one line may differ); MEMIT, alone, keeps the bare editor name."""
    def run(name, editor, model, limit, gamma):
        settings = {"editor.name": editor, "model.name": model, "dataset.limit": limit, "sadr.lambda": gamma}
        return Run(name, settings, pd.DataFrame(), tally_cases([[]]), {name: {}})
    runs = [run("a", "rome", "m1", 2, 0.0), run("c", "rome", "m2", 3, 0.5), run("b", "rome", "m2", 3, 0.0),
            run("d", "memit", "m1", 2, 0.5)]
    lines = series_of(runs)
    assert [line.label for line in lines] == ["rome (model.name=m1)", "rome (model.name=m2)", "memit"]
    assert [[r.name for r in line.runs] for line in lines] == [["a"], ["b", "c"], ["d"]]  # by increasing γ


def test_selected_heads_are_drawn_for_a_run_that_recorded_no_drift(sweep, tmp_path):
    """A SADR run made with eval.drift=false has no subject_attention but still the heads SADR selected: its row of
    maps holds the selection alone."""
    run = tmp_path / "runs" / "1"
    shutil.copytree(sweep / "1", run)
    rows = written_rows(run)
    for row in rows:
        for state in ("edited", "unedited"):
            row[state].pop("subject_attention")
    (run / "cases.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    write_report(tmp_path / "runs", tmp_path / "report")
    names = {path.name for path in (tmp_path / "report").iterdir()}
    assert {"drift_rome.png", "drift_rome.svg", "selected_heads_rome_0.01.csv"} <= names
    assert not any(name.startswith("drift_rome") and name.endswith(".csv") for name in names)
    counts = np.array([row["diagnostics"]["selected_head_counts"] for row in rows], dtype=np.float64)
    np.testing.assert_allclose(matrix(tmp_path / "report" / "selected_heads_rome_0.01.csv"), counts.mean(axis=0))


def test_summary_columns_leave_out_where_the_hyperparameters_come_from(sweep, tmp_path):
    """editor.source, a sentence on where an editor's hyperparameters were published, differs between editors; it is
    no column of the summary, whose columns are the settings that differ (editor.layers here) and the ALWAYS keys."""
    root = tmp_path / "runs"
    for folder, note in (("0", "ROME repo (GPT-J)"), ("2", "MEMIT repo (GPT-J), " + "a long note " * 20)):
        shutil.copytree(sweep / folder, root / folder)
        config = root / folder / "config.yaml"
        config.write_text(config.read_text().replace("source: ''", f"source: '{note}'", 1))
    assert "editor.source" in differing_keys({run: load_runs(run)[0].settings for run in (root / "0", root / "2")})
    columns = set(summarize(root).columns)
    assert "editor.source" not in columns and {"editor.name", "editor.layers", "model.name", "sadr.lambda"} <= columns


def test_dataset_url_is_a_column_only_where_it_says_more_than_the_dataset_name(sweep, tmp_path):
    """A run that read dataset.path did not use dataset.url, so the URL is none of its settings; runs that downloaded
    their records show the URL as a column only where runs of one dataset.name differ in it (a mirror)."""
    root = tmp_path / "runs"

    def runs(*datasets):
        shutil.rmtree(root, ignore_errors=True)
        for folder, (name, path, url) in zip(("0", "2"), datasets):
            shutil.copytree(sweep / folder, root / folder)
            config = root / folder / "config.yaml"
            values = OmegaConf.load(config)
            values.dataset.update(name=name, path=path, url=url)
            OmegaConf.save(values, config)
        return set(summarize(root).columns), differing_keys({run: load_runs(run)[0].settings for run in
                                                            (root / "0", root / "2")})

    read = runs(("counterfact", "/data/cf.json", "https://a/cf.json"), ("zsre", "/data/zsre.json", "https://a/z.json"))
    assert "dataset.url" not in read[0] | set(read[1]) and "dataset.path" in read[1]
    downloaded = runs(("counterfact", None, "https://a/cf.json"), ("zsre", None, "https://a/z.json"))
    assert "dataset.url" not in downloaded[0] and "dataset.url" in downloaded[1]
    mirrored = runs(("counterfact", None, "https://a/cf.json"), ("counterfact", None, "https://b/cf.json"))
    assert "dataset.url" in mirrored[0]
    # a run of the dataset that read a file beside one that downloaded it: dataset.path says it, no mirror
    one_read = runs(("counterfact", "/data/cf.json", "https://a/cf.json"), ("counterfact", None, "https://a/cf.json"))
    assert "dataset.url" not in one_read[0] and "dataset.path" in one_read[0]
