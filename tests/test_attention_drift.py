"""SADR's loss: the head selection and KL of method.md §3, its gradient, and its config."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from omegaconf import OmegaConf

from sadr.conf.validation import ConfigError, validate_sadr
from sadr.conf.schema import SadrConfig
from sadr.models.adapters import adapter_for
from sadr.regularizers.attention_drift import (
    SelectiveAttentionDriftRegularizer,
    build_regularizers,
    head_kl,
    select_heads,
)
from sadr.regularizers.base import DeltaBatch
from tests.test_attention_rows import add_delta, assert_no_recorders, build_model, encode

# Two rewrite prompts, then one essence prompt ("{subject} is a"), right-padded as the δ-optimiser does.
PROMPTS = ["Because I said Toyota is based in", "The Toyota is", "Toyota is a"]
SUBJECTS = torch.tensor([9, 3, 2])  # last token of "Toyota" (' To', 'yot', 'a')
INJECTION = 1


def delta_batch(tokenizer) -> DeltaBatch:
    enc = encode(tokenizer, PROMPTS)
    return DeltaBatch(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        rewrite_rows=torch.tensor([0, 1]),
        subject_keys=SUBJECTS,
        last_prompt_positions=enc["attention_mask"].sum(1) - 1,
        injection_layer=INJECTION,
    )


class Edit:
    """A δ-optimisation harness: δ added at every row's subject token after block INJECTION."""

    def __init__(self, model, batch, reg):
        self.model, self.batch, self.reg = model, batch, reg
        self.delta = torch.zeros(model.config.hidden_size, dtype=model.dtype, requires_grad=True)
        rows = torch.arange(len(batch.input_ids))
        self.handle = add_delta(model, INJECTION, rows, batch.subject_keys, self.delta)
        reg.attach(model, adapter_for(model), batch)

    def loss(self, step):
        self.model(input_ids=self.batch.input_ids, attention_mask=self.batch.attention_mask)
        return self.reg.loss(step)

    def close(self):
        self.reg.detach()
        self.handle.remove()


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def test_selection_and_kl_on_hand_checked_rows():
    # one prompt, 3 heads, 4 keys of which the last is padding; subject at key 1
    reference = torch.tensor([[[0.5, 0.2, 0.3, 0.0], [0.4, 0.5, 0.1, 0.0], [0.8, 0.1, 0.1, 0.0]]])
    current = torch.tensor([[[0.3, 0.6, 0.1, 0.0], [0.5, 0.5, 0.0, 0.0], [0.2, 0.7, 0.1, 0.9]]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # M = max_h W[h, 1] = 0.5; head 0 (0.6) and head 2 (0.7) exceed it, head 1 (0.5, equal) does not
    assert select_heads(reference, current, torch.tensor([1])).tolist() == [[True, False, True]]

    got = head_kl(reference, current, mask, epsilon=1e-8)
    want = [
        kl([0.5, 0.2, 0.3], [0.3, 0.6, 0.1]),
        kl([0.4, 0.5, 0.1], [0.5, 0.5, 1e-8]),  # a key the current row ignores: ε keeps the KL finite
        kl([0.8, 0.1, 0.1], [0.2, 0.7, 0.1]),
    ]
    torch.testing.assert_close(got, torch.tensor([want]), atol=1e-5, rtol=1e-5)  # padding key 3 ignored
    assert got.dtype == torch.float32


def test_selection_has_no_gradient_and_kl_is_float32():
    reference = torch.softmax(torch.randn(2, 4, 5), -1)
    current = torch.softmax(torch.randn(2, 4, 5, requires_grad=True), -1).half()
    assert not select_heads(reference, current, torch.tensor([0, 3])).requires_grad
    assert head_kl(reference, current, torch.ones(2, 5), 1e-8).dtype == torch.float32


def expected_loss(family, tokenizer, delta, selective):
    """L_SADR from the model's own eager attention maps (output_attentions), for comparison."""
    model = build_model(family, attn_implementation="eager")
    batch = delta_batch(tokenizer)
    rows = batch.rewrite_rows
    maps = []
    for value in (torch.zeros_like(delta), delta):
        handle = add_delta(model, INJECTION, torch.arange(len(PROMPTS)), batch.subject_keys, value)
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_attentions=True)
        handle.remove()
        maps.append([a[rows, :, batch.last_prompt_positions[rows]] for a in out.attentions])
    total, n_selected = 0.0, 0
    counts = [[0] * maps[0][0].shape[1] for _ in maps[0]]  # layers × heads, 0 up to the injection layer
    for layer in range(INJECTION + 1, len(maps[0])):
        w, w_star = maps[0][layer], maps[1][layer]
        for j, s in enumerate(batch.subject_keys[rows]):
            valid = batch.attention_mask[rows[j]].bool()
            for h in range(w.shape[1]):
                if not selective or w_star[j, h, s] > w[j, :, s].max():
                    p, q = w[j, h, valid] + 1e-8, w_star[j, h, valid] + 1e-8
                    total += float((p * (p / q).log()).sum())
                    n_selected += 1
                    counts[layer][h] += 1
    return total / len(rows), n_selected, counts


@pytest.mark.parametrize("heads", ["selective", "all"])
def test_loss_matches_eager_attention_reference(tokenizer, family, heads):
    model = build_model(family)  # default implementation (sdpa where available)
    reg = SelectiveAttentionDriftRegularizer(weight=0.01, heads=heads)
    edit = Edit(model, delta_batch(tokenizer), reg)
    try:
        zero = edit.loss(0)
        assert zero.item() == 0.0 and zero.requires_grad
        zero.backward()
        assert edit.delta.grad is not None and (edit.delta.grad == 0).all()

        torch.manual_seed(2)  # a δ that makes some heads drift in every tiny model
        with torch.no_grad():
            edit.delta.copy_(torch.randn_like(edit.delta) * 8)
        loss = edit.loss(1)
    finally:
        edit.close()
    want, n_selected, counts = expected_loss(family, tokenizer, edit.delta.detach(), heads == "selective")
    assert n_selected > 0 and want > 0
    assert reg.diagnostics() == {"selected_heads": n_selected, "loss": pytest.approx(want, rel=1e-4, abs=1e-6),
                                 "selected_head_counts": counts}
    assert loss.item() == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert sorted(reg.selected) == list(range(INJECTION + 1, adapter_for(model).num_layers(model)))
    # each layer's selection is its own: its rows selecting each head are the reference's count at that layer
    assert {layer: s.sum(0).tolist() for layer, s in reg.selected.items()} == {
        layer: counts[layer] for layer in range(INJECTION + 1, len(counts))}


# Central-difference step and tolerance. GPT-2 and GPT-NeoX run entirely in float64; the others keep
# float32 islands even in a float64 model (llama-family RMSNorm, GPT-J's attention scores), which add
# ~1e-8 noise to the loss, so they need a larger step and a looser tolerance.
FINITE_DIFFERENCES = {"gpt2": (1e-6, 1e-5), "gpt_neox": (1e-6, 1e-5)}


@pytest.mark.parametrize("heads", ["selective", "all"])
def test_gradient_matches_finite_differences(tokenizer, family, heads):
    h, rel = FINITE_DIFFERENCES.get(family, (1e-2, 3e-3))
    model = build_model(family, dtype=torch.float64)
    reg = SelectiveAttentionDriftRegularizer(weight=1.0, heads=heads)
    edit = Edit(model, delta_batch(tokenizer), reg)
    try:
        edit.loss(0)
        torch.manual_seed(2)
        with torch.no_grad():
            edit.delta.copy_(torch.randn_like(edit.delta) * 8)
        loss = edit.loss(1)
        selection = {layer: s.clone() for layer, s in reg.selected.items()}
        assert loss.item() > 0 and sum(int(s.sum()) for s in selection.values()) > 0
        (grad,) = torch.autograd.grad(loss, edit.delta)

        base = edit.delta.detach().clone()
        for _ in range(3):
            direction = torch.randn_like(base)
            sides = []
            for sign in (1, -1):
                with torch.no_grad():
                    edit.delta.copy_(base + sign * h * direction)
                    sides.append(edit.loss(1).item())
                assert all(torch.equal(reg.selected[layer], s) for layer, s in selection.items())  # held fixed
            numeric = (sides[0] - sides[1]) / (2 * h)
            assert float(grad @ direction) == pytest.approx(numeric, rel=rel, abs=1e-8)
    finally:
        edit.close()


def test_essence_rows_do_not_count(tokenizer):
    """Changing only the essence prompt's subject leaves the loss unchanged."""
    model = build_model("llama")
    batch = delta_batch(tokenizer)
    reg = SelectiveAttentionDriftRegularizer(weight=1.0, heads="all")
    reg.attach(model, adapter_for(model), batch)
    delta = torch.randn(model.config.hidden_size) * 8
    losses = []
    try:
        for rows in ([0, 1], [0, 1, 2]):
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            reg.loss(0)
            handle = add_delta(model, INJECTION, torch.tensor(rows), SUBJECTS[rows], delta)
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            handle.remove()
            losses.append(reg.loss(1).item())
    finally:
        reg.detach()
    assert losses[0] > 0 and losses[0] == losses[1]


def test_layers_option_and_detach(tokenizer):
    model = build_model("gpt2")
    batch = delta_batch(tokenizer)
    reg = SelectiveAttentionDriftRegularizer(weight=1.0, layers=[0, 1, 3])  # 0 and 1 are not after injection
    reg.attach(model, adapter_for(model), batch)
    with pytest.raises(RuntimeError, match="step-0"):
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        reg.loss(1)
    reg.loss(0)
    assert sorted(reg.selected) == [3]
    reg.detach()
    assert_no_recorders(model)

    with pytest.raises(ValueError, match="sadr.layers"):
        SelectiveAttentionDriftRegularizer(weight=1.0, layers=[4]).attach(model, adapter_for(model), batch)
    with pytest.raises(ValueError, match="sadr.layers"):
        SelectiveAttentionDriftRegularizer(weight=1.0, layers=[0, 1]).attach(model, adapter_for(model), batch)


def test_a_new_attach_forgets_the_last_edit_s_selection(tokenizer):
    """`selected` and the diagnostics are the last step's, still read after `detach()`; the next edit's `attach()`
    starts without any (none until its first step), not with the previous edit's, on the layers of another."""
    model = build_model("gpt2")
    batch = delta_batch(tokenizer)
    reg = SelectiveAttentionDriftRegularizer(weight=1.0)
    assert reg.selected == {} and reg.case_diagnostics() == []
    reg.attach(model, adapter_for(model), batch)
    try:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        reg.loss(0)
    finally:
        reg.detach()
    assert sorted(reg.selected) == [2, 3] and len(reg.case_diagnostics()) == 1
    reg.attach(model, adapter_for(model), dataclasses.replace(batch, injection_layer=2))
    try:
        assert reg.selected == {} and reg.case_diagnostics() == []
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        reg.loss(0)
        assert sorted(reg.selected) == [3]
    finally:
        reg.detach()


def sadr_config(**values):
    cfg = OmegaConf.structured(SadrConfig)
    for key, value in values.items():
        cfg[key] = value
    return cfg


def test_gamma_zero_builds_no_regularizer():
    assert build_regularizers(sadr_config()) == []
    assert build_regularizers(sadr_config(**{"lambda": 0.0, "heads": "all"})) == []


def test_build_regularizer_from_config():
    (reg,) = build_regularizers(sadr_config(**{"lambda": 0.01, "heads": "all", "layers": [5, 6], "epsilon": 1e-7}))
    assert isinstance(reg, SelectiveAttentionDriftRegularizer)
    assert (reg.weight, reg.selective, reg.layers, reg.epsilon) == (0.01, False, [5, 6], 1e-7)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"lambda": -0.1}, r"sadr\.lambda=-0\.1: γ must be a finite number >= 0"),
        ({"lambda": float("nan")}, r"sadr\.lambda=nan: γ must be a finite number"),
        ({"epsilon": 0.0}, r"sadr\.epsilon=0\.0: must be a finite number > 0"),
        ({"epsilon": float("inf")}, r"sadr\.epsilon=inf: must be a finite number > 0"),
        ({"layers": [3, -1]}, r"sadr\.layers=\[3, -1\]: give null .* or layer indices >= 0"),
        ({"layers": []}, r"sadr\.layers=\[\]: give null"),
    ],
)
def test_invalid_config_names_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        validate_sadr(sadr_config(**{"lambda": 0.01, **values}))


def drifted_losses(model, batch, reg):
    """reg's case_losses at δ = 0 (step 0), then at a drifting δ (step 1), δ added at every row's subject."""
    torch.manual_seed(2)
    delta = torch.randn(model.config.hidden_size) * 8
    reg.attach(model, adapter_for(model), batch)
    rows = torch.arange(len(batch.input_ids))
    for step, value in enumerate((torch.zeros_like(delta), delta)):
        handle = add_delta(model, INJECTION, rows, batch.subject_keys, value)
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        handle.remove()
        losses = reg.case_losses(step)
    return [loss.item() for loss in losses], delta


def test_rewrite_rows_need_not_be_the_first_rows(tokenizer):
    """The δ-optimiser puts a later request's rewrite prompts after an earlier one's essence prompt: each rewrite row's
    subject and query position are its own, wherever it sits in the batch."""
    model = build_model("llama")
    batch = delta_batch(tokenizer)
    (first,), _ = drifted_losses(model, batch, SelectiveAttentionDriftRegularizer(1.0))
    order = [2, 0, 1]  # the essence prompt first, the rewrite prompts at rows 1 and 2
    moved = dataclasses.replace(batch, input_ids=batch.input_ids[order], attention_mask=batch.attention_mask[order],
                                rewrite_rows=torch.tensor([1, 2]), subject_keys=batch.subject_keys[order],
                                last_prompt_positions=batch.last_prompt_positions[order])
    (last,), _ = drifted_losses(model, moved, SelectiveAttentionDriftRegularizer(1.0))
    assert first > 0 and last == pytest.approx(first, rel=1e-5)


def test_requests_get_their_own_terms_and_keep_cases_keeps_the_kept_ones(tokenizer):
    """Two requests of one rewrite prompt each: each term is that prompt's loss alone; after keep_cases([1]) the
    diagnostics are the kept request's (its selection and term), and its next term is computed on the smaller batch."""
    model = build_model("llama")
    batch = delta_batch(tokenizer)
    alone = []
    for row in (0, 1):
        reg = SelectiveAttentionDriftRegularizer(1.0)
        (loss,), _ = drifted_losses(model, dataclasses.replace(batch, rewrite_rows=torch.tensor([row])), reg)
        alone.append((loss, reg.diagnostics()))
        reg.detach()
    reg = SelectiveAttentionDriftRegularizer(1.0)
    losses, delta = drifted_losses(model, dataclasses.replace(batch, rewrite_rows_per_case=(1, 1)), reg)
    assert losses == pytest.approx([loss for loss, _ in alone], rel=1e-5)
    assert alone[0][1]["selected_head_counts"] != alone[1][1]["selected_head_counts"]  # the requests differ
    before = reg.case_diagnostics()
    assert [d["selected_head_counts"] for d in before] == [d["selected_head_counts"] for _, d in alone]

    rows, width = [1, 2], int(batch.attention_mask[[1, 2]].sum(1).max())  # request 1's rewrite row and the essence row
    kept = DeltaBatch(input_ids=batch.input_ids[rows, :width], attention_mask=batch.attention_mask[rows, :width],
                      rewrite_rows=torch.tensor([0]), subject_keys=batch.subject_keys[rows],
                      last_prompt_positions=batch.last_prompt_positions[rows], injection_layer=INJECTION,
                      rewrite_rows_per_case=(1,))
    reg.keep_cases([1], kept)
    try:
        assert reg.case_diagnostics() == [before[1]]
        handle = add_delta(model, INJECTION, torch.arange(2), kept.subject_keys, delta)
        model(input_ids=kept.input_ids, attention_mask=kept.attention_mask)
        handle.remove()
        (loss,) = reg.case_losses(2)
    finally:
        reg.detach()
    assert loss.item() == pytest.approx(alone[1][0], rel=1e-5)


def test_kl_adds_epsilon_to_the_unedited_row_too():
    """ε = 1e-8 goes on both sides of KL(W + ε ‖ W* + ε) (method.md §3). In the δ-optimiser's rows the key mask marks
    the target's tokens as real, yet the query (the last prompt token) cannot see them, so the unedited row is exactly
    0 there: without ε on that side each such key gives 0 · log 0 = nan instead of 0."""
    eps = 1e-8
    reference = torch.tensor([[[0.5, 0.5, 0.0, 0.0]]], dtype=torch.float64)  # keys 2, 3: after the query
    current = torch.tensor([[[0.4, 0.5, 0.1, 0.0]]], dtype=torch.float64)
    got = head_kl(reference, current, torch.ones(1, 4), epsilon=eps)
    want = sum((p + eps) * math.log((p + eps) / (q + eps)) for p, q in zip([0.5, 0.5, 0.0, 0.0], [0.4, 0.5, 0.1, 0.0]))
    assert torch.isfinite(got).all()
    assert got.item() == pytest.approx(want, rel=1e-12, abs=0)


def test_case_slices_give_each_request_its_own_rewrite_rows():
    """DeltaBatch.case_slices, the plug-in interface's map from requests to rows: consecutive parts of rewrite_rows."""
    batch = DeltaBatch(input_ids=torch.zeros(7, 3, dtype=torch.long), attention_mask=torch.ones(7, 3),
                       rewrite_rows=torch.tensor([0, 1, 3, 4, 5]), subject_keys=torch.zeros(7, dtype=torch.long),
                       last_prompt_positions=torch.full((7,), 2), injection_layer=0)
    assert batch.case_slices() == [slice(0, 5)]
    rows = dataclasses.replace(batch, rewrite_rows_per_case=(2, 3))
    assert [rows.rewrite_rows[part].tolist() for part in rows.case_slices()] == [[0, 1], [3, 4, 5]]
    three = dataclasses.replace(batch, rewrite_rows_per_case=(2, 1, 2))  # the third starts after 2 + 1 rows
    assert [three.rewrite_rows[part].tolist() for part in three.case_slices()] == [[0, 1], [3], [4, 5]]
