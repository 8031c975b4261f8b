"""MEMIT and EMMET: batched updates spread over several layers (ALGORITHMS.md §5, §6).

Both share the target z (δ on the residual stream after the last edited layer), the ½/½ key mix
and the residual spreading R = (Z − H_cur) / (layers left); they differ in the solve:
  MEMIT: ΔW = R Kᵀ (λC + K Kᵀ)⁻¹
  EMMET: ΔW = R D⁻¹ Kᵀ C'⁻¹,  C' = λ_m C + μI,  D = Kᵀ C'⁻¹ K (+ ε I when n > 1)
Keys are columns here (K ∈ R^{d_in×n}); ΔW is in Linear orientation [d_out, d_in].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import EditError
from ..linalg import condition_of, diag_lowrank_condition, spd_condition
from ..recorder import Recorder
from ..requests import EditRequest
from .base import AppliedDeltas, Delta, EditEnv, EditorBase, HParams, apply_deltas
from .keys import keys_at_subjects, outputs_at_subject
from .target import TargetSettings, mpes_count, target_signals, targets_for


@dataclass
class BatchHParams(HParams):
    """Edited layers and the target (z) optimisation shared by MEMIT and its descendants."""

    layers: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 7])
    z_num_grad_steps: int = 20
    z_lr: float = 0.5
    z_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    mpes: int = 0  # most-probable early stopping after |mpes| all-argmax steps (ENCORE: -k); 0 = off
    batch_target: bool = True  # optimise the batch's targets together (False: one request at a time)

    def target_settings(self) -> TargetSettings:
        """The shared target-optimisation settings."""
        return TargetSettings(steps=self.z_num_grad_steps, lr=self.z_lr, weight_decay=self.z_weight_decay,
                              clamp_norm_factor=self.clamp_norm_factor, kl_factor=self.kl_factor,
                              mpes=mpes_count(self.mpes))


@dataclass
class MemitHParams(BatchHParams):
    """MEMIT hyper-parameters (Llama-style settings of ALGORITHMS.md §5.4); λ = mom2_update_weight.

    λ = 2000 was chosen on the embedded SmolLM2-135M (benchmarks/memit_lambda.py, CounterFact cases
    64–79): the largest λ tried with every edit and paraphrase succeeding, single and in a batch of 16;
    the reference λ = 15000 (for GPT-J's C) left 1 of 16 edits failing and paraphrases at 0.78.
    """

    mom2_update_weight: float = 2000.0


@dataclass
class EmmetHParams(BatchHParams):
    """EMMET hyper-parameters: λ_m scales C, μ is a ridge on C', ε the ridge on D for batches.

    Unlike MEMIT and its other descendants (layers 3-7), EMMET edits layer 5 alone by default: the long
    study's EMMET runs were made so; ``--layers 3 4 5 6 7`` gives it MEMIT's layers."""

    layers: list[int] = field(default_factory=lambda: [5])
    mom2_update_weight: float = 1.0
    update_norm_lambda: float = 0.0
    emmet_lambda: float = 0.1


def memit_solve(keys: torch.Tensor, resid: torch.Tensor, mom2: torch.Tensor, lam: float,
                eigh: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
                extra: torch.Tensor | None = None, name: str = "MEMIT matrix λC + KKᵀ"
                ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """MEMIT's least squares: ΔW = R (A⁻¹K)ᵀ with A = λC + KKᵀ (+ ``extra``); returns (left=R, right=A⁻¹K,
    diagnostics).

    keys [d_in, n], resid [d_out, n], mom2 [d_in, d_in]; float64 throughout. ``eigh`` gives C's
    eigendecomposition QΛQᵀ (``LayerStats.eigh``): then κ(A) is that of λΛ + (QᵀK)(QᵀK)ᵀ, found with
    O(d·n) products instead of O(d²) ones (only without ``extra``, e.g. ENCORE's λ_nI + ΣK_pK_pᵀ).
    """
    a = lam * mom2 + keys @ keys.T
    if extra is not None:
        a = a + extra
        eigh = None
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        raise EditError(None, f"{name} is not positive definite")
    adj = torch.cholesky_solve(keys, chol)
    schur = keys.T @ adj

    def condition() -> float:
        if eigh is None:
            return spd_condition(a, chol)
        values, vectors = eigh()
        return diag_lowrank_condition(lam * values.double(), vectors.double().T @ keys)

    return resid, adj, {"denominator": float(torch.linalg.eigvalsh(schur)[0]), "condition": condition}


def emmet_solve(keys: torch.Tensor, resid: torch.Tensor, mom2: torch.Tensor, lam_m: float, mu: float,
                eps: float, extremes: Callable[[], tuple[float, float]] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """EMMET's equality-constrained update: ΔW = (R D⁻¹)(C'⁻¹K)ᵀ; pseudo-inverse of D when singular.

    ``extremes`` gives C's (λ_min, λ_max) (``LayerStats.extremes``, computed once per layer): then
    κ(C') = (λ_m λ_max + μ) / (λ_m λ_min + μ) without a Lanczos run per edit.
    """
    c = lam_m * mom2 + mu * torch.eye(mom2.shape[0], dtype=mom2.dtype, device=mom2.device)
    chol, info = torch.linalg.cholesky_ex(c)
    if int(info) != 0:
        raise EditError(None, "EMMET matrix λ_m C + μI is not positive definite")
    c_inv_k = torch.cholesky_solve(keys, chol)
    d = keys.T @ c_inv_k
    if keys.shape[1] > 1:
        d = d + eps * torch.eye(d.shape[0], dtype=d.dtype, device=d.device)
    ev = torch.linalg.eigvalsh(d)
    pinv = bool(ev[0] <= ev[-1] * torch.finfo(d.dtype).eps * d.shape[0] * 10)
    left = resid @ torch.linalg.pinv(d, hermitian=True) if pinv else \
        torch.cholesky_solve(resid.T, torch.linalg.cholesky(d)).T  # R D⁻¹, D symmetric positive definite

    def c_condition() -> float:
        if extremes is None:
            return spd_condition(c, chol)
        lo, hi = extremes()
        return condition_of(lam_m * lo + mu, lam_m * hi + mu)

    return left, c_inv_k, {"denominator": float(ev[0]), "condition": float(ev[-1] / ev[0]),
                           "condition_c": c_condition, "pinv_fallback": pinv}


class Memit(EditorBase):
    """MEMIT: batched least-squares updates of several consecutive layers."""

    name: ClassVar[str] = "memit"
    HParams: ClassVar[type] = MemitHParams
    residual_once: ClassVar[bool] = False  # D4S measures Z − H once, before the layer loop

    def layers(self) -> list[int]:
        """The edited layers, ascending."""
        return sorted(self.hparams.layers)

    def solve(self, layer: int, keys: torch.Tensor, resid: torch.Tensor, env: EditEnv
              ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The method's update factors (left, right) for one layer, and its diagnostics."""
        stats = env.stats[layer]
        return memit_solve(keys, resid, stats.mom2.double(), self.hparams.mom2_update_weight, stats.eigh)

    def apply_temporarily(self, model: nn.Module, delta: Delta) -> AppliedDeltas:
        """Write one layer's update so the next layers' keys see it (reverted at the end of compute)."""
        return apply_deltas(model, [delta])

    def compute(self, model: nn.Module, tok: object, requests: list[EditRequest], env: EditEnv,
                rec: Recorder) -> list[Delta]:
        """Updates of every layer for a batch of requests; the model is left unchanged."""
        layers = self.layers()
        block = env.arch.block_name(layers[-1])
        settings = self.hparams.target_settings()
        targets = targets_for(model, tok, requests, env, block, settings, batched=self.hparams.batch_target)
        z = torch.stack([t.target for t in targets]).double()  # [n, d]
        h_once = outputs_at_subject(model, tok, block, requests).double() if self.residual_once else None
        w_dtype = next(model.parameters()).dtype
        deltas: list[Delta] = []
        applied: list[AppliedDeltas] = []
        try:
            for i, layer in enumerate(layers):
                name = env.arch.rewrite_name(layer)
                keys = torch.stack([ks.mixed for ks in keys_at_subjects(model, tok, name, requests, env.templates)]
                                   ).double().T  # [d_in, n]
                h = h_once if h_once is not None else outputs_at_subject(model, tok, block, requests).double()
                # [d_out, n], on this layer's device (under device_map, block L may sit on another one)
                resid = (z.to(h.device) - h).T.to(keys.device) / (len(layers) - i)
                left, right, diag = self.solve(layer, keys, resid, env)
                delta = Delta(module=name, layer=layer, left=left.to(w_dtype), right=right.to(w_dtype))
                if not delta.is_finite():
                    raise EditError(requests[0].case_id, f"non-finite update at layer {layer}")
                rec.log(layer=layer, z_error=float((z - h).norm(dim=1).mean()), **diag)
                deltas.append(delta)
                applied.append(self.apply_temporarily(model, delta))
        finally:
            for a in reversed(applied):
                a.revert()
        rec.log(layer=layers[-1], **target_signals(targets))
        return deltas


class AccumulatingMemit(Memit):
    """MEMIT's loop for methods whose solve reads sums over earlier steps (D4S, AlphaEdit).

    ``solve`` keeps the arrays a step adds under ``self._pending[layer]``; ``commit`` folds them into the
    sums (``_fold``) and returns them as ``<name>_<layer>`` for the run store; ``replay`` folds saved arrays.
    """

    def __init__(self, hparams: HParams | None = None) -> None:
        super().__init__(hparams)
        self._pending: dict[int, dict[str, torch.Tensor]] = {}

    def _fold(self, layer: int, **arrays: torch.Tensor) -> None:
        raise NotImplementedError

    def _clear(self) -> None:
        raise NotImplementedError

    def compute(self, model: nn.Module, tok: object, requests: list[EditRequest], env: EditEnv,
                rec: Recorder) -> list[Delta]:
        """MEMIT's layer loop; what the step adds waits for ``commit``."""
        self._pending = {}
        return super().compute(model, tok, requests, env, rec)

    def commit(self) -> dict[str, np.ndarray]:
        """Fold the last step into the sums; returns its arrays per layer."""
        out = {}
        for layer, arrays in self._pending.items():
            self._fold(layer, **arrays)
            out.update({f"{name}_{layer}": value.cpu().numpy() for name, value in arrays.items()})
        self._pending = {}
        return out

    def reset(self) -> None:
        """Drop the sums (the weights are back at W₀)."""
        self._pending = {}
        self._clear()

    def replay(self, arrays: dict[str, np.ndarray], env: EditEnv) -> None:
        """Fold arrays saved by ``commit`` back into the sums."""
        device = next(iter(env.stats.values())).mom2.device if env.stats else "cpu"
        by_layer: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in arrays.items():
            name, _, layer = key.rpartition("_")
            by_layer.setdefault(int(layer), {})[name] = torch.from_numpy(value).double().to(device)
        for layer, layer_arrays in by_layer.items():
            self._fold(layer, **layer_arrays)


class KeySumMemit(AccumulatingMemit):
    """MEMIT's loop for methods that keep Σ K_p K_pᵀ over committed batches per layer (AlphaEdit, ENCORE,
    MEMIT-seq): ``solve`` reads ``self.cache.get(layer)`` and calls ``_hold(layer, keys)``."""

    def __init__(self, hparams: HParams | None = None) -> None:
        super().__init__(hparams)
        self.cache: dict[int, torch.Tensor] = {}  # layer -> Σ K_p K_pᵀ of committed batches

    def _hold(self, layer: int, keys: torch.Tensor) -> None:
        """This batch's keys join the sum when the session commits the update."""
        self._pending[layer] = {"keys": keys}

    def _fold(self, layer: int, keys: torch.Tensor) -> None:
        prev = self.cache.get(layer)
        self.cache[layer] = keys @ keys.T if prev is None else prev + keys @ keys.T

    def _clear(self) -> None:
        self.cache = {}


class Emmet(Memit):
    """EMMET: the equality-constrained batched update."""

    name: ClassVar[str] = "emmet"
    HParams: ClassVar[type] = EmmetHParams

    def solve(self, layer: int, keys: torch.Tensor, resid: torch.Tensor, env: EditEnv
              ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """EMMET's update factors for one layer."""
        hp = self.hparams
        stats = env.stats[layer]
        return emmet_solve(keys, resid, stats.mom2.double(), hp.mom2_update_weight, hp.update_norm_lambda,
                           hp.emmet_lambda, stats.extremes)
