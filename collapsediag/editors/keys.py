"""Keys (inputs) and values (outputs) of the rewrite module at the subject's last token."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..hooks import Trace
from ..requests import EditRequest
from ..tokens import encode, pad_batch, subject_span


@dataclass
class KeySet:
    """Per-template keys and values at the subject's last token (template 0 = unprefixed)."""

    keys: torch.Tensor  # [n_templates, d_in]
    values: torch.Tensor  # [n_templates, d_out]

    @property
    def unprefixed(self) -> torch.Tensor:
        """k_u: the key of the prompt without any prefix."""
        return self.keys[0]

    @property
    def mean(self) -> torch.Tensor:
        """k̄: the key averaged over every template."""
        return self.keys.mean(0)

    @property
    def mixed(self) -> torch.Tensor:
        """MEMIT's key: ½ k_u + ½ mean of the prefixed keys (ALGORITHMS.md §5.2)."""
        return 0.5 * self.unprefixed + 0.5 * self.prefixed_mean

    @property
    def prefixed_mean(self) -> torch.Tensor:
        """Mean key over the prefixed templates only."""
        return self.keys[1:].mean(0) if len(self.keys) > 1 else self.keys[0]


def subject_prompts(req: EditRequest, templates: list[str]) -> list[str]:
    """Prompt templates (with ``{}`` for the subject) under each context template."""
    return [t.format(req.prompt) for t in templates]


def keys_at_subject(model: nn.Module, tok: object, module: str, req: EditRequest,
                    templates: list[str]) -> KeySet:
    """One batched forward over every template; returns the module's input/output at the subject."""
    return keys_at_subjects(model, tok, module, [req], templates)[0]


ROWS_PER_FORWARD = 128  # prompt rows per forward when the keys of a batch of requests are read together


def keys_at_subjects(model: nn.Module, tok: object, module: str, reqs: list[EditRequest],
                     templates: list[str]) -> list[KeySet]:
    """The ``KeySet`` of every request, the prompts of all requests under every template read together in
    forwards of at most ``ROWS_PER_FORWARD`` rows (each stops at ``module``)."""
    device = next(model.parameters()).device
    seqs, idx = [], []
    for req in reqs:
        for p in subject_prompts(req, templates):
            seqs.append(encode(tok, p.format(req.subject)))
            idx.append(subject_span(tok, p, req.subject, req.case_id).last)
    keys, values = [], []
    for a in range(0, len(seqs), ROWS_PER_FORWARD):
        ids, mask = pad_batch(tok, seqs[a:a + ROWS_PER_FORWARD], device)
        rows = torch.arange(len(ids), device=device)
        cols = torch.tensor(idx[a:a + ROWS_PER_FORWARD], device=device)
        with torch.no_grad(), Trace(model, module, retain_input=True, retain_output=True, stop=True) as tr:
            model(input_ids=ids, attention_mask=mask)
        keys.append(tr.input[rows, cols].clone())
        values.append(tr.output[rows, cols].clone())
    keys_t, values_t = torch.cat(keys), torch.cat(values)
    n = len(templates)
    return [KeySet(keys=keys_t[q * n:(q + 1) * n], values=values_t[q * n:(q + 1) * n]) for q in range(len(reqs))]


def outputs_at_subject(model: nn.Module, tok: object, module: str, reqs: list[EditRequest]) -> torch.Tensor:
    """``module``'s output (e.g. a decoder block's hidden state) at the subject's last token of each
    unprefixed prompt, one batched forward: [n, d]."""
    device = next(model.parameters()).device
    seqs = [encode(tok, r.text) for r in reqs]
    idx = [subject_span(tok, r.prompt, r.subject, r.case_id).last for r in reqs]
    ids, mask = pad_batch(tok, seqs, device)
    rows = torch.arange(len(seqs), device=device)
    with torch.no_grad(), Trace(model, module, retain_output=True, stop=True) as tr:
        model(input_ids=ids, attention_mask=mask)
    return tr.output[rows, torch.tensor(idx, device=device)].clone()
