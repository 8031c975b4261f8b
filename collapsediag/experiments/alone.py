"""Each edit alone: apply one edit to the unedited model, measure held-out perplexity, put the weights back.

This is the ground truth the cheap signals are scored against ("perplexity ratio ≥ 2 with the edit alone").

>>> ratios = edit_each_alone(model, tok, records, ["rome", "r-rome"], texts, layer=5)
>>> confirm_disabling_edits(run, [3, 17], model, tok, texts)   # a saved run's edits, each alone
"""
from __future__ import annotations

import os
import pathlib
import time
from typing import Any

import pandas as pd
from torch import nn

from ..arch import ArchSpec
from ..editors import get_editor
from ..editors.base import apply_deltas
from ..editors.target import TargetCache
from ..errors import CollapseDiagError
from ..models import model_fingerprint
from ..runs.rebuild import run_deltas
from ..runs.session import EditSession
from ..runs.store import ALONE, Run
from ..signals.fluency import perplexity
from ..stats import LayerStats


def edit_each_alone(model: nn.Module, tok: object, records: list[dict[str, Any]], editors: list[str],
                    texts: list[str], layer: int = 5, templates: list[str] | None = None,
                    out: str | os.PathLike | None = None, hparams: dict[str, Any] | None = None,
                    stats: dict[int, LayerStats] | None = None, log: Any = None) -> pd.DataFrame:
    """Edit each record alone on the unedited ``model`` with each editor (ROME family, one ``layer``).

    The editors share one target cache, so r-ROME reuses ROME's v* for the same record (same weights).
    With ``out``, each editor's edits are saved as a run under ``out/<editor>`` (every edit made from W₀).
    ``stats`` are the layer's key statistics (default: the packaged corpus through the cache, as a run).
    Returns one row per (editor, record): edit_index, case_id, status, efficacy, perplexity_base,
    perplexity_alone and ratio. The model is left unedited.
    """
    targets = TargetCache()
    base = perplexity(model, tok, texts)
    sessions = {}
    for name in editors:
        sessions[name] = EditSession(
            model, tok, get_editor(name, {"layer": layer, **(hparams or {})}), templates=templates, stats=stats,
            target_cache=targets, out=None if out is None else pathlib.Path(out) / name, progress=False,
            config={"mode": ALONE, "batch_size": 1, "note": "every edit made alone on the unedited model: "
                    "model_at(i) is the unedited model with edit i alone; --resume does not apply"})
        templates = sessions[name].env.templates
    rows = []
    for i, record in enumerate(records):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            row = s.edit(record)
            ppl = perplexity(model, tok, texts) if row["status"] == "ok" else float("nan")
            s.restore()
            rows.append({"editor": name, "edit_index": row["edit_index"], "case_id": row["case_id"],
                         "status": row["status"], "efficacy": row.get("efficacy"), "perplexity_base": base,
                         "perplexity_alone": ppl, "ratio": ppl / base, "seconds": time.perf_counter() - t0})
            if log is not None:
                log(f"[{i + 1}/{len(records)}] {name} {row['case_id']}: perplexity x{ppl / base:.3g}")
    return pd.DataFrame(rows)


def confirm_disabling_edits(run: Run, edit_indices: list[int], model: nn.Module, tok: object,
                            texts: list[str], perplexity_ratio: float = 1.5) -> pd.DataFrame:
    """Apply each edit's update alone to the unedited ``model`` and measure held-out perplexity.

    Returns edit_index, perplexity_base, perplexity_alone, ratio and ``disabling`` (ratio above
    ``perplexity_ratio``). The model is left unedited.
    """
    if model_fingerprint(model) != run.config.get("model_fingerprint"):
        raise CollapseDiagError("confirmation needs the run's unedited base model (fingerprint differs)")
    arch = ArchSpec(**run.config["arch"])
    device = next(model.parameters()).device
    base = perplexity(model, tok, texts)
    rows = []
    for i in edit_indices:
        match = run.edits.loc[run.edits["edit_index"] == i, "batch_index"]
        if match.empty:
            raise CollapseDiagError(f"run {run.path} has no edit {i}")
        with apply_deltas(model, run_deltas(run, int(match.iloc[0]), arch, device)):
            alone = perplexity(model, tok, texts)
        rows.append({"edit_index": int(i), "perplexity_base": base, "perplexity_alone": alone,
                     "ratio": alone / base, "disabling": bool(alone / base > perplexity_ratio)})
    return pd.DataFrame(rows, columns=["edit_index", "perplexity_base", "perplexity_alone", "ratio", "disabling"])
