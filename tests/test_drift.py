"""The attention-drift diagnostics: their per-head attention, their drift entries, and SADR's effect on an edit."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from sadr.conf.schema import SadrConfig
from sadr.data.records import EditCase, EditRequest
from sadr.editors.rome import RomeEditor
from sadr.evaluation.aggregate import LABELS, metric_table
from sadr.evaluation.drift import ATTENTION, compare_attention, decode_entry, drift_read_positions, encode_matrix
from sadr.evaluation.probes import METRICS, Probe, distract, resolve_metrics
from sadr.evaluation.suite import PromptMetrics, compare_all
from sadr.models.adapters import adapter_for
from sadr.models.tokenization import encode_prompt_target
from sadr.regularizers.attention_drift import SelectiveAttentionDriftRegularizer, build_regularizers
from sadr.regularizers.base import DeltaRegularizer
from tests.editing import TEMPLATES, editor_config, statistics
from tests.test_attention_rows import build_model
from tests.tiny_models import make_model

# Neighborhood prompts of different lengths, so the DNS batch is right-padded.
CASE = EditCase(
    case_id=7,
    request=EditRequest(prompt="{} is based in", subject="Toyota", target_new="America", target_true="Japan"),
    neighborhood_prompts=("Honda is based in", "The capital of France is", "Ford is"),
)


DNS_ONLY = resolve_metrics(["distract_neighborhood"])


def drift_evaluator(**settings) -> PromptMetrics:
    """The prompt scorer with the drift diagnostics, as `eval.drift=true` builds it, scoring nothing else."""
    return PromptMetrics([], drift=True, **settings)


def dns_prompt_ids(tokenizer, case) -> list[list[int]]:
    return [encode_prompt_target(tokenizer, p.prompt, p.good).prompt_ids for p in METRICS["distract_neighborhood"].probes(case)]


def eager_attention_to_subject(model, ids, subject) -> torch.Tensor:
    """(layers, heads) from the model's own eager attention weights over the prompt alone, at (last, subject)."""
    out = model(input_ids=torch.tensor([ids]), output_attentions=True)
    return torch.stack([a[0, :, len(ids) - 1, subject] for a in out.attentions])


def test_dns_prompts_are_read_at_their_last_token_and_the_subject_of_the_edit_sentence(tokenizer):
    probes = METRICS["distract_neighborhood"].probes(CASE)
    assert len(probes) == len(CASE.neighborhood_prompts)
    for probe, neighbor in zip(probes, CASE.neighborhood_prompts):
        text = distract(CASE, neighbor)
        assert probe.prompt == text and text.startswith("Toyota is based in America. ")
        ids = tokenizer(text)["input_ids"]
        last, subject = drift_read_positions(tokenizer, CASE, probe)
        assert last == len(ids) - 1  # the whole DNS prompt; its last token predicts the answer
        assert tokenizer.decode(ids[: subject + 1]) == "Toyota"
        assert tokenizer.decode(ids[subject + 1 :]).startswith(" is based in America.")


def test_a_dns_prompt_without_the_edit_sentence_is_refused(tokenizer):
    """The subject position is read in the prepended edit sentence: a prompt lacking it has no such position."""
    with pytest.raises(ValueError, match="does not start with the edit sentence"):
        drift_read_positions(tokenizer, CASE, Probe("Honda is based in. Toyota is based in", "Japan"))


def test_subject_attention_equals_the_models_eager_attention_weights(tokenizer, family):
    model = build_model(family)  # the family's default kernel (sdpa where it has one), peaked attention
    entry = drift_evaluator().evaluate(model, tokenizer, adapter_for(model), [CASE])[0][ATTENTION]
    got = decode_entry(entry)
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    assert entry["value"] == [] and entry["shape"] == [n_layers, n_heads]
    assert got.shape == (len(CASE.neighborhood_prompts), n_layers, n_heads)
    eager = build_model(family, attn_implementation="eager")
    positions = [drift_read_positions(tokenizer, CASE, p)[1] for p in METRICS["distract_neighborhood"].probes(CASE)]
    # read from the scorer's rows (prompt and target, right-padded), against each prompt alone
    want = np.stack([eager_attention_to_subject(eager, ids, subject).numpy()
                     for ids, subject in zip(dns_prompt_ids(tokenizer, CASE), positions)])
    assert want.max() > 0.02  # attention on the subject, not all ~0, so the comparison means something
    np.testing.assert_allclose(got, want, atol=2.5e-4, rtol=0)  # float16 storage: within 2^-12


def test_the_attention_shape_is_layers_by_heads(tokenizer):
    """With fewer layers than heads, a swapped shape would decode each prompt's values into the wrong cells."""
    model = build_model("llama", {"num_hidden_layers": 2})
    entry = drift_evaluator().evaluate(model, tokenizer, adapter_for(model), [CASE])[0][ATTENTION]
    assert entry["shape"] == [2, model.config.num_attention_heads]
    probe = METRICS["distract_neighborhood"].probes(CASE)[0]
    subject = drift_read_positions(tokenizer, CASE, probe)[1]
    eager = build_model("llama", {"num_hidden_layers": 2}, attn_implementation="eager")
    want = eager_attention_to_subject(eager, dns_prompt_ids(tokenizer, CASE)[0], subject).numpy()
    np.testing.assert_allclose(decode_entry(entry)[0], want, atol=2.5e-4, rtol=0)


def test_batching_and_padding_do_not_change_the_values(tokenizer):
    model = build_model("llama")
    adapter = adapter_for(model)
    one = drift_evaluator(batch_size=1).evaluate(model, tokenizer, adapter, [CASE, CASE])
    many = drift_evaluator(batch_size=64).evaluate(model, tokenizer, adapter, [CASE, CASE])
    for a, b in zip(one, many):
        np.testing.assert_allclose(decode_entry(a[ATTENTION]), decode_entry(b[ATTENTION]), atol=2.5e-4, rtol=0)


def test_the_drift_rows_cost_no_forward_and_leave_the_scores_unchanged(tokenizer):
    model = build_model("llama")
    adapter = adapter_for(model)
    forwards = []
    model.base_model.register_forward_pre_hook(lambda *_: forwards.append(1))
    metrics = resolve_metrics(["efficacy", "neighborhood", "distract_neighborhood"])
    plain = PromptMetrics(metrics).evaluate(model, tokenizer, adapter, [CASE])[0]
    plain_forwards, forwards[:] = len(forwards), []
    with_drift = PromptMetrics(metrics, drift=True).evaluate(model, tokenizer, adapter, [CASE])[0]
    assert len(forwards) == plain_forwards
    assert set(with_drift) == set(plain) | {ATTENTION}
    for name in plain:
        assert with_drift[name] == plain[name]
    # DNS left out of the metrics: its prompts are still run for the drift rows, and not reported
    alone = drift_evaluator().evaluate(model, tokenizer, adapter, [CASE])[0]
    assert set(alone) == {ATTENTION} and alone[ATTENTION] == with_drift[ATTENTION]


def test_a_case_without_dns_prompts_gets_no_entries(tokenizer):
    model = make_model("llama")
    zsre_like = EditCase(0, EditRequest(prompt="{} is based in", subject="Toyota", target_new="America"),
                         neighborhood_prompts=("Honda is based in",))  # no target_true: no DNS probes
    evaluator = PromptMetrics(DNS_ONLY, drift=True)
    results = evaluator.evaluate(model, tokenizer, adapter_for(model), [zsre_like, CASE])
    assert results[0] == {} and ATTENTION in results[1]
    assert evaluator.compare(results[0], results[0]) == {}


def entry(matrices) -> dict:
    array = torch.tensor(matrices, dtype=torch.float32)
    return {"value": [], "encoding": "float16-base64", "shape": list(array.shape[1:]),
            "attention": [encode_matrix(m) for m in array]}


def test_compare_picks_the_largest_increase_its_layer_and_head():
    # 2 prompts, 3 layers, 2 heads; values are multiples of 1/64, exact in float16
    before = [[[0.50, 0.25], [0.125, 0.0], [0.75, 0.0625]],
              [[0.50, 0.25], [0.125, 0.0], [0.75, 0.0625]]]
    after = [[[0.25, 0.25], [0.125, 0.5], [0.875, 0.0625]],  # largest increase +0.5 at layer 1, head 1
             [[0.50, 0.25], [0.125, 0.0], [0.50, 0.1875]]]  # +0.125 at layer 2, head 1 (the drop at head 0 is not it)
    derived = compare_attention({ATTENTION: entry(after)}, {ATTENTION: entry(before)})
    assert derived["drift_max"]["value"] == [0.5, 0.125]
    assert derived["drift_mean"]["value"] == pytest.approx([(-0.25 + 0.5 + 0.125) / 6, (-0.25 + 0.125) / 6])
    location = derived["drift_argmax"]
    assert (location["layer"], location["head"]) == ([1, 2], [1, 1])
    assert (location["before"], location["after"]) == ([0.0, 0.0625], [0.5, 0.1875])
    assert location["value"] == []


def test_stored_attention_of_another_encoding_or_other_prompts_is_refused_by_name():
    """A row written by another version (or by hand) is named, not misread: an unknown encoding, and edited and
    unedited attention of different prompt counts; no prompts give no drift entries."""
    with pytest.raises(ValueError, match=r"^unknown subject_attention encoding 'float32-base64'; expected "
                                         r"'float16-base64'$"):
        decode_entry({**entry([[[0.5]]]), "encoding": "float32-base64"})
    with pytest.raises(ValueError, match=r"^attention of shape \(1, 1, 2\) after the edit, \(2, 1, 2\) before: "
                                         r"different prompts\?$"):
        compare_attention({ATTENTION: entry([[[0.25, 0.5]]])}, {ATTENTION: entry([[[0.25, 0.5]], [[0.5, 0.5]]])})
    none = {ATTENTION: {"value": [], "encoding": "float16-base64", "shape": [1, 2], "attention": []}}
    assert compare_attention(none, none) == {}


def test_the_evaluators_compare_reads_drift_as_edited_minus_unedited():
    """docs/metrics.md: drift is after − before the edit. The runner's `compare_all(evaluators, edited, unedited)` and
    `PromptMetrics.compare` must pass the states on in that order; swapped, the increase below reads as a drop."""
    unedited = {ATTENTION: entry([[[0.25, 0.5]]])}  # 1 prompt, 1 layer, 2 heads
    edited = {ATTENTION: entry([[[0.75, 0.5]]])}  # head 0 gains +0.5
    for derived in (drift_evaluator().compare(edited, unedited), compare_all([drift_evaluator()], edited, unedited)):
        assert derived["drift_max"]["value"] == [0.5]
        assert derived["drift_mean"]["value"] == [0.25]
        location = derived["drift_argmax"]
        assert (location["layer"], location["head"]) == ([0], [0])
        assert (location["before"], location["after"]) == ([0.25], [0.75])


def test_no_drift_without_the_attention_of_both_states():
    """Drift is after − before: with the attention of only one state (a baseline scored without eval.drift, say)
    there is nothing to compare, so no drift entries (neither an error nor a drift against zero)."""
    one = {ATTENTION: entry([[[0.25, 0.5]]])}
    assert compare_attention(one, {}) == {} and compare_attention({}, one) == {} and compare_attention({}, {}) == {}


def test_drift_entries_make_table_rows_and_the_raw_attention_does_not():
    unedited = {ATTENTION: entry([[[0.5, 0.25]], [[0.5, 0.25]]])}  # 2 prompts, 1 layer, 2 heads
    edited = {ATTENTION: entry([[[0.75, 0.25]], [[0.5, 0.5]]])}
    rows = [{"edited": {**edited, **compare_attention(edited, unedited)}, "unedited": unedited}]
    table = metric_table(rows)
    shown = table[(table.protocol == "prompt") & (table.quantity == "value")]
    assert set(shown.metric) == {"drift_max", "drift_mean"}
    assert set(shown.label) == {LABELS["drift_max"], LABELS["drift_mean"]} == {"Drift", "Drift mean"}
    drift = shown[shown.metric == "drift_max"].iloc[0]
    assert drift["mean"] == pytest.approx(25.0) and drift["n"] == 2  # ×100, one observation per DNS prompt


def rome_update(family, tokenizer, tmp_path, regularizers, request=CASE.request, **hparams):
    model = make_model(family)
    editor = RomeEditor(model, adapter_for(model), tokenizer, editor_config(**hparams),
                        statistics=statistics(model, tokenizer, tmp_path), context_templates=TEMPLATES,
                        regularizers=regularizers)
    return editor.apply([request]).updates[1].dense()


def test_zero_lambda_is_the_plain_editor_bit_for_bit(tokenizer, tmp_path):
    plain = rome_update("llama", tokenizer, tmp_path, [])
    zero = build_regularizers(OmegaConf.merge(OmegaConf.structured(SadrConfig), {"lambda": 0.0}))
    assert zero == []  # `sadr.lambda=0` builds no regularizer at all
    assert torch.equal(rome_update("llama", tokenizer, tmp_path, zero), plain)
    # even attached, with its hooks recording every forward, a weight of 0 leaves the edit bitwise unchanged
    attached = rome_update("llama", tokenizer, tmp_path, [SelectiveAttentionDriftRegularizer(0.0)])
    assert torch.equal(attached, plain)


def test_positive_lambda_changes_the_edit(tokenizer, tmp_path):
    plain = rome_update("gpt2", tokenizer, tmp_path, [])
    regularizer = SelectiveAttentionDriftRegularizer(10.0)
    with_sadr = rome_update("gpt2", tokenizer, tmp_path, [regularizer])
    assert regularizer.selected and not torch.equal(with_sadr, plain)
    assert (with_sadr - plain).norm() > 1e-4 * plain.norm()


class ConstantTerm(DeltaRegularizer):
    """A loss term without gradient: it can change the edit only through the stop rule."""

    def __init__(self, in_stop_rule: bool):
        self.weight, self.in_stop_rule = 1.0, in_stop_rule

    def reads_cached_prefix(self):
        return True  # it reads nothing from the forward, so the edit runs as the plain one does

    def attach(self, model, adapter, batch):
        pass

    def loss(self, step):
        return torch.tensor(100.0)

    def detach(self):
        pass


def test_a_term_left_out_of_the_stop_rule_cannot_keep_the_optimisation_running(tokenizer, tmp_path):
    def edit(regularizers, should_stop):
        model = make_model("llama")
        editor = RomeEditor(model, adapter_for(model), tokenizer, editor_config(), context_templates=TEMPLATES,
                            statistics=statistics(model, tokenizer, tmp_path), regularizers=regularizers)
        editor.objective = dataclasses.replace(editor.objective, should_stop=should_stop)
        return editor.apply([CASE.request])

    losses = []
    edit([], lambda state: losses.append(state.loss) or False)
    # a loss threshold the plain edit crosses a few steps in (tiny random models never reach 5e-2)
    stop = lambda state: state.loss < losses[5] + 1e-6  # noqa: E731
    plain, outside, inside = edit([], stop), edit([ConstantTerm(False)], stop), edit([ConstantTerm(True)], stop)
    assert plain.diagnostics["delta_steps"] <= 6 < len(losses)
    assert outside.diagnostics["delta_steps"] == plain.diagnostics["delta_steps"]
    assert torch.equal(outside.updates[1].dense(), plain.updates[1].dense())
    assert inside.diagnostics["delta_steps"] == len(losses)  # the constant keeps the loss above the threshold
    assert (_sadr_config(in_stop_rule=False)[0].in_stop_rule, _sadr_config()[0].in_stop_rule) == (False, True)


def _sadr_config(**values):
    return build_regularizers(OmegaConf.merge(OmegaConf.structured(SadrConfig), {"lambda": 0.1, **values}))
