"""GPU memory of C's factors alone, at a published d_ff: what `SecondMomentStatistics.factorized` does for each edited
layer (C comes from the host and is factored in place on the device) and what an edit's solve with the factors adds.

For each width and precision it prints the bytes the factors hold (d² × the element size, and the pivots), the peak
above that while factoring (a library's workspace, or a copy of C), the peak above the held factors while solving
for 1 and for 8 right-hand sides (one edit, and eight side by side), and the seconds of each. MEMIT on GPT-J keeps six
such factors on the card, so a workspace that is not released, or a copy made while factoring, shows here times six.
C is a random positive definite matrix made on the device (its values do not change the memory). Off CUDA it prints
the seconds only.

Usage:
    python benchmarks/factor_memory_bench.py                 # GPT-J's and GPT-NeoX-20B's d_ff, float64 and float32
    python benchmarks/factor_memory_bench.py --tiny          # widths 256 and 384 on the CPU, in a second
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sadr.editors.update import FactorizedMoment  # noqa: E402
from sadr.models.devices import clock, release_unused_memory  # noqa: E402

WIDTHS = {"gpt-j": 16384, "gpt-neox-20b": 24576}  # d_ff: the width of C
TINY_WIDTHS = {"tiny-256": 256, "tiny-384": 384}


def allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def peak_since_reset(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def random_moment(width: int, device: torch.device) -> torch.Tensor:
    """A positive definite (width, width) float64 matrix on the host, made on `device` (a GPU makes it in seconds)."""
    generator = torch.Generator(device=device).manual_seed(0)
    keys = torch.randn(2 * width, width, dtype=torch.float64, device=device, generator=generator)
    return (keys.T @ keys / (2 * width)).cpu()


def measure(width: int, dtype: torch.dtype, device: torch.device) -> dict:
    moment = random_moment(width, device)
    release_unused_memory()
    before = allocated(device)
    reset(device)
    started = clock(device)
    factors = FactorizedMoment.of(moment.to(dtype).to(device), overwrite=True, dtype=dtype)
    result = {"factor_s": clock(device) - started}
    held = allocated(device)
    if held is not None:
        result.update(held=held - before, factoring_above_held=peak_since_reset(device) - held)
    for columns in (1, 8):
        rhs = torch.randn(width, columns, dtype=torch.float64, device=device)
        reset(device)
        started = clock(device)
        factors.solve(rhs)
        result[f"solve{columns}_s"] = clock(device) - started
        if held is not None:
            result[f"solve{columns}_above_held"] = peak_since_reset(device) - allocated(device)
        del rhs
    del factors
    release_unused_memory()
    return result


def table(results: list[tuple[str, str, dict]]) -> str:
    def gb(value):
        return "–" if value is None else f"{value / 1e9:.2f}"

    lines = ["| d_ff | factors | held GB | peak above held, factoring GB | solving 1 / 8 columns GB | factoring s | "
             "solving 1 / 8 s |", "|---|---|---|---|---|---|---|"]
    for name, precision, r in results:
        lines.append(f"| {name} | {precision} | {gb(r.get('held'))} | {gb(r.get('factoring_above_held'))} | "
                     f"{gb(r.get('solve1_above_held'))} / {gb(r.get('solve8_above_held'))} | {r['factor_s']:.2f} | "
                     f"{r['solve1_s']:.3f} / {r['solve8_s']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny widths on the CPU")
    parser.add_argument("--device", default=None, help="default: cuda when available (cpu with --tiny)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = []
    for name, width in (TINY_WIDTHS if args.tiny else WIDTHS).items():
        for dtype in (torch.float64, torch.float32):
            results.append((f"{name} ({width})", str(dtype).removeprefix("torch."), measure(width, dtype, device)))
            print(f"{results[-1][0]} {results[-1][1]}: {results[-1][2]}", flush=True)
    report = f"{device} ({card}), torch {torch.__version__}\n\n{table(results)}"
    print("\n" + report)
    return report


if __name__ == "__main__":
    main()
