"""Rebuild an edited model from a saved run: the base weights plus each stored update, in order."""
from __future__ import annotations

import torch
from torch import nn

from .arch import ArchSpec
from .editors.base import Delta, apply_deltas
from .errors import CollapseDiagError
from .models import model_fingerprint


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
    included) to the unedited ``model`` in place."""
    if check_fingerprint and model_fingerprint(model) != run.config.get("model_fingerprint"):
        raise CollapseDiagError("the model is not the run's unedited base model (fingerprint differs)")
    done = run.edits["edit_index"].astype(int)
    if upto > int(done.max() if len(done) else -1):
        raise CollapseDiagError(f"run {run.path} has no edit {upto} (last: {int(done.max()) if len(done) else None})")
    arch = ArchSpec(**run.config["arch"])
    device = next(model.parameters()).device
    batches = sorted(set(run.edits.loc[done <= upto, "batch_index"].astype(int)))
    for b in batches:
        apply_deltas(model, run_deltas(run, b, arch, device))
    return model
