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


def attention_row(query: Tensor, key: Tensor, scaling: float, query_positions: Tensor, allowed: Tensor) -> Tensor:
    """softmax(q_t Kᵀ · scaling) over the allowed keys, for every query head.

    query (B, H_q, T, D), key (B, H_kv, T, D) with H_q a multiple of H_kv (query head h reads key head
    h // (H_q / H_kv), as `repeat_kv` does); query_positions (B,); allowed (B, T) bool.
    Returns (B, H_q, T) in at least float32, zero on disallowed keys.
    """
    dtype = torch.promote_types(query.dtype, torch.float32)
    batch, n_query_heads, _, head_dim = query.shape
    n_kv_heads = key.shape[1]
    # gather, not advanced indexing: its backward is a scatter-add, where indexing's is an accumulating index_put
    # (sorted indices on a GPU), and the δ-step runs it on every layer
    at = query_positions.view(batch, 1, 1, 1).expand(batch, n_query_heads, 1, head_dim)
    q_t = query.gather(2, at).squeeze(2)  # (B, H_q, D)
    q_t = q_t.to(dtype).reshape(batch, n_kv_heads, n_query_heads // n_kv_heads, head_dim)
    scores = torch.einsum("bgrd,bgkd->bgrk", q_t, key.to(dtype)).flatten(1, 2) * scaling
    scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
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

    After a forward, `collect()` returns {layer: (len(batch_rows), H_q, K)} in at least float32, in the autograd graph
    of that forward. The recorder expects the batch it was built for: `attention_mask` (B, K) marks its real keys,
    `batch_rows` the rows wanted (all by default) and `query_positions[i]` the input position of `batch_rows[i]`'s
    query. With `cached_keys` > 0 the forward is fed only the tokens after a cached prefix: key k < cached_keys came
    from the cache and input position t is key cached_keys + t (the δ-optimiser's layout, `DeltaBatch`).
    Use as a context manager or `remove()`.
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
        self.rows: dict[int, Tensor] = {}
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
            allowed = allowed_keys(self._padding, self._positions, kernel_mask, self._rows, self._cached_keys)
            rows = self._rows  # index_select: its backward adds into the gradient, without sorting (see attention_row)
            self.rows[layer] = attention_row(query.index_select(0, rows), key.index_select(0, rows), scale,
                                             self._positions, allowed)

        return record

    def collect(self) -> dict[int, Tensor]:
        """The rows of the last forward, every requested layer present; empties the record for the next forward."""
        missing = [layer for layer in self.layers if layer not in self.rows]
        if missing:
            raise RuntimeError(
                f"no attention rows were recorded for layers {missing}: their attention did not run through "
                f"{ROW_KERNEL!r} since the last collect() (was the forward run, or was the model's attention "
                "implementation changed after the recorder was set up?)"
            )
        rows, self.rows = self.rows, {}
        return rows

    def remove(self) -> None:
        for stop in self._stops:
            stop()
        self._stops.clear()

    def __enter__(self) -> "AttentionRows":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()
