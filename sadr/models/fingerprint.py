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
        total, squares = _float64_sums(param.detach())
        h.update(f"{name}{tuple(param.shape)}{param.dtype}{total:.10e}{squares:.10e}".encode())
    return h.hexdigest()[:16]


def _float64_sums(param: torch.Tensor, chunk: int = 1 << 24) -> tuple[float, float]:
    """The sum and sum of squares of a parameter in float64, a chunk of elements at a time, so no float64 copy of a
    whole parameter is made (Llama-3-8B's embedding alone would take 4.2 GB twice on its GPU)."""
    flat = param.reshape(-1)
    total = squares = 0.0
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk].double()
        total += part.sum().item()
        squares += part.square().sum().item()
    return total, squares


def tokenizer_fingerprint(tokenizer) -> str:
    """A content hash of how the tokenizer turns text into ids and ids into text, which every cached computation reads
    (prompts, targets, the corpus, sampled texts): the `tokenizers` library's whole definition, where the tokenizer has
    one (every supported family: vocabulary, merges, normalizer, pre-tokenizer, the post-processor that adds BOS, the
    decoder), else its vocabulary; its class, special tokens and decoding's space clean-up. Not where it was loaded
    from: the same files in another folder give the same hash. Nor its pad token, which fills masked positions
    only (loading gives a tokenizer without one its EOS token, `pad_id_of`): files that differ in it alone compute
    the same."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    special = {name: token for name, token in tokenizer.special_tokens_map.items() if name != "pad_token"}
    return cache_key(kind="tokenizer", definition=definition, tokenizer_class=type(tokenizer).__name__,
                     special_tokens=special, clean_up_spaces=getattr(tokenizer, "clean_up_tokenization_spaces", None))


def computation_fingerprint(weights_fingerprint: str, tokenizer: str, tf32: bool, device_type: str = "cpu") -> str:
    """What the caches of a model's computations (statistics, context templates, unedited scores) are keyed by: its
    weights; its tokenizer (`tokenizer_fingerprint`: a folder's tokenizer files replaced beside the same weights change
    every cached result); whether float32 products ran in TF32, which changes results in the fourth significant digit,
    well beyond float rounding; and the kind of device, whose random streams differ (a generated corpus, sampled
    texts) as do its kernels' roundings, so a GPU run never reads what a CPU run cached, nor the reverse."""
    parts = {**({"float32_products": "tf32"} if tf32 else {}), **({"device": device_type} if device_type != "cpu" else {})}
    return cache_key(model=weights_fingerprint, tokenizer=tokenizer, **parts)


def cache_key(**parts) -> str:
    """A short hash of everything that determines a cached artefact."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
