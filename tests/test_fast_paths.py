"""The speed-ups leave results unchanged: the suffix forward of the target optimisation."""
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
