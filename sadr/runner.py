"""One experiment: load model and data, score the unedited model once, edit, evaluate, restore, write rows."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from sadr.data.corpus import file_corpus, generated_corpus, hub_corpus
from sadr.data.load import load_cases
from sadr.data.records import EditCase
from sadr.editors.base import WeightSnapshot
from sadr.editors.context_templates import context_templates
from sadr.editors.covariance import SecondMomentStatistics
from sadr.editors.registry import EDITORS
from sadr.evaluation.aggregate import compact_table, metric_table
from sadr.evaluation.probes import resolve_metrics
from sadr.evaluation.prompt_metrics import evaluate_cases
from sadr.models.embedded import EMBEDDED_SOURCES
from sadr.models.fingerprint import cache_key, model_fingerprint
from sadr.models.loading import LoadedModel, load_model
from sadr.regularizers.attention_drift import build_regularizers
from sadr.results import RunDirectory

log = logging.getLogger(__name__)


def build_statistics(cfg: DictConfig, loaded: LoadedModel, fingerprint: str) -> SecondMomentStatistics:
    stats = cfg.model.stats
    corpus_kind = stats.corpus.name
    if corpus_kind == "auto":
        corpus_kind = "generated" if cfg.model.source in EMBEDDED_SOURCES else "hub"
    corpus = {
        "hub": lambda: hub_corpus(stats.hub_dataset, stats.hub_config, stats.hub_split, stats.n_samples),
        "file": lambda: file_corpus(stats.text_file, stats.n_samples),
        "generated": lambda: generated_corpus(loaded.model, loaded.tokenizer, stats.n_samples, stats.sample_length, cfg.seed),
    }[corpus_kind]()
    return SecondMomentStatistics(
        loaded.model, loaded.adapter, loaded.tokenizer, fingerprint=fingerprint, corpus=corpus,
        sample_length=stats.sample_length, batch_tokens=stats.batch_tokens, cache_dir=cfg.cache_dir,
        npz_dir=stats.npz_dir, npz_samples=stats.n_samples,
    )


def unedited_results(loaded: LoadedModel, cases: list[EditCase], metrics, fingerprint: str, cache_dir: str,
                     batch_size: int) -> list[dict]:
    """The unedited model's per-prompt results, computed once per (model, cases, metrics) and cached."""
    key = cache_key(kind="unedited", model=fingerprint, cases=[repr(c) for c in cases], metrics=[m.name for m in metrics])
    path = Path(cache_dir) / "unedited" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    results = evaluate_cases(loaded.model, loaded.tokenizer, cases, metrics, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(results))
    path.with_suffix(".tmp").replace(path)
    return results


def case_groups(cases: list[EditCase], batch_size: int) -> list[list[EditCase]]:
    return [cases[i : i + batch_size] for i in range(0, len(cases), batch_size)]


def run_experiment(cfg: DictConfig) -> Path:
    out = RunDirectory(cfg.output_dir)
    out.claim(cfg)
    out.drop_partial_line()
    torch.manual_seed(cfg.seed)
    loaded = load_model(cfg.model.source, gguf_file=cfg.model.gguf_file, revision=cfg.model.revision,
                        family=cfg.model.family, device=cfg.device, dtype=cfg.dtype.name, cache_dir=cfg.cache_dir)
    dataset = load_cases(cfg.dataset, cfg.cache_dir)
    fingerprint = model_fingerprint(loaded.model)
    statistics = build_statistics(cfg, loaded, fingerprint)
    out.write_environment({
        "device": str(loaded.device),
        "device_name": torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else "cpu",
        "model_source": loaded.resolved_source, "model_fingerprint": fingerprint,
        "dataset_source": dataset.source, "dataset_selection": dataset.selection,
        "dataset_invalid_skipped": dataset.n_invalid_skipped, "n_cases": len(dataset.cases),
        "stats_corpus": statistics.description() if cfg.editor.mom2_adjustment or cfg.editor.name.name != "rome" else None,
    })
    metrics = resolve_metrics(list(cfg.eval.metrics))
    started = time.perf_counter()
    unedited = dict(zip((str(c.case_id) for c in dataset.cases),
                        unedited_results(loaded, dataset.cases, metrics, fingerprint, cfg.cache_dir, cfg.eval.batch_size)))
    log.info("unedited model scored on %d cases in %.1f s", len(dataset.cases), time.perf_counter() - started)

    templates = context_templates(loaded.model, loaded.tokenizer, [list(p) for p in cfg.editor.context_templates],
                                  seed=cfg.seed, fingerprint=fingerprint, cache_dir=cfg.cache_dir)
    editor = EDITORS[cfg.editor.name.name](
        loaded.model, loaded.adapter, loaded.tokenizer, cfg.editor, statistics=statistics,
        context_templates=templates, regularizers=build_regularizers(cfg.sadr),
    )
    done = out.finished()
    protocol = cfg.editor.protocol.name
    if protocol == "sequential":
        raise NotImplementedError("editor.protocol=sequential is not implemented yet; use single or batch")
    todo = [c for c in dataset.cases if str(c.case_id) not in done]
    log.info("%d cases to edit (%d already finished in %s)", len(todo), len(dataset.cases) - len(todo), out.path)
    for group in case_groups(todo, cfg.editor.batch_size):
        snapshot = WeightSnapshot(loaded.model, loaded.adapter, editor.layers)
        try:
            outcome = editor.apply([case.request for case in group])
            eval_start = time.perf_counter()
            edited = evaluate_cases(loaded.model, loaded.tokenizer, group, metrics, cfg.eval.batch_size)
            eval_seconds = (time.perf_counter() - eval_start) / len(group)
        finally:
            snapshot.restore()
        for case, result in zip(group, edited):
            out.append({
                "case_id": case.case_id, "editor": cfg.editor.name.name, "protocol": protocol,
                "batch_size": len(group), "sadr_lambda": cfg.sadr["lambda"], "model": cfg.model.name,
                "dataset": cfg.dataset.name, "subject": case.request.subject,
                "edited": result, "unedited": unedited[str(case.case_id)],
                "seconds": {**outcome.seconds, "eval_per_case": eval_seconds}, "diagnostics": outcome.diagnostics,
            })
        log.info("case(s) %s done: %s", [c.case_id for c in group],
                 {k: round(v, 2) for k, v in outcome.seconds.items()})
    table = metric_table(out.rows())
    out.write_metrics(table)
    print(f"\n{cfg.editor.name.name} on {cfg.model.name} / {cfg.dataset.name} ({len(out.rows())} cases, "
          f"sadr.lambda={cfg.sadr['lambda']}), prompt-level success ×100 ± 95% CI:")
    print(compact_table(table).to_string())
    print(f"\nresults: {out.path}")
    return out.path

