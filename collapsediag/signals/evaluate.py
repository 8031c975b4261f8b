"""Edit-success probabilities: P(target | prompt) = exp(mean token log-likelihood), batched; pairs with the same
teacher-forced inputs share one forward pass. ``continuation_logprobs`` is the shared core (summed log-probs of
token-id continuations; the downstream tasks score answer words with it)."""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from ..forward import PLAIN_HEAD, cache_kwargs, logits_at
from ..requests import EditRequest
from ..tokens import continuation, encode, pad_batch, target_ids


def target_probs(model: nn.Module, tok: object, prompts: list[str], targets: list[str],
                 batch_size: int = 32) -> np.ndarray:
    """For each (prompt, target): exp of the mean log-probability of `` target``'s tokens.

    Pairs whose teacher-forced inputs are the same (one prompt with single-token targets, as the new and the
    true target of most CounterFact prompts) share one forward pass; the rest are batched by length.
    """
    wanted = [target_ids(tok, t) for t in targets]
    sums = continuation_logprobs(model, tok, [encode(tok, p) for p in prompts], wanted, batch_size)
    counts = np.array([len(w) for w in wanted], dtype=np.float32)
    return torch.exp(torch.from_numpy(sums) / torch.from_numpy(counts)).numpy().astype(float)


def continuation_logprobs(model: nn.Module, tok: object, contexts: list[list[int]], continuations: list[list[int]],
                          batch_size: int = 32, prefix: list[int] | None = None) -> np.ndarray:
    """For each (context ids, continuation ids): Σ log p(continuation token | context and the tokens before it),
    float32.

    Pairs whose teacher-forced inputs are the same (one context with single-token continuations) share one
    forward pass; the sequences are sorted by length and run ``batch_size`` at a time.

    ``prefix`` (token ids that many contexts start with, e.g. a task's demonstrations): it is run once, its
    keys and values are kept, and every context that starts with it and is longer runs only its own tokens,
    attending to them (same numbers). The other contexts, and every context where the model's cache cannot be
    used this way (warned once), take the full forward.
    """
    out = np.empty(len(contexts), dtype=np.float32)
    device = next(model.parameters()).device
    unique: dict[tuple, int] = {}  # (input ids, positions) -> index into seqs
    seqs: list[tuple[list[int], list[int]]] = []
    owner = []  # per pair: its sequence
    for ctx, tid in zip(contexts, continuations):
        seq, pos = continuation(list(ctx), list(tid))
        key = (tuple(seq), tuple(pos))
        if key not in unique:
            unique[key] = len(seqs)
            seqs.append((seq, pos))
        owner.append(unique[key])
    wanted = [list(t) for t in continuations]
    pairs_of: list[list[int]] = [[] for _ in seqs]
    for i, u in enumerate(owner):
        pairs_of[u].append(i)
    plain = list(range(len(seqs)))
    with torch.no_grad():
        if prefix:
            p = len(prefix)
            shared = [u for u in plain if len(contexts[pairs_of[u][0]]) > p and seqs[u][0][:p] == list(prefix)]
            if shared:
                try:
                    done = _prefix_logprobs(model, tok, list(prefix), seqs, shared, pairs_of, wanted, out,
                                            batch_size, device)
                    plain = [u for u in plain if u not in done]
                except (ValueError, TypeError, AttributeError, RuntimeError, IndexError) as exc:
                    warnings.warn(f"{model.config.model_type}: no shared-prefix scoring ({exc}); "
                                  "using the full forward", stacklevel=2)
        order = sorted(plain, key=lambda u: len(seqs[u][0]))
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            ids, mask = pad_batch(tok, [seqs[u][0] for u in idx], device)
            logits, first = _batch_logits(model, ids, mask, [seqs[u][1] for u in idx], device)
            _collect(logits, first, idx, pairs_of, wanted, out)
    return out


def _batch_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: list[list[int]],
                  device: torch.device, **forward_kwargs: object) -> tuple[torch.Tensor, list[int]]:
    """Logits at every row's ``positions`` (row-major) and, per row, the index of its first one."""
    rows, cols, first = [], [], []
    for r, pos in enumerate(positions):
        first.append(len(rows))
        rows += [r] * len(pos)
        cols += pos
    logits = logits_at(model, ids, mask, torch.tensor(rows, device=device), torch.tensor(cols, device=device),
                       **forward_kwargs)
    return logits, first


def _collect(logits: torch.Tensor, first: list[int], idx: list[int], pairs_of: list[list[int]],
             wanted: list[list[int]], out: np.ndarray) -> None:
    """Write into ``out`` the summed log-probs of every pair of the sequences ``idx`` (rows of ``logits``)."""
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
    out[pairs] = torch.zeros(len(pairs), device=dev).index_add(0, own_t, sel).cpu().numpy()


def _prefix_logprobs(model: nn.Module, tok: object, prefix: list[int], seqs: list[tuple[list[int], list[int]]],
                     shared: list[int], pairs_of: list[list[int]], wanted: list[list[int]], out: np.ndarray,
                     batch_size: int, device: torch.device) -> set[int]:
    """``continuation_logprobs`` of the sequences ``shared`` (each starts with ``prefix`` and is longer): the
    prefix runs once, each batch only its rows' own tokens over a fresh cache of the prefix's keys and values.
    The first batch's first row is checked against its full forward; raises ``ValueError`` on a mismatch or
    when the model's cache does not hold the prefix. Returns the sequences done."""
    from transformers import DynamicCache

    from ..editors.suffix import CHECK_TOLERANCE, kv_pairs

    p = len(prefix)
    runner = model.base_model if model.config.model_type in PLAIN_HEAD else model
    cache = DynamicCache()
    runner(input_ids=torch.tensor([prefix], device=device), attention_mask=torch.ones(1, p, dtype=torch.long,
           device=device), **cache_kwargs(runner, cache))
    kv = [(k.detach(), v.detach()) for k, v in kv_pairs(cache)]
    if not kv or any(k.shape[0] != 1 or k.shape[-2] != p or v.shape[-2] != p for k, v in kv):
        raise ValueError("the model's cache does not hold the prefix's keys and values")
    order = sorted(shared, key=lambda u: len(seqs[u][0]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        b = len(idx)
        ids, mask = pad_batch(tok, [seqs[u][0][p:] for u in idx], device)
        mask = torch.cat([torch.ones(b, p, dtype=mask.dtype, device=device), mask], dim=1)
        position_ids = (p + torch.arange(ids.shape[1], device=device))[None, :].expand(b, -1)
        batch_cache = DynamicCache([(k.expand(b, *k.shape[1:]), v.expand(b, *v.shape[1:])) for k, v in kv])
        logits, first = _batch_logits(model, ids, mask, [[c - p for c in seqs[u][1]] for u in idx], device,
                                      position_ids=position_ids, **cache_kwargs(runner, batch_cache))
        if s == 0:
            seq, pos = seqs[idx[0]]
            full_ids, full_mask = pad_batch(tok, [seq], device)
            want, _ = _batch_logits(model, full_ids, full_mask, [pos], device)
            got = logits[:len(pos)]
            scale = float(want.abs().max().clamp_min(1e-6))
            tol = max(CHECK_TOLERANCE, 8 * torch.finfo(got.dtype).eps) \
                if got.dtype in (torch.bfloat16, torch.float16) else CHECK_TOLERANCE
            if not bool(torch.isfinite(got).all()) or float((got - want).abs().max()) > tol * scale:
                raise ValueError("the prefix-cached logits differ from the full forward's")
        _collect(logits, first, idx, pairs_of, wanted, out)
    return set(shared)


def success_share(p_new: np.ndarray, p_true: np.ndarray, new_wins: bool = True) -> float:
    """Share of prompts where p_new > p_true (or the reverse when ``new_wins`` is False); NaN if empty."""
    if len(p_new) == 0:
        return float("nan")
    wins = p_new > p_true if new_wins else p_true > p_new
    return float(np.mean(wins))


def request_probs(model: nn.Module, tok: object, req: EditRequest) -> tuple[float, float]:
    """(p of target_new, p of target_true) on the request's prompt; p_true is NaN without a true target."""
    return requests_probs(model, tok, [req])[0]


def requests_probs(model: nn.Module, tok: object, reqs: list[EditRequest]) -> list[tuple[float, float]]:
    """``request_probs`` of every request, their prompts scored together (``target_probs`` batches them)."""
    texts, targets = [], []
    for r in reqs:
        for t in [r.target_new] + ([r.target_true] if r.target_true else []):
            texts.append(r.text)
            targets.append(t)
    p = iter(target_probs(model, tok, texts, targets) if texts else [])
    return [(float(next(p)), float(next(p)) if r.target_true else float("nan")) for r in reqs]


def request_scores(model: nn.Module, tok: object, req: EditRequest) -> dict[str, float]:
    """CounterFact's paraphrase score (share with p_new > p_true) and neighborhood score (p_true > p_new);
    NaN where the request has no such prompts or no true target."""
    return requests_scores(model, tok, [req])[0]


def requests_scores(model: nn.Module, tok: object, reqs: list[EditRequest]) -> list[dict[str, float]]:
    """``request_scores`` of every request, all their prompts scored together."""
    texts, targets, parts = [], [], []
    for r in reqs:
        spans = {}
        for key, prompts in (("paraphrase_score", r.paraphrase_prompts), ("neighborhood_score", r.neighborhood_prompts)):
            if not r.target_true or not prompts:
                continue
            filled = [p.format(r.subject) if "{}" in p else p for p in prompts]
            spans[key] = (len(texts), len(filled))
            texts += filled * 2
            targets += [r.target_new] * len(filled) + [r.target_true] * len(filled)
        parts.append(spans)
    p = target_probs(model, tok, texts, targets) if texts else np.empty(0)
    out = []
    for spans in parts:
        row = {"paraphrase_score": float("nan"), "neighborhood_score": float("nan")}
        for key, (a, n) in spans.items():
            row[key] = success_share(p[a:a + n], p[a + n:a + 2 * n], key == "paraphrase_score")
        out.append(row)
    return out
    for key, prompts, new_wins in (("paraphrase_score", req.paraphrase_prompts, True),
                                   ("neighborhood_score", req.neighborhood_prompts, False)):
        if not prompts:
            continue
        texts = [p.format(req.subject) if "{}" in p else p for p in prompts]
        p = target_probs(model, tok, texts * 2, [req.target_new] * len(texts) + [req.target_true] * len(texts))
        out[key] = success_share(p[:len(texts)], p[len(texts):], new_wins)
    return out
