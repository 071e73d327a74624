"""Every dataset format through `run_experiment` with the real config: each metric that applies is in the results.

Which metrics apply follows from what a format's records hold (see the fixtures): CounterFact-style
records are compared (ES/PS/NS/DNS) and have generation prompts (FL); zsRE is token-scored in both
target protocols; KnowEdit has relation specificity and portability; the SADR merged file mixes
both halves, so it has every success rate of SADR's Avg. S, and its commonsense questions (CS/DCS).
"""
from __future__ import annotations

import json

import pandas as pd
import pytest

from sadr.runner import run_experiment
from tests.runs import FIXTURES, composed, tiny_dir, tiny_overrides  # noqa: F401 (tiny_dir is a fixture)

COUNTERFACT = {"efficacy", "paraphrase", "neighborhood", "distract_neighborhood", "fluency"}
ZSRE = {"token_efficacy", "token_generalization", "locality"}
COMPARED = {"efficacy", "paraphrase", "neighborhood", "distract_neighborhood"}
COMMONSENSE = {"commonsense", "distract_commonsense"}

# (format, extra overrides, metrics that must be there, metrics that must not)
CASES = [
    pytest.param("counterfact", [], COUNTERFACT, ZSRE | COMMONSENSE | {"relation", "portability"}, id="counterfact"),
    pytest.param("multi_counterfact", [], COUNTERFACT, ZSRE | COMMONSENSE | {"relation", "portability"},
                 id="multi_counterfact"),
    pytest.param("offline_counterfact", [], COUNTERFACT | {"relation"}, ZSRE | COMMONSENSE | {"portability"},
                 id="offline_counterfact"),
    pytest.param("zsre", ["dataset.target=answers"], ZSRE, COMPARED | COMMONSENSE | {"fluency", "relation"},
                 id="zsre-answers"),
    pytest.param("zsre", ["dataset.target=alt"], ZSRE, COMPARED | COMMONSENSE | {"fluency", "relation"}, id="zsre-alt"),
    pytest.param("knowedit_counterfact", ["dataset.limit=2"], {"efficacy", "relation", "portability", "locality"},
                 {"paraphrase", "neighborhood", "distract_neighborhood", "fluency"} | ZSRE - {"locality"} | COMMONSENSE,
                 id="knowedit_counterfact"),
    pytest.param("sadr_merged", ["dataset.limit=2"], COUNTERFACT | COMMONSENSE | {"relation", "portability"}, ZSRE,
                 id="sadr_merged"),
]


def _run(tiny_dir, out, fmt: str, *extra: str):
    overrides = tiny_overrides(tiny_dir, out, f"dataset={fmt}", f"dataset.path={FIXTURES / f'{fmt}.json'}",
                               "dataset.limit=1", "eval.generation=true", "eval.generation_length=30", *extra)
    path = run_experiment(composed(overrides))
    rows = [json.loads(line) for line in (path / "cases.jsonl").read_text().splitlines()]
    return rows, pd.read_csv(path / "metrics.csv")


@pytest.mark.parametrize(("fmt", "extra", "present", "absent"), CASES)
def test_format_runs_with_every_metric_that_applies(tiny_dir, tmp_path, fmt, extra, present, absent):
    rows, table = _run(tiny_dir, tmp_path / "run", fmt, *extra)
    for state in ("edited", "unedited"):
        names = {name for row in rows for name in row[state]}
        assert present <= names, (state, present - names)
        assert not names & absent, (state, names & absent)
    for state in ("edited", "unedited"):
        for protocol in ("prompt", "case"):
            shown = set(table[(table.state == state) & (table.protocol == protocol) & (table.quantity == "value")].metric)
            assert present <= shown, (state, protocol, present - shown)


def test_zsre_targets_edit_towards_their_answer(tiny_dir, tmp_path, capsys):
    """answers edits towards answers[0], alt towards the counterfactual; both score token accuracy of that target,
    under the same labels, so the printed title names the protocol."""
    answers, _ = _run(tiny_dir, tmp_path / "answers", "zsre", "dataset.target=answers")
    assert " / zsre (dataset.target=answers) (1 case, " in capsys.readouterr().out
    alt, _ = _run(tiny_dir, tmp_path / "alt", "zsre", "dataset.target=alt")
    assert " / zsre (dataset.target=alt) (1 case, " in capsys.readouterr().out
    # the unedited model is the same: its locality is too, but efficacy scores a different target
    assert answers[0]["unedited"]["locality"] == alt[0]["unedited"]["locality"]
    assert answers[0]["unedited"]["token_efficacy"]["p_good"] != alt[0]["unedited"]["token_efficacy"]["p_good"]


def test_merged_file_gives_sadr_avg_s_from_both_halves(tiny_dir, tmp_path):
    _, table = _run(tiny_dir, tmp_path / "run", "sadr_merged", "dataset.limit=2")
    avg = table[(table.metric == "avg_s") & (table.state == "edited")]
    assert set(avg.protocol) == {"prompt", "case"}
    assert set(avg.components) == {"efficacy+paraphrase+neighborhood+relation+distract_neighborhood"}
