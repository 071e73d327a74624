"""Metric tables on hand-made results: both protocols, CIs, magnitudes, summaries, and the token-accuracy path."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from sadr.data.records import ContrastPrompt, EditCase, EditRequest, LabeledPrompt
from sadr.evaluation import prompt_metrics
from sadr.evaluation.aggregate import compact_table, harmonic_mean, mean_ci, metric_table
from sadr.evaluation.probes import Probe, resolve_metrics
from sadr.evaluation.scorer import PairScores
from sadr.evaluation.summary import summarize


def test_harmonic_mean():
    assert harmonic_mean([50.0, 100.0]) == pytest.approx(200 / 3)  # 2 / (1/50 + 1/100)
    assert harmonic_mean([80.0, 80.0, 80.0]) == pytest.approx(80.0)
    assert harmonic_mean([90.0, 0.0, 70.0]) == 0.0  # one failed component zeroes the score


def test_mean_ci():
    # [1, 0, 1, 1]: mean 3/4, sample variance (3 · 1/16 + 9/16) / 3 = 1/4, CI = 1.96 · (1/2) / √4
    assert mean_ci([1, 0, 1, 1]) == pytest.approx((0.75, 0.49, 4))
    mean, ci, n = mean_ci([0.3])
    assert (mean, n) == (0.3, 1) and math.isnan(ci)
    assert mean_ci([])[2] == 0


def entry(values, p_good=None, p_bad=None):
    out = {"value": values}
    if p_good is not None:
        out["p_good"] = p_good
    if p_bad is not None:
        out["p_bad"] = p_bad
    return out


# Case A has 4 neighborhood prompts, case B 2: the prompt protocol weights A twice as much as the case protocol.
ROWS = [
    {"edited": {"efficacy": entry([1.0], [0.6], [0.2]),
                "paraphrase": entry([1.0, 0.0], [0.5, 0.1], [0.3, 0.3]),
                "neighborhood": entry([1.0, 1.0, 1.0, 1.0]),
                "fluency": entry([6.0, 5.0])},
     "unedited": {"efficacy": entry([0.0], [0.1], [0.5])}},
    {"edited": {"efficacy": entry([1.0], [0.4], [0.3]),
                "paraphrase": entry([1.0, 1.0], [0.3, 0.2], [0.1, 0.1]),
                "neighborhood": entry([0.0, 0.0]),
                "token_efficacy": entry([0.5], [0.2])},
     "unedited": {"efficacy": entry([0.0], [0.2], [0.4])}},
]


def pick(table, metric, protocol, quantity="value", state="edited"):
    row = table[(table.metric == metric) & (table.protocol == protocol) & (table.quantity == quantity)
                & (table.state == state)]
    assert len(row) == 1, (metric, protocol, quantity, state)
    return row.iloc[0]


def test_prompt_and_case_protocols_differ_as_defined():
    table = metric_table(ROWS)
    prompt, case = pick(table, "neighborhood", "prompt"), pick(table, "neighborhood", "case")
    # prompt: [1, 1, 1, 1, 0, 0] -> 4/6; variance (4 · 1/9 + 2 · 4/9) / 5 = 4/15; CI = 1.96 · √(4/15 / 6)
    assert (prompt["mean"], prompt["ci95"], prompt["n"]) == pytest.approx((400 / 6, 196 * math.sqrt(4 / 90), 6))
    # case: [1, 0] -> 1/2; variance 1/2; CI = 1.96 · √(1/2 / 2) = 0.98
    assert (case["mean"], case["ci95"], case["n"]) == pytest.approx((50.0, 98.0, 2))
    # equal prompt counts: both protocols give the same mean (3/4), not the same n
    assert pick(table, "paraphrase", "prompt")["mean"] == pytest.approx(pick(table, "paraphrase", "case")["mean"]) == 75.0
    assert (pick(table, "paraphrase", "prompt")["n"], pick(table, "paraphrase", "case")["n"]) == (4, 2)


def test_magnitudes_are_mean_p_good_minus_p_bad():
    table = metric_table(ROWS)
    # paraphrase differences: A [0.2, -0.2], B [0.2, 0.1]
    assert pick(table, "paraphrase", "prompt", "magnitude")["mean"] == pytest.approx(100 * 0.3 / 4)
    assert pick(table, "paraphrase", "case", "magnitude")["mean"] == pytest.approx(100 * (0.0 + 0.15) / 2)
    assert pick(table, "efficacy", "case", "magnitude", state="unedited")["mean"] == pytest.approx(-30.0)
    # without p_bad (token accuracy, fluency) there is no magnitude
    assert not ((table.metric.isin(["token_efficacy", "fluency", "neighborhood"])) & (table.quantity == "magnitude")).any()


def test_token_accuracy_and_fluency_are_shown_times_100():
    table = metric_table(ROWS)
    assert pick(table, "token_efficacy", "prompt")["mean"] == pytest.approx(50.0)
    assert pick(table, "token_efficacy", "prompt")["n"] == 1  # only case B has it
    assert pick(table, "fluency", "prompt")["mean"] == pytest.approx(550.0)
    assert set(table[table.metric == "fluency"].label) == {"FL"}


def test_summaries_combine_their_components_per_protocol():
    table = metric_table(ROWS)
    for protocol in ("prompt", "case"):
        score = pick(table, "score", protocol, "harmonic_mean")
        parts = [pick(table, m, protocol)["mean"] for m in ("efficacy", "paraphrase", "neighborhood")]
        assert score["mean"] == pytest.approx(harmonic_mean(parts))
        assert score["components"] == "efficacy+paraphrase+neighborhood" and math.isnan(score["ci95"])
    assert pick(table, "score", "prompt", "harmonic_mean")["mean"] == pytest.approx(3 / (1 / 100 + 1 / 75 + 1 / (400 / 6)))
    assert "avg_s" not in set(table.metric)  # no RS / DNS in these rows
    # the unedited state has only ES: no summary for it
    assert not ((table.state == "unedited") & (table.quantity == "harmonic_mean")).any()
    assert set(table[table.quantity != "harmonic_mean"].components) == {""}


def test_summaries_count_the_cases():
    """A Score / Avg. S row's n is the number of cases, in both protocols: not its number of components (3 or 5) nor
    any component's own n (its prompts, here 4, 8 or 12)."""
    values = {"efficacy": [[1], [1], [1], [0]], "paraphrase": [[1, 0], [1, 1], [0, 0], [1, 1]],
              "neighborhood": [[1, 1, 1], [0, 1, 1], [1, 1, 1], [1, 0, 1]],
              "distract_neighborhood": [[1, 0, 1], [1, 1, 1], [0, 0, 1], [1, 1, 1]], "relation": [[1], [1], [0], [1]]}
    rows = [{"edited": {name: entry(per_case[i]) for name, per_case in values.items()}} for i in range(4)]
    table = metric_table(rows, states=("edited",))
    assert pick(table, "distract_neighborhood", "prompt")["n"] == 12
    for protocol in ("prompt", "case"):
        assert pick(table, "score", protocol, "harmonic_mean")["n"] == 4
        assert pick(table, "avg_s", protocol, "harmonic_mean")["n"] == 4


def test_avg_s_is_the_harmonic_mean_of_all_five_success_rates_and_score_of_three():
    """docs/metrics.md: Score = H(ES, PS, NS) and Avg. S = H(ES, PS, NS, RS, DNS), by hand on one case (so both
    protocols agree): ES 100, PS 50, NS 100, RS 50, DNS 25 -> Score 3 / (1/100 + 1/50 + 1/100) = 75 and
    Avg. S 5 / (1/100 + 1/50 + 1/100 + 1/50 + 1/25) = 50 (without DNS it would be 4 / 0.06 = 66.7)."""
    row = {"edited": {"efficacy": entry([1.0]), "paraphrase": entry([1.0, 0.0]), "neighborhood": entry([1.0, 1.0]),
                      "relation": entry([0.0, 1.0]), "distract_neighborhood": entry([0.0, 1.0, 0.0, 0.0])}}
    table = metric_table([row], states=("edited",))
    for protocol in ("prompt", "case"):
        assert pick(table, "score", protocol, "harmonic_mean")["mean"] == pytest.approx(75.0)
        avg_s = pick(table, "avg_s", protocol, "harmonic_mean")
        assert avg_s["mean"] == pytest.approx(50.0)
        assert avg_s["components"] == "efficacy+paraphrase+neighborhood+relation+distract_neighborhood"


def test_compact_table_shows_one_protocol_with_labels():
    wide = compact_table(metric_table(ROWS), "case")
    assert wide.loc["edited", "NS"] == "50.00 ± 98.00"
    assert wide.loc["edited", "ES"] == "100.00 ± 0.00" and list(wide.columns)[-1] == "score"
    # without a protocol, the prompt protocol (SADR's Table 3, what a run prints): NS over 6 prompts, 4/6 with
    # CI 1.96 · √(4/15 / 6) (see test_prompt_and_case_protocols_differ_as_defined)
    assert compact_table(metric_table(ROWS)).loc["edited", "NS"] == "66.67 ± 41.32"


def test_summary_columns_are_the_success_rates_and_counts_of_the_rows(tmp_path):
    """`summarize` on ROWS, recomputed with pandas from the prompt values: n_cases counts records (2, not prompts),
    n_obs is the largest n behind a mean (not the smallest), and ES/PS are success rates, not the magnitudes
    metrics.csv holds under the same labels."""
    (tmp_path / "cases.jsonl").write_text("".join(json.dumps({"case_id": i, **row}) + "\n" for i, row in enumerate(ROWS)))
    OmegaConf.save({"model": {"name": "tiny"}, "dataset": {"name": "cf"}, "editor": {"name": "rome"}}, tmp_path / "config.yaml")
    metric_table(ROWS).to_csv(tmp_path / "metrics.csv", index=False)
    labels = {"efficacy": "ES", "paraphrase": "PS", "neighborhood": "NS", "fluency": "FL", "token_efficacy": "zsRE-E"}
    prompts = pd.DataFrame([(state, case, labels[name], value) for case, row in enumerate(ROWS) for state, entries in row.items()
                            for name, metric in entries.items() for value in metric["value"]],
                           columns=["state", "case", "label", "value"])
    case_means = prompts.groupby(["state", "case", "label"], as_index=False).value.mean()
    for protocol, observations in (("prompt", prompts), ("case", case_means)):
        summary = summarize(tmp_path, protocol).set_index("state")
        stats = observations.groupby(["state", "label"]).value.agg(["mean", "std", "count"])
        assert stats.loc["edited", "count"].min() < stats.loc["edited", "count"].max()  # max and min n differ
        for state in ("edited", "unedited"):
            row = summary.loc[state]
            assert row.n_cases == prompts.case.nunique() == 2
            assert row.n_obs == stats.loc[state, "count"].max()
            for label in labels.values():
                if (state, label) not in stats.index:
                    assert math.isnan(row[label]), (protocol, state, label)
                    continue
                mean, std, count = stats.loc[(state, label)]
                assert row[label] == pytest.approx(100 * mean), (protocol, state, label)
                assert row[f"{label} ci95"] == pytest.approx(196 * std / math.sqrt(count), nan_ok=True)


def test_summary_of_hand_made_configs_without_model_or_dataset_names(tmp_path):
    """Runs always record model.name and dataset.name, but a config.yaml written by hand (a run made elsewhere) may
    not: the table then has no such column, and the unedited model is still one row per distinct setting."""
    lines = "".join(json.dumps({"case_id": i, **row}) + "\n" for i, row in enumerate(ROWS))
    for name, editor in (("a", "rome"), ("b", "memit")):
        run = tmp_path / name
        run.mkdir()
        (run / "cases.jsonl").write_text(lines)
        OmegaConf.save({"editor": {"name": editor}}, run / "config.yaml")
        metric_table(ROWS).to_csv(run / "metrics.csv", index=False)
    summary = summarize(tmp_path)
    assert "model.name" not in summary and "dataset.name" not in summary
    assert sorted(summary["editor.name"]) == ["memit", "none", "rome"]


def test_token_accuracy_path_from_probes_to_the_table(monkeypatch):
    """zsRE probes are scored by token accuracy (value) and CounterFact ones by p(new) > p(true), by hand."""
    zsre = EditCase(0, EditRequest("Which college did {} attend?", "Harwick Pell", "Grayhaven University", "Fenwater"),
                    paraphrase_prompts=("Harwick Pell studied at which college?",),
                    locality_prompts=(LabeledPrompt("nq question: who painted the hall?", "Edda Lorne"),), token_scored=True)
    counterfact = EditCase(1, EditRequest("{} is in", "Toyota", "France", "Japan"))
    scores = {  # (prompt, target): (p, token accuracy)
        ("Which college did Harwick Pell attend?", "Grayhaven University"): (0.2, 2 / 3),
        ("Harwick Pell studied at which college?", "Grayhaven University"): (0.1, 1 / 3),
        ("nq question: who painted the hall?", "Edda Lorne"): (0.3, 1.0),
        ("Toyota is in", "France"): (0.4, 0.0),
        ("Toyota is in", "Japan"): (0.3, 1.0),
    }

    def fake_scores(model, tokenizer, prompts, targets, batch_size, **_routing):
        p, acc = zip(*(scores[pair] for pair in zip(prompts, targets)))
        return PairScores(-torch.log(torch.tensor(p)), torch.tensor(acc))

    monkeypatch.setattr(prompt_metrics, "score_pairs_detailed", fake_scores)
    metrics = resolve_metrics(["efficacy", "token_efficacy", "token_generalization", "locality"])
    got = prompt_metrics.evaluate_cases(None, None, [zsre, counterfact], metrics)
    assert set(got[0]) == {"token_efficacy", "token_generalization", "locality"}  # token-scored: no ES
    assert got[0]["token_efficacy"]["value"] == [pytest.approx(2 / 3)]
    assert got[0]["token_generalization"]["value"] == [pytest.approx(1 / 3)]
    assert got[0]["locality"]["value"] == [1.0]
    assert set(got[1]) == {"efficacy"}
    assert got[1]["efficacy"]["value"] == [1.0]  # 0.4 > 0.3, whatever the token accuracy
    assert got[1]["efficacy"]["p_bad"] == [pytest.approx(0.3)]
    table = metric_table([{"edited": r} for r in got], states=("edited",))
    assert pick(table, "token_efficacy", "prompt")["mean"] == pytest.approx(200 / 3)
    assert set(table[table.metric == "token_generalization"].label) == {"zsRE-G"}


def test_each_compared_metric_asks_which_answer_it_should(monkeypatch):
    """docs/metrics.md: ES/PS succeed when p(new) > p(true), NS/DNS when p(true) > p(new), RS when p(g) > p(new).
    With p(new) = 0.3 < p(g) = 0.35 < p(true) = 0.4 on every prompt, only NS, DNS and RS succeed."""
    case = EditCase(0, EditRequest("{} is in", "Toyota", "France", "Japan"), paraphrase_prompts=("Toyota lies in",),
                    neighborhood_prompts=("Honda is in",), relation_prompts=(LabeledPrompt("Toyota's region is", "Aichi"),))
    p = {"France": 0.3, "Aichi": 0.35, "Japan": 0.4}

    def fake_scores(model, tokenizer, prompts, targets, batch_size, **_routing):
        return PairScores(-torch.log(torch.tensor([p[t.strip()] for t in targets])), torch.zeros(len(targets)))

    monkeypatch.setattr(prompt_metrics, "score_pairs_detailed", fake_scores)
    names = ["efficacy", "paraphrase", "neighborhood", "distract_neighborhood", "relation"]
    got = prompt_metrics.evaluate_cases(None, None, [case], resolve_metrics(names))[0]
    assert {name: got[name]["value"] for name in names} == {
        "efficacy": [0.0], "paraphrase": [0.0], "neighborhood": [1.0], "distract_neighborhood": [1.0], "relation": [1.0]}
    assert got["relation"]["p_bad"] == [pytest.approx(0.3)]  # RS's bad answer is the new target


def test_commonsense_asks_right_over_wrong_alone_and_after_the_edit_sentence(monkeypatch):
    """docs/metrics.md: CS and DCS succeed when p(right) > p(wrong), DCS's prompt following the edit sentence and its
    new object (as DNS's does); each question is one observation, with its magnitude p(right) − p(wrong)."""
    case = EditCase(0, EditRequest("{} is in", "Toyota", "France", "Japan"), commonsense_prompts=(
        ContrastPrompt("Dry a wet shoe.", "Stuff it with paper.", "Stuff it with ice."),
        ContrastPrompt("Open a stuck jar.", "Tap the lid.", "Freeze the lid.")))
    p = {"Stuff it with paper.": 0.3, "Stuff it with ice.": 0.2, "Tap the lid.": 0.1, "Freeze the lid.": 0.4}
    asked = []

    def fake_scores(model, tokenizer, prompts, targets, batch_size, **_routing):
        asked.extend(zip(prompts, targets))
        return PairScores(-torch.log(torch.tensor([p[t] for t in targets])), torch.zeros(len(targets)))

    monkeypatch.setattr(prompt_metrics, "score_pairs_detailed", fake_scores)
    got = prompt_metrics.evaluate_cases(None, None, [case], resolve_metrics(["commonsense", "distract_commonsense"]))[0]
    for name in ("commonsense", "distract_commonsense"):
        assert got[name]["value"] == [1.0, 0.0]
        assert got[name]["p_good"] == [pytest.approx(0.3), pytest.approx(0.1)]
        assert got[name]["p_bad"] == [pytest.approx(0.2), pytest.approx(0.4)]
    assert ("Toyota is in France. Open a stuck jar.", "Freeze the lid.") in asked
    assert ("Open a stuck jar.", "Tap the lid.") in asked and len(asked) == 8
    table = metric_table([{"edited": got}], states=("edited",))
    assert pick(table, "distract_commonsense", "prompt")["mean"] == pytest.approx(50.0)
    assert set(table[table.metric == "commonsense"].label) == {"CS"}
    assert pick(table, "commonsense", "prompt", "magnitude")["mean"] == pytest.approx(100 * ((0.3 - 0.2) + (0.1 - 0.4)) / 2)


def test_every_prompt_of_a_set_is_its_own_probe_with_the_answers_the_metric_names():
    """docs/metrics.md: PS asks p(new) > p(true) of every paraphrase, zsRE-G scores the new answer on every rephrase,
    and every portability group is probed; a prompt set is never cut to its first prompt or group."""
    counterfact = EditCase(0, EditRequest("{} is in", "Toyota", "France", "Japan"),
                           paraphrase_prompts=("Toyota lies in", "Toyota's home is"),
                           portability={"one_hop": (LabeledPrompt("Toyota's capital is", "Paris"),),
                                        "alias": (LabeledPrompt("TMC is in", "France"),
                                                  LabeledPrompt("Toyota Motor is in", "France"))})
    zsre = EditCase(1, EditRequest("Which college did {} attend?", "Harwick Pell", "Grayhaven University"),
                    paraphrase_prompts=("Harwick Pell studied at which college?", "Where did Harwick Pell study?"),
                    token_scored=True)
    probes = {m.name: m.probes for m in resolve_metrics(["paraphrase", "token_generalization", "portability"])}
    assert probes["paraphrase"](counterfact) == [Probe("Toyota lies in", "France", "Japan"),
                                                 Probe("Toyota's home is", "France", "Japan")]
    assert probes["portability"](counterfact) == [Probe("Toyota's capital is", "Paris"), Probe("TMC is in", "France"),
                                                  Probe("Toyota Motor is in", "France")]
    assert probes["token_generalization"](zsre) == [
        Probe("Harwick Pell studied at which college?", "Grayhaven University"),
        Probe("Where did Harwick Pell study?", "Grayhaven University")]
    assert probes["paraphrase"](zsre) == [] and probes["token_generalization"](counterfact) == []


@pytest.mark.parametrize("target_new", ["France", " France"])
def test_the_dns_prompt_has_the_edit_sentence_and_one_space_before_the_new_object(target_new):
    """A new object given with its leading space is read after one space, as the scorer reads every target."""
    case = EditCase(0, EditRequest("{} is in", "Toyota", target_new, "Japan"), neighborhood_prompts=("Honda is in",))
    (probes,) = [m.probes(case) for m in resolve_metrics(["distract_neighborhood"])]
    assert probes == [Probe("Toyota is in France. Honda is in", "Japan", target_new)]


def test_a_tie_is_a_failure_for_every_compared_metric(monkeypatch):
    """docs/metrics.md: success is a strict p(good) > p(bad), so exactly tied probabilities count 0 for ES, PS, NS, DNS
    and RS alike (`>=` would count them 1)."""
    case = EditCase(0, EditRequest("{} is in", "Toyota", "France", "Japan"), paraphrase_prompts=("Toyota lies in",),
                    neighborhood_prompts=("Honda is in",),
                    relation_prompts=(LabeledPrompt("Toyota's region is", "Aichi"),))

    def fake_scores(model, tokenizer, prompts, targets, batch_size, **_routing):
        return PairScores(torch.full((len(targets),), math.log(4.0)), torch.zeros(len(targets)))  # p = 1/4 for all

    monkeypatch.setattr(prompt_metrics, "score_pairs_detailed", fake_scores)
    names = ["efficacy", "paraphrase", "neighborhood", "distract_neighborhood", "relation"]
    got = prompt_metrics.evaluate_cases(None, None, [case], resolve_metrics(names))[0]
    assert {name: got[name]["value"] for name in names} == {name: [0.0] for name in names}
    assert all(got[name]["p_good"] == got[name]["p_bad"] == [pytest.approx(0.25)] for name in names)


def test_dns_scored_only_for_the_drift_rows_leaves_the_next_case_its_own_bad_answers(monkeypatch):
    """With the drift diagnostics, DNS's pairs are scored after each case's NS pairs but not reported: the second
    case's NS still reads p(new) of its own prompt (0.2 < 0.3: a success), not of the first case's DNS prompt (0.9),
    and each case's drift entry gets the indices of its own DNS pairs."""
    cases = [EditCase(0, EditRequest("{} is in", "Toyota", "France", "Japan"), neighborhood_prompts=("Honda is in",)),
             EditCase(1, EditRequest("{} is in", "Sony", "Italy", "Japan"), neighborhood_prompts=("Nikon is in",))]
    p = {("Honda is in", "Japan"): 0.6, ("Honda is in", "France"): 0.1,
         ("Toyota is in France. Honda is in", "Japan"): 0.05, ("Toyota is in France. Honda is in", "France"): 0.9,
         ("Nikon is in", "Japan"): 0.3, ("Nikon is in", "Italy"): 0.2,
         ("Sony is in Italy. Nikon is in", "Japan"): 0.4, ("Sony is in Italy. Nikon is in", "Italy"): 0.5}

    def fake_scores(model, tokenizer, prompts, targets, batch_size, **_routing):
        probabilities = torch.tensor([p[pair] for pair in zip(prompts, targets)])
        return PairScores(-torch.log(probabilities), torch.zeros(len(targets)))

    class PairsRead:
        def __init__(self, model, adapter, reads):
            pass

        def entry(self, pairs):
            return {"pairs": pairs}

    monkeypatch.setattr(prompt_metrics, "score_pairs_detailed", fake_scores)
    monkeypatch.setattr(prompt_metrics, "SubjectAttentionReader", PairsRead)
    monkeypatch.setattr(prompt_metrics, "drift_read_positions", lambda *args: None)
    got = prompt_metrics.evaluate_cases(None, None, cases, resolve_metrics(["neighborhood"]), drift_adapter=object())
    assert [set(result) for result in got] == [{"neighborhood", "subject_attention"}] * 2
    assert [result["neighborhood"]["p_bad"] for result in got] == [[pytest.approx(0.1)], [pytest.approx(0.2)]]
    assert [result["neighborhood"]["value"] for result in got] == [[1.0], [1.0]]
    assert [result["subject_attention"] for result in got] == [{"pairs": [1]}, {"pairs": [3]}]  # the plan's DNS rows


def test_the_unedited_cache_key_changes_with_the_metrics_and_drift():
    from sadr.evaluation.suite import PromptMetrics

    es, es_rs = resolve_metrics(["efficacy"]), resolve_metrics(["efficacy", "relation"])
    identities = [PromptMetrics(es).identity(), PromptMetrics(es_rs).identity(), PromptMetrics(es, drift=True).identity()]
    assert len({repr(identity) for identity in identities}) == 3
