"""An editing session: sequential edits on a live model, every number recorded and saved as it goes.

>>> model, tok = load_model("smollm2-135m")
>>> s = EditSession(model, tok, get_editor("rome"), out="runs/rome")
>>> s.edit({"subject": "Paris", "prompt": "{} is the capital of", "target_new": "Italy",
...         "target_true": "France"})
"""
from __future__ import annotations

import os
import platform
import time
import traceback
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .arch import ArchSpec, arch_for, get_module, weight_matrix
from .editors import Delta, Editor, apply_deltas
from .editors.base import EditEnv
from .editors.context import DEFAULT_LENGTHS, generate_templates
from .errors import CollapseDiagError
from .evaluate import success_share, target_probs
from .models import model_fingerprint, model_name
from .recorder import NullRecorder, Recorder
from .requests import EditRequest
from .stats import LayerStats, StatsCache, TextCorpus
from .store import RunWriter
from .tokens import first_content_index, subject_span


def _versions() -> dict[str, str]:
    import transformers

    return {"collapsediag": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


class EditSession:
    """Applies edits one by one (each on the already edited model) and records them.

    Parameters
    ----------
    model, tok : the causal LM and its tokenizer (see ``load_model``).
    editor : an editor from ``get_editor``.
    out : run directory to write (None keeps results in memory only).
    stats : key statistics per layer; computed from ``corpus`` through ``cache`` if omitted.
    templates : context templates; generated from the unedited model with ``seed`` if omitted.
    diagnostics : False records only the edits table (no per-layer signals).
    """

    def __init__(self, model: nn.Module, tok: object, editor: Editor, *, out: str | os.PathLike | None = None,
                 arch: ArchSpec | None = None, stats: dict[int, LayerStats] | None = None,
                 corpus: TextCorpus | None = None, stats_tokens: int = 100_000, cache: StatsCache | None = None,
                 templates: list[str] | None = None, seed: int = 0, diagnostics: bool = True,
                 config: dict[str, Any] | None = None, progress: bool = True) -> None:
        self.model, self.tok, self.editor = model, tok, editor
        self.arch = arch or arch_for(model)
        self.layers = editor.layers()
        if stats is None:
            corpus = corpus or TextCorpus.packaged()
            stats = (cache or StatsCache()).get(model, tok, self.arch, self.layers, corpus, stats_tokens,
                                                progress=progress)
        torch.manual_seed(seed)
        if templates is None:
            templates = generate_templates(model, tok, DEFAULT_LENGTHS, seed=seed)
        self.env = EditEnv(arch=self.arch, stats=stats, templates=templates, seed=seed)
        self.diagnostics = diagnostics
        self.w0 = {layer: weight_matrix(get_module(model, self.arch.rewrite_name(layer))).detach().clone()
                   for layer in self.layers}
        self.n_edits = 0
        self.edits: list[dict[str, Any]] = []
        self.layer_rows: list[dict[str, Any]] = []
        self.config = self._config(config or {})
        self.writer = RunWriter.create(out, self.config) if out is not None else None

    def _config(self, extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": model_name(self.model), "model_fingerprint": model_fingerprint(self.model),
            "model_type": self.model.config.model_type, "dtype": str(next(self.model.parameters()).dtype),
            "arch": self.arch.__dict__, "editor": self.editor.name,
            "hparams": self.editor.hparams.to_dict(), "layers": self.layers, "seed": self.env.seed,
            "context_templates": self.env.templates,
            "stats": {str(k): v.identity for k, v in self.env.stats.items()},
            "padding_side": getattr(self.tok, "padding_side", None), "versions": _versions(),
            "initial_weights": {str(k): {"weight_l1": float(w.abs().mean()), "weight_fro": float(w.norm())}
                                for k, w in self.w0.items()},
            **extra,
        }

    def edit(self, record: dict[str, Any] | EditRequest) -> dict[str, Any]:
        """Make one edit; returns its ``edits`` row. A failed edit leaves the weights untouched."""
        t0 = time.perf_counter()
        index = self.n_edits
        row: dict[str, Any] = {"edit_index": index, "batch_index": index, "status": "ok"}
        rec: Recorder = Recorder() if self.diagnostics else NullRecorder()
        layer_rows: list[dict[str, Any]] = []
        deltas: list[Delta] = []
        applied = None
        try:
            req = record if isinstance(record, EditRequest) else EditRequest.from_dict(record, case_id=index)
            row.update(case_id=str(req.case_id), subject=req.subject, prompt=req.prompt,
                       target_new=req.target_new, target_true=req.target_true)
            span = subject_span(self.tok, req.prompt, req.subject, req.case_id)
            row["subject_first_token"] = span.first == first_content_index(self.tok, req.text)
            row["subject_last_piece"] = span.last_piece
            row.update(self._probs(req, "before"))
            deltas = self.editor.compute(self.model, self.tok, [req], self.env, rec)
            bad = [d.module for d in deltas if not d.is_finite()]
            if bad:
                raise CollapseDiagError(f"non-finite update for {bad}; weights left untouched")
            applied = apply_deltas(self.model, deltas)
            layer_rows = self._layer_rows(index, deltas, rec) if self.diagnostics else []
            row.update(self._probs(req, "after"))
            row["efficacy"] = bool(row["p_new_after"] > row["p_true_after"])
            row.update(self._scores(req))
        except (CollapseDiagError, ValueError, RuntimeError) as exc:
            if applied is not None:
                applied.revert()
            row["status"] = f"{type(exc).__name__}: {exc}"
            row.setdefault("case_id", str(getattr(exc, "record_id", None) or
                                          (record.get("case_id", index) if isinstance(record, dict) else index)))
            deltas, layer_rows = [], []
            if not isinstance(exc, CollapseDiagError):
                row["status"] += " | " + traceback.format_exc(limit=2).splitlines()[-1]
        row["seconds"] = time.perf_counter() - t0
        self._save(index, row, deltas, layer_rows)
        self.n_edits += 1
        return row

    def run(self, records: Iterable[dict[str, Any] | EditRequest], progress: bool = True) -> list[dict[str, Any]]:
        """Edit every record in order, with a progress bar."""
        records = list(records)
        rows = []
        bar = tqdm(records, desc=f"{self.editor.name} edits", unit="edit", disable=not progress)
        for r in bar:
            rows.append(self.edit(r))
            ok = sum(x["status"] == "ok" and bool(x.get("efficacy")) for x in rows)
            bar.set_postfix(efficacy=f"{ok}/{len(rows)}")
        return rows

    def restore(self) -> None:
        """Put every edited weight back to its value when the session started."""
        with torch.no_grad():
            for layer, w0 in self.w0.items():
                weight_matrix(get_module(self.model, self.arch.rewrite_name(layer))).copy_(w0)

    def _probs(self, req: EditRequest, when: str) -> dict[str, float]:
        targets = [req.target_new] + ([req.target_true] if req.target_true else [])
        p = target_probs(self.model, self.tok, [req.text] * len(targets), targets)
        return {f"p_new_{when}": float(p[0]), f"p_true_{when}": float(p[1]) if len(p) > 1 else float("nan")}

    def _scores(self, req: EditRequest) -> dict[str, float]:
        out = {"paraphrase_score": float("nan"), "neighborhood_score": float("nan")}
        if not req.target_true:
            return out
        for key, prompts, new_wins in (("paraphrase_score", req.paraphrase_prompts, True),
                                       ("neighborhood_score", req.neighborhood_prompts, False)):
            if not prompts:
                continue
            texts = [p.format(req.subject) if "{}" in p else p for p in prompts]
            p = target_probs(self.model, self.tok, texts * 2,
                             [req.target_new] * len(texts) + [req.target_true] * len(texts))
            out[key] = success_share(p[:len(texts)], p[len(texts):], new_wins)
        return out

    def _layer_rows(self, index: int, deltas: list[Delta], rec: Recorder) -> list[dict[str, Any]]:
        _, logged = rec.pop()
        rows = []
        for d in deltas:
            w = weight_matrix(get_module(self.model, d.module)).detach()
            dw = d.dense().to(w.dtype)
            n = w.numel()
            row = {"edit_index": index, "layer": d.layer, "module": d.module,
                   "weight_l1": float(w.abs().sum() / n), "weight_fro": float(w.norm()),
                   "delta_l1": float(dw.abs().sum() / n), "delta_fro": float(dw.norm()),
                   "drift_fro": float((w - self.w0[d.layer]).norm() / n)}
            stats = self.env.stats.get(d.layer)
            if stats is not None:
                row["condition"] = stats.condition()
            row.update(logged.get(d.layer, {}))
            rows.append(row)
        return rows

    def _save(self, index: int, row: dict[str, Any], deltas: list[Delta], layer_rows: list[dict[str, Any]]) -> None:
        self.edits.append(row)
        self.layer_rows.extend(layer_rows)
        if self.writer is None:
            return
        if deltas:
            factors = {}
            for d in deltas:
                factors[f"left_{d.layer}"] = d.left.detach().cpu().numpy()
                factors[f"right_{d.layer}"] = d.right.detach().cpu().numpy()
            self.writer.save_factors(index, factors)
        self.writer.append("layers", layer_rows)
        self.writer.append("edits", [row])
