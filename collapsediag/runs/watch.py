"""Watch an editing loop that collapsediag does not own (EasyEdit, a reference repository, your own fork).

>>> with watch(model, tok, layers=[5], out="runs/easyedit-rome") as w:
...     for request in requests:
...         my_editor.apply(model, request)      # anything that changes the weights in place
...         w.step(request)                      # records what changed, as a native run does
>>> edit = w.wrap(my_edit_function)             # or: calls the function, then w.step(request)

Each step records the weight change of every watched layer, factored by an SVD into low-rank ``left``/``right``
(so ``model_at`` rebuilds the model), its norms, rank and spectral signals, the keys collapsediag computes for the
request, and, for a rank-one change ΔW = σ û_l ûᵀ, the implied denominators k_uᵀû and k̄ᵀû (ROME's and r-ROME's,
up to the scale of û, which is a unit vector as ROME's u is). A watched run cannot hold what only the editor
knows: its target (v*, δ, steps), its own denominators for batched updates, its hyper-parameters, or the
probabilities before an edit unless ``w.begin(request)`` is called first. It cannot be resumed by collapsediag
(the editor is not collapsediag's); its saved tables, factors and ``model_at`` work as for any run.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn

from ..arch import get_module, weight_matrix
from ..editors.base import Delta, EditEnv, EditorBase, HParams
from ..editors.context import DEFAULT_LENGTHS
from ..editors.keys import keys_at_subject
from ..errors import CollapseDiagError
from ..recorder import Recorder
from ..requests import EditRequest, as_request
from .session import EditSession

RANK_TOL = 1e-6  # singular values of a weight change below this share of the largest are float noise


@dataclass
class WatchHParams(HParams):
    """The watched layers (the editor's own hyper-parameters are not known)."""

    layers: list[int] = field(default_factory=lambda: [5])


class WatchedEditor(EditorBase):
    """Stands for an editor collapsediag does not run: ``compute`` is never called."""

    name: ClassVar[str] = "watched"
    context_lengths: ClassVar[tuple[tuple[int, int], ...]] = DEFAULT_LENGTHS
    HParams: ClassVar[type] = WatchHParams

    def layers(self) -> list[int]:
        """The watched layers, ascending."""
        return sorted(self.hparams.layers)

    def compute(self, *args: Any, **kw: Any) -> list[Delta]:
        raise CollapseDiagError("a watched run records changes made by another editor; it computes none")


def factor_change(change: torch.Tensor, tol: float = RANK_TOL) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ΔW ≈ left @ rightᵀ from its SVD, keeping singular values above ``tol`` × the largest; returns (left = U Σ,
    right = V, singular values kept)."""
    u, s, vh = torch.linalg.svd(change.double(), full_matrices=False)
    keep = s > tol * s[0] if len(s) and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    return u[:, keep] * s[keep], vh[keep].T, s[keep]


class Watcher(EditSession):
    """A session whose updates come from outside: ``step(request)`` after each edit records it."""

    def __init__(self, model: nn.Module, tok: object, layers: list[int], **kw: Any) -> None:
        super().__init__(model, tok, WatchedEditor(WatchHParams(layers=list(layers))), **kw)
        self.config["watched"] = True
        if self.writer is not None:
            self.writer.write_config(self.config)
        self._prev = {layer: w.clone() for layer, w in self.w0.items()}
        self._before: dict[str, dict[str, float]] = {}

    def begin(self, record: dict[str, Any] | EditRequest) -> None:
        """Optional, before an edit: record p(target_new) and p(target_true) on the unedited weights."""
        req = as_request(record, self.n_edits)
        self._before[str(req.case_id)] = self._probs([req], "before")[0]

    def step(self, record: dict[str, Any] | EditRequest) -> dict[str, Any]:
        """Record the edit just made for ``record``: its ``edits`` row and one ``layers`` row per watched layer."""
        t0 = time.perf_counter()
        index, batch = self.n_edits, self.n_batches
        if self.eval_every and index == 0 and not self.checkpoints:
            self.checkpoint_from(self._prev)
        req = as_request(record, index)
        row: dict[str, Any] = {"edit_index": index, "batch_index": batch, "batch_size": 1, "status": "ok",
                               "case_id": str(req.case_id), "subject": req.subject, "prompt": req.prompt,
                               "target_new": req.target_new, "target_true": req.target_true}
        row.update(self._before.pop(str(req.case_id), {}))
        deltas, logged = [], Recorder()
        for layer in self.layers:
            name = self.arch.rewrite_name(layer)
            w = weight_matrix(get_module(self.model, name)).detach()
            if not torch.isfinite(w).all():
                raise CollapseDiagError(f"layer {layer} holds non-finite weights after edit {index}; nothing recorded")
            left, right, s = factor_change(w - self._prev[layer])
            deltas.append(Delta(module=name, layer=layer, left=left.to(w.dtype), right=right.to(w.dtype)))
            info: dict[str, Any] = {"update_rank": int(len(s))}
            if len(s) == 1:  # a rank-one edit: ROME's denominators against its right direction
                ks = keys_at_subject(self.model, self.tok, name, req, self.env.templates)
                u = right[:, 0]
                k_u, k_bar = ks.unprefixed.double(), ks.mean.double()
                if float(k_bar @ u) < 0:
                    u = -u
                info.update(denominator_unprefixed=float(k_u @ u), denominator_consistent=float(k_bar @ u),
                            key_norm_unprefixed=float(k_u.norm()), key_norm_prefixed=float(ks.prefixed_mean.norm()),
                            key_cosine=float(torch.nn.functional.cosine_similarity(k_u, k_bar, dim=0)))
            logged.log(layer=layer, **info)
            self._prev[layer] = w.clone()
        res = self._probs([req], "after")[0]
        res["efficacy"] = bool(res["p_new_after"] > res["p_true_after"])
        from ..signals.evaluate import request_scores

        res.update(request_scores(self.model, self.tok, req))
        row.update(res)
        self.requests[index] = req
        due = bool(self.eval_every) and index // self.eval_every != (index + 1) // self.eval_every
        layer_rows = self._layer_rows(index, batch, deltas, logged, due)
        row["seconds"] = time.perf_counter() - t0
        self._save(batch, [row], deltas, layer_rows, {})
        self.n_edits += 1
        self.n_batches += 1
        if due:
            self.checkpoint()
        return row

    def checkpoint_from(self, weights: dict[int, torch.Tensor]) -> dict[str, Any]:
        """The baseline checkpoint, measured on ``weights`` (the watched layers before the first edit)."""
        now = {layer: weight_matrix(get_module(self.model, self.arch.rewrite_name(layer))).detach().clone()
               for layer in self.layers}
        with torch.no_grad():
            for layer, w in weights.items():
                weight_matrix(get_module(self.model, self.arch.rewrite_name(layer))).copy_(w)
            try:
                return self.checkpoint()
            finally:
                for layer, w in now.items():
                    weight_matrix(get_module(self.model, self.arch.rewrite_name(layer))).copy_(w)

    def wrap(self, fn: Callable[..., Any], request_arg: int | str = 1) -> Callable[..., Any]:
        """``fn`` followed by ``step`` with its request: positional argument ``request_arg`` (default 1, as in
        ``edit(model, request)``) or the keyword of that name."""
        def wrapped(*args: Any, **kw: Any) -> Any:
            req = kw[request_arg] if isinstance(request_arg, str) else args[request_arg]
            out = fn(*args, **kw)
            self.step(req)
            return out

        return wrapped

    def __enter__(self) -> "Watcher":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.eval_every and self.n_edits and self.n_edits - 1 not in self.checkpoints:
            self.checkpoint()


def watch(model: nn.Module, tok: object, layers: list[int], out: str | os.PathLike | None = None,
          **kw: Any) -> Watcher:
    """A ``Watcher`` on ``layers`` of ``model``, saving to ``out`` (see the module docstring). Keyword arguments
    are ``EditSession``'s: ``stats``, ``templates``, ``eval_every``, ``retention_sample``, ``seed``, …"""
    return Watcher(model, tok, layers, out=out, **kw)
