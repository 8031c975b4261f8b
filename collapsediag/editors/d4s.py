"""D4S ("Dump for Sequence", ALGORITHMS.md §8): sequential MEMIT that keeps two running sums per layer,

    S_t = Σ_{s≤t} R_s K_sᵀ,   Σ_t = Σ_{s≤t} K_s K_sᵀ,   W_t = W₀ + S_t (λC + Σ_t)⁻¹,

with every K_s, R_s measured on W₀. The step from W_{t−1} to W_t has rank n (push-through identity):

    W_t − W_{t−1} = (R_t − ΔW_{t−1} K_t)(I + M)⁻¹ Bᵀ,   B = (λC + Σ_{t−1})⁻¹ K_t,   M = K_tᵀ B,

so each step is stored as low-rank factors like any other update, and the memory held is two
fixed-size sums per layer whatever the number of edits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..arch import get_module, weight_matrix
from ..errors import EditError
from ..linalg import updated_spd_condition
from ..recorder import Recorder
from ..requests import EditRequest
from .base import AppliedDeltas, Delta, EditEnv, apply_deltas
from .memit import AccumulatingMemit, MemitHParams


@dataclass
class D4sHParams(MemitHParams):
    """D4S hyper-parameters: MEMIT's (λ = mom2_update_weight weighs C against the sum of edit keys).

    ``remeasure_residuals`` False (the reference) measures Z − H once, before the layer loop, so layer i
    is asked for (Z − H)/(L − i) of the whole gap; True re-measures H after each layer as MEMIT does.
    """

    remeasure_residuals: bool = False


def d4s_increment(keys: torch.Tensor, resid: torch.Tensor, moved: torch.Tensor, lam_c: torch.Tensor,
                  kk_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Factors (left [d_out, n], right [d_in, n]) of W_t − W_{t−1}, and diagnostics; float64.

    keys K_t [d_in, n], resid R_t [d_out, n], moved S_{t−1} = Σ R Kᵀ, lam_c = λC, kk_sum Σ_{t−1} = Σ K Kᵀ.
    """
    a_prev = lam_c + kk_sum
    chol, info = torch.linalg.cholesky_ex(a_prev)
    if int(info) != 0:
        raise EditError(None, "D4S matrix λC + ΣKKᵀ is not positive definite")
    b = torch.cholesky_solve(keys, chol)  # [d_in, n]
    m = keys.T @ b
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    left = torch.linalg.solve(eye + m, (resid - moved @ b).T).T
    mu = torch.linalg.eigvalsh(m)
    return left, b, {"denominator": float(mu[0] / (1 + mu[0])),
                     "condition": lambda: updated_spd_condition(a_prev, chol, keys),  # of λC + Σ_{≤t} KKᵀ
                     "cache_trace": float(kk_sum.trace() + keys.pow(2).sum())}


class D4s(AccumulatingMemit):
    """D4S: each step is W₀ plus one batched update over every edit so far."""

    name: ClassVar[str] = "d4s"
    HParams: ClassVar[type] = D4sHParams

    @property
    def residual_once(self) -> bool:  # type: ignore[override]
        """Z − H measured once per step (the reference) unless ``remeasure_residuals``."""
        return not self.hparams.remeasure_residuals

    def __init__(self, hparams: D4sHParams | None = None) -> None:
        super().__init__(hparams)
        self.sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (Σ R Kᵀ, Σ K Kᵀ)
        self._current: dict[int, torch.Tensor] = {}
        self._w0: dict[int, torch.Tensor] = {}

    def _sums(self, layer: int, d_out: int, d_in: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.sums:
            z = dict(dtype=torch.float64, device=like.device)
            return torch.zeros(d_out, d_in, **z), torch.zeros(d_in, d_in, **z)
        return self.sums[layer]

    def solve(self, layer: int, keys: torch.Tensor, resid: torch.Tensor, env: EditEnv
              ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Factors of this step's change of W at ``layer``; K and R are kept until ``commit``."""
        moved, kk = self._sums(layer, resid.shape[0], keys.shape[0], keys)
        lam_c = self.hparams.mom2_update_weight * env.stats[layer].mom2.double()
        left, right, diag = d4s_increment(keys, resid, moved, lam_c, kk)
        self._pending[layer] = {"keys": keys, "resid": resid}
        return left, right, diag

    def _initial(self, layer: int, env: EditEnv, current: torch.Tensor) -> torch.Tensor:
        if layer in env.initial:
            return env.initial[layer]
        if layer not in self._w0:
            if layer in self.sums:
                raise EditError(None, f"D4S needs the unedited weights of layer {layer} (EditEnv.initial)")
            self._w0[layer] = current.clone()
        return self._w0[layer]

    def apply_temporarily(self, model: nn.Module, delta: Delta) -> AppliedDeltas:
        """Put the layer back to W_{t−1} and add this step, so later layers' keys see W_t."""
        with torch.no_grad():
            weight_matrix(get_module(model, delta.module)).copy_(self._current[delta.layer])
        return apply_deltas(model, [delta])

    def compute(self, model: nn.Module, tok: object, requests: list[EditRequest], env: EditEnv,
                rec: Recorder) -> list[Delta]:
        """The step for ``requests``, with targets, keys and residuals measured on W₀; model left unchanged."""
        mods = {layer: weight_matrix(get_module(model, env.arch.rewrite_name(layer))) for layer in self.layers()}
        self._current = {layer: w.detach().clone() for layer, w in mods.items()}
        try:
            with torch.no_grad():
                for layer, w in mods.items():
                    w.copy_(self._initial(layer, env, self._current[layer]))
            return super().compute(model, tok, requests, env, rec)
        finally:
            with torch.no_grad():
                for layer, w in mods.items():
                    w.copy_(self._current[layer])
            self._current = {}

    def _fold(self, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> None:
        moved, kk = self._sums(layer, resid.shape[0], keys.shape[0], keys)
        self.sums[layer] = (moved + resid @ keys.T, kk + keys @ keys.T)

    def _clear(self) -> None:
        self.sums = {}
