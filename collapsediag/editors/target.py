"""The target optimisation shared by every editor: find δ so that h + δ makes the model say target_new.

Loss = mean over prefixed prompts of the per-token NLL of the target
     + kl_factor · KL(P_δ ‖ P_0) on "{subject} is a" at the subject's last token
     + weight_decay · ‖δ‖ / ‖h_init‖²
with Adam, early stop below 0.05, and ‖δ‖ clamped to clamp_norm_factor · ‖h_init‖ after each step.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import get_module, n_layers, weight_matrix
from ..errors import EditError, HParamError
from ..requests import EditRequest
from ..tokens import continuation, encode, pad_batch, subject_span, target_ids
from .keys import subject_prompts
from .suffix import target_forward

if TYPE_CHECKING:
    from ..arch import ArchSpec
    from .base import EditEnv

KL_PROMPT = "{} is a"
EARLY_STOP = 5e-2
# Prompts per forward+backward. Each pass reads every weight after the edited layer, so passes cost time
# (SmolLM2, 22 prompts: 0.42 s a step in one pass, 0.76 s in three); more rows than this are split to bound memory.
ROWS_PER_PASS = 32


@dataclass
class TargetSettings:
    """Optimisation settings (the v_* / z_* hyper-parameters of ROME and MEMIT)."""

    steps: int = 20
    lr: float = 0.5
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    mpes: int = 0  # most-probable early stopping (ENCORE): stop once |mpes| steps had every target token argmax


def mpes_count(value: int | float) -> int:
    """MPES's step count from a setting written either way (ENCORE's prob_cutoff −k, or k); 0 = off."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise HParamError(f"mpes must be a whole number of steps (ENCORE writes it −k), got {value!r}")
    return abs(int(value))


@dataclass
class TargetResult:
    """h_init (the unprefixed output at the subject) and the optimised δ; target = h_init + δ."""

    init: torch.Tensor
    delta: torch.Tensor
    steps: int
    loss: float
    nll: float
    kl: float
    mpes_step: int | None = None  # the step at which most-probable early stopping ended the optimisation

    @property
    def target(self) -> torch.Tensor:
        """v* (or z): the value the edit should produce."""
        return self.init + self.delta


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


def _prefixed_all_top(tok_logp: torch.Tensor, part: TargetBatch) -> bool:
    """Whether, in the prefixed prompts of ``part``, every target token is the argmax at its position."""
    dev = tok_logp.device
    wrong = (tok_logp.argmax(dim=-1) != part.target_tokens.to(dev)).float()
    per_prompt = torch.zeros(part.n_prompts, device=dev).index_add(0, part.row_of_token.to(dev), wrong)
    keep = part.prefixed.to(dev) if part.prefixed is not None else torch.ones_like(per_prompt, dtype=torch.bool)
    return bool((per_prompt[keep] == 0).all())


def optimise_target(model: nn.Module, tok: object, req: EditRequest, templates: list[str], module: str,
                    settings: TargetSettings, arch: "ArchSpec | None" = None, fast: bool = True) -> TargetResult:
    """Optimise δ added to ``module``'s output at the subject's last token of every prompt.

    With ``arch`` and ``fast``, each step recomputes only the blocks after the edited one at the positions
    from the subject on (``suffix.SuffixForward``); ``fast=False`` runs the whole model each step.
    """
    device = next(model.parameters()).device
    bt = target_batch(tok, req, templates, device)
    parts = bt.split(ROWS_PER_PASS)
    fwds = [target_forward(model, arch, module, part, fast=fast) for part in parts]
    init = fwds[0].init
    n_kl = len(bt.rows) - bt.n_tok
    # δ and its optimiser state in float32 on the edited module's device, whatever the model's dtype
    delta = torch.zeros(init.shape, dtype=torch.float32, device=init.device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=settings.lr)
    kl_init: list[torch.Tensor | None] = [None] * len(parts)
    steps_done = 0
    loss_v = nll_v = kl_v = float("nan")
    mpes_need, mpes_hits, mpes_step = mpes_count(settings.mpes), 0, None
    for it in range(settings.steps):
        last = it == settings.steps - 1
        opt.zero_grad()
        nll_v = kl_v = 0.0
        all_top = True  # every target token of every prefixed prompt is the argmax (MPES)
        deferred: list[torch.Tensor] = []  # one part: its backward waits for the early-stop check
        # The loss is a sum over prompts: each part's share is back-propagated on its own (less memory).
        for i, (part, fwd) in enumerate(zip(parts, fwds)):
            with torch.set_grad_enabled(not last):
                lp = torch.log_softmax(fwd.logits(delta).float(), dim=-1)
                out_dev = lp.device  # the LM head's device (another GPU than the inputs' under device_map)
                tok_lp = lp[:part.n_tok].gather(1, part.target_tokens.to(out_dev)[:, None]).squeeze(1)
                if mpes_need:
                    all_top = all_top and _prefixed_all_top(lp[:part.n_tok], part)
                per_prompt = torch.zeros(part.n_prompts, device=out_dev).index_add(0, part.row_of_token.to(out_dev),
                                                                                  tok_lp)
                nll = -(per_prompt / bt.target_len).sum() / bt.n_prompts
                kl_lp = lp[part.n_tok:]
                if kl_init[i] is None:
                    kl_init[i] = kl_lp.detach().clone()
                kl = settings.kl_factor * F.kl_div(kl_init[i], kl_lp, log_target=True, reduction="sum") / n_kl
                if not last:
                    if len(parts) == 1:
                        deferred.append(nll + kl)
                    else:
                        (nll + kl).backward()
            nll_v += nll.item()
            kl_v += kl.item()
        with torch.set_grad_enabled(not last):
            wd = settings.weight_decay * delta.norm() / init.float().norm() ** 2
        loss_v = nll_v + kl_v + wd.item()
        if not math.isfinite(loss_v):
            raise EditError(req.case_id, f"non-finite loss {loss_v} in the target optimisation")
        if mpes_need and all_top:
            mpes_hits += 1  # cumulative, as in ENCORE: never reset by a step that misses
            if mpes_hits >= mpes_need:
                mpes_step = it
                break
        if loss_v < EARLY_STOP or last:
            break
        sum(deferred, wd).backward()
        opt.step()
        steps_done += 1
        with torch.no_grad():
            max_norm = settings.clamp_norm_factor * init.float().norm()
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    result = TargetResult(init=init.float(), delta=delta.detach(), steps=steps_done,
                          loss=loss_v, nll=nll_v, kl=kl_v, mpes_step=mpes_step)
    if not torch.isfinite(result.target).all():
        raise EditError(req.case_id, "non-finite target vector v*")
    return result


def target_signals(targets: list[TargetResult]) -> dict[str, float]:
    """The target optimisation's columns of the ``layers`` table, each the mean over the batch: ‖δ‖, ‖δ‖/‖v_init‖,
    ‖v*‖, ‖v*‖/‖v_init‖, steps, the final loss terms and the step at which MPES stopped (NaN where it did not)."""
    n = len(targets)

    def mean(values: list[float]) -> float:
        vals = [v for v in values if v == v]
        return sum(vals) / len(vals) if vals else float("nan")

    return {"v_delta_norm": mean([float(t.delta.norm()) for t in targets]),
            "v_delta_ratio": mean([float(t.delta.norm() / t.init.norm()) for t in targets]),
            "v_star_norm": mean([float(t.target.norm()) for t in targets]),
            "v_star_ratio": mean([float(t.target.norm() / t.init.norm()) for t in targets]),
            "v_steps": sum(t.steps for t in targets) / n if n > 1 else targets[0].steps, "v_loss": mean([t.loss for t in targets]),
            "v_nll": mean([t.nll for t in targets]), "v_kl": mean([t.kl for t in targets]),
            "v_mpes_step": mean([float("nan") if t.mpes_step is None else float(t.mpes_step) for t in targets])}


class TargetCache:
    """Targets reused while the model is in the same state (like MEMIT's ``--use_cache``).

    The key holds the request, the module, the settings, the templates and a hash of every layer's
    rewrite-module weights: runs that edit only those matrices (every editor here) and come back to the
    same weights (batch mode and D4S start from W₀) share their targets. Other weights must not change
    while a cache is in use.
    """

    def __init__(self) -> None:
        self._store: dict[tuple, TargetResult] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def state(model: nn.Module, arch: "ArchSpec") -> str:
        """Hash of the rewrite-module weights of every layer."""
        digest = hashlib.sha1()
        for layer in range(n_layers(model, arch)):
            w = weight_matrix(get_module(model, arch.rewrite_name(layer))).detach()
            digest.update(w.cpu().contiguous().view(torch.uint8).numpy().tobytes())  # any dtype, bit for bit
        return digest.hexdigest()

    def get(self, model: nn.Module, tok: object, req: EditRequest, templates: list[str], module: str,
            settings: TargetSettings, arch: "ArchSpec") -> TargetResult:
        """The cached target, or ``optimise_target``'s result stored for next time."""
        key = (str(req.case_id), req.subject, req.prompt, req.target_new, module, repr(settings), tuple(templates),
               self.state(model, arch))
        if key in self._store:
            self.hits += 1
        else:
            self.misses += 1
            self._store[key] = optimise_target(model, tok, req, templates, module, settings, arch)
        return self._store[key]


def target_for(model: nn.Module, tok: object, req: EditRequest, env: "EditEnv", module: str,
               settings: TargetSettings) -> TargetResult:
    """``optimise_target`` through ``env.target_cache`` when the environment has one."""
    if env.target_cache is None:
        return optimise_target(model, tok, req, env.templates, module, settings, env.arch)
    return env.target_cache.get(model, tok, req, env.templates, module, settings, env.arch)
