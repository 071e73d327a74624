"""Seconds per δ-optimisation step: plain ROME, ROME + SADR, and SADR the official code's way.

All three run the real `optimize_delta` with ROME's objective (the composed config's `editor` for the
model, the real context templates, a real request) for the same number of steps (the stop rule is turned
off), so only the regularizer differs:

* plain         no regularizer (γ = 0: what `sadr=default` runs);
* sadr          `SelectiveAttentionDriftRegularizer` as `sadr-run sadr.lambda=...` builds it: attention rows
                of the last prompt token rebuilt from hooked queries/keys, the model's own (sdpa) kernel;
* eager maps    the official code's approach with the same loss: the model switched to eager attention,
                `output_attentions=True` on every forward (every layer's B×H×T×T map), rows read from those.

A step is one optimiser iteration (forward, loss, backward, Adam step, clamp), timed between
consecutive optimiser steps; modes are interleaved over `--rounds` to spread machine-load noise, and the
median is reported. Run it single-threaded beside other jobs (OMP_NUM_THREADS=1) or alone.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/sadr_step_bench.py                  # offline default model
    OMP_NUM_THREADS=1 python benchmarks/sadr_step_bench.py --tiny           # a random tiny llama
    OMP_NUM_THREADS=1 python benchmarks/sadr_step_bench.py --smollm2-depth  # tiny widths, SmolLM2's 30 layers
    python benchmarks/sadr_step_bench.py --steps 12 --rounds 3 --cache-dir /tmp/sadr-cache
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.optim.optimizer import register_optimizer_step_post_hook

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sadr.conf.schema import default_cache_dir  # noqa: E402
from sadr.conf.registry import compose_config  # noqa: E402
from sadr.data.records import EditRequest  # noqa: E402
from sadr.editors.delta import DeltaObjective, optimize_delta  # noqa: E402
from sadr.models.embedded import EmbeddedModelUnavailable  # noqa: E402
from sadr.models.fingerprint import computation_fingerprint, model_fingerprint, tokenizer_fingerprint  # noqa: E402
from sadr.models.loading import load_model  # noqa: E402
from sadr.regularizers.attention_drift import SelectiveAttentionDriftRegularizer, head_kl, select_heads  # noqa: E402
from sadr.regularizers.base import DeltaBatch, DeltaRegularizer  # noqa: E402
from sadr.runner import editor_templates  # noqa: E402

REQUEST = EditRequest(prompt="{} is located in the country of", subject="The Eiffel Tower",
                      target_new="Italy", target_true="France")


class EagerMapsSadr(DeltaRegularizer):
    """The same L_SADR, read from `output_attentions` maps of eager attention (the official code's way)."""

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self._handles = []

    def attach(self, model, adapter, batch: DeltaBatch) -> None:
        model.set_attn_implementation("eager")
        rows = batch.rewrite_rows
        self._rows, self._last = rows, batch.last_prompt_positions[rows]
        self._subjects, self._mask = batch.subject_keys[rows], batch.attention_mask[rows]
        self._n_layers = adapter.num_layers(model)
        self._layers = list(range(batch.injection_layer + 1, self._n_layers))
        self._reference, self._maps = None, None

        def ask(module, args, kwargs):
            return args, {**kwargs, "output_attentions": True}

        def keep(module, args, kwargs, output):
            self._maps = output.attentions

        self._model = model
        self._handles = [model.base_model.register_forward_pre_hook(ask, with_kwargs=True),
                         model.base_model.register_forward_hook(keep, with_kwargs=True)]

    def loss(self, step: int) -> torch.Tensor:
        n = torch.arange(len(self._rows))
        # blocks below the injection layer are replayed from step 0 (`frozen_blocks`), so later forwards
        # record maps only for the blocks that ran: the last entries are always the last layers
        offset = len(self._maps) - self._n_layers
        current = {layer: self._maps[layer + offset][self._rows][n, :, self._last] for layer in self._layers}
        if step == 0:
            self._reference = {layer: rows.detach() for layer, rows in current.items()}
            return sum(rows.sum() for rows in current.values()) * 0.0
        total = 0.0
        for layer, rows in current.items():
            selected = select_heads(self._reference[layer], rows, self._subjects)
            total = total + torch.where(selected, head_kl(self._reference[layer], rows, self._mask, 1e-8), 0.0).sum()
        return total / len(self._rows)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if hasattr(self, "_model"):
            self._model.set_attn_implementation("sdpa")  # what the other modes start from


def load(args):
    """(model, tokenizer, adapter, editor hparams, templates, description)."""
    cfg = compose_config(["editor=rome"], checked=False)
    if not (args.tiny or args.smollm2_depth):
        try:
            loaded = load_model(cfg.model.source, family=cfg.model.family, device="cpu", cache_dir=args.cache_dir)
            # the runner's key (no TF32 here): the templates a run cached
            computed_by = computation_fingerprint(model_fingerprint(loaded.model),
                                                  tokenizer_fingerprint(loaded.tokenizer), False, loaded.device.type)
            templates = editor_templates(OmegaConf.merge(cfg, {"cache_dir": args.cache_dir}), loaded, computed_by)
            return loaded.model, loaded.tokenizer, loaded.adapter, cfg.editor, templates, cfg.model.name
        except EmbeddedModelUnavailable as err:
            print(f"offline default model unavailable ({err}); using a random tiny llama", file=sys.stderr)
    from sadr.models.adapters import adapter_for
    from tests.tiny_models import make_model, make_tokenizer  # the test suite's tiny models

    tokenizer = make_tokenizer()
    if args.smollm2_depth:
        from transformers import AutoModelForCausalLM

        from shapes import model_config

        torch.manual_seed(0)
        config = model_config("smollm2-135m", tiny=True)
        config.vocab_size = max(config.vocab_size, len(tokenizer))
        model = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
        hparams = OmegaConf.merge(cfg.editor, {"layers": [4], "v_loss_layer": config.num_hidden_layers - 1,
                                               "clamp_norm_factor": 100.0})
        name = "random SmolLM2-135M depth, tiny widths (benchmarks/shapes.py)"
    else:
        model = make_model("llama")
        hparams = OmegaConf.merge(cfg.editor, {"layers": [1], "v_loss_layer": 3, "v_lr": 0.05, "clamp_norm_factor": 100.0})
        name = "tiny random llama (tests/tiny_models.py)"
    templates = ["{}"] + [f"{w} said. {{}}" for w in ("The", "Therefore", "Because", "I", "You") for _ in range(4)]
    return model, tokenizer, adapter_for(model), hparams, templates, name


def step_times(model, adapter, tokenizer, hparams, templates, steps, regularizers) -> tuple[list[float], torch.Tensor]:
    objective = DeltaObjective.from_hparams(hparams, sites=("mlp_out",), layer=int(hparams.layers[0]),
                                            should_stop=lambda state: False)
    objective.steps = steps
    stamps: list[float] = []
    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: stamps.append(time.perf_counter()))
    try:
        result = optimize_delta(model, adapter, tokenizer, REQUEST, templates, objective, regularizers)
    finally:
        handle.remove()
    assert result.steps_run == steps
    return [b - a for a, b in zip(stamps, stamps[1:])], result.deltas["mlp_out"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a random tiny llama instead of the offline default model")
    parser.add_argument("--smollm2-depth", action="store_true",
                        help="random weights, tiny widths at SmolLM2-135M's depth (30 layers, ROME at layer 4): a "
                             "step costs per-operation overhead there, as on a GPU with a small model")
    parser.add_argument("--steps", type=int, default=8, help="δ steps per run (each run times steps - 2 iterations)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of the three modes")
    parser.add_argument("--gamma", type=float, default=0.01)
    parser.add_argument("--cache-dir", default=default_cache_dir())
    args = parser.parse_args()

    model, tokenizer, adapter, hparams, templates, name = load(args)
    modes = {
        "plain": lambda: [],
        "sadr": lambda: [SelectiveAttentionDriftRegularizer(args.gamma)],
        "eager maps": lambda: [EagerMapsSadr(args.gamma)],
    }
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    deltas: dict[str, torch.Tensor] = {}
    step_times(model, adapter, tokenizer, hparams, templates, 3, [])  # warm-up
    for _ in range(args.rounds):
        for mode, regularizers in modes.items():
            seconds, deltas[mode] = step_times(model, adapter, tokenizer, hparams, templates, args.steps, regularizers())
            times[mode] += seconds
    n_layers = adapter.num_layers(model)
    print(f"model: {name} ({n_layers} layers, {model.config.num_attention_heads} query heads), ROME layer "
          f"{hparams.layers[0]}, {len(templates)} rewrite prompts + 1 essence prompt, γ = {args.gamma}, "
          f"{torch.get_num_threads()} torch thread(s), median over {args.rounds} x {args.steps - 2} steps")
    print(f"{'mode':<12} {'s / δ-step':>11} {'x plain':>8}")
    plain = statistics.median(times["plain"])
    for mode, values in times.items():
        median = statistics.median(values)
        print(f"{mode:<12} {median:>11.4f} {median / plain:>8.2f}")
    # the same loss either way: δ after the same steps agrees up to kernel rounding
    gap = (deltas["sadr"] - deltas["eager maps"]).norm() / deltas["sadr"].norm()
    moved = (deltas["sadr"] - deltas["plain"]).norm() / deltas["plain"].norm()
    print(f"|δ_sadr − δ_eager| / |δ_sadr| = {gap:.1e}  (SADR moved δ by {moved:.1e} of |δ_plain|)")


if __name__ == "__main__":
    main()
