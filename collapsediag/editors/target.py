"""The target optimisation shared by every editor: find δ so that h + δ makes the model say target_new.

Loss = mean over prefixed prompts of the per-token NLL of the target
     + kl_factor · KL(P_δ ‖ P_0) on "{subject} is a" at the subject's last token
     + weight_decay · ‖δ‖ / ‖h_init‖²
with Adam, early stop below 0.05, and ‖δ‖ clamped to clamp_norm_factor · ‖h_init‖ after each step.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pathlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import get_module, n_layers, weight_matrix
from ..errors import EditError, HParamError
from ..models import model_fingerprint
from ..requests import EditRequest
from .prompts import KL_PROMPT, StackedBatch, TargetBatch, kept_positions, stack_batches, target_batch
from .suffix import target_forward

if TYPE_CHECKING:
    from ..arch import ArchSpec
    from .base import EditEnv
    from .suffix import PlainForward, SuffixForward

__all__ = ["KL_PROMPT", "TargetBatch", "target_batch", "optimise_target", "optimise_targets"]
EARLY_STOP = 5e-2
# Prompt rows per forward+backward. Each pass reads every weight after the edited layer, so passes cost time
# (SmolLM2, 22 prompts: 0.42 s a step in one pass, 0.76 s in three); more rows than this are split to bound memory.
# 32 MEMIT requests (224 rows) on SmolLM2: 102.7 s in passes of 32 rows, 84.4 s of 64, 106.5 s of 128.
ROWS_PER_PASS = 64
# Part of every TargetCache key: raise it whenever the optimisation's result changes, so targets stored on disk
# by an earlier version are optimised again instead of reused.
CACHE_VERSION = 2


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


def all_top_per_request(tok_logp: torch.Tensor, part: StackedBatch, tok_pos: torch.Tensor) -> torch.Tensor:
    """Per request of ``part``: every target token of its prefixed prompts is the argmax (MPES's test).

    ``tok_logp``: log-probabilities at the target-token positions ``tok_pos`` of ``part``."""
    dev = tok_logp.device
    rows = part.rows[tok_pos]
    wrong = (tok_logp.argmax(dim=-1) != part.token[tok_pos].to(dev)) & part.prefixed[rows].to(dev)
    per_request = torch.zeros(part.n_requests, device=dev).index_add(0, part.request[rows].to(dev), wrong.float())
    return per_request == 0


class _Pass:
    """One pass of rows: its forward, and the same restricted to the rows of requests still optimising."""

    def __init__(self, fwd: "PlainForward | SuffixForward", batch: StackedBatch) -> None:
        self.fwd, self.batch = fwd, batch
        self.kl_init: torch.Tensor | None = None  # log-probabilities at the KL positions with δ = 0
        self._active: tuple | None = None

    def restricted(self, active: torch.Tensor) -> tuple | None:
        """(forward, batch, KL reference) over the rows of the ``active`` requests; None when there are none."""
        keep = active[self.batch.request]
        if not bool(keep.any()):
            return None
        if bool(keep.all()):
            return self.fwd, self.batch, self.kl_init
        key = tuple(keep.tolist())
        if self._active is None or self._active[0] != key:
            idx = keep.nonzero().squeeze(1)
            pos_keep, _ = kept_positions(self.batch.rows, idx, len(self.batch.ids))
            kl_keep = pos_keep[self.batch.token < 0]
            self._active = (key, self.fwd.take(idx), self.batch.take(idx), self.kl_init[kl_keep.to(self.kl_init.device)])
        return self._active[1:]


def _pass_losses(fwd: "PlainForward | SuffixForward", part: StackedBatch, delta: torch.Tensor,
                 kl_init: torch.Tensor | None, settings: TargetSettings, need_top: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per request: this pass's share of the NLL and of the KL term, MPES's all-argmax test, and the KL
    positions' log-probabilities (the reference at δ = 0)."""
    lp = torch.log_softmax(fwd.logits(delta[part.request.to(delta.device)]).float(), dim=-1)
    dev = lp.device  # the LM head's device (another GPU than the inputs' under device_map)
    token, req = part.token.to(dev), part.request.to(dev)[part.rows.to(dev)]
    weight = part.weight.to(dev)
    tok_pos, kl_pos = token >= 0, token < 0
    tok_lp = lp[tok_pos].gather(1, token[tok_pos][:, None]).squeeze(1)
    nll = torch.zeros(part.n_requests, device=dev).index_add(0, req[tok_pos], -weight[tok_pos] * tok_lp)
    kl_lp = lp[kl_pos]
    ref = kl_lp.detach().clone() if kl_init is None else kl_init
    kl_terms = F.kl_div(ref, kl_lp, log_target=True, reduction="none").sum(-1)
    kl = settings.kl_factor * torch.zeros(part.n_requests, device=dev).index_add(0, req[kl_pos],
                                                                                weight[kl_pos] * kl_terms)
    top = all_top_per_request(lp[tok_pos], part, tok_pos.nonzero().squeeze(1).to(part.rows.device)) \
        if need_top else None
    return nll, kl, top, ref


def optimise_targets(model: nn.Module, tok: object, reqs: list[EditRequest], templates: list[str], module: str,
                     settings: TargetSettings, arch: "ArchSpec | None" = None, fast: bool = True
                     ) -> list[TargetResult]:
    """Optimise the δ of every request together: one stacked δ [B, d], each prompt row reading its own request's δ.

    The loss is the sum of the requests' losses, so each δ's gradient is its own, and Adam on the stacked
    tensor is B separate Adams. Each request keeps its own early stop (it then leaves later passes), MPES
    count, norm clamp and step count. Rows are split into passes of at most ``ROWS_PER_PASS``. With ``arch`` and
    ``fast``, each step recomputes only the blocks after the edited one, from the subject on
    (``suffix.SuffixForward``); ``fast=False`` runs the whole model each step.
    """
    device = next(model.parameters()).device
    stacked = stack_batches(tok, [target_batch(tok, r, templates, device) for r in reqs])
    passes = [_Pass(target_forward(model, arch, module, part, fast=fast), part)
              for part in stacked.passes(ROWS_PER_PASS)]
    inits = torch.zeros(len(stacked.ids), passes[0].fwd.init.shape[-1], device=passes[0].fwd.init.device)
    for p in passes:
        inits[p.batch.row_ids.to(inits.device)] = p.fwd.inits.float().to(inits.device)
    init = inits[stacked.first_row.to(inits.device)]  # [B, d]
    init_sq = init.norm(dim=1) ** 2
    n = len(reqs)
    # δ and its optimiser state in float32 on the edited module's device, whatever the model's dtype
    delta = torch.zeros(init.shape, dtype=torch.float32, device=init.device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=settings.lr)
    active = torch.ones(n, dtype=torch.bool)
    steps = [0] * n
    record: list[tuple[float, float, float] | None] = [None] * n
    mpes_need, mpes_hits, mpes_step = mpes_count(settings.mpes), [0] * n, [None] * n
    max_norm = settings.clamp_norm_factor * init.norm(dim=1)
    deferred = len(passes) == 1  # one pass: its backward waits for the early-stop check
    for it in range(settings.steps):
        last = it == settings.steps - 1
        opt.zero_grad()
        nll_v, kl_v = torch.zeros(n), torch.zeros(n)
        top = torch.ones(n, dtype=torch.bool)
        held = None
        for p in passes:
            got = p.restricted(active.to(p.batch.request.device))
            if got is None:
                continue
            fwd, part, kl_init = got
            with torch.set_grad_enabled(not last):
                nll, kl, part_top, ref = _pass_losses(fwd, part, delta, kl_init, settings, bool(mpes_need))
            if p.kl_init is None:
                p.kl_init = ref
            if not last:
                if deferred:
                    held = nll + kl
                else:
                    (nll + kl).sum().backward()
            nll_v += nll.detach().cpu()
            kl_v += kl.detach().cpu()
            if part_top is not None:
                top &= part_top.cpu()  # a request without rows in this pass counts as all-argmax here
        with torch.set_grad_enabled(not last):
            wd = settings.weight_decay * delta.norm(dim=1) / init_sq
        loss_v = nll_v + kl_v + wd.detach().cpu()
        going = active.clone()
        for q in active.nonzero().squeeze(1).tolist():
            loss_q = float(loss_v[q])
            if not math.isfinite(loss_q):
                raise EditError(reqs[q].case_id, f"non-finite loss {loss_q} in the target optimisation")
            stop = loss_q < EARLY_STOP or last
            if mpes_need and bool(top[q]):
                mpes_hits[q] += 1  # cumulative, as in ENCORE: never reset by a step that misses
                if mpes_hits[q] >= mpes_need:
                    mpes_step[q], stop = it, True
            if stop:
                going[q] = False
                record[q] = (loss_q, float(nll_v[q]), float(kl_v[q]))
        active = going
        if not bool(active.any()):
            break
        sel = active.to(delta.device)
        total = wd[sel].sum()
        if held is not None:
            total = total + held[sel.to(held.device)].sum()
        total.backward()
        with torch.no_grad():
            frozen = delta[~sel].clone()
            opt.step()
            delta[~sel] = frozen  # a request that stopped keeps its δ
            norms = delta.norm(dim=1)
            over = sel & (norms > max_norm)
            delta[over] *= (max_norm[over] / norms[over])[:, None]
        for q in active.nonzero().squeeze(1).tolist():
            steps[q] += 1
    results = []
    for q, req in enumerate(reqs):
        loss_q, nll_q, kl_q = record[q]
        res = TargetResult(init=init[q].detach().clone(), delta=delta[q].detach().clone(), steps=steps[q],
                           loss=loss_q, nll=nll_q, kl=kl_q, mpes_step=mpes_step[q])
        if not torch.isfinite(res.target).all():
            raise EditError(req.case_id, "non-finite target vector v*")
        results.append(res)
    return results


def optimise_target(model: nn.Module, tok: object, req: EditRequest, templates: list[str], module: str,
                    settings: TargetSettings, arch: "ArchSpec | None" = None, fast: bool = True) -> TargetResult:
    """Optimise δ added to ``module``'s output at the subject's last token of every prompt of one request
    (``optimise_targets`` with one request)."""
    return optimise_targets(model, tok, [req], templates, module, settings, arch, fast)[0]


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

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        self._store: dict[tuple, TargetResult] = {}
        self.hits = 0
        self.misses = 0
        self.folder = pathlib.Path(folder) if folder is not None else None  # targets kept on disk as well
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def _file(self, key: tuple) -> pathlib.Path:
        return self.folder / (hashlib.sha1(repr(key).encode()).hexdigest() + ".pt")

    def _load(self, key: tuple) -> TargetResult | None:
        """The target stored on disk under ``key`` (another process's or an earlier sitting's), or None."""
        if self.folder is None or not self._file(key).exists():
            return None
        saved = torch.load(self._file(key), map_location="cpu", weights_only=True)
        if saved.pop("key") != repr(key):
            return None
        self._store[key] = TargetResult(**saved)
        return self._store[key]

    def _save(self, key: tuple, t: TargetResult) -> None:
        if self.folder is None:
            return
        tmp = self._file(key).with_suffix(f".tmp{os.getpid()}")
        torch.save({"key": repr(key), "init": t.init.detach().cpu(), "delta": t.delta.detach().cpu(), "steps": t.steps,
                    "loss": t.loss, "nll": t.nll, "kl": t.kl, "mpes_step": t.mpes_step}, tmp)
        os.replace(tmp, self._file(key))

    @staticmethod
    def state(model: nn.Module, arch: "ArchSpec") -> str:
        """Hash of the model's identity (``model_fingerprint``) and of the rewrite-module weights of every
        layer, bit for bit."""
        digest = hashlib.sha1(model_fingerprint(model).encode())
        for layer in range(n_layers(model, arch)):
            w = weight_matrix(get_module(model, arch.rewrite_name(layer))).detach()
            digest.update(w.cpu().contiguous().view(torch.uint8).numpy().tobytes())  # any dtype, bit for bit
        return digest.hexdigest()

    def key(self, model: nn.Module, req: EditRequest, templates: list[str], module: str,
            settings: TargetSettings, arch: "ArchSpec", state: str | None = None, batched: bool = True) -> tuple:
        """The cache key of one request's target in the model's current state: the request, the optimisation's
        settings and templates, the model and its rewrite matrices (``state``, computed once per batch by the
        caller), whether the batch was optimised together, and ``CACHE_VERSION`` (so an earlier optimiser's
        files on disk are never reused)."""
        return (CACHE_VERSION, str(req.case_id), req.subject, req.prompt, req.target_new, module, repr(settings),
                tuple(templates), state or self.state(model, arch), bool(batched))

    def get(self, model: nn.Module, tok: object, req: EditRequest, templates: list[str], module: str,
            settings: TargetSettings, arch: "ArchSpec") -> TargetResult:
        """The cached target, or ``optimise_target``'s result stored for next time."""
        return self.get_many(model, tok, [req], templates, module, settings, arch)[0]

    def get_many(self, model: nn.Module, tok: object, reqs: list[EditRequest], templates: list[str], module: str,
                 settings: TargetSettings, arch: "ArchSpec", batched: bool = True) -> list[TargetResult]:
        """The targets of ``reqs``: cached ones reused, the others optimised (together when ``batched``)."""
        state = self.state(model, arch)
        keys = [self.key(model, r, templates, module, settings, arch, state, batched) for r in reqs]
        missing = [(k, r) for k, r in zip(keys, reqs) if k not in self._store and self._load(k) is None]
        self.hits += len(reqs) - len(missing)
        self.misses += len(missing)
        if missing:
            todo = [r for _, r in missing]
            got = optimise_targets(model, tok, todo, templates, module, settings, arch) if batched else \
                [optimise_target(model, tok, r, templates, module, settings, arch) for r in todo]
            for (k, _), t in zip(missing, got):
                self._store[k] = t
                self._save(k, t)
        dev = next(model.parameters()).device
        return [self._store[k] if self._store[k].init.device == dev else
                dataclasses.replace(self._store[k], init=self._store[k].init.to(dev),
                                    delta=self._store[k].delta.to(dev)) for k in keys]


def target_for(model: nn.Module, tok: object, req: EditRequest, env: "EditEnv", module: str,
               settings: TargetSettings) -> TargetResult:
    """One request's target through ``env.target_cache`` when the environment has one (``targets_for``)."""
    return targets_for(model, tok, [req], env, module, settings)[0]


def targets_for(model: nn.Module, tok: object, reqs: list[EditRequest], env: "EditEnv", module: str,
                settings: TargetSettings, batched: bool = True) -> list[TargetResult]:
    """The targets of a batch of requests, through ``env.target_cache`` when the environment has one: optimised
    together (``optimise_targets``) or, with ``batched=False``, one request at a time."""
    if env.target_cache is not None:
        return env.target_cache.get_many(model, tok, reqs, env.templates, module, settings, env.arch, batched)
    if batched:
        return optimise_targets(model, tok, reqs, env.templates, module, settings, env.arch)
    return [optimise_target(model, tok, r, env.templates, module, settings, env.arch) for r in reqs]

