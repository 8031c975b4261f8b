"""AlphaEdit (ALGORITHMS.md §9.1): MEMIT's targets and keys, with the update projected onto the directions
where the key statistics C have eigenvalues below a threshold (P = U Uᵀ), and the keys of earlier
batches (K_p) in the regulariser:

    ΔW = R Kᵀ P ((K Kᵀ + K_p K_pᵀ) P + α I)⁻¹  =  R (U G⁻¹ Uᵀ K)ᵀ,   G = Uᵀ (K Kᵀ + K_p K_pᵀ) U + α I.

The second form (the same matrix, since ΔW's rows lie in the range of P) is solved: G is symmetric
positive definite of size rank(P).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import EditError
from ..linalg import spd_condition
from ..stats import LayerStats
from .base import EditEnv
from .memit import KeySumMemit, BatchHParams


@dataclass
class AlphaEditHParams(BatchHParams):
    """AlphaEdit hyper-parameters: eigenvalue threshold of the projector and α (``L2`` in the reference)."""

    nullspace_threshold: float = 2e-2
    l2: float = 10.0


def null_space_basis(stats: LayerStats, threshold: float) -> torch.Tensor:
    """Orthonormal eigenvectors of C with eigenvalue below ``threshold``: U [d_in, r], P = U Uᵀ."""
    values, vectors = stats.eigh()
    return vectors[:, values < threshold]


def alphaedit_solve(keys: torch.Tensor, resid: torch.Tensor, basis: torch.Tensor, kk_prev: torch.Tensor,
                    alpha: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """AlphaEdit's factors (left = R, right = U G⁻¹ Uᵀ K) and diagnostics; float64.

    ``denominator`` is λ_min(K̃ᵀ G⁻¹ K̃) with K̃ = Uᵀ K, the n×n form MEMIT also records: it is small when the
    keys barely reach the preserved-knowledge null space.
    """
    r = basis.shape[1]
    if r == 0:
        raise EditError(None, "AlphaEdit projector has rank 0: nullspace_threshold is below every eigenvalue of C")
    kt = basis.T @ keys  # [r, n]
    kk = kk_prev + keys @ keys.T
    g = basis.T @ kk @ basis + alpha * torch.eye(r, dtype=keys.dtype, device=keys.device)
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0:
        raise EditError(None, "AlphaEdit matrix Uᵀ(KKᵀ + K_pK_pᵀ)U + αI is not positive definite")
    y = torch.cholesky_solve(kt, chol)
    return resid, basis @ y, {"denominator": float(torch.linalg.eigvalsh(kt.T @ y)[0]),
                              "condition": lambda: spd_condition(g, chol), "projector_rank": r,
                              "cache_trace": float(kk.trace())}


class AlphaEdit(KeySumMemit):
    """AlphaEdit: null-space-projected batched updates with the keys of earlier batches accumulated."""

    name: ClassVar[str] = "alphaedit"
    HParams: ClassVar[type] = AlphaEditHParams

    def __init__(self, hparams: AlphaEditHParams | None = None) -> None:
        super().__init__(hparams)
        self._basis: dict[int, torch.Tensor] = {}

    def set_projector(self, path: str, model: torch.nn.Module) -> None:
        """Use AlphaEdit's saved ``null_space_project.pt`` (one projector per edited layer, in the order of
        ``hparams.layers``) instead of computing the projectors from the statistics."""
        from ..arch import arch_for, get_module, weight_matrix
        from .published import load_projector_file

        arch = arch_for(model)
        d_in = weight_matrix(get_module(model, arch.rewrite_name(self.hparams.layers[0]))).shape[1]
        by_layer = load_projector_file(path, list(self.hparams.layers), d_in)
        device = next(model.parameters()).device
        self._basis = {layer: u.to(device) for layer, u in by_layer.items()}

    def basis(self, layer: int, env: EditEnv) -> torch.Tensor:
        """U of the projector at ``layer`` (computed once)."""
        if layer not in self._basis:
            self._basis[layer] = null_space_basis(env.stats[layer], self.hparams.nullspace_threshold).double()
        return self._basis[layer]

    def solve(self, layer: int, keys: torch.Tensor, resid: torch.Tensor, env: EditEnv
              ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """AlphaEdit's factors at ``layer``; the keys wait for ``commit`` to join the cache."""
        d_in = keys.shape[0]
        kk = self.cache.get(layer)
        if kk is None:
            kk = torch.zeros(d_in, d_in, dtype=torch.float64, device=keys.device)
        out = alphaedit_solve(keys, resid, self.basis(layer, env), kk, self.hparams.l2)
        self._hold(layer, keys)
        return out

