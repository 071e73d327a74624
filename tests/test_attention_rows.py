"""The fast attention rows equal the model's own attention weights, for every family, and are differentiable."""
from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from sadr.models.adapters import adapter_for
from sadr.regularizers import attention_rows, legacy_attention
from sadr.regularizers.attention_rows import AttentionRows, allowed_keys, listen_to_kernel, use_row_kernel
from tests import tiny_models
from tests.tiny_models import FAMILIES

PROMPTS = ["The capital of France is Paris and", "Toyota is", "Because I said"]  # 8, 3 and 3 tokens

# The tiny models' default shapes, plus the options that change how each family forms its attention.
VARIANTS = [(family, {}) for family in FAMILIES] + [
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True}),
    ("gpt2", {"scale_attn_weights": False}),
    ("gptj", {"rotary_dim": 16}),  # rotary over the whole head
    ("gpt_neox", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}}),
    ("llama", {"num_key_value_heads": 1}),
    ("mistral", {"sliding_window": 3}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 2}),
]


def build_model(family, overrides=None, attn_implementation=None, dtype=torch.float32, sharpen=0.3, seed=0):
    """A tiny model whose weights get extra noise, so attention is peaked and every detail of it shows."""
    base = tiny_models._config(family)
    fields = {key: value for key, value in base.to_dict().items() if key != "layer_types"}
    config = type(base)(**{**fields, **(overrides or {})})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * sharpen)
    return model.eval().requires_grad_(False)


def encode(tokenizer, prompts=PROMPTS):
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert tokenizer.padding_side == "right" and len(set(batch["attention_mask"].sum(1).tolist())) > 1
    return batch


def add_delta(model, layer, rows, positions, delta):
    """Forward hook adding δ to block `layer`'s output hidden state at (rows, positions)."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.index_put((rows, positions), delta, accumulate=True)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    adapter = adapter_for(model)
    return adapter.block(model, layer).register_forward_hook(hook)


def fast_rows(model, batch, positions, batch_rows=None):
    adapter = adapter_for(model)
    layers = range(adapter.num_layers(model))
    with AttentionRows(model, adapter, layers, positions, batch["attention_mask"], batch_rows=batch_rows) as hooks:
        model(**batch)
        return hooks.collect()


@pytest.mark.parametrize("family,overrides", VARIANTS, ids=[f"{f}-{'-'.join(o) or 'default'}" for f, o in VARIANTS])
def test_rows_equal_eager_attention_weights(tokenizer, family, overrides):
    if family == "gpt2" and overrides and Version(transformers.__version__) < Version("5.4"):
        pytest.skip("before transformers 5.4, GPT-2's sdpa path ignores scale_attn_weights and "
                    "scale_attn_by_inverse_layer_idx, so its eager weights are not what the model computes")
    batch = encode(tokenizer)
    positions = torch.tensor([6, 2, 1])  # not always the last token; row 0 reaches past a sliding window of 3
    reference = build_model(family, overrides, attn_implementation="eager")
    expected = reference(**batch, output_attentions=True).attentions
    rows = torch.arange(len(PROMPTS))

    for implementation in ("eager", None):  # None: the model's default (sdpa where the family has it)
        model = build_model(family, overrides, attn_implementation=implementation)
        got = fast_rows(model, batch, positions)
        assert sorted(got) == list(range(len(expected)))
        for layer, weights in enumerate(expected):
            want = weights[rows, :, positions]
            n_heads, seq_len = model.config.num_attention_heads, batch["input_ids"].shape[1]
            assert got[layer].shape == want.shape == (len(PROMPTS), n_heads, seq_len)
            assert got[layer].dtype == torch.float32
            torch.testing.assert_close(got[layer], want, atol=1e-5, rtol=0)
            assert (got[layer].transpose(1, 2)[batch["attention_mask"] == 0] == 0).all()  # padded keys
    # The comparison has power: attention is far from uniform.
    assert max(weights[rows, :, positions].max() for weights in expected) > 0.9


def test_rows_of_selected_batch_rows(tokenizer):
    model = build_model("llama")
    batch = encode(tokenizer)
    every = fast_rows(model, batch, torch.tensor([6, 2, 1]))
    some = fast_rows(model, batch, torch.tensor([1, 2]), batch_rows=torch.tensor([2, 1]))
    for layer in every:
        torch.testing.assert_close(some[layer], every[layer][[2, 1]], atol=0, rtol=0)


def test_gradient_flows_from_later_layers_rows_to_delta(tokenizer, family):
    model = build_model(family)
    adapter = adapter_for(model)
    batch = encode(tokenizer)
    delta = torch.zeros(model.config.hidden_size, requires_grad=True)
    rows, subject = torch.arange(len(PROMPTS)), torch.tensor([3, 0, 0])
    handle = add_delta(model, 1, rows, subject, delta)
    try:
        with AttentionRows(model, adapter, [0, 2, 3], torch.tensor([6, 2, 1]), batch["attention_mask"]) as hooks:
            model(**batch)
            recorded = hooks.collect()
        assert all(r.requires_grad for layer, r in recorded.items() if layer > 1)
        (grad,) = torch.autograd.grad(sum(recorded[layer][:, :, s].sum() for layer, s in [(2, 0), (3, 0)]), delta,
                                      retain_graph=True)
        (before_injection,) = torch.autograd.grad(recorded[0].sum(), delta, allow_unused=True)
    finally:
        handle.remove()
    assert grad.abs().sum() > 0
    assert before_injection is None or not before_injection.any()  # layer 0 is before the injection: δ cannot reach it


def test_hooks_are_removed(tokenizer):
    model = build_model("gpt2")
    adapter = adapter_for(model)
    batch = encode(tokenizer)
    with AttentionRows(model, adapter, [1], torch.tensor([6, 2, 1]), batch["attention_mask"]):
        pass
    assert_no_recorders(model)


def assert_no_recorders(model):
    assert not any(m._forward_hooks for m in model.modules())
    assert not any(m in attention_rows._listeners for m in model.modules())


def test_row_kernel_keeps_the_models_outputs_bitwise(tokenizer, family):
    batch = encode(tokenizer)
    model = build_model(family)
    before = model(**batch).logits
    use_row_kernel(model)
    adapter = adapter_for(model)
    with AttentionRows(model, adapter, [1, 2], torch.tensor([6, 2, 1]), batch["attention_mask"]) as hooks:
        during = model(**batch).logits
        assert sorted(hooks.collect()) == [1, 2]
    assert torch.equal(before, during)
    assert torch.equal(before, model(**batch).logits)


def test_only_gptj_before_5_24_bypasses_the_attention_interface():
    source = legacy_attention.queries_keys_source
    assert source("gptj", "5.17.0") is not None and source("gptj", "5.23.0") is not None
    assert source("gptj", "5.24.0") is None
    assert all(source(family, version) is None for family in FAMILIES if family != "gptj" for version in ("5.17.0", "5.24.0"))


@pytest.mark.skipif(Version(transformers.__version__) < Version("5.24"),
                    reason="this GPT-J runs the rebuild itself, checked by test_rows_equal_eager_attention_weights")
@pytest.mark.parametrize("rotary_dim, dtype", [(8, torch.float32), (None, torch.float32), (8, torch.bfloat16)],
                         ids=["partial-rotary", "no-rotary-dim", "bf16"])
def test_gptj_legacy_queries_and_keys_are_what_gptj_attends_with(tokenizer, rotary_dim, dtype):
    """The queries, keys and scaling rebuilt for GPT-J before transformers 5.24 from its projections, rotary table and
    scale_attn are those that GPT-J since 5.24 (through AttentionInterface) hands its attention kernel; in bf16 too,
    where the float32 rotary table is cast to the model's dtype first."""
    model = build_model("gptj", {"rotary_dim": rotary_dim or 16}, dtype=dtype)  # 16: the tiny model's head_dim
    use_row_kernel(model)
    adapter = adapter_for(model)
    attention = adapter.module(model, adapter.attention, 1)
    attention.rotary_dim = rotary_dim  # None: rotary over the whole head, in GPT-J's attention and in the rebuild
    attention.embed_positions = model.transformer.rotary_emb.embed_positions  # as GPT-J's attention held them
    attention.scale_attn = torch.sqrt(torch.tensor(attention.head_dim, dtype=torch.float32))
    seen = {}
    stops = [listen_to_kernel(attention, lambda *args: seen.__setitem__("kernel", args)),
             legacy_attention._attach_gptj(attention, lambda *args: seen.__setitem__("rebuilt", args))]
    try:
        model(**encode(tokenizer))
    finally:
        for stop in stops:
            stop()
    (query, key, scaling, _), (rebuilt_query, rebuilt_key, rebuilt_scaling, mask) = seen["kernel"], seen["rebuilt"]
    torch.testing.assert_close(rebuilt_query, query, atol=1e-6, rtol=0)
    torch.testing.assert_close(rebuilt_key, key, atol=1e-6, rtol=0)
    assert rebuilt_scaling == pytest.approx(scaling) and mask is None
    assert not any(module._forward_hooks for module in model.modules())  # stop() removed the projections' hooks too


@pytest.mark.skipif(Version(transformers.__version__) < Version("5.24"),
                    reason="this GPT-J runs the rebuild itself, checked by test_rows_equal_eager_attention_weights")
def test_gptj_legacy_keys_of_a_cached_prefix_are_what_gptj_attends_with(tokenizer):
    """Fed the tokens after a cached prefix, with the cache as GPT-J before 5.24 named it (`layer_past`), the rebuilt
    keys are the prefix's and the fed tokens', as GPT-J since 5.24 hands them to its kernel."""
    model = build_model("gptj")
    use_row_kernel(model)
    adapter = adapter_for(model)
    attention = adapter.module(model, adapter.attention, 1)
    attention.embed_positions = model.transformer.rotary_emb.embed_positions
    attention.scale_attn = torch.sqrt(torch.tensor(attention.head_dim, dtype=torch.float32))
    ids = tokenizer(PROMPTS[:1], return_tensors="pt")["input_ids"]
    cache = model(ids[:, :5], use_cache=True).past_key_values
    renamed = attention.register_forward_pre_hook(
        lambda module, args, kwargs: (args, {**kwargs, "layer_past": kwargs["cache"]}), with_kwargs=True)
    seen = {}
    stops = [listen_to_kernel(attention, lambda *args: seen.__setitem__("kernel", args)),
             legacy_attention._attach_gptj(attention, lambda *args: seen.__setitem__("rebuilt", args)), renamed.remove]
    try:
        model(ids[:, 5:], cache=cache)
    finally:
        for stop in stops:
            stop()
    (query, key, _, _), (rebuilt_query, rebuilt_key, _, _) = seen["kernel"], seen["rebuilt"]
    assert rebuilt_key.shape[2] == ids.shape[1] and rebuilt_query.shape[2] == ids.shape[1] - 5
    torch.testing.assert_close(rebuilt_query, query, atol=1e-6, rtol=0)
    torch.testing.assert_close(rebuilt_key, key, atol=1e-6, rtol=0)


def test_rejects_padding_query_and_other_batches(tokenizer):
    model = build_model("qwen2")
    adapter = adapter_for(model)
    batch = encode(tokenizer)
    with pytest.raises(ValueError, match="non-padding"):
        AttentionRows(model, adapter, [1], torch.tensor([6, 5, 1]), batch["attention_mask"])
    with AttentionRows(model, adapter, [1], torch.tensor([6, 2, 1]), batch["attention_mask"]):
        with pytest.raises(RuntimeError, match="built for a batch"):
            model(**encode(tokenizer, PROMPTS[:2]))


def test_attention_that_bypasses_the_kernel_is_an_error(tokenizer):
    model = build_model("llama")
    batch = encode(tokenizer)
    with AttentionRows(model, adapter_for(model), [1, 2], torch.tensor([6, 2, 1]), batch["attention_mask"]) as hooks:
        model.set_attn_implementation("eager")
        model(**batch)
        with pytest.raises(RuntimeError, match=r"no attention rows were recorded for layers \[1, 2\]"):
            hooks.collect()


def test_allowed_keys_on_a_hand_made_batch():
    """Causal from the cached offset, padding excluded even where no kernel mask carries it, and a kernel mask read in
    both of its forms (boolean True = attend, additive 0 = attend) at each row's own query."""
    # row 0: 2 cached keys of which key 0 is padding, then 3 inputs; row 1: all 5 keys real
    padding = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    queries = torch.tensor([1, 2])  # keys 3 and 4
    want = torch.tensor([[False, True, True, True, False], [True, True, True, True, True]])
    assert torch.equal(allowed_keys(padding, queries, None, torch.tensor([0, 1]), cached_keys=2), want)

    window = torch.ones(2, 1, 3, 5, dtype=torch.bool)
    window[1, 0, 2, :2] = False  # row 1's query at input 2 may not see keys 0 and 1 (a sliding window)
    additive = torch.zeros(window.shape).masked_fill(~window, torch.finfo(torch.float32).min)
    want[1, :2] = False
    for mask in (window, additive):
        assert torch.equal(allowed_keys(padding, queries, mask, torch.tensor([0, 1]), cached_keys=2), want)
    # only row 1, read from the whole batch's mask
    assert torch.equal(allowed_keys(padding[1:], queries[1:], additive, torch.tensor([1]), cached_keys=2), want[1:])


@pytest.mark.parametrize("scaling", [None, 0.3])
def test_rows_are_what_the_kernel_attends_with_when_it_is_given_no_scaling(tokenizer, scaling):
    """A family whose attention hands the kernel no `scaling` gets sdpa's default 1/√d: the recorded rows must be the
    weights that produced the kernel's own output (row · V at the query), whatever scaling it was (or was not) given."""
    model = build_model("llama")
    batch = encode(tokenizer)
    attention = adapter_for(model).module(model, adapter_for(model).attention, 1)
    n_heads, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    head_dim = model.config.hidden_size // n_heads
    positions = torch.tensor([6, 2, 1])
    torch.manual_seed(0)
    query = torch.randn(3, n_heads, batch["input_ids"].shape[1], head_dim) * 2
    key, value = (torch.randn(3, n_kv, batch["input_ids"].shape[1], head_dim) * 2 for _ in range(2))
    with AttentionRows(model, adapter_for(model), [1], positions, batch["attention_mask"]) as hooks:
        kernel = ALL_ATTENTION_FUNCTIONS[attention_rows.ROW_KERNEL]  # registered by the recorder
        extra = {} if scaling is None else {"scaling": scaling}
        output, _ = kernel(attention, query, key, value, None, **extra)  # (B, T, H, D); no mask: plain causal
        rows = hooks.collect()[1]  # (B, H, K)
    repeated = value.repeat_interleave(n_heads // n_kv, dim=1)  # query head h reads key/value head h // groups
    mixed = torch.einsum("bhk,bhkd->bhd", rows, repeated)
    torch.testing.assert_close(mixed, output[torch.arange(3), positions], atol=1e-5, rtol=1e-5)


def test_kernel_mask_is_read_at_the_querys_input_position_after_a_cache():
    """The kernel's mask has one row per fed token (B, H, T, K): with 2 cached keys, the query at input t reads mask
    row t, not row 2 + t (its key index)."""
    padding = torch.ones(2, 5, dtype=torch.long)
    queries = torch.tensor([0, 1])  # keys 2 and 3
    mask = torch.ones(2, 1, 3, 5, dtype=torch.bool)
    mask[0, 0, 0, 0] = False  # row 0's query (input 0) may not see key 0
    mask[1, 0, 1, 1] = False  # row 1's query (input 1) may not see key 1
    mask[:, 0, 2, :] = False  # input 2 (no query here) sees nothing: reading it would drop every key
    want = torch.tensor([[False, True, True, False, False], [True, False, True, True, False]])
    assert torch.equal(allowed_keys(padding, queries, mask, torch.tensor([0, 1]), cached_keys=2), want)
