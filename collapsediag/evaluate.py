"""Edit-success probabilities: P(target | prompt) = exp(mean token log-likelihood), batched; pairs with the same
teacher-forced inputs share one forward pass."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .forward import logits_at
from .requests import EditRequest
from .tokens import continuation, encode, pad_batch, target_ids


def target_probs(model: nn.Module, tok: object, prompts: list[str], targets: list[str],
                 batch_size: int = 32) -> np.ndarray:
    """For each (prompt, target): exp of the mean log-probability of `` target``'s tokens.

    Pairs whose teacher-forced inputs are the same (one prompt with single-token targets, as the new and the
    true target of most CounterFact prompts) share one forward pass; the rest are batched by length.
    """
    out = np.empty(len(prompts))
    device = next(model.parameters()).device
    unique: dict[tuple, int] = {}  # (input ids, positions) -> index into seqs
    seqs: list[tuple[list[int], list[int]]] = []
    owner, wanted = [], []  # per pair: its sequence, its target tokens
    for p, t in zip(prompts, targets):
        tid = target_ids(tok, t)
        seq, pos = continuation(encode(tok, p), tid)
        key = (tuple(seq), tuple(pos))
        if key not in unique:
            unique[key] = len(seqs)
            seqs.append((seq, pos))
        owner.append(unique[key])
        wanted.append(tid)
    pairs_of: list[list[int]] = [[] for _ in seqs]
    for i, u in enumerate(owner):
        pairs_of[u].append(i)
    order = sorted(range(len(seqs)), key=lambda u: len(seqs[u][0]))
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            rows, cols, first = [], [], []  # first: the logits row of each sequence's first position
            for r, u in enumerate(idx):
                first.append(len(rows))
                rows += [r] * len(seqs[u][1])
                cols += seqs[u][1]
            ids, mask = pad_batch(tok, [seqs[u][0] for u in idx], device)
            logits = logits_at(model, ids, mask, torch.tensor(rows, device=device), torch.tensor(cols, device=device))
            lp = torch.log_softmax(logits.float(), -1)
            pairs: list[int] = []
            at, toks, own = [], [], []  # per target token: its logits row, its id, its pair's place in ``pairs``
            for r, u in enumerate(idx):
                for i in pairs_of[u]:
                    at += range(first[r], first[r] + len(wanted[i]))
                    toks += wanted[i]
                    own += [len(pairs)] * len(wanted[i])
                    pairs.append(i)
            dev = lp.device
            sel = lp[torch.tensor(at, device=dev), torch.tensor(toks, device=dev)]
            own_t = torch.tensor(own, device=dev)
            sums = torch.zeros(len(pairs), device=dev).index_add(0, own_t, sel)
            counts = torch.zeros(len(pairs), device=dev).index_add(0, own_t, torch.ones_like(sel))
            out[pairs] = torch.exp(sums / counts).cpu().numpy()
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
