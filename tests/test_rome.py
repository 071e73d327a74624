import contextlib
import re

import pytest
import torch

import sadr.editors.rome as rome_module
from sadr.data.records import EditRequest
from sadr.editors.keys import mean_keys
from sadr.editors.rome import RomeEditor
from sadr.errors import InvalidSettingError
from sadr.evaluation.scorer import score_pairs_detailed
from sadr.models.adapters import adapter_for
from tests.editing import TEMPLATES, composed_editor, editor_config, statistics, top1
from tests.tiny_models import make_model

# In random tiny models attention is nearly uniform, so only a subject that ends the prompt can move the
# next-token prediction far enough for an argmax test.
REQUEST = EditRequest(prompt="The capital city of {}", subject="France", target_new="Japan", target_true="Paris")


def test_rome_makes_the_new_object_the_argmax_and_maps_k_to_v(tiny_model, tokenizer, tmp_path):
    adapter = adapter_for(tiny_model)
    new_id = tokenizer(" Japan", add_special_tokens=False)["input_ids"]
    assert len(new_id) == 1
    assert top1(tiny_model, tokenizer, REQUEST.text) != new_id[0]
    editor = RomeEditor(tiny_model, adapter, tokenizer, editor_config(), statistics=statistics(tiny_model, tokenizer, tmp_path),
                        context_templates=TEMPLATES)
    snapshot = editor.state_dict()
    outcome = editor.apply([REQUEST])
    assert top1(tiny_model, tokenizer, REQUEST.text) == new_id[0]
    scores = score_pairs_detailed(tiny_model, tokenizer, [REQUEST.text] * 2, ["Japan", "Paris"])
    assert scores.nll[0] < scores.nll[1]
    assert set(outcome.seconds) == {"covariance", "k_star", "v_star", "update"}
    assert outcome.updates[1].dense().shape == adapter.down_weight(tiny_model, 1).shape
    editor.load_state_dict(snapshot)


def test_weights_restored_bitwise(tiny_model, tokenizer, tmp_path):
    adapter = adapter_for(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    editor = RomeEditor(tiny_model, adapter, tokenizer, editor_config(v_num_grad_steps=3),
                        statistics=statistics(tiny_model, tokenizer, tmp_path), context_templates=TEMPLATES)
    snapshot = editor.state_dict()
    editor.apply([REQUEST])
    assert not torch.equal(adapter.down_weight(tiny_model, 1), before[adapter.mlp_down.format(1) + ".weight"]
                           if not adapter.down_weight_is_transposed else before[adapter.mlp_down.format(1) + ".weight"].T)
    editor.load_state_dict(snapshot)
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("variant", ["reference", "paper"])
def test_rome_update_writes_v_star_exactly_at_its_key(tokenizer, tmp_path, variant):
    """After the update the edited layer maps to v* = v₀ + δ (bias included) the bare prompt's key k₀ (ROME's
    code, the default) or the template-mean key k̄ (the paper's equation), and not the other one."""
    model = make_model("gpt2")  # a family whose down-projection has a bias and a transposed weight
    adapter = adapter_for(model)
    editor = RomeEditor(model, adapter, tokenizer, editor_config(v_num_grad_steps=5, rome_update=variant),
                        statistics=statistics(model, tokenizer, tmp_path), context_templates=TEMPLATES)
    with spy_on_delta() as captured:
        editor.apply([REQUEST])
    # keys are read below the edited weight, so the edit does not change them
    k_bar = mean_keys(model, adapter, tokenizer, [1], [REQUEST], TEMPLATES)[1]
    k0 = mean_keys(model, adapter, tokenizer, [1], [REQUEST], ["{}"])[1]
    down = adapter.mlp_down_module(model, 1)
    with torch.no_grad():
        exact, other = (down(k0)[0], down(k_bar)[0]) if variant == "reference" else (down(k_bar)[0], down(k0)[0])
    v_star = captured["result"].target("mlp_out")
    torch.testing.assert_close(exact, v_star, rtol=1e-4, atol=1e-4)
    assert (other - v_star).norm() > 1e-2 * v_star.norm()


@contextlib.contextmanager
def spy_on_delta():
    captured = {}
    original = rome_module.optimize_delta

    def spy(*args, **kwargs):
        captured["result"] = original(*args, **kwargs)
        captured.setdefault("all", []).append(captured["result"])
        return captured["result"]

    rome_module.optimize_delta = spy
    try:
        yield captured
    finally:
        rome_module.optimize_delta = original


def test_one_template_and_no_second_moment_make_both_variants_the_same(tokenizer, tmp_path):
    updates = {}
    for variant in ("reference", "paper"):
        model = make_model("llama")
        editor = RomeEditor(model, adapter_for(model), tokenizer,
                            editor_config(v_num_grad_steps=3, mom2_adjustment=False, rome_update=variant),
                            statistics=statistics(model, tokenizer, tmp_path), context_templates=["{}"])
        updates[variant] = editor.apply([REQUEST]).updates[1].dense()
    torch.testing.assert_close(updates["reference"], updates["paper"], rtol=1e-12, atol=0)


def test_mom2_adjustment_off_gives_a_different_update(tokenizer, tmp_path):
    results = []
    for adjust in (True, False):
        model = make_model("llama")
        editor = RomeEditor(model, adapter_for(model), tokenizer, editor_config(v_num_grad_steps=3, mom2_adjustment=adjust),
                            statistics=statistics(model, tokenizer, tmp_path), context_templates=TEMPLATES)
        results.append(editor.apply([REQUEST]).updates[1].dense())
    assert not torch.allclose(results[0], results[1])


def test_same_inputs_give_identical_updates(tokenizer, tmp_path):
    updates = []
    for _ in range(2):
        model = make_model("llama")
        editor = RomeEditor(model, adapter_for(model), tokenizer, editor_config(v_num_grad_steps=4),
                            statistics=statistics(model, tokenizer, tmp_path), context_templates=TEMPLATES)
        updates.append(editor.apply([REQUEST]).updates[1].dense())
    assert torch.equal(updates[0], updates[1])


def test_a_batch_reports_the_mean_of_its_requests_delta_numbers_and_the_sum_of_their_updates(tokenizer, tmp_path):
    """Every row of a batch gets the batch's diagnostics and update, so they must describe all its requests, not the
    last one."""
    model = make_model("llama")
    other = EditRequest(prompt="{} is the mother tongue of", subject="Danielle Darrieux", target_new="English",
                        target_true="French")
    editor = RomeEditor(model, adapter_for(model), tokenizer, editor_config(v_num_grad_steps=12),
                        statistics=statistics(model, tokenizer, tmp_path), context_templates=TEMPLATES)
    before = adapter_for(model).down_weight(model, 1).clone()
    with spy_on_delta() as captured:
        outcome = editor.apply([REQUEST, other])
    # the outcome's update is the sum of the two written, not the last one
    written = adapter_for(model).down_weight(model, 1) - before
    torch.testing.assert_close(outcome.updates[1].dense().float(), written, rtol=1e-4, atol=1e-6)
    losses = [result.history[-1].loss for result in captured["all"]]
    assert len(losses) == 2 and abs(losses[0] - losses[1]) > 1e-3 * losses[1]  # the last request's alone is wrong
    assert outcome.diagnostics["delta_final_loss"] == pytest.approx(sum(losses) / 2, rel=1e-12)
    assert outcome.diagnostics["delta_steps"] == sum(result.steps_run for result in captured["all"]) / 2


@pytest.mark.parametrize("variant", ["reference", "paper"])
def test_the_update_maps_its_key_to_v_star_through_a_nonzero_down_projection_bias(tokenizer, tmp_path, variant):
    """The residual is v* − (W k + b): with the tiny GPT-2's zero-initialised c_proj bias set to a visible value, the
    edited layer still maps the exact key to v*, bias included (an update solved for v* − W k would miss it by b)."""
    model = make_model("gpt2")
    adapter = adapter_for(model)
    down = adapter.mlp_down_module(model, 1)
    with torch.no_grad():
        down.bias.copy_(torch.randn(down.bias.shape, generator=torch.Generator().manual_seed(0)))
    assert down.bias.norm() > 1.0
    editor = RomeEditor(model, adapter, tokenizer, editor_config(v_num_grad_steps=5, rome_update=variant),
                        statistics=statistics(model, tokenizer, tmp_path), context_templates=TEMPLATES)
    with spy_on_delta() as captured:
        editor.apply([REQUEST])
    key = mean_keys(model, adapter, tokenizer, [1], [REQUEST], ["{}"] if variant == "reference" else TEMPLATES)[1]
    with torch.no_grad():
        mapped = down.weight.T @ key[0].to(down.weight.dtype) + down.bias  # Conv1D: y = x W + b, written out
    torch.testing.assert_close(mapped, captured["result"].target("mlp_out"), rtol=1e-4, atol=1e-4)


def test_the_default_update_is_the_reference_codes():
    """method.md §2: every published number came from the code's update (exact at the bare prompt's key); the paper's
    is the option."""
    assert composed_editor("rome", "gpt-j").rome_update is rome_module.RomeUpdate.reference


@pytest.mark.parametrize("layers", [[1, 2], []])
def test_rome_given_other_than_one_layer_is_refused(tokenizer, tmp_path, layers):
    """ROME writes one layer: given two it would edit the first alone and report a run of both."""
    model = make_model("llama")
    message = f"ROME edits exactly one layer; editor.layers={layers}"
    with pytest.raises(InvalidSettingError, match=f"^{re.escape(message)}$"):
        RomeEditor(model, adapter_for(model), tokenizer, editor_config(layers=layers),
                   statistics=statistics(model, tokenizer, tmp_path), context_templates=TEMPLATES)
