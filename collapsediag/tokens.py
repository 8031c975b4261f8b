"""Token positions: where the subject ends inside a prompt, and batches with right padding."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import EditError


@dataclass(frozen=True)
class SubjectSpan:
    """Token indices of the subject inside a tokenised prompt."""

    first: int
    last: int
    last_piece: str  # the decoded token at ``last``


def encode(tok: object, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's own special tokens (BOS where it adds one)."""
    return list(tok(text)["input_ids"])


def subject_span(tok: object, template: str, subject: str, case_id: object = None) -> SubjectSpan:
    """Locate the subject's first and last token in ``template.format(subject)``.

    Uses character offsets when the tokenizer provides them, else incremental encoding.
    Checks that the decoded last token really is the subject's last piece.
    """
    pre = template.index("{}")
    text = template.format(subject)
    start, end = pre, pre + len(subject)
    ids: list[int]
    if getattr(tok, "is_fast", False):
        enc = tok(text, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        spans = [(i, a, b) for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a]
        covering = [i for i, a, b in spans if a < end and b > start]
        if not covering:
            raise EditError(case_id, f"subject {subject!r} maps to no token in {text!r}")
        first, last = covering[0], covering[-1]
    else:
        ids = encode(tok, text)
        first = len(encode(tok, text[:start].rstrip())) if start else _n_special_prefix(tok)
        last = len(encode(tok, text[:end])) - 1
    piece = tok.decode([ids[last]])
    if not piece.strip() or not _is_tail(piece.strip(), subject):
        raise EditError(case_id, f"token {piece!r} at index {last} is not the last piece of subject "
                                 f"{subject!r} in {text!r}")
    return SubjectSpan(first=first, last=last, last_piece=piece)


def _is_tail(piece: str, subject: str) -> bool:
    """True if ``piece`` (a token) ends the subject: a suffix of it, or the subject a suffix of it."""
    s = subject.rstrip()
    return s.endswith(piece) or piece.endswith(s) or s.endswith(piece.rstrip(".,;:'\""))


def _n_special_prefix(tok: object) -> int:
    return len(encode(tok, ""))


def target_ids(tok: object, target: str) -> list[int]:
    """Token ids of `` target`` (leading space, no special tokens)."""
    return list(tok(" " + target.strip(), add_special_tokens=False)["input_ids"])


def continuation(prompt_ids: list[int], tgt: list[int]) -> tuple[list[int], list[int]]:
    """Teacher forcing: input ids (prompt + target[:-1]) and the positions whose logits predict each target token."""
    return prompt_ids + tgt[:-1], [len(prompt_ids) - 1 + j for j in range(len(tgt))]


def first_content_index(tok: object, text: str) -> int:
    """Index of the first token that is not a special token (BOS) in ``text``."""
    special = set(getattr(tok, "all_special_ids", []) or [])
    for i, t in enumerate(encode(tok, text)):
        if t not in special:
            return i
    return 0


def pad_batch(tok: object, seqs: list[list[int]], device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into ``(input_ids, attention_mask)``."""
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)
