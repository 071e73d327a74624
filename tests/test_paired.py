"""`sadr compare`: paired differences, up/down counts and the sign test, on hand-made run directories."""
from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from sadr.cli.main import app
from sadr.errors import DamagedFileError
from sadr.evaluation.paired import compare_runs, sign_test


def _run(path, values: dict[int, dict[str, list[float]]]):
    path.mkdir(parents=True)
    rows = [{"case_id": cid, "edited": {m: {"value": v} for m, v in metrics.items()}} for cid, metrics in values.items()]
    (path / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sign_test_matches_hand_computed_binomial_tails():
    assert sign_test(0, 0) == 1.0
    assert sign_test(6, 0) == pytest.approx(2 / 64)  # 2 · 0.5^6
    assert sign_test(2, 1) == 1.0  # 2 · (1 + 3) / 8, capped
    assert sign_test(1, 9) == pytest.approx(2 * (1 + 10) / 1024)


def test_sign_test_of_balanced_changes_is_one_not_more():
    """With as many ups as downs both tails hold more than half the mass: 2 · P(X <= 3) = 2 · 42 / 64 for 3 vs 3, so the
    two-sided p is capped at 1 (a p above 1 is no probability)."""
    assert sign_test(1, 1) == sign_test(3, 3) == 1.0
    assert sign_test(2, 4) == sign_test(4, 2) == pytest.approx(2 * (1 + 6 + 15) / 64)


def test_paired_difference_counts_and_ci_on_a_hand_computed_example(tmp_path):
    base = _run(tmp_path / "a", {0: {"distract_neighborhood": [1, 0], "efficacy": [1]},
                                 1: {"distract_neighborhood": [0, 1], "efficacy": [0]}})
    other = _run(tmp_path / "b", {0: {"distract_neighborhood": [1, 1], "efficacy": [1]},
                                  1: {"distract_neighborhood": [1, 0], "efficacy": [0]}})
    table = compare_runs(base, other).set_index("metric")
    dns = table.loc["DNS"]
    # differences per prompt: 0, +1, +1, -1 -> mean 0.25, sample sd sqrt(2.75 / 3)
    assert (dns.n, dns.up, dns.down) == (4, 2, 1)
    assert (dns.base, dns.other) == pytest.approx((50.0, 75.0))
    assert dns.difference == pytest.approx(25.0)
    assert dns["difference ci95"] == pytest.approx(100 * 1.96 * (2.75 / 3) ** 0.5 / 2)
    assert dns["sign-test p"] == 1.0
    assert table.loc["ES"].difference == 0 and table.loc["ES"].up == 0
    assert "NS" not in table.index  # absent from both runs


def test_runs_are_compared_on_their_edited_scores_not_the_unedited_baseline(tmp_path):
    """Rows hold both states; the paired difference is between the two edited models. Here the unedited scores
    differ the other way round (as they never would), so reading them would give −100 instead of +100."""
    for name, edited, unedited in (("a", [0], [1]), ("b", [1], [0])):
        (tmp_path / name).mkdir()
        row = {"case_id": 0, "edited": {"efficacy": {"value": edited}}, "unedited": {"efficacy": {"value": unedited}}}
        (tmp_path / name / "cases.jsonl").write_text(json.dumps(row) + "\n")
    es = compare_runs(tmp_path / "a", tmp_path / "b").set_index("metric").loc["ES"]
    assert (es.base, es.other, es.difference, es.up, es.down) == (0.0, 100.0, 100.0, 1, 0)


def test_case_protocol_pairs_each_case_s_mean_over_its_prompts(tmp_path):
    base = _run(tmp_path / "a", {0: {"distract_neighborhood": [1, 0]}, 1: {"distract_neighborhood": [0, 1]},
                                 2: {"efficacy": [1]}})  # no DNS prompt in case 2: not an observation of DNS
    other = _run(tmp_path / "b", {0: {"distract_neighborhood": [1, 1]}, 1: {"distract_neighborhood": [1, 0]},
                                  2: {"efficacy": [1]}})
    dns = compare_runs(base, other, "case").set_index("metric").loc["DNS"]
    # case means: base 0.5, 0.5; other 1.0, 0.5 -> differences +0.5, 0 (×100: 50, 0), sample sd 50 / sqrt(2)
    assert (dns.n, dns.up, dns.down) == (2, 1, 0)
    assert (dns.base, dns.other, dns.difference) == pytest.approx((50.0, 75.0, 25.0))
    assert dns["difference ci95"] == pytest.approx(1.96 * (50 / 2**0.5) / 2**0.5)
    with pytest.raises(ValueError, match="protocol must be one of"):
        compare_runs(base, other, "record")


def test_cases_pair_by_id_whatever_order_their_rows_were_written_in(tmp_path):
    """Side-by-side cases and resumed runs write rows in another order than a run of one case at a time."""
    base = _run(tmp_path / "a", {0: {"efficacy": [0]}, 1: {"efficacy": [1]}, 2: {"efficacy": [1]}})
    other = _run(tmp_path / "b", {2: {"efficacy": [0]}, 1: {"efficacy": [1]}, 0: {"efficacy": [1]}})
    es = compare_runs(base, other).set_index("metric").loc["ES"]
    assert (es.up, es.down) == (1, 1)  # case 0 up, case 2 down; paired by position, nothing would change


def test_a_metric_one_run_did_not_evaluate_is_left_out(tmp_path):
    base = _run(tmp_path / "a", {0: {"efficacy": [1], "fluency": [6.2, 6.3]}, 1: {"efficacy": [0], "fluency": [6.0]}})
    other = _run(tmp_path / "b", {0: {"efficacy": [1]}, 1: {"efficacy": [1]}})
    table = compare_runs(base, other).set_index("metric")
    assert list(table.index) == ["ES"] and (table.loc["ES"].up, table.loc["ES"].down) == (1, 0)


def test_runs_on_different_records_or_prompts_are_refused(tmp_path):
    base = _run(tmp_path / "a", {0: {"efficacy": [1]}, 1: {"efficacy": [1]}})
    with pytest.raises(ValueError, match=r"different records \(case ids only in the base: \['1'\], only in the other: \[\]\)"):
        compare_runs(base, _run(tmp_path / "b", {0: {"efficacy": [1]}}))
    # either run may hold the extra case: a base with fewer cases is refused too, not paired on its cases only
    with pytest.raises(ValueError, match=r"only in the base: \[\], only in the other: \['2'\]\)"):
        compare_runs(base, _run(tmp_path / "d", {0: {"efficacy": [1]}, 1: {"efficacy": [1]}, 2: {"efficacy": [0]}}))
    with pytest.raises(ValueError, match=r"case 1: efficacy has 1 prompts .* but 2"):
        compare_runs(base, _run(tmp_path / "c", {0: {"efficacy": [1]}, 1: {"efficacy": [1, 0]}}))
    with pytest.raises(FileNotFoundError, match="holds no cases.jsonl"):
        compare_runs(base, tmp_path / "missing")
    assert not (tmp_path / "missing").exists()  # a mistyped folder is not made


def test_cli_prints_the_table_and_writes_csv(tmp_path):
    base = _run(tmp_path / "a", {0: {"distract_neighborhood": [0, 0, 0]}})
    other = _run(tmp_path / "b", {0: {"distract_neighborhood": [1, 1, 0]}})
    done = subprocess.run([sys.executable, "-m", "sadr.cli.main", "compare", str(base), str(other), "--out",
                           str(tmp_path / "c.csv")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "| DNS" in done.stdout and (tmp_path / "c.csv").read_text().startswith("metric,n,base,other")
    by_case = subprocess.run([sys.executable, "-m", "sadr.cli.main", "compare", str(base), str(other), "--protocol", "case"],
                             capture_output=True, text=True)
    assert by_case.returncode == 0 and "| DNS      |   1 |" in by_case.stdout, by_case.stdout + by_case.stderr
    bad = subprocess.run([sys.executable, "-m", "sadr.cli.main", "compare", str(base), str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "holds no cases.jsonl" in bad.stderr
    in_new_folder = subprocess.run([sys.executable, "-m", "sadr.cli.main", "compare", str(base), str(other), "--out",
                                    str(tmp_path / "new" / "folder" / "c.csv")], capture_output=True, text=True)
    assert in_new_folder.returncode == 0, in_new_folder.stderr  # made, as summarize --out and report --out make theirs
    assert (tmp_path / "new" / "folder" / "c.csv").read_text() == (tmp_path / "c.csv").read_text()
    (tmp_path / "a-file").write_text("")
    unwritable = subprocess.run([sys.executable, "-m", "sadr.cli.main", "compare", str(base), str(other), "--out",
                                 str(tmp_path / "a-file" / "c.csv")], capture_output=True, text=True)
    assert unwritable.returncode == 2 and "Traceback" not in unwritable.stderr, unwritable.stderr
    assert unwritable.stderr.startswith("error: ") and "a-file" in unwritable.stderr
    assert unwritable.stdout == ""  # the error line alone, no table above it


def test_cli_pairs_prompts_unless_told_otherwise(tmp_path):
    """One case of 3 prompts: 3 observations by prompt (the default), 1 by case."""
    base = _run(tmp_path / "a", {0: {"distract_neighborhood": [0, 0, 0]}})
    other = _run(tmp_path / "b", {0: {"distract_neighborhood": [1, 1, 0]}})
    for extra, n in (([], 3), (["--protocol", "case"], 1)):
        done = CliRunner().invoke(app, ["compare", str(base), str(other), "--out", str(tmp_path / "c.csv"), *extra])
        assert done.exit_code == 0, done.output
        assert pd.read_csv(tmp_path / "c.csv").set_index("metric").loc["DNS", "n"] == n
        protocol = "case" if extra else "prompt"
        assert done.output.startswith(f"{other} against the base {base}, {protocol} by {protocol}, ×100 (difference: "
                                      "other − base):\n|")  # runs without config.yaml: no settings to compare
        assert done.output.endswith(f"wrote {tmp_path / 'c.csv'}\n")
    done = CliRunner().invoke(app, ["compare", str(base), str(other), "--out", str(tmp_path / "c.tex")])
    assert done.exit_code == 0 and done.output.endswith(f"wrote {tmp_path / 'c.tex'}\n"), done.output
    latex = (tmp_path / "c.tex").read_text()  # the printed title, and the differences to 3 digits as printed
    assert latex.startswith(f"% {done.output.splitlines()[0]}\n"
                            "% $m \\pm c$: a mean m and the half-width c of its 95 % CI\n"
                            "% needs \\usepackage{booktabs}\n")
    assert "\nDNS & $3$ & $0$ & $66.7$ & $66.7 \\pm " in latex and latex.endswith("\\end{tabular}\n")


def test_cli_writes_latex_only_to_a_file_whose_suffix_is_tex(tmp_path):
    """`--out` picks LaTeX by the file's suffix, in either case (C.TEX, as a .YML settings file is .yml); a name that
    merely ends in "tex" (c_tex) is written as CSV."""
    base = _run(tmp_path / "a", {0: {"distract_neighborhood": [0, 0, 0]}})
    other = _run(tmp_path / "b", {0: {"distract_neighborhood": [1, 1, 0]}})
    done = CliRunner().invoke(app, ["compare", str(base), str(other), "--out", str(tmp_path / "c_tex")])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "c_tex").read_text().splitlines()[0] == ("metric,n,base,other,difference,difference ci95,up,"
                                                                "down,sign-test p")
    done = CliRunner().invoke(app, ["compare", str(base), str(other), "--out", str(tmp_path / "C.TEX")])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "C.TEX").read_text().splitlines()[3:5] == ["\\begin{tabular}{lrrrrrrr}", "\\toprule"]


def test_cli_names_the_settings_in_which_the_two_runs_differ(tmp_path):
    """A difference no one meant (another δ step count) is seen above the table."""
    from omegaconf import OmegaConf

    base = _run(tmp_path / "a", {0: {"distract_neighborhood": [0, 0, 0]}})
    other = _run(tmp_path / "b", {0: {"distract_neighborhood": [1, 1, 0]}})
    for run, gamma, steps in ((base, 0.0, 20), (other, 0.03, 5)):
        OmegaConf.save({"editor": {"name": "rome", "v_num_grad_steps": steps}, "sadr": {"lambda": gamma}}, run / "config.yaml")
    done = CliRunner().invoke(app, ["compare", str(base), str(other)])
    assert done.exit_code == 0, done.output
    assert done.output.splitlines()[0].endswith(
        "; their settings differ in: editor.v_num_grad_steps (20 → 5), sadr.lambda (0.0 → 0.03):")
    OmegaConf.save({"editor": {"name": "rome", "v_num_grad_steps": 20}, "sadr": {"lambda": 0.0}}, other / "config.yaml")
    assert CliRunner().invoke(app, ["compare", str(base), str(other)]).output.splitlines()[0].endswith(
        "; their settings differ in: nothing:")


def test_cli_reports_runs_that_cannot_be_paired_as_one_error_line(tmp_path):
    """compare_runs refuses runs on different records with a ValueError: a usage error, not a traceback."""
    base = _run(tmp_path / "a", {0: {"efficacy": [1]}, 1: {"efficacy": [1]}})
    other = _run(tmp_path / "b", {0: {"efficacy": [1]}})
    done = CliRunner().invoke(app, ["compare", str(base), str(other)])
    assert done.exit_code == 2, done.output
    assert done.output.startswith("error: the runs edited different records") and done.output.count("\n") == 1


def test_sweeps_pair_each_sadr_run_with_the_gamma_zero_run_of_the_same_setting(tmp_path):
    from omegaconf import OmegaConf

    from sadr.evaluation.summary import paired_with_baselines

    def run(name, editor, gamma, steps, dns):
        path = _run(tmp_path / name, {0: {"distract_neighborhood": dns}})
        OmegaConf.save({"editor": {"name": editor, "v_num_grad_steps": steps}, "sadr": {"lambda": gamma}},
                       path / "config.yaml")
        (path / "metrics.csv").write_text("state,metric\n")

    run("0", "rome", 0.0, 20, [0, 0])
    run("1", "rome", 0.1, 20, [1, 0])
    run("2", "rome", 0.1, 80, [1, 1])  # the paper's SADR runs also changed the δ-step count
    run("3", "memit", 0.1, 20, [1, 1])  # no MEMIT baseline: not paired with ROME's
    table, unpaired = paired_with_baselines(tmp_path)
    dns = table[table.metric == "DNS"].set_index("run")
    assert sorted(dns.index) == ["1", "2"] and set(dns.base_run) == {"0"} and set(dns["base steps"]) == {20}
    assert dns.loc["1", "difference"] == pytest.approx(50.0) and dns.loc["2", "up"] == 2
    assert unpaired == []
    alone, _ = paired_with_baselines(tmp_path / "3")
    assert alone.empty

    run("4", "rome", 0.0, 80, [1, 0])  # a γ = 0 run with the δ steps of run 2: run 2's baseline now
    run("5", "rome", 0.1, 40, [1, 1])  # two γ = 0 runs, neither with 40 steps: which one is meant is unknown
    table, unpaired = paired_with_baselines(tmp_path)
    dns = table[table.metric == "DNS"].set_index("run")
    assert dns.base_run.to_dict() == {"1": "0", "2": "4"} and dns.loc["2", "up"] == 1
    assert len(unpaired) == 1 and unpaired[0].startswith("5 (40 δ steps): several γ = 0 runs, none with its δ steps")


def test_two_sweeps_of_the_same_settings_pair_each_sadr_run_with_its_own_sweep_s_baseline(tmp_path):
    """Two sweeps under one folder (a design run twice) make a row each in the summary; each γ > 0 run pairs with the
    γ = 0 run of its own sweep. It was paired with the first one found, another sweep's, or, where SADR took more δ
    steps than its baseline (the paper's design), left unpaired as having several γ = 0 runs."""
    from omegaconf import OmegaConf

    from sadr.evaluation.summary import paired_with_baselines

    def run(name, gamma, steps, dns):
        path = _run(tmp_path / name, {0: {"distract_neighborhood": dns}})
        OmegaConf.save({"editor": {"name": "rome", "v_num_grad_steps": steps}, "sadr": {"lambda": gamma}},
                       path / "config.yaml")
        (path / "metrics.csv").write_text("state,metric\n")

    for sweep, base_dns in (("a", [0, 0]), ("b", [1, 0])):
        run(f"{sweep}/0", 0.0, 20, base_dns)
        run(f"{sweep}/1", 0.1, 20, [1, 1])
        run(f"{sweep}/2", 0.1, 80, [1, 1])
    table, unpaired = paired_with_baselines(tmp_path)
    dns = table[table.metric == "DNS"].set_index("run")
    assert dns.base_run.to_dict() == {"a/1": "a/0", "a/2": "a/0", "b/1": "b/0", "b/2": "b/0"} and unpaired == []
    assert dns.loc["b/1", "difference"] == pytest.approx(50.0)


def test_a_sadr_sweep_without_a_baseline_of_its_own_pairs_with_the_baseline_sweep_s_run(tmp_path):
    """The baseline swept apart from SADR (its own folder): a γ > 0 run whose folder holds no γ = 0 run pairs with
    the one in the other folder, as where each run had a folder of its own."""
    from omegaconf import OmegaConf

    from sadr.evaluation.summary import paired_with_baselines

    for name, gamma, dns in (("base/0", 0.0, [0, 0]), ("sadr/0", 0.1, [1, 0])):
        path = _run(tmp_path / name, {0: {"distract_neighborhood": dns}})
        OmegaConf.save({"editor": {"name": "rome", "v_num_grad_steps": 20}, "sadr": {"lambda": gamma}},
                       path / "config.yaml")
        (path / "metrics.csv").write_text("state,metric\n")
    table, unpaired = paired_with_baselines(tmp_path)
    dns = table[table.metric == "DNS"].set_index("run")
    assert unpaired == [] and dns.base_run.to_dict() == {"sadr/0": "base/0"}
    assert dns.loc["sadr/0", "difference"] == pytest.approx(50.0)


def test_a_baseline_with_other_metrics_pairs_on_the_metrics_both_runs_have(tmp_path):
    """A γ = 0 run made with a shorter `eval.metrics` (an older default) is still the baseline of a SADR run: the
    metrics both have are compared, the others left out."""
    from omegaconf import OmegaConf

    from sadr.evaluation.summary import paired_with_baselines

    for name, gamma, metrics, values in (("0", 0.0, ["distract_neighborhood"], {"distract_neighborhood": [0, 0]}),
                                         ("1", 0.1, ["distract_neighborhood", "commonsense"],
                                          {"distract_neighborhood": [1, 0], "commonsense": [1]})):
        path = _run(tmp_path / name, {0: values})
        OmegaConf.save({"editor": {"name": "rome", "v_num_grad_steps": 20}, "sadr": {"lambda": gamma},
                        "eval": {"metrics": metrics, "batch_size": 64}}, path / "config.yaml")
        (path / "metrics.csv").write_text("state,metric\n")
    table, unpaired = paired_with_baselines(tmp_path)
    assert unpaired == [] and set(table.metric) == {"DNS"} and set(table.base_run) == {"0"}
    assert table.set_index("metric").loc["DNS", "difference"] == pytest.approx(50.0)


def test_a_mean_that_rounds_to_zero_shows_as_0_in_summary_md_not_as_minus_0():
    from sadr.evaluation.summary import markdown_table, rounded_metrics

    table = pd.DataFrame({"sadr.lambda": [-0.0], "run": ["a"], "Drift": [-0.001], "Magnitude": [-0.006]})
    rounded = rounded_metrics(table)
    assert rounded.loc[0, "sadr.lambda"] == 0 and math.copysign(1, rounded.loc[0, "sadr.lambda"]) == -1  # a setting
    assert math.copysign(1, rounded.loc[0, "Drift"]) == 1 and rounded.loc[0, "Magnitude"] == -0.01
    assert [cell.strip() for cell in markdown_table(rounded).splitlines()[2].split("|")[3:5]] == ["0", "-0.01"]


def test_rounded_metrics_keeps_counts_integers():
    """n_cases and n_obs are metric columns too: made floats (-0.0 → 0.0 by adding 0.0), 123456789 would show as
    1.23457e+08."""
    from sadr.evaluation.summary import markdown_table, rounded_metrics

    rounded = rounded_metrics(pd.DataFrame({"run": ["a"], "n_cases": [20], "n_obs": [123456789], "Drift": [-0.001]}))
    assert markdown_table(rounded).splitlines()[2].replace(" ", "") == "|a|20|123456789|0|"


def test_summary_csv_keeps_full_precision_and_summary_md_rounds_only_the_metrics(tmp_path):
    from omegaconf import OmegaConf

    from sadr.evaluation.aggregate import metric_table
    from sadr.evaluation.summary import write_summary

    for name, gamma, ns in (("0", 0.0, [1, 0, 0]), ("1", 0.001, [1, 1, 0])):
        path = _run(tmp_path / name, {0: {"neighborhood": ns}})
        OmegaConf.save({"editor": {"name": "rome", "v_num_grad_steps": 20}, "sadr": {"lambda": gamma}}, path / "config.yaml")
        rows = [json.loads(line) for line in (path / "cases.jsonl").read_text().splitlines()]
        metric_table(rows, states=("edited",)).to_csv(path / "metrics.csv", index=False)
    write_summary(tmp_path, "prompt")
    table = pd.read_csv(tmp_path / "summary.csv").set_index("sadr.lambda")
    assert table.loc[0.0, "NS"] == pytest.approx(100 / 3, abs=1e-9) and table.loc[0.001, "NS"] == pytest.approx(200 / 3, abs=1e-9)
    markdown = (tmp_path / "summary.md").read_text()
    assert "33.33 " in markdown and "66.67 " in markdown and "0.001 " in markdown and "33.333" not in markdown
    assert markdown.startswith(f"prompt-level results ×100 of every run in {tmp_path}:\n|")  # read alone, it says so
    latex = (tmp_path / "summary.tex").read_text()  # the same rounding, each CI beside its mean
    assert latex.startswith(f"% prompt-level results ×100 of every run in {tmp_path}:\n")
    assert r"$33.33 \pm " in latex and r"$66.67 \pm " in latex and "$0.001$" in latex and "33.333" not in latex

    text = write_summary(tmp_path, "case")  # one case of 3 prompts: a single pair of case means
    paired = pd.read_csv(tmp_path / "paired.csv").set_index("metric")
    assert paired.loc["NS", "n"] == 1 and paired.loc["NS", "difference"] == pytest.approx(100 / 3)
    assert "case by case (as `sadr compare --protocol case`)" in text
    assert (tmp_path / "summary.md").read_text().startswith("case-level results")
    assert (tmp_path / "paired.md").read_text().startswith("each γ > 0 run against its γ = 0 run, case by case")
    assert (tmp_path / "paired.tex").read_text().startswith("% each γ > 0 run against its γ = 0 run, case by case")
    # base, other and their difference to 3 digits, as paired.md shows them; one pair of case means has no CI
    assert " & NS & $1$ & $33.3$ & $66.7$ & $33.3$ & $1$ & $0$ & $1$ \\\\\n" in (tmp_path / "paired.tex").read_text()


def test_a_summary_finds_the_runs_and_reads_their_settings_once_for_both_tables(tmp_path, monkeypatch):
    """summary and paired tables come from one `configurations` pass: a sweep's folders are walked and every
    config.yaml read once, not once per table."""
    from omegaconf import OmegaConf

    from sadr.evaluation import summary
    from sadr.evaluation.aggregate import metric_table

    for name, gamma, ns in (("0", 0.0, [1, 0, 0]), ("1", 0.1, [1, 1, 0])):
        path = _run(tmp_path / name, {0: {"neighborhood": ns}})
        OmegaConf.save({"editor": {"name": "rome", "v_num_grad_steps": 20}, "sadr": {"lambda": gamma}}, path / "config.yaml")
        rows = [json.loads(line) for line in (path / "cases.jsonl").read_text().splitlines()]
        metric_table(rows, states=("edited",)).to_csv(path / "metrics.csv", index=False)
    calls = []
    counted = summary.configurations
    monkeypatch.setattr(summary, "configurations", lambda root: calls.append(root) or counted(root))
    summary.write_summary(tmp_path, "prompt")
    assert len(calls) == 1 and (tmp_path / "paired.csv").is_file()


def test_a_summary_in_which_no_run_pairs_removes_an_earlier_summary_s_paired_tables(tmp_path):
    """paired.csv/.md left from a summary of runs that paired would pass, beside the new summary.md, for its pairs."""
    import shutil

    from omegaconf import OmegaConf

    from sadr.evaluation.aggregate import metric_table
    from sadr.evaluation.summary import write_summary

    for name, gamma in (("0", 0.0), ("1", 0.1)):
        path = _run(tmp_path / "runs" / name, {0: {"neighborhood": [1, 0]}})
        OmegaConf.save({"editor": {"name": "rome", "v_num_grad_steps": 20}, "sadr": {"lambda": gamma}},
                       path / "config.yaml")
        rows = [json.loads(line) for line in (path / "cases.jsonl").read_text().splitlines()]
        metric_table(rows, states=("edited",)).to_csv(path / "metrics.csv", index=False)
    out = tmp_path / "tables"
    assert "removed" not in write_summary(tmp_path / "runs", "prompt", out)
    assert all((out / f"paired.{kind}").is_file() for kind in ("csv", "md", "tex"))
    shutil.rmtree(tmp_path / "runs" / "1")
    text = write_summary(tmp_path / "runs", "prompt", out)
    assert not any((out / f"paired.{kind}").exists() for kind in ("csv", "md", "tex"))
    assert text.endswith(f"wrote {out / 'summary.csv'}, {out / 'summary.md'}, {out / 'summary.tex'}; removed the "
                         "earlier paired.csv, paired.md and paired.tex: no run pairs now"), text
    assert write_summary(tmp_path / "runs", "prompt", out).endswith("summary.tex")


@pytest.mark.parametrize("states", [("edited", "unedited"), ("edited",)])
def test_the_summary_has_the_same_table_under_every_pandas(states, tmp_path):
    """The unedited row leaves γ and the δ steps blank (not "nan"), and the step counts stay integers, with or without
    an unedited row; pandas 2 warned that it would change such a table's dtypes (pandas 3 did), so a warning fails."""
    import warnings

    from omegaconf import OmegaConf

    from sadr.evaluation.aggregate import metric_table
    from sadr.evaluation.summary import markdown_table, rounded_metrics, summarize

    for name, gamma, steps in (("0", 0.0, 20), ("1", 0.001, 5)):
        path = _run(tmp_path / name, {0: {"neighborhood": [1, 0, 0]}})
        rows = [{**row, "unedited": row["edited"]} for row in map(json.loads, (path / "cases.jsonl").read_text().splitlines())]
        OmegaConf.save({"model": {"name": "m"}, "dataset": {"name": "d"}, "sadr": {"lambda": gamma},
                        "editor": {"name": "rome", "v_num_grad_steps": steps}}, path / "config.yaml")
        metric_table(rows, states=states).to_csv(path / "metrics.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        table = summarize(tmp_path, "prompt")
    markdown = markdown_table(rounded_metrics(table)[["editor.name", "sadr.lambda", "editor.v_num_grad_steps", "state"]])
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in markdown.splitlines()[2:]]
    expected = [["rome", "0", "20", "edited"], ["rome", "0.001", "5", "edited"]]
    assert cells == ([["none", "", "", "unedited"]] if "unedited" in states else []) + expected
    assert set(summarize(tmp_path / "1", "prompt").run) == {"1"}  # a run summarized alone: its folder's name, not "."


def test_the_markdown_tables_leave_a_cell_blank_where_a_run_has_no_value(tmp_path):
    """A metric one run did not evaluate, or a setting one editor does not have, is a blank cell in summary.md, not
    "nan"; the CSV keeps it empty as well."""
    from omegaconf import OmegaConf

    from sadr.evaluation.aggregate import metric_table
    from sadr.evaluation.summary import write_summary

    for name, editor, values in (("0", {"name": "rome"}, {"neighborhood": [1, 0], "efficacy": [1]}),
                                 ("1", {"name": "memit", "mom2_update_weight": 2000}, {"neighborhood": [1, 1]})):
        path = _run(tmp_path / name, {0: values})
        OmegaConf.save({"editor": editor, "sadr": {"lambda": 0.0}}, path / "config.yaml")
        metric_table([json.loads(line) for line in (path / "cases.jsonl").read_text().splitlines()],
                     states=("edited",)).to_csv(path / "metrics.csv", index=False)
    write_summary(tmp_path, "prompt")
    markdown = (tmp_path / "summary.md").read_text()
    header, _, *lines = markdown.splitlines()[1:]
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    rows = [dict(zip(columns, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines]
    assert "nan" not in markdown.lower()
    assert [(r["editor.name"], r["editor.mom2_update_weight"], r["ES"], r["NS"]) for r in rows] == [
        ("rome", "", "100", "50"), ("memit", "2000", "", "100")]
    with open(tmp_path / "summary.csv", newline="") as file:
        written = list(csv.DictReader(file))
    assert [(r["editor.name"], r["editor.mom2_update_weight"], r["ES"]) for r in written] == [
        ("rome", "", "100.0"), ("memit", "2000.0", "")]


def test_a_sweep_ends_with_its_tables_or_one_line_saying_why_there_are_none(tmp_path, capsys):
    """The callback every sweep runs: the tables `sadr summarize` writes; where none can be made, one line on stderr
    and no exception, since the sweep's runs are finished and kept."""
    from omegaconf import OmegaConf

    from sadr.evaluation.aggregate import metric_table
    from sadr.evaluation.summary import SummarizeSweep

    sweep = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    SummarizeSweep().on_multirun_end(sweep)
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"\nno tables for the sweep (no finished runs under {tmp_path}")
    assert err.endswith(f"`sadr summarize {tmp_path}` makes the tables once the problem is fixed\n")
    path = _run(tmp_path / "0", {0: {"neighborhood": [1, 0]}})
    OmegaConf.save({"editor": {"name": "rome", "v_num_grad_steps": 20}, "sadr": {"lambda": 0.0}}, path / "config.yaml")
    metric_table([json.loads(line) for line in (path / "cases.jsonl").read_text().splitlines()],
                 states=("edited",)).to_csv(path / "metrics.csv", index=False)
    SummarizeSweep("case").on_multirun_end(sweep)
    out, err = capsys.readouterr()
    assert err == "" and out.startswith(f"\ncase-level results ×100 of every run in {tmp_path}:\n")
    assert (tmp_path / "summary.md").read_text() in out


def test_every_shard_that_measured_nothing_is_named_in_the_order_of_its_folder(tmp_path):
    """Shards 2/2 (folder s_a) and 1/2 (s_b) of one configuration both measured nothing: both are named, not only the
    configuration's first shard, and in the order of their paths (the sweep folder's), not of their shard numbers."""
    from omegaconf import OmegaConf

    from sadr.evaluation.aggregate import metric_table
    from sadr.evaluation.summary import write_summary

    for name, values, seed, shard in (("0", {"neighborhood": [1, 0]}, 0, None), ("s_a", {}, 1, "2/2"),
                                      ("s_b", {}, 1, "1/2")):
        path = _run(tmp_path / name, {0: values})
        OmegaConf.save({"editor": {"name": "rome"}, "sadr": {"lambda": 0.0}, "seed": seed,
                        "dataset": {"shard": shard}}, path / "config.yaml")
        rows = [json.loads(line) for line in (path / "cases.jsonl").read_text().splitlines()]
        metric_table(rows, states=("edited",)).to_csv(path / "metrics.csv", index=False)
    text = write_summary(tmp_path, "prompt")
    assert list(pd.read_csv(tmp_path / "summary.csv", dtype={"run": str}).run) == ["0"]
    listed = sorted(tmp_path / name for name in ("s_b", "s_a"))
    assert text.split("\nwrote ")[0].endswith("(their eval.metrics had no prompt in their cases):\n"
                                              + "".join(f"  {run}\n" for run in listed))


def test_a_run_that_measured_nothing_is_named_beside_the_summary_of_the_others(tmp_path):
    """A run whose metrics.csv has no entry (its metrics had no prompt in its cases) is left out of the summary and the
    report, and named; with no other run, the summary's error says so (it was a ValueError: cannot convert float NaN
    to integer)."""
    from omegaconf import OmegaConf

    from sadr.evaluation.aggregate import metric_table
    from sadr.evaluation.summary import summarize, write_summary

    for name, values in (("0", {"neighborhood": [1, 0]}), ("1", {})):
        path = _run(tmp_path / name, {0: values})
        OmegaConf.save({"editor": {"name": "rome"}, "sadr": {"lambda": 0.0}, "seed": int(name)}, path / "config.yaml")
        rows = [json.loads(line) for line in (path / "cases.jsonl").read_text().splitlines()]
        metric_table(rows, states=("edited",)).to_csv(path / "metrics.csv", index=False)
    text = write_summary(tmp_path, "prompt")
    assert list(pd.read_csv(tmp_path / "summary.csv", dtype={"run": str}).run) == ["0"]
    assert text.split("\nwrote ")[0].endswith("not in the tables: runs whose metrics.csv has no entry (their "
                                              f"eval.metrics had no prompt in their cases):\n  {tmp_path / '1'}\n")
    with pytest.raises(FileNotFoundError, match=r"no run under .*1 has a metric entry in its metrics\.csv: .*1$"):
        summarize(tmp_path / "1")
    from sadr.report.build import write_report

    write_report(tmp_path)  # it was a ZeroDivisionError: a figure of no panel
    assert ("Not shown: runs whose metrics.csv has no entry (their eval.metrics had no prompt in their cases): 1."
            in (tmp_path / "report" / "report.html").read_text())


def test_a_run_whose_rows_file_has_no_whole_row_is_named_as_such(tmp_path):
    base = _run(tmp_path / "a", {0: {"efficacy": [1]}})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "cases.jsonl").write_text('{"case_id": 0, "edi')  # killed while its first row was written
    with pytest.raises(FileNotFoundError, match=r"b has no finished case in its cases\.jsonl"):
        compare_runs(base, tmp_path / "b")


def test_a_row_without_its_edited_scores_is_named_as_damage(tmp_path):
    """A hand-edited file: one line of the CLI, naming the case, the file and the fix (it was a KeyError)."""
    base = _run(tmp_path / "a", {0: {"efficacy": [1]}, 1: {"efficacy": [0]}})
    other = _run(tmp_path / "b", {0: {"efficacy": [1]}})
    with open(other / "cases.jsonl", "a") as rows:
        rows.write(json.dumps({"case_id": 1, "unedited": {"efficacy": {"value": [0]}}}) + "\n")
    done = CliRunner().invoke(app, ["compare", str(base), str(other)])
    assert done.exit_code == 2 and done.output.count("\n") == 1, done.output
    assert done.output.startswith(f"error: case 1 in {other / 'cases.jsonl'} has no edited scores (an object under "
                                  "\"edited\"), so the file was damaged or edited: delete that line")


def _set_row_fields(run, **fields):
    """Give the one row of a run made by `_run` these fields."""
    row = json.loads((run / "cases.jsonl").read_text())
    (run / "cases.jsonl").write_text(json.dumps({**row, **fields}) + "\n")


def test_runs_of_different_files_that_share_case_ids_are_refused(tmp_path):
    base = _run(tmp_path / "a", {0: {"efficacy": [1]}})
    other = _run(tmp_path / "b", {0: {"efficacy": [0]}})
    for run, subject in ((base, "Duchy of Quenmark"), (other, "Velimir Ostrander")):
        _set_row_fields(run, subject=subject)
    with pytest.raises(ValueError, match=r"case 0 has subject 'Duchy of Quenmark' in one run but 'Velimir Ostrander' "
                                         r"in the other: the runs read different dataset files"):
        compare_runs(base, other)
    for run, target in ((base, "Kesh"), (other, "Ulmar")):  # one subject, two new targets: two files again
        _set_row_fields(run, subject="Duchy of Quenmark", target_new=target)
    with pytest.raises(ValueError, match=r"case 0 has target_new 'Kesh' in one run but 'Ulmar' in the other"):
        compare_runs(base, other)


def test_a_run_whose_rows_predate_target_new_pairs_with_one_whose_rows_have_it(tmp_path):
    """Rows written before they recorded the new target are compared on what both give (the subject)."""
    base = _run(tmp_path / "a", {0: {"efficacy": [1]}})
    other = _run(tmp_path / "b", {0: {"efficacy": [0]}})
    for run, extra in ((base, {}), (other, {"target_new": "Kesh"})):
        _set_row_fields(run, subject="Duchy of Quenmark", **extra)
    table = compare_runs(base, other).set_index("metric")
    assert table.loc["ES", "n"] == 1 and table.loc["ES", "difference"] == pytest.approx(-100)


@pytest.mark.parametrize("edited", [None, [1], "scores"])
def test_a_row_whose_edited_scores_are_no_object_is_named_as_damage(edited, tmp_path):
    """`edited` present but not an object (a hand edit gave it null or a list) is damage too, not an AttributeError."""
    base = _run(tmp_path / "a", {0: {"efficacy": [1]}})
    other = _run(tmp_path / "b", {0: {"efficacy": [1]}})
    _set_row_fields(other, edited=edited)
    with pytest.raises(DamagedFileError, match=r"case 0 in .*cases\.jsonl has no edited scores"):
        compare_runs(base, other)


def test_a_base_whose_rows_have_target_new_pairs_with_a_run_whose_rows_predate_it(tmp_path):
    """The other order of `test_a_run_whose_rows_predate_target_new_pairs_with_one_whose_rows_have_it`: a key is
    compared only where both runs' rows give it, whichever run lacks it."""
    base = _run(tmp_path / "a", {0: {"efficacy": [1]}})
    other = _run(tmp_path / "b", {0: {"efficacy": [0]}})
    for run, extra in ((base, {"target_new": "Kesh"}), (other, {})):
        _set_row_fields(run, subject="Duchy of Quenmark", **extra)
    table = compare_runs(base, other).set_index("metric")
    assert table.loc["ES", "n"] == 1 and table.loc["ES", "difference"] == pytest.approx(-100)


def test_runs_without_a_metric_in_common_are_refused_not_given_an_empty_table(tmp_path):
    base = _run(tmp_path / "a", {0: {"efficacy": [1]}})
    other = _run(tmp_path / "b", {0: {"paraphrase": [0]}})
    with pytest.raises(ValueError, match=r"no per-prompt metric values in common between .*a and .*b"):
        compare_runs(base, other)


def test_runs_of_different_datasets_that_share_case_ids_are_refused(tmp_path):
    base = _run(tmp_path / "a", {0: {"efficacy": [1]}})
    other = _run(tmp_path / "b", {0: {"efficacy": [0]}})
    for run, dataset in ((base, "counterfact"), (other, "zsre")):
        _set_row_fields(run, dataset=dataset)
    with pytest.raises(ValueError, match=r"case 0 has dataset 'counterfact' in one run but 'zsre' in the other"):
        compare_runs(base, other)


def test_shards_of_which_one_has_begun_its_rows_are_named_as_without_a_finished_case(tmp_path):
    """Of two shards, one has written part of its first row and the other nothing yet: the runs have begun."""
    base = _run(tmp_path / "a", {0: {"efficacy": [1]}})
    (tmp_path / "b1").mkdir()
    (tmp_path / "b1" / "cases.jsonl").write_text('{"case_id": 0, "edi')  # killed while its first row was written
    (tmp_path / "b2").mkdir()
    with pytest.raises(FileNotFoundError, match=r"b2 has no finished case in its cases\.jsonl"):
        compare_runs(base, [tmp_path / "b1", tmp_path / "b2"])


def test_summary_reports_each_protocols_own_mean_and_names_the_unedited_editor_none(tmp_path):
    """docs/metrics.md: a summary never mixes protocols. Case 0 has 4 NS prompts all kept, case 1 has 2 all lost: the
    prompt protocol gives 4/6 = 66.67, the case protocol (1 + 0) / 2 = 50, each in its own summary. The unedited row
    (the same model whatever the editor) is labelled editor `none`; n_cases counts the 2 records."""
    from omegaconf import OmegaConf

    from sadr.evaluation.aggregate import metric_table
    from sadr.evaluation.summary import summarize

    path = tmp_path / "run"
    path.mkdir()
    rows = [{"case_id": 0, "edited": {"neighborhood": {"value": [1, 1, 1, 1]}},
             "unedited": {"neighborhood": {"value": [1, 1, 1, 1]}}},
            {"case_id": 1, "edited": {"neighborhood": {"value": [0, 0]}},
             "unedited": {"neighborhood": {"value": [1, 1]}}}]
    (path / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    OmegaConf.save({"model": {"name": "gpt2"}, "dataset": {"name": "counterfact"}, "editor": {"name": "rome"},
                    "sadr": {"lambda": 0.0}}, path / "config.yaml")
    metric_table(rows).to_csv(path / "metrics.csv", index=False)
    expected = {"prompt": 100 * 4 / 6, "case": 50.0}
    for protocol, mean in expected.items():
        table = summarize(tmp_path, protocol).set_index("state")
        assert table.loc["edited", "NS"] == pytest.approx(mean, abs=1e-9), protocol
        assert table.loc["unedited", "NS"] == pytest.approx(100.0), protocol
        assert table.loc["unedited", "editor.name"] == "none" and table.loc["edited", "editor.name"] == "rome"
        assert table.loc["edited", "n_cases"] == 2  # records, not the 6 prompts


@pytest.mark.parametrize("command", ["summarize", "compare"])
def test_an_unknown_protocol_is_refused_with_the_choices_before_any_run_is_read(command, tmp_path):
    """summarize refused it in a message of its own and compare in another; both now name the two choices, which
    their --help lists too."""
    folders = [str(tmp_path / "a")] * (2 if command == "compare" else 1)  # folders that hold no run
    done = CliRunner().invoke(app, [command, *folders, "--protocol", "cases"])
    said = " ".join(re.sub("[│╭╮╰╯─]", " ", done.output).split())  # typer's box wraps the message
    assert done.exit_code == 2 and "'cases' is not one of 'prompt', 'case'" in said, done.output
    assert "prompt|case" in CliRunner().invoke(app, [command, "--help"]).output  # <prompt|case> or, typer 0.16, [...]


def test_compare_pairs_prompts_unless_told_to_pair_cases_and_says_which_in_its_title(tmp_path):
    """The default is --protocol prompt: 3 prompts of one case are 3 observations; the title names the protocol's
    word, not the choice's Python name."""
    base = _run(tmp_path / "a", {0: {"distract_neighborhood": [0, 0, 0]}})
    other = _run(tmp_path / "b", {0: {"distract_neighborhood": [1, 1, 0]}})
    plain, prompt, case = (CliRunner().invoke(app, ["compare", str(base), str(other), *extra]) for extra in
                           ([], ["--protocol", "prompt"], ["--protocol", "case"]))
    assert plain.exit_code == 0 and plain.output == prompt.output, plain.output
    assert ", prompt by prompt, ×100" in plain.output.splitlines()[0] and "| DNS      |   3 |" in plain.output
    assert ", case by case, ×100" in case.output.splitlines()[0] and "| DNS      |   1 |" in case.output


def _finished(path, values: dict[int, dict[str, list[float]]], config: dict, states=("edited",)):
    """A run made by `_run` (its rows hold the same scores unedited and edited), with its config.yaml and the
    metrics.csv the runner writes from its rows."""
    from omegaconf import OmegaConf

    from sadr.evaluation.aggregate import metric_table

    _run(path, values)
    lines = (path / "cases.jsonl").read_text().splitlines()
    rows = [{**row, "unedited": row["edited"]} for row in map(json.loads, lines)]
    OmegaConf.save(config, path / "config.yaml")
    metric_table(rows, states=states).to_csv(path / "metrics.csv", index=False)
    return path


ROME = {"editor": {"name": "rome"}, "sadr": {"lambda": 0.0}}


def test_the_config_yaml_of_a_run_s_hydra_folder_is_no_unfinished_run(tmp_path):
    """Hydra keeps its own config.yaml under .hydra in every run folder, without metrics.csv beside it."""
    from sadr.evaluation.summary import unfinished_runs, write_summary

    run = _finished(tmp_path / "0", {0: {"neighborhood": [1, 0]}}, ROME)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text((run / "config.yaml").read_text())
    assert unfinished_runs(tmp_path) == []
    assert "runs without metrics" not in write_summary(tmp_path, "prompt")


def test_a_metrics_csv_without_a_config_yaml_beside_it_is_no_run(tmp_path):
    from sadr.evaluation.summary import find_runs

    run = _finished(tmp_path / "0", {0: {"neighborhood": [1, 0]}}, ROME)
    (tmp_path / "copies").mkdir()
    (tmp_path / "copies" / "metrics.csv").write_text((run / "metrics.csv").read_text())
    assert find_runs(tmp_path) == [run]


def test_a_merged_configuration_names_its_shards_in_the_order_of_their_indexes(tmp_path):
    """Shard 2/2 in folder s_a, shard 1/2 in s_b: the row's run lists s_b first, whatever the folders' order."""
    from sadr.evaluation.summary import configurations, summarize

    for name, shard, values in (("s_a", "2/2", [1, 1]), ("s_b", "1/2", [1, 0])):
        _finished(tmp_path / name, {int(shard[0]): {"neighborhood": values}}, {**ROME, "dataset": {"shard": shard}})
    (configuration,) = configurations(tmp_path)
    assert configuration.runs == [tmp_path / "s_b", tmp_path / "s_a"] and configuration.shard_indexes == (1, 2)
    edited = summarize(tmp_path).set_index("state").loc["edited"]
    assert (edited.run, edited.shards, edited.NS) == ("s_b,s_a", "2/2", pytest.approx(75.0))


def test_the_unedited_rows_of_two_models_with_the_same_scores_are_both_kept(tmp_path):
    """The unedited model's row is shown once per model, even where two models score alike."""
    from sadr.evaluation.summary import summarize

    for model in ("gpt2", "gpt-j"):
        config = {**ROME, "model": {"name": model}, "dataset": {"name": "counterfact"}}
        _finished(tmp_path / model, {0: {"neighborhood": [1, 0]}}, config, ("edited", "unedited"))
    table = summarize(tmp_path)
    unedited = table[table.state == "unedited"]
    assert sorted(unedited["model.name"]) == ["gpt-j", "gpt2"] and set(unedited.NS) == {50.0}


def test_a_setting_two_levels_deep_is_a_column_under_its_dotted_name(tmp_path):
    from sadr.evaluation.summary import summarize

    for name, samples in (("0", 100), ("1", 200)):
        _finished(tmp_path / name, {0: {"neighborhood": [1, 0]}}, {**ROME, "model": {"stats": {"n_samples": samples}}})
    table = summarize(tmp_path)
    assert list(table["model.stats.n_samples"]) == [100, 200] and "model.stats" not in table


def test_the_title_of_a_comparison_names_no_settings_where_one_run_has_no_config_yaml(tmp_path):
    from sadr.evaluation.summary import pair_title

    base = _finished(tmp_path / "a", {0: {"neighborhood": [1, 0]}}, ROME)
    other = _run(tmp_path / "b", {0: {"neighborhood": [1, 1]}})
    assert pair_title(base, other, "prompt") == (f"{other} against the base {base}, prompt by prompt, ×100 "
                                                 "(difference: other − base):")


def test_a_sweep_whose_shards_cannot_be_merged_ends_with_one_line_saying_why(tmp_path, capsys):
    """A ValueError (a shard made twice), as a missing folder, is one line on stderr, not a traceback after the
    runs."""
    from omegaconf import OmegaConf

    from sadr.evaluation.summary import SummarizeSweep

    for name in ("a", "b"):
        _finished(tmp_path / name, {0: {"neighborhood": [1, 0]}}, {**ROME, "dataset": {"shard": "1/2"}})
    SummarizeSweep().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("\nno tables for the sweep (the shards of one configuration must be i/n")


def test_cli_summarize_takes_its_protocol_and_writes_where_out_says(tmp_path):
    """`sadr summarize ROOT --protocol case --out OUT`: case 0 keeps its 4 NS prompts, case 1 loses its 2, so the case
    protocol gives (100 + 0) / 2 = 50 where the prompt protocol would give 4/6 = 66.7; the tables go to OUT alone."""
    root, out = tmp_path / "runs", tmp_path / "tables"
    _finished(root / "0", {0: {"neighborhood": [1, 1, 1, 1]}, 1: {"neighborhood": [0, 0]}}, ROME)
    done = CliRunner().invoke(app, ["summarize", str(root), "--protocol", "case", "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert done.output.startswith(f"case-level results ×100 of every run in {root}:"), done.output
    assert pd.read_csv(out / "summary.csv").set_index("state").loc["edited", "NS"] == pytest.approx(50.0)
    assert not (root / "summary.csv").exists()


def test_cli_prints_the_paired_table_to_three_significant_digits(tmp_path):
    """As paired.md and the LaTeX file show them: 2 of 3 prompts turned distracted, 200/3 = 66.666... printed 66.7."""
    base = _run(tmp_path / "a", {0: {"distract_neighborhood": [0, 0, 0]}})
    other = _run(tmp_path / "b", {0: {"distract_neighborhood": [1, 1, 0]}})
    done = CliRunner().invoke(app, ["compare", str(base), str(other)])
    assert done.exit_code == 0, done.output
    row = next(line for line in done.output.splitlines() if line.startswith("| DNS"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:5] == ["DNS", "3", "0", "66.7", "66.7"], row
