"""Edit-success probabilities: P(target | prompt) = exp(mean token log-likelihood), batched."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .forward import logits_at
from .requests import EditRequest
from .tokens import continuation, encode, pad_batch, target_ids


def target_probs(model: nn.Module, tok: object, prompts: list[str], targets: list[str],
                 batch_size: int = 32) -> np.ndarray:
    """For each (prompt, target): exp of the mean log-probability of `` target``'s tokens."""
    out = np.empty(len(prompts))
    device = next(model.parameters()).device
    items = []
    for p, t in zip(prompts, targets):
        pid, tid = encode(tok, p), target_ids(tok, t)
        items.append((pid, tid))
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]))
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            seqs, rows, cols, toks = [], [], [], []
            for r, i in enumerate(idx):
                seq, pos = continuation(*items[i])
                seqs.append(seq)
                rows += [r] * len(pos)
                cols += pos
                toks += items[i][1]
            ids, mask = pad_batch(tok, seqs, device)
            logits = logits_at(model, ids, mask, torch.tensor(rows, device=device),
                               torch.tensor(cols, device=device))
            lp = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(toks, device=device)[:, None])
            own = torch.tensor(rows, device=device)
            sums = torch.zeros(len(idx), device=device).index_add(0, own, lp.squeeze(1))
            counts = torch.zeros(len(idx), device=device).index_add(0, own, torch.ones_like(lp.squeeze(1)))
            out[idx] = torch.exp(sums / counts).cpu().numpy()
    return out


def success_share(p_new: np.ndarray, p_true: np.ndarray, new_wins: bool = True) -> float:
    """Share of prompts where p_new > p_true (or the reverse when ``new_wins`` is False); NaN if empty."""
    if len(p_new) == 0:
        return float("nan")
    wins = p_new > p_true if new_wins else p_true > p_new
    return float(np.mean(wins))


def request_probs(model: nn.Module, tok: object, req: EditRequest) -> tuple[float, float]:
    """(p of target_new, p of target_true) on the request's prompt; p_true is NaN without a true target."""
    targets = [req.target_new] + ([req.target_true] if req.target_true else [])
    p = target_probs(model, tok, [req.text] * len(targets), targets)
    return float(p[0]), float(p[1]) if len(p) > 1 else float("nan")


def request_scores(model: nn.Module, tok: object, req: EditRequest) -> dict[str, float]:
    """CounterFact's paraphrase score (share with p_new > p_true) and neighborhood score (p_true > p_new);
    NaN where the request has no such prompts or no true target."""
    out = {"paraphrase_score": float("nan"), "neighborhood_score": float("nan")}
    if not req.target_true:
        return out
    for key, prompts, new_wins in (("paraphrase_score", req.paraphrase_prompts, True),
                                   ("neighborhood_score", req.neighborhood_prompts, False)):
        if not prompts:
            continue
        texts = [p.format(req.subject) if "{}" in p else p for p in prompts]
        p = target_probs(model, tok, texts * 2, [req.target_new] * len(texts) + [req.target_true] * len(texts))
        out[key] = success_share(p[:len(texts)], p[len(texts):], new_wins)
    return out
