"""Which case each row of an evaluation forward belongs to.

When the single protocol evaluates several independently edited models in one forward (`editor.parallel_cases`),
each batch row must see the model edited for its own case. An evaluator declares that around every forward:
`with case_rows(cases): model(...)`, `cases` giving the case (its index in the evaluated list) of each batch row, or
one index for every row. With one model for all cases the declaration does nothing (`one_model`).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Sequence, Union

CaseRows = Callable[[Union[int, Sequence[int]]], ContextManager]


def one_model(_cases: int | Sequence[int]) -> ContextManager:
    """Every case is evaluated on the same model: nothing to route."""
    return nullcontext()
