"""Score every probe of many cases in shared padded batches; one dict of per-prompt results per case."""
from __future__ import annotations

from sadr.data.records import EditCase
from sadr.evaluation.case_rows import CaseRows, one_model
from sadr.evaluation.probes import Metric
from sadr.evaluation.scorer import score_pairs_detailed


def evaluate_cases(model, tokenizer, cases: list[EditCase], metrics: list[Metric], batch_size: int = 64,
                   case_rows: CaseRows = one_model) -> list[dict]:
    """Per case: {metric: {"value": [...], "p_good": [...], "p_bad": [...]}} (p_bad only for comparisons).

    `value` is 1/0 success for comparisons and the token accuracy for the others.
    """
    plan = []  # (case index, metric name, probe)
    for index, case in enumerate(cases):
        for metric in metrics:
            plan += [(index, metric.name, probe) for probe in metric.probes(case)]
    prompts = [probe.prompt for _, _, probe in plan] + [probe.prompt for _, _, probe in plan if probe.bad is not None]
    targets = [probe.good for _, _, probe in plan] + [probe.bad for _, _, probe in plan if probe.bad is not None]
    pair_cases = [index for index, _, _ in plan] + [index for index, _, probe in plan if probe.bad is not None]
    scores = score_pairs_detailed(model, tokenizer, prompts, targets, batch_size, pair_cases=pair_cases,
                                  case_rows=case_rows)
    good_prob, good_acc = scores.prob.tolist(), scores.token_accuracy.tolist()
    results: list[dict] = [{} for _ in cases]
    bad_index = len(plan)
    for i, (index, name, probe) in enumerate(plan):
        entry = results[index].setdefault(name, {"value": [], "p_good": []})
        entry["p_good"].append(good_prob[i])
        if probe.bad is None:
            entry["value"].append(good_acc[i])
        else:
            p_bad = good_prob[bad_index]
            bad_index += 1
            entry.setdefault("p_bad", []).append(p_bad)
            entry["value"].append(float(good_prob[i] > p_bad))
    return results
