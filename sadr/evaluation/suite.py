"""The evaluators a run applies to the unedited and the edited model, behind one interface.

Each evaluator returns, per case, a dict of metric entries `{name: {"value": [...], ...}}` (one value
per prompt or per generated text), which `aggregate.metric_table` turns into both protocols. An evaluator
may also derive entries from the edited and unedited results of the same case (`compare`), e.g. how
much attention drifted.
"""
from __future__ import annotations

from dataclasses import dataclass

from sadr.data.records import EditCase
from sadr.evaluation.case_rows import CaseRows, one_model
from sadr.evaluation.drift import ENCODING, compare_attention
from sadr.evaluation.probes import Metric, resolve_metrics
from sadr.evaluation.prompt_metrics import evaluate_cases, metrics_scored


class Evaluator:
    name: str

    def evaluate(self, model, tokenizer, adapter, cases: list[EditCase], case_rows: CaseRows = one_model) -> list[dict]:
        """Per case, its entries; every forward declares its rows' cases to `case_rows` (sadr/evaluation/case_rows.py)."""
        raise NotImplementedError

    def compare(self, edited: dict, unedited: dict) -> dict:
        """Entries that need both states of one case; they are stored with the edited results."""
        return {}

    def identity(self) -> dict:
        """Everything that determines this evaluator's results (for the unedited-results cache key)."""
        return {"name": self.name}

    def inputs(self, case: EditCase) -> list[tuple[str, str]]:
        """(record field, text) for each text it puts through the model whole, checked against the model's positions
        before any work (sadr/data/lengths.py)."""
        return []


@dataclass
class PromptMetrics(Evaluator):
    """ES, PS, NS, DNS, RS, portability, zsRE token accuracy...: teacher-forced probes in shared batches.

    With `drift`, also the attention drift diagnostics (sadr/evaluation/drift.py), read in the same forwards.
    """

    metrics: list[Metric]
    batch_size: int = 64
    drift: bool = False
    name: str = "prompt_metrics"

    def evaluate(self, model, tokenizer, adapter, cases, case_rows=one_model):
        return evaluate_cases(model, tokenizer, cases, self.metrics, self.batch_size, case_rows,
                              drift_adapter=adapter if self.drift else None)

    def compare(self, edited, unedited):
        return compare_attention(edited, unedited) if self.drift else {}

    def identity(self):
        return {"name": self.name, "metrics": [m.name for m in self.metrics],
                **({"drift": ENCODING} if self.drift else {})}

    def inputs(self, case):
        """Each probe's prompt followed by each of its answers (both are scored; the one with fewer characters can have
        more tokens, "北京" after byte fallback)."""
        return [(metric.field, f"{probe.prompt} {answer}")
                for metric in metrics_scored(self.metrics, self.drift) for probe in metric.probes(case)
                for answer in dict.fromkeys(a for a in (probe.good, probe.bad) if a is not None)]


def build_evaluators(cfg) -> list[Evaluator]:
    """The evaluators a run config asks for (`cfg` is the whole run config)."""
    from sadr.evaluation.generation_metrics import GenerationMetrics  # it subclasses Evaluator from this module

    evaluators: list[Evaluator] = [PromptMetrics(resolve_metrics(list(cfg.eval.metrics)), cfg.eval.batch_size,
                                                 drift=cfg.eval.drift)]
    if cfg.eval.generation:
        evaluators.append(GenerationMetrics.from_config(cfg))
    return evaluators


def evaluate_all(evaluators: list[Evaluator], model, tokenizer, adapter, cases: list[EditCase],
                 case_rows: CaseRows = one_model) -> list[dict]:
    results: list[dict] = [{} for _ in cases]
    for evaluator in evaluators:
        for merged, part in zip(results, evaluator.evaluate(model, tokenizer, adapter, cases, case_rows)):
            merged.update(part)
    return results


def compare_all(evaluators: list[Evaluator], edited: dict, unedited: dict) -> dict:
    derived: dict = {}
    for evaluator in evaluators:
        derived.update(evaluator.compare(edited, unedited))
    return derived
