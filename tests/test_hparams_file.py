"""EasyEdit hparams files, written in EasyEdit's layout (hparams/<METHOD>/<model>.yaml)."""
from __future__ import annotations

import json

import pytest

from collapsediag.editors import get_editor
from collapsediag.errors import CollapseDiagError
from collapsediag.editors.hparams_file import check_environment, read_hparams_file
from tests.conftest import make_model

ROME_LLAMA = """alg_name: "ROME"
model_name: "./hugging_cache/llama-2-7b"
stats_dir: "./data/stats"
device: 0
layers: [1]
fact_token: "subject_last"
v_num_grad_steps: 25
v_lr: 5e-1
v_loss_layer: 2
v_weight_decay: 1e-3
clamp_norm_factor: 4
kl_factor: 0.0625
mom2_adjustment: false
context_template_length_params: [[5, 3], [10, 2]]
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
model_parallel: false
fp16: false
"""

MEMIT_LLAMA = """alg_name: "MEMIT"
model_name: "./hugging_cache/llama-2-7b"
stats_dir: "./data/stats"
device: 0
layers: [4, 5, 6, 7, 8]
clamp_norm_factor: 4
layer_selection: "all"
fact_token: "subject_last"
v_num_grad_steps: 25
v_lr: 5e-1
v_loss_layer: 31
v_weight_decay: 1e-3
kl_factor: 0.0625
mom2_adjustment: true
mom2_update_weight: 15000
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
model_parallel: false
"""


def _write(tmp_path, text, name="hp.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_rome_file_maps_onto_the_editor(tmp_path):
    spec = read_hparams_file(_write(tmp_path, ROME_LLAMA))
    assert spec.editor == "rome" and spec.context_lengths == ((5, 3), (10, 2))
    hp = get_editor(spec.editor, spec.hparams).hparams
    assert (hp.layer, hp.v_num_grad_steps, hp.v_lr, hp.v_weight_decay, hp.mom2_adjustment) == (1, 25, 0.5, 1e-3, False)
    assert any(n.startswith("device") for n in spec.notes) and any(n.startswith("mom2_n_samples") for n in spec.notes)


@pytest.mark.parametrize("alg,extra,field,value", [("MEMIT", "", "mom2_update_weight", 15000),
                                                   ("EMMET", "emmet_lambda: 0.1\nupdate_norm_lambda: 0\n",
                                                    "emmet_lambda", 0.1),
                                                   ("AlphaEdit", "nullspace_threshold: 2e-2\nL2: 10\n", "l2", 10)])
def test_batched_files_map_onto_their_editors(tmp_path, alg, extra, field, value):
    text = MEMIT_LLAMA.replace('alg_name: "MEMIT"', f'alg_name: "{alg}"') + extra
    if alg == "AlphaEdit":
        text = text.replace("mom2_adjustment: true\n", "")
    spec = read_hparams_file(_write(tmp_path, text))
    hp = get_editor(spec.editor, spec.hparams).hparams
    assert hp.layers == [4, 5, 6, 7, 8] and hp.z_num_grad_steps == 25 and hp.z_lr == 0.5
    assert getattr(hp, field) == pytest.approx(value)


def test_algorithm_keys_without_counterpart_are_errors(tmp_path):
    with pytest.raises(CollapseDiagError, match="'fancy_trick'"):
        read_hparams_file(_write(tmp_path, ROME_LLAMA + "fancy_trick: 3\n"))
    with pytest.raises(CollapseDiagError, match="fact_token"):
        read_hparams_file(_write(tmp_path, ROME_LLAMA.replace('"subject_last"', '"last"')))
    with pytest.raises(CollapseDiagError, match="one layer"):
        read_hparams_file(_write(tmp_path, ROME_LLAMA.replace("layers: [1]", "layers: [1, 2]")))
    with pytest.raises(CollapseDiagError, match="contradicts"):
        read_hparams_file(_write(tmp_path, ROME_LLAMA), editor="memit")
    with pytest.raises(CollapseDiagError, match="not an editor"):
        read_hparams_file(_write(tmp_path, ROME_LLAMA.replace('"ROME"', '"GRACE"')))


def test_environment_keys_are_checked_against_the_model(tok, tmp_path):
    from collapsediag.arch import arch_for

    model = make_model("llama", len(tok))
    spec = read_hparams_file(_write(tmp_path, ROME_LLAMA))
    notes = check_environment(spec, model, arch_for(model), 3)
    assert not any("v_loss_layer 2 is not" in n for n in notes)  # 2 is the tiny model's last layer
    gpt2 = make_model("gpt2", len(tok))
    with pytest.raises(CollapseDiagError, match="rewrite_module_tmp"):
        check_environment(spec, gpt2, arch_for(gpt2), 3)


def test_run_takes_editor_layers_and_templates_from_the_file(tok, tmp_path):
    from collapsediag import load_run
    from collapsediag.cli import main

    model = make_model("llama", len(tok))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    facts = tmp_path / "f.jsonl"
    facts.write_text(json.dumps({"subject": "Angola", "prompt": "{} is located in", "target_new": "Italy",
                                 "target_true": "Africa"}) + "\n")
    hp = _write(tmp_path, ROME_LLAMA.replace("v_num_grad_steps: 25", "v_num_grad_steps: 2"))
    assert main(["run", "--model", str(tmp_path / "model"), "--hparams-file", str(hp), "--data", f"facts:{facts}",
                 "--out", str(tmp_path / "run"), "--stats-tokens", "3000", "--cache-dir", str(tmp_path / "c")]) == 0
    cfg = load_run(tmp_path / "run").config
    assert cfg["editor"] == "rome" and cfg["hparams"]["layer"] == 1 and cfg["hparams"]["v_num_grad_steps"] == 2
    assert len(cfg["context_templates"]) == 1 + 3 + 2 and cfg["hparams_file"].endswith("hp.yaml")
    assert any("device" in n for n in cfg["hparams_file_notes"])
