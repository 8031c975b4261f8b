"""Half-precision models: the forward passes run in bf16, the target, statistics, solves and norms do not."""
from __future__ import annotations

import json

import pytest
import torch

from collapsediag import EditSession, load_model, load_run
from collapsediag.editors import get_editor
from collapsediag.errors import CollapseDiagError
from tests.conftest import make_model
from tests.test_watch import REQ, TEMPLATES


def _edit(model, tok, env, name="rome", hp=None):
    s = EditSession(model, tok, get_editor(name, hp or {"layer": 1, "v_num_grad_steps": 5}), stats=env.stats,
                    templates=TEMPLATES, progress=False)
    s.edit(REQ)
    return s


@pytest.mark.parametrize("name,hp", [("rome", {"layer": 1, "v_num_grad_steps": 5}),
                                     ("memit", {"layers": [1, 2], "z_num_grad_steps": 5, "mom2_update_weight": 1.0})])
def test_bf16_update_matches_fp32_within_bf16_precision(tok, env_for, tmp_path, name, hp, recwarn, monkeypatch):
    """The same edit on a bf16 copy of a model. MEMIT's z is optimised under a clamp of 0.75‖h‖ that binds
    after Adam's first sign-like steps, so on a random tiny model (flat loss) its direction follows the
    rounding of tiny gradients: both runs get the fp32 run's z, and the keys, residuals and solve are compared."""
    import collapsediag.editors.memit as memit_module

    fp32 = make_model("llama", len(tok))
    env = env_for(fp32, [1, 2], tmp_path)
    bf16 = make_model("llama", len(tok)).to(torch.bfloat16)
    a = _edit(fp32, tok, env, name, hp)
    if name == "memit":
        fp_targets = {}
        real = memit_module.targets_for
        fp32_again = make_model("llama", len(tok))
        monkeypatch.setattr(memit_module, "targets_for", lambda m, t, rs, e, mod, st, batched=True: [
            fp_targets.setdefault(str(r.case_id), real(fp32_again, t, [r], e, mod, st)[0]) for r in rs])
    b = _edit(bf16, tok, env, name, hp)
    from collapsediag.arch import get_module, weight_matrix

    for layer in a.layers:
        module = env.arch.rewrite_name(layer)
        da = weight_matrix(get_module(fp32, module)).double() - a.w0[layer].double()
        db = weight_matrix(get_module(bf16, module)).double() - b.w0[layer].double()
        # bf16 keeps 8 bits of mantissa: keys, values and the target differ by about 1 %, and the update built
        # from them by up to a quarter on these tiny random models (the stated tolerance)
        assert float((db - da).norm() / da.norm()) < 0.25, layer
        assert float(torch.nn.functional.cosine_similarity(da.flatten(), db.flatten(), dim=0)) > 0.97, layer
        rb = [r for r in b.layer_rows if r["layer"] == layer][0]
        assert isinstance(rb["weight_sigma1"], float) and rb["weight_sigma1"] > 0
    assert b.edits[0]["status"] == "ok"
    assert not [w for w in recwarn if "suffix forward" in str(w.message)]  # the fast path holds in bf16 too


def test_target_is_optimised_in_float32(tok, env_for, tmp_path):
    from collapsediag.editors.target import TargetSettings, optimise_target

    model = make_model("llama", len(tok)).to(torch.bfloat16)
    env = env_for(make_model("llama", len(tok)), [1], tmp_path)
    res = optimise_target(model, tok, get_editor("rome").hparams and __import__("collapsediag").EditRequest(
        case_id=0, subject=REQ["subject"], prompt=REQ["prompt"], target_new=REQ["target_new"],
        target_true=REQ["target_true"]), TEMPLATES, env.arch.block_name(1), TargetSettings(steps=3), env.arch)
    assert res.delta.dtype == torch.float32 and res.init.dtype == torch.float32 and res.delta.norm() > 0


def test_load_model_dtype_by_name_and_cli(tok, tmp_path):
    from collapsediag.cli import main

    make_model("llama", len(tok)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    model, _ = load_model(str(tmp_path / "model"), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(CollapseDiagError, match="dtype"):
        load_model(str(tmp_path / "model"), dtype="float8")
    facts = tmp_path / "f.jsonl"
    facts.write_text(json.dumps({k: v for k, v in REQ.items() if k != "case_id"}) + "\n")
    assert main(["run", "--model", str(tmp_path / "model"), "--dtype", "bfloat16", "--editor", "rome", "--layers", "1",
                 "--hparam", "v_num_grad_steps=2", "--context", "1", "--data", f"facts:{facts}", "--out",
                 str(tmp_path / "run"), "--stats-tokens", "3000", "--cache-dir", str(tmp_path / "c")]) == 0
    run = load_run(tmp_path / "run")
    assert run.config["dtype"] == "torch.bfloat16" and run.edits["status"].eq("ok").all()


def test_bf16_run_saves_and_rebuilds_bit_for_bit(tok, env_for, tmp_path):
    from collapsediag.arch import get_module, weight_matrix
    from collapsediag.editors.target import TargetCache

    model = make_model("llama", len(tok)).to(torch.bfloat16)
    env = env_for(make_model("llama", len(tok)), [1], tmp_path / "stats")
    s = EditSession(model, tok, get_editor("rome", {"layer": 1, "v_num_grad_steps": 2}), out=tmp_path / "run",
                    stats=env.stats, templates=TEMPLATES, progress=False, snapshot_every=1,
                    target_cache=TargetCache())
    s.edit(REQ)
    s.edit(dict(REQ, case_id="b", subject="Tokyo"))
    run = load_run(tmp_path / "run")
    assert run.snapshots() == [0, 1]
    name = env.arch.rewrite_name(1)
    live = weight_matrix(get_module(model, name))
    for start_from_snapshot in (True, False):
        if not start_from_snapshot:
            for p in (tmp_path / "run" / "snapshots").glob("*.npz"):
                p.unlink()
        rebuilt = run.model_at(1, model=make_model("llama", len(tok)).to(torch.bfloat16))
        assert torch.equal(weight_matrix(get_module(rebuilt, name)), live)
