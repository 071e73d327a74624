"""PMET on tiny models: MLP-only writes, the MLP-output target and √ spread, its δ schedule, configs.
(Ridge solves and batch edits are checked for MEMIT and PMET alike in test_memit.py.)"""
import math

import pytest
import torch

from sadr.editors.delta import StepState, clamp_norm_
from sadr.editors.pmet import PmetEditor, pmet_rules
from sadr.models.adapters import adapter_for
from tests.editing import (
    TEMPLATES,
    assert_only_the_updates_were_written,
    batch_edit,
    batch_requests,
    composed_editor,
    record_deltas,
    spread_config,
    statistics,
)
from tests.tiny_models import make_model


def test_attention_is_bitwise_unchanged_and_only_mlp_down_projections_are_written(family, tokenizer, tmp_path):
    edit = batch_edit("pmet", family, tokenizer, tmp_path)
    adapter = adapter_for(edit.model)
    attention = tuple(adapter.attention.format(layer) + "." for layer in range(adapter.num_layers(edit.model)))
    names = [name for name in edit.before if name.startswith(attention)]
    assert names and all(torch.equal(edit.before[name], edit.model.state_dict()[name]) for name in names)
    assert sorted(edit.outcome.updates) == [1, 2]
    assert_only_the_updates_were_written(edit)


def test_the_mlp_part_is_the_target_and_the_residual_is_divided_by_sqrt(tokenizer, tmp_path, monkeypatch):
    """R₀ = (z_mlp − MLP output before any write) / √m = δ_mlp / √2; δ_attn is optimised but not written."""
    deltas = record_deltas(monkeypatch)
    model = make_model("llama")
    editor = PmetEditor(model, adapter_for(model), tokenizer, spread_config("pmet"),
                        statistics=statistics(model, tokenizer, tmp_path), context_templates=TEMPLATES)
    first = editor.apply(batch_requests(3)).solves[0]
    expected = torch.stack([d.deltas["mlp_out"] for d in deltas]) / math.sqrt(2)
    torch.testing.assert_close(first.residuals, expected, rtol=1e-4, atol=1e-5)
    assert all(d.deltas["attn_out"].norm() > 0 for d in deltas)


def _state(loss=1.0, kl=0.0, argmax=False):
    return StepState(step=0, loss=loss, nll=loss, kl=kl, target_is_argmax=argmax)


def test_nll_weight_drops_to_a_tenth_after_the_target_becomes_the_argmax():
    rules = pmet_rules(2.0)
    assert rules["nll_weight"](None) == 2.0
    assert rules["nll_weight"](_state(argmax=False)) == 2.0
    assert rules["nll_weight"](_state(argmax=True)) == pytest.approx(0.2)


def test_stops_on_a_small_loss_or_on_argmax_with_a_small_essence_kl():
    stop = pmet_rules(1.0)["should_stop"]
    assert stop(_state(loss=0.04))
    assert stop(_state(argmax=True, kl=0.01))
    assert not stop(_state(argmax=True, kl=0.02))
    assert not stop(_state(argmax=False, kl=0.0))


def test_published_defaults_compose():
    gptj = composed_editor("pmet", "gpt-j")
    assert list(gptj.layers) == [3, 4, 5, 6, 7, 8] and gptj.mom2_update_weight == 6000 and gptj.kl_factor == 1
    assert gptj.v_lr == 0.2 and gptj.v_num_grad_steps == 30 and "PMET repo" in gptj.source
    for model in ("llama3-8b", "llama2-7b", "tinyllama", "smollm2-135m"):
        cfg = composed_editor("pmet", model)
        assert cfg.source and cfg.layers and cfg.v_loss_layer > max(cfg.layers), model


def test_without_early_stop_every_delta_runs_all_its_steps(tokenizer, tmp_path, monkeypatch):
    """`editor.early_stop=false` replaces PMET's stop rule: the δs that stopped early take every step instead, along
    the same path up to where they stopped."""
    deltas = record_deltas(monkeypatch)
    runs = {}
    for early_stop in (True, False):
        model = make_model("llama")
        hparams = spread_config("pmet", v_lr=0.005, v_num_grad_steps=10, early_stop=early_stop)
        editor = PmetEditor(model, adapter_for(model), tokenizer, hparams, statistics=statistics(model, tokenizer, tmp_path),
                            context_templates=TEMPLATES)
        editor.apply(batch_requests(3))
        runs[early_stop], deltas[:] = list(deltas), []
    assert min(d.steps_run for d in runs[True]) < 10
    assert [d.steps_run for d in runs[False]] == [10] * len(runs[True])
    for stopped, full in zip(runs[True], runs[False]):
        assert [s.loss for s in full.history[: stopped.steps_run]] == pytest.approx([s.loss for s in stopped.history])


def test_the_delta_clamp_scales_down_to_its_limit_and_leaves_the_rest_bit_for_bit():
    torch.manual_seed(0)
    delta = torch.randn(64)
    inside = delta.clone()
    clamp_norm_(inside, inside.norm() * 1.0001)
    assert torch.equal(inside, delta)
    outside = delta.clone()
    limit = delta.norm() / 3
    clamp_norm_(outside, limit)
    torch.testing.assert_close(outside.norm(), limit)
    torch.testing.assert_close(outside, delta * (limit / delta.norm()), rtol=0, atol=0)
    zero = torch.zeros(8)
    clamp_norm_(zero, torch.zeros(()))  # a zero initial output: no 0/0
    assert torch.equal(zero, torch.zeros(8))
