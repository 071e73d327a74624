"""Keys and bare-prompt outputs stop their forwards at the highest layer they read, and equal a whole forward's."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sadr.data.records import EditRequest
from sadr.editors.capture import add_at_positions, capture_inputs, capture_outputs, frozen_blocks
from sadr.editors.keys import mean_keys
from sadr.editors.low_rank import PerRowUpdates
from sadr.editors.prompts import encode_subject_prompts, templated_prompts
from sadr.editors.spread import bare_prompt_outputs
from sadr.editors.update import LowRankUpdate
from sadr.models.adapters import adapter_for
from tests.editing import TEMPLATES
from tests.tiny_models import FAMILIES, make_model

REQUESTS = [EditRequest(prompt="The capital city of {} is", subject="Toyota", target_new="Japan"),
            EditRequest(prompt="{} is based in", subject="Because London", target_new="Paris")]


def _never_run(block):
    def hook(*_args):
        raise AssertionError("a block above the highest layer read was run")

    return block.register_forward_pre_hook(hook)


@pytest.mark.parametrize("family", FAMILIES)
def test_keys_stop_at_their_highest_layer_and_equal_a_whole_forward(tokenizer, family):
    model = make_model(family)
    adapter = adapter_for(model)
    guard = _never_run(adapter.block(model, 3))
    try:
        keys = mean_keys(model, adapter, tokenizer, [1, 2], REQUESTS, TEMPLATES)
        chunked = mean_keys(model, adapter, tokenizer, [1, 2], REQUESTS, TEMPLATES, batch_size=3)  # rows across chunks
        outputs = bare_prompt_outputs(model, adapter, tokenizer, "mlp_out", 2, REQUESTS)
    finally:
        guard.remove()
    downs = {layer: adapter.mlp_down_module(model, layer) for layer in (1, 2)}
    for index, request in enumerate(REQUESTS):
        prompts = templated_prompts(request, TEMPLATES)
        enc = encode_subject_prompts(tokenizer, prompts, [request.subject] * len(prompts))
        with torch.no_grad(), capture_inputs(downs) as inputs, capture_outputs({2: downs[2]}) as out:
            model(input_ids=enc.batch.input_ids, attention_mask=enc.batch.attention_mask)
        rows = torch.arange(len(prompts))
        for layer in (1, 2):
            expected = inputs[layer][rows, enc.subject_positions].mean(0)
            torch.testing.assert_close(keys[layer][index], expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(chunked[layer][index], expected, rtol=1e-5, atol=1e-6)
        # row 0 is the bare prompt ("{}" template)
        torch.testing.assert_close(outputs[index], out[2][0, enc.subject_positions[0]], rtol=1e-5, atol=1e-6)


def test_per_row_keys_and_outputs_in_chunks_are_those_of_each_requests_own_edited_model(tokenizer):
    """With `PerRowUpdates`, each request's keys and bare-prompt output come from the model with its own update
    written, however the rows are cut into forwards (one prompt per forward puts every later row in a later chunk)."""
    model = make_model("llama")
    adapter = adapter_for(model)
    g = torch.Generator().manual_seed(0)
    out_features, in_features = adapter.down_weight(model, 1).shape
    updates = [{1: LowRankUpdate(torch.randn(out_features, 1, generator=g), torch.randn(in_features, 1, generator=g))}
               for _ in REQUESTS]
    with PerRowUpdates(model, adapter, updates) as written:
        chunked = {size: (mean_keys(model, adapter, tokenizer, [2], REQUESTS, TEMPLATES, batch_size=size,
                                    case_rows=written.rows)[2],
                          bare_prompt_outputs(model, adapter, tokenizer, "mlp_out", 2, REQUESTS, batch_size=size,
                                              case_rows=written.rows))
                   for size in (1, 64)}
    for index, (request, update) in enumerate(zip(REQUESTS, updates)):
        alone = make_model("llama")
        adapter.add_to_down_weight(alone, 1, update[1])
        keys = mean_keys(alone, adapter, tokenizer, [2], [request], TEMPLATES)[2][0]
        output = bare_prompt_outputs(alone, adapter, tokenizer, "mlp_out", 2, [request])[0]
        for size, (chunk_keys, chunk_outputs) in chunked.items():
            torch.testing.assert_close(chunk_keys[index], keys, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(chunk_outputs[index], output, rtol=1e-4, atol=1e-5)
    unedited = bare_prompt_outputs(model, adapter, tokenizer, "mlp_out", 2, REQUESTS)
    assert not torch.allclose(unedited, chunked[64][1], atol=1e-3)  # the updates change what is read


class PairOutput(nn.Module):
    """Returns (hidden, extra), as GPT-J's blocks do before transformers 5.24, from two positional inputs."""

    def forward(self, hidden, extra):
        return hidden * 2, extra


def test_hooks_read_the_first_input_and_the_hidden_state_of_a_tuple_output():
    """Keys are a module's first positional input; outputs and added deltas are a tuple output's first element (the
    hidden state), the rest of the tuple passing through untouched."""
    module, hidden, extra = PairOutput(), torch.arange(24.0).reshape(2, 3, 4), torch.full((2, 3, 4), -1.0)
    delta = torch.tensor([[1.0] * 4, [10.0] * 4])
    with capture_inputs({5: module}) as inputs, capture_outputs({5: module}) as outputs:
        module(hidden, extra)
    assert torch.equal(inputs[5], hidden) and torch.equal(outputs[5], 2 * hidden)
    with add_at_positions(module, torch.tensor([0, 1]), torch.tensor([1, 2]), lambda: delta):
        added, passed = module(hidden, extra)
    expected = 2 * hidden
    expected[0, 1] += 1  # row 0's δ at its position 1, added to the output
    expected[1, 2] += 10
    assert torch.equal(added, expected) and passed is extra


class CountingBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, hidden):
        self.calls += 1
        return hidden + 1


def test_frozen_blocks_run_once_replay_that_output_and_restore_each_blocks_own_forward():
    """Inside, a block runs at the first forward only and later forwards get that output back (whatever they pass);
    after, every block computes again, and a block that had its own instance `forward` (accelerate's device-map
    wrapper) gets that one back, not the class's."""
    plain, wrapped = CountingBlock(), CountingBlock()
    wrapper_calls = []

    def device_map_forward(*args, _inner=wrapped.forward, **kwargs):
        wrapper_calls.append(1)
        return _inner(*args, **kwargs)

    wrapped.forward = device_map_forward
    first, second = torch.zeros(2), torch.full((2,), 5.0)
    with frozen_blocks([plain, wrapped]):
        assert torch.equal(plain(first), first + 1) and torch.equal(wrapped(first), first + 1)
        assert torch.equal(plain(second), first + 1) and torch.equal(wrapped(second), first + 1)
    assert plain.calls == 1 and wrapped.calls == 1 and len(wrapper_calls) == 1
    assert "forward" not in plain.__dict__ and wrapped.forward is device_map_forward
    assert torch.equal(plain(second), second + 1) and torch.equal(wrapped(second), second + 1)
    assert plain.calls == 2 and wrapped.calls == 2 and len(wrapper_calls) == 2


def test_keys_end_the_forward_before_their_highest_layers_down_projection_runs(tokenizer):
    """The keys are that projection's input, so the projection itself is never computed."""
    model = make_model("llama")
    adapter = adapter_for(model)

    def ran(*_args):
        raise AssertionError("the highest layer's down-projection was run")

    handle = adapter.mlp_down_module(model, 2).register_forward_hook(ran)
    try:
        keys = mean_keys(model, adapter, tokenizer, [1, 2], REQUESTS, TEMPLATES)
    finally:
        handle.remove()
    assert keys[2].shape[0] == len(REQUESTS)
