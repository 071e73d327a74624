"""The one place that reads transformers' attention internals: families that bypass `AttentionInterface`.

In the tested transformers range (see `sadr/constraints/`), only GPT-J does, before transformers 5.24: its attention
module computes eager attention in its own method, so `ROW_KERNEL` never sees its queries and keys. For those versions
the queries and keys are rebuilt here from the projections' outputs, the module's rotary table (`embed_positions`),
`rotary_dim` and `scale_attn`, as modeling_gptj computes them in transformers 5.17 to 5.23. When the forward is handed a
key/value cache (the δ-optimiser's cached prefixes), the keys are read from that cache after the module appended the
fed tokens' keys to it, so the rows cover the cached keys too. The test suite checks the
rebuilt rows against GPT-J's own eager attention weights at both ends of the tested range (the oldest set runs this
path, the locked set the kernel path). A family listed here with a version past which it uses `AttentionInterface`
needs nothing else; a new exception gets an entry in `LEGACY_UNTIL` and a rebuild function.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import transformers
from packaging.version import Version
from torch import Tensor, nn

Listener = Callable[[Tensor, Tensor, Optional[float], Optional[Tensor]], None]
Attach = Callable[[nn.Module, Listener], Callable[[], None]]


def _gptj_rotated(module: nn.Module, projected: Tensor, position_ids: Tensor) -> Tensor:
    """A projection's output (B, T, H·D) as GPT-J's attention uses it, (B, H, T, D): interleaved rotary on the first
    `rotary_dim` features (all when None), sin/cos cast to its dtype."""
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb

    x = projected.unflatten(-1, (module.num_attention_heads, module.head_dim))
    sincos = module.embed_positions.to(position_ids.device)[position_ids].to(x.dtype)
    sin, cos = torch.split(sincos, sincos.shape[-1] // 2, dim=-1)
    rot = module.rotary_dim or module.head_dim
    return torch.cat([apply_rotary_pos_emb(x[..., :rot], sin, cos), x[..., rot:]], dim=-1).transpose(1, 2)


def _attach_gptj(attention: nn.Module, listener: Listener) -> Callable[[], None]:
    captured: dict[str, Tensor] = {}
    handles = []
    for name in ("q_proj", "k_proj"):
        def keep(module, args, output, name=name):
            captured[name] = output

        handles.append(attention.get_submodule(name).register_forward_hook(keep))

    def record(module, args, kwargs, output):
        if len(captured) != 2:
            raise RuntimeError("GPT-J attention ran without its q_proj and k_proj projections")
        position_ids, projected_keys = kwargs["position_ids"], captured.pop("k_proj")
        query = _gptj_rotated(module, captured.pop("q_proj"), position_ids)
        cache = kwargs.get("layer_past")
        if cache is not None:  # every key the attention read: a cached prefix's, then the fed tokens' (now appended)
            key = cache.layers[module.layer_idx].keys
        else:
            key = _gptj_rotated(module, projected_keys, position_ids)
        listener(query, key, 1.0 / float(module.scale_attn), None)

    handles.append(attention.register_forward_hook(record, with_kwargs=True))

    def stop() -> None:
        for handle in handles:
            handle.remove()

    return stop


# family -> (first transformers version whose attention goes through AttentionInterface, how to hook older ones)
LEGACY_UNTIL: dict[str, tuple[Version, Attach]] = {"gptj": (Version("5.24.0"), _attach_gptj)}


def queries_keys_source(family: str, version: str = transformers.__version__) -> Optional[Attach]:
    """How to hook this family's attention under the installed transformers, or None: it uses `AttentionInterface`."""
    entry = LEGACY_UNTIL.get(family)
    if entry is None or Version(version) >= entry[0]:
        return None
    return entry[1]
