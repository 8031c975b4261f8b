"""The prompts of the target optimisation: one request's padded batch, and many requests' rows stacked.

Rows of one request (``TargetBatch``) are its prefixed prompts followed by target_new[:-1], then the KL
prompt "{subject} is a". ``StackedBatch`` puts the rows of several requests side by side, each row knowing
its request, so one forward serves every request of an update and each reads its own δ.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import EditError
from ..requests import EditRequest
from ..tokens import continuation, encode, pad_batch, subject_span, target_ids
from .keys import subject_prompts

KL_PROMPT = "{} is a"


@dataclass
class TargetBatch:
    """The padded prompts of one target optimisation and where its loss reads the logits.

    Rows 0..n_prompts−1 are the prefixed prompts followed by target_new[:-1]; the last row is the KL prompt.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    subj: torch.Tensor  # the subject's last token in each row
    rows: torch.Tensor  # logit positions: every target token of every prompt, then the KL rows' subjects
    cols: torch.Tensor
    target_tokens: torch.Tensor
    row_of_token: torch.Tensor
    n_prompts: int
    target_len: int
    prefixed: torch.Tensor | None = None  # per prompt row: its context template has a prefix (not the bare "{}")

    @property
    def n_tok(self) -> int:
        """Number of target-token positions (the first ``n_tok`` of rows/cols)."""
        return len(self.target_tokens)

    def split(self, size: int) -> list["TargetBatch"]:
        """Consecutive parts of at most ``size`` rows, each a batch of its own (its rows renumbered from 0)."""
        n_rows = len(self.ids)
        if size >= n_rows:
            return [self]
        kl_pos = torch.arange(self.n_tok, len(self.rows), device=self.rows.device)
        parts = []
        for a in range(0, n_rows, size):
            b = min(a + size, n_rows)
            tok_pos = ((self.row_of_token >= a) & (self.row_of_token < b)).nonzero().squeeze(1)
            kl = kl_pos[(self.rows[kl_pos] >= a) & (self.rows[kl_pos] < b)]
            pos = torch.cat([tok_pos, kl])
            parts.append(TargetBatch(ids=self.ids[a:b], mask=self.mask[a:b], subj=self.subj[a:b],
                                     rows=self.rows[pos] - a, cols=self.cols[pos],
                                     target_tokens=self.target_tokens[tok_pos],
                                     row_of_token=self.row_of_token[tok_pos] - a,
                                     n_prompts=max(0, min(b, self.n_prompts) - a), target_len=self.target_len,
                                     prefixed=None if self.prefixed is None else self.prefixed[a:min(b, self.n_prompts)]))
        return parts


def target_batch(tok: object, req: EditRequest, templates: list[str], device: torch.device | str = "cpu"
                 ) -> TargetBatch:
    """Tokenise ``req`` under every template plus the KL prompt (errors name the record)."""
    tgt = target_ids(tok, req.target_new)
    if not tgt:
        raise EditError(req.case_id, f"target_new {req.target_new!r} tokenises to nothing")
    seqs, subj = [], []
    nll_rows, nll_cols, nll_tok = [], [], []
    for r, p in enumerate(subject_prompts(req, templates)):
        seq, cols = continuation(encode(tok, p.format(req.subject)), tgt)
        seqs.append(seq)
        subj.append(subject_span(tok, p, req.subject, req.case_id).last)
        nll_rows += [r] * len(tgt)
        nll_cols += cols
        nll_tok += tgt
    n_rw = len(seqs)
    seqs.append(encode(tok, KL_PROMPT.format(req.subject)))
    subj.append(subject_span(tok, KL_PROMPT, req.subject, req.case_id).last)
    ids, mask = pad_batch(tok, seqs, device)
    all_rows = torch.arange(len(seqs), device=device)
    subj_t = torch.tensor(subj, device=device)
    return TargetBatch(ids=ids, mask=mask, subj=subj_t,
                       rows=torch.cat([torch.tensor(nll_rows, device=device), all_rows[n_rw:]]),
                       cols=torch.cat([torch.tensor(nll_cols, device=device), subj_t[n_rw:]]),
                       target_tokens=torch.tensor(nll_tok, device=device),
                       row_of_token=torch.tensor(nll_rows, device=device), n_prompts=n_rw, target_len=len(tgt),
                       prefixed=torch.tensor([t.strip() != "{}" for t in templates], device=device))


@dataclass
class StackedBatch:
    """The rows of several requests' ``TargetBatch``es in one padded batch.

    Per row: its request (``request``) and whether it is a prompt with a prefix (``prefixed``; False for the
    bare "{}" prompt and the KL rows). Per logit position (``rows``, ``cols``): the target token it scores
    (``token``, −1 at a KL row's subject) and its weight in its request's loss (1/(target length · prompts)
    at target tokens, 1/(KL rows) at the KL positions). ``first_row[q]``: the row of request q's first
    template, whose output at the subject is its h_init. ``row_ids``: each row's index in the whole stack.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    subj: torch.Tensor
    request: torch.Tensor
    prefixed: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    token: torch.Tensor
    weight: torch.Tensor
    first_row: torch.Tensor
    row_ids: torch.Tensor
    n_requests: int

    def take(self, idx: torch.Tensor) -> "StackedBatch":
        """The rows ``idx`` (renumbered from 0) with their logit positions, in their original order."""
        keep, rows = kept_positions(self.rows, idx, len(self.ids))
        return StackedBatch(ids=self.ids[idx], mask=self.mask[idx], subj=self.subj[idx], request=self.request[idx],
                            prefixed=self.prefixed[idx], rows=rows, cols=self.cols[keep], token=self.token[keep],
                            weight=self.weight[keep], first_row=self.first_row, row_ids=self.row_ids[idx],
                            n_requests=self.n_requests)

    def passes(self, size: int) -> list["StackedBatch"]:
        """Consecutive parts of at most ``size`` rows (one part when the batch fits)."""
        n = len(self.ids)
        if size >= n:
            return [self]
        return [self.take(torch.arange(a, min(a + size, n), device=self.ids.device)) for a in range(0, n, size)]


def kept_positions(rows: torch.Tensor, idx: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which positions of ``rows`` lie in the rows ``idx``, and their row numbers among ``idx``."""
    remap = torch.full((n_rows,), -1, dtype=torch.long, device=rows.device)
    remap[idx.to(rows.device)] = torch.arange(len(idx), device=rows.device)
    new = remap[rows]
    keep = new >= 0
    return keep, new[keep]


def stack_batches(tok: object, batches: list[TargetBatch]) -> StackedBatch:
    """One batch of the rows of ``batches`` (one per request), ordered by suffix length to pad little."""
    device = batches[0].ids.device
    seqs, subj, request, prefixed, first = [], [], [], [], []
    rows, cols, token, weight = [], [], [], []
    for q, bt in enumerate(batches):
        base = len(seqs)
        first.append(base)
        lengths = bt.mask.sum(1).tolist()
        seqs += [bt.ids[r, :n].tolist() for r, n in enumerate(lengths)]
        subj += bt.subj.tolist()
        request += [q] * len(bt.ids)
        pre = bt.prefixed.tolist() if bt.prefixed is not None else [True] * bt.n_prompts
        prefixed += pre + [False] * (len(bt.ids) - bt.n_prompts)
        n_kl = len(bt.rows) - bt.n_tok
        rows += (bt.rows + base).tolist()
        cols += bt.cols.tolist()
        token += bt.target_tokens.tolist() + [-1] * n_kl
        weight += [1.0 / (bt.target_len * bt.n_prompts)] * bt.n_tok + [1.0 / n_kl] * n_kl
    ids, mask = pad_batch(tok, seqs, device)
    subj_t = torch.tensor(subj, device=device)
    # rows with the same suffix (subject to end) and length sit together, so a pass pads little
    order = sorted(range(len(seqs)), key=lambda r: (len(seqs[r]) - subj[r], len(seqs[r])))
    full = StackedBatch(ids=ids, mask=mask, subj=subj_t, request=torch.tensor(request, device=device),
                        prefixed=torch.tensor(prefixed, device=device), rows=torch.tensor(rows, device=device),
                        cols=torch.tensor(cols, device=device), token=torch.tensor(token, device=device),
                        weight=torch.tensor(weight, dtype=torch.float32, device=device),
                        first_row=torch.tensor(first, device=device), row_ids=torch.arange(len(seqs), device=device),
                        n_requests=len(batches))
    sorted_batch = full.take(torch.tensor(order, device=device))
    sorted_batch.row_ids = torch.arange(len(seqs), device=device)
    position = torch.empty(len(seqs), dtype=torch.long, device=device)
    position[torch.tensor(order, device=device)] = torch.arange(len(seqs), device=device)
    sorted_batch.first_row = position[sorted_batch.first_row]
    return sorted_batch
