"""Key statistics and projectors in the layout the field publishes them (np.savez / torch.save as the reference
code writes them, not through collapsediag's writer)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from collapsediag.arch import arch_for
from collapsediag.errors import CollapseDiagError
from collapsediag.editors.published import find_stats_file, load_projector_file, published_stats
from collapsediag.stats import StatsCache, TextCorpus
from tests.conftest import corpus_texts, make_model


def _write_rome_npz(path, mom2_sum, count, sample_size=100000):
    """As rome/layer_stats.py: np.savez(filename, **stat.state_dict()), RunningStats keys prefixed 'mom2.'."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{"mom2.count": np.array(count), "mom2.mom2": mom2_sum.astype(np.float32),
                      "mom2.constructor": np.array("util.runningstats.SecondMoment()"),
                      "sample_size": np.array(sample_size)})


@pytest.fixture
def tiny_stats(tok, tmp_path):
    model = make_model("llama", len(tok))
    arch = arch_for(model)
    ours = StatsCache(tmp_path / "cache").get(model, tok, arch, [1, 2], TextCorpus.from_texts(corpus_texts(300)),
                                              n_tokens=4000, seq_len=32, progress=False)
    return model, arch, ours


def test_rome_layout_reads_as_the_same_statistics(tiny_stats, tmp_path):
    model, arch, ours = tiny_stats
    root = tmp_path / "stats"
    for layer, s in ours.items():
        name = f"{arch.rewrite_name(layer)}_float32_mom2_100000.npz"
        _write_rome_npz(root / "tiny-llama" / "wikipedia_stats" / name, (s.mom2 * s.count).numpy(), s.count)
    loaded = published_stats(root, model, arch, [1, 2])
    for layer, s in ours.items():
        assert torch.allclose(loaded[layer].mom2, s.mom2, rtol=1e-5, atol=1e-7)
        assert loaded[layer].count == s.count and loaded[layer].identity["sample_size"] == 100000
        assert loaded[layer].identity["file"].endswith("_float32_mom2_100000.npz")


def test_the_t_variant_and_the_npz_folder_itself(tiny_stats, tmp_path):
    model, arch, ours = tiny_stats
    folder = tmp_path / "gpt" / "wikipedia_stats"
    s = ours[1]
    _write_rome_npz(folder / f"{arch.rewrite_name(1)}_float32_mom2_t10000_20000.npz", (s.mom2 * s.count).numpy(),
                    s.count, sample_size=20000)
    _write_rome_npz(folder / f"{arch.rewrite_name(1)}_float32_mom2_1000.npz", np.eye(s.mom2.shape[0]), 5)
    path = find_stats_file(folder, arch.rewrite_name(1))
    assert path.name.endswith("_t10000_20000.npz")  # the larger sample wins
    assert torch.allclose(published_stats(folder, model, arch, [1])[1].mom2, s.mom2, rtol=1e-5, atol=1e-7)


def test_statistics_of_another_model_are_refused_or_warned(tiny_stats, tmp_path):
    model, arch, ours = tiny_stats
    d = ours[1].mom2.shape[0]
    root = tmp_path / "stats"
    _write_rome_npz(root / "gpt2-xl" / "wikipedia_stats" / f"{arch.rewrite_name(1)}_float32_mom2_100000.npz",
                    np.eye(d + 3), 10)
    with pytest.raises(CollapseDiagError, match="another model"):
        published_stats(root, model, arch, [1])
    _write_rome_npz(root / "gpt2-xl" / "wikipedia_stats" / f"{arch.rewrite_name(1)}_float32_mom2_100000.npz",
                    np.eye(d), 10)
    with pytest.warns(UserWarning, match="gpt2-xl"):
        published_stats(root, model, arch, [1], model_name="my/tiny-llama")
    with pytest.raises(CollapseDiagError, match="no key-statistics file"):
        published_stats(root, model, arch, [2])
    bad = root / "x" / "wikipedia_stats" / f"{arch.rewrite_name(2)}_float32_mom2_10.npz"
    bad.parent.mkdir(parents=True)
    np.savez(bad, something=np.eye(d))
    with pytest.raises(CollapseDiagError, match="not a rome/memit statistics file"):
        published_stats(root, model, arch, [2])


def test_alphaedit_projector_file_stands_in_for_the_computed_one(tiny_stats, tmp_path):
    from collapsediag.editors import get_editor
    from collapsediag.editors.alphaedit import null_space_basis

    model, arch, ours = tiny_stats
    threshold = float(torch.linalg.eigvalsh(ours[1].mom2)[3])  # a few directions below it
    bases = [null_space_basis(ours[layer], threshold).double() for layer in (1, 2)]
    torch.save(torch.stack([u @ u.T for u in bases]).float(), tmp_path / "null_space_project.pt")  # as AlphaEdit
    editor = get_editor("alphaedit", {"layers": [1, 2], "nullspace_threshold": threshold})
    editor.set_projector(str(tmp_path / "null_space_project.pt"), model)
    for layer, u in zip((1, 2), bases):
        got = editor._basis[layer]
        assert got.shape == u.shape
        assert torch.allclose(got @ got.T, u @ u.T, atol=1e-5)
    with pytest.raises(CollapseDiagError, match="2 projectors"):
        load_projector_file(tmp_path / "null_space_project.pt", [1], bases[0].shape[0])


def test_run_with_stats_dir_records_the_file_and_resumes(tok, tmp_path):
    from collapsediag import load_run
    from collapsediag.cli import main

    model = make_model("llama", len(tok))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    arch = arch_for(model)
    d = model.model.layers[1].mlp.down_proj.weight.shape[1]
    g = np.random.default_rng(0).normal(size=(d, d))
    _write_rome_npz(tmp_path / "stats" / "model" / "wikipedia_stats" / f"{arch.rewrite_name(1)}_float32_mom2_100000.npz",
                    g @ g.T + d * np.eye(d), 1000)
    facts = tmp_path / "f.jsonl"
    facts.write_text("".join(json.dumps({"subject": s, "prompt": "{} is located in", "target_new": "Italy",
                                         "target_true": "Africa"}) + "\n" for s in ("Angola", "Tokyo", "Paris")))
    args = ["run", "--model", str(tmp_path / "model"), "--editor", "rome", "--layers", "1", "--data", f"facts:{facts}",
            "--hparam", "v_num_grad_steps=2", "--context", "1", "--stats-dir", str(tmp_path / "stats"),
            "--out", str(tmp_path / "run"), "--n-edits", "2"]
    assert main(args) == 0
    ident = load_run(tmp_path / "run").config["stats"]["1"]
    assert ident["source"] == "published" and ident["token_count"] == 1000 and ident["file"].endswith(".npz")
    lines = (tmp_path / "run" / "edits.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "run" / "edits.jsonl").write_text(lines[0])  # as if killed after the first edit
    assert main(["run", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "run"), "--resume"]) == 0
    run = load_run(tmp_path / "run")
    assert len(run.edits) == 2 and run.config["stats"]["1"]["source"] == "published"
