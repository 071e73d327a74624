"""The δ-optimisation's per-request stops and clamp: step counting (and SADR's query rows) when requests of one batch
stop at different steps, the boundary at which a sliding attention window stops the prefix cache from being used, when
a multi-token target counts as the argmax, the strictness of the loss stop rule, the clamp's bound, and what a plug-in
regularizer's defaults (sadr/regularizers/base.py) do at each step and when a request stops first.

A request that goes on after another left the batch is compared with the same request optimised alone (no stop),
step by step; the window's boundary is checked against the whole-prompt forward of the model itself; v₀ for the clamp
is read by a hook on the model's plain forward.
"""
from __future__ import annotations

import pytest
import torch

from sadr.data.records import EditRequest
from sadr.editors.delta import (DeltaObjective, StepState, _case_loss, _cases, loss_is_small, never_stop, optimize_delta,
                                optimize_deltas)
from sadr.editors.prompts import encode_delta_prompts, stack_delta_prompts
from sadr.models.adapters import adapter_for
from sadr.models.tokenization import pad_id_of
from sadr.regularizers.attention_drift import SelectiveAttentionDriftRegularizer
from sadr.regularizers.base import DeltaRegularizer
from tests.editing import TEMPLATES, editor_config
from tests.test_delta_loss import _site_output, _subject_position, _subject_text
from tests.tiny_models import make_model

FIRST = EditRequest(prompt="The capital city of {} is", subject="Toyota", target_new="Paris")
SECOND = EditRequest(prompt="{} is based in the city of", subject="France", target_new="Japan")
STEPS = 5


def _objective(steps: int = STEPS, **rules) -> DeltaObjective:
    return DeltaObjective.from_hparams(editor_config("rome", v_num_grad_steps=steps), sites=("mlp_out",), layer=1,
                                       **rules)


def test_a_request_left_alone_after_another_stopped_runs_every_remaining_step(tokenizer):
    """The first request stops after its step 1; the second must still run steps 2, 3 and 4 (all STEPS of them),
    numbered so, to the δ it reaches optimised alone without a stop."""
    model = make_model("llama")
    adapter = adapter_for(model)
    calls = []

    def first_stops_at_its_second_step(state):  # while both run, it is asked for the first, then the second
        calls.append(state)
        return len(calls) == 3

    first, second = optimize_deltas(model, adapter, tokenizer, [FIRST, SECOND], TEMPLATES,
                                    _objective(should_stop=first_stops_at_its_second_step))
    assert first.steps_run == 2
    assert second.steps_run == STEPS
    assert [s.step for s in first.history] == [0, 1]
    assert [s.step for s in second.history] == list(range(STEPS))
    assert len(calls) == 2 * 2 + (STEPS - 2)  # each state is asked about once

    alone = optimize_delta(model, adapter, tokenizer, SECOND, TEMPLATES, _objective(should_stop=never_stop))
    assert alone.steps_run == STEPS
    for a, b in zip(alone.history, second.history):
        assert b.loss == pytest.approx(a.loss, rel=1e-4, abs=1e-6)
    torch.testing.assert_close(second.deltas["mlp_out"], alone.deltas["mlp_out"], rtol=1e-4,
                               atol=1e-4 * alone.deltas["mlp_out"].norm().item())


def _widths(model, tokenizer, request, prefix_cache: bool):
    widths = []
    hook = model.base_model.register_forward_pre_hook(
        lambda _module, _args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        objective = DeltaObjective.from_hparams(editor_config("rome", v_num_grad_steps=6, prefix_cache=prefix_cache),
                                                sites=("mlp_out",), layer=1)
        result = optimize_delta(model, adapter_for(model), tokenizer, request, TEMPLATES, objective)
    finally:
        hook.remove()
    return result, widths


def test_a_sliding_window_as_long_as_the_prompts_keeps_the_cache_and_a_shorter_one_does_not(tokenizer):
    """The cache is used up to a window exactly as wide as the batch of prompts, and the whole prompts are fed below
    it; on each side of the boundary the δ is the one of the model's own whole-prompt forward."""
    width = stack_delta_prompts([encode_delta_prompts(tokenizer, SECOND, TEMPLATES)],
                                pad_id_of(tokenizer)).batch.input_ids.shape[1]
    for window, cached in ((width - 2, False), (width - 1, False), (width, True), (width + 1, True)):
        model = make_model("mistral")
        model.config.sliding_window = window
        result, widths = _widths(model, tokenizer, SECOND, prefix_cache=True)
        whole, whole_widths = _widths(model, tokenizer, SECOND, prefix_cache=False)
        assert set(whole_widths) == {width}
        if cached:  # a prefix forward, then steps fed only the tokens from δ's position on
            assert len(widths) == result.steps_run + 1 and max(widths[1:]) < width, window
        else:
            assert set(widths) == {width} and len(widths) == result.steps_run, window
        torch.testing.assert_close(result.deltas["mlp_out"], whole.deltas["mlp_out"], rtol=1e-5, atol=1e-6)


TWO_TOKENS = EditRequest(prompt="The capital city of {} is", subject="Toyota", target_new="Paris Japan")


def test_the_target_is_the_argmax_only_when_each_of_its_tokens_is_on_top_after_every_prompt(tokenizer):
    """PMET's NLL weight and stop rule read `target_is_argmax`: with a target of two tokens, log-probabilities made by
    hand in which one target token of one rewrite prompt is beaten make it false; all of them on top make it true."""
    assert len(tokenizer(" " + TWO_TOKENS.target_new, add_special_tokens=False)["input_ids"]) == 2
    stacked = stack_delta_prompts([encode_delta_prompts(tokenizer, TWO_TOKENS, TEMPLATES)], pad_id_of(tokenizer))
    (case,) = _cases(stacked, ("mlp_out",), 8, torch.device("cpu"))
    case.initial = {"mlp_out": torch.ones(8)}
    targets = case.prompts.target_ids
    assert targets.numel() == 2 * len(TEMPLATES)
    log_probs = torch.full((case.n_head, len(tokenizer)), -20.0)
    log_probs[torch.arange(targets.numel()), targets] = -0.1  # every target token on top
    *_, argmax_ok = _case_loss(case, log_probs.log_softmax(-1), _objective())
    assert bool(argmax_ok)
    beaten = log_probs.clone()
    beaten[3, (targets[3] + 1) % len(tokenizer)] = 0.0  # one token of one prompt is beaten
    *_, argmax_ok = _case_loss(case, beaten.log_softmax(-1), _objective())
    assert not bool(argmax_ok)


def test_the_loss_stop_rule_is_strict_as_rome_s_loss_below_5e_2():
    """ROME's and MEMIT's `if loss < 5e-2: break`: a loss of exactly 5e-2 goes on."""
    state = lambda loss: StepState(step=1, loss=loss, nll=loss, kl=0.0, target_is_argmax=False)  # noqa: E731
    assert not loss_is_small(state(5e-2))
    assert loss_is_small(state(float(torch.nextafter(torch.tensor(5e-2, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)))))


def test_delta_is_clamped_to_the_factor_times_the_norm_of_its_site_s_unedited_output(tokenizer):
    """clamp_norm_factor bounds ‖δ‖ by factor · ‖v₀‖, v₀ the MLP output at the bare prompt's subject token (read here
    by a hook on the model's plain forward): a δ that grows past the bound without it ends exactly on it."""
    model = make_model("llama")
    adapter = adapter_for(model)
    text, subject_end = _subject_text(SECOND.prompt, SECOND.subject)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    v0 = _site_output(model, "llama", "mlp_out", ids, _subject_position(tokenizer, text, subject_end)).float()
    factor = 0.5

    def run(clamp_norm_factor):
        hparams = editor_config("rome", v_num_grad_steps=8, clamp_norm_factor=clamp_norm_factor, early_stop=False)
        objective = DeltaObjective.from_hparams(hparams, sites=("mlp_out",), layer=1)
        return optimize_delta(model, adapter, tokenizer, SECOND, TEMPLATES, objective)

    assert run(100.0).deltas["mlp_out"].norm() > 2 * factor * v0.norm()  # the bound is reached
    clamped = run(factor)
    torch.testing.assert_close(clamped.initial["mlp_out"], v0, rtol=1e-4, atol=1e-6)
    assert clamped.deltas["mlp_out"].norm().item() == pytest.approx(factor * v0.norm().item(), rel=1e-4)


def test_sadr_reads_the_last_prompt_token_of_the_requests_left_after_another_stopped(tokenizer):
    """Subjects mid-prompt, so δ's position and SADR's query (the last prompt token) differ: after the first request
    stops at its step 1, the second's SADR terms, head selections and δ stay those of it optimised alone."""
    model = make_model("llama")
    adapter = adapter_for(model)
    calls = []

    def first_stops_at_its_second_step(state):
        calls.append(state)
        return len(calls) == 3

    _, together = optimize_deltas(model, adapter, tokenizer, [FIRST, SECOND], TEMPLATES,
                                  _objective(should_stop=first_stops_at_its_second_step),
                                  [SelectiveAttentionDriftRegularizer(10.0)])
    alone = optimize_delta(model, adapter, tokenizer, SECOND, TEMPLATES, _objective(should_stop=never_stop),
                           [SelectiveAttentionDriftRegularizer(10.0)])
    assert together.steps_run == alone.steps_run == STEPS
    assert any(any(layer) for layer in alone.diagnostics["selected_head_counts"])  # SADR acted
    assert together.diagnostics["selected_head_counts"] == alone.diagnostics["selected_head_counts"]
    assert together.diagnostics["loss"] == pytest.approx(alone.diagnostics["loss"], rel=1e-3, abs=1e-7)
    for a, b in zip(alone.history, together.history):
        assert b.loss == pytest.approx(a.loss, rel=1e-4, abs=1e-6)
    torch.testing.assert_close(together.deltas["mlp_out"], alone.deltas["mlp_out"], rtol=1e-4,
                               atol=1e-4 * alone.deltas["mlp_out"].norm().item())


class StepCountingTerm(DeltaRegularizer):
    """A plug-in term that keeps the interface's defaults: a constant without gradient (so δ moves as without it), the
    steps it is asked about, and the last of them as its diagnostics."""

    weight = 1.0

    def __init__(self):
        self.steps = []

    def attach(self, model, adapter, batch):
        pass

    def loss(self, step):
        self.steps.append(step)
        return torch.tensor(100.0)

    def diagnostics(self):
        return {"last_step": self.steps[-1]}

    def detach(self):
        pass


def test_a_plug_in_term_with_the_interface_s_defaults_is_asked_each_step_and_counts_in_the_stop_rule(tokenizer):
    """By default a term is in the stop rule (StepState.loss is the plain loss + 100 at every step), `case_losses`
    asks `loss` for each step in turn, and `case_diagnostics` reports the term's `diagnostics` of the last one."""
    model = make_model("llama")
    adapter = adapter_for(model)
    plain = optimize_delta(model, adapter, tokenizer, SECOND, TEMPLATES, _objective(should_stop=never_stop))
    term = StepCountingTerm()
    with_term = optimize_delta(model, adapter, tokenizer, SECOND, TEMPLATES, _objective(should_stop=never_stop), [term])
    assert term.steps == list(range(STEPS))
    assert [s.loss for s in with_term.history] == pytest.approx([s.loss + 100.0 for s in plain.history], abs=1e-4)
    assert with_term.diagnostics == {"last_step": STEPS - 1}


class TermPerRequest(DeltaRegularizer):
    """Shares a δ-optimisation of two requests (a term and diagnostics per request) but does not say how to keep some
    of them."""

    weight = 1.0

    def attach(self, model, adapter, batch):
        pass

    def loss(self, step):
        raise AssertionError("a batch of two requests asks for case_losses")

    def case_losses(self, step):
        return [torch.tensor(0.0), torch.tensor(0.0)]

    def case_diagnostics(self):
        return [{}, {}]

    def detach(self):
        pass


def test_a_term_per_request_without_keep_cases_is_refused_when_a_request_stops_first(tokenizer):
    model = make_model("llama")
    calls = []

    def first_stops_at_its_second_step(state):
        calls.append(state)
        return len(calls) == 3

    with pytest.raises(NotImplementedError, match=r"^TermPerRequest gives case_losses for several requests, so it must "
                                                  r"say how to keep some of them \(keep_cases\)$"):
        optimize_deltas(model, adapter_for(model), tokenizer, [FIRST, SECOND], TEMPLATES,
                        _objective(should_stop=first_stops_at_its_second_step), [TermPerRequest()])
