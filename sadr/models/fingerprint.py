"""A content hash of a model, so caches are keyed by the weights actually loaded, not by a name."""
from __future__ import annotations

import hashlib
import json

import torch

# Where the model was loaded from and which transformers wrote its config: the same weights loaded from another
# folder (a moved cache, a copy) must find the same cache entries.
NOT_CONTENT = ("_name_or_path", "transformers_version")


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the config (less NOT_CONTENT) and, per parameter, its name, shape, dtype and float64 sum and
    sum of squares."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in NOT_CONTENT}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, param in model.named_parameters():
        p = param.detach().double()
        h.update(f"{name}{tuple(p.shape)}{param.dtype}{p.sum().item():.10e}{p.square().sum().item():.10e}".encode())
    return h.hexdigest()[:16]


def computation_fingerprint(weights_fingerprint: str, tf32: bool) -> str:
    """What the caches of a model's computations (statistics, context templates, unedited scores) are keyed by: its
    weights and whether float32 products ran in TF32, which changes results in the fourth significant digit, well
    beyond float rounding. Without TF32 it is the weights' fingerprint, so existing caches stay valid."""
    return cache_key(model=weights_fingerprint, float32_products="tf32") if tf32 else weights_fingerprint


def cache_key(**parts) -> str:
    """A short hash of everything that determines a cached artefact."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
