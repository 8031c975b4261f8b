"""The spectral signals against a dense SVD on small matrices (rtol 1e-3), across a sequence of low-rank edits."""
from __future__ import annotations

import math

import pytest
import torch

from collapsediag.signals.spectral import (TOP_K, SpectralTracker, smallest_singular_value, spectral_entropy,
                                   top_singular_values)


def _dense(w, w0):
    s_w = torch.linalg.svdvals(w.double())
    s_d = torch.linalg.svdvals((w - w0).double())
    top = s_d[:TOP_K]
    p = top ** 2 / (top ** 2).sum()
    return {"weight_sigma1": float(s_w[0]), "weight_sigma1_ratio": float(s_w[0] / torch.linalg.svdvals(w0.double())[0]),
            "drift_sigma1": float(s_d[0]), "drift_concentration": float(s_d[0] / (w - w0).double().norm()),
            "drift_entropy": float(-(p[p > 0] * p[p > 0].log()).sum()), "condition": float(s_w[0] / s_w[-1])}


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_tracker_matches_dense_svd_along_a_run(shape):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(*shape, generator=g)
    w = w0.clone()
    tracker = SpectralTracker(w0)
    for step in range(14):  # rank grows past TOP_K: the entropy then covers the top 8 of a rank-14 drift
        w = w + torch.randn(shape[0], 1, generator=g) @ torch.randn(1, shape[1], generator=g) * (0.3 + 0.1 * step)
        got, want = tracker.update(w), _dense(w, w0)
        for key in ("weight_sigma1", "weight_sigma1_ratio", "drift_sigma1", "drift_concentration", "drift_entropy"):
            assert got[key] == pytest.approx(want[key], rel=1e-3), (step, key)
    assert tracker.condition(w) == pytest.approx(want["condition"], rel=1e-3)


def test_warm_start_needs_fewer_iterations():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(60, 90, generator=g)
    _, block, cold = top_singular_values(w, None, 4)
    w2 = w + 0.01 * torch.randn(60, 1, generator=g) @ torch.randn(1, 90, generator=g)
    s, _, warm = top_singular_values(w2, block, 4)
    assert warm < cold
    assert s[:4].tolist() == pytest.approx(torch.linalg.svdvals(w2.double())[:4].tolist(), rel=1e-4)


def test_edge_cases():
    w0 = torch.eye(5)
    t = SpectralTracker(w0)
    first = t.update(w0.clone())  # no change yet
    assert first["drift_sigma1"] == 0.0 and math.isnan(first["drift_concentration"])
    rank_one = t.update(w0 + torch.ones(5, 1) @ torch.ones(1, 5))
    assert rank_one["drift_concentration"] == pytest.approx(1.0) and rank_one["drift_entropy"] == pytest.approx(0, abs=1e-6)
    assert spectral_entropy(torch.ones(8)) == pytest.approx(math.log(8))
    assert smallest_singular_value(torch.diag(torch.tensor([3.0, 2.0, 0.5]))) == pytest.approx(0.5)
    singular = torch.ones(3, 3)
    assert SpectralTracker.condition(singular) == math.inf
