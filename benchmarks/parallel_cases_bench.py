"""Cases per second of the single protocol against `editor.parallel_cases`, per phase.

For each N the same cases run through the real runner (`Experiment.run`, single protocol) with
`editor.parallel_cases=N`: N = 1 edits a case, evaluates it on the written weights and restores; N > 1 edits N cases
side by side (their δs sharing forwards) and evaluates the N edited models in one pass. The model is loaded once and
shared by the runs; a warm-up run on one case fills the caches (context templates, key statistics, unedited scores)
first, so every timed run reads them alike.

Reported per N, from the run's rows: seconds per case of each phase (C, loading and factoring the key statistics
once per run; keys, δ-optimisation, update, evaluation; a group's shared seconds are split evenly among its cases, so
they add up), the wall time of the protocol loop as cases per second, with and without C (a run of a few cases is
dominated by C on a large model: about 10 s for GPT-J's six MEMIT layers), its speed-up over N = 1 measured in the same
invocation, the mean δ steps, on a GPU the memory peaks
while editing and while evaluating (`torch.cuda.max_memory_allocated`), and how many per-prompt
decisions differ from N = 1, with how many of those are ties (|p(good) − p(bad)| ≤ 1e-5 relative in float32, 1e-2 in
bfloat16 and float16, as in tests/test_parallel_cases.py: other batch shapes round differently) and the largest
relative gap |p(good) − p(bad)| / max of a differing decision.

Usage:
    python benchmarks/parallel_cases_bench.py --n 1 4 --cases 4 --threads 2            # SmolLM2-135M (offline default)
    python benchmarks/parallel_cases_bench.py --device cuda --n 1 8 32 --cases 32
    python benchmarks/parallel_cases_bench.py --device cuda --model gpt-j --model-source /models/random-gptj \\
        --stats-samples 160 --n 1 8 32 --cases 32                                        # any local folder of that shape
    python benchmarks/parallel_cases_bench.py --device cuda --model gpt-j --random-shape --stats-samples 160 --n 1 16

`--random-shape` builds random weights of the model config's published shape on the device instead of loading
anything (no download, no folder), with a byte-level BPE trained here on the offline records as its tokenizer
(the shape's vocabulary size is kept, so the LM head costs what it costs). Timings of a shape do not depend on
its weights, except through the δ stop rule; the metrics of random weights mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from decisions import TIE_RTOL, differing  # noqa: E402
from editing_bench import markdown  # noqa: E402
from shapes import SHAPES, random_model, trained_tokenizer  # noqa: E402

import sadr.runner as runner  # noqa: E402
from sadr.conf.schema import default_cache_dir  # noqa: E402
from sadr.conf.registry import compose_config  # noqa: E402
from sadr.editors.registry import EDITORS  # noqa: E402
from sadr.models.adapters import adapter_for  # noqa: E402
from sadr.models.fingerprint import model_fingerprint  # noqa: E402
from sadr.models.loading import DTYPES, LoadedModel  # noqa: E402
from sadr.results import RunDirectory  # noqa: E402

# Phase -> the names editors time it under (ROME calls its key and δ phases k_star and v_star). "C": loading and
# factoring the key statistics, once per run (the first group pays it), which a sweep of thousands of cases amortises.
PHASES = {"C": ("covariance",), "keys": ("keys", "k_star"), "δ": ("delta", "v_star"), "update": ("update",),
          "eval": ("eval_per_case",)}


def random_loaded_model(shape: str, device: str, dtype: str, tiny: bool = False) -> LoadedModel:
    """Random weights of a published shape (or of its tiny widths), initialised on the device."""
    tokenizer = trained_tokenizer(4096)
    model = random_model(shape, tiny, tokenizer, device, DTYPES[dtype]).eval().requires_grad_(False)
    return LoadedModel(model, tokenizer, adapter_for(model), f"random {shape} weights")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedExperiment(runner.Experiment):
    """The runner's experiment, with the wall time of its edit-and-evaluate loop."""

    protocol_seconds = 0.0

    def _restoring(self, editor, todo, unedited):
        synchronize(self.loaded.device)
        start = time.perf_counter()
        super()._restoring(editor, todo, unedited)
        synchronize(self.loaded.device)
        self.protocol_seconds = time.perf_counter() - start


def run(overrides: list[str]) -> tuple[list[dict], float]:
    experiment = TimedExperiment(compose_config(overrides))
    with contextlib.redirect_stdout(io.StringIO()):  # each run's own table
        out = experiment.run()
    return RunDirectory(out).rows(), experiment.protocol_seconds


def summary(n: int, rows: list[dict], wall: float, reference: dict | None, tie_rtol: float) -> dict:
    per_case = {phase: statistics.fmean(sum(r["seconds"].get(name, 0.0) for name in names) for r in rows)
                for phase, names in PHASES.items()}
    result = {"N": n, "cases": len(rows), **{f"{phase} s/case": v for phase, v in per_case.items()},
              "cases/s": len(rows) / wall, "cases/s without C": len(rows) / (wall - per_case["C"] * len(rows)),
              "δ steps": statistics.fmean(r["diagnostics"]["delta_steps"] for r in rows)}
    phase_peaks = [r["cuda_phase_peak_bytes"] for r in rows if "cuda_phase_peak_bytes" in r]
    if phase_peaks:
        edit, evaluate = (max(p.get(phase, 0) for p in phase_peaks) / 1e9 for phase in ("edit", "evaluate"))
        result["peak GPU GB, editing / evaluating"] = f"{edit:.1f} / {evaluate:.1f}"
    if reference is not None:
        result["speed-up"] = result["cases/s"] / reference["cases/s"]
        result["speed-up without C"] = result["cases/s without C"] / reference["cases/s without C"]
        for phase in (p for p in PHASES if p != "C"):  # C is a cost per run, not per case: no speed-up to read
            result[f"{phase} ×"] = reference[f"{phase} s/case"] / per_case[phase] if per_case[phase] else float("nan")
        result["decisions differing (ties)"] = differing(reference["rows"], rows, tie_rtol)
    return {**result, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1, 4], help="editor.parallel_cases values (1 first)")
    parser.add_argument("--editors", nargs="+", default=["rome"], choices=sorted(EDITORS))
    parser.add_argument("--cases", type=int, default=4, help="cases of the dataset (dataset.limit)")
    parser.add_argument("--model", default="smollm2-135m", help="model config (its published editor settings apply)")
    parser.add_argument("--model-source", help="a local folder or GGUF file instead of the config's source")
    parser.add_argument("--random-shape", action="store_true", help=f"random weights of the model's shape {sorted(SHAPES)}")
    parser.add_argument("--tiny", action="store_true", help="with --random-shape: the shape's tiny widths (a CPU rehearsal)")
    parser.add_argument("--stats-samples", type=int,
                        help="model.stats.n_samples (generated text when --model-source or --random-shape; 32 tiny)")
    parser.add_argument("--stats-length", type=int, default=128, help="model.stats.sample_length with --model-source")
    parser.add_argument("--sadr-lambda", type=float, default=0.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--cache-dir", default=default_cache_dir())
    parser.add_argument("--set", nargs="*", default=[], help="further config overrides, e.g. editor.v_num_grad_steps=10")
    args = parser.parse_args()
    if args.n[0] != 1:
        parser.error("--n must start with 1: the speed-ups and decisions are relative to it")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.random_shape and args.model not in SHAPES:
        parser.error(f"--random-shape knows the shapes of {sorted(SHAPES)}")
    if args.tiny and not args.random_shape:
        parser.error("--tiny is a size of --random-shape")
    if args.tiny and args.stats_samples is None:  # not the config's n_samples: 100,000 texts for gpt-j, hours to sample
        args.stats_samples = 32
    # every run shares one loaded model, as the jobs of a basic-launcher sweep do (sadr/models/kept.py)
    if args.random_shape:
        model = random_loaded_model(args.model, args.device, args.dtype, args.tiny)
        fingerprint = model_fingerprint(model.model)
        runner.load_model_kept = lambda *_args, **_kwargs: (model, fingerprint)

    base = [f"model={args.model}", f"device={args.device}", f"dtype={args.dtype}", f"cache_dir={args.cache_dir}",
            f"sadr.lambda={args.sadr_lambda}", "progress.bar=false", *args.set]
    if args.model_source:
        base += [f"model.source={args.model_source}", "model.gguf_file=null"]
    if args.model_source or args.random_shape:
        base += ["model.stats.corpus=generated", f"model.stats.sample_length={args.stats_length}"]
    if args.stats_samples:
        base.append(f"model.stats.n_samples={args.stats_samples}")
    with tempfile.TemporaryDirectory() as work:
        for editor in args.editors:
            common = [*base, f"editor={editor}"]
            run([*common, "dataset.limit=1", f"output_dir={work}/{editor}_warmup"])
            results = []
            for n in args.n:
                rows, wall = run([*common, f"dataset.limit={args.cases}", f"editor.parallel_cases={n}",
                                  f"output_dir={work}/{editor}_{n}"])
                results.append(summary(n, rows, wall, results[0] if results else None, TIE_RTOL[args.dtype]))
                print(f"{editor}, N = {n}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                       for k, v in results[-1].items() if k != "rows"), flush=True)
            load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
            device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs"
            source = args.model_source or ("random weights" if args.random_shape else "")
            print(f"\n{editor} on {args.model}{f' ({source})' if source else ''}, {args.dtype}, "
                  f"sadr.lambda={args.sadr_lambda}, {device}, load average {load}:")
            print(markdown(results, [c for c in results[-1] if c != "rows"]))


if __name__ == "__main__":
    main()
