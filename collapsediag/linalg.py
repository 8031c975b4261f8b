"""Small dense linear algebra shared by the editors' diagnostics."""
from __future__ import annotations

import numpy as np
import torch

DENSE_BELOW = 64  # matrices smaller than this get a full eigendecomposition


def spd_condition(a: torch.Tensor, chol: torch.Tensor | None = None, tol: float = 1e-3) -> float:
    """κ₂ = λ_max / λ_min of a symmetric positive definite matrix.

    Large matrices use Lanczos (ARPACK) on A for λ_max and on A⁻¹ (through the Cholesky factor ``chol``)
    for 1/λ_min: a few dozen matrix-vector products instead of an O(d³) eigendecomposition (0.06 s
    against 0.19 s at d = 1536; relative error about 1e-6 at the default ``tol``).
    """
    if a.shape[0] < DENSE_BELOW:
        ev = torch.linalg.eigvalsh(a)
        return float(ev[-1] / ev[0]) if ev[0] > 0 else float("inf")
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    if chol is None:
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) != 0:
            return float("inf")
    a64, l64 = a.double().cpu(), chol.double().cpu()
    d = a.shape[0]
    start = np.ones(d) / np.sqrt(d)

    def mul(x: np.ndarray) -> np.ndarray:
        return (a64 @ torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).reshape(-1)).numpy()

    def inv(x: np.ndarray) -> np.ndarray:
        rhs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).reshape(-1, 1)
        return torch.cholesky_solve(rhs, l64).reshape(-1).numpy()

    try:
        hi = eigsh(LinearOperator((d, d), matvec=mul, dtype=np.float64), k=1, which="LA", tol=tol, v0=start,
                   return_eigenvectors=False)[0]
        inv_lo = eigsh(LinearOperator((d, d), matvec=inv, dtype=np.float64), k=1, which="LA", tol=tol, v0=start,
                       return_eigenvectors=False)[0]
    except ArpackNoConvergence:
        ev = torch.linalg.eigvalsh(a64)
        return float(ev[-1] / ev[0]) if ev[0] > 0 else float("inf")
    return float(hi * inv_lo)
