"""The δ-optimisation shared by ROME, MEMIT and PMET.

Perturbations δ (one per injection site) are added at the subject's last token of every prompt; they are
optimised with Adam so the target is likely after every templated rewrite prompt, while the essence
prompt's next-token distribution stays put. Editors differ only in the sites, the NLL weight schedule
and the stop rule, which are parameters here; regularizers (SADR) add terms through `DeltaRegularizer`.
Each prompt's tokens before δ's position run once; every step feeds only the rest (`prefix_cache.py`).
"""
from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from sadr.data.records import EditRequest
from sadr.editors.capture import add_at_positions, capture_outputs, frozen_blocks
from sadr.editors.delta_checkpoint import kept_or_optimised
from sadr.editors.prefix_cache import PrefixCache, split_rows
from sadr.editors.prompts import DeltaPrompts, StackedDeltaPrompts, encode_delta_prompts, stack_delta_prompts
from sadr.errors import InvalidSettingError
from sadr.models.adapters import ModelAdapter
from sadr.models.tokenization import pad_id_of
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


def never_stop(_state: StepState) -> bool:
    """`editor.early_stop=false`: every δ runs all its steps."""
    return False


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
    # feed each step only the tokens from δ's position to the last one read, the earlier ones cached (prefix_cache.py)
    prefix_cache: bool = True
    # NLL weight for the current step, given the previous step's state (None at step 0).
    nll_weight: Callable[[StepState | None], float] = lambda _previous: 1.0
    # Stop before taking a gradient step.
    should_stop: Callable[[StepState], bool] = loss_is_small

    @classmethod
    def from_hparams(cls, hparams, *, sites: tuple[str, ...], layer: int, **rules) -> "DeltaObjective":
        """The objective an `EditorConfig` describes, for δs at `sites` of block `layer` (with `early_stop` false, a
        stop rule in `rules` is replaced by one that never stops)."""
        if not hparams.early_stop:
            rules = {**rules, "should_stop": never_stop}
        return cls(sites=sites, layer=layer, steps=hparams.v_num_grad_steps, lr=hparams.v_lr,
                   weight_decay=hparams.v_weight_decay, clamp_norm_factor=hparams.clamp_norm_factor,
                   kl_factor=hparams.kl_factor, loss_layer=hparams.v_loss_layer, prefix_cache=hparams.prefix_cache,
                   **rules)


@dataclass
class DeltaResult:
    deltas: dict[str, torch.Tensor]  # site -> δ (float32)
    initial: dict[str, torch.Tensor]  # site -> the site's output at the bare prompt's subject token, δ = 0
    steps_run: int
    history: list[StepState] = field(default_factory=list)
    diagnostics: dict = field(default_factory=dict)  # the regularizers': numbers, or small nested lists

    def target(self, site: str) -> torch.Tensor:
        return self.initial[site] + self.deltas[site]

    def as_plain(self) -> dict:
        """Tensors (on the host), numbers, lists and dicts only: what `torch.load(weights_only=True)` reads back."""
        return {"deltas": {site: d.cpu() for site, d in self.deltas.items()},
                "initial": {site: v.cpu() for site, v in self.initial.items()}, "steps_run": self.steps_run,
                "history": [asdict(state) for state in self.history], "diagnostics": self.diagnostics}

    @classmethod
    def from_plain(cls, plain: dict, device: torch.device) -> "DeltaResult":
        return cls({site: d.to(device) for site, d in plain["deltas"].items()},
                   {site: v.to(device) for site, v in plain["initial"].items()}, plain["steps_run"],
                   [StepState(**state) for state in plain["history"]], plain["diagnostics"])


def delta_diagnostics(results: list[DeltaResult]) -> dict:
    """The δ-optimisation's numbers of the requests of one edit (steps, final loss, the regularizers'), each averaged
    over them: what the rows of a batch report, since they share one edit."""
    names = {name for r in results for name in r.diagnostics}
    return {
        "delta_steps": _mean([r.steps_run for r in results]),
        "delta_final_loss": _mean([r.history[-1].loss for r in results]),
        **{name: _mean([r.diagnostics[name] for r in results if name in r.diagnostics]) for name in sorted(names)},
    }


def _mean(values: list):
    """The mean of numbers, or the elementwise mean of equally shaped nested lists (SADR's head counts)."""
    return torch.tensor(values, dtype=torch.float64).mean(dim=0).tolist()


def _kl_edited_from_initial(log_p_edited: torch.Tensor, log_p_initial: torch.Tensor) -> torch.Tensor:
    """KL(P_δ ‖ P₀), averaged over rows, as ROME's code and paper compute the essence term."""
    return (log_p_edited.exp() * (log_p_edited - log_p_initial)).sum(-1).mean()


def optimize_delta(model, adapter: ModelAdapter, tokenizer, request: EditRequest, context_templates: list[str],
                   objective: DeltaObjective, regularizers: list[DeltaRegularizer] = ()) -> DeltaResult:
    """The δ of one request (`optimize_deltas` of a batch of one); within `resumable_deltas`, kept in the run
    directory, or read back from it (`delta_checkpoint.py`)."""
    device = next(model.parameters()).device
    return kept_or_optimised(request, lambda: optimize_deltas(model, adapter, tokenizer, [request], context_templates,
                                                              objective, regularizers)[0],
                             DeltaResult.as_plain, lambda plain: DeltaResult.from_plain(plain, device))


@dataclass
class _Case:
    """One request of a shared δ-optimisation: its prompts, its δs and its own optimisation state."""

    number: int  # its place among the requests
    prompts: DeltaPrompts  # with row indices local to its block
    deltas: dict[str, torch.Tensor]
    tokens_per_row: torch.Tensor
    initial: dict[str, torch.Tensor] = field(default_factory=dict)
    log_p_initial: torch.Tensor | None = None
    history: list[StepState] = field(default_factory=list)
    diagnostics: dict = field(default_factory=dict)
    done: bool = False

    @property
    def n_rows(self) -> int:
        return self.prompts.batch.input_ids.shape[0]

    @property
    def n_head(self) -> int:
        """Its rows of the LM-head output: one per target token, then one per essence prompt."""
        return self.prompts.target_ids.numel() + len(self.prompts.essence_rows)

    @property
    def previous(self) -> StepState | None:
        return self.history[-1] if self.history else None


def _cases(stacked: StackedDeltaPrompts, sites: tuple[str, ...], hidden_size: int, device) -> list[_Case]:
    return [_Case(number=i, prompts=prompts,
                  deltas={s: torch.zeros(hidden_size, device=device, dtype=torch.float32, requires_grad=True) for s in sites},
                  tokens_per_row=torch.bincount(prompts.target_rows, minlength=prompts.n_rewrite).clamp(min=1))
            for i, prompts in enumerate(stacked.cases)]


def _row_starts(cases: list[_Case]) -> list[int]:
    """Each request's first row when their blocks follow each other."""
    return [sum(c.n_rows for c in cases[:i]) for i in range(len(cases))]


def _head_reads(cases: list[_Case], starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and whole-row positions whose logits the loss reads: where target tokens are predicted, and the essence
    prompts' subject token; request after request."""
    rows = torch.cat([start + torch.cat([c.prompts.target_rows, c.prompts.essence_rows.to(c.prompts.target_rows.device)])
                      for c, start in zip(cases, starts)])
    positions = torch.cat([torch.cat([c.prompts.target_positions, c.prompts.subject_positions[c.prompts.essence_rows]])
                           for c in cases])
    return rows, positions


def _case_loss(case: _Case, log_probs: torch.Tensor, objective: DeltaObjective):
    """The request's editor loss (NLL weight included), its NLL, its weighted KL, and whether every target is the argmax."""
    prompts = case.prompts
    n_target_tokens = prompts.target_ids.numel()
    target_lp = log_probs[:n_target_tokens].gather(1, prompts.target_ids[:, None])[:, 0]
    nll_per_row = -torch.zeros(prompts.n_rewrite, device=log_probs.device).index_add(0, prompts.target_rows, target_lp)
    nll = (nll_per_row / case.tokens_per_row).mean()
    essence_lp = log_probs[n_target_tokens:]
    if case.log_p_initial is None:
        case.log_p_initial = essence_lp.detach()
    kl = objective.kl_factor * _kl_edited_from_initial(essence_lp, case.log_p_initial)
    decay = sum(objective.weight_decay * case.deltas[s].norm() / case.initial[s].norm() ** 2 for s in objective.sites)
    loss = objective.nll_weight(case.previous) * nll + kl + decay
    argmax_ok = (log_probs[:n_target_tokens].argmax(-1) == prompts.target_ids).all()
    return loss, nll, kl, argmax_ok


class _LiveRows:
    """The batch of the requests still being optimised, and where a step writes δ and reads the loss in it.

    It starts with every request; when some stop, `keep` makes the batch of the others out of this one (their rows,
    their cached prefix keys and values), so a stopped request's rows cost nothing more.
    """

    def __init__(self, cases: list[_Case], prefix: PrefixCache, subject_positions: torch.Tensor,
                 last_prompt_positions: torch.Tensor, injection_layer: int):
        self.cases, self.prefix = cases, prefix
        self._subject_positions, self._last_prompt_positions = subject_positions, last_prompt_positions
        self._injection_layer = injection_layer
        split = prefix.split
        device = subject_positions.device
        self.starts = _row_starts(cases)
        self.rows = torch.arange(split.suffix_ids.shape[0], device=device)
        head_starts = [sum(c.n_head for c in cases[:i]) for i in range(len(cases))]
        self.heads = [slice(start, start + c.n_head) for c, start in zip(cases, head_starts)]
        head_rows, head_positions = _head_reads(cases, self.starts)
        self.head_rows, self.head_positions = head_rows, split.in_suffix(head_rows, head_positions)
        self.delta_positions = split.in_suffix(self.rows, subject_positions)
        self.delta_batch = DeltaBatch(
            split.suffix_ids, split.key_mask,
            torch.cat([start + torch.arange(c.prompts.n_rewrite, device=device) for c, start in zip(cases, self.starts)]),
            split.key_index(self.rows, subject_positions),
            split.in_suffix(self.rows, last_prompt_positions),
            injection_layer, rewrite_rows_per_case=tuple(c.prompts.n_rewrite for c in cases), cached_keys=split.width,
        )

    def deltas(self, site: str) -> torch.Tensor:
        """(rows, d): each row's request's δ at `site`."""
        return torch.cat([c.deltas[site].expand(c.n_rows, -1) for c in self.cases])

    def keep(self, kept: list[int]) -> "_LiveRows":
        rows = torch.cat([torch.arange(self.starts[k], self.starts[k] + self.cases[k].n_rows) for k in kept]).to(self.rows.device)
        return _LiveRows([self.cases[k] for k in kept], self.prefix.select(rows), self._subject_positions[rows],
                         self._last_prompt_positions[rows], self._injection_layer)


def optimize_deltas(model, adapter: ModelAdapter, tokenizer, requests: list[EditRequest], context_templates: list[str],
                    objective: DeltaObjective, regularizers: list[DeltaRegularizer] = ()) -> list[DeltaResult]:
    """Each request's own δ on the model as it is, the requests' prompts sharing every forward.

    The requests are independent: rows of one batch do not interact, the loss backpropagated is the sum of the
    requests' losses (so each δ gets its own request's gradient) and Adam is element-wise, so each δ takes the
    steps it would take alone, up to float rounding of the wider batch. Each request has its own NLL schedule,
    clamp and stop rule; once it stops, its δ is frozen and its rows leave the batch while the others go on. A
    single request runs exactly as it always did.
    """
    device = next(model.parameters()).device
    stacked = stack_delta_prompts([encode_delta_prompts(tokenizer, r, context_templates) for r in requests],
                                  pad_id_of(tokenizer)).to(device)
    batch = stacked.batch
    cases = _cases(stacked, objective.sites, model.config.hidden_size, device)
    optimizer = torch.optim.Adam([d for case in cases for d in case.deltas.values()], lr=objective.lr)
    subject_positions = torch.cat([c.prompts.subject_positions for c in cases])
    last_prompt_positions = torch.cat([c.prompts.last_prompt_positions for c in cases])
    if _reuse_prefix(model, objective, regularizers, batch):
        # from δ's position to the last one read: a logit, or the last prompt token (SADR's query)
        head_rows, head_positions = _head_reads(cases, stacked.starts)
        last_read = torch.maximum(subject_positions, last_prompt_positions).scatter_reduce(0, head_rows, head_positions, "amax")
        split = split_rows(batch.input_ids, batch.attention_mask, subject_positions, pad_id_of(tokenizer), last_read + 1)
    else:
        split = split_rows(batch.input_ids, batch.attention_mask, torch.zeros_like(subject_positions), pad_id_of(tokenizer))
    # the prefix forward comes before any hook: it is not a step
    live = _LiveRows(cases, PrefixCache(model, split), subject_positions, last_prompt_positions, objective.layer)
    final_norm = model.get_submodule(adapter.final_norm)
    lm_head = model.get_output_embeddings()
    site_modules = {site: SITES[site](adapter, model, objective.layer) for site in objective.sites}
    loss_block = {objective.loss_layer: adapter.block(model, objective.loss_layer)}
    frozen = [adapter.block(model, i) for i in range(objective.layer)]

    step, kept = 0, None  # kept: which of the previous batch's requests go on in this one (None: the first batch)
    with ExitStack() as run:
        run.enter_context(torch.enable_grad())
        for reg in regularizers:
            run.callback(reg.detach)
        while True:
            with ExitStack() as stack:  # hooks for this batch's rows
                stack.enter_context(frozen_blocks(frozen))
                for site, module in site_modules.items():
                    stack.enter_context(add_at_positions(module, live.rows, live.delta_positions,
                                                         lambda site=site, live=live: live.deltas(site)))
                # registered after δ's hooks, so a capture on the same module sees its output with δ added
                site_out = stack.enter_context(capture_outputs(site_modules))
                loss_out = stack.enter_context(capture_outputs(loss_block))
                for reg in regularizers:
                    if kept is None:
                        reg.attach(model, adapter, live.delta_batch)
                        reg.attached = True
                    else:
                        reg.keep_cases(kept, live.delta_batch)
                kept = _steps(model, live, optimizer, objective, regularizers, site_out, loss_out,
                              lambda hidden: lm_head(final_norm(hidden)), step)
            if not kept:
                break
            step = len(live.cases[kept[0]].history)
            live = live.keep(kept)
    return [DeltaResult({s: d.detach() for s, d in c.deltas.items()}, c.initial, len(c.history), c.history, c.diagnostics)
            for c in cases]


def _steps(model, live: _LiveRows, optimizer, objective: DeltaObjective, regularizers, site_out, loss_out, head,
           first_step: int) -> list[int]:
    """Steps from `first_step` on with the batch `live`, until a request stops or the steps run out; the positions in
    `live.cases` of the requests that go on (none at the end)."""
    cases = live.cases
    for step in range(first_step, objective.steps):
        optimizer.zero_grad()
        model.base_model(**live.prefix.forward_inputs())
        if step == 0:
            for c, start in zip(cases, live.starts):
                c.initial = {s: site_out[s][start, live.delta_positions[start]].detach().float() for s in objective.sites}
        hidden = loss_out[objective.loss_layer][live.head_rows, live.head_positions]
        log_probs = head(hidden).float().log_softmax(-1)
        terms = [_regularizer_terms(reg, step, len(cases)) for reg in regularizers]
        losses, summaries = [], []
        for k, case in enumerate(cases):
            loss, nll, kl, argmax_ok = _case_loss(case, log_probs[live.heads[k]], objective)
            seen_by_stop = loss.detach()
            for reg, reg_terms in zip(regularizers, terms):
                term = reg.weight * reg_terms[k]
                loss = loss + term
                if reg.in_stop_rule:
                    seen_by_stop = seen_by_stop + term.detach()
            losses.append(loss)
            summaries.append(torch.stack([seen_by_stop, nll, kl, argmax_ok.float()]))
        still = []  # positions in `cases` of the requests that go on
        for k, (seen, nll, kl, argmax_ok) in enumerate(torch.stack(summaries).tolist()):
            case = cases[k]
            state = StepState(step, seen, nll, kl, argmax_ok == 1.0)
            case.history.append(state)
            log.debug("δ %d step %d: loss %.4f nll %.4f kl %.4f", case.number, step, state.loss, state.nll, state.kl)
            if objective.should_stop(state) or step == objective.steps - 1:
                case.done = True
                case.diagnostics = {name: value for reg in regularizers for name, value in reg.case_diagnostics()[k].items()}
            else:
                still.append(k)
        if not still:
            return []
        torch.stack([losses[k] for k in still]).sum().backward()
        for case in cases:
            if case.done:  # frozen: a zero gradient would still move it through Adam's momentum
                for d in case.deltas.values():
                    d.grad = None
        optimizer.step()
        with torch.no_grad():
            for case in (cases[k] for k in still):
                for s in objective.sites:
                    clamp_norm_(case.deltas[s], objective.clamp_norm_factor * case.initial[s].norm())
        if len(still) < len(cases):
            return still
    return []


def clamp_norm_(delta: torch.Tensor, max_norm: torch.Tensor) -> None:
    """Scale δ down to `max_norm` if its norm is above it; otherwise leave it bit for bit. Branchless, so it never
    waits for the device (an `if norm > max_norm` would, for every case and site at every step)."""
    norm = delta.norm()
    delta.mul_(torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm)))


def _reuse_prefix(model, objective: DeltaObjective, regularizers, batch) -> bool:
    """Whether each step may be fed only the tokens from δ's position to the last one read, the earlier ones cached:
    asked for, understood by every regularizer, and not cut short by a sliding attention window shorter than the
    prompts (a sliding cache would drop early keys)."""
    window = getattr(model.config, "sliding_window", None)
    too_long = window is not None and batch.input_ids.shape[1] > window
    return objective.prefix_cache and not too_long and all(reg.reads_cached_prefix() for reg in regularizers)


def _regularizer_terms(reg: DeltaRegularizer, step: int, n_requests: int) -> list[torch.Tensor]:
    terms = reg.case_losses(step)
    if len(terms) != n_requests:
        raise InvalidSettingError(f"{type(reg).__name__} gives {len(terms)} loss terms for {n_requests} requests "
                                  "optimised together: it cannot share a δ-optimisation (set editor.parallel_cases=1)")
    return terms
