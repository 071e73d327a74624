"""One adapter per model family: where its blocks, MLP down-projection, attention and norms live.

Selected by the model's `config.model_type`, never by its name or path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sadr.errors import InvalidSettingError


# An update is written into a weight at most this many bytes of float64 rows at a time.
WRITE_BLOCK_BYTES = 2**26


class UnsupportedModelError(InvalidSettingError):
    """The model's family (config.model_type) has no adapter."""


@dataclass(frozen=True)
class ModelAdapter:
    family: str
    layers: str  # the ModuleList of transformer blocks
    mlp_down: str  # MLP down-projection of block {} (the edited weight)
    attention: str  # self-attention module of block {}
    attn_out: str  # attention output projection of block {}
    final_norm: str
    down_weight_is_transposed: bool = False  # GPT-2's Conv1D stores its weight as (in, out)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def block(self, model: nn.Module, layer: int) -> nn.Module:
        return self.blocks(model)[self._check(model, layer)]

    def module(self, model: nn.Module, template: str, layer: int) -> nn.Module:
        return model.get_submodule(template.format(self._check(model, layer)))

    def mlp_down_module(self, model: nn.Module, layer: int) -> nn.Module:
        return self.module(model, self.mlp_down, layer)

    def down_weight(self, model: nn.Module, layer: int) -> torch.Tensor:
        """The edited weight as an (out_features, in_features) view of the parameter."""
        weight = self.mlp_down_module(model, layer).weight
        return weight.T if self.down_weight_is_transposed else weight

    @torch.no_grad()
    def add_to_down_weight(self, model: nn.Module, layer: int, delta) -> None:
        """W += delta, with delta (out_features, in_features): a tensor, or an update that forms its rows on demand
        (`delta.shape` and `delta.dense_rows(start, end)`, as `LowRankUpdate` does), which is then never formed whole.

        W + delta is formed in at least float32 and rounded once to the weight's dtype, so a bfloat16 or float16
        weight gets the nearest representable sum, not the sum of two rounded numbers (float32 weights: as `add_`).
        It is written a block of rows at a time, so the temporaries are of that block's size, not of W's.
        """
        weight = self.down_weight(model, layer)
        if tuple(delta.shape) != tuple(weight.shape):
            raise ValueError(f"update of shape {tuple(delta.shape)} for a weight of shape {tuple(weight.shape)}")
        rows = delta.dense_rows if hasattr(delta, "dense_rows") else lambda start, end: delta[start:end]
        wide = torch.promote_types(weight.dtype, torch.float32)
        block = max(1, WRITE_BLOCK_BYTES // (8 * weight.shape[1]))
        for start in range(0, weight.shape[0], block):
            target = weight[start : start + block]
            change = rows(start, start + block).to(device=weight.device, dtype=wide)
            target.copy_((target.to(wide) + change).to(weight.dtype))

    def _check(self, model: nn.Module, layer: int) -> int:
        n = len(self.blocks(model))
        if not 0 <= layer < n:
            raise ValueError(f"layer {layer} out of range: this {self.family} model has layers 0..{n - 1}")
        return layer


_LLAMA_LIKE = dict(
    layers="model.layers",
    mlp_down="model.layers.{}.mlp.down_proj",
    attention="model.layers.{}.self_attn",
    attn_out="model.layers.{}.self_attn.o_proj",
    final_norm="model.norm",
)

ADAPTERS: dict[str, ModelAdapter] = {
    "gpt2": ModelAdapter(
        family="gpt2",
        layers="transformer.h",
        mlp_down="transformer.h.{}.mlp.c_proj",
        attention="transformer.h.{}.attn",
        attn_out="transformer.h.{}.attn.c_proj",
        final_norm="transformer.ln_f",
        down_weight_is_transposed=True,
    ),
    "gptj": ModelAdapter(
        family="gptj",
        layers="transformer.h",
        mlp_down="transformer.h.{}.mlp.fc_out",
        attention="transformer.h.{}.attn",
        attn_out="transformer.h.{}.attn.out_proj",
        final_norm="transformer.ln_f",
    ),
    "gpt_neox": ModelAdapter(
        family="gpt_neox",
        layers="gpt_neox.layers",
        mlp_down="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        attention="gpt_neox.layers.{}.attention",
        attn_out="gpt_neox.layers.{}.attention.dense",
        final_norm="gpt_neox.final_layer_norm",
    ),
    "llama": ModelAdapter(family="llama", **_LLAMA_LIKE),
    "mistral": ModelAdapter(family="mistral", **_LLAMA_LIKE),
    "qwen2": ModelAdapter(family="qwen2", **_LLAMA_LIKE),
}


def adapter_for(model: nn.Module) -> ModelAdapter:
    return adapter_for_config(model.config)


def adapter_for_config(config) -> ModelAdapter:
    """The adapter of a model's family, from its config alone (before any weight is loaded)."""
    model_type = getattr(config, "model_type", None)
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported model family {model_type!r} (config.model_type); supported families: "
            f"{', '.join(sorted(ADAPTERS))}. Add a ModelAdapter for it in sadr/models/adapters.py."
        ) from None
