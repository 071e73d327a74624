"""Hooks that read module inputs/outputs at chosen token positions, add perturbations there, or end a forward early."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def _first(value):
    return value[0] if isinstance(value, tuple) else value


@contextmanager
def _capture(modules: dict[int, nn.Module], inputs: bool):
    captured: dict[int, torch.Tensor] = {}
    if inputs:
        handles = [m.register_forward_pre_hook(lambda _m, args, layer=layer: captured.__setitem__(layer, args[0]))
                   for layer, m in modules.items()]
    else:
        handles = [m.register_forward_hook(lambda _m, _a, out, layer=layer: captured.__setitem__(layer, _first(out)))
                   for layer, m in modules.items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def capture_inputs(modules: dict[int, nn.Module]):
    """Record the first positional input of each module (by layer) during the forwards inside the block."""
    return _capture(modules, inputs=True)


def capture_outputs(modules: dict[int, nn.Module]):
    """Record the (first) output of each module (by layer) during the forwards inside the block."""
    return _capture(modules, inputs=False)


@contextmanager
def add_at_positions(module: nn.Module, rows: torch.Tensor, positions: torch.Tensor, delta_for_rows):
    """Add `delta_for_rows()` ((n_rows, d), one vector per (row, position)) to the module's output there."""

    def hook(_module, _args, output):
        hidden = _first(output)
        hidden = hidden.index_put((rows, positions), delta_for_rows().to(hidden.dtype), accumulate=True)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def frozen_blocks(blocks: list[nn.Module]):
    """Run each block once, then replay its recorded output on every later forward.

    For the δ-optimisation: blocks below the injection point see the same input at every step, so
    recomputing them is wasted work. Only valid while the same batch is fed at every forward.
    """
    originals = []
    for block in blocks:
        had_instance_forward = "forward" in block.__dict__  # e.g. accelerate's device-map wrapper
        original = block.forward
        memo: dict[str, object] = {}

        def replay(*args, _original=original, _memo=memo, **kwargs):
            if "output" not in _memo:
                _memo["output"] = _original(*args, **kwargs)
            return _memo["output"]

        originals.append((block, original if had_instance_forward else None))
        block.forward = replay
    try:
        yield
    finally:
        for block, original in originals:
            if original is None:
                del block.forward
            else:
                block.forward = original


class _ForwardStopped(Exception):
    """Raised by `stop_after`'s hook: nothing above the module is needed."""


@contextmanager
def stop_after(module: nn.Module, *, before: bool = False):
    """End the forward run inside the block once `module` has run (`before=True`: as soon as its input is there), so
    the blocks above it and the LM head are never computed. The forward must be the block's last statement, and
    the hooks that read `module` must be registered first (hooks run in registration order)."""

    def stop(*_args):
        raise _ForwardStopped

    handle = module.register_forward_pre_hook(stop) if before else module.register_forward_hook(stop)
    try:
        yield
    except _ForwardStopped:
        pass
    finally:
        handle.remove()
