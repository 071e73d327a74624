"""The δ-optimisation's prefix cache: each row's tokens before its δ position run once, each step feeds the rest.

Checked against the whole-prompt forward it replaces: the layout on a hand-made batch, every fed position's hidden
state and the attention rows SADR reads (against the model's own eager attention weights) on every family, and whole
δ-optimisations (ROME and PMET, with SADR) run both ways. The cases that must fall back to whole prompts are checked
by the width of what the model is fed.
"""
from __future__ import annotations

import pytest
import torch

from sadr.data.records import EditRequest
from sadr.editors.capture import add_at_positions
from sadr.editors.delta import DeltaObjective, optimize_delta
from sadr.editors.prefix_cache import PrefixCache, split_rows
from sadr.editors.prompts import encode_delta_prompts
from sadr.models.adapters import adapter_for
from sadr.models.tokenization import pad_id_of
from sadr.regularizers.attention_drift import SelectiveAttentionDriftRegularizer
from sadr.regularizers.attention_rows import AttentionRows
from sadr.regularizers.base import DeltaRegularizer
from tests.editing import TEMPLATES, editor_config
from tests.tiny_models import FAMILIES, make_model

# "The" is one token of the tiny tokenizer, so the essence prompt "The is a" is cut at position 0.
REQUEST = EditRequest(prompt="The capital city of {} is", subject="The", target_new="Japan")
LONG_SUBJECT = EditRequest(prompt="{} is based in the city of", subject="Because the Toyota", target_new="Paris")


def test_split_layout_on_a_hand_made_batch():
    ids = torch.tensor([[1, 2, 3, 4, 9], [5, 6, 7, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    split = split_rows(ids, mask, torch.tensor([2, 0]), pad_id=9)
    assert split.width == 2
    assert split.prefix_ids.tolist() == [[1, 2], [9, 9]] and split.prefix_mask.tolist() == [[1, 1], [0, 0]]
    assert split.suffix_ids.tolist() == [[3, 4, 9], [5, 6, 7]] and split.suffix_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert split.position_ids.tolist() == [[2, 3, 4], [0, 1, 2]]
    assert split.key_mask.tolist() == [[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    rows, positions = torch.tensor([0, 0, 0, 1]), torch.tensor([1, 2, 3, 2])
    assert split.key_index(rows, positions).tolist() == [1, 2, 3, 4]
    assert split.in_suffix(rows[1:], positions[1:]).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="precede"):
        split.in_suffix(rows[:1], positions[:1])
    with pytest.raises(ValueError, match="inside their rows"):
        split_rows(ids, mask, torch.tensor([4, 0]), pad_id=9)
    ended = split_rows(ids, mask, torch.tensor([2, 0]), pad_id=9, ends=torch.tensor([3, 2]))
    assert ended.suffix_ids.tolist() == [[3, 9], [5, 6]] and ended.suffix_mask.tolist() == [[1, 0], [1, 1]]
    with pytest.raises(ValueError, match="each cut before its end"):
        split_rows(ids, mask, torch.tensor([2, 0]), pad_id=9, ends=torch.tensor([2, 3]))
    with pytest.raises(ValueError, match="inside their rows"):  # an end past its row's last token (row 1 has 3)
        split_rows(ids, mask, torch.tensor([2, 0]), pad_id=9, ends=torch.tensor([3, 4]))
    whole = split_rows(ids, mask, torch.tensor([0, 0]), pad_id=9)
    assert whole.width == 0  # the batch itself, less the column no row reaches
    assert torch.equal(whole.suffix_ids, ids[:, :4]) and torch.equal(whole.suffix_mask, mask[:, :4])


def test_selected_rows_keep_their_key_indices_and_lose_the_columns_no_row_uses():
    ids = torch.tensor([[1, 2, 3, 4, 9], [5, 6, 7, 9, 9], [8, 9, 9, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    split = split_rows(ids, mask, torch.tensor([2, 0, 0]), pad_id=9)  # suffixes of 2, 3 and 1 tokens
    kept = split.select(torch.tensor([2, 0]))
    assert kept.width == split.width == 2  # the prefix keeps its width: key indices do not move
    assert kept.prefix_ids.tolist() == [[9, 9], [1, 2]] and kept.cuts.tolist() == [0, 2]
    assert kept.suffix_ids.tolist() == [[8, 9], [3, 4]] and kept.suffix_mask.tolist() == [[1, 0], [1, 1]]
    assert kept.key_mask.tolist() == [[0, 0, 1, 0], [1, 1, 1, 1]]
    assert kept.key_index(torch.tensor([1, 1]), torch.tensor([1, 3])).tolist() == \
        split.key_index(torch.tensor([0, 0]), torch.tensor([1, 3])).tolist() == [1, 3]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_selected_cache_feeds_what_a_cache_built_for_those_rows_feeds(tokenizer, family):
    """`PrefixCache.select` takes the rows' keys and values from the cache it was built from, without a forward."""
    model = make_model(family)
    ids, mask, subjects = _delta_rows(tokenizer)
    split = split_rows(ids, mask, subjects, pad_id_of(tokenizer))
    rows = torch.tensor([len(ids) - 1, 0, 2])
    whole_cache = PrefixCache(model, split)
    forwards = []
    hook = model.base_model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        taken = whole_cache.select(rows)
    finally:
        hook.remove()
    assert forwards == []  # selecting runs no forward
    built = PrefixCache(model, split.select(rows))
    fed = model.base_model(**taken.forward_inputs()).last_hidden_state
    torch.testing.assert_close(fed, model.base_model(**built.forward_inputs()).last_hidden_state, rtol=1e-5, atol=1e-6)
    whole = model.base_model(**whole_cache.forward_inputs()).last_hidden_state
    torch.testing.assert_close(fed, whole[rows, : fed.shape[1]], rtol=1e-5, atol=1e-5)


def _delta_rows(tokenizer, requests=(REQUEST, LONG_SUBJECT)):
    """Both requests' δ prompts in one right-padded batch, with their subject positions."""
    prompts = [encode_delta_prompts(tokenizer, request, TEMPLATES) for request in requests]
    width = max(p.batch.input_ids.shape[1] for p in prompts)
    pad = pad_id_of(tokenizer)
    ids = torch.cat([torch.nn.functional.pad(p.batch.input_ids, (0, width - p.batch.input_ids.shape[1]), value=pad)
                     for p in prompts])
    mask = torch.cat([torch.nn.functional.pad(p.batch.attention_mask, (0, width - p.batch.input_ids.shape[1]))
                      for p in prompts])
    return ids, mask, torch.cat([p.subject_positions for p in prompts])


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_forward_equals_the_whole_prompt_at_every_fed_position(tokenizer, family):
    model = make_model(family)
    adapter = adapter_for(model)
    ids, mask, subjects = _delta_rows(tokenizer)
    assert subjects.min() == 0 and subjects.max() > 5  # one row has an empty prefix, others long ones
    rows = torch.arange(len(ids))
    delta = torch.randn(len(ids), model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.1
    down = adapter.mlp_down_module(model, 1)
    with add_at_positions(down, rows, subjects, lambda: delta):
        whole = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    split = split_rows(ids, mask, subjects, pad_id_of(tokenizer))
    prefix = PrefixCache(model, split)
    with add_at_positions(down, rows, split.in_suffix(rows, subjects), lambda: delta):
        fed = model.base_model(**prefix.forward_inputs()).last_hidden_state
    assert torch.isfinite(fed).all()
    for row in rows.tolist():
        cut, length = int(subjects[row]), int(mask[row].sum())
        torch.testing.assert_close(fed[row, : length - cut], whole[row, cut:length], rtol=1e-5, atol=1e-5)


def test_a_batch_without_prefixes_is_fed_as_it_is_and_keeps_no_cache():
    """Every cut at 0 (δ at the first token of each row): the step's forward is the batch's own, without positions to
    shift or a cache that each step's forward would fill and drop."""
    model = make_model("llama")
    ids = torch.tensor([[1, 2, 3, 4, 0], [5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    inputs = PrefixCache(model, split_rows(ids, mask, torch.tensor([0, 0]), pad_id=0)).forward_inputs()
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert torch.equal(inputs["input_ids"], ids[:, :4]) and torch.equal(inputs["attention_mask"], mask[:, :4])


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "qwen2"])
def test_attention_rows_of_a_cached_forward_are_the_models_own_weights(tokenizer, family):
    """The rows SADR reads when the keys come partly from the cache, mapped back to whole-row positions, equal the
    eager attention weights of the whole prompt (at every key; padding and cached-prefix padding get zero)."""
    model = make_model(family, attn_implementation="eager")
    adapter = adapter_for(model)
    ids, mask, subjects = _delta_rows(tokenizer)
    rows, lengths = torch.arange(len(ids)), mask.sum(1)
    last = lengths - 1
    whole = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    split = split_rows(ids, mask, subjects, pad_id_of(tokenizer))
    prefix = PrefixCache(model, split)
    layers = [2, 3]
    with AttentionRows(model, adapter, layers, split.in_suffix(rows, last), split.key_mask,
                       cached_keys=split.width) as recorder:
        model.base_model(**prefix.forward_inputs())
        recorded = recorder.collect()
    for layer in layers:
        for row in rows.tolist():
            positions = torch.arange(int(lengths[row]))
            keys = split.key_index(torch.full_like(positions, row), positions)
            got = recorded[layer][row]
            torch.testing.assert_close(got[:, keys], whole[layer][row, :, int(last[row]), : len(positions)],
                                       rtol=1e-5, atol=1e-6)
            others = torch.ones(got.shape[-1], dtype=torch.bool)
            others[keys] = False
            assert (got[:, others] == 0).all()


def _objective(prefix_cache: bool, sites=("mlp_out",)) -> DeltaObjective:
    hparams = editor_config("rome", v_num_grad_steps=12, prefix_cache=prefix_cache)
    return DeltaObjective.from_hparams(hparams, sites=sites, layer=1)


def _optimise(model, tokenizer, request, prefix_cache: bool, regularizers=(), sites=("mlp_out",)):
    """The δ-optimisation's result, and the width of every batch the model was fed."""
    widths = []
    hook = model.base_model.register_forward_pre_hook(
        lambda _module, _args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        result = optimize_delta(model, adapter_for(model), tokenizer, request, TEMPLATES,
                                _objective(prefix_cache, sites), list(regularizers))
    finally:
        hook.remove()
    return result, widths


CASES = [(family, sites, sadr) for family in FAMILIES for sites, sadr in ((("mlp_out",), True), (("attn_out", "mlp_out"), False))]


@pytest.mark.parametrize("family, sites, sadr", CASES)
def test_delta_optimisation_is_the_same_with_and_without_the_cache(tokenizer, family, sites, sadr):
    """ROME's site with SADR, PMET's two sites without: the same steps, losses, δs and SADR head selections."""
    model = make_model(family)
    runs = {}
    for prefix_cache in (True, False):
        regularizers = [SelectiveAttentionDriftRegularizer(10.0)] if sadr else []
        runs[prefix_cache] = _optimise(model, tokenizer, LONG_SUBJECT, prefix_cache, regularizers, sites)
    (cached, cached_widths), (whole, whole_widths) = runs[True], runs[False]
    assert set(whole_widths) == {whole_widths[0]} and len(whole_widths) == whole.steps_run
    reads_cache = not sadr or SelectiveAttentionDriftRegularizer(1.0).reads_cached_prefix()
    if reads_cache:  # one prefix forward, then steps fed only the tokens from each row's δ position on
        assert len(cached_widths) == cached.steps_run + 1 and max(cached_widths[1:]) < whole_widths[0]
    assert cached.steps_run == whole.steps_run
    for a, b in zip(cached.history, whole.history):
        assert a.loss == pytest.approx(b.loss, rel=1e-4, abs=1e-6) and a.target_is_argmax == b.target_is_argmax
    for site in sites:
        torch.testing.assert_close(cached.deltas[site], whole.deltas[site], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cached.initial[site], whole.initial[site], rtol=1e-5, atol=1e-6)
    assert cached.diagnostics.get("selected_head_counts") == whole.diagnostics.get("selected_head_counts")
    if sadr:
        assert cached.diagnostics["loss"] == pytest.approx(whole.diagnostics["loss"], rel=1e-4, abs=1e-7)
        assert any(any(layer) for layer in cached.diagnostics["selected_head_counts"])  # SADR acted


class OwnHooks(DeltaRegularizer):
    """A regularizer that does not say it can read a cached prefix (the interface's default)."""

    weight = 1.0

    def attach(self, model, adapter, batch):
        self.batch = batch

    def loss(self, step):
        return torch.zeros(())

    def detach(self):
        pass


def test_whole_prompts_are_fed_where_the_cache_cannot_be_used(tokenizer):
    model = make_model("llama")
    for regularizers in ([OwnHooks()], []):
        prefix_cache = bool(regularizers)  # asked for, but a regularizer does not read cached keys; or not asked for
        result, widths = _optimise(model, tokenizer, LONG_SUBJECT, prefix_cache, regularizers)
        assert len(widths) == result.steps_run and set(widths) == {widths[0]}
    assert regularizers == [] and OwnHooks().reads_cached_prefix() is False
    windowed = make_model("mistral")
    windowed.config.sliding_window = 4  # shorter than the prompts: a sliding cache would drop early keys
    result, widths = _optimise(windowed, tokenizer, LONG_SUBJECT, True)
    assert len(widths) == result.steps_run and set(widths) == {widths[0]}
