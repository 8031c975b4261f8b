"""Spectral signals of an edited matrix (ALGORITHMS.md §15), by warm-started subspace iteration.

Per edit: σ₁(W) and σ₁(W)/σ₁(W₀), σ₁(W − W₀), the concentration σ₁(W − W₀)/‖W − W₀‖_F and the spectral
entropy of W − W₀ over its top ``k`` singular values (pᵢ = σᵢ²/Σⱼ≤ₖσⱼ², in nats, at most log k). At
checkpoints: cond(W) = σ_max/σ_min, σ_min by inverse iteration on the Gram matrix of W's shorter side.

Each edit changes W by a low-rank update, so the singular subspaces move little: every call starts from the
previous call's subspace and usually converges in a few products with W (never a dense SVD per edit).
"""
from __future__ import annotations

import math

import torch

TOP_K = 8  # singular values of W − W₀ in drift_entropy
OVERSAMPLE = 4  # extra block vectors: the top k converge at the rate of σ_{k+p+1}/σ_k, not σ_{k+1}/σ_k
TOL = 1e-5  # relative change of every tracked singular value between two iterations
MAX_ITER = 300


def top_singular_values(a: torch.Tensor, block: torch.Tensor | None, k: int, tol: float = TOL,
                        max_iter: int = MAX_ITER) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The ``k`` largest singular values of ``a`` [m, n] (descending, float64), the right block to warm-start
    the next call with, and the number of iterations.

    Block subspace iteration with Rayleigh–Ritz: V ← qr(Aᵀ qr(A V)); the singular values of the k×k factor
    are the Ritz values. ``block`` is a previous call's block (or None: a seeded random start).
    """
    a = a.float() if a.dtype != torch.float64 else a  # products in the matrix's precision (fp32 for fp32 weights)
    m, n = a.shape
    width = min(k + OVERSAMPLE, m, n)
    if block is None or block.shape != (n, width):
        gen = torch.Generator(device="cpu").manual_seed(0)
        block = torch.randn(n, width, generator=gen, dtype=torch.float64).to(a.device)
    v = torch.linalg.qr(block.to(a.device, a.dtype)).Q
    prev = None
    sigma = torch.zeros(width, dtype=a.dtype, device=a.device)
    it = 0
    for it in range(1, max_iter + 1):
        u = torch.linalg.qr(a @ v).Q
        v, r = torch.linalg.qr(a.T @ u)
        _, sigma, vh = torch.linalg.svd(r.T)  # Uᵀ A V = Rᵀ
        v = v @ vh.T  # rotate to the Ritz vectors, ordered by σ
        top = sigma[:k]
        if prev is not None and bool(((top - prev).abs() <= tol * top[0].clamp_min(1e-300)).all()):
            break
        prev = top
    return sigma[:min(k, width)].double(), v, it


def spectral_entropy(sigma: torch.Tensor) -> float:
    """−Σ pᵢ log pᵢ with pᵢ = σᵢ²/Σσⱼ² (nats); 0 for a rank-one or zero matrix."""
    s2 = sigma.double() ** 2
    total = float(s2.sum())
    if total <= 0:
        return 0.0
    p = s2 / total
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def smallest_singular_value(a: torch.Tensor, tol: float = 1e-10, max_iter: int = 500) -> float:
    """σ_min of ``a`` [m, n] over its min(m, n) singular values, by inverse iteration on the Gram matrix of the
    shorter side (one Cholesky factorisation, then triangular solves); 0 when that matrix is singular."""
    a = a.double()
    g = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0:
        return 0.0
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(g.shape[0], 1, generator=gen, dtype=torch.float64).to(g.device)
    x = x / x.norm()
    lam = prev = float("inf")
    for _ in range(max_iter):
        y = torch.cholesky_solve(x, chol)
        lam = 1.0 / float(y.norm())  # ‖G⁻¹x‖ → 1/λ_min
        x = y / y.norm()
        if abs(prev - lam) <= tol * lam:
            break
        prev = lam
    lam = float((x.T @ g @ x).squeeze())  # Rayleigh quotient of the converged vector
    return math.sqrt(max(lam, 0.0))


class SpectralTracker:
    """The spectral signals of one edited matrix over a run, each call warm-started from the previous one."""

    def __init__(self, w0: torch.Tensor, k: int = TOP_K) -> None:
        self.w0 = w0.detach()
        self.k = k
        self._w_block: torch.Tensor | None = None
        self._d_block: torch.Tensor | None = None
        self.iterations = 0  # products with W or W − W₀ in the last update (for benchmarks)
        s, self._w_block, _ = top_singular_values(self.w0, None, 1)
        self.sigma1_w0 = float(s[0])

    def update(self, w: torch.Tensor) -> dict[str, float]:
        """The per-edit signals of the current weights ``w`` (Linear orientation, same shape as W₀)."""
        w = w.detach()
        s_w, self._w_block, it_w = top_singular_values(w, self._w_block, 1)
        drift = w.float() - self.w0.float()
        fro = float(drift.double().norm())
        out = {"weight_sigma1": float(s_w[0]), "weight_sigma1_ratio": float(s_w[0]) / self.sigma1_w0}
        if fro == 0.0:
            self.iterations = it_w
            return {**out, "drift_sigma1": 0.0, "drift_concentration": float("nan"), "drift_entropy": float("nan")}
        s_d, self._d_block, it_d = top_singular_values(drift, self._d_block, self.k)
        self.iterations = it_w + it_d
        return {**out, "drift_sigma1": float(s_d[0]), "drift_concentration": float(s_d[0]) / fro,
                "drift_entropy": spectral_entropy(s_d)}

    @staticmethod
    def condition(w: torch.Tensor) -> float:
        """cond(W) = σ_max/σ_min (inf when W is rank deficient); meant for checkpoints, not every edit."""
        s_max = float(top_singular_values(w, None, 1)[0][0])
        s_min = smallest_singular_value(w)
        return s_max / s_min if s_min > 0 else float("inf")
