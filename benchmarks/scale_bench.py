"""Paper-scale timings and memory on one device, without downloading a model.

Builds a random-weight model of a published shape (GPT-J-6B, Llama-3-8B, GPT-NeoX-20B, or SmolLM2-135M) on the
device, saves it as a local model folder with a tokenizer, and runs the real experiment (`run_experiment`, what
each job of `sadr-run -m` runs) on a few offline CounterFact records for each editor that has published
hyperparameters for that model, without and with SADR (`sadr=paper`: the published γ). The jobs run one after
another in this process, as a basic-launcher sweep does, so the model is loaded once. Key statistics come from
text the model samples itself (`model.stats.corpus=generated`), or from `--stats-text-file` (sampling takes minutes on
GPT-NeoX-20B's shape).

It prints, per run: seconds per case of each phase (keys, δ-optimisation, update, evaluation), δ steps and seconds
per δ step (the median over cases; cases run one at a time unless `--parallel-cases N`), the GPU memory peaks of the
run before its first case (C's factors, after the statistics pass), while editing and while evaluating
(`torch.cuda.max_memory_allocated`; the statistics pass is reported on its own line), and for each statistics pass
its tokens per second split into the forward, the float64 accumulation and the corpus (sampling the texts). Times
and memory are real; the metrics of a random model mean nothing. With `--variants`, each run after the first variant
is also compared with that variant's run per prompt: how many compared decisions differ, how many of those are ties
within the rounding of the two settings (1e-5 relative in float32; 1e-2 with TF32 or half precision,
benchmarks/decisions.py) and the largest gap of one that differs, and in how many cases the δ steps are the same.

Weights are saved in bfloat16 (half the disk traffic) and loaded in `--dtype`. The tokenizer is `--tokenizer DIR`
(any saved tokenizer, e.g. SmolLM2's: `python benchmarks/scale_bench.py --save-tokenizer DIR` writes it from the
offline default model), or else a byte-level BPE trained here on the offline records.

Usage:
    python benchmarks/scale_bench.py --tiny                                   # CPU, seconds: the same code, tiny widths
    python benchmarks/scale_bench.py --arch gpt-j --device cuda --tokenizer tok/ --out gptj.md
    python benchmarks/scale_bench.py --arch llama3-8b --device cuda --dtype bfloat16 --editors memit
    python benchmarks/scale_bench.py --arch gpt-j --device cuda --variants editor.prefix_cache=false ""
                                            # each run once per variant (comma-separated overrides; "" as configured)
    python benchmarks/scale_bench.py --arch gpt-j --device cuda --variants "" tf32=true     # float32 against TF32
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from decisions import TIE_RTOL, differing  # noqa: E402
from shapes import SHAPES, random_model, trained_tokenizer  # noqa: E402

from sadr.cache import TORCH, read_entry  # noqa: E402
from sadr.conf.registry import compose_config  # noqa: E402
from sadr.conf.schema import default_cache_dir  # noqa: E402
from sadr.models.kept import release_kept_model  # noqa: E402
from sadr.results import ENV_FILE, RunDirectory  # noqa: E402
from sadr.runner import run_experiment  # noqa: E402

PAPER_EDITORS = ("rome", "memit", "pmet")  # the editors of the SADR paper's tables
HPARAMS = REPO / "sadr" / "conf" / "hparams"
PAPER_SADR = REPO / "sadr" / "conf" / "sadr_hparams" / "paper"


def build_model_folder(arch: str, tiny: bool, device: str, tokenizer, folder: Path, narrow: int = 1) -> float:
    """Random weights of the shape (`narrow`: shapes.model_config's), initialised on the device and saved in bfloat16;
    returns the seconds taken."""
    started = time.perf_counter()
    model = random_model(arch, tiny, tokenizer, device, torch.bfloat16, narrow)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    release_kept_model()
    return time.perf_counter() - started


@dataclass
class Settings:
    arch: str
    folder: Path
    device: str
    dtype: str
    records: int
    stats_samples: int
    stats_length: int
    delta_steps: int | None
    workdir: Path
    text_file: Path | None = None
    parallel_cases: int = 1
    extra: list[str] = field(default_factory=list)


def overrides(settings: Settings, editor: str, with_sadr: bool, variant: int = 0) -> list[str]:
    """The run's config overrides; variant i > 0 of `--variants` writes to a folder of its own."""
    s = settings
    name = (f"{editor}_sadr" if with_sadr else editor) + (f"_v{variant}" if variant else "")
    chosen = [
        f"model={s.arch}", f"model.source={s.folder}", "model.gguf_file=null",
        *(["model.stats.corpus=file", f"model.stats.text_file={s.text_file}"] if s.text_file else
          ["model.stats.corpus=generated"]),
        f"model.stats.n_samples={s.stats_samples}", f"model.stats.sample_length={s.stats_length}",
        "dataset=offline_counterfact", f"dataset.limit={s.records}", f"editor={editor}",
        f"device={s.device}", f"dtype={s.dtype}", "progress.bar=false", f"editor.parallel_cases={s.parallel_cases}",
        f"output_dir={s.workdir / 'runs' / name}",
        f"cache_dir={s.workdir / 'cache'}",
    ]
    if with_sadr:
        chosen.append("sadr=paper")
    if s.delta_steps is not None:
        chosen.append(f"editor.v_num_grad_steps={s.delta_steps}")
    return chosen + s.extra


def run(settings: Settings, editor: str, with_sadr: bool, variant: int = 0) -> Path:
    return run_experiment(compose_config(overrides(settings, editor, with_sadr, variant)))


def run_summary(rows: list[dict], environment: dict) -> dict:
    """Per-case means of each phase's seconds (the statistics pass, made before the first case, is in none), δ steps,
    GPU peaks, and seconds per δ step, the median over cases: the first case of a run also pays one-time costs (kernel
    selection, the allocator's first growth), which inflate a mean over a few cases. The peak before the first case
    (C's factors made, templates sampled; after any statistics pass, which has its own) is the run's
    (`environment`: its environment.json)."""
    seconds = [row["seconds"] for row in rows]
    phase = lambda *names: sum(s.get(n, 0.0) for s in seconds for n in names) / len(rows)  # noqa: E731
    steps = sum(row["diagnostics"].get("delta_steps", 0) for row in rows) / len(rows)
    delta = phase("delta", "v_star")
    per_step = [(s.get("delta", 0.0) + s.get("v_star", 0.0)) / row["diagnostics"]["delta_steps"]
                for s, row in zip(seconds, rows) if row["diagnostics"].get("delta_steps")]
    peak = lambda phase: max((row["cuda_phase_peak_bytes"][phase] / 1e9 for row in rows  # noqa: E731
                              if phase in row.get("cuda_phase_peak_bytes", {})), default=None)
    prepared = environment.get("one_off_cuda_peak_bytes", {}).get("prepare")
    return {"cases": len(rows), "sadr_lambda": rows[0]["sadr_lambda"], "keys": phase("keys", "k_star"),
            "delta": delta, "delta_steps": steps, "step": statistics.median(per_step) if per_step else None, "update": phase("update"),
            "eval": phase("eval_per_case"), "peak_prepare_gb": prepared / 1e9 if prepared is not None else None,
            "peak_edit_gb": peak("edit"), "peak_eval_gb": peak("evaluate")}


def statistics_passes(cache_dir: Path) -> list[dict]:
    """One entry per statistics pass (its layers share the pass's timing)."""
    passes: dict[str, dict] = {}
    for file in sorted((cache_dir / "stats").glob("*.pt")):
        entry = read_entry(file, TORCH)
        timing = entry.get("pass") if entry else None
        if timing:
            key = json.dumps(timing, sort_keys=True)
            passes.setdefault(key, {**timing, "modules": []})["modules"].append(file.name.split(".")[-3])
    return list(passes.values())


def compared(reference: list[dict], rows: list[dict], rtol: float) -> dict:
    """Per prompt and per case, a variant's run against the first variant's run of the same job."""
    same_steps = sum(a["diagnostics"].get("delta_steps") == b["diagnostics"].get("delta_steps") for a, b in zip(reference, rows))
    return {"decisions_differing": differing(reference, rows, rtol), "same_delta_steps": f"{same_steps}/{len(rows)}"}


def tie_rtol(dtype: str, variants: list[str]) -> float:
    """The tie tolerance of comparing the variants: the coarsest rounding among them (TF32 products, half precision)."""
    tf32 = any("tf32=true" in variant.split(",") for variant in variants)
    return max(TIE_RTOL[dtype], TIE_RTOL["tf32"] if tf32 else 0.0)


def table(results: list[tuple[str, dict]]) -> str:
    lines = ["| run | cases | δ s/case (steps) | s/step | keys s | update s | eval s/case | "
             "peak GPU GB, before the first case / editing / evaluating |",
             "|---|---|---|---|---|---|---|---|"]
    versus = any("decisions_differing" in r for _, r in results)
    if versus:
        lines = [lines[0] + " decisions differing from the first variant (ties; largest gap) | same δ steps |",
                 lines[1] + "---|---|"]
    for name, r in results:
        step = f"{r['step']:.3f}" if r["step"] else "–"
        peaks = [r.get(key) for key in ("peak_prepare_gb", "peak_edit_gb", "peak_eval_gb")]
        shown = any(gb is not None for gb in peaks)
        peak = " / ".join("–" if gb is None else f"{gb:.1f}" for gb in peaks) if shown else "–"
        line = (f"| {name} | {r['cases']} | {r['delta']:.2f} ({r['delta_steps']:.0f}) | {step} | {r['keys']:.2f} | "
                f"{r['update']:.2f} | {r['eval']:.2f} | {peak} |")
        if versus:
            line += f" {r.get('decisions_differing', '–')} | {r.get('same_delta_steps', '–')} |"
        lines.append(line)
    return "\n".join(lines)


def stats_table(passes: list[dict]) -> str:
    lines = ["| statistics pass | tokens | tokens/s | forward s | accumulation s | corpus s | peak GPU GB |",
             "|---|---|---|---|---|---|---|"]
    for p in passes:
        peak = f"{p['cuda_peak_bytes'] / 1e9:.1f}" if p.get("cuda_peak_bytes") else "–"
        products = " (TF32)" if p.get("tf32") else ""
        lines.append(f"| layers {p['layers']}{products} | {p['tokens']} | {p['tokens_per_second']:.0f} | {p['forward_seconds']:.1f} | "
                     f"{p['accumulate_seconds']:.1f} | {p['corpus_seconds']:.1f} | {peak} |")
    return "\n".join(lines)


def environment(args, device: str) -> str:
    corpus = f"{args.stats_text_file.name} text" if args.stats_text_file else "sampled"
    card = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu"
    return (f"{args.arch}{' (tiny widths)' if args.tiny else ''}, {args.dtype}, {device} ({card}), torch {torch.__version__}, "
            f"transformers {transformers.__version__}, {args.records} offline records, statistics from "
            f"{args.stats_samples} × {args.stats_length} {corpus} tokens, δ steps {args.delta_steps or 'as configured'}, "
            f"{args.parallel_cases} case(s) side by side")


def run_every_setting(args, settings: Settings, results: list) -> None:
    """Each editor, plain and with SADR, once per variant; `results` gets each run's summary as it finishes."""
    for editor in args.editors:
        if not (HPARAMS / f"{editor}_{args.arch}.yaml").is_file():
            print(f"skipped {editor}: no published hyperparameters for {args.arch}", flush=True)
            continue
        for with_sadr in (False, True):
            if with_sadr and (args.no_sadr or not (PAPER_SADR / f"{editor}_{args.arch}.yaml").is_file()):
                continue
            for index, variant in enumerate(args.variants):
                settings.extra = [o for o in variant.split(",") if o]
                started = time.perf_counter()
                folder = run(settings, editor, with_sadr, index)
                rows = RunDirectory(folder).rows()
                summary = run_summary(rows, json.loads((folder / ENV_FILE).read_text()))
                summary["wall"] = time.perf_counter() - started
                if index == 0:
                    first_rows = rows
                else:
                    summary.update(compared(first_rows, rows, tie_rtol(args.dtype, args.variants)))
                name = f"{editor} + SADR (γ={summary['sadr_lambda']})" if with_sadr else editor
                name += f" [{variant}]" if variant else ""
                results.append((name, summary))
                print(f"{name}: {json.dumps(summary)}", flush=True)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(SHAPES), default="gpt-j")
    parser.add_argument("--tiny", action="store_true", help="tiny widths on the CPU: the same code in seconds")
    parser.add_argument("--device", default=None, help="default: cuda when available (cpu with --tiny)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--editors", nargs="+", default=list(PAPER_EDITORS))
    parser.add_argument("--no-sadr", action="store_true", help="only the plain editors")
    parser.add_argument("--records", type=int, default=None, help="offline records per run (4; 2 with --tiny)")
    parser.add_argument("--stats-samples", type=int, default=None, help="sampled texts for the statistics (128; 32 tiny)")
    parser.add_argument("--stats-length", type=int, default=None, help="tokens per sampled text (256; 16 tiny)")
    parser.add_argument("--stats-text-file", type=Path, default=None,
                        help="statistics from this text file (blank-line-separated texts) instead of text the random "
                             "model samples, which takes minutes on the largest shapes")
    parser.add_argument("--parallel-cases", type=int, default=1,
                        help="editor.parallel_cases of every run (1: one case at a time, so s/step is one edit's step; "
                             "a run's own default is 8 on a GPU)")
    parser.add_argument("--delta-steps", type=int, default=None, help="δ steps of every run (default: the configs')")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a saved tokenizer folder")
    parser.add_argument("--save-tokenizer", type=Path, default=None, help="write the offline default's tokenizer here and exit")
    parser.add_argument("--workdir", type=Path, default=None, help="model folder, caches and runs (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables (Markdown) and results (JSON beside)")
    parser.add_argument("--variants", nargs="+", default=[""], metavar="OVERRIDES",
                        help="run everything once per variant, each a comma-separated list of config overrides "
                             "(\"\" for the configured settings), in one process, e.g. editor.prefix_cache=false \"\"")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    if args.save_tokenizer:
        from sadr.models.loading import load_model

        cache_dir = default_cache_dir()  # where sadr-run keeps it
        load_model("embedded:smollm2", device="cpu", cache_dir=cache_dir).tokenizer.save_pretrained(args.save_tokenizer)
        return str(args.save_tokenizer)
    device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    args.records = args.records or (2 if args.tiny else 4)
    args.stats_samples = args.stats_samples or (32 if args.tiny else 128)
    args.stats_length = args.stats_length or (16 if args.tiny else 256)
    if args.tiny and args.delta_steps is None:
        args.delta_steps = 3
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sadr-scale-"))
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else trained_tokenizer(1024 if args.tiny else 8192)
    folder = workdir / f"{args.arch}-random"
    build_seconds = build_model_folder(args.arch, args.tiny, device, tokenizer, folder)
    print(f"built and saved a random {args.arch} in {build_seconds:.1f} s: {folder}", flush=True)

    settings = Settings(args.arch, folder, device, args.dtype, args.records, args.stats_samples, args.stats_length,
                        args.delta_steps, workdir, args.stats_text_file, args.parallel_cases)
    results = []
    try:
        run_every_setting(args, settings, results)
        interrupted = False
    except KeyboardInterrupt:  # gpu_checks.sh's time limit (SIGINT): the tables below keep the runs that finished
        interrupted = True
    release_kept_model()
    report = "\n\n".join([environment(args, device), table(results), stats_table(statistics_passes(workdir / "cache"))])
    if interrupted:
        report = f"interrupted: the {len(results)} runs that finished before it\n\n{report}"
    print("\n" + report)
    if args.out:
        args.out.write_text(report + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"environment": environment(args, device),
                                                             "runs": dict(results)}, indent=1))
    if interrupted:
        raise SystemExit(130)
    return report


if __name__ == "__main__":
    main()
