"""The key statistics' accumulation: Σ k kᵀ as an upper-triangular sum (what the pass runs) against the full product.

For each width, random float64 keys of `--tokens` rows are added `--chunks` times, by one `addmm_` of the whole
square (the pass before the upper-triangular sum), by `UpperTriangularSum.add` in float64 (the default), and by
`UpperTriangularSum.add` with float32 products (`model.stats.product_dtype=float32`), in alternating rounds on the
same machine. It prints tokens per second of each, the ratios to the full product, and each sum's largest difference
from the full product relative to its largest entry.

Usage:
    python benchmarks/accumulation_bench.py                                   # CPU: SmolLM2's and a 4096 width
    python benchmarks/accumulation_bench.py --device cuda --widths 16384 14336 24576 --tokens 2048
"""
from __future__ import annotations

import argparse

import torch

from sadr.editors.covariance import UpperTriangularSum
from sadr.models.devices import clock


def time_full(keys: list[torch.Tensor]) -> tuple[float, torch.Tensor]:
    width = keys[0].shape[1]
    total = torch.zeros(width, width, dtype=torch.float64, device=keys[0].device)
    started = clock(keys[0].device)
    for chunk in keys:
        total.addmm_(chunk.T, chunk)
    return clock(keys[0].device) - started, total


def time_upper(keys: list[torch.Tensor], dtype: torch.dtype) -> tuple[float, torch.Tensor]:
    total = UpperTriangularSum(keys[0].shape[1], keys[0].device)
    started = clock(keys[0].device)
    for chunk in keys:
        total.add(chunk.to(dtype))
    seconds = clock(keys[0].device) - started
    return seconds, total.take_full()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[1536, 4096])
    parser.add_argument("--tokens", type=int, default=2048, help="rows per chunk (the pass: CHUNK_BYTES / (8 width))")
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, {args.tokens} tokens × {args.chunks} chunks")
    print("| width | full float64 tokens/s | upper float64 | upper, float32 products | difference (float64, float32) |")
    print("|---|---|---|---|---|")
    for width in args.widths:
        g = torch.Generator(device=device).manual_seed(0)
        keys = [torch.randn(args.tokens, width, generator=g, dtype=torch.float64, device=device) for _ in range(args.chunks)]
        dtypes = (torch.float64, torch.float32)
        time_full(keys[:1]), [time_upper(keys[:1], dtype) for dtype in dtypes]  # warm-up
        full_seconds, upper_seconds = [], {dtype: [] for dtype in dtypes}
        for _ in range(args.rounds):
            seconds, full = time_full(keys)
            full_seconds.append(seconds)
            uppers = {}
            for dtype in dtypes:
                seconds, uppers[dtype] = time_upper(keys, dtype)
                upper_seconds[dtype].append(seconds)
        differences = [((uppers[dtype] - full).abs().max() / full.abs().max()).item() for dtype in dtypes]
        tokens = args.tokens * args.chunks
        full_rate = tokens / min(full_seconds)
        rates = [tokens / min(upper_seconds[dtype]) for dtype in dtypes]
        print(f"| {width} | {full_rate:,.0f} | " + " | ".join(f"{rate:,.0f} ({rate / full_rate:.2f}×)" for rate in rates)
              + " | " + ", ".join(f"{difference:.1e}" for difference in differences) + " |")


if __name__ == "__main__":
    main()
