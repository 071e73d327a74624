"""MEMIT (Meng et al., 2023): a batch of facts spread over several MLP layers (method.md §2).

Each request's δ is optimised on the residual stream (the block output) at the last edited layer l_m, with
the loss read through the final norm and LM head at `v_loss_layer`; z = that output at the bare prompt's
subject token + δ. The edited layers then share the residual z − (current block output at l_m) one
ridge solve at a time, each taking 1/(m − i) of what is left (see `spread`). As in MEMIT's code, the NLL
weight is 1 throughout (`nll_loss_factor` is PMET's) and the δ-optimisation stops when the loss < 5e-2.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from sadr.conf.schema import EditorConfig
from sadr.editors.plugin import EditorPlugin
from sadr.editors.spread import SpreadEditor


@dataclass
class MemitConfig(EditorConfig):
    """MEMIT's defaults; per-model values come from hparams/memit_<model>.yaml."""

    name: str = "memit"
    # bare prompt + 5 prefixes of <=10 tokens; keys weigh the bare prompt 1/2
    context_templates: List[List[int]] = field(default_factory=lambda: [[10, 5]])
    clamp_norm_factor: float = 0.75
    mom2_update_weight: float = 15000.0  # λ of λC + K Kᵀ: how strongly the update keeps the keys C describes


class MemitEditor(SpreadEditor):
    delta_sites = ("block_out",)
    target_site = "block_out"

    @staticmethod
    def divisor(remaining_layers: int) -> float:
        return float(remaining_layers)


EDITOR = EditorPlugin("memit", MemitConfig, MemitEditor, "MEMIT (Meng et al., 2023): a batch of facts spread over several MLP layers")
