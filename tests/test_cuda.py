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


@pytest.mark.parametrize("editor", ["rome", "memit", "alphaedit"])
def test_model_split_across_cpu_and_gpu_with_device_map(tok, env_for, tmp_path, editor):
    """Layers 0–1 on the CPU, layer 2 and the head on the GPU: every tensor an editor or the evaluation makes must
    sit with the module it works with, or an edit fails with a 'same device' error in its status."""
    from accelerate import dispatch_model

    cpu = make_model("llama", len(tok))
    env = env_for(cpu, [1, 2], tmp_path)
    split = dispatch_model(copy.deepcopy(cpu), device_map={"model.embed_tokens": "cpu", "model.layers.0": "cpu",
                                                           "model.layers.1": "cpu", "model.layers.2": 0,
                                                           "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0})
    hp = dict(HP.get(editor, {}), **({"layers": [1, 2]} if editor != "rome" else {}))
    s = EditSession(split, tok, get_editor(editor, hp), out=tmp_path / "run", stats=env.stats,
                    templates=env.templates, progress=False, eval_every=2, eval_texts=["The city of music."],
                    generation_prompts=["The city"], generation_tokens=4)
    rows = s.run(RECORDS, progress=False)
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
