"""Seconds per case of fluency's reference-style sampling (`eval.generation_style=reference`), three ways, in one process.

- `one stream per case`: every prompt of a case in its own batch, all from the case's one random stream
  (`sample_to_length_like_rome`, which samples the context templates, on the case's prompts): how fluency was
  sampled before each text had its own stream.
- `rows of one case`: `GenerationMetrics.evaluate` on one case at a time, its prompts in one batch (the edited model
  in the single protocol with `editor.parallel_cases=1`).
- `rows of all cases`: `GenerationMetrics.evaluate` on every case at once, `eval.generation_batch_size` rows per
  batch (the unedited model, and N edited models side by side with `editor.parallel_cases=N`).

Each way runs `--rounds` times in the order A B C C B A ...; the medians are reported with each one's ratio to the
first measured in the same invocation, and FL ×100 (the mean of the cases' mean n-gram entropies) of each way's texts:
the first way draws other texts than the other two, which draw the same ones (checked).

Usage:
    python benchmarks/fluency_bench.py --cases 4 --threads 2                     # SmolLM2-135M (offline default)
    python benchmarks/fluency_bench.py --cases 8 --prompts-per-case 0            # all of each case's prompts
    python benchmarks/fluency_bench.py --device cuda --model gpt-j --random-shape --cases 8 --prompts-per-case 0
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from editing_bench import markdown  # noqa: E402
from parallel_cases_bench import random_loaded_model, synchronize  # noqa: E402
from shapes import SHAPES  # noqa: E402

from sadr.conf.schema import default_cache_dir  # noqa: E402
from sadr.conf.registry import compose_config  # noqa: E402
from sadr.data.load import load_cases  # noqa: E402
from sadr.evaluation.generation_metrics import TOP_K, GenerationMetrics, case_seed  # noqa: E402
from sadr.evaluation.fluency import ngram_entropy  # noqa: E402
from sadr.models.generation import sample_to_length_like_rome  # noqa: E402
from sadr.models.loading import DTYPES, load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=4, help="the first cases of the offline dataset")
    parser.add_argument("--prompts-per-case", type=int, default=2, help="eval.generation_prompts_per_case; 0: all")
    parser.add_argument("--length", type=int, default=100, help="eval.generation_length")
    parser.add_argument("--batch-size", type=int, default=16, help="eval.generation_batch_size")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--random-shape", action="store_true", help=f"random weights of the model's shape {sorted(SHAPES)}")
    parser.add_argument("--tiny", action="store_true", help="with --random-shape: the shape's tiny widths (a CPU rehearsal)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--cache-dir", default=default_cache_dir())
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny and not args.random_shape:
        parser.error("--tiny is a size of --random-shape")

    cfg = compose_config([f"model={args.model}", f"device={args.device}", f"dtype={args.dtype}",
                          f"cache_dir={args.cache_dir}", f"dataset.limit={args.cases}"], checked=False)
    loaded = (random_loaded_model(args.model, args.device, args.dtype, args.tiny) if args.random_shape else
              load_model(cfg.model.source, gguf_file=cfg.model.gguf_file, family=cfg.model.family, device=cfg.device,
                         dtype=cfg.dtype.name, cache_dir=cfg.cache_dir))
    model, tokenizer = loaded.model, loaded.tokenizer
    cases = load_cases(cfg.dataset, cfg.cache_dir).cases
    per_case = args.prompts_per_case or None
    metrics = GenerationMetrics(cfg.seed, per_case, args.length, "reference", batch_size=args.batch_size)

    def one_stream_per_case() -> list[list[str]]:
        return [sample_to_length_like_rome(model, tokenizer, list(case.generation_prompts[:per_case]),
                                           total_tokens=args.length, seed=case_seed(cfg.seed, case.case_id), top_k=TOP_K)
                for case in cases]

    def texts(results: list[dict]) -> list[list[str]]:
        return [result["fluency"]["text"] for result in results]

    ways = {"one stream per case": one_stream_per_case,
            "rows of one case": lambda: [t for case in cases for t in texts(metrics.evaluate(model, tokenizer, None, [case]))],
            "rows of all cases": lambda: texts(metrics.evaluate(model, tokenizer, None, cases))}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    drawn: dict[str, list[list[str]]] = {}
    order = list(ways)
    for round_ in range(args.rounds):
        for name in order if round_ % 2 == 0 else order[::-1]:
            synchronize(loaded.device)
            start = time.perf_counter()
            drawn[name] = ways[name]()
            synchronize(loaded.device)
            seconds[name].append((time.perf_counter() - start) / len(cases))
    if drawn["rows of one case"] != drawn["rows of all cases"]:
        print("warning: the texts of one case's rows and of all cases' rows differ (rounding of other batch shapes)")
    first = statistics.median(seconds[order[0]])
    rows = [{"sampling": name, "s/case (median)": statistics.median(s), "× first": first / statistics.median(s),
             "FL ×100": 100 * statistics.fmean(statistics.fmean(ngram_entropy(t) for t in case_texts)
                                               for case_texts in drawn[name])}
            for name, s in seconds.items()]
    n_texts = sum(len(case_texts) for case_texts in drawn[order[0]])
    device = torch.cuda.get_device_name() if loaded.device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs"
    print(f"{args.model}{' (random weights)' if args.random_shape else ''}, {args.dtype}, {device}, {len(cases)} cases, "
          f"{n_texts} texts of {args.length} tokens, eval.generation_batch_size={args.batch_size}, {args.rounds} rounds, "
          f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}:")
    print(markdown(rows))


if __name__ == "__main__":
    main()
