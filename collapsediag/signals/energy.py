"""Hyperspherical energy of an edited matrix (SPHERE's signal, Liu et al. 2025, arXiv 2510.01172).

The rows wᵢ of W ∈ R^{d_out×d_in} (one per output unit, over the key space) are put on the unit sphere,
ŵᵢ = wᵢ/‖wᵢ‖, and their energy is the mean Riesz s-energy over ordered pairs i ≠ j:

    HE(W) = 1/(n(n−1)) · Σ_{i≠j} ‖ŵᵢ − ŵⱼ‖^(−s),  with ‖ŵᵢ − ŵⱼ‖² = 2 − 2 ŵᵢ·ŵⱼ   (s = 1 by default)

Uniformly spread rows have low energy; rows that crowd together (an edit pulling many rows toward one
direction) raise it. The mean (not the sum) makes matrices of different sizes comparable; the signal a run
records is HE(W)/HE(W₀). Rows of zero norm have no direction and are left out.

>>> hyperspherical_energy(torch.randn(64, 32))
>>> collapsediag.runs.rebuild.run_energy(load_run("runs/memit"), model)   # per batch, from the saved updates
"""
from __future__ import annotations

import torch


MIN_DISTANCE = 1e-6  # two rows closer than this on the sphere count as this far apart (no infinite energy)
CHUNK = 1024  # rows of the Gram matrix computed at once


def hyperspherical_energy(w: torch.Tensor, s: float = 1.0, chunk: int = CHUNK) -> float:
    """HE(W): the mean Riesz ``s``-energy of W's normalised rows (module docstring); NaN for fewer than two rows.

    The Gram matrix is computed ``chunk`` rows at a time in float64 (nearly parallel rows keep their true
    distance instead of float32's floor of about 5e-4), so memory stays O(chunk · n). A matrix holding a NaN
    or an infinity has no energy: NaN."""
    if s <= 0:
        raise ValueError(f"s must be positive, got {s}")
    w = w.detach().double()
    if not bool(torch.isfinite(w).all()):
        return float("nan")
    norms = w.norm(dim=1)
    u = w[norms > 0] / norms[norms > 0, None]
    n = u.shape[0]
    if n < 2:
        return float("nan")
    total = torch.zeros((), dtype=torch.float64, device=w.device)
    for i in range(0, n, chunk):
        cos = u[i:i + chunk] @ u.T
        dist = (2.0 - 2.0 * cos).clamp_min(MIN_DISTANCE ** 2).sqrt()
        rows = torch.arange(i, min(i + chunk, n), device=w.device)
        dist[torch.arange(len(rows), device=w.device), rows] = float("inf")  # no self pairs
        total += dist.pow(-s).sum()
    return float(total / (n * (n - 1)))
