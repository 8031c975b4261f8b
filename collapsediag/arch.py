"""Architecture specs: where the edited MLP projection, blocks, final norm and unembedding live.

The spec is chosen from ``config.model_type`` and can be overridden field by field.
Module paths use ``{}`` for the layer index.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .errors import CollapseDiagError


@dataclass(frozen=True)
class ArchSpec:
    """Dotted module names of one model family (``{}`` = layer index)."""

    family: str
    rewrite_module: str  # MLP output projection: the matrix editors write into
    block: str  # whole decoder block
    mlp: str
    final_norm: str
    lm_head: str
    n_layers_attr: str = "num_hidden_layers"

    def rewrite_name(self, layer: int) -> str:
        """Name of the edited projection at ``layer``."""
        return self.rewrite_module.format(layer)

    def block_name(self, layer: int) -> str:
        """Name of the decoder block at ``layer``."""
        return self.block.format(layer)

    def blocks_name(self) -> str | None:
        """Name of the ModuleList holding the blocks (None when ``block`` is not ``<list>.{}``)."""
        return self.block[:-3] if self.block.endswith(".{}") else None

    def replace(self, **changes: str) -> "ArchSpec":
        """A copy with some fields overridden."""
        return dataclasses.replace(self, **changes)


_LLAMA = ArchSpec("llama", "model.layers.{}.mlp.down_proj", "model.layers.{}", "model.layers.{}.mlp",
                  "model.norm", "lm_head")

ARCHS: dict[str, ArchSpec] = {
    "gpt2": ArchSpec("gpt2", "transformer.h.{}.mlp.c_proj", "transformer.h.{}", "transformer.h.{}.mlp",
                     "transformer.ln_f", "lm_head", "n_layer"),
    "gptj": ArchSpec("gptj", "transformer.h.{}.mlp.fc_out", "transformer.h.{}", "transformer.h.{}.mlp",
                     "transformer.ln_f", "lm_head", "n_layer"),
    "gpt_neox": ArchSpec("gpt_neox", "gpt_neox.layers.{}.mlp.dense_4h_to_h", "gpt_neox.layers.{}",
                         "gpt_neox.layers.{}.mlp", "gpt_neox.final_layer_norm", "embed_out"),
    "llama": _LLAMA,
    "mistral": _LLAMA.replace(family="mistral"),
    "qwen2": _LLAMA.replace(family="qwen2"),
    "qwen3": _LLAMA.replace(family="qwen3"),
}


# Families whose MLP output is added straight to the residual stream (no norm after it), so a change
# at the rewrite module's output is the same change at the block's output.
ADDITIVE_MLP = {"gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3"}


def block_of(model: nn.Module, spec: ArchSpec, module: str) -> int | None:
    """The layer whose block output changes exactly as ``module``'s output does, or None.

    True for a block itself, and for the default rewrite module of an ``ADDITIVE_MLP`` family.
    """
    if spec.blocks_name() is None:
        return None
    additive = spec.family in ADDITIVE_MLP and spec.rewrite_module == ARCHS[spec.family].rewrite_module
    for layer in range(n_layers(model, spec)):
        if module == spec.block_name(layer) or (additive and module == spec.rewrite_name(layer)):
            return layer
    return None


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; a clear error if it does not exist."""
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise CollapseDiagError(f"model has no module {name!r}; override the ArchSpec") from exc


def arch_for(model: nn.Module, **overrides: str) -> ArchSpec:
    """The spec for ``model`` from ``config.model_type``, with ``overrides`` applied and checked."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHS and "rewrite_module" not in overrides:
        raise CollapseDiagError(
            f"no architecture spec for model_type {model_type!r}; known: {sorted(ARCHS)}; "
            "pass overrides (rewrite_module=..., block=..., mlp=..., final_norm=..., lm_head=...)")
    base = ARCHS.get(model_type, _LLAMA.replace(family=str(model_type)))
    spec = base.replace(**overrides) if overrides else base
    get_module(model, spec.rewrite_name(0))
    return spec


def n_layers(model: nn.Module, spec: ArchSpec) -> int:
    """Number of decoder layers of ``model``."""
    cfg = model.config
    return int(getattr(cfg, spec.n_layers_attr, None) or cfg.num_hidden_layers)


def is_conv1d(module: nn.Module) -> bool:
    """True for GPT-2's Conv1D, which stores Wᵀ ([d_in, d_out])."""
    return type(module).__name__ == "Conv1D"


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight in Linear convention W ∈ R^{d_out×d_in} (a view; transposed for Conv1D)."""
    if is_conv1d(module):
        return module.weight.T
    if isinstance(module, nn.Linear):
        return module.weight
    raise CollapseDiagError(f"cannot edit module of type {type(module).__name__}: need Linear or Conv1D")


def bias_vector(module: nn.Module) -> torch.Tensor | None:
    """The module's bias, or None."""
    return getattr(module, "bias", None)
