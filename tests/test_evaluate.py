"""Edit-success probabilities and CounterFact scores against a plain full-logits computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from collapsediag.signals.evaluate import request_probs, request_scores, success_share, target_probs
from collapsediag.requests import EditRequest


def _plain_prob(model, tok, prompt: str, target: str) -> float:
    pid = tok(prompt, add_special_tokens=False)["input_ids"]
    tid = tok(" " + target, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([pid + tid])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return math.exp(float(np.mean([lp[len(pid) - 1 + j, t].item() for j, t in enumerate(tid)])))


def test_target_probs_match_full_logits(tiny):
    model, tok = tiny
    prompts = ["Paris is located in", "The mother tongue of Danielle Darrieux is", "Tokyo plays the"]
    targets = ["Japan", "English", "piano guitar"]
    got = target_probs(model, tok, prompts, targets, batch_size=2)
    want = [_plain_prob(model, tok, p, t) for p, t in zip(prompts, targets)]
    assert got == pytest.approx(want, rel=1e-4)


def test_target_probs_share_one_forward_per_input_and_match_full_logits(tiny):
    model, tok = tiny
    from collapsediag.tokens import target_ids

    prompts = ["Paris is located in"] * 3 + ["Tokyo plays the"] * 2
    targets = ["city", "music", "piano guitar", "city", "music"]
    n_tok = [len(target_ids(tok, t)) for t in targets]
    assert n_tok[:2] == n_tok[3:] == [1, 1] and n_tok[2] > 1
    rows = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    try:
        got = target_probs(model, tok, prompts, targets, batch_size=2)
    finally:
        hook.remove()
    assert sum(rows) == 3  # "Paris is located in" once for both one-token targets, once with "piano…"; Tokyo once
    want = [_plain_prob(model, tok, p, t) for p, t in zip(prompts, targets)]
    assert got == pytest.approx(want, rel=1e-4)
    assert got[0] != got[1] and got[3] != got[4]


def test_request_probs_and_scores(tiny):
    model, tok = tiny
    req = EditRequest(case_id=1, subject="Paris", prompt="{} is located in", target_new="Japan", target_true="Spain",
                      paraphrase_prompts=["Because you said so. {} is located in", "I think {} is in"],
                      neighborhood_prompts=["Tokyo is located in", "Angola is located in"])
    p_new, p_true = request_probs(model, tok, req)
    assert p_new == pytest.approx(_plain_prob(model, tok, "Paris is located in", "Japan"), rel=1e-4)
    assert p_true == pytest.approx(_plain_prob(model, tok, "Paris is located in", "Spain"), rel=1e-4)
    scores = request_scores(model, tok, req)
    para = [p.format("Paris") for p in req.paraphrase_prompts]
    want_para = np.mean([_plain_prob(model, tok, p, "Japan") > _plain_prob(model, tok, p, "Spain") for p in para])
    want_nb = np.mean([_plain_prob(model, tok, p, "Spain") > _plain_prob(model, tok, p, "Japan")
                       for p in req.neighborhood_prompts])
    assert scores == {"paraphrase_score": pytest.approx(want_para), "neighborhood_score": pytest.approx(want_nb)}
    no_true = EditRequest(case_id=2, subject="Paris", prompt="{} is located in", target_new="Japan")
    assert math.isnan(request_probs(model, tok, no_true)[1])
    assert all(math.isnan(v) for v in request_scores(model, tok, no_true).values())
    assert success_share(np.array([0.2, 0.6]), np.array([0.3, 0.1]), True) == 0.5


def test_scored_prompts_pairs_every_prompt_with_both_targets():
    from collapsediag.runs.checkpoints import scored_prompts

    reqs = [EditRequest(case_id=1, subject="Paris", prompt="{} is located in", target_new="Japan", target_true="Spain",
                        paraphrase_prompts=["I think {} is in"], neighborhood_prompts=["Tokyo is in", "Rome is in"]),
            EditRequest(case_id=2, subject="Oslo", prompt="{} is in", target_new="Peru")]  # no true target
    prompts, targets, owner, kinds = scored_prompts(reqs)
    assert prompts == ["Paris is located in"] * 2 + ["I think Paris is in"] * 2 + ["Tokyo is in"] * 2 + ["Rome is in"] * 2
    assert targets == ["Japan", "Spain"] * 4
    assert owner == [0, 0, 0, 0] and kinds == ["rewrite", "paraphrase", "neighborhood", "neighborhood"]
