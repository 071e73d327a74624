"""Half precision: a bfloat16 model is edited with float32 δ and losses and float64 keys statistics and solves,
the update is rounded once into the weights, and restoring is exact."""
from __future__ import annotations

import pytest
import torch

from sadr.editors.plugin import EditorServices
from sadr.editors.registry import EDITORS
from sadr.models.adapters import adapter_for
from sadr.regularizers.attention_drift import SelectiveAttentionDriftRegularizer
from tests.editing import TEMPLATES, batch_requests, editor_config, statistics, top1
from tests.tiny_models import make_model

# tiny-model settings per editor: one layer for ROME, two for the others, λ and L2 scaled to the tiny keys
TINY = {"rome": {}, "memit": {"layers": [1, 2], "mom2_update_weight": 1.0}, "pmet": {"layers": [1, 2], "mom2_update_weight": 1.0},
        "alphaedit": {"layers": [1, 2], "L2": 1e-3, "nullspace_threshold": 1e9}}


def _editor(name, model, tokenizer, cache_dir, regularizers=()):
    hparams = editor_config(name, v_num_grad_steps=20, context_templates=[[10, 3]], **TINY.get(name, {}))
    services = EditorServices(statistics(model, tokenizer, cache_dir), TEMPLATES, list(regularizers))
    return EDITORS[name].build(model, adapter_for(model), tokenizer, hparams, services)


@pytest.mark.parametrize("name", EDITORS)
def test_a_bfloat16_model_is_edited_to_its_target_and_restored_exactly(name, tokenizer, tmp_path):
    model = make_model("llama", dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = _editor(name, model, tokenizer, tmp_path)
    unedited = editor.state_dict()
    request = batch_requests(1)[0]
    outcome = editor.apply([request])
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(u.left.dtype == u.right.dtype == torch.float64 for u in outcome.updates.values())
    target = tokenizer(" " + request.target_new, add_special_tokens=False)["input_ids"][0]
    assert top1(model, tokenizer, request.text) == target, (
        f"editor={name} did not reach its target on the tiny model{'' if name in TINY else ' with its defaults'}: "
        "give it tiny-model settings in TINY")
    editor.load_state_dict(unedited)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_half_precision_weight_takes_the_update_rounded_once(tmp_path):
    model = make_model("llama", dtype=torch.bfloat16)
    adapter = adapter_for(model)
    weight = adapter.down_weight(model, 1)
    original = weight.detach().clone()
    delta = 1e-3 * torch.randn(weight.shape, dtype=torch.float64)
    adapter.add_to_down_weight(model, 1, delta)
    expected = (original.float() + delta.float()).to(torch.bfloat16)
    assert torch.equal(adapter.down_weight(model, 1), expected)
    twice_rounded = original + delta.to(torch.bfloat16)
    assert not torch.equal(expected, twice_rounded)  # the difference this guards against is real


def test_a_zero_weight_sadr_term_leaves_a_bfloat16_edit_bit_identical(tokenizer, tmp_path):
    """SADR at γ = 0, forced on (its attention rows recorded through the registered kernel every step), changes
    nothing: the same δ steps, update and weights as without the regularizer."""
    results = []
    for regularizers in ([], [SelectiveAttentionDriftRegularizer(weight=0.0, heads="all")]):
        model = make_model("llama", dtype=torch.bfloat16)
        outcome = _editor("rome", model, tokenizer, tmp_path, regularizers).apply(batch_requests(1))
        results.append((outcome.diagnostics["delta_steps"], outcome.updates[1].dense(), adapter_for(model).down_weight(model, 1).clone()))
    assert results[0][0] == results[1][0] and outcome.diagnostics["selected_heads"] > 0  # the term did run
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][2], results[1][2])
