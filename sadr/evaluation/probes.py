"""What each prompt-level metric asks of the model, as probes built from an `EditCase`.

A probe with a `bad` answer succeeds when p(good) > p(bad), and its magnitude is p(good) − p(bad);
a probe without one is scored by teacher-forced top-1 token accuracy of `good` (zsRE, portability).
A metric whose prompts the case does not have yields no probes and is left out of the results.
A case is either compared (CounterFact family: ES, PS, NS, DNS) or token-scored (zsRE), never both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sadr.data.records import EditCase
from sadr.errors import InvalidSettingError
from sadr.models.tokenization import as_continuation


@dataclass(frozen=True)
class Probe:
    prompt: str
    good: str
    bad: str | None = None


def _compared(case: EditCase) -> bool:
    return case.request.target_true is not None and not case.token_scored


def _efficacy(case: EditCase) -> list[Probe]:
    r = case.request
    return [Probe(r.text, r.target_new, r.target_true)] if _compared(case) else []


def _paraphrase(case: EditCase) -> list[Probe]:
    r = case.request
    return [Probe(p, r.target_new, r.target_true) for p in case.paraphrase_prompts] if _compared(case) else []


def _neighborhood(case: EditCase) -> list[Probe]:
    r = case.request
    return [Probe(p, r.target_true, r.target_new) for p in case.neighborhood_prompts] if _compared(case) else []


def distract(case: EditCase, prompt: str) -> str:
    """A prompt with the edit sentence prepended (SADR's Distract Neighborhood, and the SADR repo's `_aft_edit_text`),
    its new object after one space as the scorer reads a target."""
    return f"{case.request.text}{as_continuation(case.request.target_new)}. {prompt}"


def _distract_neighborhood(case: EditCase) -> list[Probe]:
    r = case.request
    if not _compared(case):
        return []
    return [Probe(distract(case, p), r.target_true, r.target_new) for p in case.neighborhood_prompts]


def _relation(case: EditCase) -> list[Probe]:
    return [Probe(p.prompt, p.target, case.request.target_new) for p in case.relation_prompts]


def _commonsense(case: EditCase) -> list[Probe]:
    return [Probe(p.prompt, p.right, p.wrong) for p in case.commonsense_prompts]


def _distract_commonsense(case: EditCase) -> list[Probe]:
    return [Probe(distract(case, p.prompt), p.right, p.wrong) for p in case.commonsense_prompts]


def _portability(case: EditCase) -> list[Probe]:
    return [Probe(p.prompt, p.target) for prompts in case.portability.values() for p in prompts]


def _zsre_efficacy(case: EditCase) -> list[Probe]:
    return [Probe(case.request.text, case.request.target_new)] if case.token_scored else []


def _zsre_generalization(case: EditCase) -> list[Probe]:
    return [Probe(p, case.request.target_new) for p in case.paraphrase_prompts] if case.token_scored else []


def _locality(case: EditCase) -> list[Probe]:
    return [Probe(p.prompt, p.target) for p in case.locality_prompts]


@dataclass(frozen=True)
class Metric:
    name: str  # results key
    short: str  # table label
    probes: Callable[[EditCase], list[Probe]]
    field: str  # where its prompts come from in a record (named when one is too long for the model)


METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("efficacy", "ES", _efficacy, "requested_rewrite.prompt"),
    Metric("paraphrase", "PS", _paraphrase, "paraphrase_prompts"),
    Metric("neighborhood", "NS", _neighborhood, "neighborhood_prompts"),
    Metric("distract_neighborhood", "DNS", _distract_neighborhood, "neighborhood_prompts (after the edit sentence)"),
    Metric("relation", "RS", _relation, "relation_prompts"),
    Metric("commonsense", "CS", _commonsense, "commonsense_prompts"),
    Metric("distract_commonsense", "DCS", _distract_commonsense, "commonsense_prompts (after the edit sentence)"),
    Metric("portability", "Port", _portability, "portability"),
    Metric("token_efficacy", "zsRE-E", _zsre_efficacy, "requested_rewrite.prompt"),
    Metric("token_generalization", "zsRE-G", _zsre_generalization, "paraphrase_prompts"),
    Metric("locality", "Loc", _locality, "locality_prompts"),
]}


def resolve_metrics(names: list[str]) -> list[Metric]:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        # the tables' labels (ES, NS, zsRE-E) are what a user reads, so they are what a user types
        by_label = {metric.short.lower(): name for name, metric in METRICS.items()}
        hint = ""
        if all(n.lower() in by_label for n in unknown):
            named = ",".join(by_label.get(n.lower(), n) for n in names)
            hint = f"; {', '.join(unknown)}: the tables' labels, not metric names: did you mean eval.metrics=[{named}]?"
        raise InvalidSettingError(f"unknown metric(s) {unknown} in eval.metrics; known: {', '.join(METRICS)}{hint}")
    return [METRICS[n] for n in names]


def check_metrics_apply(metrics: list[Metric], cases: list[EditCase], dataset: str) -> None:
    """Refuse, before any work, metrics none of which has a prompt in any case: every case would be edited for an empty
    table. The error names the metrics that do apply. An empty list is a choice (generation metrics only, say)."""
    if not metrics or any(metric.probes(case) for metric in metrics for case in cases):
        return
    applying = [name for name, metric in METRICS.items() if any(metric.probes(case) for case in cases)]
    raise InvalidSettingError(
        f"eval.metrics=[{','.join(m.name for m in metrics)}]: none has a prompt in the {len(cases)} case(s) of "
        f"dataset={dataset}; choose among those that do: {', '.join(applying) or 'none'}")
