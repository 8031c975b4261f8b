"""The speed-ups leave results unchanged: the suffix forward of the target optimisation."""
import contextlib
import os

import pytest
import torch

from collapsediag.arch import arch_for
from collapsediag.editors import suffix
from collapsediag.editors.suffix import PlainForward, SuffixForward, target_forward
from collapsediag.editors.target import TargetSettings, optimise_target, target_batch
from collapsediag.hooks import SkipBlocks
from collapsediag.requests import EditRequest

from conftest import make_model

REQ = EditRequest.from_dict({"subject": "Paris", "prompt": "{} is the capital of", "target_new": "Italy",
                             "target_true": "France"}, case_id="c0")
TEMPLATES = ["{}", "The city of music. {}", "Because you said so and more. {}"]
FAMILIES = ["gpt2", "gptj", "gpt_neox", "llama"]


def _modules(model):
    arch = arch_for(model)
    return arch, [arch.rewrite_name(1), arch.block_name(1)]


@pytest.mark.parametrize("kind", FAMILIES)
def test_suffix_forward_logits_and_gradient_match_plain(tok, kind):
    model = make_model(kind, len(tok))
    arch, modules = _modules(model)
    bt = target_batch(tok, REQ, TEMPLATES)
    for module in modules:
        plain, fast = PlainForward(model, module, bt), SuffixForward(model, arch, 1, module, bt)
        assert torch.allclose(fast.init, plain.init, atol=1e-6)
        assert fast.new_ids.shape[1] < bt.ids.shape[1]  # fewer positions per step
        delta = (0.5 * torch.randn_like(plain.init)).requires_grad_(True)
        got, want = fast.logits(delta), plain.logits(delta)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
        g_fast, = torch.autograd.grad(got.logsumexp(-1).sum(), delta)
        g_plain, = torch.autograd.grad(want.logsumexp(-1).sum(), delta)
        assert torch.allclose(g_fast, g_plain, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(want, plain.logits(torch.zeros_like(delta)), atol=1e-3)  # δ matters


@pytest.mark.parametrize("kind", FAMILIES)
def test_optimise_target_fast_equals_plain(tok, kind):
    model = make_model(kind, len(tok))
    arch, modules = _modules(model)
    settings = TargetSettings(steps=3, lr=0.05, clamp_norm_factor=100.0)
    for module in modules:
        fast = optimise_target(model, tok, REQ, TEMPLATES, module, settings, arch)
        plain = optimise_target(model, tok, REQ, TEMPLATES, module, settings, arch, fast=False)
        assert fast.delta.norm() > 0
        assert (fast.target - plain.target).norm() / plain.target.norm() < 1e-4
        assert fast.loss == pytest.approx(plain.loss, rel=1e-4)


def test_target_batch_split_parts_give_the_same_logits(tok):
    model = make_model("llama", len(tok))
    arch, (rewrite, _) = _modules(model)
    bt = target_batch(tok, REQ, TEMPLATES)
    parts = bt.split(3)
    assert [len(p.ids) for p in parts] == [3, 1] and bt.split(10) == [bt]
    assert sum(p.n_tok for p in parts) == bt.n_tok and sum(p.n_prompts for p in parts) == bt.n_prompts
    assert parts[1].n_prompts == 0 and parts[1].n_tok == 0 and len(parts[1].rows) == 1  # the KL prompt alone
    delta = 0.5 * torch.randn_like(PlainForward(model, rewrite, bt).init)
    whole = PlainForward(model, rewrite, bt).logits(delta)
    got = [PlainForward(model, rewrite, p).logits(delta) for p in parts]
    tok_rows = torch.cat([g[:p.n_tok] for g, p in zip(got, parts)])
    kl_rows = torch.cat([g[p.n_tok:] for g, p in zip(got, parts)])
    assert torch.allclose(tok_rows, whole[:bt.n_tok], atol=1e-5)
    assert torch.allclose(kl_rows, whole[bt.n_tok:], atol=1e-5)
    assert torch.equal(torch.cat([p.target_tokens for p in parts]), bt.target_tokens)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_optimise_target_in_parts_equals_one_pass(tok, kind, monkeypatch):
    from collapsediag.editors import target

    model = make_model(kind, len(tok))
    arch, (rewrite, _) = _modules(model)
    settings = TargetSettings(steps=4, lr=0.05, clamp_norm_factor=100.0)
    monkeypatch.setattr(target, "ROWS_PER_PASS", 100)
    whole = optimise_target(model, tok, REQ, TEMPLATES, rewrite, settings, arch)
    for rows in (1, 2):
        monkeypatch.setattr(target, "ROWS_PER_PASS", rows)
        parts = optimise_target(model, tok, REQ, TEMPLATES, rewrite, settings, arch)
        assert parts.steps == whole.steps == 3 and whole.delta.norm() > 0
        assert (parts.target - whole.target).norm() / whole.target.norm() < 1e-5
        assert parts.loss == pytest.approx(whole.loss, rel=1e-5)
        assert parts.kl == pytest.approx(whole.kl, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("rows, backward_calls", [(100, 0), (2, 2)])
def test_early_stop_skips_the_backward_of_a_single_pass(tok, monkeypatch, rows, backward_calls):
    from collapsediag.editors import target

    model = make_model("llama", len(tok))
    arch, (rewrite, _) = _modules(model)
    calls = []
    backward = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda t, *a, **k: calls.append(1) or backward(t, *a, **k))
    monkeypatch.setattr(target, "EARLY_STOP", 1e9)  # stops after the first forward
    monkeypatch.setattr(target, "ROWS_PER_PASS", rows)
    res = optimise_target(model, tok, REQ, TEMPLATES, rewrite, TargetSettings(steps=4), arch)
    assert res.steps == 0 and len(calls) == backward_calls  # parts back-propagate before the loss is known


def _saved_bytes_and_logits(fwd, delta):
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fwd.logits(delta)
    return sum(sizes), out


def test_grouped_kv_attention_saves_memory_at_the_same_logits(tok, monkeypatch):
    model = make_model("llama", len(tok))  # 4 query heads share 2 key/value heads
    arch, (rewrite, _) = _modules(model)
    fwd = SuffixForward(model, arch, 1, rewrite, target_batch(tok, REQ, TEMPLATES))
    delta = (0.5 * torch.randn_like(fwd.init)).requires_grad_(True)
    monkeypatch.setattr(suffix, "grouped_kv_attention", contextlib.nullcontext)
    plain_bytes, plain = _saved_bytes_and_logits(fwd, delta)
    monkeypatch.undo()
    gqa_bytes, gqa = _saved_bytes_and_logits(fwd, delta)
    assert gqa_bytes < plain_bytes
    assert torch.allclose(gqa, plain, atol=1e-6)
    g1, = torch.autograd.grad(gqa.sum(), delta)
    g2, = torch.autograd.grad(plain.sum(), delta)
    assert torch.allclose(g1, g2, atol=1e-6)


@pytest.mark.parametrize("before", [None, "0"])
def test_grouped_kv_attention_restores_the_switch(monkeypatch, before):
    if before is None:
        monkeypatch.delenv(suffix.GQA_SWITCH, raising=False)
    else:
        monkeypatch.setenv(suffix.GQA_SWITCH, before)
    with pytest.raises(KeyError):
        with suffix.grouped_kv_attention():
            assert os.environ[suffix.GQA_SWITCH] == "1"
            raise KeyError("inside")
    assert os.environ.get(suffix.GQA_SWITCH) == before


def test_target_forward_picks_suffix_and_falls_back_when_check_fails(tok, monkeypatch):
    model = make_model("llama", len(tok))
    arch, (rewrite, _) = _modules(model)
    bt = target_batch(tok, REQ, TEMPLATES)
    assert isinstance(target_forward(model, arch, rewrite, bt), SuffixForward)
    assert isinstance(target_forward(model, arch, rewrite, bt, fast=False), PlainForward)
    assert isinstance(target_forward(model, None, rewrite, bt), PlainForward)
    monkeypatch.setattr(suffix, "CHECK_TOLERANCE", -1.0)
    with pytest.warns(UserWarning, match="differs from the full one"):
        assert isinstance(target_forward(model, arch, rewrite, bt), PlainForward)


def test_rewrite_module_of_unknown_family_uses_plain_forward(tok):
    model = make_model("llama", len(tok))
    arch = arch_for(model).replace(family="custom")
    bt = target_batch(tok, REQ, TEMPLATES)
    assert isinstance(target_forward(model, arch, arch.rewrite_name(1), bt), PlainForward)
    assert isinstance(target_forward(model, arch, arch.block_name(1), bt), SuffixForward)


def test_skip_blocks_restores_blocks_after_an_error(tok):
    model = make_model("gpt2", len(tok))
    arch = arch_for(model)
    blocks = list(model.transformer.h)
    ids = torch.tensor([[1, 2, 3]])
    like = model.transformer.h[0](model.transformer.wte(ids))
    with pytest.raises(RuntimeError, match="boom"):
        with SkipBlocks(model, arch.blocks_name(), 1, like, lambda: torch.zeros(1)):
            assert model.transformer.h[0] is not blocks[0]
            raise RuntimeError("boom")
    assert list(model.transformer.h) == blocks


@pytest.mark.parametrize("d", [8, 300])
def test_spd_condition_matches_the_eigendecomposition(d):
    from collapsediag.linalg import spd_condition

    g = torch.Generator().manual_seed(d)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    ev = torch.logspace(-3, 2, d, dtype=torch.float64)  # κ = 1e5
    a = q @ torch.diag(ev) @ q.T
    assert spd_condition(a) == pytest.approx(1e5, rel=1e-4)
    assert spd_condition(a, torch.linalg.cholesky(a)) == pytest.approx(1e5, rel=1e-4)
    if d >= 64:  # the Lanczos path reports a matrix without a Cholesky factor as infinitely ill-conditioned
        assert spd_condition(-a) == float("inf")


@pytest.mark.parametrize("d, n", [(300, 3), (300, 1), (20, 4), (300, 200)])
def test_diag_lowrank_condition_matches_the_dense_matrix(d, n):
    from collapsediag.linalg import diag_lowrank_condition, spd_extremes

    g = torch.Generator().manual_seed(d + n)
    diag = torch.logspace(-4, 1, d, dtype=torch.float64)[torch.randperm(d, generator=g)]
    low = torch.randn(d, n, generator=g, dtype=torch.float64)
    dense = torch.diag(diag) + low @ low.T
    ev = torch.linalg.eigvalsh(dense)
    assert diag_lowrank_condition(diag, low) == pytest.approx(float(ev[-1] / ev[0]), rel=1e-4)
    lo, hi = spd_extremes(dense)
    assert (lo, hi) == (pytest.approx(float(ev[0]), rel=1e-4), pytest.approx(float(ev[-1]), rel=1e-4))
    diag[0] = 0.0  # not positive definite on its own: the dense fallback still gives κ of the sum
    ev = torch.linalg.eigvalsh(torch.diag(diag) + low @ low.T)
    assert diag_lowrank_condition(diag, low) == pytest.approx(float(ev[-1] / ev[0]), rel=1e-4)


@pytest.mark.parametrize("d, n", [(300, 1), (300, 5), (20, 2)])
def test_updated_spd_condition_matches_the_dense_sum(d, n):
    from collapsediag.linalg import updated_spd_condition

    g = torch.Generator().manual_seed(d + n)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.logspace(-3, 2, d, dtype=torch.float64)) @ q.T
    keys = 3 * torch.randn(d, n, generator=g, dtype=torch.float64)
    ev = torch.linalg.eigvalsh(a + keys @ keys.T)
    got = updated_spd_condition(a, torch.linalg.cholesky(a), keys)
    assert got == pytest.approx(float(ev[-1] / ev[0]), rel=1e-4)
    assert got != pytest.approx(1e5, rel=1e-2)  # the keys change κ(A) = 1e5


def test_recorder_calls_lazy_values_and_null_recorder_skips_them():
    from collapsediag.recorder import NullRecorder, Recorder

    calls = []

    def costly():
        calls.append(1)
        return 2.5

    rec = Recorder()
    rec.log(layer=3, condition=costly, denominator=1.0)
    assert rec.pop()[1] == {3: {"condition": 2.5, "denominator": 1.0}}
    NullRecorder().log(layer=3, condition=costly)
    assert calls == [1]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_token_nll_sum_in_chunks_equals_full_logits(tok, kind):
    from collapsediag.forward import token_nll_sum
    from collapsediag.tokens import pad_batch

    model = make_model(kind, len(tok))
    ids, mask = pad_batch(tok, [list(range(5, 25)), list(range(30, 42))])
    rows = torch.tensor([r for r, n in ((0, 20), (1, 12)) for _ in range(n - 1)])
    cols = torch.tensor([c for n in (20, 12) for c in range(n - 1)])
    nxt = ids[rows, cols + 1]
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits[rows, cols]
        want = float(torch.nn.functional.cross_entropy(full, nxt, reduction="sum"))
        assert token_nll_sum(model, ids, mask, rows, cols, nxt, chunk=7) == pytest.approx(want, rel=1e-5)
