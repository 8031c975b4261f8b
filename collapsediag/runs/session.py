"""An editing session: sequential edits on a live model, every number recorded and saved as it goes.

>>> model, tok = load_model("smollm2-135m")
>>> s = EditSession(model, tok, get_editor("rome"), out="runs/rome")
>>> s.edit({"subject": "Paris", "prompt": "{} is the capital of", "target_new": "Italy",
...         "target_true": "France"})
"""
from __future__ import annotations

import os
import time
import traceback
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import torch
from torch import nn

from ..arch import ArchSpec, arch_for, get_module, weight_matrix
from .checkpoints import DEFAULT_SAMPLE
from .config import versions
from ..editors import Delta, Editor, apply_deltas
from ..editors.base import EditEnv
from ..editors.context import generate_templates
from ..editors.target import TargetCache
from ..errors import CollapseDiagError, ModeError
from ..signals.evaluate import requests_probs, requests_scores
from ..signals.fluency import GENERATION_PROMPTS, heldout_texts
from ..models import model_fingerprint, model_name
from ..progress import progress_bar
from ..recorder import NullRecorder, Recorder
from ..requests import EditRequest, as_request
from ..signals.energy import hyperspherical_energy
from ..signals.spectral import SpectralTracker
from ..stats import LayerStats, StatsCache, TextCorpus
from .guard import Guard
from .store import RunWriter
from ..tokens import first_content_index, subject_span

if TYPE_CHECKING:
    from ..signals.downstream_score import DownstreamSuite


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array; half precision as float32, which holds its values exactly."""
    t = t.detach().cpu()
    return (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()


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
    retention_sample : a checkpoint re-tests every edit since the previous one plus at most this many older
        ones, seeded (0 = every earlier edit); keeps checkpoints' cost flat in long runs.
    snapshot_every : store the edited matrices every this many edits (0 = never), so that ``Run.model_at``
        and resuming replay at most that many updates.
    target_cache : a ``TargetCache`` shared with other sessions on the same model, so a target (v*, z)
        computed in one run is reused by another when the weights are the same (e.g. batch runs and D4S,
        which all start from W₀).
    downstream : a ``DownstreamSuite`` scored at every checkpoint (the unedited baseline included) into the
        ``downstream`` table; needs ``eval_every``.
    guard : a ``Guard`` (``collapsediag.runs.guard``) that reads each request's key geometry before its edit
        and warns of (``warn``) or leaves out (``skip``) risky ones; its rows go to the ``guard`` table.
    """

    def __init__(self, model: nn.Module, tok: object, editor: Editor, *, out: str | os.PathLike | None = None,
                 arch: ArchSpec | None = None, stats: dict[int, LayerStats] | None = None,
                 corpus: TextCorpus | None = None, stats_tokens: int = 100_000, cache: StatsCache | None = None,
                 templates: list[str] | None = None, seed: int = 0, diagnostics: bool = True,
                 eval_every: int = 0, eval_texts: list[str] | None = None,
                 generation_prompts: list[str] | tuple[str, ...] = GENERATION_PROMPTS, generation_tokens: int = 64,
                 config: dict[str, Any] | None = None, progress: bool = True, target_cache: TargetCache | None = None,
                 retention_sample: int = DEFAULT_SAMPLE, snapshot_every: int = 1000,
                 downstream: "DownstreamSuite | None" = None, guard: Guard | None = None,
                 _resume: bool = False) -> None:
        self.model, self.tok, self.editor = model, tok, editor
        self.arch = arch or arch_for(model)
        self.layers = editor.layers()
        if stats is None:
            corpus = corpus or TextCorpus.packaged()
            stats = (cache or StatsCache()).get(model, tok, self.arch, self.layers, corpus, stats_tokens,
                                                progress=progress)
        torch.manual_seed(seed)
        if templates is None:
            templates = generate_templates(model, tok, editor.context_lengths, seed=seed)
        self.env = EditEnv(arch=self.arch, stats=stats, templates=templates, seed=seed, target_cache=target_cache)
        self.diagnostics = diagnostics
        self.eval_every = int(eval_every)
        if retention_sample < 0:
            raise ValueError(f"retention_sample must be 0 or more, got {retention_sample}")
        self.retention_sample = int(retention_sample)
        self.snapshot_every = int(snapshot_every)
        self.eval_texts = eval_texts if eval_texts is not None else (heldout_texts() if eval_every else [])
        self.generation_prompts = list(generation_prompts)
        self.generation_tokens = generation_tokens
        self.requests: dict[int, EditRequest] = {}
        self.checkpoints: list[int] = []
        self.w0 = {layer: weight_matrix(get_module(model, self.arch.rewrite_name(layer))).detach().clone()
                   for layer in self.layers}
        self.env.initial = self.w0
        self.spectra: dict[int, SpectralTracker] = {}  # per layer, warm-started from edit to edit
        self.energy0: dict[int, float] = {}  # hyperspherical energy of W₀ per layer
        self.n_edits = 0
        self.n_batches = 0
        self.edits: list[dict[str, Any]] = []
        self.layer_rows: list[dict[str, Any]] = []
        self.eval_rows: list[dict[str, Any]] = []
        self.retention_rows: list[dict[str, Any]] = []  # in memory only without ``out`` (else on disk)
        self.downstream = downstream
        self.downstream_rows: list[dict[str, Any]] = []
        self.guard = guard
        self.guard_rows: list[dict[str, Any]] = []
        self.config = self._config(config or {})
        if out is None:
            self.writer = None
        elif _resume:
            self.writer = RunWriter(out)
        else:
            self.writer = RunWriter.create(out, self.config)

    def _config(self, extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": model_name(self.model), "model_fingerprint": model_fingerprint(self.model),
            "model_type": self.model.config.model_type, "dtype": str(next(self.model.parameters()).dtype),
            "arch": self.arch.__dict__, "editor": self.editor.name,
            "hparams": self.editor.hparams.to_dict(), "layers": self.layers, "seed": self.env.seed,
            "context_templates": self.env.templates,
            "stats": {str(k): v.identity for k, v in self.env.stats.items()},
            "eval_every": self.eval_every, "retention_sample": self.retention_sample,
            "snapshot_every": self.snapshot_every,
            "downstream": self.downstream.config() if self.downstream is not None else None,
            "guard": self.guard.config() if self.guard is not None else None,
            "generation_prompts": self.generation_prompts,
            "generation_tokens": self.generation_tokens, "n_eval_texts": len(self.eval_texts),
            "diagnostics": self.diagnostics,
            "padding_side": getattr(self.tok, "padding_side", None), "versions": versions(),
            "initial_weights": {str(k): {"weight_l1": float(w.float().abs().mean()), "weight_fro": float(w.float().norm())}
                                for k, w in self.w0.items()},
            **extra,
        }

    def edit(self, record: dict[str, Any] | EditRequest) -> dict[str, Any]:
        """Make one edit; returns its ``edits`` row. A failed edit leaves the weights untouched."""
        return self.edit_batch([record])[0]

    def edit_batch(self, records: list[dict[str, Any] | EditRequest]) -> list[dict[str, Any]]:
        """Make one update for every record (one batch); returns their ``edits`` rows.

        A malformed record gets an error row and the rest of the batch goes on; if the update itself
        fails, every row of the batch records the error and the weights are left untouched.
        """
        if not records:
            return []
        self._check_batch_size(len(records))
        if self.eval_every and self.n_edits == 0 and not self.checkpoints:
            self.checkpoint()  # the unedited baseline (edit_index −1)
        t0 = time.perf_counter()
        start, batch = self.n_edits, self.n_batches
        rows: list[dict[str, Any]] = []
        todo: list[tuple[dict[str, Any], EditRequest]] = []
        for j, record in enumerate(records):
            row = {"edit_index": start + j, "batch_index": batch, "batch_size": len(records), "status": "ok"}
            try:
                req = as_request(record, start + j)
                row.update(case_id=str(req.case_id), subject=req.subject, prompt=req.prompt,
                           target_new=req.target_new, target_true=req.target_true)
                span = subject_span(self.tok, req.prompt, req.subject, req.case_id)
                row["subject_first_token"] = span.first == first_content_index(self.tok, req.text)
                row["subject_last_piece"] = span.last_piece
                todo.append((row, req))
            except (CollapseDiagError, ValueError, RuntimeError) as exc:
                self._fail(row, exc, record, start + j)
            rows.append(row)
        todo = self._screen(todo)
        for (row, _), probs in zip(todo, self._probs([q for _, q in todo], "before")):
            row.update(probs)
        rec: Recorder = Recorder() if self.diagnostics else NullRecorder()
        deltas: list[Delta] = []
        layer_rows: list[dict[str, Any]] = []
        state: dict[str, np.ndarray] = {}
        applied = None
        if todo:
            try:
                deltas = self.editor.compute(self.model, self.tok, [q for _, q in todo], self.env, rec)
                bad = [d.module for d in deltas if not d.is_finite()]
                if bad:
                    raise CollapseDiagError(f"non-finite update for {bad}; weights left untouched")
                applied = apply_deltas(self.model, deltas)
                after = self._probs([q for _, q in todo], "after")
                for res, scores in zip(after, requests_scores(self.model, self.tok, [q for _, q in todo])):
                    res["efficacy"] = bool(res["p_new_after"] > res["p_true_after"])
                    res.update(scores)
                due = bool(self.eval_every) and start // self.eval_every != (start + len(records)) // self.eval_every
                layer_rows = self._layer_rows(start + len(records) - 1, batch, deltas, rec, due) \
                    if self.diagnostics else []
                state = self.editor.commit()
                for (row, req), res in zip(todo, after):
                    row.update(res)
                    self.requests[row["edit_index"]] = req
            except (CollapseDiagError, ValueError, RuntimeError) as exc:
                if applied is not None:
                    applied.revert()
                for row, _ in todo:
                    self._fail(row, exc, None, row["edit_index"])
                deltas, layer_rows, state = [], [], {}
            except BaseException:  # e.g. KeyboardInterrupt in a notebook: leave the weights as they were
                if applied is not None:
                    applied.revert()
                raise
        share = (time.perf_counter() - t0) / len(records)
        for row in rows:
            row["seconds"] = share
        self._save(batch, rows, deltas, layer_rows, state)
        before = self.n_edits
        self.n_edits += len(records)
        if self.writer is not None and self.snapshot_every and before // self.snapshot_every != \
                self.n_edits // self.snapshot_every:
            self.writer.save_snapshot(self.n_edits - 1, {
                f"w_{layer}": _numpy(weight_matrix(get_module(self.model, self.arch.rewrite_name(layer))))
                for layer in self.layers})
        self.n_batches += 1
        if self.eval_every and before // self.eval_every != self.n_edits // self.eval_every:
            self.checkpoint()
        return rows

    def _screen(self, todo: list[tuple[dict[str, Any], EditRequest]]) -> list[tuple[dict[str, Any], EditRequest]]:
        """The guard's rows for the requests about to be edited, saved before the update; the requests kept."""
        if self.guard is None or not todo:
            return todo
        try:
            rows = self.guard.screen(self, [(row["edit_index"], q) for row, q in todo])
        except (CollapseDiagError, ValueError, RuntimeError) as exc:  # the batch fails on its rows, the run goes on
            for row, _ in todo:
                self._fail(row, CollapseDiagError(f"the guard could not read the key geometry: {exc}"), None,
                           row["edit_index"])
            return []
        self.guard_rows.extend(rows)
        if self.writer is not None:
            self.writer.append("guard", rows)
        skip = {g["edit_index"]: g["reason"] for g in rows if g["action"] == "skipped"}
        for row, _ in todo:
            if row["edit_index"] in skip:
                row["status"] = f"skipped by the guard: {skip[row['edit_index']]}"
        return [(row, q) for row, q in todo if row["edit_index"] not in skip]

    def _check_batch_size(self, size: int) -> None:
        if size < 1:
            raise ModeError(f"batch size must be at least 1, got {size}")
        if size > 1 and self.editor.single_edit_only:
            raise ModeError(f"{self.editor.name} edits one fact at a time: use --mode sequential (batch size 1)")

    @staticmethod
    def _fail(row: dict[str, Any], exc: Exception, record: Any, index: int) -> None:
        row["status"] = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, CollapseDiagError):
            row["status"] += " | " + traceback.format_exc(limit=2).splitlines()[-1]
        row.setdefault("case_id", str(getattr(exc, "record_id", None) or
                                      (record.get("case_id", index) if isinstance(record, dict) else index)))

    def run(self, records: Iterable[dict[str, Any] | EditRequest], batch_size: int = 1,
            progress: bool = True, live: bool = False) -> list[dict[str, Any]]:
        """Edit every record in order, ``batch_size`` records per update, with a progress bar.

        ``batch_size=1`` is sequential editing; ``len(records)`` is one batch; anything between is
        sequential-batch editing. ROME and r-ROME accept only 1 (``ModeError`` otherwise).
        ``live=True`` in a Jupyter notebook shows a figure of the signals redrawn after every batch
        (``collapsediag.runs.live.LiveView``); elsewhere it draws nothing.
        """
        records = list(records)
        self._check_batch_size(batch_size)
        view = None
        if live:
            from . import live as live_view

            view = live_view.LiveView(self) if live_view.in_notebook() else None
        rows: list[dict[str, Any]] = []
        bar = progress_bar(total=len(records), desc=f"{self.editor.name} edits", unit="edit", disable=not progress)
        ok = 0
        for i in range(0, len(records), batch_size):
            new = self.edit_batch(records[i:i + batch_size])
            rows += new
            bar.update(min(batch_size, len(records) - i))
            ok += sum(x["status"] == "ok" and bool(x.get("efficacy")) for x in new)  # no walk over earlier rows
            bar.set_postfix(efficacy=f"{ok}/{len(rows)}")
            if view is not None:
                view.update()
        bar.close()
        if self.eval_every and self.n_edits and self.n_edits - 1 not in self.checkpoints:
            self.checkpoint()
        if view is not None:
            view.close()
        return rows

    def checkpoint(self) -> dict[str, Any]:
        """Re-test the edits since the last checkpoint and a seeded sample of older ones (``retention_sample``),
        and measure perplexity and generation entropy (and the ``downstream`` tasks); returns the evals row
        (``collapsediag.runs.checkpoints``)."""
        from .checkpoints import downstream_rows, run_checkpoint

        row, retention_rows = run_checkpoint(self)
        down = downstream_rows(self)
        self.checkpoints.append(row["edit_index"])
        if self.writer is not None:  # the evals row last: it marks the checkpoint complete (resume)
            self.writer.append("downstream", down)
            self.writer.append("retention", retention_rows)
            self.writer.append("evals", [row])
        else:  # a saved run keeps them on disk only: the table grows fastest in long runs
            self.retention_rows.extend(retention_rows)
        self.downstream_rows.extend(down)
        self.eval_rows.append(row)
        return row

    @classmethod
    def resume(cls, path: str | os.PathLike, model: nn.Module, tok: object, records: list[Any], *,
               cache: StatsCache | None = None, corpus: TextCorpus | None = None,
               progress: bool = True) -> "EditSession":
        """Reopen a run written to ``path`` (after a crash) and bring ``model`` to its last committed edit.

        ``model`` must be the unedited base model; ``records`` the run's records in order (those already
        done are re-parsed, not re-edited). Context templates, seed, hyper-parameters, evaluation settings
        and the statistics identity come from the run. The run goes back to its last consistent state
        (``collapsediag.runs.resume``): a batch cut short, or a checkpoint missing or partly written, is dropped
        with every edit after it; that checkpoint is redone here and the caller edits the rest again, so no
        row is ever duplicated.
        """
        from .resume import resume_session

        return resume_session(cls, path, model, tok, records, cache=cache, corpus=corpus, progress=progress)

    def restore(self) -> None:
        """Put every edited weight back to its value when the session started (and clear the editor's
        running state, e.g. D4S's sums)."""
        with torch.no_grad():
            for layer, w0 in self.w0.items():
                weight_matrix(get_module(self.model, self.arch.rewrite_name(layer))).copy_(w0)
        self.editor.reset()

    def _probs(self, reqs: list[EditRequest], when: str) -> list[dict[str, float]]:
        """p(target_new) and p(target_true) of each request's prompt, ``when`` = before / after, scored together."""
        return [{f"p_new_{when}": p_new, f"p_true_{when}": p_true}
                for p_new, p_true in requests_probs(self.model, self.tok, reqs)]

    def _layer_rows(self, index: int, batch: int, deltas: list[Delta], rec: Recorder,
                    checkpoint: bool = False) -> list[dict[str, Any]]:
        """One ``layers`` row per edited layer: norms, drift, the spectral signals (``cond(W)`` only when a
        checkpoint follows this batch) and what the editor logged."""
        _, logged = rec.pop()
        rows = []
        for d in deltas:
            w = weight_matrix(get_module(self.model, d.module)).detach().float()  # norms in float32 at least
            dw = d.dense().to(w.device, w.dtype)
            n = w.numel()
            row = {"edit_index": index, "batch_index": batch, "layer": d.layer, "module": d.module,
                   "weight_l1": float(w.abs().sum() / n), "weight_fro": float(w.norm()),
                   "delta_l1": float(dw.abs().sum() / n), "delta_fro": float(dw.norm()),
                   "update_ratio": float(dw.norm() / (w - dw).norm().clamp_min(1e-30)),
                   "drift_fro": float((w - self.w0[d.layer].float()).norm() / n),
                   "drift_l1": float((w - self.w0[d.layer].float()).abs().sum() / n)}
            tracker = self.spectra.get(d.layer)
            if tracker is None:
                tracker = self.spectra[d.layer] = SpectralTracker(self.w0[d.layer])
            row.update(tracker.update(w))
            if d.layer not in self.energy0:
                self.energy0[d.layer] = hyperspherical_energy(self.w0[d.layer])
            row["weight_energy"] = hyperspherical_energy(w)
            row["weight_energy_ratio"] = row["weight_energy"] / self.energy0[d.layer]
            if checkpoint:
                row["weight_condition"] = tracker.condition(w)
            row.update(logged.get(d.layer, {}))
            stats = self.env.stats.get(d.layer)
            if stats is not None and "condition" not in row:  # the editor's own matrix takes precedence
                row["condition"] = stats.condition()
            rows.append(row)
        return rows

    def _save(self, batch: int, rows: list[dict[str, Any]], deltas: list[Delta], layer_rows: list[dict[str, Any]],
              state: dict[str, np.ndarray]) -> None:
        self.edits.extend(rows)
        self.layer_rows.extend(layer_rows)
        if self.writer is None:
            return
        if deltas:
            factors = {f"state_{k}": v for k, v in state.items()}
            for d in deltas:
                factors[f"left_{d.layer}"] = _numpy(d.left)
                factors[f"right_{d.layer}"] = _numpy(d.right)
            self.writer.save_factors(batch, factors)
        self.writer.append("layers", layer_rows)
        self.writer.append("edits", rows)
