"""Post-softmax attention rows of one query position per prompt, without eager attention.

SADR needs, per prompt and layer, only the row softmax(q_t Kᵀ · scale + mask) of every query head at
one query position t. Asking the model for `output_attentions` would force eager attention and build
every (batch × heads × T × T) map; instead, hooks capture the queries and keys the attention module
itself computes (its projection outputs and the positional encoding it receives) and rebuild just those
rows, differentiably, while the model keeps its own attention kernel (sdpa, eager, ...).

Per-family knowledge lives in `FAMILY_ATTENTION`, keyed by `ModelAdapter.family` and written against
the transformers 5.23 modeling code; supporting a new family is one entry there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from transformers.models.gpt_neox import modeling_gpt_neox
from transformers.models.gptj import modeling_gptj
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2

from sadr.models.adapters import ModelAdapter, UnsupportedModelError

QueriesKeys = Callable[[nn.Module, Sequence[Tensor], dict[str, Any]], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class FamilyAttention:
    """How one family's attention module forms the queries and keys it feeds to its attention kernel.

    `projections` are submodules of the attention module whose outputs are captured (in this order);
    `queries_keys(module, outputs, kwargs)` turns them, with the keyword arguments the module was called
    with, into queries (B, H_q, T, D) and keys (B, H_kv, T, D), position encoding applied.
    """

    projections: tuple[str, ...]
    queries_keys: QueriesKeys
    scaling: Callable[[nn.Module], float] = lambda module: module.scaling
    sliding_window: Callable[[nn.Module], Optional[int]] = lambda module: getattr(module, "sliding_window", None)


def _split_heads(x: Tensor, head_dim: int) -> Tensor:
    """(B, T, H·D) -> (B, H, T, D)."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def _gpt2(module: nn.Module, outputs: Sequence[Tensor], kwargs: dict[str, Any]) -> tuple[Tensor, Tensor]:
    # Fused c_attn: [q | k | v] along features; learned absolute positions are already in the input.
    query, key, _ = outputs[0].split(module.split_size, dim=2)
    return _split_heads(query, module.head_dim), _split_heads(key, module.head_dim)


def _gptj(module: nn.Module, outputs: Sequence[Tensor], kwargs: dict[str, Any]) -> tuple[Tensor, Tensor]:
    # Interleaved rotary on the first `rotary_dim` features (all when None), sin/cos cast to the key dtype.
    query, key = (x.unflatten(-1, (module.num_attention_heads, module.head_dim)) for x in outputs)
    position_ids = kwargs["position_ids"]
    sincos = module.embed_positions.to(position_ids.device)[position_ids].to(key.dtype)
    sin, cos = torch.split(sincos, sincos.shape[-1] // 2, dim=-1)
    rot = module.rotary_dim or module.head_dim
    query, key = (
        torch.cat([modeling_gptj.apply_rotary_pos_emb(x[..., :rot], sin, cos), x[..., rot:]], dim=-1)
        for x in (query, key)
    )
    return query.transpose(1, 2), key.transpose(1, 2)


def _gpt_neox(module: nn.Module, outputs: Sequence[Tensor], kwargs: dict[str, Any]) -> tuple[Tensor, Tensor]:
    # Fused query_key_value laid out per head as [q | k | v]; partial rotary (cos/sin are rotary_ndims wide).
    qkv = outputs[0].unflatten(-1, (-1, 3 * module.head_size)).transpose(1, 2)
    query, key, _ = qkv.chunk(3, dim=-1)
    cos, sin = kwargs["position_embeddings"]
    return modeling_gpt_neox.apply_rotary_pos_emb(query, key, cos, sin)


def _llama_like(apply_rotary_pos_emb: Callable) -> QueriesKeys:
    """Separate q/k projections (qwen2: with biases, part of the projection), rotary on the full head."""

    def queries_keys(module: nn.Module, outputs: Sequence[Tensor], kwargs: dict[str, Any]) -> tuple[Tensor, Tensor]:
        query, key = (_split_heads(x, module.head_dim) for x in outputs)
        cos, sin = kwargs["position_embeddings"]
        return apply_rotary_pos_emb(query, key, cos, sin)

    return queries_keys


FAMILY_ATTENTION: dict[str, FamilyAttention] = {
    "gpt2": FamilyAttention(projections=("c_attn",), queries_keys=_gpt2),
    "gptj": FamilyAttention(
        projections=("q_proj", "k_proj"), queries_keys=_gptj, scaling=lambda module: 1.0 / module.scale_attn
    ),
    "gpt_neox": FamilyAttention(projections=("query_key_value",), queries_keys=_gpt_neox),
    "llama": FamilyAttention(
        projections=("q_proj", "k_proj"), queries_keys=_llama_like(modeling_llama.apply_rotary_pos_emb)
    ),
    "mistral": FamilyAttention(
        projections=("q_proj", "k_proj"),
        queries_keys=_llama_like(modeling_mistral.apply_rotary_pos_emb),
        sliding_window=lambda module: getattr(module.config, "sliding_window", None),  # every layer, from config
    ),
    "qwen2": FamilyAttention(
        projections=("q_proj", "k_proj"), queries_keys=_llama_like(modeling_qwen2.apply_rotary_pos_emb)
    ),
}


def family_attention(adapter: ModelAdapter) -> FamilyAttention:
    try:
        return FAMILY_ATTENTION[adapter.family]
    except KeyError:
        raise UnsupportedModelError(
            f"no attention-row support for model family {adapter.family!r}; supported: "
            f"{', '.join(sorted(FAMILY_ATTENTION))}. Add an entry to FAMILY_ATTENTION in {__name__}."
        ) from None


def attention_row(
    query: Tensor, key: Tensor, scaling: float, query_positions: Tensor, allowed: Tensor
) -> Tensor:
    """softmax(q_t Kᵀ · scaling) over the allowed keys, for every query head.

    query (B, H_q, T, D), key (B, H_kv, T, D) with H_q a multiple of H_kv (query head h reads key head
    h // (H_q / H_kv), as `repeat_kv` does); query_positions (B,); allowed (B, T) bool.
    Returns (B, H_q, T) in at least float32, zero on disallowed keys.
    """
    dtype = torch.promote_types(query.dtype, torch.float32)
    batch, n_query_heads, _, head_dim = query.shape
    n_kv_heads = key.shape[1]
    q_t = query[torch.arange(batch, device=query.device), :, query_positions]  # (B, H_q, D)
    q_t = q_t.to(dtype).reshape(batch, n_kv_heads, n_query_heads // n_kv_heads, head_dim)
    scores = torch.einsum("bgrd,bgkd->bgrk", q_t, key.to(dtype)).flatten(1, 2) * scaling
    scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1)


def allowed_keys(attention_mask: Tensor, query_positions: Tensor, sliding_window: Optional[int]) -> Tensor:
    """Keys query t may attend to: causal, not padding, and within the sliding window if any (B, T) bool."""
    keys = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    t = query_positions[:, None]
    allowed = attention_mask.bool() & (keys <= t)
    if sliding_window is not None:
        allowed &= keys > t - sliding_window
    return allowed


class AttentionRows:
    """Hooks recording, at every forward, the attention rows of one query position per selected batch row.

    After each forward, `rows[layer]` is a (len(batch_rows), H_q, T) tensor, in at least float32, in the
    autograd graph of that forward (a later forward overwrites it). The hooks expect the batch they were
    built for: `attention_mask` (B, T) is its padding mask, `batch_rows` the rows wanted (all by default)
    and `query_positions[i]` the query position of `batch_rows[i]`. Use as a context manager or `remove()`.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        layers: Sequence[int],
        query_positions: Tensor,
        attention_mask: Tensor,
        batch_rows: Optional[Tensor] = None,
    ) -> None:
        family = family_attention(adapter)
        device = next(model.parameters()).device
        batch, seq_len = attention_mask.shape
        rows = torch.arange(batch) if batch_rows is None else torch.as_tensor(batch_rows).reshape(-1).cpu()
        positions = torch.as_tensor(query_positions).reshape(-1).cpu()
        if positions.shape != rows.shape:
            raise ValueError(f"{positions.numel()} query positions for {rows.numel()} batch rows")
        if ((positions < 0) | (positions >= seq_len)).any() or not attention_mask.cpu()[rows, positions].bool().all():
            raise ValueError(f"query positions {positions.tolist()} must be non-padding tokens of their rows")
        self._batch_shape = (batch, seq_len)
        self._rows = rows.to(device)
        self._positions = positions.to(device)
        self._mask = attention_mask.to(device)[self._rows]
        self.rows: dict[int, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            for layer in layers:
                self._hook_layer(adapter.module(model, adapter.attention, layer), layer, family)
        except BaseException:
            self.remove()
            raise

    def _hook_layer(self, attention: nn.Module, layer: int, family: FamilyAttention) -> None:
        captured: dict[str, Tensor] = {}
        for name in family.projections:
            def keep(module, args, output, name=name):
                captured[name] = output

            self._handles.append(attention.get_submodule(name).register_forward_hook(keep))
        allowed = allowed_keys(self._mask, self._positions, family.sliding_window(attention))
        scaling = family.scaling(attention)

        def record(module, args, kwargs, output):
            if len(captured) != len(family.projections):
                raise RuntimeError(f"layer {layer}: the attention projections {family.projections} did not run")
            outputs = [captured.pop(name) for name in family.projections]
            query, key = family.queries_keys(module, outputs, kwargs)
            if (query.shape[0], key.shape[2]) != self._batch_shape:
                raise RuntimeError(
                    f"layer {layer}: attention-row hooks were built for a batch of shape {self._batch_shape}, "
                    f"the model ran one with batch {query.shape[0]} and {key.shape[2]} key positions"
                )
            self.rows[layer] = attention_row(query[self._rows], key[self._rows], scaling, self._positions, allowed)

        self._handles.append(attention.register_forward_hook(record, with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "AttentionRows":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()
