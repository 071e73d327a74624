"""MEMIT, and the multi-layer machinery it shares with PMET (sadr/editors/spread.py), on tiny models of every
family: ridge solves, layer-by-layer keys, batch edits, what is written, configs."""
import pytest
import torch

from sadr.editors.capture import capture_inputs
from sadr.editors.memit import MemitEditor
from sadr.editors.spread import grouped_mean_keys, template_groups
from sadr.models.adapters import adapter_for
from tests.editing import (
    TEMPLATES,
    assert_every_new_object_is_the_argmax,
    assert_only_the_updates_were_written,
    assert_ridge_solutions,
    batch_edit,
    batch_requests,
    composed_editor,
    record_deltas,
    spread_config,
    statistics,
)
from tests.tiny_models import FAMILIES, make_model


@pytest.fixture(scope="module", params=[(name, family) for name in ("memit", "pmet") for family in FAMILIES],
                ids="-".join)
def edit(request, tokenizer, tmp_path_factory):
    """One batch edit of ten requests per (editor, family)."""
    name, family = request.param
    return batch_edit(name, family, tokenizer, tmp_path_factory.mktemp("stats"))


def test_each_layer_update_solves_its_ridge_problem(edit):
    assert [s.layer for s in edit.outcome.solves] == [1, 2]
    assert_ridge_solutions(edit)


def test_a_batch_of_ten_edits_makes_every_new_object_the_argmax(edit, tokenizer):
    assert_every_new_object_is_the_argmax(edit, tokenizer)


def test_only_the_edited_down_projections_change_and_by_the_updates(edit):
    assert_only_the_updates_were_written(edit)


def test_the_first_layer_takes_delta_over_m_and_keys_are_recomputed_after_each_write(tokenizer, tmp_path, monkeypatch):
    """R₀ = (z − output before any write) / m = δ / m; the keys of layer l₂ are those of the model with only
    l₁ written, which differ from the unedited model's. Each layer reports the mean norm of its undivided residuals."""
    deltas = record_deltas(monkeypatch)
    requests = batch_requests(3)
    model = make_model("llama")
    editor = MemitEditor(model, adapter_for(model), tokenizer, spread_config("memit"),
                         statistics=statistics(model, tokenizer, tmp_path), context_templates=TEMPLATES)
    outcome = editor.apply(requests)
    first, second = outcome.solves
    expected = torch.stack([d.deltas["block_out"] for d in deltas]) / 2
    torch.testing.assert_close(first.residuals, expected, rtol=1e-4, atol=1e-5)
    # the diagnostics: the mean norm of the residuals before dividing (the last layer divides by 1)
    assert outcome.diagnostics["residual_norm_layer1"] == pytest.approx(expected.norm(dim=-1).mean().item() * 2, rel=1e-4)
    assert outcome.diagnostics["residual_norm_layer2"] == pytest.approx(second.residuals.norm(dim=-1).mean().item(),
                                                                        rel=1e-6)

    groups = template_groups(TEMPLATES, [[10, 3]])
    fresh = make_model("llama")
    adapter = adapter_for(fresh)
    unedited_keys = grouped_mean_keys(fresh, adapter, tokenizer, 2, requests, groups)
    adapter.add_to_down_weight(fresh, 1, first.update)
    torch.testing.assert_close(second.keys, grouped_mean_keys(fresh, adapter, tokenizer, 2, requests, groups))
    assert (second.keys - unedited_keys).norm() > 1e-3 * unedited_keys.norm()


def test_keys_weigh_each_template_group_alike():
    """MEMIT's compute_ks: the bare prompt is one group, so it weighs as much as all prefixes together."""
    assert template_groups(["{}", "a. {}", "b. {}", "c. {}"], [[10, 3]]) == [["{}"], ["a. {}", "b. {}", "c. {}"]]
    assert template_groups(["{}", "a. {}"], [[5, 0], [10, 1]]) == [["{}"], ["a. {}"]]  # an empty group is no group
    with pytest.raises(ValueError, match=r"editor.context_templates=\[\[10, 5\]\]"):
        template_groups(TEMPLATES, [[10, 5]])


def test_grouped_keys_weigh_the_bare_prompt_as_much_as_all_prefixes_together(tokenizer):
    """Against the down-projection's input read prompt by prompt in a whole forward: the key is ½ the bare prompt's
    plus ½ the mean of the three prefixed prompts' (a flat mean would give the bare prompt ¼)."""
    model = make_model("llama")
    adapter = adapter_for(model)
    down = adapter.mlp_down_module(model, 1)
    requests = batch_requests(2)
    got = grouped_mean_keys(model, adapter, tokenizer, 1, requests, template_groups(TEMPLATES, [[10, 3]]))
    for index, request in enumerate(requests):
        per_prompt = []
        for template in TEMPLATES:
            prompt = template.replace("{}", request.prompt, 1).format(request.subject)
            assert prompt.endswith(request.subject)  # its last token is the subject's
            with torch.no_grad(), capture_inputs({1: down}) as inputs:
                model(input_ids=torch.tensor([tokenizer(prompt)["input_ids"]]))
            per_prompt.append(inputs[1][0, -1])
        expected = (per_prompt[0] + torch.stack(per_prompt[1:]).mean(0)) / 2
        torch.testing.assert_close(got[index], expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got[index], torch.stack(per_prompt).mean(0), rtol=1e-3, atol=1e-5)


def test_layers_out_of_order_or_repeated_are_rejected(tokenizer, tmp_path):
    model = make_model("llama")
    for layers in ([2, 1], [1, 1, 2]):
        with pytest.raises(ValueError, match="increasing order"):
            MemitEditor(model, adapter_for(model), tokenizer, spread_config("memit", layers=layers),
                        statistics=statistics(model, tokenizer, tmp_path), context_templates=TEMPLATES)


def test_published_defaults_compose():
    gptj = composed_editor("memit", "gpt-j")
    assert list(gptj.layers) == [3, 4, 5, 6, 7, 8] and gptj.mom2_update_weight == 15000 and gptj.clamp_norm_factor == 0.75
    assert gptj.context_templates == [[10, 5]] and "MEMIT repo" in gptj.source
    for model in ("gpt2-xl", "llama3-8b", "llama2-7b", "tinyllama", "smollm2-135m"):
        cfg = composed_editor("memit", model)
        assert cfg.source and cfg.layers and cfg.v_loss_layer > max(cfg.layers), model


def test_loss_read_at_the_layer_where_delta_is_added_still_sees_delta(tokenizer, tmp_path, monkeypatch):
    """MEMIT adds δ to the output of its last layer; with `v_loss_layer` equal to that layer the loss must be read
    after δ is added (as the reference code does), or δ would never move."""
    model = make_model("llama")
    results = record_deltas(monkeypatch)
    editor = MemitEditor(model, adapter_for(model), tokenizer, spread_config("memit", v_loss_layer=2),
                         statistics=statistics(model, tokenizer, tmp_path), context_templates=TEMPLATES)
    editor.apply(batch_requests(1))
    (result,) = results
    assert result.deltas["block_out"].norm() > 0
    assert result.history[-1].nll < result.history[0].nll
