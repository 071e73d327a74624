"""Seconds per edit of ROME, MEMIT and PMET on the offline default model, split by phase.

Each editor is built from the real composed config (`sadr-run editor=<name>`, default model and dataset),
so the numbers are those of the chosen SmolLM2 defaults. The first edit of each editor asks for the key
second moments of its layers: from the disk cache if they are there, or, with --cold-stats, from an empty
cache (one corpus pass for all of its layers; for the offline model that includes sampling the corpus);
later edits read them from memory. Edits follow the single protocol (edit one case, evaluate it with the
evaluators `sadr-run` builds from the config, drift diagnostics included unless `eval.drift=false`, restore the
weights); then all cases are edited in one `apply` (ROME applies them one after another, MEMIT and PMET solve for
them jointly).

Usage:
    python benchmarks/editing_bench.py                       # 8 cases of the offline dataset
    python benchmarks/editing_bench.py --cases 4 --editors memit pmet --threads 2
    python benchmarks/editing_bench.py --dataset tests/fixtures/data/offline_counterfact.json
    python benchmarks/editing_bench.py --editors rome --cases 4 --rounds 3 \
        --variants editor.prefix_cache=false editor.prefix_cache=true   # two settings, interleaved, same run
    python benchmarks/editing_bench.py --editors memit --cases 8 --variants eval.drift=false ""   # what drift costs
"""
from __future__ import annotations

import argparse
import os
from contextlib import nullcontext
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sadr.conf.schema import default_cache_dir  # noqa: E402
from sadr.conf.registry import compose_config  # noqa: E402
from sadr.data.load import load_cases  # noqa: E402
from sadr.editors.registry import EDITORS  # noqa: E402
from sadr.evaluation.suite import build_evaluators, evaluate_all  # noqa: E402
from sadr.models.fingerprint import computation_fingerprint, model_fingerprint, tokenizer_fingerprint  # noqa: E402
from sadr.models.loading import load_model  # noqa: E402
from sadr.regularizers.attention_drift import build_regularizers  # noqa: E402
from sadr.runner import build_editor, build_statistics  # noqa: E402

# Phase -> the names editors time it under (ROME calls its key and δ phases k_star and v_star).
PHASES = {"keys": ("keys", "k_star"), "δ-optimisation": ("delta", "v_star"), "update": ("update",)}


def composed(editor: str, overrides: list[str]):
    return compose_config([f"editor={editor}", *overrides], checked=False)


def phase_seconds(outcomes: list[dict[str, float]], n_edits: int) -> dict[str, float]:
    return {phase: sum(o.get(name, 0.0) for o in outcomes for name in names) / n_edits for phase, names in PHASES.items()}


def efficacy(results: list[dict]) -> float:
    values = [v for result in results for v in result.get("efficacy", {}).get("value", [])]
    return 100 * statistics.fmean(values) if values else float("nan")


def row(editor, edits_per_apply: int, covariance_first: float, covariance_cached: float,
        outcomes: list[dict[str, float]], n_edits: int, eval_per_case: float, results: list[dict]) -> dict:
    return {
        "editor": f"{editor.hparams.name} (layers {list(editor.layers)})", "edits per apply": edits_per_apply,
        "covariance, first (s)": covariance_first, "covariance, cached (s/edit)": covariance_cached,
        **{f"{phase} (s/edit)": v for phase, v in phase_seconds(outcomes, n_edits).items()},
        "eval (s/case)": eval_per_case, "ES": efficacy(results),
    }


def single_protocol(editor, loaded, cases, evaluators) -> tuple[list[dict], list[float], list[dict]]:
    """Edit a case, evaluate it, restore, case after case: each edit's phase seconds, each evaluation's seconds and
    the results."""
    seconds, eval_seconds, results = [], [], []
    for case in cases:
        snapshot = editor.state_dict()
        seconds.append(editor.apply([case.request]).seconds)
        start = time.perf_counter()
        results += evaluate_all(evaluators, loaded.model, loaded.tokenizer, loaded.adapter, [case])
        eval_seconds.append(time.perf_counter() - start)
        editor.load_state_dict(snapshot)
    return seconds, eval_seconds, results


def one_by_one(editor, loaded, cases, evaluators) -> dict:
    seconds, eval_seconds, results = single_protocol(editor, loaded, cases, evaluators)
    cached = statistics.fmean(s.get("covariance", 0.0) for s in seconds[1:]) if len(seconds) > 1 else float("nan")
    return row(editor, 1, seconds[0].get("covariance", 0.0), cached, seconds, len(cases),
               statistics.fmean(eval_seconds), results)


def all_at_once(editor, loaded, cases, evaluators) -> dict:
    """Every case in one `apply`, then all evaluated, then restored."""
    snapshot = editor.state_dict()
    seconds = editor.apply([case.request for case in cases]).seconds
    start = time.perf_counter()
    results = evaluate_all(evaluators, loaded.model, loaded.tokenizer, loaded.adapter, cases)
    eval_per_case = (time.perf_counter() - start) / len(cases)
    editor.load_state_dict(snapshot)
    return row(editor, len(cases), float("nan"), seconds.get("covariance", 0.0) / len(cases), [seconds], len(cases),
               eval_per_case, results)


def bench_build_editor(cfg, loaded, fingerprint: str, stats_dir: str):
    """The editor a composed config describes (SADR included when `sadr.lambda` > 0), its key statistics cached under
    `stats_dir`."""
    statistics = build_statistics(OmegaConf.merge(cfg, {"cache_dir": stats_dir}), loaded, fingerprint)
    return build_editor(cfg, loaded, statistics, fingerprint, build_regularizers(cfg.sadr))


def bench_editor(name: str, overrides: list[str], loaded, fingerprint: str, cases, batch: bool,
                 cold_stats: bool) -> list[dict]:
    cfg = composed(name, overrides)
    evaluators = build_evaluators(cfg)
    with tempfile.TemporaryDirectory() if cold_stats else nullcontext(cfg.cache_dir) as stats_dir:
        editor = bench_build_editor(cfg, loaded, fingerprint, stats_dir)
        rows = [one_by_one(editor, loaded, cases, evaluators)]
        if batch:
            rows.append(all_at_once(editor, loaded, cases, evaluators))
    return rows


def decisions(results: list[dict]) -> list[float]:
    """Every per-prompt value (success or token accuracy) of every metric, in a fixed order."""
    return [v for result in results for metric in sorted(result) for v in result[metric]["value"]]


def compare_variants(name: str, variants: list[str], rounds: int, overrides: list[str], loaded, fingerprint: str,
                     cases) -> list[dict]:
    """The single protocol under each variant's overrides, the variants interleaved over `rounds`; per variant the
    median of each timing, its speed against the first variant, and how many per-prompt values differ from it."""
    configs = [composed(name, [*overrides, *filter(None, variant.split(","))]) for variant in variants]
    editors = [bench_build_editor(cfg, loaded, fingerprint, cfg.cache_dir) for cfg in configs]
    evaluators = [build_evaluators(cfg) for cfg in configs]
    timings: list[list[dict]] = [[] for _ in variants]
    values: list[list[float]] = []
    for _ in range(rounds):
        for index, editor in enumerate(editors):
            seconds, eval_seconds, results = single_protocol(editor, loaded, cases, evaluators[index])
            phases = phase_seconds(seconds, len(cases))
            timings[index].append({**phases, "edit": sum(phases.values()), "eval": statistics.fmean(eval_seconds)})
            if len(values) <= index:
                values.append(decisions(results))
    medians = [{key: statistics.median(run[key] for run in runs) for key in runs[0]} for runs in timings]
    first = medians[0]
    rows = []
    for variant, median, variant_values in zip(variants, medians, values):
        rows.append({
            "editor": name, "variant": variant or "(as configured)",
            **{f"{key} (s/edit)": value for key, value in median.items() if key != "eval"},
            "eval (s/case)": median["eval"],
            "edit speed vs first": first["edit"] / median["edit"],
            "δ speed vs first": first["δ-optimisation"] / median["δ-optimisation"],
            "values differing from first": f"{sum(a != b for a, b in zip(values[0], variant_values))} of {len(variant_values)}",
        })
    return rows


def markdown(rows: list[dict], columns: list[str] | None = None) -> str:
    """A Markdown table of `rows` (floats to 3 decimals): `columns` (default: the first row's keys), blank where a
    row lacks one."""
    columns = columns or list(rows[0])
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--editors", nargs="+", default=sorted(EDITORS), choices=sorted(EDITORS))
    parser.add_argument("--cases", type=int, default=8, help="cases of the dataset (dataset.limit)")
    parser.add_argument("--dataset", help="a CounterFact-schema file instead of the embedded offline dataset")
    parser.add_argument("--cache-dir", default=default_cache_dir())
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--no-batch", action="store_true", help="skip the one-apply batch edit")
    parser.add_argument("--cold-stats", action="store_true", help="time the key statistics from an empty cache")
    parser.add_argument("--variants", nargs="+", metavar="OVERRIDES",
                        help="compare settings in one run, each a comma-separated list of config overrides (\"\" for "
                             "the configured one), e.g. editor.prefix_cache=true editor.prefix_cache=false")
    parser.add_argument("--rounds", type=int, default=1, help="with --variants: interleaved rounds, medians reported")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = [f"cache_dir={args.cache_dir}", f"dataset.limit={args.cases}"]
    if args.dataset:
        overrides.append(f"dataset.path={Path(args.dataset).resolve()}")
    cfg = composed("rome", overrides)
    start = time.perf_counter()
    loaded = load_model(cfg.model.source, gguf_file=cfg.model.gguf_file, family=cfg.model.family, device=cfg.device,
                        dtype=cfg.dtype.name, cache_dir=cfg.cache_dir)
    load_seconds = time.perf_counter() - start
    cases = load_cases(cfg.dataset, cfg.cache_dir).cases
    # the runner's key (no TF32 here), so a run's cached templates and statistics serve the benchmark and back
    fingerprint = computation_fingerprint(model_fingerprint(loaded.model), tokenizer_fingerprint(loaded.tokenizer),
                                          False, loaded.device.type)
    rows = []
    for name in args.editors:
        if args.variants:
            rows += compare_variants(name, args.variants, args.rounds, overrides, loaded, fingerprint, cases)
        else:
            rows += bench_editor(name, overrides, loaded, fingerprint, cases, batch=not args.no_batch,
                                 cold_stats=args.cold_stats)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"model {cfg.model.name} ({loaded.resolved_source}, loaded in {load_seconds:.1f} s) on {loaded.device}, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, load average {load}; "
          f"{len(cases)} cases; eval metrics {list(cfg.eval.metrics)}, drift {cfg.eval.drift}; key statistics "
          f"{'from an empty cache' if args.cold_stats else f'from the cache in {args.cache_dir}'}")
    print(markdown(rows))


if __name__ == "__main__":
    main()
