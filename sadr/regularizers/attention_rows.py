"""Post-softmax attention rows of one query position per prompt, from what the model's own attention kernel is handed.

SADR and the drift diagnostics need, per prompt and layer, only the row softmax(q_t Kᵀ · scale + mask) of every query
head at one position t. Asking the model for `output_attentions` would force eager attention and build every
(batch × heads × T × T) map, and rebuilding queries and keys from a family's attention internals breaks whenever
transformers rewrites them. Instead the model's attention runs through `ROW_KERNEL`, a function registered with
transformers' public `AttentionInterface` (and its mask with `AttentionMaskInterface`): every attention module hands it
the queries and keys it has formed (position encoding applied), the scaling and the mask. The kernel passes them to the
recorder listening on that module, if any, then calls transformers' own sdpa kernel with the same arguments, so the
model's outputs are bit-identical to `attn_implementation="sdpa"`. Any family whose attention goes through
`AttentionInterface` is supported with no per-family code; the one exception in the tested range (GPT-J before
transformers 5.24) is handled in `sadr.regularizers.legacy_attention`.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from sadr.models.adapters import ModelAdapter
from sadr.regularizers import legacy_attention

ROW_KERNEL = "sadr_rows"
BASE_KERNEL = "sdpa"

# listener(query (B, H_q, T, D), key (B, H_kv, T, D), scaling or None, kernel mask or None)
Listener = Callable[[Tensor, Tensor, Optional[float], Optional[Tensor]], None]
_listeners: dict[nn.Module, list[Listener]] = {}


def _row_kernel(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                **kwargs):
    for listener in _listeners.get(module, ()):
        listener(query, key, kwargs.get("scaling"), attention_mask)
    return ALL_ATTENTION_FUNCTIONS[BASE_KERNEL](module, query, key, value, attention_mask, **kwargs)


def use_row_kernel(model: nn.Module) -> None:
    """Route the model's attention through ROW_KERNEL (sdpa plus the listeners). Idempotent.

    A model loaded with eager attention computes sdpa afterwards; outputs agree to float rounding.
    """
    AttentionInterface.register(ROW_KERNEL, _row_kernel)
    AttentionMaskInterface.register(ROW_KERNEL, ALL_MASK_ATTENTION_FUNCTIONS[BASE_KERNEL])
    model.set_attn_implementation(ROW_KERNEL)


def listen_to_kernel(attention: nn.Module, listener: Listener) -> Callable[[], None]:
    """Call `listener` whenever `attention` runs through ROW_KERNEL; returns the function that stops it."""
    _listeners.setdefault(attention, []).append(listener)

    def stop() -> None:
        listeners = _listeners.get(attention, [])
        if listener in listeners:
            listeners.remove(listener)
        if not listeners:
            _listeners.pop(attention, None)

    return stop


def key_scores(query_rows: Tensor, key: Tensor) -> Tensor:
    """q Kᵀ (unscaled) for one query per row, every query head: (..., R, H_q, K) in at least float32.

    query_rows (..., R, H_q, D); key (..., R, H_kv, K, D) with H_q a multiple of H_kv (query head h reads key head
    h // (H_q / H_kv), as `repeat_kv` does).
    """
    dtype = torch.promote_types(query_rows.dtype, torch.float32)
    *lead, n_query_heads, head_dim = query_rows.shape
    n_kv_heads = key.shape[-3]
    grouped = query_rows.to(dtype).reshape(*lead, n_kv_heads, n_query_heads // n_kv_heads, head_dim)
    return torch.matmul(grouped, key.to(dtype).transpose(-1, -2)).flatten(-3, -2)


def row_softmax(scores: Tensor, scaling: float | Tensor, allowed: Tensor) -> Tensor:
    """softmax(scores · scaling) over the allowed keys: scores (..., R, H, K), scaling a number or broadcastable to
    them, allowed (..., R, K) bool; zero on disallowed keys."""
    scores = (scores * scaling).masked_fill(~allowed[..., None, :], float("-inf"))
    return torch.softmax(scores, dim=-1)


def allowed_keys(padding: Tensor, query_positions: Tensor, kernel_mask: Optional[Tensor], batch_rows: Tensor,
                 cached_keys: int = 0) -> Tensor:
    """Keys each query may attend to (B, K) bool: causal, not padding, and allowed by the kernel's mask if it got one.

    `padding` (B, K) marks the real keys; the query at input position t is key `cached_keys + t` (keys before that
    came from a cache). `kernel_mask` is what the attention kernel received for the whole batch: None (plain causal
    attention) or a (B, 1 or H, T, K) mask, boolean (True = attend) or additive (0 = attend); it carries sliding
    windows.
    """
    keys = torch.arange(padding.shape[1], device=padding.device)
    allowed = padding.bool() & (keys <= cached_keys + query_positions[:, None])
    if kernel_mask is None:
        return allowed
    if kernel_mask.dim() != 4:
        raise RuntimeError(f"the attention kernel got a mask of shape {tuple(kernel_mask.shape)}; expected (B, H, T, K)")
    mask = kernel_mask[batch_rows, 0, query_positions, : padding.shape[1]]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return allowed & mask


class AttentionRows:
    """Records, at every forward, the attention rows of one query position per selected batch row.

    After a forward, `collect()` returns {layer: (len(batch_rows), H_q, K)} in at least float32 (`collect_stacked()`
    the same as one (layers, rows, H_q, K) tensor), in the autograd graph of that forward. The recorder expects the
    batch it was built for: `attention_mask` (B, K) marks its real keys, `batch_rows` the rows wanted (all by default)
    and `query_positions[i]` the input position of `batch_rows[i]`'s query. With `cached_keys` > 0 the forward is fed
    only the tokens after a cached prefix: key k < cached_keys came from the cache and input position t is key
    cached_keys + t (the δ-optimiser's layout, `DeltaBatch`). Use as a context manager or `remove()`.

    During the forward each layer computes only its rows' scores q Kᵀ (two index_selects and one product: the memory
    of its selected keys, kept for the backward, is what per-layer rows cost too); scaling, masking and the softmax
    of every layer run together at `collect`. That keeps the kernel launches per layer few, which matters on a GPU,
    where SADR's δ-step is launch-bound for models of SmolLM2's size.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        layers: Sequence[int],
        query_positions: Tensor,
        attention_mask: Tensor,
        batch_rows: Optional[Tensor] = None,
        cached_keys: int = 0,
    ) -> None:
        device = next(model.parameters()).device
        batch, seq_len = attention_mask.shape
        rows = torch.arange(batch) if batch_rows is None else torch.as_tensor(batch_rows).reshape(-1).cpu()
        positions = torch.as_tensor(query_positions).reshape(-1).cpu()
        if positions.shape != rows.shape:
            raise ValueError(f"{positions.numel()} query positions for {rows.numel()} batch rows")
        keys = positions + cached_keys
        if ((positions < 0) | (keys >= seq_len)).any() or not attention_mask.cpu()[rows, keys].bool().all():
            raise ValueError(f"query positions {positions.tolist()} must be non-padding tokens of their rows")
        self.layers = list(layers)
        self._cached_keys = cached_keys
        self._batch_shape = (batch, seq_len)
        self._rows = rows.to(device)
        self._positions = positions.to(device)
        self._padding = attention_mask.to(device)[self._rows]
        self._query_index: dict[int, Tensor] = {}  # fed length T -> the rows' queries in a (B·T, H, D) view
        self._recorded: dict[int, tuple[Tensor, float, Optional[Tensor]]] = {}  # layer -> q Kᵀ, scale, kernel mask
        self._stops: list[Callable[[], None]] = []
        legacy = legacy_attention.queries_keys_source(adapter.family)
        if legacy is None:
            use_row_kernel(model)
        try:
            for layer in self.layers:
                attention = adapter.module(model, adapter.attention, layer)
                listener = self._listener(layer)
                self._stops.append(listen_to_kernel(attention, listener) if legacy is None else legacy(attention, listener))
        except BaseException:
            self.remove()
            raise

    def _listener(self, layer: int) -> Listener:
        def record(query: Tensor, key: Tensor, scaling: Optional[float], kernel_mask: Optional[Tensor]) -> None:
            if (query.shape[0], key.shape[2]) != self._batch_shape:
                raise RuntimeError(
                    f"layer {layer}: attention-row hooks were built for a batch of shape {self._batch_shape}, "
                    f"the model ran one with batch {query.shape[0]} and {key.shape[2]} key positions"
                )
            scale = query.shape[-1] ** -0.5 if scaling is None else scaling  # None: the kernel's default
            fed = query.shape[2]
            if fed not in self._query_index:
                self._query_index[fed] = self._rows * fed + self._positions
            # index_select, not advanced indexing: its backward adds into the gradient, where indexing's is an
            # accumulating index_put (sorted indices on a GPU). (B, H, T, D) is the projection's (B, T, H, D) transposed,
            # so the flattening is a view.
            query_rows = query.transpose(1, 2).flatten(0, 1).index_select(0, self._query_index[fed])
            self._recorded[layer] = (key_scores(query_rows, key.index_select(0, self._rows)), scale, kernel_mask)

        return record

    def _allowed(self, masks: list[Optional[Tensor]]) -> Tensor:
        """(1 or layers, rows, K): the allowed keys, computed once per distinct kernel mask."""
        distinct: list[tuple[Optional[Tensor], Tensor]] = []
        per_layer = []
        for mask in masks:
            found = next((allowed for seen, allowed in distinct if seen is mask), None)
            if found is None:
                found = allowed_keys(self._padding, self._positions, mask, self._rows, self._cached_keys)
                distinct.append((mask, found))
            per_layer.append(found)
        return distinct[0][1][None] if len(distinct) == 1 else torch.stack(per_layer)

    def collect_stacked(self) -> Tensor:
        """The rows of the last forward as one (layers, rows, H_q, K) tensor, layers in `self.layers` order; empties
        the record for the next forward."""
        missing = [layer for layer in self.layers if layer not in self._recorded]
        if missing:
            raise RuntimeError(
                f"no attention rows were recorded for layers {missing}: their attention did not run through "
                f"{ROW_KERNEL!r} since the last collect() (was the forward run, or was the model's attention "
                "implementation changed after the recorder was set up?)"
            )
        recorded, self._recorded = [self._recorded[layer] for layer in self.layers], {}
        scores, scales, masks = zip(*recorded)
        scaling = scales[0] if len(set(scales)) == 1 else torch.tensor(scales, device=self._rows.device).view(-1, 1, 1, 1)
        return row_softmax(torch.stack(scores), scaling, self._allowed(list(masks)))

    def collect(self) -> dict[int, Tensor]:
        """The rows of the last forward, {layer: (rows, H_q, K)}, every requested layer present; empties the record."""
        return dict(zip(self.layers, self.collect_stacked().unbind(0)))

    def remove(self) -> None:
        for stop in self._stops:
            stop()
        self._stops.clear()

    def __enter__(self) -> "AttentionRows":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()
