"""SADR: Selective Attention Drift Restriction (method.md §3) as a δ-optimisation regularizer.

For each rewrite prompt j and layer ℓ after the injection layer, the attention rows W* of the last prompt
token are kept close (KL) to the unedited rows W, but only for the heads that now attend to the subject's
last token more than any head did before the edit (or for every head with `heads: all`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from sadr.conf.schema import SadrHeads
from sadr.errors import InvalidSettingError
from sadr.models.adapters import ModelAdapter
from sadr.regularizers.attention_rows import AttentionRows
from sadr.regularizers.base import DeltaBatch, DeltaRegularizer


def select_heads(reference: Tensor, current: Tensor, subject_keys: Tensor) -> Tensor:
    """H = {h : W*[h, s] > max_h' W[h', s]} per row: (N, H) bool, outside autograd.

    reference and current are (N, H, K) attention rows, subject_keys (N,) the subject's key index in each row.
    """
    with torch.no_grad():
        rows = torch.arange(reference.shape[0], device=reference.device)
        before = reference[rows, :, subject_keys].amax(dim=-1)  # (N,)
        return current[rows, :, subject_keys] > before[:, None]


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
        self._recorder: Optional[AttentionRows] = None
        self._reference: Optional[Tensor] = None  # (active layers, rows, heads, keys): the δ = 0 rows
        self._active: list[int] = []
        self._selection: Optional[Tensor] = None  # (active layers, rows, heads) bool: the last step's selection
        self._losses: Optional[Tensor] = None  # (requests,): the last step's terms
        self._n_layers = 0
        self._model: Optional[nn.Module] = None
        self._adapter: Optional[ModelAdapter] = None

    def attach(self, model: nn.Module, adapter: ModelAdapter, batch: DeltaBatch) -> None:
        self.detach()
        self._selection, self._losses = None, None
        self._model, self._adapter = model, adapter
        self._n_layers = adapter.num_layers(model)
        self._active = self._active_layers(self._n_layers, batch.injection_layer)
        self._bind(batch)

    def keep_cases(self, kept: Sequence[int], batch: DeltaBatch) -> None:
        """The kept requests' reference rows and last selection, cut to the new batch's keys (those dropped at the end
        are padding in every kept row, so their reference weight is 0), and the hooks rebuilt for it."""
        if self._reference is None:
            raise RuntimeError("keep_cases() before the step-0 forward: there are no reference rows to keep yet")
        kept = torch.as_tensor(list(kept), device=self._row_case.device)
        rows = torch.isin(self._row_case, kept)
        reference = self._reference[:, rows, :, : batch.attention_mask.shape[1]]
        selection, losses = self._selection[:, rows], self._losses[kept]
        self._bind(batch)
        self._reference = reference
        self._keep(selection, losses)

    def _bind(self, batch: DeltaBatch) -> None:
        """Which rewrite row is whose, and the attention-row hooks, for `batch`."""
        if self._recorder is not None:
            self._recorder.remove()
        model, adapter = self._model, self._adapter
        device = next(model.parameters()).device
        rows = batch.rewrite_rows.cpu()
        self._subjects = batch.subject_keys.cpu()[rows].to(device)
        self._key_mask = batch.attention_mask.cpu()[rows].to(device)
        cases = batch.case_slices()
        self._row_case = torch.cat([torch.full((case.stop - case.start,), index) for index, case in enumerate(cases)]).to(device)
        self._rows_per_case = torch.tensor([case.stop - case.start for case in cases], dtype=torch.float32, device=device)
        self._recorder = AttentionRows(
            model, adapter, self._active, batch.last_prompt_positions.cpu()[rows], batch.attention_mask, batch_rows=rows,
            cached_keys=batch.cached_keys,
        )

    def reads_cached_prefix(self) -> bool:
        """Yes: the attention kernel is handed every key, cached ones included, and where queries and keys are rebuilt
        from the projections (`legacy_attention`), the keys are read from the cache the forward was handed."""
        return True

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
        whether it is optimised alone or with others).

        Every active layer is computed at once (their rows stacked), and nothing is read back to the host: the
        diagnostics are made from the kept selection when asked for, so a step costs a few kernels on a GPU.
        """
        if self._recorder is None:
            raise RuntimeError("SelectiveAttentionDriftRegularizer.loss() called before attach()")
        if step != 0 and self._reference is None:
            raise RuntimeError("the step-0 (δ = 0) forward must come first: it records the reference rows")
        current = self._recorder.collect_stacked()  # (layers, rows, heads, keys)
        if step == 0:
            return self._record_reference(current)
        n_layers, n_rows, n_heads = current.shape[:3]
        reference, rows = self._reference.flatten(0, 1), current.flatten(0, 1)
        subjects, key_mask = self._subjects.repeat(n_layers), self._key_mask.repeat(n_layers, 1)
        if self.selective:
            selected = select_heads(reference, rows, subjects)
        else:
            selected = torch.ones(rows.shape[:2], dtype=torch.bool, device=rows.device)
        kl = torch.where(selected, head_kl(reference, rows, key_mask, self.epsilon), 0.0)
        per_row = kl.view(n_layers, n_rows, n_heads).sum(dim=(0, 2))
        totals = torch.zeros(len(self._rows_per_case), dtype=per_row.dtype, device=per_row.device).index_add(0, self._row_case, per_row)
        losses = totals / self._rows_per_case
        self._keep(selected.view(n_layers, n_rows, n_heads), losses.detach())
        return list(losses.unbind())

    def _keep(self, selection: Tensor, losses: Tensor) -> None:
        self._selection, self._losses = selection, losses

    @property
    def selected(self) -> dict[int, Tensor]:
        """layer -> the (rows, heads) selection of the last step (kept after `detach()`); {} before the first step."""
        if self._selection is None:
            return {}
        return {layer: self._selection[i] for i, layer in enumerate(self._active)}

    def _record_reference(self, current: Tensor) -> list[Tensor]:
        """δ = 0: these rows are the unedited reference W; W* = W, so the loss is exactly 0 (no head selected)."""
        self._reference = current.detach()
        self._keep(torch.zeros(current.shape[:3], dtype=torch.bool, device=current.device),
                   torch.zeros(len(self._rows_per_case), device=current.device))
        zero = current.sum() * 0.0  # in the graph, so backward() still works
        return [zero] * len(self._rows_per_case)

    def detach(self) -> None:
        if self._recorder is not None:
            self._recorder.remove()
        self._recorder = None
        self._reference = None
        self._model = self._adapter = None

    def diagnostics(self) -> dict:
        diagnostics = self.case_diagnostics()
        if len(diagnostics) > 1:
            raise ValueError(f"{len(diagnostics)} requests share this optimisation: read case_diagnostics()")
        return diagnostics[0] if diagnostics else {}

    def case_diagnostics(self) -> list[dict]:
        """Per request, after the last step: its term (`loss`), how many (row, layer, head) triples were selected
        (`selected_heads`), and `selected_head_counts`, layers × heads (every layer; 0 where SADR does not act), how
        many of its rewrite prompts selected each head."""
        if self._selection is None:
            return []
        n_layers, _, n_heads = self._selection.shape
        per_case = torch.zeros(n_layers, len(self._rows_per_case), n_heads, device=self._selection.device)
        per_case.index_add_(1, self._row_case, self._selection.float())
        counts = torch.zeros(self._n_layers, len(self._rows_per_case), n_heads, device=per_case.device)
        counts[self._active] = per_case
        counts = counts.transpose(0, 1).round().long().tolist()
        return [{"selected_heads": float(sum(map(sum, case))), "loss": loss, "selected_head_counts": case}
                for case, loss in zip(counts, self._losses.tolist())]


def build_regularizers(sadr_cfg: DictConfig) -> list[DeltaRegularizer]:
    """The regularizers the typed `sadr` node asks for (its values checked by `sadr.conf.validation.validate`):
    none when γ = 0, so the plain editor runs bit for bit."""
    if sadr_cfg["lambda"] == 0:
        return []
    layers = None if sadr_cfg.layers is None else list(sadr_cfg.layers)
    return [SelectiveAttentionDriftRegularizer(weight=sadr_cfg["lambda"], heads=sadr_cfg.heads, layers=layers,
                                               epsilon=sadr_cfg.epsilon, in_stop_rule=sadr_cfg.in_stop_rule)]
