"""The δ-optimisation's reported losses, recomputed independently.

Each prompt is run on its own through the model's plain forward (no padding, no prefix cache, logits from the model's
own head), with δ added by a hook at the subject's last token, which is located from the tokenizer's offsets. The
NLL, the essence KL, the weight decay and the total are then computed as method.md writes them and compared with
what the optimisation reported at its last step (taken at the δ it returns). A target of two tokens, a nonzero decay
and a KL of visible size make each term count; PMET's case checks its NLL schedule and its two decays.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sadr.data.records import EditRequest
from sadr.editors.delta import (DeltaObjective, StepState, _kl_edited_from_initial, clamp_norm_, loss_is_small,
                                never_stop, optimize_delta, optimize_deltas)
from sadr.editors.pmet import pmet_rules
from sadr.errors import InvalidSettingError
from sadr.models.adapters import adapter_for
from sadr.regularizers.base import DeltaRegularizer
from tests.editing import TEMPLATES, editor_config
from tests.tiny_models import make_model

# a target of two tokens; the subject mid-prompt
TWO_TOKENS = EditRequest(prompt="The capital city of {} is", subject="Toyota", target_new="Paris Japan")
# a target of one token right after the subject, which the tiny model makes its argmax within a few steps
REACHABLE = EditRequest(prompt="The capital city of {}", subject="Toyota", target_new="Japan")
ESSENCE = "{} is a"
LAYER = 1
KL_FACTOR = 0.5
WEIGHT_DECAY = 0.01

# the output of these modules is where each site's δ is added, written here by name rather than read from the adapter
SITE_MODULES = {
    "gpt2": {"mlp_out": "transformer.h.{}.mlp.c_proj", "attn_out": "transformer.h.{}.attn.c_proj"},
    "llama": {"mlp_out": "model.layers.{}.mlp.down_proj", "attn_out": "model.layers.{}.self_attn.o_proj"},
}


def _subject_text(template: str, subject: str) -> tuple[str, int]:
    """The prompt with the subject filled in, and the character where the subject ends."""
    start = template.index("{}")
    return template.replace("{}", subject, 1), start + len(subject)


def _subject_position(tokenizer, text: str, subject_end: int) -> int:
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return max(i for i, (start, end) in enumerate(offsets) if end > start and start < subject_end)


def _log_probs(model, family: str, ids: list[int], position: int, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    """(tokens, vocabulary) log-probabilities of one prompt's plain forward, each δ added at `position`."""
    def add(delta):
        def hook(_module, _inputs, output):
            output = output.clone()
            output[0, position] += delta.to(output.dtype)
            return output
        return hook

    handles = [model.get_submodule(SITE_MODULES[family][site].format(LAYER)).register_forward_hook(add(delta))
               for site, delta in deltas.items()]
    try:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    finally:
        for handle in handles:
            handle.remove()


def _site_output(model, family: str, site: str, ids: list[int], position: int) -> torch.Tensor:
    seen = []
    handle = model.get_submodule(SITE_MODULES[family][site].format(LAYER)).register_forward_hook(
        lambda _module, _inputs, output: seen.append(output[0, position].detach().double()))
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        handle.remove()
    return seen[0]


def recomputed_terms(model, family: str, tokenizer, request: EditRequest, deltas: dict[str, torch.Tensor],
                     nll_weight: float) -> dict:
    """nll, kl (kl_factor included), decay and loss at `deltas`, prompt by prompt."""
    target_ids = tokenizer(" " + request.target_new, add_special_tokens=False)["input_ids"]
    nlls, initial = [], {}
    for context in TEMPLATES:
        text, subject_end = _subject_text(context.replace("{}", request.prompt, 1), request.subject)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        position = _subject_position(tokenizer, text, subject_end)
        if context == "{}":  # v₀ of each site: its output at the bare prompt's subject token, δ = 0
            initial = {site: _site_output(model, family, site, prompt_ids, position) for site in deltas}
        log_p = _log_probs(model, family, prompt_ids + target_ids, position, deltas)
        first = len(prompt_ids) - 1  # the logits there predict the first target token
        nlls.append(-sum(log_p[first + j, t] for j, t in enumerate(target_ids)) / len(target_ids))
    text, subject_end = _subject_text(ESSENCE, request.subject)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    position = _subject_position(tokenizer, text, subject_end)
    edited = _log_probs(model, family, ids, position, deltas)[position]
    unedited = _log_probs(model, family, ids, position, {})[position]
    kl = KL_FACTOR * float((edited.exp() * (edited - unedited)).sum())
    nll = float(torch.stack(nlls).mean())
    decay = sum(WEIGHT_DECAY * float(deltas[s].double().norm() / initial[s].norm() ** 2) for s in deltas)
    return {"nll": nll, "kl": kl, "decay": decay, "loss": nll_weight * nll + kl + decay}


def _objective(name: str, sites: tuple[str, ...], steps: int, **rules) -> DeltaObjective:
    hparams = editor_config(name, v_num_grad_steps=steps, v_lr=0.2, kl_factor=KL_FACTOR, v_weight_decay=WEIGHT_DECAY,
                            early_stop=False)
    return DeltaObjective.from_hparams(hparams, sites=sites, layer=LAYER, **rules)


def _check(reported, expected: dict) -> None:
    assert expected["kl"] > 1e-3 and expected["decay"] > 1e-3  # each term is large enough to be seen in the total
    assert reported.nll == pytest.approx(expected["nll"], rel=1e-4)
    assert reported.kl == pytest.approx(expected["kl"], rel=1e-3)
    assert reported.loss == pytest.approx(expected["loss"], rel=1e-4)


@pytest.mark.parametrize("family", sorted(SITE_MODULES))
def test_rome_loss_is_the_mean_per_token_nll_plus_the_essence_kl_plus_the_decay(tokenizer, family):
    model = make_model(family)
    assert len(tokenizer(" " + TWO_TOKENS.target_new, add_special_tokens=False)["input_ids"]) == 2
    result = optimize_delta(model, adapter_for(model), tokenizer, TWO_TOKENS, TEMPLATES,
                            _objective("rome", ("mlp_out",), 4))
    assert result.steps_run == 4
    _check(result.history[-1], recomputed_terms(model, family, tokenizer, TWO_TOKENS, result.deltas, nll_weight=1.0))


def test_pmet_loss_weighs_the_nll_by_a_tenth_after_the_target_became_the_argmax(tokenizer):
    """PMET's two δs, each decayed relative to its own v₀, and the NLL weight of its schedule."""
    model = make_model("gpt2")
    steps = 6
    result = optimize_delta(model, adapter_for(model), tokenizer, REACHABLE, TEMPLATES,
                            _objective("pmet", ("attn_out", "mlp_out"), steps, **pmet_rules(1.0)))
    assert result.steps_run == steps
    assert result.history[-2].target_is_argmax  # so the last step's NLL weight is a tenth
    _check(result.history[-1], recomputed_terms(model, "gpt2", tokenizer, REACHABLE, result.deltas, nll_weight=0.1))


def test_clamp_scales_a_long_delta_down_to_the_bound_and_leaves_a_short_one_bit_for_bit():
    long, short = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])
    clamp_norm_(long, torch.tensor(2.0))
    clamp_norm_(short, torch.tensor(2.0))
    torch.testing.assert_close(long, torch.tensor([1.2, 1.6]))
    assert torch.equal(short, torch.tensor([0.3, 0.4]))


def test_early_stop_off_replaces_any_stop_rule_by_one_that_never_stops():
    """`editor.early_stop=false` even overrides an editor's own rule (PMET's), so every δ runs all its steps."""
    done = StepState(step=3, loss=0.0, nll=0.0, kl=0.0, target_is_argmax=True)
    on = DeltaObjective.from_hparams(editor_config(), sites=("mlp_out",), layer=1)
    assert on.should_stop is loss_is_small and on.should_stop(done)
    for rules in ({}, {"should_stop": lambda _state: True}):
        off = DeltaObjective.from_hparams(editor_config(early_stop=False), sites=("mlp_out",), layer=1, **rules)
        assert off.should_stop is never_stop and not off.should_stop(done)


def test_the_essence_kl_is_the_mean_over_essence_prompts_of_kl_from_edited_to_initial():
    """Two essence rows of three outcomes, KL(P_δ ‖ P₀) written out term by term: their mean, not their sum."""
    edited = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]], dtype=torch.float64)
    initial = torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.25, 0.25]], dtype=torch.float64)
    by_hand = [sum(p * math.log(p / q) for p, q in zip(e.tolist(), i.tolist())) for e, i in zip(edited, initial)]
    assert by_hand[0] != by_hand[1] and min(by_hand) > 0
    kl = _kl_edited_from_initial(edited.log(), initial.log())
    assert float(kl) == pytest.approx(sum(by_hand) / 2, rel=1e-12)


class _OneRequestTerm(DeltaRegularizer):
    """A regularizer written for one request at a time: it gives `loss` alone (the default `case_losses`)."""

    weight, detached = 1.0, False

    def attach(self, model, adapter, batch):
        pass

    def loss(self, step):
        return torch.zeros(())

    def detach(self):
        self.detached = True


def test_a_one_request_regularizer_is_refused_where_requests_share_the_optimisation(tokenizer):
    """Its one term cannot be any request's own: the error says so and how to run, and its hooks are removed."""
    model = make_model("gpt2")
    regularizer = _OneRequestTerm()
    with pytest.raises(InvalidSettingError, match=r"^_OneRequestTerm gives 1 loss terms for 2 requests optimised "
                                                  r"together: .*\(set editor\.parallel_cases=1\)$"):
        optimize_deltas(model, adapter_for(model), tokenizer, [TWO_TOKENS, REACHABLE], TEMPLATES,
                        _objective("rome", ("mlp_out",), 2), [regularizer])
    assert regularizer.detached
    alone = optimize_delta(model, adapter_for(model), tokenizer, TWO_TOKENS, TEMPLATES,
                           _objective("rome", ("mlp_out",), 2), [_OneRequestTerm()])
    assert alone.steps_run == 2


class _ConstantTerm(DeltaRegularizer):
    """A term of known value, with no gradient, so the δs and the editor's loss are those of the plain run."""

    def __init__(self, weight: float, value: float):
        self.weight, self.value = weight, value

    def attach(self, model, adapter, batch):
        pass

    def loss(self, step):
        return torch.tensor(self.value)

    def detach(self):
        pass


def test_a_regularizer_adds_gamma_times_its_term_to_the_editor_loss(tokenizer):
    """method.md §3: loss = editor_loss + γ · L_SADR (γ = sadr.lambda), step after step."""
    model = make_model("gpt2")
    gamma, term = 0.25, 3.0
    runs = [optimize_delta(model, adapter_for(model), tokenizer, TWO_TOKENS, TEMPLATES,
                           _objective("rome", ("mlp_out",), 3), regularizers)
            for regularizers in ([], [_ConstantTerm(gamma, term)])]
    plain, regularized = ([state.loss for state in run.history] for run in runs)
    assert len(plain) == len(regularized) == 3
    assert regularized == pytest.approx([loss + gamma * term for loss in plain], rel=1e-6)


class _QueryRecorder(_ConstantTerm):
    """Keeps the batch the δ-optimiser hands a regularizer (SADR reads its query rows at `last_prompt_positions`)."""

    def attach(self, model, adapter, batch):
        self.batch = batch


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_regularizers_are_handed_each_rewrite_prompt_s_last_token_as_the_query(tokenizer, prefix_cache):
    """method.md §3: t_j is the last prompt token, the one predicting o*'s first token; the subject ends mid-prompt,
    so it is neither δ's position nor the end of the row. Token ids are recomputed from each prompt alone."""
    model = make_model("gpt2")
    recorder = _QueryRecorder(1.0, 0.0)
    objective = dataclasses.replace(_objective("rome", ("mlp_out",), 1), prefix_cache=prefix_cache)
    optimize_delta(model, adapter_for(model), tokenizer, TWO_TOKENS, TEMPLATES, objective, [recorder])
    batch = recorder.batch
    first_target = tokenizer(" " + TWO_TOKENS.target_new, add_special_tokens=False)["input_ids"][0]
    assert len(batch.rewrite_rows) == len(TEMPLATES)
    for row, context in zip(batch.rewrite_rows.tolist(), TEMPLATES):
        text, _ = _subject_text(context.replace("{}", TWO_TOKENS.prompt, 1), TWO_TOKENS.subject)
        last_token = tokenizer(text)["input_ids"][-1]
        position = int(batch.last_prompt_positions[row])
        assert int(batch.input_ids[row, position]) == last_token
        assert int(batch.input_ids[row, position + 1]) == first_target
        assert batch.cached_keys + position > int(batch.subject_keys[row])
