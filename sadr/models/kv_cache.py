"""Passing a key/value cache to a model's forward, under the name its transformers release takes."""
from __future__ import annotations

import inspect

from transformers import DynamicCache


def cache_argument(module) -> str:
    """The name `module.forward` takes a key/value cache under (`cache` from transformers 5.24, before that
    `past_key_values`, which 5.24 still accepts with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def new_cache(model) -> dict:
    """Forward keyword arguments with an empty cache, which each forward they are given to fills in place."""
    return {cache_argument(model): DynamicCache(config=model.config), "use_cache": True}
