"""ENCORE (ALGORITHMS.md §14): MEMIT with the keys of earlier batches in the preservation term (MEMIT-seq),
a Frobenius penalty on each batch's increment, and most-probable early stopping (MPES) of the target:

    ΔW = R Kᵀ A⁻¹,   A = λ_p C₀ + λ_n I + Σ_{earlier batches} K_p K_pᵀ + K Kᵀ

which minimises λ_p‖ΔW K₀‖² + Σ_p‖ΔW K_p‖² + ‖ΔW K − R‖² + λ_n‖ΔW‖²_F. K_p are the keys of earlier batches as
computed when they were edited; this batch's K Kᵀ joins the sum only once the session commits it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import EditEnv
from .memit import KeySumMemit, MemitHParams, memit_solve


@dataclass
class EncoreHParams(MemitHParams):
    """ENCORE hyper-parameters: λ_p = ``mom2_update_weight``, λ_n = ``update_norm_lambda``, ``mpes`` = −k.

    Chosen on the embedded SmolLM2-135M by measurement (benchmarks/encore_lambda.py, 16 sequential CounterFact
    edits, cases 64–79; benchmarks/results/encore_lambda.jsonl): with λ_p = 2000 (MEMIT's measured λ, the same
    C), λ_n = 0 and 10 keep every edit and paraphrase successful, and 10 ends with ‖W − W₀‖_F 24–30 % smaller
    per layer; λ_n = 30 lets a paraphrase fail (0.97), 100 an edit (efficacy 0.94, paraphrases 0.72), 1000 half
    the edits. λ_p = 15000 (the reference's) with λ_n = 10 fails 2 of 16 edits. MPES −2 as the reference's
    Llama-3 setting.
    """

    update_norm_lambda: float = 10.0
    mpes: int = -2


def encore_solve(keys: torch.Tensor, resid: torch.Tensor, mom2: torch.Tensor, lam_p: float, lam_n: float,
                 kk_prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """ENCORE's factors (left = R, right = A⁻¹K) and diagnostics; float64. ``kk_prev`` = Σ K_p K_pᵀ (or None)."""
    extra = lam_n * torch.eye(mom2.shape[0], dtype=mom2.dtype, device=mom2.device)
    if kk_prev is not None:
        extra = extra + kk_prev
    left, right, diag = memit_solve(keys, resid, mom2, lam_p, extra=extra,
                                    name="ENCORE matrix λ_pC₀ + λ_nI + ΣK_pK_pᵀ + KKᵀ")
    diag["cache_trace"] = float((kk_prev.trace() if kk_prev is not None else 0.0) + keys.pow(2).sum())
    return left, right, diag


class Encore(KeySumMemit):
    """ENCORE: norm-constrained sequential MEMIT with MPES."""

    name: ClassVar[str] = "encore"
    HParams: ClassVar[type] = EncoreHParams

    def solve(self, layer: int, keys: torch.Tensor, resid: torch.Tensor, env: EditEnv
              ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """ENCORE's factors at ``layer``; the keys wait for ``commit`` to join the sum."""
        hp = self.hparams
        out = encore_solve(keys, resid, env.stats[layer].mom2.double(), hp.mom2_update_weight,
                           hp.update_norm_lambda, self.cache.get(layer))
        self._hold(layer, keys)
        return out

