"""On a GPU, when there is one: the editors run where the model is and agree with the CPU (skipped otherwise)."""
from __future__ import annotations

import copy

import pytest
import torch

from collapsediag import EditSession, get_editor

from conftest import make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

RECORDS = [
    {"case_id": "a", "subject": "Danielle Darrieux", "prompt": "The mother tongue of {} is",
     "target_new": "English", "target_true": "French"},
    {"case_id": "b", "subject": "Angola", "prompt": "{} is located in", "target_new": "Italy",
     "target_true": "Africa"},
]
HP = {"rome": {"layer": 1, "v_num_grad_steps": 4}, "r-rome": {"layer": 1, "v_num_grad_steps": 4},
      "memit": {"layers": [0, 1], "z_num_grad_steps": 4}, "emmet": {"layers": [1], "z_num_grad_steps": 4},
      "d4s": {"layers": [0, 1], "z_num_grad_steps": 4}, "alphaedit": {"layers": [0, 1], "z_num_grad_steps": 4}}


@pytest.mark.parametrize("editor", list(HP))
def test_editor_on_cuda_matches_cpu(tok, env_for, tmp_path, editor):
    cpu = make_model("llama", len(tok))
    gpu = copy.deepcopy(cpu).to("cuda")
    ed = get_editor(editor, HP[editor])
    env = env_for(cpu, ed.layers(), tmp_path)
    weights = {}
    for i, model in enumerate((cpu, gpu)):
        stats = {k: copy.deepcopy(v) for k, v in env.stats.items()}
        for s in stats.values():
            s.mom2 = s.mom2.to(next(model.parameters()).device)
        s = EditSession(model, tok, get_editor(editor, HP[editor]), out=tmp_path / f"run{i}",
                        stats=stats, templates=env.templates, progress=False)
        rows = s.run(RECORDS, progress=False)
        assert [r["status"] for r in rows] == ["ok", "ok"]
        assert all(r["condition"] >= 1 for r in s.layer_rows)
        weights[i] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    assert next(gpu.parameters()).is_cuda
    for name, w in weights[0].items():
        assert torch.allclose(weights[1][name], w, rtol=1e-3, atol=1e-4), name
