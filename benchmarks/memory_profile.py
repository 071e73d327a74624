"""What an editor holds at its memory peaks, on the CPU: the allocator's events of a run's one-off work (`prepare`:
the statistics pass, C's factors, the context templates) and of its first edit (`apply`), recorded by torch's
profiler, on a random model of a published shape at its published depth with every width divided by `--narrow`.

For each phase it prints the peak above what was held when the phase began (the weights; for the edit, C's factors
too), the ops running at the peak, and the largest allocations alive then, each with the op that made it. Run it at
two narrowings to see how each term grows with the widths: terms that grow with d_ff² (C, its sums, its factors)
quadruple when the widths double, activations only double. The CUDA libraries' own workspaces (cuBLAS, cuSOLVER) do
not exist on the CPU, so this shows what the code itself allocates; `scale_bench.py` measures a GPU's peaks.

Usage:
    python benchmarks/memory_profile.py --arch gpt-j --narrow 4 --editor memit     # d 1,024, d_ff 4,096: about 2 min
    python benchmarks/memory_profile.py --tiny                                      # the same code in seconds
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path

from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_bench import Settings, build_model_folder, run  # noqa: E402
from shapes import OFFLINE_RECORDS, SHAPES, trained_tokenizer  # noqa: E402

from sadr.editors.registry import EDITORS  # noqa: E402

PHASES = ("prepare", "apply")  # Editor methods: the one-off work, then an edit


@contextmanager
def profiled(editor_class, folder: Path) -> Iterator[dict[str, Path]]:
    """Within the block, the first call of each phase's method records the allocator's events into a trace file in
    `folder`; yields phase -> that file. The class is as it was after the block."""
    traces: dict[str, Path] = {}
    originals = {phase: editor_class.__dict__.get(phase) for phase in PHASES}
    for phase in PHASES:
        method = getattr(editor_class, phase)

        @wraps(method)
        def recorded(self, *args, method=method, phase=phase, **kwargs):
            if phase in traces:
                return method(self, *args, **kwargs)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recording:
                with record_function(phase):
                    result = method(self, *args, **kwargs)
            traces[phase] = folder / f"{phase}.trace.json"
            recording.export_chrome_trace(str(traces[phase]))
            return result

        setattr(editor_class, phase, recorded)
    try:
        yield traces
    finally:
        for phase, original in originals.items():
            if original is None:
                delattr(editor_class, phase)  # it was inherited
            else:
                setattr(editor_class, phase, original)


def peak_of(trace: Path, top: int) -> dict:
    """The peak of the bytes allocated during the trace over its start, the ops running at it, and the `top`
    largest allocations alive at it (bytes, the ops running when each was made)."""
    events = json.loads(trace.read_text())["traceEvents"]
    ops = [e for e in events if e.get("ph") == "X"]

    def running(ts: float) -> str:
        inner = sorted((o for o in ops if o["ts"] <= ts <= o["ts"] + o["dur"]
                        and not o["name"].startswith("PyTorch Profiler")), key=lambda o: o["ts"])
        return " > ".join(o["name"] for o in inner[-3:])

    live: dict[int, tuple[int, float]] = {}
    held = peak = 0
    at_peak: dict[int, tuple[int, float]] = {}
    peak_ts = 0.0
    for event in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        size, address = event["args"]["Bytes"], event["args"]["Addr"]
        held += size
        if size > 0:
            live[address] = (size, event["ts"])
        else:
            live.pop(address, None)
        if held > peak:
            peak, peak_ts, at_peak = held, event["ts"], dict(live)
    largest = sorted(at_peak.values(), key=lambda item: -item[0])[:top]
    return {"peak_bytes": peak, "at": running(peak_ts),
            "alive": [{"bytes": size, "made_in": running(ts)} for size, ts in largest]}


def report(arch: str, widths: str, editor: str, peaks: dict[str, dict]) -> str:
    lines = [f"{editor} on {arch} ({widths}): the allocator's peak of each phase over its start"]
    for phase, found in peaks.items():
        lines.append(f"\n{phase}: {found['peak_bytes'] / 1e6:.1f} MB, at {found['at']}")
        lines += [f"  {item['bytes'] / 1e6:10.1f} MB  made in {item['made_in']}" for item in found["alive"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(SHAPES), default="gpt-j")
    parser.add_argument("--narrow", type=int, default=4, help="divide every width and head count by this")
    parser.add_argument("--tiny", action="store_true", help="the tiny widths of scale_bench --tiny instead")
    parser.add_argument("--editor", choices=sorted(EDITORS), default="memit")
    parser.add_argument("--delta-steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=8, help="how many of the allocations alive at a peak to list")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sadr-memory-"))
    tokenizer = trained_tokenizer(1024 if args.tiny else 8192)
    narrow = 1 if args.tiny else args.narrow
    build_model_folder(args.arch, args.tiny, "cpu", tokenizer, workdir / "model", narrow)
    texts = [json.dumps(record) * 4 for record in json.loads(OFFLINE_RECORDS.read_text())]
    (workdir / "stats.txt").write_text("\n\n".join(texts * 3))  # statistics without sampling: the edit is the point
    settings = Settings(args.arch, workdir / "model", "cpu", "float32", 1, 64, 16 if args.tiny else 256,
                        args.delta_steps, workdir, text_file=workdir / "stats.txt")
    with profiled(EDITORS[args.editor].editor, workdir) as traces:
        run(settings, args.editor, False)
    peaks = {phase: peak_of(traces[phase], args.top) for phase in PHASES if phase in traces}
    print("\n" + report(args.arch, "tiny widths" if args.tiny else f"widths / {narrow}", args.editor, peaks))
    return peaks


if __name__ == "__main__":
    main()
