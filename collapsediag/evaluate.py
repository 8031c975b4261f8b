"""Edit-success probabilities: P(target | prompt) = exp(mean token log-likelihood), batched."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .forward import logits_at
from .tokens import encode, pad_batch


def target_probs(model: nn.Module, tok: object, prompts: list[str], targets: list[str],
                 batch_size: int = 32) -> np.ndarray:
    """For each (prompt, target): exp of the mean log-probability of `` target``'s tokens."""
    from .editors.target import target_ids

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
            seqs = [items[i][0] + items[i][1][:-1] for i in idx]
            rows, cols, toks, owner = [], [], [], []
            for r, i in enumerate(idx):
                pid, tid = items[i]
                for j, t in enumerate(tid):
                    rows.append(r)
                    cols.append(len(pid) - 1 + j)
                    toks.append(t)
                    owner.append(r)
            ids, mask = pad_batch(tok, seqs, device)
            logits = logits_at(model, ids, mask, torch.tensor(rows, device=device),
                               torch.tensor(cols, device=device))
            lp = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(toks, device=device)[:, None])
            own = torch.tensor(owner, device=device)
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
