"""Seconds per δ-optimisation step (forward + backward) with and without attention rows.

Compares, on one right-padded batch shaped like a ROME δ batch (rewrite prompts + essence prompt):

* plain       the model's own attention (sdpa), no attention rows;
* fast rows   the same, plus `AttentionRows` hooks on every layer after the injection layer;
* eager maps  eager attention with `output_attentions=True` (what the official SADR code does).

Each step adds δ to the injection layer's output at one position per row and backpropagates a loss
that uses the rows (a sum of their squares), so the extra backward is timed too.

Usage:
    python benchmarks/attention_rows_bench.py                      # a random llama-shaped model
    python benchmarks/attention_rows_bench.py --model embedded:smollm2        # the offline default (any model.source)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sadr.conf.schema import default_cache_dir  # noqa: E402
from sadr.models.adapters import adapter_for  # noqa: E402
from sadr.models.loading import load_model  # noqa: E402
from sadr.regularizers.attention_rows import AttentionRows  # noqa: E402


def bench_model(source: str | None, cache_dir: str) -> torch.nn.Module:
    if source:
        return load_model(source, device="cpu", cache_dir=cache_dir).model
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=12,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def make_batch(vocab: int, batch: int, seq_len: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random tokens, right-padded to seq_len with lengths spread over [seq_len / 2, seq_len]."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.linspace(seq_len // 2, seq_len, batch).long()
    input_ids = torch.randint(vocab, (batch, seq_len), generator=generator)
    attention_mask = (torch.arange(seq_len) < lengths[:, None]).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask}, lengths - 1


MODES = (("plain", "sdpa"), ("fast rows", "sdpa"), ("eager maps", "eager"))  # (mode, attention implementation)


def step_fn(model, batch, last, injection_layer, mode):
    """One δ-step of `mode` (the model set to its attention implementation) as a function returning its loss."""
    adapter = adapter_for(model)
    later = list(range(injection_layer + 1, adapter.num_layers(model)))
    rows = torch.arange(len(last))
    subject = last // 2
    delta = torch.zeros(model.config.hidden_size, requires_grad=True)

    def inject(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.index_put((rows, subject), delta, accumulate=True)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def step():
        handle = adapter.block(model, injection_layer).register_forward_hook(inject)
        hooks = AttentionRows(model, adapter, later, last, batch["attention_mask"]) if mode == "fast rows" else None
        try:
            out = model(**batch, use_cache=False, output_attentions=mode == "eager maps")
            loss = out.logits[rows, last].logsumexp(-1).mean()
            if mode == "fast rows":
                loss = loss + hooks.collect_stacked().square().sum()
            elif mode == "eager maps":
                loss = loss + sum(out.attentions[layer][rows, :, last].square().sum() for layer in later)
            loss.backward()
        finally:
            handle.remove()
            if hooks is not None:
                hooks.remove()
        delta.grad = None
        return loss.detach()

    return step


def seconds_per_step(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model.source (embedded:smollm2, a model folder, a .gguf file); "
                                        "without it, a random llama-shaped model")
    parser.add_argument("--cache-dir", default=default_cache_dir())
    parser.add_argument("--batch", type=int, default=22, help="rows (ROME: 21 rewrite prompts + 1 essence)")
    parser.add_argument("--seq-len", type=int, default=24)
    parser.add_argument("--injection-layer", type=int, default=4, help="rows are taken on every later layer")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = bench_model(args.model, args.cache_dir).eval().requires_grad_(False)
    batch, last = make_batch(model.config.vocab_size, args.batch, args.seq_len)
    results = {}
    for mode, implementation in MODES:
        model.set_attn_implementation(implementation)
        results[mode] = seconds_per_step(step_fn(model, batch, last, args.injection_layer, mode), args.repeats)

    n_layers = adapter_for(model).num_layers(model)
    print(
        f"model: {args.model or 'random llama'} ({n_layers} layers, {model.config.num_attention_heads} heads), "
        f"batch {args.batch} x {args.seq_len} tokens, rows on layers {args.injection_layer + 1}..{n_layers - 1}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"{'mode':<12} {'s / fwd+bwd':>12} {'x plain':>8}")
    for mode, seconds in results.items():
        print(f"{mode:<12} {seconds:>12.4f} {seconds / results['plain']:>8.2f}")


if __name__ == "__main__":
    main()
