import pytest
import torch

from sadr.models.adapters import ADAPTERS, UnsupportedModelError, adapter_for
from tests.tiny_models import HIDDEN, LAYERS, make_model


def test_adapter_finds_every_module(tiny_model, family):
    adapter = adapter_for(tiny_model)
    assert adapter.family == family
    assert adapter.num_layers(tiny_model) == LAYERS
    for layer in range(LAYERS):
        down = adapter.mlp_down_module(tiny_model, layer)
        weight = adapter.down_weight(tiny_model, layer)
        assert weight.shape[0] == HIDDEN  # (out, in) whatever the storage layout
        assert adapter.module(tiny_model, adapter.attn_out, layer) is not None
        assert adapter.module(tiny_model, adapter.attention, layer) is not None
        assert down is tiny_model.get_submodule(adapter.mlp_down.format(layer))
    assert tiny_model.get_submodule(adapter.final_norm) is not None


def test_named_modules_are_the_ones_the_block_and_the_head_compute_with(tiny_model):
    """A block adds to its input what its attention output projection and its MLP down-projection write (both
    residual layouts), the attention module returns its output projection's result, and the head reads the last
    block through the final norm: a module name of the wrong module fails at least one of these. The norms and
    biases are shifted first: a random model's norms all start as the identity, so any would pass for the final one."""
    generator = torch.Generator().manual_seed(0)
    for param in tiny_model.parameters():
        if param.ndim == 1:
            param += 0.3 * torch.randn(param.shape, generator=generator)
    adapter = adapter_for(tiny_model)
    seen = {}

    def keep(name):  # the hidden state, also of a tuple output (GPT-J's blocks before transformers 5.24)
        return lambda module, args, out: seen.__setitem__(name, out[0] if isinstance(out, tuple) else out)

    def keep_input(module, args, kwargs):
        seen["block_in"] = args[0] if args else kwargs["hidden_states"]

    hooks = [adapter.block(tiny_model, 1).register_forward_pre_hook(keep_input, with_kwargs=True),
             adapter.block(tiny_model, 1).register_forward_hook(keep("block_out")),
             adapter.module(tiny_model, adapter.attention, 1).register_forward_hook(keep("attention")),
             adapter.module(tiny_model, adapter.attn_out, 1).register_forward_hook(keep("attn_out")),
             adapter.mlp_down_module(tiny_model, 1).register_forward_hook(keep("mlp_down")),
             adapter.block(tiny_model, LAYERS - 1).register_forward_hook(keep("last_block_out"))]
    logits = tiny_model(torch.tensor([[5, 17, 42, 99, 7, 3]])).logits
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(seen["block_out"] - seen["block_in"], seen["attn_out"] + seen["mlp_down"])
    torch.testing.assert_close(seen["attention"], seen["attn_out"])
    final_norm = tiny_model.get_submodule(adapter.final_norm)
    torch.testing.assert_close(tiny_model.get_output_embeddings()(final_norm(seen["last_block_out"])), logits)


def test_down_weight_view_matches_module_output(tiny_model):
    """W as (out, in) must be what maps the module input to its output (GPT-2 stores it transposed)."""
    adapter = adapter_for(tiny_model)
    down = adapter.mlp_down_module(tiny_model, 1)
    weight = adapter.down_weight(tiny_model, 1)
    x = torch.randn(3, weight.shape[1])
    bias = down.bias if getattr(down, "bias", None) is not None else 0
    torch.testing.assert_close(down(x), x @ weight.T + bias)


def test_add_to_down_weight_changes_the_mapping(tiny_model):
    adapter = adapter_for(tiny_model)
    weight = adapter.down_weight(tiny_model, 2)
    delta = torch.randn(weight.shape, dtype=torch.float64)
    before = weight.clone()
    adapter.add_to_down_weight(tiny_model, 2, delta)
    torch.testing.assert_close(adapter.down_weight(tiny_model, 2), before + delta.float())


def test_an_update_is_written_into_a_weight_that_requires_grad_without_tracking_it():
    """A model whose parameters require grad (as loaded, before `requires_grad_(False)`), and an update that carries a
    graph, are written as plain values: the weight stays a leaf, with no gradient history of the update."""
    model = make_model("llama").requires_grad_(True)
    adapter = adapter_for(model)
    before = adapter.down_weight(model, 1).detach().clone()
    delta = torch.randn(before.shape, dtype=torch.float64, requires_grad=True)
    adapter.add_to_down_weight(model, 1, delta * 1)
    weight = adapter.down_weight(model, 1)
    assert weight.is_leaf and weight.grad_fn is None and weight.requires_grad
    torch.testing.assert_close(weight.detach(), before + delta.detach().float())


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # gpt2: a transposed (Conv1D) weight
# the whole weight at once, 3 rows of 256 at a time, or one row at a time when a block is less than a row
@pytest.mark.parametrize("block_bytes", [2**26, 8 * 256 * 3, 8])
def test_a_low_rank_update_is_written_block_by_block_as_its_dense_form(family, block_bytes, monkeypatch):
    """Written from its factors a few rows at a time, a rank-2 update gives bit for bit the weight its dense ΔW gives."""
    from sadr.editors.update import LowRankUpdate
    from sadr.models import adapters

    monkeypatch.setattr(adapters, "WRITE_BLOCK_BYTES", block_bytes)
    by_factors, by_dense = make_model(family), make_model(family)
    adapter = adapter_for(by_factors)
    out_features, in_features = adapter.down_weight(by_factors, 1).shape
    g = torch.Generator().manual_seed(0)
    update = LowRankUpdate(torch.randn(out_features, 2, generator=g, dtype=torch.float64),
                           torch.randn(in_features, 2, generator=g, dtype=torch.float64))
    adapter.add_to_down_weight(by_factors, 1, update)
    adapter.add_to_down_weight(by_dense, 1, update.dense())
    assert torch.equal(adapter.down_weight(by_factors, 1), adapter.down_weight(by_dense, 1))
    with pytest.raises(ValueError, match="update of shape"):
        adapter.add_to_down_weight(by_factors, 1, LowRankUpdate(update.left[:-1], update.right))


def test_unsupported_family_names_the_type_and_the_fix():
    model = make_model("gpt2")
    model.config.model_type = "bloom"
    with pytest.raises(UnsupportedModelError, match=r"'bloom'.*supported families: .*gpt2.*llama"):
        adapter_for(model)


def test_layer_out_of_range_is_a_clear_error():
    model = make_model("llama")
    with pytest.raises(ValueError, match=r"layer 9 out of range.*0\.\.3"):
        adapter_for(model).mlp_down_module(model, 9)
    with pytest.raises(ValueError, match=r"layer -1 out of range"):  # not the last block, as a list index would give
        adapter_for(model).block(model, -1)


def test_registry_covers_the_documented_families():
    assert {"gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2"} <= set(ADAPTERS)


def test_layer_equal_to_the_number_of_layers_is_out_of_range():
    """The first index past the last block is refused with the clear error, not an IndexError/AttributeError."""
    model = make_model("gpt2")
    adapter = adapter_for(model)
    with pytest.raises(ValueError, match=rf"layer {LAYERS} out of range.*0\.\.{LAYERS - 1}"):
        adapter.block(model, LAYERS)
    with pytest.raises(ValueError, match=rf"layer {LAYERS} out of range"):
        adapter.mlp_down_module(model, LAYERS)


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # gpt2: in_features != out_features of the stored Conv1D weight
def test_a_low_rank_update_forms_at_most_one_block_of_float64_rows_at_a_time(family, monkeypatch):
    """Each dense block of the update is at most WRITE_BLOCK_BYTES of float64 rows of in_features values, and the
    blocks cover every output row once, in order."""
    from sadr.editors.update import LowRankUpdate
    from sadr.models import adapters

    block_bytes = 8 * 4 * HIDDEN * 3
    monkeypatch.setattr(adapters, "WRITE_BLOCK_BYTES", block_bytes)
    model = make_model(family)
    adapter = adapter_for(model)
    out_features, in_features = adapter.down_weight(model, 1).shape
    g = torch.Generator().manual_seed(0)
    update = LowRankUpdate(torch.randn(out_features, 2, generator=g, dtype=torch.float64),
                           torch.randn(in_features, 2, generator=g, dtype=torch.float64))
    spans = []

    class Recording:  # an update that forms its rows on demand, as the docstring allows
        shape = update.shape

        @staticmethod
        def dense_rows(start, end):
            rows = update.dense_rows(start, end)
            spans.append((start, start + rows.shape[0]))
            assert rows.shape[0] * rows.shape[1] * 8 <= block_bytes
            return rows

    adapter.add_to_down_weight(model, 1, Recording())
    assert spans[0][0] == 0 and spans[-1][1] == out_features
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
