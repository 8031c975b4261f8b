"""Model-level health: held-out perplexity and CounterFact's n-gram generation entropy."""
from __future__ import annotations

import collections
import math
import pathlib
import re

import numpy as np
import torch
from torch import nn

from ..forward import token_nll_sum
from ..tokens import pad_batch

HELDOUT = pathlib.Path(__file__).parent.parent / "data" / "heldout_smollm2.txt"
GENERATION_PROMPTS = (
    "The history of the city", "My favourite food is", "In the morning, I usually", "Scientists recently found",
    "The best way to learn music is", "Once upon a time,", "The weather today is", "Technology has changed",
)
_WORDS = re.compile(r"\w+|[^\w\s]")


def heldout_texts(path: str | pathlib.Path | None = None, max_passages: int | None = None) -> list[str]:
    """Held-out passages (default: the packaged file, never used for key statistics)."""
    p = pathlib.Path(path) if path else HELDOUT
    texts = [t.strip() for t in p.read_text(encoding="utf-8").split("\n\n") if t.strip()]
    return texts[:max_passages] if max_passages else texts


def perplexity(model: nn.Module, tok: object, texts: list[str], max_len: int = 256, batch_size: int = 4) -> float:
    """exp(mean next-token NLL over every token of ``texts``), each text cut to ``max_len`` tokens."""
    seqs = [ids[:max_len] for ids in (tok(t)["input_ids"] for t in texts) if len(ids) > 1]
    seqs.sort(key=len)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(seqs), batch_size):
            group = seqs[s:s + batch_size]
            ids, mask = pad_batch(tok, group, device)
            rows = torch.tensor([r for r, g in enumerate(group) for _ in range(len(g) - 1)], device=device)
            cols = torch.tensor([c for g in group for c in range(len(g) - 1)], device=device)
            total += token_nll_sum(model, ids, mask, rows, cols, ids[rows, cols + 1])
            count += len(rows)
    return math.exp(total / max(count, 1))


def n_gram_entropy(text: str, ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    """CounterFact's generation entropy: arithmetic mean of w_n · H_n over word n-gram frequencies (bits)."""
    words = _WORDS.findall(text)
    parts = []
    for n, w in zip(ns, weights):
        grams = collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        if not grams:
            parts.append(0.0)
            continue
        f = np.array(list(grams.values()), dtype=float)
        f /= f.sum()
        parts.append(w * float(-(f * np.log2(f)).sum()))
    return float(np.mean(parts))


def generate(model: nn.Module, tok: object, prompts: list[str], max_new_tokens: int = 64, seed: int = 0,
             top_k: int = 5) -> list[str]:
    """Seeded top-k sampling (batched, left padding only inside this call); returns the continuations."""
    device = next(model.parameters()).device
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(list(prompts), return_tensors="pt", padding=True).to(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, top_k=top_k,
                                     pad_token_id=tok.pad_token_id)
    finally:
        tok.padding_side = side
    width = enc["input_ids"].shape[1]
    return [tok.decode(o[width:], skip_special_tokens=True) for o in out]


def generation_entropy(model: nn.Module, tok: object, prompts: list[str] | tuple[str, ...] = GENERATION_PROMPTS,
                       max_new_tokens: int = 64, seed: int = 0) -> float:
    """Mean n-gram entropy of seeded generations from ``prompts`` (prompt + continuation, as CounterFact)."""
    texts = generate(model, tok, list(prompts), max_new_tokens, seed)
    return float(np.mean([n_gram_entropy(p + t) for p, t in zip(prompts, texts)]))
