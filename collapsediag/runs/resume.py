"""Resuming a cut run: keep its consistent prefix, drop the rest, rebuild the model and go on.

A crash (or a cut file) can leave a batch without its factors or layer rows, edits without their
checkpoint, or a checkpoint with only some of its rows. ``consistent_state`` keeps the whole batches
before the first such hole and every complete checkpoint before it; a checkpoint that is due but
missing or incomplete is redone on resume, and the edits after it are dropped (the caller edits them
again), so no (checkpoint, edit_index) row is ever written twice.
"""
from __future__ import annotations

import os
import pathlib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..arch import ArchSpec
from ..editors import get_editor
from ..errors import CollapseDiagError
from ..models import model_fingerprint
from ..requests import as_request
from ..signals.downstream_score import DownstreamSuite
from ..signals.fluency import GENERATION_PROMPTS, heldout_texts
from .config import plain_row, stats_from_config
from .guard import Guard
from .rebuild import apply_run
from .store import Run, RunWriter, load_run

if TYPE_CHECKING:
    from torch import nn

    from .session import EditSession
    from ..stats import StatsCache, TextCorpus


@dataclass
class ResumeState:
    """What a resumed run keeps: the tables' rows, the number of batches, and the checkpoint to redo."""

    edits: pd.DataFrame
    layers: pd.DataFrame
    evals: pd.DataFrame
    retention: pd.DataFrame
    n_batches: int
    checkpoints: list[int]  # kept (complete) checkpoints, ascending
    redo: int | None  # edit_index of the checkpoint to redo after rebuilding the model (−1: baseline)
    downstream: pd.DataFrame | None = None  # rows of the kept checkpoints (written before their evals row)
    guard: pd.DataFrame | None = None  # rows of the kept edits (written before their edits rows)


def whole_batches(run: Run) -> list[pd.DataFrame]:
    """The edits of the leading batches that are whole: numbered in order, contiguous edits, and (when
    one of their edits is ok) with their factors file and, when the run records diagnostics, one layers
    row per edited layer."""
    edits = run.edits.copy()
    edits["batch_index"] = edits["batch_index"].fillna(edits["edit_index"])  # runs written before batches
    need = len(run.config.get("layers") or []) or 1
    diagnostics = run.config.get("diagnostics", True)
    per_edit = run.layers["edit_index"].dropna().astype(int).value_counts()
    out: list[pd.DataFrame] = []
    start = 0
    for b, rows in edits.sort_values("edit_index").groupby("batch_index", sort=True):
        index = rows["edit_index"].astype(int).tolist()
        if int(b) != len(out) or index != list(range(start, start + len(index))):
            break
        if (rows["status"] == "ok").any():
            if not run.has_factors(int(b)):
                break
            if diagnostics and int(per_edit.get(index[-1], 0)) != need:
                break
        out.append(rows)
        start += len(index)
    return out


def due_checkpoints(batches: list[pd.DataFrame], eval_every: int, baseline: bool = True) -> list[int]:
    """Checkpoints a run makes for these batches (as ``EditSession.edit_batch``): the baseline (−1),
    then the last edit of each batch after which ``n_edits // eval_every`` changed."""
    if not eval_every:
        return []
    out = [-1] if baseline else []
    start = 0
    for rows in batches:
        stop = start + len(rows)
        if start // eval_every != stop // eval_every:
            out.append(stop - 1)
        start = stop
    return out


def _complete(c: int, evals: pd.DataFrame, retention: pd.DataFrame) -> bool:
    """One evals row for checkpoint ``c`` and all the retention rows it says it wrote (runs written
    before ``n_retention`` existed: whatever is there)."""
    rows = evals[evals["edit_index"] == c]
    if len(rows) != 1:
        return False
    n = rows["n_retention"].iloc[0]
    return bool(pd.isna(n) or int((retention["checkpoint"] == c).sum()) == int(n))


def consistent_state(run: Run) -> ResumeState:
    """The state a cut run resumes from (see the module docstring)."""
    batches = whole_batches(run)
    evals, retention = run.evals, run.retention
    had = set(evals["edit_index"].dropna().astype(int))
    # a run written before the baseline checkpoint existed has later checkpoints but none at −1
    baseline = -1 in had or not any(c >= 0 for c in had)
    due = due_checkpoints(batches, int(run.config.get("eval_every") or 0), baseline)
    last = sum(len(r) for r in batches) - 1
    present = had | set(retention["checkpoint"].dropna().astype(int))
    kept, redo = [], None
    for c in sorted(set(due) | {c for c in present if -1 <= c <= last}):
        if _complete(c, evals, retention):
            kept.append(c)
        elif c in due:
            redo = c  # due but missing or cut: drop every edit after it and redo it
            break
        # else: a checkpoint nobody asks for (e.g. the end-of-run one) is kept only if complete
    if redo is not None:
        batches = [rows for rows in batches if int(rows["edit_index"].max()) <= redo]
    edits = pd.concat(batches, ignore_index=True) if batches else run.edits.iloc[:0]
    done = set(edits["edit_index"].astype(int))
    return ResumeState(
        edits=edits.reset_index(drop=True),
        layers=run.layers[run.layers["edit_index"].isin(done)].reset_index(drop=True),
        evals=evals[evals["edit_index"].isin(kept)].reset_index(drop=True),
        retention=retention[retention["checkpoint"].isin(kept)].reset_index(drop=True),
        n_batches=len(batches), checkpoints=kept, redo=redo,
        downstream=run.downstream[run.downstream["edit_index"].isin(kept)].reset_index(drop=True),
        guard=run.guard[run.guard["edit_index"].isin(done)].reset_index(drop=True))


def _drop_factors(run: Run, n_batches: int) -> None:
    """Remove the factor files of dropped batches (they are rewritten when those batches are redone)."""
    for p in (run.path / "factors").glob("batch_*.npz"):
        stem = p.name[len("batch_"):-len(".npz")]
        if not stem.isdigit() or int(stem) >= n_batches:
            p.unlink()


def resume_session(cls: type["EditSession"], path: str | os.PathLike, model: "nn.Module", tok: object,
                   records: list[Any], *, cache: "StatsCache | None" = None, corpus: "TextCorpus | None" = None,
                   progress: bool = True) -> "EditSession":
    """Reopen the run in ``path`` at its consistent state (see ``EditSession.resume``)."""
    run = load_run(path)
    cfg = run.config
    if run.made_alone:
        raise CollapseDiagError(f"{path}: its edits were each made alone on the unedited model; there is no "
                                "edited model to go on from (run edit_each_alone again for more records)")
    if model_fingerprint(model) != cfg["model_fingerprint"]:
        raise CollapseDiagError("resume needs the run's unedited base model (fingerprint differs)")
    editor = get_editor(cfg["editor"], cfg["hparams"])
    if cfg.get("projector_file"):
        editor.set_projector(cfg["projector_file"], model)
    arch = ArchSpec(**cfg["arch"])
    stats = stats_from_config(model, tok, arch, cfg, cache, corpus, progress)
    eval_every = int(cfg.get("eval_every") or 0)
    # the run scored the first n_eval_texts passages of its file (or of the packaged ones)
    eval_texts = heldout_texts(cfg.get("eval_text"), max_passages=cfg.get("n_eval_texts")) \
        if eval_every and cfg.get("n_eval_texts", 1) else []
    if eval_every and len(eval_texts) != cfg.get("n_eval_texts", len(eval_texts)):
        warnings.warn(f"{path}: the run scored {cfg['n_eval_texts']} held-out texts, resuming with "
                      f"{len(eval_texts)} (texts not given by a file)", stacklevel=3)
    session = cls(model, tok, editor, out=path, arch=arch, stats=stats, templates=cfg["context_templates"],
                  seed=cfg["seed"], eval_every=eval_every, eval_texts=eval_texts,
                  generation_prompts=cfg.get("generation_prompts", GENERATION_PROMPTS),
                  generation_tokens=cfg.get("generation_tokens", 64), diagnostics=cfg.get("diagnostics", True),
                  retention_sample=int(cfg.get("retention_sample") or 0),  # runs before sampling tested all
                  snapshot_every=int(cfg.get("snapshot_every") or 0),
                  downstream=DownstreamSuite.from_config(cfg["downstream"]) if cfg.get("downstream") else None,
                  guard=Guard(**cfg["guard"]) if cfg.get("guard") else None, progress=progress, _resume=True)
    session.config = cfg

    state = consistent_state(run)
    n = len(state.edits)
    if n > len(records):
        raise CollapseDiagError(f"{path}: the run holds {n} edits but only {len(records)} records were given")
    run.edits, run.layers = state.edits, state.layers
    if n:
        apply_run(model, run, n - 1, check_fingerprint=False)
    for b, rows in state.edits.groupby("batch_index", sort=True):
        if (rows["status"] == "ok").any():
            arrays = run.factors(int(b))
            editor.replay({k[6:]: v for k, v in arrays.items() if k.startswith("state_")}, session.env)

    # checkpoints first: a crash in between leaves rows that the next resume drops again
    for table in ("downstream", "evals", "retention", "guard", "layers", "edits"):
        if getattr(state, table) is not None:
            session.writer.rewrite(table, getattr(state, table))
    _drop_factors(run, state.n_batches)
    for index in run.snapshots():  # weights after edits that are dropped (redone later)
        if index >= n:
            run.snapshot_file(index).unlink()

    session.edits = [plain_row(r) for r in state.edits.to_dict("records")]
    session.layer_rows = [plain_row(r) for r in state.layers.to_dict("records")]
    session.eval_rows = [plain_row(r) for r in state.evals.to_dict("records")]
    session.guard_rows = [plain_row(r) for r in state.guard.to_dict("records")]
    session.checkpoints = list(state.checkpoints)
    for row in session.edits:
        i = int(row["edit_index"])
        if row["status"] == "ok":
            session.requests[i] = as_request(records[i], i)
    session.n_edits, session.n_batches = n, state.n_batches
    if state.redo is not None:
        session.checkpoint()
    return session


def fork_run(src: str | os.PathLike, dst: str | os.PathLike, n_edits: int, config: dict[str, Any] | None = None,
             last_checkpoint: bool = True) -> Run:
    """A new run in ``dst`` holding the first ``n_edits`` edits of the run in ``src``: its rows, checkpoints,
    factors and snapshots up to there, with its config updated by ``config`` (``before_fork`` keeps the values
    it replaced, which the copied rows were made with, and ``forked_from`` the source).
    ``last_checkpoint=False`` leaves out a checkpoint made right after the last edit (to redo it otherwise).

    The edits must end on a batch boundary. The fork is a run like any other: ``EditSession.resume`` goes on
    from it, and a checkpoint after its last edit can be added (the long study scores MEMIT's batch size 1
    on the sequential run's first edits this way instead of making them again).
    """
    import shutil


    run = load_run(src)
    edits = run.edits[run.edits["edit_index"] < n_edits]
    if len(edits) != n_edits:
        raise CollapseDiagError(f"{src} holds {len(run.edits)} edits, fewer than the {n_edits} to fork")
    batches = sorted(set(edits["batch_index"].fillna(edits["edit_index"]).astype(int)))
    later = run.edits[run.edits["edit_index"] >= n_edits]
    if len(later) and set(later["batch_index"].fillna(later["edit_index"]).astype(int)) & set(batches):
        raise CollapseDiagError(f"{src}: edit {n_edits - 1} is inside a batch; fork at a batch's end")
    dst = pathlib.Path(dst)
    if (dst / "config.json").exists():
        raise CollapseDiagError(f"{dst} already holds a run")
    tmp = dst.with_name(dst.name + ".fork-tmp")  # built aside and moved in whole: a cut fork leaves no run
    shutil.rmtree(tmp, ignore_errors=True)
    changed = {k: run.config.get(k) for k in (config or {}) if run.config.get(k) != config[k]}
    writer = RunWriter.create(tmp, {**run.config, **(config or {}), "forked_from": str(src),
                                    "before_fork": changed})
    end = n_edits if last_checkpoint else n_edits - 1
    for table, df in (("edits", edits), ("layers", run.layers[run.layers["edit_index"] < n_edits]),
                      ("evals", run.evals[run.evals["edit_index"] < end]),
                      ("retention", run.retention[run.retention["checkpoint"] < end]),
                      ("downstream", run.downstream[run.downstream["edit_index"] < end]),
                      ("guard", run.guard[run.guard["edit_index"] < n_edits])):
        writer.rewrite(table, df.reset_index(drop=True))
    for b in batches:
        if (f := run.factors_file(b)) is not None:
            shutil.copy2(f, writer.path / "factors" / f.name)
    for index in run.snapshots():
        if index < n_edits:
            (writer.path / "snapshots").mkdir(exist_ok=True)
            shutil.copy2(run.snapshot_file(index), writer.path / "snapshots" / run.snapshot_file(index).name)
    if dst.exists():
        dst.rmdir()  # an empty folder only: anything else is refused
    os.replace(tmp, dst)
    return load_run(dst)
