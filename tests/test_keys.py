"""Keys and bare-prompt outputs stop their forwards at the highest layer they read, and equal a whole forward's."""
from __future__ import annotations

import pytest
import torch

from sadr.data.records import EditRequest
from sadr.editors.capture import capture_inputs, capture_outputs
from sadr.editors.keys import mean_keys
from sadr.editors.prompts import encode_subject_prompts, templated_prompts
from sadr.editors.spread import bare_prompt_outputs
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
