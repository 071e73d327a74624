"""The δ-optimisation's unchanging prefix, run once: each step feeds only the tokens δ can change.

δ is added at one position of each row (the subject's last token), so by causality every token before it computes
the same thing at every step. Each row is cut there: the prefix (the tokens before the cut) runs through the model
once, and its keys and values are handed to every later forward as a cache; the suffix (the cut token onwards) is
what each step computes, at its true positions. The suffix also ends after the last position the loss reads (tokens
after it cannot change anything read, by causality again), e.g. a target's last token, which predicts nothing.
Results equal the whole-prompt forward up to float rounding (tests/test_prefix_cache.py checks them per row and
position, on every family).

Layout: both parts are right-padded, so a row's keys are its prefix (key indices 0..cut-1), the prefix padding, then
its suffix from key index `width`; the attention mask handed to the model covers both, so padding is never attended.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from sadr.models.kv_cache import cache_argument, new_cache


@dataclass
class PrefixSplit:
    """A right-padded batch cut at `cuts[r]` in each row r, and ended at the row's end (0 <= cut < end <= length)."""

    prefix_ids: torch.Tensor  # (B, width): tokens [0, cut) of each row, right-padded
    prefix_mask: torch.Tensor
    suffix_ids: torch.Tensor  # (B, S): tokens [cut, end) of each row, right-padded
    suffix_mask: torch.Tensor
    cuts: torch.Tensor  # (B,)

    @property
    def width(self) -> int:
        """Key positions the cache holds per row (the longest prefix); 0: nothing is cached."""
        return self.prefix_ids.shape[1]

    @property
    def key_mask(self) -> torch.Tensor:
        """(B, width + S): which key positions of a step's forward are real tokens."""
        return torch.cat([self.prefix_mask, self.suffix_mask], dim=1)

    @property
    def position_ids(self) -> torch.Tensor:
        """(B, S): each suffix token's position in its whole row."""
        return self.cuts[:, None] + torch.arange(self.suffix_ids.shape[1], device=self.cuts.device)

    def in_suffix(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Where whole-row `positions` (at or after their row's cut) are in a step's input."""
        suffix = positions - self.cuts[rows]
        if (suffix < 0).any():
            raise ValueError(f"positions {positions.tolist()} precede their rows' cuts {self.cuts[rows].tolist()}")
        return suffix

    def key_index(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Where whole-row `positions` are among a step's keys (cached prefix, its padding, then the suffix)."""
        cuts = self.cuts[rows]
        return torch.where(positions < cuts, positions, self.width + positions - cuts)

    def select(self, rows: torch.Tensor) -> "PrefixSplit":
        """Rows `rows` of this split, in that order, less the suffix columns that are padding in every one of them.
        The prefix keeps its width, so each kept key keeps its index; only trailing key positions go."""
        suffix_mask = self.suffix_mask[rows]
        used = int(suffix_mask.any(dim=0).sum())  # right-padded: the used columns come first
        return PrefixSplit(self.prefix_ids[rows], self.prefix_mask[rows], self.suffix_ids[rows, :used],
                           suffix_mask[:, :used], self.cuts[rows])


def split_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, cuts: torch.Tensor, pad_id: int,
               ends: torch.Tensor | None = None) -> PrefixSplit:
    """Cut each row of a right-padded batch at `cuts[r]`, and end it at `ends[r]` (default: its length; no output
    before the end depends on a later token). All-zero cuts and no ends give an empty prefix and the batch itself
    (less any trailing columns that are padding in every row)."""
    lengths = attention_mask.sum(dim=1) if ends is None else ends
    if ((cuts < 0) | (cuts >= lengths) | (lengths > attention_mask.sum(dim=1))).any():
        raise ValueError(f"cuts {cuts.tolist()} and ends {lengths.tolist()} must lie inside their rows "
                         f"(lengths {attention_mask.sum(dim=1).tolist()}), each cut before its end")
    width, suffix_width = int(cuts.max()), int((lengths - cuts).max())
    prefix_mask = (torch.arange(width, device=cuts.device) < cuts[:, None]).to(attention_mask.dtype)
    prefix_ids = torch.where(prefix_mask.bool(), input_ids[:, :width], pad_id)
    offsets = cuts[:, None] + torch.arange(suffix_width, device=cuts.device)
    suffix_mask = (offsets < lengths[:, None]).to(attention_mask.dtype)
    suffix_ids = torch.where(suffix_mask.bool(), input_ids.gather(1, offsets.clamp(max=input_ids.shape[1] - 1)), pad_id)
    return PrefixSplit(prefix_ids, prefix_mask, suffix_ids, suffix_mask, cuts)


def _step_inputs(split: PrefixSplit) -> dict:
    """The inputs of every step's forward but the cache (the same at every step, so built once)."""
    if not split.width:
        return {"input_ids": split.suffix_ids, "attention_mask": split.suffix_mask}
    return {"input_ids": split.suffix_ids, "attention_mask": split.key_mask, "position_ids": split.position_ids,
            "use_cache": True}


class PrefixCache:
    """The keys and values of a split's prefixes in every layer, and the inputs of a step's forward that reuses them."""

    def __init__(self, model, split: PrefixSplit):
        self.split = split
        self._config = model.config
        self._argument = cache_argument(model.base_model)
        self._key_values: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._inputs = _step_inputs(split)
        if not split.width:
            return
        filled = new_cache(model.base_model)
        with torch.no_grad():
            model.base_model(input_ids=split.prefix_ids, attention_mask=split.prefix_mask, **filled)
        self._key_values = [(layer.keys, layer.values) for layer in filled[self._argument].layers]

    def select(self, rows: torch.Tensor) -> "PrefixCache":
        """The cache of `split.select(rows)`: those rows' keys and values, taken from this one without a forward."""
        chosen = copy.copy(self)
        chosen.split = self.split.select(rows)
        chosen._key_values = [(keys[rows], values[rows]) for keys, values in self._key_values]
        chosen._inputs = _step_inputs(chosen.split)
        return chosen

    def forward_inputs(self) -> dict:
        """Keyword arguments of `model.base_model` for one step: the suffixes, at their positions, after the cached
        prefixes (a fresh cache each time, since a forward appends to the one it is given)."""
        if not self._key_values:
            return self._inputs
        return {**self._inputs, self._argument: DynamicCache(ddp_cache_data=self._key_values, config=self._config)}
