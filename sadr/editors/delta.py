"""The δ-optimisation shared by ROME, MEMIT and PMET.

Perturbations δ (one per injection site) are added at the subject's last token of every prompt; they are
optimised with Adam so the target is likely after every templated rewrite prompt, while the essence
prompt's next-token distribution stays put. Editors differ only in the sites, the NLL weight schedule
and the stop rule, which are parameters here; regularizers (SADR) add terms through `DeltaRegularizer`.
"""
from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable

import torch

from sadr.data.records import EditRequest
from sadr.editors.capture import add_at_positions, capture_outputs, frozen_blocks
from sadr.editors.prompts import DeltaPrompts, encode_delta_prompts
from sadr.models.adapters import ModelAdapter
from sadr.regularizers.base import DeltaBatch, DeltaRegularizer

log = logging.getLogger(__name__)

# Where a δ is added, relative to block `layer`.
SITES: dict[str, Callable[[ModelAdapter, torch.nn.Module, int], torch.nn.Module]] = {
    "mlp_out": lambda adapter, model, layer: adapter.mlp_down_module(model, layer),
    "attn_out": lambda adapter, model, layer: adapter.module(model, adapter.attn_out, layer),
    "block_out": lambda adapter, model, layer: adapter.block(model, layer),
}


@dataclass
class StepState:
    """What a schedule or stop rule may look at after a forward."""

    step: int
    loss: float  # the total loss (NLL weight included), less regularizer terms with in_stop_rule False
    nll: float  # mean NLL of the target over the rewrite prompts, unweighted
    kl: float  # kl_factor · KL of the essence prompts' distribution
    target_is_argmax: bool  # every target token is the argmax after every rewrite prompt


def loss_is_small(state: StepState) -> bool:
    """The stop rule of ROME and MEMIT (and part of PMET's): the total loss is below 5e-2."""
    return state.loss < 5e-2


@dataclass
class DeltaObjective:
    sites: tuple[str, ...]
    layer: int
    steps: int
    lr: float
    weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    loss_layer: int
    # NLL weight for the current step, given the previous step's state (None at step 0).
    nll_weight: Callable[[StepState | None], float] = lambda _previous: 1.0
    # Stop before taking a gradient step.
    should_stop: Callable[[StepState], bool] = loss_is_small

    @classmethod
    def from_hparams(cls, hparams, *, sites: tuple[str, ...], layer: int, **rules) -> "DeltaObjective":
        """The objective an `EditorConfig` describes, for δs at `sites` of block `layer`."""
        return cls(sites=sites, layer=layer, steps=hparams.v_num_grad_steps, lr=hparams.v_lr,
                   weight_decay=hparams.v_weight_decay, clamp_norm_factor=hparams.clamp_norm_factor,
                   kl_factor=hparams.kl_factor, loss_layer=hparams.v_loss_layer, **rules)


@dataclass
class DeltaResult:
    deltas: dict[str, torch.Tensor]  # site -> δ (float32)
    initial: dict[str, torch.Tensor]  # site -> the site's output at the bare prompt's subject token, δ = 0
    steps_run: int
    history: list[StepState] = field(default_factory=list)
    diagnostics: dict = field(default_factory=dict)  # the regularizers': numbers, or small nested lists

    def target(self, site: str) -> torch.Tensor:
        return self.initial[site] + self.deltas[site]


def _kl_edited_from_initial(log_p_edited: torch.Tensor, log_p_initial: torch.Tensor) -> torch.Tensor:
    """KL(P_δ ‖ P₀), averaged over rows, as ROME's code and paper compute the essence term."""
    return (log_p_edited.exp() * (log_p_edited - log_p_initial)).sum(-1).mean()


def optimize_delta(model, adapter: ModelAdapter, tokenizer, request: EditRequest, context_templates: list[str],
                   objective: DeltaObjective, regularizers: list[DeltaRegularizer] = ()) -> DeltaResult:
    device = next(model.parameters()).device
    prompts: DeltaPrompts = encode_delta_prompts(tokenizer, request, context_templates).to(device)
    batch = prompts.batch
    n_rows = batch.input_ids.shape[0]
    rows = torch.arange(n_rows, device=device)
    hidden_size = model.config.hidden_size
    deltas = {site: torch.zeros(hidden_size, device=device, dtype=torch.float32, requires_grad=True) for site in objective.sites}
    optimizer = torch.optim.Adam(list(deltas.values()), lr=objective.lr)

    # Logits are needed only where target tokens are predicted and at the essence prompts' subject token.
    essence = prompts.essence_rows.to(device)
    head_rows = torch.cat([prompts.target_rows, essence])
    head_positions = torch.cat([prompts.target_positions, prompts.subject_positions[essence]])
    n_target_tokens = prompts.target_ids.numel()
    tokens_per_row = torch.bincount(prompts.target_rows, minlength=prompts.n_rewrite).clamp(min=1)
    final_norm = model.get_submodule(adapter.final_norm)
    lm_head = model.get_output_embeddings()

    site_modules = {site: SITES[site](adapter, model, objective.layer) for site in objective.sites}
    loss_block = {objective.loss_layer: adapter.block(model, objective.loss_layer)}
    delta_batch = DeltaBatch(batch.input_ids, batch.attention_mask, torch.arange(prompts.n_rewrite, device=device),
                             prompts.subject_positions, prompts.last_prompt_positions, objective.layer)
    frozen = [adapter.block(model, i) for i in range(objective.layer)]

    initial: dict[str, torch.Tensor] = {}
    history: list[StepState] = []
    log_p_initial = None
    state = None
    with ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        stack.enter_context(frozen_blocks(frozen))
        for site, module in site_modules.items():
            stack.enter_context(add_at_positions(module, rows, prompts.subject_positions,
                                                 lambda d=deltas[site]: d.expand(n_rows, -1)))
        # registered after δ's hooks, so a capture on the same module sees its output with δ added (δ = 0 at step 0)
        site_out = stack.enter_context(capture_outputs(site_modules))
        loss_out = stack.enter_context(capture_outputs(loss_block))
        for reg in regularizers:
            stack.callback(reg.detach)
            reg.attach(model, adapter, delta_batch)
        for step in range(objective.steps):
            optimizer.zero_grad()
            model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            if step == 0:
                initial = {s: site_out[s][0, prompts.subject_positions[0]].detach().float() for s in objective.sites}
            hidden = loss_out[objective.loss_layer][head_rows, head_positions]
            log_probs = lm_head(final_norm(hidden)).float().log_softmax(-1)
            target_lp = log_probs[:n_target_tokens].gather(1, prompts.target_ids[:, None])[:, 0]
            nll_per_row = -torch.zeros(prompts.n_rewrite, device=device).index_add(0, prompts.target_rows, target_lp)
            nll = (nll_per_row / tokens_per_row).mean()
            essence_lp = log_probs[n_target_tokens:]
            if log_p_initial is None:
                log_p_initial = essence_lp.detach()
            kl = objective.kl_factor * _kl_edited_from_initial(essence_lp, log_p_initial)
            decay = sum(objective.weight_decay * deltas[s].norm() / initial[s].norm() ** 2 for s in objective.sites)
            loss = objective.nll_weight(state) * nll + kl + decay
            seen_by_stop = loss.detach()
            for reg in regularizers:
                term = reg.weight * reg.loss(step)
                loss = loss + term
                if reg.in_stop_rule:
                    seen_by_stop = seen_by_stop + term.detach()
            argmax_ok = bool((log_probs[:n_target_tokens].argmax(-1) == prompts.target_ids).all())
            state = StepState(step, seen_by_stop.item(), nll.item(), kl.item(), argmax_ok)
            history.append(state)
            log.debug("δ step %d: loss %.4f nll %.4f kl %.4f", step, state.loss, state.nll, state.kl)
            if objective.should_stop(state) or step == objective.steps - 1:
                break
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for s in objective.sites:
                    max_norm = objective.clamp_norm_factor * initial[s].norm()
                    if deltas[s].norm() > max_norm:
                        deltas[s].mul_(max_norm / deltas[s].norm())
    diagnostics = {k: v for reg in regularizers for k, v in reg.diagnostics().items()}
    return DeltaResult({s: d.detach() for s, d in deltas.items()}, initial, len(history), history, diagnostics)
