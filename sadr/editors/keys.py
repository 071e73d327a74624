"""Keys: the input of the MLP down-projection at the subject's last token, averaged over context templates."""
from __future__ import annotations

import torch

from sadr.data.records import EditRequest
from sadr.editors.capture import capture_inputs, stop_after
from sadr.editors.prompts import encode_subject_prompts, templated_prompts
from sadr.evaluation.case_rows import CaseRows, one_model
from sadr.models.adapters import ModelAdapter


@torch.no_grad()
def mean_keys(model, adapter: ModelAdapter, tokenizer, layers: list[int], requests: list[EditRequest],
              context_templates: list[str], batch_size: int = 64, case_rows: CaseRows = one_model) -> dict[int, torch.Tensor]:
    """layer -> (n_requests, d_in) float32: each request's key averaged over its templated prompts.

    `case_rows` is told, around each forward, which request each row belongs to (requests as the cases of
    `editor.parallel_cases`, each on its own edited model)."""
    templates, subjects, owner = [], [], []
    for index, request in enumerate(requests):
        prompts = templated_prompts(request, context_templates)
        templates += prompts
        subjects += [request.subject] * len(prompts)
        owner += [index] * len(prompts)
    device = next(model.parameters()).device
    modules = {layer: adapter.mlp_down_module(model, layer) for layer in layers}
    sums = {layer: None for layer in layers}
    owner_t = torch.tensor(owner, device=device)
    for start in range(0, len(templates), batch_size):
        enc = encode_subject_prompts(tokenizer, templates[start : start + batch_size], subjects[start : start + batch_size])
        batch = enc.batch.to(device)
        chunk_owner = owner_t[start : start + batch_size]
        with capture_inputs(modules) as captured, case_rows(owner[start : start + batch_size]), \
                stop_after(modules[max(layers)], before=True):
            model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        rows = torch.arange(len(enc.subject_positions), device=device)
        for layer in layers:
            keys = captured[layer][rows, enc.subject_positions.to(device)].float()
            total = torch.zeros(len(requests), keys.shape[-1], device=device).index_add_(0, chunk_owner, keys)
            sums[layer] = total if sums[layer] is None else sums[layer] + total
    counts = torch.bincount(owner_t, minlength=len(requests)).float()[:, None]
    return {layer: sums[layer] / counts for layer in layers}
