"""Score every probe of many cases in shared padded batches; one dict of per-prompt results per case."""
from __future__ import annotations

from sadr.data.records import EditCase
from sadr.evaluation.case_rows import CaseRows, one_model
from sadr.evaluation.drift import ATTENTION, SubjectAttentionReader, drift_read_positions
from sadr.evaluation.probes import METRICS, Metric
from sadr.evaluation.scorer import score_pairs_detailed

DNS = METRICS["distract_neighborhood"]


def metrics_scored(metrics: list[Metric], drift: bool) -> list[Metric]:
    """The metrics whose probes are scored: the drift diagnostics read the forwards of the DNS prompts, so with
    `drift` these are scored even when DNS is not among `metrics` (and then left out of the results)."""
    if drift and DNS.name not in {m.name for m in metrics}:
        return [*metrics, DNS]
    return list(metrics)


def evaluate_cases(model, tokenizer, cases: list[EditCase], metrics: list[Metric], batch_size: int = 64,
                   case_rows: CaseRows = one_model, drift_adapter=None) -> list[dict]:
    """Per case: {metric: {"value": [...], "p_good": [...], "p_bad": [...]}} (p_bad only for comparisons).

    `value` is 1/0 success for comparisons and the token accuracy for the others. With `drift_adapter` (the model's
    adapter), each case with DNS prompts also gets the drift diagnostics' `subject_attention` entry
    (sadr/evaluation/drift.py), read in the forwards that score its DNS prompts; they are scored for it even when DNS
    is not among `metrics`.
    """
    scored = metrics_scored(metrics, drift_adapter is not None)
    plan = []  # (case index, metric name, probe)
    for index, case in enumerate(cases):
        for metric in scored:
            plan += [(index, metric.name, probe) for probe in metric.probes(case)]
    prompts = [probe.prompt for _, _, probe in plan] + [probe.prompt for _, _, probe in plan if probe.bad is not None]
    targets = [probe.good for _, _, probe in plan] + [probe.bad for _, _, probe in plan if probe.bad is not None]
    pair_cases = [index for index, _, _ in plan] + [index for index, _, probe in plan if probe.bad is not None]
    reader = None
    if drift_adapter is not None:
        reads = {i: drift_read_positions(tokenizer, cases[index], probe)
                 for i, (index, name, probe) in enumerate(plan) if name == DNS.name}
        reader = SubjectAttentionReader(model, drift_adapter, reads)
    scores = score_pairs_detailed(model, tokenizer, prompts, targets, batch_size, pair_cases=pair_cases,
                                  case_rows=case_rows, observer=reader)
    # one entry per scored pair: the good targets in plan order, then the bad ones
    probs, accuracies = scores.prob.tolist(), scores.token_accuracy.tolist()
    reported = {m.name for m in metrics}
    results: list[dict] = [{} for _ in cases]
    dns_pairs: list[list[int]] = [[] for _ in cases]
    bad_index = len(plan)
    for i, (index, name, probe) in enumerate(plan):
        p_bad = None
        if probe.bad is not None:
            p_bad = probs[bad_index]
            bad_index += 1
        if name == DNS.name:
            dns_pairs[index].append(i)
        if name not in reported:
            continue
        entry = results[index].setdefault(name, {"value": [], "p_good": []})
        entry["p_good"].append(probs[i])
        if p_bad is None:
            entry["value"].append(accuracies[i])
        else:
            entry.setdefault("p_bad", []).append(p_bad)
            entry["value"].append(float(probs[i] > p_bad))
    if reader is not None:
        for result, pairs in zip(results, dns_pairs):
            if pairs:
                result[ATTENTION] = reader.entry(pairs)
    return results
