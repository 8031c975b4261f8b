"""Hyperspherical energy (SPHERE's signal): the formula on small matrices, and a run's recorded and replayed values."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from collapsediag import EditSession, get_editor, load_run
from collapsediag.errors import CollapseDiagError
from collapsediag.runs.rebuild import run_energy
from collapsediag.signals.energy import hyperspherical_energy
from tests.test_session import GOOD


def _brute(w, s=1.0):
    u = [r / r.norm() for r in w.double() if r.norm() > 0]
    pairs = [(a - b).norm().item() ** -s for a, b in itertools.permutations(u, 2)]
    return sum(pairs) / len(pairs)


def test_orthonormal_rows_are_sqrt2_apart():
    assert hyperspherical_energy(torch.eye(5)) == pytest.approx(1 / math.sqrt(2))
    assert hyperspherical_energy(torch.eye(5), s=2.0) == pytest.approx(0.5)


@pytest.mark.parametrize("s", [0.5, 1.0, 2.0])
def test_matches_the_double_sum_in_chunks(s):
    w = torch.randn(13, 7, generator=torch.Generator().manual_seed(0))
    want = _brute(w, s)
    assert hyperspherical_energy(w, s) == pytest.approx(want, rel=1e-12)  # float32 input, float64 Gram
    assert hyperspherical_energy(w.double(), s) == pytest.approx(want, rel=1e-12)
    assert hyperspherical_energy(w.double(), s, chunk=4) == pytest.approx(want, rel=1e-12)


def test_row_scale_and_zero_rows_do_not_count():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(9, 6, generator=g)
    scaled = w * torch.rand(9, 1, generator=g).add(0.1) * 7
    assert hyperspherical_energy(scaled) == pytest.approx(hyperspherical_energy(w), rel=1e-6)
    with_zero = torch.cat([w, torch.zeros(1, 6)])
    assert hyperspherical_energy(with_zero) == pytest.approx(hyperspherical_energy(w), rel=1e-9)
    assert math.isnan(hyperspherical_energy(torch.ones(1, 4)))
    with pytest.raises(ValueError, match="s must be positive"):
        hyperspherical_energy(w, s=0)


def test_a_nan_or_inf_gives_nan_and_nearly_parallel_rows_keep_their_distance():
    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    for bad in (float("nan"), float("inf")):
        broken = w.clone()
        broken[2, 1] = bad
        assert math.isnan(hyperspherical_energy(broken))
    e = torch.tensor([[1.0, 0.0], [1.0, 1e-5]])  # 1e-5 apart on the sphere: float32's cosine would say 4.5e-4
    assert hyperspherical_energy(e) == pytest.approx(1e5, rel=1e-3)


def test_rows_pulled_together_raise_the_energy():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 30, generator=g)
    direction = torch.randn(1, 30, generator=g)
    crowded = w + 3 * torch.ones(40, 1) @ direction  # a rank-one edit adding the same direction to every row
    assert hyperspherical_energy(crowded) > 1.2 * hyperspherical_energy(w)
    dup = torch.cat([w, w[:1]])  # a duplicated row is at distance 0: large, finite
    assert math.isfinite(hyperspherical_energy(dup)) and hyperspherical_energy(dup) > hyperspherical_energy(w)


def test_run_records_energy_and_replay_gives_the_same(tiny, env_for, tmp_path):
    model, tok = tiny
    env = env_for(model, [1], tmp_path)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    s = EditSession(model, tok, get_editor("memit", {"layers": [1], "z_num_grad_steps": 3}), out=tmp_path / "run",
                    stats=env.stats, templates=env.templates, progress=False)
    s.run(GOOD * 2, batch_size=2, progress=False)
    run = load_run(tmp_path / "run")
    assert run.layers["weight_energy"].notna().all()
    assert (run.layers["weight_energy_ratio"] != 1.0).all()
    model.load_state_dict(base)
    replay = run_energy(run, model)
    assert replay["edit_index"].tolist() == run.layers["edit_index"].tolist()
    assert replay["weight_energy"].to_numpy() == pytest.approx(run.layers["weight_energy"].to_numpy(), rel=1e-6)
    assert replay["weight_energy_ratio"].to_numpy() == pytest.approx(
        run.layers["weight_energy_ratio"].to_numpy(), rel=1e-6)


def test_run_energy_refuses_a_run_of_edits_made_alone(tiny, env_for, tmp_path):
    from collapsediag.experiments.alone import edit_each_alone

    model, tok = tiny
    env = env_for(model, [1], tmp_path)
    edit_each_alone(model, tok, GOOD, ["rome"], texts=["The city of music is old."], layer=1,
                    templates=env.templates, out=tmp_path / "alone", hparams={"v_num_grad_steps": 2},
                    stats=env.stats)
    with pytest.raises(CollapseDiagError, match="alone"):
        run_energy(load_run(tmp_path / "alone" / "rome"), model)
