"""Rebuild an edited model from a saved run: the base weights plus each stored update, in order."""
from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from ..arch import ArchSpec, get_module, weight_matrix
from ..editors.base import Delta, apply_deltas
from ..errors import CollapseDiagError
from ..models import model_fingerprint
from ..signals.energy import hyperspherical_energy


def run_deltas(run: object, batch_index: int, arch: ArchSpec, device: torch.device | str = "cpu") -> list[Delta]:
    """The updates stored for one batch, on ``device`` (empty when none of its edits is ok)."""
    rows = run.edits[run.edits["batch_index"] == batch_index]
    if rows.empty or not (rows["status"] == "ok").any():
        return []
    factors = run.factors(batch_index)
    layers = sorted({int(k.split("_", 1)[1]) for k in factors if k.startswith("left_")})
    return [Delta(module=arch.rewrite_name(layer), layer=layer,
                  left=torch.from_numpy(factors[f"left_{layer}"]).to(device),
                  right=torch.from_numpy(factors[f"right_{layer}"]).to(device)) for layer in layers]


def apply_run(model: nn.Module, run: object, upto: int, check_fingerprint: bool = True) -> nn.Module:
    """Apply the updates of edits 0..``upto`` of ``run`` (whole batches: the batch holding ``upto`` is
    included) to the unedited ``model`` in place. In a run of edits made each alone on the unedited model
    (``validate.edit_each_alone``, ``run.made_alone``) only edit ``upto``'s update is applied."""
    if check_fingerprint and model_fingerprint(model) != run.config.get("model_fingerprint"):
        raise CollapseDiagError("the model is not the run's unedited base model (fingerprint differs)")
    done = run.edits["edit_index"].astype(int)
    if upto > int(done.max() if len(done) else -1):
        raise CollapseDiagError(f"run {run.path} has no edit {upto} (last: {int(done.max()) if len(done) else None})")
    arch = ArchSpec(**run.config["arch"])
    device = next(model.parameters()).device
    batch_of = run.edits.assign(edit_index=done).set_index("edit_index")["batch_index"].astype(int)
    if run.made_alone:
        if upto >= 0:
            apply_deltas(model, run_deltas(run, int(batch_of[upto]), arch, device))
        return model
    start = _load_snapshot(model, run, arch, upto, batch_of)
    batches = sorted(set(batch_of[(batch_of.index <= upto) & (batch_of.index > start)]))
    for b in batches:
        apply_deltas(model, run_deltas(run, b, arch, device))
    return model


def _load_snapshot(model: nn.Module, run: object, arch: ArchSpec, upto: int, batch_of: "pd.Series") -> int:
    """Copy the latest usable snapshot at or before ``upto`` into ``model``; returns its edit index (−1: none).

    A snapshot is usable when it closes a batch of the run (the run may have been cut back on resume)."""
    last_of_batch = set(batch_of.groupby(batch_of).apply(lambda s: s.index.max()))
    for index in reversed(getattr(run, "snapshots", lambda: [])()):
        if index > upto or index not in last_of_batch:
            continue
        with torch.no_grad():
            for layer, w in run.snapshot(index).items():
                weight_matrix(get_module(model, arch.rewrite_name(layer))).copy_(torch.from_numpy(w))
        return index
    return -1


def run_energy(run: object, model: nn.Module, s: float = 1.0) -> pd.DataFrame:
    """HE per batch and edited layer of a saved run, replayed from its stored updates on ``model``.

    ``model`` is the run's unedited base model; it is edited in place (every batch's update, in order) and
    left at the run's last edit. Columns edit_index (the batch's last edit), batch_index, layer,
    weight_energy and weight_energy_ratio (HE(W)/HE(W₀)); runs whose ``layers`` table records weight_energy
    already can read it there instead."""
    if getattr(run, "made_alone", False):
        raise CollapseDiagError(f"run {run.path} made each edit alone on the unedited model: its updates do not "
                                "accumulate, so it has no energy trajectory")
    arch = ArchSpec(**run.config["arch"])
    layers = [int(x) for x in run.config["layers"]]
    device = next(model.parameters()).device

    def energies() -> dict[int, float]:
        return {layer: hyperspherical_energy(weight_matrix(get_module(model, arch.rewrite_name(layer))), s)
                for layer in layers}

    base = energies()
    rows = []
    edits = run.edits.assign(edit_index=run.edits["edit_index"].astype(int),
                             batch_index=run.edits["batch_index"].astype(int))
    for batch, g in edits.groupby("batch_index", sort=True):
        deltas = run_deltas(run, int(batch), arch, device)
        if not deltas:
            continue
        apply_deltas(model, deltas)
        for layer, he in energies().items():
            rows.append({"edit_index": int(g["edit_index"].max()), "batch_index": int(batch), "layer": layer,
                         "weight_energy": he, "weight_energy_ratio": he / base[layer]})
    return pd.DataFrame(rows, columns=["edit_index", "batch_index", "layer", "weight_energy",
                                       "weight_energy_ratio"])
