"""Updates as low-rank factors, applied and reverted separately from computing them.

Computing an update never changes the model. ``apply_deltas`` writes it (orientation taken
from the module type: GPT-2's Conv1D stores Wᵀ) and returns a handle that restores the
weights bitwise.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from ..arch import ArchSpec, get_module, weight_matrix
from ..errors import CollapseDiagError
from ..recorder import Recorder
from ..requests import EditRequest
from ..stats import LayerStats
from .context import MEMIT_LENGTHS


@dataclass
class Delta:
    """ΔW = left @ rightᵀ for the module ``module`` (Linear convention, [d_out, d_in])."""

    module: str
    layer: int
    left: torch.Tensor  # [d_out, r]
    right: torch.Tensor  # [d_in, r]

    def dense(self) -> torch.Tensor:
        """The full update matrix [d_out, d_in] (products of half-precision factors in float32)."""
        if self.left.dtype in (torch.bfloat16, torch.float16):
            return self.left.float() @ self.right.float().T
        return self.left @ self.right.T

    def is_finite(self) -> bool:
        """True when both factors are finite."""
        return bool(torch.isfinite(self.left).all() and torch.isfinite(self.right).all())


class AppliedDeltas:
    """Handle on applied updates; ``revert()`` restores the saved weights bitwise."""

    def __init__(self, model: nn.Module, deltas: list[Delta]) -> None:
        self.saved: dict[str, torch.Tensor] = {}
        self.modules: dict[str, nn.Module] = {}
        for d in deltas:
            if d.module not in self.saved:
                mod = get_module(model, d.module)
                self.modules[d.module] = mod
                self.saved[d.module] = mod.weight.detach().clone()
        with torch.no_grad():
            for d in deltas:
                w = weight_matrix(self.modules[d.module])
                upd = d.dense().to(dtype=w.dtype, device=w.device)
                if upd.shape != w.shape:
                    raise CollapseDiagError(f"update for {d.module} has shape {tuple(upd.shape)}, "
                                            f"weight is {tuple(w.shape)} (Linear convention)")
                w += upd

    def revert(self) -> None:
        """Put the weights back exactly as they were."""
        with torch.no_grad():
            for name, w in self.saved.items():
                self.modules[name].weight.copy_(w)

    def __enter__(self) -> "AppliedDeltas":
        return self

    def __exit__(self, *exc: object) -> None:
        self.revert()


def apply_deltas(model: nn.Module, deltas: list[Delta]) -> AppliedDeltas:
    """Add every update to its weight in place; use the result (or ``with``) to revert."""
    return AppliedDeltas(model, deltas)


@dataclass
class HParams:
    """Base of every editor's hyper-parameters: a typed dataclass, unknown keys rejected."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HParams":
        """Build from a dict, rejecting keys the dataclass does not define."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise CollapseDiagError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field."""
        return dataclasses.asdict(self)


@dataclass
class EditEnv:
    """What an editor needs besides the model: architecture, key statistics, context templates."""

    arch: ArchSpec
    stats: dict[int, LayerStats]
    templates: list[str]
    seed: int = 0
    initial: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> W₀ (Linear convention)
    target_cache: Any = None  # a TargetCache shared by runs, or None
    extra: dict[str, Any] = field(default_factory=dict)


class Editor(Protocol):
    """An editing method: ``compute`` returns updates and leaves the model unchanged.

    Stateful methods (D4S, AlphaEdit) keep what ``compute`` found as pending; ``commit`` folds it into
    their state once the session has accepted the update and returns the arrays that let ``replay``
    rebuild that state when a run is resumed.
    """

    name: ClassVar[str]
    single_edit_only: ClassVar[bool]
    context_lengths: ClassVar[tuple[tuple[int, int], ...]]
    hparams: HParams

    def layers(self) -> list[int]:
        """Layers whose rewrite module the method edits."""

    def compute(self, model: nn.Module, tok: object, requests: list[EditRequest], env: EditEnv,
                rec: Recorder) -> list[Delta]:
        """Updates for ``requests``; diagnostics go to ``rec``."""

    def commit(self) -> dict[str, np.ndarray]:
        """Accept the last computed update; returns the arrays to save for ``replay``."""

    def replay(self, arrays: dict[str, np.ndarray], env: EditEnv) -> None:
        """Fold the arrays saved by ``commit`` back into the state (when resuming)."""

    def reset(self) -> None:
        """Forget every committed update (the weights were put back to W₀)."""


class EditorBase:
    """Defaults shared by the editors: hyper-parameters, no state between updates."""

    name: ClassVar[str] = ""
    single_edit_only: ClassVar[bool] = False
    context_lengths: ClassVar[tuple[tuple[int, int], ...]] = MEMIT_LENGTHS
    HParams: ClassVar[type] = HParams

    def __init__(self, hparams: HParams | None = None) -> None:
        self.hparams = hparams or self.HParams()

    def commit(self) -> dict[str, np.ndarray]:
        """Stateless methods save nothing besides their update factors."""
        return {}

    def replay(self, arrays: dict[str, np.ndarray], env: EditEnv) -> None:
        """Stateless methods have nothing to replay."""

    def reset(self) -> None:
        """Stateless methods have nothing to forget."""
