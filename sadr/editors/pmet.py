"""PMET (Li et al., 2024): MEMIT with the attention and MLP contributions told apart (method.md §2).

Two perturbations at the last edited layer l_m are optimised together: one on the attention output
projection and one on the MLP output (each clamped and decayed relative to its own initial output).
Only the MLP down-projections are written, and the target they must produce is the *MLP-output*
component: z_mlp = (MLP output of l_m at the bare prompt's subject token, δ = 0) + δ_mlp, and the residual
of layer lᵢ is z_mlp − (the current MLP output of l_m there), divided by √(m − i). The attention
δ is not written anywhere (PMET's public configs list only the down-projection in `rewrite_module_tmps`):
it lets the optimisation attribute part of the change to attention, so δ_mlp carries only the part the
MLPs should store. The residual stream is never the target: writing it into MLPs would also ask them to
reproduce the attention δ.

The δ-optimisation follows PMET's code: the NLL weight is `nll_loss_factor`, or a tenth of it on the
step after one where the new object was the argmax after every rewrite prompt; it stops when the loss
< 5e-2, or when the object is the argmax and kl_factor · KL ≤ 0.01.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from sadr.editors.delta import StepState, loss_is_small
from sadr.editors.memit import MemitConfig
from sadr.editors.plugin import EditorPlugin
from sadr.editors.spread import SpreadEditor

ARGMAX_NLL_SCALE = 0.1
KL_STOP = 0.01


@dataclass
class PmetConfig(MemitConfig):
    """PMET's defaults; per-model values come from hparams/pmet_<model>.yaml."""

    name: str = "pmet"
    clamp_norm_factor: float = 4.0
    nll_loss_factor: float = 1.0  # NLL weight; a tenth of it once the new object is the argmax


def pmet_rules(nll_loss_factor: float) -> dict:
    def nll_weight(previous: StepState | None) -> float:
        reached = previous is not None and previous.target_is_argmax
        return nll_loss_factor * (ARGMAX_NLL_SCALE if reached else 1.0)

    def should_stop(state: StepState) -> bool:
        return loss_is_small(state) or (state.target_is_argmax and state.kl <= KL_STOP)

    return {"nll_weight": nll_weight, "should_stop": should_stop}


class PmetEditor(SpreadEditor):
    delta_sites = ("attn_out", "mlp_out")
    target_site = "mlp_out"

    @staticmethod
    def divisor(remaining_layers: int) -> float:
        return math.sqrt(remaining_layers)

    def delta_rules(self, hparams) -> dict:
        return pmet_rules(hparams.nll_loss_factor)


EDITOR = EditorPlugin("pmet", PmetConfig, PmetEditor, "PMET (Li et al., 2024): MEMIT with attention and MLP contributions told apart")
