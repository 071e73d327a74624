"""SADR: Selective Attention Drift Restriction (method.md §3) as a δ-optimisation regularizer.

For each rewrite prompt j and layer ℓ after the injection layer, the attention rows W* of the last prompt
token are kept close (KL) to the unedited rows W, but only for the heads that now attend to the subject's
last token more than any head did before the edit (or for every head with `heads: all`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from sadr.conf.schema import Divergence, SadrHeads
from sadr.errors import InvalidSettingError
from sadr.models.adapters import ModelAdapter
from sadr.regularizers.attention_rows import AttentionRows
from sadr.regularizers.base import DeltaBatch, DeltaRegularizer


def select_heads(reference: Tensor, current: Tensor, subject_positions: Tensor) -> Tensor:
    """H = {h : W*[h, s] > max_h' W[h', s]} per row: (N, H) bool, outside autograd.

    reference and current are (N, H, T) attention rows, subject_positions (N,).
    """
    with torch.no_grad():
        rows = torch.arange(reference.shape[0], device=reference.device)
        before = reference[rows, :, subject_positions].amax(dim=-1)  # (N,)
        return current[rows, :, subject_positions] > before[:, None]


def head_kl(reference: Tensor, current: Tensor, key_mask: Tensor, epsilon: float) -> Tensor:
    """KL(W + ε ‖ W* + ε) of every row and head over the non-padded keys: (N, H), in at least float32."""
    dtype = torch.promote_types(current.dtype, torch.float32)
    p = reference.to(dtype) + epsilon
    q = current.to(dtype) + epsilon
    terms = p * (p.log() - q.log())
    return torch.where(key_mask.bool()[:, None, :], terms, 0.0).sum(dim=-1)


class SelectiveAttentionDriftRegularizer(DeltaRegularizer):
    """L_SADR = (1/N) Σ_j Σ_ℓ Σ_{h ∈ H_ℓ,j} KL(W^{ℓ,h}_j ‖ W*^{ℓ,h}_j) over the N rewrite prompts.

    The reference rows W come from the step-0 forward (δ = 0) and stay frozen; the selection H is
    recomputed every step. `layers=None` means every layer after the injection layer; given layers at
    or before it are dropped (δ cannot change them). After each `loss()`, `selected[layer]` holds the
    (N, H) selection that was used (kept after `detach()` for logging), and the diagnostics hold
    `selected_head_counts`: per layer and head (every layer, zeros where SADR does not act), the number
    of rewrite prompts whose selection held the head, so after the last step the map is the final δ's.
    """

    def __init__(
        self,
        weight: float,
        heads: SadrHeads | str = SadrHeads.selective,
        layers: Optional[Sequence[int]] = None,
        epsilon: float = 1e-8,
        in_stop_rule: bool = True,
    ) -> None:
        self.weight = float(weight)
        self.in_stop_rule = bool(in_stop_rule)
        self.selective = SadrHeads(heads) is SadrHeads.selective
        self.layers = None if layers is None else sorted(set(layers))
        self.epsilon = float(epsilon)
        self.selected: dict[int, Tensor] = {}
        self._recorder: Optional[AttentionRows] = None
        self._reference: Optional[dict[int, Tensor]] = None
        self._diagnostics: list[dict] = []  # per request
        self._n_layers = 0

    def attach(self, model: nn.Module, adapter: ModelAdapter, batch: DeltaBatch) -> None:
        self.detach()
        self.selected, self._diagnostics = {}, []
        self._cases = batch.case_slices()
        self._n_layers = adapter.num_layers(model)
        layers = self._active_layers(self._n_layers, batch.injection_layer)
        device = next(model.parameters()).device
        rows = batch.rewrite_rows.cpu()
        self._subjects = batch.subject_positions.cpu()[rows].to(device)
        self._key_mask = batch.attention_mask.cpu()[rows].to(device)
        self._recorder = AttentionRows(
            model, adapter, layers, batch.last_prompt_positions.cpu()[rows], batch.attention_mask, batch_rows=rows
        )

    def _active_layers(self, n_layers: int, injection_layer: int) -> list[int]:
        if self.layers is None:
            layers = list(range(injection_layer + 1, n_layers))
        else:
            out_of_range = [layer for layer in self.layers if not 0 <= layer < n_layers]
            if out_of_range:
                raise InvalidSettingError(f"sadr.layers {out_of_range} out of range: the model has layers 0..{n_layers - 1}")
            layers = [layer for layer in self.layers if layer > injection_layer]
        if not layers:
            raise InvalidSettingError(
                f"sadr.layers selects no layer after the injection layer {injection_layer} "
                f"(the model has layers 0..{n_layers - 1}); δ cannot change attention at or before it"
            )
        return layers

    def loss(self, step: int) -> Tensor:
        (term,) = self.case_losses(step)
        return term

    def case_losses(self, step: int) -> list[Tensor]:
        """L_SADR of each request, over its own rewrite prompts (rows never mix, so one request's term is the same
        whether it is optimised alone or with others)."""
        if self._recorder is None:
            raise RuntimeError("SelectiveAttentionDriftRegularizer.loss() called before attach()")
        if step != 0 and self._reference is None:
            raise RuntimeError("the step-0 (δ = 0) forward must come first: it records the reference rows")
        current = self._recorder.collect()
        if step == 0:
            return self._record_reference(current)
        totals = [0.0] * len(self._cases)
        for layer, rows in current.items():
            reference = self._reference[layer]
            if self.selective:
                selected = select_heads(reference, rows, self._subjects)
            else:
                selected = torch.ones(rows.shape[:2], dtype=torch.bool, device=rows.device)
            kl = torch.where(selected, head_kl(reference, rows, self._key_mask, self.epsilon), 0.0)
            totals = [total + kl[case].sum() for total, case in zip(totals, self._cases)]
            self.selected[layer] = selected
        losses = [total / (case.stop - case.start) for total, case in zip(totals, self._cases)]
        self._diagnostics = [{
            "selected_heads": float(sum(int(s[case].sum()) for s in self.selected.values())),
            "loss": float(loss.detach()),
            "selected_head_counts": self._selected_head_counts(case),
        } for loss, case in zip(losses, self._cases)]
        return losses

    def _selected_head_counts(self, case: slice) -> list[list[int]]:
        """layers × heads: how many of the request's rewrite prompts selected each head (0 in layers SADR does not act on)."""
        n_heads = next(iter(self.selected.values())).shape[1]
        return [self.selected[layer][case].sum(dim=0).tolist() if layer in self.selected else [0] * n_heads
                for layer in range(self._n_layers)]

    def _record_reference(self, current: dict[int, Tensor]) -> list[Tensor]:
        """δ = 0: these rows are the unedited reference W; W* = W, so the loss is exactly 0 (no head selected)."""
        self._reference = {layer: rows.detach() for layer, rows in current.items()}
        self.selected = {layer: torch.zeros_like(rows[:, :, 0], dtype=torch.bool) for layer, rows in current.items()}
        self._diagnostics = [{"selected_heads": 0.0, "loss": 0.0, "selected_head_counts": self._selected_head_counts(case)}
                             for case in self._cases]
        zero = sum(rows.sum() for rows in current.values()) * 0.0  # in the graph, so backward() still works
        return [zero] * len(self._cases)

    def detach(self) -> None:
        if self._recorder is not None:
            self._recorder.remove()
        self._recorder = None
        self._reference = None

    def diagnostics(self) -> dict:
        if len(self._diagnostics) > 1:
            raise ValueError(f"{len(self._diagnostics)} requests share this optimisation: read case_diagnostics()")
        return dict(self._diagnostics[0]) if self._diagnostics else {}

    def case_diagnostics(self) -> list[dict]:
        return [dict(d) for d in self._diagnostics]


def _get(cfg: Any, key: str) -> Any:
    return cfg[key] if isinstance(cfg, Mapping) else getattr(cfg, key)


def build_regularizers(sadr_cfg: Any) -> list[DeltaRegularizer]:
    """The regularizers a `sadr` config asks for: none when γ = 0, so the plain editor runs bit for bit."""
    gamma = _get(sadr_cfg, "lambda")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
        raise InvalidSettingError(f"sadr.lambda must be a finite number >= 0 (γ; 0 disables SADR), got {gamma!r}")
    epsilon = _get(sadr_cfg, "epsilon")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon <= 0:
        raise InvalidSettingError(f"sadr.epsilon must be a finite number > 0 (added to both distributions), got {epsilon!r}")
    heads = _enum(SadrHeads, _get(sadr_cfg, "heads"), "sadr.heads")
    _enum(Divergence, _get(sadr_cfg, "divergence"), "sadr.divergence")
    layers = _get(sadr_cfg, "layers")
    if layers is not None:
        layers = list(layers)
        if not layers or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers):
            raise InvalidSettingError(f"sadr.layers must be null or a non-empty list of layer indices >= 0, got {layers!r}")
    in_stop_rule = _get(sadr_cfg, "in_stop_rule")
    if not isinstance(in_stop_rule, bool):
        raise InvalidSettingError(f"sadr.in_stop_rule must be true or false, got {in_stop_rule!r}")
    if gamma == 0:
        return []
    return [SelectiveAttentionDriftRegularizer(weight=gamma, heads=heads, layers=layers, epsilon=epsilon,
                                               in_stop_rule=in_stop_rule)]


def _enum(enum: type, value: Any, key: str):
    try:
        return enum(value)
    except ValueError:
        raise InvalidSettingError(f"{key} must be one of {[m.value for m in enum]}, got {value!r}") from None
